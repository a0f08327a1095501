/*
 * Static descriptor and page tables, ready in the image so that boot runs as
 * few (emulated) kernel-mode instructions as possible.
 *
 * Page tables: identity map of 0-4 GiB with 2 MiB pages, U/S set everywhere
 * (CPL3 code may touch all of it, MMIO included). 0-3 GiB write-back,
 * 3-4 GiB uncached (PCD|PWT: LAPIC, IOAPIC, MMIO). Accessed and dirty bits are
 * preset so the CPU never writes to the tables.
 */

#define PTE_P   0x001
#define PTE_W   0x002
#define PTE_U   0x004
#define PTE_PWT 0x008
#define PTE_PCD 0x010
#define PTE_A   0x020
#define PTE_D   0x040
#define PTE_PS  0x080

#define TABLE  (PTE_P | PTE_W | PTE_U | PTE_A)
#define LARGE  (PTE_P | PTE_W | PTE_U | PTE_A | PTE_D | PTE_PS)

    .section .data.pagetables, "aw"
    .balign 4096
    .globl pml4
pml4:
    .quad pdpt + TABLE
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x0000 + TABLE
    .quad pd + 0x1000 + TABLE
    .quad pd + 0x2000 + TABLE
    .quad pd + 0x3000 + TABLE
    .fill 508, 8, 0
pd:
    .set page, 0
    .rept 1536                      /* 0 - 3 GiB */
    .quad (page << 21) + LARGE
    .set page, page + 1
    .endr
    .rept 512                       /* 3 - 4 GiB */
    .quad (page << 21) + LARGE + PTE_PCD + PTE_PWT
    .set page, page + 1
    .endr

/*
 * GDT: 0x08 kernel code (64-bit), 0x10 kernel data, 0x18 user data (DPL 3),
 * 0x20 user code (64-bit, DPL 3), 0x28 64-bit TSS (filled by cpu_init).
 */
    .section .data, "aw"
    .balign 16
    .globl gdt, gdt_tss
gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08: code, L=1, DPL 0 */
    .quad 0x00cf92000000ffff        /* 0x10: data, DPL 0 */
    .quad 0x00cff2000000ffff        /* 0x18: data, DPL 3 */
    .quad 0x00affa000000ffff        /* 0x20: code, L=1, DPL 3 */
gdt_tss:
    .quad 0, 0                      /* 0x28: TSS */
gdt_end:

    .balign 8
    .globl gdt_ptr
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
