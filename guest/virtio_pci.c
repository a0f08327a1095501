/*
 * virtio over PCI, modern (virtio 1.2, 4.1): discovery of vendor 0x1AF4 device 0x1040-0x107F functions on
 * bus 0, the virtio structure capabilities (common, notify, ISR, device configuration), device
 * initialization through the common configuration structure, queue set-up, MSI-X (table programming,
 * masking, pending bits), and the `virtio-pci-msix` check.
 *
 * The generic virtio code (virtio_mmio.c) calls in here for devices whose transport is PCI, so every
 * virtio check runs over either transport. Addresses given to a device are guest-physical plus the
 * device's dma_offset (non-zero when vtd.c mapped its DMA pool at other I/O virtual addresses).
 */
#include "pci.h"

/* struct virtio_pci_common_cfg offsets (4.1.4.3) */
#define CC_DFSELECT  0x00
#define CC_DF        0x04
#define CC_GFSELECT  0x08
#define CC_GF        0x0c
#define CC_MSIX      0x10
#define CC_NUMQ      0x12
#define CC_STATUS    0x14
#define CC_CFGGEN    0x15
#define CC_Q_SELECT  0x16
#define CC_Q_SIZE    0x18
#define CC_Q_MSIX    0x1a
#define CC_Q_ENABLE  0x1c
#define CC_Q_NOFF    0x1e
#define CC_Q_DESCLO  0x20
#define CC_Q_DESCHI  0x24
#define CC_Q_AVAILLO 0x28
#define CC_Q_AVAILHI 0x2c
#define CC_Q_USEDLO  0x30
#define CC_Q_USEDHI  0x34
#define NO_VECTOR    0xffff

#define MSIX_ENABLE   0x8000
#define MSIX_MASKALL  0x4000

static inline uint8_t rd8(uint64_t a) { return *(volatile uint8_t *)phys(a); }
static inline uint16_t rd16(uint64_t a) { return *(volatile uint16_t *)phys(a); }
static inline void wr8(uint64_t a, uint8_t v) { *(volatile uint8_t *)phys(a) = v; }
static inline void wr16(uint64_t a, uint16_t v) { *(volatile uint16_t *)phys(a) = v; }

/* The address a virtio capability points at, or 0. */
static uint64_t cap_address(uint16_t bdf, unsigned cap, uint32_t *length)
{
    unsigned bar = pci_read(bdf, cap + 4, 1);
    uint32_t offset = pci_read(bdf, cap + 8, 4);
    *length = pci_read(bdf, cap + 12, 4);
    if (bar > 5)
        return 0;
    uint64_t base = pci_bar(bdf, bar, NULL);
    return base ? base + offset : 0;
}

static bool setup_function(uint16_t bdf, struct virtio_dev *d)
{
    memset(d, 0, sizeof(*d));
    d->transport = VIRTIO_TRANSPORT_PCI;
    d->bdf = bdf;
    d->device_id = (pci_read(bdf, PCI_DEVICE_ID, 2)) - 0x1040;
    d->version = 2;
    for (unsigned cap = pci_find_cap(bdf, PCI_CAP_VENDOR, 0); cap; cap = pci_find_cap(bdf, PCI_CAP_VENDOR, cap)) {
        unsigned type = pci_read(bdf, cap + 3, 1);
        uint32_t length;
        uint64_t a = cap_address(bdf, cap, &length);
        if (!a)
            continue;
        if (type == 1 && !d->common)
            d->common = a;
        else if (type == 2 && !d->notify) {
            d->notify = a;
            d->notify_mult = pci_read(bdf, cap + 16, 4);
        } else if (type == 3 && !d->isr)
            d->isr = a;
        else if (type == 4 && !d->devcfg)
            d->devcfg = a;
    }
    unsigned msix = pci_find_cap(bdf, PCI_CAP_MSIX, 0);
    if (msix) {
        uint32_t table = pci_read(bdf, msix + 4, 4), pba = pci_read(bdf, msix + 8, 4);
        d->msix_cap = msix;
        d->msix_count = (pci_read(bdf, msix + 2, 2) & 0x7ff) + 1;
        d->msix_table = pci_bar(bdf, table & 7, NULL) + (table & ~7u);
        d->msix_pba = pci_bar(bdf, pba & 7, NULL) + (pba & ~7u);
    }
    d->base = d->common;
    if (!d->common || !d->notify || !d->isr) {
        kprintf("VIRTIO pci %02x:%02x.%u lacks a common, notify or ISR capability\n", bdf >> 8, bdf >> 3 & 31,
                bdf & 7);
        return false;
    }
    /* memory decoding and bus mastering (a function without it may not DMA) */
    uint32_t cmd = pci_read(bdf, PCI_COMMAND, 2);
    pci_write(bdf, PCI_COMMAND, 2, cmd | PCI_CMD_MEMORY | PCI_CMD_MASTER);
    return true;
}

