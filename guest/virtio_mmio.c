/*
 * virtio over MMIO, version 2 (virtio 1.2, 4.2), and split virtqueues (2.7).
 *
 * Discovery: every `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` entry of
 * the command line (the form Linux accepts, and what QEMU's microvm appends
 * when ACPI is off), and as a fallback `kvmlet.virtio_scan=<base>,<count>,
 * <stride>[,<irq_base>]`, which probes count slots (QEMU microvm:
 * 0xfeb00000,32,0x200,5). Each transport is printed once, on first use.
 *
 * Memory for rings and buffers comes from a static, page-aligned pool in bss
 * (identity mapped, so guest-virtual == guest-physical), reset by each check.
 */
#include "pci.h" /* virtio over PCI: the transport calls below go to virtio_pci.c for PCI devices */

#define MIB (1024ULL * 1024)
#define DMA_POOL_SIZE (1 * MIB)
#define DEFAULT_TIMEOUT_S 10
#define TSC_PER_S_MAX 4000000000ULL /* timeouts assume a TSC of up to 4 GHz: never shorter than asked */

static uint8_t dma_pool[DMA_POOL_SIZE] __attribute__((aligned(4096)));
static size_t dma_used;

static struct virtio_dev devs[VIRTIO_MAX_DEVS];
static struct virtio_dev *dev_list[VIRTIO_MAX_DEVS];
static unsigned ndevs;
static bool discovered;

/* ---- command line ---- */

/* Finds `name=value` in the command line; the first occurrence wins. */
bool virtio_option(const char *name, const char **value, size_t *len)
{
    const char *p = boot.cmdline, *tok;
    size_t toklen;
    while ((tok = cmdline_token(&p, &toklen)) != NULL) {
        if (option_is(tok, toklen, name, value, len))
            return true;
    }
    return false;
}

uint64_t virtio_option_u64(const char *name, uint64_t def)
{
    const char *v;
    size_t len;
    uint64_t n;
    if (!virtio_option(name, &v, &len))
        return def;
    if (!parse_u64(v, len, &n)) {
        kprintf("OPTION %s: not a number, ignored\n", name);
        return def;
    }
    return n;
}

uint64_t virtio_timeout_cycles(void)
{
    uint64_t s = opt.timeout_set && opt.timeout_s ? opt.timeout_s : DEFAULT_TIMEOUT_S;
    return s * TSC_PER_S_MAX;
}

/* A number at s (decimal, or hex with 0x) with an optional K/M/G suffix; advances *s. */
static bool take_number(const char **s, const char *end, bool suffix, uint64_t *out)
{
    const char *p = *s;
    unsigned base = 10;
    uint64_t v = 0;
    if (end - p > 2 && p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
        base = 16;
        p += 2;
    }
    const char *digits = p;
    for (; p < end; p++) {
        unsigned d;
        if (*p >= '0' && *p <= '9')
            d = *p - '0';
        else if (base == 16 && *p >= 'a' && *p <= 'f')
            d = *p - 'a' + 10;
        else if (base == 16 && *p >= 'A' && *p <= 'F')
            d = *p - 'A' + 10;
        else
            break;
        v = v * base + d;
    }
    if (p == digits)
        return false;
    if (suffix && p < end) {
        switch (*p) {
        case 'k': case 'K': v <<= 10; p++; break;
        case 'm': case 'M': v <<= 20; p++; break;
        case 'g': case 'G': v <<= 30; p++; break;
        }
    }
    *s = p;
    *out = v;
    return true;
}

const char *virtio_name(uint32_t id)
{
    switch (id) {
    case VIRTIO_ID_NET: return "net";
    case VIRTIO_ID_BLK: return "blk";
    case VIRTIO_ID_RNG: return "rng";
    case VIRTIO_ID_VSOCK: return "vsock";
    default: return "other";
    }
}

