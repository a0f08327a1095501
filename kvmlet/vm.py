"""Building and running one VM: configured -> running <-> paused -> stopped.

``Machine(config).build()`` turns a :class:`MachineConfig` into a KVM VM with memory, interrupt
controllers, devices, a loaded kernel and vCPUs; ``start()`` runs one thread per vCPU;
``wait()`` returns when the guest (or the VMM) stops it; ``close()`` releases every thread and fd.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvmlet.config import MachineConfig
from kvmlet.devices.bus import Bus
from kvmlet.devices.irq import EventFdInterrupt
from kvmlet.eventloop import EventLoopThread
from kvmlet.kvm import constants as c
from kvmlet.kvm.system import Kvm
from kvmlet.kvm.vcpu import Vcpu
from kvmlet.memory import GuestMemory, GuestMemoryError
from kvmlet.vcpu_runner import VcpuStop, VcpuThread, install_kick_handler

if TYPE_CHECKING:
    from kvmlet.boot.loader import BootInfo
    from kvmlet.devices.legacy.console import Console
    from kvmlet.devices.legacy.serial import Serial8250
    from kvmlet.devices.virtio.attach import VirtioDevices
    from kvmlet.kvm.vm import Vm

COM1_PORT = 0x3F8
COM1_IRQ = 4
DEBUG_EXIT_PORT = 0x501
POST_CODE_PORT = 0x80


class VmState(enum.Enum):
    CONFIGURED = "configured"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class StopKind(enum.Enum):
    GUEST_EXIT = "guest-exit"          # the guest wrote its status to the debug-exit port
    RESET = "reset"                    # i8042 reset or a reset system event
    SHUTDOWN = "shutdown"              # power off
    TRIPLE_FAULT = "triple-fault"      # the guest crashed beyond its own exception handling
    INTERNAL_ERROR = "internal-error"  # KVM could not run or emulate the guest
    ERROR = "error"                    # a VMM failure
    STOPPED = "stopped"                # stopped by the user or the VMM


@dataclass
class ExitStatus:
    """How a VM ended; ``code`` is what `kvmlet run` exits with."""

    kind: StopKind
    message: str
    code: int


@dataclass
class BootTimeline:
    """Points on the way from process start to the first console byte (perf_counter seconds)."""

    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.perf_counter())


class MachineError(RuntimeError):
    """The VM could not be built or controlled."""


class Machine:
    """One virtual machine and everything it owns."""

    def __init__(self, config: MachineConfig, console: Console | None = None,
                 kernel_image: bytes | None = None) -> None:
        self.config = config
        self.state = VmState.CONFIGURED
        self.timeline = BootTimeline()
        self.timeline.mark("machine")
        self._console = console
        self._kernel_image = kernel_image
        self.kvm: Kvm | None = None
        self.vm: Vm | None = None
        self.memory: GuestMemory | None = None
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.events = EventLoopThread()
        self.vcpus: list[Vcpu] = []
        self.threads: list[VcpuThread] = []
        self.boot_info: BootInfo | None = None
        self.serial: Serial8250 | None = None
        self._interrupts: list[EventFdInterrupt] = []
        self._exit: ExitStatus | None = None
        self._exit_event = threading.Event()
        self._lock = threading.Lock()
        self.warnings: list[str] = []
        self.virtio: VirtioDevices | None = None

    # -- building -----------------------------------------------------------------------------------
    def build(self) -> Machine:
        try:
            self._build()
        except BaseException:
            try:
                self.close()
            except MachineError:
                pass  # the build failure is the error worth reporting
            raise
        return self

    def _build(self) -> None:
        from kvmlet.boot.loader import BootProtocol, identify_kernel, load
        from kvmlet.cpu.setup import configure_vcpu, set_boot_registers

        config = self.config
        install_kick_handler()
        self.kvm = kvm = Kvm()
        for cap, purpose in ((c.Cap.IRQCHIP, "the in-kernel interrupt controllers"),
                             (c.Cap.IRQFD, "device interrupts"),
                             (c.Cap.IOEVENTFD, "device notifications"),
                             (c.Cap.USER_MEMORY, "guest memory"),
                             (c.Cap.IMMEDIATE_EXIT, "pausing vCPUs"),
                             (c.Cap.PIT2, "the in-kernel timer")):
            kvm.require(cap, purpose)
        config.validate(kvm.max_vcpus)

        kernel = identify_kernel(self._read_kernel(), config.kernel)
        if kernel.linux_version and not kernel.pvm_aware and self._pvm_host():
            self.warnings.append(
                "this host's KVM is PVM (software virtualization, no VT-x/AMD-V) and this Linux kernel "
                "is not PVM-aware: its kernel-mode code is emulated, so it prints its early boot log "
                "and then stops (emulation failure). Boot a PVM guest kernel, or use a VMX/SVM host")
        initrd = self._read_initrd()
        self.timeline.mark("image-read")

        self.vm = vm = kvm.create_vm()
        vm.set_tss_address()
        vm.set_identity_map_address()
        try:
            self.memory = memory = GuestMemory.with_size(config.memory)
        except GuestMemoryError as exc:
            raise MachineError(f"guest memory: {exc}") from None
        except OSError as exc:
            raise MachineError(f"cannot allocate {config.memory >> 20} MiB of guest memory: "
                               f"{exc.strerror}") from None
        for region in memory.regions:
            vm.set_user_memory_region(region.slot, region.gpa, region.size, region.host_address)
        vm.create_irqchip()
        vm.set_pc_irq_routing()
        vm.create_pit2()
        self._add_legacy_devices()
        self._add_virtio_devices()
        self.timeline.mark("vm-created")

        cmdline = self.virtio.extend_cmdline(self.cmdline) if self.virtio is not None else self.cmdline
        self.boot_info = load(memory, kernel, cmdline=cmdline, initrd=initrd,
                              protocol=BootProtocol(config.boot), cpus=config.vcpus)
        self.timeline.mark("image-loaded")

        supported = kvm.supported_cpuid()
        for index in range(config.vcpus):
            vcpu = vm.create_vcpu(index)
            self.warnings.extend(configure_vcpu(vcpu, supported, config.vcpus))
            if index == 0:
                set_boot_registers(vcpu, self.boot_info.cpu_state)
            self.vcpus.append(vcpu)
            self.threads.append(VcpuThread(vcpu, self.pio, self.mmio, self._vcpu_stopped,
                                           self._describe_failure))
        self.timeline.mark("vcpus-created")

    def _read_initrd(self) -> bytes | None:
        path = self.config.initrd
        if path is None:
            return None
        size = path.stat().st_size
        if size > self.config.memory:  # refuse before reading a file that cannot fit anyway
            from kvmlet.boot.errors import BootImageError

            raise BootImageError(f"initrd {path} is {size / (1 << 20):.1f} MiB, more than the guest's "
                                 f"{self.config.memory >> 20} MiB of memory")
        return path.read_bytes()

    @staticmethod
    def _pvm_host() -> bool:
        from kvmlet.host.model import Backend
        from kvmlet.host.virt import detect_backend

        return detect_backend() is Backend.PVM

    def _read_kernel(self) -> bytes:
        if self._kernel_image is not None:
            return self._kernel_image
        if self.config.kernel is None:
            from kvmlet.guest_image import builtin_guest

            self.config.kernel = builtin_guest()
        try:
            return Path(self.config.kernel).read_bytes()
        except OSError as exc:
            raise MachineError(f"cannot read kernel {self.config.kernel}: {exc.strerror}") from None

    @property
    def cmdline(self) -> str:
        from kvmlet.config import DEFAULT_CMDLINE

        if self.config.cmdline is not None:
            return self.config.cmdline
        if self.config.kernel is None or self._is_builtin_guest():
            from kvmlet.guest_image import DEFAULT_GUEST_CMDLINE

            return DEFAULT_GUEST_CMDLINE
        return DEFAULT_CMDLINE

    def _is_builtin_guest(self) -> bool:
        from kvmlet.guest_image import is_builtin_guest

        return self.config.kernel is not None and is_builtin_guest(Path(self.config.kernel))

    def _interrupt(self, gsi: int) -> EventFdInterrupt:
        assert self.vm is not None
        line = EventFdInterrupt(gsi)
        self._interrupts.append(line)
        self.vm.register_irqfd(line.fd, gsi)
        return line

    def _add_virtio_devices(self) -> None:
        """virtio-mmio drives and entropy device (kvmlet/devices/virtio/attach.py has the layout)."""
        config = self.config
        if not config.drives and config.rng is None and not config.nets and config.vsock is None:
            return
        from kvmlet.devices.virtio.attach import attach_virtio_devices

        assert self.vm is not None and self.memory is not None
        self.virtio = attach_virtio_devices(self.config, self.vm, self.memory, self.mmio, self.events,
                                            self._interrupt)

    def _add_legacy_devices(self) -> None:
        from kvmlet.devices.legacy.console import console_from_spec
        from kvmlet.devices.legacy.debug_exit import DebugExit
        from kvmlet.devices.legacy.i8042 import I8042
        from kvmlet.devices.legacy.ports import register_claims
        from kvmlet.devices.legacy.post_code import PostCode
        from kvmlet.devices.legacy.serial import Serial8250

        console = self._console
        if console is None:
            console = console_from_spec(self.config.console, on_escape=self.request_stop)
            self._console = console
        self.serial = Serial8250(self._interrupt(COM1_IRQ), console, on_first_byte=self._first_byte)
        self.pio.register(COM1_PORT, 8, self.serial, "com1")
        register_claims(self.pio, I8042(on_reset=self._guest_reset).bus_claims())
        self.pio.register(DEBUG_EXIT_PORT, 2, DebugExit(on_exit=self._guest_exit), "debug-exit")
        self.post_code = PostCode()
        self.pio.register(POST_CODE_PORT, 1, self.post_code, "post-code")

    # -- guest events (vCPU threads) ----------------------------------------------------------------
    def _first_byte(self) -> None:
        self.timeline.mark("first-console-byte")

    def _set_exit(self, status: ExitStatus) -> None:
        with self._lock:
            if self._exit is None:
                self._exit = status
        self._exit_event.set()

    def _guest_exit(self, status: int) -> None:
        if status > 255:  # a process exit status has 8 bits: never let 256 read as success
            self._set_exit(ExitStatus(StopKind.GUEST_EXIT, f"guest exited with status {status} "
                                      "(more than 255: reported as 255)", 255))
        else:
            self._set_exit(ExitStatus(StopKind.GUEST_EXIT, f"guest exited with status {status}", status))
        self._stop_vcpus_async()

    def _guest_reset(self) -> None:
        self._set_exit(ExitStatus(StopKind.RESET, "guest requested a reset (i8042)", 0))
        self._stop_vcpus_async()

    def _vcpu_stopped(self, stop: VcpuStop) -> None:
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

    def _describe_failure(self, vcpu: Vcpu) -> str:
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

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self.state is not VmState.CONFIGURED or self.vm is None:
            raise MachineError(f"cannot start a VM that is {self.state.value}; build() it first")
        self.events.start()
        if self._console is not None and self.serial is not None:
            self._console.start(self.serial.enqueue_input, self.events)
        self.timeline.mark("start")
        self.state = VmState.RUNNING
        for thread in self.threads:
            thread.start()

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

    def request_stop(self) -> None:
        """Ask the VM to stop (from any thread, e.g. the console escape)."""
        self._set_exit(ExitStatus(StopKind.STOPPED, "stopped by the user", 130))
        self._stop_vcpus_async()

    def pause(self, timeout: float = 5.0) -> None:
        if self.state is not VmState.RUNNING:
            raise MachineError(f"cannot pause a VM that is {self.state.value}")
        for thread in self.threads:
            thread.request_pause()
        for thread in self.threads:
            if not thread.wait_paused(timeout):
                for other in self.threads:  # leave the VM running, not half paused
                    other.resume()
                raise MachineError(f"vCPU {thread.vcpu.id} did not pause within {timeout:g} s")
        self.state = VmState.PAUSED

    def resume(self) -> None:
        if self.state is not VmState.PAUSED:
            raise MachineError(f"cannot resume a VM that is {self.state.value}")
        for thread in self.threads:
            thread.resume()
        self.state = VmState.RUNNING

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every vCPU thread (idempotent)."""
        if self.state is VmState.STOPPED:
            return
        for thread in self.threads:
            thread.request_stop()
        for thread in self.threads:
            if not thread.join(timeout):
                raise MachineError(f"vCPU {thread.vcpu.id} did not stop within {timeout:g} s")
        self._set_exit(ExitStatus(StopKind.STOPPED, "stopped by the VMM", 130))
        self.state = VmState.STOPPED

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
        if self._console is not None:
            attempt("closing the console", self._console.close)
        if self.virtio is not None:
            attempt("closing the virtio devices", self.virtio.close)
            self.virtio = None
        attempt("stopping the event loop", self.events.stop)
        if self.vm is not None and not stuck:
            for line in self._interrupts:
                try:
                    self.vm.unregister_irqfd(line.fd, line.gsi)
                except OSError:
                    pass
            attempt("closing the VM", lambda: self.vm.close(wait) if self.vm is not None else None)
            self.vm = None
        for line in self._interrupts:
            line.close()
        self._interrupts = []
        if self.memory is not None and not stuck:
            attempt("unmapping guest memory", self.memory.close)
            self.memory = None
        if self.kvm is not None:
            attempt("closing /dev/kvm", self.kvm.close)
            self.kvm = None
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
            if vcpu.fd >= 0:
                reader = vcpu.stats()
                try:
                    kvm_stats = reader.read()
                finally:
                    reader.close()
            out.append({"vcpu": vcpu.id, "kvm": kvm_stats, "kvmlet": dict(thread.counters.exits)})
        return out
