/*
 * ctrlaltdel: waits for the VMM to press Ctrl+Alt+Del on the PS/2 keyboard (Firecracker's SendCtrlAltDel).
 * Written from the 8042 keyboard controller and PS/2 keyboard specifications (IBM PS/2 Technical Reference):
 * each keyboard byte waits in the controller's output buffer (port 0x60, status bit 0) and raises IRQ 1 while
 * command byte bit 0 is set; with command byte bit 6 (translation, the firmware default) the controller turns
 * the keyboard's scan code set 2 into set 1 (release = make | 0x80), else set 2 arrives (release = F0 make).
 * IRQ 1 comes through the 8259 (vector 0x21); PIT channel 0 at 100 Hz on IRQ 0 provides the timeout.
 */
#include "guest.h"

#define I8042_DATA    0x60
#define I8042_STATUS  0x64 /* read */
#define I8042_COMMAND 0x64 /* write */
#define STATUS_OBF    0x01 /* a byte waits at port 0x60 */
#define STATUS_IBF    0x02 /* the controller has not taken the last byte written */
#define STATUS_AUX    0x20 /* the waiting byte is from the aux (mouse) port */
#define CMD_READ_CONFIG  0x20
#define CMD_WRITE_CONFIG 0x60
#define CONFIG_KBD_INT      0x01
#define CONFIG_KBD_DISABLED 0x10
#define CONFIG_TRANSLATE    0x40
#define KBD_IRQ 1

#define PREFIX_EXTENDED 0xe0 /* right Ctrl/Alt, the Delete of the edit block */
#define PREFIX_BREAK    0xf0 /* set 2: the next byte is a release */
#define SET1_BREAK_BIT  0x80 /* set 1: a release is the make code | 0x80 */

#define DEFAULT_TIMEOUT_S 10
#define TICK_HZ 100
#define RELEASE_TICKS 20 /* after the Delete press, how long to wait for the releases (0.2 s) */
#define SPIN 100000      /* status polls while waiting for the controller */
#define SHOWN_BYTES 24

enum key { KEY_OTHER, KEY_CTRL, KEY_ALT, KEY_DEL };
#define HELD(k) (1u << (k))

static volatile uint8_t rx_ring[256];
static volatile uint8_t rx_head, rx_tail; /* uint8_t wraps with the ring */
static volatile uint32_t interrupts;
static char reason[96];

static void kbd_interrupt(void)
{
    interrupts++;
    for (int guard = 0; guard < 16; guard++) {
        uint8_t status = inb(I8042_STATUS);
        if (!(status & STATUS_OBF))
            break;
        uint8_t b = inb(I8042_DATA);
        if (!(status & STATUS_AUX) && (uint8_t)(rx_head + 1) != rx_tail)
            rx_ring[rx_head++] = b;
    }
}

static bool wait_status(uint8_t mask, uint8_t value)
{
    for (int i = 0; i < SPIN; i++) {
        if ((inb(I8042_STATUS) & mask) == value)
            return true;
        cpu_pause();
    }
    return false;
}

static bool read_config(uint8_t *config)
{
    for (int i = 0; i < 32 && (inb(I8042_STATUS) & STATUS_OBF); i++) /* flush */
        (void)inb(I8042_DATA);
    if (!wait_status(STATUS_IBF, 0))
        return false;
    outb(I8042_COMMAND, CMD_READ_CONFIG);
    if (!wait_status(STATUS_OBF, STATUS_OBF))
        return false;
    *config = inb(I8042_DATA);
    return true;
}

static bool write_config(uint8_t config)
{
    if (!wait_status(STATUS_IBF, 0))
        return false;
    outb(I8042_COMMAND, CMD_WRITE_CONFIG);
    if (!wait_status(STATUS_IBF, 0))
        return false;
    outb(I8042_DATA, config);
    return wait_status(STATUS_IBF, 0);
}

