"""Pool baselines and comparisons (libvirt's cpu-baseline / cpu-compare semantics) on captures of real CPUs
(tests/data/cpu: public InstLatx64 dumps converted, and development hosts), the migration gate, and the
``kvmlet cpu`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmlet.cli import main
from kvmlet.cpu.baseline import baseline
from kvmlet.cpu.capture import HostCapture, capture_from_dump, capture_from_json, load_capture, parse_cpuid_dump
from kvmlet.cpu.compat import Verdict, compare, missing_features
from kvmlet.cpu.errors import CpuModelError, VendorMismatchError
from kvmlet.cpu.features import MSR_IA32_ARCH_CAPABILITIES, cpuid_features
from kvmlet.cpu.models import get_model, load_model_file
from kvmlet.cpu.plan import CpuPlan, model_cpuid

DATA = Path(__file__).parent / "data" / "cpu"
INTEL_SERVERS = ["skylake-sp-xeon-gold-6154", "icelake-sp-xeon-gold-6336y", "sapphirerapids-xeon-w9-3475x"]
EPYCS = ["epyc-rome-7742", "epyc-milan-7763", "epyc-genoa-9654"]


def dump(name: str) -> HostCapture:
    return load_capture(DATA / f"{name}.json")


def path(name: str) -> str:
    return str(DATA / f"{name}.json")


# -- captures -------------------------------------------------------------------------------------------
def test_every_capture_in_the_data_says_where_it_comes_from() -> None:
    for file in sorted(DATA.glob("*.json")):
        capture = load_capture(file)
        assert capture.source and capture.description, file.name
        assert capture.kind in ("kvm", "cpuid-dump")
        if capture.kind == "cpuid-dump":
            assert capture.source.startswith("https://github.com/InstLatx64/InstLatx64/blob/"), file.name
        data = json.loads(file.read_text())
        assert set(data["features"]) == capture.features, f"{file.name}: features list out of date"


def test_a_dump_parses_the_first_cpu_with_sub_leaves() -> None:
    text = """
