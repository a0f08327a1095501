"""Tests for kvmlet.host: fake /proc + /sys + /dev trees for VMX, SVM and PVM hosts, then this host."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kvmlet.host import (
    Backend,
    HostReport,
    KvmInfo,
    Status,
    detect_backend,
    host_main,
    probe_host,
    probe_kvm,
    render_json,
    render_text,
)
from kvmlet.host.cpu import VirtFamily, parse_cpuinfo
from kvmlet.host.memory import selected
from kvmlet.host.tree import param_enabled, which

A, V, X = Status.ACTIVE, Status.AVAILABLE, Status.ABSENT

INTEL_FLAGS = "fpu vme de pse tsc msr pae vmx x2apic pcid invpcid pdpe1gb constant_tsc tpr_shadow " \
              "flexpriority ept vpid ept_ad"
INTEL_VMX_FLAGS = "vnmi preemption_timer posted_intr invvpid ept_x_only ept_ad ept_1gb flexpriority apicv " \
                  "tsc_offset vtpr mtf vapic ept vpid unrestricted_guest vapic_reg vid ple shadow_vmcs pml"
AMD_FLAGS = "fpu vme de pse tsc msr pae svm x2apic pdpe1gb constant_tsc npt lbrv nrip_save flushbyasid " \
            "decodeassists pausefilter avic vgif"
PVM_FLAGS = "fpu vme de pse tsc msr pae x2apic pcid invpcid hypervisor constant_tsc"

FAKE_KVM = KvmInfo(device="/dev/kvm", usable=True, api_version=12, max_vcpus=1024, recommended_vcpus=8,
                   max_memslots=32764, capabilities={"IRQCHIP": 1, "X86_SMM": 0}, supported_cpuid_entries=70,
                   feature_msrs=4)


class FakeHost:
    """A root directory laid out like /proc, /sys and /dev of a host."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, path: str, text: str = "") -> FakeHost:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n" if text else "")
        return self

    def mkdir(self, path: str) -> FakeHost:
        (self.root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        return self

    def module(self, name: str, **params: str) -> FakeHost:
        self.mkdir(f"/sys/module/{name}/parameters")
        for key, value in params.items():
            self.write(f"/sys/module/{name}/parameters/{key}", value)
        return self

    def cpuinfo(self, vendor: str, model: str, flags: str, vmx_flags: str = "", cpus: int = 2) -> FakeHost:
        blocks = []
        for n in range(cpus):
            lines = [f"processor\t: {n}", f"vendor_id\t: {vendor}", f"model name\t: {model}",
                     "physical id\t: 0", f"siblings\t: {cpus}", f"core id\t\t: {n // 2}",
                     f"cpu cores\t: {max(1, cpus // 2)}", f"flags\t\t: {flags}"]
            if vmx_flags:
                lines.append(f"vmx flags\t: {vmx_flags}")
            blocks.append("\n".join(lines))
        return self.write("/proc/cpuinfo", "\n\n".join(blocks))

    def common(self, kernel: str = "6.8.0-test") -> FakeHost:
        self.write("/proc/meminfo", "MemTotal:       16384000 kB\nMemFree:        1000 kB")
        self.write("/proc/sys/kernel/osrelease", kernel)
        self.write("/sys/kernel/mm/transparent_hugepage/enabled", "always madvise [never]")
        self.write("/sys/kernel/mm/transparent_hugepage/shmem_enabled",
                   "always within_size advise [never] deny force")
        self.write("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages", "0")
        self.write("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "0")
        self.mkdir("/sys/firmware/acpi/tables/dynamic")
        self.write("/sys/firmware/acpi/tables/APIC")
        return self


def vmx_host(root: Path) -> FakeHost:
    """A bare-metal Intel host with everything: EPT, VPID, APICv, VT-d, SR-IOV, TPM, vhost."""
    host = FakeHost(root).common()
    host.cpuinfo("GenuineIntel", "Intel(R) Xeon(R) Gold 6338", INTEL_FLAGS, INTEL_VMX_FLAGS, cpus=4)
    host.module("kvm", tdp_mmu="Y")
    host.module("kvm_intel", ept="Y", vpid="Y", flexpriority="Y", enable_apicv="Y",
                unrestricted_guest="Y", enable_pml="Y")
    host.write("/sys/firmware/acpi/tables/DMAR")
    host.mkdir("/sys/class/iommu/dmar0").mkdir("/sys/class/iommu/dmar1")
    for group in range(12):
        host.mkdir(f"/sys/kernel/iommu_groups/{group}/devices")
    host.write("/dev/vfio/vfio")
    nic = "/sys/bus/pci/devices/0000:3b:00.0"
    host.write(f"{nic}/sriov_totalvfs", "64").write(f"{nic}/sriov_numvfs", "0").mkdir(f"{nic}/net/ens1f0")
    host.mkdir("/sys/bus/drivers/ice")
    os.symlink("../../../bus/drivers/ice", host.root / nic.lstrip("/") / "driver")
    host.write("/sys/bus/pci/devices/0000:00:1f.0/vendor", "0x8086")
    host.write("/dev/tpm0").write("/dev/tpmrm0").write("/sys/class/tpm/tpm0/tpm_version_major", "2")
    host.write("/dev/vhost-net").write("/dev/vhost-vsock").write("/dev/net/tun")
    host.write("/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk")
    host.write("/sys/kernel/mm/transparent_hugepage/enabled", "[always] madvise never")
    host.write("/sys/kernel/mm/transparent_hugepage/shmem_enabled",
               "always within_size [advise] never deny force")
    host.write("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages", "512")
    host.write("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "500")
    return host


def svm_host(root: Path) -> FakeHost:
    """An AMD host: NPT on, AVIC supported but off (kvm_amd's default), IOMMU firmware table only."""
    host = FakeHost(root).common()
    host.cpuinfo("AuthenticAMD", "AMD EPYC 7763 64-Core Processor", AMD_FLAGS, cpus=8)
    host.module("kvm", tdp_mmu="Y")
    host.module("kvm_amd", npt="1", avic="0", nested="1")
    host.write("/sys/firmware/acpi/tables/IVRS")
    host.write("/dev/net/tun")
    return host


def pvm_host(root: Path) -> FakeHost:
    """A VM running KVM through PVM, like the development hosts: no VT-x, no IOMMU, no TPM, no vhost."""
    host = FakeHost(root).common(kernel="6.18.44-fc")
    host.cpuinfo("AuthenticAMD", "AMD EPYC", PVM_FLAGS)
    host.module("kvm", tdp_mmu="N")
    host.module("kvm_pvm", pvm_native="Y")
    host.write("/dev/net/tun")
    host.write("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", "2097152")
    host.write("/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled",
               "always [inherit] within_size advise never")
    return host


def statuses(report: HostReport) -> dict[str, Status]:
    return {item.name: item.status for item in report.features}


# -- classification -------------------------------------------------------------------------------------
def test_vmx_host(tmp_path: Path) -> None:
    report = probe_host(vmx_host(tmp_path).root, kvm=FAKE_KVM)
    s = statuses(report)
    assert report.backend is Backend.VMX
    assert s["VT-x/AMD-V"] is A and s["PVM"] is X
    assert s["TDP (EPT/NPT)"] is A and "EPT" in report.feature("TDP (EPT/NPT)").detail
    assert s["TDP MMU"] is A
    for name in ("VPID", "FlexPriority", "APICv/AVIC", "Unrestricted guest", "PML"):
        assert s[name] is A, name
    assert "APICv" in report.feature("APICv/AVIC").detail
    assert s["IOMMU (VT-d/AMD-Vi)"] is A
    assert "dmar0, dmar1; 12 groups" in report.feature("IOMMU (VT-d/AMD-Vi)").detail
    assert s["VFIO"] is V
    assert s["SR-IOV"] is V
    assert "ens1f0 (0000:3b:00.0, 0/64 VFs)" in report.feature("SR-IOV").detail
    assert s["TPM"] is A and "TPM 2.0 at /dev/tpmrm0" in report.feature("TPM").detail
    assert s["vhost-net"] is V and s["vhost-vsock"] is V and s["TAP"] is V
    assert s["vhost-user switch"] is V and "Open vSwitch with DPDK" in report.feature("vhost-user switch").detail
    assert s["THP (anonymous)"] is A and s["THP (shmem/memfd)"] is V
    assert s["Hugetlb pages"] is V and "500/512 x 2 MiB free" in report.feature("Hugetlb pages").detail
    assert report.host.cpu_model == "Intel(R) Xeon(R) Gold 6338"
    assert report.host.threads == 4 and report.host.cores == 2
    assert report.host.memory_bytes == 16384000 * 1024
    assert report.host.kernel == "6.8.0-test"
    assert not report.host.virtualized
    lines = {f.name: f.line for f in report.host.cpu_flags}
    assert lines["ept"] == "flags" and lines["pml"] == "vmx flags" and lines["vmx"] == "flags"
    assert "svm" not in lines and lines["hypervisor"] is None
    assert not any(note.startswith("PVM") for note in report.notes)
    text = render_text(report)
    assert "backend VMX (kvm_intel), TDP, KVM API 12" in text
    assert "  vmx flags          vnmi ept_1gb unrestricted_guest" in text


def test_vmx_host_with_ept_and_vpid_switched_off(tmp_path: Path) -> None:
    host = vmx_host(tmp_path)
    host.module("kvm_intel", ept="N", vpid="N", enable_pml="N")
    report = probe_host(host.root, kvm=FAKE_KVM)
    s = statuses(report)
    assert s["TDP (EPT/NPT)"] is V and "ept=N" in report.feature("TDP (EPT/NPT)").detail
    assert "shadow paging" in report.feature("TDP (EPT/NPT)").detail
    assert s["TDP MMU"] is X
    assert s["VPID"] is V and "vpid=N" in report.feature("VPID").detail
    assert s["PML"] is V
    assert any(note.startswith("Shadow paging") for note in report.notes)


def test_vmx_cpu_without_module(tmp_path: Path) -> None:
    host = FakeHost(tmp_path).common()
    host.cpuinfo("GenuineIntel", "Intel(R) Core(TM) i7", INTEL_FLAGS, INTEL_VMX_FLAGS)
    report = probe_host(host.root, kvm=KvmInfo(device="/dev/kvm", usable=False, reason="no /dev/kvm",
                                               present=False))
    s = statuses(report)
    assert report.backend is Backend.NONE
    assert s["VT-x/AMD-V"] is V and "modprobe kvm_intel" in report.feature("VT-x/AMD-V").detail
    assert s["TDP (EPT/NPT)"] is V
    assert s["VPID"] is V and "kvm_intel not loaded" in report.feature("VPID").detail
    assert s["KVM"] is X


def test_svm_host(tmp_path: Path) -> None:
    report = probe_host(svm_host(tmp_path).root, kvm=FAKE_KVM)
    s = statuses(report)
    assert report.backend is Backend.SVM
    assert s["VT-x/AMD-V"] is A and "kvm_amd" in report.feature("VT-x/AMD-V").detail
    assert s["TDP (EPT/NPT)"] is A and "NPT" in report.feature("TDP (EPT/NPT)").detail
    assert s["TDP MMU"] is A
    assert s["VPID"] is A and "ASID" in report.feature("VPID").detail
    assert s["APICv/AVIC"] is V and "kvm_amd avic=0" in report.feature("APICv/AVIC").detail
    assert s["Unrestricted guest"] is A
    assert s["PML"] is X
    assert s["IOMMU (VT-d/AMD-Vi)"] is V and "amd_iommu=on" in report.feature("IOMMU (VT-d/AMD-Vi)").detail
    assert s["VFIO"] is X and s["SR-IOV"] is X and s["TPM"] is X
    assert s["vhost-net"] is X and s["TAP"] is V
    assert s["THP (anonymous)"] is X and s["THP (shmem/memfd)"] is X and s["Hugetlb pages"] is X
    assert report.host.threads == 8
    names = {f.name for f in report.host.cpu_flags}
    assert "npt" in names and "ept" not in names


def test_pvm_host(tmp_path: Path) -> None:
    report = probe_host(pvm_host(tmp_path).root, kvm=FAKE_KVM)
    s = statuses(report)
    assert report.backend is Backend.PVM
    assert s["PVM"] is A and "PVM-aware kernel" in report.feature("PVM").detail
    assert s["VT-x/AMD-V"] is X
    tdp = report.feature("TDP (EPT/NPT)")
    assert tdp.status is X and tdp.detail.startswith("shadow paging")
    assert s["TDP MMU"] is X
    for name in ("VPID", "FlexPriority", "APICv/AVIC", "Unrestricted guest", "PML"):
        assert s[name] is X, name
        assert "not loaded" in report.feature(name).detail
    assert s["IOMMU (VT-d/AMD-Vi)"] is X and s["VFIO"] is X and s["TPM"] is X
    assert s["vhost-net"] is X and s["vhost-vsock"] is X and s["TAP"] is V
    assert s["vhost-user switch"] is X   # the fake root has neither Open vSwitch with DPDK nor testpmd
    assert s["THP (shmem/memfd)"] is X  # the 2 MiB per-size setting inherits "never"
    assert report.host.virtualized
    notes = " ".join(report.notes)
    assert "emulator" in notes and "KVM_SET_CPUID2" in notes and "PVM-aware" in notes


def test_hardware_module_wins_over_pvm(tmp_path: Path) -> None:
    host = vmx_host(tmp_path).module("kvm_pvm")
    report = probe_host(host.root, kvm=FAKE_KVM)
    assert report.backend is Backend.VMX
    assert report.feature("PVM").status is V


def test_builtin_kvm_intel_without_vmx_is_not_vmx(tmp_path: Path) -> None:
    host = FakeHost(tmp_path).common()
    host.cpuinfo("GenuineIntel", "Intel(R) Xeon(R)", PVM_FLAGS)
    host.module("kvm_intel", ept="N").module("kvm_pvm")
    assert detect_backend(host.root) is Backend.PVM


def test_empty_root_still_reports(tmp_path: Path) -> None:
    report = probe_host(tmp_path)
    assert report.backend is Backend.NONE
    assert not report.kvm.usable and report.kvm.reason and "does not exist" in report.kvm.reason
    assert report.feature("KVM").status is X
    assert all(item.status is not A for item in report.features)
    text = render_text(report)
    assert "KVM unusable" in text and "does not exist" in text
    json.loads(render_json(report))


# -- pieces -----------------------------------------------------------------------------------------------
def test_param_enabled() -> None:
    assert param_enabled("Y") is True and param_enabled("N") is False
    assert param_enabled("1") is True and param_enabled("0") is False and param_enabled("-1") is True
    assert param_enabled(None) is None and param_enabled("maybe") is None


def test_selected() -> None:
    assert selected("always [madvise] never") == "madvise"
    assert selected("never") == "never"
    assert selected(None) is None


def test_parse_cpuinfo_families() -> None:
    intel = parse_cpuinfo("processor : 0\nvendor_id : GenuineIntel\nflags : fpu\nvmx flags : ept vpid\n")
    assert intel.family is VirtFamily.VMX and intel.line_of("ept") == "vmx flags" and intel.has("vpid")
    amd = parse_cpuinfo("processor : 0\nvendor_id : AuthenticAMD\nflags : fpu svm npt\n")
    assert amd.family is VirtFamily.SVM and amd.line_of("npt") == "flags"
    assert parse_cpuinfo("").family is VirtFamily.UNKNOWN


def test_which_under_root(tmp_path: Path) -> None:
    assert which(tmp_path, "swtpm") is None
    binary = tmp_path / "usr/bin/swtpm"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert which(tmp_path, "swtpm") == "/usr/bin/swtpm"
    report = probe_host(pvm_host(tmp_path).root, kvm=FAKE_KVM)
    assert report.feature("vTPM (swtpm)").status is V


def test_probe_kvm_on_missing_and_non_kvm_device(tmp_path: Path) -> None:
    missing = probe_kvm(str(tmp_path / "kvm"))
    assert not missing.usable and missing.reason and "does not exist" in missing.reason
    (tmp_path / "kvm").write_text("")
    not_kvm = probe_kvm(str(tmp_path / "kvm"))
    assert not not_kvm.usable and not_kvm.reason and "not a KVM device" in not_kvm.reason


# -- rendering --------------------------------------------------------------------------------------------
def test_json_schema(tmp_path: Path) -> None:
    report = probe_host(vmx_host(tmp_path).root, kvm=FAKE_KVM)
    data = json.loads(render_json(report))
    assert set(data) == {"schema", "backend", "features", "kvm", "host", "notes"}
    assert data["backend"] == "VMX"
    assert all(set(item) == {"name", "status", "detail"} for item in data["features"])
    assert {item["status"] for item in data["features"]} <= {"active", "available", "absent"}
    assert data["kvm"]["capabilities"] == {"IRQCHIP": 1, "X86_SMM": 0}
    assert data["kvm"]["usable"] is True and data["kvm"]["max_vcpus"] == 1024
    assert set(data["host"]) >= {"cpu_model", "cores", "threads", "memory_bytes", "kernel", "cpu_flags"}


def test_text_table_is_aligned(tmp_path: Path) -> None:
    report = probe_host(pvm_host(tmp_path).root, kvm=FAKE_KVM)
    text = render_text(report)
    assert text.startswith("kvmlet host: backend PVM (kvm_pvm), shadow paging, KVM API 12")
    rows = [line for line in text.splitlines() if line.startswith("  TDP (EPT/NPT)")]
    assert rows and rows[0].split()[2] == "absent"
    status_columns = {line.index(item.status.value, 22) for item in report.features
                      for line in text.splitlines() if line.startswith(f"  {item.name} ")}
    assert status_columns == {23}
    assert "present          IRQCHIP" in text and "absent           X86_SMM" in text


# -- this host ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.isdir("/sys/module/kvm_pvm"), reason="not a PVM host like the dev/CI hosts")
def test_this_host_is_what_platform_md_says() -> None:
    report = probe_host()
    assert report.backend is Backend.PVM
    assert report.feature("TDP (EPT/NPT)").status is X
    assert report.feature("TDP (EPT/NPT)").detail.startswith("shadow paging")
    assert report.feature("IOMMU (VT-d/AMD-Vi)").status is X
    assert report.feature("VFIO").status is X
    assert report.feature("TPM").status is X
    assert report.feature("TAP").status is V
    if report.kvm.usable:
        assert report.kvm.api_version == 12
        assert report.kvm.capabilities["IRQFD"] > 0 and report.kvm.capabilities["IOEVENTFD"] > 0


def test_host_main_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = host_main(json_output=True)
    data = json.loads(capsys.readouterr().out)
    assert code == (0 if data["kvm"]["usable"] else 1)
    assert data["backend"] in {"VMX", "SVM", "PVM", "none"}


def test_host_main_text(capsys: pytest.CaptureFixture[str]) -> None:
    host_main(json_output=False)
    out = capsys.readouterr().out
    assert out.startswith("kvmlet host: backend ")
    assert "FEATURE" in out and "Host" in out
