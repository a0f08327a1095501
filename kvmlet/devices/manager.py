"""The device manager: owns every device of a VM, legacy and virtio, and everything that wires them in.

It allocates what devices need (I/O-port and MMIO ranges on the buses, GSIs), owns the GSI routing table,
registers the ioeventfds and irqfds, collects each device's announcements (today: the kernel command
line's ``virtio_mmio.device=`` entries), lists the devices (for ``GET /vm/config``, metrics and snapshots)
and updates one at run time. Port numbers and IRQs come from the device modules themselves.

Quiescing (:meth:`DeviceManager.pause` / :meth:`DeviceManager.resume`): the devices get the event loop through a
:class:`~kvmlet.devices.pausable.PausableEventLoop`, so a pause stops every descriptor they watch (queue
eventfds, TAPs, vsock sockets) and holds every timer; the transports hold the queues asked for meanwhile and
the UART holds host input. All of it is served at resume. Requests complete within the callback that takes
them, so nothing is in flight once the loop has left that callback.

Snapshots: :meth:`DeviceManager.save_state` gives every device's state (:mod:`kvmlet.devices.state`) by name;
:meth:`DeviceManager.restore_state` loads them into freshly built devices.

Interrupts: legacy devices keep their fixed ISA IRQs (COM1 4, keyboard 1). Each virtio-mmio device gets
a 4 KiB register window at ``VIRTIO_MMIO_BASE + n * 0x1000`` (the 32-bit MMIO hole, never RAM) and a
free ISA IRQ from ``FREE_ISA_GSIS`` (0-2 and 8 belong to the timer, the keyboard, the cascade and the
RTC; 3 and 4 to the serial ports; 12 last, because a PS/2 mouse driver may want it), so the 8259 PICs,
the IOAPIC (identity-mapped ISA IRQs in the MP table and the MADT) and Linux all agree.

PCI (:mod:`kvmlet.devices.pci.platform`, created by :meth:`DeviceManager.enable_pci`): the host bridge and the
VT-d unit are platform devices; each virtio-pci device gets MSI-X vectors (GSIs from ``FIRST_MSI_GSI`` up, each
an MSI route in the routing table and an irqfd), an INTx level line (an irqfd with a resample eventfd) and
ioeventfds that move with its notify BAR.
"""

from __future__ import annotations

import enum
import functools
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from kvmlet.devices.bus import Bus, BusDevice
from kvmlet.devices.irq import EventFdInterrupt
from kvmlet.devices.legacy.ports import PortClaim
from kvmlet.devices.pausable import QUIESCE_TIMEOUT, PausableEventLoop
from kvmlet.devices.state import DeviceState, DeviceStateError
from kvmlet.errors import ConfigError, StateError, UnsupportedError
from kvmlet.kvm import constants as c

if TYPE_CHECKING:
    from kvmlet.boot.acpi import AcpiExtras
    from kvmlet.devices.pci.platform import PciPlatform
    from kvmlet.devices.pci.virtio_pci import PciTransport
    from kvmlet.devices.virtio.device import VirtioDevice
    from kvmlet.devices.virtio.mmio import MmioTransport
    from kvmlet.devices.virtio.transport import VirtioTransport
    from kvmlet.eventloop import EventLoop
    from kvmlet.kvm.vm import Vm
    from kvmlet.memory import GuestMemory

VIRTIO_MMIO_BASE = 0xC000_0000
VIRTIO_MMIO_WINDOW = 0x1000
VIRTIO_MMIO_LIMIT = 0xC010_0000
FREE_ISA_GSIS = (5, 6, 7, 9, 10, 11, 14, 15, 12)
IOAPIC_PINS = 24
FIRST_MSI_GSI = IOAPIC_PINS     # MSI routes: GSIs beyond the I/O APIC's pins
MAX_GSI = 1024                  # below KVM's routing table limit (KVM_MAX_IRQ_ROUTES is 4096)


class DeviceKind(enum.Enum):
    LEGACY = "legacy"
    VIRTIO_MMIO = "virtio-mmio"
    VIRTIO_PCI = "virtio-pci"
    PLATFORM = "platform"         # the PCI host bridge, the VT-d unit


