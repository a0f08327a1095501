/*
 * Functions that run at CPL3 through run_user(): loops and polling belong
 * here, because on PVM hosts kernel-mode guest code is emulated (~1M
 * instructions/s) while user-mode code runs natively. IOPL is 3, so port I/O
 * is allowed; every page is mapped with U/S set.
 */
#include "guest.h"

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (uint64_t)hi << 32 | lo;
}

/* Returns the CPL read from CS.RPL after the loop. */
uint64_t user_cpl3_loop(uint64_t loops)
{
    uint16_t cs;
    if (loops)
        __asm__ volatile("1: dec %0; jnz 1b" : "+r"(loops));
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    return cs & 3;
}

uint64_t user_pio_loop(uint64_t loops)
{
    if (loops)
        __asm__ volatile("1: outb %%al, $0x80; dec %0; jnz 1b" : "+r"(loops) : "a"(0) : "memory");
    return 0;
}

uint64_t user_mmio_loop(uint64_t loops)
{
    if (loops)
        __asm__ volatile("1: movl %%eax, (%1); dec %0; jnz 1b"
                         : "+r"(loops)
                         : "r"(MMIO_HOLE), "a"(0)
                         : "memory");
    return 0;
}

/* One byte written per 4 KiB page over [start, end). */
uint64_t user_touch(uint64_t arg)
{
    const struct touch_range *r = (const void *)arg;
    uint64_t pages = 0;
    for (uint64_t a = r->start; a < r->end; a += 4096, pages++)
        *(volatile uint8_t *)phys(a) = 1;
    return pages;
}

uint64_t user_delay(uint64_t tsc_cycles)
{
    uint64_t start = rdtsc();
    while (rdtsc() - start < tsc_cycles)
        cpu_pause();
    return 0;
}

/* Spin until *counter >= target or max_tsc_cycles have passed; returns the counter. */
uint64_t user_wait_counter(uint64_t arg)
{
    const struct counter_wait *w = (const void *)arg;
    uint64_t start = rdtsc();
    while (*w->counter < w->target && rdtsc() - start < w->max_tsc_cycles)
        cpu_pause();
    return *w->counter;
}

uint64_t user_cpuid(uint64_t arg)
{
    struct cpuid_regs *r = (void *)arg;
    __asm__ volatile("cpuid" : "+a"(r->eax), "=b"(r->ebx), "+c"(r->ecx), "=d"(r->edx));
    return 0;
}
