/*
 * tpm: a TPM 2.0 behind the TIS (FIFO) interface at 0xFED40000, written from the TCG PC Client Platform TPM
 * Profile (the FIFO interface registers), the TCG ACPI Specification (the TPM2 table) and the TCG PC Client
 * Platform Firmware Profile (the crypto-agile event log).
 *
 * 1. ACPI: the "TPM2" table, found by acpi_find_table (acpi.c: RSDP -> XSDT, checksums); its start method must
 *    be 6 (TIS); LAML (offset 64) and LASA (offset 68) give the event log.
 * 2. TIS at locality 0: ACCESS.requestUse, wait for activeLocality; DID_VID and INTERFACE_ID printed. A request
 *    for locality 4 must not be granted (it belongs to the VMM, as TXT keeps it for the processor).
 * 3. The log: the Spec ID event (SHA-1 format) announces the banks and digest sizes; each TCG_PCR_EVENT2's
 *    SHA-256 digest is replayed (PCR = SHA-256(PCR || digest), from zero; EV_NO_ACTION skipped).
 * 4. TPM2_PCR_Read of every PCR the log touched (SHA-256 bank): each must equal its replayed value.
 * 5. TPM2_PCR_Extend of PCR 23 (SHA-256 bank, a password session with empty auth) with SHA-256("kvmlet-guest
 *    tpm check"), read back: must be SHA-256(old || digest).
 * Everything runs at CPL3; waits use a time guard (kvmlet.timeout, default 10 s).
 *
 * Output: `tpm tis did_vid=0x.. interface_id=0x..`, `tpm log lasa=0x.. laml=.. events=<n> banks=<n>`,
 * `tpm pcr <n> <64 hex> ok` per replayed PCR, `tpm locality4 refused`, `tpm extend pcr 23 <64 hex>`.
 */
#include "virtio.h" /* virtio_option_u64 */

#define TIS_BASE 0xfed40000ULL
#define TIS_LOCALITY(l) (TIS_BASE + 0x1000ULL * (l))
#define TIS_ACCESS 0x00
#define TIS_STS 0x18
#define TIS_FIFO 0x24
#define TIS_INTERFACE_ID 0x30
#define TIS_DID_VID 0xf00
#define ACCESS_REQUEST_USE 0x02
#define ACCESS_ACTIVE 0x20
#define ACCESS_VALID 0x80
#define STS_VALID 0x80
#define STS_READY 0x40
#define STS_GO 0x20
#define STS_AVAIL 0x10
#define STS_EXPECT 0x08

#define IDENTITY_MAP_END (4ULL << 30)
#define EV_NO_ACTION 3
#define ALG_SHA256 0x000b
#define TPM_BUF 4096
#define DEFAULT_WAIT_S 10
#define PCR_EXTENDED 23

static char reason[160];
static uint8_t cmd[TPM_BUF], rsp[TPM_BUF];

static const char *fail(const char *fmt, uint64_t a, uint64_t b)
{
    ksnprintf(reason, sizeof(reason), fmt, a, b);
    return reason;
}

/* ---- SHA-256 (FIPS 180-4) ---- */

struct sha256 {
    uint32_t h[8];
    uint8_t block[64];
    uint64_t length;
    unsigned used;
};

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
    0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
    0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
    0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
    0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
    0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
    0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2,
};

static inline uint32_t ror(uint32_t x, unsigned n) { return x >> n | x << (32 - n); }

static void sha256_block(struct sha256 *s, const uint8_t *p)
{
    uint32_t w[64], a, b, c, d, e, f, g, h;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3], e = s->h[4], f = s->h[5], g = s->h[6], h = s->h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint32_t t2 = (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    s->h[0] += a, s->h[1] += b, s->h[2] += c, s->h[3] += d, s->h[4] += e, s->h[5] += f, s->h[6] += g, s->h[7] += h;
}

static void sha256_init(struct sha256 *s)
{
    static const uint32_t iv[8] = { 0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19 };
    memcpy(s->h, iv, sizeof(iv));
    s->length = 0;
    s->used = 0;
}

static void sha256_update(struct sha256 *s, const void *data, size_t n)
{
    const uint8_t *p = data;
    s->length += n;
    while (n--) {
        s->block[s->used++] = *p++;
        if (s->used == 64) {
            sha256_block(s, s->block);
            s->used = 0;
        }
    }
}

