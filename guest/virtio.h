/*
 * Guest-side virtio over MMIO (version 2, "modern") with split virtqueues,
 * written from the virtio 1.2 specification (OASIS): section 2 (basic
 * facilities, split virtqueues), 3.1 (device initialization), 4.2 (MMIO
 * transport) and 5.x (device types).
 *
 * All of it runs at CPL3 through run_user() except the interrupt-driven
 * part of virtio-blk-irq (PIC set-up and the handler), because on PVM hosts
 * kernel-mode code is emulated. MMIO registers and guest memory are reachable
 * from CPL3 (every page is user-accessible; 3-4 GiB is mapped uncached).
 */
#ifndef KVMLET_GUEST_VIRTIO_H
#define KVMLET_GUEST_VIRTIO_H

#include "guest.h"

/* MMIO register offsets (4.2.2). */
#define VIRTIO_MMIO_MAGIC            0x000
#define VIRTIO_MMIO_VERSION          0x004
#define VIRTIO_MMIO_DEVICE_ID        0x008
#define VIRTIO_MMIO_VENDOR_ID        0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES  0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES  0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL        0x030
#define VIRTIO_MMIO_QUEUE_SIZE_MAX   0x034
#define VIRTIO_MMIO_QUEUE_SIZE       0x038
#define VIRTIO_MMIO_QUEUE_READY      0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY     0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK    0x064
#define VIRTIO_MMIO_STATUS           0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW   0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH  0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG           0x100

#define VIRTIO_MMIO_MAGIC_VALUE 0x74726976 /* "virt" */
#define VIRTIO_INT_USED   1 /* InterruptStatus: used buffer notification */
#define VIRTIO_INT_CONFIG 2 /* configuration change notification */

/* Device status bits (2.1). */
#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER      2
#define VIRTIO_STATUS_DRIVER_OK   4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 64
#define VIRTIO_STATUS_FAILED      128

/* Device-independent feature bits (6). */
#define VIRTIO_F_INDIRECT_DESC   28
#define VIRTIO_F_EVENT_IDX       29
#define VIRTIO_F_VERSION_1       32
#define VIRTIO_F_ACCESS_PLATFORM 33
#define VIRTIO_F_RING_PACKED     34
#define VIRTIO_F_ORDER_PLATFORM  36
#define VIRTIO_BIT(n) (1ULL << (n))

/* Device IDs (5). */
#define VIRTIO_ID_NET   1
#define VIRTIO_ID_BLK   2
#define VIRTIO_ID_RNG   4
#define VIRTIO_ID_VSOCK 19

/* Split virtqueue (2.7). */
#define VIRTQ_DESC_F_NEXT  1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY     1

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct virtq_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[]; /* then used_event, unused without VIRTIO_F_EVENT_IDX */
};

struct virtq_used_elem {
    uint32_t id;
    uint32_t len;
};

struct virtq_used {
    uint16_t flags;
    uint16_t idx;
    struct virtq_used_elem ring[]; /* then avail_event */
};

/*
 * Queue size used by this driver: at most VQ_MAX_SIZE entries. Each queue
 * takes two pages: descriptors and the available ring in the first, the used
 * ring (written by the device) alone in the second.
 */
#define VQ_MAX_SIZE 128
#define VQ_PAGES    2

struct virtio_dev;

struct virtq {
    struct virtio_dev *dev;
    uint16_t index; /* queue number */
    uint16_t size;  /* power of two, <= VQ_MAX_SIZE */
    volatile struct virtq_desc *desc;
    volatile struct virtq_avail *avail;
    volatile struct virtq_used *used;
    uint16_t free_head, num_free;
    uint16_t avail_idx; /* next free slot in avail->ring (free-running) */
    uint16_t last_used; /* next used->idx entry to consume (free-running) */
    uint16_t chain_len[VQ_MAX_SIZE];
    uint64_t cookie[VQ_MAX_SIZE];
    uint64_t notifies; /* QueueNotify writes */
    uint64_t notify_addr; /* virtio-pci: where this queue's notifications go */
};

/* One buffer of a chain: device-readable (out) or device-writable (in). */
struct vbuf {
    uint64_t addr;
    uint32_t len;
    bool device_writes;
};

#define VIRTIO_MAX_DEVS   16
#define VIRTIO_MAX_QUEUES 12

