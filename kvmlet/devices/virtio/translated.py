"""A split virtqueue whose addresses are I/O virtual addresses, translated by an IOMMU (VIRTIO_F_ACCESS_PLATFORM).

:class:`TranslatedQueue` is :class:`~kvmlet.devices.virtio.queue.Virtqueue` over a
:class:`~kvmlet.devices.iommu.dma.DmaAddressSpace`: every check and every path of the queue is the same; what
differs is where the views of rings and buffers come from and for how long they are kept:

* the rings are mapped with the access the device makes (descriptor table and available ring read, used ring
  written): a ring the driver did not map, or mapped read-only where the device writes, faults (recorded by the
  unit) and the device needs a reset;
* each buffer is translated with the access its descriptor asks for (VIRTQ_DESC_F_WRITE: the device writes it),
  before the device touches it: a buffer that faults fails its request (the chain goes back with used length 0,
  nothing of it read or written) and the fault is recorded with the device's source ID, the address and the
  reason;
* the window of the last buffer's page is the queue's fast path for the next buffers if the page is readable
  and writable (a buffer in it needs no new check whatever its direction); the address space keeps the other
  recent windows (:class:`~kvmlet.devices.iommu.dma.DmaAddressSpace`, checked against the unit's cache
  generation); the queue's window and ring views are dropped when the unit tells the address space of an
  invalidation (:meth:`TranslatedQueue.forget_translations`, called with the transport's lock held, so never in
  the middle of a chain);
* a buffer that is contiguous in I/O virtual addresses but not in guest memory (a driver that mapped scattered
  pages at consecutive addresses) is cut into pieces, each one view.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmlet.devices.iommu.dma import DmaScatteredError, Window
from kvmlet.devices.virtio.chain import BufferList, DescriptorChain, DirectChain, new_buffer, new_buffer_list
from kvmlet.devices.virtio.queue import _NO_VIEW, ChainError, LimitCounters, RingError, Virtqueue, _Rings
from kvmlet.memory import GuestMemoryError

if TYPE_CHECKING:
    from kvmlet.devices.iommu.dma import DmaAddressSpace


class TranslatedQueue(Virtqueue):
    """A virtqueue whose driver hands out I/O virtual addresses."""

    memory: DmaAddressSpace

    def __init__(self, memory: DmaAddressSpace, index: int, max_size: int = 256,
                 counters: LimitCounters | None = None) -> None:
        self._scattered = False
        self._probing = False    # pop_direct only looks: a fault is recorded when pop() takes the chain
        super().__init__(memory, index, max_size, counters)

    def forget_translations(self) -> None:
        """Drop every view taken through the IOMMU (after an invalidation; the transport's lock is held)."""
        self._rings = None
        self._data_region = (0, 0)
        self._data_view = _NO_VIEW

    def _reachable(self, address: int, length: int, written: bool) -> bool:
        try:
            self.memory.region_of(address, length, write=written)
        except GuestMemoryError:
            return False
        return True

    def _map_rings(self) -> _Rings:
        try:
            desc = self.memory.region_of(self.desc_addr, 16 * self.size)
            avail = self.memory.region_of(self.driver_addr, self._avail_ring_size)
            used = self.memory.region_of(self.device_addr, self._used_ring_size, write=True)
        except GuestMemoryError as exc:
            raise RingError(f"queue {self.index}: {exc}") from None
        return _Rings(desc.view, self.desc_addr - desc.gpa, avail.view, self.driver_addr - avail.gpa,
                      used.view, self.device_addr - used.gpa)

    def pop_direct(self) -> DirectChain | None:
        self._probing = True
        try:
            return super().pop_direct()
        finally:
            self._probing = False

    def _in_ram(self, addr: int, length: int, write: int = 0) -> bool:
        """Whether the device may access ``[addr, addr+length)`` as the descriptor says (faults are recorded)."""
        record = not self._probing
        try:
            window = self.memory.region_of(addr, length, write=bool(write), record=record)
        except GuestMemoryError as exc:
            if not isinstance(exc, DmaScatteredError):
                return False
            try:
                self.memory.segments(addr, length, bool(write), record=record)   # reachable, in pieces
            except GuestMemoryError:
                return False
            self._scattered = True
            return True
        self._keep(window)
        return True

    def _keep(self, window: Window) -> None:
        """The last buffer's window, for the next buffers (only a page the device may read and write)."""
        if getattr(window, "readable", True) and getattr(window, "writable", True):
            self._data_region = (window.gpa, window.end)
            self._data_view = window.view

    def _parse_chain(self, head: int) -> DescriptorChain:
        self._scattered = False
        chain = super()._parse_chain(head)
        if not self._scattered:
            return chain
        try:
            return DescriptorChain(chain.head, self._split(chain.readable, False), self._split(chain.writable, True),
                                   chain.descriptor_count, chain.indirect)
        except GuestMemoryError as exc:
            raise ChainError(head, str(exc)) from None

    def _split(self, buffers: BufferList, write: bool) -> BufferList:
        pieces = tuple(new_buffer(piece) for gpa, length in buffers.buffers
                       for piece in self.memory.segments(gpa, length, write))
        return new_buffer_list(buffers.memory, pieces, buffers.length)
