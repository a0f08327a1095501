/*
 * A hostile driver against a rate-limited virtio-blk device (issue 13, defect 4, and the used length of
 * a failed request). Written from the virtio 1.2 specification: a request is header (16 bytes,
 * device-readable), data, status (1 byte, device-writable) (5.2.6); the used length is the number of
 * bytes the device wrote into the device-writable buffers (2.7.8). Everything runs at CPL3.
 *
 * The VMM is expected to limit the drive's bandwidth to about 1 MiB/s (the pytest gives it bps=1M) and
 * to give a drive of at least 128 MiB and a guest of at least 64 MiB (buffers at 16-48 MiB).
 *
 * attack-blk-charge   a request the device must refuse (sector beyond the capacity, segments over
 *                     size_max) whose descriptors add up to almost 4 GiB; then one valid 512-byte read
 *                     must complete within the wait (kvmlet.timeout): a refused request costs nothing.
 * attack-blk-reset    a valid 126 MiB read (segments overlapping one 1 MiB buffer) leaves the drive about
 *                     125 s in debt; a small read waits; the driver resets the device, sets it up again,
 *                     and a small read must complete within the wait: the debt resets with the device.
 * attack-blk-storm    the same debt, a small read waiting, then kvmlet.storm QueueNotify writes (default
 *                     100000) while the queue is throttled; the host counts its timers meanwhile. PASS
 *                     when the device still answers after a reset.
 * attack-blk-usedlen  a read beyond the capacity and a read with device-readable data fail with IOERR
 *                     and a used length of 1 (the status byte alone); a good read reports 513.
 */
#include "virtio.h"

#define T_IN 0
#define S_OK 0
#define S_IOERR 1
#define SECTOR 512
#define MIB (1024ULL * 1024)
#define BIG_BUF (16 * MIB)      /* guest RAM the requests point at, well above the image and its pool */
#define HUGE_SEG (32 * MIB)     /* refused: over size_max */
#define DEBT_SEGS 126           /* header + 126 + status = 128 descriptors, the guest's queue size */
#define NO_STATUS 0x100

struct hdr {
    uint32_t type, reserved;
    uint64_t sector;
};

static struct {
    struct virtio_dev *d;
    struct virtq *q;
    uint64_t capacity;
    uint32_t size_max;
    struct hdr *hdr;         /* one per slot */
    volatile uint8_t *status;
    uint8_t *small;          /* a 4 KiB buffer in the pool */
    char reason[112];
} ab;

static const char *why(const char *fmt, uint64_t a, uint64_t b)
{
    ksnprintf(ab.reason, sizeof(ab.reason), fmt, a, b);
    return ab.reason;
}

static const char *open_blk(void)
{
    const char *w;
    dma_reset();
    ab.d = virtio_find(VIRTIO_ID_BLK, &w);
    if (!ab.d)
        return w ? w : "no virtio-blk device";
    if ((w = virtio_begin(ab.d, VIRTIO_BIT(1) /* SIZE_MAX */)))
        return w;
    ab.capacity = virtio_cfg64(ab.d, 0);
    ab.size_max = virtio_has(ab.d, 1) ? virtio_cfg32(ab.d, 8) : 0;
    if ((w = virtio_setup_queue(ab.d, 0, false, &ab.q)))
        return w;
    ab.hdr = dma_alloc(4 * sizeof(struct hdr), 64);
    ab.status = dma_alloc(64, 64);
    ab.small = dma_alloc(4096, 4096);
    if (!ab.hdr || !ab.status || !ab.small)
        return "out of memory";
    virtio_driver_ok(ab.d);
    return NULL;
}

/* A read of `nseg` segments of `seg` bytes each, all at `buf` (they may overlap), into slot `slot`. */
static int submit_read(unsigned slot, uint64_t sector, uint64_t buf, uint32_t seg, unsigned nseg,
                       bool data_writable)
{
    struct vbuf b[VQ_MAX_SIZE];
    unsigned n = 0;
    ab.hdr[slot] = (struct hdr){ T_IN, 0, sector };
    ab.status[slot] = 0xff;
    b[n++] = (struct vbuf){ (uint64_t)&ab.hdr[slot], sizeof(struct hdr), false };
    for (unsigned i = 0; i < nseg && n < VQ_MAX_SIZE - 1; i++)
        b[n++] = (struct vbuf){ buf, seg, data_writable };
    b[n++] = (struct vbuf){ (uint64_t)&ab.status[slot], 1, true };
    int head = vq_add(ab.q, b, n, slot);
    if (head >= 0)
        vq_kick(ab.q);
    return head;
}

/* Waits for one completion: its status (NO_STATUS on timeout) and used length. */
static unsigned wait_one(uint32_t *len, uint64_t *slot)
{
    uint64_t cookie = 0;
    *len = 0;
    if (!vq_wait(ab.q, &cookie, len))
        return NO_STATUS;
    if (slot)
        *slot = cookie;
    return ab.status[cookie];
}

static unsigned read_small(uint64_t sector, uint32_t *len)
{
    if (submit_read(0, sector, (uint64_t)ab.small, SECTOR, 1, true) < 0)
        return NO_STATUS;
    return wait_one(len, NULL);
}

static void spin(uint64_t tsc_cycles)
{
    uint64_t start = rdtsc_now();
    while (rdtsc_now() - start < tsc_cycles)
        cpu_pause();
}

