/*
 * virtio-rng check (virtio 1.2, 5.4 entropy device): one requestq; the
 * driver posts device-writable buffers and the device fills them (possibly
 * fewer bytes than offered: the used length says how many).
 */
#include "virtio.h"

#define RNG_BYTES 64

/* Fills out[0..RNG_BYTES) with as many requests as the device needs; false on timeout. */
static bool rng_read(struct virtq *q, uint8_t *buf, uint8_t *out)
{
    unsigned have = 0;
    for (int tries = 0; have < RNG_BYTES && tries < 64; tries++) {
        struct vbuf b = { (uint64_t)buf, RNG_BYTES - have, true };
        uint32_t len;
        if (vq_add(q, &b, 1, 0) < 0)
            return false;
        vq_kick(q);
        if (!vq_wait(q, NULL, &len))
            return false;
        if (len > RNG_BYTES - have)
            len = RNG_BYTES - have;
        memcpy(out + have, buf, len);
        have += len;
    }
    return have == RNG_BYTES;
}

static uint64_t user_rng(uint64_t unused)
{
    (void)unused;
    static uint8_t a[RNG_BYTES], b[RNG_BYTES];
    const char *why;
    struct virtq *q;
    dma_reset();
    struct virtio_dev *d = virtio_find(VIRTIO_ID_RNG, &why);
    if (!d)
        return (uint64_t)(why ? why : "no virtio-rng device");
    if ((why = virtio_begin(d, 0)))
        return (uint64_t)why;
    if ((why = virtio_setup_queue(d, 0, false, &q))) {
        virtio_fail(d);
        return (uint64_t)why;
    }
    uint8_t *buf = dma_alloc(RNG_BYTES, 64);
    virtio_driver_ok(d);
    if (!rng_read(q, buf, a) || !rng_read(q, buf, b))
        why = "timeout";
    if (!why) {
        kprintf("RNG ");
        for (int i = 0; i < 16; i++)
            kprintf("%02x", a[i]);
        kprintf("\n");
        bool zero_a = true, zero_b = true;
        for (int i = 0; i < RNG_BYTES; i++) {
            zero_a &= a[i] == 0;
            zero_b &= b[i] == 0;
        }
        if (zero_a || zero_b)
            why = "all zero";
        else if (memcmp(a, b, RNG_BYTES) == 0)
            why = "two reads returned the same bytes";
    }
    if (why)
        virtio_fail(d);
    virtio_reset(d);
    return (uint64_t)why;
}

const char *check_virtio_rng(void) { return (const char *)run_user(user_rng, 0); }
