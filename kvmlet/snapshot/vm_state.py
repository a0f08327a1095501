"""The VM-wide state KVM keeps (interrupt controllers, timer, clock) and whether a host can take a vCPU's CPUID.

``capture`` and ``restore`` move the in-kernel PIC master and slave, the IOAPIC, the PIT (channel counts,
modes, gate and speaker state) and kvmclock between a paused VM and a new one. ``cpuid_differences`` names
the feature bits a snapshot's vCPUs were given that this host's KVM cannot give: restoring such a vCPU would
let the guest use an instruction the host lacks, so the snapshot is refused with that list.
"""

from __future__ import annotations

import msgspec

from kvmlet.kvm import constants as c
from kvmlet.kvm.cpuid import CpuidEntry
from kvmlet.kvm.vm import Vm

VM_STATE_VERSION = 1
IRQCHIPS = {"pic-master": c.KVM_IRQCHIP_PIC_MASTER, "pic-slave": c.KVM_IRQCHIP_PIC_SLAVE,
            "ioapic": c.KVM_IRQCHIP_IOAPIC}

# Registers that hold feature flags, per (leaf, sub-leaf); bits the guest's own set-up changes (OSXSAVE,
# OSPKE) or that KVM sets for every guest (the hypervisor bit, the APIC) are not features of the host.
FEATURE_REGISTERS: dict[tuple[int, int], tuple[str, ...]] = {
    (0x1, 0): ("ecx", "edx"), (0x7, 0): ("ebx", "ecx", "edx"), (0x7, 1): ("eax", "edx"),
    (0xD, 1): ("eax",), (0x80000001, 0): ("ecx", "edx"), (0x80000008, 0): ("ebx",),
}
DYNAMIC_BITS: dict[tuple[int, int, str], int] = {
    (0x1, 0, "ecx"): (1 << 27) | (1 << 31),   # OSXSAVE, hypervisor
    (0x1, 0, "edx"): 1 << 9,                  # APIC (cleared when the guest disables its APIC)
    (0x7, 0, "ecx"): 1 << 4,                  # OSPKE
}


class VmState(msgspec.Struct, forbid_unknown_fields=True):
    """The state of the VM's in-kernel devices, as the kernel's bytes."""

    irqchips: dict[str, bytes]
    pit2: bytes
    clock_ns: int
    version: int = VM_STATE_VERSION


def capture(vm: Vm) -> VmState:
    return VmState(irqchips={name: vm.get_irqchip(chip) for name, chip in IRQCHIPS.items()},
                   pit2=vm.get_pit2(), clock_ns=vm.get_clock())


def restore(vm: Vm, state: VmState) -> None:
    """Into a VM whose irqchip and PIT exist and whose vCPUs have not run."""
    if state.version != VM_STATE_VERSION:
        raise ValueError(f"VM state version {state.version}; this kvmlet reads {VM_STATE_VERSION}")
    missing = set(IRQCHIPS) - set(state.irqchips)
    if missing:
        raise ValueError(f"VM state has no {', '.join(sorted(missing))} state")
    for name, chip in IRQCHIPS.items():
        vm.set_irqchip(chip, state.irqchips[name])
    vm.set_pit2(state.pit2)
    vm.set_clock(state.clock_ns)


def cpu_vendor(entries: list[CpuidEntry]) -> str:
    """The vendor string of CPUID leaf 0 (e.g. GenuineIntel, AuthenticAMD)."""
    for entry in entries:
        if entry.function == 0:
            raw = b"".join(value.to_bytes(4, "little") for value in (entry.ebx, entry.edx, entry.ecx))
            return raw.decode("ascii", errors="replace")
    return "unknown"


def cpuid_differences(saved: tuple[CpuidEntry, ...] | list[CpuidEntry], supported: list[CpuidEntry]) -> list[str]:
    """The feature bits in ``saved`` that ``supported`` lacks, as 'leaf 0x7.0 ebx bits 0x...' phrases."""
    host = {(entry.function, entry.index): entry for entry in supported}
    out: list[str] = []
    for entry in saved:
        key = (entry.function, entry.index)
        registers = FEATURE_REGISTERS.get(key)
        if registers is None:
            continue
        offered = host.get(key)
        for register in registers:
            value = getattr(entry, register) & ~DYNAMIC_BITS.get((*key, register), 0)
            have = getattr(offered, register) if offered is not None else 0
            lacking = value & ~have
            if lacking:
                out.append(f"CPUID leaf {entry.function:#x}.{entry.index} {register} bits {lacking:#x}")
    return out
