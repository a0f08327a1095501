/*
 * An Intel VT-d driver (legacy translation mode), written from the Intel VT-d specification, and its checks.
 *
 * The unit comes from the ACPI DMAR table (the first DRHD). Tables live in a static page pool: the root
 * table, bus 0's context table, one second-level page table per domain (4 levels, or 3 with
 * kvmlet.vtd_levels=3), and the invalidation queue. Invalidations are queued (IQA/IQT, each batch ended by an
 * invalidation wait descriptor whose status write is polled) when the unit has queued invalidation and
 * kvmlet.vtd_qi is not 0, else register-based (CCMD, IOTLB). Everything but the fault-event interrupt wait
 * runs at CPL3.
 *
 * Checks:
 *   vtd-probe      the unit's registers (VER, CAP, ECAP) and DRHD
 *   vtd-on         each virtio-pci device in its own domain (domain n + 1), the virtio DMA pool mapped in it at
 *                  I/O virtual address = guest-physical + kvmlet.vtd_offset (default 256 GiB; 64 GiB with 3
 *                  levels) in kvmlet.vtd_page pages (4k, 2m, 1g), translation on; the devices are then driven
 *                  with those addresses by every later check (kvmlet.vtd_pt=1: pass-through contexts instead)
 *   vtd-off        translation off, devices back on guest-physical addresses
 *   vtd-fault      a virtio-blk read into a page unmapped (and invalidated) after a good read: the request
 *                  fails (used length 0, status untouched), the page keeps its contents, the fault record has
 *                  the device's source ID, the page's address, reason 5 (write: the device writes read data),
 *                  and the fault event interrupt arrives (an MSI to vector VEC_MSI0 + 15)
 *   vtd-stale      a page remapped to another guest page and invalidated page-selectively: the next read lands
 *                  in the new page, the old one is untouched
 *   vtd-isolation  a page mapped only in another device's domain: virtio-blk faults on it with its source ID,
 *                  the page is untouched; the other device (virtio-rng) writes it through its own domain
 */
#include "pci.h"

#define R_VER    0x00
#define R_CAP    0x08
#define R_ECAP   0x10
#define R_GCMD   0x18
#define R_GSTS   0x1c
#define R_RTADDR 0x20
#define R_CCMD   0x28
#define R_FSTS   0x34
#define R_FECTL  0x38
#define R_FEDATA 0x3c
#define R_FEADDR 0x40
#define R_FEUADDR 0x44
#define R_IQH    0x80
#define R_IQT    0x88
#define R_IQA    0x90
#define GCMD_TE   (1u << 31)
#define GCMD_SRTP (1u << 30)
#define GCMD_QIE  (1u << 26)
#define GSTS_PERSISTENT (GCMD_TE | GCMD_QIE | (1u << 25))
#define FSTS_PFO  1u
#define FSTS_PPF  2u
#define FSTS_IQE  (1u << 4)
#define SL_R 1ull
#define SL_W 2ull
#define SL_PS (1ull << 7)
#define PAGE 4096ul
#define POOL_PAGES 96
#define MAX_DOMAINS 8
#define FAULT_VECTOR 15

static uint8_t pool[POOL_PAGES * PAGE] __attribute__((aligned(4096)));

static struct {
    bool found, qi, on;
    uint64_t base, cap, ecap;
    uint8_t drhd_flags;
    unsigned fro, nfr, iro, levels;
    unsigned pages;
    uint64_t root, ctx, queue;
    unsigned qtail;
    volatile uint32_t *qstatus;
    uint32_t qseq;
    uint64_t top[MAX_DOMAINS + 1];   /* per domain: the page table's top */
    uint64_t offset, page;
    bool pass_through;
} vt;

static char why[128];

