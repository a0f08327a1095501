"""Putting the host report together: ``probe_host``."""

from __future__ import annotations

from kvmlet.host.cpu import probe_host_info, read_cpuinfo
from kvmlet.host.devices import io_features
from kvmlet.host.kvminfo import kvm_feature, probe_kvm
from kvmlet.host.memory import memory_features
from kvmlet.host.model import HostReport, KvmInfo
from kvmlet.host.tree import Root, host_path
from kvmlet.host.virt import read_virt_state, virt_features, virt_notes


def probe_host(root: Root = "/", kvm: KvmInfo | None = None) -> HostReport:
    """Everything this host offers for virtualization.

    ``root`` is where /proc, /sys and /dev are looked up (a fake tree in tests); ``kvm`` is what /dev/kvm
    said, probed from ``<root>/dev/kvm`` when not given. Never raises for missing files or a missing KVM.
    """
    cpu = read_cpuinfo(root)
    state = read_virt_state(cpu, root)
    kvm_info = kvm if kvm is not None else probe_kvm(str(host_path(root, "/dev/kvm")))
    features = [kvm_feature(kvm_info, state.backend), *virt_features(state), *io_features(root),
                *memory_features(root)]
    notes = virt_notes(state)
    if not kvm_info.usable and kvm_info.reason:
        notes.insert(0, f"KVM is not usable: {kvm_info.reason}")
    return HostReport(
        backend=state.backend,
        features=tuple(features),
        kvm=kvm_info,
        host=probe_host_info(cpu, root),
        notes=tuple(notes),
    )
