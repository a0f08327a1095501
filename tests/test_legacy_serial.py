"""The 16550A UART, driven through its registers the way a guest driver drives it."""

from __future__ import annotations

import threading

import pytest

from kvmlet.devices.bus import Bus
from kvmlet.devices.irq import NullInterrupt
from kvmlet.devices.legacy.console import BufferConsole
from kvmlet.devices.legacy.ports import register_claims
from kvmlet.devices.legacy.serial import COM1_PORT, Serial8250

THR = RBR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IIR_NONE, IIR_MSR, IIR_THRE, IIR_RDA, IIR_RLS = 0x01, 0x00, 0x02, 0x04, 0x06
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10


class Guest:
    """Port I/O on one UART, as a guest's driver sees it."""

    def __init__(self, *, rx_capacity: int = 64 * 1024, out2_gates_irq: bool = False) -> None:
        self.irq = NullInterrupt()
        self.console = BufferConsole()
        self.uart = Serial8250(self.irq, self.console, rx_capacity=rx_capacity, out2_gates_irq=out2_gates_irq)

    def outb(self, register: int, value: int) -> None:
        self.uart.bus_write(register, 1, value)

    def inb(self, register: int) -> int:
        return self.uart.bus_read(register, 1)

    def puts(self, text: bytes) -> None:
        for byte in text:
            while not self.inb(LSR) & LSR_THRE:
                pass
            self.outb(THR, byte)

    def read_available(self) -> bytes:
        data = bytearray()
        while self.inb(LSR) & LSR_DR:
            data.append(self.inb(RBR))
        return bytes(data)


@pytest.fixture
def guest() -> Guest:
    return Guest()


def test_divisor_latch_and_line_control(guest: Guest) -> None:
    guest.outb(IER, 0x05)
    guest.outb(LCR, 0x80)  # DLAB
    guest.outb(DLL, 0x01)
    guest.outb(DLM, 0x00)
    assert guest.inb(DLL) == 0x01 and guest.inb(DLM) == 0x00
    guest.outb(LCR, 0x03)  # 8N1, DLAB off
    assert guest.inb(LCR) == 0x03
    assert guest.inb(IER) == 0x05  # IER was not touched by the DLM write
    assert guest.uart.baud_rate == 115200
    guest.outb(LCR, 0x80)
    guest.outb(DLL, 0x0C)
    guest.outb(LCR, 0x03)
    assert guest.uart.baud_rate == 9600
    guest.puts(b"x")  # a DLL write is not output
    assert guest.console.output() == b"x"