/* Reads the identification registers; records the transport if one is there. */
static void probe(uint64_t base, uint64_t size, uint32_t irq, bool quiet_if_absent)
{
    uint32_t magic = mmio_read32(base + VIRTIO_MMIO_MAGIC);
    if (magic != VIRTIO_MMIO_MAGIC_VALUE) {
        if (!quiet_if_absent)
            kprintf("VIRTIO dev@0x%lx bad magic 0x%x\n", base, magic);
        return;
    }
    uint32_t version = mmio_read32(base + VIRTIO_MMIO_VERSION);
    uint32_t id = mmio_read32(base + VIRTIO_MMIO_DEVICE_ID);
    if (id == 0) /* a placeholder slot: ignored without an error (4.2.3.1) */
        return;
    if (ndevs >= VIRTIO_MAX_DEVS) {
        kprintf("VIRTIO dev@0x%lx ignored: more than %u transports\n", base, VIRTIO_MAX_DEVS);
        return;
    }
    struct virtio_dev *d = &devs[ndevs];
    d->base = base;
    d->size = size;
    d->irq = irq;
    d->version = version;
    d->device_id = id;
    dev_list[ndevs++] = d;
    kprintf("VIRTIO dev@0x%lx id=%u irq=%u\n", base, id, irq);
    if (version == 1)
        kprintf("VIRTIO dev@0x%lx legacy transport (version 1)\n", base);
    else if (version != 2)
        kprintf("VIRTIO dev@0x%lx unknown version %u\n", base, version);
}

static void parse_device_entries(void)
{
    static const char key[] = "virtio_mmio.device=";
    const size_t keylen = sizeof(key) - 1;
    const char *p = boot.cmdline, *tok;
    size_t toklen;
    while ((tok = cmdline_token(&p, &toklen)) != NULL) {
        if (toklen <= keylen || memcmp(tok, key, keylen) != 0)
            continue;
        const char *s = tok + keylen, *end = p;
        uint64_t size, base, irq;
        if (!take_number(&s, end, true, &size) || s >= end || *s++ != '@' || !take_number(&s, end, true, &base) ||
            s >= end || *s++ != ':' || !take_number(&s, end, false, &irq) || (s < end && *s != ':')) {
            kprintf("VIRTIO cannot parse ");
            for (const char *c = tok; c < end; c++)
                serial_putc(*c);
            kprintf("\n");
            continue;
        }
        if (size < VIRTIO_MMIO_CONFIG) {
            kprintf("VIRTIO dev@0x%lx size 0x%lx too small\n", base, size);
            continue;
        }
        probe(base, size, (uint32_t)irq, false);
    }
}

static void scan(void)
{
    const char *v, *end;
    size_t len;
    uint64_t f[4] = { 0, 0, 0x200, 0 };
    if (!virtio_option("kvmlet.virtio_scan", &v, &len))
        return;
    end = v + len;
    unsigned n = 0;
    while (n < 4 && take_number(&v, end, true, &f[n])) {
        n++;
        if (v < end && *v == ',')
            v++;
        else
            break;
    }
    if (n < 2 || v != end) {
        kprintf("OPTION kvmlet.virtio_scan: expected <base>,<count>[,<stride>[,<irq_base>]], ignored\n");
        return;
    }
    bool has_irq = n >= 4;
    kprintf("VIRTIO scan base=0x%lx count=%lu stride=0x%lx\n", f[0], f[1], f[2]);
    for (uint64_t i = 0; i < f[1] && i < 256; i++) {
        uint64_t base = f[0] + i * f[2];
        bool known = false;
        for (unsigned k = 0; k < ndevs; k++)
            known |= devs[k].base == base;
        if (!known)
            probe(base, f[2], has_irq ? (uint32_t)(f[3] + i) : 0, true);
    }
}

unsigned virtio_discover(struct virtio_dev **out)
{
    if (!discovered) {
        discovered = true;
        parse_device_entries();
        scan();
        const char *which;
        size_t wlen;
        bool want_mmio = true, want_pci = true;
        if (virtio_option("kvmlet.virtio", &which, &wlen)) { /* kvmlet.virtio=mmio|pci: one transport only */
            want_mmio = wlen == 4 && memcmp(which, "mmio", 4) == 0;
            want_pci = wlen == 3 && memcmp(which, "pci", 3) == 0;
        }
        if (!want_mmio)
            ndevs = 0;
        if (want_pci) {
            unsigned n = vpci_discover(&devs[ndevs], VIRTIO_MAX_DEVS - ndevs);
            for (unsigned i = ndevs; i < ndevs + n; i++)
                dev_list[i] = &devs[i];
            ndevs += n;
        }
        if (!ndevs)
            kprintf("VIRTIO no transports found\n");
    }
    if (out)
        for (unsigned i = 0; i < ndevs; i++)
            out[i] = dev_list[i];
    return ndevs;
}

/* The first modern transport with this device ID; else NULL and the reason. */
struct virtio_dev *virtio_find(uint32_t device_id, const char **why_not)
{
    bool legacy = false;
    virtio_discover(NULL);
    for (unsigned i = 0; i < ndevs; i++) {
        if (devs[i].device_id != device_id)
            continue;
        if (devs[i].version == 2)
            return &devs[i];
        legacy |= devs[i].version == 1;
    }
    *why_not = legacy ? "legacy transport" : NULL;
    return NULL;
}

/* ---- memory pool ---- */

void dma_reset(void) { dma_used = 0; }

void dma_pool_range(uint64_t *start, uint64_t *size)
{
    *start = (uint64_t)dma_pool;
    *size = DMA_POOL_SIZE;
}

void *dma_alloc(size_t size, size_t align)
{
    size_t start = (dma_used + align - 1) & ~(align - 1);
    if (start + size > DMA_POOL_SIZE || start + size < start)
        return NULL;
    dma_used = start + size;
    memset(dma_pool + start, 0, size);
    return dma_pool + start;
}

/* ---- device initialization (3.1.1) ---- */

static inline uint32_t reg_read(struct virtio_dev *d, unsigned off) { return mmio_read32(d->base + off); }
static inline void reg_write(struct virtio_dev *d, unsigned off, uint32_t v) { mmio_write32(d->base + off, v); }

uint32_t virtio_status(struct virtio_dev *d)
{
    return d->transport == VIRTIO_TRANSPORT_PCI ? vpci_status(d) : reg_read(d, VIRTIO_MMIO_STATUS);
}

void virtio_reset(struct virtio_dev *d)
{
    if (d->transport == VIRTIO_TRANSPORT_PCI)
        vpci_reset(d);
    else
        reg_write(d, VIRTIO_MMIO_STATUS, 0);
    for (int i = 0; i < 1000 && d->transport != VIRTIO_TRANSPORT_PCI && reg_read(d, VIRTIO_MMIO_STATUS) != 0; i++)
        cpu_pause();
    for (unsigned i = 0; i < VIRTIO_MAX_QUEUES; i++)
        d->vq[i] = NULL;
}

void virtio_fail(struct virtio_dev *d)
{
    if (d->transport == VIRTIO_TRANSPORT_PCI)
        vpci_set_status(d, vpci_status(d) | VIRTIO_STATUS_FAILED);
    else
        reg_write(d, VIRTIO_MMIO_STATUS, reg_read(d, VIRTIO_MMIO_STATUS) | VIRTIO_STATUS_FAILED);
}

const char *virtio_begin(struct virtio_dev *d, uint64_t wanted)
{
    static char reason[80];
    if (d->transport == VIRTIO_TRANSPORT_PCI) {
        const char *why = vpci_begin(d, wanted);
        if (why)
            virtio_fail(d);
        return why;
    }
    if (d->version != 2)
        return "legacy transport";
    virtio_reset(d);
    if (reg_read(d, VIRTIO_MMIO_STATUS) != 0)
        return "device does not reset (status stays non-zero)";
    reg_write(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
    reg_write(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);

    reg_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    uint64_t lo = reg_read(d, VIRTIO_MMIO_DEVICE_FEATURES);
    reg_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    uint64_t hi = reg_read(d, VIRTIO_MMIO_DEVICE_FEATURES);
    d->offered = hi << 32 | lo;
    if (!(d->offered & VIRTIO_BIT(VIRTIO_F_VERSION_1))) {
        virtio_fail(d);
        return "device does not offer VIRTIO_F_VERSION_1";
    }
    /* VERSION_1 is required; ACCESS_PLATFORM and ORDER_PLATFORM SHOULD be accepted (6.1): no IOMMU here. */
    uint64_t accept = d->offered & (wanted | VIRTIO_BIT(VIRTIO_F_VERSION_1) | VIRTIO_BIT(VIRTIO_F_ACCESS_PLATFORM) |
                                    VIRTIO_BIT(VIRTIO_F_ORDER_PLATFORM));
    reg_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    reg_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)accept);
    reg_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    reg_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(accept >> 32));
    reg_write(d, VIRTIO_MMIO_STATUS,
              VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    uint32_t status = reg_read(d, VIRTIO_MMIO_STATUS);
    d->features = accept;
    kprintf("VIRTIO %s@0x%lx features offered=0x%lx accepted=0x%lx\n", virtio_name(d->device_id), d->base,
            d->offered, accept);
    if (!(status & VIRTIO_STATUS_FEATURES_OK)) {
        virtio_fail(d);
        ksnprintf(reason, sizeof(reason), "FEATURES_OK not kept (status 0x%x)", status);
        return reason;
    }
    return NULL;
}

