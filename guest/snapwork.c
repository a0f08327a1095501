/*
 * snapwork: the snapshot workload. A deterministic program whose serial output is byte for byte the same
 * whether or not the VM is snapshotted and restored (or cloned) in the middle, and which spends its time
 * in each state a snapshot can catch a vCPU in:
 *  - CPL3 (native under PVM): a pseudo-random walk over kvmlet.snap_mib MiB from 16 MiB, each step a
 *    read-modify-write of one 64-bit word; kvmlet.snap_steps steps a round (default 64 per 4 KiB page, so
 *    every page is dirtied every round);
 *  - CPL0 (emulated under PVM): sampling the area into the checksum, building the round's record and its
 *    CRC-32;
 *  - HLT with interrupts on, woken by the virtio-blk used-buffer interrupt (8259; the PIT at 100 Hz
 *    wakes it too, for the timeout);
 *  - virtio-blk I/O: after round r, record r is written to sector r of the first drive and then flushed
 *    (VIRTIO_BLK_T_FLUSH, if offered); `snapwork record r acked` once the device completed both.
 * Rounds r = 0 .. kvmlet.snap_rounds - 1. Nothing printed depends on time, the TSC or how many
 * interrupts came; the TSC only bounds waits, through a time_guard (guard.c), which a restore's TSC
 * jump cannot expire.
 *
 * The computation (mix: splitmix64's finalizer; xorshift64: virtio_mmio.c's; all arithmetic mod 2^64):
 *   area word w = mix(w ^ SEED) at the start, SEED = 0x736e6170776f726b ("snapwork"); c = SEED;
 *   round r: x = mix(c ^ r) | 1, acc = r; snap_steps times: x = xorshift64(x),
 *            i = (x >> 16) % pages * 512 + (x & 511), v = (area[i] ^ x) * 0x9e3779b97f4a7c15 + r,
 *            area[i] = v, acc = rotl(acc, 7) ^ v;
 *            c = mix(c ^ acc);
 *            CPL0: s = 0; for j < 16: s = rotl(s, 11) ^ area[mix(c + j) % words];  c = mix(c + s).
 * The record (512 bytes, little-endian):
 *    0  "SNAPREC\0"
 *    8  u64 index (= round = sector)     16  u64 kvmlet.snap_rounds
 *   24  u64 checksum after this round    32  u64 kvmlet.snap_mib
 *   40  u64 steps per round              48  460 bytes: xorshift64 stream seeded with the checksum
 *  508  u32 CRC-32 of bytes 0-507 (zlib.crc32)
 */
#include "virtio.h"

#define MIB (1024ULL * 1024)
#define AREA_BASE (16 * MIB)
#define IDENTITY_MAP_END (4096 * MIB)
#define SECTOR 512
#define WORDS_PER_PAGE 512
#define DEFAULT_MIB 16
#define DEFAULT_ROUNDS 100 /* about 3 s under kvmlet on PVM hosts */
#define DEFAULT_STEPS_PER_PAGE 64
#define DEFAULT_TIMEOUT_S 10
#define SAMPLES 16
#define CHECKSUM_SEED 0x736e6170776f726bULL

struct snaprec {
    char magic[8];
    uint64_t index;
    uint64_t rounds;
    uint64_t checksum;
    uint64_t mib;
    uint64_t steps;
    uint8_t fill[SECTOR - 48 - 4];
    uint32_t crc;
} __attribute__((packed));

_Static_assert(sizeof(struct snaprec) == SECTOR, "a record is one sector");

static struct {
    volatile uint64_t *area;
    uint64_t mib, pages, words, steps, rounds, every, timeout_s;
    uint64_t round, checksum, walk;
    struct vblk blk;
    struct snaprec *rec;
    volatile uint32_t irqs, used_irqs;
    char reason[96];
} sw;

static const char *fail(const char *fmt, uint64_t a, uint64_t b)
{
    ksnprintf(sw.reason, sizeof(sw.reason), fmt, a, b);
    return sw.reason;
}

