"""The PCI side of a VM: the host bridge and bus 0, the VT-d unit in front of it (if the VM has one), and the
virtio-pci devices on it, wired into the device manager (MMIO and port ranges, MSI routes and irqfds, ioeventfds
that follow the notify BAR) and announced in ACPI (MCFG, DMAR, the DSDT's host bridge).

Layout (guest-physical), besides the manager's virtio-mmio windows at 0xC0000000:

===================  ==========================================================================
0xC1000000-0xCFFFFFFF  the PCI MMIO window BARs are placed in (the host bridge's ``_CRS``)
0xE0000000-0xE00FFFFF  ECAM for bus 0 (MCFG; reserved by a PNP0C02 device in the DSDT)
0xFED90000-0xFED90FFF  the VT-d unit's registers (DMAR's DRHD, INCLUDE_PCI_ALL)
0xCF8-0xCFF (ports)    the legacy configuration mechanism
===================  ==========================================================================

Interrupts: MSI-X vectors get GSIs from 24 up (beyond the I/O APIC's pins), each an MSI route and an irqfd; a
device's INTx (pin A) is an I/O APIC pin from 16 to 23 (one per device while they last, then shared), a level
interrupt through an irqfd with a resample eventfd, announced in the host bridge's ``_PRT``.

Each device gets its source ID (bus 0, its device number, function 0) and, with the VT-d unit, its own
:class:`~kvmlet.devices.iommu.dma.DmaAddressSpace`: it reaches guest memory only through the unit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmlet.boot.acpi_pci import PciAcpi
from kvmlet.devices.iommu.vtd import VtdUnit
from kvmlet.devices.pci.bus import (
    CONFIG_ADDRESS_PORT,
    CONFIG_PORTS,
    ECAM_BASE,
    ECAM_BUSES,
    ECAM_SIZE,
    PCI_MMIO_BASE,
    PCI_MMIO_END,
    ConfigPorts,
    EcamWindow,
    PciBus,
)
from kvmlet.devices.pci.virtio_pci import PciTransport
from kvmlet.devices.state import PciHostState

if TYPE_CHECKING:
    from kvmlet.devices.manager import DeviceManager
    from kvmlet.devices.virtio.device import VirtioDevice

VTD_BASE = 0xFED9_0000
VTD_SIZE = 0x1000
INTX_GSIS = tuple(range(16, 24))


class PciPlatform:
    """The host bridge, bus 0 and (optionally) the VT-d unit of one VM."""

    def __init__(self, manager: DeviceManager, *, iommu: bool) -> None:
        self.manager = manager
        self.bus = PciBus(manager.mmio, manager.pio, manager.memory)
        self.ecam = EcamWindow(self.bus)
        self.ports = ConfigPorts(self.bus)
        manager.mmio.register(ECAM_BASE, ECAM_SIZE, self.ecam, "pci-ecam")
        manager.pio.register(CONFIG_ADDRESS_PORT, CONFIG_PORTS, self.ports, "pci-config")
        self.vtd: VtdUnit | None = None
        if iommu:
            self.vtd = VtdUnit(manager.memory, self._send_msi)
            manager.mmio.register(VTD_BASE, VTD_SIZE, self.vtd, "vtd")
        self.intx: dict[int, int] = {}      # device number -> GSI
        self.transports: dict[int, PciTransport] = {}

    def _send_msi(self, address: int, data: int) -> None:
        self.manager.vm.signal_msi(address, data)

    # -- devices --------------------------------------------------------------------------------------
    def add_virtio(self, device: VirtioDevice) -> tuple[PciTransport, int]:
        """A virtio device on the next free slot: (its transport, its devfn)."""
        from kvmlet.devices.iommu.dma import DmaAddressSpace

        slot = self.bus.free_device()
        source_id = slot << 3
        memory: object = self.manager.memory
        if self.vtd is not None:
            memory = DmaAddressSpace(self.manager.memory, self.vtd, source_id)
        gsi = INTX_GSIS[(slot - 1) % len(INTX_GSIS)]
        holder: list[PciTransport] = []
        intx = self.manager.level_interrupt(gsi, lambda: holder[0].intx_resample() if holder else None)
        transport = PciTransport(device, memory, self.manager.events, router=self.manager,
                                 intx=intx, translated=self.vtd is not None)
        holder.append(transport)
        transport.on_notify_moved = self._notify_mover(transport)
        self.bus.add(transport.function, slot)
        self.intx[slot] = gsi
        self.transports[slot] = transport
        return transport, slot << 3

    def _notify_mover(self, transport: PciTransport) -> Callable[[int | None], None]:
        def moved(address: int | None) -> None:
            self.manager.move_queue_notifiers(transport, address, 4)
        return moved

    # -- ACPI ---------------------------------------------------------------------------------------------
    def acpi(self) -> PciAcpi:
        return PciAcpi(ecam_base=ECAM_BASE, ecam_buses=ECAM_BUSES, mmio_window=(PCI_MMIO_BASE, PCI_MMIO_END),
                       intx=tuple(sorted(self.intx.items())),
                       vtd_base=VTD_BASE if self.vtd is not None else None)

    # -- snapshots: the host bridge (the VT-d unit and each device save their own) ----------------------
    def save_state(self) -> PciHostState:
        return self.bus.save_host()

    def check_state(self, state: object) -> None:
        from kvmlet.devices.state import expect_state

        expect_state(state, PciHostState, "pci-host")

    def restore_state(self, state: object) -> None:
        self.bus.restore_host(state)

    def close(self) -> None:
        for slot in list(self.transports):
            self.bus.remove(slot << 3)
        self.transports.clear()
        self.manager.mmio.unregister(self.ecam)
        self.manager.pio.unregister(self.ports)
        if self.vtd is not None:
            self.manager.mmio.unregister(self.vtd)
            self.vtd.close()
