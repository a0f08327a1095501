"""PCI bus 0 without a VM: configuration access by ECAM and 0xCF8/0xCFC, the header's read-only and writable
fields, BAR sizing, placement and decoding (moves, overlaps, RAM), capabilities, and writes of anything to every
offset of every function."""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Iterator

import pytest

from kvmlet.devices.bus import Bus
from kvmlet.devices.pci.bus import ECAM_BASE, ECAM_SIZE, PCI_MMIO_BASE, ConfigPorts, EcamWindow, PciBus, devfn
from kvmlet.devices.pci.config import BarKind, BarSpec, PciFunction, PciIdentity
from kvmlet.devices.pci.virtio_pci import PciTransport
from kvmlet.devices.virtio.rng import VirtioRng
from kvmlet.memory import GuestMemory, MiB
from tests.support.pcidriver import FakeRouter


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory.with_size(64 * MiB)
    yield mem
    mem.close()


class Rig:
    def __init__(self, memory: GuestMemory) -> None:
        self.mmio, self.pio = Bus("mmio"), Bus("pio")
        self.bus = PciBus(self.mmio, self.pio, memory)
        self.ecam = EcamWindow(self.bus)
        self.ports = ConfigPorts(self.bus)
        self.mmio.register(ECAM_BASE, ECAM_SIZE, self.ecam, "ecam")
        self.pio.register(0xCF8, 8, self.ports, "cf8")
        self.router = FakeRouter()
        self.moves: list[int | None] = []
        self.transports: list[PciTransport] = []

    def add_virtio(self) -> PciTransport:
        transport = PciTransport(VirtioRng(name=f"rng{len(self.transports)}"), self.bus.memory, router=self.router)
        transport.on_notify_moved = self.moves.append
        self.bus.add(transport.function)
        self.transports.append(transport)
        return transport

    def ecam_read(self, slot: int, offset: int, size: int = 4) -> int:
        return self.mmio.read(ECAM_BASE + (slot << 12) + offset, size)

    def ecam_write(self, slot: int, offset: int, size: int, value: int) -> None:
        self.mmio.write(ECAM_BASE + (slot << 12) + offset, size, value)

    def legacy_read(self, slot: int, offset: int, size: int = 4) -> int:
        self.pio.write(0xCF8, 4, 0x8000_0000 | slot << 8 | (offset & 0xFC))
        return self.pio.read(0xCFC + (offset & 3), size)

    def close(self) -> None:
        for transport in self.transports:
            transport.close()
        self.router.close()


@pytest.fixture
def rig(memory: GuestMemory) -> Iterator[Rig]:
    r = Rig(memory)
    yield r
    r.close()


def test_host_bridge_and_absent_functions(rig: Rig) -> None:
    assert rig.ecam_read(0, 0) == 0x0008_1B36
    assert rig.ecam_read(0, 0x08) >> 8 == 0x060000           # a host bridge
    assert rig.legacy_read(0, 0) == 0x0008_1B36
    assert rig.ecam_read(devfn(5), 0) == 0xFFFF_FFFF         # nothing at 00:05.0
    assert rig.ecam_read(devfn(0, 3), 0, 2) == 0xFFFF
    rig.ecam_write(devfn(5), 4, 2, 0xFFFF)                    # ignored
    assert rig.bus.stats.absent_writes == 1
    # CONFIG_ADDRESS: 32-bit only, reserved bits read 0; byte accesses to 0xCF8-0xCFB are not configuration cycles
    rig.pio.write(0xCF8, 4, 0xFFFF_FFFF)
    assert rig.pio.read(0xCF8, 4) == 0x80FF_FFFC
    rig.pio.write(0xCF9, 1, 0x06)
    assert rig.bus.stats.ignored_port_accesses == 1
    rig.pio.write(0xCF8, 4, 0)                                # enable bit clear: data reads all ones
    assert rig.pio.read(0xCFC, 4) == 0xFFFF_FFFF
    # another bus: nothing there
    assert rig.mmio.read(ECAM_BASE + ECAM_SIZE - 4, 4) == 0xFFFF_FFFF       # 00:1f.7, offset 0xffc
    assert rig.bus.config_read(1, 0, 0, 4) == 0xFFFF_FFFF