static uint32_t r32(unsigned off) { return mmio_read32(vt.base + off); }
static void w32(unsigned off, uint32_t v) { mmio_write32(vt.base + off, v); }
static uint64_t r64(unsigned off) { return r32(off) | (uint64_t)r32(off + 4) << 32; }
static void w64(unsigned off, uint64_t v)
{
    w32(off, (uint32_t)v);
    w32(off + 4, (uint32_t)(v >> 32));
}

bool vtd_present(void) { return vt.found; }
uint64_t vtd_base(void) { return vt.base; }

static bool find_unit(void)
{
    if (vt.found)
        return true;
    const struct acpi_header *dmar = acpi_find_table("DMAR");
    if (!dmar)
        return false;
    const uint8_t *p = (const uint8_t *)dmar + sizeof(*dmar) + 12, *end = (const uint8_t *)dmar + dmar->length;
    while (p + 4 <= end) {
        uint16_t type, length;
        memcpy(&type, p, 2);
        memcpy(&length, p + 2, 2);
        if (length < 4 || p + length > end)
            break;
        if (type == 0 && length >= 16) {
            vt.drhd_flags = p[4];
            memcpy(&vt.base, p + 8, 8);
            break;
        }
        p += length;
    }
    if (!vt.base)
        return false;
    vt.cap = r64(R_CAP);
    vt.ecap = r64(R_ECAP);
    vt.fro = (unsigned)(vt.cap >> 24 & 0x3ff) * 16;
    vt.nfr = (unsigned)(vt.cap >> 40 & 0xff) + 1;
    vt.iro = (unsigned)(vt.ecap >> 8 & 0x3ff) * 16;
    vt.found = true;
    return true;
}

static uint64_t alloc_page(void)
{
    if (vt.pages >= POOL_PAGES)
        return 0;
    uint64_t a = (uint64_t)pool + PAGE * vt.pages++;
    memset(phys(a), 0, PAGE);
    return a;
}

static bool wait_bits(unsigned off, uint32_t mask, uint32_t want)
{
    uint64_t start = rdtsc_now();
    while ((r32(off) & mask) != want)
        if (rdtsc_now() - start > virtio_timeout_cycles())
            return false;
    return true;
}

static bool wait_clear64(unsigned off, uint64_t bit)
{
    uint64_t start = rdtsc_now();
    while (r64(off) & bit)
        if (rdtsc_now() - start > virtio_timeout_cycles())
            return false;
    return true;
}

static bool gcmd(uint32_t bit, bool on)
{
    uint32_t status = r32(R_GSTS) & GSTS_PERSISTENT;
    w32(R_GCMD, on ? status | bit : status & ~bit);
    return wait_bits(R_GSTS, bit, on ? bit : 0);
}

/* ---- invalidation ---- */

static bool qi_run(uint64_t lo, uint64_t hi)
{
    volatile uint64_t *q = phys(vt.queue);
    unsigned t = vt.qtail;
    if (lo) {
        q[2 * t] = lo;
        q[2 * t + 1] = hi;
        t = (t + 1) % 256;
    }
    uint32_t seq = ++vt.qseq;
    q[2 * t] = 5 | 1u << 5 | (uint64_t)seq << 32; /* wait: status write of seq */
    q[2 * t + 1] = (uint64_t)vt.qstatus;
    t = (t + 1) % 256;
    vt.qtail = t;
    w64(R_IQT, (uint64_t)t << 4);
    uint64_t start = rdtsc_now();
    while (*vt.qstatus != seq) {
        if (r32(R_FSTS) & FSTS_IQE)
            return false;
        if (rdtsc_now() - start > virtio_timeout_cycles())
            return false;
    }
    return true;
}

static bool inv_context_global(void)
{
    if (vt.qi)
        return qi_run(1 | 1u << 4, 0);
    w64(R_CCMD, 1ull << 63 | 1ull << 61);
    return wait_clear64(R_CCMD, 1ull << 63);
}