const char *virtio_setup_queue(struct virtio_dev *d, unsigned index, bool interrupts, struct virtq **out)
{
    static char reason[64];
    bool pci = d->transport == VIRTIO_TRANSPORT_PCI;
    if (!pci) {
        reg_write(d, VIRTIO_MMIO_QUEUE_SEL, index);
        if (reg_read(d, VIRTIO_MMIO_QUEUE_READY) != 0) {
            ksnprintf(reason, sizeof(reason), "queue %u already ready after reset", index);
            return reason;
        }
    }
    uint32_t max = pci ? vpci_queue_max(d, index) : reg_read(d, VIRTIO_MMIO_QUEUE_SIZE_MAX);
    if (max == 0) {
        ksnprintf(reason, sizeof(reason), "queue %u not available (QueueSizeMax 0)", index);
        return reason;
    }
    uint16_t size = VQ_MAX_SIZE;
    while (size > max)
        size >>= 1;

    struct virtq *q = dma_alloc(sizeof(*q), 64);
    uint8_t *mem = dma_alloc(VQ_PAGES * 4096, 4096);
    if (!q || !mem)
        return "out of queue memory";
    q->dev = d;
    q->index = index;
    q->size = size;
    q->desc = (volatile struct virtq_desc *)mem;
    q->avail = (volatile struct virtq_avail *)(mem + 16 * size);
    q->used = (volatile struct virtq_used *)(mem + 4096);
    for (uint16_t i = 0; i < size; i++)
        q->desc[i].next = (uint16_t)(i + 1);
    q->free_head = 0;
    q->num_free = size;
    q->avail->flags = interrupts ? 0 : VIRTQ_AVAIL_F_NO_INTERRUPT;
    if (pci) {
        const char *why = vpci_program_queue(d, q, interrupts, &size);
        if (why)
            return why;
        if (index < VIRTIO_MAX_QUEUES)
            d->vq[index] = q;
        *out = q;
        return NULL;
    }
    q->notify_addr = d->base + VIRTIO_MMIO_QUEUE_NOTIFY;

    uint64_t desc = (uint64_t)q->desc, avail = (uint64_t)q->avail, used = (uint64_t)q->used;
    reg_write(d, VIRTIO_MMIO_QUEUE_SIZE, size);
    reg_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)desc);
    reg_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
    reg_write(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)avail);
    reg_write(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (uint32_t)(avail >> 32));
    reg_write(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)used);
    reg_write(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (uint32_t)(used >> 32));
    reg_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
    if (index < VIRTIO_MAX_QUEUES)
        d->vq[index] = q;
    *out = q;
    return NULL;
}

void virtio_driver_ok(struct virtio_dev *d)
{
    if (d->transport == VIRTIO_TRANSPORT_PCI) {
        vpci_driver_ok(d);
        return;
    }
    reg_write(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
                                         VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK);
}

/* ---- configuration space: natural-width accesses (4.2.2.2) ---- */

uint8_t virtio_cfg8(struct virtio_dev *d, unsigned off)
{
    if (d->transport == VIRTIO_TRANSPORT_PCI)
        return (uint8_t)vpci_cfg(d, off, 1);
    return *(volatile uint8_t *)phys(d->base + VIRTIO_MMIO_CONFIG + off);
}

uint16_t virtio_cfg16(struct virtio_dev *d, unsigned off)
{
    if (d->transport == VIRTIO_TRANSPORT_PCI)
        return (uint16_t)vpci_cfg(d, off, 2);
    return *(volatile uint16_t *)phys(d->base + VIRTIO_MMIO_CONFIG + off);
}

uint32_t virtio_cfg32(struct virtio_dev *d, unsigned off)
{
    return d->transport == VIRTIO_TRANSPORT_PCI ? vpci_cfg(d, off, 4) : reg_read(d, VIRTIO_MMIO_CONFIG + off);
}

