/*
 * virtio-net checks (virtio 1.2, 5.1): virtio-net (ARP for the peer, then a
 * UDP datagram that the peer echoes back) and virtio-net-bench (a stream of
 * UDP datagrams of 1472 payload bytes to the peer). Every packet carries the
 * 12-byte struct virtio_net_hdr (VIRTIO_F_VERSION_1: num_buffers is always
 * there). Receive buffers are 2 KiB, one descriptor each.
 *
 * Options: kvmlet.net_ip, kvmlet.net_peer (IPv4), kvmlet.net_port (UDP port
 * of the peer's echo server), kvmlet.net_queues (queue pairs, needs MQ and
 * CTRL_VQ), kvmlet.net_offload=0 (do not accept CSUM/GUEST_CSUM).
 */
#include "virtio.h"

#define VIRTIO_NET_F_CSUM       0
#define VIRTIO_NET_F_GUEST_CSUM 1
#define VIRTIO_NET_F_MTU        3
#define VIRTIO_NET_F_MAC        5
#define VIRTIO_NET_F_MRG_RXBUF  15
#define VIRTIO_NET_F_STATUS     16
#define VIRTIO_NET_F_CTRL_VQ    17
#define VIRTIO_NET_F_MQ         22

#define NET_CFG_MAC    0
#define NET_CFG_STATUS 6
#define NET_CFG_MAX_PAIRS 8
#define NET_CFG_MTU    10
#define VIRTIO_NET_S_LINK_UP 1

#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1
#define VIRTIO_NET_CTRL_MQ 4
#define VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 0
#define VIRTIO_NET_OK 0

#define HDR_LEN   12
#define BUF_SIZE  2048
#define RX_BUFS   32 /* per receive queue */
#define MAX_PAIRS 4
#define ETH_HLEN  14
#define IP_HLEN   20
#define UDP_HLEN  8
#define BENCH_PAYLOAD 1472
#define ETH_P_IP  0x0800
#define ETH_P_ARP 0x0806
#define LOCAL_PORT 40000

struct virtio_net_hdr {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
    uint16_t num_buffers;
} __attribute__((packed));

struct ctrl_cmd {
    uint8_t class_, command;
    uint16_t pairs;
    volatile uint8_t ack;
};

static struct {
    struct virtio_dev *d;
    unsigned pairs;
    struct virtq *rx[MAX_PAIRS], *tx[MAX_PAIRS];
    uint8_t *rxbuf[MAX_PAIRS];
    uint8_t *txbuf; /* one frame being built (functional check) or the bench frame */
    uint8_t mac[6], peer_mac[6];
    uint32_t ip, peer;
    uint16_t port;
    bool csum, have_peer_mac, echo_ok;
    const uint8_t *echo_payload;
    unsigned echo_len;
    uint16_t ip_id;
    uint64_t rx_frames, tx_frames, rx_dropped;
    char reason[96];
} net;

static const uint8_t broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

static void put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v) { put16(p, v >> 16); put16(p + 2, (uint16_t)v); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const uint8_t *p) { return (uint32_t)get16(p) << 16 | get16(p + 2); }

/* Ones' complement sum of big-endian 16-bit words, folded, not complemented. */
static uint32_t csum_add(uint32_t sum, const uint8_t *p, unsigned len)
{
    for (; len > 1; len -= 2, p += 2)
        sum += get16(p);
    if (len)
        sum += (uint32_t)p[0] << 8;
    return sum;
}
static uint16_t csum_fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

static bool parse_ipv4(const char *name, uint32_t def, uint32_t *out)
{
    const char *v, *end;
    size_t len;
    *out = def;
    if (!virtio_option(name, &v, &len))
        return true;
    end = v + len;
    uint32_t ip = 0;
    for (int part = 0; part < 4; part++) {
        unsigned n = 0, digits = 0;
        while (v < end && *v >= '0' && *v <= '9' && digits < 4)
            n = n * 10 + (*v++ - '0'), digits++;
        if (!digits || n > 255 || (part < 3 && (v >= end || *v++ != '.')))
            return false;
        ip = ip << 8 | n;
    }
    if (v != end)
        return false;
    *out = ip;
    return true;
}

static const char *fail(const char *fmt, uint64_t a, uint64_t b)
{
    ksnprintf(net.reason, sizeof(net.reason), fmt, a, b);
    return net.reason;
}

/* ---- device set-up ---- */

static void rx_post(unsigned q, unsigned i)
{
    struct vbuf b = { (uint64_t)(net.rxbuf[q] + (size_t)i * BUF_SIZE), BUF_SIZE, true };
    vq_add(net.rx[q], &b, 1, i);
}

