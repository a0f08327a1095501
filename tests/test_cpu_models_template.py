"""Custom CPU templates (Firecracker's JSON): parsing, refusal of bad bitmaps in one line, application over
the host's CPU or a model, and ``--cpu-model`` / ``cpu_template`` routing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import msgspec
import pytest

from kvmlet.config import ConfigError, CpuConfig, MachineConfig, decode
from kvmlet.cpu.capture import HostCapture, capture_host
from kvmlet.cpu.errors import HostCannotProvideError, TemplateError
from kvmlet.cpu.features import FEATURES, cpuid_features
from kvmlet.cpu.plan import plan_cpu
from kvmlet.cpu.template import Bitmap, parse_bitmap, parse_template
from kvmlet.kvm.cpuid import CpuidEntry
from kvmlet.kvm.system import Kvm

X32 = "0b" + "x" * 32


def cpu_config(body: object) -> CpuConfig:
    return decode(json.dumps(body), CpuConfig, "cpu-config")


def leaf_modifier(leaf: int, register: str, bitmap: str, subleaf: int = 0) -> dict[str, object]:
    return {"leaf": hex(leaf), "subleaf": hex(subleaf), "flags": 0,
            "modifiers": [{"register": register, "bitmap": bitmap}]}


def bit_bitmap(bit: int, char: str, width: int = 32) -> str:
    chars = ["x"] * width
    chars[width - 1 - bit] = char
    return "0b" + "".join(chars)


@pytest.fixture(scope="module")
def this_host() -> HostCapture:
    return capture_host()


def test_bitmaps_parse_most_significant_bit_first() -> None:
    assert parse_bitmap("0b" + "x" * 30 + "10", 32, "t") == Bitmap(0b11, 0b10)
    assert parse_bitmap("0b1" + "x" * 31, 32, "t") == Bitmap(1 << 31, 1 << 31)
    assert parse_bitmap("0b" + "_".join(["0000"] * 16), 64, "t") == Bitmap((1 << 64) - 1, 0)
    assert Bitmap(0b1100, 0b0100).apply(0b1010) == 0b0110


@pytest.mark.parametrize(("bitmap", "bits", "says"), [
    ("0b01", 64, "has 2 bits; it must give all 64"),
    ("0b" + "x" * 33, 32, "has 33 bits"),
    ("0b" + "x" * 31 + "2", 32, "only 0, 1, x"),
    ("x" * 32, 32, "must start with 0b"),
])
def test_bad_bitmaps_are_refused_in_one_line(bitmap: str, bits: int, says: str) -> None:
    with pytest.raises(TemplateError, match=says) as refused:
        parse_bitmap(bitmap, bits, "cpu-config: MSR 0x10a")
    assert "\n" not in str(refused.value) and str(refused.value).startswith("cpu-config: MSR 0x10a")


@pytest.mark.parametrize(("body", "says"), [
    ({"cpuid_modifiers": [leaf_modifier(1, "ecx", "0b0101")]}, "leaf 0x1 subleaf 0x0 ecx: bitmap"),
    ({"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b01"}]}, "MSR 0x10a: bitmap"),
    ({"msr_modifiers": [{"addr": "ten", "bitmap": "0b" + "x" * 64}]}, "'ten' is not a number"),
    ({"cpuid_modifiers": [{**leaf_modifier(7, "ebx", X32), "leaf": "0x1_0000_0000"}]}, "out of range"),
    ({"kvm_capabilities": ["abc"]}, "kvm_capabilities"),
    ({"reg_modifiers": [{"addr": "0x603000000013c020", "bitmap": "0b0"}]}, "aarch64"),
    ({"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": [
        {"register": "ecx", "bitmap": X32}, {"register": "ecx", "bitmap": X32}]}]}, "modified twice"),
])
def test_a_bad_template_is_refused_naming_the_field(body: dict[str, object], says: str) -> None:
    config = cpu_config(body)
    with pytest.raises(ConfigError, match=says) as refused:
        config.validate()           # what PUT /cpu-config and --cpu-model FILE run
    assert "\n" not in str(refused.value)


def test_firecrackers_example_template_parses() -> None:
    config = cpu_config({"kvm_capabilities": ["!56"], "cpuid_modifiers": [
        leaf_modifier(1, "eax", "0bxxxx000000000011xx00011011110010")],
        "msr_modifiers": [{"addr": "0x10a", "bitmap": "0b" + "0" * 64}]})
    template = parse_template(config)
    modifier = template.cpuid[0]
    assert (modifier.leaf, modifier.subleaf, modifier.register) == (1, 0, "eax")
    assert modifier.bitmap.mask == 0x0FFF3FFF and modifier.bitmap.value == 0x000306F2
    assert template.msrs[0].address == 0x10A and template.msrs[0].bitmap == Bitmap((1 << 64) - 1, 0)
    assert template.required_caps == ()
    entries = template.apply_cpuid([CpuidEntry(1, 0, 0, 0xFFFFFFFF, 0, 0, 0)])
    assert entries[0].eax == 0xF000C000 | 0x000306F2
    added = template.apply_cpuid([])       # a leaf the table lacks is added
    assert added[0].function == 1 and added[0].eax == 0x000306F2


def test_a_template_over_this_hosts_cpu_clears_and_is_checked(this_host: HostCapture) -> None:
    """Clear a feature this host has: it is gone from the plan; set one it lacks: refused, named."""
    present = next(n for n in ("lahf-lm", "rdtscp", "nx") if n in this_host.features)
    absent = next(n for n in ("3dnow", "3dnowext", "xop", "fma4", "tbm", "sse4a") if n not in this_host.features)
    have, lack = FEATURES[present], FEATURES[absent]
    with Kvm() as kvm:
        plan = plan_cpu(kvm, None, cpu_config({"cpuid_modifiers": [
            leaf_modifier(have.leaf, have.register, bit_bitmap(have.bit, "0"), have.subleaf)]}))
        assert present not in cpuid_features(plan.cpuid)
        assert plan.name == "host+template"
        with pytest.raises(HostCannotProvideError) as refused:
            plan_cpu(kvm, None, cpu_config({"cpuid_modifiers": [
                leaf_modifier(lack.leaf, lack.register, bit_bitmap(lack.bit, "1"), lack.subleaf)]}))
        assert refused.value.missing == [absent]
        assert "custom CPU template" in str(refused.value)


def test_a_template_applies_over_a_model_and_sets_msrs(this_host: HostCapture) -> None:
    from kvmlet.cpu.setup import configure_vcpu

    with Kvm() as kvm:
        plan = plan_cpu(kvm, "x86-64-v1", cpu_config({
            "cpuid_modifiers": [leaf_modifier(0x80000001, "edx", bit_bitmap(27, "0"))],   # rdtscp off
            "msr_modifiers": [{"addr": "0x1a0", "bitmap": bit_bitmap(0, "1", 64)}]}))      # fast strings on
        assert plan.name == "x86-64-v1+template" and "rdtscp" not in plan.features
        vm = kvm.create_vm()
        try:
            vm.create_irqchip()
            vcpu = vm.create_vcpu(0)
            configure_vcpu(vcpu, plan, 1)
            assert vcpu.get_msrs([0x1A0]).get(0x1A0, 1) & 1
            vcpu.close()
        finally:
            vm.close()


def test_a_template_that_needs_a_kvm_capability_this_host_lacks_is_refused() -> None:
    from kvmlet.cpu.errors import CpuModelError

    with Kvm() as kvm, pytest.raises(CpuModelError, match=r"capabilities .*: 999999"):
        plan_cpu(kvm, None, cpu_config({"kvm_capabilities": ["999999"]}))


# -- cpu_template and --cpu-model ----------------------------------------------------------------------
@pytest.mark.parametrize(("value", "says"), [("Skylake-Client-v9", "unknown CPU model"), ("T2", "static templates"),
                                             ("/nonexistent/model.json", "No such file")])
def test_machine_config_refuses_unknown_cpu_templates(value: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        MachineConfig(cpu_template=value).validate()


@pytest.mark.parametrize("value", ["None", "host", "x86-64-v2", "epyc-genoa", "SapphireRapids"])
def test_machine_config_takes_model_names(value: str) -> None:
    MachineConfig(cpu_template=value).validate()


def _run_args(**values: object) -> argparse.Namespace:
    from kvmlet.cli import build_parser

    argv = ["run"] + [item for key, value in values.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    return build_parser().parse_args(argv)


def test_cpu_model_flag_routes_names_model_files_and_templates(tmp_path: Path) -> None:
    from kvmlet.run_command import config_from_args

    assert config_from_args(_run_args(cpu_model="x86-64-v3")).machine_config.cpu_template == "x86-64-v3"
    model = tmp_path / "pool.json"
    model.write_text(json.dumps({"kvmlet_cpu_model": 1, "name": "pool", "vendor": None, "features": ["fpu", "sse"]}))
    config = config_from_args(_run_args(cpu_model=model, vcpus=2))
    assert config.machine_config.cpu_template == str(model) and config.machine_config.vcpu_count == 2
    template = tmp_path / "template.json"
    template.write_text(json.dumps({"cpuid_modifiers": [leaf_modifier(1, "ecx", X32)]}))
    config = config_from_args(_run_args(cpu_model=template))
    assert config.cpu_config is not None and config.machine_config.cpu_template is None
    template.write_text(json.dumps({"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b01"}]}))
    with pytest.raises(ConfigError, match="bitmap"):
        config_from_args(_run_args(cpu_model=template))


def test_cpu_model_flag_refusal_reaches_the_user_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from kvmlet.cli import main

    assert main(["run", "--cpu-model", "Pentium-Pro"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kvmlet: ") and "unknown CPU model 'Pentium-Pro'" in err and err.count("\n") == 1


def test_a_vm_config_carries_the_model_through_json() -> None:
    from kvmlet.config import VmConfig, encode

    config = msgspec.structs.replace(VmConfig(), machine_config=MachineConfig(cpu_template="Haswell"))
    assert decode(encode(config), VmConfig).machine_config.cpu_template == "Haswell"
