/*
 * Hostile-guest checks of the device side of split virtqueues (virtio 1.2,
 * 2.7): a chain bounded by the queue size, and one flooded queue not starving
 * the VM's other devices. Written from the specification, not from any VMM.
 *
 * attack-indirect-long   virtio-blk with VIRTIO_F_INDIRECT_DESC. 2.7.5.3.1:
 *   "A driver MUST NOT create a descriptor chain longer than the Queue Size of
 *   the device" (indirect table included). A read of exactly queue-size
 *   descriptors must complete; queue size + 1 (in one indirect table, or a
 *   direct header plus a table of queue size) must come back unserved: used
 *   length 0 and the status byte untouched, as for any chain the device treats
 *   as an error. Then a full ring of chains each pointing at one indirect table
 *   of 32768 entries (all refused), with an rng request posted right after the
 *   notification: how long rng waits, how long the ring takes to come back.
 *   QUEUE indirect boundary ok size=<n>
 *   QUEUE indirect-flood chains=<n> entries=<n> refused=<n> ring_us=<n> rng_us=<n> tsc_khz=<n>
 *
 * attack-queue-flood     virtio-blk flooded for kvmlet.flood_ms (default 3000)
 *   with reads of kvmlet.flood_entries - 2 sectors (default: the queue size,
 *   the longest chain allowed) in one indirect table, so the whole ring is in
 *   flight, every completion re-posted at once: the ring never
 *   empties. 50 ms in, one rng request; PASS if rng answers within
 *   kvmlet.flood_bound_ms (default 1000). With kvmlet.flood_exit_ms=N, one
 *   port 0x80 exit every N ms of the flood is timed (200 before it, for
 *   comparison); off by default, since while the vCPU waits in a slow exit
 *   nothing re-posts and the ring may empty, which ends the flood for a while.
 *   QUEUE flood blk_requests=<n> entries=<n> ms=<n> rng_us=<n> tsc_khz=<n>
 *   QUEUE flood pio_exit idle_avg_us=<n> flood_avg_us=<n> flood_max_us=<n> flood_exits=<n>
 *
 * Times come from the TSC, calibrated against the 8254 PIT (channel 2, gate
 * and output through port 0x61), so they are in microseconds on any host.
 * Everything runs at CPL3.
 */
#include "virtio.h"

#define SECTOR 512
#define BIG_ENTRIES 32768            /* what a 16-bit-sized queue could hold: the most a table can claim */
#define PIT_HZ 1193182
#define PIT_CAL_COUNT (PIT_HZ / 20)  /* 50 ms */
#define POISON 0xa5                  /* a status byte the device never writes */

