"""A vCPU's architectural state as KVM holds it: captured from a stopped vCPU, restored into another.

What is saved is what Firecracker saves, in the order the KVM documentation requires for restoring: CPUID,
the TSC rate, general registers, special registers, XSAVE (the FPU and vector state), XCRs, debug
registers, the local APIC, MSRs (KVM's save list plus the MTRRs, which it leaves out), the MP state, and the
pending events last. Read it only while the vCPU is outside KVM_RUN (paused: ``KVM_RUN`` returned with
``immediate_exit`` set, which also completes a pending port I/O).

The ctypes structures are kept as the kernel's bytes: the state is private to KVM and to this module, and
bytes are what a snapshot file stores.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmlet.kvm import structs as s
from kvmlet.kvm.cpuid import CpuidEntry
from kvmlet.kvm.errors import KvmError
from kvmlet.kvm.vcpu import Vcpu

STATE_VERSION = 1
MSR_IA32_TSC = 0x10
MSR_MTRR_CAP = 0xFE          # read only
MTRR_MSRS = (0x2FF, 0x250, 0x258, 0x259, *range(0x268, 0x270), *range(0x200, 0x210))


@dataclass(frozen=True)
class VcpuState:
    """One vCPU, versioned (``version`` is :data:`STATE_VERSION` when captured)."""

    vcpu_id: int
    cpuid: tuple[CpuidEntry, ...]
    tsc_khz: int
    regs: bytes
    sregs: bytes
    xsave: bytes
    xcrs: bytes
    debugregs: bytes
    lapic: bytes
    msrs: dict[int, int]
    mp_state: int
    events: bytes
    version: int = STATE_VERSION


def save_msr_indices(kvm_list: list[int]) -> list[int]:
    """The MSRs to save: KVM's list plus the MTRRs, without the read-only ones."""
    indices = [index for index in kvm_list if index != MSR_MTRR_CAP]
    indices += [index for index in MTRR_MSRS if index not in indices]
    return indices


def capture(vcpu: Vcpu, msr_indices: list[int]) -> VcpuState:
    """The state of a vCPU that is not running."""
    return VcpuState(
        vcpu_id=vcpu.id, cpuid=tuple(vcpu.get_cpuid()), tsc_khz=vcpu.get_tsc_khz(),
        regs=bytes(vcpu.get_regs()), sregs=bytes(vcpu.get_sregs()), xsave=vcpu.get_xsave(),
        xcrs=bytes(vcpu.get_xcrs()), debugregs=bytes(vcpu.get_debugregs()), lapic=bytes(vcpu.get_lapic()),
        msrs=vcpu.get_msrs(msr_indices), mp_state=int(vcpu.get_mp_state()),
        events=bytes(vcpu.get_vcpu_events()))


def restore(vcpu: Vcpu, state: VcpuState, *, cpuid_set: bool = False) -> list[str]:
    """Put ``state`` into a vCPU that has not run yet; returns what could not be restored on this host.
    ``cpuid_set``: the caller has already set the saved CPUID (e.g. to check it against the host)."""
    from kvmlet.kvm import constants as c

    if state.version != STATE_VERSION:
        raise KvmError(0, f"vCPU {state.vcpu_id}: state version {state.version}, kvmlet reads {STATE_VERSION}")
    warnings: list[str] = []
    if not cpuid_set:
        vcpu.set_cpuid(state.cpuid)
    if state.tsc_khz and state.tsc_khz != vcpu.get_tsc_khz():
        try:
            vcpu.set_tsc_khz(state.tsc_khz)
        except KvmError:
            warnings.append(f"vCPU {state.vcpu_id}: the TSC rate {state.tsc_khz} kHz cannot be set on this host "
                            f"(it runs at {vcpu.get_tsc_khz()} kHz)")
    vcpu.set_regs(s.kvm_regs.from_buffer_copy(state.regs))
    vcpu.set_sregs(s.kvm_sregs.from_buffer_copy(state.sregs))
    vcpu.set_xsave(state.xsave)
    vcpu.set_xcrs(s.kvm_xcrs.from_buffer_copy(state.xcrs))
    vcpu.set_debugregs(s.kvm_debugregs.from_buffer_copy(state.debugregs))
    vcpu.set_lapic(s.kvm_lapic_state.from_buffer_copy(state.lapic))
    # KVM_SET_MSRS stops at the first MSR it refuses: name that one and go on with the rest
    remaining = [(index, value) for index, value in state.msrs.items() if index != MSR_MTRR_CAP]
    while remaining:
        written = vcpu.set_msrs(dict(remaining))
        if written >= len(remaining):
            break
        warnings.append(f"vCPU {state.vcpu_id}: KVM refused MSR {remaining[written][0]:#x}")
        remaining = remaining[written + 1:]
    vcpu.set_mp_state(c.MpState(state.mp_state))
    vcpu.set_vcpu_events(s.kvm_vcpu_events.from_buffer_copy(state.events))
    return warnings
