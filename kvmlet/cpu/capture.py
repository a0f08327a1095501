"""A host's CPU as KVM offers it: captured here, saved as JSON, compared elsewhere.

``kvmlet cpu capture`` records ``KVM_GET_SUPPORTED_CPUID`` and the feature MSRs (``KVM_GET_MSRS`` on
/dev/kvm) after asking for AMX permission, so the capture says what a guest on this host can be given.
Public CPUID dumps (InstLatx64's AIDA64/EVEREST text) convert to the same format with ``kind`` "cpuid-dump":
they show the bare CPU, and they carry no MSRs (``msrs`` is null: MSR features are then not compared).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvmlet.cpu.errors import CpuModelError
from kvmlet.cpu.features import FEATURE_MSRS, cpuid_features, msr_features, sorted_features
from kvmlet.jsonfile import read_json_file
from kvmlet.kvm.cpuid import KVM_CPUID_FLAG_SIGNIFCANT_INDEX, CpuidEntry

FORMAT = "kvmlet-cpu-capture"
VERSION = 1
# Leaves whose sub-leaves select different data (KVM_CPUID_FLAG_SIGNIFCANT_INDEX in KVM's tables).
INDEXED_LEAVES = frozenset({4, 7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1A, 0x1B, 0x1D, 0x1E, 0x1F,
                            0x20, 0x23, 0x24, 0x8000001D, 0x80000020, 0x80000026})
_DUMP_LINE = re.compile(r"^\s*CPUID\s+([0-9A-Fa-f]{8}):\s*([0-9A-Fa-f]{8})-([0-9A-Fa-f]{8})-([0-9A-Fa-f]{8})-"
                        r"([0-9A-Fa-f]{8})(?:\s*\[SL\s*([0-9A-Fa-f]+)\])?")


@dataclass(frozen=True)
class HostCapture:
    """One host's CPUID table (KVM's supported one, or a bare CPU's) and feature MSRs (None: not recorded)."""

    cpuid: tuple[CpuidEntry, ...]
    msrs: dict[int, int] | None
    kind: str = "kvm"                 # "kvm" or "cpuid-dump"
    description: str = ""
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def vendor(self) -> str:
        return cpu_vendor(self.cpuid)

    @property
    def brand(self) -> str:
        return brand_string(self.cpuid)

    @property
    def features(self) -> frozenset[str]:
        """CPUID features plus the feature-MSR bits (when recorded)."""
        return cpuid_features(self.cpuid) | msr_features(self.msrs or {})

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "kind": self.kind, "description": self.description,
            "source": self.source, "vendor": self.vendor, "brand": self.brand, **self.extra,
            "features": sorted_features(self.features),
            "cpuid": [{"leaf": hex(e.function), "subleaf": hex(e.index), "flags": e.flags,
                       **{r: f"{getattr(e, r):#010x}" for r in ("eax", "ebx", "ecx", "edx")}}
                      for e in self.cpuid],
            "msrs": None if self.msrs is None else {hex(i): f"{v:#x}" for i, v in sorted(self.msrs.items())},
        }


def dumps(capture: HostCapture) -> str:
    """The capture as JSON text: one line per CPUID leaf, the feature list on one line, for readable diffs."""
    data = capture.to_json()
    lines = []
    for key, value in data.items():
        if key == "cpuid":
            rows = ",\n".join(f"  {json.dumps(row)}" for row in value)
            lines.append(f' "cpuid": [\n{rows}\n ]')
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def cpu_vendor(entries: tuple[CpuidEntry, ...] | list[CpuidEntry]) -> str:
    """The vendor string of CPUID leaf 0 (GenuineIntel, AuthenticAMD, ...)."""
    for entry in entries:
        if entry.function == 0:
            raw = b"".join(value.to_bytes(4, "little") for value in (entry.ebx, entry.edx, entry.ecx))
            return raw.decode("ascii", errors="replace")
    return "unknown"


def brand_string(entries: tuple[CpuidEntry, ...] | list[CpuidEntry]) -> str:
    table = {e.function: e for e in entries}
    raw = b"".join(value.to_bytes(4, "little") for leaf in (0x80000002, 0x80000003, 0x80000004)
                   if leaf in table for value in (table[leaf].eax, table[leaf].ebx, table[leaf].ecx,
                                                  table[leaf].edx))
    return raw.split(b"\0")[0].decode("ascii", errors="replace").strip()


# -- this host ------------------------------------------------------------------------------------------
def capture_host(description: str = "") -> HostCapture:
    """This host's KVM: supported CPUID (with AMX permission asked for first) and feature MSRs."""
    from kvmlet.cpu.xsave import request_amx_permission
    from kvmlet.host.virt import detect_backend
    from kvmlet.kvm.system import Kvm

    request_amx_permission()
    with Kvm() as kvm:
        cpuid = tuple(kvm.supported_cpuid())
        listed = set(kvm.msr_feature_index_list())
        msrs = kvm.msr_features([index for index in FEATURE_MSRS if index in listed])
    import platform

    backend = detect_backend().value
    text = description or f"{brand_string(cpuid) or cpu_vendor(cpuid)}, KVM ({backend})"
    return HostCapture(cpuid, msrs, "kvm", text, "KVM_GET_SUPPORTED_CPUID and KVM_GET_MSRS on /dev/kvm",
                       {"backend": backend, "kernel": platform.release()})


