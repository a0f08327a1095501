"""Loading a kernel into guest memory: the public API of :mod:`kvmlet.boot`.

:func:`identify_kernel` tells an ELF64 (vmlinux, or the project's test guest) from a bzImage;
:func:`load` places the kernel, the initrd, the command line and the boot structures in guest
memory and returns the vCPU state to start from (:class:`BootInfo`).

Protocols:

- ``LINUX64``: the Linux 64-bit boot protocol. A bzImage is entered at its load address + 0x200;
  an ELF at ``e_entry`` (as Firecracker does for a vmlinux). RSI points to the zero page.
- ``PVH``: the Xen PVH entry, for an ELF with a ``XEN_ELFNOTE_PHYS32_ENTRY`` note. EBX points to
  the ``hvm_start_info``.
- ``AUTO``: ``LINUX64`` (the protocol every x86-64 Linux supports).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from kvmlet.boot import bzimage, elf
from kvmlet.boot.acpi import AcpiExtras, write_acpi
from kvmlet.boot.cpu_state import BootCpuState, long_mode_state, pvh_state
from kvmlet.boot.e820 import E820Entry, E820Type, build_e820
from kvmlet.boot.errors import BootImageError
from kvmlet.boot.gdt import write_gdt_and_idt
from kvmlet.boot.kernel_info import find_linux_banner, is_pvm_guest_kernel
from kvmlet.boot.layout import (
    CMDLINE_ADDR,
    CMDLINE_MAX_SIZE,
    HIGH_MEMORY_START,
    PAGE_SIZE,
    PVH_START_INFO_ADDR,
    ZERO_PAGE_ADDR,
    align_down,
    align_up,
    mib,
)
from kvmlet.boot.mptable import check_cpu_count, write_mptable
from kvmlet.boot.pagetables import write_identity_page_tables
from kvmlet.boot.pvh import build_start_info
from kvmlet.boot.zeropage import SYNTHETIC_INITRD_ADDR_MAX, build_zero_page
from kvmlet.memory import MMIO_HOLE_START, GuestMemory

# Linux's COMMAND_LINE_SIZE on x86 (including the NUL): the limit for kernels without a setup header.
LINUX_COMMAND_LINE_SIZE = 2048


class BootProtocol(enum.Enum):
    """How the kernel is entered."""

    AUTO = "auto"
    LINUX64 = "linux64"
    PVH = "pvh"


class KernelKind(enum.Enum):
    ELF = "elf"
    BZIMAGE = "bzimage"


@dataclass(frozen=True)
class KernelImage:
    """A kernel image and what is known about it before loading."""

    kind: KernelKind
    data: bytes = field(repr=False)
    path: Path | None
    linux_version: str | None  # the "Linux version ..." banner, if the image is Linux
    pvm_aware: bool  # built with CONFIG_PVM_GUEST (heuristic: see kvmlet.boot.kernel_info)
    has_pvh_entry: bool = False

    @property
    def name(self) -> str:
        """How to name the image in messages."""
        return str(self.path) if self.path is not None else f"the {self.kind.value} kernel image"


@dataclass(frozen=True)
class BootInfo:
    """What :func:`load` did: the vCPU state to start from and where everything went."""

    protocol: BootProtocol  # LINUX64 or PVH, never AUTO
    entry: int
    cpu_state: BootCpuState
    e820: list[E820Entry]
    cmdline: bytes  # without the NUL
    kernel_range: tuple[int, int]  # [start, end)
    initrd_range: tuple[int, int] | None  # [start, end)
    boot_params_gpa: int  # the zero page (LINUX64) or the hvm_start_info (PVH)


def identify_kernel(
    data: bytes, path: str | Path | None = None, *, inspect_payload: bool = False
) -> KernelImage:
    """Tell an ELF64 from a bzImage, validating its headers.

    ``linux_version`` is the ``"Linux version ..."`` banner of an ELF; for a bzImage it is
    ``"Linux version "`` followed by the string ``hdr.kernel_version`` points to (release, builder,
    build number and date, without the compiler). ``inspect_payload``: for a bzImage, decompress the
    payload to read the banner itself and look for the PVM guest markers (slow: seconds);
    otherwise a bzImage's ``pvm_aware`` is False.
    """
    where = Path(path) if path is not None else None
    if elf.is_elf(data):
        image = elf.parse_elf(data)
        return KernelImage(
            kind=KernelKind.ELF,
            data=data,
            path=where,
            linux_version=find_linux_banner(data),
            pvm_aware=is_pvm_guest_kernel(data, elf.section_names(data)),
            has_pvh_entry=image.pvh_entry is not None,
        )
    if bzimage.looks_like_bzimage(data):
        # The raw file is not searched for the banner: the payload is compressed, and compressors
        # can leave a truncated copy of it among their literals.
        header = bzimage.parse_setup_header(data)
        release = bzimage.kernel_version_string(data, header)
        version = f"Linux version {release}" if release else None
        pvm = False
        if inspect_payload:
            from kvmlet.boot.vmlinux_extract import extract_vmlinux

            vmlinux = extract_vmlinux(data)
            version = find_linux_banner(vmlinux) or version
            pvm = is_pvm_guest_kernel(vmlinux, elf.section_names(vmlinux))
        return KernelImage(
            kind=KernelKind.BZIMAGE, data=data, path=where, linux_version=version, pvm_aware=pvm
        )
    name = str(where) if where is not None else "the kernel image"
    raise BootImageError(
        f"{name} is neither an ELF64 nor a bzImage (first bytes {data[:8].hex(' ')}, {len(data)} bytes)"
    )


def read_kernel(path: str | Path, *, inspect_payload: bool = False) -> KernelImage:
    """Read and identify the kernel image at ``path``."""
    where = Path(path)
    try:
        data = where.read_bytes()
    except OSError as exc:
        raise BootImageError(f"cannot read kernel image {where}: {exc.strerror or exc}") from exc
    return identify_kernel(data, where, inspect_payload=inspect_payload)


def load(
    memory: GuestMemory,
    kernel: KernelImage,
    *,
    cmdline: str,
    initrd: bytes | None = None,
    protocol: BootProtocol = BootProtocol.AUTO,
    cpus: int = 1,
    acpi: AcpiExtras | None = None,
    reserved: tuple[tuple[int, int], ...] = (),
) -> BootInfo:
    """Load ``kernel`` (and ``initrd``) into ``memory`` and write the boot structures.

    ``acpi``: tables and DSDT AML devices add; ``reserved``: (start, size) ranges they keep, reported reserved
    in the e820 map. Raises BootImageError, naming the problem, if the image is malformed, does not fit, or cannot be
    booted with ``protocol``; or if the command line, initrd or CPU count exceed what fits.
    """
    check_cpu_count(cpus)
    e820 = build_e820(memory)
    if reserved:   # what devices keep for themselves (the vTPM's event log), reported reserved
        e820 = sorted([*e820, *(E820Entry(start, size, E820Type.RESERVED) for start, size in reserved)],
                      key=lambda entry: entry.addr)
    chosen = _resolve_protocol(kernel, protocol)
    header = bzimage.parse_setup_header(kernel.data) if kernel.kind is KernelKind.BZIMAGE else None
    cmdline_bytes = _encode_cmdline(cmdline, kernel, header)

    if header is not None:
        loaded_bz = bzimage.load_bzimage(memory, kernel.data)
        entry, kernel_range = loaded_bz.entry, (loaded_bz.load_address, loaded_bz.end)
    else:
        loaded_elf = elf.load_elf(memory, kernel.data)
        kernel_range = (loaded_elf.lowest, loaded_elf.highest)
        if chosen is BootProtocol.PVH:
            assert loaded_elf.pvh_entry is not None  # checked by _resolve_protocol
            entry = loaded_elf.pvh_entry
        else:
            entry = loaded_elf.entry

    initrd_max = header.initrd_addr_max if header is not None else SYNTHETIC_INITRD_ADDR_MAX
    initrd_range = _place_initrd(memory, initrd, kernel_range[1], initrd_max) if initrd is not None else None
    initrd_span = (initrd_range[0], initrd_range[1] - initrd_range[0]) if initrd_range is not None else None

    memory.write(CMDLINE_ADDR, cmdline_bytes + b"\0")
    write_gdt_and_idt(memory)
    write_mptable(memory, cpus)
    rsdp = write_acpi(memory, cpus, acpi)
    if chosen is BootProtocol.PVH:
        memory.write(
            PVH_START_INFO_ADDR, build_start_info(cmdline_addr=CMDLINE_ADDR, memmap=e820, initrd=initrd_span,
                                               rsdp_addr=rsdp)
        )
        state = pvh_state(entry, PVH_START_INFO_ADDR)
        params = PVH_START_INFO_ADDR
    else:
        write_identity_page_tables(memory)
        setup = bzimage.setup_header_bytes(kernel.data, header) if header is not None else None
        memory.write(
            ZERO_PAGE_ADDR,
            build_zero_page(
                setup_header=setup,
                cmdline_addr=CMDLINE_ADDR,
                cmdline_size=LINUX_COMMAND_LINE_SIZE - 1,
                initrd=initrd_span,
                e820=e820,
                acpi_rsdp_addr=rsdp,
            ),
        )
        state = long_mode_state(entry, ZERO_PAGE_ADDR)
        params = ZERO_PAGE_ADDR
    return BootInfo(
        protocol=chosen,
        entry=entry,
        cpu_state=state,
        e820=e820,
        cmdline=cmdline_bytes,
        kernel_range=kernel_range,
        initrd_range=initrd_range,
        boot_params_gpa=params,
    )


def cmdline_limit(kernel: KernelImage, header: bzimage.SetupHeader | None = None) -> int:
    """The longest command line (bytes, without the NUL) ``kernel`` accepts."""
    if kernel.kind is KernelKind.BZIMAGE:
        header = header or bzimage.parse_setup_header(kernel.data)
        limit = header.cmdline_size
    else:
        limit = LINUX_COMMAND_LINE_SIZE - 1
    return min(limit, CMDLINE_MAX_SIZE - 1)


def _resolve_protocol(kernel: KernelImage, protocol: BootProtocol) -> BootProtocol:
    if protocol is not BootProtocol.PVH:
        return BootProtocol.LINUX64
    if kernel.kind is KernelKind.BZIMAGE:
        raise BootImageError(
            f"{kernel.name} is a bzImage, which has no PVH entry point; boot it with the linux64 protocol, "
            f"or boot its vmlinux (python -m kvmlet.boot.vmlinux_extract) if that has a PVH note"
        )
    if elf.parse_elf(kernel.data).pvh_entry is None:
        raise BootImageError(
            f"{kernel.name} has no PVH entry note (owner 'Xen', type {elf.XEN_ELFNOTE_PHYS32_ENTRY}, "
            f"XEN_ELFNOTE_PHYS32_ENTRY); boot it with the linux64 protocol, or build it with CONFIG_PVH=y"
        )
    return BootProtocol.PVH


def _encode_cmdline(cmdline: str, kernel: KernelImage, header: bzimage.SetupHeader | None) -> bytes:
    try:
        data = cmdline.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BootImageError(f"command line cannot be encoded as UTF-8: {exc}") from exc
    if b"\0" in data:
        raise BootImageError(f"command line contains a NUL byte at position {data.index(0)}")
    limit = cmdline_limit(kernel, header)
    if len(data) > limit:
        raise BootImageError(f"command line is {len(data)} bytes; this kernel accepts at most {limit}")
    return data


def _place_initrd(
    memory: GuestMemory, initrd: bytes, kernel_end: int, initrd_addr_max: int
) -> tuple[int, int]:
    """Copy the initrd page-aligned to the top of low RAM, below ``initrd_addr_max`` and the 4 GiB hole,
    above the kernel; return its [start, end)."""
    if not initrd:
        raise BootImageError("initrd is empty (0 bytes)")
    region_end = memory.region_of(HIGH_MEMORY_START).end
    top = min(region_end, initrd_addr_max + 1, MMIO_HOLE_START)
    floor = align_up(kernel_end, PAGE_SIZE)
    start = align_down(top - len(initrd), PAGE_SIZE)
    if start < floor:
        free = max(0, top - floor)
        raise BootImageError(
            f"initrd is {mib(len(initrd))} but only {mib(free)} of guest memory is free above the kernel "
            f"(kernel ends at {kernel_end:#x}, the initrd must end below {top:#x}); give the VM more memory"
        )
    memory.write(start, initrd)
    return start, start + len(initrd)
