"""What the host report holds: statuses, features, the KVM section and the host section."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Status(enum.Enum):
    """How a feature stands on this host.

    ACTIVE: in effect now for every guest (or usable and switched on).
    AVAILABLE: the host has it, but it takes a setting, a module or a per-VM choice to use.
    ABSENT: not on this host; the detail says why and what guests lose.
    """

    ACTIVE = "active"
    AVAILABLE = "available"
    ABSENT = "absent"


class Backend(enum.Enum):
    """Which KVM back end serves /dev/kvm."""

    VMX = "VMX"
    SVM = "SVM"
    PVM = "PVM"
    NONE = "none"

    @property
    def module(self) -> str | None:
        return {"VMX": "kvm_intel", "SVM": "kvm_amd", "PVM": "kvm_pvm"}.get(self.value)


@dataclass(frozen=True)
class Feature:
    """One line of the report: a name, its status and what it means for guests."""

    name: str
    status: Status
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status.value, "detail": self.detail}


@dataclass(frozen=True)
class CpuFlag:
    """A CPU flag of interest and the /proc/cpuinfo line it was found on ("flags" or "vmx flags")."""

    name: str
    line: str | None

    @property
    def present(self) -> bool:
        return self.line is not None


@dataclass(frozen=True)
class KvmInfo:
    """What /dev/kvm says about itself, or why it cannot be used."""

    device: str
    usable: bool
    reason: str | None = None
    present: bool = True  # the device node exists (an unusable KVM may still be there: permissions)
    api_version: int | None = None
    max_vcpus: int | None = None
    recommended_vcpus: int | None = None
    max_memslots: int | None = None
    capabilities: dict[str, int] = field(default_factory=dict)
    supported_cpuid_entries: int | None = None
    feature_msrs: int | None = None

    @property
    def present_capabilities(self) -> list[str]:
        return [name for name, value in self.capabilities.items() if value > 0]

    @property
    def absent_capabilities(self) -> list[str]:
        return [name for name, value in self.capabilities.items() if value <= 0]

    def to_dict(self) -> dict[str, object]:
        return {
            "device": self.device,
            "usable": self.usable,
            "reason": self.reason,
            "present": self.present,
            "api_version": self.api_version,
            "max_vcpus": self.max_vcpus,
            "recommended_vcpus": self.recommended_vcpus,
            "max_memslots": self.max_memslots,
            "capabilities": dict(self.capabilities),
            "supported_cpuid_entries": self.supported_cpuid_entries,
            "feature_msrs": self.feature_msrs,
        }


@dataclass(frozen=True)
class HostInfo:
    """The machine: CPU, memory, kernel."""

    cpu_model: str | None
    cpu_vendor: str | None
    cores: int | None
    threads: int | None
    memory_bytes: int | None
    kernel: str | None
    virtualized: bool
    cpu_flags: tuple[CpuFlag, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "cpu_model": self.cpu_model,
            "cpu_vendor": self.cpu_vendor,
            "cores": self.cores,
            "threads": self.threads,
            "memory_bytes": self.memory_bytes,
            "kernel": self.kernel,
            "virtualized": self.virtualized,
            "cpu_flags": [{"name": f.name, "present": f.present, "line": f.line} for f in self.cpu_flags],
        }


SCHEMA_VERSION = 1


@dataclass(frozen=True)
class HostReport:
    """Everything ``kvmlet host`` shows."""

    backend: Backend
    features: tuple[Feature, ...]
    kvm: KvmInfo
    host: HostInfo
    notes: tuple[str, ...] = ()

    def feature(self, name: str) -> Feature:
        """The feature called ``name``; KeyError when the report has none."""
        for item in self.features:
            if item.name == name:
                return item
        raise KeyError(name)

    def to_dict(self) -> dict[str, object]:
        """The ``--json`` schema: stable keys, JSON types only."""
        return {
            "schema": SCHEMA_VERSION,
            "backend": self.backend.value,
            "features": [item.to_dict() for item in self.features],
            "kvm": self.kvm.to_dict(),
            "host": self.host.to_dict(),
            "notes": list(self.notes),
        }
