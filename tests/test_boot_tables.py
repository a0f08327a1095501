"""Boot structures: layout, e820, page tables, GDT, vCPU state, MP table, zero page, PVH start info."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator

import pytest

from kvmlet.boot import layout
from kvmlet.boot.cpu_state import Segment, long_mode_state, pvh_state
from kvmlet.boot.e820 import E820Entry, E820Type, build_e820
from kvmlet.boot.errors import BootImageError
from kvmlet.boot.gdt import BOOT_GDT, gdt_bytes, write_gdt_and_idt
from kvmlet.boot.mptable import MAX_CPUS, build_mptable, mptable_size, write_mptable
from kvmlet.boot.pagetables import write_identity_page_tables
from kvmlet.boot.pvh import build_start_info
from kvmlet.boot.zeropage import build_zero_page
from kvmlet.memory import GuestMemory

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.with_size(64 * MiB) as mem:
        yield mem


# -- layout -----------------------------------------------------------------------------------------


def test_boot_structures_are_disjoint_and_outside_the_vga_hole() -> None:
    """In base memory (below the VGA hole) or in the BIOS area (reserved in the e820 map)."""
    areas = sorted(layout.BOOT_STRUCTURES, key=lambda a: a.start)
    for a, b in itertools.pairwise(areas):
        assert a.end <= b.start, f"{a.name} overlaps {b.name}"
    for area in areas:
        assert area.end <= layout.VGA_HOLE_START or (
            area.start >= layout.BIOS_AREA_START and area.end <= layout.BIOS_AREA_END), area.name
    assert layout.PAGE_TABLES_END == 0xF000
    assert layout.PVH_MODLIST_ADDR + layout.PVH_MODLIST_ENTRY_SIZE <= layout.PVH_AREA_END


# -- e820 -------------------------------------------------------------------------------------------


def test_e820_for_64_mib(memory: GuestMemory) -> None:
    assert build_e820(memory) == [
        E820Entry(0, 0x9FC00, E820Type.RAM),
        E820Entry(0x9FC00, 0x400, E820Type.RESERVED),
        E820Entry(0xF0000, 0x10000, E820Type.RESERVED),
        E820Entry(0x100000, 64 * MiB - 0x100000, E820Type.RAM),
    ]


def test_e820_with_memory_above_4_gib() -> None:
    with GuestMemory.with_size(4 * GiB, hugepages=False) as mem:  # sparse memfd: nothing is touched
        e820 = build_e820(mem)
    assert e820[3] == E820Entry(0x100000, 0xC000_0000 - 0x100000, E820Type.RAM)
    assert e820[4] == E820Entry(1 << 32, 1 * GiB, E820Type.RAM)
    assert len(e820) == 5


def test_e820_refuses_tiny_memory() -> None:
    with (
        GuestMemory.with_size(2 * MiB) as mem,
        pytest.raises(BootImageError, match="is 2 MiB; kvmlet needs at least 4 MiB"),
    ):
        build_e820(mem)


def test_e820_entry_packing() -> None:
    assert E820Entry(0x100000, 0x2000, E820Type.ACPI).pack() == struct.pack("<QQI", 0x100000, 0x2000, 3)


# -- page tables and GDT ----------------------------------------------------------------------------


def test_identity_page_tables(memory: GuestMemory) -> None:
    assert write_identity_page_tables(memory) == 0x9000
    assert memory.read_u64(0x9000) == 0xA000 | 0x3
    assert memory.read(0x9008, 4096 - 8) == bytes(4096 - 8)
    for i in range(4):
        assert memory.read_u64(0xA000 + 8 * i) == (0xB000 + i * 0x1000) | 0x3
    assert memory.read(0xA020, 4096 - 32) == bytes(4096 - 32)
    for gib in range(4):
        for j in (0, 1, 511):
            entry = memory.read_u64(0xB000 + gib * 0x1000 + 8 * j)
            assert entry == ((gib * 512 + j) << 21) | 0x83
    assert memory.read_u64(0xEFF8) == 0xFFE00000 | 0x83  # the last 2 MiB below 4 GiB


def test_gdt_bytes(memory: GuestMemory) -> None:
    expected = [
        0,
        0,
        0x00AF9B000000FFFF,
        0x00CF93000000FFFF,
        0x008F8B000000FFFF,
        0x00CF9B000000FFFF,
        0x00CF93000000FFFF,
    ]
    assert list(BOOT_GDT) == expected
    assert gdt_bytes() == struct.pack("<7Q", *expected)
    memory.fill(0x500, 0x48, 0xAA)
    write_gdt_and_idt(memory)
    assert memory.read(0x500, 56) == gdt_bytes()
    assert memory.read(0x538, 8) == bytes(8)  # unused slot
    assert memory.read(0x540, 8) == bytes(8)  # the IDT


def test_segment_from_descriptor() -> None:
    code = Segment.from_descriptor(0x10, 0x00AF9B000000FFFF)
    assert code == Segment(
        base=0,
        limit=0xFFFFFFFF,
        selector=0x10,
        type=0xB,
        present=True,
        dpl=0,
        db=False,
        s=True,
        l=True,
        g=True,
        avl=False,
    )
    small = Segment.from_descriptor(0x8, 0x0040_9300_1234_0067)
    assert (small.base, small.limit, small.g, small.db, small.type) == (0x1234, 0x67, False, True, 3)


# -- vCPU state -------------------------------------------------------------------------------------


def test_long_mode_state() -> None:
    state = long_mode_state(0x1000000, 0x7000)
    assert (state.rip, state.rsi, state.rsp, state.rflags) == (0x1000000, 0x7000, 0x8FF0, 0x2)
    assert state.cr0 & 0x80000001 == 0x80000001  # PG | PE
    assert state.cr3 == 0x9000
    assert state.cr4 & 0x20  # PAE
    assert state.efer == 0x500  # LME | LMA
    assert (state.cs.selector, state.cs.l, state.cs.db) == (0x10, True, False)
    for seg in (state.ds, state.es, state.ss):
        assert (seg.selector, seg.type, seg.limit, seg.db) == (0x18, 3, 0xFFFFFFFF, True)
    assert (state.tr.selector, state.tr.type, state.tr.s) == (0x20, 0xB, False)
    assert (state.gdt_base, state.gdt_limit, state.idt_base, state.idt_limit) == (0x500, 55, 0x540, 7)


def test_pvh_state() -> None:
    state = pvh_state(0x100040, 0x6000)
    assert (state.rip, state.rbx) == (0x100040, 0x6000)
    assert state.cr0 == 0x11  # PE | ET
    assert (state.cr3, state.cr4, state.efer) == (0, 0, 0)
    assert (state.cs.selector, state.cs.l, state.cs.db, state.cs.limit, state.cs.type) == (
        0x28,
        False,
        True,
        0xFFFFFFFF,
        0xB,
    )
    assert (state.ds.selector, state.ds.db, state.ds.limit) == (0x30, True, 0xFFFFFFFF)
    assert (state.tr.base, state.tr.limit, state.tr.type, state.tr.present) == (0, 0x67, 0xB, True)
    assert state.rflags & (1 << 9) == 0  # IF clear


# -- MP table ---------------------------------------------------------------------------------------


def _parse_mptable(raw: bytes, config: bytes, config_base: int) -> tuple[dict[str, int], list[tuple[int, ...]]]:
    """Check the floating pointer (``raw``) and the configuration table (``config``, at ``config_base``);
    return the config header fields and the entries."""
    assert raw[:4] == b"_MP_"
    assert sum(raw[:16]) % 256 == 0
    pointer, length, rev = struct.unpack_from("<IBB", raw, 4)
    assert (length, rev) == (1, 4)
    assert pointer == config_base
    assert config[:4] == b"PCMP"
    (
        base_length,
        spec,
        _checksum,
        oem,
        product,
        _oem_ptr,
        _oem_size,
        count,
        lapic,
        ext_length,
        ext_checksum,
    ) = struct.unpack_from("<HBB8s12sIHHIHB", config, 4)
    assert sum(config[:base_length]) % 256 == 0
    assert sum(config[base_length : base_length + ext_length]) % 256 == ext_checksum
    entries: list[tuple[int, ...]] = []
    pos = 44
    for _ in range(count):
        kind = config[pos]
        if kind == 0:
            entries.append(struct.unpack_from("<BBBBII", config, pos))
            pos += 20
        elif kind == 1:
            entries.append((1, config[pos + 1], int.from_bytes(config[pos + 2 : pos + 8], "big")))
            pos += 8
        elif kind == 2:
            entries.append(struct.unpack_from("<BBBBI", config, pos))
            pos += 8
        else:
            entries.append(struct.unpack_from("<BBHBBBB", config, pos))
            pos += 8
    assert pos == base_length
    header = {"spec": spec, "lapic": lapic, "count": count, "length": base_length}
    assert oem.strip() and product.strip()
    return header, entries


def test_mptable_for_two_cpus(memory: GuestMemory) -> None:
    write_mptable(memory, 2)
    header, entries = _parse_mptable(memory.read(0x9FC00, 0x400), memory.read(0xF8000, 0x8000), 0xF8000)
    assert header["lapic"] == 0xFEE00000
    assert header["spec"] == 4
    cpus = [e for e in entries if e[0] == 0]
    assert [(e[1], e[2], e[3]) for e in cpus] == [(0, 0x14, 0b11), (1, 0x14, 0b01)]
    assert all(e[4] >> 8 & 0xF == 6 and e[5] & (1 << 9) for e in cpus)  # family 6, APIC feature flag
    assert [e for e in entries if e[0] == 1] == [(1, 0, int.from_bytes(b"ISA   ", "big"))]
    assert [e for e in entries if e[0] == 2] == [(2, 2, 0x11, 1, 0xFEC00000)]
    io_ints = [e for e in entries if e[0] == 3]
    routes = {e[4]: (e[1], e[5], e[6]) for e in io_ints}  # irq -> (type, ioapic id, pin)
    assert routes[0] == (0, 2, 2)
    assert all(routes[irq] == (0, 2, irq) for irq in range(1, 16) if irq != 2)
    assert 2 not in routes
    local = sorted((e[1], e[5], e[6]) for e in entries if e[0] == 4)  # (type, dest apic, lint)
    assert local == [(1, 0xFF, 1), (3, 0xFF, 0)]  # NMI on LINT1, ExtINT on LINT0
    assert memory.read_u16(0x40E) == 0x9FC0
    assert memory.read_u16(0x413) == 639


def test_mptable_size_limits(memory: GuestMemory) -> None:
    """The configuration table lives in the BIOS area, so the format's own limit is kvmlet's."""
    assert MAX_CPUS == 254
    assert mptable_size(MAX_CPUS) <= 0x8000
    write_mptable(memory, MAX_CPUS)
    header, entries = _parse_mptable(memory.read(0x9FC00, 0x400), memory.read(0xF8000, 0x8000), 0xF8000)
    assert header["count"] == MAX_CPUS + 19
    assert [e[1] for e in entries if e[0] == 0] == list(range(MAX_CPUS))
    assert [e[1] for e in entries if e[0] == 2] == [MAX_CPUS]   # the I/O APIC's id: 254, below broadcast
    pointer, config = build_mptable(3)
    assert len(pointer) == 16 and len(config) == mptable_size(3)
    with pytest.raises(BootImageError, match="more than the MP table can describe"):
        build_mptable(255)
    with pytest.raises(BootImageError, match="at least one vCPU"):
        build_mptable(0)


# -- zero page and PVH start info (pure) ------------------------------------------------------------


def test_zero_page_for_vmlinux() -> None:
    e820 = [E820Entry(0, 0x9FC00, E820Type.RAM), E820Entry(0x100000, 0x3F00000, E820Type.RAM)]
    page = build_zero_page(
        setup_header=None,
        cmdline_addr=0x20000,
        cmdline_size=2047,
        initrd=(0x1_2345_6000, 0x1_0000_0010),
        e820=e820,
    )
    assert len(page) == 4096
    u8 = page.__getitem__

    def u16(o: int) -> int:
        return int(struct.unpack_from("<H", page, o)[0])

    def u32(o: int) -> int:
        return int(struct.unpack_from("<I", page, o)[0])

    assert u16(0x1FE) == 0xAA55
    assert page[0x202:0x206] == b"HdrS"
    assert u16(0x206) == 0x020F
    assert u8(0x210) == 0xFF  # type_of_loader
    assert u8(0x211) == 0x81  # LOADED_HIGH | CAN_USE_HEAP
    assert u16(0x224) == 0xFE00  # heap_end_ptr
    assert u32(0x228) == 0x20000  # cmd_line_ptr
    assert u32(0x0C8) == 0  # ext_cmd_line_ptr
    assert u32(0x230) == 0x1000000  # kernel_alignment
    assert u32(0x238) == 2047  # cmdline_size
    assert (u32(0x218), u32(0x0C0)) == (0x2345_6000, 1)  # ramdisk_image, ext_ramdisk_image
    assert (u32(0x21C), u32(0x0C4)) == (0x10, 1)  # ramdisk_size, ext_ramdisk_size
    assert u8(0x1E8) == 2  # e820_entries
    assert page[0x2D0 : 0x2D0 + 40] == struct.pack("<QQIQQI", 0, 0x9FC00, 1, 0x100000, 0x3F00000, 1)
    assert page[0x2D0 + 40 : 0x2D0 + 60] == bytes(20)
    assert u8(0x1EF) == 0  # sentinel


def test_zero_page_for_bzimage_keeps_the_kernels_header() -> None:
    header = bytearray(0x202 + 0x6A - 0x1F1)
    header[0x211 - 0x1F1] = 0x01  # loadflags: LOADED_HIGH
    struct.pack_into("<I", header, 0x238 - 0x1F1, 255)  # the kernel's cmdline_size
    header[0x1FE - 0x1F1 : 0x200 - 0x1F1] = b"\x55\xaa"
    page = build_zero_page(
        setup_header=bytes(header), cmdline_addr=0x20000, cmdline_size=2047, initrd=None, e820=[]
    )
    assert struct.unpack_from("<I", page, 0x238)[0] == 255
    assert page[0x211] == 0x81
    assert page[0x210] == 0xFF
    assert struct.unpack_from("<II", page, 0x218) == (0, 0)


def test_zero_page_refuses_too_many_e820_entries() -> None:
    e820 = [E820Entry(i << 30, 1 << 20, E820Type.RAM) for i in range(129)]
    with pytest.raises(BootImageError, match="129 entries; the zero page holds 128"):
        build_zero_page(setup_header=None, cmdline_addr=0x20000, cmdline_size=2047, initrd=None, e820=e820)


def test_pvh_start_info() -> None:
    e820 = [E820Entry(0, 0x9FC00, E820Type.RAM), E820Entry(0x9FC00, 0x400, E820Type.RESERVED)]
    area = build_start_info(cmdline_addr=0x20000, memmap=e820, initrd=(0x3F00000, 0x1234))
    (magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, memmap_entries, reserved) = (
        struct.unpack_from("<IIIIQQQQII", area, 0)
    )
    assert (magic, version, flags, nr_modules) == (0x336EC578, 1, 0, 1)
    assert (modlist, cmdline, rsdp, memmap, memmap_entries, reserved) == (0x6C40, 0x20000, 0, 0x6040, 2, 0)
    assert area[0x40:0x70] == struct.pack("<QQIIQQII", 0, 0x9FC00, 1, 0, 0x9FC00, 0x400, 2, 0)
    assert area[0xC40:0xC60] == struct.pack("<QQQQ", 0x3F00000, 0x1234, 0, 0)
    no_initrd = build_start_info(cmdline_addr=0x20000, memmap=e820, initrd=None)
    assert struct.unpack_from("<IQ", no_initrd, 12) == (0, 0)


def test_config_vcpu_limit_matches_the_mp_table() -> None:
    from kvmlet.boot.mptable import MAX_CPUS
    from kvmlet.config import MAX_VCPUS_SUPPORTED

    assert MAX_VCPUS_SUPPORTED == MAX_CPUS
