"""The CPUID table each vCPU is given: KVM's supported set with per-vCPU topology filled in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from kvmlet.kvm.cpuid import CpuidEntry

LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_ECX_X2APIC = 1 << 21
LEAF1_EDX_HTT = 1 << 28


def vcpu_cpuid(supported: Sequence[CpuidEntry], vcpu_id: int, vcpu_count: int) -> list[CpuidEntry]:
    """Per-vCPU CPUID: the topology and APIC IDs in every leaf that describes them, the hypervisor bit set.

    Each vCPU is presented as one core of one package (``vcpu_count`` cores, one thread each), the same
    in Intel's leaves (1, 4, 0xB, 0x1F) and AMD's (0x80000008, 0x8000001E), so that no leaf carries the
    host's topology: a guest that reads it from either set finds the same answer.
    """
    shift = max(vcpu_count - 1, 0).bit_length()   # APIC ID bits for the core level
    out: list[CpuidEntry] = []
    for entry in supported:
        if entry.function == 1:
            ebx = (entry.ebx & 0x0000FFFF) | (vcpu_id << 24) | (min(vcpu_count, 255) << 16)
            edx = entry.edx | LEAF1_EDX_HTT if vcpu_count > 1 else entry.edx & ~LEAF1_EDX_HTT
            entry = replace(entry, ebx=ebx, ecx=entry.ecx | LEAF1_ECX_HYPERVISOR, edx=edx)
        elif entry.function in (0xB, 0x1F):
            level = entry.index
            if level == 0:    # SMT level: one thread per core
                entry = replace(entry, eax=0, ebx=1, ecx=(1 << 8) | level, edx=vcpu_id)
            elif level == 1:  # core level: all vCPUs in one package
                entry = replace(entry, eax=shift, ebx=vcpu_count, ecx=(2 << 8) | level, edx=vcpu_id)
            else:
                entry = replace(entry, eax=0, ebx=0, ecx=level, edx=vcpu_id)
        elif entry.function == 4:
            # EAX[31:26]: core IDs in the package - 1; EAX[25:14]: logical processors sharing this
            # cache - 1: none for the per-core levels 1 and 2, all vCPUs for level 3 and above.
            cores = ((1 << shift) - 1) & 0x3F
            level = (entry.eax >> 5) & 7
            sharing = (vcpu_count - 1 if level >= 3 else 0) & 0xFFF
            entry = replace(entry, eax=(entry.eax & 0x3FFF) | (sharing << 14) | (cores << 26))
        elif entry.function == 0x80000008:
            # ECX[15:12]: APIC ID bits for cores; ECX[7:0]: cores in the package - 1.
            entry = replace(entry, ecx=(entry.ecx & ~0xF0FF) | (shift << 12) | (max(vcpu_count - 1, 0) & 0xFF))
        elif entry.function == 0x8000001E:
            # EAX: extended APIC ID; EBX: core ID, one thread per core; ECX: node 0, one node.
            entry = replace(entry, eax=vcpu_id, ebx=vcpu_id & 0xFF, ecx=0)
        out.append(entry)
    return out
