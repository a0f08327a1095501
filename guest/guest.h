/* kvmlet test guest: shared declarations. */
#ifndef KVMLET_GUEST_H
#define KVMLET_GUEST_H

/* How the guest was entered (passed by the entry code to kmain). */
#define BOOT_64BIT 1 /* Linux 64-bit boot protocol, RSI = struct boot_params */
#define BOOT_PVH   2 /* Xen PVH, EBX = struct hvm_start_info */

#define E820_MAX    128
#define CMDLINE_MAX 2048
#define E820_RAM    1

#define COM1       0x3f8
#define DEBUG_EXIT 0x501
#define MMIO_HOLE  0xd0000000UL /* unbacked guest-physical address */

/* GDT selectors (tables.S). */
#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_UDATA 0x1b /* 0x18 | RPL 3 */
#define SEL_UCODE 0x23 /* 0x20 | RPL 3 */
#define SEL_TSS   0x28

/* IDT vectors. */
#define VEC_IRQ0     0x20 /* 8259 master remapped here, slave at 0x28 */
#define VEC_SPURIOUS 0xff /* local APIC spurious interrupt */
#define VEC_MSI0     0x50 /* MSI / MSI-X messages: 0x50-0x5f (pci.c counts them) */

#define USER_RFLAGS 0x3002 /* IOPL 3, IF 0 */
#define TRAMP_BASE  0x10000 /* AP start-up code (SIPI vector 0x10) */

#ifndef __ASSEMBLER__
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct e820_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type;
};

/* Boot information normalized from either entry protocol. */
struct bootinfo {
    int kind;            /* BOOT_64BIT or BOOT_PVH */
    uint64_t info_paddr; /* boot_params or hvm_start_info */
    uint64_t rsdp_paddr; /* ACPI RSDP from boot_params.acpi_rsdp_addr or hvm_start_info; 0 if not given */
    unsigned e820_count;
    struct e820_entry e820[E820_MAX];
    char cmdline[CMDLINE_MAX];
};

struct options {
    char tests[CMDLINE_MAX]; /* comma-separated check names */
    bool exit_set;
    unsigned exit_status;
    uint64_t loops;     /* kvmlet.loops, default 10000000 */
    uint64_t touch_mib; /* kvmlet.touch, default 16 */
    bool timeout_set;
    uint64_t timeout_s; /* kvmlet.timeout, seconds; 0 = none */
};

/* Saved registers as laid out by trap_common (traps.S). */
struct trap_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
    uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error;
    uint64_t rip, cs, rflags, rsp, ss; /* pushed by the CPU */
};

extern struct bootinfo boot;
extern struct options opt;
extern char _image_start[], _image_end[];

/* Port and memory access. */
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
/* A pointer to a physical address (identity mapped); hides the constant from the optimizer. */
static inline void *phys(uint64_t addr)
{
    void *p;
    __asm__("" : "=r"(p) : "0"(addr));
    return p;
}
static inline uint32_t mmio_read32(uint64_t addr) { return *(volatile uint32_t *)phys(addr); }
static inline void mmio_write32(uint64_t addr, uint32_t v) { *(volatile uint32_t *)phys(addr) = v; }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt" ::: "memory"); } /* no wake-up lost */
static inline void cpu_pause(void) { __asm__ volatile("pause"); }

/* lib.c */
void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
bool parse_u64(const char *s, size_t len, uint64_t *out);

/* serial.c / print.c */
void serial_init(void);
void serial_putc(char c);
void serial_puts(const char *s);
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int ksnprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* bootinfo.c, cmdline.c */
void bootinfo_init(int kind, uint64_t info_paddr);
void options_parse(const char *cmdline);
const char *cmdline_token(const char **cursor, size_t *len);
bool option_is(const char *tok, size_t len, const char *name, const char **value, size_t *value_len);

/* cpu.c, traps.S */
void cpu_init(void);
void trap_dispatch(struct trap_frame *f);
typedef uint64_t (*user_fn)(uint64_t arg);
uint64_t run_user(user_fn fn, uint64_t arg); /* runs fn(arg) at CPL3, port I/O allowed */
extern volatile bool emufail_active;

/* pic.c: 8259 PIC and 8254 PIT */
void pic_init(void);
void pic_unmask(int irq);
void pic_mask_all(void);
void pic_dispatch(int irq);
void irq_set_handler(int irq, void (*handler)(void));
void pit_start_100hz(void);
extern volatile uint64_t ticks;

