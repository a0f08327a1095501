/*
 * vmgenid: the VM generation ID (Microsoft, "Virtual Machine Generation ID"; as QEMU, Hyper-V,
 * Firecracker and kvmlet provide it): 16 bytes of guest memory that the VMM changes when the VM is
 * restored from a snapshot or cloned.
 *
 * The address comes from ACPI (ACPI 6.5: chapter 5 for the tables, chapter 20 for AML). The RSDP is taken
 * from the boot information (boot_params.acpi_rsdp_addr or hvm_start_info.rsdp_paddr), else searched for
 * in the first KiB of the EBDA and in 0xE0000-0xFFFFF; then XSDT (RSDT for an ACPI 1.0 RSDP) -> FADT ->
 * DSDT (X_DSDT when set), then every SSDT the XSDT lists. Each table's signature, length and checksum are
 * checked. There is no AML interpreter: the AML is scanned byte by byte for
 *   Device:  5B 82 PkgLength NameString          (NameString's last NameSeg "VGEN")
 * and, inside the device's PkgLength,
 *   _HID/_CID: 08 "_HID"|"_CID" then a String (0D chars 00), or a Package (12 ...) of Strings;
 *              one of them must be "VMGENCTR" or "VM_Gen_Counter" (any case: Linux's driver IDs)
 *   ADDR:    08 "ADDR" 12 PkgLength 02 <int> <int>
 * where <int> is one of the constant forms Zero (00), One (01), ByteConst (0A b), WordConst (0B w),
 * DWordConst (0C d) or QWordConst (0E q): the low and the high 32 bits of the address. An ADDR that is a
 * Method (14 ..., QEMU's) would need an interpreter and fails the check.
 *
 * Then, unless kvmlet.vmgenid_wait=0, the 16 bytes are polled (pause between reads) until they change,
 * for kvmlet.timeout seconds (default 10, 0 = forever; a time_guard, so a restore's TSC jump does not
 * count). Everything runs at CPL3.
 */
#include "virtio.h" /* virtio_option_u64 */

#define IDENTITY_MAP_END (4ULL << 30)
#define SDT_HEADER_SIZE  36
#define VMGENID_SIZE     16
#define DEFAULT_WAIT_S   10

/* AML (ACPI 6.5, 20.2) */
#define AML_ZERO_OP       0x00
#define AML_ONE_OP        0x01
#define AML_NAME_OP       0x08
#define AML_BYTE_PREFIX   0x0a
#define AML_WORD_PREFIX   0x0b
#define AML_DWORD_PREFIX  0x0c
#define AML_STRING_PREFIX 0x0d
#define AML_QWORD_PREFIX  0x0e
#define AML_PACKAGE_OP    0x12
#define AML_METHOD_OP     0x14
#define AML_DUAL_NAME     0x2e
#define AML_MULTI_NAME    0x2f
#define AML_EXT_OP_PREFIX 0x5b
#define AML_DEVICE_OP     0x82
#define AML_ROOT_CHAR     '\\'
#define AML_PARENT_CHAR   '^'


struct vgen {
    uint64_t addr;
    char name[24];    /* the device's NameString, printable */
    char hid[24];     /* "-" if not a String */
    char cid[24];
    bool id_matches;  /* _HID or _CID is a vmgenid ID */
    const char *error; /* found the device, but its ADDR cannot be used */
};

static char reason[128];

static const char *fail(const char *fmt, uint64_t a, uint64_t b)
{
    ksnprintf(reason, sizeof(reason), fmt, a, b);
    return reason;
}

static uint8_t sum8(const uint8_t *p, size_t n)
{
    uint8_t s = 0;
    while (n--)
        s += *p++;
    return s;
}

static uint64_t get_u64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static uint32_t get_u32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* ---- tables ---- */

static bool rsdp_valid(uint64_t addr)
{
    const uint8_t *p = phys(addr);
    if (addr < 0x400 || addr + 36 > IDENTITY_MAP_END || memcmp(p, "RSD PTR ", 8) != 0 || sum8(p, 20) != 0)
        return false;
    if (p[15] >= 2) { /* ACPI 2.0+: the extended checksum over `length` bytes */
        uint32_t len = get_u32(p + 20);
        if (len < 36 || len > 4096 || sum8(p, len) != 0)
            return false;
    }
    return true;
}

static uint64_t scan_rsdp(uint64_t start, uint64_t end)
{
    for (uint64_t a = start; a + 20 <= end; a += 16)
        if (rsdp_valid(a))
            return a;
    return 0;
}

