"""KVM's binary statistics (KVM_GET_STATS_FD): named counters per VM and per vCPU."""

from __future__ import annotations

import ctypes
import enum
import os
import struct
from dataclasses import dataclass

from kvmlet.kvm import structs as s


class StatType(enum.IntEnum):
    CUMULATIVE = 0
    INSTANT = 1
    PEAK = 2
    LINEAR_HIST = 3
    LOG_HIST = 4


@dataclass(frozen=True)
class StatDescriptor:
    name: str
    type: StatType
    unit: int
    exponent: int
    size: int
    offset: int


class StatsReader:
    """Reads one binary stats fd: the header and descriptors once, the values on each ``read``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def _parse(self) -> None:
        fd = self.fd
        header = s.kvm_stats_header.from_buffer_copy(os.pread(fd, ctypes.sizeof(s.kvm_stats_header), 0))
        self.id = os.pread(fd, header.name_size, header.id_offset).rstrip(b"\0").decode(errors="replace")
        desc_size = ctypes.sizeof(s.kvm_stats_desc_header) + header.name_size
        raw = os.pread(fd, desc_size * header.num_desc, header.desc_offset)
        self.data_offset = header.data_offset
        self.descriptors: list[StatDescriptor] = []
        for i in range(header.num_desc):
            base = i * desc_size
            desc = s.kvm_stats_desc_header.from_buffer_copy(raw, base)
            name = raw[base + ctypes.sizeof(s.kvm_stats_desc_header): base + desc_size]
            self.descriptors.append(StatDescriptor(
                name=name.rstrip(b"\0").decode(errors="replace"),
                type=StatType(desc.flags & 0xF) if (desc.flags & 0xF) <= 4 else StatType.INSTANT,
                unit=(desc.flags >> 4) & 0xF,
                exponent=desc.exponent, size=desc.size, offset=desc.offset))
        self._data_size = max((d.offset + 8 * d.size for d in self.descriptors), default=0)

    def read(self) -> dict[str, int]:
        """Current values of every scalar statistic (histograms are summed)."""
        data = os.pread(self.fd, self._data_size, self.data_offset)
        values: dict[str, int] = {}
        for d in self.descriptors:
            words = struct.unpack_from(f"<{d.size}Q", data, d.offset)
            values[d.name] = words[0] if d.size == 1 else sum(words)
        return values

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
