"""PCI bus 0 behind one host bridge: configuration access by ECAM and by the legacy 0xCF8/0xCFC mechanism, BAR
allocation as firmware would do it, and BAR decoding on the VM's MMIO (and I/O-port) bus.

Configuration access (PCI Express Base 4.0 section 7.2; PCI Local Bus 3.0 section 3.2.2.3.2):

* ECAM: 1 MiB at :data:`ECAM_BASE` for bus 0 (4 KiB per function: device in bits 19:15, function in 14:12), as
  the ACPI MCFG table announces it;
* 0xCF8 CONFIG_ADDRESS (32-bit accesses only: bit 31 enable, bus 23:16, device 15:11, function 10:8, register
  7:2) and 0xCFC-0xCFF CONFIG_DATA (1, 2 or 4 bytes within the dword). Byte and word accesses to 0xCF8-0xCFB are
  not configuration cycles and are ignored (0xCF9 is the PC's reset control register, which kvmlet does not have).

A function that is not there reads all ones and ignores writes; so do buses other than 0.

BARs: the bus places every BAR in the PCI MMIO window (naturally aligned) and enables memory decoding, as
firmware does before an OS starts, so the DSDT's ``_CRS`` and the BARs agree and Linux keeps them. The guest may
move them: whenever a function's command register or a BAR changes, the bus re-decodes every function. A BAR is
decoded only with its space enabled in the command register, at a non-zero address, wholly below 2**52, not over
guest RAM, the local APIC or the I/O APIC, and not over anything else on the bus (another BAR, ECAM, the VT-d
registers, virtio-mmio): a BAR the guest placed over any of those decodes nothing (counted) until it is moved.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from kvmlet.devices.bus import Bus, BusConflictError
from kvmlet.devices.pci.config import PciFunction, PciIdentity
from kvmlet.devices.state import PciHostState, expect_state
from kvmlet.memory import GuestMemory

ECAM_BASE = 0xE000_0000
ECAM_BUSES = 1                         # bus 0 only
ECAM_SIZE = ECAM_BUSES << 20
PCI_MMIO_BASE = 0xC100_0000            # the 32-bit window BARs are placed in (the DSDT's _CRS)
PCI_MMIO_END = 0xD000_0000             # below the address the test guest uses for unbacked accesses
CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_PORTS = 8
MAX_DEVICES = 32
MAX_BAR_END = 1 << 52
# What a BAR may never cover besides RAM: the in-kernel I/O APIC and local APIC.
RESERVED_RANGES = ((0xFEC0_0000, 0xFED0_0000), (0xFEE0_0000, 0xFEF0_0000))

HOST_BRIDGE = PciIdentity(vendor_id=0x1B36, device_id=0x0008, class_code=0x060000)   # a PCIe host bridge


def devfn(device: int, function: int = 0) -> int:
    return device << 3 | function


@dataclass
class BusStats:
    config_reads: int = 0
    config_writes: int = 0
    absent_reads: int = 0             # no function there (all ones)
    absent_writes: int = 0
    ignored_port_accesses: int = 0    # 0xCF8-0xCFB other than 32-bit
    bars_refused: int = 0             # BARs a guest placed where they cannot decode
    last_refusal: str = ""


class BarWindow:
    """A BusDevice for one decoded BAR: accesses go to the function with the offset into the BAR."""

    def __init__(self, function: PciFunction, index: int) -> None:
        self.function = function
        self.index = index

    def bus_read(self, offset: int, size: int) -> int:
        return self.function.bar_read(self.index, offset, size)

    def bus_write(self, offset: int, size: int, value: int) -> None:
        self.function.bar_write(self.index, offset, size, value)


@dataclass
class _Decoded:
    address: int
    size: int
    window: BarWindow


@dataclass
class PciBus:
    """Bus 0: its functions by device number, their configuration space and their BARs' decoding."""

    mmio: Bus
    pio: Bus
    memory: GuestMemory
    functions: dict[int, PciFunction] = field(default_factory=dict)       # devfn -> function
    stats: BusStats = field(default_factory=BusStats)
    next_mmio: int = PCI_MMIO_BASE
    next_io: int = 0xC000
    _decoded: dict[tuple[int, int], _Decoded] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    config_address: int = 0

    def __post_init__(self) -> None:
        self.bridge = PciFunction(HOST_BRIDGE)
        self.functions[0] = self.bridge

    # -- adding functions -----------------------------------------------------------------------------
    def free_device(self) -> int:
        for device in range(1, MAX_DEVICES):
            if devfn(device) not in self.functions:
                return device
        raise ValueError(f"PCI bus 0 is full ({MAX_DEVICES - 1} devices)")

    def add(self, function: PciFunction, device: int | None = None) -> int:
        """Put ``function`` at ``device`` (the next free one if None), place its BARs, decode them; its devfn."""
        with self._lock:
            slot = devfn(self.free_device() if device is None else device)
            if slot in self.functions:
                raise ValueError(f"PCI device {slot >> 3} is taken")
            for index, bar in sorted(function.bars.items()):
                function.set_bar_address(index, self._allocate(bar.size, bar.is_memory))
            function.enable_decoding()
            self.functions[slot] = function
            function.on_decode_change = self._decode_changed
            self._redecode()
            return slot

    def _allocate(self, size: int, memory: bool) -> int:
        if memory:
            base = (self.next_mmio + size - 1) & ~(size - 1)
            if base + size > PCI_MMIO_END:
                raise ValueError(f"the PCI MMIO window {PCI_MMIO_BASE:#x}-{PCI_MMIO_END:#x} is full")
            self.next_mmio = base + size
            return base
        base = (self.next_io + size - 1) & ~(size - 1)
        self.next_io = base + size
        return base

    def remove(self, slot: int) -> None:
        with self._lock:
            function = self.functions.pop(slot, None)
            if function is not None:
                function.on_decode_change = None
                for key in [key for key in self._decoded if key[0] == slot]:
                    self._undecode(key, function)

    # -- configuration access ---------------------------------------------------------------------------
    def config_read(self, bus: int, slot: int, offset: int, size: int) -> int:
        self.stats.config_reads += 1
        function = self.functions.get(slot) if bus == 0 else None
        if function is None:
            self.stats.absent_reads += 1
            return (1 << (8 * size)) - 1
        return function.config_read(offset, size)

    def config_write(self, bus: int, slot: int, offset: int, size: int, value: int) -> None:
        self.stats.config_writes += 1
        function = self.functions.get(slot) if bus == 0 else None
        if function is None:
            self.stats.absent_writes += 1
            return
        function.config_write(offset, size, value)

    # -- decoding ---------------------------------------------------------------------------------------
    def _decode_changed(self, function: PciFunction) -> None:
        with self._lock:
            self._redecode()

    def _wanted(self, slot: int, function: PciFunction) -> dict[int, tuple[int, int]]:
        wanted = {}
        for index, bar in function.bars.items():
            enabled = function.memory_enabled if bar.is_memory else function.io_enabled
            if enabled:
                wanted[index] = (function.bar_address(index), bar.size)
        return wanted

    def _redecode(self) -> None:
        """Bring every function's decoded BARs in line with its configuration (lock held)."""
        for slot, function in list(self.functions.items()):
            wanted = self._wanted(slot, function)
            for key in [key for key in self._decoded if key[0] == slot]:
                current = self._decoded[key]
                if wanted.get(key[1]) != (current.address, current.size):
                    self._undecode(key, function)
        for slot, function in list(self.functions.items()):
            for index, (address, size) in self._wanted(slot, function).items():
                if (slot, index) not in self._decoded:
                    self._decode(slot, function, index, address, size)

    def _undecode(self, key: tuple[int, int], function: PciFunction) -> None:
        decoded = self._decoded.pop(key)
        bar = function.bars[key[1]]
        (self.mmio if bar.is_memory else self.pio).unregister(decoded.window)
        function.bar_mapped(key[1], None)

    def _decode(self, slot: int, function: PciFunction, index: int, address: int, size: int) -> None:
        bar = function.bars[index]
        reason = self._refusal(address, size, bar.is_memory)
        if reason is None:
            window = BarWindow(function, index)
            bus = self.mmio if bar.is_memory else self.pio
            try:
                bus.register(address, size, window, f"pci {slot >> 3:02x}.{slot & 7} BAR{index}")
            except BusConflictError as exc:
                reason = str(exc)
            else:
                self._decoded[(slot, index)] = _Decoded(address, size, window)
                function.bar_mapped(index, address)
                return
        self.stats.bars_refused += 1
        self.stats.last_refusal = f"{slot >> 3:02x}.{slot & 7} BAR{index} at {address:#x}+{size:#x}: {reason}"

    def _refusal(self, address: int, size: int, memory: bool) -> str | None:
        if address == 0:
            return "not placed (address 0)"
        if not memory:
            return None if address + size <= 0x10000 else "beyond the I/O port space"
        if address + size > MAX_BAR_END:
            return "beyond the physical address space"
        for start, length in self.memory.ram_ranges():
            if address < start + length and start < address + size:
                return "over guest RAM"
        for start, end in RESERVED_RANGES:
            if address < end and start < address + size:
                return "over the interrupt controllers"
        return None

    def decoded(self) -> dict[tuple[int, int], tuple[int, int]]:
        """(devfn, BAR) -> (address, size) of what decodes now."""
        return {key: (d.address, d.size) for key, d in self._decoded.items()}

    # -- snapshots --------------------------------------------------------------------------------------
    def save_host(self) -> PciHostState:
        return PciHostState(config_address=self.config_address, bridge=self.bridge.save_function())

    def restore_host(self, state: object) -> None:
        saved = expect_state(state, PciHostState, "pci-host")
        self.config_address = saved.config_address & 0x80FF_FFFC
        self.bridge.restore_function(saved.bridge)

    def redecode(self) -> None:
        """Decode again from every function's configuration (after a restore)."""
        with self._lock:
            self._redecode()


