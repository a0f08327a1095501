"""Extract the vmlinux ELF from a bzImage (what Linux's scripts/extract-vmlinux does).

The bzImage setup header gives the compressed payload's place (boot protocol >= 2.08);
its compression is told by its magic. Like the kernel's own build (mkpiggy), the last
four bytes of the payload are taken as the decompressed size and checked.

Usage: ``python -m kvmlet.boot.vmlinux_extract BZIMAGE OUT``
"""

from __future__ import annotations

import importlib
import struct
import sys
from collections.abc import Callable
from typing import Any

from kvmlet.boot.errors import BootImageError

_HDR_MAGIC = b"HdrS"
_OFF_SETUP_SECTS = 0x1F1
_OFF_HDR_MAGIC = 0x202
_OFF_VERSION = 0x206
_OFF_PAYLOAD_OFFSET = 0x248
_OFF_PAYLOAD_LENGTH = 0x24C
_MIN_PROTOCOL = 0x0208

_LZ4_LEGACY_MAGIC = 0x184C2102

# (magic, name), looked up at the start of the payload.
_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x5d\x00\x00", "lzma"),
    (b"BZh", "bzip2"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (struct.pack("<I", _LZ4_LEGACY_MAGIC), "lz4"),
    (b"\x89LZO\x00\r\n\x1a\n", "lzo"),
)

_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_EM_X86_64 = 62


def payload_span(bzimage: bytes) -> tuple[int, int]:
    """Return (file offset, length) of the compressed payload in a bzImage."""
    if len(bzimage) < _OFF_PAYLOAD_LENGTH + 4:
        raise BootImageError(f"bzImage: file is {len(bzimage)} bytes, too short for a setup header")
    if bzimage[_OFF_HDR_MAGIC : _OFF_HDR_MAGIC + 4] != _HDR_MAGIC:
        raise BootImageError(f"bzImage: no 'HdrS' setup header magic at {_OFF_HDR_MAGIC:#x}")
    (version,) = struct.unpack_from("<H", bzimage, _OFF_VERSION)
    if version < _MIN_PROTOCOL:
        raise BootImageError(
            f"bzImage: boot protocol {version >> 8}.{version & 0xFF:02d} has no payload fields (need >= 2.08)"
        )
    setup_sects = bzimage[_OFF_SETUP_SECTS] or 4
    pm_start = (setup_sects + 1) * 512
    offset, length = struct.unpack_from("<II", bzimage, _OFF_PAYLOAD_OFFSET)
    start = pm_start + offset
    if length < 5:
        raise BootImageError(f"bzImage: payload length {length} is too small")
    if start + length > len(bzimage):
        raise BootImageError(
            f"bzImage: payload at {start:#x} (length {length:#x}) past end of file ({len(bzimage):#x} bytes)"
        )
    return start, length


def payload_compression(bzimage: bytes) -> str:
    """Return the payload's compression: gzip, xz, lzma, bzip2, zstd, lz4 or lzo."""
    start, length = payload_span(bzimage)
    return _compression_of(bzimage[start : start + length], start)