static const char *ctrl_set_pairs(struct virtq *ctrl, unsigned pairs)
{
    struct ctrl_cmd *c = dma_alloc(sizeof(*c), 64);
    if (!c)
        return "out of memory";
    c->class_ = VIRTIO_NET_CTRL_MQ;
    c->command = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET;
    c->pairs = (uint16_t)pairs; /* le16 */
    c->ack = 0xff;
    struct vbuf b[3] = {
        { (uint64_t)&c->class_, 2, false },
        { (uint64_t)&c->pairs, 2, false },
        { (uint64_t)&c->ack, 1, true },
    };
    vq_add(ctrl, b, 3, 0);
    vq_kick(ctrl);
    if (!vq_wait(ctrl, NULL, NULL))
        return "timeout (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET)";
    if (c->ack != VIRTIO_NET_OK)
        return fail("VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET ack %lu", c->ack, 0);
    return NULL;
}

static const char *net_open(void)
{
    const char *why;
    dma_reset();
    memset(&net, 0, sizeof(net));
    net.d = virtio_find(VIRTIO_ID_NET, &why);
    if (!net.d)
        return why ? why : "no virtio-net device";
    if (!parse_ipv4("kvmlet.net_ip", 0x0ac80002, &net.ip) || !parse_ipv4("kvmlet.net_peer", 0x0ac80001, &net.peer))
        return "bad kvmlet.net_ip or kvmlet.net_peer";
    net.port = (uint16_t)virtio_option_u64("kvmlet.net_port", 7);
    uint64_t want_pairs = virtio_option_u64("kvmlet.net_queues", 1);
    if (want_pairs < 1)
        want_pairs = 1;

    uint64_t want = VIRTIO_BIT(VIRTIO_NET_F_MAC) | VIRTIO_BIT(VIRTIO_NET_F_STATUS) | VIRTIO_BIT(VIRTIO_NET_F_MTU) |
                    VIRTIO_BIT(VIRTIO_NET_F_MRG_RXBUF);
    if (virtio_option_u64("kvmlet.net_offload", 1))
        want |= VIRTIO_BIT(VIRTIO_NET_F_CSUM) | VIRTIO_BIT(VIRTIO_NET_F_GUEST_CSUM);
    if (want_pairs > 1)
        want |= VIRTIO_BIT(VIRTIO_NET_F_MQ) | VIRTIO_BIT(VIRTIO_NET_F_CTRL_VQ);
    if ((why = virtio_begin(net.d, want)))
        return why;
    struct virtio_dev *d = net.d;
    struct virtq *ctrl = NULL;
    bool mq = virtio_has(d, VIRTIO_NET_F_MQ) && virtio_has(d, VIRTIO_NET_F_CTRL_VQ);
    unsigned max_pairs = mq ? virtio_cfg16(d, NET_CFG_MAX_PAIRS) : 1;
    net.pairs = want_pairs < max_pairs ? (unsigned)want_pairs : max_pairs;
    if (net.pairs > MAX_PAIRS)
        net.pairs = MAX_PAIRS;
    if (!net.pairs)
        net.pairs = 1;
    if (want_pairs > 1 && !mq)
        kprintf("NET kvmlet.net_queues=%lu but the device offers no MQ with CTRL_VQ: 1 pair\n", want_pairs);
    net.csum = virtio_has(d, VIRTIO_NET_F_CSUM);

    if (virtio_has(d, VIRTIO_NET_F_MAC)) {
        for (int i = 0; i < 6; i++)
            net.mac[i] = virtio_cfg8(d, NET_CFG_MAC + i);
    } else { /* locally administered, unicast */
        static const uint8_t local[6] = { 0x02, 0x6b, 0x76, 0x6d, 0x00, 0x01 };
        memcpy(net.mac, local, 6);
    }
    if (virtio_has(d, VIRTIO_NET_F_MTU)) {
        unsigned mtu = virtio_cfg16(d, NET_CFG_MTU);
        kprintf("NET mtu=%u\n", mtu);
        if (mtu < IP_HLEN + UDP_HLEN + BENCH_PAYLOAD) {
            why = fail("device mtu %lu below %lu", mtu, IP_HLEN + UDP_HLEN + BENCH_PAYLOAD);
            goto failed;
        }
    }
    for (unsigned i = 0; i < net.pairs; i++) {
        if ((why = virtio_setup_queue(d, 2 * i, false, &net.rx[i])) ||
            (why = virtio_setup_queue(d, 2 * i + 1, false, &net.tx[i])))
            goto failed;
        if (!(net.rxbuf[i] = dma_alloc((size_t)RX_BUFS * BUF_SIZE, 4096))) {
            why = "out of memory";
            goto failed;
        }
    }
    if (mq && (why = virtio_setup_queue(d, 2 * max_pairs, false, &ctrl)))
        goto failed;
    if (!(net.txbuf = dma_alloc(BUF_SIZE, 4096))) {
        why = "out of memory";
        goto failed;
    }
    /* Receive buffers before DRIVER_OK (5.1.5), on every queue that will be used. */
    for (unsigned q = 0; q < net.pairs; q++) {
        for (unsigned i = 0; i < RX_BUFS && i < net.rx[q]->size; i++)
            rx_post(q, i);
    }
    virtio_driver_ok(d);
    for (unsigned q = 0; q < net.pairs; q++)
        vq_kick(net.rx[q]);
    if (mq && (why = ctrl_set_pairs(ctrl, net.pairs)))
        goto failed;

    kprintf("NET mac=%02x:%02x:%02x:%02x:%02x:%02x\n", net.mac[0], net.mac[1], net.mac[2], net.mac[3], net.mac[4],
            net.mac[5]);
    if (virtio_has(d, VIRTIO_NET_F_STATUS)) {
        uint16_t status = virtio_cfg16(d, NET_CFG_STATUS);
        kprintf("NET link=%s\n", status & VIRTIO_NET_S_LINK_UP ? "up" : "down");
        if (!(status & VIRTIO_NET_S_LINK_UP)) {
            why = "link down";
            goto failed;
        }
    }
    kprintf("NET queues=%u csum=%u guest_csum=%u mrg_rxbuf=%u\n", net.pairs, net.csum ? 1 : 0,
            virtio_has(d, VIRTIO_NET_F_GUEST_CSUM) ? 1 : 0, virtio_has(d, VIRTIO_NET_F_MRG_RXBUF) ? 1 : 0);
    return NULL;
failed:
    virtio_fail(d);
    virtio_reset(d);
    return why;
}

