"""The host's CPU, memory and kernel, from /proc."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvmlet.host.model import CpuFlag, HostInfo
from kvmlet.host.tree import Root, read_line, read_text


class VirtFamily(enum.Enum):
    """Which hardware virtualization a CPU's vendor implements."""

    VMX = "vmx"
    SVM = "svm"
    UNKNOWN = "unknown"


VMX_VENDORS = ("GenuineIntel", "CentaurHauls", "  Shanghai  ")
SVM_VENDORS = ("AuthenticAMD", "HygonGenuine")

# Flags worth showing, in order. On Intel, kernels since 5.8 list VMX features on their own
# "vmx flags" line; a few (tpr_shadow, flexpriority, ept, vpid, ept_ad) also stay on "flags".
COMMON_FLAGS = ("hypervisor", "x2apic", "pcid", "invpcid", "pdpe1gb", "constant_tsc", "nonstop_tsc",
                "tsc_deadline_timer", "xsave")
VMX_FLAGS = ("vmx", "ept", "vpid", "flexpriority", "tpr_shadow", "vnmi", "ept_ad", "ept_1gb",
             "unrestricted_guest", "apicv", "posted_intr", "pml", "shadow_vmcs", "ple")
SVM_FLAGS = ("svm", "npt", "avic", "x2avic", "vnmi", "nrip_save", "decodeassists", "flushbyasid",
             "vmcb_clean", "pausefilter", "vgif", "v_vmsave_vmload", "tsc_scale")


@dataclass(frozen=True)
class CpuInfo:
    """The parts of /proc/cpuinfo a host report needs (first processor's entry, counts over all)."""

    vendor: str | None
    model_name: str | None
    flags: frozenset[str]
    vmx_flags: frozenset[str]
    threads: int | None
    cores: int | None

    def has(self, flag: str) -> bool:
        return flag in self.flags or flag in self.vmx_flags

    def line_of(self, flag: str) -> str | None:
        """Which /proc/cpuinfo line carries ``flag``: "flags", "vmx flags" or None."""
        if flag in self.flags:
            return "flags"
        if flag in self.vmx_flags:
            return "vmx flags"
        return None

    @property
    def family(self) -> VirtFamily:
        if self.has("vmx") or self.vendor in VMX_VENDORS:
            return VirtFamily.VMX
        if self.has("svm") or self.vendor in SVM_VENDORS:
            return VirtFamily.SVM
        return VirtFamily.UNKNOWN

    def flags_of_interest(self) -> tuple[CpuFlag, ...]:
        names: list[str] = []
        if self.family is not VirtFamily.SVM:
            names += VMX_FLAGS
        if self.family is not VirtFamily.VMX:
            names += SVM_FLAGS
        names += COMMON_FLAGS
        unique = dict.fromkeys(names)
        return tuple(CpuFlag(name, self.line_of(name)) for name in unique)


def parse_cpuinfo(text: str) -> CpuInfo:
    """Parse /proc/cpuinfo (x86 layout: ``key<tabs>: value`` lines, a blank line between processors)."""
    first: dict[str, str] = {}
    threads = 0
    core_ids: set[tuple[str, str]] = set()
    physical = core = ""
    for raw in text.splitlines():
        key, sep, value = raw.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "processor":
            threads += 1
        elif key == "physical id":
            physical = value
        elif key == "core id":
            core = value
            core_ids.add((physical, core))
        if threads <= 1:
            first.setdefault(key, value)
    cores: int | None = len(core_ids) or None
    if cores is None and first.get("cpu cores", "").isdigit():
        cores = int(first["cpu cores"])
    return CpuInfo(
        vendor=first.get("vendor_id"),
        model_name=first.get("model name"),
        flags=frozenset(first.get("flags", "").split()),
        vmx_flags=frozenset(first.get("vmx flags", "").split()),
        threads=threads or None,
        cores=cores if cores is not None else (threads or None),
    )


def read_cpuinfo(root: Root = "/") -> CpuInfo:
    return parse_cpuinfo(read_text(root, "/proc/cpuinfo") or "")


def memory_total(root: Root = "/") -> int | None:
    """MemTotal from /proc/meminfo, in bytes."""
    for line in (read_text(root, "/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    return None


def kernel_release(root: Root = "/") -> str | None:
    return read_line(root, "/proc/sys/kernel/osrelease")


def probe_host_info(cpu: CpuInfo, root: Root = "/") -> HostInfo:
    return HostInfo(
        cpu_model=cpu.model_name,
        cpu_vendor=cpu.vendor,
        cores=cpu.cores,
        threads=cpu.threads,
        memory_bytes=memory_total(root),
        kernel=kernel_release(root),
        virtualized=cpu.has("hypervisor"),
        cpu_flags=cpu.flags_of_interest(),
    )
