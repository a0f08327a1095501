"""Queued invalidation (Intel VT-d specification, section 6.5.2): the descriptors between IQH and IQT, run when
the guest writes IQT with queued invalidation enabled.

The queue is ``256 << IQA.QS`` descriptors of 128 bits at IQA; IQH and IQT are indices (bits 18:4). Each write of
IQT runs from IQH to IQT, wrapping at the end of the queue, so a write runs at most one queue's worth of
descriptors whatever the guest put there. Supported: context-cache invalidate, IOTLB invalidate and invalidation
wait (status write and/or completion interrupt). Anything else (device-TLB, interrupt entry cache and the
scalable-mode PASID descriptors: this unit has neither ATS, interrupt remapping nor scalable mode), a descriptor
with reserved bits set, a descriptor outside guest RAM, a tail beyond the queue's end or a status address
outside RAM is an invalidation queue error: FSTS.IQE, IQH left on the descriptor, and nothing more is fetched
until the guest clears IQE (then the next IQT write goes on from IQH).

Address spaces are told of the invalidations before each wait descriptor is carried out and at the end, so
the completion the guest waits for comes after every device has let go of old translations.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from kvmlet.devices.iommu import regs as r
from kvmlet.devices.iommu.regs import DescriptorType, Granularity
from kvmlet.memory import GuestMemoryError

if TYPE_CHECKING:
    from kvmlet.devices.iommu.vtd import VtdUnit

_DESCRIPTOR = struct.Struct("<QQ")


class QueueError(Exception):
    """An invalid descriptor or queue state: FSTS.IQE."""


def queue_entries(iqa: int) -> int:
    return 256 << (iqa & r.IQA_QS_MASK)


def process_queue(unit: VtdUnit) -> None:
    """Run the descriptors from IQH to IQT (``unit._reg_lock`` held, on the vCPU thread that wrote IQT)."""
    entries = queue_entries(unit.iqa)
    base = unit.iqa & r.IQA_ADDRESS_MASK
    head = unit.iqh >> r.QUEUE_INDEX_SHIFT
    tail = unit.iqt >> r.QUEUE_INDEX_SHIFT
    if tail >= entries:
        unit.queue_error(f"tail {tail} is beyond the queue of {entries} descriptors")
        return
    if head >= entries:        # the queue shrank under a pending head: start over (the guest's doing)
        head = 0
    invalidated = False
    try:
        while head != tail:
            unit.iqh = head << r.QUEUE_INDEX_SHIFT
            try:
                lo, hi = _DESCRIPTOR.unpack(unit.memory.read(base + r.DESCRIPTOR_SIZE * head, r.DESCRIPTOR_SIZE))
            except GuestMemoryError:
                raise QueueError(f"descriptor {head} at {base + r.DESCRIPTOR_SIZE * head:#x} is not in memory") \
                    from None
            unit.stats.queued_descriptors += 1
            kind = lo & r.DESC_TYPE_MASK
            if lo & r.DESC_TYPE_HIGH_MASK:
                raise QueueError(f"descriptor {head}: type {kind | (lo >> 5 & 0x70):#x} is a scalable-mode type")
            if kind == DescriptorType.CONTEXT_CACHE:
                _context_cache(unit, head, lo, hi)
                invalidated = True
            elif kind == DescriptorType.IOTLB:
                _iotlb(unit, head, lo, hi)
                invalidated = True
            elif kind == DescriptorType.WAIT:
                if invalidated:
                    unit.tell_listeners()
                    invalidated = False
                _wait(unit, head, lo, hi)
            else:
                raise QueueError(f"descriptor {head}: type {kind} is not supported by this unit")
            head = (head + 1) % entries
        unit.iqh = head << r.QUEUE_INDEX_SHIFT
    except QueueError as exc:
        unit.queue_error(str(exc))
    finally:
        if invalidated:
            unit.tell_listeners()


def _context_cache(unit: VtdUnit, index: int, lo: int, hi: int) -> None:
    if lo & r.CC_DESC_LO_RESERVED or hi & r.CC_DESC_HI_RESERVED:
        raise QueueError(f"descriptor {index}: context-cache invalidate with reserved bits set")
    granularity = Granularity(lo >> r.DESC_G_SHIFT & 3)
    if granularity is Granularity.RESERVED:
        raise QueueError(f"descriptor {index}: context-cache invalidate with granularity 0")
    unit.invalidate_contexts(granularity, domain=lo >> 16 & 0xFFFF, source_id=lo >> 32 & 0xFFFF,
                             function_mask=lo >> 48 & 3)


def _iotlb(unit: VtdUnit, index: int, lo: int, hi: int) -> None:
    if lo & r.IOTLB_DESC_LO_RESERVED or hi & r.IOTLB_DESC_HI_RESERVED:
        raise QueueError(f"descriptor {index}: IOTLB invalidate with reserved bits set")
    granularity = Granularity(lo >> r.DESC_G_SHIFT & 3)
    if granularity is Granularity.RESERVED:
        raise QueueError(f"descriptor {index}: IOTLB invalidate with granularity 0")
    mask = hi & r.IVA_AM_MASK
    address = hi & ~(r.PAGE_SIZE - 1)
    if granularity is Granularity.DEVICE_OR_PAGE and address & ((r.PAGE_SIZE << mask) - 1):
        raise QueueError(f"descriptor {index}: page-selective address {address:#x} is not aligned to its "
                         f"2**{mask} pages")
    unit.invalidate_iotlb(granularity, domain=lo >> 16 & 0xFFFF, address=address, address_mask=mask)


def _wait(unit: VtdUnit, index: int, lo: int, hi: int) -> None:
    if lo & r.WAIT_LO_RESERVED or hi & r.WAIT_HI_RESERVED:
        raise QueueError(f"descriptor {index}: invalidation wait with reserved bits set")
    if lo & r.WAIT_SW:
        address = hi & ~3
        try:
            unit.memory.write(address, (lo >> 32).to_bytes(4, "little"))
        except GuestMemoryError:
            raise QueueError(f"descriptor {index}: status address {address:#x} is not in memory") from None
    if lo & r.WAIT_IF:
        unit.completion_event()
