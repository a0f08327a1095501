"""bzImage setup header parsing and loading (kvmlet.boot.bzimage)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from kvmlet.boot.bzimage import (
    LoadFlags,
    XLoadFlags,
    kernel_version_string,
    load_bzimage,
    parse_setup_header,
    setup_header_bytes,
)
from kvmlet.boot.errors import BootImageError
from kvmlet.memory import GuestMemory
from tests.support.boot_images import make_bzimage

MiB = 1 << 20


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.with_size(64 * MiB) as mem:
        yield mem


def test_header_fields() -> None:
    image = make_bzimage(setup_sects=0, init_size=0x123000, cmdline_size=1000, initrd_addr_max=0x37FFFFFF)
    header = parse_setup_header(image)
    assert header.setup_sects == 4  # 0 means 4
    assert header.protected_mode_offset == 5 * 512
    assert header.version == 0x020F
    assert header.init_size == 0x123000
    assert header.cmdline_size == 1000
    assert header.initrd_addr_max == 0x37FFFFFF
    assert header.kernel_alignment == 0x200000
    assert header.relocatable_kernel
    assert XLoadFlags.KERNEL_64 in header.xloadflags
    assert LoadFlags.LOADED_HIGH in header.loadflags
    assert header.header_end == 0x202 + 0x6A
    assert setup_header_bytes(image, header) == image[0x1F1 : 0x202 + 0x6A]
    assert kernel_version_string(image, header) == "6.6.6-test (builder@host) #1 SMP"


def test_loads_protected_mode_kernel_at_pref_address(memory: GuestMemory) -> None:
    kernel = bytes(range(256)) * 32
    image = make_bzimage(kernel=kernel, setup_sects=3, pref_address=0x1000000, init_size=0x400000)
    loaded = load_bzimage(memory, image)
    assert loaded.load_address == 0x1000000
    assert loaded.entry == 0x1000200
    assert loaded.end == 0x1400000
    assert memory.read(0x1000000, len(kernel)) == kernel


def test_relocatable_kernel_falls_back_to_16mib_aligned(memory: GuestMemory) -> None:
    # pref_address leaves no room for init_size below the end of memory; 16 MiB does.
    image = make_bzimage(pref_address=0x3800000, kernel_alignment=0x400000, init_size=0x1000000)
    loaded = load_bzimage(memory, image)
    assert loaded.load_address == 0x1000000


def test_kernel_that_does_not_fit(memory: GuestMemory) -> None:
    image = make_bzimage(init_size=0x4000000)
    with pytest.raises(
        BootImageError, match=r"needs 64 MiB \(init_size 0x4000000\) from 0x1000000.*at least 80 MiB"
    ):
        load_bzimage(memory, image)


def test_non_relocatable_kernel_does_not_move(memory: GuestMemory) -> None:
    image = make_bzimage(pref_address=0x3800000, relocatable=0, init_size=0x1000000)
    with pytest.raises(BootImageError, match="from 0x3800000"):
        load_bzimage(memory, image)


def _with_setup_sects(image: bytes, sects: int) -> bytes:
    return image[:0x1F1] + bytes([sects]) + image[0x1F2:]


@pytest.mark.parametrize(
    ("image", "fragment"),
    [
        (make_bzimage(boot_flag=0x1234), "boot_flag at 0x1fe is 0x1234, expected 0xaa55"),
        (make_bzimage(magic=b"HdrZ"), "no 'HdrS' setup header signature at 0x202"),
        (make_bzimage(version=0x0204), "boot protocol 2.04 is too old"),
        (make_bzimage(xloadflags=0), "no 64-bit entry point (boot protocol 2.15"),
        (make_bzimage(version=0x020A), "no 64-bit entry point (boot protocol 2.10"),
        (make_bzimage(loadflags=0), "LOADED_HIGH is clear"),
        (make_bzimage(kernel_alignment=0x300000), "kernel_alignment 0x300000 is not a power of two"),
        (make_bzimage(header_length=0xA0), "setup header ends at 0x2a2"),
        (_with_setup_sects(make_bzimage(), 200), "setup_sects=200 puts the protected-mode kernel"),
        (make_bzimage()[:0x200], "too short to hold a setup header"),
    ],
    ids=[
        "boot-flag",
        "hdrs",
        "old-protocol",
        "no-xlf-kernel-64",
        "no-xloadflags",
        "zimage",
        "alignment",
        "header-length",
        "setup-sects",
        "truncated",
    ],
)
def test_bad_headers_are_refused(image: bytes, fragment: str) -> None:
    with pytest.raises(BootImageError, match=re.escape(fragment)):
        parse_setup_header(image)
