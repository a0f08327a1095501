"""The loader on real images: the project's test guest and Debian's cloud kernel (when present)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmlet.boot.errors import BootImageError
from kvmlet.boot.loader import BootProtocol, KernelKind, load, read_kernel
from kvmlet.memory import GuestMemory

MiB = 1 << 20
GUEST_ELF = Path(__file__).resolve().parent.parent / "guest" / "build" / "kvmlet-guest.elf"


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.with_size(128 * MiB) as mem:
        yield mem


# -- the test guest ---------------------------------------------------------------------------------

needs_guest = pytest.mark.skipif(
    not GUEST_ELF.is_file(), reason=f"{GUEST_ELF} is not built (run make -C guest)"
)


@needs_guest
@pytest.mark.parametrize("protocol", [BootProtocol.LINUX64, BootProtocol.PVH])
def test_guest_elf_loads(memory: GuestMemory, protocol: BootProtocol) -> None:
    kernel = read_kernel(GUEST_ELF)
    assert kernel.kind is KernelKind.ELF
    assert kernel.has_pvh_entry
    assert kernel.linux_version is None
    info = load(memory, kernel, cmdline="kvmlet.test=serial", initrd=b"initrd", protocol=protocol, cpus=2)
    assert info.protocol is protocol
    assert info.kernel_range[0] == 0x100000
    if protocol is BootProtocol.LINUX64:
        assert info.entry == 0x100000
        assert info.cpu_state.rsi == 0x7000
    else:
        assert info.kernel_range[0] <= info.entry < info.kernel_range[1]
        assert info.cpu_state.rbx == 0x6000


# -- Debian's cloud kernel --------------------------------------------------------------------------


def _debian_kernel() -> tuple[Path, Path]:
    """(vmlinux, bzImage) of the cached Debian kernel, or skip: this never downloads."""
    try:
        from tests.support.debian_kernel import cache_dir, debian_cloud_kernel
    except ImportError as exc:
        pytest.skip(f"tests.support.debian_kernel is not available: {exc}")
    if not (cache_dir() / "current").is_file():
        pytest.skip(f"Debian kernel not cached in {cache_dir()} (python -m tests.support.debian_kernel)")
    try:
        kernel = debian_cloud_kernel()
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"Debian kernel cache unusable: {exc}")
    return kernel.vmlinux, kernel.bzimage


def test_debian_vmlinux() -> None:
    vmlinux, _ = _debian_kernel()
    kernel = read_kernel(vmlinux)
    assert kernel.kind is KernelKind.ELF
    assert kernel.linux_version is not None and kernel.linux_version.startswith("Linux version 6.")
    assert " #" in kernel.linux_version
    assert not kernel.pvm_aware
    assert kernel.has_pvh_entry  # Debian builds with CONFIG_PVH=y
    for protocol in (BootProtocol.LINUX64, BootProtocol.PVH):
        with GuestMemory.with_size(256 * MiB) as memory:
            info = load(memory, kernel, cmdline="console=ttyS0", initrd=bytes(MiB), protocol=protocol)
            assert info.kernel_range[0] == 0x1000000
            if protocol is BootProtocol.LINUX64:
                assert info.entry == 0x1000000
            assert info.initrd_range is not None and info.initrd_range[0] >= info.kernel_range[1]


def test_debian_bzimage() -> None:
    _, bzimage = _debian_kernel()
    kernel = read_kernel(bzimage)
    assert kernel.kind is KernelKind.BZIMAGE
    assert kernel.linux_version is not None and kernel.linux_version.startswith("Linux version 6.")
    with GuestMemory.with_size(256 * MiB) as memory:
        info = load(memory, kernel, cmdline="console=ttyS0", initrd=bytes(MiB))
        assert info.entry == info.kernel_range[0] + 0x200
        assert memory.read_u16(0x7000 + 0x1FE) == 0xAA55
        assert memory.read(0x7000 + 0x202, 4) == b"HdrS"
        with pytest.raises(BootImageError, match="accepts at most 2047"):
            load(memory, kernel, cmdline="x" * 4000)
        with pytest.raises(BootImageError, match="no PVH entry point"):
            load(memory, kernel, cmdline="", protocol=BootProtocol.PVH)
    with GuestMemory.with_size(64 * MiB) as small, pytest.raises(BootImageError, match="init_size"):
        load(small, kernel, cmdline="")
