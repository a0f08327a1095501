/*
 * Interrupt entry stubs, and the switch to user mode (CPL3) and back.
 */

#include "guest.h"

    .section .text, "ax"
    .code64

/* One stub per vector: push a dummy error code if the CPU does not, then the vector. */
.macro STUB vec, has_error
stub_\vec:
    .if \has_error == 0
    pushq $0
    .endif
    pushq $\vec
    jmp trap_common
.endm

#define NOERR_VECTORS 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31, \
    32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47, \
    80,81,82,83,84,85,86,87,88,89,90,91,92,93,94,95,255
#define ERR_VECTORS 8,10,11,12,13,14,17,21,29,30

    .irp v, NOERR_VECTORS
    STUB \v, 0
    .endr
    .irp v, ERR_VECTORS
    STUB \v, 1
    .endr

trap_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    cld
    call trap_dispatch
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp                  /* vector, error code */
    iretq

/*
 * uint64_t run_user(user_fn fn, uint64_t arg): run fn(arg) at CPL3 on the
 * user stack with IOPL 3 and interrupts off; returns fn's result.
 * Enters user mode with iretq. The user side ends with `ud2` at user_exit:
 * the #UD is taken on the TSS RSP0 stack, and ud_entry recognizes it and
 * restores the kernel stack saved here. (An exception is the one way back
 * that works on every backend: on PVM hosts `int $0x80` from user mode turns
 * into #UD, and `syscall` does not switch CS.)
 */
    .globl run_user
run_user:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, saved_kernel_rsp(%rip)
    pushq $SEL_UDATA                /* SS */
    leaq user_stack_top(%rip), %rax
    pushq %rax                      /* RSP */
    pushq $USER_RFLAGS              /* RFLAGS */
    pushq $SEL_UCODE                /* CS */
    leaq user_trampoline(%rip), %rax
    pushq %rax                      /* RIP */
    movq %rdi, %rax                 /* fn */
    movq %rsi, %rdi                 /* arg */
    iretq

user_trampoline:                    /* CPL3 */
    call *%rax
    movq %rax, %rdi
user_exit:
    ud2

/* IDT vector 6 (#UD): the ud2 at user_exit from CPL3 ends run_user(); any other #UD is an exception. */
    .globl ud_entry
ud_entry:
    cmpq $user_exit, (%rsp)         /* RIP (#UD pushes no error code) */
    jne stub_6
    testb $3, 8(%rsp)               /* CS.RPL */
    jz stub_6
    movq saved_kernel_rsp(%rip), %rsp
    pushq $2                        /* IF 0, IOPL 0, DF 0 */
    popfq
    movq %rdi, %rax                 /* fn's result */
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    ret

    .section .rodata
    .balign 8
    .globl trap_stub_table, trap_stub_count
trap_stub_table:                    /* pairs: vector, stub address */
    .irp v, NOERR_VECTORS, ERR_VECTORS
    .quad \v, stub_\v
    .endr
trap_stub_table_end:
trap_stub_count:
    .quad (trap_stub_table_end - trap_stub_table) / 16

    .section .bss
    .balign 16
saved_kernel_rsp:
    .skip 8
    .balign 16
user_stack:
    .skip 16384
user_stack_top:
    .globl trap_stack_top
    .balign 16
trap_stack:                         /* TSS RSP0: interrupts taken at CPL3 */
    .skip 8192
trap_stack_top:
