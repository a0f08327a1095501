"""The VMM behind the API: the configuration being assembled before boot, the machine after it.

Every operation takes one lock, checks the lifecycle state and either changes it completely or not at all
(a call that fails changes nothing). Blocking work (building and starting the machine, pausing its vCPUs)
runs on the calling thread: the HTTP server calls in from a worker thread, never from the event loop, so
the API keeps answering while a VM is built, paused or busy.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from kvmlet.config.models import (
    BootSource,
    CpuConfig,
    Drive,
    DriveUpdate,
    Entropy,
    Logger,
    MachineConfig,
    MachineConfigUpdate,
    Metrics,
    NetworkInterface,
    NetworkInterfaceUpdate,
    SnapshotCreateParams,
    SnapshotLoadParams,
    Tpm,
    VmConfig,
    Vsock,
)
from kvmlet.errors import ConfigError, KvmletError, StateError, UnsupportedError

if TYPE_CHECKING:
    from kvmlet.eventloop import EventLoopThread
    from kvmlet.machine import ExitStatus, Machine
    from kvmlet.migration.destination import Incoming
    from kvmlet.migration.params import ListenOptions, MigrationSendParams
    from kvmlet.migration.source import MigrationSource
    from kvmlet.snapshot.create import SnapshotResult

log = logging.getLogger("kvmlet.api")
NOT_SUPPORTED_AFTER_BOOT = "The requested operation is not supported after starting the microVM."
NOT_SUPPORTED_BEFORE_BOOT = "The requested operation is not supported before starting the microVM."


class InstanceState(enum.Enum):
    NOT_STARTED = "Not started"
    RUNNING = "Running"
    PAUSED = "Paused"
    HALTED = "Halted"   # kvmlet: the guest ended; Firecracker's process exits instead


@dataclass
class ApiCounters:
    """Requests per method and resource, and failures (for the metrics)."""

    requests: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)

    def count(self, key: str, failed: bool) -> None:
        self.requests[key] = self.requests.get(key, 0) + 1
        if failed:
            self.failures[key] = self.failures.get(key, 0) + 1


class Vmm:
    """One microVM, configured and driven through the API."""

    def __init__(self, events: EventLoopThread, *, instance_id: str = "anonymous-instance",
                 config: VmConfig | None = None,
                 on_exit: Callable[[ExitStatus], None] | None = None) -> None:
        self.events = events
        self.instance_id = instance_id
        self.config = config if config is not None else VmConfig()
        self.machine: Machine | None = None
        self.counters = ApiCounters()
        self._lock = threading.RLock()
        self._on_exit = on_exit
        self._starting = False
        # set once the server's preload thread has imported what changes need (Python's import of one package
        # from two threads can fail with KeyError in 3.11); set from the start when nothing preloads
        self.preloaded = threading.Event()
        self.preloaded.set()
        self.boot_timer = False       # log the time from InstanceStart to the guest's first console byte
        self._tpm_quote: dict[str, object] | None = None   # the latest PUT /tpm/quote (kvmlet extension)
        self.startup_us = 0                                     # process start to API ready
        self.metrics_hook: Callable[[Metrics], None] | None = None  # starts the metrics writer
        self.metrics_sink: Callable[[], None] | None = None     # FlushMetrics, set by the metrics writer
        self.logger_sink: Callable[[Logger], None] | None = None
        self.migration: MigrationSource | Incoming | None = None   # the latest outgoing or the incoming one

    # -- state --------------------------------------------------------------------------------------
    @property
    def state(self) -> InstanceState:
        machine = self.machine
        if machine is None:
            return InstanceState.NOT_STARTED
        from kvmlet.machine import VmState

        if machine.exited or machine.state is VmState.STOPPED:
            return InstanceState.HALTED
        return InstanceState.PAUSED if machine.state is VmState.PAUSED else InstanceState.RUNNING

    @property
    def started(self) -> bool:
        return self.machine is not None or self._starting

    def _pre_boot(self) -> None:
        if self.started:
            raise StateError(NOT_SUPPORTED_AFTER_BOOT)
        if self.migration is not None:
            from kvmlet.migration.control import RECEIVING, receiving

            if receiving(self):
                raise StateError(RECEIVING)

    def _not_migrating(self) -> None:
        """Refuse what would change the VM under an outgoing migration."""
        if self.migration is not None:
            from kvmlet.migration.control import IN_PROGRESS, in_progress

            if in_progress(self):
                raise StateError(IN_PROGRESS)

    def _post_boot(self) -> Machine:
        if self.machine is None:
            raise StateError(NOT_SUPPORTED_BEFORE_BOOT)
        return self.machine

    def _replace(self, **changes: object) -> None:
        self.config = msgspec.structs.replace(self.config, **changes)

    # -- pre-boot configuration ---------------------------------------------------------------------
    def put_boot_source(self, boot: BootSource) -> None:
        with self._lock:
            self._pre_boot()
            boot.validate()
            self._replace(boot_source=boot)

    def put_machine_config(self, machine: MachineConfig) -> None:
        with self._lock:
            self._pre_boot()
            machine.validate()
            self._replace(machine_config=machine)

    def patch_machine_config(self, update: MachineConfigUpdate) -> None:
        with self._lock:
            self._pre_boot()
            machine = update.apply(self.config.machine_config)
            machine.validate()
            self._replace(machine_config=machine)

    def put_drive(self, drive: Drive) -> None:
        with self._lock:
            self._pre_boot()
            drive.validate()
            others = [d for d in self.config.drives if d.drive_id != drive.drive_id]
            if drive.is_root_device and any(d.is_root_device for d in others):
                raise ConfigError("A root block device already exists!")
            replaced = [drive if d.drive_id == drive.drive_id else d for d in self.config.drives]
            if len(others) == len(self.config.drives):
                replaced.append(drive)
            self._replace(drives=replaced)

    def put_network_interface(self, net: NetworkInterface) -> None:
        with self._lock:
            self._pre_boot()
            net.validate()
            others = [n for n in self.config.network_interfaces if n.iface_id != net.iface_id]
            from kvmlet.config.models import AUTO_TAP, parse_mac

            if net.host_dev_name != AUTO_TAP and any(n.host_dev_name == net.host_dev_name for n in others):
                raise ConfigError(f"host_dev_name {net.host_dev_name!r} is used by another network interface")
            if net.guest_mac is not None and any(
                    n.guest_mac is not None and parse_mac(n.guest_mac) == parse_mac(net.guest_mac) for n in others):
                raise ConfigError(f"guest_mac {net.guest_mac} is used by another network interface")
            replaced = [net if n.iface_id == net.iface_id else n for n in self.config.network_interfaces]
            if len(others) == len(self.config.network_interfaces):
                replaced.append(net)
            self._replace(network_interfaces=replaced)

    def put_vsock(self, vsock: Vsock) -> None:
        with self._lock:
            self._pre_boot()
            vsock.validate()
            self._replace(vsock=vsock)

    def put_entropy(self, entropy: Entropy) -> None:
        with self._lock:
            self._pre_boot()
            entropy.validate()
            self._replace(entropy=entropy)

    def put_logger(self, logger: Logger) -> None:
        with self._lock:
            self._pre_boot()
            logger.validate()
            if self.logger_sink is not None:
                try:
                    self.logger_sink(logger)
                except OSError as exc:   # the log file cannot be opened: the old logger stays
                    raise ConfigError(f"logger: log_path {logger.log_path}: {exc.strerror}") from None
            self._replace(logger=logger)

    def put_metrics(self, metrics: Metrics) -> None:
        with self._lock:
            self._pre_boot()
            if self.config.metrics is not None:
                raise StateError("Reinitialization of metrics not allowed.")
            metrics.validate()
            if self.metrics_hook is not None:
                self.metrics_hook(metrics)
            self._replace(metrics=metrics)

    def put_cpu_config(self, cpu: CpuConfig) -> None:
        with self._lock:
            self._pre_boot()
            cpu.validate()
            self._replace(cpu_config=cpu)

    def put_tpm(self, tpm: Tpm) -> None:
        with self._lock:
            self._pre_boot()
            tpm.validate()
            self._replace(tpm=tpm)

    def tpm_quote(self, nonce: str, pcrs: list[int] | None) -> None:
        """PUT /tpm/quote: quote the running VM's vTPM (kept for GET /tpm/quote)."""
        from kvmlet.tpm.api import quote

        with self._lock:
            machine = self._post_boot()
            self._tpm_quote = quote(machine, nonce, pcrs)

    def last_tpm_quote(self) -> dict[str, object]:
        quote = self._tpm_quote
        if quote is None:
            raise StateError("No TPM quote was made: PUT /tpm/quote first.")
        return dict(quote)

    # -- post-boot updates --------------------------------------------------------------------------
    def patch_drive(self, update: DriveUpdate) -> None:
        from kvmlet.devices.factory import update_drive

        with self._lock:
            machine = self._post_boot()
            self._not_migrating()
            if machine.devices is None:
                raise StateError(f"cannot update drive {update.drive_id!r}: the VM is {self.state.value}")
            drive = update_drive(machine.devices, update)
            self._replace(drives=[drive if d.drive_id == drive.drive_id else d for d in self.config.drives])

    def patch_network_interface(self, update: NetworkInterfaceUpdate) -> None:
        from kvmlet.devices.factory import update_network_interface

        with self._lock:
            machine = self._post_boot()
            self._not_migrating()
            if machine.devices is None:
                raise StateError(f"cannot update interface {update.iface_id!r}: the VM is {self.state.value}")
            net = update_network_interface(machine.devices, update)
            self._replace(network_interfaces=[net if n.iface_id == net.iface_id else n
                                              for n in self.config.network_interfaces])

    # -- actions ------------------------------------------------------------------------------------
    def instance_start(self) -> None:
        """Build the VM from the configuration and start it (blocking; about 2-3 ms for a small VM)."""
        from kvmlet.machine import build_machine

        with self._lock:
            self._pre_boot()
            if self.config.boot_source is None:
                raise ConfigError("Cannot start microvm without kernel configuration.")
            self._starting = True
            try:
                started = time.perf_counter()
                machine = build_machine(self.config, self.events)
                machine.on_stop.append(self._machine_stopped)
                if self.boot_timer:
                    machine.on_first_byte.append(lambda: log.info(
                        "Guest-boot-time = %d us (InstanceStart to the first console byte)",
                        (time.perf_counter() - started) * 1e6))
                try:
                    machine.start()
                except BaseException:
                    machine.close()
                    raise
            except KvmletError as exc:
                raise StartError(f"Start microvm error: {exc}") from None
            finally:
                self._starting = False
            self.machine = machine

    # -- snapshots ----------------------------------------------------------------------------------
    def snapshot_create(self, params: SnapshotCreateParams) -> SnapshotResult:
        """PUT /snapshot/create: the VM must be paused (Firecracker's rule); it stays paused."""
        from kvmlet.snapshot.create import create_snapshot

        with self._lock:
            machine = self._post_boot()
            self._not_migrating()
            if self.state is not InstanceState.PAUSED:
                raise StateError(f"Create snapshot error: the microVM is {self.state.value.lower()}, not paused "
                                 "(PATCH /vm {\"state\": \"Paused\"} first)")
            params.validate()
            result = create_snapshot(machine, Path(params.snapshot_path), Path(params.mem_file_path),
                                     params.snapshot_type)
            log.info("Snapshot created: %s, %d bytes of memory (%d dirty pages) in %.1f ms (state %.1f ms, "
                     "memory %.1f ms, state file %.1f ms)", result.snapshot_type, result.memory_bytes,
                     result.dirty_pages, result.total_ms, result.state_ms, result.memory_ms, result.file_ms)
            return result

    def snapshot_load(self, params: SnapshotLoadParams) -> None:
        """PUT /snapshot/load: only into a VMM that has booted nothing and configured no boot resources."""
        from kvmlet.snapshot.restore import load_snapshot

        with self._lock:
            self._pre_boot()
            config = self.config
            if config.boot_source is not None or config.drives or config.network_interfaces or config.vsock \
                    or config.entropy is not None:
                raise StateError("Loading a microVM snapshot not allowed after configuring boot-specific "
                                 "resources.")
            self._starting = True
            requested = time.perf_counter()
            try:
                machine = load_snapshot(params, self.events, console_spec=config.console)
                machine.on_stop.append(self._machine_stopped)
                try:
                    machine.start(paused=not params.resume_vm)
                except BaseException:
                    machine.close()
                    raise
            except KvmletError as exc:
                raise StartError(f"Load snapshot error: {exc}") from None
            finally:
                self._starting = False
            self.machine = machine
            _log_restore(machine, params.snapshot_path, requested)
            from kvmlet.config import to_builtins

            restored = msgspec.convert(to_builtins(machine.config), VmConfig)
            self.config = msgspec.structs.replace(restored, logger=config.logger, metrics=config.metrics)

    def _machine_stopped(self, status: ExitStatus) -> None:
        """The guest (or the VMM) ended the VM; called on the thread that ended it, often a vCPU's."""
        threading.Thread(target=self._reap, name="kvmlet-reap", daemon=True).start()
        if self._on_exit is not None:
            self._on_exit(status)

    def _reap(self) -> None:
        """Join the ended VM's vCPU threads (its devices stay readable for GET /vm/config and metrics)."""
        with self._lock:
            machine = self.machine
            if machine is None:
                return
            try:
                machine.stop()
            except KvmletError as exc:
                log.warning("stopping the ended VM: %s", exc)

    def send_ctrl_alt_del(self) -> None:
        with self._lock:
            self._post_boot().send_ctrl_alt_del()

    def flush_metrics(self) -> None:
        self._post_boot()
        if self.metrics_sink is None:
            raise ConfigError("Failed to flush metrics: the metrics system is not initialized (PUT /metrics).")
        try:
            self.metrics_sink()
        except OSError as exc:
            raise ConfigError(f"Failed to flush metrics: {exc.strerror}") from None

    def pause(self) -> None:
        """PATCH /vm Paused; pausing a paused VM succeeds, as under Firecracker."""
        with self._lock:
            machine = self._post_boot()
            self._not_migrating()
            if self.state is not InstanceState.PAUSED:
                machine.pause()

    def resume(self) -> None:
        """PATCH /vm Resumed; resuming a running VM succeeds, as under Firecracker."""
        with self._lock:
            machine = self._post_boot()
            self._not_migrating()
            if self.state is not InstanceState.RUNNING:
                machine.resume()

    # -- live migration (kvmlet extension) -----------------------------------------------------------
    def migration_send(self, params: MigrationSendParams) -> None:
        """PUT /migration/send: start migrating the VM; GET /migration follows it."""
        from kvmlet.migration import control

        with self._lock:
            control.send(self, self._post_boot(), params)

    def migration_cancel(self) -> None:
        """PATCH /migration Cancelled: the source VM goes on as before."""
        from kvmlet.migration import control

        with self._lock:
            control.cancel(self)

    def migration_status(self) -> dict[str, object]:
        from kvmlet.migration import control

        return control.status_json(self)

    def migration_listen(self, options: ListenOptions) -> None:
        """Wait for an incoming migration (``kvmlet serve --migrate-listen``); nothing may be configured."""
        from kvmlet.migration import control

        with self._lock:
            self._pre_boot()
            config = self.config
            if config.boot_source is not None or config.drives or config.network_interfaces or config.vsock \
                    or config.entropy is not None:
                raise StateError("an incoming migration brings its own configuration: configure nothing else")
            control.listen(self, options)

    def adopt(self, machine: Machine) -> None:
        """Take over a machine that arrived by migration (running, or paused as it was on the source)."""
        with self._lock:
            machine.on_stop.append(self._machine_stopped)
            from kvmlet.config import to_builtins

            config = self.config
            self.machine = machine
            restored = msgspec.convert(to_builtins(machine.config), VmConfig)
            self.config = msgspec.structs.replace(restored, logger=config.logger, metrics=config.metrics)
            if machine.exited:      # it ended before it was adopted
                self._machine_stopped(machine.exit_status)   # type: ignore[arg-type]

    def unsupported(self, what: str) -> None:
        raise UnsupportedError(what)

    def close(self) -> None:
        if self.migration is not None:
            from kvmlet.migration import control

            control.close(self)
        with self._lock:
            if self.machine is not None:
                self.machine.close()


def _log_restore(machine: Machine, path: str, requested: float) -> None:
    """Log how long the load took, step by step, once the first vCPU has entered KVM_RUN (on a thread of its
    own: the request does not wait for it)."""
    def report() -> None:
        thread = machine.threads[0] if machine.threads else None
        deadline = time.monotonic() + 2.0
        while thread is not None and thread.first_run_at is None and time.monotonic() < deadline:
            time.sleep(0.001)
        marks = machine.timeline.marks
        steps = ", ".join(f"{name} {1000 * (marks[name] - requested):.1f}" for name in
                          ("snapshot-read", "vm-created", "vcpus-created", "restored", "start") if name in marks)
        first = (f"; first KVM_RUN at {1000 * (thread.first_run_at - requested):.1f} ms"
                 if thread is not None and thread.first_run_at is not None else "")
        log.info("Snapshot loaded from %s (ms from the request: %s)%s", path, steps, first)

    threading.Thread(target=report, name="kvmlet-restore-log", daemon=True).start()


class StartError(KvmletError):
    """InstanceStart failed; nothing was left running."""
