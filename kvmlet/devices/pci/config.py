"""A PCI function's configuration space: the type 0 header, BARs and the capability list (PCI Local Bus 3.0
chapter 6, PCI Express Base 4.0 chapter 7).

Every byte has a write mask (which bits the driver may change); reads and writes of 1 to 8 bytes at any offset
are taken apart byte by byte, so a write of anything to any offset changes at most the writable bits, and what
is read back is what the specification says is there: read-only identification, BARs that read back their size
when written with all ones (their low bits are not writable), a capability list that is whatever the function
built. The extended space (0x100-0xfff, reached through ECAM) holds no capability: it reads 0 and ignores writes.

A function reacts to writes through hooks: :meth:`PciFunction.config_written` (the command register and BARs
change its decoding: the bus re-maps it; MSI-X message control), :meth:`PciFunction.special_read` for fields
computed when read (the status register's interrupt bit, a virtio PCI configuration access window).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from kvmlet.devices.state import PciFunctionState

CONFIG_SIZE = 256               # the conventional space (0xCF8/0xCFC reaches this far)
EXTENDED_CONFIG_SIZE = 4096     # what ECAM gives each function

VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION = 0x08
CLASS_CODE = 0x09
CACHE_LINE_SIZE = 0x0C
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
FIRST_CAPABILITY = 0x40
BAR_COUNT = 6


class Command(enum.IntFlag):
    IO = 1 << 0
    MEMORY = 1 << 1
    BUS_MASTER = 1 << 2
    INTX_DISABLE = 1 << 10


STATUS_INTERRUPT = 1 << 3
STATUS_CAPABILITIES = 1 << 4

CAP_ID_VENDOR = 0x09
CAP_ID_MSIX = 0x11


class BarKind(enum.Enum):
    MEMORY32 = "mem32"
    MEMORY64 = "mem64"
    IO = "io"


@dataclass(frozen=True)
class BarSpec:
    """One base address register: its number, size (a power of two) and kind."""

    index: int
    size: int
    kind: BarKind = BarKind.MEMORY32
    prefetchable: bool = False

    def __post_init__(self) -> None:
        minimum = 4 if self.kind is BarKind.IO else 16
        if self.size < minimum or self.size & (self.size - 1):
            raise ValueError(f"BAR {self.index}: size {self.size:#x} is not a power of two of at least {minimum}")
        if not 0 <= self.index < BAR_COUNT - (1 if self.kind is BarKind.MEMORY64 else 0):
            raise ValueError(f"BAR {self.index} does not exist")

    @property
    def is_memory(self) -> bool:
        return self.kind is not BarKind.IO

    @property
    def low_bits(self) -> int:
        if self.kind is BarKind.IO:
            return 0x1
        return (0x4 if self.kind is BarKind.MEMORY64 else 0) | (0x8 if self.prefetchable else 0)


@dataclass(frozen=True)
class PciIdentity:
    vendor_id: int
    device_id: int
    class_code: int               # base class << 16 | subclass << 8 | programming interface
    revision: int = 0
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0
    multifunction: bool = False


class PciFunction:
    """One function's configuration space (header type 0); devices build on it."""

    def __init__(self, identity: PciIdentity, bars: list[BarSpec] | None = None, *, interrupt_pin: int = 0,
                 bus_master: bool = False) -> None:
        """``bus_master``: the function can master the bus (DMA), so Bus Master Enable is writable."""
        self.identity = identity
        self.data = bytearray(CONFIG_SIZE)
        self.mask = bytearray(CONFIG_SIZE)       # writable bits per byte
        self.bars: dict[int, BarSpec] = {}
        self._last_capability = 0
        self._next_capability = FIRST_CAPABILITY
        self.on_decode_change: Callable[[PciFunction], None] | None = None   # set by the bus
        self.bad_accesses = 0
        self._put(VENDOR_ID, 2, identity.vendor_id)
        self._put(DEVICE_ID, 2, identity.device_id)
        self._put(REVISION, 1, identity.revision)
        self._put(CLASS_CODE, 3, identity.class_code)
        self._put(HEADER_TYPE, 1, 0x80 if identity.multifunction else 0)
        self._put(SUBSYSTEM_VENDOR_ID, 2, identity.subsystem_vendor_id)
        self._put(SUBSYSTEM_ID, 2, identity.subsystem_id)
        self._put(INTERRUPT_PIN, 1, interrupt_pin)
        self._writable(CACHE_LINE_SIZE, 1, 0xFF)
        self._writable(INTERRUPT_LINE, 1, 0xFF)
        command = 0
        for bar in bars or []:
            self._add_bar(bar)
            command |= Command.MEMORY if bar.is_memory else Command.IO
        if bus_master:
            command |= Command.BUS_MASTER
        if interrupt_pin:
            command |= Command.INTX_DISABLE
        self._writable(COMMAND, 2, int(command))

    # -- building -------------------------------------------------------------------------------------
    def _put(self, offset: int, size: int, value: int) -> None:
        self.data[offset:offset + size] = value.to_bytes(size, "little")

    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def _writable(self, offset: int, size: int, mask: int) -> None:
        self.mask[offset:offset + size] = mask.to_bytes(size, "little")

    def _add_bar(self, bar: BarSpec) -> None:
        offset = BAR0 + 4 * bar.index
        self.bars[bar.index] = bar
        self._put(offset, 4, bar.low_bits)
        low_mask = ~(bar.size - 1) & (0xFFFF_FFFC if bar.kind is BarKind.IO else 0xFFFF_FFF0)
        self._writable(offset, 4, low_mask & 0xFFFF_FFFF)
        if bar.kind is BarKind.MEMORY64:
            self._writable(offset + 4, 4, 0xFFFF_FFFF)

    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """Append a capability (``body`` after the ID and next pointer); returns its offset."""
        length = 2 + len(body)
        offset = self._next_capability
        if offset + length > CONFIG_SIZE:
            raise ValueError("the capability list does not fit in the configuration space")
        self.data[offset] = cap_id
        self.data[offset + 2:offset + length] = body
        if writable is not None:
            self.mask[offset + 2:offset + 2 + len(writable)] = writable
        if self._last_capability:
            self.data[self._last_capability + 1] = offset
        else:
            self.data[CAPABILITIES_POINTER] = offset
            self._put(STATUS, 2, self._get(STATUS, 2) | STATUS_CAPABILITIES)
        self._last_capability = offset
        self._next_capability = (offset + length + 3) & ~3
        return offset

    # -- state the device and the bus read ------------------------------------------------------------
    @property
    def command(self) -> int:
        return self._get(COMMAND, 2)

    @property
    def memory_enabled(self) -> bool:
        return bool(self.command & Command.MEMORY)

    @property
    def io_enabled(self) -> bool:
        return bool(self.command & Command.IO)

    @property
    def bus_master(self) -> bool:
        return bool(self.command & Command.BUS_MASTER)

    @property
    def intx_disabled(self) -> bool:
        return bool(self.command & Command.INTX_DISABLE)

    def bar_address(self, index: int) -> int:
        """Where BAR ``index`` is programmed to decode (whether or not decoding is enabled)."""
        bar = self.bars[index]
        offset = BAR0 + 4 * index
        low = self._get(offset, 4) & (0xFFFF_FFFC if bar.kind is BarKind.IO else 0xFFFF_FFF0)
        if bar.kind is BarKind.MEMORY64:
            return self._get(offset + 4, 4) << 32 | low
        return low

    def set_bar_address(self, index: int, address: int) -> None:
        """Program a BAR as firmware does (the writable bits only)."""
        bar = self.bars[index]
        offset = BAR0 + 4 * index
        self._store(offset, 4, address & 0xFFFF_FFFF)
        if bar.kind is BarKind.MEMORY64:
            self._store(offset + 4, 4, address >> 32)

    def enable_decoding(self) -> None:
        self._store(COMMAND, 2, self.command | Command.MEMORY | (Command.IO if any(
            not bar.is_memory for bar in self.bars.values()) else 0))

    def _store(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            byte = value >> (8 * i) & 0xFF
            mask = self.mask[offset + i]
            self.data[offset + i] = (self.data[offset + i] & ~mask) | (byte & mask)

    # -- configuration accesses ------------------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4, 8) or offset < 0:
            self.bad_accesses += 1
            return (1 << (8 * max(size, 0))) - 1 if size in (1, 2, 4, 8) else 0
        if offset >= CONFIG_SIZE:
            return 0           # the extended space: no capabilities there
        special = self.special_read(offset, size)
        if special is not None:
            return special
        end = min(offset + size, CONFIG_SIZE)
        value = int.from_bytes(self.data[offset:end], "little")
        if offset <= STATUS < end and self.interrupt_pending():
            value |= STATUS_INTERRUPT << (8 * (STATUS - offset))
        return value

    def config_write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4, 8) or offset < 0:
            self.bad_accesses += 1
            return
        if offset >= CONFIG_SIZE:
            return
        size = min(size, CONFIG_SIZE - offset)
        before_command = self.command
        before_bars = bytes(self.data[BAR0:BAR0 + 4 * BAR_COUNT])
        self._store(offset, size, value)
        self.config_written(offset, size, value)
        if self.on_decode_change is not None and (
                self.command != before_command or self.data[BAR0:BAR0 + 4 * BAR_COUNT] != before_bars):
            self.on_decode_change(self)
        if self.command != before_command:
            self.command_changed(before_command)

    # -- hooks ------------------------------------------------------------------------------------------
    def special_read(self, offset: int, size: int) -> int | None:
        """A value computed when read (None: the stored bytes)."""
        return None

    def config_written(self, offset: int, size: int, value: int) -> None:
        """After a write was stored (MSI-X control, virtio's configuration access window)."""

    def command_changed(self, before: int) -> None:
        """The command register changed (bus mastering on or off)."""

    def interrupt_pending(self) -> bool:
        """The status register's Interrupt Status bit (an INTx the function asserts)."""
        return False

    def bar_read(self, index: int, offset: int, size: int) -> int:
        """A read of a BAR's memory or I/O space."""
        return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        """A write to a BAR's memory or I/O space."""

    def bar_mapped(self, index: int, address: int | None) -> None:
        """The bus now decodes BAR ``index`` at ``address`` (None: not at all)."""

    # -- snapshots --------------------------------------------------------------------------------------
    def save_function(self) -> PciFunctionState:
        return PciFunctionState(config=bytes(self.data))

    def restore_function(self, state: PciFunctionState) -> None:
        """The saved bytes over this function's, through the write masks (identification stays this one's)."""
        config = state.config[:CONFIG_SIZE].ljust(CONFIG_SIZE, b"\0")
        for offset in range(CONFIG_SIZE):
            mask = self.mask[offset]
            self.data[offset] = (self.data[offset] & ~mask) | (config[offset] & mask)
