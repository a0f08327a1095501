"""A VM from a configuration: ``builder`` (the steps that build one), ``machine`` (running it), ``state``."""

from kvmlet.machine.builder import build_machine
from kvmlet.machine.machine import Machine
from kvmlet.machine.state import ExitStatus, MachineError, StopKind, VmState

__all__ = ["ExitStatus", "Machine", "MachineError", "StopKind", "VmState", "build_machine"]
