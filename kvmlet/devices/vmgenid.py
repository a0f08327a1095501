"""The VM generation ID (Microsoft's "Virtual Machine Generation ID" spec, as QEMU, Hyper-V and Firecracker
provide it): 16 bytes of guest memory that change whenever the VM may have been duplicated or rolled back
(restored from a snapshot, cloned), so that a guest can reseed its random number generators and renew
anything that must be unique (Linux's drivers/virt/vmgenid.c feeds it to the RNG as "VM fork" entropy).

The bytes live at :data:`VMGENID_ADDRESS`, in the BIOS area the e820 map reserves, alone in their page;
the DSDT's ``\\_SB.VGEN`` device names that address in its ``ADDR`` package (kvmlet.boot.acpi). The VMM
writes a fresh random ID before the guest first runs and again before a restored or cloned VM resumes.
The guest is not notified (no ACPI Notify through a GED interrupt yet): it reads the ID when it checks.
"""

from __future__ import annotations

import os

from kvmlet.boot.layout import VMGENID_ADDR, VMGENID_SIZE
from kvmlet.memory import GuestMemory

VMGENID_ADDRESS = VMGENID_ADDR  # guest-physical, 8-byte aligned, within one page
GENERATION_ID_SIZE = VMGENID_SIZE  # bytes (a 128-bit GUID)


def new_generation_id() -> bytes:
    """16 random bytes (never all zero: a guest reads zero as "no generation ID")."""
    while True:
        value = os.urandom(GENERATION_ID_SIZE)
        if any(value):
            return value


def write_generation_id(memory: GuestMemory, value: bytes | None = None) -> bytes:
    """Write a generation ID into guest memory (``value``, else a random one); returns what was written.

    Written with :meth:`GuestMemory.write`, so a dirty-page log or a diff snapshot sees the page."""
    if value is None:
        value = new_generation_id()
    elif len(value) != GENERATION_ID_SIZE:
        raise ValueError(f"a VM generation ID is {GENERATION_ID_SIZE} bytes, not {len(value)}")
    memory.write(VMGENID_ADDRESS, bytes(value))
    return bytes(value)


def read_generation_id(memory: GuestMemory) -> bytes:
    """The 16 bytes of the generation ID as the guest sees them."""
    return memory.read(VMGENID_ADDRESS, GENERATION_ID_SIZE)
