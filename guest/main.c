/* kmain: banner, set-up, the checks named on the command line, exit status. */
#include "guest.h"

struct check {
    const char *name;
    const char *(*run)(void);
};

static const struct check checks[] = {
    { "serial", check_serial },       { "e820", check_e820 },
    { "cmdline", check_cmdline },     { "bootinfo", check_bootinfo },
    { "cpl3", check_cpl3 },           { "pio-loop", check_pio_loop },
    { "mmio-loop", check_mmio_loop }, { "touch", check_touch },
    { "smp", check_smp },             { "uart-rx", check_uart_rx },
    { "uart-thre", check_uart_thre }, { "echo", check_echo },
    { "cpuid", check_cpuid },         { "emufail", check_emufail },
    { "reset", check_reset },         { "ctrlaltdel", check_ctrlaltdel },
    { "emufail-insn", check_emufail_insn },
    { "virtio-probe", check_virtio_probe },
    { "virtio-blk", check_virtio_blk },
    { "virtio-blk-irq", check_virtio_blk_irq },
    { "virtio-blk-bench", check_virtio_blk_bench },
    { "virtio-blk-seqbench", check_virtio_blk_seqbench },
    { "virtio-rng", check_virtio_rng },
    { "virtio-net", check_virtio_net },
    { "virtio-net-bench", check_virtio_net_bench },
    { "virtio-net-serve", check_virtio_net_serve },
    { "virtio-net-sink", check_virtio_net_sink },
    { "virtio-vsock", check_virtio_vsock },
    { "attack-blk-charge", check_attack_blk_charge }, { "attack-blk-reset", check_attack_blk_reset }, { "attack-blk-storm", check_attack_blk_storm }, { "attack-blk-usedlen", check_attack_blk_usedlen },
    { "attack-indirect-long", check_attack_indirect_long }, { "attack-queue-flood", check_attack_queue_flood },
    { "attack-vsock-reuse", check_attack_vsock_reuse }, { "attack-vsock-conns", check_attack_vsock_conns }, { "attack-vsock-flood", check_attack_vsock_flood },
    { "vmgenid", check_vmgenid },     { "snapwork", check_snapwork },
    { "pci-probe", check_pci_probe }, { "virtio-pci-msix", check_virtio_pci_msix },
    { "vtd-probe", check_vtd_probe }, { "vtd-on", check_vtd_on }, { "vtd-off", check_vtd_off },
    { "vtd-fault", check_vtd_fault }, { "vtd-stale", check_vtd_stale }, { "vtd-isolation", check_vtd_isolation },
    { "tpm", check_tpm },
    { "dirtyrate", check_dirtyrate },
};

unsigned checks_passed, checks_failed;

void guest_exit(unsigned status)
{
    outb(DEBUG_EXIT, (uint8_t)status);
    for (;;)
        __asm__ volatile("cli; hlt");
}

static void run_check(const char *name, size_t len)
{
    char buf[64];
    const char *failure = "unknown check";

    if (len >= sizeof(buf))
        len = sizeof(buf) - 1;
    memcpy(buf, name, len);
    buf[len] = '\0';
    for (size_t i = 0; i < sizeof(checks) / sizeof(checks[0]); i++) {
        if (strcmp(buf, checks[i].name) == 0) {
            failure = checks[i].run();
            break;
        }
    }
    if (failure) {
        kprintf("TEST %s FAIL %s\n", buf, failure);
        checks_failed++;
    } else {
        kprintf("TEST %s PASS\n", buf);
        checks_passed++;
    }
}

void kmain(int kind, uint64_t info_paddr)
{
    /* The entry code already wrote the 'k'. */
    serial_puts(kind == BOOT_PVH ? "vmlet-guest: boot=pvh\n" : "vmlet-guest: boot=64bit\n");
    serial_init();
    cpu_init();
    bootinfo_init(kind, info_paddr);
    options_parse(boot.cmdline);

    const char *p = opt.tests;
    while (*p) {
        const char *name = p;
        while (*p && *p != ',')
            p++;
        if (p > name)
            run_check(name, p - name);
        if (*p == ',')
            p++;
    }
    kprintf("TESTS DONE %u %u\n", checks_passed, checks_failed);
    guest_exit(opt.exit_set ? opt.exit_status : checks_failed ? 1 : 0);
}
