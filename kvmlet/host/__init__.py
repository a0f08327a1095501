"""What this host's KVM and hardware offer for virtualization: ``kvmlet host``."""

from kvmlet.host.command import host_main
from kvmlet.host.kvminfo import probe_kvm
from kvmlet.host.model import Backend, CpuFlag, Feature, HostInfo, HostReport, KvmInfo, Status
from kvmlet.host.render import render_json, render_text
from kvmlet.host.report import probe_host
from kvmlet.host.virt import detect_backend

__all__ = [
    "Backend",
    "CpuFlag",
    "Feature",
    "HostInfo",
    "HostReport",
    "KvmInfo",
    "Status",
    "detect_backend",
    "host_main",
    "probe_host",
    "probe_kvm",
    "render_json",
    "render_text",
]
