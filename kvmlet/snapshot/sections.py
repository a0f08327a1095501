"""A paused machine's state, section by section: what a snapshot's state file stores and what a migration
stream carries at the switchover.

:func:`capture_machine_state` reads a paused machine: its devices first (a device that cannot be saved refuses
before anything else is read), then the VM's in-kernel devices (PIC, IOAPIC, PIT, kvmclock) and every vCPU.
:meth:`MachineState.sections` names the parts as a state file does (``vm``, ``vcpu0``, ``vcpu1``, ...,
``devices``); :func:`read_machine_state` reads them back through any section reader (a checked state file,
or a migration stream's decoded message). Each section is encoded with msgspec's msgpack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from kvmlet.cpu import state as cpu_state
from kvmlet.snapshot import vm_state

if TYPE_CHECKING:
    from kvmlet.devices.state import DeviceState
    from kvmlet.machine import Machine

T = TypeVar("T")
SECTION_VM = "vm"
SECTION_DEVICES = "devices"


def vcpu_section(index: int) -> str:
    return f"vcpu{index}"


@dataclass
class MachineState:
    """Everything of a paused machine except its memory and its configuration."""

    vm: vm_state.VmState
    vcpus: list[cpu_state.VcpuState]
    devices: dict[str, DeviceState]

    def sections(self) -> dict[str, object]:
        """By section name, in the order a state file lists them."""
        out: dict[str, object] = {SECTION_VM: self.vm}
        for index, vcpu in enumerate(self.vcpus):
            out[vcpu_section(index)] = vcpu
        out[SECTION_DEVICES] = self.devices
        return out

    def encoded(self) -> dict[str, bytes]:
        """Each section's msgpack encoding, by name."""
        encoder = msgspec.msgpack.Encoder()
        return {name: encoder.encode(value) for name, value in self.sections().items()}


def capture_machine_state(machine: Machine) -> MachineState:
    """The state of a paused machine (its vCPUs parked outside KVM_RUN, its devices held)."""
    assert machine.kvm is not None and machine.vm is not None and machine.devices is not None
    devices = machine.devices.save_state()     # refuses a device that cannot be saved, before anything else
    indices = cpu_state.save_msr_indices(machine.kvm.msr_index_list())
    vm = vm_state.capture(machine.vm)
    vcpus = [cpu_state.capture(vcpu, indices) for vcpu in machine.vcpus]
    return MachineState(vm, vcpus, devices)


def read_machine_state(section: Callable[[str, Any], Any], vcpu_count: int) -> MachineState:
    """The state from a section reader (``section(name, model)`` decodes one section or raises)."""
    from kvmlet.devices.state import DeviceState

    vm = section(SECTION_VM, vm_state.VmState)
    vcpus = [section(vcpu_section(index), cpu_state.VcpuState) for index in range(vcpu_count)]
    devices = section(SECTION_DEVICES, dict[str, DeviceState])
    return MachineState(vm, vcpus, devices)


def decode_section(payloads: dict[str, bytes], name: str, model: type[T]) -> T:
    """One section from encoded payloads (a migration stream's); KeyError or msgspec's error if it is not
    there or not a ``model``."""
    return msgspec.msgpack.decode(payloads[name], type=model)
