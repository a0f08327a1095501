"""Per-vCPU CPUID: every leaf that describes the topology says the same thing, none keeps the host's."""

from __future__ import annotations

import pytest

from kvmlet.cpu.cpuid import LEAF1_ECX_HYPERVISOR, vcpu_cpuid
from kvmlet.kvm.cpuid import CpuidEntry

# A host's leaves as a 2-socket, 16-core, 2-thread AMD machine would report them, and as KVM lists them:
# leaf 0xB with its first sub-leaf only (what KVM_GET_SUPPORTED_CPUID gave on the development host).
HOST = [
    CpuidEntry(1, 0, 0, 0x000906EA, 0x0A200800 | (32 << 16), 0x7FFAFBFF, 0xBFEBFBFF),
    *[CpuidEntry(4, level, 1, (31 << 26) | (31 << 14) | (cache_level << 5) | kind, 0, 0, 0)
      for level, (cache_level, kind) in enumerate([(1, 1), (1, 2), (2, 3), (3, 3)])],
    CpuidEntry(0xB, 0, 1, 0, 1, 0x100, 0),
    CpuidEntry(0x80000008, 0, 0, 0x3030, 0, (6 << 12) | 31, 0),
    *[CpuidEntry(0x8000001D, level, 1, (sharing << 14) | (cache_level << 5) | kind, 0, 0, 0)
      for level, (cache_level, kind, sharing) in enumerate([(1, 1, 1), (1, 2, 1), (2, 3, 1), (3, 3, 15)])],
    CpuidEntry(0x8000001E, 0, 0, 0x25, 0x0112, 0x0301, 0),
]


def _leaf(entries: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry:
    return next(e for e in entries if e.function == function and e.index == index)


@pytest.mark.parametrize(("vcpu_id", "count"), [(0, 1), (1, 2), (2, 3), (5, 8)])
def test_topology_leaves_agree(vcpu_id: int, count: int) -> None:
    entries = vcpu_cpuid(HOST, vcpu_id, count)
    shift = (count - 1).bit_length()
    leaf1 = _leaf(entries, 1)
    assert leaf1.ebx >> 24 == vcpu_id and (leaf1.ebx >> 16) & 0xFF == count
    assert leaf1.ecx & LEAF1_ECX_HYPERVISOR
    for function in (4, 0x8000001D):
        for index in range(4):
            eax = _leaf(entries, function, index).eax
            if function == 4:
                assert eax >> 26 == (1 << shift) - 1
            cache_level = (eax >> 5) & 7
            assert (eax >> 14) & 0xFFF == ((1 << shift) - 1 if cache_level == 3 else 0)
            assert eax & 0x3FFF == _leaf(HOST, function, index).eax & 0x3FFF   # cache type and level kept
    levels = sorted((e.index, e.eax, e.ebx, e.ecx, e.edx) for e in entries if e.function == 0xB)
    assert levels == [(0, 0, 1, 0x100, vcpu_id), (1, shift, count, 0x201, vcpu_id), (2, 0, 0, 2, vcpu_id)]
    assert all(e.flags & 1 for e in entries if e.function == 0xB)   # sub-leaves: KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    amd = _leaf(entries, 0x80000008)
    assert amd.ecx & 0xFF == count - 1 and (amd.ecx >> 12) & 0xF == shift
    assert amd.eax == 0x3030   # address sizes untouched
    ext = _leaf(entries, 0x8000001E)
    assert (ext.eax, ext.ebx, ext.ecx) == (vcpu_id, vcpu_id, 0)


def test_topology_leaves_from_this_hosts_kvm() -> None:
    """With KVM's own supported list: leaf 0xB gets its core level whatever KVM listed."""
    from kvmlet.kvm.system import Kvm

    with Kvm() as kvm:
        supported = kvm.supported_cpuid()
    if not any(e.function == 0xB for e in supported):
        pytest.skip("this host's KVM lists no CPUID leaf 0xB")
    entries = vcpu_cpuid(supported, 3, 4)
    levels = sorted((e.index, e.eax, e.ebx, e.ecx) for e in entries if e.function == 0xB)
    assert levels == [(0, 0, 1, 0x100), (1, 2, 4, 0x201), (2, 0, 0, 2)]