# -- files --------------------------------------------------------------------------------------------
def _number(value: object, what: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            pass
    raise CpuModelError(f"{what}: {value!r} is not a number")


def capture_from_json(data: object, where: str) -> HostCapture:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CpuModelError(f"{where}: not a kvmlet CPU capture (make one with 'kvmlet cpu capture')")
    if data.get("version") != VERSION:
        raise CpuModelError(f"{where}: capture version {data.get('version')}, kvmlet reads {VERSION}")
    rows = data.get("cpuid")
    if not isinstance(rows, list):
        raise CpuModelError(f"{where}: \"cpuid\" must be a list of leaves")
    entries = []
    for row in rows:
        if not isinstance(row, dict):
            raise CpuModelError(f"{where}: a CPUID row is not an object")
        label = f"{where} leaf {row.get('leaf')}"
        entries.append(CpuidEntry(_number(row.get("leaf"), label), _number(row.get("subleaf", 0), label),
                                  _number(row.get("flags", 0), label),
                                  *(_number(row.get(r), f"{label} {r}") for r in ("eax", "ebx", "ecx", "edx"))))
    raw_msrs = data.get("msrs")
    msrs = None
    if isinstance(raw_msrs, dict):
        msrs = {_number(k, f"{where} msr"): _number(v, f"{where} msr {k}") for k, v in raw_msrs.items()}
    extra = {k: data[k] for k in ("backend", "kernel", "converted_from", "normalized") if k in data}
    return HostCapture(tuple(entries), msrs, str(data.get("kind", "kvm")), str(data.get("description", "")),
                       str(data.get("source", "")), extra)


def load_capture(path: str | Path) -> HostCapture:
    data = read_json_file(path, f"capture {path}", CpuModelError)
    return capture_from_json(data, str(path))


def is_capture(data: object) -> bool:
    return isinstance(data, dict) and data.get("format") == FORMAT


# -- public CPUID dumps -------------------------------------------------------------------------------
def parse_cpuid_dump(text: str) -> list[CpuidEntry]:
    """The first logical CPU's leaves from an AIDA64/EVEREST CPUID dump (InstLatx64's ``*_CPUID.txt``):
    lines ``CPUID 00000007: EAX-EBX-ECX-EDX [SL 01]``; a leaf repeated without ``[SL n]`` counts sub-leaves
    up from 0. The dump of the next logical CPU starts at the next leaf 0."""
    entries: list[CpuidEntry] = []
    seen: set[tuple[int, int]] = set()
    next_index: dict[int, int] = {}
    for line in text.splitlines():
        match = _DUMP_LINE.match(line)
        if match is None:
            continue
        leaf = int(match.group(1), 16)
        if leaf == 0 and entries:
            break
        subleaf = int(match.group(6), 16) if match.group(6) is not None else next_index.get(leaf, 0)
        next_index[leaf] = subleaf + 1
        if (leaf, subleaf) in seen:
            continue
        seen.add((leaf, subleaf))
        flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX if leaf in INDEXED_LEAVES else 0
        eax, ebx, ecx, edx = (int(match.group(i), 16) for i in range(2, 6))
        entries.append(CpuidEntry(leaf, subleaf, flags, eax, ebx, ecx, edx))
    if not entries:
        raise CpuModelError("no 'CPUID xxxxxxxx: EAX-EBX-ECX-EDX' lines found: not an AIDA64/InstLatx64 CPUID dump")
    return entries


def capture_from_dump(text: str, *, description: str = "", source: str = "",
                      converted_from: str = "") -> HostCapture:
    """A capture of the CPU a dump shows. Intel CPUs report SYSCALL (CPUID 0x80000001 EDX bit 11) only to
    64-bit code, and many dumps come from 32-bit programs: when long mode is there and SYSCALL is not,
    the conversion sets it (and says so in ``normalized``)."""
    entries = list(parse_cpuid_dump(text))
    extra: dict[str, Any] = {"converted_from": converted_from} if converted_from else {}
    for i, entry in enumerate(entries):
        if (entry.function == 0x80000001 and cpu_vendor(entries) == "GenuineIntel" and entry.edx >> 29 & 1
                and not entry.edx >> 11 & 1):
            entries[i] = replace(entry, edx=entry.edx | 1 << 11)
            extra["normalized"] = ["syscall set: Intel shows it only to 64-bit code; this dump came from 32-bit"]
    return HostCapture(tuple(entries), None, "cpuid-dump", description or brand_string(entries), source, extra)
