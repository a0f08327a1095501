"""Saving a paused machine: its state file and its memory file.

The machine must be paused (Firecracker's rule): its vCPUs are parked outside ``KVM_RUN`` and its devices
hold their work (:meth:`kvmlet.devices.manager.DeviceManager.pause`), so guest memory and every state read
here are one consistent moment. The memory file is written first and the state file last (atomically), so
a state file never names memory that was not written. A device that cannot be saved refuses the whole
snapshot before any file is touched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kvmlet import __version__
from kvmlet.config import to_builtins
from kvmlet.errors import StateError
from kvmlet.snapshot import vm_state
from kvmlet.snapshot.dirty import dirty_page_count
from kvmlet.snapshot.format import SnapshotError, write_snapshot
from kvmlet.snapshot.memory_file import write_memory_file
from kvmlet.snapshot.sections import SECTION_DEVICES, SECTION_VM, capture_machine_state, vcpu_section

if TYPE_CHECKING:
    from kvmlet.machine import Machine

SnapshotType = Literal["Full", "Diff"]
__all__ = ["SECTION_DEVICES", "SECTION_VM", "SnapshotResult", "create_snapshot", "snapshot_config", "vcpu_section"]


@dataclass
class SnapshotResult:
    """What a snapshot wrote and how long its parts took (ms)."""

    snapshot_type: str
    memory_bytes: int          # bytes of guest memory written to the memory file
    dirty_pages: int           # Diff: pages written since the last snapshot
    state_ms: float            # reading vCPU, VM and device state
    memory_ms: float
    file_ms: float             # writing the state file
    total_ms: float


def create_snapshot(machine: Machine, snapshot_path: Path, mem_file_path: Path,
                    snapshot_type: SnapshotType = "Full") -> SnapshotResult:
    from kvmlet.machine.state import VmState

    started = time.perf_counter()
    if machine.state is not VmState.PAUSED or machine.exited:
        raise StateError("a snapshot needs a paused VM (PATCH /vm {\"state\": \"Paused\"} first)")
    assert machine.kvm is not None and machine.vm is not None and machine.memory is not None
    assert machine.devices is not None
    if snapshot_type == "Diff" and (machine.dirty_log is None or not machine.dirty_log.enabled):
        raise StateError("a Diff snapshot needs dirty page tracking: set track_dirty_pages in machine-config "
                         "(or enable_diff_snapshots when loading a snapshot)")
    try:
        return _create(machine, snapshot_path, mem_file_path, snapshot_type, started)
    except OSError as exc:      # anything the file writers did not already name (they raise SnapshotError)
        raise SnapshotError(f"snapshot {snapshot_path}: {exc.strerror or exc}") from None


def _create(machine: Machine, snapshot_path: Path, mem_file_path: Path, snapshot_type: SnapshotType,
            started: float) -> SnapshotResult:
    assert machine.memory is not None and machine.kvm is not None and machine.vm is not None
    assert machine.devices is not None
    if snapshot_path.resolve() == mem_file_path.resolve():
        raise StateError("snapshot_path and mem_file_path are the same file")
    if machine.memory.private_file is not None and _same_file(mem_file_path, Path(machine.memory.private_file)):
        raise StateError(f"mem_file_path {mem_file_path} is the file this VM's memory is mapped from (copy on "
                         "write): writing it would change the guest's memory under it; choose another file")
    sections = capture_machine_state(machine).sections()   # refuses a device that cannot be saved, before any file
    state_done = time.perf_counter()

    dirty = machine.dirty_log.take() if machine.dirty_log is not None and machine.dirty_log.enabled else None
    try:
        memory = write_memory_file(mem_file_path, machine.memory,
                                   dirty=dirty if snapshot_type == "Diff" else None)
        memory_done = time.perf_counter()
        supported = machine.kvm.supported_cpuid()
        write_snapshot(snapshot_path, kvmlet_version=__version__, cpu_vendor=vm_state.cpu_vendor(supported),
                       created_unix_ms=int(time.time() * 1000), vm_config=snapshot_config(machine),
                       memory=memory, sections=sections)
    except BaseException:
        if dirty is not None:
            machine.memory.requeue_dirty(dirty)   # the next diff still covers these pages
        raise
    done = time.perf_counter()
    return SnapshotResult(snapshot_type, memory.data_bytes,
                          dirty_page_count(dirty) if dirty is not None and snapshot_type == "Diff" else 0,
                          (state_done - started) * 1000, (memory_done - state_done) * 1000,
                          (done - memory_done) * 1000, (done - started) * 1000)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def snapshot_config(machine: Machine) -> dict[str, object]:
    """The configuration the machine runs with, as GET /vm/config shows it (devices' run-time updates
    included), which a restore builds its devices from."""
    import msgspec

    config = machine.config
    devices = machine.devices
    if devices is not None:
        def current(name: str, model: Any) -> Any:
            managed = devices.find(name)
            return managed.config if managed is not None and managed.config is not None else model

        config = msgspec.structs.replace(
            config, drives=[current(f"drive:{d.drive_id}", d) for d in config.drives],
            network_interfaces=[current(f"net:{n.iface_id}", n) for n in config.network_interfaces])
    builtins = to_builtins(config)
    assert isinstance(builtins, dict)
    return builtins
