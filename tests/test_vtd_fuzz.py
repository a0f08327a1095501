"""A hostile guest programming the VT-d unit and a virtio-pci device behind it: random register writes (every
register, every width), random translation structures (garbage root and context entries, reserved bits, tables
pointing anywhere, loops), random queued-invalidation descriptors and tails, random MSI-X entries, random
configuration-space writes, and DMA through whatever that leaves, interleaved.

After every operation: the fault status is consistent (PPF exactly when a record is pending, FRI a valid
record, IQH inside the queue), nothing outside guest RAM changed (guard pages around every region, as the device
fuzzer's), and nothing but the refusals the unit defines (DmaFault, or GuestMemoryError for what translates to no
RAM) comes out of a DMA access. At the end translation is turned off and the device must serve a request.

Run longer by hand: ``python tests/test_vtd_fuzz.py --cases 20000 --seed 3``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import random
import struct
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmlet.devices.iommu import regs as r
from kvmlet.devices.iommu.dma import DmaAddressSpace
from kvmlet.devices.iommu.vtd import VtdUnit
from kvmlet.devices.pci.bus import PciBus
from kvmlet.devices.pci.virtio_pci import MSIX_BAR, PciTransport
from kvmlet.devices.virtio.rng import VirtioRng
from kvmlet.memory import GuestMemory, GuestMemoryError, MiB
from tests.fuzz.device_rig import Canaries
from tests.support.pcidriver import FakeRouter, PciDriver
from tests.support.virtq import DriverRing
from tests.support.vtd import Tables, enable

SID = 0x08
REGISTERS = [r.GCMD, r.RTADDR, r.RTADDR + 4, r.CCMD, r.CCMD + 4, r.FSTS, r.FECTL, r.FEDATA, r.FEADDR, r.IQT,
             r.IQA, r.IQA + 4, r.ICS, r.IECTL, r.IVA, r.IOTLB, r.IOTLB + 4, r.IQH, r.CAP, r.VER, r.PMEN, 0xFFC,
             *range(r.FAULT_REGS, r.FAULT_REGS_END, 4)]
ADDRESSES = [0, 0x1000, 0x200000, 0x3FF000, 0xBFFFF000, 0xC0000000, 0xE0000000, 0xFED90000, 1 << 32,
             (1 << 48) - 4096, 1 << 50, 0xFFFF_FFFF_FFFF_F000]


class Case:
    def __init__(self, memory: GuestMemory, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.memory = memory
        self.msi: list[tuple[int, int]] = []
        self.unit = VtdUnit(memory, lambda address, data: self.msi.append((address, data)))
        self.space = DmaAddressSpace(memory, self.unit, SID)
        self.router = FakeRouter()
        self.transport = PciTransport(VirtioRng(name="rng"), self.space, router=self.router, translated=True)
        self.driver = PciDriver(self.transport)
        self.ring = DriverRing(memory, size=8)
        if self.rnd.randrange(4):   # mostly: start from a working set-up, for the mutations to reach deeper
            tables = Tables(memory, base=0x200000)
            tables.context(SID, 1, levels=self.rnd.choice((3, 4)))
            for page in range(0, 0x100000, 0x1000):
                tables.map(1, page, page)
            tables.map(1, 0x4000_0000, 0x40_0000, 2 << 20)
            enable(self.unit, tables)
            if self.rnd.getrandbits(1):
                self.unit.bus_write(r.IQA, 8, tables.page())
                self.unit.bus_write(r.GCMD, 4, int(r.Gcmd.TE | r.Gcmd.QIE))

    def value(self) -> int:
        rnd = self.rnd
        choice = rnd.randrange(6)
        if choice == 0:
            return rnd.choice(ADDRESSES) | rnd.getrandbits(2)
        if choice == 1:
            return rnd.getrandbits(64)
        if choice == 2:
            return 0xFFFF_FFFF_FFFF_FFFF
        if choice == 3:
            return 0x200000 + rnd.randrange(0, 0x200000, 8) | rnd.choice((0, 1, 3, 0x80, 0x883))
        return rnd.getrandbits(12)

    def step(self) -> None:
        rnd, unit = self.rnd, self.unit
        op = rnd.randrange(9)
        if op == 0:        # a register, any width
            offset = rnd.choice(REGISTERS) + rnd.choice((0, 0, 0, 1, 2))
            unit.bus_write(offset, rnd.choice((4, 4, 8, 1, 2)), self.value())
        elif op == 1:      # the commands that matter most, well formed
            command = rnd.choice((r.Gcmd.SRTP, r.Gcmd.TE, r.Gcmd.QIE, 0, r.Gcmd.TE | r.Gcmd.QIE))
            unit.bus_write(r.RTADDR, 8, rnd.choice((0x200000, 0x201000, self.value())))
            unit.bus_write(r.GCMD, 4, int(command) | (unit.gsts & (r.GSTS_TES | r.GSTS_QIES)))
        elif op == 2:      # scribble over the tables' area: root, context and page-table entries
            address = 0x200000 + rnd.randrange(0, 0x200000, 8)
            self.memory.write_u64(address, self.value())
        elif op == 3:      # queued invalidation: descriptors, then a tail anywhere
            base = unit.iqa & r.IQA_ADDRESS_MASK
            if self.memory.contains(base, 16 * 16):
                for index in range(rnd.randrange(1, 16)):
                    kind = rnd.choice((1, 2, 5, 3, 4, 0, 7))
                    self.memory.write(base + 16 * index, struct.pack("<QQ", kind | rnd.getrandbits(8) << 4
                                                                     | rnd.getrandbits(16) << 16, self.value()))
            unit.bus_write(r.IQT, 8, rnd.randrange(0, 300) << 4)
        elif op == 4:      # DMA through the device's address space
            iova = rnd.choice((0x1000, 0x40000, 0x200000, self.value()))
            try:
                if rnd.getrandbits(1):
                    self.space.write(iova, bytes(rnd.randrange(1, 64)))
                else:
                    self.space.read(iova, rnd.randrange(1, 8192))
            except GuestMemoryError:
                pass       # DmaFault, a range that is not RAM: both defined refusals
        elif op == 5:      # the device: a request with whatever addresses
            gpa = self.ring.alloc(64)
            head = self.ring.add_chain([(rnd.choice((gpa, self.value())), rnd.randrange(1, 128), True)])
            self.ring.publish(head)
            self.driver.notify()
        elif op == 6:      # MSI-X entries and control
            self.transport.bar_write(MSIX_BAR, rnd.randrange(0, 48, 4), 4, self.value() & 0xFFFF_FFFF)
            self.driver.msix_enable(rnd.getrandbits(1) == 1, rnd.getrandbits(1) == 1)
        elif op == 7:      # configuration space, anywhere
            self.transport.function.config_write(rnd.randrange(0, 4096), rnd.choice((1, 2, 4, 8)), self.value())
        else:              # translate as a device of another source would
            try:
                unit.translate(rnd.getrandbits(16), self.value(), rnd.getrandbits(1) == 1)
            except GuestMemoryError:
                pass

    def check(self) -> None:
        unit = self.unit
        fsts = unit.bus_read(r.FSTS, 4)
        pending = [i for i, record in enumerate(unit.records) if record.pending]
        assert bool(fsts & r.FSTS_PPF) == bool(pending)
        if pending:
            assert fsts >> 8 & 0xFF in pending or unit.fri < r.FAULT_RECORDS
        assert unit.iqh >> 4 < 256 << (unit.iqa & 7) or unit.iqe
        assert unit.iqh & ~r.QUEUE_INDEX_MASK == 0

    def finish(self) -> None:
        """Translation off: the device serves a well-formed request again after a reset."""
        self.unit.bus_write(r.GCMD, 4, 0)
        self.unit.bus_write(r.FSTS, 4, r.FSTS_IQE | r.FSTS_PFO)
        ring = DriverRing(self.memory, size=8, desc=0x60000, avail=0x61000, used=0x62000, data=0x63000)
        self.driver.start(ring)
        buffer, _ = ring.buffer(32)
        ring.publish(ring.add_chain([(buffer, 32, True)]))
        self.driver.notify()
        assert ring.take_used() == [(0, 32)], self.transport.stats.last_error

    def close(self) -> None:
        self.transport.close()
        self.router.close()


def run_cases(count: int, seed: int, steps: int = 60) -> Counter[str]:
    """Run ``count`` cases; the unit's counters summed over them (what the cases reached)."""
    logger = logging.getLogger("kvmlet")
    level = logger.level
    logger.setLevel(logging.ERROR)   # every case's refusals are logged otherwise
    memory = GuestMemory.with_size(16 * MiB)
    canaries = Canaries(memory)
    totals: Counter[str] = Counter()
    try:
        for number in range(count):
            case = Case(memory, seed * 1_000_003 + number)
            try:
                case.driver.start(case.ring)
                for _ in range(steps):
                    case.step()
                    case.check()
                    canaries.check()
                case.finish()
                totals.update({k: v for k, v in vars(case.unit.stats).items() if isinstance(v, int)})
                totals["cases"] += 1
            finally:
                case.close()
            memory.fill(0, memory.size)
        return totals
    finally:
        logger.setLevel(level)
        memory.close()
        canaries.close()


