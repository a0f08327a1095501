/*
 * AP start-up trampoline, copied to TRAMP_BASE (0x10000) and entered by a
 * SIPI with vector 0x10 in real mode at 1000:0000. Real mode -> protected
 * mode -> long mode on the BSP's page tables; then the AP increments
 * ap_started atomically and halts forever with interrupts off. It needs no
 * stack. Code here is position-dependent on TRAMP_BASE: only offsets within
 * the trampoline and absolute addresses of the main image are used.
 */

#include "guest.h"

#define T(sym) (TRAMP_BASE + ((sym) - tramp_start))

    .section .rodata.trampoline, "a"
    .code16
    .globl tramp_start, tramp_end
tramp_start:
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl tramp_gdt_ptr - tramp_start
    movl %cr0, %eax
    orl $1, %eax                    /* PE */
    movl %eax, %cr0
    ljmpl $0x08, $T(tramp32)

    .code32
tramp32:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl $0x20, %eax                /* CR4.PAE */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx          /* EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000000, %eax           /* PG */
    movl %eax, %cr0
    ljmp $0x18, $ap_entry64         /* in the main image */

    .balign 8
tramp_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff        /* 0x08: 32-bit code */
    .quad 0x00cf92000000ffff        /* 0x10: data */
    .quad 0x00af9a000000ffff        /* 0x18: 64-bit code */
tramp_gdt_ptr:
    .word tramp_gdt_ptr - tramp_gdt - 1
    .long T(tramp_gdt)
tramp_end:

    .section .text, "ax"
    .code64
ap_entry64:
    lock incl ap_started(%rip)
1:  cli
    hlt
    jmp 1b

    .section .bss
    .balign 4
    .globl ap_started
ap_started:
    .skip 4
