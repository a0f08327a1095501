/*
 * Xen PVH entry: the XEN_ELFNOTE_PHYS32_ENTRY note and the 32-bit entry point.
 *
 * Entered in 32-bit protected mode, paging off, EBX = physical address of
 * struct hvm_start_info. We rely on nothing else from the VMM: no GDT, no
 * stack. Load our GDT, enable PAE + our identity page tables + EFER.LME +
 * paging, then far-jump to 64-bit code and join the common path.
 */

#include "guest.h"

#define XEN_ELFNOTE_PHYS32_ENTRY 18

    .section .note.Xen, "a"
    .balign 4
    .long 4                         /* namesz: "Xen\0" */
    .long 4                         /* descsz */
    .long XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .long pvh_entry                 /* 32-bit physical entry address */

    .section .text, "ax"
    .code32
    .globl pvh_entry
pvh_entry:
    /* First guest byte, before anything else. */
    movw $COM1, %dx
    movb $'k', %al
    outb %al, %dx

    cli
    movl %ebx, %esi                 /* hvm_start_info, kept in ESI */
    lgdt gdt_ptr                    /* 32-bit base: the GDT is below 4 GiB */
    movl $SEL_KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs

    movl $0x20, %eax                /* CR4.PAE */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx          /* IA32_EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax           /* PG | PE */
    movl %eax, %cr0
    ljmp $SEL_KCODE, $pvh_entry64   /* compatibility mode -> 64-bit mode */

    .code64
pvh_entry64:
    movl $BOOT_PVH, %edi
    jmp common64
