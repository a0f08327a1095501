"""Build small initrds: newc ("070701") cpio archives, as Linux's initramfs unpacker reads them."""

from __future__ import annotations

_TRAILER = "TRAILER!!!"
_S_IFDIR = 0o040000
_S_IFREG = 0o100000


def make_initrd(files: dict[str, bytes]) -> bytes:
    """Return a newc cpio archive holding files (path -> contents), mode 0755, owned by root.

    Parent directories are added as entries of their own, before the files in them; mtimes are 0,
    so the result depends only on files.
    """
    dirs: set[str] = set()
    names: list[str] = []
    for raw in files:
        name = raw.removeprefix("./").lstrip("/")
        parts = name.split("/")
        if not name or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"initrd: bad path {raw!r}")
        names.append(name)
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    if len(set(names)) != len(names) or dirs & set(names):
        raise ValueError("initrd: a path is given twice, or is both a file and a directory")

    out = bytearray()
    ino = 0
    for name in sorted(dirs):
        ino += 1
        _entry(out, ino, name, _S_IFDIR | 0o755, 2, b"")
    for raw, data in sorted(files.items(), key=lambda kv: kv[0].removeprefix("./").lstrip("/")):
        ino += 1
        _entry(out, ino, raw.removeprefix("./").lstrip("/"), _S_IFREG | 0o755, 1, data)
    _entry(out, 0, _TRAILER, 0, 1, b"")
    return bytes(out)


def _entry(out: bytearray, ino: int, name: str, mode: int, nlink: int, data: bytes) -> None:
    encoded = name.encode() + b"\0"
    # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
    out += b"070701" + "".join(f"{v:08X}" for v in fields).encode() + encoded
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
