/* Local APIC (xAPIC, memory-mapped) access. */
#include "guest.h"

#define MSR_APIC_BASE      0x1b
#define APIC_BASE_X2APIC   (1u << 10)
#define APIC_BASE_ENABLE   (1u << 11)
#define APIC_SVR           0xf0
#define APIC_SVR_ENABLE    (1u << 8)
#define APIC_ICR_LOW       0x300
#define APIC_ICR_HIGH      0x310
#define APIC_LVT0          0x350
#define ICR_DELIVERY_BUSY  (1u << 12)
#define APIC_LVT_MASKED    (1u << 16)
#define APIC_LVT_MODE      (7u << 8)
#define APIC_LVT_EXTINT    (7u << 8)

static inline uint64_t rdmsr(uint32_t msr)
{
    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return (uint64_t)hi << 32 | lo;
}

/* Physical address of the xAPIC registers; 0 if the APIC is off or in x2APIC mode. */
uint64_t lapic_base(void)
{
    static uint64_t base = 1; /* 1: not read yet */
    if (base == 1) {
        uint64_t v = rdmsr(MSR_APIC_BASE);
        base = (v & APIC_BASE_ENABLE) && !(v & APIC_BASE_X2APIC) ? v & 0xffffff000ULL : 0;
    }
    return base;
}

uint32_t lapic_read(uint32_t reg) { return mmio_read32(lapic_base() + reg); }
void lapic_write(uint32_t reg, uint32_t v) { mmio_write32(lapic_base() + reg, v); }

static bool icr_wait_idle(void)
{
    for (int i = 0; i < 1000; i++)
        if (!(lapic_read(APIC_ICR_LOW) & ICR_DELIVERY_BUSY))
            return true;
    return false;
}

/* Writes ICR high (destination) then low (sends); waits for delivery. */
bool lapic_send_ipi(uint32_t apic_id, uint32_t icr_low)
{
    if (!icr_wait_idle())
        return false;
    lapic_write(APIC_ICR_HIGH, apic_id << 24);
    lapic_write(APIC_ICR_LOW, icr_low);
    return icr_wait_idle();
}

/* SVR bit 8, with spurious vector 0xff. */
void lapic_software_enable(void)
{
    uint32_t svr = lapic_read(APIC_SVR);
    if ((svr & (APIC_SVR_ENABLE | 0xff)) != (APIC_SVR_ENABLE | VEC_SPURIOUS))
        lapic_write(APIC_SVR, (svr & ~0xffu) | APIC_SVR_ENABLE | VEC_SPURIOUS);
}

/*
 * PIC interrupts reach the BSP only through LINT0 in ExtINT mode (virtual
 * wire, as a BIOS leaves it) or with the local APIC globally disabled. A VMM
 * is expected to have set this up; if it has not (QEMU's microvm with PVH
 * boot leaves LINT0 masked), say so and set it, as a BIOS would.
 */
void lapic_ensure_virtual_wire(void)
{
    uint64_t base = lapic_base();
    if (!base)
        return;
    uint32_t lvt0 = mmio_read32(base + APIC_LVT0);
    if (!(lvt0 & APIC_LVT_MASKED) && (lvt0 & APIC_LVT_MODE) == APIC_LVT_EXTINT)
        return;
    uint32_t svr = mmio_read32(base + APIC_SVR);
    kprintf("NOTE lapic lvt0=0x%x svr=0x%x: not virtual wire (unmasked ExtINT); setting it\n", lvt0, svr);
    lapic_software_enable(); /* while software-disabled, every LVT entry stays masked */
    mmio_write32(base + APIC_LVT0, APIC_LVT_EXTINT);
}
