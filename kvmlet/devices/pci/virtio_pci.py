"""virtio over PCI, modern (virtio 1.2 section 4.1): a virtio device as a PCI function with MSI-X.

The function (vendor 0x1AF4, device 0x1040 + the virtio device ID, revision 1) has two memory BARs:

=====  =========  ==============================================================================
BAR    offset     structure (announced by a vendor-specific capability each, section 4.1.4)
=====  =========  ==============================================================================
0      0x0000     common configuration (``struct virtio_pci_common_cfg``)
0      0x1000     ISR status (one byte, cleared when read)
0      0x2000     device-specific configuration
0      0x3000     notifications: queue n at 0x3000 + 4 n (``notify_off_multiplier`` 4)
2      0x0000     MSI-X table (queues + 1 vectors)
2      0x1000     MSI-X pending bits
=====  =========  ==============================================================================

plus the VIRTIO_PCI_CAP_PCI_CFG window (the same structures through configuration space). BAR 0 is 64-bit.

The status machine, features, queues, notifications and snapshots' common part are the shared
:class:`~kvmlet.devices.virtio.transport.VirtioTransport`'s; this class decodes the common configuration's
fields (each at its own width; a 64-bit field as two dwords or one qword; other widths are counted and ignored,
reads of them return 0) and delivers interrupts:

* MSI-X enabled: a used buffer sends the queue's vector, a configuration change the configuration vector (and
  sets ISR bit 1); NO_VECTOR (0xFFFF) sends nothing; a vector number beyond the table reads back as NO_VECTOR
  (section 4.1.5.1.2: the mapping failed);
* otherwise INTx: ISR bits 0/1, the status register's interrupt bit, and the function's INTx line, a level
  interrupt (an irqfd with a resample eventfd: re-asserted at the guest's EOI while ISR is non-zero) unless
  the command register disables it.

Bus mastering: a function with Bus Master Enable clear does no DMA and sends no message (MSI-X holds them
pending): queues notified meanwhile are served when the driver sets it.

Behind an IOMMU the device's memory is its DMA address space: VIRTIO_F_ACCESS_PLATFORM is offered and required
(FEATURES_OK is refused without it), the queues are :class:`~kvmlet.devices.virtio.translated.TranslatedQueue`
and every invalidation drops the views they hold, under the transport's lock.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

from kvmlet.devices.irq import InterruptLine, NullInterrupt
from kvmlet.devices.pci.config import CAP_ID_MSIX, CAP_ID_VENDOR, BarKind, BarSpec, PciFunction, PciIdentity
from kvmlet.devices.pci.msix import CONTROL_ENABLE, CONTROL_FUNCTION_MASK, MsiRouter, MsixTable
from kvmlet.devices.state import MsixState, PciTransportState, expect_state
from kvmlet.devices.virtio.constants import VIRTIO_F_ACCESS_PLATFORM, DeviceType, InterruptReason, feature_bit
from kvmlet.devices.virtio.device import VirtioDevice
from kvmlet.devices.virtio.queue import Virtqueue
from kvmlet.devices.virtio.transport import Scheduler, VirtioTransport
from kvmlet.memory import GuestMemoryError

VIRTIO_VENDOR_ID = 0x1AF4
VIRTIO_DEVICE_ID_BASE = 0x1040
NO_VECTOR = 0xFFFF

COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
NOTIFY_MULTIPLIER = 4
VIRTIO_BAR_SIZE = 0x4000
MSIX_BAR_SIZE = 0x2000
PBA_OFFSET = 0x1000
VIRTIO_BAR = 0
MSIX_BAR = 2
COMMON_LENGTH = 0x40

CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG = 1, 2, 3, 4, 5

CLASS_CODES = {DeviceType.NET: 0x020000, DeviceType.BLOCK: 0x018000, DeviceType.ENTROPY: 0xFF0000,
               DeviceType.VSOCK: 0xFF0000, DeviceType.CONSOLE: 0x078000}

# common configuration fields: offset -> (width, name)
_FIELDS = {0x00: (4, "device_feature_select"), 0x04: (4, "device_feature"), 0x08: (4, "driver_feature_select"),
           0x0C: (4, "driver_feature"), 0x10: (2, "config_msix_vector"), 0x12: (2, "num_queues"),
           0x14: (1, "device_status"), 0x15: (1, "config_generation"), 0x16: (2, "queue_select"),
           0x18: (2, "queue_size"), 0x1A: (2, "queue_msix_vector"), 0x1C: (2, "queue_enable"),
           0x1E: (2, "queue_notify_off"), 0x20: (4, "queue_desc_lo"), 0x24: (4, "queue_desc_hi"),
           0x28: (4, "queue_driver_lo"), 0x2C: (4, "queue_driver_hi"), 0x30: (4, "queue_device_lo"),
           0x34: (4, "queue_device_hi"), 0x38: (2, "queue_notify_data"), 0x3A: (2, "queue_reset"),
           0x3C: (2, "admin_queue_index"), 0x3E: (2, "admin_queue_num")}
_QUEUE_ADDRESSES = {"queue_desc": "desc_addr", "queue_driver": "driver_addr", "queue_device": "device_addr"}
_MASK32 = 0xFFFF_FFFF


def virtio_identity(device_type: DeviceType) -> PciIdentity:
    return PciIdentity(vendor_id=VIRTIO_VENDOR_ID, device_id=VIRTIO_DEVICE_ID_BASE + int(device_type),
                       class_code=CLASS_CODES.get(device_type, 0xFF0000), revision=1,
                       subsystem_vendor_id=VIRTIO_VENDOR_ID, subsystem_id=0x40 + int(device_type))


def _virtio_cap(cfg_type: int, bar: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """A ``struct virtio_pci_cap`` after its ID and next pointer (cap_len counts those two bytes)."""
    return struct.pack("<BBBBxxII", 16 + len(extra), cfg_type, bar, 0, offset, length) + extra


class VirtioPciFunction(PciFunction):
    """The PCI face of a :class:`PciTransport`: configuration space, BAR accesses, MSI-X capability."""

    def __init__(self, transport: PciTransport) -> None:
        device = transport.device
        super().__init__(virtio_identity(device.device_type),
                         [BarSpec(VIRTIO_BAR, VIRTIO_BAR_SIZE, BarKind.MEMORY64),
                          BarSpec(MSIX_BAR, MSIX_BAR_SIZE, BarKind.MEMORY32)], interrupt_pin=1, bus_master=True)
        self.transport = transport
        queues = len(transport.queues)
        config_length = max(4, (len(device.config_space()) + 3) & ~3)
        self.add_capability(CAP_ID_VENDOR, _virtio_cap(CAP_COMMON, VIRTIO_BAR, COMMON_OFFSET, COMMON_LENGTH))
        self.add_capability(CAP_ID_VENDOR, _virtio_cap(CAP_NOTIFY, VIRTIO_BAR, NOTIFY_OFFSET,
                                                       max(2, NOTIFY_MULTIPLIER * queues),
                                                       struct.pack("<I", NOTIFY_MULTIPLIER)))
        self.add_capability(CAP_ID_VENDOR, _virtio_cap(CAP_ISR, VIRTIO_BAR, ISR_OFFSET, 1))
        self.add_capability(CAP_ID_VENDOR, _virtio_cap(CAP_DEVICE, VIRTIO_BAR, DEVICE_OFFSET, config_length))
        # the configuration access window: bar, offset, length and data are the driver's
        writable = bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 12
        self.pci_cfg = self.add_capability(CAP_ID_VENDOR, _virtio_cap(CAP_PCI_CFG, 0, 0, 0, bytes(4)), writable)
        table = transport.msix
        self.msix_cap = self.add_capability(CAP_ID_MSIX, struct.pack("<HII", table.count - 1, MSIX_BAR,
                                                                     PBA_OFFSET | MSIX_BAR),
                                            bytes([0, CONTROL_ENABLE >> 8 | CONTROL_FUNCTION_MASK >> 8]))

    # -- configuration space hooks ---------------------------------------------------------------------
    def _window(self) -> tuple[int, int, int]:
        cap = self.pci_cfg
        return self.data[cap + 4], self._get(cap + 8, 4), self._get(cap + 12, 4)

    def special_read(self, offset: int, size: int) -> int | None:
        data = self.pci_cfg + 16
        if data <= offset < data + 4:
            bar, bar_offset, length = self._window()
            if length in (1, 2, 4) and bar in self.bars and bar_offset + length <= self.bars[bar].size:
                self._put(data, 4, self.bar_read(bar, bar_offset, length))
            return int.from_bytes(self.data[offset:min(offset + size, 256)].ljust(size, b"\0"), "little")
        return None

    def config_written(self, offset: int, size: int, value: int) -> None:
        control = self.msix_cap + 2
        if offset < control + 2 and control < offset + size:
            self.transport.msix.set_control(self._get(control, 2))
        data = self.pci_cfg + 16
        if offset < data + 4 and data < offset + size:
            bar, bar_offset, length = self._window()
            if length in (1, 2, 4) and bar in self.bars and bar_offset + length <= self.bars[bar].size:
                self.bar_write(bar, bar_offset, length, self._get(data, length))

    def command_changed(self, before: int) -> None:
        self.transport.bus_master_changed(self.bus_master)

    def interrupt_pending(self) -> bool:
        return self.transport.intx_pending()

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return self.transport.bar_read(index, offset, size)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        self.transport.bar_write(index, offset, size, value)

    def bar_mapped(self, index: int, address: int | None) -> None:
        if index == VIRTIO_BAR and self.transport.on_notify_moved is not None:
            self.transport.on_notify_moved(None if address is None else address + NOTIFY_OFFSET)


class PciTransport(VirtioTransport):
    """One virtio device as a PCI function (a DeviceHost for the device; see the module docstring)."""

    def __init__(self, device: VirtioDevice, memory: object, scheduler: Scheduler | None = None, *,
                 router: MsiRouter | None = None, intx: InterruptLine | None = None,
                 translated: bool = False) -> None:
        queue_factory: Callable[..., Virtqueue] = Virtqueue
        if translated:
            from kvmlet.devices.virtio.translated import TranslatedQueue

            queue_factory = TranslatedQueue
        platform = feature_bit(VIRTIO_F_ACCESS_PLATFORM) if translated else 0
        self._irq_lock = threading.Lock()
        self.intx = intx if intx is not None else NullInterrupt()
        self.config_vector = NO_VECTOR
        self.queue_vectors: list[int] = []
        super().__init__(device, memory, scheduler, queue_factory=queue_factory,    # type: ignore[arg-type]
                         extra_features=platform, required_features=platform)
        self.translated = translated
        self.queue_vectors = [NO_VECTOR] * len(self.queues)
        self.msix = MsixTable(len(self.queues) + 1, router, device.name, message_write=self._message_write)
        self.on_notify_moved: Callable[[int | None], None] | None = None   # the manager's ioeventfds follow BAR 0
        self._bus_master_held: set[int] = set()
        self.function = VirtioPciFunction(self)
        self.msix.bus_master = self.function.bus_master
        if translated and hasattr(memory, "on_invalidate"):
            memory.on_invalidate(self.forget_translations)

    def _clear_registers(self) -> None:
        super()._clear_registers()
        with self._irq_lock:
            self.isr = 0
            self.config_vector = NO_VECTOR
            self.queue_vectors = [NO_VECTOR] * len(self.queue_vectors)

    def forget_translations(self) -> None:
        """The IOMMU invalidated: drop every view the queues hold (waits for a queue being processed)."""
        with self._lock:
            for queue in self.queues:
                forget = getattr(queue, "forget_translations", None)
                if forget is not None:
                    forget()

    # -- BAR accesses ----------------------------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        if index == MSIX_BAR:
            if offset < PBA_OFFSET:
                return self.msix.table_read(offset, size)
            return self.msix.pba_read(offset - PBA_OFFSET, size)
        if offset < ISR_OFFSET:
            return self._common_read(offset, size)
        if offset < DEVICE_OFFSET:
            if offset != ISR_OFFSET:
                return 0
            with self._irq_lock:
                value, self.isr = self.isr, 0    # reading ISR acknowledges (and de-asserts INTx)
            return value
        if offset < NOTIFY_OFFSET:
            return self._config_read(offset - DEVICE_OFFSET, size)
        return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index == MSIX_BAR:
            if offset < PBA_OFFSET:
                self.msix.table_write(offset, size, value)
            else:
                self.stats.ignored_writes += 1    # the pending bits are read-only
            return
        if offset < ISR_OFFSET:
            self._common_write(offset, size, value)
        elif offset < DEVICE_OFFSET:
            self.stats.ignored_writes += 1        # ISR is read-only
        elif offset < NOTIFY_OFFSET:
            if size in (1, 2, 4, 8):
                with self._lock:
                    self.device.write_config(offset - DEVICE_OFFSET, value.to_bytes(size, "little"))
            else:
                self.stats.bad_accesses += 1
        else:
            notify = offset - NOTIFY_OFFSET
            if notify % NOTIFY_MULTIPLIER or size not in (2, 4):
                self.stats.bad_accesses += 1
                return
            self._notify_from_exit(notify // NOTIFY_MULTIPLIER)

    def _config_read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4, 8):
            self.stats.bad_accesses += 1
            return 0
        data = self.device.config_space()[offset:offset + size]
        return int.from_bytes(data.ljust(size, b"\0"), "little")

    # -- the common configuration structure ----------------------------------------------------------
    def _field(self, offset: int, size: int) -> str | None:
        entry = _FIELDS.get(offset)
        if entry is not None and entry[0] == size:
            return entry[1]
        self.stats.bad_accesses += 1
        return None

    def _common_read(self, offset: int, size: int) -> int:
        if size == 8 and offset in (0x20, 0x28, 0x30):
            return self._common_read(offset, 4) | self._common_read(offset + 4, 4) << 32
        name = self._field(offset, size)
        if name is None:
            return 0
        queue = self._selected_queue()
        if name == "device_feature_select":
            return self.device_features_sel & _MASK32
        if name == "device_feature":
            return self.device_feature_word()
        if name == "driver_feature_select":
            return self.driver_features_sel & _MASK32
        if name == "driver_feature":
            return self.driver_feature_word()
        if name == "config_msix_vector":
            return self.config_vector
        if name == "num_queues":
            return len(self.queues)
        if name == "device_status":
            return self.status
        if name == "config_generation":
            return self.config_generation & 0xFF
        if name == "queue_select":
            return self.queue_sel
        if queue is None:
            return 0          # no such queue: size 0 says so; everything else reads 0
        if name == "queue_size":
            return queue.size
        if name == "queue_msix_vector":
            return self.queue_vectors[queue.index]
        if name == "queue_enable":
            return int(queue.ready)
        if name in ("queue_notify_off", "queue_notify_data"):
            return queue.index
        if name.endswith(("_lo", "_hi")):
            address = int(getattr(queue, _QUEUE_ADDRESSES[name[:-3]]))
            return address & _MASK32 if name.endswith("_lo") else address >> 32 & _MASK32
        return 0              # queue_reset (VIRTIO_F_RING_RESET not offered), admin queues (none)

    def _common_write(self, offset: int, size: int, value: int) -> None:
        if size == 8 and offset in (0x20, 0x28, 0x30):
            self._common_write(offset, 4, value & _MASK32)
            self._common_write(offset + 4, 4, value >> 32)
            return
        name = self._field(offset, size)
        if name is None:
            return
        value &= (1 << (8 * size)) - 1
        with self._lock:
            if name == "device_feature_select":
                self.device_features_sel = value
            elif name == "driver_feature_select":
                self.driver_features_sel = value
            elif name == "driver_feature":
                self._write_driver_features(value)
            elif name == "config_msix_vector":
                self.config_vector = value if value < self.msix.count else NO_VECTOR
            elif name == "device_status":
                self._write_status(value)
            elif name == "queue_select":
                self.queue_sel = value
            elif name == "queue_msix_vector":
                if self.queue_sel < len(self.queues):
                    self.queue_vectors[self.queue_sel] = value if value < self.msix.count else NO_VECTOR
                else:
                    self.stats.ignored_writes += 1
            elif name == "queue_enable":
                self._write_queue_ready(value)
            elif name == "queue_size":
                queue = self._configurable_queue()
                if queue is not None:
                    queue.size = value
            elif name.endswith(("_lo", "_hi")):
                queue = self._configurable_queue()
                if queue is not None:
                    attribute = _QUEUE_ADDRESSES[name[:-3]]
                    address = int(getattr(queue, attribute))
                    low, high = (value, address >> 32) if name.endswith("_lo") else (address & _MASK32, value)
                    setattr(queue, attribute, high << 32 | low)
            else:
                self.stats.ignored_writes += 1   # read-only fields, queue_reset, admin queues

    # -- interrupts -----------------------------------------------------------------------------------
    def _raise_interrupt(self, reason: InterruptReason, queue_index: int | None) -> None:
        if reason & InterruptReason.CONFIG_CHANGE:
            with self._irq_lock:
                self.isr |= int(InterruptReason.CONFIG_CHANGE)
        if self.msix.enabled:
            if reason & InterruptReason.CONFIG_CHANGE:
                vector = self.config_vector
            elif queue_index is not None and queue_index < len(self.queue_vectors):
                vector = self.queue_vectors[queue_index]
            else:
                vector = NO_VECTOR
            if vector != NO_VECTOR:
                self.msix.notify(vector)
            return
        with self._irq_lock:
            self.isr |= int(reason)
        self._assert_intx()

    def _assert_intx(self) -> None:
        if self.isr and not self.function.intx_disabled and self.function.bus_master:
            self.intx.trigger()

    def intx_pending(self) -> bool:
        return bool(self.isr) and not self.msix.enabled

    def intx_resample(self) -> None:
        """The guest ended the INTx interrupt (EOI): assert it again while ISR still has bits set."""
        if not self.msix.enabled:
            self._assert_intx()

    def _deliver_held_interrupt(self) -> None:
        if self.msix.enabled:
            for vector in {self.config_vector, *self.queue_vectors} - {NO_VECTOR}:
                self.msix.notify(vector)
        else:
            self._assert_intx()

    def _message_write(self, address: int, data: int) -> None:
        """An MSI-X message outside the interrupt range: a 4-byte DMA write (through the IOMMU, if any)."""
        try:
            self.memory.write(address, data.to_bytes(4, "little"))
        except GuestMemoryError as exc:
            self.stats.last_error = f"{self.device.name}: MSI-X message write to {address:#x} failed: {exc}"

    # -- bus mastering --------------------------------------------------------------------------------
    def bus_master_changed(self, enabled: bool) -> None:
        self.msix.set_bus_master(enabled)
        if enabled:
            with self._lock:
                held, self._bus_master_held = sorted(self._bus_master_held), set()
            for index in held:
                self._kick(index)
            if not self.msix.enabled:
                self._assert_intx()

    def process_queue(self, index: int) -> None:
        if not self.function.bus_master:
            with self._lock:
                self._bus_master_held.add(index)
            return
        super().process_queue(index)

    # -- snapshots ----------------------------------------------------------------------------------
    def save_state(self) -> PciTransportState:
        with self._lock:
            function = self.function.save_function()
            function = type(function)(config=function.config, msix=self.msix.save_state())
            return PciTransportState(
                device_type=int(self.device.device_type), status=self.status,
                device_features_sel=self.device_features_sel, driver_features_sel=self.driver_features_sel,
                driver_features=self.driver_features, unknown_driver_features=self._unknown_driver_features,
                queue_sel=self.queue_sel, config_generation=self.config_generation, isr=self.isr,
                config_vector=self.config_vector, queue_vectors=list(self.queue_vectors), function=function,
                queues=[queue.save_state() for queue in self.queues], device=self.device.save_state())

    def check_state(self, state: object) -> PciTransportState:
        saved = expect_state(state, PciTransportState, self.device.name)
        self._check_common_state(saved)
        if len(saved.queue_vectors) != len(self.queues):
            from kvmlet.devices.state import DeviceStateError

            raise DeviceStateError(f"{self.device.name}: the saved state has {len(saved.queue_vectors)} queue "
                                   f"vectors; this device has {len(self.queues)} queues")
        if saved.function.msix is not None:
            expect_state(saved.function.msix, MsixState, f"{self.device.name} MSI-X")
        return saved

    def restore_state(self, state: object) -> None:
        """Registers, the PCI function (BARs decode where the guest had them, MSI-X routes set again), the queues
        (translated again through the restored IOMMU, which comes first) and the device."""
        saved = self.check_state(state)
        self.function.restore_function(saved.function)
        if saved.function.msix is not None:
            self.msix.restore_state(saved.function.msix, self.device.name)
        self.msix.set_bus_master(self.function.bus_master)
        if self.function.on_decode_change is not None:
            self.function.on_decode_change(self.function)
        with self._lock:
            self._restore_queues(saved.queues)
            with self._irq_lock:
                self._restore_negotiation(saved)
                self.isr = saved.isr & 3
                self.config_vector = saved.config_vector & 0xFFFF
                self.queue_vectors = [vector & 0xFFFF for vector in saved.queue_vectors]
            self.config_generation = saved.config_generation
            live, interrupt = self._restore_device(saved.device, bool(self.isr) and not self.msix.enabled)
        for index in live:
            self._kick(index)
        if interrupt:
            self._assert_intx()

    def close(self) -> None:
        super().close()
        for queue in self.queues:
            queue.reset()        # no view of guest memory outlives the device (translated windows are slices)
        close = getattr(self.memory, "close", None)
        if self.translated and close is not None:
            close()
