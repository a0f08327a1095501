/*
 * PCI configuration access and enumeration of bus 0 (PCI Express Base 4.0, 7.2: ECAM; PCI Local Bus 3.0,
 * 3.2.2.3.2: configuration mechanism #1 at 0xCF8/0xCFC), BARs and the capability list, MSI vectors, and the
 * `pci-probe` check.
 *
 * ECAM is found through ACPI MCFG (segment 0), or given as kvmlet.pci_ecam=<address>; without either only
 * the legacy mechanism is used. Everything but the MSI waits runs at CPL3 (MMIO and ports are reachable).
 */
#include "pci.h"

static uint64_t ecam;
static bool probed;
volatile uint32_t msi_count[16];

uint64_t pci_ecam_base(void) { return ecam; }

bool pci_init(void)
{
    if (probed)
        return ecam != 0;
    probed = true;
    ecam = virtio_option_u64("kvmlet.pci_ecam", 0);
    if (!ecam) {
        const struct acpi_header *mcfg = acpi_find_table("MCFG");
        if (mcfg && mcfg->length >= sizeof(*mcfg) + 8 + 16) {
            const uint8_t *entry = (const uint8_t *)mcfg + sizeof(*mcfg) + 8;
            uint16_t segment;
            memcpy(&ecam, entry, 8);
            memcpy(&segment, entry + 8, 2);
            if (segment != 0 || entry[10] != 0)
                ecam = 0; /* not segment 0 starting at bus 0 */
        }
    }
    return ecam != 0;
}

static uint32_t legacy_address(uint16_t bdf, unsigned off) { return 0x80000000u | (uint32_t)bdf << 8 | (off & 0xfc); }

