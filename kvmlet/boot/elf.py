"""ELF64 x86-64 kernel images: header, program headers, notes, and loading PT_LOAD segments.

Segments are loaded at their physical address (``p_paddr``), as Linux's vmlinux expects: its
``p_vaddr`` is the kernel's virtual address, its ``p_paddr`` where it must sit in RAM.

The PVH entry point is the ``XEN_ELFNOTE_PHYS32_ENTRY`` note (owner "Xen", type 18) of a PT_NOTE
segment: a 32-bit physical address where the kernel is entered in 32-bit protected mode.
"""

from __future__ import annotations

import enum
import itertools
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from kvmlet.boot.errors import BootImageError
from kvmlet.boot.layout import HIGH_MEMORY_START, IDENTITY_MAP_END, align_up, mib
from kvmlet.memory import GuestMemory

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
EM_X86_64 = 62
PN_XNUM = 0xFFFF

XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_NOTE_OWNER = b"Xen"

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr, 64 bytes
_PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr, 56 bytes
_SHDR = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr, 64 bytes
_NHDR = struct.Struct("<III")  # Elf64_Nhdr: namesz, descsz, type


class ElfType(enum.IntEnum):
    """``e_type`` values."""

    NONE = 0
    REL = 1
    EXEC = 2
    DYN = 3
    CORE = 4


class SegmentType(enum.IntEnum):
    """The ``p_type`` values the loader cares about."""

    NULL = 0
    LOAD = 1
    DYNAMIC = 2
    INTERP = 3
    NOTE = 4


@dataclass(frozen=True)
class ElfHeader:
    """The fields of ``Elf64_Ehdr`` the loader uses."""

    type: int
    machine: int
    entry: int
    phoff: int
    shoff: int
    phentsize: int
    phnum: int
    shentsize: int
    shnum: int
    shstrndx: int


@dataclass(frozen=True)
class ProgramHeader:
    """One ``Elf64_Phdr``; ``index`` is its position in the program header table."""

    index: int
    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int

    @property
    def paddr_end(self) -> int:
        return self.paddr + self.memsz

    def describe(self) -> str:
        return f"program header {self.index} ({self.paddr:#x}-{self.paddr_end:#x})"


@dataclass(frozen=True)
class ElfNote:
    """One note of a PT_NOTE segment."""

    owner: bytes
    type: int
    desc: bytes


@dataclass(frozen=True)
class ElfImage:
    """A parsed and validated ELF64 x86-64 image (nothing loaded yet)."""

    header: ElfHeader
    program_headers: tuple[ProgramHeader, ...]
    notes: tuple[ElfNote, ...]
    pvh_entry: int | None

    @property
    def load_segments(self) -> tuple[ProgramHeader, ...]:
        """The PT_LOAD segments that occupy memory (``p_memsz`` > 0)."""
        return tuple(p for p in self.program_headers if p.type == SegmentType.LOAD and p.memsz > 0)


@dataclass(frozen=True)
class LoadedSegment:
    """Where one PT_LOAD segment went in guest memory."""

    index: int
    paddr: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


@dataclass(frozen=True)
class LoadedElf:
    """The result of :func:`load_elf`: entry points and the physical range the kernel occupies."""

    entry: int  # physical address of e_entry
    segments: tuple[LoadedSegment, ...]
    pvh_entry: int | None
    lowest: int  # lowest physical address loaded
    highest: int  # first physical address after the highest segment


def is_elf(data: bytes) -> bool:
    """Whether ``data`` starts with the ELF magic."""
    return data[:4] == ELF_MAGIC


def parse_elf(image: bytes) -> ElfImage:
    """Parse and validate the headers and notes of an ELF64 x86-64 executable."""
    header = _parse_header(image)
    program_headers = tuple(_parse_program_headers(image, header))
    load = [p for p in program_headers if p.type == SegmentType.LOAD and p.memsz > 0]
    if not load:
        raise BootImageError("ELF: no PT_LOAD segment with a non-zero size; there is nothing to load")
    _check_overlaps(load)
    notes = tuple(
        note for p in program_headers if p.type == SegmentType.NOTE for note in _parse_notes(image, p)
    )
    pvh_entry = _find_pvh_entry(notes)
    if pvh_entry is not None and not any(p.paddr <= pvh_entry < p.paddr_end for p in load):
        raise BootImageError(
            f"ELF: PVH entry point {pvh_entry:#x} (XEN_ELFNOTE_PHYS32_ENTRY) is not inside any "
            f"PT_LOAD segment"
        )
    return ElfImage(header=header, program_headers=program_headers, notes=notes, pvh_entry=pvh_entry)