static void sha256_final(struct sha256 *s, uint8_t out[32])
{
    uint64_t bits = s->length * 8;
    uint8_t pad = 0x80;
    sha256_update(s, &pad, 1);
    pad = 0;
    while (s->used != 56)
        sha256_update(s, &pad, 1);
    for (int i = 7; i >= 0; i--) {
        uint8_t b = (uint8_t)(bits >> (8 * i));
        sha256_update(s, &b, 1);
    }
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(s->h[i] >> 24);
        out[4 * i + 1] = (uint8_t)(s->h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(s->h[i] >> 8);
        out[4 * i + 3] = (uint8_t)s->h[i];
    }
}

static void pcr_extend(uint8_t pcr[32], const uint8_t digest[32])
{
    struct sha256 s;
    sha256_init(&s);
    sha256_update(&s, pcr, 32);
    sha256_update(&s, digest, 32);
    sha256_final(&s, pcr);
}

static void hex32(const uint8_t *d, char out[65])
{
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        out[2 * i] = hex[d[i] >> 4];
        out[2 * i + 1] = hex[d[i] & 15];
    }
    out[64] = '\0';
}

/* ---- ACPI: the TPM2 table ---- */

static uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

static const char *find_tpm2(uint64_t *lasa, uint32_t *laml)
{
    const struct acpi_header *h = acpi_find_table("TPM2");   /* checksum and length checked */
    if (!h)
        return "no TPM2 table in the XSDT";
    const uint8_t *t = (const uint8_t *)h;
    if (h->length < 76)
        return fail("TPM2 table: length %lu, less than 76", h->length, 0);
    if (rd32(t + 48) != 6)
        return fail("TPM2 table: start method %lu, not 6 (TIS)", rd32(t + 48), 0);
    *laml = rd32(t + 64);
    *lasa = rd64(t + 68);
    return NULL;
}

/* ---- TIS ---- */

static uint8_t tis_read8(unsigned loc, unsigned reg) { return *(volatile uint8_t *)phys(TIS_LOCALITY(loc) + reg); }
static void tis_write8(unsigned loc, unsigned reg, uint8_t v) { *(volatile uint8_t *)phys(TIS_LOCALITY(loc) + reg) = v; }
static uint32_t tis_read32(unsigned loc, unsigned reg) { return mmio_read32(TIS_LOCALITY(loc) + reg); }

static uint64_t wait_s;

/* Poll STS until (sts & mask) == want; false on timeout. */
static bool tis_wait(unsigned loc, uint32_t mask, uint32_t want)
{
    struct time_guard g;
    guard_start(&g, wait_s);
    for (;;) {
        if ((tis_read32(loc, TIS_STS) & mask) == want)
            return true;
        if (guard_expired(&g))
            return false;
    }
}

static const char *tis_request(unsigned loc)
{
    tis_write8(loc, TIS_ACCESS, ACCESS_REQUEST_USE);
    struct time_guard g;
    guard_start(&g, wait_s);
    while ((tis_read8(loc, TIS_ACCESS) & (ACCESS_VALID | ACCESS_ACTIVE)) != (ACCESS_VALID | ACCESS_ACTIVE))
        if (guard_expired(&g))
            return fail("timeout (locality %lu not granted, access 0x%lx)", loc, tis_read8(loc, TIS_ACCESS));
    return NULL;
}

/* One command: ready, write (burst by burst), go, wait, read. Returns the response size, or 0 (reason set). */
static size_t tis_command(unsigned loc, const uint8_t *c, size_t n, uint8_t *r, size_t max)
{
    tis_write8(loc, TIS_STS, STS_READY);
    if (!tis_wait(loc, STS_READY, STS_READY)) {
        fail("timeout (commandReady)", 0, 0);
        return 0;
    }
    size_t sent = 0;
    while (sent < n) {
        uint32_t burst = (tis_read32(loc, TIS_STS) >> 8) & 0xffff;
        if (!burst)
            continue;
        for (; burst && sent < n; burst--, sent++)
            tis_write8(loc, TIS_FIFO, c[sent]);
        uint32_t sts = tis_read32(loc, TIS_STS);
        if (sent < n && !(sts & STS_EXPECT)) {
            fail("Expect cleared after %lu of %lu bytes", sent, n);
            return 0;
        }
    }
    if (tis_read32(loc, TIS_STS) & STS_EXPECT) {
        fail("Expect still set after the whole command (%lu bytes)", n, 0);
        return 0;
    }
    tis_write8(loc, TIS_STS, STS_GO);
    if (!tis_wait(loc, STS_VALID | STS_AVAIL, STS_VALID | STS_AVAIL)) {
        fail("timeout (no response, sts 0x%lx)", tis_read32(loc, TIS_STS), 0);
        return 0;
    }
    size_t got = 0, size = 10;
    while (got < size && got < max) {
        r[got++] = tis_read8(loc, TIS_FIFO);
        if (got == 10) {
            size = (size_t)r[2] << 24 | (size_t)r[3] << 16 | (size_t)r[4] << 8 | r[5];
            if (size < 10 || size > max) {
                fail("response size %lu", size, 0);
                return 0;
            }
        }
    }
    if (tis_read32(loc, TIS_STS) & STS_AVAIL) {
        fail("dataAvail still set after the %lu-byte response", size, 0);
        return 0;
    }
    tis_write8(loc, TIS_STS, STS_READY);
    return got;
}

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)(v >> 16)); put16(p + 2, (uint16_t)v); }
static uint32_t get32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }

