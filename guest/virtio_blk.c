/*
 * virtio-blk checks (virtio 1.2, 5.2): virtio-blk, virtio-blk-irq,
 * virtio-blk-bench (4 KiB random reads), virtio-blk-seqbench (sequential
 * reads). Requests are header (16 bytes, device-readable), data, status
 * (1 byte, device-writable). Everything but the interrupt wait of
 * virtio-blk-irq runs at CPL3.
 */
#include "virtio.h"

#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX  2
#define VIRTIO_BLK_F_RO       5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH    9

#define BLK_TIMEOUT         0x100 /* not a device status: no completion in time */

/* struct virtio_blk_config offsets */
#define BLK_CFG_CAPACITY 0
#define BLK_CFG_SIZE_MAX 8
#define BLK_CFG_SEG_MAX  12
#define BLK_CFG_BLK_SIZE 20

#define SECTOR 512
#define ID_BYTES 20
#define MAX_DEPTH VBLK_SLOTS
#define BENCH_DATA_MAX (512 * 1024)
#define SEQ_REQ_MAX (64 * 1024)
#define TICK_HZ 100

struct blk_req_hdr {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

/* Per in-flight request: header and status byte. */
struct blk_slot {
    struct blk_req_hdr hdr;
    volatile uint8_t status;
    uint8_t pad[15];
};

static struct {
    struct virtio_dev *d;
    struct virtq *q;
    uint64_t capacity; /* 512-byte sectors */
    uint32_t size_max; /* per data segment, 0 = no limit */
    uint32_t seg_max;  /* data segments per request, 0 = no limit */
    bool ro, flush;
    struct blk_slot *slots;
    uint8_t *buf;      /* 8 sectors for the functional check */
    char reason[96];
} blk;

static const char *fail(const char *fmt, uint64_t a, uint64_t b)
{
    ksnprintf(blk.reason, sizeof(blk.reason), fmt, a, b);
    return blk.reason;
}

static const char *blk_open(bool interrupts)
{
    const char *why;
    dma_reset();
    blk.d = virtio_find(VIRTIO_ID_BLK, &why);
    if (!blk.d)
        return why ? why : "no virtio-blk device";
    uint64_t want = VIRTIO_BIT(VIRTIO_BLK_F_RO) | VIRTIO_BIT(VIRTIO_BLK_F_FLUSH) | VIRTIO_BIT(VIRTIO_BLK_F_SIZE_MAX) |
                    VIRTIO_BIT(VIRTIO_BLK_F_SEG_MAX) | VIRTIO_BIT(VIRTIO_BLK_F_BLK_SIZE);
    if ((why = virtio_begin(blk.d, want)))
        return why;
    blk.capacity = virtio_cfg64(blk.d, BLK_CFG_CAPACITY);
    blk.size_max = virtio_has(blk.d, VIRTIO_BLK_F_SIZE_MAX) ? virtio_cfg32(blk.d, BLK_CFG_SIZE_MAX) : 0;
    blk.seg_max = virtio_has(blk.d, VIRTIO_BLK_F_SEG_MAX) ? virtio_cfg32(blk.d, BLK_CFG_SEG_MAX) : 0;
    blk.ro = virtio_has(blk.d, VIRTIO_BLK_F_RO);
    blk.flush = virtio_has(blk.d, VIRTIO_BLK_F_FLUSH);
    if ((why = virtio_setup_queue(blk.d, 0, interrupts, &blk.q))) {
        virtio_fail(blk.d);
        return why;
    }
    blk.slots = dma_alloc(MAX_DEPTH * sizeof(struct blk_slot), 64);
    blk.buf = dma_alloc(8 * SECTOR, 4096);
    if (!blk.slots || !blk.buf)
        return "out of memory";
    virtio_driver_ok(blk.d);
    return NULL;
}

/* Queues one request in slot `slot`; data split into segments of at most size_max. -1 if the queue is full. */
static int blk_submit(unsigned slot, uint32_t type, uint64_t sector, void *data, uint32_t len, bool device_writes)
{
    struct vbuf b[VQ_MAX_SIZE];
    struct blk_slot *s = &blk.slots[slot];
    unsigned n = 0;
    s->hdr.type = type;
    s->hdr.reserved = 0;
    s->hdr.sector = sector;
    s->status = 0xff;
    b[n++] = (struct vbuf){ (uint64_t)&s->hdr, sizeof(s->hdr), false };
    for (uint32_t off = 0; off < len && n < VQ_MAX_SIZE - 1;) {
        uint32_t seg = len - off;
        if (blk.size_max && seg > blk.size_max)
            seg = blk.size_max;
        b[n++] = (struct vbuf){ (uint64_t)data + off, seg, device_writes };
        off += seg;
    }
    b[n++] = (struct vbuf){ (uint64_t)&s->status, 1, true };
    return vq_add(blk.q, b, n, slot);
}

/* For other checks (snapwork): the device opened as above, requests in slots 0..VBLK_SLOTS-1. */
const char *vblk_open(bool interrupts, struct vblk *out)
{
    const char *why = blk_open(interrupts);
    if (why)
        return why;
    *out = (struct vblk){ blk.d, blk.q, blk.capacity, blk.ro, blk.flush };
    return NULL;
}

int vblk_submit(unsigned slot, uint32_t type, uint64_t sector, void *data, uint32_t len, bool device_writes)
{
    if (slot >= VBLK_SLOTS)
        return -1;
    return blk_submit(slot, type, sector, data, len, device_writes);
}

unsigned vblk_status(unsigned slot) { return slot < VBLK_SLOTS ? blk.slots[slot].status : BLK_TIMEOUT; }

/* One request, polled to completion: the device's status byte, or BLK_TIMEOUT. */
static unsigned blk_sync(uint32_t type, uint64_t sector, void *data, uint32_t len, bool device_writes)
{
    uint64_t cookie;
    if (blk_submit(0, type, sector, data, len, device_writes) < 0)
        return BLK_TIMEOUT;
    vq_kick(blk.q);
    if (!vq_wait(blk.q, &cookie, NULL))
        return BLK_TIMEOUT;
    return blk.slots[cookie].status;
}

static const char *status_reason(const char *what, unsigned status)
{
    if (status == BLK_TIMEOUT)
        return fail("timeout (%s)", (uint64_t)what, 0);
    return fail("%s status %lu", (uint64_t)what, status);
}

/* Byte i of the test pattern for `sector`: i ^ 0x5a, xored with byte (i % 8) of the sector number. */
static uint8_t pattern_byte(uint64_t sector, unsigned i) { return (uint8_t)(i ^ 0x5a ^ (sector >> (8 * (i & 7)))); }

static uint64_t user_blk(uint64_t unused)
{
    (void)unused;
    const char *why = blk_open(false);
    unsigned st;
    if (why)
        return (uint64_t)why;
    kprintf("BLK capacity=%lu ro=%u\n", blk.capacity, blk.ro ? 1 : 0);
    if (!blk.capacity)
        goto out_reason_empty;

    /* Sectors 0..7 (fewer on a smaller disk) in one request; CRC-32 (zlib's) of each. */
    uint64_t nread = blk.capacity < 8 ? blk.capacity : 8;
    if ((st = blk_sync(VIRTIO_BLK_T_IN, 0, blk.buf, nread * SECTOR, true)) != VIRTIO_BLK_S_OK) {
        why = status_reason("read", st);
        goto out;
    }
    for (uint64_t s = 0; s < nread; s++)
        kprintf("BLK sector%lu crc=0x%08x\n", s, crc32_ieee(blk.buf + s * SECTOR, SECTOR));

    /* Write the pattern to kvmlet.blk_write (default: the last sector), read it back. */
    uint64_t ws = virtio_option_u64("kvmlet.blk_write", blk.capacity - 1);
    if (ws >= blk.capacity) {
        why = fail("kvmlet.blk_write=%lu beyond capacity %lu", ws, blk.capacity);
        goto out;
    }
    uint8_t *before = blk.buf, *data = blk.buf + SECTOR, *back = blk.buf + 2 * SECTOR;
    if ((st = blk_sync(VIRTIO_BLK_T_IN, ws, before, SECTOR, true)) != VIRTIO_BLK_S_OK) {
        why = status_reason("read before write", st);
        goto out;
    }
    for (unsigned i = 0; i < SECTOR; i++)
        data[i] = pattern_byte(ws, i);
    st = blk_sync(VIRTIO_BLK_T_OUT, ws, data, SECTOR, false);
    if (blk.ro) {
        if (st != VIRTIO_BLK_S_IOERR) {
            why = st == VIRTIO_BLK_S_OK ? "read-only device accepted a write" : status_reason("read-only write", st);
            goto out;
        }
        if ((st = blk_sync(VIRTIO_BLK_T_IN, ws, back, SECTOR, true)) != VIRTIO_BLK_S_OK) {
            why = status_reason("read after refused write", st);
            goto out;
        }
        if (memcmp(before, back, SECTOR) != 0) {
            why = "read-only device changed the sector";
            goto out;
        }
        kprintf("BLK write refused (read-only)\n");
    } else {
        if (st != VIRTIO_BLK_S_OK) {
            why = status_reason("write", st);
            goto out;
        }
        if ((st = blk_sync(VIRTIO_BLK_T_IN, ws, back, SECTOR, true)) != VIRTIO_BLK_S_OK) {
            why = status_reason("read back", st);
            goto out;
        }
        if (memcmp(data, back, SECTOR) != 0) {
            why = fail("sector %lu read back differs from what was written", ws, 0);
            goto out;
        }
        kprintf("BLK write sector=%lu crc=0x%08x ok\n", ws, crc32_ieee(data, SECTOR));
    }

    if (blk.flush) {
        if ((st = blk_sync(VIRTIO_BLK_T_FLUSH, 0, NULL, 0, false)) != VIRTIO_BLK_S_OK) {
            why = status_reason("flush", st);
            goto out;
        }
        kprintf("BLK flush ok\n");
    } else {
        kprintf("BLK flush not offered\n");
    }

    char *id = (char *)back;
    memset(id, 0, ID_BYTES + 1);
    st = blk_sync(VIRTIO_BLK_T_GET_ID, 0, id, ID_BYTES, true);
    if (st == VIRTIO_BLK_S_OK) {
        id[ID_BYTES] = '\0'; /* NUL-padded, no terminator when 20 bytes long */
        for (char *c = id; *c; c++)
            if (*c < ' ' || *c > '~')
                *c = '?';
        kprintf("BLK id=%s\n", id);
    } else if (st == VIRTIO_BLK_S_UNSUPP) {
        kprintf("BLK id unsupported\n");
    } else {
        why = status_reason("get-id", st);
    }
out:
    if (why)
        virtio_fail(blk.d);
    virtio_reset(blk.d);
    return (uint64_t)why;
out_reason_empty:
    virtio_reset(blk.d);
    return (uint64_t)"capacity 0";
}

const char *check_virtio_blk(void) { return (const char *)run_user(user_blk, 0); }

/* ---- virtio-blk-irq: one read whose completion is seen through the interrupt ---- */

static volatile uint32_t irq_count, irq_used_count, irq_last_status;

static void blk_interrupt(void)
{
    uint32_t isr = mmio_read32(blk.d->base + VIRTIO_MMIO_INTERRUPT_STATUS);
    mmio_write32(blk.d->base + VIRTIO_MMIO_INTERRUPT_ACK, isr & (VIRTIO_INT_USED | VIRTIO_INT_CONFIG));
    irq_count++;
    irq_last_status = isr;
    if (isr & VIRTIO_INT_USED)
        irq_used_count++;
}

static uint64_t user_blk_irq_open(uint64_t unused)
{
    (void)unused;
    const char *why = blk_open(true);
    if (why)
        return (uint64_t)why;
    if (!blk.capacity) {
        virtio_reset(blk.d);
        return (uint64_t)"capacity 0";
    }
    return 0;
}

static uint64_t user_blk_irq_submit(uint64_t unused)
{
    (void)unused;
    if (blk_submit(0, VIRTIO_BLK_T_IN, 0, blk.buf, SECTOR, true) < 0)
        return 1;
    vq_kick(blk.q);
    return 0;
}

static uint64_t user_blk_irq_finish(uint64_t completed_by_irq)
{
    const char *why = NULL;
    uint64_t cookie;
    bool used = vq_pop(blk.q, &cookie, NULL);
    kprintf("BLK irq=%u interrupts=%u used_interrupts=%u\n", blk.d->irq, irq_count, irq_used_count);
    if (!used)
        why = irq_count ? "interrupt without a used buffer" : "timeout";
    else if (!completed_by_irq)
        why = "completed, but no used-buffer interrupt arrived";
    else if (blk.slots[cookie].status != VIRTIO_BLK_S_OK)
        why = status_reason("read", blk.slots[cookie].status);
    else
        kprintf("BLK irq sector0 crc=0x%08x\n", crc32_ieee(blk.buf, SECTOR));
    virtio_reset(blk.d);
    return (uint64_t)why;
}

static uint64_t user_blk_reset(uint64_t unused)
{
    (void)unused;
    virtio_reset(blk.d);
    return 0;
}

const char *check_virtio_blk_irq(void)
{
    const char *why = (const char *)run_user(user_blk_irq_open, 0);
    if (why)
        return why;
    int irq = (int)blk.d->irq;
    if (irq <= 0 || irq >= 16 || irq == 2) {
        run_user(user_blk_reset, 0);
        return fail("irq %lu not reachable through the 8259", irq, 0);
    }
    cli();
    pic_init();
    pit_start_100hz();
    irq_set_handler(irq, blk_interrupt);
    lapic_ensure_virtual_wire();
    irq_count = irq_used_count = 0;
    pic_unmask(0);
    pic_unmask(irq);
    if (run_user(user_blk_irq_submit, 0)) {
        pic_mask_all();
        run_user(user_blk_reset, 0);
        return "queue full";
    }
    uint64_t seconds = opt.timeout_set && opt.timeout_s ? opt.timeout_s : 10;
    uint64_t start = ticks;
    for (;;) {
        cli();
        if (irq_used_count || ticks - start >= seconds * TICK_HZ)
            break;
        sti_hlt();
    }
    pic_mask_all();
    irq_set_handler(irq, NULL);
    return (const char *)run_user(user_blk_irq_finish, irq_used_count != 0);
}

/* ---- benchmarks ---- */

struct bench {
    const char *name;
    bool random;
    uint32_t req_bytes;
    uint64_t ops;
    unsigned depth;
};

static uint64_t next_sector(struct bench *b, uint64_t *state, uint64_t *seq)
{
    uint64_t per = b->req_bytes / SECTOR;
    if (b->random)
        return (xorshift64(state) % (blk.capacity / per)) * per;
    if (*seq + per > blk.capacity)
        *seq = 0;
    uint64_t s = *seq;
    *seq += per;
    return s;
}

static uint64_t user_blk_bench(uint64_t arg)
{
    struct bench *b = (void *)arg;
    uint64_t rng = 0x9e3779b97f4a7c15ULL, seq = 0, cookie, done = 0, submitted = 0;
    const char *why = blk_open(false);
    if (why)
        return (uint64_t)why;
    if (!b->random) {
        uint32_t seg = blk.size_max && blk.size_max < SEQ_REQ_MAX ? blk.size_max : SEQ_REQ_MAX;
        uint32_t segs = blk.q->size - 2;
        if (blk.seg_max && blk.seg_max < segs)
            segs = blk.seg_max;
        uint64_t max = (uint64_t)seg * segs;
        b->req_bytes = (max < SEQ_REQ_MAX ? max : SEQ_REQ_MAX) & ~(SECTOR - 1ULL);
        if (blk.capacity * SECTOR < b->req_bytes)
            b->req_bytes = blk.capacity * SECTOR;
        if (b->req_bytes)
            b->ops = (b->ops + b->req_bytes - 1) / b->req_bytes; /* ops held the byte count */
    }
    if (!b->req_bytes || blk.capacity < b->req_bytes / SECTOR) {
        virtio_reset(blk.d);
        return (uint64_t)"disk smaller than one request";
    }
    unsigned max_depth = blk.q->size / (2 + (blk.size_max ? b->req_bytes / blk.size_max + 1 : 1));
    if (b->depth > max_depth)
        b->depth = max_depth ? max_depth : 1;
    while ((uint64_t)b->depth * b->req_bytes > BENCH_DATA_MAX && b->depth > 1)
        b->depth--;
    uint8_t *data = dma_alloc((size_t)b->depth * b->req_bytes, 4096);
    if (!data) {
        virtio_reset(blk.d);
        return (uint64_t)"out of memory";
    }
    kprintf("BLK bench %s req=%u depth=%u ops=%lu capacity=%lu\n", b->name, b->req_bytes, b->depth, b->ops,
            blk.capacity);
    kprintf("BENCH %s start\n", b->name);
    for (unsigned s = 0; s < b->depth && submitted < b->ops; s++, submitted++)
        blk_submit(s, VIRTIO_BLK_T_IN, next_sector(b, &rng, &seq), data + (size_t)s * b->req_bytes, b->req_bytes,
                   true);
    vq_kick(blk.q);
    while (done < b->ops) {
        if (!vq_wait(blk.q, &cookie, NULL)) {
            why = fail("timeout after %lu of %lu requests", done, b->ops);
            break;
        }
        done++;
        unsigned st = blk.slots[cookie].status;
        if (st != VIRTIO_BLK_S_OK) {
            why = fail("read status %lu after %lu requests", st, done);
            break;
        }
        if (submitted < b->ops) {
            blk_submit(cookie, VIRTIO_BLK_T_IN, next_sector(b, &rng, &seq), data + cookie * b->req_bytes,
                       b->req_bytes, true);
            submitted++;
            vq_kick(blk.q);
        }
    }
    if (!why)
        kprintf("BENCH %s done ops=%lu bytes=%lu\n", b->name, done, done * b->req_bytes);
    kprintf("BLK bench %s notifies=%lu\n", b->name, blk.q->notifies);
    if (why)
        virtio_fail(blk.d);
    virtio_reset(blk.d);
    return (uint64_t)why;
}

static unsigned bench_depth(void)
{
    uint64_t d = virtio_option_u64("kvmlet.bench_depth", 1);
    return d < 1 ? 1 : d > MAX_DEPTH ? MAX_DEPTH : (unsigned)d;
}

const char *check_virtio_blk_bench(void)
{
    static struct bench b;
    b = (struct bench){ "blk-randread", true, 4096, virtio_option_u64("kvmlet.loops", 10000), bench_depth() };
    return (const char *)run_user(user_blk_bench, (uint64_t)&b);
}

const char *check_virtio_blk_seqbench(void)
{
    static struct bench b;
    b = (struct bench){ "blk-seqread", false, 0, virtio_option_u64("kvmlet.bench_mib", 64) << 20, bench_depth() };
    return (const char *)run_user(user_blk_bench, (uint64_t)&b);
}
