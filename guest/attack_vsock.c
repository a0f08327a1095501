/*
 * A hostile driver against virtio-vsock (issue 13, defects 1-3). Written from the virtio 1.2 specification,
 * 5.10 (socket device): queues 0 rx, 1 tx, 2 event; every packet is struct virtio_vsock_hdr (44 bytes,
 * little-endian) and its payload, here in one descriptor. Everything runs at CPL3.
 *
 * The host (CID 2) is expected to accept stream connections on port kvmlet.vsock_port (default 1234) and
 * to echo back every byte it receives there.
 *
 * attack-vsock-reuse  kvmlet.rounds (default 4096) RW packets of 64 bytes on one connection. The driver
 *                     polls the transmit queue's used index and, the moment a buffer shows as used (it is
 *                     the driver's again, 2.7.13/2.7.14), rewrites it: the header's source port becomes a
 *                     port with no connection and the payload becomes 'X's. A device that still reads the
 *                     buffer then echoes 'X's or answers the bogus port with RST. PASS if every round
 *                     came back intact.
 * attack-vsock-conns  opens up to kvmlet.vsock_conns (default 256) connections one after the other until
 *                     the device refuses some (RST: its connection limit, or the host out of file
 *                     descriptors); then an early and a late connection still carry data, and after half
 *                     of them are closed a new one is accepted. PASS if some were refused and the device
 *                     kept serving (no DEVICE_NEEDS_RESET).
 * attack-vsock-flood  no receive buffer posted; kvmlet.packets (default 200000) packets for connections
 *                     that do not exist (each one worth a RST). Then `ATTACK vsock flood done ... flag=<a>`:
 *                     the driver waits (at most a fifth of the virtio timeout) for the host to write a
 *                     non-zero 32-bit value at guest-physical <a> (a test measures the VMM meanwhile), posts
 *                     receive buffers, counts the packets that arrive, and checks that a connection still
 *                     carries data. PASS if the device still works.
 */
#include "virtio.h"

#define OP_REQUEST        1
#define OP_RESPONSE       2
#define OP_RST            3
#define OP_SHUTDOWN       4
#define OP_RW             5
#define OP_CREDIT_UPDATE  6
#define OP_CREDIT_REQUEST 7
#define TYPE_STREAM       1
#define SHUTDOWN_BOTH     3
#define HOST_CID          2

#define RX_BUFS     64
#define RX_SIZE     1024
#define TX_SLOT     128            /* bytes per transmit slot: header and up to 84 payload bytes */
#define EVENT_BUFS  4
#define BUF_ALLOC   (64 * 1024)    /* receive space advertised: data is consumed at once */
#define MAX_CONNS   512
#define ROUND_BYTES 64            /* payload of each attack-vsock-reuse packet */
#define REUSE_BATCH 128           /* packets made available with one notification */
#define FIRST_PORT  20000          /* local ports of the connections */
#define FLOOD_PORT  40000          /* source ports of the flood: 40000-59999 */
#define NOBODY_PORT 9              /* host port with no connection */

struct vhdr {
    uint64_t src_cid;
    uint64_t dst_cid;
    uint32_t src_port;
    uint32_t dst_port;
    uint32_t len;
    uint16_t type;
    uint16_t op;
    uint32_t flags;
    uint32_t buf_alloc;
    uint32_t fwd_cnt;
} __attribute__((packed));

_Static_assert(sizeof(struct vhdr) == 44, "virtio_vsock_hdr is 44 bytes");

enum { C_FREE, C_CONNECTING, C_OPEN, C_REFUSED, C_CLOSED };

struct vconn {
    uint32_t local;
    uint8_t state;
    uint32_t fwd_cnt; /* bytes received (and consumed) */
};

static struct {
    struct virtio_dev *d;
    struct virtq *rx, *tx, *ev;
    uint8_t *rxbuf, *txbuf;
    uint32_t *events;
    uint64_t cid;
    uint32_t port;
    struct vconn c[MAX_CONNS];
    unsigned nconn;
    struct vconn *data_conn; /* whose RW payload is kept in data[] */
    uint8_t data[REUSE_BATCH * ROUND_BYTES];
    unsigned data_len;
    uint32_t bogus_port;     /* RST to this port: the device used a rewritten header */
    unsigned bogus_rsts;      /* RSTs to that port */
    bool needs_reset;
    uint64_t received, stray; /* packets received; those for no connection of ours */
    char reason[128];
} av;

static volatile uint32_t flood_flag; /* set by the host after "flood done" */

static const char *fail(const char *fmt, uint64_t a, uint64_t b)
{
    ksnprintf(av.reason, sizeof(av.reason), fmt, a, b);
    return av.reason;
}

static void post_rx(unsigned i)
{
    struct vbuf b = { (uint64_t)(av.rxbuf + (size_t)i * RX_SIZE), RX_SIZE, true };
    vq_add(av.rx, &b, 1, i);
}

static const char *open_vsock(bool rx_buffers)
{
    const char *why;
    dma_reset();
    memset(&av, 0, sizeof(av));
    av.d = virtio_find(VIRTIO_ID_VSOCK, &why);
    if (!av.d)
        return why ? why : "no virtio-vsock device";
    av.port = (uint32_t)virtio_option_u64("kvmlet.vsock_port", 1234);
    if ((why = virtio_begin(av.d, VIRTIO_BIT(0) /* VIRTIO_VSOCK_F_STREAM */)))
        return why;
    av.cid = virtio_cfg64(av.d, 0) & 0xffffffffULL;
    if ((why = virtio_setup_queue(av.d, 0, false, &av.rx)) || (why = virtio_setup_queue(av.d, 1, false, &av.tx)) ||
        (why = virtio_setup_queue(av.d, 2, false, &av.ev)))
        return why;
    av.rxbuf = dma_alloc((size_t)RX_BUFS * RX_SIZE, 4096);
    av.txbuf = dma_alloc((size_t)VQ_MAX_SIZE * TX_SLOT, 4096);
    av.events = dma_alloc(EVENT_BUFS * sizeof(uint32_t), 64);
    if (!av.rxbuf || !av.txbuf || !av.events)
        return "out of memory";
    for (unsigned i = 0; i < EVENT_BUFS; i++) {
        struct vbuf b = { (uint64_t)&av.events[i], 4, true };
        vq_add(av.ev, &b, 1, i);
    }
    if (rx_buffers)
        for (unsigned i = 0; i < RX_BUFS && i < av.rx->size; i++)
            post_rx(i);
    virtio_driver_ok(av.d);
    vq_kick(av.ev);
    if (rx_buffers)
        vq_kick(av.rx);
    if (av.cid <= HOST_CID || av.cid == 0xffffffffULL)
        return fail("reserved guest CID %lu", av.cid, 0);
    return NULL;
}

static void close_vsock(const char *why)
{
    if (why)
        virtio_fail(av.d);
    virtio_reset(av.d);
}

static void fill_header(struct vhdr *h, uint32_t src_port, uint32_t dst_port, uint16_t op, uint32_t flags,
                        uint32_t len, uint32_t fwd_cnt)
{
    h->src_cid = av.cid;
    h->dst_cid = HOST_CID;
    h->src_port = src_port;
    h->dst_port = dst_port;
    h->len = len;
    h->type = TYPE_STREAM;
    h->op = op;
    h->flags = flags;
    h->buf_alloc = BUF_ALLOC;
    h->fwd_cnt = fwd_cnt;
}

/* One packet from slot 0, waiting until the device has used it. */
static bool send_packet(struct vconn *c, uint16_t op, uint32_t flags, const void *payload, uint32_t len)
{
    struct vhdr *h = (void *)av.txbuf;
    fill_header(h, c->local, av.port, op, flags, len, c->fwd_cnt);
    if (len)
        memcpy(h + 1, payload, len);
    struct vbuf b = { (uint64_t)av.txbuf, (uint32_t)sizeof(*h) + len, false };
    if (vq_add(av.tx, &b, 1, 0) < 0)
        return false;
    vq_kick(av.tx);
    return vq_wait(av.tx, NULL, NULL);
}

static struct vconn *find_conn(uint32_t local)
{
    for (unsigned i = 0; i < av.nconn; i++)
        if (av.c[i].local == local && av.c[i].state != C_FREE)
            return &av.c[i];
    return NULL;
}

static void handle_packet(const struct vhdr *h, uint32_t used_len)
{
    av.received++;
    if (used_len < sizeof(*h) || h->dst_cid != av.cid || h->src_cid != HOST_CID)
        return;
    struct vconn *c = h->src_port == av.port ? find_conn(h->dst_port) : NULL;
    if (!c) {
        av.stray++;
        if (h->op == OP_RST && av.bogus_port && h->dst_port == av.bogus_port)
            av.bogus_rsts++;
        return;
    }
    switch (h->op) {
    case OP_RESPONSE:
        if (c->state == C_CONNECTING)
            c->state = C_OPEN;
        break;
    case OP_RST:
        c->state = c->state == C_CONNECTING ? C_REFUSED : C_CLOSED;
        break;
    case OP_RW: {
        uint32_t len = h->len;
        if (len > used_len - sizeof(*h))
            len = used_len - sizeof(*h);
        const uint8_t *p = (const uint8_t *)(h + 1);
        if (c == av.data_conn)
            for (uint32_t i = 0; i < len && av.data_len < sizeof(av.data); i++)
                av.data[av.data_len++] = p[i];
        c->fwd_cnt += len; /* consumed at once */
        break;
    }
    case OP_CREDIT_REQUEST:
        send_packet(c, OP_CREDIT_UPDATE, 0, NULL, 0);
        break;
    default: /* SHUTDOWN, CREDIT_UPDATE: nothing to do here */
        break;
    }
}