@dataclass
class ManagedDevice:
    """One device and what the manager gave it."""

    name: str
    kind: DeviceKind
    device: Any
    ports: list[tuple[int, int]] = field(default_factory=list)   # (base, size) on the PIO bus
    mmio: list[tuple[int, int]] = field(default_factory=list)    # (base, size) on the MMIO bus
    gsi: int | None = None
    transport: MmioTransport | PciTransport | None = None
    config: Any = None   # the config model it was built from, if any (kept current by updates)

    @property
    def cmdline_args(self) -> list[str]:
        if self.kind is DeviceKind.VIRTIO_MMIO and self.mmio and self.gsi is not None:
            base, size = self.mmio[0]
            return [f"virtio_mmio.device={size // 1024}K@{base:#x}:{self.gsi}"]
        return []


class GsiRouting:
    """The VM's GSI routing table (KVM replaces it whole on every change)."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.routes: list[tuple[int, int, int]] = []
        self.msi: dict[int, tuple[int, int]] = {}       # GSI -> (address, data): MSI-X vectors
        self._lock = threading.Lock()

    def set_pc_routes(self) -> None:
        """ISA IRQs to both PICs and the IOAPIC, IRQ 0 (the PIT) on IOAPIC pin 2, as the MP table and the
        MADT's interrupt source override describe (KVM's default has GSI 0 on pin 0)."""
        routes: list[tuple[int, int, int]] = []
        for gsi in range(16):
            if gsi != 2:  # IRQ 2 is the PICs' cascade
                chip = c.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else c.KVM_IRQCHIP_PIC_SLAVE
                routes.append((gsi, chip, gsi % 8))
        for gsi in range(IOAPIC_PINS):
            if gsi != 2:
                routes.append((gsi, c.KVM_IRQCHIP_IOAPIC, 2 if gsi == 0 else gsi))
        with self._lock:
            self.routes = routes
            self._commit()

    def set_msi(self, gsi: int, address: int, data: int) -> None:
        """Route ``gsi`` to an MSI (address, data) and load the table (any thread)."""
        with self._lock:
            if self.msi.get(gsi) != (address, data):
                self.msi[gsi] = (address, data)
                self._commit()

    def clear_msi(self, gsi: int) -> None:
        with self._lock:
            if self.msi.pop(gsi, None) is not None:
                self._commit()

    def _commit(self) -> None:
        msi = [(gsi, address, data) for gsi, (address, data) in sorted(self.msi.items())]
        self.vm.set_gsi_routing(self.routes, msi)


class DeviceManager:
    """Every device of one VM; built by the machine builder, closed with the machine."""

    def __init__(self, vm: Vm, memory: GuestMemory, events: EventLoop, pio: Bus | None = None,
                 mmio: Bus | None = None) -> None:
        self.vm = vm
        self.memory = memory
        self.events = PausableEventLoop(events)   # what devices watch through (paused with them)
        self.pio = pio or Bus("pio")
        self.mmio = mmio or Bus("mmio")
        self.routing = GsiRouting(vm)
        self.devices: list[ManagedDevice] = []
        self._free_gsis = list(FREE_ISA_GSIS)
        self._next_mmio = VIRTIO_MMIO_BASE
        self._interrupts: list[EventFdInterrupt] = []
        self._ioeventfds: list[tuple[int, int, int]] = []   # (fd, address, datamatch)
        self._watched: list[int] = []
        self._paused = False
        self.pci: PciPlatform | None = None
        self._next_msi_gsi = FIRST_MSI_GSI
        self._notifiers: dict[int, list[tuple[int, int, int]]] = {}   # transport id -> [(fd, address, length)]
        self._resample_fds: list[int] = []

    # -- allocation ---------------------------------------------------------------------------------
    def allocate_gsi(self, what: str) -> int:
        if not self._free_gsis:
            raise ConfigError(f"{what}: no free interrupt line (at most {len(FREE_ISA_GSIS)} virtio devices)")
        return self._free_gsis.pop(0)

    def allocate_mmio(self, size: int, what: str) -> int:
        base = self._next_mmio
        if base + size > VIRTIO_MMIO_LIMIT:
            raise ConfigError(f"{what}: the MMIO window for devices is full")
        self._next_mmio = base + size
        return base

    def interrupt(self, gsi: int) -> EventFdInterrupt:
        """An edge-triggered line to ``gsi``: an eventfd registered as an irqfd."""
        line = EventFdInterrupt(gsi)
        try:
            self.vm.register_irqfd(line.fd, gsi)
        except BaseException:
            line.close()
            raise
        self._interrupts.append(line)
        return line

    # -- adding devices -----------------------------------------------------------------------------
    def add_legacy(self, name: str, device: Any, claims: Iterable[PortClaim], gsi: int | None = None) -> ManagedDevice:
        """A device on fixed I/O ports (the claims come from the device's own module)."""
        managed = ManagedDevice(name, DeviceKind.LEGACY, device, gsi=gsi)
        for claim in claims:
            self.pio.register(claim.base, claim.size, claim.device, claim.name)
            managed.ports.append((claim.base, claim.size))
        self.devices.append(managed)
        return managed

    def add_fixed_mmio(self, name: str, device: Any, base: int, size: int, config: Any = None) -> ManagedDevice:
        """A device at a fixed MMIO address its own module defines (the TPM's TIS window); polled, no GSI."""
        managed = ManagedDevice(name, DeviceKind.LEGACY, device, mmio=[(base, size)], config=config)
        self.mmio.register(base, size, device, name)
        self.devices.append(managed)
        return managed

    def add_virtio_mmio(self, device: VirtioDevice, config: Any = None) -> ManagedDevice:
        """Place a virtio device on its own virtio-mmio window and interrupt; on failure it is closed."""
        from kvmlet.devices.virtio.constants import MmioRegister
        from kvmlet.devices.virtio.mmio import MmioTransport

        try:
            gsi = self.allocate_gsi(device.name)
            base = self.allocate_mmio(VIRTIO_MMIO_WINDOW, device.name)
            transport = MmioTransport(device, self.memory, self.interrupt(gsi), self.events)
        except BaseException:
            device.close()
            raise
        managed = ManagedDevice(device.name, DeviceKind.VIRTIO_MMIO, device, mmio=[(base, VIRTIO_MMIO_WINDOW)],
                                gsi=gsi, transport=transport, config=config)
        self.devices.append(managed)
        self.mmio.register(base, VIRTIO_MMIO_WINDOW, transport, device.name)
        notify = base + MmioRegister.QUEUE_NOTIFY
        # queues whose kicks a vhost-user back end reads itself (straight from the ioeventfd)
        external: frozenset[int] = getattr(device, "external_queues", frozenset())
        for index, fd in enumerate(transport.queue_eventfds):
            self.vm.register_ioeventfd(fd, notify, 4, datamatch=index)
            self._ioeventfds.append((fd, notify, index))
            if index in external:
                continue
            self.events.watch_read(fd, functools.partial(transport.handle_queue_event, index))
            self._watched.append(fd)
        return managed

    # -- PCI ----------------------------------------------------------------------------------------
    def enable_pci(self, *, iommu: bool = False) -> PciPlatform:
        """The PCI host bridge (and, with ``iommu``, the VT-d unit in front of it), added once."""
        from kvmlet.devices.pci.platform import PciPlatform

        if self.pci is None:
            self.pci = PciPlatform(self, iommu=iommu)
            self.devices.append(ManagedDevice("pci-host", DeviceKind.PLATFORM, self.pci))
            if self.pci.vtd is not None:
                self.devices.append(ManagedDevice("vtd", DeviceKind.PLATFORM, self.pci.vtd))
        return self.pci

    def add_virtio_pci(self, device: VirtioDevice, config: Any = None) -> ManagedDevice:
        """Place a virtio device on the PCI bus (MSI-X, INTx; behind the VT-d unit if there is one)."""
        try:
            transport, _devfn = self.enable_pci().add_virtio(device)
        except ValueError as exc:
            device.close()
            raise ConfigError(f"{device.name}: {exc}") from None
        except BaseException:
            device.close()
            raise
        managed = ManagedDevice(device.name, DeviceKind.VIRTIO_PCI, device, transport=transport, config=config)
        self.devices.append(managed)
        for index, fd in enumerate(transport.queue_eventfds):
            self.events.watch_read(fd, functools.partial(transport.handle_queue_event, index))
            self._watched.append(fd)
        return managed

    def allocate_vector(self, what: str) -> tuple[int, int]:
        """A GSI for an MSI route and an eventfd registered as an irqfd on it (an MsiRouter for MSI-X)."""
        if self._next_msi_gsi >= MAX_GSI:
            raise ConfigError(f"{what}: no free GSI for an MSI route (at most {MAX_GSI - FIRST_MSI_GSI})")
        gsi = self._next_msi_gsi
        self._next_msi_gsi += 1
        return gsi, self.interrupt(gsi).fd

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        self.routing.set_msi(gsi, address, data)

    def clear_msi_route(self, gsi: int) -> None:
        self.routing.clear_msi(gsi)

    def level_interrupt(self, gsi: int, on_resample: Any) -> EventFdInterrupt:
        """A level-triggered line to an I/O APIC pin: an irqfd with a resample eventfd; ``on_resample()`` runs on
        the event loop after the guest's EOI (the device asserts the line again if it still wants to)."""
        line = EventFdInterrupt(gsi)
        resample = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.vm.register_irqfd(line.fd, gsi, resamplefd=resample)
        except BaseException:
            line.close()
            os.close(resample)
            raise
        self._interrupts.append(line)

        def resampled() -> None:
            try:
                os.eventfd_read(resample)
            except (BlockingIOError, OSError):
                return
            on_resample()

        self.events.watch_read(resample, resampled)
        self._watched.append(resample)
        self._resample_fds.append(resample)
        return line

    def move_queue_notifiers(self, transport: VirtioTransport, address: int | None, stride: int) -> None:
        """The ioeventfds of ``transport``'s queues at ``address + stride * n`` (None: nowhere), 2-byte writes."""
        for fd, old, length in self._notifiers.pop(id(transport), []):
            try:
                self.vm.unregister_ioeventfd(fd, old, length)
            except OSError:
                pass
        if address is None:
            return
        placed = []
        for index, fd in enumerate(transport.queue_eventfds):
            self.vm.register_ioeventfd(fd, address + stride * index, 2)
            placed.append((fd, address + stride * index, 2))
        self._notifiers[id(transport)] = placed

    def acpi(self) -> tuple[AcpiExtras | None, tuple[tuple[int, int], ...]]:
        """What the devices add to the ACPI tables, and the ranges to report reserved in the e820 map."""
        if self.pci is None:
            return None, ()
        from kvmlet.boot.acpi_pci import pci_acpi_extras

        description = self.pci.acpi()
        return pci_acpi_extras(description), description.reserved()

    # -- queries ------------------------------------------------------------------------------------
    def find(self, name: str) -> ManagedDevice | None:
        return next((d for d in self.devices if d.name == name), None)

    def of_type(self, cls: type) -> list[Any]:
        return [d.device for d in self.devices if isinstance(d.device, cls)]

    def virtio_devices(self) -> list[VirtioDevice]:
        return [d.device for d in self.devices if d.kind in (DeviceKind.VIRTIO_MMIO, DeviceKind.VIRTIO_PCI)]

    def cmdline_args(self) -> list[str]:
        return [arg for d in self.devices for arg in d.cmdline_args]

    def extend_cmdline(self, cmdline: str) -> str:
        """``cmdline`` with the devices' announcements (before any ``--``)."""
        args = " ".join(self.cmdline_args())
        if not args:
            return cmdline
        head, sep, tail = f" {cmdline} ".partition(" -- ")
        if not sep:
            return f"{head.strip()} {args}".strip()
        return f"{head.strip()} {args} -- {tail.strip()}".strip()

    def bus_device(self, name: str) -> BusDevice | None:
        managed = self.find(name)
        if managed is None or managed.kind is not DeviceKind.VIRTIO_MMIO:
            return None
        return cast("BusDevice", managed.transport)

    # -- quiescing ----------------------------------------------------------------------------------
    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self, timeout: float = QUIESCE_TIMEOUT) -> None:
        """Hold every device (any thread): once this returns no device processes a queue, writes guest memory
        or changes its state until :meth:`resume`; what arrives meanwhile is served then. Register accesses
        from vCPUs still go through: pause the vCPUs first. Idempotent."""
        if self._paused:
            return
        self.events.pause(timeout)          # no device callback runs from here on
        for managed in self.devices:
            _pausable(managed, "pause")     # waits for a queue another thread is processing
        self._paused = True

    def resume(self) -> None:
        """Let the devices go again, first with what arrived while they were paused. Idempotent."""
        if not self._paused:
            return
        self._paused = False
        for managed in self.devices:
            _pausable(managed, "resume")
        self.events.resume()

    # -- snapshots ----------------------------------------------------------------------------------
    def check_savable(self) -> None:
        """UnsupportedError naming the first device that cannot be saved (no state model, or a device that says
        why not: a vhost back end holds its rings); callable while the devices run, before any work starts."""
        for managed in self.devices:
            if not hasattr(managed.transport or managed.device, "save_state"):
                raise UnsupportedError(f"device {managed.name} cannot be saved (it has no state model)")
            refusal = getattr(managed.device, "save_refusal", None)
            if refusal is not None:
                raise UnsupportedError(refusal())

    def save_state(self) -> dict[str, DeviceState]:
        """Every device's state by name; the devices must be paused. UnsupportedError names a device that
        cannot be saved (before anything is saved)."""
        if not self._paused:
            raise StateError("the devices' state can be saved only while they are paused")
        self.check_savable()
        states: dict[str, DeviceState] = {}
        for managed in self.devices:
            states[managed.name] = (managed.transport or managed.device).save_state()
        return states

    def restore_state(self, states: dict[str, DeviceState]) -> None:
        """Load saved states into these freshly built devices (guest memory holds the saved contents).
        DeviceStateError, before anything is restored, if the devices are not the saved ones or a state does
        not fit its device (UnsupportedError: a device without a state model). Queues with work are kicked
        (served at :meth:`resume` if paused)."""
        names = [managed.name for managed in self.devices]
        missing = [name for name in names if name not in states]
        extra = [name for name in states if name not in names]
        if missing or extra:
            problems = [f"no saved state for device {name}" for name in missing]
            problems += [f"a saved state for device {name}, which this VM does not have" for name in extra]
            raise DeviceStateError("device states do not match the devices: " + "; ".join(problems))
        for managed in self.devices:
            target = managed.transport or managed.device
            if not hasattr(target, "restore_state") or not hasattr(target, "check_state"):
                raise UnsupportedError(f"device {managed.name} cannot be restored (it has no state model)")
            target.check_state(states[managed.name])
        for managed in self.devices:
            (managed.transport or managed.device).restore_state(states[managed.name])

    # -- teardown -----------------------------------------------------------------------------------
    def close(self, release_irqfds: bool = True) -> None:
        """Stop watching, unregister ioeventfds and irqfds, close every device (idempotent)."""
        for fd in self._watched:
            self.events.unwatch_read(fd)
        self._watched = []
        for fd, address, index in self._ioeventfds:
            try:
                self.vm.unregister_ioeventfd(fd, address, 4, datamatch=index)
            except OSError:
                pass
        self._ioeventfds = []
        for placed in self._notifiers.values():
            for fd, address, length in placed:
                try:
                    self.vm.unregister_ioeventfd(fd, address, length)
                except OSError:
                    pass
        self._notifiers = {}
        problems: list[str] = []
        for managed in reversed(self.devices):
            try:
                if managed.transport is not None:
                    if managed.kind is DeviceKind.VIRTIO_MMIO:
                        self.mmio.unregister(cast("BusDevice", managed.transport))
                    managed.transport.close()
                elif hasattr(managed.device, "close"):
                    managed.device.close()
            except Exception as exc:
                problems.append(f"{managed.name}: {exc}")
        self.devices = []
        for line in self._interrupts:
            if release_irqfds:
                try:
                    self.vm.unregister_irqfd(line.fd, line.gsi)
                except OSError:
                    pass
            line.close()
        self._interrupts = []
        for fd in self._resample_fds:
            os.close(fd)
        self._resample_fds = []
        self.pci = None
        if problems:
            raise RuntimeError("closing devices: " + "; ".join(problems))



def _pausable(managed: ManagedDevice, action: str) -> None:
    """Call ``pause`` or ``resume`` on a device's transport, or on the device if it has one."""
    method = getattr(managed.transport or managed.device, action, None)
    if method is not None:
        method()