struct blk_hdr {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

struct slot {
    struct blk_hdr hdr;
    volatile uint8_t status;
    uint8_t pad[15];
};

static struct virtq_desc big_table[BIG_ENTRIES] __attribute__((aligned(16)));
static struct virtq_desc small_table[VQ_MAX_SIZE + 2] __attribute__((aligned(16)));
static struct slot slots[VQ_MAX_SIZE] __attribute__((aligned(64)));
static uint8_t sector_buf[SECTOR] __attribute__((aligned(512)));
static char reason[112];

static const char *fail(const char *fmt, uint64_t a, uint64_t b)
{
    ksnprintf(reason, sizeof(reason), fmt, a, b);
    return reason;
}

/* TSC ticks per millisecond from the PIT's channel 2 counting 50 ms (0 if the PIT does not answer). */
static uint64_t tsc_khz(void)
{
    uint8_t v = inb(0x61);
    outb(0x61, (uint8_t)((v & ~0x02) | 0x01)); /* gate 2 high, speaker off */
    outb(0x43, 0xb0);                          /* channel 2, lobyte/hibyte, mode 0 */
    outb(0x42, PIT_CAL_COUNT & 0xff);
    outb(0x42, PIT_CAL_COUNT >> 8);
    uint64_t start = rdtsc_now(), limit = 20ULL * 4000000000ULL; /* 20 s at 4 GHz */
    while (!(inb(0x61) & 0x20)) {
        if (rdtsc_now() - start > limit)
            return 0;
    }
    return (rdtsc_now() - start) / 50;
}

static uint64_t us(uint64_t cycles, uint64_t khz) { return khz ? cycles * 1000 / khz : 0; }

static struct virtio_dev *open_dev(uint32_t id, uint64_t features, struct virtq **q, const char **why)
{
    struct virtio_dev *d = virtio_find(id, why);
    if (!d) {
        if (!*why)
            *why = id == VIRTIO_ID_BLK ? "no virtio-blk device" : "no virtio-rng device";
        return NULL;
    }
    if ((*why = virtio_begin(d, features)))
        return NULL;
    if ((*why = virtio_setup_queue(d, 0, false, q))) {
        virtio_fail(d);
        return NULL;
    }
    virtio_driver_ok(d);
    return d;
}

static void set_desc(struct virtq_desc *t, unsigned i, uint64_t addr, uint32_t len, uint16_t flags)
{
    t[i].addr = addr;
    t[i].len = len;
    t[i].flags = flags;
    t[i].next = (uint16_t)(i + 1);
}

/* A read of sector 0 in an indirect table of `entries`: [header,] sectors, status (the header direct if not). */
static void fill_table(struct virtq_desc *t, unsigned entries, struct slot *s, bool with_header)
{
    unsigned i = 0;
    s->hdr = (struct blk_hdr){ VIRTIO_BLK_T_IN, 0, 0 };
    s->status = POISON;
    if (with_header)
        set_desc(t, i++, (uint64_t)&s->hdr, sizeof(s->hdr), VIRTQ_DESC_F_NEXT);
    for (; i + 1 < entries; i++)
        set_desc(t, i, (uint64_t)sector_buf, SECTOR, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE);
    set_desc(t, entries - 1, (uint64_t)&s->status, 1, VIRTQ_DESC_F_WRITE);
}

/* Posts a chain whose last descriptor points at table (entries long); with `header`, a direct header first. */
static int post_indirect(struct virtq *q, struct virtq_desc *table, unsigned entries, struct slot *s, bool header,
                         uint64_t cookie)
{
    struct vbuf b[2] = { { (uint64_t)&s->hdr, sizeof(s->hdr), false }, { 0, 0, false } };
    int head = vq_add(q, b, header ? 2 : 1, cookie);
    if (head < 0)
        return head;
    uint16_t last = header ? q->desc[head].next : (uint16_t)head;
    q->desc[last].addr = (uint64_t)table;
    q->desc[last].len = entries * 16;
    q->desc[last].flags = 4; /* VIRTQ_DESC_F_INDIRECT, no NEXT */
    return head;
}

/* One indirect request polled to completion: used length, or -1 on timeout. */
static int64_t indirect_request(struct virtq *q, unsigned entries, bool header)
{
    struct slot *s = &slots[0];
    fill_table(small_table, entries, s, !header);
    if (post_indirect(q, small_table, entries, s, header, 0) < 0)
        return -1;
    uint32_t len;
    vq_kick(q);
    if (!vq_wait(q, NULL, &len))
        return -1;
    return len;
}

static uint64_t user_indirect_long(uint64_t unused)
{
    (void)unused;
    const char *why = NULL;
    struct virtq *bq, *rq;
    dma_reset();
    struct virtio_dev *blk = open_dev(VIRTIO_ID_BLK, VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC), &bq, &why);
    if (!blk)
        return (uint64_t)why;
    struct virtio_dev *rng = NULL;
    uint8_t *rbuf = dma_alloc(64, 64);
    if (!virtio_has(blk, VIRTIO_F_INDIRECT_DESC)) {
        why = "VIRTIO_F_INDIRECT_DESC not offered";
        goto out;
    }
    uint64_t khz = tsc_khz();
    if (!khz) {
        why = "the PIT does not count (port 0x61)";
        goto out;
    }
    unsigned size = bq->size;
    int64_t len = indirect_request(bq, size, false);
    if (len != (int64_t)((size - 2) * SECTOR + 1) || slots[0].status != VIRTIO_BLK_S_OK) {
        why = fail("a read of exactly queue size %lu descriptors failed (used length %ld)", size, (uint64_t)len);
        goto out;
    }
    kprintf("QUEUE indirect boundary ok size=%u\n", size);
    /* Failures of the two over-long chains are reported after the flood, which runs either way. */
    len = indirect_request(bq, size + 1, false);
    if (len != 0 || slots[0].status != POISON)
        why = fail("an indirect table of queue size + 1 (%lu) was served (used length %ld)", size + 1, (uint64_t)len);
    int64_t len2 = indirect_request(bq, size, true);
    if (!why && (len2 != 0 || slots[0].status != POISON))
        why = fail("a header plus an indirect table of queue size (%lu) was served (used length %ld)", size,
                   (uint64_t)len2);
    if (len < 0 || len2 < 0)
        goto out;
    const char *boundary = why;

