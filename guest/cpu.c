/* TSS, IDT and the trap dispatcher (the GDT and page tables are static, in tables.S). */
#include "guest.h"

struct tss64 {
    uint32_t reserved0;
    uint64_t rsp[3];
    uint64_t reserved1;
    uint64_t ist[7];
    uint64_t reserved2;
    uint16_t reserved3;
    uint16_t iomap_base;
    uint8_t iomap[8192 + 1]; /* all ports allowed, then the terminating 0xff byte */
} __attribute__((packed));

struct idt_gate {
    uint16_t offset_low;
    uint16_t selector;
    uint8_t ist;
    uint8_t type_attr;
    uint16_t offset_mid;
    uint32_t offset_high;
    uint32_t reserved;
} __attribute__((packed));

extern uint64_t gdt_tss[2];
extern const uint64_t trap_stub_table[], trap_stub_count;
extern char trap_stack_top[], ud_entry[];

static struct tss64 tss __attribute__((aligned(16)));
static struct idt_gate idt[256] __attribute__((aligned(16)));
volatile bool emufail_active;

static void set_gate(unsigned vec, uint64_t handler, unsigned dpl)
{
    struct idt_gate *g = &idt[vec];
    g->offset_low = handler & 0xffff;
    g->selector = SEL_KCODE;
    g->ist = 0;
    g->type_attr = 0x8e | (dpl << 5); /* present, 64-bit interrupt gate */
    g->offset_mid = (handler >> 16) & 0xffff;
    g->offset_high = handler >> 32;
    g->reserved = 0;
}

void cpu_init(void)
{
    uint64_t base = (uint64_t)&tss, limit = sizeof(tss) - 1;

    tss.rsp[0] = (uint64_t)trap_stack_top;
    /*
     * User-mode port I/O: IOPL 3 in the user RFLAGS is enough on VMX/SVM, but
     * PVM ignores the guest's IOPL at CPL3 and consults the TSS I/O permission
     * bitmap; so also provide a bitmap that allows every port.
     */
    tss.iomap_base = offsetof(struct tss64, iomap);
    tss.iomap[8192] = 0xff;
    gdt_tss[0] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ULL << 40) /* present, available 64-bit TSS */
                 | (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
    gdt_tss[1] = base >> 32;
    __asm__ volatile("ltr %w0" : : "r"(SEL_TSS));

    for (uint64_t i = 0; i < trap_stub_count; i++)
        set_gate(trap_stub_table[2 * i], trap_stub_table[2 * i + 1], 0);
    set_gate(6, (uint64_t)ud_entry, 0); /* also ends run_user() */

    struct __attribute__((packed)) { uint16_t limit; uint64_t base; } idtr = { sizeof(idt) - 1, (uint64_t)idt };
    __asm__ volatile("lidt %0" : : "m"(idtr));
}

void trap_dispatch(struct trap_frame *f)
{
    if (f->vector >= VEC_IRQ0 && f->vector < VEC_IRQ0 + 16) {
        pic_dispatch(f->vector - VEC_IRQ0);
        return;
    }
    if (f->vector == VEC_SPURIOUS)
        return;
    if (f->vector >= VEC_MSI0 && f->vector < VEC_MSI0 + 16) {
        msi_dispatch(f->vector - VEC_MSI0);
        return;
    }

    kprintf("EXCEPTION %lu rip=0x%lx err=0x%lx\n", f->vector, f->rip, f->error);
    uint64_t cr2 = 0;
    if (f->vector == 14)
        __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    kprintf("TRAPFRAME cs=0x%lx ss=0x%lx rsp=0x%lx rflags=0x%lx cr2=0x%lx\n", f->cs, f->ss, f->rsp, f->rflags, cr2);
    if (emufail_active)
        kprintf("TEST emufail FAIL continued\n");
    guest_exit(3);
}
