/*
 * dirtyrate: dirties guest memory at a steady pace, for the live-migration benchmarks (bench/migration.py).
 * Everything runs at CPL3 (native under PVM):
 *  - the TSC is calibrated against the 8254 PIT (channel 0 read back with latch commands, 50 ms);
 *  - every page of kvmlet.dirty_mib MiB from 16 MiB is written once, then `dirtyrate ready mib=<n>
 *    rate=<n> tsc_khz=<n>`;
 *  - kvmlet.dirty_rate pages a second are dirtied (one 64-bit increment per page, the pages in order,
 *    wrapping around the area; a busy loop on the TSC keeps the pace), with `dirtyrate second <s> pages
 *    <total>` once a second, for kvmlet.dirty_s seconds (0, the default: until the VM is stopped).
 * A rate of 0 only fills the area and waits (an idle guest with that much memory in use).
 */
#include "virtio.h"

#define MIB (1024ULL * 1024)
#define AREA_BASE (16 * MIB)
#define IDENTITY_MAP_END (4096 * MIB)
#define WORDS_PER_PAGE 512
#define PIT_HZ 1193182
#define PIT_CAL_COUNT (PIT_HZ / 20) /* 50 ms */

static struct {
    volatile uint64_t *area;
    uint64_t pages, rate, seconds, khz;
    char reason[96];
} dr;

/* TSC ticks per millisecond from the PIT's channel 0 counting 50 ms, read back with latch commands (channel 2
 * through port 0x61 is not there on QEMU's microvm); 0 if the PIT does not count. */
static uint64_t pit_count(void)
{
    outb(0x43, 0x00); /* latch channel 0 */
    uint8_t lo = inb(0x40);
    return (uint64_t)inb(0x40) << 8 | lo;
}

static uint64_t user_tsc_khz(uint64_t unused)
{
    (void)unused;
    outb(0x43, 0x34); /* channel 0, lobyte/hibyte, mode 2 (rate generator), binary */
    outb(0x40, 0xff);
    outb(0x40, 0xff);
    uint64_t previous = pit_count(), ticks = 0, start = rdtsc_now(), limit = 20ULL * 4000000000ULL;
    while (ticks < PIT_CAL_COUNT) {
        uint64_t now = pit_count();
        ticks += (previous - now) & 0xffff; /* counts down, reloads at 1 */
        previous = now;
        if (rdtsc_now() - start > limit)
            return 0;
    }
    return (rdtsc_now() - start) * PIT_HZ / ticks / 1000;
}

static uint64_t user_fill(uint64_t unused)
{
    (void)unused;
    for (uint64_t p = 0; p < dr.pages; p++)
        dr.area[p * WORDS_PER_PAGE] = p;
    kprintf("dirtyrate ready mib=%lu rate=%lu tsc_khz=%lu\n", dr.pages / 256, dr.rate, dr.khz);
    return 0;
}

static uint64_t user_dirty(uint64_t unused)
{
    (void)unused;
    uint64_t per_second = dr.khz * 1000, start = rdtsc_now(), done = 0, second = 1;
    for (;;) {
        uint64_t elapsed = rdtsc_now() - start;
        if (dr.seconds && elapsed >= dr.seconds * per_second)
            return done;
        uint64_t due = dr.rate * (elapsed / 1000) / dr.khz; /* pages owed by now */
        while (done < due) {
            dr.area[(done % dr.pages) * WORDS_PER_PAGE + (done / dr.pages) % WORDS_PER_PAGE] += 1;
            done++;
        }
        if (elapsed >= second * per_second) {
            kprintf("dirtyrate second %lu pages %lu\n", second, done);
            second++;
        }
    }
}

static uint64_t user_wait(uint64_t unused)
{
    (void)unused;
    uint64_t per_second = dr.khz * 1000, start = rdtsc_now();
    while (!dr.seconds || rdtsc_now() - start < dr.seconds * per_second)
        __asm__ volatile("pause");
    return 0;
}

const char *check_dirtyrate(void)
{
    uint64_t mib = virtio_option_u64("kvmlet.dirty_mib", 64);
    dr.rate = virtio_option_u64("kvmlet.dirty_rate", 5000);
    dr.seconds = virtio_option_u64("kvmlet.dirty_s", 0);
    if (!mib || mib > (IDENTITY_MAP_END - AREA_BASE) / MIB)
        return "kvmlet.dirty_mib must be 1 to 4080";
    if ((uint64_t)_image_end > AREA_BASE)
        return "the guest image reaches into the area at 16 MiB";
    if (!ram_covers(AREA_BASE, AREA_BASE + mib * MIB)) {
        ksnprintf(dr.reason, sizeof(dr.reason), "%lu MiB from 16 MiB exceeds RAM in e820", mib);
        return dr.reason;
    }
    dr.area = phys(AREA_BASE);
    dr.pages = mib * MIB / 4096;
    dr.khz = run_user(user_tsc_khz, 0);
    if (!dr.khz)
        return "the PIT does not count (no TSC calibration)";
    run_user(user_fill, 0);
    if (dr.rate) {
        uint64_t done = run_user(user_dirty, 0);
        kprintf("dirtyrate done pages=%lu\n", done);
    } else {
        run_user(user_wait, 0);
    }
    return NULL;
}
