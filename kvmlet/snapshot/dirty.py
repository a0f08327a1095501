"""Which guest pages changed: KVM's dirty log (pages the guest wrote) joined with the VMM's own record
(pages devices and loaders wrote, kept by :class:`kvmlet.memory.GuestMemory`).

Logging is enabled per memory slot on demand (``KVM_MEM_LOG_DIRTY_PAGES``), because every page the guest
writes while it is on costs a fault (23-26 us under PVM, PLATFORM.md): a VM configured with
``track_dirty_pages`` (Firecracker's switch for diff snapshots) has it from the start; migration turns it on
for its duration. Each :meth:`DirtyLog.take` returns what changed since the previous one and starts afresh.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmlet.memory import PAGE_SIZE, GuestMemory

if TYPE_CHECKING:
    from kvmlet.kvm.vm import Vm


class DirtyLog:
    """Dirty-page tracking for one VM's memory."""

    def __init__(self, vm: Vm, memory: GuestMemory) -> None:
        self.vm = vm
        self.memory = memory
        self.enabled = False

    def start(self) -> None:
        """Log every slot's writes from now on (the pages written before are not reported)."""
        if self.enabled:
            return
        for region in self.memory.regions:
            self.vm.set_user_memory_region(region.slot, region.gpa, region.size, region.host_address,
                                           log_dirty=True)
        self.memory.start_dirty_tracking()
        self.enabled = True

    def stop(self) -> None:
        if not self.enabled:
            return
        for region in self.memory.regions:
            self.vm.set_user_memory_region(region.slot, region.gpa, region.size, region.host_address)
        self.memory.stop_dirty_tracking()
        self.enabled = False

    def take(self) -> list[bytearray]:
        """Per region, one byte per page, non-zero for a page written (by the guest or the VMM) since the
        last call (or since :meth:`start`)."""
        if not self.enabled:
            raise RuntimeError("dirty logging is not enabled")
        pages = self.memory.take_dirty()
        for index, region in enumerate(self.memory.regions):
            merge_bitmap(pages[index], self.vm.get_dirty_log(region.slot, region.size // PAGE_SIZE))
        return pages


def merge_bitmap(pages: bytearray, bitmap: bytes) -> None:
    """Set ``pages[i]`` for each bit ``i`` set in KVM's bitmap (64-bit little-endian words)."""
    words = memoryview(bitmap).cast("Q")
    count = len(pages)
    for word_index, word in enumerate(words):
        if not word:
            continue
        base = word_index * 64
        while word:
            low = word & -word
            page = base + low.bit_length() - 1
            if page < count:
                pages[page] = 1
            word ^= low


def dirty_page_count(pages: list[bytearray]) -> int:
    return sum(len(region) - region.count(0) for region in pages)