static uint64_t find_rsdp(const char **how)
{
    if (boot.rsdp_paddr) {
        if (rsdp_valid(boot.rsdp_paddr)) {
            *how = "boot";
            return boot.rsdp_paddr;
        }
        kprintf("vmgenid note: no valid RSDP at 0x%lx (boot information); searching\n", boot.rsdp_paddr);
    }
    *how = "scan";
    uint64_t ebda = (uint64_t)*(volatile uint16_t *)phys(0x40e) << 4, found = 0;
    if (ebda >= 0x80000 && ebda < 0xa0000)
        found = scan_rsdp(ebda, ebda + 1024);
    return found ? found : scan_rsdp(0xe0000, 0x100000);
}

/* The table at paddr after checking signature, length and checksum; NULL and *err otherwise. */
static const struct acpi_header *table_at(uint64_t paddr, const char *sig, const char **err)
{
    if (!paddr || paddr + SDT_HEADER_SIZE > IDENTITY_MAP_END) {
        *err = fail("%s at 0x%lx: outside the 4 GiB identity map", (uint64_t)sig, paddr);
        return NULL;
    }
    const struct acpi_header *h = phys(paddr);
    if (memcmp(h->signature, sig, 4) != 0) {
        *err = fail("no %s at 0x%lx (bad signature)", (uint64_t)sig, paddr);
        return NULL;
    }
    if (h->length < SDT_HEADER_SIZE || paddr + h->length > IDENTITY_MAP_END) {
        *err = fail("%s at 0x%lx: bad length", (uint64_t)sig, paddr);
        return NULL;
    }
    if (sum8((const uint8_t *)h, h->length) != 0) {
        *err = fail("%s at 0x%lx: bad checksum", (uint64_t)sig, paddr);
        return NULL;
    }
    return h;
}

/* ---- AML scan ---- */

/* PkgLength at p (20.2.4): its value (counting its own bytes) and how many bytes it takes. */
static bool pkg_length(const uint8_t *p, const uint8_t *end, uint32_t *value, unsigned *size)
{
    if (p >= end)
        return false;
    unsigned extra = p[0] >> 6;
    if (p + 1 + extra > end)
        return false;
    uint32_t v = p[0] & 0x3f;
    if (extra) {
        if (p[0] & 0x30) /* bits 5-4 are reserved in the multi-byte form */
            return false;
        v = p[0] & 0x0f;
        for (unsigned i = 0; i < extra; i++)
            v |= (uint32_t)p[1 + i] << (4 + 8 * i);
    }
    if (v < 1 + extra)
        return false;
    *value = v;
    *size = 1 + extra;
    return true;
}

static bool lead_name_char(uint8_t c) { return (c >= 'A' && c <= 'Z') || c == '_'; }
static bool name_char(uint8_t c) { return lead_name_char(c) || (c >= '0' && c <= '9'); }

/* NameString at p (20.2.2): its length, and its last NameSeg (NULL for NullName). */
static bool name_string(const uint8_t *p, const uint8_t *end, unsigned *len, const uint8_t **last)
{
    const uint8_t *s = p;
    unsigned segs;
    if (s < end && *s == AML_ROOT_CHAR)
        s++;
    else
        while (s < end && *s == AML_PARENT_CHAR)
            s++;
    if (s >= end)
        return false;
    if (*s == AML_DUAL_NAME) {
        segs = 2;
        s++;
    } else if (*s == AML_MULTI_NAME) {
        if (s + 1 >= end)
            return false;
        segs = s[1];
        s += 2;
    } else if (*s == 0) { /* NullName */
        segs = 0;
        s++;
    } else {
        segs = 1;
    }
    if (s + 4 * (size_t)segs > end)
        return false;
    for (unsigned i = 0; i < segs; i++) {
        const uint8_t *seg = s + 4 * i;
        if (!lead_name_char(seg[0]) || !name_char(seg[1]) || !name_char(seg[2]) || !name_char(seg[3]))
            return false;
    }
    *last = segs ? s + 4 * (segs - 1) : NULL;
    *len = (unsigned)(s + 4 * segs - p);
    return true;
}

