"""XSAVE state for a CPU model: CPUID leaf 0xD kept consistent with the features, and the AMX permission.

AMX tile data (XSAVE component 18) is a *dynamic* component: Linux gives a process (and KVM a guest) room
for it only after ``arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18)``. Without it KVM_GET_SUPPORTED_CPUID leaves
AMX out of leaf 0xD and KVM_SET_CPUID2 refuses a table that lists it.
"""

from __future__ import annotations

import ctypes
from dataclasses import replace

from kvmlet.cpu.features import XSAVE_LEGACY, XTILE_DATA
from kvmlet.kvm.cpuid import KVM_CPUID_FLAG_SIGNIFCANT_INDEX, CpuidEntry

SYS_ARCH_PRCTL = 158            # x86-64
ARCH_GET_XCOMP_SUPP = 0x1021
ARCH_GET_XCOMP_GUEST_PERM = 0x1024
ARCH_REQ_XCOMP_GUEST_PERM = 0x1025
LEGACY_AREA = 512 + 64          # the legacy region and the XSAVE header


def request_amx_permission() -> bool:
    """Ask Linux to let this process's guests use AMX tile data; True when they may (now or already)."""
    libc = ctypes.CDLL(None, use_errno=True)
    supported = ctypes.c_uint64(0)
    if libc.syscall(SYS_ARCH_PRCTL, ARCH_GET_XCOMP_SUPP, ctypes.byref(supported)) != 0:
        return False            # a kernel before 5.16: no dynamic XSAVE components at all
    if not supported.value >> XTILE_DATA & 1:
        return False            # this CPU has no AMX
    return bool(libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_GUEST_PERM, ctypes.c_ulong(XTILE_DATA)) == 0)


def xsave_leaves(host: dict[tuple[int, int], CpuidEntry], components: int, xsave_features: int) -> list[CpuidEntry]:
    """Leaf 0xD for a guest that may enable exactly ``components`` in XCR0 (a subset of the host's), with
    ``xsave_features`` in sub-leaf 1 EAX (XSAVEOPT, XSAVEC, XGETBV1, XSAVES, XFD). Supervisor states
    (XSS) are not offered. Sizes come from the host's sub-leaves of the components kept."""
    if not components:
        return []
    components |= XSAVE_LEGACY
    first = host.get((0xD, 0))
    flags = (first.flags if first is not None else 0) | KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    size = LEGACY_AREA
    kept: list[CpuidEntry] = []
    for number in range(2, 64):
        if not components >> number & 1:
            continue
        entry = host.get((0xD, number))
        if entry is not None:
            kept.append(entry)
            size = max(size, entry.ebx + entry.eax)      # offset + size of the component
    if first is not None and components == first.eax | first.edx << 32:
        size = max(size, first.ecx)   # every host component kept: the host's own maximum holds
    leaf0 = CpuidEntry(0xD, 0, flags, components & 0xFFFFFFFF, size, size, components >> 32)
    sub1 = host.get((0xD, 1))
    leaf1 = CpuidEntry(0xD, 1, flags, xsave_features, LEGACY_AREA if sub1 is None else sub1.ebx, 0, 0)
    if sub1 is not None:
        leaf1 = replace(sub1, eax=xsave_features, ecx=0, edx=0, flags=flags)
    return [leaf0, leaf1, *kept]