static unsigned poll_once(void)
{
    uint64_t i;
    uint32_t len;
    unsigned n = 0;
    while (vq_pop(av.rx, &i, &len)) {
        handle_packet((const void *)(av.rxbuf + i * RX_SIZE), len);
        post_rx((unsigned)i);
        n++;
    }
    if (n)
        vq_kick(av.rx);
    while (vq_pop(av.ev, &i, &len)) {
        struct vbuf b = { (uint64_t)&av.events[i], 4, true };
        vq_add(av.ev, &b, 1, i);
        vq_kick(av.ev);
        n++;
    }
    return n;
}

/* Polls until cond(arg), the timeout, or the device asks for a reset. */
static bool wait_until(bool (*cond)(uint64_t), uint64_t arg, uint64_t cycles)
{
    uint64_t start = rdtsc_now();
    unsigned idle = 0;
    while (!cond(arg)) {
        if (poll_once()) {
            idle = 0;
            continue;
        }
        if (rdtsc_now() - start > cycles)
            return false;
        if (++idle % 65536 == 0 && virtio_status(av.d) & VIRTIO_STATUS_NEEDS_RESET) {
            av.needs_reset = true;
            return false;
        }
        cpu_pause();
    }
    return true;
}

static bool not_connecting(uint64_t c) { return ((struct vconn *)c)->state != C_CONNECTING; }
static bool has_data(uint64_t n) { return av.data_len >= n; }
static bool never(uint64_t unused) { (void)unused; return false; }

/* A new connection to the host port: C_OPEN, C_REFUSED, or C_CONNECTING on a timeout. */
static struct vconn *connect_new(void)
{
    if (av.nconn >= MAX_CONNS)
        return NULL;
    struct vconn *c = &av.c[av.nconn];
    c->local = FIRST_PORT + av.nconn++;
    c->state = C_CONNECTING;
    c->fwd_cnt = 0;
    if (!send_packet(c, OP_REQUEST, 0, NULL, 0))
        return c;
    wait_until(not_connecting, (uint64_t)c, virtio_timeout_cycles());
    return c;
}

/* Sends `msg` on c and expects the host to echo it back. */
static const char *echo_check(struct vconn *c, const char *msg)
{
    uint32_t len = (uint32_t)strlen(msg);
    av.data_conn = c;
    av.data_len = 0;
    if (!send_packet(c, OP_RW, 0, msg, len))
        return "timeout (transmit)";
    if (!wait_until(has_data, len, virtio_timeout_cycles()))
        return av.needs_reset ? "device needs reset" : c->state != C_OPEN ? "connection reset" : "timeout (echo)";
    if (memcmp(av.data, msg, len) != 0)
        return "echo differs";
    av.data_conn = NULL;
    return NULL;
}

static void disconnect(struct vconn *c)
{
    if (c->state == C_OPEN)
        send_packet(c, OP_RST, 0, NULL, 0);
    c->state = C_CLOSED;
}

/* ---- attack-vsock-reuse ---- */

static uint8_t round_byte(uint32_t round, uint32_t i) { return (uint8_t)('a' + (round * 7 + i) % 26); }

/* Waits for `expected` echoed bytes, a bogus RST counting for one packet's worth. */
static bool echoed(uint64_t expected) { return av.data_len + av.bogus_rsts * ROUND_BYTES >= expected; }