    /* The flood: a full ring, every chain pointing at one table of BIG_ENTRIES descriptors. */
    rng = open_dev(VIRTIO_ID_RNG, 0, &rq, &why);
    if (!rng)
        goto out;
    why = NULL;
    fill_table(big_table, BIG_ENTRIES, &slots[0], true);
    for (unsigned i = 0; i < size; i++) {
        slots[i].hdr = slots[0].hdr;
        slots[i].status = POISON;
        if (post_indirect(bq, big_table, BIG_ENTRIES, &slots[i], false, i) < 0) {
            why = "queue full";
            goto out;
        }
    }
    struct vbuf rb = { (uint64_t)rbuf, 64, true };
    uint64_t start = rdtsc_now(), rng_done = 0, ring_done = 0, limit = 60 * 1000 * khz;
    vq_kick(bq);
    vq_add(rq, &rb, 1, 0);
    vq_kick(rq);
    unsigned back = 0, refused = 0;
    while ((back < size || !rng_done) && rdtsc_now() - start < limit) {
        uint64_t cookie;
        uint32_t used;
        while (vq_pop(bq, &cookie, &used)) {
            back++;
            refused += used == 0 && slots[cookie].status == POISON;
            if (back == size)
                ring_done = rdtsc_now();
        }
        if (!rng_done && vq_pop(rq, NULL, &used))
            rng_done = rdtsc_now();
        cpu_pause();
    }
    kprintf("QUEUE indirect-flood chains=%u entries=%u refused=%u ring_us=%lu rng_us=%lu tsc_khz=%lu\n", size,
            BIG_ENTRIES, refused, ring_done ? us(ring_done - start, khz) : 0,
            rng_done ? us(rng_done - start, khz) : 0, khz);
    if (back < size || !rng_done)
        why = "timeout (60 s)";
    else if (boundary)
        why = boundary;
    else if (refused != size)
        why = fail("%lu of %lu chains longer than the queue were served", size - refused, size);
out:
    if (why) {
        virtio_fail(blk);
        if (rng)
            virtio_fail(rng);
    }
    virtio_reset(blk);
    if (rng)
        virtio_reset(rng);
    return (uint64_t)why;
}

const char *check_attack_indirect_long(void) { return (const char *)run_user(user_indirect_long, 0); }

/* Every request of the flood: one indirect table (header, `entries`-2 sectors, status), shared by all the
 * ring's chains (the device only reads it), so each takes one ring descriptor and the whole ring is in
 * flight. Completions are told apart by their head. */
static int post_read(struct virtq *q, unsigned i, unsigned entries)
{
    return post_indirect(q, small_table, entries, &slots[0], false, i);
}

static uint64_t timed_exit(void)
{
    uint64_t t = rdtsc_now();
    outb(0x80, 0);
    return rdtsc_now() - t;
}

