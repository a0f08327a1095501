"""The sending side: pre-copy of a running VM's memory, the switchover, the handover.

On a thread of its own (the stream is CPU work in Python: on the event loop it would hold up the devices):

1. connect, exchange preambles, send ``Hello`` (configuration, memory layout, the CPU kvmlet gave the vCPUs
   and its features); the destination answers ``Refuse`` (its CPU gate, or a machine it cannot build) or
   ``Accept`` before any memory moves;
2. turn dirty logging on and send every page (round 0), then the pages dirtied meanwhile, round after
   round, until the pages left would take less than the downtime limit at the rate measured so far, or
   the round limit is reached; with auto-converge the vCPUs are throttled step by step while the guest
   dirties more than half of what the link carries, twice in a row (QEMU's policy);
3. switchover: flush the drives, pause the VM (vCPUs, devices), flush again, send the last dirty pages,
   every state section and ``Complete``; wait for ``Ready`` (the destination restored it, paused);
4. send ``Go``: from here on the destination owns the VM; on ``Running`` the source ends its VM.

Until ``Go`` any failure or a cancel leaves the source running as before (resumed if it was paused here,
dirty logging as it was, throttling off). After ``Go`` without ``Running`` the outcome is unknown: the
source VM stays paused, never resumed by kvmlet, so that two copies never run.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmlet import __version__
from kvmlet.errors import KvmletError, StateError
from kvmlet.memory import PAGE_SIZE
from kvmlet.migration.pages import PageSender, Run, merge_dirty
from kvmlet.migration.params import Address, MigrationSendParams
from kvmlet.migration.status import MigrationReport, MigrationStatus
from kvmlet.migration.stream import (
    Accept,
    Cancel,
    Channel,
    Complete,
    CpuOffer,
    Error,
    Go,
    Hello,
    Message,
    MigrationError,
    Pages,
    Ready,
    Refuse,
    Running,
    State,
    connect,
)

if TYPE_CHECKING:
    from kvmlet.machine import Machine
    from kvmlet.vcpu_runner import VcpuThread

log = logging.getLogger("kvmlet.migration")
MiB = 1 << 20


class Cancelled(MigrationError):
    """The user cancelled the migration."""


# -- auto-converge --------------------------------------------------------------------------------------------
class AutoConverge:
    """QEMU's auto-converge policy: when the bytes the guest dirtied during a round exceed ``threshold`` of
    the bytes sent in it, for the second time, throttle the vCPUs (``initial`` % first, ``step`` % more
    each time after, at most ``maximum`` %)."""

    def __init__(self, initial: int = 20, step: int = 10, maximum: int = 99, threshold: float = 0.5) -> None:
        self.initial, self.step, self.maximum, self.threshold = initial, step, maximum, threshold
        self.pct = 0
        self._high = 0

    def update(self, dirtied_bytes: int, sent_bytes: int) -> int:
        """After a round: the throttle to use from now on (per cent of each vCPU's time kept out of the guest)."""
        if dirtied_bytes > sent_bytes * self.threshold:
            self._high += 1
            if self._high >= 2:
                self._high = 0
                self.pct = self.initial if self.pct == 0 else min(self.maximum, self.pct + self.step)
        return self.pct


def switchover_due(expected_ms: float, limit_ms: float, pages: int, previous: int, rounds: int,
                   max_rounds: int) -> bool:
    """Whether to pause now, with ``pages`` dirty (``previous``: what the round before had to send) after
    ``rounds`` passes: at the round limit; or once the expected downtime is within the limit and another
    round would not help (it is under a tenth of the limit, or the rounds stopped halving the rest). What is
    left at the pause is the downtime, and a round more costs the guest only the dirty logging."""
    if rounds >= max_rounds:
        return True
    return expected_ms <= limit_ms and (expected_ms <= limit_ms / 10 or pages * 2 > previous)


class Throttler:
    """Keeps each vCPU out of the guest ``pct`` % of the time: every 10 ms time slice of guest time it is
    kicked out of KVM_RUN and sleeps ``slice * pct / (100 - pct)``."""

    TIMESLICE = 0.010

    def __init__(self, threads: list[VcpuThread]) -> None:
        self.threads = threads
        self.pct = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set(self, pct: int) -> None:
        self.pct = max(0, min(99, pct))
        if self.pct and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kvmlet-throttle", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self.pct = 0
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            pct = self.pct
            sleep = self.TIMESLICE * pct / (100 - pct) if pct else 0.0
            if sleep:
                for thread in self.threads:
                    thread.throttle(sleep)
            self._stop.wait(self.TIMESLICE + sleep)


# -- the source ---------------------------------------------------------------------------------------------
def cpu_offer(machine: Machine) -> CpuOffer:
    """The CPU kvmlet gave the VM's vCPUs (the plan it set, not a KVM_GET_CPUID2 read-back: under PVM that
    returns PVM's own values for some leaves); a machine built without one (restored from a snapshot) gets
    its configuration's plan on this host, which the restore checked the saved CPUID against."""
    from kvmlet.cpu.capture import cpu_vendor
    from kvmlet.cpu.features import sorted_features

    plan = machine.cpu_plan
    if plan is None:
        from kvmlet.cpu.plan import plan_cpu

        assert machine.kvm is not None
        plan = plan_cpu(machine.kvm, machine.config.machine_config.cpu_template, machine.config.cpu_config)
        machine.cpu_plan = plan
    return CpuOffer(plan.name, cpu_vendor(list(plan.cpuid)), list(plan.cpuid), dict(plan.msrs),
                    sorted_features(plan.features))


def flush_drives(machine: Machine) -> None:
    """Make every write the drives completed stable (fdatasync): the destination opens the same files."""
    from kvmlet.devices.virtio.blk import VirtioBlock

    if machine.devices is None:
        return
    for device in machine.devices.of_type(VirtioBlock):
        device.backend.flush()


def release_memory(machine: Machine) -> None:
    """Give the ended VM's RAM back to the host (its mappings stay valid and read as zeros)."""
    memory = machine.memory
    if memory is None:
        return
    advice = getattr(mmap, "MADV_REMOVE" if memory.private_file is None else "MADV_DONTNEED", None)
    if advice is None:
        return
    for region in memory.regions:
        with contextlib.suppress(OSError, ValueError):
            region.mapping.madvise(advice)


class MigrationSource:
    """One outgoing migration of ``machine`` (``start()`` runs it on a thread; ``status()`` any time)."""

    def __init__(self, machine: Machine, params: MigrationSendParams, address: Address, *, vm_id: str,
                 on_end: Callable[[MigrationSource], None] | None = None) -> None:
        self.machine = machine
        self.params = params
        self.address = address
        self.vm_id = vm_id
        self.on_end = on_end
        self.started = time.perf_counter()
        self._status = MigrationStatus(state="active", role="source", phase="connecting", peer=str(address))
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._committed = False
        self._channel: Channel | None = None
        self._thread = threading.Thread(target=self._main, name="kvmlet-migrate", daemon=True)
        self._round = 0
        self._throttler = Throttler(machine.threads)
        self._bandwidth_bytes = 0
        self._bandwidth_seconds = 0.0
        self._pace_from = 0.0
        self._pace_bytes = 0
        self._sender: PageSender | None = None
        self._tracking = ""           # "started": logging turned on here; "taken": it was on, pages were taken
        self._paused_here = False

    # -- control (any thread) --
    def start(self) -> None:
        log.info("Migration to %s started", self.address)
        self._thread.start()

    @property
    def active(self) -> bool:
        return not self._done.is_set()

    def cancel(self) -> None:
        if self._done.is_set():
            raise StateError(f"the migration has ended ({self._status.state}): nothing to cancel")
        if self._committed:
            raise StateError("too late to cancel: the destination has been told to run the VM")
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def status(self) -> MigrationStatus:
        status = self._status
        if status.report is None:
            status.elapsed_ms = round((time.perf_counter() - self.started) * 1000, 3)
        status.throttle_pct = self._throttler.pct
        return status

    # -- the thread --
    def _main(self) -> None:
        outcome, error = "completed", None
        try:
            report = self._migrate()
        except Cancelled:
            outcome, error, report = "cancelled", "cancelled by the user", None
        except KvmletError as exc:
            outcome, error, report = "failed", str(exc), None
        except Exception as exc:   # a bug: say what it was, keep the source VM
            log.exception("migration to %s failed", self.address)
            outcome, error, report = "failed", f"{type(exc).__name__}: {exc}", None
        if outcome != "completed":
            error = self._recover(outcome, error)
            report = self._partial_report(outcome)
        status = self._status
        status.state = outcome   # type: ignore[assignment]
        status.phase = "done"
        status.error = error
        status.report = report
        if report is not None:
            status.elapsed_ms, status.bytes = report.total_ms, report.bytes
        if outcome == "completed":
            assert report is not None
            log.info("Migration to %s completed: %.1f ms in all, %.1f ms of downtime, %d bytes, %d rounds, "
                     "throttle %d %%", self.address, report.total_ms, report.downtime_ms, report.bytes,
                     report.rounds, report.throttle_pct)
        else:
            log.warning("Migration to %s %s: %s", self.address, outcome, error)
        self._done.set()
        if self.on_end is not None:
            self.on_end(self)

    def _recover(self, outcome: str, error: str | None) -> str | None:
        """After a failure or a cancel: the source as it was, unless the destination may already run it."""
        machine = self.machine
        self._throttler.stop()
        channel = self._channel
        if channel is not None:
            if outcome == "cancelled":
                with contextlib.suppress(KvmletError):
                    channel.send(Cancel("cancelled by the user"))
            channel.close()
        dirty_log = machine.dirty_log
        if dirty_log is not None and self._tracking == "started":
            with contextlib.suppress(OSError, KvmletError):
                dirty_log.stop()
        elif self._tracking == "taken" and machine.memory is not None:
            # the VM tracks dirty pages for diff snapshots and this migration took them: the next diff has all
            machine.memory.requeue_dirty([bytearray(b"\1") * (r.size // PAGE_SIZE) for r in machine.memory.regions])
        if self._committed:
            return (f"{error}; the destination was told to run the VM and did not confirm: the source VM stays "
                    "paused (resume it only if the destination has no VM)")
        if self._paused_here and not machine.exited:
            try:
                machine.resume()
            except KvmletError as exc:
                return f"{error}; resuming the source VM failed: {exc}"
        return error

    # -- the migration --
    def _migrate(self) -> MigrationReport:
        machine, params, status = self.machine, self.params, self._status
        assert machine.memory is not None and machine.dirty_log is not None
        memory, dirty_log = machine.memory, machine.dirty_log
        self._channel = channel = connect(self.address, params.tls, params.timeout_s)
        status.phase = "handshake"
        channel.send_preamble()
        channel.expect_preamble("destination")
        from kvmlet.snapshot.create import snapshot_config

        channel.send(Hello(__version__, self.vm_id, snapshot_config(machine),
                           [(r.gpa, r.size) for r in memory.regions], cpu_offer(machine), params.verify_memory))
        answer = self._receive(channel, "the CPU gate")
        if isinstance(answer, Refuse):
            status.missing_features = answer.missing
            raise MigrationError(f"the destination refused the VM: {answer.reason}")
        if not isinstance(answer, Accept):
            raise MigrationError(f"the destination answered {type(answer).__name__} to Hello")
        self._check()
        setup_done = time.perf_counter()

        status.phase = "precopy"
        if not dirty_log.enabled:
            dirty_log.start()
            self._tracking = "started"
        else:
            self._tracking = "taken"
            dirty_log.take()   # what diff snapshots had not taken yet is sent now anyway; requeued on failure
        self._sender = sender = PageSender(memory, self._emit)
        from kvmlet.snapshot.memory_file import region_data_spans

        self._pace_from, self._pace_bytes = time.perf_counter(), channel.bytes_sent
        round_started, round_bytes = time.perf_counter(), channel.bytes_sent
        sender.first_pass(lambda index: region_data_spans(memory, memory.regions[index]))
        self._count(sender)
        policy = AutoConverge()
        previous = sender.counts.data          # pages the last round had to send
        while True:
            self._check()
            dirty = dirty_log.take()
            now = time.perf_counter()
            pages = sum(region.count(1) for region in dirty)
            sent = channel.bytes_sent - round_bytes
            seconds = max(now - round_started, 1e-6)
            self._bandwidth_bytes += sent
            self._bandwidth_seconds += seconds
            rate = self._bandwidth_bytes / max(self._bandwidth_seconds, 1e-6)
            status.dirty_pages = pages
            status.dirty_rate_pages_s = round(pages / seconds, 1)
            status.bandwidth_mib_s = round(rate / MiB, 3)
            status.remaining_bytes = pages * PAGE_SIZE
            expected = pages * PAGE_SIZE / rate * 1000 if rate > 0 else float("inf")
            status.expected_downtime_ms = round(expected, 3) if expected != float("inf") else None
            if params.auto_converge and self._round >= 1:
                self._throttler.set(policy.update(pages * PAGE_SIZE, sent))
                status.throttle_pct = self._throttler.pct
            if switchover_due(expected, params.downtime_limit_ms, pages, previous, self._round + 1, params.max_rounds):
                break
            previous = pages
            self._round += 1
            status.round = self._round
            round_started, round_bytes = now, channel.bytes_sent
            sender.send_dirty(dirty)
            self._count(sender)
        max_throttle = max(policy.pct, self._throttler.pct)

        # -- the switchover --
        status.phase = "switchover"
        flush_drives(machine)                  # most of it while the guest still runs
        paused_at = time.perf_counter()
        precopy_ms = (paused_at - setup_done) * 1000
        from kvmlet.machine import VmState

        was_running = machine.state is VmState.RUNNING
        if machine.exited:
            raise MigrationError("the guest ended during the migration")
        self._throttler.stop()
        if was_running:
            machine.pause()
            self._paused_here = True
        flush_drives(machine)
        pause_done = time.perf_counter()
        merge_dirty(dirty, dirty_log.take())
        self._round += 1
        status.round = self._round
        sender.send_dirty(dirty, hashed=False)   # paused: no time to spend on unchanged-page hashes
        self._count(sender)
        last_round_done = time.perf_counter()
        from kvmlet.migration.pages import memory_digest
        from kvmlet.snapshot.sections import capture_machine_state

        state = capture_machine_state(machine)
        digest = memory_digest(memory) if params.verify_memory else None
        status.memory_sha256 = digest
        channel.send(State(state.encoded()))
        channel.send(Complete(resume=was_running, memory_sha256=digest))
        state_done = time.perf_counter()
        ready = self._receive(channel, "the restore")
        if not isinstance(ready, Ready):
            raise MigrationError(f"the destination answered {type(ready).__name__} to Complete")
        self._check()
        status.phase = "handover"
        ready_at = time.perf_counter()
        self._committed = True
        channel.send(Go())
        running = self._receive(channel, "the VM's start")
        if not isinstance(running, Running):
            raise MigrationError(f"the destination answered {type(running).__name__} to Go")
        running_at = time.perf_counter()
        channel.close()

        machine.end(f"migrated to {self.address}")
        with contextlib.suppress(KvmletError):
            machine.stop()
        release_memory(machine)
        counts = sender.counts
        return MigrationReport(
            outcome="completed", total_ms=(running_at - self.started) * 1000,
            downtime_ms=(running_at - paused_at) * 1000, setup_ms=(setup_done - self.started) * 1000,
            precopy_ms=precopy_ms, rounds=self._round + 1, bytes=channel.bytes_sent,
            memory_bytes=counts.data * PAGE_SIZE, pages_data=counts.data, pages_zero=counts.zero,
            pages_unchanged=counts.same, throttle_pct=max_throttle, pause_ms=(pause_done - paused_at) * 1000,
            last_round_ms=(last_round_done - pause_done) * 1000, state_ms=(state_done - last_round_done) * 1000,
            restore_ms=ready.restore_ms, handover_ms=(running_at - ready_at) * 1000, memory_sha256=digest)

    def _partial_report(self, outcome: str) -> MigrationReport:
        status = self._status
        channel = self._channel
        return MigrationReport(outcome=outcome, total_ms=(time.perf_counter() - self.started) * 1000,
                               downtime_ms=0.0, rounds=self._round + 1 if status.pages_data + status.pages_zero else 0,
                               bytes=channel.bytes_sent if channel is not None else 0,
                               memory_bytes=status.memory_bytes, pages_data=status.pages_data,
                               pages_zero=status.pages_zero, pages_unchanged=status.pages_unchanged,
                               throttle_pct=status.throttle_pct)

    def _count(self, sender: PageSender) -> None:
        status, counts = self._status, sender.counts
        status.pages_data, status.pages_zero, status.pages_unchanged = counts.data, counts.zero, counts.same
        status.memory_bytes = counts.data * PAGE_SIZE
        if self._channel is not None:
            status.bytes = self._channel.bytes_sent

    def _emit(self, runs: list[Run], pieces: list[memoryview]) -> None:
        """Send one frame of pages; between frames: the destination's errors, a cancel, the bandwidth cap."""
        channel = self._channel
        assert channel is not None
        self._check()
        if channel.pending():
            self._answer_while_streaming(channel)
        try:
            channel.send(Pages(self._round, runs), pieces)
        except MigrationError as exc:
            raise MigrationError(self._destination_reason(channel) or str(exc)) from None
        if self._sender is not None:
            self._count(self._sender)
        cap = self.params.max_bandwidth_mib_s
        if cap and self._status.phase == "precopy":   # the switchover is not paced (as QEMU's completion)
            ahead = (channel.bytes_sent - self._pace_bytes) / (cap * MiB) - (time.perf_counter() - self._pace_from)
            if ahead > 0 and self._cancel.wait(ahead):
                raise Cancelled("cancelled")

    def _answer_while_streaming(self, channel: Channel) -> None:
        message, _ = channel.receive()
        if isinstance(message, Error | Refuse):
            raise MigrationError(f"the destination gave up: {message.reason}")
        raise MigrationError(f"the destination sent {type(message).__name__} while pages were streaming")

    def _destination_reason(self, channel: Channel) -> str | None:
        """After a failed send: the error the destination sent before it closed, if any."""
        try:
            message, _ = channel.receive(timeout=0.5)
        except KvmletError:
            return None
        if isinstance(message, Error | Refuse):
            return f"the destination gave up: {message.reason}"
        return None

    def _receive(self, channel: Channel, what: str) -> Message:
        message, _ = channel.receive()
        if isinstance(message, Error):
            raise MigrationError(f"the destination failed during {what}: {message.reason}")
        return message

    def _check(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("cancelled")
        if self.machine.exited:
            raise MigrationError("the guest ended during the migration")
