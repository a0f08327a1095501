"""The public loader API (kvmlet.boot.loader): identify_kernel and load, on synthetic images."""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator

import pytest

from kvmlet.boot.e820 import E820Type
from kvmlet.boot.errors import BootImageError
from kvmlet.boot.loader import BootProtocol, KernelKind, identify_kernel, load, read_kernel
from kvmlet.memory import GuestMemory
from tests.support.boot_images import Seg, make_bzimage, make_elf, pvh_note

MiB = 1 << 20
BANNER = b"Linux version 6.6.6-test (builder@host) (gcc 13) #1 SMP PREEMPT\n"


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.with_size(64 * MiB) as mem:
        yield mem


def guest_elf(*, pvh: bool = True, extra: bytes = b"") -> bytes:
    text = b"\xf4" * 0x2000 + extra
    return make_elf(
        [Seg(0x100000, text), Seg(0x200000, b"data", memsz=0x10000)],
        entry=0x100000,
        notes=[pvh_note(0x100010)] if pvh else [],
    )


# -- identify ---------------------------------------------------------------------------------------


def test_identify_elf() -> None:
    kernel = identify_kernel(guest_elf(extra=BANNER), "guest.elf")
    assert kernel.kind is KernelKind.ELF
    assert str(kernel.path) == "guest.elf"
    assert kernel.linux_version == BANNER.decode().strip()
    assert kernel.has_pvh_entry
    assert not kernel.pvm_aware


def test_identify_prefers_the_banner_with_a_build_number() -> None:
    data = guest_elf(extra=b"Linux version 6.6.6 (b@h) # SMP\0" + BANNER)
    assert identify_kernel(data).linux_version == BANNER.decode().strip()


def test_identify_bzimage() -> None:
    kernel = identify_kernel(make_bzimage())
    assert kernel.kind is KernelKind.BZIMAGE
    assert kernel.linux_version == "Linux version 6.6.6-test (builder@host) #1 SMP"
    assert not kernel.pvm_aware


def test_identify_neither() -> None:
    with pytest.raises(
        BootImageError, match=r"kernel\.img is neither an ELF64 nor a bzImage \(first bytes 4d 5a"
    ):
        identify_kernel(b"MZ" + bytes(600), "kernel.img")


def test_identify_validates_headers() -> None:
    with pytest.raises(BootImageError, match="boot_flag at 0x1fe is 0x0000"):
        identify_kernel(make_bzimage(boot_flag=0))
    with pytest.raises(BootImageError, match="machine 40 is not x86-64"):
        identify_kernel(make_elf([Seg(0x100000, b"x")], entry=0x100000, machine=40))


def test_read_kernel_missing_file(tmp_path: object) -> None:
    with pytest.raises(BootImageError, match="cannot read kernel image /nonexistent/vmlinux"):
        read_kernel("/nonexistent/vmlinux")


@pytest.mark.parametrize(
    ("extra", "sections", "expected"),
    [
        (BANNER + b"\0pvm-guest: pvm guest doesn't support LDT\0", (), True),
        (BANNER + b"\0force enabled on kvm pvm guest.\0", (), True),
        (BANNER, (".data.reloc",), False),  # supporting evidence only
        (b"pvm-guest: something\0", (), False),  # not a Linux image
        (BANNER, (), False),
    ],
)
def test_pvm_guest_heuristic(extra: bytes, sections: tuple[str, ...], expected: bool) -> None:
    data = make_elf([Seg(0x100000, b"\x90" * 64 + extra)], entry=0x100000, sections=sections)
    assert identify_kernel(data).pvm_aware is expected


# -- load: ELF, 64-bit protocol ---------------------------------------------------------------------


