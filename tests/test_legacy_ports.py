"""The debug-exit port (0x501) and the POST-code port (0x80)."""

from __future__ import annotations

from kvmlet.devices.bus import Bus
from kvmlet.devices.legacy.debug_exit import DebugExit
from kvmlet.devices.legacy.ports import register_claims
from kvmlet.devices.legacy.post_code import PostCode


def test_debug_exit_reports_the_written_value() -> None:
    statuses: list[int] = []
    device = DebugExit(statuses.append)
    bus = Bus("pio")
    register_claims(bus, device.bus_claims())
    assert [(r.base, r.size) for r in bus.ranges()] == [(0x501, 2)]
    assert device.stats().last_status is None
    bus.write(0x501, 1, 0)
    bus.write(0x501, 1, 0x1FF)  # a byte write reports a byte
    bus.write(0x501, 2, 0x1234)
    bus.write(0x502, 1, 7)  # anywhere in the range, as QEMU's isa-debug-exit
    bus.write(0x501, 4, 0xDEADBEEF)
    assert statuses == [0, 0xFF, 0x1234, 7, 0xDEADBEEF]
    assert device.last_status == 0xDEADBEEF
    assert device.stats().writes == 5
    assert bus.read(0x501, 1) == 0


def test_post_code_counts_writes_and_reads_all_ones() -> None:
    device = PostCode()
    bus = Bus("pio")
    register_claims(bus, device.bus_claims())
    assert [(r.base, r.size) for r in bus.ranges()] == [(0x80, 1)]
    for code in range(10):
        bus.write(0x80, 1, code)
    assert device.writes == 10 and device.last_code == 9
    assert bus.read(0x80, 1) == 0xFF
    assert bus.read(0x80, 2) == 0xFFFF
    stats = device.stats()
    assert (stats.writes, stats.reads, stats.last_code) == (10, 2, 9)