def test_hostile_programs_of_the_unit_and_the_device() -> None:
    totals = run_cases(80, seed=1)
    assert totals["cases"] == 80
    # the cases reached what they are for: recorded faults, invalidations of both kinds, queue errors, IOTLB use
    for counter in ("faults_recorded", "iotlb_invalidations", "context_invalidations", "queue_errors", "iotlb_hits"):
        assert totals[counter] > 0, (counter, totals)


def test_pci_bus_under_hostile_configuration() -> None:
    """Random configuration writes to every function of a bus with two devices: decoded BARs never overlap
    each other or RAM, whatever the guest writes."""
    from kvmlet.devices.bus import Bus

    memory = GuestMemory.with_size(16 * MiB)
    router = FakeRouter()
    bus = PciBus(Bus("mmio"), Bus("pio"), memory)
    transports = [PciTransport(VirtioRng(name=f"rng{n}"), memory, router=router) for n in range(2)]
    try:
        for transport in transports:
            bus.add(transport.function)
        rnd = random.Random(5)
        for _ in range(20000):
            slot = rnd.choice((0, 8, 16, 24))
            offset = rnd.choice((0x04, 0x10, 0x14, 0x18, 0x1C, rnd.randrange(0, 256)))
            value = rnd.choice((0, 0xFFFF_FFFF, rnd.choice(ADDRESSES) & 0xFFFF_FFFF, rnd.getrandbits(32), 0x6))
            bus.config_write(0, slot, offset, rnd.choice((1, 2, 4)), value)
            ranges = sorted(bus.decoded().values())
            for (start, size), (following, _) in itertools.pairwise(ranges):
                assert start + size <= following
            assert not any(memory.contains(start, 1) for start, _ in ranges)
    finally:
        for transport in transports:
            transport.close()
        router.close()
        memory.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60)
    options = parser.parse_args()
    totals = run_cases(options.cases, options.seed, options.steps)
    print(f"{totals.pop('cases')} cases passed; the unit counted: "
          + ", ".join(f"{key} {value}" for key, value in sorted(totals.items()) if value))
