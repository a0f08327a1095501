/*
 * virtio-vsock check (virtio 1.2, 5.10 socket device): a stream connection
 * from the guest CID (device config) to the host, CID 2, port
 * kvmlet.vsock_port (default 1234). Sends "PING\n", expects "PONG\n", then
 * shuts down (SHUTDOWN with both flags, the peer answers RST).
 * Queues: 0 rx, 1 tx, 2 event. Every packet is struct virtio_vsock_hdr
 * (44 bytes, little-endian) followed by the payload, in one descriptor.
 */
#include "virtio.h"

#define VIRTIO_VSOCK_F_STREAM            0
#define VIRTIO_VSOCK_F_NO_IMPLIED_STREAM 2

#define VSOCK_OP_REQUEST        1
#define VSOCK_OP_RESPONSE       2
#define VSOCK_OP_RST            3
#define VSOCK_OP_SHUTDOWN       4
#define VSOCK_OP_RW             5
#define VSOCK_OP_CREDIT_UPDATE  6
#define VSOCK_OP_CREDIT_REQUEST 7
#define VSOCK_TYPE_STREAM       1
#define VSOCK_SHUTDOWN_RECEIVE  1
#define VSOCK_SHUTDOWN_SEND     2
#define VSOCK_EVENT_TRANSPORT_RESET 0
#define HOST_CID 2

#define RX_BUFS  16
#define BUF_SIZE 4096
#define EVENT_BUFS 4
#define BUF_ALLOC (64 * 1024) /* receive space advertised: data is consumed at once */

