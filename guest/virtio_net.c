/*
 * virtio-net checks (virtio 1.2, 5.1): virtio-net (ARP for the peer, then a
 * UDP datagram that the peer echoes back) and virtio-net-bench (a stream of
 * UDP datagrams of 1472 payload bytes to the peer). Every packet carries the
 * 12-byte struct virtio_net_hdr (VIRTIO_F_VERSION_1: num_buffers is always
 * there). Receive buffers are 2 KiB, one descriptor each.
 *
 * The peer side, for guest-to-guest tests: virtio-net-serve (answers ARP and
 * echoes UDP datagrams to kvmlet.net_port) and virtio-net-sink (answers ARP
 * and counts the UDP frames addressed to it: the receiving end of
 * virtio-net-bench).
 *
 * Options: kvmlet.net_ip, kvmlet.net_peer (IPv4), kvmlet.net_port (UDP port
 * of the peer's echo server), kvmlet.net_queues (queue pairs, needs MQ and
 * CTRL_VQ), kvmlet.net_offload=0 (do not accept CSUM/GUEST_CSUM),
 * kvmlet.net_mac (source MAC instead of the device's), kvmlet.net_vlan (an
 * 802.1Q tag on every frame sent; frames tagged with it are received),
 * kvmlet.net_serve (echoes before virtio-net-serve ends), kvmlet.net_idle_ms
 * (virtio-net-sink ends after this long without a frame), kvmlet.net_uso=1
 * (virtio-net-bench sends 44 datagrams per frame with UDP segmentation
 * offload when the device offers VIRTIO_NET_F_HOST_USO).
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
#define VIRTIO_NET_F_HOST_USO   56

#define NET_CFG_MAC    0
#define NET_CFG_STATUS 6
#define NET_CFG_MAX_PAIRS 8
#define NET_CFG_MTU    10
#define VIRTIO_NET_S_LINK_UP 1

#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1
#define VIRTIO_NET_HDR_GSO_UDP_L4 5
#define VIRTIO_NET_CTRL_MQ 4
#define VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 0
#define VIRTIO_NET_OK 0

#define HDR_LEN   12
#define BUF_SIZE  2048
#define RX_BUFS   32 /* per receive queue with several pairs; one pair gets RX_BUFS_ONE_PAIR */
#define RX_BUFS_ONE_PAIR 128 /* a whole queue (VQ_MAX_SIZE): fewer drops where the device cannot wait */
#define MAX_PAIRS 4
#define ETH_HLEN  14
#define IP_HLEN   20
#define UDP_HLEN  8
#define BENCH_PAYLOAD 1472
#define USO_SEGMENTS 44 /* datagrams per USO frame: 44 x 1472 = 64768 payload bytes, an IP packet under 64 KiB */
#define USO_TXBUF 65536 /* header + Ethernet (with a tag) + IP + UDP + USO_SEGMENTS x BENCH_PAYLOAD fits */
#define ETH_P_IP  0x0800
#define ETH_P_ARP 0x0806
#define ETH_P_8021Q 0x8100
#define VLAN_HLEN 4
#define ETH_ZLEN  60 /* the Ethernet minimum without the FCS */
#define LOCAL_PORT 40000
#define TSC_PER_MS_MAX 4000000ULL /* as the virtio timeouts: a TSC of at most 4 GHz */

