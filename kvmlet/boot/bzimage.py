"""bzImage kernels: the real-mode setup header (Documentation/arch/x86/boot.rst) and loading the
protected-mode kernel for the 64-bit boot protocol.

The file is ``(setup_sects + 1) * 512`` bytes of real-mode setup (boot sector and setup code, with
the setup header at 0x1f1) followed by the protected-mode kernel. kvmlet skips the real-mode code:
it copies the protected-mode kernel to its load address and enters it at load address + 0x200, the
64-bit entry point, with the setup header copied into the zero page.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from kvmlet.boot.errors import BootImageError
from kvmlet.boot.layout import HIGH_MEMORY_START, MiB, align_up, mib
from kvmlet.memory import GuestMemory

SETUP_HEADER_OFFSET = 0x1F1
BOOT_FLAG_OFFSET = 0x1FE
JUMP_OFFSET = 0x200
HEADER_MAGIC_OFFSET = 0x202
SETUP_HEADER_AREA_END = 0x290  # the setup header's room in struct boot_params
BOOT_FLAG = 0xAA55
HEADER_MAGIC = b"HdrS"
MIN_PROTOCOL = 0x0206
XLOADFLAGS_PROTOCOL = 0x020C  # xloadflags exists from 2.12
SECTOR_SIZE = 512
ENTRY_64_OFFSET = 0x200
DEFAULT_LOAD_ADDRESS = 0x1000000  # 16 MiB, Linux's default CONFIG_PHYSICAL_START
MIN_FILE_SIZE = 0x268  # through handover_offset


class LoadFlags(enum.IntFlag):
    """``loadflags`` (0x211)."""

    LOADED_HIGH = 1 << 0
    KASLR_FLAG = 1 << 1
    QUIET_FLAG = 1 << 5
    KEEP_SEGMENTS = 1 << 6
    CAN_USE_HEAP = 1 << 7


class XLoadFlags(enum.IntFlag):
    """``xloadflags`` (0x236)."""

    KERNEL_64 = 1 << 0
    CAN_BE_LOADED_ABOVE_4G = 1 << 1
    EFI_HANDOVER_32 = 1 << 2
    EFI_HANDOVER_64 = 1 << 3
    EFI_KEXEC = 1 << 4


@dataclass(frozen=True)
class SetupHeader:
    """The setup header fields the loader uses (offsets are in the file and in the zero page)."""

    setup_sects: int  # 0x1f1, with 0 already turned into 4
    boot_flag: int  # 0x1fe
    version: int  # 0x206
    kernel_version: int  # 0x20e: offset of the version string, less 0x200
    loadflags: LoadFlags  # 0x211
    initrd_addr_max: int  # 0x22c: highest address the initrd may occupy
    kernel_alignment: int  # 0x230
    relocatable_kernel: bool  # 0x234
    xloadflags: XLoadFlags  # 0x236
    cmdline_size: int  # 0x238: longest command line, without the NUL
    pref_address: int  # 0x258
    init_size: int  # 0x260: memory the kernel needs from its load address
    header_end: int  # 0x202 + byte at 0x201: end of the setup header

    @property
    def protected_mode_offset(self) -> int:
        """File offset of the protected-mode kernel."""
        return (self.setup_sects + 1) * SECTOR_SIZE

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


@dataclass(frozen=True)
class LoadedBzImage:
    """Where :func:`load_bzimage` put the kernel."""

    header: SetupHeader
    load_address: int
    entry: int  # the 64-bit entry point: load address + 0x200
    end: int  # load address + max(init_size, protected-mode size)


def looks_like_bzimage(data: bytes) -> bool:
    """Whether ``data`` has either the boot flag or the "HdrS" signature of a Linux boot image."""
    if len(data) < HEADER_MAGIC_OFFSET + 4:
        return False
    return (
        struct.unpack_from("<H", data, BOOT_FLAG_OFFSET)[0] == BOOT_FLAG
        or data[HEADER_MAGIC_OFFSET : HEADER_MAGIC_OFFSET + 4] == HEADER_MAGIC
    )


def parse_setup_header(image: bytes) -> SetupHeader:
    """Parse and check the setup header of a bzImage bootable through the 64-bit boot protocol."""
    if len(image) < MIN_FILE_SIZE:
        raise BootImageError(
            f"bzImage: file is {len(image)} bytes, too short to hold a setup header "
            f"(needs {MIN_FILE_SIZE:#x})"
        )
    (boot_flag,) = struct.unpack_from("<H", image, BOOT_FLAG_OFFSET)
    if boot_flag != BOOT_FLAG:
        raise BootImageError(
            f"bzImage: boot_flag at {BOOT_FLAG_OFFSET:#x} is {boot_flag:#06x}, expected {BOOT_FLAG:#06x}; "
            f"this is not a Linux boot image"
        )
    magic = image[HEADER_MAGIC_OFFSET : HEADER_MAGIC_OFFSET + 4]
    if magic != HEADER_MAGIC:
        raise BootImageError(
            f"bzImage: no 'HdrS' setup header signature at {HEADER_MAGIC_OFFSET:#x} (found {magic!r}); "
            f"this is not a Linux kernel of boot protocol 2.00 or newer"
        )
    setup_sects = image[SETUP_HEADER_OFFSET] or 4
    (version, kernel_version) = struct.unpack_from("<H6xH", image, 0x206)
    loadflags = LoadFlags(image[0x211])
    (initrd_addr_max, kernel_alignment) = struct.unpack_from("<II", image, 0x22C)
    relocatable = image[0x234] != 0
    (xloadflags_raw, cmdline_size) = struct.unpack_from("<HI", image, 0x236)
    (pref_address,) = struct.unpack_from("<Q", image, 0x258)
    (init_size,) = struct.unpack_from("<I", image, 0x260)
    header = SetupHeader(
        setup_sects=setup_sects,
        boot_flag=boot_flag,
        version=version,
        kernel_version=kernel_version,
        loadflags=loadflags,
        initrd_addr_max=initrd_addr_max,
        kernel_alignment=kernel_alignment,
        relocatable_kernel=relocatable,
        xloadflags=XLoadFlags(xloadflags_raw if version >= XLOADFLAGS_PROTOCOL else 0),
        cmdline_size=cmdline_size,
        pref_address=pref_address,
        init_size=init_size,
        header_end=HEADER_MAGIC_OFFSET + image[JUMP_OFFSET + 1],
    )
    _check_header(header, len(image))
    return header


def _check_header(header: SetupHeader, file_size: int) -> None:
    if header.version < MIN_PROTOCOL:
        raise BootImageError(
            f"bzImage: boot protocol {header.version_text} is too old; kvmlet needs 2.06 or newer"
        )
    if XLoadFlags.KERNEL_64 not in header.xloadflags:
        raise BootImageError(
            f"bzImage: the kernel has no 64-bit entry point (boot protocol {header.version_text}, "
            f"xloadflags XLF_KERNEL_64 not set); kvmlet boots bzImages only through the 64-bit boot protocol"
        )
    if LoadFlags.LOADED_HIGH not in header.loadflags:
        raise BootImageError(
            "bzImage: loadflags.LOADED_HIGH is clear (a zImage loaded at 0x10000); not supported"
        )
    if header.protected_mode_offset >= file_size:
        raise BootImageError(
            f"bzImage: setup_sects={header.setup_sects} puts the protected-mode kernel at "
            f"{header.protected_mode_offset:#x}, past the end of the file (size {file_size:#x})"
        )
    if not HEADER_MAGIC_OFFSET < header.header_end <= SETUP_HEADER_AREA_END:
        raise BootImageError(
            f"bzImage: setup header ends at {header.header_end:#x} (0x202 + byte at 0x201), outside "
            f"the zero page's header area ending at {SETUP_HEADER_AREA_END:#x}"
        )
    if header.kernel_alignment == 0 or header.kernel_alignment & (header.kernel_alignment - 1):
        raise BootImageError(f"bzImage: kernel_alignment {header.kernel_alignment:#x} is not a power of two")


def setup_header_bytes(image: bytes, header: SetupHeader) -> bytes:
    """The setup header as it is copied into the zero page: bytes 0x1f1 up to its end."""
    return image[SETUP_HEADER_OFFSET : header.header_end]


def kernel_version_string(image: bytes, header: SetupHeader) -> str | None:
    """The string ``hdr.kernel_version`` points to (e.g. ``"6.1.0-18-amd64 (...) #1 SMP ..."``)."""
    if header.kernel_version == 0:
        return None
    start = header.kernel_version + 0x200
    if start >= min(len(image), header.protected_mode_offset):
        return None
    end = image.find(b"\0", start, min(start + 256, header.protected_mode_offset))
    if end <= start:
        return None
    return image[start:end].decode("ascii", errors="replace")


def choose_load_address(header: SetupHeader, kernel_size: int, ram_end: int) -> int:
    """Where to put the protected-mode kernel: ``pref_address`` if the kernel fits there, else (if it
    is relocatable) 16 MiB aligned up to ``kernel_alignment``."""
    need = max(header.init_size, kernel_size)
    candidates = [header.pref_address] if header.pref_address >= HIGH_MEMORY_START else []
    if header.relocatable_kernel:
        candidates.append(align_up(DEFAULT_LOAD_ADDRESS, header.kernel_alignment))
    elif not candidates:
        candidates.append(DEFAULT_LOAD_ADDRESS)
    for address in candidates:
        if address + need <= ram_end:
            return address
    address = candidates[-1]
    raise BootImageError(
        f"bzImage: the kernel needs {mib(need)} (init_size {header.init_size:#x}) from {address:#x}, "
        f"but guest memory below the 4 GiB hole ends at {ram_end:#x}; give the VM at least "
        f"{mib(align_up(address + need, MiB))} of memory"
    )


def load_bzimage(memory: GuestMemory, image: bytes) -> LoadedBzImage:
    """Copy the protected-mode kernel of ``image`` into ``memory`` and return where it went."""
    header = parse_setup_header(image)
    kernel = memoryview(image)[header.protected_mode_offset :]
    ram_end = memory.region_of(HIGH_MEMORY_START).end
    address = choose_load_address(header, len(kernel), ram_end)
    memory.write(address, kernel)
    return LoadedBzImage(
        header=header,
        load_address=address,
        entry=address + ENTRY_64_OFFSET,
        end=address + max(header.init_size, len(kernel)),
    )