/* An integer constant at p: its value and size. */
static bool aml_integer(const uint8_t *p, const uint8_t *end, uint64_t *value, unsigned *size)
{
    static const unsigned data_bytes[] = { [AML_BYTE_PREFIX] = 1, [AML_WORD_PREFIX] = 2, [AML_DWORD_PREFIX] = 4,
                                           [AML_QWORD_PREFIX] = 8 };
    if (p >= end)
        return false;
    if (*p == AML_ZERO_OP || *p == AML_ONE_OP) {
        *value = *p;
        *size = 1;
        return true;
    }
    if (*p < AML_BYTE_PREFIX || *p > AML_QWORD_PREFIX || *p == AML_STRING_PREFIX)
        return false;
    unsigned n = data_bytes[*p];
    if (p + 1 + n > end)
        return false;
    uint64_t v = 0;
    for (unsigned i = 0; i < n; i++)
        v |= (uint64_t)p[1 + i] << (8 * i);
    *value = v;
    *size = 1 + n;
    return true;
}

/* A String at p (0D chars 00) copied, printable, into out; false if p holds no String. */
static bool aml_string(const uint8_t *p, const uint8_t *end, char *out, size_t out_size, unsigned *size)
{
    if (p >= end || *p != AML_STRING_PREFIX)
        return false;
    const uint8_t *s = p + 1;
    size_t n = 0;
    while (s < end && *s) {
        if (*s > 0x7f)
            return false;
        if (n + 1 < out_size)
            out[n++] = (*s >= ' ' && *s < 0x7f) ? (char)*s : '?';
        s++;
    }
    if (s >= end)
        return false;
    out[n] = '\0';
    *size = (unsigned)(s + 1 - p);
    return true;
}

static bool same_id(const char *a, const char *b)
{
    for (; *a && *b; a++, b++) {
        char x = *a >= 'a' && *a <= 'z' ? *a - 32 : *a, y = *b >= 'a' && *b <= 'z' ? *b - 32 : *b;
        if (x != y)
            return false;
    }
    return *a == *b;
}

static bool vmgenid_id(const char *id) { return same_id(id, "VMGENCTR") || same_id(id, "VM_Gen_Counter"); }

/* Finds `08 <seg>` in [p, end); returns what follows the NameSeg, or NULL. */
static const uint8_t *find_name(const uint8_t *p, const uint8_t *end, const char *seg)
{
    for (; p + 5 <= end; p++)
        if (p[0] == AML_NAME_OP && memcmp(p + 1, seg, 4) == 0)
            return p + 5;
    return NULL;
}

/* _HID or _CID of the device body [p, end): prints the first String into out; true if any String is a
 * vmgenid ID (a _CID may be a Package of Strings). */
static bool device_id(const uint8_t *p, const uint8_t *end, const char *seg, char *out, size_t out_size)
{
    const uint8_t *v = find_name(p, end, seg);
    char id[24];
    unsigned size, len;
    uint32_t plen;
    ksnprintf(out, out_size, "-");
    if (!v || v >= end)
        return false;
    if (aml_string(v, end, out, out_size, &size))
        return vmgenid_id(out);
    if (*v != AML_PACKAGE_OP || !pkg_length(v + 1, end, &plen, &len) || v + 1 + plen > end)
        return false;
    bool match = false, first = true;
    for (const uint8_t *q = v + 1 + len + 1; q < v + 1 + plen; q++) {
        if (aml_string(q, v + 1 + plen, id, sizeof(id), &size)) {
            if (first)
                ksnprintf(out, out_size, "%s", id);
            first = false;
            match |= vmgenid_id(id);
            q += size - 1;
        }
    }
    return match;
}

/* The device body [p, end): its ADDR package, or why it cannot be used. */
static const char *device_addr(const uint8_t *p, const uint8_t *end, uint64_t *addr)
{
    const uint8_t *v = find_name(p, end, "ADDR");
    uint32_t plen;
    unsigned len, n1, n2;
    uint64_t low, high;
    if (!v) {
        for (const uint8_t *q = p; q + 2 < end; q++) {
            uint32_t mlen;
            unsigned msize, nlen;
            const uint8_t *last;
            if (q[0] == AML_METHOD_OP && pkg_length(q + 1, end, &mlen, &msize) &&
                name_string(q + 1 + msize, end, &nlen, &last) && last && memcmp(last, "ADDR", 4) == 0)
                return "ADDR is a Method (needs an AML interpreter)";
        }
        return "VGEN device has no Name(ADDR, ...)";
    }
    if (v >= end || *v != AML_PACKAGE_OP)
        return "ADDR is not a Package";
    if (!pkg_length(v + 1, end, &plen, &len) || v + 1 + plen > end)
        return "ADDR Package has a bad PkgLength";
    const uint8_t *q = v + 1 + len, *pend = v + 1 + plen;
    if (q >= pend || *q != 2)
        return "ADDR Package does not have 2 elements";
    q++;
    if (!aml_integer(q, pend, &low, &n1) || !aml_integer(q + n1, pend, &high, &n2))
        return "ADDR Package elements are not integer constants";
    if (q + n1 + n2 != pend)
        return "ADDR Package length does not match its elements";
    *addr = (low & 0xffffffffULL) | (high << 32);
    return NULL;
}