struct virtio_dev {
    uint64_t base;
    uint64_t size;
    uint32_t irq;         /* 0 if unknown (scan without an IRQ base) */
    uint32_t version;     /* 2 = modern, 1 = legacy */
    uint32_t device_id;
    uint64_t offered;     /* device features (bits 0-63) */
    uint64_t features;    /* negotiated */
    struct virtq *vq[VIRTIO_MAX_QUEUES];
    /* virtio over PCI (virtio_pci.c); the transport is MMIO unless transport says PCI */
    uint8_t transport;
    uint16_t bdf;                           /* bus << 8 | device << 3 | function */
    uint64_t common, isr, devcfg, notify;   /* the virtio structures, mapped through the BARs */
    uint32_t notify_mult;
    uint16_t msix_cap, msix_count, msix_used;
    bool msix_enabled;
    uint64_t msix_table, msix_pba;
    uint64_t dma_offset;                    /* added to every address the device is given (IOVA = GPA + offset) */
};
#define VIRTIO_TRANSPORT_MMIO 0
#define VIRTIO_TRANSPORT_PCI  1

/* virtio_mmio.c: discovery and options. */
unsigned virtio_discover(struct virtio_dev **devs); /* all transports found (printed once) */
struct virtio_dev *virtio_find(uint32_t device_id, const char **why_not);
bool virtio_option(const char *name, const char **value, size_t *len);
uint64_t virtio_option_u64(const char *name, uint64_t def);
uint64_t virtio_timeout_cycles(void);
const char *virtio_name(uint32_t device_id);

/* virtio_mmio.c: device initialization (3.1.1) and configuration space. */
const char *virtio_begin(struct virtio_dev *d, uint64_t wanted); /* reset .. FEATURES_OK */
const char *virtio_setup_queue(struct virtio_dev *d, unsigned index, bool interrupts, struct virtq **out);
void virtio_driver_ok(struct virtio_dev *d);
void virtio_reset(struct virtio_dev *d);
void virtio_fail(struct virtio_dev *d);
uint32_t virtio_status(struct virtio_dev *d);
static inline bool virtio_has(const struct virtio_dev *d, unsigned bit) { return d->features & VIRTIO_BIT(bit); }
uint8_t virtio_cfg8(struct virtio_dev *d, unsigned off);
uint16_t virtio_cfg16(struct virtio_dev *d, unsigned off);
uint32_t virtio_cfg32(struct virtio_dev *d, unsigned off);
uint64_t virtio_cfg64(struct virtio_dev *d, unsigned off); /* two 32-bit reads under ConfigGeneration */

/* virtio_mmio.c: memory for rings and buffers (a static, page-aligned pool, reset per check). */
void dma_pool_range(uint64_t *start, uint64_t *size);
void dma_reset(void);
void *dma_alloc(size_t size, size_t align); /* zeroed; NULL when the pool is exhausted */

/* virtio_mmio.c: virtqueue operations (2.7.13, 2.7.14). */
int vq_add(struct virtq *q, const struct vbuf *bufs, unsigned n, uint64_t cookie); /* -1: full */
void vq_kick(struct virtq *q);         /* publish avail->idx, notify unless suppressed */
bool vq_pop(struct virtq *q, uint64_t *cookie, uint32_t *len);
bool vq_wait(struct virtq *q, uint64_t *cookie, uint32_t *len); /* polls; false on timeout */
static inline bool vq_has_used(const struct virtq *q) { return q->used->idx != q->last_used; }

static inline uint64_t rdtsc_now(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (uint64_t)hi << 32 | lo;
}
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline void mfence(void) { __asm__ volatile("mfence" ::: "memory"); }

/* virtio-blk request types and status values (5.2.6) */
#define VIRTIO_BLK_T_IN     0
#define VIRTIO_BLK_T_OUT    1
#define VIRTIO_BLK_T_FLUSH  4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_S_OK     0
#define VIRTIO_BLK_S_IOERR  1
#define VIRTIO_BLK_S_UNSUPP 2

/* virtio_blk.c: the first virtio-blk device for checks in other files (snapwork); call at CPL3. */
#define VBLK_SLOTS 32 /* requests in flight, each with its header and status byte */
struct vblk {
    struct virtio_dev *d;
    struct virtq *q;
    uint64_t capacity; /* 512-byte sectors */
    bool ro, flush;    /* VIRTIO_BLK_F_RO, VIRTIO_BLK_F_FLUSH negotiated */
};
const char *vblk_open(bool interrupts, struct vblk *out); /* resets the DMA pool, ends at DRIVER_OK */
int vblk_submit(unsigned slot, uint32_t type, uint64_t sector, void *data, uint32_t len, bool device_writes);
unsigned vblk_status(unsigned slot); /* the status byte of the request in `slot` (0xff until completed) */

uint32_t crc32_ieee(const void *data, size_t len); /* zlib's crc32 */
uint64_t xorshift64(uint64_t *state);

#endif