/* The drive about 125 s in debt at 1 MiB/s: a valid 126 MiB read (126 x 1 MiB at one buffer). */
static const char *make_debt(void)
{
    uint32_t len;
    if (ab.capacity < DEBT_SEGS * MIB / SECTOR)
        return why("drive of %lu sectors: needs %lu", ab.capacity, DEBT_SEGS * MIB / SECTOR);
    if (ab.size_max && ab.size_max < MIB)
        return why("size_max %lu below 1 MiB", ab.size_max, 0);
    if (submit_read(1, 0, BIG_BUF, MIB, DEBT_SEGS, true) < 0)
        return "queue full";
    unsigned st = wait_one(&len, NULL);
    if (st != S_OK)
        return st == NO_STATUS ? "timeout (the 126 MiB read)" : why("126 MiB read: status %lu", st, 0);
    kprintf("ATTACK blk debt read bytes=%lu used=%u\n", (uint64_t)(DEBT_SEGS * MIB), len);
    /* A small read now waits for the debt: see that it does not complete at once (the host is slow
     * or fast, the debt is over 100 s either way), and leave it pending. */
    if (submit_read(0, 0, (uint64_t)ab.small, SECTOR, 1, true) < 0)
        return "queue full";
    spin(200000000ULL); /* 0.05-0.2 s */
    kprintf("ATTACK blk throttled pending=%u\n", vq_has_used(ab.q) ? 0 : 1);
    return NULL;
}

/* Reset, set up again, one small read within the wait. */
static const char *reset_and_read(const char *after)
{
    uint32_t len;
    const char *w;
    virtio_reset(ab.d);
    if ((w = open_blk()))
        return w;
    uint64_t t0 = rdtsc_now();
    unsigned st = read_small(0, &len);
    if (st == NO_STATUS)
        return why("timeout (read after %s)", (uint64_t)after, 0);
    if (st != S_OK)
        return why("read after %s: status %lu", (uint64_t)after, st);
    kprintf("ATTACK blk read after %s ok tsc=%lu\n", after, rdtsc_now() - t0);
    return NULL;
}

static uint64_t user_charge(uint64_t unused)
{
    (void)unused;
    uint32_t len;
    const char *w = open_blk();
    if (w)
        return (uint64_t)w;
    /* Beyond the capacity, and each segment over size_max: refused, whatever it claims to read. */
    if (submit_read(1, ab.capacity, BIG_BUF, HUGE_SEG, DEBT_SEGS, true) < 0) {
        w = "queue full";
        goto out;
    }
    unsigned st = wait_one(&len, NULL);
    kprintf("ATTACK blk refused request claims=%lu status=%u used=%u\n", (uint64_t)(DEBT_SEGS * HUGE_SEG), st, len);
    if (st != S_IOERR) {
        w = st == NO_STATUS ? "timeout (refused request)" : why("refused request: status %lu", st, 0);
        goto out;
    }
    uint64_t t0 = rdtsc_now();
    st = read_small(0, &len);
    if (st == NO_STATUS)
        w = "timeout (a valid read after a refused 4 GiB request: it was charged)";
    else if (st != S_OK)
        w = why("read after refused request: status %lu", st, 0);
    else
        kprintf("ATTACK blk read after refused request ok tsc=%lu\n", rdtsc_now() - t0);
out:
    virtio_reset(ab.d);
    return (uint64_t)w;
}

static uint64_t user_reset(uint64_t unused)
{
    (void)unused;
    const char *w = open_blk();
    if (!w)
        w = make_debt();
    if (!w)
        w = reset_and_read("reset");
    virtio_reset(ab.d);
    return (uint64_t)w;
}

static uint64_t user_storm(uint64_t unused)
{
    (void)unused;
    const char *w = open_blk();
    if (!w)
        w = make_debt();
    if (!w) {
        uint64_t n = virtio_option_u64("kvmlet.storm", 100000);
        uint64_t notify = ab.d->base + VIRTIO_MMIO_QUEUE_NOTIFY, t0 = rdtsc_now();
        kprintf("ATTACK blk storm start notifies=%lu\n", n);
        for (uint64_t i = 0; i < n; i++)
            mmio_write32(notify, 0);
        kprintf("ATTACK blk storm done tsc=%lu pending=%u\n", rdtsc_now() - t0, vq_has_used(ab.q) ? 0 : 1);
        spin(400000000ULL); /* 0.1-0.4 s for the host to look at the aftermath */
        w = reset_and_read("storm");
    }
    virtio_reset(ab.d);
    return (uint64_t)w;
}

static uint64_t user_usedlen(uint64_t unused)
{
    (void)unused;
    uint32_t len;
    unsigned st;
    const char *w = open_blk();
    if (w)
        return (uint64_t)w;
    if ((st = read_small(0, &len)) != S_OK || len != SECTOR + 1) {
        w = why("good read: status %lu used %lu (want 0, 513)", st, len);
        goto out;
    }
    st = read_small(ab.capacity, &len);
    kprintf("ATTACK blk read beyond capacity status=%u used=%u\n", st, len);
    if (st != S_IOERR || len != 1) {
        w = why("read beyond the capacity: status %lu used %lu (want 1, 1)", st, len);
        goto out;
    }
    if (submit_read(0, 0, (uint64_t)ab.small, SECTOR, 1, false) < 0) {
        w = "queue full";
        goto out;
    }
    st = wait_one(&len, NULL);
    kprintf("ATTACK blk read with readable data status=%u used=%u\n", st, len);
    if (st != S_IOERR || len != 1)
        w = why("read with device-readable data: status %lu used %lu (want 1, 1)", st, len);
out:
    virtio_reset(ab.d);
    return (uint64_t)w;
}

const char *check_attack_blk_charge(void) { return (const char *)run_user(user_charge, 0); }
const char *check_attack_blk_reset(void) { return (const char *)run_user(user_reset, 0); }
const char *check_attack_blk_storm(void) { return (const char *)run_user(user_storm, 0); }
const char *check_attack_blk_usedlen(void) { return (const char *)run_user(user_usedlen, 0); }