static uint64_t user_queue_flood(uint64_t unused)
{
    (void)unused;
    const char *why = NULL;
    struct virtq *bq, *rq;
    dma_reset();
    struct virtio_dev *blk = open_dev(VIRTIO_ID_BLK, VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC), &bq, &why);
    if (!blk)
        return (uint64_t)why;
    struct virtio_dev *rng = open_dev(VIRTIO_ID_RNG, 0, &rq, &why);
    uint8_t *rbuf = dma_alloc(64, 64);
    if (!rng)
        goto out;
    if (!virtio_has(blk, VIRTIO_F_INDIRECT_DESC)) {
        why = "VIRTIO_F_INDIRECT_DESC not offered";
        goto out;
    }
    uint64_t khz = tsc_khz();
    if (!khz) {
        why = "the PIT does not count (port 0x61)";
        goto out;
    }
    uint64_t flood_ms = virtio_option_u64("kvmlet.flood_ms", 3000);
    uint64_t bound_ms = virtio_option_u64("kvmlet.flood_bound_ms", 1000);
    uint64_t exit_ms = virtio_option_u64("kvmlet.flood_exit_ms", 0);

    uint64_t idle = 0;
    for (int i = 0; i < 200; i++)
        idle += timed_exit();

    unsigned size = bq->size, depth = size;
    uint64_t entries = virtio_option_u64("kvmlet.flood_entries", size);
    if (entries < 3 || entries > size)
        entries = size;
    fill_table(small_table, (unsigned)entries, &slots[0], true);
    for (unsigned i = 0; i < depth; i++)
        post_read(bq, i, (unsigned)entries);
    uint64_t start = rdtsc_now(), end = start + flood_ms * khz, rng_at = start + 50 * khz;
    uint64_t next_exit = start + exit_ms * khz, rng_posted = 0, rng_done = 0, requests = 0, bad = 0;
    uint64_t exits = 0, exit_sum = 0, exit_max = 0;
    vq_kick(bq);
    for (;;) {
        uint64_t now = rdtsc_now(), cookie;
        uint32_t used;
        bool flooding = now < end;
        unsigned reposted = 0;
        while (vq_pop(bq, &cookie, &used)) {
            requests++;
            bad += used != (entries - 2) * SECTOR + 1;
            if (flooding) {
                post_read(bq, (unsigned)cookie, (unsigned)entries);
                reposted++;
            }
        }
        if (reposted)
            vq_kick(bq);
        if (!rng_posted && now >= rng_at) {
            struct vbuf rb = { (uint64_t)rbuf, 64, true };
            vq_add(rq, &rb, 1, 0);
            rng_posted = rdtsc_now();
            vq_kick(rq);
        }
        if (rng_posted && !rng_done && vq_pop(rq, NULL, &used))
            rng_done = rdtsc_now();
        if (exit_ms && flooding && now >= next_exit) {
            uint64_t t = timed_exit();
            exits++;
            exit_sum += t;
            exit_max = t > exit_max ? t : exit_max;
            next_exit = rdtsc_now() + exit_ms * khz;
        }
        if (!flooding && bq->num_free == size && rng_done)
            break;
        if (!flooding && now - end > 30 * 1000 * khz) {
            why = "timeout (30 s after the flood)";
            break;
        }
        cpu_pause();
    }
    uint64_t rng_us = rng_done ? us(rng_done - rng_posted, khz) : 0;
    kprintf("QUEUE flood blk_requests=%lu entries=%lu ms=%lu rng_us=%lu tsc_khz=%lu\n", requests, entries, flood_ms, rng_us, khz);
    kprintf("QUEUE flood pio_exit idle_avg_us=%lu flood_avg_us=%lu flood_max_us=%lu flood_exits=%lu\n",
            us(idle / 200, khz), exits ? us(exit_sum / exits, khz) : 0, us(exit_max, khz), exits);
    if (!why && bad)
        why = fail("%lu of %lu reads failed", bad, requests);
    if (!why && rng_us > bound_ms * 1000)
        why = fail("rng waited %lu ms behind the blk flood (bound %lu ms)", rng_us / 1000, bound_ms);
out:
    if (why) {
        virtio_fail(blk);
        if (rng)
            virtio_fail(rng);
    }
    virtio_reset(blk);
    if (rng)
        virtio_reset(rng);
    return (uint64_t)why;
}

const char *check_attack_queue_flood(void) { return (const char *)run_user(user_queue_flood, 0); }
