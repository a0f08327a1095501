/* 8250/16550 UART at 0x3f8: polled output. */
#include "guest.h"

#define UART_THR 0 /* DLAB=0 */
#define UART_IER 1
#define UART_DLL 0 /* DLAB=1 */
#define UART_DLM 1
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define LSR_THRE 0x20
#define LSR_TEMT 0x40

void serial_init(void)
{
    /* Let the banner drain before reprogramming the line. Bounded: a VMM may not model TEMT. */
    for (int i = 0; i < 1000 && !(inb(COM1 + UART_LSR) & LSR_TEMT); i++)
        cpu_pause();
    outb(COM1 + UART_IER, 0x00);  /* no interrupts */
    outb(COM1 + UART_LCR, 0x80);  /* DLAB */
    outb(COM1 + UART_DLL, 0x01);  /* 115200 baud */
    outb(COM1 + UART_DLM, 0x00);
    outb(COM1 + UART_LCR, 0x03);  /* 8N1 */
    outb(COM1 + UART_MCR, 0x03);  /* DTR | RTS (OUT2 set when interrupts are used) */
}

void serial_putc(char c)
{
    while (!(inb(COM1 + UART_LSR) & LSR_THRE))
        cpu_pause();
    outb(COM1 + UART_THR, (uint8_t)c);
}

void serial_puts(const char *s)
{
    while (*s)
        serial_putc(*s++);
}
