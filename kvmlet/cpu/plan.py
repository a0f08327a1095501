"""What every vCPU of a VM is given: the CPU model (or the host's CPU), the custom template, and the check
that this host can provide them, made once per VM before any vCPU exists.

A model's CPUID table is built from the host's KVM_GET_SUPPORTED_CPUID: the vendor and the cache and
address-size leaves stay the host's; every feature register holds exactly the model's features (plus the
platform features KVM's local APIC gives, see :data:`kvmlet.cpu.models.PLATFORM_FEATURES`); family, model,
stepping and brand string are the model's; leaf 0xD lists exactly the XSAVE components the features need;
leaves of features the model lacks (SGX, PT, PMU, SVM, AMX tiles ...) are dropped; the topology leaves are
rebuilt per vCPU afterwards (:func:`kvmlet.cpu.cpuid.vcpu_cpuid`). Host features the model leaves out are
never visible, which is what lets a VM move to an older host of the pool.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from kvmlet.cpu.cpuid import vcpu_cpuid
from kvmlet.kvm.cpuid import CpuidEntry

if TYPE_CHECKING:
    from kvmlet.config.models import CpuConfig
    from kvmlet.cpu.models import CpuModel
    from kvmlet.cpu.template import CpuTemplate
    from kvmlet.kvm.system import Kvm

HOST_SPECS = ("host", "None", "none", "")
# Leaves a model keeps from the host (their non-feature registers describe caches, sizes, topology).
BASIC_LEAVES = frozenset({0, 1, 2, 4, 6, 7, 0xB, 0xD, 0x1F})
EXTENDED_LEAVES = frozenset(range(0x80000000, 0x80000009))
AMX_LEAVES = frozenset({0x1D, 0x1E})
AMD_TOPOLOGY_LEAVES = frozenset({0x8000001D, 0x8000001E})
HYPERVISOR_LEAVES = range(0x40000000, 0x50000000)
BRAND_LEAVES = (0x80000002, 0x80000003, 0x80000004)


@dataclass(frozen=True)
class CpuPlan:
    """The CPUID table (before per-vCPU topology) and feature-MSR values every vCPU gets."""

    name: str                                   # "host", a model's name, with "+template" when one applies
    cpuid: tuple[CpuidEntry, ...]
    msrs: dict[int, int] = field(default_factory=dict)
    model: CpuModel | None = None
    template: CpuTemplate | None = None

    def vcpu_cpuid(self, vcpu_id: int, vcpu_count: int) -> list[CpuidEntry]:
        return vcpu_cpuid(self.cpuid, vcpu_id, vcpu_count)

    @property
    def features(self) -> frozenset[str]:
        """The features a guest of this plan sees (what the migration gate checks)."""
        from kvmlet.cpu.features import cpuid_features, msr_features

        return cpuid_features(self.cpuid) | msr_features(self.msrs)


# -- checks ---------------------------------------------------------------------------------------------
def check_vendor(model: CpuModel, host_vendor: str, where: str = "this host") -> None:
    from kvmlet.cpu.errors import VendorMismatchError

    if model.vendor is not None and model.vendor != host_vendor:
        raise VendorMismatchError(
            f"CPU model {model.name} is for {model.vendor} CPUs and {where} is {host_vendor}: a model cannot "
            "change the CPU vendor (the x86-64-v1..v4 models run on either)")


def missing_on_host(wanted: Iterable[str], host_features: frozenset[str]) -> list[str]:
    """The features of ``wanted`` the host lacks, in CPUID order."""
    from kvmlet.cpu.features import sorted_features

    return sorted_features(set(wanted) - host_features)


def refuse_missing(what: str, missing: list[str], where: str = "this host") -> None:
    from kvmlet.cpu.errors import HostCannotProvideError

    if missing:
        raise HostCannotProvideError(f"{where} cannot provide {what}: it lacks {' '.join(missing)}", missing)


# -- a model's CPUID table ------------------------------------------------------------------------------
def needed_levels(features: Iterable[str]) -> tuple[int, int]:
    """The lowest highest-basic and highest-extended leaves that hold ``features``."""
    from kvmlet.cpu.features import FEATURES

    level, xlevel = 0xB, 0x80000008      # 0xB: the topology leaf kvmlet fills in for every vCPU
    for name in features:
        feature = FEATURES.get(name)
        if feature is None:
            continue
        if feature.leaf >= 0x80000000:
            xlevel = max(xlevel, feature.leaf)
        else:
            level = max(level, feature.leaf)
    if "xsave" in features:
        level = max(level, 0xD)
    if "amx-tile" in features:
        level = max(level, 0x1E)
    if "topoext" in features:
        xlevel = max(xlevel, 0x8000001E)
    return level, xlevel


def brand_registers(text: str) -> list[tuple[int, int, int, int]]:
    raw = text.encode("ascii", errors="replace")[:47].ljust(48, b"\0")
    words = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 48, 4)]
    return [(words[i], words[i + 1], words[i + 2], words[i + 3]) for i in range(0, 12, 4)]


def signature(family: int, model: int, stepping: int) -> int:
    """CPUID.1 EAX for a family/model/stepping (extended fields as the SDM encodes them)."""
    base_family = min(family, 0xF)
    extended_family = family - 0xF if family >= 0xF else 0
    return ((extended_family & 0xFF) << 20 | (model >> 4 & 0xF) << 16 | base_family << 8
            | (model & 0xF) << 4 | (stepping & 0xF))


def model_cpuid(model: CpuModel, supported: Sequence[CpuidEntry]) -> list[CpuidEntry]:
    """The CPUID table of ``model`` on a host whose KVM offers ``supported`` (checked separately)."""
    from kvmlet.cpu.features import (
        AMD_EDX_ALIASES,
        FEATURE_REGISTERS,
        FEATURES,
        cpuid_features,
        register_bits,
        xsave_needed,
    )
    from kvmlet.cpu.models import AMD, PLATFORM_FEATURES

    host = {(e.function, e.index): e for e in supported}
    host_features = cpuid_features(supported)
    features = set(model.features) | (PLATFORM_FEATURES & host_features)
    bits = register_bits(features)
    need_level, need_xlevel = needed_levels(features)
    host_level = host[(0, 0)].eax if (0, 0) in host else 0
    host_xlevel = host[(0x80000000, 0)].eax if (0x80000000, 0) in host else 0x80000000
    level = min(host_level, max(model.level, need_level))
    xlevel = min(host_xlevel, max(model.xlevel, need_xlevel))
    leaf7_max = max((f.subleaf for f in (FEATURES[n] for n in features if n in FEATURES) if f.leaf == 7), default=0)
    amd = model.vendor == AMD or (model.vendor is None and _vendor(supported) == AMD)
    keep_basic = BASIC_LEAVES | (AMX_LEAVES if "amx-tile" in features else frozenset())
    keep_extended = EXTENDED_LEAVES | (AMD_TOPOLOGY_LEAVES if "topoext" in features else frozenset())
    keep_extended |= {0x80000021} if any(FEATURES[n].leaf == 0x80000021 for n in features if n in FEATURES) else set()
    leaf1_eax = (signature(model.family, model.model, model.stepping)
                 if model.family is not None and model.model is not None and model.stepping is not None else None)
    brand = brand_registers(model.model_id) if model.model_id else None

    out: list[CpuidEntry] = []
    for entry in supported:
        leaf, sub = entry.function, entry.index
        if leaf in HYPERVISOR_LEAVES:
            out.append(entry)
            continue
        if leaf >= 0x80000000:
            if leaf > xlevel or leaf not in keep_extended:
                continue
        elif leaf > level or leaf not in keep_basic or leaf == 0xD:
            continue
        if leaf == 7 and sub > leaf7_max:
            continue
        values = {r: getattr(entry, r) for r in ("eax", "ebx", "ecx", "edx")}
        for register in values:
            if (leaf, sub, register) in FEATURE_REGISTERS:
                values[register] = bits[(leaf, sub, register)]
        if leaf == 0:
            values["eax"] = level
        elif leaf == 0x80000000:
            values["eax"] = xlevel
        elif leaf == 1 and leaf1_eax is not None:
            values["eax"] = leaf1_eax
        elif leaf == 6:
            values.update(ebx=0, ecx=0, edx=0)
        elif leaf == 7:
            if sub == 0:
                values["eax"] = leaf7_max
            else:
                values.update({r: 0 for r in ("eax", "ebx", "ecx", "edx") if (7, sub, r) not in FEATURE_REGISTERS})
        elif leaf == 0x80000001 and amd:
            values["edx"] |= bits[(1, 0, "edx")] & AMD_EDX_ALIASES
            if leaf1_eax is not None:
                values["eax"] = leaf1_eax
        elif leaf == 0x80000007:
            values.update(eax=0, ebx=0, ecx=0)
        elif leaf == 0x80000008:
            values["edx"] = 0
        elif leaf == 0x80000021:
            values.update(ebx=0, ecx=0, edx=0)
        elif brand is not None and leaf in BRAND_LEAVES:
            values.update(zip(("eax", "ebx", "ecx", "edx"), brand[leaf - 0x80000002], strict=True))
        out.append(replace(entry, **values))
    if "xsave" in features and level >= 0xD:
        from kvmlet.cpu.xsave import xsave_leaves

        components = xsave_needed(features) & _host_components(host)
        out += xsave_leaves(host, components, bits[(0xD, 1, "eax")])
    return sorted(out, key=lambda e: (e.function, e.index))


def _host_components(host: dict[tuple[int, int], CpuidEntry]) -> int:
    leaf = host.get((0xD, 0))
    return 0 if leaf is None else leaf.eax | leaf.edx << 32


def _vendor(entries: Sequence[CpuidEntry]) -> str:
    from kvmlet.cpu.capture import cpu_vendor

    return cpu_vendor(list(entries))


# -- the plan of a VM -----------------------------------------------------------------------------------
def host_feature_msrs(kvm: Kvm) -> dict[int, int]:
    from kvmlet.cpu.features import FEATURE_MSRS

    listed = set(kvm.msr_feature_index_list())
    return kvm.msr_features([index for index in FEATURE_MSRS if index in listed])


def plan_cpu(kvm: Kvm, cpu_template: str | None, cpu_config: CpuConfig | None) -> CpuPlan:
    """The plan for a VM with ``machine-config.cpu_template`` and ``cpu-config``, checked against this
    host; HostCannotProvideError names every missing feature, VendorMismatchError a wrong vendor."""
    if (cpu_template or "host") in HOST_SPECS and cpu_config is None:
        return host_plan(kvm.supported_cpuid())   # today's pass-through: nothing to check or import
    from kvmlet.cpu.errors import CpuModelError
    from kvmlet.cpu.features import cpuid_features, msr_features, msr_values
    from kvmlet.cpu.models import resolve_model
    from kvmlet.cpu.template import parse_template

    model = resolve_model(cpu_template or "host")
    template = parse_template(cpu_config) if cpu_config is not None else None
    if model is not None and "amx-tile" in model.features:
        from kvmlet.cpu.xsave import request_amx_permission

        request_amx_permission()   # before KVM_GET_SUPPORTED_CPUID: without it, KVM leaves AMX out
    supported = kvm.supported_cpuid()
    host_features = cpuid_features(supported) | msr_features(host_feature_msrs(kvm))
    if template is not None:
        absent = [str(cap) for cap in template.required_caps if kvm.check_extension(cap) <= 0]
        if absent:
            raise CpuModelError(f"cpu-config: this host's KVM lacks the capabilities the template requires: "
                                f"{', '.join(absent)}")
    if model is None:
        name, cpuid, msrs = "host", list(supported), {}
    else:
        check_vendor(model, _vendor(supported))
        refuse_missing(f"CPU model {model.name}", missing_on_host(model.features, host_features))
        name, cpuid = model.name, model_cpuid(model, supported)
        msrs = msr_values(model.features) if "arch-capabilities" in model.features else {}
    if template is not None:
        name += "+template"
        cpuid = template.apply_cpuid(cpuid)
        refuse_missing("the custom CPU template", missing_on_host(cpuid_features(cpuid), host_features))
    return CpuPlan(name, tuple(cpuid), msrs, model, template)


def host_plan(supported: Sequence[CpuidEntry]) -> CpuPlan:
    """Pass-through of the host's CPU (kvmlet's behaviour without a model)."""
    return CpuPlan("host", tuple(supported))
