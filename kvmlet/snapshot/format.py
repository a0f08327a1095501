"""The snapshot state file: versioned, self-describing, every section checksummed.

Layout (little-endian)::

    magic "KVMLETSS" | format version u32 | header length u32 | header (JSON) | header SHA-256 (32 bytes)
    section 0 | section 1 | ...

The header (:class:`SnapshotHeader`) names the kvmlet version, the host's CPU vendor, the VM's configuration
and, for each section, its name, offset, length and SHA-256. Sections are msgpack (msgspec) encodings of
state models; their meaning belongs to the code that writes them. A reader checks the magic, the version,
the header's checksum and every section's length and checksum before it hands anything out, so a truncated
or corrupted file is refused before anything is restored, with one line that says which part is wrong.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from kvmlet.errors import KvmletError

MAGIC = b"KVMLETSS"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sII")
_DIGEST = 32
MAX_HEADER = 16 << 20   # a header larger than this is not one kvmlet wrote
T = TypeVar("T")


class SnapshotError(KvmletError):
    """A snapshot file that cannot be used; the message names the file and what is wrong."""


class SectionInfo(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    offset: int
    length: int
    sha256: str


class MemoryInfo(msgspec.Struct, forbid_unknown_fields=True):
    """The memory file that goes with a state file: guest RAM laid out region after region."""

    size: int                          # bytes: the file's size and the guest's RAM
    ranges: list[tuple[int, int]]      # (guest-physical address, size) of each region, in file order
    snapshot_type: str                 # "Full", or "Diff": only the pages written since the last snapshot
    runs: list[tuple[int, int]]        # (file offset, length) of what the file holds (the rest are holes)
    file_name: str = ""                # the memory file's name when written (informational)

    @property
    def data_bytes(self) -> int:
        return sum(length for _, length in self.runs)


class SnapshotHeader(msgspec.Struct, forbid_unknown_fields=True):
    kvmlet_version: str
    cpu_vendor: str
    created_unix_ms: int
    vm_config: dict[str, Any]
    memory: MemoryInfo
    sections: list[SectionInfo]


def write_snapshot(path: Path, *, kvmlet_version: str, cpu_vendor: str, created_unix_ms: int,
                   vm_config: dict[str, Any], memory: MemoryInfo, sections: dict[str, object]) -> None:
    """Write the state file atomically (a temporary file renamed over ``path``)."""
    encoder = msgspec.msgpack.Encoder()
    payloads = {name: encoder.encode(value) for name, value in sections.items()}
    infos: list[SectionInfo] = []
    offset = 0
    for name, payload in payloads.items():
        infos.append(SectionInfo(name, offset, len(payload), hashlib.sha256(payload).hexdigest()))
        offset += len(payload)
    header = msgspec.json.encode(SnapshotHeader(kvmlet_version, cpu_vendor, created_unix_ms, vm_config, memory,
                                                infos))
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as out:
            out.write(_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header)))
            out.write(header)
            out.write(hashlib.sha256(header).digest())
            for payload in payloads.values():
                out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise SnapshotError(f"snapshot {path}: cannot write it: {exc.strerror}") from None


class SnapshotFile:
    """A state file read and checked whole; ``section(name, type)`` decodes one section."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SnapshotError(f"snapshot {path}: {exc.strerror}") from None
        if len(data) < _PREAMBLE.size:
            raise SnapshotError(f"snapshot {path}: {len(data)} bytes is too short to be a snapshot (truncated?)")
        magic, version, header_length = _PREAMBLE.unpack_from(data)
        if magic != MAGIC:
            raise SnapshotError(f"snapshot {path}: not a kvmlet snapshot (magic {magic!r})")
        if version != FORMAT_VERSION:
            raise SnapshotError(f"snapshot {path}: format version {version}; this kvmlet reads version "
                                f"{FORMAT_VERSION}")
        if header_length > MAX_HEADER:
            raise SnapshotError(f"snapshot {path}: header length {header_length} is not plausible (corrupted)")
        start = _PREAMBLE.size
        body = start + header_length + _DIGEST
        if len(data) < body:
            raise SnapshotError(f"snapshot {path}: the header is cut short (truncated file)")
        header_bytes = data[start:start + header_length]
        if hashlib.sha256(header_bytes).digest() != data[start + header_length:body]:
            raise SnapshotError(f"snapshot {path}: the header's checksum does not match (corrupted)")
        try:
            self.header = msgspec.json.decode(header_bytes, type=SnapshotHeader)
        except msgspec.MsgspecError as exc:
            raise SnapshotError(f"snapshot {path}: the header cannot be read: {exc}") from None
        self._sections: dict[str, bytes] = {}
        for info in self.header.sections:
            begin, end = body + info.offset, body + info.offset + info.length
            if info.offset < 0 or info.length < 0 or end > len(data):
                raise SnapshotError(f"snapshot {path}: section {info.name!r} runs past the end of the file "
                                    "(truncated)")
            payload = data[begin:end]
            if hashlib.sha256(payload).hexdigest() != info.sha256:
                raise SnapshotError(f"snapshot {path}: section {info.name!r} does not match its checksum "
                                    "(corrupted)")
            self._sections[info.name] = payload

    @property
    def section_names(self) -> list[str]:
        return list(self._sections)

    def section(self, name: str, model: type[T]) -> T:
        try:
            payload = self._sections[name]
        except KeyError:
            raise SnapshotError(f"snapshot {self.path}: it has no section {name!r}") from None
        try:
            return msgspec.msgpack.decode(payload, type=model)
        except msgspec.MsgspecError as exc:
            raise SnapshotError(f"snapshot {self.path}: section {name!r} cannot be read: {exc}") from None

    def describe(self) -> str:
        """What the file holds, for ``--describe-snapshot``."""
        header = self.header
        memory = header.memory
        machine = header.vm_config.get("machine-config", {})
        lines = [f"kvmlet snapshot format v{FORMAT_VERSION}, written by kvmlet {header.kvmlet_version} on a "
                 f"{header.cpu_vendor} host at {header.created_unix_ms} ms (Unix time)",
                 f"machine: {machine.get('vcpu_count', 1)} vCPUs, {memory.size >> 20} MiB of memory",
                 f"memory file: {memory.snapshot_type} snapshot, {memory.data_bytes} bytes of data in "
                 f"{len(memory.runs)} runs (written as {memory.file_name or 'unnamed'})"]
        lines += [f"section {info.name}: {info.length} bytes, sha256 {info.sha256[:16]}..."
                  for info in header.sections]
        return "\n".join(lines)