static uint64_t user_reuse(uint64_t unused)
{
    (void)unused;
    const char *why = open_vsock(true);
    if (why)
        goto out;
    uint64_t packets = virtio_option_u64("kvmlet.rounds", 4096);
    struct vconn *c = connect_new();
    if (!c || c->state != C_OPEN) {
        why = av.needs_reset ? "device needs reset" : c && c->state == C_REFUSED ? "connection refused (RST)"
                                                                                : "timeout (connect)";
        goto out;
    }
    av.data_conn = c;
    av.bogus_port = c->local ^ 0x4000;
    unsigned payload_hits = 0, header_hits = 0, lost = 0, batch_max = REUSE_BATCH;
    if (batch_max > av.tx->size)
        batch_max = av.tx->size;
    struct virtq *tx = av.tx;
    for (uint32_t r = 0; r < packets;) {
        /* A batch of packets, one buffer (slot) each, made available with one notification. */
        unsigned batch = 0;
        for (; batch < batch_max && r + batch < packets; batch++) {
            struct vhdr *h = (void *)(av.txbuf + (size_t)batch * TX_SLOT);
            fill_header(h, c->local, av.port, OP_RW, 0, ROUND_BYTES, c->fwd_cnt);
            uint8_t *p = (uint8_t *)(h + 1);
            for (uint32_t i = 0; i < ROUND_BYTES; i++)
                p[i] = round_byte(r + batch, i);
            struct vbuf b = { (uint64_t)h, (uint32_t)sizeof(*h) + ROUND_BYTES, false };
            if (vq_add(tx, &b, 1, batch) < 0) {
                why = "transmit queue full";
                goto out;
            }
        }
        av.data_len = 0;
        av.bogus_rsts = 0;
        vq_kick(tx);
        uint64_t start = rdtsc_now(), limit = virtio_timeout_cycles();
        for (unsigned k = 0; k < batch; k++) {
            while (tx->used->idx == tx->last_used) {
                if (rdtsc_now() - start > limit) {
                    why = fail("timeout (transmit, packet %lu)", r + k, 0);
                    goto out;
                }
            }
            /* This buffer is the driver's again: reuse it at once, as a driver may (header first). */
            uint32_t id = tx->used->ring[tx->last_used & (tx->size - 1)].id;
            uint64_t slot = id < tx->size ? tx->cookie[id] : 0;
            volatile struct vhdr *h = (volatile struct vhdr *)(av.txbuf + slot * TX_SLOT);
            h->src_port = av.bogus_port;
            volatile uint8_t *p = (volatile uint8_t *)(h + 1);
            for (uint32_t i = 0; i < ROUND_BYTES; i++)
                p[ROUND_BYTES - 1 - i] = 'X';
            vq_pop(tx, NULL, NULL);
        }
        uint64_t expected = (uint64_t)batch * ROUND_BYTES;
        if (!wait_until(echoed, expected, virtio_timeout_cycles() / 10)) {
            if (av.needs_reset || c->state != C_OPEN) {
                why = av.needs_reset ? "device needs reset" : "connection reset";
                goto out;
            }
            lost++;
        }
        header_hits += av.bogus_rsts;
        if (!av.bogus_rsts) {
            for (unsigned k = 0; k < batch; k++)
                for (uint32_t i = 0; i < ROUND_BYTES && k * ROUND_BYTES + i < av.data_len; i++)
                    if (av.data[k * ROUND_BYTES + i] != round_byte(r + k, i)) {
                        payload_hits++;
                        break;
                    }
        }
        r += batch;
    }
    kprintf("ATTACK vsock reuse packets=%lu payload_rewritten=%u header_rewritten=%u lost=%u\n", packets,
            payload_hits, header_hits, lost);
    send_packet(c, OP_SHUTDOWN, SHUTDOWN_BOTH, NULL, 0);
    wait_until(never, 0, virtio_timeout_cycles() / 40);
    disconnect(c);
    if (payload_hits || header_hits || lost)
        why = fail("the device used %lu rewritten buffers (%lu batches short)", payload_hits + header_hits, lost);
out:
    close_vsock(why);
    return (uint64_t)why;
}

const char *check_attack_vsock_reuse(void) { return (const char *)run_user(user_reuse, 0); }

/* ---- attack-vsock-conns ---- */

