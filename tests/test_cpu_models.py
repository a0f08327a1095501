"""CPU models: the catalog, the CPUID table a model gets on a host, and each model applied on this host.

Expectations about this host come from this host's own capture (KVM_GET_SUPPORTED_CPUID), so the tests
hold on AMD and Intel hosts, with and without AMX, under PVM and on VMX/SVM. Under PVM, KVM_GET_CPUID2
answers leaves 1 and 7 (and 0xD.1) with PVM's own values whatever was set: the round trip compares the
registers this host's KVM echoes, found by a probe, and the others go through the migration gate instead.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest

from kvmlet.cpu.baseline import baseline
from kvmlet.cpu.capture import HostCapture, capture_host, cpu_vendor, load_capture
from kvmlet.cpu.compat import missing_features
from kvmlet.cpu.errors import HostCannotProvideError, VendorMismatchError
from kvmlet.cpu.features import (
    FEATURE_REGISTERS,
    FEATURES,
    MSR_IA32_ARCH_CAPABILITIES,
    cpuid_features,
    missing_requirements,
    unknown_names,
    xsave_components,
    xsave_needed,
)
from kvmlet.cpu.models import PLATFORM_FEATURES, CpuModel, catalog, get_model, model_from_dict
from kvmlet.cpu.plan import CpuPlan, model_cpuid, plan_cpu, signature
from kvmlet.kvm.cpuid import CpuidEntry
from kvmlet.kvm.system import Kvm

DATA = Path(__file__).parent / "data" / "cpu"
REQUIRED = ("Penryn", "Nehalem", "Westmere", "SandyBridge", "Haswell", "Skylake-Server", "Icelake-Server",
            "SapphireRapids", "EPYC-Rome", "EPYC-Milan", "EPYC-Genoa", "x86-64-v1", "x86-64-v2", "x86-64-v3",
            "x86-64-v4")
# Each public dump (tests/data/cpu, see docs/cpu-models.md) and the catalog model of its generation.
GENERATIONS = {
    "penryn-xeon-e5462": "Penryn", "nehalem-ep": "Nehalem", "westmere-core-i7-990x": "Westmere",
    "sandybridge-e-core-i7-3930k": "SandyBridge", "haswell-ep-xeon-e5-2699v3": "Haswell",
    "skylake-sp-xeon-gold-6154": "Skylake-Server", "icelake-sp-xeon-gold-6336y": "Icelake-Server",
    "sapphirerapids-xeon-w9-3475x": "SapphireRapids", "epyc-rome-7742": "EPYC-Rome",
    "epyc-milan-7763": "EPYC-Milan", "epyc-genoa-9654": "EPYC-Genoa",
}


def dump(name: str) -> HostCapture:
    return load_capture(DATA / f"{name}.json")


@pytest.fixture(scope="module")
def this_host() -> HostCapture:
    return capture_host()


# -- the catalog ----------------------------------------------------------------------------------------
def test_the_catalog_has_the_required_models_with_known_consistent_features() -> None:
    names = catalog().names()
    assert set(REQUIRED) <= set(names) and len(names) == len(set(names))
    for model in catalog():
        assert not unknown_names(model.features), model.name
        assert not missing_requirements(model.features), model.name
        assert not model.features & PLATFORM_FEATURES, model.name    # added from the host, not required
        assert model.vendor in (None, "GenuineIntel", "AuthenticAMD")
    assert get_model("skylake-server") is get_model("Skylake-Server")


@pytest.mark.parametrize("chain", [
    ["x86-64-v1", "x86-64-v2", "x86-64-v3", "x86-64-v4"],
    ["Penryn", "Nehalem", "Westmere", "SandyBridge", "IvyBridge", "Haswell", "Broadwell", "Skylake-Server",
     "Cascadelake-Server", "Icelake-Server"],
    ["EPYC", "EPYC-Rome", "EPYC-Milan", "EPYC-Genoa"],
    ["x86-64-v2", "Nehalem"], ["x86-64-v3", "Haswell"], ["x86-64-v4", "Skylake-Server"], ["x86-64-v3", "EPYC"],
    ["x86-64-v4", "EPYC-Genoa"],
])
def test_each_generation_has_the_features_of_the_one_before(chain: list[str]) -> None:
    for older, newer in itertools.pairwise(chain):
        assert get_model(older).features <= get_model(newer).features, (older, newer)


@pytest.mark.parametrize(("capture", "model"), GENERATIONS.items())
def test_each_real_cpu_runs_its_generation_and_nothing_newer(capture: str, model: str) -> None:
    """A public CPUID dump of a generation offers that generation's model (the closest catalog model of
    its own baseline), and lacks something of every newer model of its vendor."""
    host = dump(capture)
    assert baseline([host]).model == get_model(model)
    assert missing_features(get_model(model), host) == []
    assert host.msrs is None    # dumps carry no MSRs: MSR features are not compared


# -- a model's CPUID table ------------------------------------------------------------------------------
@pytest.mark.parametrize(("capture", "name"), GENERATIONS.items())
def test_a_model_on_a_host_has_exactly_its_features(capture: str, name: str) -> None:
    """Built over a real CPU's CPUID: exactly the model's features (plus the platform features the host
    has), the host's vendor, the model's family/model/stepping, XSAVE components that match."""
    host = dump(capture)
    model = get_model(name)
    table = model_cpuid(model, list(host.cpuid))
    assert cpuid_features(table) == (model.features - msr_only()) | (PLATFORM_FEATURES & cpuid_features(host.cpuid))
    assert cpu_vendor(table) == host.vendor
    leaves = {(e.function, e.index): e for e in table}
    assert leaves[(1, 0)].eax == signature(model.family or 0, model.model or 0, model.stepping or 0)
    assert xsave_components(table) == xsave_needed(model.features)
    host_leaves = {(e.function, e.index) for e in host.cpuid}
    for number in range(2, 64):   # the host's sub-leaf of 0xD for each component kept, none for the others
        kept = bool(xsave_components(table) >> number & 1) and (0xD, number) in host_leaves
        assert ((0xD, number) in leaves) == kept
    assert not {0x12, 0x14, 0x8000000A, 0x8000001F} & {e.function for e in table}   # SGX, PT, SVM, SEV
    assert ((0x1D, 0) in leaves) == ("amx-tile" in model.features)
    host_level = host.cpuid[0].eax
    assert min(host_level, 0xB) <= leaves[(0, 0)].eax <= host_level


def msr_only() -> frozenset[str]:
    from kvmlet.cpu.features import MSR_FEATURES

    return frozenset(MSR_FEATURES)


def test_an_abi_level_keeps_the_hosts_identity() -> None:
    for capture in ("epyc-genoa-9654", "icelake-sp-xeon-gold-6336y"):
        host = dump(capture)
        table = model_cpuid(get_model("x86-64-v4"), list(host.cpuid))
        assert cpu_vendor(table) == host.vendor
        assert next(e.eax for e in table if e.function == 1) == next(e.eax for e in host.cpuid if e.function == 1)


def test_topology_leaves_are_filled_per_vcpu_after_the_model() -> None:
    host = dump("epyc-milan-7763")
    plan = CpuPlan("EPYC-Milan", tuple(model_cpuid(get_model("EPYC-Milan"), list(host.cpuid))))
    table = {(e.function, e.index): e for e in plan.vcpu_cpuid(3, 4)}
    assert table[(1, 0)].ebx >> 24 == 3 and table[(0x8000001E, 0)].eax == 3
    assert (table[(0x80000008, 0)].ecx & 0xFF) == 3


# -- each model on this host ----------------------------------------------------------------------------
def _echoed_registers(kvm: Kvm) -> set[tuple[int, int, str]]:
    """The feature registers this host's KVM_GET_CPUID2 gives back as set: KVM proper echoes them all,
    PVM answers some with its own values (they come back non-zero when set to zero)."""
    supported = kvm.supported_cpuid()
    zeroed = [replace(e, **{r: 0 for r in ("eax", "ebx", "ecx", "edx")
                            if (e.function, e.index, r) in FEATURE_REGISTERS}) for e in supported]
    vm = kvm.create_vm()
    try:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(zeroed)
        back = {(e.function, e.index): e for e in vcpu.get_cpuid()}
        vcpu.close()
    finally:
        vm.close()
    return {key for key in FEATURE_REGISTERS if key[:2] not in back or not getattr(back[key[:2]], key[2])}


def _round_trip(kvm: Kvm, plan: CpuPlan) -> tuple[list[CpuidEntry], list[CpuidEntry], dict[int, int]]:
    """Every vCPU configured as a VM's would be; (what was set, what KVM_GET_CPUID2 gives back, MSRs)."""
    from kvmlet.cpu.setup import configure_vcpu

    vm = kvm.create_vm()
    try:
        vm.create_irqchip()
        vcpu = vm.create_vcpu(0)
        configure_vcpu(vcpu, plan, 1)   # MSRs KVM refuses are warnings (none of the model's must be)
        sent = plan.vcpu_cpuid(0, 1)
        back = vcpu.get_cpuid()
        msrs = vcpu.get_msrs([MSR_IA32_ARCH_CAPABILITIES])
        vcpu.close()
    finally:
        vm.close()
    return sent, back, msrs


