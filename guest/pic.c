/* 8259A PIC pair (remapped to vectors 0x20/0x28) and 8254 PIT channel 0 at 100 Hz. */
#include "guest.h"

#define PIC1_CMD  0x20
#define PIC1_DATA 0x21
#define PIC2_CMD  0xa0
#define PIC2_DATA 0xa1
#define PIC_EOI   0x20
#define PIC_READ_ISR 0x0b /* OCW3 */

#define PIT_CH0  0x40
#define PIT_MODE 0x43
#define PIT_HZ   1193182

volatile uint64_t ticks;
static void (*irq_handlers[16])(void);
static uint16_t irq_mask = 0xffff; /* bit set = masked; bit 2 (cascade) managed below */
static bool pic_ready;

static void pic_write_masks(void)
{
    uint16_t m = irq_mask;
    if ((m & 0xff00) != 0xff00)
        m &= ~(1u << 2); /* slave needs the cascade line */
    outb(PIC1_DATA, m & 0xff);
    outb(PIC2_DATA, m >> 8);
}

void pic_init(void)
{
    if (pic_ready)
        return;
    outb(PIC1_CMD, 0x11);      /* ICW1: edge, cascade, ICW4 needed */
    outb(PIC2_CMD, 0x11);
    outb(PIC1_DATA, VEC_IRQ0); /* ICW2: vector base */
    outb(PIC2_DATA, VEC_IRQ0 + 8);
    outb(PIC1_DATA, 0x04);     /* ICW3: slave on IRQ 2 */
    outb(PIC2_DATA, 0x02);     /* ICW3: slave identity 2 */
    outb(PIC1_DATA, 0x01);     /* ICW4: 8086 mode, normal EOI */
    outb(PIC2_DATA, 0x01);
    irq_mask = 0xffff;
    pic_write_masks();
    pic_ready = true;
}

void pic_unmask(int irq)
{
    irq_mask &= ~(1u << irq);
    pic_write_masks();
}

void pic_mask_all(void)
{
    irq_mask = 0xffff;
    pic_write_masks();
}

void irq_set_handler(int irq, void (*handler)(void)) { irq_handlers[irq] = handler; }

/* Called from trap_dispatch for vectors 0x20-0x2f. */
void pic_dispatch(int irq)
{
    if (irq == 7 || irq == 15) { /* spurious unless the ISR bit is really set */
        uint16_t cmd = irq == 7 ? PIC1_CMD : PIC2_CMD;
        outb(cmd, PIC_READ_ISR);
        if (!(inb(cmd) & 0x80)) {
            if (irq == 15)
                outb(PIC1_CMD, PIC_EOI); /* the master did see the cascade */
            return;
        }
    }
    if (irq_handlers[irq])
        irq_handlers[irq]();
    if (irq >= 8)
        outb(PIC2_CMD, PIC_EOI);
    outb(PIC1_CMD, PIC_EOI);
}

static void pit_tick(void) { ticks++; }

void pit_start_100hz(void)
{
    uint16_t divisor = (PIT_HZ + 50) / 100;
    irq_set_handler(0, pit_tick);
    outb(PIT_MODE, 0x34); /* channel 0, lobyte/hibyte, mode 2 (rate generator) */
    outb(PIT_CH0, divisor & 0xff);
    outb(PIT_CH0, divisor >> 8);
}
