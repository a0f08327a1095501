"""Building a machine from a snapshot instead of booting it.

Everything that can be refused is checked before a VM exists: the state file (magic, version, every
section's checksum), the memory file (there, of the right size), the host (same CPU vendor, a KVM that can
give each vCPU its saved CPUID), the configuration with its overrides. Then the machine is built with the
builder's steps minus the kernel: memory is the memory file mapped copy on write (restore time does not
grow with memory size), the devices are built from the snapshot's configuration (drive files, TAPs and the
vsock socket can be overridden, so clones each get their own) and given their saved state, the VM's
interrupt controllers, timer and clock and each vCPU's state are set, and the VM generation ID changes.
The machine returned has not run: ``start()`` runs it, ``start(paused=True)`` leaves it paused.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from kvmlet.config.models import DriveOverride, NetworkOverride, SnapshotLoadParams, VmConfig, VsockOverride
from kvmlet.cpu import state as cpu_state
from kvmlet.errors import ConfigError
from kvmlet.kvm.cpuid import CpuidEntry
from kvmlet.snapshot import vm_state
from kvmlet.snapshot.format import SnapshotError, SnapshotFile
from kvmlet.snapshot.memory_file import check_memory_file
from kvmlet.snapshot.sections import MachineState, read_machine_state

log = logging.getLogger("kvmlet.snapshot")

if TYPE_CHECKING:
    from kvmlet.devices.legacy.console import Console
    from kvmlet.eventloop import EventLoopThread
    from kvmlet.kvm.vcpu import Vcpu
    from kvmlet.machine import Machine
    from kvmlet.memory import GuestMemory


def preload() -> None:
    """Import what a restore needs and build msgspec's decoders for the snapshot's types (a server does this
    while it waits, so that a load request does not pay for first use: about 2-3 ms)."""
    import kvmlet.devices.state
    import kvmlet.devices.vmgenid
    import kvmlet.host.virt
    import kvmlet.snapshot.memory_file
    from kvmlet.snapshot.format import SnapshotHeader

    encoder = msgspec.msgpack.Encoder()
    for model in (dict[str, kvmlet.devices.state.DeviceState], vm_state.VmState, cpu_state.VcpuState):
        try:
            msgspec.msgpack.decode(encoder.encode({}), type=model)
        except msgspec.ValidationError:
            pass   # an empty value is not a valid state; the decoder is built all the same
    for header_model in (SnapshotHeader, VmConfig):
        try:
            msgspec.convert({}, header_model)
        except msgspec.ValidationError:
            pass
    _pvm_host()


def snapshot_vm_config(snapshot: SnapshotFile, params: SnapshotLoadParams, console: str | None) -> VmConfig:
    """The snapshot's configuration with the load request's overrides applied."""
    try:
        config = msgspec.convert(snapshot.header.vm_config, VmConfig)
    except msgspec.ValidationError as exc:
        raise SnapshotError(f"snapshot {snapshot.path}: its VM configuration cannot be read: {exc}") from None
    return override_config(config, drives=params.drive_overrides, nets=params.network_overrides,
                           vsock=params.vsock_override,
                           track_dirty_pages=params.track_dirty_pages or params.enable_diff_snapshots,
                           console=console)


def override_config(config: VmConfig, *, drives: Sequence[DriveOverride] = (), nets: Sequence[NetworkOverride] = (),
                    vsock: VsockOverride | None = None, track_dirty_pages: bool = False, console: str | None = None,
                    what: str = "the snapshot") -> VmConfig:
    """A saved (or sent) configuration with another machine's backings: drive files, TAPs, the vsock
    socket and the console (ConfigError for an override naming something ``what`` lacks)."""
    drives_by_id = {d.drive_id: d for d in config.drives}
    for drive_override in drives:
        if drive_override.drive_id not in drives_by_id:
            raise ConfigError(f"drive_overrides: {what} has no drive {drive_override.drive_id!r}")
        drives_by_id[drive_override.drive_id] = msgspec.structs.replace(
            drives_by_id[drive_override.drive_id], path_on_host=drive_override.path_on_host)
    nets_by_id = {n.iface_id: n for n in config.network_interfaces}
    for net_override in nets:
        if net_override.iface_id not in nets_by_id:
            raise ConfigError(f"network_overrides: {what} has no network interface {net_override.iface_id!r}")
        nets_by_id[net_override.iface_id] = msgspec.structs.replace(nets_by_id[net_override.iface_id],
                                                                    host_dev_name=net_override.host_dev_name)
    vsock_config = config.vsock
    if vsock is not None:
        if vsock_config is None:
            raise ConfigError(f"vsock_override: {what} has no vsock device")
        vsock_config = msgspec.structs.replace(vsock_config, uds_path=vsock.uds_path)
    machine_config = config.machine_config
    if track_dirty_pages:
        machine_config = msgspec.structs.replace(machine_config, track_dirty_pages=True)
    return msgspec.structs.replace(config, drives=list(drives_by_id.values()),
                                   network_interfaces=list(nets_by_id.values()), vsock=vsock_config,
                                   machine_config=machine_config,
                                   console=console if console is not None else config.console)


def check_vendor(snapshot: SnapshotFile, supported: list[CpuidEntry]) -> None:
    """Refuse a snapshot taken on a host of another CPU vendor."""
    host_vendor = vm_state.cpu_vendor(supported)
    if snapshot.header.cpu_vendor != host_vendor:
        raise SnapshotError(f"snapshot {snapshot.path} was taken on a {snapshot.header.cpu_vendor} host; this host "
                            f"is {host_vendor}")


def check_cpuid(what: str, vcpu: Vcpu, state: cpu_state.VcpuState, supported: list[CpuidEntry],
                pvm: bool) -> None:
    """Refuse a vCPU whose saved CPUID has features this host cannot give (``what``: where the state comes
    from, e.g. "snapshot vm.snap"). What the host gives: KVM's supported table; under PVM the table
    KVM_GET_CPUID2 returns after the saved one is set (PVM fills the feature leaves from the host's own
    CPUID, whatever was set)."""
    if pvm:
        vcpu.set_cpuid(state.cpuid)
        available = vcpu.get_cpuid()
    else:
        available = supported
    missing = vm_state.cpuid_differences(state.cpuid, available)
    if missing:
        raise SnapshotError(f"{what}: this host cannot give vCPU {state.vcpu_id} its CPUID: "
                            f"{'; '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} not available")


def build_without_boot(machine: Machine, memory: GuestMemory) -> None:
    """The builder's steps for a machine whose state comes from elsewhere (a snapshot, a migration stream),
    on a machine whose KVM is open: the VM over ``memory`` (the machine owns it from here on), the devices
    (held paused until ``start()``: no completion may beat the interrupt controllers), the vCPUs without
    boot set-up. Nothing has run; :func:`apply_machine_state` gives it its state."""
    from kvmlet.machine.builder import add_devices, create_vcpus, create_vm

    create_vm(machine, memory=memory)
    add_devices(machine)
    assert machine.devices is not None
    machine.events.start()
    machine.devices.pause()
    create_vcpus(machine, boot=False, configure=False)


def apply_machine_state(machine: Machine, state: MachineState, supported: list[CpuidEntry], what: str) -> None:
    """Load a saved (or sent) state into a machine built by :func:`build_without_boot`: the devices', each
    vCPU's CPUID checked against this host, the VM's interrupt controllers, timer and clock, each vCPU's
    registers. ValueError for a state that does not fit (versions, sizes); SnapshotError for a CPUID this
    host cannot give (``what`` names the source in the message)."""
    assert machine.devices is not None and machine.vm is not None
    if len(state.vcpus) != len(machine.vcpus):
        raise ValueError(f"{len(state.vcpus)} vCPU states for {len(machine.vcpus)} vCPUs")
    machine.devices.restore_state(state.devices)
    pvm = _pvm_host()
    for vcpu, vcpu_state in zip(machine.vcpus, state.vcpus, strict=True):
        check_cpuid(what, vcpu, vcpu_state, supported, pvm)
    vm_state.restore(machine.vm, state.vm)
    for vcpu, vcpu_state in zip(machine.vcpus, state.vcpus, strict=True):
        machine.warnings.extend(cpu_state.restore(vcpu, vcpu_state, cpuid_set=pvm))


def load_snapshot(params: SnapshotLoadParams, events: EventLoopThread, *, console: Console | None = None,
                  console_spec: str | None = None) -> Machine:
    """A machine restored from ``params.snapshot_path``, not yet running; nothing is left behind on failure."""
    from kvmlet.devices.vmgenid import write_generation_id
    from kvmlet.machine import Machine
    from kvmlet.machine.builder import open_kvm
    from kvmlet.memory import GuestMemory, GuestMemoryError

    params.validate()
    snapshot = SnapshotFile(Path(params.snapshot_path))
    memory_path = Path(params.memory_path)
    info = snapshot.header.memory
    check_memory_file(memory_path, info)
    config = snapshot_vm_config(snapshot, params, console_spec)
    state = read_machine_state(snapshot.section, config.machine_config.vcpu_count)
    if sum(length for _, length in info.ranges) != config.machine_config.memory_bytes:
        raise SnapshotError(f"snapshot {snapshot.path}: its memory ranges do not add up to mem_size_mib")

    machine = Machine(config, events, console)
    machine.timeline.mark("snapshot-read")
    try:
        open_kvm(machine, restoring=True)
        assert machine.kvm is not None
        supported = machine.kvm.supported_cpuid()
        check_vendor(snapshot, supported)
        try:
            memory = GuestMemory.from_file(str(memory_path), info.ranges)
        except GuestMemoryError as exc:
            raise SnapshotError(str(exc)) from None
        build_without_boot(machine, memory)
        apply_machine_state(machine, state, supported, f"snapshot {snapshot.path}")
        machine.generation_id = write_generation_id(memory)
        machine.restored_from = str(snapshot.path)
        machine.timeline.mark("restored")
    except ValueError as exc:      # a saved state that does not fit (version, sizes)
        _close_quietly(machine)
        raise SnapshotError(f"snapshot {snapshot.path}: {exc}") from None
    except BaseException:
        _close_quietly(machine)
        raise
    if params.mem_copy == "background":
        start_background_copy(machine, memory_path)
    return machine


@functools.cache
def _pvm_host() -> bool:
    from kvmlet.host.model import Backend
    from kvmlet.host.virt import detect_backend

    return detect_backend() is Backend.PVM


def _close_quietly(machine: Machine) -> None:
    from kvmlet.machine.state import MachineError

    try:
        machine.close()
    except MachineError:
        pass   # the restore failure is the error worth reporting


def start_background_copy(machine: Machine, memory_path: Path) -> threading.Thread:
    """Copy the memory file's data into the VM's own memory ahead of the guest (copy-on-write breaks now,
    not at the guest's first write to each page); holes are left alone (they read as zeros either way and
    cost the guest no copy). Stops when the machine closes."""
    from kvmlet.snapshot.memory_file import data_runs

    memory = machine.memory
    assert memory is not None
    runs = data_runs(memory_path, memory)

    def copy() -> None:
        started = time.perf_counter()
        done = memory.populate(runs, stop=lambda: machine.memory is not memory)
        machine.background_copy_ms = (time.perf_counter() - started) * 1000
        machine.timeline.mark("memory-copied" if done else "memory-copy-unavailable")
        log.info("Snapshot memory %s in the background: %d bytes in %.1f ms", "copied" if done else "NOT copied",
                 sum(length for _, length in runs), machine.background_copy_ms)

    thread = threading.Thread(target=copy, name="kvmlet-memcopy", daemon=True)
    thread.start()
    return thread