def test_virtio_function_header_and_capabilities(rig: Rig) -> None:
    transport = rig.add_virtio()
    slot = devfn(1)
    assert rig.ecam_read(slot, 0) == 0x1044_1AF4             # vendor 1AF4, device 0x1040 + 4 (entropy)
    assert rig.ecam_read(slot, 0x08) & 0xFF == 1              # revision 1
    assert rig.ecam_read(slot, 0x2C) == 0x0044_1AF4
    assert rig.ecam_read(slot, 0x3D, 1) == 1                  # INTA
    assert rig.ecam_read(slot, 0x06, 2) & 0x10                # a capability list
    caps, pointer = [], rig.ecam_read(slot, 0x34, 1)
    while pointer:
        cap_id, following = rig.ecam_read(slot, pointer, 1), rig.ecam_read(slot, pointer + 1, 1)
        caps.append((cap_id, rig.ecam_read(slot, pointer + 3, 1) if cap_id == 9 else None))
        pointer = following
    assert caps == [(9, 1), (9, 2), (9, 3), (9, 4), (9, 5), (0x11, None)]
    msix = transport.function.msix_cap
    assert rig.ecam_read(slot, msix + 2, 2) & 0x7FF == 1      # 2 vectors: the queue and configuration changes
    assert rig.ecam_read(slot, 0x100) == 0                   # the extended space: no capabilities
    # the legacy mechanism sees the same bytes
    for offset in range(0, 0x100, 4):
        assert rig.legacy_read(slot, offset) == rig.ecam_read(slot, offset)


def test_bar_sizing_moving_and_decoding(rig: Rig) -> None:
    transport = rig.add_virtio()
    slot = devfn(1)
    low = rig.ecam_read(slot, 0x10)
    assert low & 0x7 == 0x4                                   # BAR 0: 64-bit memory
    base = low & ~0xF
    assert base >= PCI_MMIO_BASE and rig.moves == [base + 0x3000]
    assert rig.mmio.find(base) is not None
    # sizing, as an OS does it: decoding off, all ones, read back, restore
    rig.ecam_write(slot, 0x04, 2, 0)
    assert rig.mmio.find(base) is None and rig.moves[-1] is None
    rig.ecam_write(slot, 0x10, 4, 0xFFFF_FFFF)
    rig.ecam_write(slot, 0x14, 4, 0xFFFF_FFFF)
    assert rig.ecam_read(slot, 0x10) == 0xFFFF_C004 and rig.ecam_read(slot, 0x14) == 0xFFFF_FFFF
    rig.ecam_write(slot, 0x18, 4, 0xFFFF_FFFF)
    assert rig.ecam_read(slot, 0x18) == 0xFFFF_E000           # BAR 2: 8 KiB, 32-bit
    rig.ecam_write(slot, 0x30, 4, 0xFFFF_F800)
    assert rig.ecam_read(slot, 0x30) == 0                    # no expansion ROM
    # move BAR 0 elsewhere in the window, decode again
    rig.ecam_write(slot, 0x10, 4, 0xC800_0000)
    rig.ecam_write(slot, 0x14, 4, 0)
    rig.ecam_write(slot, 0x18, 4, 0xC801_0000)
    rig.ecam_write(slot, 0x04, 2, 0x6)
    assert rig.bus.decoded()[(slot, 0)] == (0xC800_0000, 0x4000)
    assert rig.moves[-1] == 0xC800_3000
    assert rig.mmio.find(base) is None
    assert rig.mmio.read(0xC800_0012, 2) == 1                 # num_queues through the new address
    assert transport.function.bar_address(0) == 0xC800_0000


def test_bars_that_cannot_decode_are_refused(rig: Rig, memory: GuestMemory) -> None:
    first, second = rig.add_virtio(), rig.add_virtio()
    a, b = devfn(1), devfn(2)
    bar0_a = first.function.bar_address(0)
    # b's BAR 0 onto a's: refused (counted), a keeps decoding
    rig.ecam_write(b, 0x10, 4, bar0_a)
    assert (b, 0) not in rig.bus.decoded() and rig.bus.stats.bars_refused == 1
    assert rig.mmio.find(bar0_a).device.function is first.function     # type: ignore[union-attr]
    # a moves away: b takes the place on the next decode
    rig.ecam_write(a, 0x10, 4, 0xC900_0000)
    assert rig.bus.decoded()[(b, 0)] == (bar0_a, 0x4000)
    # over RAM, over the local APIC, over ECAM, beyond the address space: refused
    for address, high in ((0x10_0000, 0), (0xFEE0_0000, 0), (ECAM_BASE, 0), (0, 0x0010_0000)):
        rig.ecam_write(a, 0x10, 4, address)
        rig.ecam_write(a, 0x14, 4, high)
        assert (a, 0) not in rig.bus.decoded(), hex(address)
    assert not any(memory.contains(start, size) for start, size in rig.bus.decoded().values())
    assert second.function.bar_address(0) == bar0_a


