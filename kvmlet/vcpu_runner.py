"""The vCPU thread: KVM_RUN in a loop, each exit to user space dispatched on the bus.

Control (pause, stop) reaches a vCPU blocked in KVM_RUN through ``immediate_exit`` plus a signal
sent to its thread; the thread then parks or returns, it is never killed.
"""

from __future__ import annotations

import errno
import fcntl
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmlet.devices.bus import Bus
from kvmlet.kvm import constants as c
from kvmlet.kvm import structs as s
from kvmlet.kvm.vcpu import Vcpu
from kvmlet.vcpu_kick import KICK_SIGNAL

_EXIT_IO = struct.Struct("<I20xBBHIQ")  # exit_reason at 8, then the io exit at 32: one unpack per exit
_MMIO = struct.Struct("<QQIB")  # phys_addr, data (u8[8] read as one little-endian u64), len, is_write
_MASKS = tuple((1 << (8 * size)) - 1 for size in range(9))  # by access size in bytes


@dataclass
class VcpuStop:
    """Why a vCPU stopped running the guest."""

    kind: str  # "reset", "shutdown", "triple-fault", "internal-error", "fail-entry", "error", "stopped"
    message: str
    status: int = 0


@dataclass
class VcpuCounters:
    """kvmlet's own per-vCPU counters of exits handled in user space, by reason name."""

    exits: dict[str, int] = field(default_factory=dict)


