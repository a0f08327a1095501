"""The VM file descriptor: memory slots, interrupt controllers, eventfds, clock, dirty log, stats."""

from __future__ import annotations

import ctypes
import fcntl
import os
from typing import TYPE_CHECKING

from kvmlet.kvm import constants as c
from kvmlet.kvm import structs as s
from kvmlet.kvm.errors import KvmError, ioctl_error, ioctl_ulong
from kvmlet.kvm.vcpu import Vcpu

if TYPE_CHECKING:
    from collections.abc import Sequence

    from kvmlet.kvm.stats import StatsReader
    from kvmlet.kvm.system import Kvm


class Vm:
    """A KVM virtual machine (the fd returned by KVM_CREATE_VM)."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.vcpus: list[Vcpu] = []

    def _ioctl(self, name: str, request: int, arg: int | ctypes.Structure | ctypes.c_uint64 = 0) -> int:
        try:
            return fcntl.ioctl(self.fd, request, arg)
        except OSError as exc:
            raise ioctl_error(name, exc) from None

    def check_extension(self, cap: c.Cap | int) -> int:
        """KVM_CHECK_EXTENSION on the VM (per-VM answers where KVM supports that)."""
        try:
            return fcntl.ioctl(self.fd, c.KVM_CHECK_EXTENSION, int(cap))
        except OSError:
            return self.kvm.check_extension(cap)

    def enable_cap(self, cap: c.Cap, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM."""
        request = s.kvm_enable_cap()
        request.cap = int(cap)
        request.flags = flags
        for i, value in enumerate(args):
            request.args[i] = value
        self._ioctl(f"KVM_ENABLE_CAP({cap.name})", c.KVM_ENABLE_CAP, request)

    # -- memory -------------------------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, size: int, host_address: int,
                               *, log_dirty: bool = False, readonly: bool = False) -> None:
        """KVM_SET_USER_MEMORY_REGION (size 0 deletes the slot)."""
        region = s.kvm_userspace_memory_region()
        region.slot = slot
        region.flags = (c.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0) | (
            c.KVM_MEM_READONLY if readonly else 0)
        region.guest_phys_addr = guest_phys_addr
        region.memory_size = size
        region.userspace_addr = host_address
        self._ioctl("KVM_SET_USER_MEMORY_REGION", c.KVM_SET_USER_MEMORY_REGION, region)

    def get_dirty_log(self, slot: int, pages: int) -> bytes:
        """KVM_GET_DIRTY_LOG: the slot's dirty bitmap (one bit per page), reset by the call."""
        bitmap = ctypes.create_string_buffer(((pages + 63) // 64) * 8)
        log = s.kvm_dirty_log()
        log.slot = slot
        log.dirty_bitmap = ctypes.addressof(bitmap)
        self._ioctl("KVM_GET_DIRTY_LOG", c.KVM_GET_DIRTY_LOG, log)
        return bitmap.raw

    def set_tss_address(self, address: int = c.KVM_TSS_ADDRESS) -> None:
        try:
            ioctl_ulong(self.fd, c.KVM_SET_TSS_ADDR, address)
        except OSError as exc:
            raise ioctl_error("KVM_SET_TSS_ADDR", exc) from None

    def set_identity_map_address(self, address: int = c.KVM_IDENTITY_MAP_ADDRESS) -> None:
        value = ctypes.c_uint64(address)
        self._ioctl("KVM_SET_IDENTITY_MAP_ADDR", c.KVM_SET_IDENTITY_MAP_ADDR, value)

    # -- interrupt controllers ----------------------------------------------------------------------
    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and LAPICs."""
        self._ioctl("KVM_CREATE_IRQCHIP", c.KVM_CREATE_IRQCHIP)

    def enable_split_irqchip(self, ioapic_pins: int = 24) -> None:
        """KVM_CAP_SPLIT_IRQCHIP: in-kernel LAPICs only; PIC and IOAPIC live in user space."""
        self.enable_cap(c.Cap.SPLIT_IRQCHIP, ioapic_pins)

    def create_pit2(self, speaker_dummy: bool = True) -> None:
        """KVM_CREATE_PIT2: the in-kernel 8254 timer (flag 1: a dummy speaker port 0x61)."""
        config = s.kvm_pit_config()
        config.flags = 1 if speaker_dummy else 0
        self._ioctl("KVM_CREATE_PIT2", c.KVM_CREATE_PIT2, config)

    def set_gsi_routing(self, routes: list[tuple[int, int, int]],
                        msi: Sequence[tuple[int, int, int]] = ()) -> None:
        """KVM_SET_GSI_ROUTING with (gsi, irqchip, pin) routes and (gsi, address, data) MSI routes; replaces
        the whole table."""
        table = s.kvm_irq_routing(len(routes) + len(msi))
        table.nr = len(routes) + len(msi)
        for i, (gsi, chip, pin) in enumerate(routes):
            entry = table.entries[i]
            entry.gsi, entry.type = gsi, c.KVM_IRQ_ROUTING_IRQCHIP
            entry.u.irqchip, entry.u.pin = chip, pin
        for i, (gsi, address, data) in enumerate(msi, start=len(routes)):
            entry = table.entries[i]
            entry.gsi, entry.type = gsi, c.KVM_IRQ_ROUTING_MSI
            message = s.kvm_irq_routing_msi.from_buffer(entry.u)
            message.address_lo, message.address_hi, message.data = address & 0xFFFFFFFF, address >> 32, data
        self._ioctl("KVM_SET_GSI_ROUTING", c.KVM_SET_GSI_ROUTING, table)

    def irq_line(self, irq: int, level: bool) -> None:
        """KVM_IRQ_LINE: set an interrupt line's level."""
        line = s.kvm_irq_level()
        line.irq = irq
        line.level = int(level)
        self._ioctl("KVM_IRQ_LINE", c.KVM_IRQ_LINE, line)

    def register_irqfd(self, eventfd: int, gsi: int, resamplefd: int | None = None) -> None:
        """KVM_IRQFD: a write to ``eventfd`` raises ``gsi`` (level with a resample fd)."""
        request = s.kvm_irqfd()
        request.fd = eventfd
        request.gsi = gsi
        if resamplefd is not None:
            request.flags = c.KVM_IRQFD_FLAG_RESAMPLE
            request.resamplefd = resamplefd
        self._ioctl("KVM_IRQFD", c.KVM_IRQFD, request)

    def unregister_irqfd(self, eventfd: int, gsi: int) -> None:
        request = s.kvm_irqfd()
        request.fd = eventfd
        request.gsi = gsi
        request.flags = c.KVM_IRQFD_FLAG_DEASSIGN
        self._ioctl("KVM_IRQFD(deassign)", c.KVM_IRQFD, request)

    def _ioeventfd(self, eventfd: int, address: int, length: int, pio: bool,
                   datamatch: int | None, deassign: bool) -> None:
        request = s.kvm_ioeventfd()
        request.addr = address
        request.len = length
        request.fd = eventfd
        flags = c.KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if datamatch is not None:
            flags |= c.KVM_IOEVENTFD_FLAG_DATAMATCH
            request.datamatch = datamatch
        if deassign:
            flags |= c.KVM_IOEVENTFD_FLAG_DEASSIGN
        request.flags = flags
        self._ioctl("KVM_IOEVENTFD", c.KVM_IOEVENTFD, request)

    def register_ioeventfd(self, eventfd: int, address: int, length: int, *, pio: bool = False,
                           datamatch: int | None = None) -> None:
        """KVM_IOEVENTFD: a guest write to ``address`` signals ``eventfd`` without exiting to us."""
        self._ioeventfd(eventfd, address, length, pio, datamatch, False)

    def unregister_ioeventfd(self, eventfd: int, address: int, length: int, *, pio: bool = False,
                             datamatch: int | None = None) -> None:
        self._ioeventfd(eventfd, address, length, pio, datamatch, True)

    def signal_msi(self, address: int, data: int) -> int:
        """KVM_SIGNAL_MSI: inject a message-signalled interrupt; returns >0 if delivered."""
        msi = s.kvm_msi()
        msi.address_lo = address & 0xFFFFFFFF
        msi.address_hi = address >> 32
        msi.data = data
        return self._ioctl("KVM_SIGNAL_MSI", c.KVM_SIGNAL_MSI, msi)

    # -- clock --------------------------------------------------------------------------------------
    def get_clock(self) -> int:
        """KVM_GET_CLOCK: the kvmclock value in ns."""
        data = s.kvm_clock_data()
        self._ioctl("KVM_GET_CLOCK", c.KVM_GET_CLOCK, data)
        return int(data.clock)

    def set_clock(self, clock_ns: int) -> None:
        data = s.kvm_clock_data()
        data.clock = clock_ns
        self._ioctl("KVM_SET_CLOCK", c.KVM_SET_CLOCK, data)

    # -- interrupt controller and timer state (snapshots) ----------------------------------------------
    def get_irqchip(self, chip_id: int) -> bytes:
        """KVM_GET_IRQCHIP: the state of the PIC master (0), PIC slave (1) or IOAPIC (2), as bytes."""
        chip = s.kvm_irqchip()
        chip.chip_id = chip_id
        self._ioctl(f"KVM_GET_IRQCHIP({chip_id})", c.KVM_GET_IRQCHIP, chip)
        return bytes(chip.chip)

    def set_irqchip(self, chip_id: int, state: bytes) -> None:
        chip = s.kvm_irqchip()
        chip.chip_id = chip_id
        ctypes.memmove(chip.chip, state, min(len(state), s.KVM_IRQCHIP_STATE_SIZE))
        self._ioctl(f"KVM_SET_IRQCHIP({chip_id})", c.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> bytes:
        """KVM_GET_PIT2: the in-kernel PIT's state, as the kernel's bytes."""
        state = s.kvm_pit_state2()
        self._ioctl("KVM_GET_PIT2", c.KVM_GET_PIT2, state)
        return bytes(state)

    def set_pit2(self, state: bytes) -> None:
        value = s.kvm_pit_state2.from_buffer_copy(state)
        self._ioctl("KVM_SET_PIT2", c.KVM_SET_PIT2, value)

    # -- vCPUs and stats ----------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU plus the mmap of its kvm_run page."""
        fd = self._ioctl(f"KVM_CREATE_VCPU({vcpu_id})", c.KVM_CREATE_VCPU, vcpu_id)
        try:
            vcpu = Vcpu(self, vcpu_id, fd, self.kvm.vcpu_mmap_size)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    def stats(self) -> StatsReader:
        """KVM_GET_STATS_FD on the VM."""
        from kvmlet.kvm.stats import StatsReader  # only when asked: keeps VM start-up lean

        fd = self._ioctl("KVM_GET_STATS_FD", c.KVM_GET_STATS_FD)
        return StatsReader(fd)

    def close(self, wait: bool = True) -> None:
        """Close the vCPUs and the VM. The kernel destroys the VM on the last close, which can sleep
        for RCU grace periods (15-25 ms with an in-kernel irqchip and PIT on PVM hosts); with
        ``wait=False`` that last close happens on a short-lived daemon thread instead."""
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus = []
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            if wait:
                os.close(fd)
            else:
                import threading

                threading.Thread(target=os.close, args=(fd,), name="kvmlet-vm-close", daemon=True).start()


__all__ = ["KvmError", "Vm"]