static bool inv_iotlb(unsigned granularity, uint16_t did, uint64_t addr, unsigned am)
{
    if (vt.qi)
        return qi_run(2 | granularity << 4 | (uint64_t)did << 16, addr | am);
    if (granularity == 3)
        w64(vt.iro, addr | am);
    w64(vt.iro + 8, 1ull << 63 | (uint64_t)granularity << 60 | (uint64_t)did << 32);
    return wait_clear64(vt.iro + 8, 1ull << 63);
}

static bool inv_page(uint16_t did, uint64_t iova) { return inv_iotlb(3, did, iova & ~(PAGE - 1), 0); }

/* ---- tables ---- */

static volatile uint64_t *pte(uint16_t did, uint64_t iova, unsigned leaf_level, bool create)
{
    uint64_t table = vt.top[did];
    for (unsigned level = vt.levels; level > leaf_level; level--) {
        volatile uint64_t *e = (volatile uint64_t *)phys(table) + (iova >> (12 + 9 * (level - 1)) & 511);
        if (!(*e & (SL_R | SL_W))) {
            if (!create)
                return NULL;
            uint64_t next = alloc_page();
            if (!next)
                return NULL;
            *e = next | SL_R | SL_W;
        }
        table = *e & 0x000ffffffffff000ull;
    }
    return (volatile uint64_t *)phys(table) + (iova >> (12 + 9 * (leaf_level - 1)) & 511);
}

static bool map(uint16_t did, uint64_t iova, uint64_t gpa, uint64_t size)
{
    unsigned level = size == PAGE ? 1 : size == (2ull << 20) ? 2 : 3;
    volatile uint64_t *e = pte(did, iova, level, true);
    if (!e)
        return false;
    *e = gpa | SL_R | SL_W | (level > 1 ? SL_PS : 0);
    return true;
}

static bool unmap(uint16_t did, uint64_t iova)
{
    volatile uint64_t *e = pte(did, iova, 1, false);
    if (!e)
        return false;
    *e = 0;
    return true;
}

static void set_context(uint16_t bdf, uint16_t did)
{
    volatile uint64_t *c = (volatile uint64_t *)phys(vt.ctx) + 2 * (bdf & 0xff);
    unsigned aw = vt.levels == 3 ? 1 : 2;
    c[1] = aw | (uint64_t)did << 8;
    c[0] = (vt.pass_through ? 0 : vt.top[did]) | (vt.pass_through ? 2u << 2 : 0) | 1;
}

static uint16_t domain_of(struct virtio_dev *d) { return (uint16_t)((d->bdf >> 3 & 31) % MAX_DOMAINS + 1); }

/* ---- checks ---- */

static uint64_t user_probe(uint64_t unused)
{
    (void)unused;
    if (!find_unit())
        return (uint64_t)"no DMAR table or no DRHD";
    uint32_t ver = r32(R_VER);
    kprintf("VTD base=0x%lx ver=%u.%u cap=0x%lx ecap=0x%lx drhd_flags=0x%x\n", vt.base, ver >> 4 & 0xf, ver & 0xf,
            vt.cap, vt.ecap, vt.drhd_flags);
    kprintf("VTD sagaw=0x%lx mgaw=%lu nfr=%u fro=0x%x iro=0x%x qi=%lu pt=%lu ir=%lu\n", vt.cap >> 8 & 0x1f,
            (vt.cap >> 16 & 0x3f) + 1, vt.nfr, vt.fro, vt.iro, vt.ecap >> 1 & 1, vt.ecap >> 6 & 1, vt.ecap >> 3 & 1);
    kprintf("VTD scope=%s\n", vt.drhd_flags & 1 ? "all" : "listed"); /* INCLUDE_PCI_ALL, or device scopes */
    if (!(vt.cap >> 8 & 0x6))
        return (uint64_t)"neither 3- nor 4-level tables supported";
    if (r32(R_GSTS) & GCMD_TE)
        return (uint64_t)"translation already on";
    return 0;
}

