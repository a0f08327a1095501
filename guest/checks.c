/* Checks that need no interrupts: boot information, CPL3 loops, CPUID, emulation failure. */
#include "guest.h"

#define MIB (1024ULL * 1024)
#define TOUCH_START (16 * MIB)
#define IDENTITY_MAP_END (4096 * MIB)

static char reason[96];

const char *check_serial(void)
{
    kprintf("HELLO from kvmlet-guest\n");
    return NULL;
}

/* True if RAM (type 1) entries cover [start, end) without gaps. */
bool ram_covers(uint64_t start, uint64_t end)
{
    uint64_t cur = start;
    while (cur < end) {
        bool advanced = false;
        for (unsigned i = 0; i < boot.e820_count; i++) {
            const struct e820_entry *e = &boot.e820[i];
            if (e->type == E820_RAM && e->addr <= cur && cur - e->addr < e->size) {
                cur = e->addr + e->size;
                advanced = true;
            }
        }
        if (!advanced)
            return false;
    }
    return true;
}

const char *check_e820(void)
{
    for (unsigned i = 0; i < boot.e820_count; i++) {
        const struct e820_entry *e = &boot.e820[i];
        kprintf("E820 0x%016lx 0x%016lx %u\n", e->addr, e->addr + e->size - 1, e->type);
    }
    if (!boot.e820_count)
        return "no e820 entries";
    if (!ram_covers((uint64_t)_image_start, (uint64_t)_image_end))
        return "guest image not in RAM";
    return NULL;
}

const char *check_cmdline(void)
{
    kprintf("CMDLINE %s\n", boot.cmdline);
    return NULL;
}

const char *check_bootinfo(void)
{
    kprintf("BOOT %s\n", boot.kind == BOOT_PVH ? "pvh" : "64bit");
    return NULL;
}

const char *check_cpl3(void)
{
    uint64_t cpl = run_user(user_cpl3_loop, opt.loops);
    kprintf("CPL3 loops=%lu cpl=%lu\n", opt.loops, cpl);
    if (cpl != 3) {
        ksnprintf(reason, sizeof(reason), "cpl=%lu", cpl);
        return reason;
    }
    return NULL;
}

const char *check_pio_loop(void)
{

    run_user(user_pio_loop, opt.loops);
    return NULL;
}

const char *check_mmio_loop(void)
{
    run_user(user_mmio_loop, opt.loops);
    return NULL;
}

const char *check_touch(void)
{
    struct touch_range r = { TOUCH_START, TOUCH_START + opt.touch_mib * MIB };
    if (opt.touch_mib > IDENTITY_MAP_END / MIB || r.end > IDENTITY_MAP_END)
        return "range beyond the 4 GiB identity map";
    if (!ram_covers(r.start, r.end)) {
        ksnprintf(reason, sizeof(reason), "%lu MiB from 16 MiB exceeds RAM in e820", opt.touch_mib);
        return reason;
    }
    run_user(user_touch, (uint64_t)&r);
    kprintf("TOUCH %lu MiB\n", opt.touch_mib);
    return NULL;
}

static void cpuid(struct cpuid_regs *r, uint32_t leaf)
{
    r->eax = leaf;
    r->ecx = 0;
    __asm__ volatile("cpuid" : "+a"(r->eax), "=b"(r->ebx), "+c"(r->ecx), "=d"(r->edx));
}

/* Copies 12 signature bytes (three registers), stopping at NUL, replacing non-printables. */
static void signature(char out[13], uint32_t a, uint32_t b, uint32_t c)
{
    uint32_t regs[3] = { a, b, c };
    const char *s = (const char *)regs;
    int i;
    for (i = 0; i < 12 && s[i]; i++)
        out[i] = (s[i] > ' ' && s[i] < 127) ? s[i] : '.';
    out[i] = '\0';
}

/* Kernel-mode CPUID on the CPUID line; the user-mode view (differs under PVM) on the USERCPUID line. */
const char *check_cpuid(void)
{
    struct cpuid_regs r0, r1, rh, u0, u1;
    char vendor[13], hv[13] = "none", uvendor[13];

    cpuid(&r0, 0);
    cpuid(&r1, 1);
    signature(vendor, r0.ebx, r0.edx, r0.ecx);
    if (r1.ecx & (1u << 31)) { /* hypervisor present */
        cpuid(&rh, 0x40000000);
        signature(hv, rh.ebx, rh.ecx, rh.edx);
    }
    kprintf("CPUID vendor=%s leaf1.ecx=0x%08x leaf1.edx=0x%08x hv=%s\n", vendor, r1.ecx, r1.edx, hv);

    u0 = (struct cpuid_regs){ .eax = 0 };
    u1 = (struct cpuid_regs){ .eax = 1 };
    run_user(user_cpuid, (uint64_t)&u0);
    run_user(user_cpuid, (uint64_t)&u1);
    signature(uvendor, u0.ebx, u0.edx, u0.ecx);
    kprintf("USERCPUID vendor=%s leaf1.ecx=0x%08x leaf1.edx=0x%08x\n", uvendor, u1.ecx, u1.edx);
    return NULL;
}

/* Instruction fetch from unbacked guest-physical memory at CPL0: no hypervisor can run that. */
const char *check_emufail(void)
{
    emufail_active = true;
    __asm__ volatile("call *%0" : : "r"(MMIO_HOLE) : "memory", "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9",
                     "r10", "r11");
    emufail_active = false;
    return "continued";
}

/* Pulse the CPU reset line through the i8042 keyboard controller (command 0xFE), as a PC reboots. */
const char *check_reset(void)
{
    outb(0x64, 0xfe);
    for (volatile unsigned i = 0; i < 100000; i++)
        ;
    return "still running after the i8042 reset";
}

/*
 * An instruction in RAM that a hypervisor may have to emulate and cannot: cmpxchg16b at CPL0. On VT-x and
 * AMD-V it runs natively (the check passes); under PVM, kernel-mode code is emulated and KVM's emulator
 * stops there, so the VMM must report it with the instruction bytes it reads from guest memory.
 */
const char *check_emufail_insn(void)
{
    static volatile uint64_t target[2] __attribute__((aligned(16)));
    emufail_active = true;
    __asm__ volatile("xor %%eax, %%eax\n\txor %%edx, %%edx\n\txor %%ebx, %%ebx\n\txor %%ecx, %%ecx\n\t"
                     "lock cmpxchg16b %0"
                     : "+m"(target[0])
                     :
                     : "rax", "rbx", "rcx", "rdx", "memory", "cc");
    emufail_active = false;
    return NULL;
}
