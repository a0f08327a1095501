"""Comparing a guest CPU with a host, libvirt's ``cpu-compare`` semantics, and the migration gate.

The guest is a CPU model, a VM's plan or CPUID table, or another host's capture; the host is a capture
(:mod:`kvmlet.cpu.capture`). The answer is *identical* (the host offers exactly the guest's features),
*superset* (all of them and more: the guest runs there) or *incompatible* (another vendor, or features the
host lacks: the guest must not run or land there).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvmlet.cpu.capture import HostCapture, cpu_vendor
from kvmlet.cpu.features import MSR_FEATURES, cpuid_features, msr_features, sorted_features
from kvmlet.cpu.models import CpuModel
from kvmlet.cpu.plan import CpuPlan
from kvmlet.kvm.cpuid import CpuidEntry

GuestCpu = CpuModel | CpuPlan | HostCapture | Sequence[CpuidEntry]


class Verdict(enum.Enum):
    IDENTICAL = "identical"
    SUPERSET = "superset"
    INCOMPATIBLE = "incompatible"


@dataclass(frozen=True)
class Comparison:
    """How a host stands to a guest CPU, and the features that make it so."""

    verdict: Verdict
    guest: str
    host: str
    missing: list[str]          # guest features the host lacks
    extra: list[str]            # host features the guest does not have
    vendor_mismatch: str = ""   # "GenuineIntel guest, AuthenticAMD host" when the vendors differ
    unchecked: tuple[str, ...] = ()  # guest MSR features the capture cannot say anything about

    def summary(self) -> str:
        """One line: the verdict and why."""
        if self.vendor_mismatch:
            return f"incompatible: {self.vendor_mismatch} (a guest cannot change CPU vendor)"
        if self.verdict is Verdict.INCOMPATIBLE:
            return f"incompatible: {self.host} lacks {' '.join(self.missing)}"
        if self.verdict is Verdict.SUPERSET:
            return f"superset: {self.host} has all {self.guest} features and {len(self.extra)} more: " \
                   f"{' '.join(self.extra)}"
        return f"identical: {self.host} offers exactly the features of {self.guest}"


def guest_features(guest: GuestCpu, msrs: Mapping[int, int] | None = None) -> tuple[str, str | None, frozenset[str]]:
    """(name, vendor or None, features) of anything that describes a guest CPU."""
    if isinstance(guest, CpuModel):
        return guest.name, guest.vendor, guest.features
    if isinstance(guest, CpuPlan):
        return guest.name, cpu_vendor(list(guest.cpuid)), guest.features
    if isinstance(guest, HostCapture):
        return guest.description or "the guest's host", guest.vendor, guest.features
    table = list(guest)
    return "the VM's CPUID", cpu_vendor(table), cpuid_features(table) | msr_features(msrs or {})


def compare(guest: GuestCpu, host: HostCapture, *, guest_msrs: Mapping[int, int] | None = None) -> Comparison:
    """libvirt's cpu-compare: can ``host`` run ``guest``, and with how much to spare."""
    name, vendor, wanted = guest_features(guest, guest_msrs)
    host_name = host.description or "the host"
    offered = host.features
    unchecked: tuple[str, ...] = ()
    if host.msrs is None:       # a capture without MSRs (a CPUID dump) cannot say anything about them
        unchecked = tuple(sorted_features(wanted & MSR_FEATURES.keys()))
        wanted = wanted - MSR_FEATURES.keys()
    missing = sorted_features(wanted - offered)
    extra = sorted_features(offered - wanted)
    if vendor is not None and vendor != host.vendor:
        return Comparison(Verdict.INCOMPATIBLE, name, host_name, missing, extra,
                          f"{vendor} guest, {host.vendor} host", unchecked)
    if missing:
        verdict = Verdict.INCOMPATIBLE
    elif extra:
        verdict = Verdict.SUPERSET
    else:
        verdict = Verdict.IDENTICAL
    return Comparison(verdict, name, host_name, missing, extra, "", unchecked)


def missing_features(vm: GuestCpu, destination: HostCapture, *, vm_msrs: Mapping[int, int] | None = None) -> list[str]:
    """The migration gate: what ``destination`` lacks to run ``vm`` (a CpuModel, the VM's CpuPlan, or the
    CPUID table kvmlet set; plus its feature-MSR values). Empty means the VM can move there. A vendor
    mismatch is one entry, ``"vendor GenuineIntel (destination: AuthenticAMD)"``."""
    result = compare(vm, destination, guest_msrs=vm_msrs)
    if result.vendor_mismatch:
        _, vendor, _ = guest_features(vm, vm_msrs)
        return [f"vendor {vendor} (destination: {destination.vendor})"]
    return result.missing
