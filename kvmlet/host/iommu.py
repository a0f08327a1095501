"""The host's DMA remapping: its ACPI DMAR table (Intel VT-d specification, chapter 8) and its IOMMU groups.

:func:`parse_dmar` reads the table the firmware gives (``/sys/firmware/acpi/tables/DMAR``, readable by root):
the host address width, the flags (interrupt remapping, x2APIC opt-out), and its remapping structures: DRHD (a
remapping unit: register base, segment, INCLUDE_PCI_ALL or the devices in its scope), RMRR (memory the firmware
keeps DMA-reachable), ATSR, RHSA, ANDD, SATC. The same parser reads the DMAR kvmlet writes for its guests
(tests check one against the other). :func:`iommu_groups` lists ``/sys/kernel/iommu_groups``: the units of
isolation that VFIO assigns whole.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kvmlet.host.tree import Root, host_path, list_dir

DMAR_HEADER = 48
STRUCTURE_NAMES = {0: "DRHD", 1: "RMRR", 2: "ATSR", 3: "RHSA", 4: "ANDD", 5: "SATC"}
FLAG_INTR_REMAP = 1 << 0
FLAG_X2APIC_OPT_OUT = 1 << 1
FLAG_DMA_CTRL_OPT_IN = 1 << 2


@dataclass(frozen=True)
class RemappingUnit:
    """A DRHD: one DMA-remapping hardware unit."""

    base: int
    segment: int
    include_all: bool
    scopes: int            # device scope entries (the devices it covers, if not all)


@dataclass(frozen=True)
class DmarTable:
    host_address_width: int
    flags: int
    units: tuple[RemappingUnit, ...] = ()
    other: dict[str, int] = field(default_factory=dict)   # structure name -> count (RMRR, ATSR, ...)

    @property
    def interrupt_remapping(self) -> bool:
        return bool(self.flags & FLAG_INTR_REMAP)

    def describe(self) -> str:
        units = ", ".join(f"{unit.base:#x} " + ("all devices" if unit.include_all else f"{unit.scopes} scopes")
                          for unit in self.units)
        parts = [f"HAW {self.host_address_width}", f"{len(self.units)} unit{'s' if len(self.units) != 1 else ''}"
                 + (f" ({units})" if units else "")]
        if self.interrupt_remapping:
            parts.append("interrupt remapping")
        parts += [f"{count} {name}" for name, count in sorted(self.other.items())]
        return "DMAR: " + ", ".join(parts)


def _count_scopes(data: bytes, start: int, end: int) -> int:
    count, offset = 0, start
    while offset + 2 <= end:
        length = data[offset + 1]
        if length < 6:
            break
        count += 1
        offset += length
    return count


def parse_dmar(data: bytes) -> DmarTable | None:
    """The table, or None if ``data`` is not a DMAR table (wrong signature, length or checksum)."""
    if len(data) < DMAR_HEADER or data[:4] != b"DMAR":
        return None
    length = struct.unpack_from("<I", data, 4)[0]
    if length < DMAR_HEADER or length > len(data) or sum(data[:length]) % 256:
        return None
    units: list[RemappingUnit] = []
    other: dict[str, int] = {}
    offset = DMAR_HEADER
    while offset + 4 <= length:
        kind, size = struct.unpack_from("<HH", data, offset)
        if size < 4 or offset + size > length:
            break
        if kind == 0 and size >= 16:
            flags, _, segment, base = struct.unpack_from("<BBHQ", data, offset + 4)
            units.append(RemappingUnit(base, segment, bool(flags & 1), _count_scopes(data, offset + 16, offset + size)))
        else:
            name = STRUCTURE_NAMES.get(kind, f"type {kind}")
            other[name] = other.get(name, 0) + 1
        offset += size
    return DmarTable(data[36] + 1, data[37], tuple(units), other)


def read_dmar(root: Root = "/") -> DmarTable | None:
    try:
        return parse_dmar(host_path(root, "/sys/firmware/acpi/tables/DMAR").read_bytes())
    except OSError:
        return None


def iommu_groups(root: Root = "/") -> dict[int, list[str]]:
    """IOMMU group number -> the PCI addresses of its devices."""
    groups: dict[int, list[str]] = {}
    for name in list_dir(root, "/sys/kernel/iommu_groups"):
        if name.isdigit():
            groups[int(name)] = sorted(list_dir(root, f"/sys/kernel/iommu_groups/{name}/devices"))
    return dict(sorted(groups.items()))


def describe_groups(groups: dict[int, list[str]]) -> str:
    if not groups:
        return ""
    shared = sum(1 for devices in groups.values() if len(devices) > 1)
    largest = max(len(devices) for devices in groups.values())
    return f"groups: {len(groups)}, {shared} with more than one device (largest {largest})"