def test_load_elf_linux64(memory: GuestMemory) -> None:
    kernel = identify_kernel(guest_elf())
    initrd = bytes(range(256)) * 40  # 10 KiB
    info = load(memory, kernel, cmdline="console=ttyS0 kvmlet.test=serial", initrd=initrd, cpus=2)
    assert info.protocol is BootProtocol.LINUX64
    assert info.entry == 0x100000
    assert info.kernel_range == (0x100000, 0x210000)
    assert info.boot_params_gpa == 0x7000
    assert info.cmdline == b"console=ttyS0 kvmlet.test=serial"
    assert memory.read(0x20000, len(info.cmdline) + 1) == info.cmdline + b"\0"

    # The initrd: page-aligned, at the top of RAM.
    assert info.initrd_range is not None
    start, end = info.initrd_range
    assert (start % 4096, end - start) == (0, len(initrd))
    assert 64 * MiB - 4096 < end <= 64 * MiB
    assert memory.read(start, len(initrd)) == initrd

    # The zero page, read back from guest memory at the documented offsets.
    zp = 0x7000
    assert memory.read_u16(zp + 0x1FE) == 0xAA55
    assert memory.read(zp + 0x202, 4) == b"HdrS"
    assert memory.read_u16(zp + 0x206) == 0x020F
    assert memory.read(zp + 0x210, 2) == b"\xff\x81"
    assert memory.read_u32(zp + 0x228) == 0x20000
    assert memory.read_u32(zp + 0x238) == 2047
    assert memory.read_u32(zp + 0x218) == start
    assert memory.read_u32(zp + 0x21C) == len(initrd)
    assert memory.read(zp + 0x1E8, 1) == bytes([len(info.e820)])
    for i, entry in enumerate(info.e820):
        assert memory.read(zp + 0x2D0 + 20 * i, 20) == struct.pack("<QQI", entry.addr, entry.size, entry.type)
    assert info.e820[-1].type is E820Type.RAM and info.e820[-1].end == 64 * MiB

    # Page tables, GDT and MP table are in place; the CPU state points at them.
    assert memory.read_u64(0x9000) == 0xA003
    assert memory.read_u64(0x510) == 0x00AF9B000000FFFF
    assert memory.read(0x9FC00, 4) == b"_MP_"
    state = info.cpu_state
    assert (state.rip, state.rsi, state.cr3) == (0x100000, 0x7000, 0x9000)
    assert state.cs.selector == 0x10


def test_load_elf_pvh(memory: GuestMemory) -> None:
    kernel = identify_kernel(guest_elf())
    initrd = b"\x07" * 5000
    info = load(memory, kernel, cmdline="quiet", initrd=initrd, protocol=BootProtocol.PVH)
    assert info.protocol is BootProtocol.PVH
    assert info.entry == 0x100010
    assert info.boot_params_gpa == 0x6000
    assert info.cpu_state.rbx == 0x6000
    assert info.cpu_state.rip == 0x100010
    assert info.cpu_state.cr0 & 0x80000000 == 0
    assert info.initrd_range is not None
    magic, version, _flags, nr_modules, modlist, cmdline = struct.unpack("<IIIIQQ", memory.read(0x6000, 32))
    assert (magic, version, nr_modules, cmdline) == (0x336EC578, 1, 1, 0x20000)
    paddr, size = struct.unpack("<QQ", memory.read(modlist, 16))
    assert (paddr, size) == (info.initrd_range[0], len(initrd))
    memmap, entries = struct.unpack("<QI", memory.read(0x6000 + 0x28, 12))
    assert entries == len(info.e820)
    for i, entry in enumerate(info.e820):
        assert struct.unpack("<QQI", memory.read(memmap + 24 * i, 20)) == (entry.addr, entry.size, entry.type)
    assert memory.read(0x20000, 6) == b"quiet\0"
    assert memory.read_u64(0x528) == 0x00CF9B000000FFFF  # 32-bit code for the PVH entry


def test_auto_uses_linux64_for_an_elf_with_a_pvh_note(memory: GuestMemory) -> None:
    info = load(memory, identify_kernel(guest_elf()), cmdline="")
    assert (info.protocol, info.entry) == (BootProtocol.LINUX64, 0x100000)
    assert info.initrd_range is None
    assert memory.read_u32(0x7000 + 0x218) == 0


def test_pvh_needs_the_note(memory: GuestMemory) -> None:
    with pytest.raises(BootImageError, match=r"has no PVH entry note \(owner 'Xen', type 18"):
        load(memory, identify_kernel(guest_elf(pvh=False)), cmdline="", protocol=BootProtocol.PVH)


# -- load: bzImage ----------------------------------------------------------------------------------