def test_a_64_bit_bar_above_4_gib_decodes(rig: Rig) -> None:
    rig.add_virtio()
    slot = devfn(1)
    rig.ecam_write(slot, 0x10, 4, 0)
    rig.ecam_write(slot, 0x14, 4, 0x10)                        # 64 GiB: above RAM
    assert rig.bus.decoded()[(slot, 0)] == (0x10_0000_0000, 0x4000)


def test_read_only_fields_hold_against_any_write(rig: Rig) -> None:
    rig.add_virtio()
    slot = devfn(1)
    before = {offset: rig.ecam_read(slot, offset) for offset in range(0, 0x100, 4)}
    writable = {0x04, 0x0C, 0x10, 0x14, 0x18, 0x3C}
    for offset in range(0, 0x100, 4):
        rig.ecam_write(slot, offset, 4, 0)
    for offset in range(0, 0x40, 4):
        if offset not in writable:
            assert rig.ecam_read(slot, offset) == before[offset], hex(offset)


def test_writes_to_every_offset_of_every_function(rig: Rig, memory: GuestMemory) -> None:
    """Garbage everywhere, every width: nothing breaks, identification stays, decoded BARs never overlap RAM or
    each other, the VMM keeps answering."""
    rig.add_virtio()
    rig.add_virtio()
    generator = random.Random(11)
    for slot in [devfn(d, f) for d in range(0, 4) for f in (0, 1)]:
        for offset in range(0, 0x1000, 1 if slot < 0x20 else 3):
            for size in (1, 2, 4, 8):
                value = generator.choice((0, 0xFFFF_FFFF_FFFF_FFFF, generator.getrandbits(64)))
                rig.ecam_write(slot, offset, size, value & ((1 << (8 * size)) - 1))
                rig.ecam_read(slot, offset, size)
            rig.pio.write(0xCF8, 4, 0x8000_0000 | slot << 8 | (offset & 0xFC))
            rig.pio.write(0xCFC + (offset & 3), 1, generator.getrandbits(8))
    assert rig.ecam_read(devfn(1), 0) == 0x1044_1AF4 and rig.ecam_read(0, 0) == 0x0008_1B36
    ranges = sorted(rig.bus.decoded().values())
    for (start, size), (following, _) in itertools.pairwise(ranges):
        assert start + size <= following
    assert not any(memory.contains(start, 1) for start, _ in ranges)


def test_config_space_function_rules() -> None:
    function = PciFunction(PciIdentity(0x1234, 0x5678, 0x020000),
                           [BarSpec(0, 0x1000, BarKind.MEMORY32, prefetchable=True), BarSpec(1, 0x20, BarKind.IO)])
    assert function.config_read(0x10, 4) == 0x8                 # prefetchable 32-bit memory
    assert function.config_read(0x14, 4) == 0x1                 # I/O
    function.config_write(0x10, 4, 0xFFFF_FFFF)
    function.config_write(0x14, 4, 0xFFFF_FFFF)
    assert function.config_read(0x10, 4) == 0xFFFF_F008
    assert function.config_read(0x14, 4) == 0xFFFF_FFE1
    function.config_write(0x04, 2, 0xFFFF)
    assert function.config_read(0x04, 2) == 0x3                 # I/O and memory space only: no bus mastering
    function.config_write(0x00, 8, 0)
    assert function.config_read(0x00, 4) == 0x5678_1234
    assert function.config_read(0x02, 3) == 0 and function.bad_accesses == 1   # a 3-byte access
    with pytest.raises(ValueError):
        BarSpec(5, 0x1000, BarKind.MEMORY64)                    # a 64-bit BAR needs two registers
    with pytest.raises(ValueError):
        BarSpec(0, 0x1800)                                      # not a power of two


def test_state_round_trip_of_the_configuration(rig: Rig) -> None:
    transport = rig.add_virtio()
    slot = devfn(1)
    rig.ecam_write(slot, 0x10, 4, 0xC700_0000)
    rig.ecam_write(slot, 0x3C, 1, 11)
    saved = transport.function.save_function()
    assert struct.unpack_from("<I", saved.config, 0x10)[0] & ~0xF == 0xC700_0000
    other = Rig(rig.bus.memory)
    try:
        copy = other.add_virtio()
        copy.function.restore_function(saved)
        other.bus.redecode()
        assert other.bus.decoded()[(slot, 0)][0] == 0xC700_0000
        assert copy.function.config_read(0x3C, 1) == 11
    finally:
        other.close()
