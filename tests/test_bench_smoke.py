"""The benchmark harness cannot rot: every benchmark runs once at tiny sizes (python -m bench --tiny).

Nothing here asserts a time. kvmlet's half always runs; QEMU's half runs when qemu-system-x86_64 is
installed and is skipped, with the reason, when it is not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import tools
from bench.cli import main as bench_main
from bench.registry import BENCHMARKS

REPO = Path(__file__).resolve().parent.parent


def _run_bench(tmp_path: Path, *options: str) -> dict[str, Any]:
    out = tmp_path / "results.json"
    code = bench_main(["--tiny", "--quiet", "--json", str(out), *options])
    data: dict[str, Any] = json.loads(out.read_text())
    assert code == 0, data["errors"]
    return data


def _by_name(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {result["name"]: result for result in data["results"]}


def _net_possible() -> bool:
    """What the net benchmark needs: root for TAP devices and namespaces, and iproute2."""
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun") and shutil.which("ip") is not None


def _no_switch() -> bool:
    """No vhost-user switch on this host: neither Open vSwitch with DPDK nor DPDK's testpmd."""
    from kvmlet.net import ovs, switch

    return ovs.ovs_problem() is not None and switch.testpmd_path() is None


def test_every_benchmark_runs_on_kvmlet(guest_elf: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    data = _run_bench(tmp_path, "--no-qemu")
    results = _by_name(data)
    assert set(results) == set(BENCHMARKS)
    for name, result in results.items():
        if name == "net" and not result["rows"]:   # not root, or no TAP devices: skipped, with the reason
            assert result["skipped"] and not _net_possible(), result
            continue
        if name == "tpm" and not result["rows"]:   # no swtpm on this host: skipped, with the reason
            assert result["skipped"] and shutil.which("swtpm") is None, result
            continue
        if name == "migration" and not result["rows"]:   # not root (namespaces): skipped, with the reason
            assert result["skipped"] and os.geteuid() != 0, result
            continue
        if name == "vhost-user" and not result["rows"]:   # not root, or no switch (OVS-DPDK or testpmd) here
            assert result["skipped"] and (not _net_possible() or _no_switch()), result
            continue
        assert result["rows"], name
        for row in result["rows"]:
            assert row["kvmlet"]["values"], (name, row["metric"])
            assert all(value >= 0 for value in row["kvmlet"]["values"]), (name, row["metric"])
    cold = {row["metric"]: row for row in results["cold-start"]["rows"]}
    assert cold["first guest byte, kvmlet 64-bit entry"]["kvmlet"]["median"] > 0
    assert any(metric.strip().startswith("step: interpreter start") for metric in cold)
    blk = {row["metric"]: row for row in results["blk"]["rows"]}
    for depth in (1, 8):
        assert blk[f"4 KiB random read, depth {depth}"]["kvmlet"]["median"] > 0
        assert blk[f"sequential read, 64 KiB requests, depth {depth}"]["unit"] == "MiB/s"
    api = {row["metric"].strip(): row for row in results["api"]["rows"]}
    assert api["InstanceStart request to the first guest byte"]["kvmlet"]["median"] > 0
    assert api["GET / round trip, server up, no VM"]["unit"] == "us"
    if _net_possible():
        net = results["net"]["rows"]
        assert net[0]["unit"] == "frames/s" and net[0]["kvmlet"]["median"] > 0
        assert any(row["unit"] == "%" for row in net)   # the loss between guest and receiver
    printed = capsys.readouterr().out
    assert "A/B (pairs)" in printed and "first guest byte" in printed and f"results: {tmp_path}" in printed


def test_every_benchmark_runs_against_qemu(guest_elf: Path, tmp_path: Path) -> None:
    if shutil.which(tools.QEMU_BINARY) is None:
        pytest.skip(f"{tools.QEMU_BINARY} not found: the QEMU half of the benchmarks is not checked "
                    "(apt-get install qemu-system-x86)")
    results = _by_name(_run_bench(tmp_path))
    for name in ("cold-start", "api", "exits", "memory", "density", "blk", *(("net",) if _net_possible() else ())):
        compared = [row for row in results[name]["rows"] if row["baseline"] is not None and row["unit"] != "%"]
        assert compared, name
        for row in compared:
            assert row["baseline"]["side"] == "qemu" and row["baseline"]["values"], (name, row["metric"])
            assert row["ratio_median"] is not None and row["ratio_median"] > 0, (name, row["metric"])


def test_missing_qemu_is_named_with_how_to_get_it(guest_elf: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == tools.QEMU_BINARY else real_which(name))
    data = _run_bench(tmp_path, "memory")
    assert any("qemu-system-x86_64 not found" in message and "apt-get install qemu-system-x86" in message
               for message in data["missing"])
    assert "apt-get install qemu-system-x86" in capsys.readouterr().err
    result = _by_name(data)["memory"]
    assert result["skipped"] and all(row["baseline"] is None for row in result["rows"])


def test_results_file_renders_again_and_plots(tmp_path: Path, guest_elf: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    data = _run_bench(tmp_path, "--no-qemu", "cold-start")
    capsys.readouterr()
    assert bench_main(["--from-json", str(tmp_path / "results.json"), "--markdown"]) == 0
    printed = capsys.readouterr().out
    assert "| cold-start | first guest byte, kvmlet 64-bit entry |" in printed
    assert data["results"][0]["name"] == "cold-start"
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (pip install -e '.[bench]')")
    plots = tmp_path / "plots"
    assert bench_main(["--from-json", str(tmp_path / "results.json"), "--plot", "--plot-dir", str(plots)]) == 0
    assert (plots / "cold-start.png").stat().st_size > 0


def test_kvmlet_bench_and_python_m_bench_from_the_repo_root() -> None:
    for command in ([sys.executable, "-m", "bench", "--list"], [sys.executable, "-m", "kvmlet", "bench", "--list"]):
        listed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert all(name in listed.stdout for name in BENCHMARKS)


def test_snapshot_benchmark_restores_and_compares(guest_elf: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The snapshot benchmark at its tiny size (one 32 MiB guest, 4 MiB written, one round): kvmlet's
    create and both restores, QEMU's save and -incoming when QEMU is installed, the files' sizes, the verdict."""
    have_qemu = shutil.which(tools.QEMU_BINARY) is not None
    data = _run_bench(tmp_path, "snapshot", *(() if have_qemu else ("--no-qemu",)))
    assert data["sizes"]["snapshot"]["guest_mib"] == [32]
    result = _by_name(data)["snapshot"]
    rows = {row["metric"].strip(): row for row in result["rows"]}
    create = rows["32 MiB: create (paused VM to files written)"]
    restore = rows["32 MiB: restore, resume_vm, mem_copy none (QEMU: migrate-incoming to cont)"]
    assert create["kvmlet"]["median"] > 0 and restore["kvmlet"]["median"] > 0
    assert restore["target"] == "<=5 ms"
    allocated = rows["snapshot files, allocated on disk"]["kvmlet"]["median"]
    apparent = rows["snapshot files, apparent size"]["kvmlet"]["median"]
    assert 4 <= allocated < apparent          # the memory file is sparse: what the guest wrote, not 32 MiB
    first_pass = rows["32 MiB: first 4 MiB pass after restore, mem_copy none vs background"]
    assert first_pass["baseline"]["side"] == "kvmlet-bg" and first_pass["ratio_median"] > 0
    assert "serves the restored guest better" in first_pass["note"]
    assert rows["guest RAM resident after the passes, none vs background"]["baseline"]["median"] >= 4
    if have_qemu:
        for row in (create, restore, rows["restore request to the guest's first answer (echo)"]):
            assert row["baseline"]["side"] == "qemu" and row["ratio_median"] > 0, row["metric"]
    else:
        assert result["skipped"]
    assert "serves the restored guest better" in capsys.readouterr().out


def test_migration_benchmark_migrates_and_compares(guest_elf: Path, tmp_path: Path) -> None:
    """The migration benchmark at its tiny size (a 64 MiB guest, idle and dirtying 5,000 pages/s, one round):
    both VMMs migrate over the veth pair; kvmlet's report figures and QEMU's query-migrate ones land in rows."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("the migration benchmark needs root and iproute2 (two network namespaces)")
    have_qemu = shutil.which(tools.QEMU_BINARY) is not None
    data = _run_bench(tmp_path, "migration", *(() if have_qemu else ("--no-qemu",)))
    assert data["sizes"]["migration"]["guest_mib"] == 64
    result = _by_name(data)["migration"]
    rows = {row["metric"].strip(): row for row in result["rows"]}
    total = rows["64 MiB idle: total time (the VMM's figure)"]
    assert total["kvmlet"]["median"] > 0 and total["target"] == "<=1x"
    downtime = [row for row in result["rows"] if row["metric"].strip() == "downtime"]
    assert len(downtime) == 2 and downtime[1]["target"] == "<=50 ms"
    assert all(row["kvmlet"]["median"] > 0 for row in downtime)
    runs = result["details"]["runs"]["5000"]["kvmlet"]
    assert runs[0]["rounds"] >= 2 and runs[0]["megabytes"] > 16     # the 16 MiB area went over
    if have_qemu:
        assert total["baseline"]["side"] == "qemu" and total["ratio_median"] > 0
    else:
        assert result["skipped"]



def test_tpm_benchmark_measures_the_vtpm_beside_qemu(guest_elf: Path, tmp_path: Path) -> None:
    """The vTPM benchmark at its tiny size: kvmlet with and without a vTPM, provisioned at launch, with an
    initrd; QEMU with swtpm and tpm-tis when QEMU is installed."""
    if shutil.which("swtpm") is None:
        pytest.skip("swtpm is not installed on this host (apt-get install swtpm swtpm-tools)")
    have_qemu = shutil.which(tools.QEMU_BINARY) is not None
    result = _by_name(_run_bench(tmp_path, "tpm", *(() if have_qemu else ("--no-qemu",))))["tpm"]
    rows = {row["metric"].strip(): row for row in result["rows"]}
    for metric in ("start to guest exit, no vTPM", "start to guest exit, vTPM (provisioned state)",
                   "start to guest exit, vTPM provisioned at launch (EK + certificate)",
                   "SHA-256 + SHA-384 of an image, in-process"):
        assert rows[metric]["kvmlet"]["median"] > 0, metric
    assert any(metric.endswith("MiB initrd") for metric in rows)
    assert "start-up cost" in rows["start to guest exit, vTPM (provisioned state)"]["note"]
    if have_qemu:
        tpm_row = rows["start to guest exit, vTPM (provisioned state)"]
        assert tpm_row["baseline"]["side"] == "qemu-tpm" and tpm_row["ratio_median"] > 0
    assert not list(tmp_path.rglob("*.sock")), "the QEMU half's swtpm socket is left behind"


def test_vtd_benchmark_translates_counts_and_compares(guest_elf: Path, tmp_path: Path) -> None:
    """The VT-d benchmark at its tiny size: virtio-mmio, virtio-pci, and virtio-pci behind the VT-d unit with
    translation off and on (IOTLB hits and misses from the unit's counters); QEMU q35 with intel-iommu when
    QEMU is installed."""
    have_qemu = shutil.which(tools.QEMU_BINARY) is not None
    result = _by_name(_run_bench(tmp_path, "vtd", *(() if have_qemu else ("--no-qemu",))))["vtd"]
    rows = {row["metric"].strip(): row for row in result["rows"]}
    on = rows["4 KiB random read, depth 1: virtio-pci, VT-d translation on (vs kvmlet virtio-pci)"]
    assert on["kvmlet"]["median"] > 0 and on["baseline"]["side"] == "kvmlet-pci" and on["ratio_median"] > 0
    assert rows["sequential read, 64 KiB requests: virtio-mmio, kvmlet's default (reference)"]["unit"] == "MiB/s"
    hits = rows["VT-d iotlb hits per run (both loops)"]["kvmlet"]["median"]
    window_hits = rows["VT-d window hits per run (both loops)"]["kvmlet"]["median"]
    misses = rows["VT-d iotlb misses per run (both loops)"]["kvmlet"]["median"]
    assert hits + window_hits > misses > 0
    if have_qemu:
        qemu = rows["4 KiB random read, depth 1: virtio-pci, VT-d translation on"]
        assert qemu["baseline"]["side"] == "qemu-vtd" and qemu["ratio_median"] > 0
    else:
        assert result["skipped"]
