"""The receiving side: wait for a migration, check the VM's CPU against this host, rebuild the VM, run it.

For each connection (one at a time):

1. preambles, then ``Hello``: the **CPU gate** compares the CPU kvmlet gave the source's vCPUs with this
   host's capture (``kvmlet.cpu.compat.missing_features``, or a capture file given to the listener) and
   answers ``Refuse`` naming the missing features, before any memory moves; then the machine is built
   from the VM's configuration (memory, devices, vCPUs; paused, empty): a drive or TAP this host cannot open
   is a ``Refuse`` too; else ``Accept``;
2. pages, round after round, into the new memory; the state sections; ``Complete``;
3. with ``verify_memory`` the memory's digest is compared with the source's; the state is restored
   (devices, VM, vCPUs, each vCPU's CPUID checked again as a snapshot restore does); ``Ready``;
4. on ``Go`` the VM starts (paused if it was paused on the source) and ``Running`` goes back.

Any failure before ``Go`` (a damaged frame, the source gone or silent for the timeout, a cancel, a state
that does not fit) discards everything: the machine, its memory (a memfd: no file), the connection; the
listener waits for the next attempt (``kvmlet serve --migrate-listen``) or ends (``kvmlet migrate listen``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from kvmlet import __version__
from kvmlet.errors import KvmletError
from kvmlet.memory import PAGE_SIZE
from kvmlet.migration.pages import PageCounts, apply_pages, memory_digest
from kvmlet.migration.params import ListenOptions
from kvmlet.migration.status import MigrationReport, MigrationStatus
from kvmlet.migration.stream import (
    Accept,
    Cancel,
    Channel,
    Complete,
    Error,
    Go,
    Hello,
    Listener,
    MigrationError,
    Pages,
    Ready,
    Refuse,
    Running,
    State,
    StreamError,
    server_context,
)

if TYPE_CHECKING:
    from kvmlet.cpu.capture import HostCapture
    from kvmlet.cpu.plan import CpuPlan
    from kvmlet.devices.legacy.console import Console
    from kvmlet.eventloop import EventLoopThread
    from kvmlet.kvm.cpuid import CpuidEntry
    from kvmlet.machine import Machine
    from kvmlet.memory import GuestMemory

log = logging.getLogger("kvmlet.migration")


class Refused(MigrationError):
    """This host refused the VM (the source was told why)."""


class Incoming:
    """Receives migrations on one address, one at a time, until one has completed (``on_machine`` gets
    its running machine) or ``close()``; with ``once`` it also ends after the first failed attempt."""

    def __init__(self, options: ListenOptions, events: EventLoopThread, *, on_machine: Callable[[Machine], None],
                 console_spec: str | None = None, console: Console | None = None, once: bool = False) -> None:
        self.options = options
        self.events = events
        self.on_machine = on_machine
        self.console_spec = console_spec
        self.console = console
        self.once = once
        self.capture: HostCapture | None = None
        self.machine: Machine | None = None
        self.listener: Listener | None = None
        self._status = MigrationStatus(state="listening", role="destination", phase=None)
        self._closed = threading.Event()
        self._done = threading.Event()
        self._channel: Channel | None = None
        self._thread = threading.Thread(target=self._loop, name="kvmlet-migrate-in", daemon=True)

    # -- control --
    def start(self) -> None:
        """Load the CPU capture (this host's unless a file was given) and listen; MigrationError (or a
        ConfigError for the options) if either cannot be done."""
        from kvmlet.cpu.capture import capture_host, load_capture

        self.options.validate()
        try:
            self.capture = load_capture(self.options.cpu_capture) if self.options.cpu_capture is not None \
                else capture_host()
        except OSError as exc:      # no /dev/kvm, or KVM refused an ioctl
            raise MigrationError(f"cannot capture this host's CPU for the migration gate: {exc}") from None
        warm_up(self.capture)
        context = None
        if self.options.tls_cert is not None:
            try:
                context = server_context(str(self.options.tls_cert),
                                         str(self.options.tls_key) if self.options.tls_key else None,
                                         str(self.options.tls_ca) if self.options.tls_ca else None)
            except (OSError, ValueError) as exc:
                raise MigrationError(f"migration TLS: {exc}") from None
        self.listener = Listener(self.options.address, context, self.options.timeout_s)
        self._status.listen_address = str(self.listener.bound)
        log.info("Waiting for an incoming migration on %s", self.listener.bound)
        self._thread.start()

    @property
    def waiting(self) -> bool:
        """Listening or receiving: no VM of its own yet."""
        return not self._done.is_set()

    def status(self) -> MigrationStatus:
        return self._status

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def close(self) -> None:
        self._closed.set()
        channel = self._channel
        if channel is not None:
            channel.close()
        if self._thread.is_alive():
            self._thread.join(10)
        if self.listener is not None:
            self.listener.close()
        self._done.set()

    # -- the thread --
    def _loop(self) -> None:
        assert self.listener is not None
        try:
            while not self._closed.is_set():
                try:
                    channel = self.listener.accept(0.2)
                except MigrationError as exc:       # a TLS handshake that failed
                    self._failed(None, str(exc))
                    if self.once:
                        return
                    continue
                if channel is None:
                    continue
                self._channel = channel
                try:
                    machine = self._receive(channel)
                except KvmletError as exc:
                    self._failed(channel.peer, str(exc))
                    if self.once:
                        return
                    continue
                except Exception as exc:   # a bug: the attempt is discarded, the listener goes on
                    log.exception("incoming migration from %s", channel.peer)
                    self._failed(channel.peer, f"{type(exc).__name__}: {exc}")
                    if self.once:
                        return
                    continue
                finally:
                    self._channel = None
                self.machine = machine
                self.listener.close()
                self.on_machine(machine)
                return
        finally:
            self._done.set()

    def _failed(self, peer: str | None, error: str) -> None:
        log.warning("Incoming migration%s failed: %s", f" from {peer}" if peer else "", error)
        status = self._status
        status.state = "failed" if self.once else "listening"
        status.phase = None
        status.error = error

    # -- one attempt --
    def _receive(self, channel: Channel) -> Machine:
        started = time.perf_counter()
        listen_address = self._status.listen_address
        status = self._status = MigrationStatus(state="active", role="destination", phase="handshake",
                                                peer=channel.peer, listen_address=listen_address)
        machine: Machine | None = None
        memory: GuestMemory | None = None
        told = False    # the source already knows why (a refusal, or it cancelled)
        try:
            channel.expect_preamble("source")
            channel.send_preamble()
            hello, _ = channel.receive()
            if isinstance(hello, Cancel | Error):
                told = True
                raise MigrationError(f"the source gave up: {hello.reason}")
            if not isinstance(hello, Hello):
                raise StreamError(f"{channel.peer} sent {type(hello).__name__} first, not Hello")
            plan = self._gate(channel, hello)
            try:
                machine, memory, supported = self._build(hello, plan)
            except (KvmletError, ValueError, OSError) as exc:
                reason = f"this host cannot build the VM: {exc}"
                channel.send(Refuse(reason))
                told = True
                raise Refused(reason) from None
            capture = self.capture
            channel.send(Accept(__version__, capture.description if capture is not None else "this host"))
            setup_done = time.perf_counter()
            status.phase = "precopy"
            counts, sections, complete = self._receive_memory(channel, memory, status)
            complete_at = time.perf_counter()
            status.phase = "switchover"
            digest = None
            if hello.verify_memory or complete.memory_sha256 is not None:
                digest = memory_digest(memory)
                status.memory_sha256 = digest
                if complete.memory_sha256 is not None and digest != complete.memory_sha256:
                    raise MigrationError(f"the memory received hashes to {digest[:16]}..., the source's to "
                                         f"{complete.memory_sha256[:16]}...: refusing to run it")
            self._restore(machine, sections, supported, channel.peer)
            restore_ms = (time.perf_counter() - complete_at) * 1000
            channel.send(Ready(restore_ms, digest))
            status.phase = "handover"
            go, _ = channel.receive()
            if isinstance(go, Cancel | Error):
                told = True
                raise MigrationError(f"the source gave up: {go.reason}")
            if not isinstance(go, Go):
                raise StreamError(f"{channel.peer} sent {type(go).__name__}, not Go")
            if complete.resume:
                machine.resume()
        except KvmletError as exc:
            answer = not told and not isinstance(exc, Refused) and not (isinstance(exc, StreamError) and exc.gone)
            if answer:      # tell the source why (a damaged frame, a state that does not fit...) before closing
                try:
                    channel.send(Error(str(exc)))
                except KvmletError:
                    answer = False
            if answer or told:
                channel.close_gracefully()
            else:
                channel.close()
            _discard(machine, memory)
            raise
        except BaseException:
            channel.close()
            _discard(machine, memory)
            raise
        with contextlib.suppress(KvmletError):
            channel.send(Running())
        channel.close()
        running_at = time.perf_counter()
        status.state = "completed"
        status.phase = "done"
        status.report = MigrationReport(
            outcome="completed", total_ms=(running_at - started) * 1000,
            downtime_ms=(running_at - complete_at) * 1000, setup_ms=(setup_done - started) * 1000,
            precopy_ms=(complete_at - setup_done) * 1000, rounds=status.round + 1, bytes=channel.bytes_received,
            memory_bytes=counts.data * PAGE_SIZE, pages_data=counts.data, pages_zero=counts.zero,
            pages_unchanged=counts.same, restore_ms=restore_ms, memory_sha256=digest)
        status.elapsed_ms = status.report.total_ms
        log.info("Incoming migration from %s completed: %d bytes in %.1f ms, restored in %.1f ms", channel.peer,
                 channel.bytes_received, status.report.total_ms, restore_ms)
        return machine

    def _gate(self, channel: Channel, hello: Hello) -> CpuPlan:
        """The FlexMigration gate: refuse (and tell the source) a CPU this host cannot provide."""
        from kvmlet.cpu.compat import missing_features
        from kvmlet.cpu.plan import CpuPlan

        assert self.capture is not None
        offer = hello.cpu
        plan = CpuPlan(offer.name, tuple(offer.cpuid), dict(offer.msrs))
        missing = missing_features(plan, self.capture)
        if missing:
            where = self.capture.description or "this host"
            reason = f"{where} cannot provide the VM's CPU ({offer.name}): it lacks {' '.join(missing)}"
            channel.send(Refuse(reason, missing))
            raise Refused(f"refused the VM from {channel.peer}: {reason}")
        return plan

    def _build(self, hello: Hello, plan: CpuPlan) -> tuple[Machine, GuestMemory, list[CpuidEntry]]:
        """The machine the VM lands in: its configuration's devices on this host, paused, empty memory."""
        from kvmlet.config.models import VmConfig
        from kvmlet.machine import Machine
        from kvmlet.machine.builder import open_kvm
        from kvmlet.memory import GuestMemory
        from kvmlet.snapshot.restore import build_without_boot, override_config

        try:
            config = msgspec.convert(hello.config, VmConfig)
        except msgspec.ValidationError as exc:
            raise MigrationError(f"its configuration cannot be read: {exc}") from None
        config = override_config(config, console=self.console_spec, what="the VM")
        if sum(size for _, size in hello.memory) != config.machine_config.memory_bytes:
            raise MigrationError("its memory regions do not add up to its mem_size_mib")
        machine = Machine(config, self.events, self.console)
        try:
            open_kvm(machine, restoring=True)
            assert machine.kvm is not None
            supported = machine.kvm.supported_cpuid()
            memory = GuestMemory(hello.memory)
            build_without_boot(machine, memory)
            # the vCPU threads start now, parked before their first entry (KVM_RUN returns at once with
            # immediate_exit set: nothing runs), so that the switchover only sets state and resumes
            machine.start(paused=True)
        except BaseException:
            _discard(machine, None)
            raise
        machine.cpu_plan = plan
        return machine, memory, supported

    def _receive_memory(self, channel: Channel, memory: GuestMemory,
                        status: MigrationStatus) -> tuple[PageCounts, dict[str, bytes], Complete]:
        counts = PageCounts()
        sections: dict[str, bytes] | None = None
        while True:
            if self._closed.is_set():
                raise MigrationError("the listener was closed")
            message, data = channel.receive()
            if isinstance(message, Pages):
                try:
                    got = apply_pages(memory, message.runs, data, first_pass=message.round == 0)
                except ValueError as exc:
                    raise MigrationError(f"round {message.round}: {exc}") from None
                counts.data += got.data
                counts.zero += got.zero
                counts.same += got.same
                status.round = message.round
                status.bytes = channel.bytes_received
                status.memory_bytes = counts.data * PAGE_SIZE
                status.pages_data, status.pages_zero, status.pages_unchanged = counts.data, counts.zero, counts.same
            elif isinstance(message, State):
                sections = message.sections
            elif isinstance(message, Complete):
                if sections is None:
                    raise MigrationError("the source completed without sending the VM's state")
                return counts, sections, message
            elif isinstance(message, Cancel):
                raise _Told(f"the source cancelled the migration: {message.reason}")
            elif isinstance(message, Error):
                raise _Told(f"the source gave up: {message.reason}")
            else:
                raise StreamError(f"{channel.peer} sent {type(message).__name__} while pages were expected")

    def _restore(self, machine: Machine, sections: dict[str, bytes], supported: list[CpuidEntry], peer: str) -> None:
        from kvmlet.snapshot.restore import apply_machine_state
        from kvmlet.snapshot.sections import decode_section, read_machine_state

        def section(name: str, model: type) -> object:
            try:
                return decode_section(sections, name, model)
            except KeyError:
                raise MigrationError(f"the VM's state has no section {name!r}") from None
            except msgspec.MsgspecError as exc:
                raise MigrationError(f"the VM's state section {name!r} cannot be read: {exc}") from None

        state = read_machine_state(section, machine.config.machine_config.vcpu_count)
        try:
            apply_machine_state(machine, state, supported, f"migration from {peer}")
        except ValueError as exc:
            raise MigrationError(f"the VM's state does not fit: {exc}") from None


def warm_up(capture: HostCapture) -> None:
    """Import and run once what a migration's set-up and switchover use (the gate, the builder, the state
    decoders), so that the first migration does not pay for it."""
    from kvmlet.cpu.compat import missing_features
    from kvmlet.cpu.plan import CpuPlan
    from kvmlet.machine.builder import preload as preload_builder
    from kvmlet.snapshot.restore import preload as preload_restore

    missing_features(CpuPlan("warm-up", capture.cpuid), capture)
    preload_builder()
    preload_restore()


class _Told(Refused):
    """The source ended the attempt itself (it knows why)."""


def _discard(machine: Machine | None, memory: GuestMemory | None) -> None:
    """Release a machine that will not run (and its memory), or memory no machine took."""
    from kvmlet.machine import MachineError

    if machine is not None:
        owned = machine.memory is not None
        try:
            machine.close()
        except MachineError as exc:
            log.warning("discarding the incoming VM: %s", exc)
        if owned:
            return
    if memory is not None:
        with contextlib.suppress(KvmletError):
            memory.close()