def _compression_of(payload: bytes, start: int) -> str:
    for magic, name in _MAGICS:
        if payload.startswith(magic):
            return name
    raise BootImageError(f"bzImage: unknown payload compression at {start:#x} (magic {payload[:6].hex(' ')})")


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Decompress a bzImage's payload and return it: the vmlinux ELF64 x86-64 image.

    The result may carry trailing data after the ELF (the relocation table of a relocatable kernel).
    """
    start, length = payload_span(bzimage)
    payload = bzimage[start : start + length]
    name = _compression_of(payload, start)
    (declared,) = struct.unpack_from("<I", payload, length - 4)
    try:
        vmlinux = _DECOMPRESSORS[name](payload)
    except BootImageError:
        raise
    except Exception as exc:  # zlib.error, lzma.LZMAError, OSError, IndexError, ...
        raise BootImageError(f"bzImage: {name} payload is corrupt: {exc}") from exc
    if len(vmlinux) & 0xFFFFFFFF != declared:
        raise BootImageError(
            f"bzImage: {name} payload decompressed to {len(vmlinux)} bytes, its size field says {declared}"
        )
    _check_elf(vmlinux)
    return vmlinux


def _check_elf(image: bytes) -> None:
    if image[:4] != _ELF_MAGIC:
        raise BootImageError(f"bzImage: decompressed payload is not an ELF file (starts with {image[:4]!r})")
    if len(image) < 64:
        raise BootImageError(f"bzImage: decompressed ELF is {len(image)} bytes, shorter than an ELF64 header")
    if image[4] != _ELFCLASS64:
        raise BootImageError(f"bzImage: decompressed ELF has class {image[4]}, not ELF64 (2)")
    if image[5] != _ELFDATA2LSB:
        raise BootImageError(f"bzImage: decompressed ELF has data encoding {image[5]}, not little-endian (1)")
    (machine,) = struct.unpack_from("<H", image, 0x12)
    if machine != _EM_X86_64:
        raise BootImageError(f"bzImage: decompressed ELF has machine {machine}, not x86-64 ({_EM_X86_64})")


def _finish(name: str, out: bytes, eof: bool) -> bytes:
    if not eof:
        raise BootImageError(f"bzImage: {name} payload is truncated (no end of stream)")
    return out


def _gzip(payload: bytes) -> bytes:
    import zlib

    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    return _finish("gzip", d.decompress(payload), d.eof)


def _xz(payload: bytes) -> bytes:
    import lzma

    d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    return _finish("xz", d.decompress(payload), d.eof)


def _lzma(payload: bytes) -> bytes:
    import lzma

    d = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)
    return _finish("lzma", d.decompress(payload), d.eof)


def _bzip2(payload: bytes) -> bytes:
    import bz2

    d = bz2.BZ2Decompressor()
    return _finish("bzip2", d.decompress(payload), d.eof)


def _zstd(payload: bytes) -> bytes:
    d: Any
    try:  # Python >= 3.14
        d = importlib.import_module("compression.zstd").ZstdDecompressor()
    except ImportError:
        try:
            zstandard = importlib.import_module("zstandard")
        except ImportError:
            raise BootImageError(
                "bzImage: payload is zstd-compressed, but the module 'zstandard' is not installed "
                "(pip install zstandard, or use Python >= 3.14)"
            ) from None
        d = zstandard.ZstdDecompressor().decompressobj()
    out: bytes = d.decompress(payload)
    return _finish("zstd", out, bool(getattr(d, "eof", True)))


def _lzo(payload: bytes) -> bytes:
    raise BootImageError("bzImage: lzo payload compression is not supported (no LZO decoder here)")


def _lz4(payload: bytes) -> bytes:
    """Decode the LZ4 legacy frame format (lz4 -l) that Linux uses, size field stripped."""
    stream = payload[:-4]
    out = bytearray()
    pos = 4
    while pos < len(stream):
        if pos + 4 > len(stream):
            raise BootImageError(f"bzImage: lz4 payload is corrupt: stray bytes at payload offset {pos:#x}")
        (size,) = struct.unpack_from("<I", stream, pos)
        pos += 4
        if size == _LZ4_LEGACY_MAGIC:  # concatenated frames
            continue
        if size == 0 or pos + size > len(stream):
            raise BootImageError(
                f"bzImage: lz4 payload is corrupt: block of {size} bytes at payload offset {pos - 4:#x}"
            )
        _lz4_block(stream[pos : pos + size], out)
        pos += size
    return bytes(out)


def _lz4_block(src: bytes, out: bytearray) -> None:
    """Append the decoding of one LZ4 block to out; a match may not reach before the block."""
    base = len(out)
    n = len(src)
    p = 0
    while True:
        token = src[p]
        p += 1
        lit = token >> 4
        if lit == 15:
            while True:
                b = src[p]
                p += 1
                lit += b
                if b != 255:
                    break
        if lit:
            end = p + lit
            if end > n:
                raise BootImageError("bzImage: lz4 payload is corrupt: literals past end of block")
            out += src[p:end]
            p = end
        if p >= n:
            return
        off = src[p] | (src[p + 1] << 8)
        p += 2
        mlen = token & 15
        if mlen == 15:
            while True:
                b = src[p]
                p += 1
                mlen += b
                if b != 255:
                    break
        mlen += 4
        start = len(out) - off
        if off == 0 or start < base:
            raise BootImageError(f"bzImage: lz4 payload is corrupt: match offset {off} out of range")
        if off >= mlen:
            out += out[start : start + mlen]
        else:
            pattern = out[start:]
            reps, rest = divmod(mlen, off)
            out += pattern * reps + pattern[:rest]


_DECOMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": _gzip,
    "xz": _xz,
    "lzma": _lzma,
    "bzip2": _bzip2,
    "zstd": _zstd,
    "lz4": _lz4,
    "lzo": _lzo,
}


def main(argv: list[str] | None = None) -> int:
    """Command line: extract BZIMAGE's vmlinux into OUT."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m kvmlet.boot.vmlinux_extract", description="Extract vmlinux from a bzImage."
    )
    parser.add_argument("bzimage", help="the bzImage (e.g. /boot/vmlinuz-*)")
    parser.add_argument("out", help="where to write the vmlinux ELF")
    args = parser.parse_args(argv)
    try:
        with open(args.bzimage, "rb") as f:
            data = f.read()
        name = payload_compression(data)
        vmlinux = extract_vmlinux(data)
        with open(args.out, "wb") as f:
            f.write(vmlinux)
    except (OSError, BootImageError) as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: {len(vmlinux)} bytes ({name} payload of {args.bzimage})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