/* ---- frames ---- */

static unsigned eth_header(uint8_t *f, const uint8_t *dst, uint16_t type)
{
    memcpy(f, dst, 6);
    memcpy(f + 6, net.mac, 6);
    put16(f + 12, type);
    return ETH_HLEN;
}

static unsigned build_arp(uint8_t *f, uint16_t op, const uint8_t *eth_dst, const uint8_t *tha, uint32_t tpa)
{
    static const uint8_t zero[6];
    unsigned n = eth_header(f, eth_dst, ETH_P_ARP);
    uint8_t *a = f + n;
    put16(a, 1);          /* hardware: Ethernet */
    put16(a + 2, ETH_P_IP);
    a[4] = 6;
    a[5] = 4;
    put16(a + 6, op);
    memcpy(a + 8, net.mac, 6);
    put32(a + 14, net.ip);
    memcpy(a + 18, tha ? tha : zero, 6);
    put32(a + 24, tpa);
    memset(a + 28, 0, 60 - ETH_HLEN - 28); /* pad to the Ethernet minimum */
    return 60;
}

/* An IPv4/UDP frame to the peer; the UDP checksum is left to the device when CSUM was negotiated. */
static unsigned build_udp(uint8_t *hdr_and_frame, const uint8_t *payload, unsigned len)
{
    struct virtio_net_hdr *h = (void *)hdr_and_frame;
    uint8_t *f = hdr_and_frame + HDR_LEN;
    unsigned n = eth_header(f, net.peer_mac, ETH_P_IP);
    uint8_t *ip = f + n, *udp = ip + IP_HLEN;
    unsigned udp_len = UDP_HLEN + len;
    ip[0] = 0x45;
    ip[1] = 0;
    put16(ip + 2, (uint16_t)(IP_HLEN + udp_len));
    put16(ip + 4, net.ip_id++);
    put16(ip + 6, 0x4000); /* DF */
    ip[8] = 64;
    ip[9] = 17;
    put16(ip + 10, 0);
    put32(ip + 12, net.ip);
    put32(ip + 16, net.peer);
    put16(ip + 10, (uint16_t)~csum_fold(csum_add(0, ip, IP_HLEN)));
    put16(udp, LOCAL_PORT);
    put16(udp + 2, net.port);
    put16(udp + 4, (uint16_t)udp_len);
    put16(udp + 6, 0);
    if (payload != udp + UDP_HLEN)
        memcpy(udp + UDP_HLEN, payload, len);
    uint32_t pseudo = csum_add(0, ip + 12, 8) + 17 + udp_len;
    memset(h, 0, sizeof(*h));
    if (net.csum) {
        h->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        h->csum_start = ETH_HLEN + IP_HLEN;
        h->csum_offset = 6;
        put16(udp + 6, csum_fold(pseudo));
    } else {
        uint16_t c = (uint16_t)~csum_fold(csum_add(pseudo, udp, udp_len));
        put16(udp + 6, c ? c : 0xffff);
    }
    return HDR_LEN + ETH_HLEN + IP_HLEN + udp_len;
}