unsigned vpci_discover(struct virtio_dev *out, unsigned max)
{
    uint16_t list[64];
    unsigned n = pci_list(list, 64), found = 0;
    for (unsigned i = 0; i < n && found < max; i++) {
        uint32_t id = pci_read(list[i], PCI_VENDOR_ID, 4);
        if ((id & 0xffff) != 0x1af4 || (id >> 16) < 0x1040 || (id >> 16) > 0x107f)
            continue;
        if (setup_function(list[i], &out[found])) {
            struct virtio_dev *d = &out[found];
            kprintf("VIRTIO pci %02x:%02x.%u id=%u common=0x%lx msix=%u\n", d->bdf >> 8, d->bdf >> 3 & 31,
                    d->bdf & 7, d->device_id, d->common, d->msix_count);
            found++;
        }
    }
    return found;
}

uint32_t vpci_status(struct virtio_dev *d) { return rd8(d->common + CC_STATUS); }
void vpci_set_status(struct virtio_dev *d, uint32_t status) { wr8(d->common + CC_STATUS, (uint8_t)status); }

void vpci_reset(struct virtio_dev *d)
{
    vpci_set_status(d, 0);
    for (int i = 0; i < 1000 && vpci_status(d) != 0; i++)
        cpu_pause();
}

const char *vpci_begin(struct virtio_dev *d, uint64_t wanted)
{
    static char why[80];
    vpci_reset(d);
    if (vpci_status(d) != 0)
        return "device does not reset (status stays non-zero)";
    vpci_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
    vpci_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    mmio_write32(d->common + CC_DFSELECT, 0);
    uint64_t lo = mmio_read32(d->common + CC_DF);
    mmio_write32(d->common + CC_DFSELECT, 1);
    uint64_t hi = mmio_read32(d->common + CC_DF);
    d->offered = hi << 32 | lo;
    if (!(d->offered & VIRTIO_BIT(VIRTIO_F_VERSION_1)))
        return "device does not offer VIRTIO_F_VERSION_1";
    uint64_t accept = d->offered & (wanted | VIRTIO_BIT(VIRTIO_F_VERSION_1) | VIRTIO_BIT(VIRTIO_F_ACCESS_PLATFORM) |
                                    VIRTIO_BIT(VIRTIO_F_ORDER_PLATFORM));
    mmio_write32(d->common + CC_GFSELECT, 0);
    mmio_write32(d->common + CC_GF, (uint32_t)accept);
    mmio_write32(d->common + CC_GFSELECT, 1);
    mmio_write32(d->common + CC_GF, (uint32_t)(accept >> 32));
    vpci_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    uint32_t status = vpci_status(d);
    d->features = accept;
    kprintf("VIRTIO %s@pci:%02x.%u features offered=0x%lx accepted=0x%lx\n", virtio_name(d->device_id),
            d->bdf >> 3 & 31, d->bdf & 7, d->offered, accept);
    if (!(status & VIRTIO_STATUS_FEATURES_OK)) {
        ksnprintf(why, sizeof(why), "FEATURES_OK not kept (status 0x%x)", status);
        return why;
    }
    return NULL;
}

uint16_t vpci_queue_max(struct virtio_dev *d, unsigned index)
{
    wr16(d->common + CC_Q_SELECT, (uint16_t)index);
    return rd16(d->common + CC_Q_SIZE);
}