------[ Logical CPU #0 ]------
CPUID 00000000: 0000000D-756E6547-6C65746E-49656E69 [GenuineIntel]
CPUID 00000001: 000306C3-00100800-7FFAFBFF-BFEBFBFF
CPUID 00000004: 1C004121-01C0003F-0000003F-00000000
CPUID 00000004: 1C004122-01C0003F-0000003F-00000000
CPUID 00000007: 00000000-000027AB-00000000-00000000 [SL 00]
CPUID 0000000D: 00000007-00000340-00000340-00000000 [SL 00]
CPUID 0000000D: 00000100-00000240-00000000-00000000 [SL 02]
CPUID 80000000: 80000008-00000000-00000000-00000000
CPUID 80000001: 00000000-00000000-00000021-2C100000
------[ Logical CPU #1 ]------
CPUID 00000000: 0000000D-756E6547-6C65746E-49656E69 [GenuineIntel]
CPUID 00000001: 000306C3-01100800-7FFAFBFF-BFEBFBFF
"""
    entries = parse_cpuid_dump(text)
    assert [(e.function, e.index) for e in entries] == [(0, 0), (1, 0), (4, 0), (4, 1), (7, 0), (0xD, 0), (0xD, 2),
                                                        (0x80000000, 0), (0x80000001, 0)]
    assert entries[1].ebx == 0x00100800 and entries[4].flags == 1
    capture = capture_from_dump(text, source="test")
    assert capture.vendor == "GenuineIntel" and capture.msrs is None
    assert {"avx2", "avx", "syscall", "lm"} <= capture.features      # syscall: the 32-bit dump normalized
    assert capture_from_json(capture.to_json(), "round trip") == capture
    with pytest.raises(CpuModelError, match="not an AIDA64"):
        parse_cpuid_dump("hello")


def test_a_capture_of_another_kind_of_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"format": "something"}))
    with pytest.raises(CpuModelError, match="not a kvmlet CPU capture"):
        load_capture(bad)


# -- baseline -------------------------------------------------------------------------------------------
def test_the_baseline_of_intel_servers_is_the_oldest_generation_plus_what_they_share() -> None:
    result = baseline([dump(name) for name in INTEL_SERVERS])
    assert result.vendor == "GenuineIntel" and result.hosts == 3
    assert result.model == get_model("Skylake-Server")
    assert result.features == frozenset.intersection(*(dump(n).features for n in INTEL_SERVERS))
    assert set(result.extra) == result.features - get_model("Skylake-Server").features
    assert "avx512vnni" not in result.features        # Skylake-SP has none
    assert not result.msrs_compared                    # dumps carry no MSRs


def test_the_baseline_of_epyc_generations_is_rome() -> None:
    result = baseline([dump(name) for name in EPYCS])
    assert result.model == get_model("EPYC-Rome")
    assert "avx512f" not in result.features and "clwb" in result.features


def test_the_baseline_of_every_intel_generation_is_penryn() -> None:
    names = [p.stem for p in DATA.glob("*.json")
             if load_capture(p).vendor == "GenuineIntel" and load_capture(p).kind == "cpuid-dump"]
    assert len(names) >= 8
    assert baseline([dump(n) for n in names]).model == get_model("Penryn")


def test_a_baseline_across_vendors_is_an_error_naming_them() -> None:
    with pytest.raises(VendorMismatchError, match=r"AuthenticAMD: .*; GenuineIntel: "):
        baseline([dump("epyc-milan-7763"), dump("icelake-sp-xeon-gold-6336y")])


def test_the_baseline_as_a_model_runs_on_every_host_of_the_pool() -> None:
    pool = [dump(name) for name in EPYCS]
    model = baseline(pool).as_model("pool")
    for host in pool:
        assert missing_features(model, host) == []
        assert cpuid_features(model_cpuid(model, list(host.cpuid))) >= model.features


# -- compare and the gate -------------------------------------------------------------------------------
def test_compare_answers_identical_superset_and_incompatible() -> None:
    milan = dump("epyc-milan-7763")
    assert compare(milan, milan).verdict is Verdict.IDENTICAL
    superset = compare(get_model("EPYC-Rome"), milan)
    assert superset.verdict is Verdict.SUPERSET and "pku" in superset.extra and superset.missing == []
    incompatible = compare(get_model("EPYC-Genoa"), milan)
    assert incompatible.verdict is Verdict.INCOMPATIBLE
    assert "avx512f" in incompatible.missing and "la57" in incompatible.missing
    assert incompatible.summary().startswith("incompatible: ") and "avx512f" in incompatible.summary()
    vendor = compare(get_model("Icelake-Server"), milan)
    assert vendor.verdict is Verdict.INCOMPATIBLE and "GenuineIntel guest, AuthenticAMD host" in vendor.summary()


def test_msr_features_are_not_judged_on_a_capture_without_msrs() -> None:
    result = compare(get_model("Icelake-Server"), dump("icelake-sp-xeon-gold-6336y"))
    assert result.verdict is Verdict.SUPERSET and "mds-no" in result.unchecked


def test_the_gate_takes_a_model_a_plan_or_a_cpuid_table() -> None:
    """missing_features(vm, destination): empty when the VM can go there."""
    genoa, milan = dump("epyc-genoa-9654"), dump("epyc-milan-7763")
    model = get_model("EPYC-Milan")
    table = model_cpuid(model, list(milan.cpuid))        # a Milan VM started on the Milan host
    plan = CpuPlan("EPYC-Milan", tuple(table))
    assert missing_features(model, genoa) == missing_features(plan, genoa) == missing_features(table, genoa) == []
    genoa_plan = CpuPlan("EPYC-Genoa", tuple(model_cpuid(get_model("EPYC-Genoa"), list(genoa.cpuid))))
    missing = missing_features(genoa_plan, milan)
    assert {"avx512f", "la57"} <= set(missing)
    # the VM also saw x2APIC (a platform feature, from Genoa's KVM); that Milan's firmware left it off counts
    assert ("x2apic" in missing) == ("x2apic" not in milan.features)
    assert missing_features(genoa_plan, genoa) == []
    assert missing_features(get_model("SapphireRapids"), milan) == ["vendor GenuineIntel (destination: AuthenticAMD)"]


def test_the_gate_checks_feature_msrs_of_the_vm(tmp_path: Path) -> None:
    host = load_capture(DATA / "host-pvm-intel-xeon-amx.json")
    assert host.msrs is not None
    table = list(host.cpuid)
    assert missing_features(table, host, vm_msrs=host.msrs) == []
    lacking = {**host.msrs, MSR_IA32_ARCH_CAPABILITIES: host.msrs.get(MSR_IA32_ARCH_CAPABILITIES, 0) | 1 << 1}
    if not host.msrs.get(MSR_IA32_ARCH_CAPABILITIES, 0) >> 1 & 1:
        assert missing_features(table, host, vm_msrs=lacking) == ["ibrs-all"]


# -- kvmlet cpu ------------------------------------------------------------------------------------------
def test_cpu_list_names_every_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cpu", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("host", "Penryn", "SapphireRapids", "EPYC-Genoa", "x86-64-v4"):
        assert f"\n{name} " in out
    assert main(["cpu", "list", "x86-64-v2"]) == 0
    assert "sse4.2" in capsys.readouterr().out


def test_cpu_capture_of_this_host(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["cpu", "capture"]) == 0
    capture = capture_from_json(json.loads(capsys.readouterr().out), "stdout")
    assert capture.kind == "kvm" and capture.msrs is not None and capture.vendor in ("GenuineIntel", "AuthenticAMD")
    assert {"fpu", "lm", "sse2"} <= capture.features
    out = tmp_path / "host.json"
    assert main(["cpu", "capture", "-o", str(out)]) == 0
    assert load_capture(out).cpuid == capture.cpuid


def test_cpu_baseline_prints_the_closest_model_and_extras(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["cpu", "baseline", *map(path, INTEL_SERVERS)]) == 0
    out = capsys.readouterr().out
    assert "vendor: GenuineIntel" in out and "closest model: Skylake-Server" in out and "extra features:" in out
    assert main(["cpu", "baseline", "--json", "--name", "pool", *map(path, EPYCS)]) == 0
    model_file = tmp_path / "pool.json"
    model_file.write_text(capsys.readouterr().out)
    model = load_model_file(model_file)
    assert model.name == "pool" and model.vendor == "AuthenticAMD"
    assert json.loads(model_file.read_text())["base"] == "EPYC-Rome"
    assert main(["cpu", "compare", str(model_file), path("epyc-rome-7742")]) == 0
    assert main(["cpu", "baseline", path("epyc-rome-7742"), path("penryn-xeon-e5462")]) == 1
    assert "different CPU vendors" in capsys.readouterr().err


def test_cpu_compare_exit_status_and_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cpu", "compare", "EPYC-Rome", path("epyc-milan-7763")]) == 0
    assert capsys.readouterr().out.startswith("superset: ")
    assert main(["cpu", "compare", path("epyc-milan-7763"), path("epyc-milan-7763")]) == 0
    assert capsys.readouterr().out.startswith("identical: ")
    assert main(["cpu", "compare", "--json", "EPYC-Genoa", path("epyc-rome-7742")]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["result"] == "incompatible" and "avx512f" in result["missing"]
    assert main(["cpu", "compare", "Haswell", path("epyc-rome-7742")]) == 1
    assert "GenuineIntel guest, AuthenticAMD host" in capsys.readouterr().out
    assert main(["cpu", "compare", "NoSuchCpu", path("epyc-rome-7742")]) == 1
    assert "unknown CPU model" in capsys.readouterr().err