class EcamWindow:
    """The memory-mapped configuration space of bus 0 (a BusDevice of ECAM_SIZE bytes)."""

    def __init__(self, bus: PciBus) -> None:
        self.bus = bus

    def bus_read(self, offset: int, size: int) -> int:
        return self.bus.config_read(offset >> 20, offset >> 12 & 0xFF, offset & 0xFFF, size)

    def bus_write(self, offset: int, size: int, value: int) -> None:
        self.bus.config_write(offset >> 20, offset >> 12 & 0xFF, offset & 0xFFF, size, value)


class ConfigPorts:
    """0xCF8 CONFIG_ADDRESS and 0xCFC-0xCFF CONFIG_DATA (a BusDevice of 8 ports)."""

    def __init__(self, bus: PciBus) -> None:
        self.bus = bus

    def _target(self, offset: int, size: int) -> tuple[int, int, int] | None:
        address = self.bus.config_address
        if not address & 0x8000_0000 or (offset - 4) % 4 + size > 4:
            return None
        return address >> 16 & 0xFF, address >> 8 & 0xFF, (address & 0xFC) + (offset - 4)

    def bus_read(self, offset: int, size: int) -> int:
        if offset < 4:
            if offset == 0 and size == 4:
                return self.bus.config_address
            self.bus.stats.ignored_port_accesses += 1
            return (1 << (8 * size)) - 1
        target = self._target(offset, size)
        if target is None:
            return (1 << (8 * size)) - 1
        return self.bus.config_read(target[0], target[1], target[2], size)

    def bus_write(self, offset: int, size: int, value: int) -> None:
        if offset < 4:
            if offset == 0 and size == 4:
                self.bus.config_address = value & 0x80FF_FFFC   # reserved bits 30:24 and 1:0 read 0
            else:
                self.bus.stats.ignored_port_accesses += 1
            return
        target = self._target(offset, size)
        if target is not None:
            self.bus.config_write(target[0], target[1], target[2], size, value)