/* splitmix64's finalizer */
static uint64_t mix(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static uint64_t rotl(uint64_t x, unsigned r) { return x << r | x >> (64 - r); }

/* ---- CPL3 ---- */

/* Device set-up and the area's initial contents. */
static uint64_t user_start(uint64_t unused)
{
    (void)unused;
    const char *why = vblk_open(true, &sw.blk);
    if (why)
        return (uint64_t)why;
    if (sw.blk.ro)
        why = "the drive is read-only";
    else if (sw.blk.capacity < sw.rounds)
        why = fail("the drive has %lu sectors; %lu rounds need one each", sw.blk.capacity, sw.rounds);
    else if (!(sw.rec = dma_alloc(SECTOR, SECTOR)))
        why = "out of memory";
    if (why) {
        virtio_reset(sw.blk.d);
        return (uint64_t)why;
    }
    kprintf("snapwork start mib=%lu rounds=%lu every=%lu steps=%lu flush=%u\n", sw.mib, sw.rounds, sw.every,
            sw.steps, sw.blk.flush ? 1 : 0);
    for (uint64_t w = 0; w < sw.words; w++)
        sw.area[w] = mix(w ^ CHECKSUM_SEED);
    return 0;
}

/* One round of the walk: returns the fold of the values written. */
static uint64_t user_walk(uint64_t round)
{
    uint64_t rng = mix(sw.checksum ^ round) | 1, acc = round;
    volatile uint64_t *area = sw.area;
    for (uint64_t k = 0; k < sw.steps; k++) {
        uint64_t x = xorshift64(&rng);
        uint64_t i = (x >> 16) % sw.pages * WORDS_PER_PAGE + (x & (WORDS_PER_PAGE - 1));
        uint64_t v = (area[i] ^ x) * 0x9e3779b97f4a7c15ULL + round;
        area[i] = v;
        acc = rotl(acc, 7) ^ v;
    }
    return acc;
}

static uint64_t user_print_round(uint64_t round)
{
    kprintf("snapwork round %lu checksum 0x%016lx\n", round, sw.checksum);
    return 0;
}

static uint64_t user_submit(uint64_t type)
{
    bool write = type == VIRTIO_BLK_T_OUT;
    if (vblk_submit(0, (uint32_t)type, write ? sw.round : 0, write ? sw.rec : NULL, write ? SECTOR : 0, false) < 0)
        return 1;
    vq_kick(sw.blk.q);
    return 0;
}

/* Takes the completed request off the used ring; its status. */
static uint64_t user_complete(uint64_t unused)
{
    (void)unused;
    uint64_t cookie;
    if (!vq_pop(sw.blk.q, &cookie, NULL) || cookie != 0)
        return 0x200;
    return vblk_status(0);
}

static uint64_t user_acked(uint64_t round)
{
    kprintf("snapwork record %lu acked\n", round);
    return 0;
}

static uint64_t user_reset(uint64_t failed)
{
    if (failed)
        virtio_fail(sw.blk.d);
    virtio_reset(sw.blk.d);
    return 0;
}

/* ---- CPL0 ---- */

static void blk_interrupt(void)
{
    uint32_t isr = mmio_read32(sw.blk.d->base + VIRTIO_MMIO_INTERRUPT_STATUS);
    mmio_write32(sw.blk.d->base + VIRTIO_MMIO_INTERRUPT_ACK, isr & (VIRTIO_INT_USED | VIRTIO_INT_CONFIG));
    sw.irqs++;
    if (isr & VIRTIO_INT_USED)
        sw.used_irqs++;
}

/* The kernel-mode share of a round: sample the area, then build the record and its CRC. */
static void kernel_work(void)
{
    uint64_t sample = 0;
    for (unsigned j = 0; j < SAMPLES; j++)
        sample = rotl(sample, 11) ^ sw.area[mix(sw.checksum + j) % sw.words];
    sw.checksum = mix(sw.checksum + sample);

    struct snaprec *r = sw.rec;
    memcpy(r->magic, "SNAPREC", 8);
    r->index = sw.round;
    r->rounds = sw.rounds;
    r->checksum = sw.checksum;
    r->mib = sw.mib;
    r->steps = sw.steps;
    uint64_t rng = sw.checksum | 1;
    for (unsigned i = 0; i < sizeof(r->fill); i += 4) {
        uint32_t v = (uint32_t)xorshift64(&rng);
        memcpy(r->fill + i, &v, 4);
    }
    r->crc = crc32_ieee(r, offsetof(struct snaprec, crc));
}

/* Submits a request (at CPL3) and halts until it completes; NULL or why not. */
static const char *request(uint32_t type, const char *what)
{
    struct time_guard guard;
    if (run_user(user_submit, type))
        return fail("queue full (%s of record %lu)", (uint64_t)what, sw.round);
    guard_start(&guard, sw.timeout_s);
    for (;;) {
        cli();
        if (vq_has_used(sw.blk.q))
            break;
        if (guard_expired(&guard))
            return fail("timeout (%s of record %lu)", (uint64_t)what, sw.round);
        sti_hlt(); /* interrupts are on only while halted: CPL3 runs with IF 0 */
    }
    uint64_t status = run_user(user_complete, 0);
    if (status == 0x200)
        return fail("bad used-ring entry (%s of record %lu)", (uint64_t)what, sw.round);
    if (status != VIRTIO_BLK_S_OK)
        return fail("%s of record %lu failed", (uint64_t)what, sw.round);
    return NULL;
}

static const char *run_rounds(void)
{
    const char *why;
    for (sw.round = 0; sw.round < sw.rounds; sw.round++) {
        sw.walk = run_user(user_walk, sw.round);
        sw.checksum = mix(sw.checksum ^ sw.walk);
        kernel_work();
        if ((sw.round + 1) % sw.every == 0)
            run_user(user_print_round, sw.round);
        if ((why = request(VIRTIO_BLK_T_OUT, "write")))
            return why;
        if (sw.blk.flush && (why = request(VIRTIO_BLK_T_FLUSH, "flush")))
            return why;
        run_user(user_acked, sw.round);
    }
    return NULL;
}

const char *check_snapwork(void)
{
    sw.mib = virtio_option_u64("kvmlet.snap_mib", DEFAULT_MIB);
    sw.rounds = virtio_option_u64("kvmlet.snap_rounds", DEFAULT_ROUNDS);
    sw.every = virtio_option_u64("kvmlet.snap_every", 1);
    sw.timeout_s = opt.timeout_set && opt.timeout_s ? opt.timeout_s : DEFAULT_TIMEOUT_S;
    if (!sw.mib || sw.mib > (IDENTITY_MAP_END - AREA_BASE) / MIB)
        return "kvmlet.snap_mib must be 1 to 4080";
    if (!sw.every)
        sw.every = 1;
    sw.pages = sw.mib * MIB / 4096;
    sw.words = sw.mib * MIB / 8;
    sw.steps = virtio_option_u64("kvmlet.snap_steps", DEFAULT_STEPS_PER_PAGE * sw.pages);
    sw.area = phys(AREA_BASE);
    sw.checksum = CHECKSUM_SEED;
    sw.irqs = sw.used_irqs = 0;
    if ((uint64_t)_image_end > AREA_BASE)
        return "the guest image reaches into the work area at 16 MiB";
    if (!ram_covers(AREA_BASE, AREA_BASE + sw.mib * MIB))
        return fail("%lu MiB from 16 MiB exceeds RAM in e820", sw.mib, 0);

    const char *why = (const char *)run_user(user_start, 0);
    if (why)
        return why;
    int irq = (int)sw.blk.d->irq;
    if (irq <= 0 || irq >= 16 || irq == 2) {
        run_user(user_reset, 0);
        return fail("irq %lu not reachable through the 8259", (uint64_t)irq, 0);
    }
    cli();
    pic_init();
    pit_start_100hz();
    irq_set_handler(irq, blk_interrupt);
    lapic_ensure_virtual_wire();
    pic_unmask(0);
    pic_unmask(irq);

    why = run_rounds();

    cli();
    pic_mask_all();
    irq_set_handler(irq, NULL);
    run_user(user_reset, why != NULL);
    if (!why && !sw.used_irqs)
        why = "no used-buffer interrupt arrived (completions seen by polling only)";
    if (!why)
        kprintf("snapwork done rounds=%lu records=%lu checksum 0x%016lx\n", sw.rounds, sw.rounds, sw.checksum);
    return why;
}
