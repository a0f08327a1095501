/*
 * ACPI table lookup for the PCI and VT-d checks (ACPI 6.5, chapter 5): the RSDP from the boot
 * information, else searched for in the EBDA's first KiB and 0xE0000-0xFFFFF; then the XSDT (or the
 * RSDT of an ACPI 1.0 RSDP), whose entries are checked (signature, length within 64 KiB, checksum)
 * before one is returned. Used for MCFG (ECAM), DMAR (the remapping units) and TPM2 (the vTPM check).
 */
#include "pci.h"

#define IDENTITY_MAP_END (4ULL << 30)

static uint8_t sum8(const uint8_t *p, size_t n)
{
    uint8_t s = 0;
    while (n--)
        s += *p++;
    return s;
}

static bool rsdp_at(uint64_t a)
{
    const uint8_t *p = phys(a);
    if (memcmp(p, "RSD PTR ", 8) != 0 || sum8(p, 20) != 0)
        return false;
    if (p[15] >= 2 && sum8(p, 36) != 0)
        return false;
    return true;
}

static uint64_t find_rsdp(void)
{
    if (boot.rsdp_paddr && boot.rsdp_paddr < IDENTITY_MAP_END && rsdp_at(boot.rsdp_paddr))
        return boot.rsdp_paddr;
    uint64_t ebda = (uint64_t)*(volatile uint16_t *)phys(0x40e) << 4;
    for (uint64_t a = ebda; ebda && a < ebda + 1024; a += 16)
        if (rsdp_at(a))
            return a;
    for (uint64_t a = 0xe0000; a < 0x100000; a += 16)
        if (rsdp_at(a))
            return a;
    return 0;
}

static const struct acpi_header *valid_table(uint64_t a)
{
    if (!a || a + sizeof(struct acpi_header) > IDENTITY_MAP_END)
        return NULL;
    const struct acpi_header *h = phys(a);
    if (h->length < sizeof(*h) || h->length > 65536 || a + h->length > IDENTITY_MAP_END)
        return NULL;
    if (sum8((const uint8_t *)h, h->length) != 0)
        return NULL;
    return h;
}

const struct acpi_header *acpi_find_table(const char sig[4])
{
    uint64_t rsdp = find_rsdp();
    if (!rsdp)
        return NULL;
    const uint8_t *p = phys(rsdp);
    uint64_t root;
    unsigned entry_size;
    if (p[15] >= 2) {
        memcpy(&root, p + 24, 8);
        entry_size = 8;
    } else {
        uint32_t r32;
        memcpy(&r32, p + 16, 4);
        root = r32;
        entry_size = 4;
    }
    const struct acpi_header *top = valid_table(root);
    if (!top)
        return NULL;
    unsigned n = (top->length - sizeof(*top)) / entry_size;
    const uint8_t *entries = (const uint8_t *)top + sizeof(*top);
    for (unsigned i = 0; i < n; i++) {
        uint64_t a = 0;
        memcpy(&a, entries + i * entry_size, entry_size);
        const struct acpi_header *h = valid_table(a);
        if (h && memcmp(h->signature, sig, 4) == 0)
            return h;
    }
    return NULL;
}
