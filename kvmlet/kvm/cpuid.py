"""CPUID entries as dataclasses, converted to and from ``struct kvm_cpuid2`` at the boundary."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

from kvmlet.kvm import structs as s

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0


@dataclass(frozen=True)
class CpuidEntry:
    """One CPUID leaf (``function``) and sub-leaf (``index``) with its four output registers."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    @property
    def indexed(self) -> bool:
        """Whether the sub-leaf (ECX input) selects this entry."""
        return bool(self.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX)


def entries_from_struct(cpuid: ctypes.Structure) -> list[CpuidEntry]:
    out = []
    for i in range(cpuid.nent):
        e = cpuid.entries[i]
        out.append(CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx))
    return out


def struct_from_entries(entries: Sequence[CpuidEntry]) -> ctypes.Structure:
    cpuid = s.kvm_cpuid2(len(entries))
    cpuid.nent = len(entries)
    for i, entry in enumerate(entries):
        e = cpuid.entries[i]
        e.function, e.index, e.flags = entry.function, entry.index, entry.flags
        e.eax, e.ebx, e.ecx, e.edx = entry.eax, entry.ebx, entry.ecx, entry.edx
    return cpuid
