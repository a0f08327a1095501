/*
 * Normalize boot information from either entry protocol into `boot`:
 *  - Linux boot protocol: struct boot_params ("zero page"), see
 *    Documentation/arch/x86/zero-page.rst and boot.rst.
 *  - Xen PVH: struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h).
 * Everything is copied, so later checks may overwrite the originals.
 */
#include "guest.h"

/* boot_params offsets */
#define BP_ACPI_RSDP_ADDR   0x070 /* u64: the RSDP (boot protocol 2.14); 0 if not given */
#define BP_EXT_CMD_LINE_PTR 0x0c8 /* u32: bits 63:32 of the command line address */
#define BP_E820_ENTRIES     0x1e8 /* u8 */
#define BP_CMD_LINE_PTR     0x228 /* u32, in setup_header */
#define BP_E820_TABLE       0x2d0 /* 128 x { u64 addr, u64 size, u32 type }, packed */
#define BP_E820_MAX         128

#define HVM_START_MAGIC 0x336ec578

struct hvm_start_info {
    uint32_t magic;
    uint32_t version;
    uint32_t flags;
    uint32_t nr_modules;
    uint64_t modlist_paddr;
    uint64_t cmdline_paddr;
    uint64_t rsdp_paddr;
    uint64_t memmap_paddr; /* version >= 1 */
    uint32_t memmap_entries;
    uint32_t reserved;
} __attribute__((packed));

struct hvm_memmap_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type;
    uint32_t reserved;
} __attribute__((packed));

struct bp_e820_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type;
} __attribute__((packed));

struct bootinfo boot;

/* Entries of size 0 carry nothing (qboot's PVH map ends with one) and are dropped. */
static void add_e820(uint64_t addr, uint64_t size, uint32_t type)
{
    if (!size || boot.e820_count >= E820_MAX)
        return;
    boot.e820[boot.e820_count].addr = addr;
    boot.e820[boot.e820_count].size = size;
    boot.e820[boot.e820_count].type = type;
    boot.e820_count++;
}

static void copy_cmdline(uint64_t paddr)
{
    if (!paddr)
        return;
    const char *src = phys(paddr);
    size_t i;
    for (i = 0; i < CMDLINE_MAX - 1 && src[i]; i++)
        boot.cmdline[i] = src[i];
    boot.cmdline[i] = '\0';
}

static void from_boot_params(uint64_t bp)
{
    const uint8_t *p = phys(bp);
    unsigned n = p[BP_E820_ENTRIES];
    if (n > BP_E820_MAX)
        n = BP_E820_MAX;
    const struct bp_e820_entry *e = (const void *)(p + BP_E820_TABLE);
    for (unsigned i = 0; i < n; i++)
        add_e820(e[i].addr, e[i].size, e[i].type);
    boot.rsdp_paddr = *(const uint64_t *)(p + BP_ACPI_RSDP_ADDR);
    uint64_t cmd = *(const uint32_t *)(p + BP_CMD_LINE_PTR) | (uint64_t)*(const uint32_t *)(p + BP_EXT_CMD_LINE_PTR) << 32;
    copy_cmdline(cmd);
}

static void from_hvm_start_info(uint64_t si_paddr)
{
    const struct hvm_start_info *si = phys(si_paddr);
    if (si->magic != HVM_START_MAGIC) {
        kprintf("BOOTINFO bad hvm_start_info magic 0x%x at 0x%lx\n", si->magic, si_paddr);
        return;
    }
    copy_cmdline(si->cmdline_paddr);
    boot.rsdp_paddr = si->rsdp_paddr;
    if (si->version < 1 || !si->memmap_paddr)
        return;
    const struct hvm_memmap_entry *e = phys(si->memmap_paddr);
    unsigned n = si->memmap_entries < E820_MAX ? si->memmap_entries : E820_MAX;
    for (unsigned i = 0; i < n; i++)
        add_e820(e[i].addr, e[i].size, e[i].type);
}

void bootinfo_init(int kind, uint64_t info_paddr)
{
    boot.kind = kind;
    boot.info_paddr = info_paddr;
    if (!info_paddr) {
        kprintf("BOOTINFO no boot information pointer\n");
        return;
    }
    if (kind == BOOT_PVH)
        from_hvm_start_info(info_paddr);
    else
        from_boot_params(info_paddr);
}
