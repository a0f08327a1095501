"""ELF64 parsing and loading (kvmlet.boot.elf)."""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator

import pytest

from kvmlet.boot.elf import load_elf, parse_elf, section_names
from kvmlet.boot.errors import BootImageError
from kvmlet.memory import GuestMemory
from tests.support.boot_images import Note, Seg, make_elf, pvh_note

MiB = 1 << 20


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.with_size(64 * MiB) as mem:
        yield mem


def test_load_copies_segments_to_paddr_and_zeroes_bss(memory: GuestMemory) -> None:
    text = bytes(range(256)) * 16
    data = b"DATA" * 100
    image = make_elf(
        [Seg(0x100000, text, vaddr=0xFFFFFFFF80100000), Seg(0x200000, data, memsz=0x3000)],
        entry=0x100000,
    )
    memory.fill(0x200000, 0x4000, 0xFF)  # the bss must be zeroed, not left as found
    loaded = load_elf(memory, image)
    assert memory.read(0x100000, len(text)) == text
    assert memory.read(0x200000, len(data)) == data
    assert memory.read(0x200000 + len(data), 0x3000 - len(data)) == bytes(0x3000 - len(data))
    assert memory.read(0x203000, 16) == b"\xff" * 16  # past memsz: untouched
    assert loaded.entry == 0x100000
    assert loaded.lowest == 0x100000
    assert loaded.highest == 0x203000
    assert [(s.index, s.paddr, s.filesz, s.memsz) for s in loaded.segments] == [
        (0, 0x100000, len(text), len(text)),
        (1, 0x200000, len(data), 0x3000),
    ]
    assert loaded.pvh_entry is None


def test_virtual_entry_is_translated_to_physical(memory: GuestMemory) -> None:
    image = make_elf([Seg(0x1000000, b"\xcc" * 64, vaddr=0xFFFFFFFF81000000)], entry=0xFFFFFFFF81000010)
    assert load_elf(memory, image).entry == 0x1000010


@pytest.mark.parametrize("size", [4, 8])
def test_pvh_note_is_found(memory: GuestMemory, size: int) -> None:
    notes = [Note(b"GNU", 3, b"\x01" * 20), Note(b"Xen", 6, b"linux\0"), pvh_note(0x100040, size)]
    image = make_elf([Seg(0x100000, b"\x90" * 0x100)], entry=0x100000, notes=notes)
    parsed = parse_elf(image)
    assert parsed.pvh_entry == 0x100040
    assert [n.owner for n in parsed.notes] == [b"GNU", b"Xen", b"Xen"]
    assert load_elf(memory, image).pvh_entry == 0x100040


def test_notes_of_other_owners_with_type_18_are_ignored() -> None:
    image = make_elf([Seg(0x100000, b"\x90" * 0x100)], entry=0x100000, notes=[Note(b"GNU", 18, b"\0" * 4)])
    assert parse_elf(image).pvh_entry is None


def test_section_names() -> None:
    image = make_elf([Seg(0x100000, b"\x90")], entry=0x100000, sections=[".text", ".data.reloc"])
    assert section_names(image) == ("", ".text", ".data.reloc", ".shstrtab")
    assert section_names(make_elf([Seg(0x100000, b"\x90")], entry=0x100000)) == ()


GOOD = make_elf([Seg(0x100000, b"\x90" * 0x100)], entry=0x100000)


