"""Showing a host report: an aligned plain-text table, or JSON."""

from __future__ import annotations

import json
import textwrap

from kvmlet.host.model import HostReport, KvmInfo

WIDTH = 100
NAME_WIDTH = 20
STATUS_WIDTH = 10
LABEL_WIDTH = 18


def render_json(report: HostReport) -> str:
    return json.dumps(report.to_dict(), indent=2)


def _gib(size: int | None) -> str:
    return f"{size / (1 << 30):.1f} GiB" if size is not None else "?"


def _field(label: str, value: str) -> list[str]:
    """``  label   value``, with a long value wrapped under itself."""
    indent = " " * (2 + LABEL_WIDTH + 1)
    lines = textwrap.wrap(value, WIDTH, initial_indent=f"  {label:<{LABEL_WIDTH}} ",
                          subsequent_indent=indent, break_on_hyphens=False) or [f"  {label}"]
    return lines


def _headline(report: HostReport) -> str:
    module = f" ({report.backend.module})" if report.backend.module else ""
    tdp = next((f for f in report.features if f.name.startswith("TDP (")), None)
    paging = "" if tdp is None else ", TDP" if tdp.status.value == "active" else ", shadow paging"
    kvm = f"KVM API {report.kvm.api_version}" if report.kvm.usable else "KVM unusable"
    return f"kvmlet host: backend {report.backend.value}{module}{paging}, {kvm}"


def _feature_table(report: HostReport) -> list[str]:
    lines = [f"  {'FEATURE':<{NAME_WIDTH}} {'STATUS':<{STATUS_WIDTH}} WHAT IT MEANS FOR GUESTS"]
    for item in report.features:
        lines.append(f"  {item.name:<{NAME_WIDTH}} {item.status.value:<{STATUS_WIDTH}} {item.detail}")
    return lines


def _kvm_section(kvm: KvmInfo) -> list[str]:
    lines = ["KVM"]
    if not kvm.usable:
        return lines + _field("device", kvm.device) + _field("status", f"unusable: {kvm.reason}")
    lines += _field("device", f"{kvm.device} (API {kvm.api_version})")
    lines += _field("vCPUs", f"max {kvm.max_vcpus}, recommended {kvm.recommended_vcpus}")
    lines += _field("memslots", str(kvm.max_memslots) if kvm.max_memslots else "?")
    lines += _field("supported CPUID", f"{kvm.supported_cpuid_entries} entries; feature MSRs: "
                    f"{kvm.feature_msrs}")
    present, absent = kvm.present_capabilities, kvm.absent_capabilities
    lines += _field("capabilities", f"{len(present)} of the {len(kvm.capabilities)} kvmlet knows are present")
    lines += _field("  present", " ".join(present) or "none")
    lines += _field("  absent", " ".join(absent) or "none")
    return lines


def _host_section(report: HostReport) -> list[str]:
    host = report.host
    cpu = host.cpu_model or "?"
    if host.cpu_vendor:
        cpu += f" ({host.cpu_vendor})"
    lines = ["Host"]
    lines += _field("CPU", f"{cpu}, {host.cores or '?'} cores, {host.threads or '?'} threads")
    lines += _field("memory", _gib(host.memory_bytes))
    lines += _field("kernel", host.kernel or "?")
    lines += _field("virtualized", "yes: this host is itself a VM (cpuinfo flag 'hypervisor')"
                    if host.virtualized else "no")
    on_flags = [f.name for f in host.cpu_flags if f.line == "flags"]
    on_vmx = [f.name for f in host.cpu_flags if f.line == "vmx flags"]
    missing = [f.name for f in host.cpu_flags if not f.present]
    lines += _field("CPU flags", " ".join(on_flags) or "none of interest")
    if on_vmx:
        lines += _field("vmx flags", " ".join(on_vmx))
    lines += _field("flags missing", " ".join(missing) or "none")
    return lines


def render_text(report: HostReport) -> str:
    lines = [_headline(report), "", *_feature_table(report), "", *_kvm_section(report.kvm), "",
             *_host_section(report)]
    if report.notes:
        lines += ["", "Notes"]
        for note in report.notes:
            lines += textwrap.wrap(note, WIDTH, initial_indent="  - ", subsequent_indent="    ")
    return "\n".join(lines) + "\n"
