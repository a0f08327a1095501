/*
 * 64-bit boot protocol entry (the ELF e_entry), entered like Linux's
 * startup_64: long mode, paging on with identity tables from the VMM covering
 * at least the first 1 GiB, flat 64-bit CS, interrupts off,
 * RSI = physical address of struct boot_params. Nothing else is assumed:
 * no stack, no particular GDT beyond the current CS.
 */

#include "guest.h"

    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    /* First guest byte, before anything else: the 'k' of "kvmlet-guest:". */
    movw $COM1, %dx
    movb $'k', %al
    outb %al, %dx

    cli
    movl $BOOT_64BIT, %edi          /* kmain(kind, info): RSI already holds boot_params */

    movl $0x20, %eax                /* CR4 = PAE only (no SMEP/SMAP/PGE/TSD) */
    movq %rax, %cr4
    movl $pml4, %eax                /* our own identity tables (0-4 GiB) */
    movq %rax, %cr3
    lgdt gdt_ptr(%rip)
    movl $SEL_KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    leaq kernel_stack_top(%rip), %rsp
    pushq $SEL_KCODE                /* reload CS from our GDT */
    leaq common64(%rip), %rax
    pushq %rax
    lretq

/*
 * Common 64-bit start for both entries: EDI = boot kind, ESI = boot info
 * physical address (zero-extended here), our CR3/GDT/segments loaded.
 */
    .globl common64
common64:
    movl %esi, %esi
    leaq kernel_stack_top(%rip), %rsp
    pushq $2                        /* RFLAGS: IF=0, DF=0, IOPL=0 */
    popfq
    call kmain
1:  cli
    hlt
    jmp 1b

    .section .bss
    .balign 16
    .globl kernel_stack_top
kernel_stack:
    .skip 16384
kernel_stack_top:
