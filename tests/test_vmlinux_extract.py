"""Tests for kvmlet.boot.vmlinux_extract: synthetic bzImages, then Debian's real cloud kernel."""

from __future__ import annotations

import bz2
import gzip
import importlib
import lzma
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmlet.boot.errors import BootImageError
from kvmlet.boot.vmlinux_extract import extract_vmlinux, main, payload_compression, payload_span

EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18
LZ4_LEGACY_MAGIC = struct.pack("<I", 0x184C2102)


def elf64(machine: int = EM_X86_64, elf_class: int = 2, extra: bytes = b"") -> bytes:
    """An ELF64 header (no program headers) followed by extra."""
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
    return (
        struct.pack("<16sHHIQQQIHHHHHH", ident, 2, machine, 1, 0x1000000, 0, 0, 0, 64, 56, 0, 64, 0, 0)
        + extra
    )


ELF = elf64(extra=b"abc" * 20 + bytes(300) + b"tail!")


def with_size(compressed: bytes, raw: bytes) -> bytes:
    """Append the decompressed size, as Linux's build does for every compression but gzip."""
    return compressed + struct.pack("<I", len(raw))


def bzimage(
    payload: bytes, setup_sects: int = 4, version: int = 0x020F, start: int = 0x200, length: int | None = None
) -> bytes:
    """A bzImage: setup sectors with a setup header, then protected-mode code holding payload at start."""
    setup = bytearray((setup_sects or 4) * 512 + 512)
    setup[0x1F1] = setup_sects
    setup[0x1FE:0x200] = b"\x55\xaa"
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<II", setup, 0x248, start, len(payload) if length is None else length)
    pm = b"\x90" * start + payload + b"\xcc" * 64
    return bytes(setup) + pm


def lz4_seq(literals: bytes, offset: int = 0, match: int = 0) -> bytes:
    """One LZ4 sequence; match == 0 makes it the last one of a block (literals only)."""

    def more(n: int) -> bytes:
        return b"\xff" * (n // 255) + bytes([n % 255])

    lit_n, match_n = len(literals), match - 4 if match else 0
    out = bytes([min(lit_n, 15) << 4 | min(match_n, 15)])
    out += (more(lit_n - 15) if lit_n >= 15 else b"") + literals
    if match:
        out += struct.pack("<H", offset) + (more(match_n - 15) if match_n >= 15 else b"")
    return out


def lz4_legacy(blocks: list[bytes], raw: bytes) -> bytes:
    """An LZ4 legacy frame (concatenated twice, as a check) with Linux's size field."""
    first, *rest = blocks
    out = LZ4_LEGACY_MAGIC + struct.pack("<I", len(first)) + first + LZ4_LEGACY_MAGIC
    for block in rest:
        out += struct.pack("<I", len(block)) + block
    return with_size(out, raw)


def lz4_elf() -> tuple[bytes, bytes]:
    """(payload, decompressed) exercising long literals, overlapping matches and two blocks."""
    block1 = (
        lz4_seq(ELF[:67], offset=3, match=57)  # header + "abc", then "abc" * 19 from 3 back
        + lz4_seq(b"\0", offset=1, match=299)  # 300 zeros
        + lz4_seq(b"tail!")
    )
    block2 = lz4_seq(b"0123456789", offset=10, match=20) + lz4_seq(b"!")
    return lz4_legacy([block1, block2], ELF + b"0123456789" * 3 + b"!"), ELF + b"0123456789" * 3 + b"!"


def zstd_raw_frame(raw: bytes) -> bytes:
    """A zstd frame of one raw block, window 1 KiB, no content size."""
    assert len(raw) < 1024
    return with_size(b"\x28\xb5\x2f\xfd\x00\x00" + (len(raw) << 3 | 1).to_bytes(3, "little") + raw, raw)


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda raw: gzip.compress(raw, mtime=0),
    "xz": lambda raw: with_size(lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32), raw),
    "lzma": lambda raw: with_size(lzma.compress(raw, format=lzma.FORMAT_ALONE), raw),
    "bzip2": lambda raw: with_size(bz2.compress(raw), raw),
}