const char *check_vtd_probe(void) { return (const char *)run_user(user_probe, 0); }

static uint64_t user_on(uint64_t unused)
{
    (void)unused;
    if (!find_unit())
        return (uint64_t)"no VT-d unit";
    const char *v;
    size_t len;
    vt.pages = 0;
    vt.levels = (unsigned)virtio_option_u64("kvmlet.vtd_levels", 4);
    if (vt.levels != 3 && vt.levels != 4)
        return (uint64_t)"kvmlet.vtd_levels must be 3 or 4";
    if (!(vt.cap >> 8 & (vt.levels == 3 ? 2 : 4)))
        return (uint64_t)"the unit does not support that many levels";
    vt.page = PAGE;
    if (virtio_option("kvmlet.vtd_page", &v, &len) && len == 2)
        vt.page = (v[0] == '2') ? 2ull << 20 : (v[0] == '1') ? 1ull << 30 : PAGE;
    vt.pass_through = virtio_option_u64("kvmlet.vtd_pt", 0) != 0;
    vt.offset = vt.pass_through ? 0 : virtio_option_u64("kvmlet.vtd_offset", vt.levels == 3 ? 64ull << 30 : 256ull << 30);
    if (vt.offset % vt.page)
        return (uint64_t)"kvmlet.vtd_offset is not a multiple of the page size";
    vt.root = alloc_page();
    vt.ctx = alloc_page();
    vt.queue = alloc_page();
    vt.qstatus = (volatile uint32_t *)phys(alloc_page());
    if (!vt.qstatus)
        return (uint64_t)"out of table pages";
    *(volatile uint64_t *)phys(vt.root) = vt.ctx | 1;
    uint64_t start, size;
    dma_pool_range(&start, &size);
    uint64_t first = start & ~(vt.page - 1), last = (start + size + vt.page - 1) & ~(vt.page - 1);
    struct virtio_dev *list[VIRTIO_MAX_DEVS];
    unsigned n = virtio_discover(list), devices = 0;
    for (unsigned i = 0; i < n; i++) {
        struct virtio_dev *d = list[i];
        if (d->transport != VIRTIO_TRANSPORT_PCI)
            continue;
        uint16_t did = domain_of(d);
        vt.top[did] = alloc_page();
        for (uint64_t a = first; a < last && !vt.pass_through; a += vt.page)
            if (!map(did, a + vt.offset, a, vt.page))
                return (uint64_t)"out of table pages";
        set_context(d->bdf, did);
        d->dma_offset = vt.offset;
        devices++;
    }
    vt.qi = (vt.ecap & 2) && virtio_option_u64("kvmlet.vtd_qi", 1) != 0;
    w64(R_RTADDR, vt.root);
    uint32_t status = r32(R_GSTS) & GSTS_PERSISTENT;
    w32(R_GCMD, status | GCMD_SRTP);
    if (!wait_bits(R_GSTS, GCMD_SRTP, GCMD_SRTP))
        return (uint64_t)"root table pointer not latched (GSTS.RTPS)";
    if (vt.qi) {
        if (r32(R_GSTS) & GCMD_QIE)
            gcmd(GCMD_QIE, false);
        vt.qtail = 0;
        w64(R_IQT, 0);
        w64(R_IQA, vt.queue); /* QS 0: 256 descriptors */
        if (!gcmd(GCMD_QIE, true))
            return (uint64_t)"queued invalidation did not enable";
    }
    if (!inv_context_global() || !inv_iotlb(1, 0, 0, 0))
        return (uint64_t)"global invalidation did not complete";
    w32(R_FSTS, FSTS_PFO | FSTS_IQE);
    if (!gcmd(GCMD_TE, true))
        return (uint64_t)"translation did not enable (GSTS.TES)";
    vt.on = true;
    kprintf("VTD on devices=%u levels=%u page=0x%lx offset=0x%lx qi=%u pt=%u tables=%u\n", devices, vt.levels,
            vt.page, vt.offset, vt.qi, vt.pass_through, vt.pages);
    return devices ? 0 : (uint64_t)"no virtio-pci devices";
}

