"""Descriptor chains as devices see them: the device-readable and device-writable parts of a request.

:class:`~kvmlet.devices.virtio.queue.Virtqueue` parses chains out of the descriptor table (every buffer checked
to lie in guest RAM) and hands them to devices as :class:`DescriptorChain` (the general form, byte streams
over buffers) or :class:`DirectChain` (a few direct descriptors as memoryviews, for the commonest requests).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from kvmlet.devices.iommu.dma import DeviceMemory


class Buffer(NamedTuple):
    """One guest buffer of a chain: (guest-physical address, length in bytes)."""

    gpa: int
    length: int


@dataclass(frozen=True)
class BufferList:
    """The device-readable or device-writable part of a chain, as one byte stream over its buffers.

    Every buffer was checked to lie in guest RAM when the chain was parsed, and none is empty; offsets
    below are into the concatenation of the buffers.
    """

    memory: DeviceMemory = field(repr=False, compare=False)
    buffers: tuple[Buffer, ...] = ()
    length: int = field(init=False, repr=False, compare=False)   # total bytes, computed once

    def __post_init__(self) -> None:
        object.__setattr__(self, "length", sum(size for _, size in self.buffers))

    def __len__(self) -> int:
        return len(self.buffers)

    def slice(self, offset: int, length: int | None = None) -> BufferList:
        """The buffers covering ``[offset, offset+length)`` of the stream (clipped to its end)."""
        if offset == 0 and (length is None or length >= self.length):
            return self  # the whole stream (the common case: no new objects)
        remaining = self.length - offset if length is None else length
        out: list[Buffer] = []
        for gpa, size in self.buffers:
            if remaining <= 0:
                break
            if offset >= size:
                offset -= size
                continue
            take = min(size - offset, remaining)
            out.append(Buffer(gpa + offset, take))
            remaining -= take
            offset = 0
        return BufferList(self.memory, tuple(out))

    def split(self, offset: int) -> tuple[BufferList, BufferList]:
        """The stream cut in two at ``offset``."""
        buffers = self.buffers
        count = len(buffers)
        index = position = 0
        while index < count and position < offset:
            position += buffers[index][1]
            index += 1
        if position == offset >= 0:  # between two buffers (a header or status byte of its own): no cutting
            return (new_buffer_list(self.memory, buffers[:index], offset),
                    new_buffer_list(self.memory, buffers[index:], self.length - offset))
        return self.slice(0, offset), self.slice(offset)

    def views(self) -> list[memoryview]:
        """Writable memoryviews of each buffer, in order (release them before the memory closes)."""
        return [self.memory.view(gpa, size) for gpa, size in self.buffers if size]

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes ``[offset, offset+length)`` of the stream (fewer if it ends first)."""
        if offset == 0 and length is not None and self.buffers and 0 <= length <= self.buffers[0].length:
            return self.memory.read(self.buffers[0].gpa, length)  # within the first buffer
        return b"".join(self.memory.read(gpa, size) for gpa, size in self.slice(offset, length).buffers)

    def read_all(self) -> bytes:
        return self.read(0)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Copy ``data`` into the stream at ``offset``; returns how many bytes fitted."""
        buffers = self.buffers
        if offset == 0 and isinstance(data, bytes) and buffers and len(data) <= buffers[0][1]:
            self.memory.write(buffers[0][0], data)   # within the first buffer (a status byte, a header)
            return len(data)
        source = memoryview(data).cast("B")
        done = 0
        for gpa, size in self.slice(offset, len(source)).buffers:
            self.memory.write(gpa, source[done:done + size])
            done += size
        return done

    def fill(self, byte: int = 0) -> int:
        """Set every byte of the stream to ``byte``; returns the stream length."""
        for gpa, size in self.buffers:
            if size:
                self.memory.fill(gpa, size, byte)
        return self.length


new_buffer = functools.partial(tuple.__new__, Buffer)   # Buffer((gpa, length)) without NamedTuple's __new__
_set = object.__setattr__


def new_buffer_list(memory: DeviceMemory, buffers: tuple[Buffer, ...], length: int) -> BufferList:
    """A BufferList whose total length is known (the chain parser's hot path: no __init__ round trip)."""
    out = BufferList.__new__(BufferList)
    _set(out, "memory", memory)
    _set(out, "buffers", buffers)
    _set(out, "length", length)
    return out


@dataclass(frozen=True)
class DescriptorChain:
    """One request: the head index to give back and its device-readable and device-writable parts."""

    head: int
    readable: BufferList
    writable: BufferList
    descriptor_count: int
    indirect: bool = False


class DirectBuffer(NamedTuple):
    """One buffer of a :class:`DirectChain`."""

    gpa: int                # where the buffer is
    view: memoryview        # the buffer in guest RAM (checked to lie there, never empty)
    writable: bool          # device-writable (VIRTQ_DESC_F_WRITE)


class DirectChain(NamedTuple):
    """A short chain of direct descriptors (:meth:`Virtqueue.pop_direct`), device-readable buffers first."""

    head: int
    buffers: list[DirectBuffer]


new_direct_buffer = functools.partial(tuple.__new__, DirectBuffer)
new_direct_chain = functools.partial(tuple.__new__, DirectChain)
