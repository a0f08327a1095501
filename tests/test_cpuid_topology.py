"""Per-vCPU CPUID: every leaf that describes the topology says the same thing, none keeps the host's."""

from __future__ import annotations

import pytest

from kvmlet.cpu.cpuid import LEAF1_ECX_HYPERVISOR, vcpu_cpuid
from kvmlet.kvm.cpuid import CpuidEntry

# A host's leaves as a 2-socket, 16-core, 2-thread machine would report them.
HOST = [
    CpuidEntry(1, 0, 0, 0x000906EA, 0x0A200800 | (32 << 16), 0x7FFAFBFF, 0xBFEBFBFF),
    *[CpuidEntry(4, level, 1, (31 << 26) | (31 << 14) | (cache_level << 5) | kind, 0, 0, 0)
      for level, (cache_level, kind) in enumerate([(1, 1), (1, 2), (2, 3), (3, 3)])],
    CpuidEntry(0xB, 0, 1, 1, 2, 0x100, 0x25),
    CpuidEntry(0xB, 1, 1, 5, 32, 0x201, 0x25),
    CpuidEntry(0x80000008, 0, 0, 0x3030, 0, (6 << 12) | 31, 0),
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
    for index in range(4):
        eax = _leaf(entries, 4, index).eax
        assert eax >> 26 == (1 << shift) - 1
        cache_level = (eax >> 5) & 7
        assert (eax >> 14) & 0xFFF == (count - 1 if cache_level == 3 else 0)
        assert eax & 0x3FFF == _leaf(HOST, 4, index).eax & 0x3FFF   # cache type and level kept
    smt, core = _leaf(entries, 0xB, 0), _leaf(entries, 0xB, 1)
    assert (smt.eax, smt.ebx, smt.edx) == (0, 1, vcpu_id)
    assert (core.eax, core.ebx, core.edx) == (shift, count, vcpu_id)
    amd = _leaf(entries, 0x80000008)
    assert amd.ecx & 0xFF == count - 1 and (amd.ecx >> 12) & 0xF == shift
    assert amd.eax == 0x3030   # address sizes untouched
    ext = _leaf(entries, 0x8000001E)
    assert (ext.eax, ext.ebx, ext.ecx) == (vcpu_id, vcpu_id, 0)