def _patched(image: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(image)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@pytest.mark.parametrize(
    ("image", "fragment"),
    [
        (b"\x7fELG" + GOOD[4:], "ELF: bad magic"),
        (GOOD[:40], "shorter than the 64-byte ELF64 header"),
        (_patched(GOOD, 4, "<B", 1), "class 1 is not ELFCLASS64"),
        (_patched(GOOD, 5, "<B", 2), "not little-endian"),
        (_patched(GOOD, 18, "<H", 3), "machine 3 is not x86-64"),
        (_patched(GOOD, 16, "<H", 1), "type 1 (REL) is not an executable"),
        (_patched(GOOD, 32, "<Q", 0x100000), "program header table 0x100000+1x56"),
        (_patched(GOOD, 56, "<H", 500), "past the end of the file"),
        (_patched(GOOD, 56, "<H", 0), "has no program headers"),
        (_patched(GOOD, 56, "<H", 0xFFFF), "PN_XNUM"),
        (_patched(GOOD, 54, "<H", 32), "e_phentsize 32 is smaller"),
        (_patched(GOOD, 64 + 8, "<Q", 0x10000), "program header 0 file range 0x10000+0x100 is past the end"),
        (_patched(GOOD, 64 + 40, "<Q", 0x80), "p_filesz 0x100 larger than p_memsz 0x80"),
        (_patched(GOOD, 24, "<Q", 0x500000), "entry point 0x500000 (e_entry) is not inside any PT_LOAD"),
    ],
    ids=[
        "magic",
        "truncated-header",
        "class",
        "endianness",
        "machine",
        "type",
        "phoff",
        "phnum",
        "no-phdrs",
        "pn-xnum",
        "phentsize",
        "segment-file-range",
        "filesz-gt-memsz",
        "entry",
    ],
)
def test_malformed_images_are_refused(memory: GuestMemory, image: bytes, fragment: str) -> None:
    with pytest.raises(BootImageError, match=re.escape(fragment)):
        load_elf(memory, image)


def test_no_loadable_segment() -> None:
    image = make_elf([Seg(0x100000, b"", memsz=0)], entry=0x100000)
    with pytest.raises(BootImageError, match="no PT_LOAD segment"):
        parse_elf(image)


def test_overlapping_segments() -> None:
    image = make_elf([Seg(0x100000, b"a" * 0x2000), Seg(0x101000, b"b" * 0x100)], entry=0x100000)
    with pytest.raises(BootImageError, match=r"program header 0 .* and program header 1 .* overlap"):
        parse_elf(image)


def test_segment_outside_guest_memory(memory: GuestMemory) -> None:
    image = make_elf([Seg(0x3FFF000, b"x" * 0x2000)], entry=0x3FFF000)
    with pytest.raises(
        BootImageError, match=r"program header 0 \(0x3fff000-0x4001000\) is outside guest memory"
    ):
        load_elf(memory, image)


def test_segment_below_1mib(memory: GuestMemory) -> None:
    image = make_elf([Seg(0x7000, b"x" * 0x100)], entry=0x7000)
    with pytest.raises(BootImageError, match="loads below 0x100000, where kvmlet keeps its boot structures"):
        load_elf(memory, image)


def test_segment_above_4gib(memory: GuestMemory) -> None:
    image = make_elf([Seg(0x1_0000_0000, b"x" * 0x100)], entry=0x1_0000_0000)
    with pytest.raises(BootImageError, match="ends above 4 GiB"):
        load_elf(memory, image)


def test_truncated_note() -> None:
    image = bytearray(make_elf([Seg(0x100000, b"\x90")], entry=0x100000, notes=[pvh_note(0x100000)]))
    # The PT_NOTE is program header 1: shrink its p_filesz so that the note's desc runs past its end.
    struct.pack_into("<Q", image, 64 + 56 + 32, 14)
    with pytest.raises(BootImageError, match=r"note at file offset .* in program header 1 runs past the end"):
        parse_elf(bytes(image))


def test_pvh_note_of_wrong_size() -> None:
    image = make_elf([Seg(0x100000, b"\x90")], entry=0x100000, notes=[Note(b"Xen", 18, b"\0\0")])
    with pytest.raises(BootImageError, match="2-byte value; expected 4 or 8"):
        parse_elf(image)


def test_pvh_entry_outside_segments() -> None:
    image = make_elf([Seg(0x100000, b"\x90")], entry=0x100000, notes=[pvh_note(0x300000)])
    with pytest.raises(BootImageError, match=r"PVH entry point 0x300000 .* is not inside any"):
        parse_elf(image)


def test_pvh_entry_above_4gib() -> None:
    image = make_elf([Seg(0x100000, b"\x90")], entry=0x100000, notes=[pvh_note(1 << 33, 8)])
    with pytest.raises(BootImageError, match="not a 32-bit physical address"):
        parse_elf(image)
