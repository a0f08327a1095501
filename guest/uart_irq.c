/*
 * Interrupt-driven UART checks: uart-rx, uart-thre, echo. The UART raises
 * IRQ 4 through the 8259 (remapped to 0x20); PIT channel 0 at 100 Hz on IRQ 0
 * provides the timeouts. The CPU waits in hlt between interrupts.
 */
#include "guest.h"

#define UART_RBR 0
#define UART_IER 1
#define UART_IIR 2
#define UART_MCR 4
#define UART_LSR 5
#define UART_MSR 6
#define IER_RDI  0x01 /* received data available */
#define IER_THRI 0x02 /* transmit holding register empty */
#define MCR_DTR_RTS_OUT2 0x0b
#define LSR_DR   0x01

#define IIR_NO_INT 0x01
#define IIR_ID(iir) (((iir) >> 1) & 7)
#define IIR_MODEM  0 /* modem status */
#define IIR_THRE   1
#define IIR_RDA    2
#define IIR_LINE   3 /* receiver line status */
#define IIR_CTI    6 /* character timeout */

#define DEFAULT_TIMEOUT_S 20
#define TICK_HZ 100

static volatile uint8_t rx_ring[256];
static volatile uint8_t rx_head, rx_tail; /* uint8_t wraps with the ring */
static volatile bool thre_seen;
static char line[256];
static unsigned line_len;

static void uart_interrupt(void)
{
    for (int guard = 0; guard < 32; guard++) {
        uint8_t iir = inb(COM1 + UART_IIR);
        if (iir & IIR_NO_INT)
            break;
        switch (IIR_ID(iir)) {
        case IIR_THRE: /* reading IIR cleared it */
            thre_seen = true;
            break;
        case IIR_LINE:
            (void)inb(COM1 + UART_LSR);
            break;
        case IIR_MODEM:
            (void)inb(COM1 + UART_MSR);
            break;
        default: /* IIR_RDA, IIR_CTI */
            while (inb(COM1 + UART_LSR) & LSR_DR) {
                uint8_t c = inb(COM1 + UART_RBR);
                if ((uint8_t)(rx_head + 1) != rx_tail)
                    rx_ring[rx_head++] = c;
            }
        }
    }
}

static void irq_begin(uint8_t ier)
{
    cli();
    pic_init();
    pit_start_100hz();
    irq_set_handler(4, uart_interrupt);
    lapic_ensure_virtual_wire();
    outb(COM1 + UART_MCR, MCR_DTR_RTS_OUT2);
    outb(COM1 + UART_IER, ier);
    pic_unmask(0);
    pic_unmask(4);
    sti();
}

static void irq_end(void)
{
    cli();
    outb(COM1 + UART_IER, 0);
    pic_mask_all();
}

static uint64_t timeout_ticks(uint64_t default_s)
{
    return (opt.timeout_set ? opt.timeout_s : default_s) * TICK_HZ;
}

/* Moves received bytes into `line`; true when a non-empty line ended with \n or \r. */
static bool take_line(void)
{
    while (rx_tail != rx_head) {
        char c = rx_ring[rx_tail++];
        if (c == '\n' || c == '\r') {
            if (line_len) {
                line[line_len] = '\0';
                line_len = 0;
                return true;
            }
        } else if (line_len < sizeof(line) - 1) {
            line[line_len++] = c;
        }
    }
    return false;
}

/* Waits (hlt) for a line; timeout 0 waits forever. Interrupts must be on. */
static bool read_line(uint64_t timeout)
{
    uint64_t start = ticks;
    for (;;) {
        if (take_line())
            return true;
        cli();
        if (rx_tail != rx_head) {
            sti();
            continue;
        }
        if (timeout && ticks - start >= timeout) {
            sti();
            return false;
        }
        sti_hlt();
    }
}

const char *check_uart_rx(void)
{
    irq_begin(IER_RDI);
    kprintf("READY uart-rx\n");
    bool ok = read_line(timeout_ticks(DEFAULT_TIMEOUT_S));
    irq_end();
    if (!ok)
        return "timeout";
    kprintf("RX %s\n", line);
    return NULL;
}

const char *check_echo(void)
{
    uint64_t timeout = timeout_ticks(0);
    irq_begin(IER_RDI);
    kprintf("READY echo\n");
    for (;;) {
        if (!read_line(timeout)) {
            irq_end();
            return "timeout";
        }
        kprintf("ECHO %s\n", line);
        if (strcmp(line, "quit") == 0)
            break;
    }
    irq_end();
    return NULL;
}

const char *check_uart_thre(void)
{
    uint64_t timeout = timeout_ticks(DEFAULT_TIMEOUT_S);
    thre_seen = false;
    irq_begin(IER_THRI);
    uint64_t start = ticks;
    for (;;) {
        cli();
        if (thre_seen || (timeout && ticks - start >= timeout))
            break;
        sti_hlt();
    }
    irq_end();
    return thre_seen ? NULL : "timeout";
}