def have_zstd() -> bool:
    for module in ("compression.zstd", "zstandard"):
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        return True
    return False


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_extracts_stdlib_compressions(name: str) -> None:
    image = bzimage(COMPRESSORS[name](ELF))
    assert payload_compression(image) == name
    assert extract_vmlinux(image) == ELF


def test_extracts_lz4_legacy() -> None:
    payload, raw = lz4_elf()
    image = bzimage(payload)
    assert payload_compression(image) == "lz4"
    assert extract_vmlinux(image) == raw


@pytest.mark.skipif(shutil.which("lz4") is None, reason="no lz4 command to make a reference payload")
def test_extracts_lz4_made_by_lz4_command() -> None:
    raw = elf64(extra=b"".join(struct.pack("<I", i * 7 % 1000) * (i % 5 + 1) for i in range(300_000)))
    packed = subprocess.run(["lz4", "-l", "-9", "-c"], input=raw, capture_output=True, check=True).stdout
    assert extract_vmlinux(bzimage(with_size(packed, raw))) == raw


def test_zstd_needs_a_module() -> None:
    image = bzimage(zstd_raw_frame(ELF))
    assert payload_compression(image) == "zstd"
    if have_zstd():
        assert extract_vmlinux(image) == ELF
    else:
        with pytest.raises(BootImageError, match="module 'zstandard' is not installed"):
            extract_vmlinux(image)


def test_setup_sects_zero_means_four() -> None:
    payload = COMPRESSORS["gzip"](ELF)
    image = bzimage(payload, setup_sects=0)
    assert payload_span(image) == (5 * 512 + 0x200, len(payload))
    assert extract_vmlinux(image) == ELF


def test_payload_span_uses_setup_sects() -> None:
    payload = COMPRESSORS["xz"](ELF)
    image = bzimage(payload, setup_sects=27, start=0x3C0)
    assert payload_span(image) == (28 * 512 + 0x3C0, len(payload))
    assert extract_vmlinux(image) == ELF


def corrupt_images() -> dict[str, tuple[bytes, str]]:
    """name -> (bzImage, regex its BootImageError message must match)."""
    good_gz = COMPRESSORS["gzip"](ELF)
    no_magic = bytearray(bzimage(good_gz))
    no_magic[0x202:0x206] = b"HdrX"
    return {
        "short file": (b"\0" * 100, "too short for a setup header"),
        "wrong magic": (bytes(no_magic), "no 'HdrS' setup header magic at 0x202"),
        "old protocol": (bzimage(good_gz, version=0x0206), r"boot protocol 2\.06 .*need >= 2\.08"),
        "payload past end": (
            bzimage(good_gz, length=len(good_gz) + 4096),
            "payload at 0x.* past end of file",
        ),
        "unknown compression": (bzimage(b"PK\x03\x04" + bytes(60)), "unknown payload compression"),
        "lzo": (bzimage(b"\x89LZO\x00\r\n\x1a\n" + bytes(60)), "lzo payload compression is not supported"),
        "not an ELF": (bzimage(COMPRESSORS["xz"](b"MZ" + bytes(100))), "not an ELF file"),
        "ELF32": (bzimage(COMPRESSORS["xz"](elf64(elf_class=1))), "not ELF64"),
        "not x86-64": (bzimage(COMPRESSORS["bzip2"](elf64(machine=183))), "machine 183, not x86-64"),
        "truncated gzip": (bzimage(good_gz[: len(good_gz) // 2]), "gzip payload is truncated"),
        "corrupt xz": (bzimage(COMPRESSORS["xz"](ELF)[:12] + bytes(40)), "xz payload is corrupt"),
        "size mismatch": (
            bzimage(lzma.compress(ELF, format=lzma.FORMAT_XZ) + struct.pack("<I", 5)),
            "decompressed to .* size field says 5",
        ),
        "lz4 bad offset": (
            bzimage(lz4_legacy([lz4_seq(b"ab", offset=9, match=4) + lz4_seq(b"c")], bytes(7))),
            "match offset 9 out of range",
        ),
        "lz4 block past end": (
            bzimage(LZ4_LEGACY_MAGIC + struct.pack("<I", 1000) + bytes(20) + struct.pack("<I", 0)),
            "lz4 payload is corrupt: block of 1000 bytes",
        ),
    }


@pytest.mark.parametrize("case", sorted(corrupt_images()))
def test_corrupt_images_raise(case: str) -> None:
    image, pattern = corrupt_images()[case]
    with pytest.raises(BootImageError, match=pattern):
        extract_vmlinux(image)


def test_corrupt_images_have_distinct_messages() -> None:
    messages = []
    for image, _ in corrupt_images().values():
        with pytest.raises(BootImageError) as info:
            extract_vmlinux(image)
        assert str(info.value).startswith("bzImage: ")
        messages.append(str(info.value))
    assert len(set(messages)) == len(messages)


def test_boot_image_error_is_value_error() -> None:
    assert issubclass(BootImageError, ValueError)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "bzImage", tmp_path / "vmlinux"
    src.write_bytes(bzimage(COMPRESSORS["xz"](ELF)))
    assert main([str(src), str(out)]) == 0
    assert out.read_bytes() == ELF
    assert "xz payload" in capsys.readouterr().out
    src.write_bytes(b"junk")
    assert main([str(src), str(tmp_path / "never")]) == 1
    assert "too short" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def elf_notes(image: bytes) -> list[tuple[bytes, int, bytes]]:
    """(owner, type, desc) of every note in the ELF64's PT_NOTE segments."""
    (phoff,) = struct.unpack_from("<Q", image, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", image, 0x36)
    notes = []
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz, _, _ = struct.unpack_from(
            "<IIQQQQQQ", image, phoff + i * phentsize
        )
        if p_type != PT_NOTE:
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", image, pos)
            pos += 12
            owner = image[pos : pos + namesz].rstrip(b"\0")
            pos += -(-namesz // 4) * 4
            notes.append((owner, n_type, image[pos : pos + descsz]))
            pos += -(-descsz // 4) * 4
    return notes


@pytest.mark.skipif(
    shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
    reason="fetching Debian's kernel needs apt-get and dpkg-deb (a Debian host)",
)
def test_debian_cloud_kernel_has_pvh_entry() -> None:
    from tests.support.debian_kernel import debian_cloud_kernel

    kernel = debian_cloud_kernel()
    bz = kernel.bzimage.read_bytes()
    vmlinux = kernel.vmlinux.read_bytes()
    assert extract_vmlinux(bz) == vmlinux
    assert vmlinux[:4] == b"\x7fELF" and vmlinux[4] == 2
    assert struct.unpack_from("<H", vmlinux, 0x12)[0] == EM_X86_64

    pvh = [desc for owner, n_type, desc in elf_notes(vmlinux) if owner == b"Xen" and n_type == 18]
    assert len(pvh) == 1, "no Xen note XEN_ELFNOTE_PHYS32_ENTRY (CONFIG_PVH)"
    entry = int.from_bytes(pvh[0], "little")
    (phoff,) = struct.unpack_from("<Q", vmlinux, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", vmlinux, 0x36)
    loads = []
    for i in range(phnum):
        p_type, _, _, _, p_paddr, _, p_memsz, _ = struct.unpack_from(
            "<IIQQQQQQ", vmlinux, phoff + i * phentsize
        )
        if p_type == PT_LOAD:
            loads.append((p_paddr, p_memsz))
    assert any(paddr <= entry < paddr + memsz for paddr, memsz in loads), hex(entry)
    assert entry < 1 << 32