def _features_in(entries: list[CpuidEntry], registers: set[tuple[int, int, str]]) -> frozenset[str]:
    return frozenset(n for n in cpuid_features(entries) if FEATURES[n].key in registers)


def _check_applies(kvm: Kvm, plan: CpuPlan, host: HostCapture) -> None:
    sent, back, msrs = _round_trip(kvm, plan)
    echoed = _echoed_registers(kvm)
    assert _features_in(back, echoed) == _features_in(sent, echoed)
    for entry in sent:   # the identity and sizes the model chose come back too
        if entry.function in (0, 0x80000000, 0x80000002, 0x80000003, 0x80000004):
            assert any(b == entry for b in back), hex(entry.function)
    assert missing_features(plan, host) == []     # what the gate says of this host for this VM
    if MSR_IA32_ARCH_CAPABILITIES in plan.msrs and MSR_IA32_ARCH_CAPABILITIES in msrs:
        assert msrs[MSR_IA32_ARCH_CAPABILITIES] == plan.msrs[MSR_IA32_ARCH_CAPABILITIES]


@pytest.mark.parametrize("name", [m.name for m in catalog()])
def test_each_catalog_model_applies_here_or_is_refused_with_what_is_missing(name: str, this_host: HostCapture) -> None:
    model = get_model(name)
    with Kvm() as kvm:
        if model.vendor is not None and model.vendor != this_host.vendor:
            with pytest.raises(VendorMismatchError, match=f"{model.vendor}.*{this_host.vendor}"):
                plan_cpu(kvm, name, None)
            return
        expected_missing = missing_features(model, this_host)
        if expected_missing:
            with pytest.raises(HostCannotProvideError) as refused:
                plan_cpu(kvm, name, None)
            assert refused.value.missing == expected_missing
            assert str(refused.value).endswith(" ".join(expected_missing)) and "\n" not in str(refused.value)
            return
        plan = plan_cpu(kvm, name, None)
        assert plan.model == model
        _check_applies(kvm, plan, this_host)