const char *vpci_program_queue(struct virtio_dev *d, struct virtq *q, bool interrupts, uint16_t *size)
{
    wr16(d->common + CC_Q_SELECT, q->index);
    if (rd16(d->common + CC_Q_ENABLE))
        return "queue already enabled after reset";
    wr16(d->common + CC_Q_SIZE, q->size);
    uint64_t desc = (uint64_t)q->desc + d->dma_offset, avail = (uint64_t)q->avail + d->dma_offset;
    uint64_t used = (uint64_t)q->used + d->dma_offset;
    mmio_write32(d->common + CC_Q_DESCLO, (uint32_t)desc);
    mmio_write32(d->common + CC_Q_DESCHI, (uint32_t)(desc >> 32));
    mmio_write32(d->common + CC_Q_AVAILLO, (uint32_t)avail);
    mmio_write32(d->common + CC_Q_AVAILHI, (uint32_t)(avail >> 32));
    mmio_write32(d->common + CC_Q_USEDLO, (uint32_t)used);
    mmio_write32(d->common + CC_Q_USEDHI, (uint32_t)(used >> 32));
    if (interrupts && d->msix_enabled) {
        uint16_t vector = (uint16_t)(q->index < d->msix_used ? q->index : 0);
        wr16(d->common + CC_Q_MSIX, vector);
        if (rd16(d->common + CC_Q_MSIX) != vector)
            return "queue MSI-X vector not accepted";
    } else {
        wr16(d->common + CC_Q_MSIX, NO_VECTOR);
    }
    q->notify_addr = d->notify + (uint64_t)rd16(d->common + CC_Q_NOFF) * d->notify_mult;
    wr16(d->common + CC_Q_ENABLE, 1);
    *size = q->size;
    return NULL;
}

void vpci_driver_ok(struct virtio_dev *d)
{
    vpci_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK |
                           VIRTIO_STATUS_DRIVER_OK);
}

uint32_t vpci_generation(struct virtio_dev *d) { return rd8(d->common + CC_CFGGEN); }

uint32_t vpci_cfg(struct virtio_dev *d, unsigned off, unsigned size)
{
    uint64_t a = d->devcfg + off;
    if (size == 1)
        return rd8(a);
    if (size == 2)
        return rd16(a);
    return mmio_read32(a);
}

/* ---- MSI-X (PCI Local Bus 3.0, 6.8.2) ---- */

const char *vpci_msix_enable(struct virtio_dev *d, unsigned first_vector, unsigned count)
{
    if (!d->msix_cap || !d->msix_table)
        return "no MSI-X capability";
    if (count > d->msix_count)
        count = d->msix_count;
    uint32_t apic_id = lapic_read(0x20) >> 24;
    for (unsigned i = 0; i < count; i++) {
        uint64_t e = d->msix_table + 16 * i;
        mmio_write32(e + 12, 1); /* masked while it is written */
        mmio_write32(e + 0, 0xfee00000u | apic_id << 12);
        mmio_write32(e + 4, 0);
        mmio_write32(e + 8, first_vector + i); /* fixed, edge */
        mmio_write32(e + 12, 0);
    }
    uint16_t ctl = (uint16_t)pci_read(d->bdf, d->msix_cap + 2, 2);
    pci_write(d->bdf, d->msix_cap + 2, 2, (ctl | MSIX_ENABLE) & ~MSIX_MASKALL);
    if (!(pci_read(d->bdf, d->msix_cap + 2, 2) & MSIX_ENABLE))
        return "MSI-X enable bit did not stick";
    d->msix_enabled = true;
    d->msix_used = (uint16_t)count;
    wr16(d->common + CC_MSIX, NO_VECTOR);
    return NULL;
}

void vpci_msix_mask(struct virtio_dev *d, unsigned entry, bool masked)
{
    mmio_write32(d->msix_table + 16 * entry + 12, masked ? 1 : 0);
}

bool vpci_msix_pending(struct virtio_dev *d, unsigned entry)
{
    return mmio_read32(d->msix_pba + 4 * (entry / 32)) >> (entry % 32) & 1;
}

