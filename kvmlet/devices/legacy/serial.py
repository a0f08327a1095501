"""An 8250/16550A UART (the PC's COM1 at I/O port 0x3f8, IRQ 4), written from the PC16550D data sheet.

Registers (offset from the base port; DLAB is bit 7 of LCR):

====== ============================ ==========================
offset read                         write
====== ============================ ==========================
0      RBR (DLAB=0) / DLL (DLAB=1)  THR (DLAB=0) / DLL
1      IER (DLAB=0) / DLM (DLAB=1)  IER / DLM
2      IIR                          FCR
3      LCR                          LCR
4      MCR                          MCR
5      LSR                          (ignored)
6      MSR                          (ignored)
7      SCR                          SCR
====== ============================ ==========================

Transmission is instantaneous: a byte written to THR goes to the output sink at once (or, in loopback mode,
into the receive FIFO), so THRE and TEMT are always set. The receive FIFO is one bounded buffer
(64 KiB by default) whether or not the guest enabled the 16-byte FIFO; the received-data interrupt is pending
whenever it holds data (the trigger level and the character-timeout indication are not modelled).

Interrupts: the UART's INTR output is the OR of the enabled pending sources (in 16550 priority order: receiver
line status, received data, THR empty, modem status). The ISA line is edge-triggered, so ``irq.trigger()`` is
called on every rising edge of INTR, including the re-arm of THR-empty after each THR write, and additionally
whenever host input arrives while the received-data interrupt is enabled (so an edge the guest missed cannot
leave the receiver stuck).

Threads: ``bus_read``/``bus_write`` run on vCPU threads and ``enqueue_input`` on any thread; one lock guards
the registers. Output and interrupt delivery happen after the lock is released.

Snapshots: ``save_state``/``restore_state`` (:class:`kvmlet.devices.state.SerialState`). While paused
(``pause``), host input is held, not received (at most the FIFO's capacity; what would not have fitted counts
as an overrun), and delivered at ``resume``.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from kvmlet.devices.irq import InterruptLine
from kvmlet.devices.legacy.ports import PortClaim
from kvmlet.devices.state import DeviceStateError, expect_state
from kvmlet.devices.state import SerialState as SerialState  # the UART's state model lives with the others

COM1_PORT = 0x3F8
COM1_IRQ = 4
REGISTER_COUNT = 8
DEFAULT_RX_CAPACITY = 64 * 1024
CLOCK_DIVISOR_BASE = 115200  # baud rate = 1.8432 MHz / 16 / divisor


# Register offsets from the base port (the DLAB=0 names; DLL and DLM share offsets 0 and 1).
# Bit masks are plain ints: they are used on every guest access, where enum.IntFlag arithmetic is slow.
REG_DATA = 0  # RBR (read) / THR (write); DLL when DLAB=1
REG_IER = 1  # DLM when DLAB=1
REG_IIR_FCR = 2  # IIR (read) / FCR (write)
REG_LCR = 3
REG_MCR = 4
REG_LSR = 5
REG_MSR = 6
REG_SCR = 7

IER_RX_DATA = 0x01
IER_THR_EMPTY = 0x02
IER_LINE_STATUS = 0x04
IER_MODEM_STATUS = 0x08
IER_MASK = 0x0F


class InterruptId(IntEnum):
    """IIR bits 3:0, in priority order from highest; NONE has bit 0 set (no interrupt pending)."""

    LINE_STATUS = 0x06
    RX_DATA = 0x04
    THR_EMPTY = 0x02
    MODEM_STATUS = 0x00
    NONE = 0x01


IIR_LINE_STATUS = 0x06
IIR_RX_DATA = 0x04
IIR_THR_EMPTY = 0x02
IIR_MODEM_STATUS = 0x00
IIR_NONE = 0x01
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_DMA_MODE = 0x08
FCR_TRIGGER_MASK = 0xC0
FCR_STORED = FCR_ENABLE | FCR_DMA_MODE | FCR_TRIGGER_MASK  # the CLEAR bits are self-clearing

LCR_WORD_LENGTH = 0x03
LCR_STOP_BITS = 0x04
LCR_PARITY_ENABLE = 0x08
LCR_BREAK = 0x40
LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DATA_READY = 0x01
LSR_OVERRUN = 0x02
LSR_PARITY_ERROR = 0x04
LSR_FRAMING_ERROR = 0x08
LSR_BREAK = 0x10
LSR_THR_EMPTY = 0x20
LSR_TRANSMITTER_EMPTY = 0x40
LSR_RX_FIFO_ERROR = 0x80
LSR_ERRORS = LSR_OVERRUN | LSR_PARITY_ERROR | LSR_FRAMING_ERROR | LSR_BREAK

MSR_DELTA_CTS = 0x01
MSR_DELTA_DSR = 0x02
MSR_TRAILING_EDGE_RI = 0x04
MSR_DELTA_DCD = 0x08
MSR_DELTAS = 0x0F
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_CONNECTED = MSR_CTS | MSR_DSR | MSR_DCD  # what a host that is always there asserts


class OutputSink(Protocol):
    """Where transmitted bytes go (a console back end). ``write`` is called on vCPU threads."""

    def write(self, data: bytes) -> None: ...


class _DiscardOutput:
    def write(self, data: bytes) -> None:
        pass


@dataclass(frozen=True)
class SerialStats:
    """Counters since the UART was created."""

    bytes_out: int  # written to THR and sent to the output sink
    bytes_in: int  # accepted from the host into the receive FIFO (loopback bytes included)
    bytes_read: int  # read by the guest from RBR
    bytes_dropped: int  # host input lost: receive FIFO full (overrun) or loopback mode
    interrupts: int  # edges sent on the interrupt line


def _modem_inputs(mcr: int) -> int:
    """The modem-status input lines (MSR bits 7:4) for a given MCR."""
    if not mcr & MCR_LOOP:
        return MSR_CONNECTED
    lines = 0
    if mcr & MCR_RTS:
        lines |= MSR_CTS
    if mcr & MCR_DTR:
        lines |= MSR_DSR
    if mcr & MCR_OUT1:
        lines |= MSR_RI
    if mcr & MCR_OUT2:
        lines |= MSR_DCD
    return lines


def _modem_deltas(old_lines: int, new_lines: int) -> int:
    changed = old_lines ^ new_lines
    deltas = 0
    if changed & MSR_CTS:
        deltas |= MSR_DELTA_CTS
    if changed & MSR_DSR:
        deltas |= MSR_DELTA_DSR
    if changed & MSR_DCD:
        deltas |= MSR_DELTA_DCD
    if old_lines & MSR_RI and not new_lines & MSR_RI:
        deltas |= MSR_TRAILING_EDGE_RI
    return deltas


class Serial8250:
    """A 16550A UART on the PIO bus; claims ``base``..``base+7`` (1-byte registers)."""

    def __init__(self, irq: InterruptLine, output: OutputSink | None = None, *,
                 rx_capacity: int = DEFAULT_RX_CAPACITY, base: int = COM1_PORT,
                 out2_gates_irq: bool = False, on_first_byte: Callable[[], None] | None = None,
                 name: str = "serial0") -> None:
        """``out2_gates_irq``: deliver interrupts only while MCR.OUT2 is set, as the PC's ISA wiring does
        (Linux sets OUT2; QEMU and Firecracker do not gate, so the default is not to).
        ``on_first_byte``: called once, on the vCPU thread, after the guest's first byte reached the
        output sink."""
        if rx_capacity <= 0:
            raise ValueError(f"{name}: receive FIFO capacity must be positive, not {rx_capacity}")
        self.base = base
        self.name = name
        self._irq = irq
        self._output: OutputSink = output if output is not None else _DiscardOutput()
        self._rx_capacity = rx_capacity
        self._out2_gates_irq = out2_gates_irq
        self._on_first_byte = on_first_byte
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self._ier = 0
        self._lcr = 0x03  # 8N1
        self._mcr = 0
        self._fcr = 0
        self._scr = 0
        self._dll = 0x0C  # 9600 baud, a common firmware default
        self._dlm = 0
        self._lsr_errors = 0
        self._msr_deltas = 0
        self._thr_empty_pending = False
        self._irq_level = False
        self._edges = 0
        self._bytes_out = 0
        self.last_byte_out: int | None = None  # the last byte sent to the console (for tidy VMM messages)
        self._bytes_in = 0
        self._bytes_read = 0
        self._bytes_dropped = 0
        self._interrupts = 0
        self._paused = False
        self._held_input = bytearray()   # host input that arrived while paused
        self._held_dropped = 0

    # -- wiring -------------------------------------------------------------------------------------------

    def bus_claims(self) -> list[PortClaim]:
        return [PortClaim(self.base, REGISTER_COUNT, self, self.name)]

    def set_output(self, output: OutputSink | None) -> None:
        """Replace the output sink (``None`` discards output)."""
        self._output = output if output is not None else _DiscardOutput()

    # -- the bus ------------------------------------------------------------------------------------------

    def bus_read(self, offset: int, size: int) -> int:
        if size == 1:
            return self._read_register(offset)
        value = 0
        for index in range(size):  # an 8-bit device: wider accesses are split into byte cycles
            register = offset + index
            byte = self._read_register(register) if register < REGISTER_COUNT else 0xFF
            value |= byte << (8 * index)
        return value

    def bus_write(self, offset: int, size: int, value: int) -> None:
        if size == 1:
            self._write_register(offset, value & 0xFF)
            return
        for index in range(size):
            register = offset + index
            if register < REGISTER_COUNT:
                self._write_register(register, (value >> (8 * index)) & 0xFF)

    def _read_register(self, register: int) -> int:
        with self._lock:
            value = self._read_locked(register)
            edges = self._edges
            self._edges = 0
        if edges:
            self._send_edges(edges)
        return value

    def _write_register(self, register: int, value: int) -> None:
        transmitted: bytes | None = None
        first_byte: Callable[[], None] | None = None
        with self._lock:
            if register == REG_DATA and not self._lcr & LCR_DLAB:
                transmitted = self._transmit_locked(value)
                if transmitted is not None and self._on_first_byte is not None:
                    first_byte, self._on_first_byte = self._on_first_byte, None
            else:
                self._write_locked(register, value)
            edges = self._edges
            self._edges = 0
        if transmitted is not None:
            self._output.write(transmitted)
            if first_byte is not None:
                first_byte()
        if edges:
            self._send_edges(edges)

    # -- registers (all called with the lock held) --------------------------------------------------------

    def _read_locked(self, register: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if register == REG_DATA:
            if dlab:
                return self._dll
            if not self._rx:
                return 0
            self._bytes_read += 1
            byte = self._rx.popleft()
            if not self._rx:
                self._update_irq_locked()
            return byte
        if register == REG_IER:
            return self._dlm if dlab else self._ier
        if register == REG_IIR_FCR:
            source = self._pending_source_locked()
            if source == IIR_THR_EMPTY:  # reading IIR acknowledges THR empty
                self._thr_empty_pending = False
                self._update_irq_locked()
            fifo_bits = IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE else 0
            return source | fifo_bits
        if register == REG_LCR:
            return self._lcr
        if register == REG_MCR:
            return self._mcr
        if register == REG_LSR:
            value = self._lsr_errors | LSR_THR_EMPTY | LSR_TRANSMITTER_EMPTY
            if self._rx:
                value |= LSR_DATA_READY
            if self._lsr_errors:
                self._lsr_errors = 0
                self._update_irq_locked()
            return value
        if register == REG_MSR:
            modem_status = _modem_inputs(self._mcr) | self._msr_deltas
            if self._msr_deltas:
                self._msr_deltas = 0
                self._update_irq_locked()
            return modem_status
        if register == REG_SCR:
            return self._scr
        return 0xFF

    def _transmit_locked(self, byte: int) -> bytes | None:
        """THR write: the byte leaves at once, so THR empties again (a new THR-empty edge)."""
        self._thr_empty_pending = False
        self._update_irq_locked()
        transmitted: bytes | None = None
        if self._mcr & MCR_LOOP:
            self._bytes_in += 1
            self._receive_locked(bytes((byte,)))
        else:
            self._bytes_out += 1
            self.last_byte_out = byte
            transmitted = bytes((byte,))
        self._thr_empty_pending = True
        self._update_irq_locked()
        return transmitted

    def _write_locked(self, register: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if register == REG_DATA:  # DLAB=1 (THR is handled by the caller)
            self._dll = value
        elif register == REG_IER:
            if dlab:
                self._dlm = value
            else:
                self._write_ier_locked(value & IER_MASK)
        elif register == REG_IIR_FCR:
            self._write_fcr_locked(value)
        elif register == REG_LCR:
            self._lcr = value
        elif register == REG_MCR:
            self._write_mcr_locked(value & MCR_MASK)
        elif register == REG_SCR:
            self._scr = value
        # LSR and MSR are read-only (factory-test writes are ignored)

    def _write_ier_locked(self, ier: int) -> None:
        changed = self._ier ^ ier
        self._ier = ier
        if changed & IER_THR_EMPTY:
            # THR is always empty: enabling the interrupt makes it pending at once, disabling withdraws it.
            self._thr_empty_pending = bool(ier & IER_THR_EMPTY)
        self._update_irq_locked()

    def _write_fcr_locked(self, value: int) -> None:
        if (value ^ self._fcr) & FCR_ENABLE:  # switching FIFO mode on or off resets both FIFOs
            self._rx.clear()
        if value & FCR_ENABLE:
            if value & FCR_CLEAR_RX:
                self._rx.clear()
            self._fcr = value & FCR_STORED
        else:
            self._fcr = 0  # with FCR0 clear the other bits are not programmed
        self._update_irq_locked()

    def _write_mcr_locked(self, mcr: int) -> None:
        old_lines = _modem_inputs(self._mcr)
        self._mcr = mcr
        self._msr_deltas |= _modem_deltas(old_lines, _modem_inputs(mcr))
        self._update_irq_locked()

    def _receive_locked(self, data: bytes) -> int:
        room = self._rx_capacity - len(self._rx)
        accepted = data if len(data) <= room else data[:max(room, 0)]
        self._rx.extend(accepted)
        lost = len(data) - len(accepted)
        if lost:
            self._bytes_dropped += lost
            self._lsr_errors |= LSR_OVERRUN
        self._update_irq_locked()
        return len(accepted)

    def _pending_source_locked(self) -> int:
        ier = self._ier
        if ier & IER_LINE_STATUS and self._lsr_errors:
            return IIR_LINE_STATUS
        if ier & IER_RX_DATA and self._rx:
            return IIR_RX_DATA
        if ier & IER_THR_EMPTY and self._thr_empty_pending:
            return IIR_THR_EMPTY
        if ier & IER_MODEM_STATUS and self._msr_deltas:
            return IIR_MODEM_STATUS
        return IIR_NONE

    def _update_irq_locked(self) -> None:
        level = self._pending_source_locked() != IIR_NONE
        if self._out2_gates_irq and not self._mcr & MCR_OUT2:
            level = False
        if level and not self._irq_level:
            self._edges += 1
            self._interrupts += 1
        self._irq_level = level

    def _send_edges(self, edges: int) -> None:
        for _ in range(edges):
            self._irq.trigger()

    # -- the host side -----------------------------------------------------------------------------------

    def enqueue_input(self, data: bytes) -> int:
        """Queue bytes from the host for the guest to read (any thread); returns how many were accepted.

        Bytes beyond the FIFO's capacity are lost and flagged as an overrun (LSR.OE), as on a real UART;
        in loopback mode the receiver is disconnected from the host and everything is dropped.
        """
        if not data:
            return 0
        with self._lock:
            if self._paused:
                room = max(self._rx_capacity - len(self._held_input), 0)
                self._held_input += data[:room]
                self._held_dropped += max(len(data) - room, 0)
                return min(len(data), room)
            if self._mcr & MCR_LOOP:
                self._bytes_dropped += len(data)
                return 0
            accepted = self._receive_locked(data)
            self._bytes_in += accepted
            edges = self._edges
            self._edges = 0
            if not edges and self._ier & IER_RX_DATA and accepted and self._irq_level:
                edges = 1  # the line is already high: pulse it again in case the guest lost an edge
                self._interrupts += 1
        if edges:
            self._send_edges(edges)
        return accepted

    def rx_space(self) -> int:
        """How many more bytes the receive FIFO can take (for back ends that can apply back-pressure)."""
        with self._lock:
            return self._rx_capacity - len(self._rx)

    @property
    def baud_rate(self) -> int:
        """The rate the guest programmed (informational: transmission is not paced)."""
        with self._lock:
            divisor = self._dll | (self._dlm << 8)
        return CLOCK_DIVISOR_BASE // divisor if divisor else 0

    def stats(self) -> SerialStats:
        with self._lock:
            return SerialStats(self._bytes_out, self._bytes_in, self._bytes_read, self._bytes_dropped,
                               self._interrupts)

    # -- quiescing and snapshots --------------------------------------------------------------------------

    def pause(self) -> None:
        """Receive no host input until :meth:`resume` (it is held, not lost)."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            held, self._held_input = bytes(self._held_input), bytearray()
            dropped, self._held_dropped = self._held_dropped, 0
            if dropped:   # what would not have fitted the FIFO: an overrun, as if it had arrived now
                self._bytes_dropped += dropped
                self._lsr_errors |= LSR_OVERRUN
                self._update_irq_locked()
            edges = self._edges
            self._edges = 0
        if edges:
            self._send_edges(edges)
        self.enqueue_input(held)

    def save_state(self) -> SerialState:
        with self._lock:
            return SerialState(ier=self._ier, lcr=self._lcr, mcr=self._mcr, fcr=self._fcr, scr=self._scr,
                               dll=self._dll, dlm=self._dlm, lsr_errors=self._lsr_errors,
                               msr_deltas=self._msr_deltas, thr_empty_pending=self._thr_empty_pending,
                               rx=bytes(self._rx))

    def check_state(self, state: object) -> SerialState:
        """``state`` if it fits this UART, else DeviceStateError (a ValueError)."""
        state = expect_state(state, SerialState, self.name)
        if len(state.rx) > self._rx_capacity:
            raise DeviceStateError(f"{self.name}: saved receive FIFO holds {len(state.rx)} bytes, more than this "
                                   f"UART's capacity of {self._rx_capacity}")
        for field_name in ("ier", "lcr", "mcr", "fcr", "scr", "dll", "dlm", "lsr_errors", "msr_deltas"):
            if not 0 <= getattr(state, field_name) <= 0xFF:
                raise DeviceStateError(f"{self.name}: saved register {field_name} is not a byte")
        return state

    def restore_state(self, state: object) -> None:
        """Load a saved state (:meth:`check_state` first); an interrupt it had pending is sent again."""
        state = self.check_state(state)
        with self._lock:
            self._ier = state.ier & IER_MASK
            self._lcr = state.lcr
            self._mcr = state.mcr & MCR_MASK
            self._fcr = state.fcr & FCR_STORED
            self._scr = state.scr
            self._dll = state.dll
            self._dlm = state.dlm
            self._lsr_errors = state.lsr_errors & LSR_ERRORS
            self._msr_deltas = state.msr_deltas & MSR_DELTAS
            self._thr_empty_pending = state.thr_empty_pending
            self._rx = deque(state.rx)
            self._irq_level = False
            self._update_irq_locked()  # an interrupt pending in the saved state is delivered again
            edges = self._edges
            self._edges = 0
        if edges:
            self._send_edges(edges)
