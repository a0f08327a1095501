"""The system file descriptor, ``/dev/kvm``: capabilities, supported CPUID and MSRs, VM creation."""

from __future__ import annotations

import errno
import fcntl
import os

from kvmlet.kvm import constants as c
from kvmlet.kvm import structs as s
from kvmlet.kvm.cpuid import CpuidEntry, entries_from_struct
from kvmlet.kvm.errors import KvmUnavailableError, ioctl_error
from kvmlet.kvm.vm import Vm

KVM_API_VERSION = 12
DEFAULT_DEVICE = "/dev/kvm"


class Kvm:
    """An open ``/dev/kvm``. Raises KvmUnavailableError with what to do when it cannot be used."""

    def __init__(self, path: str = DEFAULT_DEVICE) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{path} does not exist: this host offers no KVM. Enable hardware virtualization "
                "(VT-x/AMD-V) in the firmware and load kvm_intel or kvm_amd (or kvm_pvm), "
                "or run on a host that has nested virtualization") from None
        except PermissionError:
            raise KvmUnavailableError(
                f"no permission to open {path}: run as root or add your user to the group that "
                f"owns it (ls -l {path}; usually 'kvm')") from None
        except OSError as exc:
            raise KvmUnavailableError(f"cannot open {path}: {exc.strerror}") from None
        try:
            self.api_version = fcntl.ioctl(self.fd, c.KVM_GET_API_VERSION, 0)
        except OSError as exc:
            os.close(self.fd)
            raise KvmUnavailableError(f"{path} is not a KVM device: {exc.strerror}") from None
        if self.api_version != KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailableError(
                f"{path} speaks KVM API version {self.api_version}; kvmlet needs {KVM_API_VERSION}")
        self._vcpu_mmap_size: int | None = None

    # -- capabilities -------------------------------------------------------------------------------
    def check_extension(self, cap: c.Cap | int) -> int:
        """KVM_CHECK_EXTENSION: 0 when absent, otherwise a capability-specific positive value."""
        try:
            return fcntl.ioctl(self.fd, c.KVM_CHECK_EXTENSION, int(cap))
        except OSError:
            return 0

    def require(self, cap: c.Cap, purpose: str) -> int:
        """The capability's value, or KvmUnavailableError naming what needs it."""
        value = self.check_extension(cap)
        if value <= 0:
            raise KvmUnavailableError(
                f"this host's KVM lacks KVM_CAP_{cap.name}, which kvmlet needs for {purpose}; "
                "a newer kernel or a KVM module with that feature is required")
        return value

    def capabilities(self) -> dict[str, int]:
        """Every capability kvmlet knows about, with its value (0 = absent)."""
        return {cap.name: self.check_extension(cap) for cap in c.Cap}

    @property
    def vcpu_mmap_size(self) -> int:
        if self._vcpu_mmap_size is None:
            self._vcpu_mmap_size = fcntl.ioctl(self.fd, c.KVM_GET_VCPU_MMAP_SIZE, 0)
        return self._vcpu_mmap_size

    @property
    def max_vcpus(self) -> int:
        return self.check_extension(c.Cap.MAX_VCPUS) or self.check_extension(c.Cap.NR_VCPUS) or 4

    @property
    def recommended_vcpus(self) -> int:
        return self.check_extension(c.Cap.NR_VCPUS) or 4

    # -- CPUID and MSRs -----------------------------------------------------------------------------
    def _cpuid(self, request: int, name: str) -> list[CpuidEntry]:
        count = 128
        while True:
            buf = s.kvm_cpuid2(count)
            buf.nent = count
            try:
                fcntl.ioctl(self.fd, request, buf)
            except OSError as exc:
                if exc.errno == errno.E2BIG and count < 4096:
                    count *= 2
                    continue
                raise ioctl_error(name, exc) from None
            return entries_from_struct(buf)

    def supported_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID: the CPUID leaves and bits KVM can give a guest."""
        return self._cpuid(c.KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID")

    def emulated_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_EMULATED_CPUID: features KVM emulates in software."""
        return self._cpuid(c.KVM_GET_EMULATED_CPUID, "KVM_GET_EMULATED_CPUID")

    def _msr_list(self, request: int, name: str) -> list[int]:
        probe = s.kvm_msr_list(0)
        probe.nmsrs = 0
        try:
            fcntl.ioctl(self.fd, request, probe)
        except OSError as exc:
            if exc.errno != errno.E2BIG:
                raise ioctl_error(name, exc) from None
        count = probe.nmsrs
        buf = s.kvm_msr_list(count)
        buf.nmsrs = count
        try:
            fcntl.ioctl(self.fd, request, buf)
        except OSError as exc:
            raise ioctl_error(name, exc) from None
        return [int(buf.indices[i]) for i in range(buf.nmsrs)]

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: MSRs saved and restored with a vCPU."""
        return self._msr_list(c.KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST")

    def msr_feature_index_list(self) -> list[int]:
        """KVM_GET_MSR_FEATURE_INDEX_LIST: feature MSRs (e.g. ARCH_CAPABILITIES) readable here."""
        if not self.check_extension(c.Cap.GET_MSR_FEATURES):
            return []
        return self._msr_list(c.KVM_GET_MSR_FEATURE_INDEX_LIST, "KVM_GET_MSR_FEATURE_INDEX_LIST")

    def msr_features(self, indices: list[int]) -> dict[int, int]:
        """Values of feature MSRs (KVM_GET_MSRS on the system fd)."""
        if not indices:
            return {}
        buf = s.kvm_msrs(len(indices))
        buf.nmsrs = len(indices)
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        try:
            done = fcntl.ioctl(self.fd, c.KVM_GET_MSRS, buf)
        except OSError as exc:
            raise ioctl_error("KVM_GET_MSRS (features)", exc) from None
        return {int(buf.entries[i].index): int(buf.entries[i].data)
                for i in range(done)}

    # -- VMs ----------------------------------------------------------------------------------------
    def create_vm(self, vm_type: int = 0) -> Vm:
        """KVM_CREATE_VM."""
        try:
            fd = fcntl.ioctl(self.fd, c.KVM_CREATE_VM, vm_type)
        except OSError as exc:
            raise ioctl_error("KVM_CREATE_VM", exc) from None
        return Vm(self, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

