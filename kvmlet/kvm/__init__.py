"""Thin, typed bindings to the Linux KVM API: system, VM and vCPU file descriptors."""

from kvmlet.kvm.constants import Cap, ExitReason
from kvmlet.kvm.errors import KvmError, KvmUnavailableError
from kvmlet.kvm.system import Kvm
from kvmlet.kvm.vcpu import Vcpu
from kvmlet.kvm.vm import Vm

__all__ = ["Cap", "ExitReason", "Kvm", "KvmError", "KvmUnavailableError", "Vcpu", "Vm"]
