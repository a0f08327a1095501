"""ACPI for the PCI host bridge and the VT-d unit: the MCFG and DMAR tables and the DSDT's ``\\_SB.PCI0``.

Built from a :class:`PciAcpi` description (kvmlet.devices.pci.platform makes one) into
:class:`~kvmlet.boot.acpi.AcpiExtras`, the way devices add to the tables :mod:`kvmlet.boot.acpi` lays out:

* MCFG (PCI Firmware Specification 3.2, section 4.1.2): one allocation, ECAM for segment 0, buses 0 to N-1;
* DMAR (Intel VT-d specification, section 8): the host address width, no interrupt remapping, and one DRHD for
  segment 0 with INCLUDE_PCI_ALL (every device on the segment is behind this unit), register base and a one-page
  register set;
* the DSDT: ``Device(PCI0)`` with ``_HID`` PNP0A08 (PCI Express root bridge), ``_CID`` PNP0A03, ``_SEG``, ``_BBN``,
  ``_UID``, ``_CRS`` (the bus numbers, the configuration ports, the rest of the I/O space, the MMIO window for
  BARs) and ``_PRT`` (each device's INTA to its I/O APIC pin); and ``Device(MRES)``, a PNP0C02 motherboard
  resource holding the ECAM and VT-d ranges, so an OS does not put anything there (Linux wants ECAM reserved
  in ACPI or the e820 map before it trusts MCFG; the loader also reports it reserved in e820).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvmlet.boot.acpi import (
    AML_ROOT_CHAR,
    AcpiExtras,
    _table,
    aml_device,
    aml_dword,
    aml_name,
    aml_name_seg,
    aml_package,
    aml_scope,
    resource_memory32_fixed,
    resource_template,
)

MCFG_REVISION = 1
DMAR_REVISION = 1
DMAR_HAW = 48                    # the unit's host address width (kvmlet.devices.iommu.regs.HAW)
DRHD_TYPE = 0
DRHD_INCLUDE_PCI_ALL = 1 << 0
AML_ZERO = b"\x00"

RESOURCE_IO = 0x47               # small item: I/O port descriptor (ACPI 6.5, 6.4.2.5)
RESOURCE_DWORD_ADDRESS = 0x87    # large item: DWord Address Space Descriptor (6.4.3.5.2)
RESOURCE_WORD_ADDRESS = 0x88     # large item: Word Address Space Descriptor (6.4.3.5.3)
SPACE_MEMORY, SPACE_IO, SPACE_BUS = 0, 1, 2
PRODUCER_FIXED = 0x0C            # general flags: MinFixed, MaxFixed, positive decode, producer


@dataclass(frozen=True)
class PciAcpi:
    """What the tables say about the PCI side of a VM."""

    ecam_base: int
    ecam_buses: int
    mmio_window: tuple[int, int]                  # [start, end) for BARs
    intx: tuple[tuple[int, int], ...] = ()        # (device number, GSI of its INTA)
    vtd_base: int | None = None
    vtd_size: int = 0x1000

    @property
    def ecam_size(self) -> int:
        return self.ecam_buses << 20

    def reserved(self) -> tuple[tuple[int, int], ...]:
        """(start, size) ranges to report reserved in the e820 map."""
        ranges = [(self.ecam_base, self.ecam_size)]
        if self.vtd_base is not None:
            ranges.append((self.vtd_base, self.vtd_size))
        return tuple(ranges)


def eisa_id(text: str) -> int:
    """The 32-bit compressed EISA ID of ``"PNP0A08"``-style text (three letters, four hex digits)."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ValueError(f"{text!r} is not an EISA ID")
    a, b, c = (ord(ch) - 0x40 for ch in text[:3])
    digits = int(text[3:], 16)
    raw = bytes([a << 2 | b >> 3, (b & 7) << 5 | c, digits >> 8, digits & 0xFF])
    return int.from_bytes(raw, "little")


def resource_word_space(space: int, minimum: int, maximum: int, type_flags: int = 0) -> bytes:
    return struct.pack("<BHBBBHHHHH", RESOURCE_WORD_ADDRESS, 13, space, PRODUCER_FIXED, type_flags, 0, minimum,
                       maximum, 0, maximum - minimum + 1)


def resource_dword_memory(minimum: int, maximum: int) -> bytes:
    """A read-write, non-cacheable memory window (type flags: bit 0 RW, bits 2:1 non-cacheable)."""
    return struct.pack("<BHBBBIIIII", RESOURCE_DWORD_ADDRESS, 23, SPACE_MEMORY, PRODUCER_FIXED, 1, 0, minimum,
                       maximum, 0, maximum - minimum + 1)


def resource_io(minimum: int, length: int) -> bytes:
    return struct.pack("<BBHHBB", RESOURCE_IO, 1, minimum, minimum, 1, length)


def build_mcfg(pci: PciAcpi) -> bytes:
    body = bytes(8) + struct.pack("<QHBBI", pci.ecam_base, 0, 0, pci.ecam_buses - 1, 0)
    return _table(b"MCFG", MCFG_REVISION, body)


def build_dmar(pci: PciAcpi) -> bytes:
    assert pci.vtd_base is not None
    drhd = struct.pack("<HHBBHQ", DRHD_TYPE, 16, DRHD_INCLUDE_PCI_ALL, 0, 0, pci.vtd_base)
    body = struct.pack("<BB10s", DMAR_HAW - 1, 0, bytes(10)) + drhd
    return _table(b"DMAR", DMAR_REVISION, body)


def build_pci_aml(pci: PciAcpi) -> bytes:
    """``Scope(\\_SB) { Device(PCI0) {...} Device(MRES) {...} }`` (see the module docstring)."""
    start, end = pci.mmio_window
    crs = resource_template(
        resource_word_space(SPACE_BUS, 0, pci.ecam_buses - 1),
        resource_io(0xCF8, 8),
        resource_word_space(SPACE_IO, 0x0000, 0x0CF7, type_flags=3),
        resource_word_space(SPACE_IO, 0x0D00, 0xFFFF, type_flags=3),
        resource_dword_memory(start, end - 1),
    )
    routes = [aml_package(aml_dword(device << 16 | 0xFFFF), AML_ZERO, AML_ZERO, aml_dword(gsi))
              for device, gsi in pci.intx]
    bridge = aml_device("PCI0", b"".join((
        aml_name("_HID", aml_dword(eisa_id("PNP0A08"))),
        aml_name("_CID", aml_dword(eisa_id("PNP0A03"))),
        aml_name("_SEG", AML_ZERO),
        aml_name("_BBN", AML_ZERO),
        aml_name("_UID", AML_ZERO),
        aml_name("_CRS", crs),
        aml_name("_PRT", aml_package(*routes)),
    )))
    reserved = [resource_memory32_fixed(base, size, writable=False) for base, size in pci.reserved()]
    motherboard = aml_device("MRES", b"".join((
        aml_name("_HID", aml_dword(eisa_id("PNP0C02"))),
        aml_name("_UID", aml_dword(0x4B4D)),
        aml_name("_CRS", resource_template(*reserved)),
    )))
    return aml_scope(bytes([AML_ROOT_CHAR]) + aml_name_seg("_SB_"), bridge + motherboard)


def pci_acpi_extras(pci: PciAcpi) -> AcpiExtras:
    """MCFG, DMAR (with a VT-d unit) and the DSDT AML."""
    tables = [build_mcfg(pci)]
    if pci.vtd_base is not None:
        tables.append(build_dmar(pci))
    return AcpiExtras(tables=tuple(tables), dsdt_aml=build_pci_aml(pci))