/* One byte into the scan code decoder; true when it completes a key press or release. */
static bool decode(bool set1, bool *release_pending, uint8_t b, enum key *key, bool *down)
{
    if (b == PREFIX_EXTENDED) /* either Ctrl, either Alt, either Delete counts: the prefix changes nothing */
        return false;
    if (!set1 && b == PREFIX_BREAK) {
        *release_pending = true;
        return false;
    }
    uint8_t code = set1 ? b & ~SET1_BREAK_BIT : b;
    *down = set1 ? !(b & SET1_BREAK_BIT) : !*release_pending;
    *release_pending = false;
    if (code == (set1 ? 0x1d : 0x14))
        *key = KEY_CTRL;
    else if (code == (set1 ? 0x38 : 0x11))
        *key = KEY_ALT;
    else if (code == (set1 ? 0x53 : 0x71))
        *key = KEY_DEL;
    else
        *key = KEY_OTHER;
    return true;
}

/* Appends " xx" for each byte seen (the first SHOWN_BYTES of them). */
static void show_byte(char *text, size_t size, unsigned count, uint8_t b)
{
    if (count < SHOWN_BYTES)
        ksnprintf(text + strlen(text), size - strlen(text), " %02x", b);
}

const char *check_ctrlaltdel(void)
{
    uint64_t timeout = (opt.timeout_set ? opt.timeout_s : DEFAULT_TIMEOUT_S) * TICK_HZ; /* 0: none */
    uint8_t config;
    char bytes[3 * SHOWN_BYTES + 1] = "";

    cli();
    pic_init();
    pit_start_100hz();
    irq_set_handler(KBD_IRQ, kbd_interrupt);
    lapic_ensure_virtual_wire();
    rx_head = rx_tail = 0;
    interrupts = 0;
    if (!read_config(&config) || !write_config((config | CONFIG_KBD_INT) & ~CONFIG_KBD_DISABLED)) {
        irq_set_handler(KBD_IRQ, NULL);
        ksnprintf(reason, sizeof(reason), "no i8042 answers (status 0x%02x)", inb(I8042_STATUS));
        return reason;
    }
    bool set1 = config & CONFIG_TRANSLATE;
    kprintf("KBD config=0x%02x set=%d\n", config, set1 ? 1 : 2);
    pic_unmask(0);
    pic_unmask(KBD_IRQ);
    sti();
    kprintf("ctrlaltdel: waiting\n");

    bool release_pending = false, pressed = false;
    unsigned held = 0, count = 0;
    uint64_t start = ticks, pressed_at = 0;
    for (;;) {
        cli();
        while (rx_tail != rx_head) {
            uint8_t b = rx_ring[rx_tail++];
            enum key key;
            bool down;
            show_byte(bytes, sizeof(bytes), count++, b);
            if (!decode(set1, &release_pending, b, &key, &down) || key == KEY_OTHER)
                continue;
            held = down ? held | HELD(key) : held & ~HELD(key);
            if (key == KEY_DEL && down && (held & HELD(KEY_CTRL)) && (held & HELD(KEY_ALT)) && !pressed) {
                pressed = true;
                pressed_at = ticks;
            }
        }
        if (pressed && (!held || ticks - pressed_at >= RELEASE_TICKS)) /* the releases are optional */
            break;
        if (!pressed && timeout && ticks - start >= timeout)
            break;
        sti_hlt();
    }
    bool waiting = inb(I8042_STATUS) & STATUS_OBF;
    pic_mask_all();
    irq_set_handler(KBD_IRQ, NULL);
    write_config(config);
    kprintf("KBD interrupts=%u bytes=%u:%s\n", interrupts, count, bytes);
    if (pressed)
        return NULL;
    if (!count)
        return waiting ? "timeout (a byte waits at port 0x60 but no IRQ 1 came)" : "timeout (no keyboard byte)";
    ksnprintf(reason, sizeof(reason), "timeout (%u bytes, no Ctrl+Alt+Del)", count);
    return reason;
}
