"""The CPUID table each vCPU is given: KVM's supported set with per-vCPU topology filled in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from kvmlet.kvm.cpuid import KVM_CPUID_FLAG_SIGNIFCANT_INDEX, CpuidEntry

LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_ECX_X2APIC = 1 << 21
LEAF1_EDX_HTT = 1 << 28


def vcpu_cpuid(supported: Sequence[CpuidEntry], vcpu_id: int, vcpu_count: int) -> list[CpuidEntry]:
    """Per-vCPU CPUID: the topology and APIC IDs in every leaf that describes them, the hypervisor bit set.

    Each vCPU is presented as one core of one package (``vcpu_count`` cores, one thread each), the same
    in Intel's leaves (1, 4, 0xB, 0x1F) and AMD's (0x80000008, 0x8000001D, 0x8000001E), so that no leaf
    carries the host's topology: a guest that reads it from either set finds the same answer. The
    extended topology leaves (0xB, 0x1F) get all their sub-leaves from here (SMT, core, then the
    terminating invalid level), whatever KVM listed: KVM may list only the first.
    """
    shift = max(vcpu_count - 1, 0).bit_length()   # APIC ID bits for the core level
    addressable = (1 << shift) - 1                 # the "maximum addressable IDs - 1" form of a count
    out: list[CpuidEntry] = []
    topology_done: set[int] = set()
    for entry in supported:
        if entry.function == 1:
            ebx = (entry.ebx & 0x0000FFFF) | (vcpu_id << 24) | (min(vcpu_count, 255) << 16)
            edx = entry.edx | LEAF1_EDX_HTT if vcpu_count > 1 else entry.edx & ~LEAF1_EDX_HTT
            entry = replace(entry, ebx=ebx, ecx=entry.ecx | LEAF1_ECX_HYPERVISOR, edx=edx)
        elif entry.function in (0xB, 0x1F):
            if entry.function not in topology_done:
                topology_done.add(entry.function)
                out.extend(_extended_topology(entry, vcpu_id, vcpu_count, shift))
            continue
        elif entry.function in (4, 0x8000001D):
            # EAX[25:14]: logical processors sharing this cache - 1 (addressable IDs): none for the
            # per-core levels 1 and 2, all vCPUs for level 3 and above (EAX[7:5] is the level).
            level = (entry.eax >> 5) & 7
            sharing = (addressable if level >= 3 else 0) & 0xFFF
            eax = (entry.eax & ~(0xFFF << 14)) | (sharing << 14)
            if entry.function == 4:   # EAX[31:26]: core IDs in the package - 1
                eax = (eax & 0x03FFFFFF) | ((addressable & 0x3F) << 26)
            entry = replace(entry, eax=eax & 0xFFFFFFFF)
        elif entry.function == 0x80000008:
            # ECX[15:12]: APIC ID bits for cores; ECX[7:0]: cores in the package - 1.
            entry = replace(entry, ecx=(entry.ecx & ~0xF0FF) | (shift << 12) | (max(vcpu_count - 1, 0) & 0xFF))
        elif entry.function == 0x8000001E:
            # EAX: extended APIC ID; EBX: core ID, one thread per core; ECX: node 0, one node.
            entry = replace(entry, eax=vcpu_id, ebx=vcpu_id & 0xFF, ecx=0)
        out.append(entry)
    return out


def _extended_topology(first: CpuidEntry, vcpu_id: int, vcpu_count: int, shift: int) -> list[CpuidEntry]:
    """Leaf 0xB or 0x1F: SMT level (one thread per core), core level (every vCPU in the package), then
    an invalid level that ends the list. EAX: APIC ID bits below the next level; EBX: logical
    processors at this level; ECX: level type << 8 | level; EDX: the x2APIC ID."""
    flags = first.flags | KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    function = first.function
    return [CpuidEntry(function, 0, flags, 0, 1, (1 << 8) | 0, vcpu_id),
            CpuidEntry(function, 1, flags, shift, vcpu_count, (2 << 8) | 1, vcpu_id),
            CpuidEntry(function, 2, flags, 0, 0, 2, vcpu_id)]