def test_load_bzimage(memory: GuestMemory) -> None:
    image = make_bzimage(kernel=b"\xf4" * 0x3000, init_size=0x800000, initrd_addr_max=0x2FFFFFF)
    info = load(memory, identify_kernel(image), cmdline="root=/dev/vda", initrd=b"\x01" * 70000)
    assert info.protocol is BootProtocol.LINUX64
    assert info.entry == 0x1000200
    assert info.kernel_range == (0x1000000, 0x1800000)
    assert memory.read(0x1000000, 0x3000) == b"\xf4" * 0x3000
    # initrd_addr_max is the highest byte the initrd may occupy.
    assert info.initrd_range is not None
    assert info.initrd_range[1] <= 0x3000000 and info.initrd_range[0] % 4096 == 0
    # The setup header is copied from the image, then the loader's fields are set.
    header_end = 0x202 + 0x6A
    copied = bytearray(memory.read(0x7000 + 0x1F1, header_end - 0x1F1))
    original = bytearray(image[0x1F1:header_end])
    for offset, size in ((0x210, 2), (0x218, 8), (0x224, 2), (0x228, 4)):  # fields the loader writes
        copied[offset - 0x1F1 : offset - 0x1F1 + size] = original[offset - 0x1F1 : offset - 0x1F1 + size]
    assert copied == original
    assert memory.read(0x7000 + 0x210, 2) == b"\xff\x81"
    assert memory.read_u32(0x7000 + 0x228) == 0x20000
    assert memory.read_u32(0x7000 + 0x238) == 2047


def test_bzimage_cannot_use_pvh(memory: GuestMemory) -> None:
    with pytest.raises(BootImageError, match="is a bzImage, which has no PVH entry point"):
        load(memory, identify_kernel(make_bzimage()), cmdline="", protocol=BootProtocol.PVH)


# -- load: limits -----------------------------------------------------------------------------------


def test_command_line_over_the_limit(memory: GuestMemory) -> None:
    with pytest.raises(BootImageError, match="command line is 3000 bytes; this kernel accepts at most 2047"):
        load(memory, identify_kernel(guest_elf()), cmdline="a" * 3000)
    load(memory, identify_kernel(guest_elf()), cmdline="a" * 2047)
    with pytest.raises(BootImageError, match="command line is 300 bytes; this kernel accepts at most 255"):
        load(memory, identify_kernel(make_bzimage(cmdline_size=255)), cmdline="a" * 300)


def test_command_line_with_nul(memory: GuestMemory) -> None:
    with pytest.raises(BootImageError, match="NUL byte at position 3"):
        load(memory, identify_kernel(guest_elf()), cmdline="abc\0def")


def test_initrd_larger_than_memory(memory: GuestMemory) -> None:
    with pytest.raises(
        BootImageError, match=re.escape("initrd is 80 MiB but only 61.9 MiB of guest memory is free")
    ):
        load(memory, identify_kernel(guest_elf()), cmdline="", initrd=bytes(80 * MiB))


def test_initrd_that_does_not_fit_below_initrd_addr_max(memory: GuestMemory) -> None:
    image = make_bzimage(init_size=0x800000, initrd_addr_max=0x17FFFFF)  # kernel ends at 24 MiB
    with pytest.raises(BootImageError, match="initrd is 1 MiB but only 0 MiB of guest memory is free"):
        load(memory, identify_kernel(image), cmdline="", initrd=bytes(MiB))


def test_empty_initrd(memory: GuestMemory) -> None:
    with pytest.raises(BootImageError, match="initrd is empty"):
        load(memory, identify_kernel(guest_elf()), cmdline="", initrd=b"")


def test_kernel_outside_memory(memory: GuestMemory) -> None:
    image = make_elf([Seg(0x3F00000, b"x" * 0x200000)], entry=0x3F00000)
    with pytest.raises(BootImageError, match=r"is outside guest memory .* at least 65 MiB"):
        load(memory, identify_kernel(image), cmdline="")


@pytest.mark.parametrize(("cpus", "fragment"), [(0, "at least one vCPU"), (255, "more than the MP table can describe")])
def test_cpu_count(memory: GuestMemory, cpus: int, fragment: str) -> None:
    with pytest.raises(BootImageError, match=fragment):
        load(memory, identify_kernel(guest_elf()), cmdline="", cpus=cpus)
