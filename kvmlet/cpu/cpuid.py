"""The CPUID table each vCPU is given: KVM's supported set with per-vCPU topology filled in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from kvmlet.kvm.cpuid import CpuidEntry

LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_ECX_X2APIC = 1 << 21
LEAF1_EDX_HTT = 1 << 28


def vcpu_cpuid(supported: Sequence[CpuidEntry], vcpu_id: int, vcpu_count: int) -> list[CpuidEntry]:
    """Per-vCPU CPUID: APIC IDs in leaves 1, 0xB and 0x1F, the hypervisor bit set.

    Each vCPU is presented as one core of one package (``vcpu_count`` cores, one thread each).
    """
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
                shift = max(vcpu_count - 1, 0).bit_length()
                entry = replace(entry, eax=shift, ebx=vcpu_count, ecx=(2 << 8) | level, edx=vcpu_id)
            else:
                entry = replace(entry, eax=0, ebx=0, ecx=level, edx=vcpu_id)
        elif entry.function == 4:
            cores = max(vcpu_count - 1, 0) & 0x3F
            entry = replace(entry, eax=(entry.eax & 0x03FFFFFF) | (cores << 26))
        out.append(entry)
    return out
