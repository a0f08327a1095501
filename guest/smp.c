/*
 * The `smp` check: read the MP table, start every other enabled processor
 * with INIT, SIPI, SIPI (Intel MP spec 1.4, appendix B.4) through the xAPIC,
 * and count the APs that reach long mode.
 */
#include "guest.h"
#include "smp.h"

#define SIPI_VECTOR (TRAMP_BASE >> 12)

#define APIC_ID  0x20
#define ICR_INIT        0x00000500
#define ICR_STARTUP     0x00000600
#define ICR_LEVEL       0x00008000
#define ICR_ASSERT      0x00004000

/* Delays are TSC spins at CPL3, sized for a TSC of up to 4 GHz (so never shorter than the spec asks). */
#define TSC_10MS     40000000ULL
#define TSC_200US    800000ULL
#define TSC_AP_WAIT  8000000000ULL /* 2 s at 4 GHz, 8 s at 1 GHz */

extern char tramp_start[], tramp_end[];
extern volatile uint32_t ap_started;

static bool start_ap(uint32_t apic_id)
{
    if (!lapic_send_ipi(apic_id, ICR_INIT | ICR_LEVEL | ICR_ASSERT))
        return false;
    run_user(user_delay, TSC_10MS);
    lapic_send_ipi(apic_id, ICR_INIT | ICR_LEVEL); /* de-assert */
    for (int i = 0; i < 2; i++) {
        if (!lapic_send_ipi(apic_id, ICR_STARTUP | ICR_ASSERT | SIPI_VECTOR))
            return false;
        run_user(user_delay, TSC_200US);
    }
    return true;
}

const char *check_smp(void)
{
    static struct mp_info info;
    static char reason[96];

    memset(&info, 0, sizeof(info));
    run_user(user_mp_find, (uint64_t)&info);
    if (!info.fp_addr)
        return "no MP table";
    if (info.error)
        return info.error;
    kprintf("MPTABLE at=0x%lx config=0x%lx lapic=0x%lx apic_ids=", info.fp_addr, info.cfg_addr, info.lapic_addr);
    for (unsigned i = 0; i < info.ncpus; i++)
        kprintf(i ? ",%u" : "%u", info.apic_ids[i]);
    kprintf("\n");

    unsigned started = 0;
    if (info.ncpus > 1) {
        if (!lapic_base())
            return "local APIC disabled or in x2APIC mode";
        uint32_t self = lapic_read(APIC_ID) >> 24;
        lapic_software_enable();
        memcpy(phys(TRAMP_BASE), tramp_start, tramp_end - tramp_start);
        ap_started = 0;
        unsigned sent = 0;
        for (unsigned i = 0; i < info.ncpus; i++) {
            if (info.apic_ids[i] == self)
                continue;
            if (!start_ap(info.apic_ids[i]))
                kprintf("SMP apic_id=%u: IPI not delivered\n", info.apic_ids[i]);
            sent++;
        }
        struct counter_wait w = { &ap_started, sent, TSC_AP_WAIT };
        started = run_user(user_wait_counter, (uint64_t)&w);
    }
    kprintf("SMP cpus=%u started=%u\n", info.ncpus, started);
    if (started != info.ncpus - 1) {
        ksnprintf(reason, sizeof(reason), "started %u of %u APs", started, info.ncpus - 1);
        return reason;
    }
    return NULL;
}