/* ---- virtio-pci-msix: a blk read completed by an MSI-X interrupt; masking holds it in the PBA ---- */

static struct vblk msix_blk;
static uint8_t *msix_buf;

static uint64_t user_msix_setup(uint64_t unused)
{
    (void)unused;
    struct virtio_dev *list[VIRTIO_MAX_DEVS];
    unsigned n = virtio_discover(list);
    struct virtio_dev *d = NULL;
    for (unsigned i = 0; i < n && !d; i++)
        if (list[i]->transport == VIRTIO_TRANSPORT_PCI && list[i]->device_id == VIRTIO_ID_BLK)
            d = list[i];
    if (!d)
        return (uint64_t)"no virtio-blk over PCI";
    const char *why = vpci_msix_enable(d, VEC_MSI0, 1);
    if (why)
        return (uint64_t)why;
    if ((why = vblk_open(true, &msix_blk)))
        return (uint64_t)why;
    if (msix_blk.d != d)
        return (uint64_t)"virtio-blk opened is not the PCI one (use kvmlet.virtio=pci)";
    msix_buf = dma_alloc(4096, 4096);
    return msix_buf ? 0 : (uint64_t)"out of memory";
}

static uint64_t user_msix_submit(uint64_t masked)
{
    vpci_msix_mask(msix_blk.d, 0, masked != 0);
    if (vblk_submit(0, VIRTIO_BLK_T_IN, 0, msix_buf, 512, true) < 0)
        return (uint64_t)"queue full";
    vq_kick(msix_blk.q);
    if (masked) { /* polled: the completion must not interrupt, its vector must become pending */
        uint64_t cookie;
        if (!vq_wait(msix_blk.q, &cookie, NULL))
            return (uint64_t)"timeout (masked request)";
        uint64_t start = rdtsc_now();
        while (!vpci_msix_pending(msix_blk.d, 0) && rdtsc_now() - start < virtio_timeout_cycles())
            cpu_pause();
        if (!vpci_msix_pending(msix_blk.d, 0))
            return (uint64_t)"masked vector's pending bit not set";
    }
    return 0;
}

static uint64_t user_msix_unmask(uint64_t unused)
{
    (void)unused;
    vpci_msix_mask(msix_blk.d, 0, false);
    return vpci_msix_pending(msix_blk.d, 0) ? (uint64_t)"pending bit still set after unmask" : 0;
}

static uint64_t user_msix_reap(uint64_t unused)
{
    (void)unused;
    uint64_t cookie;
    uint32_t len;
    if (!vq_pop(msix_blk.q, &cookie, &len))
        return (uint64_t)"interrupt without a used buffer";
    return vblk_status(0) == VIRTIO_BLK_S_OK ? 0 : (uint64_t)"read failed";
}

const char *check_virtio_pci_msix(void)
{
    static char why[80];
    const char *r;
    lapic_software_enable();
    if ((r = (const char *)run_user(user_msix_setup, 0)))
        return r;
    uint32_t before = msi_count[0];
    if ((r = (const char *)run_user(user_msix_submit, 0)))
        return r;
    if (!msi_wait(0, before + 1, virtio_timeout_cycles()))
        return "no MSI-X interrupt for the used buffer";
    if ((r = (const char *)run_user(user_msix_reap, 0)))
        return r;
    uint32_t count = msi_count[0];
    if ((r = (const char *)run_user(user_msix_submit, 1)))
        return r;
    __asm__ volatile("sti; nop; nop; cli" ::: "memory");
    if (msi_count[0] != count)
        return "an interrupt arrived from a masked vector";
    if ((r = (const char *)run_user(user_msix_unmask, 0)))
        return r;
    if (!msi_wait(0, count + 1, virtio_timeout_cycles()))
        return "the pending message was not sent at unmask";
    kprintf("MSIX vector=0x%x interrupts=%u pending-then-unmasked=1\n", VEC_MSI0, msi_count[0] - before);
    virtio_reset(msix_blk.d);
    ksnprintf(why, sizeof(why), "%s", "");
    return NULL;
}
