"""Build small synthetic kernel images for the boot loader's tests: ELF64 files and bzImages.

Written from the ELF64 and Linux boot protocol specifications, independently of kvmlet.boot, so
that the tests check the loader against the formats rather than against itself.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

PT_LOAD = 1
PT_NOTE = 4


@dataclass(frozen=True)
class Seg:
    """A program header and its file contents."""

    paddr: int
    data: bytes
    memsz: int | None = None  # default: len(data)
    vaddr: int | None = None  # default: paddr
    type: int = PT_LOAD
    flags: int = 5  # R+X


@dataclass(frozen=True)
class Note:
    owner: bytes
    type: int
    desc: bytes


def pvh_note(entry: int, size: int = 4) -> Note:
    """A XEN_ELFNOTE_PHYS32_ENTRY note."""
    return Note(b"Xen", 18, entry.to_bytes(size, "little"))


def _pad4(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def encode_notes(notes: Sequence[Note]) -> bytes:
    out = b""
    for note in notes:
        name = note.owner + b"\0"
        out += struct.pack("<III", len(name), len(note.desc), note.type) + _pad4(name) + _pad4(note.desc)
    return out


def make_elf(
    segments: Sequence[Seg],
    *,
    entry: int,
    notes: Sequence[Note] = (),
    e_type: int = 2,
    machine: int = 62,
    ei_class: int = 2,
    ei_data: int = 1,
    sections: Sequence[str] = (),
) -> bytes:
    """An ELF64 file: header, program headers (the segments, then a PT_NOTE if ``notes``), the
    segments' data, and, if ``sections`` are named, a section header table with those names."""
    phdrs: list[tuple[int, int, int, int, int, int, int, int]] = []
    all_segments = list(segments)
    if notes:
        all_segments.append(Seg(paddr=0, data=encode_notes(notes), type=PT_NOTE, flags=4))
    phoff = 64
    offset = phoff + 56 * len(all_segments)
    body = b""
    for seg in all_segments:
        offset_aligned = (offset + 15) & ~15
        body += bytes(offset_aligned - offset)
        offset = offset_aligned
        memsz = len(seg.data) if seg.memsz is None else seg.memsz
        vaddr = seg.paddr if seg.vaddr is None else seg.vaddr
        align = 4 if seg.type == PT_NOTE else 0x1000
        phdrs.append((seg.type, seg.flags, offset, vaddr, seg.paddr, len(seg.data), memsz, align))
        body += seg.data
        offset += len(seg.data)
    shoff = shnum = shstrndx = 0
    tail = b""
    if sections:
        names = ["", *sections, ".shstrtab"]
        strtab = b""
        name_offsets = []
        for name in names:
            name_offsets.append(len(strtab))
            strtab += name.encode() + b"\0"
        strtab_off = offset
        tail += strtab
        offset += len(strtab)
        shoff = (offset + 7) & ~7
        tail += bytes(shoff - offset)
        shnum = len(names)
        shstrndx = shnum - 1
        for i, name_off in enumerate(name_offsets):
            is_strtab = i == shstrndx
            tail += struct.pack(
                "<IIQQQQIIQQ",
                name_off,
                3 if is_strtab else 1,
                0,
                0,
                strtab_off if is_strtab else 0,
                len(strtab) if is_strtab else 0,
                0,
                0,
                1,
                0,
            )
    ident = b"\x7fELF" + bytes([ei_class, ei_data, 1]) + bytes(9)
    header = struct.pack(
        "<16sHHIQQQIHHHHHH",
        ident,
        e_type,
        machine,
        1,
        entry,
        phoff,
        shoff,
        0,
        64,
        56,
        len(all_segments),
        64,
        shnum,
        shstrndx,
    )
    table = b"".join(struct.pack("<IIQQQQQQ", *p) for p in phdrs)
    return header + table + body + tail


def make_bzimage(
    *,
    kernel: bytes = b"\x90" * 0x1000,
    setup_sects: int = 4,
    boot_flag: int = 0xAA55,
    magic: bytes = b"HdrS",
    version: int = 0x020F,
    loadflags: int = 0x01,
    xloadflags: int = 0x01,
    pref_address: int = 0x1000000,
    kernel_alignment: int = 0x200000,
    relocatable: int = 1,
    init_size: int = 0x800000,
    cmdline_size: int = 2047,
    initrd_addr_max: int = 0x7FFFFFFF,
    kernel_version: bytes = b"6.6.6-test (builder@host) #1 SMP",
    header_length: int = 0x6A,
) -> bytes:
    """A bzImage: (setup_sects or 4) + 1 sectors of setup with the header at 0x1f1, then ``kernel``."""
    sectors = (setup_sects or 4) + 1
    setup = bytearray(sectors * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200] = 0xEB  # short jump over the header
    setup[0x201] = header_length
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    version_at = 0x600
    setup[version_at : version_at + len(kernel_version) + 1] = kernel_version + b"\0"
    struct.pack_into("<H", setup, 0x20E, version_at - 0x200)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)  # code32_start
    struct.pack_into("<II", setup, 0x22C, initrd_addr_max, kernel_alignment)
    setup[0x234] = relocatable
    setup[0x235] = 21
    struct.pack_into("<HI", setup, 0x236, xloadflags, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + kernel