def test_the_baseline_of_this_host_applies_here(this_host: HostCapture, tmp_path: Path) -> None:
    """The largest model this host can give (every feature it has), as a model file: it applies, feature
    MSR included, and the gate finds nothing missing."""
    found = baseline([this_host])
    path = tmp_path / "here.json"
    path.write_text(json.dumps(found.as_model("here").to_file(found.model.name if found.model else None)))
    with Kvm() as kvm:
        plan = plan_cpu(kvm, str(path), None)
        assert plan.features == found.features
        _check_applies(kvm, plan, this_host)


def test_a_model_this_host_lacks_a_feature_of_is_refused_naming_it(this_host: HostCapture) -> None:
    """A model built from this host's own features plus one it lacks: exactly that one is named."""
    candidates = ("avx512-vp2intersect", "sm4", "xop", "fma4", "3dnow", "ia64")
    absent = next(n for n in candidates if n not in this_host.features)
    model = CpuModel("with-extra", this_host.vendor, frozenset({"fpu", "sse", "sse2", absent}))
    data = {"kvmlet_cpu_model": 1, "name": model.name, "vendor": model.vendor, "features": sorted(model.features)}
    parsed = model_from_dict(data, "test")
    assert parsed.features == model.features
    assert missing_features(parsed, this_host) == [absent]