/* ---- transmit and receive ---- */

static void tx_reclaim(void)
{
    for (unsigned q = 0; q < net.pairs; q++)
        while (vq_pop(net.tx[q], NULL, NULL))
            net.tx_frames++;
}

/* Sends hdr+frame (already in net.txbuf) on transmitq1 and waits until the device has taken it. */
static bool tx_send(unsigned len)
{
    struct vbuf b = { (uint64_t)net.txbuf, len, false };
    if (vq_add(net.tx[0], &b, 1, 0) < 0)
        return false;
    vq_kick(net.tx[0]);
    if (!vq_wait(net.tx[0], NULL, NULL))
        return false;
    net.tx_frames++;
    return true;
}

static bool send_arp(uint16_t op, const uint8_t *eth_dst, const uint8_t *tha, uint32_t tpa)
{
    memset(net.txbuf, 0, HDR_LEN);
    return tx_send(HDR_LEN + build_arp(net.txbuf + HDR_LEN, op, eth_dst, tha, tpa));
}

static void handle_frame(const uint8_t *f, unsigned len)
{
    if (len < ETH_HLEN)
        return;
    uint16_t type = get16(f + 12);
    const uint8_t *p = f + ETH_HLEN;
    len -= ETH_HLEN;
    if (type == ETH_P_ARP && len >= 28 && get16(p) == 1 && get16(p + 2) == ETH_P_IP) {
        uint16_t op = get16(p + 6);
        uint32_t spa = get32(p + 14), tpa = get32(p + 24);
        if (op == 2 && spa == net.peer && tpa == net.ip && !net.have_peer_mac) {
            memcpy(net.peer_mac, p + 8, 6);
            net.have_peer_mac = true;
            kprintf("NET arp reply from %02x:%02x:%02x:%02x:%02x:%02x\n", p[8], p[9], p[10], p[11], p[12], p[13]);
        } else if (op == 1 && tpa == net.ip) {
            uint8_t sha[6];
            memcpy(sha, p + 8, 6);
            send_arp(2, sha, sha, spa);
        }
        return;
    }
    if (type != ETH_P_IP || len < IP_HLEN + UDP_HLEN || (p[0] >> 4) != 4 || p[9] != 17)
        return;
    unsigned ihl = (p[0] & 15) * 4, tot = get16(p + 2);
    if (ihl < IP_HLEN || tot > len || tot < ihl + UDP_HLEN || get32(p + 12) != net.peer || get32(p + 16) != net.ip)
        return;
    const uint8_t *udp = p + ihl;
    unsigned ulen = get16(udp + 4);
    if (get16(udp) != net.port || get16(udp + 2) != LOCAL_PORT || ulen < UDP_HLEN || ulen > tot - ihl)
        return;
    if (net.echo_payload && ulen - UDP_HLEN == net.echo_len && memcmp(udp + UDP_HLEN, net.echo_payload, net.echo_len) == 0)
        net.echo_ok = true;
}

/* Takes every received frame off the receive queues, handles it (if asked) and reposts the buffer. */
static unsigned rx_poll(bool handle)
{
    unsigned frames = 0;
    for (unsigned q = 0; q < net.pairs; q++) {
        uint64_t i;
        uint32_t len;
        bool any = false;
        while (vq_pop(net.rx[q], &i, &len)) {
            const uint8_t *buf = net.rxbuf[q] + i * BUF_SIZE;
            const struct virtio_net_hdr *h = (const void *)buf;
            unsigned extra = h->num_buffers > 1 ? h->num_buffers - 1u : 0;
            if (!extra && len > HDR_LEN && len <= BUF_SIZE && handle)
                handle_frame(buf + HDR_LEN, len - HDR_LEN);
            rx_post(q, (unsigned)i);
            any = true;
            frames++;
            net.rx_frames++;
            /* A merged packet (MRG_RXBUF) spans more buffers: too large for this check, drop them. */
            for (; extra; extra--) {
                if (!vq_wait(net.rx[q], &i, &len))
                    break;
                rx_post(q, (unsigned)i);
                net.rx_dropped++;
            }
        }
        if (any)
            vq_kick(net.rx[q]);
    }
    return frames;
}