/* A NameString as ASL writes it: \\_SB_.VGEN */
static void format_name(const uint8_t *s, unsigned len, char *out, size_t size)
{
    const uint8_t *end = s + len;
    size_t k = 0;
    while (s < end && (*s == AML_ROOT_CHAR || *s == AML_PARENT_CHAR) && k + 1 < size)
        out[k++] = (char)*s++;
    if (s < end && *s == AML_MULTI_NAME)
        s += 2;
    else if (s < end && (*s == AML_DUAL_NAME || *s == 0))
        s++;
    for (bool first = true; s + 4 <= end; s += 4, first = false) {
        if (!first && k + 1 < size)
            out[k++] = '.';
        for (int i = 0; i < 4 && k + 1 < size; i++)
            out[k++] = (char)s[i];
    }
    out[k] = '\0';
}

/* Scans an AML block for the VGEN device; true if one was found (*out filled). */
static bool scan_aml(const uint8_t *aml, const uint8_t *end, struct vgen *out)
{
    for (const uint8_t *p = aml; p + 2 < end; p++) {
        uint32_t plen;
        unsigned size, nlen;
        const uint8_t *last;
        if (p[0] != AML_EXT_OP_PREFIX || p[1] != AML_DEVICE_OP)
            continue;
        if (!pkg_length(p + 2, end, &plen, &size) || p + 2 + plen > end)
            continue;
        const uint8_t *name = p + 2 + size, *dend = p + 2 + plen;
        if (!name_string(name, dend, &nlen, &last) || !last || memcmp(last, "VGEN", 4) != 0)
            continue;
        format_name(name, nlen, out->name, sizeof(out->name));
        const uint8_t *body = name + nlen;
        out->id_matches = device_id(body, dend, "_HID", out->hid, sizeof(out->hid));
        out->id_matches |= device_id(body, dend, "_CID", out->cid, sizeof(out->cid));
        out->error = device_addr(body, dend, &out->addr);
        return true;
    }
    return false;
}

/* Walks RSDP -> XSDT/RSDT -> FADT -> DSDT, then the SSDTs, for the VGEN device. */
static const char *find_vgen(struct vgen *dev)
{
    const char *how, *err = NULL;
    uint64_t rsdp = find_rsdp(&how);
    if (!rsdp)
        return "no ACPI RSDP (boot information, EBDA, 0xE0000-0xFFFFF)";
    const uint8_t *r = phys(rsdp);
    bool xsdt = r[15] >= 2 && get_u64(r + 24) != 0;
    uint64_t root_addr = xsdt ? get_u64(r + 24) : get_u32(r + 16);
    const struct acpi_header *root = table_at(root_addr, xsdt ? "XSDT" : "RSDT", &err);
    if (!root)
        return err;
    unsigned entry_size = xsdt ? 8 : 4, n = (root->length - SDT_HEADER_SIZE) / entry_size;
    const uint8_t *entries = (const uint8_t *)root + SDT_HEADER_SIZE;
    uint64_t dsdt_addr = 0;
    for (unsigned i = 0; i < n && !dsdt_addr; i++) {
        uint64_t a = xsdt ? get_u64(entries + 8 * i) : get_u32(entries + 4 * i);
        const struct acpi_header *h = a && a + SDT_HEADER_SIZE <= IDENTITY_MAP_END ? phys(a) : NULL;
        if (!h || memcmp(h->signature, "FACP", 4) != 0)
            continue;
        const struct acpi_header *fadt = table_at(a, "FACP", &err);
        if (!fadt)
            return err;
        const uint8_t *f = (const uint8_t *)fadt;
        dsdt_addr = fadt->length >= 148 ? get_u64(f + 140) : 0; /* X_DSDT */
        if (!dsdt_addr)
            dsdt_addr = get_u32(f + 40);                            /* DSDT */
        if (!dsdt_addr)
            return "FADT has no DSDT";
    }
    if (!dsdt_addr)
        return fail("no FADT in the %s at 0x%lx", (uint64_t)(xsdt ? "XSDT" : "RSDT"), root_addr);
    const struct acpi_header *dsdt = table_at(dsdt_addr, "DSDT", &err);
    if (!dsdt)
        return err;
    kprintf("vmgenid tables rsdp=0x%lx (%s) %s=0x%lx dsdt=0x%lx\n", rsdp, how, xsdt ? "xsdt" : "rsdt", root_addr,
            dsdt_addr);
    if (scan_aml((const uint8_t *)dsdt + SDT_HEADER_SIZE, (const uint8_t *)dsdt + dsdt->length, dev))
        return NULL;
    for (unsigned i = 0; i < n; i++) {
        uint64_t a = xsdt ? get_u64(entries + 8 * i) : get_u32(entries + 4 * i);
        const struct acpi_header *h = a && a + SDT_HEADER_SIZE <= IDENTITY_MAP_END ? phys(a) : NULL;
        if (!h || memcmp(h->signature, "SSDT", 4) != 0)
            continue;
        const struct acpi_header *ssdt = table_at(a, "SSDT", &err);
        if (ssdt && scan_aml((const uint8_t *)ssdt + SDT_HEADER_SIZE, (const uint8_t *)ssdt + ssdt->length, dev))
            return NULL;
    }
    return "no VGEN device in the DSDT or an SSDT";
}