/* TPM2_PCR_Read of one SHA-256 PCR into out; NULL or a reason. */
static const char *pcr_read(unsigned pcr, uint8_t out[32])
{
    uint8_t *p = cmd;
    put16(p, 0x8001), put32(p + 2, 20), put32(p + 6, 0x17e);   /* TPM_ST_NO_SESSIONS, size, TPM_CC_PCR_Read */
    put32(p + 10, 1), put16(p + 14, ALG_SHA256), p[16] = 3;     /* TPML_PCR_SELECTION: one bank, 3 bytes */
    p[17] = p[18] = p[19] = 0;
    p[17 + pcr / 8] = (uint8_t)(1 << (pcr % 8));
    size_t n = tis_command(0, cmd, 20, rsp, sizeof(rsp));
    if (!n)
        return reason;
    if (get32(rsp + 6))
        return fail("TPM2_PCR_Read of PCR %lu: response code 0x%lx", pcr, get32(rsp + 6));
    /* updateCounter(4) TPML_PCR_SELECTION(4 + 2 + 1 + 3) TPML_DIGEST count(4) TPM2B size(2) digest */
    const uint8_t *d = rsp + 10 + 4 + 10;
    if (n < 10 + 4 + 10 + 4 + 2 + 32 || get32(d) != 1 || (d[4] << 8 | d[5]) != 32)
        return fail("TPM2_PCR_Read of PCR %lu: unexpected response (%lu bytes)", pcr, n);
    memcpy(out, d + 6, 32);
    return NULL;
}

/* TPM2_PCR_Extend of one PCR's SHA-256 bank with a password session (empty auth). */
static const char *pcr_extend_tpm(unsigned pcr, const uint8_t digest[32])
{
    uint8_t *p = cmd;
    size_t n = 10 + 4 + 4 + 9 + 4 + 2 + 32;
    put16(p, 0x8002), put32(p + 2, (uint32_t)n), put32(p + 6, 0x182);   /* TPM_ST_SESSIONS, TPM_CC_PCR_Extend */
    put32(p + 10, pcr);
    put32(p + 14, 9);                                                   /* authorization area size */
    put32(p + 18, 0x40000009), put16(p + 22, 0), p[24] = 0, put16(p + 25, 0); /* TPM_RS_PW, nonce, attrs, hmac */
    put32(p + 27, 1), put16(p + 31, ALG_SHA256);                        /* TPML_DIGEST_VALUES */
    memcpy(p + 33, digest, 32);
    if (!tis_command(0, cmd, n, rsp, sizeof(rsp)))
        return reason;
    if (get32(rsp + 6))
        return fail("TPM2_PCR_Extend of PCR %lu: response code 0x%lx", pcr, get32(rsp + 6));
    return NULL;
}

/* ---- the check ---- */

static uint8_t replayed[24][32];