/* Polls until *flag becomes true or `cycles` pass. */
static bool wait_for(volatile bool *flag, uint64_t cycles)
{
    uint64_t start = rdtsc_now();
    while (!*flag) {
        if (!rx_poll(true)) {
            if (rdtsc_now() - start > cycles)
                return false;
            cpu_pause();
        }
    }
    return true;
}

static const char *resolve_peer(void)
{
    uint64_t total = virtio_timeout_cycles();
    for (int attempt = 0; attempt < 5; attempt++) {
        if (!send_arp(1, broadcast, NULL, net.peer))
            return "timeout (transmit)";
        if (wait_for(&net.have_peer_mac, total / 5))
            return NULL;
    }
    ksnprintf(net.reason, sizeof(net.reason), "no ARP reply from %u.%u.%u.%u", net.peer >> 24, (net.peer >> 16) & 255,
              (net.peer >> 8) & 255, net.peer & 255);
    return net.reason;
}

static uint64_t user_net(uint64_t unused)
{
    (void)unused;
    const char *why = net_open();
    if (why)
        return (uint64_t)why;
    if ((why = resolve_peer()))
        goto out;
    static uint8_t payload[64];
    unsigned n = (unsigned)ksnprintf((char *)payload, sizeof(payload), "kvmlet-guest virtio-net %lx\n", rdtsc_now());
    net.echo_payload = payload;
    net.echo_len = n;
    uint64_t total = virtio_timeout_cycles();
    for (int attempt = 0; attempt < 5 && !net.echo_ok; attempt++) {
        if (!tx_send(build_udp(net.txbuf, payload, n))) {
            why = "timeout (transmit)";
            goto out;
        }
        wait_for(&net.echo_ok, total / 5);
    }
    if (!net.echo_ok) {
        why = fail("no UDP echo from the peer's port %lu", net.port, 0);
        goto out;
    }
    kprintf("NET udp echo ok bytes=%u port=%u\n", n, net.port);
out:
    kprintf("NET frames tx=%lu rx=%lu\n", net.tx_frames, net.rx_frames);
    if (why)
        virtio_fail(net.d);
    virtio_reset(net.d);
    return (uint64_t)why;
}

const char *check_virtio_net(void) { return (const char *)run_user(user_net, 0); }

/*
 * virtio-net-bench: kvmlet.loops datagrams of 1472 payload bytes (1514-byte
 * frames) as fast as the transmit queues take them. Every descriptor points
 * at the same read-only frame; with several queue pairs they are used in turn.
 * Received frames (the echoes) are returned to the device unread.
 */
static uint64_t user_net_bench(uint64_t unused)
{
    (void)unused;
    const char *why = net_open();
    if (why)
        return (uint64_t)why;
    if ((why = resolve_peer()))
        goto out;
    uint64_t loops = virtio_option_u64("kvmlet.loops", 10000), sent = 0, before = net.tx_frames;
    uint8_t *payload = net.txbuf + HDR_LEN + ETH_HLEN + IP_HLEN + UDP_HLEN;
    for (unsigned i = 0; i < BENCH_PAYLOAD; i++)
        payload[i] = (uint8_t)i;
    unsigned len = build_udp(net.txbuf, payload, BENCH_PAYLOAD);
    struct vbuf b = { (uint64_t)net.txbuf, len, false };
    uint64_t limit = virtio_timeout_cycles(), last_progress = rdtsc_now();

    kprintf("BENCH net-udp-tx start\n");
    while (net.tx_frames - before < loops) {
        uint64_t done = net.tx_frames;
        tx_reclaim();
        for (unsigned q = 0; q < net.pairs; q++) {
            unsigned added = 0;
            while (sent < loops && vq_add(net.tx[q], &b, 1, 0) >= 0) {
                sent++;
                added++;
            }
            if (added)
                vq_kick(net.tx[q]);
        }
        rx_poll(false);
        if (net.tx_frames != done) {
            last_progress = rdtsc_now();
        } else if (rdtsc_now() - last_progress > limit) {
            why = fail("timeout after %lu of %lu frames", net.tx_frames - before, loops);
            break;
        } else {
            cpu_pause();
        }
    }
    if (!why)
        kprintf("BENCH net-udp-tx done ops=%lu bytes=%lu\n", loops, loops * BENCH_PAYLOAD);
    kprintf("NET bench tx=%lu rx=%lu notifies=%lu\n", net.tx_frames - before, net.rx_frames, net.tx[0]->notifies);
out:
    if (why)
        virtio_fail(net.d);
    virtio_reset(net.d);
    return (uint64_t)why;
}

const char *check_virtio_net_bench(void) { return (const char *)run_user(user_net_bench, 0); }