/* ---- the check ---- */

static void read_id(uint64_t addr, uint8_t out[VMGENID_SIZE])
{
    const volatile uint64_t *p = phys(addr);
    uint64_t w[2] = { p[0], p[1] };
    memcpy(out, w, VMGENID_SIZE);
}

static void format_id(const uint8_t id[VMGENID_SIZE], char out[2 * VMGENID_SIZE + 1])
{
    static const char hex[] = "0123456789abcdef";
    for (unsigned i = 0; i < VMGENID_SIZE; i++) {
        out[2 * i] = hex[id[i] >> 4];
        out[2 * i + 1] = hex[id[i] & 15];
    }
    out[2 * VMGENID_SIZE] = '\0';
}

static void short_pause(void)
{
    for (int i = 0; i < 64; i++)
        cpu_pause();
}

static uint64_t user_vmgenid(uint64_t unused)
{
    (void)unused;
    static struct vgen dev;
    uint8_t first[VMGENID_SIZE], now[VMGENID_SIZE], again[VMGENID_SIZE];
    char text[2 * VMGENID_SIZE + 1];
    const char *why = find_vgen(&dev);
    if (why)
        return (uint64_t)why;
    kprintf("vmgenid device %s hid=%s cid=%s\n", dev.name, dev.hid, dev.cid);
    if (!dev.id_matches)
        return (uint64_t)"VGEN device has neither _HID nor _CID VMGENCTR or VM_Gen_Counter";
    if (dev.error)
        return (uint64_t)dev.error;
    uint64_t addr = dev.addr;
    if (addr % 8 || (addr & 4095) + VMGENID_SIZE > 4096)
        return (uint64_t)fail("address 0x%lx is not 8-byte aligned within one page", addr, 0);
    if (!addr || addr + VMGENID_SIZE > IDENTITY_MAP_END)
        return (uint64_t)fail("address 0x%lx is outside the 4 GiB identity map", addr, 0);
    read_id(addr, first);
    format_id(first, text);
    kprintf("vmgenid: %s\n", text);
    kprintf("vmgenid addr=0x%lx\n", addr);
    uint8_t zero[VMGENID_SIZE] = { 0 };
    if (memcmp(first, zero, VMGENID_SIZE) == 0)
        return (uint64_t)"generation ID is all zero (the VMM wrote none)";

    if (!virtio_option_u64("kvmlet.vmgenid_wait", 1))
        return 0;
    uint64_t seconds = opt.timeout_set ? opt.timeout_s : DEFAULT_WAIT_S;
    kprintf("vmgenid waiting (timeout %lu s)\n", seconds);
    struct time_guard guard;
    guard_start(&guard, seconds);
    for (;;) {
        short_pause();
        read_id(addr, now);
        if (memcmp(now, first, VMGENID_SIZE) != 0)
            break;
        if (guard_expired(&guard))
            return (uint64_t)fail("timeout (generation ID unchanged after %lu s)", seconds, 0);
    }
    /* The VMM may be writing the 16 bytes right now: read until two reads in a row agree. */
    for (int tries = 0; tries < 1000; tries++) {
        short_pause();
        read_id(addr, again);
        if (memcmp(again, now, VMGENID_SIZE) == 0)
            break;
        memcpy(now, again, VMGENID_SIZE);
    }
    format_id(now, text);
    kprintf("vmgenid changed: %s\n", text);
    return 0;
}

const char *check_vmgenid(void) { return (const char *)run_user(user_vmgenid, 0); }
