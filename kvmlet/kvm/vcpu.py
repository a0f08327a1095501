"""The vCPU file descriptor: KVM_RUN with its shared ``kvm_run`` page, and the register state."""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from kvmlet.kvm import constants as c
from kvmlet.kvm import structs as s
from kvmlet.kvm.cpuid import CpuidEntry, entries_from_struct, struct_from_entries
from kvmlet.kvm.errors import ioctl_error

if TYPE_CHECKING:
    from kvmlet.kvm.stats import StatsReader
    from kvmlet.kvm.vm import Vm

_S = TypeVar("_S", bound=ctypes.Structure)

_IO_EXIT = struct.Struct("<BBHIQ")
_MMIO_EXIT = struct.Struct("<Q8sIB")
_INTERNAL_HEAD = struct.Struct("<IIQ")


@dataclass(frozen=True)
class IoExit:
    is_write: bool
    size: int
    port: int
    count: int
    data_offset: int


@dataclass(frozen=True)
class MmioExit:
    address: int
    data: bytes
    length: int
    is_write: bool


@dataclass(frozen=True)
class InternalErrorExit:
    suberror: int
    data: tuple[int, ...]
    instruction: bytes | None   # bytes KVM failed to emulate, when it reports them


class Vcpu:
    """One virtual CPU. ``run()`` enters the guest until the next exit to user space."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: int, mmap_size: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        self.run_page = mmap.mmap(fd, mmap_size, flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)

    # -- generic ioctl helpers ----------------------------------------------------------------------
    def _get(self, name: str, request: int, struct_type: type[_S]) -> _S:
        value = struct_type()
        try:
            fcntl.ioctl(self.fd, request, value)
        except OSError as exc:
            raise ioctl_error(name, exc) from None
        return value

    def _set(self, name: str, request: int, value: ctypes.Structure) -> None:
        try:
            fcntl.ioctl(self.fd, request, value)
        except OSError as exc:
            raise ioctl_error(name, exc) from None

    # -- running ------------------------------------------------------------------------------------
    def run(self) -> int:
        """KVM_RUN; returns the exit reason. InterruptedError when a signal kicked the vCPU."""
        fcntl.ioctl(self.fd, c.KVM_RUN, 0)
        return int(struct.unpack_from("<I", self.run_page, c_exit_reason_offset)[0])

    @property
    def exit_reason(self) -> int:
        return int(struct.unpack_from("<I", self.run_page, c_exit_reason_offset)[0])

    def set_immediate_exit(self, value: bool) -> None:
        """kvm_run.immediate_exit: make the next (or current, after a signal) KVM_RUN return."""
        self.run_page[s.RUN_IMMEDIATE_EXIT] = 1 if value else 0

    def io_exit(self) -> IoExit:
        direction, size, port, count, offset = _IO_EXIT.unpack_from(self.run_page, s.RUN_IO)
        return IoExit(direction == 1, size, port, count, offset)

    def mmio_exit(self) -> MmioExit:
        address, data, length, is_write = _MMIO_EXIT.unpack_from(self.run_page, s.RUN_MMIO)
        return MmioExit(address, data, length, bool(is_write))

    def internal_error(self) -> InternalErrorExit:
        suberror, ndata = struct.unpack_from("<II", self.run_page, s.RUN_INTERNAL)
        ndata = min(ndata, 16)
        data = struct.unpack_from(f"<{ndata}Q", self.run_page, s.RUN_INTERNAL + 8)
        instruction = None
        if suberror == c.InternalError.EMULATION and ndata >= 3:
            _, _, flags = _INTERNAL_HEAD.unpack_from(self.run_page, s.RUN_INTERNAL)
            if flags & c.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
                size = min(self.run_page[s.RUN_INTERNAL + 16], 15)
                start = s.RUN_INTERNAL + 17
                instruction = bytes(self.run_page[start:start + size])
        return InternalErrorExit(suberror, tuple(data), instruction)

    def system_event(self) -> tuple[int, tuple[int, ...]]:
        kind, ndata = struct.unpack_from("<II", self.run_page, s.RUN_SYSTEM_EVENT)
        data = struct.unpack_from(f"<{min(ndata, 16)}Q", self.run_page, s.RUN_SYSTEM_EVENT + 8)
        return kind, tuple(data)

    def fail_entry_reason(self) -> tuple[int, int]:
        reason, cpu = struct.unpack_from("<QI", self.run_page, s.RUN_FAIL_ENTRY)
        return reason, cpu

    # -- registers ----------------------------------------------------------------------------------
    def get_regs(self) -> s.kvm_regs:
        return self._get("KVM_GET_REGS", c.KVM_GET_REGS, s.kvm_regs)

    def set_regs(self, regs: s.kvm_regs) -> None:
        self._set("KVM_SET_REGS", c.KVM_SET_REGS, regs)

    def get_sregs(self) -> s.kvm_sregs:
        return self._get("KVM_GET_SREGS", c.KVM_GET_SREGS, s.kvm_sregs)

    def set_sregs(self, sregs: s.kvm_sregs) -> None:
        self._set("KVM_SET_SREGS", c.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> s.kvm_fpu:
        return self._get("KVM_GET_FPU", c.KVM_GET_FPU, s.kvm_fpu)

    def set_fpu(self, fpu: s.kvm_fpu) -> None:
        self._set("KVM_SET_FPU", c.KVM_SET_FPU, fpu)

    def get_xsave(self) -> bytes:
        """The XSAVE area (KVM_GET_XSAVE2 with its full size where the host has larger areas)."""
        size = self.vm.check_extension(c.Cap.XSAVE2)
        if size > ctypes.sizeof(s.kvm_xsave):
            buf = ctypes.create_string_buffer(size)
            try:
                fcntl.ioctl(self.fd, c.KVM_GET_XSAVE2, buf)
            except OSError as exc:
                raise ioctl_error("KVM_GET_XSAVE2", exc) from None
            return buf.raw
        return bytes(self._get("KVM_GET_XSAVE", c.KVM_GET_XSAVE, s.kvm_xsave))

    def set_xsave(self, area: bytes) -> None:
        buf = ctypes.create_string_buffer(area, max(len(area), ctypes.sizeof(s.kvm_xsave)))
        try:
            fcntl.ioctl(self.fd, c.KVM_SET_XSAVE, buf)
        except OSError as exc:
            raise ioctl_error("KVM_SET_XSAVE", exc) from None

    def get_xcrs(self) -> s.kvm_xcrs:
        return self._get("KVM_GET_XCRS", c.KVM_GET_XCRS, s.kvm_xcrs)

    def set_xcrs(self, xcrs: s.kvm_xcrs) -> None:
        self._set("KVM_SET_XCRS", c.KVM_SET_XCRS, xcrs)

    def get_lapic(self) -> s.kvm_lapic_state:
        return self._get("KVM_GET_LAPIC", c.KVM_GET_LAPIC, s.kvm_lapic_state)

    def set_lapic(self, lapic: s.kvm_lapic_state) -> None:
        self._set("KVM_SET_LAPIC", c.KVM_SET_LAPIC, lapic)

    def get_debugregs(self) -> s.kvm_debugregs:
        return self._get("KVM_GET_DEBUGREGS", c.KVM_GET_DEBUGREGS, s.kvm_debugregs)

    def set_debugregs(self, debugregs: s.kvm_debugregs) -> None:
        self._set("KVM_SET_DEBUGREGS", c.KVM_SET_DEBUGREGS, debugregs)

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest TSC frequency."""
        try:
            return int(fcntl.ioctl(self.fd, c.KVM_GET_TSC_KHZ, 0))
        except OSError as exc:
            raise ioctl_error("KVM_GET_TSC_KHZ", exc) from None

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ (needs KVM_CAP_TSC_CONTROL: absent under PVM)."""
        try:
            fcntl.ioctl(self.fd, c.KVM_SET_TSC_KHZ, khz)
        except OSError as exc:
            raise ioctl_error("KVM_SET_TSC_KHZ", exc) from None

    def get_mp_state(self) -> c.MpState:
        state = self._get("KVM_GET_MP_STATE", c.KVM_GET_MP_STATE, s.kvm_mp_state)
        return c.MpState(state.mp_state)

    def set_mp_state(self, state: c.MpState) -> None:
        value = s.kvm_mp_state()
        value.mp_state = int(state)
        self._set("KVM_SET_MP_STATE", c.KVM_SET_MP_STATE, value)

    def get_vcpu_events(self) -> s.kvm_vcpu_events:
        return self._get("KVM_GET_VCPU_EVENTS", c.KVM_GET_VCPU_EVENTS, s.kvm_vcpu_events)

    def set_vcpu_events(self, events: s.kvm_vcpu_events) -> None:
        self._set("KVM_SET_VCPU_EVENTS", c.KVM_SET_VCPU_EVENTS, events)

    def get_msrs(self, indices: Sequence[int]) -> dict[int, int]:
        """KVM_GET_MSRS; MSRs KVM cannot read are left out of the result."""
        buf = s.kvm_msrs(len(indices))
        buf.nmsrs = len(indices)
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        try:
            done = fcntl.ioctl(self.fd, c.KVM_GET_MSRS, buf)
        except OSError as exc:
            raise ioctl_error("KVM_GET_MSRS", exc) from None
        entries = buf.entries
        return {int(entries[i].index): int(entries[i].data) for i in range(done)}

    def set_msrs(self, values: Mapping[int, int]) -> int:
        """KVM_SET_MSRS; returns how many were set (KVM stops at the first it refuses)."""
        buf = s.kvm_msrs(len(values))
        buf.nmsrs = len(values)
        for i, (index, data) in enumerate(values.items()):
            buf.entries[i].index = index
            buf.entries[i].data = data
        try:
            return int(fcntl.ioctl(self.fd, c.KVM_SET_MSRS, buf))
        except OSError as exc:
            raise ioctl_error("KVM_SET_MSRS", exc) from None

    def set_cpuid(self, entries: Sequence[CpuidEntry]) -> None:
        """KVM_SET_CPUID2."""
        buf = struct_from_entries(entries)
        try:
            fcntl.ioctl(self.fd, c.KVM_SET_CPUID2, buf)
        except OSError as exc:
            raise ioctl_error("KVM_SET_CPUID2", exc) from None

    def get_cpuid(self, capacity: int = 256) -> list[CpuidEntry]:
        """KVM_GET_CPUID2: the CPUID table this vCPU was given."""
        buf = s.kvm_cpuid2(capacity)
        buf.nent = capacity
        try:
            fcntl.ioctl(self.fd, c.KVM_GET_CPUID2, buf)
        except OSError as exc:
            raise ioctl_error("KVM_GET_CPUID2", exc) from None
        return entries_from_struct(buf)

    def translate(self, linear_address: int) -> int | None:
        """KVM_TRANSLATE: guest-virtual to guest-physical with the vCPU's current page tables."""
        request = s.kvm_translation()
        request.linear_address = linear_address
        try:
            fcntl.ioctl(self.fd, c.KVM_TRANSLATE, request)
        except OSError:
            return None
        return int(request.physical_address) if request.valid else None

    def nmi(self) -> None:
        try:
            fcntl.ioctl(self.fd, c.KVM_NMI, 0)
        except OSError as exc:
            raise ioctl_error("KVM_NMI", exc) from None

    def stats(self) -> StatsReader:
        """KVM_GET_STATS_FD on the vCPU."""
        from kvmlet.kvm.stats import StatsReader  # only when asked: keeps VM start-up lean

        try:
            fd = fcntl.ioctl(self.fd, c.KVM_GET_STATS_FD, 0)
        except OSError as exc:
            raise ioctl_error("KVM_GET_STATS_FD", exc) from None
        return StatsReader(fd)

    def close(self) -> None:
        if self.fd >= 0:
            self.run_page.close()
            os.close(self.fd)
            self.fd = -1


c_exit_reason_offset = s.RUN_EXIT_REASON
