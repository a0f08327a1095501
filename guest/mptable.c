/*
 * Intel MultiProcessor Specification 1.4: find the MP floating pointer
 * structure and read the processor entries of the MP configuration table.
 * user_mp_find() runs at CPL3 (it scans ~66 KiB).
 */
#include "guest.h"
#include "smp.h"

struct mp_floating_pointer {
    char signature[4]; /* "_MP_" */
    uint32_t config_table;
    uint8_t length; /* in 16-byte units */
    uint8_t spec_rev;
    uint8_t checksum;
    uint8_t features[5];
} __attribute__((packed));

struct mp_config_header {
    char signature[4]; /* "PCMP" */
    uint16_t base_length;
    uint8_t spec_rev;
    uint8_t checksum;
    char oem_id[8];
    char product_id[12];
    uint32_t oem_table;
    uint16_t oem_table_size;
    uint16_t entry_count;
    uint32_t lapic_addr;
    uint16_t ext_length;
    uint8_t ext_checksum;
    uint8_t reserved;
} __attribute__((packed));

struct mp_processor_entry {
    uint8_t type; /* 0 */
    uint8_t lapic_id;
    uint8_t lapic_version;
    uint8_t flags; /* bit 0: enabled, bit 1: bootstrap processor */
    uint32_t signature;
    uint32_t features;
    uint32_t reserved[2];
} __attribute__((packed));

#define MP_ENTRY_PROCESSOR 0
#define MP_CPU_ENABLED     0x01

static uint8_t checksum(uint64_t addr, size_t len)
{
    const uint8_t *p = phys(addr);
    uint8_t sum = 0;
    while (len--)
        sum += *p++;
    return sum;
}

static uint64_t scan(uint64_t start, uint64_t len)
{
    for (uint64_t a = start & ~15ULL; a + 16 <= start + len; a += 16) {
        const struct mp_floating_pointer *fp = phys(a);
        if (memcmp(fp->signature, "_MP_", 4) == 0 && fp->length && checksum(a, fp->length * 16u) == 0)
            return a;
    }
    return 0;
}

static uint64_t find_floating_pointer(void)
{
    uint64_t ebda = (uint64_t)*(const volatile uint16_t *)phys(0x40e) << 4;
    uint64_t a = 0;
    if (ebda)
        a = scan(ebda, 1024);
    if (!a)
        a = scan(0x9fc00, 1024);
    if (!a)
        a = scan(0xf0000, 0x10000);
    return a;
}

uint64_t user_mp_find(uint64_t arg)
{
    struct mp_info *info = (void *)arg;
    info->fp_addr = find_floating_pointer();
    if (!info->fp_addr) {
        info->error = "no MP table";
        return 0;
    }
    const struct mp_floating_pointer *fp = phys(info->fp_addr);
    if (!fp->config_table) {
        info->error = "MP default configuration (no config table) not supported";
        return 0;
    }
    info->cfg_addr = fp->config_table;
    const struct mp_config_header *h = phys(info->cfg_addr);
    if (memcmp(h->signature, "PCMP", 4) != 0 || h->base_length < sizeof(*h)) {
        info->error = "bad MP config table signature";
        return 0;
    }
    if (checksum(info->cfg_addr, h->base_length) != 0) {
        info->error = "bad MP config table checksum";
        return 0;
    }
    info->lapic_addr = h->lapic_addr;

    /* Walk by the base table length, as Linux does: some tables (qboot's) leave entry_count at 0. */
    uint64_t p = info->cfg_addr + sizeof(*h), end = info->cfg_addr + h->base_length;
    while (p < end) {
        uint8_t type = *(const uint8_t *)phys(p);
        if (type == MP_ENTRY_PROCESSOR) {
            const struct mp_processor_entry *e = phys(p);
            if ((e->flags & MP_CPU_ENABLED) && info->ncpus < MP_MAX_CPUS) {
                info->apic_ids[info->ncpus++] = e->lapic_id;
            }
            p += sizeof(*e);
        } else if (type <= 4) {
            p += 8; /* bus, I/O APIC, I/O interrupt, local interrupt */
        } else {
            break; /* unknown entry type: its length is unknown */
        }
    }
    if (!info->ncpus)
        info->error = "MP table lists no enabled processor";
    return 0;
}