def test_transmit_reaches_the_console(guest: Guest) -> None:
    guest.puts(b"Hello, kvmlet\r\n")
    assert guest.console.output() == b"Hello, kvmlet\r\n"
    assert guest.inb(LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT
    stats = guest.uart.stats()
    assert stats.bytes_out == 15 and stats.interrupts == 0


def test_first_byte_hook_runs_once() -> None:
    calls: list[bytes] = []
    console = BufferConsole()
    uart = Serial8250(NullInterrupt(), console, on_first_byte=lambda: calls.append(console.output()))
    uart.bus_write(MCR, 1, MCR_LOOP)
    uart.bus_write(THR, 1, ord("l"))  # looped back, not output
    uart.bus_write(MCR, 1, 0)
    assert calls == []
    for byte in b"ab":
        uart.bus_write(THR, 1, byte)
    assert calls == [b"a"]


def test_line_status_and_receive_fifo(guest: Guest) -> None:
    assert guest.inb(LSR) == LSR_THRE | LSR_TEMT
    assert guest.uart.enqueue_input(b"abc") == 3
    assert guest.inb(LSR) == LSR_DR | LSR_THRE | LSR_TEMT
    assert guest.inb(RBR) == ord("a")
    assert guest.read_available() == b"bc"
    assert guest.inb(LSR) & LSR_DR == 0
    assert guest.inb(RBR) == 0  # empty
    stats = guest.uart.stats()
    assert (stats.bytes_in, stats.bytes_read) == (3, 3)


def test_overrun_is_reported_once_and_cleared_by_reading_lsr() -> None:
    guest = Guest(rx_capacity=4)
    assert guest.uart.enqueue_input(b"123456") == 4
    assert guest.uart.rx_space() == 0
    assert guest.inb(LSR) == LSR_DR | LSR_OE | LSR_THRE | LSR_TEMT
    assert guest.inb(LSR) == LSR_DR | LSR_THRE | LSR_TEMT
    assert guest.read_available() == b"1234"
    assert guest.uart.stats().bytes_dropped == 2


def test_interrupt_priorities_and_clearing_rules(guest: Guest) -> None:
    small = Guest(rx_capacity=1)
    small.outb(IER, 0x0F)  # all sources; THR empty becomes pending at once
    assert small.inb(IIR) == IIR_THRE
    small.outb(IER, 0x00)
    small.outb(IER, 0x0F)  # re-arm THRE
    small.uart.enqueue_input(b"xy")  # one byte fits, one overruns
    small.outb(MCR, MCR_LOOP)  # modem lines change: a modem-status delta
    assert small.inb(IIR) == IIR_RLS
    assert small.inb(IIR) == IIR_RLS  # IIR does not acknowledge line status
    small.inb(LSR)
    assert small.inb(IIR) == IIR_RDA
    assert small.inb(RBR) == ord("x")
    assert small.inb(IIR) == IIR_THRE
    assert small.inb(IIR) == IIR_MSR  # reading IIR acknowledged THR empty
    assert small.inb(MSR) & 0x0F
    assert small.inb(IIR) == IIR_NONE


def test_thr_empty_interrupt_on_enable_and_after_each_write(guest: Guest) -> None:
    assert guest.inb(IIR) == IIR_NONE
    guest.outb(IER, 0x02)
    assert guest.irq.count == 1
    assert guest.inb(IIR) == IIR_THRE
    assert guest.inb(IIR) == IIR_NONE
    guest.outb(IER, 0x02)  # unchanged: no new interrupt
    assert guest.irq.count == 1 and guest.inb(IIR) == IIR_NONE
    guest.outb(THR, ord("a"))  # the byte leaves, THR is empty again: re-armed
    assert guest.irq.count == 2
    guest.outb(THR, ord("b"))  # the line was still high: writing THR drops it, emptying raises it
    assert guest.irq.count == 3
    assert guest.inb(IIR) == IIR_THRE
    guest.outb(IER, 0x00)
    assert guest.inb(IIR) == IIR_NONE
    assert guest.console.output() == b"ab"
    assert guest.uart.stats().interrupts == 3


def test_receive_interrupt_on_input(guest: Guest) -> None:
    guest.uart.enqueue_input(b"early")
    assert guest.irq.count == 0  # not enabled
    guest.outb(IER, 0x01)
    assert guest.irq.count == 1  # enabling with data pending raises the line
    assert guest.inb(IIR) == IIR_RDA
    assert guest.read_available() == b"early"
    assert guest.inb(IIR) == IIR_NONE
    guest.uart.enqueue_input(b"k")
    assert guest.irq.count == 2
    guest.uart.enqueue_input(b"l")  # still pending: pulsed again so a lost edge cannot wedge the guest
    assert guest.irq.count == 3
    assert guest.read_available() == b"kl"
    guest.outb(IER, 0x00)
    guest.uart.enqueue_input(b"m")
    assert guest.irq.count == 3


def test_fifo_control(guest: Guest) -> None:
    assert guest.inb(IIR) & 0xC0 == 0
    guest.outb(FCR, 0x01)
    assert guest.inb(IIR) == 0xC0 | IIR_NONE
    guest.uart.enqueue_input(b"stale")
    guest.outb(FCR, 0x01 | 0x02 | 0x04)  # clear both FIFOs
    assert guest.inb(LSR) & LSR_DR == 0
    guest.uart.enqueue_input(b"q")
    guest.outb(FCR, 0x00)  # leaving FIFO mode clears the FIFOs too
    assert guest.inb(IIR) == IIR_NONE
    assert guest.inb(LSR) & LSR_DR == 0


def test_loopback_mode(guest: Guest) -> None:
    assert guest.inb(MSR) == 0xB0  # CTS, DSR, DCD: the host is always there
    guest.outb(MCR, MCR_LOOP | MCR_RTS | MCR_OUT2)
    assert guest.inb(MSR) & 0xF0 == 0x90  # CTS from RTS, DCD from OUT2 (Linux's probe)
    guest.outb(MCR, MCR_LOOP | MCR_DTR | MCR_OUT1)
    msr = guest.inb(MSR)
    assert msr & 0xF0 == 0x60  # DSR from DTR, RI from OUT1
    assert msr & 0x0F == 0x0B  # CTS, DSR and DCD changed
    guest.outb(MCR, MCR_LOOP)
    assert guest.inb(MSR) == 0x04 | 0x02  # RI trailing edge, DSR changed
    guest.uart.enqueue_input(b"host")  # the receiver is disconnected from the host
    guest.puts(b"loop")
    assert guest.read_available() == b"loop"
    assert guest.console.output() == b""
    guest.outb(MCR, MCR_OUT2)
    guest.puts(b"out")
    assert guest.console.output() == b"out"
    assert guest.uart.stats().bytes_dropped == 4


def test_scratch_and_register_masks(guest: Guest) -> None:
    guest.outb(SCR, 0xA5)
    assert guest.inb(SCR) == 0xA5
    guest.outb(IER, 0xFF)
    assert guest.inb(IER) == 0x0F
    guest.outb(IER, 0)
    guest.outb(MCR, 0xFF)
    assert guest.inb(MCR) == 0x1F


def test_linux_style_autoconfig_sees_a_16550a(guest: Guest) -> None:
    # IER test
    guest.outb(IER, 0)
    assert guest.inb(IER) & 0x0F == 0
    guest.outb(IER, 0x0F)
    assert guest.inb(IER) & 0x0F == 0x0F
    guest.outb(IER, 0)
    # loopback MSR test
    save_mcr = guest.inb(MCR)
    guest.outb(MCR, MCR_LOOP | 0x0A)
    assert guest.inb(MSR) & 0xF0 == 0x90
    guest.outb(MCR, save_mcr)
    # FIFO type
    guest.outb(FCR, 0x01)
    assert guest.inb(IIR) >> 6 == 3
    # 16750 check: no 64-byte FIFO bit
    guest.outb(FCR, 0x01 | 0x20)
    assert guest.inb(IIR) >> 5 == 6
    guest.outb(LCR, 0x80)
    assert guest.inb(IIR) >> 5 == 6
    guest.outb(LCR, 0x03)
    # THRE bug test: enabling THRI makes IIR report it at once, twice
    guest.outb(IER, 0x02)
    iir1 = guest.inb(IIR)
    guest.outb(IER, 0)
    guest.outb(IER, 0x02)
    iir = guest.inb(IIR)
    guest.outb(IER, 0)
    assert not iir1 & 0x01 and not iir & 0x01
    assert guest.inb(LSR) & LSR_TEMT


def test_out2_gates_the_interrupt_when_asked() -> None:
    guest = Guest(out2_gates_irq=True)
    guest.outb(IER, 0x01)
    guest.uart.enqueue_input(b"a")
    assert guest.irq.count == 0
    assert guest.inb(IIR) == IIR_RDA  # pending, just not wired to the PIC
    guest.outb(MCR, MCR_OUT2)
    assert guest.irq.count == 1


def test_wide_accesses_are_split_into_bytes(guest: Guest) -> None:
    guest.uart.bus_write(SCR - 1, 2, 0x5A00)  # MSR (read-only) and SCR
    assert guest.inb(SCR) == 0x5A
    guest.uart.enqueue_input(b"z")
    assert guest.uart.bus_read(RBR, 2) == ord("z")  # RBR, then IER (0)
    assert guest.uart.bus_read(SCR, 2) == 0xFF5A  # beyond the last register reads as all ones


def test_bus_claims_and_dispatch(guest: Guest) -> None:
    bus = Bus("pio")
    register_claims(bus, guest.uart.bus_claims())
    assert [(r.base, r.size) for r in bus.ranges()] == [(COM1_PORT, 8)]
    for byte in b"ok":
        bus.write(COM1_PORT, 1, byte)
    assert guest.console.output() == b"ok"
    assert bus.read(COM1_PORT + LSR, 1) == LSR_THRE | LSR_TEMT


def test_save_and_restore_state(guest: Guest) -> None:
    guest.outb(LCR, 0x80)
    guest.outb(DLL, 0x01)
    guest.outb(LCR, 0x03)
    guest.outb(FCR, 0x01)
    guest.outb(SCR, 0x42)
    guest.uart.enqueue_input(b"pending")
    guest.outb(IER, 0x01)
    state = guest.uart.save_state()
    other = Guest()
    other.uart.restore_state(state)
    assert other.irq.count == 1  # the pending interrupt is delivered again
    assert other.uart.save_state() == state
    assert other.inb(SCR) == 0x42 and other.uart.baud_rate == 115200
    assert other.read_available() == b"pending"
    with pytest.raises(ValueError, match="capacity"):
        Guest(rx_capacity=2).uart.restore_state(state)


def test_rejects_a_zero_capacity() -> None:
    with pytest.raises(ValueError, match="capacity"):
        Serial8250(NullInterrupt(), rx_capacity=0)


def test_input_from_another_thread_while_the_guest_reads(guest: Guest) -> None:
    payload = bytes(range(256)) * 64
    received = bytearray()

    def host() -> None:
        for start in range(0, len(payload), 100):
            guest.uart.enqueue_input(payload[start:start + 100])

    thread = threading.Thread(target=host)
    thread.start()
    while len(received) < len(payload):
        received += guest.read_available()
    thread.join()
    assert bytes(received) == payload
    assert guest.uart.stats().bytes_dropped == 0