enum net_mode { MODE_CLIENT, MODE_SERVE, MODE_SINK };

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
    unsigned pairs, rx_bufs;
    struct virtq *rx[MAX_PAIRS], *tx[MAX_PAIRS];
    uint8_t *rxbuf[MAX_PAIRS];
    uint8_t *txbuf; /* one frame being built (functional check) or the bench frame */
    uint8_t mac[6], peer_mac[6]; /* mac: the source of every frame sent (kvmlet.net_mac or the device's) */
    uint32_t ip, peer;
    uint16_t port;
    uint16_t vlan; /* kvmlet.net_vlan: 0 = untagged */
    enum net_mode mode;
    bool csum, uso, have_peer_mac, echo_ok; /* uso: HOST_USO negotiated (asked for by virtio-net-bench only) */
    const uint8_t *echo_payload;
    unsigned echo_len;
    uint16_t ip_id;
    uint64_t rx_frames, tx_frames, rx_dropped;
    uint64_t echoes;                                   /* virtio-net-serve */
    uint64_t sink_frames, sink_bytes, first_rx, last_rx; /* virtio-net-sink (TSC of the first and last frame) */
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

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* kvmlet.net_mac=aa:bb:cc:dd:ee:ff; false if present and malformed. */
static bool parse_mac(const char *name, uint8_t out[6], bool *given)
{
    const char *v;
    size_t len;
    *given = false;
    if (!virtio_option(name, &v, &len))
        return true;
    if (len != 17)
        return false;
    uint8_t mac[6];
    for (int i = 0; i < 6; i++) {
        int hi = hex_digit(v[3 * i]), lo = hex_digit(v[3 * i + 1]);
        if (hi < 0 || lo < 0 || (i < 5 && v[3 * i + 2] != ':'))
            return false;
        mac[i] = (uint8_t)(hi << 4 | lo);
    }
    memcpy(out, mac, 6);
    *given = true;
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

static const char *net_open(bool want_uso)
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
    uint64_t vlan = virtio_option_u64("kvmlet.net_vlan", 0);
    if (vlan > 4094)
        return "bad kvmlet.net_vlan (choose 1 to 4094)";
    net.vlan = (uint16_t)vlan;
    uint8_t mac_option[6];
    bool mac_given;
    if (!parse_mac("kvmlet.net_mac", mac_option, &mac_given))
        return "bad kvmlet.net_mac (expected aa:bb:cc:dd:ee:ff)";
    uint64_t want_pairs = virtio_option_u64("kvmlet.net_queues", 1);
    if (want_pairs < 1)
        want_pairs = 1;

    uint64_t want = VIRTIO_BIT(VIRTIO_NET_F_MAC) | VIRTIO_BIT(VIRTIO_NET_F_STATUS) | VIRTIO_BIT(VIRTIO_NET_F_MTU) |
                    VIRTIO_BIT(VIRTIO_NET_F_MRG_RXBUF);
    if (virtio_option_u64("kvmlet.net_offload", 1)) {
        want |= VIRTIO_BIT(VIRTIO_NET_F_CSUM) | VIRTIO_BIT(VIRTIO_NET_F_GUEST_CSUM);
        if (want_uso)
            want |= VIRTIO_BIT(VIRTIO_NET_F_HOST_USO);
    }
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
    net.uso = net.csum && virtio_has(d, VIRTIO_NET_F_HOST_USO);

    if (virtio_has(d, VIRTIO_NET_F_MAC)) {
        for (int i = 0; i < 6; i++)
            net.mac[i] = virtio_cfg8(d, NET_CFG_MAC + i);
    } else { /* locally administered, unicast */
        static const uint8_t local[6] = { 0x02, 0x6b, 0x76, 0x6d, 0x00, 0x01 };
        memcpy(net.mac, local, 6);
    }
    if (mac_given)
        memcpy(net.mac, mac_option, 6);
    if (virtio_has(d, VIRTIO_NET_F_MTU)) {
        unsigned mtu = virtio_cfg16(d, NET_CFG_MTU);
        kprintf("NET mtu=%u\n", mtu);
        if (mtu < IP_HLEN + UDP_HLEN + BENCH_PAYLOAD) {
            why = fail("device mtu %lu below %lu", mtu, IP_HLEN + UDP_HLEN + BENCH_PAYLOAD);
            goto failed;
        }
    }
    net.rx_bufs = net.pairs == 1 ? RX_BUFS_ONE_PAIR : RX_BUFS;
    for (unsigned i = 0; i < net.pairs; i++) {
        if ((why = virtio_setup_queue(d, 2 * i, false, &net.rx[i])) ||
            (why = virtio_setup_queue(d, 2 * i + 1, false, &net.tx[i])))
            goto failed;
        if (!(net.rxbuf[i] = dma_alloc((size_t)net.rx_bufs * BUF_SIZE, 4096))) {
            why = "out of memory";
            goto failed;
        }
    }
    if (mq && (why = virtio_setup_queue(d, 2 * max_pairs, false, &ctrl)))
        goto failed;
    if (!(net.txbuf = dma_alloc(net.uso ? USO_TXBUF : BUF_SIZE, 4096))) {
        why = "out of memory";
        goto failed;
    }
    /* Receive buffers before DRIVER_OK (5.1.5), on every queue that will be used. */
    for (unsigned q = 0; q < net.pairs; q++) {
        for (unsigned i = 0; i < net.rx_bufs && i < net.rx[q]->size; i++)
            rx_post(q, i);
    }
    virtio_driver_ok(d);
    for (unsigned q = 0; q < net.pairs; q++)
        vq_kick(net.rx[q]);
    if (mq && (why = ctrl_set_pairs(ctrl, net.pairs)))
        goto failed;

    kprintf("NET mac=%02x:%02x:%02x:%02x:%02x:%02x\n", net.mac[0], net.mac[1], net.mac[2], net.mac[3], net.mac[4],
            net.mac[5]);
    if (net.vlan)
        kprintf("NET vlan=%u\n", net.vlan);
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
    if (want_uso)
        kprintf("NET host_uso=%u\n", net.uso ? 1 : 0);
    return NULL;
failed:
    virtio_fail(d);
    virtio_reset(d);
    return why;
}