struct virtio_vsock_hdr {
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

_Static_assert(sizeof(struct virtio_vsock_hdr) == 44, "virtio_vsock_hdr is 44 bytes");

static struct {
    struct virtio_dev *d;
    struct virtq *rx, *tx, *event;
    uint8_t *rxbuf, *txbuf;
    uint32_t *events;
    uint64_t cid;
    uint32_t port, local_port;
    /* connection state */
    bool connected, reset, peer_shutdown, transport_reset;
    uint32_t peer_buf_alloc, peer_fwd_cnt, tx_cnt, fwd_cnt;
    char data[64];
    unsigned data_len;
    char reason[96];
} vs;

static const char *fail(const char *fmt, uint64_t a, uint64_t b)
{
    ksnprintf(vs.reason, sizeof(vs.reason), fmt, a, b);
    return vs.reason;
}

static bool send_packet(uint16_t op, uint32_t flags, const void *payload, uint32_t len)
{
    struct virtio_vsock_hdr *h = (void *)vs.txbuf;
    memset(h, 0, sizeof(*h));
    h->src_cid = vs.cid;
    h->dst_cid = HOST_CID;
    h->src_port = vs.local_port;
    h->dst_port = vs.port;
    h->len = len;
    h->type = VSOCK_TYPE_STREAM;
    h->op = op;
    h->flags = flags;
    h->buf_alloc = BUF_ALLOC;
    h->fwd_cnt = vs.fwd_cnt;
    if (len)
        memcpy(vs.txbuf + sizeof(*h), payload, len);
    struct vbuf b = { (uint64_t)vs.txbuf, (uint32_t)sizeof(*h) + len, false };
    if (vq_add(vs.tx, &b, 1, 0) < 0)
        return false;
    vq_kick(vs.tx);
    if (!vq_wait(vs.tx, NULL, NULL)) /* the buffer is reused: wait until the device has it */
        return false;
    if (op == VSOCK_OP_RW)
        vs.tx_cnt += len;
    return true;
}

static void handle_packet(const struct virtio_vsock_hdr *h, uint32_t used_len)
{
    if (used_len < sizeof(*h))
        return;
    if (h->dst_cid != vs.cid || h->src_cid != HOST_CID || h->src_port != vs.port || h->dst_port != vs.local_port)
        return; /* not this connection */
    if (h->type != VSOCK_TYPE_STREAM) {
        send_packet(VSOCK_OP_RST, 0, NULL, 0);
        return;
    }
    vs.peer_buf_alloc = h->buf_alloc;
    vs.peer_fwd_cnt = h->fwd_cnt;
    switch (h->op) {
    case VSOCK_OP_RESPONSE:
        vs.connected = true;
        break;
    case VSOCK_OP_RST:
        vs.reset = true;
        break;
    case VSOCK_OP_SHUTDOWN:
        vs.peer_shutdown = true;
        break;
    case VSOCK_OP_RW: {
        uint32_t len = h->len;
        if (len > used_len - sizeof(*h))
            len = used_len - sizeof(*h);
        const char *p = (const char *)(h + 1);
        for (uint32_t i = 0; i < len; i++)
            if (vs.data_len < sizeof(vs.data) - 1)
                vs.data[vs.data_len++] = p[i];
        vs.fwd_cnt += len; /* consumed at once */
        break;
    }
    case VSOCK_OP_CREDIT_REQUEST:
        send_packet(VSOCK_OP_CREDIT_UPDATE, 0, NULL, 0);
        break;
    default: /* CREDIT_UPDATE: credit taken above */
        break;
    }
}

static unsigned poll_once(void)
{
    uint64_t i;
    uint32_t len;
    unsigned n = 0;
    while (vq_pop(vs.rx, &i, &len)) {
        handle_packet((const void *)(vs.rxbuf + i * BUF_SIZE), len);
        struct vbuf b = { (uint64_t)(vs.rxbuf + i * BUF_SIZE), BUF_SIZE, true };
        vq_add(vs.rx, &b, 1, i);
        n++;
    }
    if (n)
        vq_kick(vs.rx);
    while (vq_pop(vs.event, &i, &len)) {
        if (len >= 4 && vs.events[i] == VSOCK_EVENT_TRANSPORT_RESET)
            vs.transport_reset = true;
        struct vbuf b = { (uint64_t)&vs.events[i], 4, true };
        vq_add(vs.event, &b, 1, i);
        vq_kick(vs.event);
        n++;
    }
    return n;
}

/* Polls until cond(), a reset, or the timeout. */
static bool wait_until(bool (*cond)(void), uint64_t cycles)
{
    uint64_t start = rdtsc_now();
    while (!cond() && !vs.reset && !vs.transport_reset) {
        if (!poll_once()) {
            if (rdtsc_now() - start > cycles)
                return false;
            cpu_pause();
        }
    }
    return cond();
}

static bool is_connected(void) { return vs.connected; }
static bool got_line(void) { return vs.data_len && vs.data[vs.data_len - 1] == '\n'; }
static bool has_credit(void) { return vs.peer_buf_alloc - (vs.tx_cnt - vs.peer_fwd_cnt) >= 5; }
static bool never(void) { return false; }

static uint64_t user_vsock(uint64_t unused)
{
    (void)unused;
    const char *why;
    dma_reset();
    memset(&vs, 0, sizeof(vs));
    vs.d = virtio_find(VIRTIO_ID_VSOCK, &why);
    if (!vs.d)
        return (uint64_t)(why ? why : "no virtio-vsock device");
    vs.port = (uint32_t)virtio_option_u64("kvmlet.vsock_port", 1234);
    if ((why = virtio_begin(vs.d, VIRTIO_BIT(VIRTIO_VSOCK_F_STREAM) | VIRTIO_BIT(VIRTIO_VSOCK_F_NO_IMPLIED_STREAM))))
        return (uint64_t)why;
    if (virtio_has(vs.d, VIRTIO_VSOCK_F_NO_IMPLIED_STREAM) && !virtio_has(vs.d, VIRTIO_VSOCK_F_STREAM)) {
        why = "device offers no stream sockets";
        goto out;
    }
    vs.cid = virtio_cfg64(vs.d, 0) & 0xffffffffULL; /* upper 32 bits reserved */
    if ((why = virtio_setup_queue(vs.d, 0, false, &vs.rx)) || (why = virtio_setup_queue(vs.d, 1, false, &vs.tx)) ||
        (why = virtio_setup_queue(vs.d, 2, false, &vs.event)))
        goto out;
    vs.rxbuf = dma_alloc((size_t)RX_BUFS * BUF_SIZE, 4096);
    vs.txbuf = dma_alloc(BUF_SIZE, 4096);
    vs.events = dma_alloc(EVENT_BUFS * sizeof(uint32_t), 64);
    if (!vs.rxbuf || !vs.txbuf || !vs.events) {
        why = "out of memory";
        goto out;
    }
    for (unsigned i = 0; i < EVENT_BUFS; i++) {
        struct vbuf b = { (uint64_t)&vs.events[i], 4, true };
        vq_add(vs.event, &b, 1, i);
    }
    for (unsigned i = 0; i < RX_BUFS && i < vs.rx->size; i++) {
        struct vbuf b = { (uint64_t)(vs.rxbuf + (size_t)i * BUF_SIZE), BUF_SIZE, true };
        vq_add(vs.rx, &b, 1, i);
    }
    virtio_driver_ok(vs.d);
    vq_kick(vs.event);
    vq_kick(vs.rx);
    kprintf("VSOCK cid=%lu port=%u\n", vs.cid, vs.port);
    if (vs.cid <= HOST_CID || vs.cid == 0xffffffffULL) {
        why = fail("reserved guest CID %lu", vs.cid, 0);
        goto out;
    }
    vs.local_port = 49152 + (uint32_t)(rdtsc_now() % 16384);

    uint64_t timeout = virtio_timeout_cycles();
    if (!send_packet(VSOCK_OP_REQUEST, 0, NULL, 0)) {
        why = "timeout (transmit)";
        goto out;
    }
    if (!wait_until(is_connected, timeout)) {
        why = vs.reset ? "connection refused (RST)" : vs.transport_reset ? "transport reset" : "timeout (connect)";
        goto out;
    }
    if (!has_credit()) { /* ask for the peer's credit once if the RESPONSE did not give enough */
        send_packet(VSOCK_OP_CREDIT_REQUEST, 0, NULL, 0);
        if (!wait_until(has_credit, timeout)) {
            why = "no credit from the peer";
            goto out;
        }
    }
    if (!send_packet(VSOCK_OP_RW, 0, "PING\n", 5)) {
        why = "timeout (transmit)";
        goto out;
    }
    if (!wait_until(got_line, timeout)) {
        why = vs.reset ? "reset before the reply" : "timeout (no reply line)";
        goto out;
    }
    vs.data[vs.data_len] = '\0';
    if (strcmp(vs.data, "PONG\n") != 0) {
        vs.data[vs.data_len - 1] = '\0';
        kprintf("VSOCK got %s\n", vs.data);
        why = "reply is not PONG";
        goto out;
    }
    /* Clean disconnect: SHUTDOWN both ways, the peer answers RST; send RST if it does not. */
    send_packet(VSOCK_OP_SHUTDOWN, VSOCK_SHUTDOWN_RECEIVE | VSOCK_SHUTDOWN_SEND, NULL, 0);
    wait_until(never, timeout / 40);
    if (!vs.reset)
        send_packet(VSOCK_OP_RST, 0, NULL, 0);
    kprintf("VSOCK ok\n");
out:
    if (why)
        virtio_fail(vs.d);
    virtio_reset(vs.d);
    return (uint64_t)why;
}

const char *check_virtio_vsock(void) { return (const char *)run_user(user_vsock, 0); }
