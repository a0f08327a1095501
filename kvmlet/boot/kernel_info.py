"""What can be read off a kernel image without running it: its Linux version banner and whether it
was built as a PVM guest.

PVM ("Pagetable-based Virtual Machine", Ant Group's KVM backend that runs guests at CPL3 under
shadow paging) needs guest kernels built with ``CONFIG_PVM_GUEST``, which also selects
``CONFIG_X86_PIE`` and ``CONFIG_RELOCATABLE_UNCOMPRESSED_KERNEL`` so that the kernel can relocate
itself into the address range the hypervisor hands it. A vmlinux has no configuration marker a
loader can rely on (the embedded config, if any, is compressed, and symbols may be stripped), so
:func:`is_pvm_guest_kernel` is a heuristic: the image must carry a Linux banner and at least one
string that only the PVM guest code compiles in -- the ``"pvm-guest: "`` message prefix of
arch/x86/kernel/pvm.c, the PVM event panic message, or the "force enabled on kvm pvm guest" reason
the PVM patches add to page table isolation. The ``.data.reloc`` section that
``RELOCATABLE_UNCOMPRESSED_KERNEL`` adds is reported as supporting evidence only, since other
configurations may use it. A bzImage's vmlinux is compressed, so its strings are invisible until
the payload is extracted (:mod:`kvmlet.boot.vmlinux_extract`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

LINUX_BANNER = re.compile(rb"Linux version [0-9][^\n\0]{0,400}")
_BUILD_NUMBER = re.compile(rb"#\d")
MAX_BANNERS = 16

PVM_GUEST_STRINGS: tuple[bytes, ...] = (
    b"pvm-guest: ",
    b"invalid or fatal PVM event",
    b"force enabled on kvm pvm guest",
)
PVM_RELOCATION_SECTION = ".data.reloc"


def find_linux_banner(data: bytes) -> str | None:
    """The ``"Linux version ..."`` banner in ``data``, or None.

    A kernel can hold more than one (one compiled before the build number was known); the one
    with a build number (``#1``) is preferred.
    """
    banners = []
    for match in LINUX_BANNER.finditer(data):
        banners.append(match.group())
        if len(banners) >= MAX_BANNERS:
            break
    if not banners:
        return None
    best = next((b for b in banners if _BUILD_NUMBER.search(b)), banners[0])
    return best.decode("ascii", errors="replace").strip()


def pvm_markers(data: bytes, sections: Iterable[str] = ()) -> tuple[str, ...]:
    """The PVM guest markers found in ``data`` (strings) and ``sections`` (ELF section names)."""
    found = [marker.decode() for marker in PVM_GUEST_STRINGS if marker in data]
    if PVM_RELOCATION_SECTION in sections:
        found.append(f"section {PVM_RELOCATION_SECTION}")
    return tuple(found)


def is_pvm_guest_kernel(data: bytes, sections: Iterable[str] = ()) -> bool:
    """Heuristic (see the module docstring): a Linux image with a string of the PVM guest code."""
    markers = pvm_markers(data, sections)
    has_string = any(not m.startswith("section ") for m in markers)
    return has_string and find_linux_banner(data) is not None