static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline uint32_t inl(uint16_t port)
{
    uint32_t v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

uint32_t pci_legacy_read32(uint16_t bdf, unsigned off)
{
    outl(0xcf8, legacy_address(bdf, off));
    return inl(0xcfc);
}

uint32_t pci_read(uint16_t bdf, unsigned off, unsigned size)
{
    pci_init();
    if (ecam) {
        uint64_t a = ecam + ((uint64_t)bdf << 12) + off;
        if (size == 1)
            return *(volatile uint8_t *)phys(a);
        if (size == 2)
            return *(volatile uint16_t *)phys(a);
        return mmio_read32(a);
    }
    uint32_t v = pci_legacy_read32(bdf, off);
    v >>= 8 * (off & 3);
    return size == 4 ? v : v & ((1u << (8 * size)) - 1);
}

void pci_write(uint16_t bdf, unsigned off, unsigned size, uint32_t v)
{
    pci_init();
    if (ecam) {
        uint64_t a = ecam + ((uint64_t)bdf << 12) + off;
        if (size == 1)
            *(volatile uint8_t *)phys(a) = (uint8_t)v;
        else if (size == 2)
            *(volatile uint16_t *)phys(a) = (uint16_t)v;
        else
            mmio_write32(a, v);
        return;
    }
    outl(0xcf8, legacy_address(bdf, off));
    if (size == 1)
        outb(0xcfc + (off & 3), (uint8_t)v);
    else if (size == 2)
        __asm__ volatile("outw %w0, %w1" : : "a"((uint16_t)v), "Nd"((uint16_t)(0xcfc + (off & 2))));
    else
        outl(0xcfc, v);
}

uint64_t pci_bar(uint16_t bdf, unsigned index, bool *is64)
{
    uint32_t lo = pci_read(bdf, PCI_BAR0 + 4 * index, 4);
    bool wide = (lo & 0x7) == 0x4;
    if (is64)
        *is64 = wide;
    if (lo & 1)
        return 0; /* an I/O BAR */
    uint64_t a = lo & ~0xfu;
    if (wide)
        a |= (uint64_t)pci_read(bdf, PCI_BAR0 + 4 * index + 4, 4) << 32;
    return a;
}

unsigned pci_find_cap(uint16_t bdf, uint8_t id, unsigned after)
{
    if (!(pci_read(bdf, PCI_STATUS, 2) & PCI_STATUS_CAPS))
        return 0;
    unsigned off = after ? pci_read(bdf, after + 1, 1) : pci_read(bdf, PCI_CAP_PTR, 1);
    for (int guard = 0; off >= 0x40 && off < 0x100 && guard < 48; guard++) {
        if (pci_read(bdf, off, 1) == id)
            return off;
        off = pci_read(bdf, off + 1, 1) & 0xfc;
    }
    return 0;
}

unsigned pci_list(uint16_t *out, unsigned max)
{
    unsigned n = 0;
    for (unsigned dev = 0; dev < 32; dev++) {
        for (unsigned fn = 0; fn < 8; fn++) {
            uint16_t bdf = PCI_BDF(0, dev, fn);
            if ((pci_read(bdf, PCI_VENDOR_ID, 4) & 0xffff) == 0xffff) {
                if (fn == 0)
                    break;
                continue;
            }
            if (n < max)
                out[n++] = bdf;
            if (fn == 0 && !(pci_read(bdf, PCI_HEADER_TYPE, 1) & 0x80))
                break;
        }
    }
    return n;
}

/* ---- MSI vectors ---- */

void msi_dispatch(unsigned index)
{
    if (index < 16)
        msi_count[index]++;
    lapic_write(0xb0, 0); /* EOI */
}

bool msi_wait(unsigned index, uint32_t target, uint64_t max_tsc)
{
    uint64_t start = rdtsc_now();
    while (msi_count[index] < target) {
        if (rdtsc_now() - start > max_tsc)
            return false;
        __asm__ volatile("sti; nop; nop; cli" ::: "memory"); /* let a pending interrupt in */
    }
    return true;
}

/* ---- pci-probe ---- */

static char reason[96];

static uint64_t user_pci_probe(uint64_t unused)
{
    (void)unused;
    bool have_ecam = pci_init();
    kprintf("PCI ecam=0x%lx\n", pci_ecam_base());
    uint16_t list[64];
    unsigned n = pci_list(list, 64);
    bool bridge = false;
    for (unsigned i = 0; i < n; i++) {
        uint16_t bdf = list[i];
        uint32_t id = pci_read(bdf, PCI_VENDOR_ID, 4);
        uint32_t cls = pci_read(bdf, PCI_CLASS_REV, 4);
        kprintf("PCI %02x:%02x.%u id=%04x:%04x class=%06x rev=%u\n", bdf >> 8, bdf >> 3 & 31, bdf & 7,
                id & 0xffff, id >> 16, cls >> 8, cls & 0xff);
        if (have_ecam && pci_legacy_read32(bdf, PCI_VENDOR_ID) != id) {
            ksnprintf(reason, sizeof(reason), "ECAM and 0xCF8 disagree at %02x:%02x.%u", bdf >> 8, bdf >> 3 & 31,
                      bdf & 7);
            return (uint64_t)reason;
        }
        if (bdf == 0 && cls >> 8 == 0x060000)
            bridge = true;
        for (unsigned bar = 0; bar < 6; bar++) {
            bool wide;
            uint64_t a = pci_bar(bdf, bar, &wide);
            if (a)
                kprintf("PCI %02x:%02x.%u bar%u=0x%lx%s\n", bdf >> 8, bdf >> 3 & 31, bdf & 7, bar, a,
                        wide ? " 64-bit" : "");
            if (wide)
                bar++;
        }
    }
    if (!bridge)
        return (uint64_t)"no host bridge at 00:00.0";
    /* BAR sizing on the first function with a memory BAR 0: decoding off, all ones, read back, restore */
    for (unsigned i = 0; i < n; i++) {
        uint16_t bdf = list[i];
        uint32_t lo = pci_read(bdf, PCI_BAR0, 4);
        if (!lo || lo & 1)
            continue;
        uint32_t cmd = pci_read(bdf, PCI_COMMAND, 2);
        bool wide = (lo & 7) == 4;
        uint32_t hi = wide ? pci_read(bdf, PCI_BAR0 + 4, 4) : 0;
        pci_write(bdf, PCI_COMMAND, 2, cmd & ~PCI_CMD_MEMORY);
        pci_write(bdf, PCI_BAR0, 4, 0xffffffff);
        if (wide)
            pci_write(bdf, PCI_BAR0 + 4, 4, 0xffffffff);
        uint64_t mask = pci_read(bdf, PCI_BAR0, 4) & ~0xfull;
        mask |= wide ? (uint64_t)pci_read(bdf, PCI_BAR0 + 4, 4) << 32 : 0xffffffff00000000ull;
        pci_write(bdf, PCI_BAR0, 4, lo);
        if (wide)
            pci_write(bdf, PCI_BAR0 + 4, 4, hi);
        pci_write(bdf, PCI_COMMAND, 2, cmd);
        uint64_t size = ~mask + 1;
        kprintf("PCI %02x:%02x.%u bar0 size=0x%lx\n", bdf >> 8, bdf >> 3 & 31, bdf & 7, size);
        if (!size || size & (size - 1) || pci_read(bdf, PCI_BAR0, 4) != lo)
            return (uint64_t)"BAR sizing did not read back a power of two, or the BAR did not restore";
        break;
    }
    return 0;
}

const char *check_pci_probe(void) { return (const char *)run_user(user_pci_probe, 0); }