/* ---- frames ---- */

/* Destination, source (net.mac), the 802.1Q tag with kvmlet.net_vlan if set, the type; returns its length. */
static unsigned eth_header(uint8_t *f, const uint8_t *dst, uint16_t type)
{
    memcpy(f, dst, 6);
    memcpy(f + 6, net.mac, 6);
    if (net.vlan) {
        put16(f + 12, ETH_P_8021Q);
        put16(f + 14, net.vlan); /* PCP 0, DEI 0 */
        put16(f + 16, type);
        return ETH_HLEN + VLAN_HLEN;
    }
    put16(f + 12, type);
    return ETH_HLEN;
}

static unsigned l2_len(void) { return net.vlan ? ETH_HLEN + VLAN_HLEN : ETH_HLEN; }

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
    unsigned end = ETH_ZLEN + n - ETH_HLEN; /* the Ethernet minimum, still met once a tag is removed */
    memset(a + 28, 0, end - n - 28);
    return end;
}

/* An IPv4/UDP frame; the UDP checksum is left to the device when CSUM was negotiated. */
static unsigned build_udp_to(uint8_t *hdr_and_frame, const uint8_t *dst_mac, uint32_t dst_ip, uint16_t sport,
                             uint16_t dport, const uint8_t *payload, unsigned len)
{
    struct virtio_net_hdr *h = (void *)hdr_and_frame;
    uint8_t *f = hdr_and_frame + HDR_LEN;
    unsigned n = eth_header(f, dst_mac, ETH_P_IP);
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
    put32(ip + 16, dst_ip);
    put16(ip + 10, (uint16_t)~csum_fold(csum_add(0, ip, IP_HLEN)));
    put16(udp, sport);
    put16(udp + 2, dport);
    put16(udp + 4, (uint16_t)udp_len);
    put16(udp + 6, 0);
    if (payload && payload != udp + UDP_HLEN) /* NULL: the payload follows in another buffer (USO) */
        memcpy(udp + UDP_HLEN, payload, len);
    uint32_t pseudo = csum_add(0, ip + 12, 8) + 17 + udp_len;
    memset(h, 0, sizeof(*h));
    if (net.csum) {
        h->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        h->csum_start = (uint16_t)(n + IP_HLEN);
        h->csum_offset = 6;
        put16(udp + 6, csum_fold(pseudo));
    } else {
        uint16_t c = (uint16_t)~csum_fold(csum_add(pseudo, udp, udp_len));
        put16(udp + 6, c ? c : 0xffff);
    }
    return HDR_LEN + n + IP_HLEN + udp_len;
}