class VcpuThread:
    """Runs one vCPU on its own thread until the guest or the VMM stops it."""

    def __init__(self, vcpu: Vcpu, pio: Bus, mmio: Bus, on_stop: Callable[[VcpuStop], None],
                 describe_failure: Callable[[Vcpu], str] | None = None) -> None:
        self.vcpu = vcpu
        self.pio = pio
        self.mmio = mmio
        self.on_stop = on_stop
        self.describe_failure = describe_failure
        self.counters = VcpuCounters()
        self._thread = threading.Thread(target=self._main, name=f"kvmlet-vcpu{vcpu.id}", daemon=True)
        self._control = threading.Condition()
        self._pause_requested = False
        self._stop_requested = False
        self.paused = False
        self._throttle = 0.0            # seconds to stay out of the guest at the next kick (auto-converge)
        self.throttled_seconds = 0.0    # how long throttling kept the vCPU out of the guest
        self.first_run_at: float | None = None
        self.stop: VcpuStop | None = None

    # -- control from other threads -----------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def _kick(self) -> None:
        if self.vcpu.fd < 0 or self.stop is not None:  # closed, or the loop has ended: nothing to kick
            return
        self.vcpu.set_immediate_exit(True)
        ident = self._thread.ident
        if ident is not None and self._thread.is_alive() and self.stop is None:
            try:
                signal.pthread_kill(ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def request_pause(self) -> None:
        with self._control:
            self._pause_requested = True
            self._control.notify_all()    # ends a throttle sleep
        self._kick()

    def throttle(self, seconds: float) -> None:
        """Keep the vCPU out of the guest for ``seconds`` (a migration's auto-converge): it is kicked out of
        KVM_RUN and sleeps before it goes back in. The exit path is untouched: the sleep happens where a
        kick is handled. A pause or stop ends the sleep."""
        with self._control:
            self._throttle = seconds
        self._kick()

    def wait_paused(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._control:
            while not self.paused and self._thread.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._control.wait(remaining)
                if not self.paused:
                    self._kick()
        return True

    def resume(self) -> None:
        with self._control:
            self._pause_requested = False
            self._control.notify_all()

    def request_stop(self) -> None:
        with self._control:
            self._stop_requested = True
            self._control.notify_all()
        self._kick()

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._thread.is_alive():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._thread.join(min(remaining, 0.05))
            if self._thread.is_alive():
                self._kick()
        return True

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the vCPU thread ----------------------------------------------------------------------------
    def _park(self) -> bool:
        """Handle a kick: sleep if throttled, park while paused. Returns False when the thread must end."""
        self.vcpu.set_immediate_exit(False)
        with self._control:
            sleep, self._throttle = self._throttle, 0.0
            if sleep > 0 and not self._stop_requested and not self._pause_requested:
                started = time.monotonic()
                self._control.wait_for(self._interrupted, sleep)
                self.throttled_seconds += time.monotonic() - started
            if self._stop_requested:
                return False
            if self._pause_requested:
                self.paused = True
                self._control.notify_all()
                self._control.wait_for(self._resumed)
                self.paused = False
                self._control.notify_all()
            return not self._stop_requested

    def _interrupted(self) -> bool:
        return self._pause_requested or self._stop_requested

    def _resumed(self) -> bool:
        return not self._pause_requested or self._stop_requested

    def _finish(self, stop: VcpuStop) -> None:
        self.stop = stop
        with self._control:
            self._control.notify_all()
        self.on_stop(stop)

    def _main(self) -> None:
        try:
            stop = self._loop()
        except Exception as exc:  # a bug or a device failure: stop the VM, say what happened
            stop = VcpuStop("error", f"vCPU {self.vcpu.id}: {type(exc).__name__}: {exc}")
        self._finish(stop)

    def _count(self, name: str) -> None:
        self.counters.exits[name] = self.counters.exits.get(name, 0) + 1

    def _loop(self) -> VcpuStop:
        vcpu = self.vcpu
        fd = vcpu.fd
        run = vcpu.run_page
        ioctl = fcntl.ioctl
        kvm_run = c.KVM_RUN
        # Exits are the hot path: each one is dispatched through the buses' target caches with as little
        # Python work as possible (on PVM hosts, work between two KVM_RUNs costs ~3x its standalone time).
        pio_reads, pio_read_target = self.pio.read_targets, self.pio.read_target
        pio_writes, pio_write_target = self.pio.write_targets, self.pio.write_target
        mmio_reads, mmio_read_target = self.mmio.read_targets, self.mmio.read_target
        mmio_writes, mmio_write_target = self.mmio.write_targets, self.mmio.write_target
        masks = _MASKS
        exit_unpack = _EXIT_IO.unpack_from
        mmio_unpack = _MMIO.unpack_from
        io_count = 0
        mmio_count = 0
        exit_io, exit_mmio = int(c.ExitReason.IO), int(c.ExitReason.MMIO)
        self.first_run_at = time.perf_counter()
        try:
            while True:
                try:
                    ioctl(fd, kvm_run, 0)
                except InterruptedError:
                    self._count("SIGNAL")
                    if not self._park():
                        return VcpuStop("stopped", f"vCPU {vcpu.id} stopped by the VMM")
                    continue
                except OSError as exc:
                    if exc.errno == errno.EAGAIN:  # an AP waiting for INIT/SIPI
                        if self._stop_requested:
                            return VcpuStop("stopped", f"vCPU {vcpu.id} stopped by the VMM")
                        if self._pause_requested and not self._park():
                            return VcpuStop("stopped", f"vCPU {vcpu.id} stopped by the VMM")
                        time.sleep(0.0005)
                        continue
                    raise
                reason, direction, size, port, count, offset = exit_unpack(run, 8)
                if reason == exit_io:
                    io_count += 1
                    if direction:
                        write, base = pio_writes.get(port) or pio_write_target(port)
                        if count == 1:
                            write(port - base, size,
                                  run[offset] if size == 1 else int.from_bytes(run[offset:offset + size], "little"))
                        else:
                            for at in range(offset, offset + count * size, size):
                                write(port - base, size, int.from_bytes(run[at:at + size], "little"))
                    else:
                        read, base = pio_reads.get(port) or pio_read_target(port)
                        mask = masks[size]
                        for at in range(offset, offset + count * size, size):
                            run[at:at + size] = (read(port - base, size) & mask).to_bytes(size, "little")
                elif reason == exit_mmio:
                    mmio_count += 1
                    address, data, length, is_write = mmio_unpack(run, 32)
                    length = min(length, 8)
                    if is_write:
                        write, base = mmio_writes.get(address) or mmio_write_target(address)
                        write(address - base, length, data & masks[length])
                    else:
                        read, base = mmio_reads.get(address) or mmio_read_target(address)
                        run[40:40 + length] = (read(address - base, length) & masks[length]).to_bytes(length, "little")
                else:
                    stop = self._other_exit(reason)
                    if stop is not None:
                        return stop
        finally:
            if io_count:
                self.counters.exits["IO"] = self.counters.exits.get("IO", 0) + io_count
            if mmio_count:
                self.counters.exits["MMIO"] = self.counters.exits.get("MMIO", 0) + mmio_count

    def _other_exit(self, reason: int) -> VcpuStop | None:
        vcpu = self.vcpu
        try:
            name = c.ExitReason(reason).name
        except ValueError:
            name = f"UNKNOWN_{reason}"
        self._count(name)
        if reason == c.ExitReason.INTR:
            if not self._park():
                return VcpuStop("stopped", f"vCPU {vcpu.id} stopped by the VMM")
            return None
        if reason in (c.ExitReason.IRQ_WINDOW_OPEN, c.ExitReason.IOAPIC_EOI):
            return None
        if reason == c.ExitReason.HLT:
            return VcpuStop("error", f"vCPU {vcpu.id} halted with no interrupt controller to wake it")
        if reason == c.ExitReason.SHUTDOWN:
            return VcpuStop("triple-fault", f"vCPU {vcpu.id}: the guest triple-faulted (shutdown)")
        if reason == c.ExitReason.SYSTEM_EVENT:
            kind, _ = vcpu.system_event()
            if kind == c.SystemEvent.RESET:
                return VcpuStop("reset", f"vCPU {vcpu.id}: the guest asked for a reset")
            if kind == c.SystemEvent.CRASH:
                return VcpuStop("internal-error", f"vCPU {vcpu.id}: the guest crashed (system event)")
            return VcpuStop("shutdown", f"vCPU {vcpu.id}: the guest powered off (system event {kind})")
        if reason == c.ExitReason.INTERNAL_ERROR:
            detail = self.describe_failure(vcpu) if self.describe_failure else ""
            return VcpuStop("internal-error", f"vCPU {vcpu.id}: {detail}")
        if reason == c.ExitReason.FAIL_ENTRY:
            hw, cpu = vcpu.fail_entry_reason()
            return VcpuStop("fail-entry", f"vCPU {vcpu.id}: KVM could not enter the guest "
                                          f"(hardware entry failure reason {hw:#x} on host CPU {cpu})")
        if reason == c.ExitReason.EXCEPTION:
            exc_nr, err = struct.unpack_from("<II", vcpu.run_page, s.RUN_EXCEPTION)
            return VcpuStop("internal-error", f"vCPU {vcpu.id}: unhandled guest exception {exc_nr} "
                                              f"(error code {err:#x})")
        return VcpuStop("error", f"vCPU {vcpu.id}: unexpected KVM exit {name}")
