"""A running machine: configured -> running <-> paused -> stopped.

A :class:`Machine` is made by :mod:`kvmlet.machine.builder` from a configuration it never edits. It runs
one thread per vCPU (``start``), pauses and resumes them, reports how the guest ended (``wait``) and
releases every thread and fd it owns (``close``). The event loop is the caller's: the machine uses it and
leaves it running, so an API server can outlive the VM it started.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmlet.config.models import VmConfig
from kvmlet.devices.bus import Bus
from kvmlet.errors import StateError
from kvmlet.machine.state import BootTimeline, ExitStatus, MachineError, StopKind, VmState
from kvmlet.vcpu_runner import VcpuStop, VcpuThread

if TYPE_CHECKING:
    from kvmlet.boot.loader import BootInfo
    from kvmlet.cpu.plan import CpuPlan
    from kvmlet.devices.factory import LegacyDevices
    from kvmlet.devices.legacy.console import Console
    from kvmlet.devices.legacy.serial import Serial8250
    from kvmlet.devices.manager import DeviceManager
    from kvmlet.eventloop import EventLoopThread
    from kvmlet.kvm.stats import StatsReader
    from kvmlet.kvm.system import Kvm
    from kvmlet.kvm.vcpu import Vcpu
    from kvmlet.kvm.vm import Vm
    from kvmlet.memory import GuestMemory
    from kvmlet.snapshot.dirty import DirtyLog


class Machine:
    """One virtual machine and everything it owns (see :func:`kvmlet.machine.builder.build_machine`)."""

    def __init__(self, config: VmConfig, events: EventLoopThread, console: Console | None = None) -> None:
        self.config = config
        self.events = events
        self.console = console
        self.state = VmState.CONFIGURED
        self.timeline = BootTimeline()
        self.timeline.mark("machine")
        self.kvm: Kvm | None = None
        self.vm: Vm | None = None
        self.memory: GuestMemory | None = None
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.devices: DeviceManager | None = None
        self.legacy: LegacyDevices | None = None
        self.vcpus: list[Vcpu] = []
        self.threads: list[VcpuThread] = []
        self.boot_info: BootInfo | None = None
        self._exit: ExitStatus | None = None
        self._exit_event = threading.Event()
        self._lock = threading.Lock()
        self._state_lock = threading.RLock()
        self.warnings: list[str] = []
        self.on_stop: list[Callable[[ExitStatus], None]] = []
        self.on_first_byte: list[Callable[[], None]] = []   # called once, on the vCPU thread
        self._stats_readers: dict[int, StatsReader] = {}
        self.dirty_log: DirtyLog | None = None      # set by create_vm; enabled for diff snapshots
        self.generation_id = b""                     # the VM generation ID (VMGENID) the guest sees
        self.restored_from: str | None = None        # the snapshot this machine was restored from
        self.background_copy_ms: float | None = None  # a restore's background copy of its memory file
        self.cpu_plan: CpuPlan | None = None          # the CPU kvmlet gave the vCPUs (the migration gate's input)
        self._console_snapshots = 0

    @property
    def serial(self) -> Serial8250 | None:
        return self.legacy.serial if self.legacy is not None else None

    # -- guest events (vCPU threads) ----------------------------------------------------------------
    def first_byte(self) -> None:
        self.timeline.mark("first-console-byte")
        for callback in self.on_first_byte:
            callback()

    def _set_exit(self, status: ExitStatus) -> None:
        with self._lock:
            if self._exit is not None:
                return
            self._exit = status
        self._exit_event.set()
        for callback in self.on_stop:
            callback(status)

    def guest_exit(self, status: int) -> None:
        if status > 255:  # a process exit status has 8 bits: never let 256 read as success
            self._set_exit(ExitStatus(StopKind.GUEST_EXIT, f"guest exited with status {status}", 255,
                                      warning=f"the guest's exit status {status} is more than 255: "
                                              "exiting with 255"))
        else:
            self._set_exit(ExitStatus(StopKind.GUEST_EXIT, f"guest exited with status {status}", status))
        self._stop_vcpus_async()

    def guest_reset(self) -> None:
        self._set_exit(ExitStatus(StopKind.RESET, "guest requested a reset (i8042)", 0))
        self._stop_vcpus_async()

    def vcpu_stopped(self, stop: VcpuStop) -> None:
        kinds = {"reset": (StopKind.RESET, 0), "shutdown": (StopKind.SHUTDOWN, 0),
                 "triple-fault": (StopKind.TRIPLE_FAULT, 3),
                 "internal-error": (StopKind.INTERNAL_ERROR, 2), "fail-entry": (StopKind.INTERNAL_ERROR, 2),
                 "error": (StopKind.ERROR, 1), "stopped": (StopKind.STOPPED, 130)}
        kind, code = kinds.get(stop.kind, (StopKind.ERROR, 1))
        self._set_exit(ExitStatus(kind, stop.message, code))
        self._stop_vcpus_async()

    def _stop_vcpus_async(self) -> None:
        for thread in self.threads:
            thread.request_stop()

    def describe_failure(self, vcpu: Vcpu) -> str:
        """A one-line account of an internal error: suberror, guest RIP, CPL, instruction bytes."""
        info = vcpu.internal_error()
        try:
            names = {1: "emulation failure", 2: "simultaneous exceptions",
                     3: "unexpected exit while delivering an event", 4: "unexpected exit reason"}
            what = names.get(info.suberror, f"internal error {info.suberror}")
            regs = vcpu.get_regs()
            sregs = vcpu.get_sregs()
            cpl = sregs.cs.dpl if sregs.cr0 & 1 else 0
            code = info.instruction
            if not code and self.memory is not None:
                linear = regs.rip + (sregs.cs.base if not sregs.efer & 0x400 else 0)
                code = self._guest_bytes(vcpu, linear, 15, paging=bool(sregs.cr0 & (1 << 31)))
            text = code.hex(" ") if code else "unavailable (RIP not in guest memory)"
            return (f"KVM internal error: {what} at RIP {regs.rip:#x} (CPL {cpl}); "
                    f"instruction bytes: {text}")
        except Exception as exc:  # the report itself must not fail
            return f"KVM internal error {info.suberror} (state unreadable: {exc})"

    def _guest_bytes(self, vcpu: Vcpu, linear: int, count: int, *, paging: bool) -> bytes:
        """Up to ``count`` bytes at a guest-linear address, page by page (pages need not be contiguous)."""
        assert self.memory is not None
        out = b""
        while len(out) < count:
            physical = vcpu.translate(linear) if paging else linear
            if physical is None or not self.memory.contains(physical):
                break
            region = self.memory.region_of(physical)
            chunk = min(count - len(out), 4096 - (linear & 0xFFF), region.end - physical)
            out += self.memory.read(physical, chunk)
            linear += chunk
        return out

    # -- lifecycle (any thread; transitions are serialized) -------------------------------------------
    def start(self, *, paused: bool = False) -> None:
        """Run the vCPUs; ``paused``: start their threads parked (no guest instruction runs) and the
        devices held, as after :meth:`pause` (a restored VM that is not to resume yet)."""
        with self._state_lock:
            if self.state is not VmState.CONFIGURED or self.vm is None:
                raise StateError(f"cannot start a VM that is {self.state.value}")
            self.events.start()
            if self.console is not None and self.legacy is not None:
                self.console.start(self.legacy.serial.enqueue_input, self.events)
            self._open_stats()
            self.timeline.mark("start")
            if paused:
                if self.devices is not None:
                    self.devices.pause()
                for thread in self.threads:
                    thread.request_pause()
            self.state = VmState.RUNNING
            for thread in self.threads:
                thread.start()
            if not paused and self.devices is not None and self.devices.paused:
                # a restored machine's devices wait for its start; resumed after the vCPU threads started, since
                # resuming wakes the event loop, which would hold the GIL while a new thread waits for it (up to
                # the 5 ms switch interval); the guest's notifications meanwhile are held, not lost
                self.devices.resume()
            if paused:
                for thread in self.threads:
                    thread.wait_paused(5.0)
                self.state = VmState.PAUSED

    def _open_stats(self) -> None:
        """Each vCPU's binary-stats fd, opened before its thread runs: KVM_GET_STATS_FD is a vCPU ioctl and
        waits for the vCPU mutex, which KVM_RUN holds while the guest runs (or halts); reading an open
        stats fd never waits."""
        from kvmlet.kvm.errors import KvmError

        for vcpu in self.vcpus:
            try:
                self._stats_readers[vcpu.id] = vcpu.stats()
            except KvmError:
                pass   # no binary stats on this host: kvmlet's own counters remain

    def run(self, timeout: float | None = None) -> ExitStatus:
        """start() then wait(); stops the VM when ``timeout`` passes."""
        self.start()
        return self.wait(timeout)

    def wait(self, timeout: float | None = None) -> ExitStatus:
        """Block until the VM stops (or stop it after ``timeout`` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._exit_event.is_set():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self._set_exit(ExitStatus(StopKind.STOPPED, f"stopped after the {timeout:g} s timeout", 124))
                break
            self._exit_event.wait(0.2 if remaining is None else min(remaining, 0.2))
        self.stop()
        assert self._exit is not None
        return self._exit

    @property
    def exit_status(self) -> ExitStatus | None:
        return self._exit

    @property
    def exited(self) -> bool:
        """Whether the guest or the VMM has ended the VM (its vCPUs stop, or have stopped)."""
        return self._exit_event.is_set()

    def request_stop(self) -> None:
        """Ask the VM to stop (from any thread, e.g. the console escape)."""
        self._set_exit(ExitStatus(StopKind.STOPPED, "stopped by the user", 130))
        self._stop_vcpus_async()

    def end(self, message: str) -> None:
        """End the VM on the VMM's behalf with a normal status (0), e.g. once it has migrated away."""
        self._set_exit(ExitStatus(StopKind.STOPPED, message, 0))
        self._stop_vcpus_async()

    def pause(self, timeout: float = 5.0) -> None:
        with self._state_lock:
            if self.state is not VmState.RUNNING or self.exited:
                raise StateError(f"cannot pause a VM that is {self._state_name()}")
            for thread in self.threads:
                thread.request_pause()
            for thread in self.threads:
                if not thread.wait_paused(timeout):
                    for other in self.threads:  # leave the VM running, not half paused
                        other.resume()
                    raise MachineError(f"vCPU {thread.vcpu.id} did not pause within {timeout:g} s")
            if self.devices is not None:
                self.devices.pause()    # and the devices: guest memory is still from here on
            self.state = VmState.PAUSED

    def resume(self) -> None:
        with self._state_lock:
            if self.state is not VmState.PAUSED:
                raise StateError(f"cannot resume a VM that is {self._state_name()}")
            if self.devices is not None:
                self.devices.resume()
            for thread in self.threads:
                thread.resume()
            self.state = VmState.RUNNING

    def _state_name(self) -> str:
        return "stopped" if self.exited and self.state is not VmState.CONFIGURED else self.state.value

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every vCPU thread (idempotent)."""
        with self._state_lock:
            if self.state is VmState.STOPPED:
                return
            for thread in self.threads:
                thread.request_stop()
            for thread in self.threads:
                if not thread.join(timeout):
                    raise MachineError(f"vCPU {thread.vcpu.id} did not stop within {timeout:g} s")
            self._set_exit(ExitStatus(StopKind.STOPPED, "stopped by the VMM", 130))
            self.state = VmState.STOPPED

    def snapshot_from_console(self) -> None:
        """The console's Ctrl-A s: pause, save ``kvmlet-<pid>-<n>.snap`` and ``.mem`` in the working directory,
        resume; on a thread of its own (pausing waits for the event loop, which delivered the keys)."""
        threading.Thread(target=self._save_snapshot_here, name="kvmlet-snapshot", daemon=True).start()

    def _save_snapshot_here(self) -> None:
        import os
        from pathlib import Path

        from kvmlet.errors import KvmletError
        from kvmlet.snapshot.create import create_snapshot

        self._console_snapshots += 1
        stem = Path.cwd() / f"kvmlet-{os.getpid()}-{self._console_snapshots}"
        state, memory = stem.with_suffix(".snap"), stem.with_suffix(".mem")
        try:
            was_running = self.state is VmState.RUNNING
            if was_running:
                self.pause()
            try:
                result = create_snapshot(self, state, memory)
            finally:
                if was_running:
                    self.resume()
            message = f"snapshot saved: {state} and {memory} ({result.total_ms:.0f} ms)"
        except KvmletError as exc:
            message = f"snapshot failed: {exc}"
        if self.console is not None:
            self.console.write(f"\r\n[kvmlet: {message}]\r\n".encode())

    def send_ctrl_alt_del(self) -> None:
        """Press and release Ctrl+Alt+Del on the i8042 keyboard (Firecracker's SendCtrlAltDel)."""
        if self.state is not VmState.RUNNING or self.exited or self.legacy is None:
            raise StateError(f"cannot send Ctrl+Alt+Del to a VM that is {self._state_name()}")
        self.legacy.i8042.send_ctrl_alt_del()

    def close(self, wait: bool = True) -> None:
        """Stop the VM and release every thread, fd and mapping it owns.

        ``wait=False``: the kernel's destruction of the VM (see :meth:`kvmlet.kvm.vm.Vm.close`) finishes
        on a background thread after this returns, e.g. when many VMs are created one after another.
        Each step runs even when an earlier one fails; a vCPU thread that cannot be stopped keeps its
        vCPU and guest memory mapped (unmapping them under it would crash the process), the rest is
        released, and MachineError reports what went wrong."""
        problems: list[str] = []

        def attempt(step: str, action: Callable[[], object]) -> None:
            try:
                action()
            except Exception as exc:
                problems.append(f"{step}: {exc}")

        if self.state in (VmState.RUNNING, VmState.PAUSED):
            attempt("stopping the vCPUs", self.stop)
        self.state = VmState.STOPPED
        stuck = any(thread.alive for thread in self.threads)
        if self.console is not None:
            attempt("closing the console", self.console.close)
        if self.devices is not None:
            devices = self.devices
            attempt("closing the devices", lambda: devices.close(release_irqfds=not stuck))
            self.devices = None
        if self.vm is not None and not stuck:
            attempt("closing the VM", lambda: self.vm.close(wait) if self.vm is not None else None)
            self.vm = None
        if self.memory is not None and not stuck:
            attempt("unmapping guest memory", self.memory.close)
            self.memory = None
        if self.kvm is not None:
            attempt("closing /dev/kvm", self.kvm.close)
            self.kvm = None
        for reader in self._stats_readers.values():
            reader.close()
        self._stats_readers = {}
        if not stuck:
            self.vcpus = []
        if problems:
            raise MachineError("closing the VM: " + "; ".join(problems))

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- statistics ---------------------------------------------------------------------------------
    def exit_statistics(self) -> list[dict[str, object]]:
        """Per vCPU: KVM's binary stats (exits and friends) and kvmlet's own exit counters."""
        out: list[dict[str, object]] = []
        for vcpu, thread in zip(self.vcpus, self.threads, strict=True):
            kvm_stats: dict[str, int] = {}
            reader = self._stats_readers.get(vcpu.id)
            if reader is not None:
                kvm_stats = reader.read()
            elif vcpu.fd >= 0 and not thread.alive:   # never started: no KVM_RUN holds the vCPU
                reader = vcpu.stats()
                try:
                    kvm_stats = reader.read()
                finally:
                    reader.close()
            out.append({"vcpu": vcpu.id, "kvm": kvm_stats, "kvmlet": dict(thread.counters.exits)})
        return out