const char *check_vtd_on(void) { return (const char *)run_user(user_on, 0); }

static uint64_t user_off(uint64_t unused)
{
    (void)unused;
    if (!find_unit())
        return (uint64_t)"no VT-d unit";
    if (!gcmd(GCMD_TE, false))
        return (uint64_t)"translation did not turn off";
    struct virtio_dev *list[VIRTIO_MAX_DEVS];
    unsigned n = virtio_discover(list);
    for (unsigned i = 0; i < n; i++)
        list[i]->dma_offset = 0;
    vt.on = false;
    return 0;
}

const char *check_vtd_off(void) { return (const char *)run_user(user_off, 0); }

/* One read of sector 0 into buf (a guest-physical page of the DMA pool): the used length and the status. */
static bool blk_read(struct vblk *b, uint8_t *buf, uint32_t *used_len, unsigned *status)
{
    uint64_t cookie;
    if (vblk_submit(0, VIRTIO_BLK_T_IN, 0, buf, 512, true) < 0)
        return false;
    vq_kick(b->q);
    if (!vq_wait(b->q, &cookie, used_len))
        return false;
    *status = vblk_status(0);
    return true;
}

static bool all_bytes(const uint8_t *p, size_t n, uint8_t v)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != v)
            return false;
    return true;
}

/* The first pending fault record (cleared), or false. */
static bool take_fault(uint64_t *addr, uint16_t *sid, unsigned *reason, bool *read)
{
    uint32_t fsts = r32(R_FSTS);
    if (!(fsts & FSTS_PPF))
        return false;
    unsigned index = fsts >> 8 & 0xff;
    for (unsigned k = 0; k < vt.nfr; k++, index = (index + 1) % vt.nfr) {
        unsigned off = vt.fro + 16 * index;
        uint64_t hi = r64(off + 8);
        if (!(hi >> 63))
            continue;
        *addr = r64(off) & ~(PAGE - 1);
        *sid = (uint16_t)hi;
        *reason = (unsigned)(hi >> 32 & 0xff);
        *read = hi >> 62 & 1;
        w32(off + 12, 0x80000000u); /* F is write-1-to-clear */
        return true;
    }
    return false;
}

static void clear_faults(void)
{
    uint64_t a;
    uint16_t s;
    unsigned r;
    bool rd;
    while (take_fault(&a, &s, &r, &rd))
        ;
    w32(R_FSTS, FSTS_PFO | FSTS_IQE);
}

static struct vblk vb;

static const char *open_blk(void)
{
    if (!vt.on)
        return "translation is not on (run vtd-on first)";
    const char *w = vblk_open(false, &vb);
    if (w)
        return w;
    if (vb.d->transport != VIRTIO_TRANSPORT_PCI)
        return "the virtio-blk device is not on PCI (kvmlet.virtio=pci)";
    return NULL;
}