/* apic.c */
uint64_t lapic_base(void);
uint32_t lapic_read(uint32_t reg);
void lapic_write(uint32_t reg, uint32_t v);
bool lapic_send_ipi(uint32_t apic_id, uint32_t icr_low);
void lapic_software_enable(void);
void lapic_ensure_virtual_wire(void);

/* usermode.c: functions run at CPL3 through run_user() */
uint64_t user_cpl3_loop(uint64_t loops);
uint64_t user_pio_loop(uint64_t loops);
uint64_t user_mmio_loop(uint64_t loops);
uint64_t user_touch(uint64_t range); /* struct touch_range * */
uint64_t user_delay(uint64_t tsc_cycles);
uint64_t user_wait_counter(uint64_t arg); /* struct counter_wait * */
uint64_t user_cpuid(uint64_t arg);        /* struct cpuid_regs *, leaf in eax */

struct touch_range { uint64_t start, end; };
struct counter_wait { volatile uint32_t *counter; uint32_t target; uint64_t max_tsc_cycles; };
struct cpuid_regs { uint32_t eax, ebx, ecx, edx; };

/* checks: each returns NULL for PASS or a failure reason. */
const char *check_serial(void);
const char *check_e820(void);
const char *check_cmdline(void);
const char *check_bootinfo(void);
const char *check_cpl3(void);
const char *check_pio_loop(void);
const char *check_mmio_loop(void);
const char *check_touch(void);
const char *check_cpuid(void);
const char *check_emufail(void);
const char *check_reset(void);
const char *check_emufail_insn(void);
const char *check_smp(void);
const char *check_uart_rx(void);
const char *check_uart_thre(void);
const char *check_echo(void);
const char *check_ctrlaltdel(void); /* ctrlaltdel.c: PS/2 keyboard through the i8042 */
/* virtio_*.c: virtio-mmio devices */
const char *check_virtio_probe(void);
const char *check_virtio_blk(void);
const char *check_virtio_blk_irq(void);
const char *check_virtio_blk_bench(void);
const char *check_virtio_blk_seqbench(void);
const char *check_virtio_rng(void);
const char *check_virtio_net(void);
const char *check_virtio_net_bench(void);
const char *check_virtio_net_serve(void), *check_virtio_net_sink(void);
const char *check_virtio_vsock(void);
const char *check_attack_blk_charge(void), *check_attack_blk_reset(void), *check_attack_blk_storm(void), *check_attack_blk_usedlen(void); /* attack_blk.c */
const char *check_attack_indirect_long(void), *check_attack_queue_flood(void); /* attack_queue.c */
const char *check_attack_vsock_reuse(void), *check_attack_vsock_conns(void), *check_attack_vsock_flood(void); /* attack_vsock.c */

const char *check_vmgenid(void);  /* vmgenid.c: the ACPI VM generation ID */
const char *check_pci_probe(void), *check_virtio_pci_msix(void); /* pci.c, virtio_pci.c */
const char *check_vtd_probe(void), *check_vtd_on(void), *check_vtd_off(void), *check_vtd_fault(void),
    *check_vtd_stale(void), *check_vtd_isolation(void); /* vtd.c */
void msi_dispatch(unsigned index); /* pci.c */
const char *check_snapwork(void); /* snapwork.c: the snapshot workload */
const char *check_tpm(void);      /* tpm.c: TPM TIS, ACPI TPM2 table, event log replay, PCRs */
const char *check_dirtyrate(void); /* dirtyrate.c: paced page dirtying (migration benchmarks) */

/* checks.c */
bool ram_covers(uint64_t start, uint64_t end); /* e820 RAM covers [start, end) */

/* guard.c: timeouts that a TSC jump (a snapshot restore) cannot expire early; seconds 0 = never */
struct time_guard { uint64_t last, elapsed, limit; };
void guard_start(struct time_guard *g, uint64_t seconds);
bool guard_expired(struct time_guard *g); /* call at least every few ms while waiting */

/* main.c */
void __attribute__((noreturn)) guest_exit(unsigned status);
extern unsigned checks_passed, checks_failed;

/* ACPI tables (acpi.c): the RSDP, then the XSDT (or RSDT), each entry checked before it is returned */
struct acpi_header {
    char signature[4];
    uint32_t length;
    uint8_t revision;
    uint8_t checksum;
    char oem_id[6];
    char oem_table_id[8];
    uint32_t oem_revision;
    uint32_t creator_id;
    uint32_t creator_revision;
} __attribute__((packed));
const struct acpi_header *acpi_find_table(const char sig[4]); /* NULL if absent or invalid */

#endif /* !__ASSEMBLER__ */
#endif
