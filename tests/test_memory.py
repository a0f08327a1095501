"""GuestMemory: every access is bounds-checked; nothing outside guest RAM is reachable."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlet.memory import MMIO_HOLE_END, MMIO_HOLE_START, GuestMemory, GuestMemoryError, MiB, ram_layout


def test_layout_splits_around_the_mmio_hole() -> None:
    assert ram_layout(64 * MiB) == [(0, 64 * MiB)]
    assert ram_layout(4096 * MiB) == [(0, MMIO_HOLE_START), (MMIO_HOLE_END, 4096 * MiB - MMIO_HOLE_START)]
    with pytest.raises(GuestMemoryError):
        ram_layout(0)
    with pytest.raises(GuestMemoryError):
        ram_layout(4097)


def test_read_write_round_trip() -> None:
    with GuestMemory.with_size(4 * MiB) as memory:
        memory.write(0x1000, b"hello")
        assert memory.read(0x1000, 5) == b"hello"
        memory.write_u64(0x2000, 0x1122334455667788)
        assert memory.read_u32(0x2004) == 0x11223344
        assert memory.read_cstring(0x1000, 100) == b"hello"
        memory.fill(0x1000, 8192)
        assert memory.read(0x1000, 5) == bytes(5)


@pytest.mark.parametrize("gpa,length", [(4 * MiB, 1), (4 * MiB - 1, 2), (-1, 1), (0, -1), (1 << 62, 8)])
def test_out_of_range_is_refused(gpa: int, length: int) -> None:
    with GuestMemory.with_size(4 * MiB) as memory, pytest.raises(GuestMemoryError):
        memory.view(gpa, length)


def test_ranges_across_regions_are_refused() -> None:
    with GuestMemory([(0, 1 * MiB), (2 * MiB, 1 * MiB)]) as memory:
        with pytest.raises(GuestMemoryError):
            memory.read(1 * MiB - 4, 8)  # would run into the gap
        memory.write(2 * MiB, b"x")
        assert memory.read(2 * MiB, 1) == b"x"


@given(st.integers(min_value=-(1 << 64), max_value=1 << 64), st.integers(min_value=-16, max_value=1 << 24))
def test_arbitrary_ranges_are_inside_or_refused(gpa: int, length: int) -> None:
    memory = _SHARED
    try:
        view = memory.view(gpa, length)
    except GuestMemoryError:
        assert not (gpa >= 0 and length >= 0 and gpa + length <= memory.size)
    else:
        assert len(view) == length and gpa >= 0 and gpa + length <= memory.size
        view.release()


_SHARED = GuestMemory.with_size(8 * MiB)