static uint64_t user_fault(uint64_t unused)
{
    (void)unused;
    const char *w = open_blk();
    if (w)
        return (uint64_t)w;
    uint16_t did = domain_of(vb.d);
    uint8_t *buf = dma_alloc(PAGE, PAGE);
    if (!buf)
        return (uint64_t)"out of memory";
    uint64_t iova = (uint64_t)buf + vb.d->dma_offset;
    uint32_t len;
    unsigned status;
    if (!blk_read(&vb, buf, &len, &status) || status != VIRTIO_BLK_S_OK)
        return (uint64_t)"the read through a mapped page failed";
    uint32_t crc0 = crc32_ieee(buf, 512);
    clear_faults();
    uint32_t apic = lapic_read(0x20) >> 24;
    w32(R_FEDATA, VEC_MSI0 + FAULT_VECTOR);
    w32(R_FEADDR, 0xfee00000u | apic << 12);
    w32(R_FEUADDR, 0);
    w32(R_FECTL, 0); /* unmask the fault event */
    if (vt.page != PAGE)
        return (uint64_t)"vtd-fault needs 4 KiB mappings (kvmlet.vtd_page=4k)";
    if (!unmap(did, iova) || !inv_page(did, iova))
        return (uint64_t)"unmap or invalidation failed";
    memset(buf, 0xa5, PAGE);
    if (!blk_read(&vb, buf, &len, &status))
        return (uint64_t)"timeout (the refused request never came back)";
    if (len != 0 || status != 0xff)
        return (uint64_t)"the request through an unmapped page did not fail";
    if (!all_bytes(buf, PAGE, 0xa5))
        return (uint64_t)"the unmapped page was written";
    uint64_t addr;
    uint16_t sid;
    unsigned reason;
    bool read;
    if (!take_fault(&addr, &sid, &reason, &read))
        return (uint64_t)"no fault recorded";
    kprintf("VTD fault sid=%02x:%02x.%u addr=0x%lx reason=%u type=%s\n", sid >> 8, sid >> 3 & 31, sid & 7, addr,
            reason, read ? "read" : "write");
    if (sid != vb.d->bdf || addr != (iova & ~(PAGE - 1)) || reason != 5 || read) {
        ksnprintf(why, sizeof(why), "fault record sid=0x%x addr=0x%lx reason=%u read=%u, not 0x%x 0x%lx 5 0", sid,
                  addr, reason, read, vb.d->bdf, iova & ~(PAGE - 1));
        return (uint64_t)why;
    }
    clear_faults();
    if (!map(did, iova, (uint64_t)buf, PAGE))
        return (uint64_t)"remap failed";
    if (!blk_read(&vb, buf, &len, &status) || status != VIRTIO_BLK_S_OK || crc32_ieee(buf, 512) != crc0)
        return (uint64_t)"the read after remapping failed";
    virtio_reset(vb.d);
    return 0;
}

const char *check_vtd_fault(void)
{
    lapic_software_enable();
    uint32_t before = msi_count[FAULT_VECTOR];
    const char *r = (const char *)run_user(user_fault, 0);
    if (r)
        return r;
    if (!msi_wait(FAULT_VECTOR, before + 1, virtio_timeout_cycles()))
        return "no fault event interrupt";
    kprintf("VTD fault event vector=0x%x\n", VEC_MSI0 + FAULT_VECTOR);
    return NULL;
}

static uint64_t user_stale(uint64_t unused)
{
    (void)unused;
    const char *w = open_blk();
    if (w)
        return (uint64_t)w;
    if (vt.page != PAGE)
        return (uint64_t)"vtd-stale needs 4 KiB mappings (kvmlet.vtd_page=4k)";
    uint16_t did = domain_of(vb.d);
    uint8_t *a = dma_alloc(PAGE, PAGE), *b = dma_alloc(PAGE, PAGE);
    if (!a || !b)
        return (uint64_t)"out of memory";
    uint64_t iova = (uint64_t)a + vb.d->dma_offset;
    uint32_t len;
    unsigned status;
    if (!blk_read(&vb, a, &len, &status) || status != VIRTIO_BLK_S_OK)
        return (uint64_t)"first read failed";
    uint32_t crc0 = crc32_ieee(a, 512);
    memset(a, 0x5a, PAGE);
    memset(b, 0, PAGE);
    if (!map(did, iova, (uint64_t)b, PAGE) || !inv_page(did, iova))
        return (uint64_t)"remap or invalidation failed";
    if (!blk_read(&vb, a, &len, &status) || status != VIRTIO_BLK_S_OK)
        return (uint64_t)"read after the remap failed";
    if (!all_bytes(a, PAGE, 0x5a))
        return (uint64_t)"the old page was written: a stale translation was used";
    if (crc32_ieee(b, 512) != crc0)
        return (uint64_t)"the new page does not hold the data";
    kprintf("VTD stale iova=0x%lx old=0x%lx new=0x%lx ok\n", iova, (uint64_t)a, (uint64_t)b);
    if (!map(did, iova, (uint64_t)a, PAGE) || !inv_page(did, iova))
        return (uint64_t)"restoring the mapping failed";
    virtio_reset(vb.d);
    return 0;
}