def load_elf(memory: GuestMemory, image: bytes, *, min_address: int = HIGH_MEMORY_START) -> LoadedElf:
    """Copy each PT_LOAD segment of ``image`` to its ``p_paddr`` and zero its bss tail.

    Segments must lie in guest memory, at or above ``min_address`` (below it are the boot
    structures) and below 4 GiB (the end of the boot identity map).
    """
    elf = parse_elf(image)
    load = elf.load_segments
    for segment in load:
        _check_placement(memory, segment, min_address)
    entry = _physical_entry(elf)
    data = memoryview(image)
    loaded = []
    for segment in load:
        memory.write(segment.paddr, data[segment.offset : segment.offset + segment.filesz])
        if segment.memsz > segment.filesz:
            memory.fill(segment.paddr + segment.filesz, segment.memsz - segment.filesz)
        loaded.append(LoadedSegment(segment.index, segment.paddr, segment.filesz, segment.memsz))
    return LoadedElf(
        entry=entry,
        segments=tuple(loaded),
        pvh_entry=elf.pvh_entry,
        lowest=min(s.paddr for s in loaded),
        highest=max(s.end for s in loaded),
    )


def section_names(image: bytes) -> tuple[str, ...]:
    """The section names of an ELF64 image, or () if it has no (readable) section header table.

    Sections play no part in loading, so a malformed table is not an error here.
    """
    try:
        header = _parse_header(image)
    except BootImageError:
        return ()
    if header.shoff == 0 or header.shnum == 0 or header.shentsize < _SHDR.size:
        return ()
    if header.shoff + header.shnum * header.shentsize > len(image) or header.shstrndx >= header.shnum:
        return ()

    def shdr(i: int) -> tuple[int, ...]:
        return _SHDR.unpack_from(image, header.shoff + i * header.shentsize)

    strtab = shdr(header.shstrndx)
    str_off, str_size = strtab[4], strtab[5]
    if str_off + str_size > len(image):
        return ()
    names = []
    for i in range(header.shnum):
        name_off = shdr(i)[0]
        if name_off >= str_size:
            continue
        end = image.find(b"\0", str_off + name_off, str_off + str_size)
        raw = image[str_off + name_off : end if end >= 0 else str_off + str_size]
        names.append(raw.decode("latin-1"))
    return tuple(names)


# -- parsing ----------------------------------------------------------------------------------------


def _parse_header(image: bytes) -> ElfHeader:
    if image[:4] != ELF_MAGIC:
        raise BootImageError(f"ELF: bad magic {image[:4].hex(' ')} (expected 7f 45 4c 46)")
    if len(image) < _EHDR.size:
        raise BootImageError(f"ELF: file is {len(image)} bytes, shorter than the 64-byte ELF64 header")
    (
        ident,
        e_type,
        machine,
        version,
        entry,
        phoff,
        shoff,
        _flags,
        _ehsize,
        phentsize,
        phnum,
        shentsize,
        shnum,
        shstrndx,
    ) = _EHDR.unpack_from(image)
    if ident[4] != ELFCLASS64:
        raise BootImageError(f"ELF: class {ident[4]} is not ELFCLASS64 (2); kvmlet loads only 64-bit kernels")
    if ident[5] != ELFDATA2LSB:
        raise BootImageError(f"ELF: data encoding {ident[5]} is not little-endian (ELFDATA2LSB, 1)")
    if ident[6] != EV_CURRENT or version != EV_CURRENT:
        raise BootImageError(f"ELF: version {ident[6]}/{version} is not EV_CURRENT (1)")
    if machine != EM_X86_64:
        raise BootImageError(f"ELF: machine {machine} is not x86-64 (EM_X86_64, {EM_X86_64})")
    if e_type not in (ElfType.EXEC, ElfType.DYN):
        name = ElfType(e_type).name if e_type in ElfType._value2member_map_ else "unknown"
        raise BootImageError(f"ELF: type {e_type} ({name}) is not an executable (ET_EXEC or ET_DYN)")
    return ElfHeader(
        type=e_type,
        machine=machine,
        entry=entry,
        phoff=phoff,
        shoff=shoff,
        phentsize=phentsize,
        phnum=phnum,
        shentsize=shentsize,
        shnum=shnum,
        shstrndx=shstrndx,
    )


