"""A driver side of virtio-pci for host-side tests: the common configuration, notifications and MSI-X played
against a PciTransport through its BARs (as a guest's accesses arrive), and an MSI router that needs no VM."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kvmlet.devices.pci.virtio_pci import MSIX_BAR, NOTIFY_OFFSET, PBA_OFFSET, VIRTIO_BAR, PciTransport
from kvmlet.devices.virtio.constants import DeviceStatus
from tests.support.virtq import DriverRing

CC_DFSELECT, CC_DF, CC_GFSELECT, CC_GF = 0x00, 0x04, 0x08, 0x0C
CC_MSIX, CC_NUMQ, CC_STATUS, CC_CFGGEN = 0x10, 0x12, 0x14, 0x15
CC_Q_SELECT, CC_Q_SIZE, CC_Q_MSIX, CC_Q_ENABLE, CC_Q_NOFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
CC_Q_DESC, CC_Q_AVAIL, CC_Q_USED = 0x20, 0x28, 0x30
NO_VECTOR = 0xFFFF


@dataclass
class FakeRouter:
    """MSI vectors without KVM: each an eventfd; routes remembered."""

    routes: dict[int, tuple[int, int]] = field(default_factory=dict)
    fds: dict[int, int] = field(default_factory=dict)
    next_gsi: int = 24

    def allocate_vector(self, what: str) -> tuple[int, int]:
        gsi = self.next_gsi
        self.next_gsi += 1
        self.fds[gsi] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return gsi, self.fds[gsi]

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        self.routes[gsi] = (address, data)

    def clear_msi_route(self, gsi: int) -> None:
        self.routes.pop(gsi, None)

    def fired(self, gsi: int) -> int:
        """Messages sent on ``gsi`` since the last call."""
        try:
            return os.eventfd_read(self.fds[gsi])
        except BlockingIOError:
            return 0

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class PciDriver:
    """Register-level driver of a PciTransport (BAR 0 structures, BAR 2 MSI-X, configuration space)."""

    def __init__(self, transport: PciTransport) -> None:
        self.t = transport

    def read(self, offset: int, size: int) -> int:
        return self.t.bar_read(VIRTIO_BAR, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.t.bar_write(VIRTIO_BAR, offset, size, value)

    @property
    def status(self) -> int:
        return self.read(CC_STATUS, 1)

    def set_status(self, value: int) -> None:
        self.write(CC_STATUS, 1, value)

    def device_features(self) -> int:
        self.write(CC_DFSELECT, 4, 0)
        low = self.read(CC_DF, 4)
        self.write(CC_DFSELECT, 4, 1)
        return low | self.read(CC_DF, 4) << 32

    def negotiate(self, features: int | None = None) -> bool:
        self.set_status(0)
        self.set_status(DeviceStatus.ACKNOWLEDGE)
        self.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        wanted = self.device_features() if features is None else features
        for sel in (0, 1):
            self.write(CC_GFSELECT, 4, sel)
            self.write(CC_GF, 4, wanted >> (32 * sel) & 0xFFFF_FFFF)
        self.set_status(self.status | DeviceStatus.FEATURES_OK)
        return bool(self.status & DeviceStatus.FEATURES_OK)

    def setup_queue(self, index: int, ring: DriverRing, *, offset: int = 0, vector: int = NO_VECTOR) -> None:
        """The queue at ``ring``'s addresses plus ``offset`` (the I/O virtual addresses an IOMMU maps)."""
        self.write(CC_Q_SELECT, 2, index)
        self.write(CC_Q_SIZE, 2, ring.size)
        for reg, address in ((CC_Q_DESC, ring.desc), (CC_Q_AVAIL, ring.avail), (CC_Q_USED, ring.used)):
            self.write(reg, 4, (address + offset) & 0xFFFF_FFFF)
            self.write(reg + 4, 4, (address + offset) >> 32)
        self.write(CC_Q_MSIX, 2, vector)
        self.write(CC_Q_ENABLE, 2, 1)

    def enable_bus_master(self) -> None:
        function = self.t.function
        function.config_write(0x04, 2, function.config_read(0x04, 2) | 0x6)

    def driver_ok(self) -> None:
        self.set_status(self.status | DeviceStatus.DRIVER_OK)

    def start(self, ring: DriverRing, features: int | None = None, *, offset: int = 0,
              vector: int = NO_VECTOR) -> None:
        self.enable_bus_master()
        assert self.negotiate(features), self.t.stats.last_error
        self.setup_queue(0, ring, offset=offset, vector=vector)
        self.driver_ok()
        assert self.status & DeviceStatus.DRIVER_OK, self.t.stats.last_error
        self.t.poll()

    def notify(self, queue: int = 0) -> int:
        self.write(NOTIFY_OFFSET + 4 * queue, 2, queue)
        handled = self.t.poll()
        for _ in range(10_000):
            if not self.t.poll():
                break
        return handled

    # -- MSI-X ------------------------------------------------------------------------------------------
    def msix_entry(self, entry: int, address: int, data: int, masked: bool = False) -> None:
        base = 16 * entry
        self.t.bar_write(MSIX_BAR, base + 12, 4, 1)
        self.t.bar_write(MSIX_BAR, base, 4, address & 0xFFFF_FFFF)
        self.t.bar_write(MSIX_BAR, base + 4, 4, address >> 32)
        self.t.bar_write(MSIX_BAR, base + 8, 4, data)
        self.t.bar_write(MSIX_BAR, base + 12, 4, int(masked))

    def msix_enable(self, on: bool = True, function_mask: bool = False) -> None:
        cap = self.t.function.msix_cap
        control = self.t.function.config_read(cap + 2, 2)
        control = (control | 0x8000) if on else (control & ~0x8000)
        control = (control | 0x4000) if function_mask else (control & ~0x4000)
        self.t.function.config_write(cap + 2, 2, control)

    def pending(self, entry: int) -> bool:
        return bool(self.t.bar_read(MSIX_BAR, PBA_OFFSET, 8) >> entry & 1)