const char *check_vtd_stale(void) { return (const char *)run_user(user_stale, 0); }

static uint64_t user_isolation(uint64_t unused)
{
    (void)unused;
    const char *w = open_blk();
    if (w)
        return (uint64_t)w;
    if (vt.page != PAGE)
        return (uint64_t)"vtd-isolation needs 4 KiB mappings (kvmlet.vtd_page=4k)";
    struct virtio_dev *list[VIRTIO_MAX_DEVS], *other = NULL;
    unsigned n = virtio_discover(list);
    for (unsigned i = 0; i < n && !other; i++)
        if (list[i]->transport == VIRTIO_TRANSPORT_PCI && list[i] != vb.d && list[i]->device_id == VIRTIO_ID_RNG)
            other = list[i];
    if (!other)
        return (uint64_t)"needs a second virtio-pci device (virtio-rng)";
    uint16_t mine = domain_of(vb.d), theirs = domain_of(other);
    if (mine == theirs)
        return (uint64_t)"both devices in one domain";
    uint8_t *page = dma_alloc(PAGE, PAGE);
    if (!page)
        return (uint64_t)"out of memory";
    uint64_t iova = (uint64_t)page + vt.offset;
    memset(page, 0x3c, PAGE);
    clear_faults();
    if (!unmap(mine, iova) || !inv_page(mine, iova))   /* the page is now only in the other domain */
        return (uint64_t)"unmap failed";
    uint32_t len;
    unsigned status;
    if (!blk_read(&vb, page, &len, &status))
        return (uint64_t)"timeout (the refused request never came back)";
    if (len != 0 || status != 0xff || !all_bytes(page, PAGE, 0x3c))
        return (uint64_t)"virtio-blk reached a page outside its domain";
    uint64_t addr;
    uint16_t sid;
    unsigned reason;
    bool read;
    if (!take_fault(&addr, &sid, &reason, &read) || sid != vb.d->bdf || addr != iova || reason != 5)
        return (uint64_t)"no fault with virtio-blk's source ID for the other domain's page";
    /* the other device reaches it through its own domain */
    struct virtq *q;
    const char *r = virtio_begin(other, 0);
    if (r || (r = virtio_setup_queue(other, 0, false, &q)))
        return (uint64_t)(r ? r : "rng queue");
    virtio_driver_ok(other);
    struct vbuf buf = { (uint64_t)page, 64, true };
    uint64_t cookie;
    if (vq_add(q, &buf, 1, 1) < 0)
        return (uint64_t)"rng queue full";
    vq_kick(q);
    if (!vq_wait(q, &cookie, &len) || len == 0)
        return (uint64_t)"virtio-rng could not write the page through its own domain";
    bool changed = !all_bytes(page, 64, 0x3c);
    virtio_reset(other);
    if (!changed)
        return (uint64_t)"virtio-rng's data did not arrive";
    kprintf("VTD isolation domains=%u,%u blk=%02x.%u faulted rng=%02x.%u wrote len=%u\n", mine, theirs,
            vb.d->bdf >> 3 & 31, vb.d->bdf & 7, other->bdf >> 3 & 31, other->bdf & 7, len);
    if (!map(mine, iova, (uint64_t)page, PAGE) || !inv_page(mine, iova))
        return (uint64_t)"restoring the mapping failed";
    virtio_reset(vb.d);
    return 0;
}

const char *check_vtd_isolation(void) { return (const char *)run_user(user_isolation, 0); }