def _parse_program_headers(image: bytes, header: ElfHeader) -> Iterator[ProgramHeader]:
    if header.phnum == 0:
        raise BootImageError("ELF: the image has no program headers (e_phnum is 0)")
    if header.phnum == PN_XNUM:
        raise BootImageError("ELF: extended program header numbering (e_phnum = PN_XNUM) is not supported")
    if header.phentsize < _PHDR.size:
        raise BootImageError(
            f"ELF: e_phentsize {header.phentsize} is smaller than an Elf64_Phdr ({_PHDR.size})"
        )
    table_end = header.phoff + header.phnum * header.phentsize
    if table_end > len(image):
        raise BootImageError(
            f"ELF: program header table {header.phoff:#x}+{header.phnum}x{header.phentsize} "
            f"ends at {table_end:#x}, past the end of the file (size {len(image):#x})"
        )
    for index in range(header.phnum):
        p_type, flags, offset, vaddr, paddr, filesz, memsz, align = _PHDR.unpack_from(
            image, header.phoff + index * header.phentsize
        )
        phdr = ProgramHeader(
            index=index,
            type=p_type,
            flags=flags,
            offset=offset,
            vaddr=vaddr,
            paddr=paddr,
            filesz=filesz,
            memsz=memsz,
            align=align,
        )
        if p_type in (SegmentType.LOAD, SegmentType.NOTE) and offset + filesz > len(image):
            raise BootImageError(
                f"ELF: program header {index} file range {offset:#x}+{filesz:#x} is past the end "
                f"of the file (size {len(image):#x})"
            )
        if p_type == SegmentType.LOAD and filesz > memsz:
            raise BootImageError(
                f"ELF: program header {index} has p_filesz {filesz:#x} larger than p_memsz {memsz:#x}"
            )
        yield phdr


def _check_overlaps(load: list[ProgramHeader]) -> None:
    ordered = sorted(load, key=lambda p: p.paddr)
    for low, high in itertools.pairwise(ordered):
        if high.paddr < low.paddr_end:
            raise BootImageError(f"ELF: {low.describe()} and {high.describe()} overlap in physical memory")


def _parse_notes(image: bytes, phdr: ProgramHeader) -> Iterator[ElfNote]:
    align = 8 if phdr.align == 8 else 4
    pos, end = phdr.offset, phdr.offset + phdr.filesz
    while pos + _NHDR.size <= end:
        namesz, descsz, n_type = _NHDR.unpack_from(image, pos)
        name_at = pos + _NHDR.size
        desc_at = name_at + align_up(namesz, align)
        next_at = desc_at + align_up(descsz, align)
        if desc_at + descsz > end:
            raise BootImageError(
                f"ELF: note at file offset {pos:#x} in program header {phdr.index} runs past the end "
                f"of its segment ({end:#x})"
            )
        owner = image[name_at : name_at + namesz].rstrip(b"\0")
        yield ElfNote(owner=owner, type=n_type, desc=image[desc_at : desc_at + descsz])
        pos = next_at


def _find_pvh_entry(notes: tuple[ElfNote, ...]) -> int | None:
    for note in notes:
        if note.owner != XEN_NOTE_OWNER or note.type != XEN_ELFNOTE_PHYS32_ENTRY:
            continue
        if len(note.desc) == 4:
            return int(struct.unpack("<I", note.desc)[0])
        if len(note.desc) == 8:
            entry = int(struct.unpack("<Q", note.desc)[0])
            if entry >= 1 << 32:
                raise BootImageError(f"ELF: PVH entry point {entry:#x} is not a 32-bit physical address")
            return entry
        raise BootImageError(
            f"ELF: PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) has a {len(note.desc)}-byte value; "
            f"expected 4 or 8"
        )
    return None


# -- loading ----------------------------------------------------------------------------------------


def _check_placement(memory: GuestMemory, segment: ProgramHeader, min_address: int) -> None:
    if segment.paddr < min_address:
        raise BootImageError(
            f"ELF: {segment.describe()} loads below {min_address:#x}, where kvmlet keeps its boot "
            f"structures (GDT, page tables, zero page, command line, MP table); link the kernel at "
            f"or above {min_address:#x}"
        )
    if segment.paddr_end > IDENTITY_MAP_END:
        raise BootImageError(
            f"ELF: {segment.describe()} ends above 4 GiB, which the boot page tables do not map"
        )
    if not memory.contains(segment.paddr, segment.memsz):
        ram = ", ".join(f"{gpa:#x}-{gpa + size:#x}" for gpa, size in memory.ram_ranges())
        raise BootImageError(
            f"ELF: {segment.describe()} is outside guest memory ({mib(memory.size)}: RAM at {ram}); "
            f"the VM needs at least {mib(align_up(segment.paddr_end, 1 << 20))} of memory for this kernel"
        )


def _physical_entry(elf: ElfImage) -> int:
    """``e_entry`` as a physical address: as is if inside a segment's physical range, else translated
    from a segment's virtual range (for images whose entry is a virtual address)."""
    entry = elf.header.entry
    load = elf.load_segments
    for p in load:
        if p.paddr <= entry < p.paddr_end:
            return entry
    for p in load:
        if p.vaddr <= entry < p.vaddr + p.memsz:
            return p.paddr + (entry - p.vaddr)
    raise BootImageError(f"ELF: entry point {entry:#x} (e_entry) is not inside any PT_LOAD segment")
