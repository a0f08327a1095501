"""What /dev/kvm reports: API version, vCPU and memslot limits, the capabilities kvmlet knows."""

from __future__ import annotations

import os

from kvmlet.host.model import Backend, Feature, KvmInfo, Status
from kvmlet.kvm import Cap, Kvm, KvmError, KvmUnavailableError
from kvmlet.kvm.system import DEFAULT_DEVICE


def probe_kvm(device: str = DEFAULT_DEVICE) -> KvmInfo:
    """Open ``device`` and read what it offers; never raises for an unusable KVM (``usable`` says so)."""
    try:
        kvm = Kvm(device)
    except KvmUnavailableError as exc:
        return KvmInfo(device=device, usable=False, reason=str(exc), present=os.path.exists(device))
    with kvm:
        try:
            cpuid_entries: int | None = len(kvm.supported_cpuid())
        except KvmError:
            cpuid_entries = None
        try:
            feature_msrs: int | None = len(kvm.msr_feature_index_list())
        except KvmError:
            feature_msrs = None
        return KvmInfo(
            device=device,
            usable=True,
            api_version=kvm.api_version,
            max_vcpus=kvm.max_vcpus,
            recommended_vcpus=kvm.recommended_vcpus,
            max_memslots=kvm.check_extension(Cap.NR_MEMSLOTS) or None,
            capabilities=kvm.capabilities(),
            supported_cpuid_entries=cpuid_entries,
            feature_msrs=feature_msrs,
        )


def kvm_feature(info: KvmInfo, backend: Backend) -> Feature:
    if info.usable:
        module = f" ({backend.module})" if backend.module else ""
        caps = f"{len(info.present_capabilities)}/{len(info.capabilities)} known capabilities"
        return Feature("KVM", Status.ACTIVE, f"{info.device}{module}, API {info.api_version}, "
                       f"up to {info.max_vcpus} vCPUs, {caps}")
    status = Status.AVAILABLE if info.present else Status.ABSENT
    return Feature("KVM", status, info.reason or "unusable")