static uint64_t user_tpm(uint64_t unused)
{
    (void)unused;
    uint64_t lasa;
    uint32_t laml;
    char hex[65];
    const char *why = find_tpm2(&lasa, &laml);
    if (why)
        return (uint64_t)why;
    uint32_t did_vid = tis_read32(0, TIS_DID_VID);
    if (did_vid == 0xffffffff || did_vid == 0)
        return (uint64_t)"no TIS registers at 0xfed40000";
    kprintf("tpm tis did_vid=0x%x interface_id=0x%x\n", did_vid, tis_read32(0, TIS_INTERFACE_ID));
    if ((why = tis_request(0)))
        return (uint64_t)why;

    /* the event log */
    if (!lasa || !laml || lasa + laml > IDENTITY_MAP_END)
        return (uint64_t)fail("bad log area lasa=0x%lx laml=%lu", lasa, laml);
    const uint8_t *log = phys(lasa), *end = log + laml;
    if (rd32(log) != 0 || rd32(log + 4) != EV_NO_ACTION || memcmp(log + 32, "Spec ID Event03", 16) != 0)
        return (uint64_t)"the log does not start with a Spec ID event";
    const uint8_t *spec = log + 32;
    uint32_t nalg = rd32(spec + 24);
    uint16_t alg_id[8], alg_size[8];
    if (nalg == 0 || nalg > 8)
        return (uint64_t)fail("Spec ID event lists %lu algorithms", nalg, 0);
    for (uint32_t i = 0; i < nalg; i++) {
        alg_id[i] = rd16(spec + 28 + 4 * i);
        alg_size[i] = rd16(spec + 30 + 4 * i);
    }
    const uint8_t *p = log + 32 + rd32(log + 28);
    uint32_t touched = 0, events = 0;
    memset(replayed, 0, sizeof(replayed));
    while (p + 12 <= end) {
        uint32_t pcr = rd32(p), type = rd32(p + 4), count = rd32(p + 8);
        if (!pcr && !type && !count)
            break;
        const uint8_t *q = p + 12, *sha = NULL;
        for (uint32_t i = 0; i < count; i++) {
            uint16_t alg = rd16(q);
            unsigned size = 0;
            for (uint32_t k = 0; k < nalg; k++)
                if (alg_id[k] == alg)
                    size = alg_size[k];
            if (!size)
                return (uint64_t)fail("event %lu: unknown algorithm 0x%lx", events, alg);
            if (alg == ALG_SHA256)
                sha = q + 2;
            q += 2 + size;
        }
        if (q + 4 > end)
            return (uint64_t)"the log runs past its area";
        q += 4 + rd32(q);
        if (pcr >= 24 || !sha)
            return (uint64_t)fail("event %lu: PCR %lu or no SHA-256 digest", events, pcr);
        if (type != EV_NO_ACTION) {
            pcr_extend(replayed[pcr], sha);
            touched |= 1u << pcr;
        }
        events++;
        p = q;
    }
    kprintf("tpm log lasa=0x%lx laml=%u events=%u banks=%u\n", lasa, laml, events, nalg);
    if (!touched)
        return (uint64_t)"the log has no measurement";

    /* the PCRs must be what the log replays to */
    for (unsigned pcr = 0; pcr < 24; pcr++) {
        if (!(touched & (1u << pcr)))
            continue;
        uint8_t value[32];
        if ((why = pcr_read(pcr, value)))
            return (uint64_t)why;
        hex32(value, hex);
        if (memcmp(value, replayed[pcr], 32) != 0) {
            char want[65];
            hex32(replayed[pcr], want);
            kprintf("tpm pcr %u %s replayed %s\n", pcr, hex, want);
            return (uint64_t)fail("PCR %lu differs from the replayed event log", pcr, 0);
        }
        kprintf("tpm pcr %u %s ok\n", pcr, hex);
    }

    /* locality 4 is the VMM's */
    tis_write8(4, TIS_ACCESS, ACCESS_REQUEST_USE);
    if (tis_read8(4, TIS_ACCESS) & ACCESS_ACTIVE)
        return (uint64_t)"locality 4 was granted to the guest";
    kprintf("tpm locality4 refused\n");

    /* extend PCR 23 and read it back */
    uint8_t before[32], after[32], digest[32];
    struct sha256 s;
    static const char label[] = "kvmlet-guest tpm check";
    sha256_init(&s);
    sha256_update(&s, label, sizeof(label) - 1);
    sha256_final(&s, digest);
    if ((why = pcr_read(PCR_EXTENDED, before)) || (why = pcr_extend_tpm(PCR_EXTENDED, digest)) ||
        (why = pcr_read(PCR_EXTENDED, after)))
        return (uint64_t)why;
    pcr_extend(before, digest);
    hex32(after, hex);
    kprintf("tpm extend pcr %u %s\n", PCR_EXTENDED, hex);
    if (memcmp(before, after, 32) != 0)
        return (uint64_t)"PCR 23 after TPM2_PCR_Extend is not SHA-256(old || digest)";
    tis_write8(0, TIS_ACCESS, ACCESS_ACTIVE); /* relinquish */
    return 0;
}

const char *check_tpm(void)
{
    wait_s = opt.timeout_set && opt.timeout_s ? opt.timeout_s : DEFAULT_WAIT_S;
    return (const char *)run_user(user_tpm, 0);
}