static uint64_t user_conns(uint64_t unused)
{
    (void)unused;
    const char *why = open_vsock(true);
    if (why)
        goto out;
    uint64_t want = virtio_option_u64("kvmlet.vsock_conns", 256);
    if (want > MAX_CONNS - 32) /* room for the reconnection attempts */
        want = MAX_CONNS - 32;
    unsigned open = 0, refused = 0;
    struct vconn *first = NULL, *last = NULL;
    for (uint64_t i = 0; i < want; i++) {
        struct vconn *c = connect_new();
        if (!c || c->state == C_CONNECTING) {
            why = av.needs_reset ? "device needs reset" : "timeout (connect)";
            kprintf("ATTACK vsock conns open=%u refused=%u\n", open, refused);
            goto out;
        }
        if (c->state == C_OPEN) {
            open++;
            last = c;
            if (!first)
                first = c;
        } else {
            refused++;
        }
    }
    kprintf("ATTACK vsock conns open=%u refused=%u\n", open, refused);
    if (!first || !refused) {
        why = !first ? "no connection was accepted" : "no connection was refused (no limit reached)";
        goto out;
    }
    if ((why = echo_check(first, "PING first\n")) || (why = echo_check(last, "PING last\n")))
        goto out;
    /* Close the first half; a new connection must then be accepted (the host closes sockets soon after). */
    unsigned closed = 0;
    for (unsigned i = 0; i < av.nconn && closed < open / 2; i++) {
        if (av.c[i].state == C_OPEN && &av.c[i] != last) {
            disconnect(&av.c[i]);
            closed++;
        }
    }
    struct vconn *again = NULL;
    for (int attempt = 0; attempt < 20; attempt++) {
        wait_until(never, 0, virtio_timeout_cycles() / 100);
        again = connect_new();
        if (!again || again->state != C_REFUSED)
            break;
    }
    if (!again || again->state != C_OPEN) {
        why = av.needs_reset ? "device needs reset" : "no new connection after closing some";
        goto out;
    }
    if ((why = echo_check(again, "PING again\n")) || (why = echo_check(last, "PING last again\n")))
        goto out;
    if (virtio_status(av.d) & VIRTIO_STATUS_NEEDS_RESET)
        why = "device needs reset";
    kprintf("ATTACK vsock conns closed=%u reopened=1\n", closed);
out:
    close_vsock(why);
    return (uint64_t)why;
}

const char *check_attack_vsock_conns(void) { return (const char *)run_user(user_conns, 0); }

/* ---- attack-vsock-flood ---- */

static bool flag_set(uint64_t unused) { (void)unused; return flood_flag != 0; }

static uint64_t user_flood(uint64_t unused)
{
    (void)unused;
    const char *why = open_vsock(false);
    if (why)
        goto out;
    uint64_t packets = virtio_option_u64("kvmlet.packets", 200000), sent = 0;
    uint16_t size = av.tx->size;
    flood_flag = 0;
    kprintf("ATTACK vsock flood start packets=%lu\n", packets);
    while (sent < packets) {
        unsigned batch = 0;
        for (; batch < size && sent + batch < packets; batch++) {
            struct vhdr *h = (void *)(av.txbuf + (size_t)batch * TX_SLOT);
            uint64_t n = sent + batch;
            fill_header(h, FLOOD_PORT + (uint32_t)(n % 20000), NOBODY_PORT + (uint32_t)(n % 3), OP_RW, 0, 0, 0);
            struct vbuf b = { (uint64_t)h, sizeof(*h), false };
            if (vq_add(av.tx, &b, 1, batch) < 0)
                break;
        }
        vq_kick(av.tx);
        uint64_t start = rdtsc_now(), limit = virtio_timeout_cycles();
        for (unsigned done = 0; done < batch;) {
            if (vq_pop(av.tx, NULL, NULL)) {
                done++;
                continue;
            }
            if (rdtsc_now() - start > limit) {
                why = fail("timeout (transmit, %lu packets sent)", sent + done, 0);
                goto out;
            }
            cpu_pause();
        }
        sent += batch;
    }
    kprintf("ATTACK vsock flood done sent=%lu flag=0x%lx\n", sent, (uint64_t)&flood_flag);
    wait_until(flag_set, 0, virtio_timeout_cycles() / 5);
    if (virtio_status(av.d) & VIRTIO_STATUS_NEEDS_RESET) {
        why = "device needs reset";
        goto out;
    }
    /* Receive buffers now: take whatever the device kept, until it has been quiet for a while. */
    for (unsigned i = 0; i < RX_BUFS && i < av.rx->size; i++)
        post_rx(i);
    vq_kick(av.rx);
    uint64_t quiet = virtio_timeout_cycles() / 40, last = rdtsc_now();
    while (rdtsc_now() - last < quiet) {
        if (poll_once())
            last = rdtsc_now();
        else
            cpu_pause();
    }
    kprintf("ATTACK vsock flood drained packets=%lu\n", av.received);
    struct vconn *c = connect_new();
    if (!c || c->state != C_OPEN) {
        why = c && c->state == C_REFUSED ? "connection refused after the flood" : "timeout (connect after the flood)";
        goto out;
    }
    if ((why = echo_check(c, "PING after the flood\n")))
        goto out;
    disconnect(c);
out:
    close_vsock(why);
    return (uint64_t)why;
}

const char *check_attack_vsock_flood(void) { return (const char *)run_user(user_flood, 0); }
