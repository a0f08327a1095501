"""Initial vCPU state: the boot CPU from the loader's BootCpuState, APs waiting for INIT/SIPI."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from kvmlet.boot.cpu_state import BootCpuState, Segment
from kvmlet.cpu.msrs import boot_msrs
from kvmlet.cpu.plan import CpuPlan, host_plan
from kvmlet.kvm import structs as s
from kvmlet.kvm.cpuid import CpuidEntry
from kvmlet.kvm.vcpu import Vcpu

APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7

FPU_CONTROL_WORD = 0x37F
MXCSR_DEFAULT = 0x1F80


def _segment(target: s.kvm_segment, seg: Segment) -> None:
    target.base = seg.base
    target.limit = seg.limit
    target.selector = seg.selector
    target.type = seg.type
    target.present = int(seg.present)
    target.dpl = seg.dpl
    target.db = int(seg.db)
    target.s = int(seg.s)
    target.l = int(seg.l)
    target.g = int(seg.g)
    target.avl = int(seg.avl)
    target.unusable = 0 if seg.present else 1


def set_boot_registers(vcpu: Vcpu, state: BootCpuState) -> None:
    """Load the loader's entry state into the boot vCPU (sregs, regs, FPU)."""
    sregs = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr"):
        _segment(getattr(sregs, name), getattr(state, name))
    sregs.gdt.base, sregs.gdt.limit = state.gdt_base, state.gdt_limit
    sregs.idt.base, sregs.idt.limit = state.idt_base, state.idt_limit
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = state.cr0, state.cr3, state.cr4, state.efer
    vcpu.set_sregs(sregs)

    regs = s.kvm_regs()
    regs.rip, regs.rsp, regs.rbp = state.rip, state.rsp, state.rsp
    regs.rsi, regs.rbx, regs.rflags = state.rsi, state.rbx, state.rflags
    vcpu.set_regs(regs)

    fpu = s.kvm_fpu()
    fpu.fcw = FPU_CONTROL_WORD
    fpu.mxcsr = MXCSR_DEFAULT
    vcpu.set_fpu(fpu)


def set_local_interrupts(vcpu: Vcpu) -> None:
    """Virtual-wire mode as firmware leaves it: LINT0 ExtINT (the 8259 PIC), LINT1 NMI."""
    lapic = vcpu.get_lapic()
    raw = memoryview(lapic.regs).cast("B")
    for offset, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        (value,) = struct.unpack_from("<I", raw, offset)
        value = (value & ~0x10700 & 0xFFFFFFFF) | (mode << 8)  # delivery mode, unmasked
        struct.pack_into("<I", raw, offset, value)
    raw.release()
    vcpu.set_lapic(lapic)


def configure_vcpu(vcpu: Vcpu, cpu: CpuPlan | Sequence[CpuidEntry], vcpu_count: int) -> list[str]:
    """CPUID, MSRs and LAPIC for any vCPU (boot CPU or AP), before its first KVM_RUN. ``cpu`` is the VM's
    plan (:func:`kvmlet.cpu.plan.plan_cpu`), or KVM's supported CPUID for the host's CPU. Returns
    warnings (MSRs KVM refused)."""
    plan = cpu if isinstance(cpu, CpuPlan) else host_plan(cpu)
    vcpu.set_cpuid(plan.vcpu_cpuid(vcpu.id, vcpu_count))
    warnings: list[str] = []
    remaining = {**boot_msrs(), **plan.msrs}
    if plan.template is not None and plan.template.msrs:
        addresses = [modifier.address for modifier in plan.template.msrs]
        current = {**vcpu.get_msrs(addresses), **plan.msrs}
        remaining.update(plan.template.apply_msrs(current))
    while remaining:  # KVM_SET_MSRS stops at the first MSR it refuses: name it, set the rest
        done = vcpu.set_msrs(remaining)
        items = list(remaining.items())
        if done >= len(items):
            break
        refused, _ = items[done]
        warnings.append(f"vCPU {vcpu.id}: KVM refused MSR {refused:#x}; the guest sees its reset value")
        remaining = dict(items[done + 1:])
    set_local_interrupts(vcpu)
    return warnings