uint64_t virtio_cfg64(struct virtio_dev *d, unsigned off)
{
    uint32_t gen, lo, hi;
    int tries = 0;
    bool pci = d->transport == VIRTIO_TRANSPORT_PCI;
    do {
        gen = pci ? vpci_generation(d) : reg_read(d, VIRTIO_MMIO_CONFIG_GENERATION);
        lo = virtio_cfg32(d, off);
        hi = virtio_cfg32(d, off + 4);
    } while ((pci ? vpci_generation(d) : reg_read(d, VIRTIO_MMIO_CONFIG_GENERATION)) != gen && ++tries < 16);
    return (uint64_t)hi << 32 | lo;
}

/* ---- split virtqueue (2.7.13: supplying buffers, 2.7.14: used buffers) ---- */

int vq_add(struct virtq *q, const struct vbuf *bufs, unsigned n, uint64_t cookie)
{
    if (!n || n > q->num_free)
        return -1;
    uint16_t head = q->free_head, i = head;
    for (unsigned k = 0; k < n; k++) {
        volatile struct virtq_desc *d = &q->desc[i];
        d->addr = bufs[k].addr + q->dev->dma_offset;
        d->len = bufs[k].len;
        /* Free descriptors are linked through next, so a chain of free ones is already linked. */
        d->flags = (bufs[k].device_writes ? VIRTQ_DESC_F_WRITE : 0) | (k + 1 < n ? VIRTQ_DESC_F_NEXT : 0);
        i = d->next;
    }
    q->free_head = i;
    q->num_free -= n;
    q->chain_len[head] = n;
    q->cookie[head] = cookie;
    q->avail->ring[q->avail_idx & (q->size - 1)] = head;
    q->avail_idx++;
    return head;
}

void vq_kick(struct virtq *q)
{
    barrier(); /* ring entries before idx: x86 keeps stores in order */
    q->avail->idx = q->avail_idx;
    mfence(); /* idx visible before used->flags is read */
    if (!(q->used->flags & VIRTQ_USED_F_NO_NOTIFY)) {
        if (q->dev->transport == VIRTIO_TRANSPORT_PCI)
            *(volatile uint16_t *)phys(q->notify_addr) = q->index;
        else
            mmio_write32(q->notify_addr, q->index);
        q->notifies++;
    }
}

bool vq_pop(struct virtq *q, uint64_t *cookie, uint32_t *len)
{
    if (q->used->idx == q->last_used)
        return false;
    barrier(); /* x86 does not reorder loads: idx before the element */
    volatile struct virtq_used_elem *e = &q->used->ring[q->last_used & (q->size - 1)];
    uint32_t id = e->id, n;
    uint32_t used_len = e->len;
    q->last_used++;
    if (id >= q->size || !(n = q->chain_len[id])) {
        kprintf("VIRTIO queue %u: device returned bad descriptor id %u\n", q->index, id);
        return false;
    }
    uint16_t tail = (uint16_t)id;
    for (uint32_t k = 1; k < n; k++)
        tail = q->desc[tail].next;
    q->desc[tail].next = q->free_head;
    q->free_head = (uint16_t)id;
    q->num_free += n;
    q->chain_len[id] = 0;
    if (cookie)
        *cookie = q->cookie[id];
    if (len)
        *len = used_len;
    return true;
}

bool vq_wait(struct virtq *q, uint64_t *cookie, uint32_t *len)
{
    uint64_t start = rdtsc_now(), limit = virtio_timeout_cycles();
    while (!vq_has_used(q)) {
        if (rdtsc_now() - start > limit)
            return false;
        cpu_pause();
    }
    return vq_pop(q, cookie, len);
}

/* ---- helpers ---- */

uint32_t crc32_ieee(const void *data, size_t len)
{
    const uint8_t *p = data;
    uint32_t crc = 0xffffffffu;
    while (len--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xedb88320u & -(crc & 1));
    }
    return ~crc;
}

uint64_t xorshift64(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *state = x;
}

/* Lists the transports; PASS if at least one modern device is there and none is legacy. */
static uint64_t user_probe(uint64_t unused)
{
    (void)unused;
    struct virtio_dev *list[VIRTIO_MAX_DEVS];
    unsigned n = virtio_discover(list), modern = 0, legacy = 0;
    for (unsigned i = 0; i < n; i++) {
        modern += list[i]->version == 2;
        legacy += list[i]->version == 1;
    }
    if (legacy)
        return (uint64_t)"legacy transport";
    if (!modern)
        return (uint64_t)"no virtio-mmio devices";
    return 0;
}

const char *check_virtio_probe(void) { return (const char *)run_user(user_probe, 0); }