/* A datagram from LOCAL_PORT to the peer's kvmlet.net_port. */
static unsigned build_udp(uint8_t *hdr_and_frame, const uint8_t *payload, unsigned len)
{
    return build_udp_to(hdr_and_frame, net.peer_mac, net.peer, LOCAL_PORT, net.port, payload, len);
}

/*
 * The headers of a USO frame (virtio 1.2, 5.1.6.2: GSO type UDP_L4) carrying `segments` datagrams of
 * BENCH_PAYLOAD bytes to the peer, for a payload already in place after them or in the next buffer. Needs
 * HOST_USO (so CSUM): the UDP checksum field holds the pseudo-header sum over the whole length, as for any
 * NEEDS_CSUM frame; the segmenter adjusts it per datagram. One segment is a plain frame.
 */
static unsigned build_uso(uint8_t *hdr_and_headers, unsigned segments)
{
    unsigned len = build_udp_to(hdr_and_headers, net.peer_mac, net.peer, LOCAL_PORT, net.port, NULL,
                                segments * BENCH_PAYLOAD);
    struct virtio_net_hdr *h = (void *)hdr_and_headers;
    if (segments > 1) {
        h->gso_type = VIRTIO_NET_HDR_GSO_UDP_L4;
        h->gso_size = BENCH_PAYLOAD;
        h->hdr_len = (uint16_t)(l2_len() + IP_HLEN + UDP_HLEN);
    }
    return len;
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

/* A UDP datagram to net.ip: the echo (client), echoed back (serve) or counted (sink). */
static void handle_udp(const uint8_t *f, const uint8_t *ip, const uint8_t *udp, unsigned ulen)
{
    uint32_t src = get32(ip + 12);
    uint16_t sport = get16(udp), dport = get16(udp + 2);
    const uint8_t *data = udp + UDP_HLEN;
    unsigned len = ulen - UDP_HLEN;
    switch (net.mode) {
    case MODE_CLIENT:
        if (src == net.peer && sport == net.port && dport == LOCAL_PORT && net.echo_payload && len == net.echo_len &&
            memcmp(data, net.echo_payload, len) == 0)
            net.echo_ok = true;
        break;
    case MODE_SERVE:
        if (dport != net.port || HDR_LEN + l2_len() + IP_HLEN + ulen > BUF_SIZE)
            break;
        uint8_t src_mac[6];
        memcpy(src_mac, f + 6, 6);
        if (tx_send(build_udp_to(net.txbuf, src_mac, src, net.port, sport, data, len)))
            net.echoes++;
        break;
    case MODE_SINK:
        net.last_rx = rdtsc_now();
        if (!net.sink_frames++) {
            net.first_rx = net.last_rx;
            kprintf("BENCH net-udp-rx start\n");
        }
        net.sink_bytes += len;
        break;
    }
}

static void handle_frame(const uint8_t *f, unsigned len)
{
    if (len < ETH_HLEN)
        return;
    if (!(f[0] & 1) && memcmp(f, net.mac, 6) != 0)
        return; /* unicast to another station (a bridge floods until it learns) */
    uint16_t type = get16(f + 12);
    const uint8_t *p = f + ETH_HLEN;
    len -= ETH_HLEN;
    if (type == ETH_P_8021Q) { /* only our VLAN's frames, untagged here */
        if (len < VLAN_HLEN || !net.vlan || (get16(p) & 0xfff) != net.vlan)
            return;
        type = get16(p + 2);
        p += VLAN_HLEN;
        len -= VLAN_HLEN;
    }
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
    if (ihl < IP_HLEN || tot > len || tot < ihl + UDP_HLEN || get32(p + 16) != net.ip)
        return;
    if (get16(p + 6) & 0x3fff)
        return; /* a fragment */
    const uint8_t *udp = p + ihl;
    unsigned ulen = get16(udp + 4);
    if (ulen < UDP_HLEN || ulen > tot - ihl)
        return;
    handle_udp(f, p, udp, ulen);
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
    const char *why = net_open(false);
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
 *
 * With kvmlet.net_uso=1 and HOST_USO negotiated, each frame is a USO frame of
 * 44 datagrams (64768 payload bytes) that the device side segments; the last
 * one carries what is left (its headers in a buffer of their own, chained to
 * the same payload). kvmlet.loops still counts datagrams, so both modes move
 * the same data; the NET bench line says how many frames that took.
 */
static uint64_t user_net_bench(uint64_t unused)
{
    (void)unused;
    const char *why = net_open(virtio_option_u64("kvmlet.net_uso", 0) != 0);
    if (why)
        return (uint64_t)why;
    if ((why = resolve_peer()))
        goto out;
    uint64_t loops = virtio_option_u64("kvmlet.loops", 10000), sent = 0, before = net.tx_frames;
    unsigned per = net.uso ? USO_SEGMENTS : 1, rest = (unsigned)(loops % per);
    uint64_t frames = (loops + per - 1) / per;
    uint8_t *payload = net.txbuf + HDR_LEN + l2_len() + IP_HLEN + UDP_HLEN;
    for (unsigned i = 0; i < per * BENCH_PAYLOAD; i++)
        payload[i] = (uint8_t)(i % BENCH_PAYLOAD); /* every datagram the same, USO or not */
    struct vbuf b = { (uint64_t)net.txbuf, per > 1 ? build_uso(net.txbuf, per) : build_udp(net.txbuf, payload,
                                                                                          BENCH_PAYLOAD), false };
    struct vbuf last[2]; /* USO: the headers of the shorter last frame, then its payload */
    if (rest) {
        uint8_t *headers = dma_alloc(128, 64);
        if (!headers) {
            why = "out of memory";
            goto out;
        }
        last[0] = (struct vbuf){ (uint64_t)headers, build_uso(headers, rest) - rest * BENCH_PAYLOAD, false };
        last[1] = (struct vbuf){ (uint64_t)payload, rest * BENCH_PAYLOAD, false };
    }
    uint64_t limit = virtio_timeout_cycles(), last_progress = rdtsc_now();
    if (per > 1)
        kprintf("NET uso segments_per_frame=%u gso_size=%u frames=%lu\n", per, BENCH_PAYLOAD, frames);

    kprintf("BENCH net-udp-tx start\n");
    while (net.tx_frames - before < frames) {
        uint64_t done = net.tx_frames;
        tx_reclaim();
        for (unsigned q = 0; q < net.pairs; q++) {
            unsigned added = 0;
            while (sent < frames) {
                bool shorter = rest && sent == frames - 1;
                if ((shorter ? vq_add(net.tx[q], last, 2, 0) : vq_add(net.tx[q], &b, 1, 0)) < 0)
                    break;
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
            why = fail("timeout after %lu of %lu frames", net.tx_frames - before, frames);
            break;
        } else {
            cpu_pause();
        }
    }
    if (!why)
        kprintf("BENCH net-udp-tx done ops=%lu bytes=%lu\n", loops, loops * BENCH_PAYLOAD);
    kprintf("NET bench tx=%lu rx=%lu notifies=%lu uso=%u\n", net.tx_frames - before, net.rx_frames,
            net.tx[0]->notifies, per > 1 ? 1 : 0);
out:
    if (why)
        virtio_fail(net.d);
    virtio_reset(net.d);
    return (uint64_t)why;
}

const char *check_virtio_net_bench(void) { return (const char *)run_user(user_net_bench, 0); }

/*
 * virtio-net-serve: the peer of virtio-net. Answers ARP for kvmlet.net_ip and
 * echoes every UDP datagram to kvmlet.net_ip:kvmlet.net_port back to its
 * sender (MACs, addresses and ports swapped) until kvmlet.net_serve echoes
 * were sent; fails after the virtio timeout without an echo.
 */
static uint64_t user_net_serve(uint64_t unused)
{
    (void)unused;
    const char *why = net_open(false);
    if (why)
        return (uint64_t)why;
    net.mode = MODE_SERVE;
    uint64_t want = virtio_option_u64("kvmlet.net_serve", 1), limit = virtio_timeout_cycles();
    uint64_t last_progress = rdtsc_now(), echoes = 0;
    kprintf("NET serve ready ip=%u.%u.%u.%u port=%u\n", net.ip >> 24, (net.ip >> 16) & 255, (net.ip >> 8) & 255,
            net.ip & 255, net.port);
    while (net.echoes < want) {
        if (rx_poll(true)) {
            if (net.echoes != echoes) {
                echoes = net.echoes;
                last_progress = rdtsc_now();
            }
        } else if (rdtsc_now() - last_progress > limit) {
            why = fail("timeout: %lu of %lu echoes (no UDP datagram to the served port)", net.echoes, want);
            break;
        } else {
            cpu_pause();
        }
    }
    kprintf("NET served echoes=%lu\n", net.echoes);
    kprintf("NET frames tx=%lu rx=%lu\n", net.tx_frames, net.rx_frames);
    if (why)
        virtio_fail(net.d);
    virtio_reset(net.d);
    return (uint64_t)why;
}

const char *check_virtio_net_serve(void) { return (const char *)run_user(user_net_serve, 0); }

/*
 * virtio-net-sink: the receiving end of virtio-net-bench. Answers ARP and
 * counts IPv4/UDP frames to kvmlet.net_ip (any port) until kvmlet.loops
 * arrived or none for the idle period (kvmlet.net_idle_ms, default a fifth
 * of the virtio timeout; TSC cycles at the 4 GHz assumption). Passes when at
 * least one arrived. The host's start-to-done window includes the idle
 * period when it ended the loop: the NET sink line has the TSC cycles from
 * the first frame to the last.
 */
static uint64_t user_net_sink(uint64_t unused)
{
    (void)unused;
    const char *why = net_open(false);
    if (why)
        return (uint64_t)why;
    net.mode = MODE_SINK;
    uint64_t loops = virtio_option_u64("kvmlet.loops", 10000), limit = virtio_timeout_cycles();
    uint64_t idle = virtio_option_u64("kvmlet.net_idle_ms", 0) * TSC_PER_MS_MAX;
    if (!idle)
        idle = limit / 5;
    uint64_t waiting_since = rdtsc_now();
    bool idle_end = false;
    kprintf("NET serve ready ip=%u.%u.%u.%u sink loops=%lu\n", net.ip >> 24, (net.ip >> 16) & 255,
            (net.ip >> 8) & 255, net.ip & 255, loops);
    while (net.sink_frames < loops) {
        if (rx_poll(true))
            continue;
        uint64_t now = rdtsc_now();
        if (net.sink_frames ? now - net.last_rx > idle : now - waiting_since > limit) {
            idle_end = true;
            break;
        }
        cpu_pause();
    }
    if (net.sink_frames) {
        kprintf("BENCH net-udp-rx done ops=%lu bytes=%lu\n", net.sink_frames, net.sink_bytes);
    } else {
        why = "timeout: no UDP frame to the guest's address arrived";
    }
    kprintf("NET sink frames=%lu bytes=%lu cycles=%lu end=%s rx=%lu dropped=%lu\n", net.sink_frames, net.sink_bytes,
            net.last_rx - net.first_rx, idle_end ? "idle" : "loops", net.rx_frames, net.rx_dropped);
    if (why)
        virtio_fail(net.d);
    virtio_reset(net.d);
    return (uint64_t)why;
}

const char *check_virtio_net_sink(void) { return (const char *)run_user(user_net_sink, 0); }
