"""The VM generation ID: the ACPI tables that announce it (RSDP -> XSDT -> FADT -> DSDT with \\_SB.VGEN and its
ADDR package) decoded independently of the encoder, and the 16 bytes in guest memory."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from kvmlet.boot import acpi, layout
from kvmlet.boot.acpi import aml_pkg_length, build_acpi, build_dsdt, build_vmgenid_aml, write_acpi
from kvmlet.boot.e820 import E820Type, build_e820
from kvmlet.devices.vmgenid import (
    GENERATION_ID_SIZE,
    VMGENID_ADDRESS,
    new_generation_id,
    read_generation_id,
    write_generation_id,
)
from kvmlet.memory import GuestMemory, MiB

# -- a small AML decoder (only what the DSDT uses), written from the ACPI 6.5 grammar -----------------


def decode_pkg_length(data: bytes, at: int) -> tuple[int, int]:
    """(value, bytes taken) of the PkgLength at ``at``."""
    lead = data[at]
    extra = lead >> 6
    if extra == 0:
        return lead & 0x3F, 1
    assert lead & 0x30 == 0, "reserved PkgLength bits set"
    value = lead & 0x0F
    for i in range(extra):
        value |= data[at + 1 + i] << (4 + 8 * i)
    return value, 1 + extra


def decode_name_string(data: bytes, at: int) -> tuple[str, int]:
    """(ASL spelling, bytes taken) of the NameString at ``at``."""
    start, prefix = at, ""
    while data[at] in (0x5C, 0x5E):
        prefix += chr(data[at])
        at += 1
    if data[at] == 0x2E:
        count, at = 2, at + 1
    elif data[at] == 0x2F:
        count, at = data[at + 1], at + 2
    elif data[at] == 0:
        count, at = 0, at + 1
    else:
        count = 1
    segments = [data[at + 4 * i:at + 4 * i + 4].decode("ascii") for i in range(count)]
    return prefix + ".".join(segments), at + 4 * count - start


@dataclass
class AmlDevice:
    path: str
    names: dict[str, object] = field(default_factory=dict)


def decode_data(data: bytes, at: int) -> tuple[object, int]:
    """A DataRefObject: (value, bytes taken)."""
    op = data[at]
    if op in (0x00, 0x01):
        return op, 1
    if op == 0xFF:
        return 0xFFFF_FFFF_FFFF_FFFF, 1
    sizes = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}
    if op in sizes:
        n = sizes[op]
        return int.from_bytes(data[at + 1:at + 1 + n], "little"), 1 + n
    if op == 0x0D:
        end = data.index(0, at + 1)
        return data[at + 1:end].decode("ascii"), end + 1 - at
    if op == 0x12:
        length, taken = decode_pkg_length(data, at + 1)
        count = data[at + 1 + taken]
        items: list[object] = []
        pos, end = at + 2 + taken, at + 1 + length
        for _ in range(count):
            item, used = decode_data(data, pos)
            items.append(item)
            pos += used
        assert pos == end, "Package elements do not fill its PkgLength"
        return items, 1 + length
    raise AssertionError(f"unexpected AML data opcode {op:#x} at {at}")


def decode_terms(data: bytes, at: int, end: int, scope: str, devices: list[AmlDevice],
                 names: dict[str, object] | None = None) -> None:
    """Decode Scope, Device and Name terms in ``data[at:end]``."""
    while at < end:
        op = data[at]
        if op == 0x10:  # Scope
            length, taken = decode_pkg_length(data, at + 1)
            name, used = decode_name_string(data, at + 1 + taken)
            decode_terms(data, at + 1 + taken + used, at + 1 + length, name, devices)
            at += 1 + length
        elif op == 0x5B and data[at + 1] == 0x82:  # Device
            length, taken = decode_pkg_length(data, at + 2)
            name, used = decode_name_string(data, at + 2 + taken)
            device = AmlDevice(f"{scope}.{name}" if scope else name)
            devices.append(device)
            decode_terms(data, at + 2 + taken + used, at + 2 + length, device.path, devices, device.names)
            at += 2 + length
        elif op == 0x08:  # Name
            name, used = decode_name_string(data, at + 1)
            value, size = decode_data(data, at + 1 + used)
            assert names is not None, f"Name({name}) outside a device"
            names[name] = value
            at += 1 + used + size
        else:
            raise AssertionError(f"unexpected AML opcode {op:#x} at {at}")
    assert at == end, "terms run past their package"


def checksum_ok(table: bytes) -> bool:
    return sum(table) % 256 == 0


def parse_tables(image: bytes, base: int, rsdp_at: int) -> dict[str, bytes]:
    """Follow RSDP -> XSDT -> (FADT -> DSDT, MADT), checking every signature, length and checksum."""

    def at(address: int, length: int) -> bytes:
        return image[address - base:address - base + length]

    rsdp = at(rsdp_at, 36)
    assert rsdp[:8] == b"RSD PTR " and checksum_ok(rsdp[:20]) and checksum_ok(rsdp)
    assert rsdp[15] == 2 and struct.unpack_from("<I", rsdp, 20)[0] == 36
    tables: dict[str, bytes] = {}

    def table(address: int) -> bytes:
        length = struct.unpack("<I", at(address + 4, 4))[0]
        blob = at(address, length)
        assert len(blob) == length >= 36 and checksum_ok(blob), blob[:4]
        tables[blob[:4].decode()] = blob
        return blob

    xsdt = table(struct.unpack_from("<Q", rsdp, 24)[0])
    for (entry,) in struct.iter_unpack("<Q", xsdt[36:]):
        blob = table(entry)
        if blob[:4] == b"FACP":
            dsdt32, = struct.unpack_from("<I", blob, 40)
            x_dsdt, = struct.unpack_from("<Q", blob, 140)
            assert dsdt32 == x_dsdt
            table(x_dsdt)
    return tables


def addr_of(device: AmlDevice) -> tuple[int, int]:
    """The device's ADDR package: (low, high)."""
    value = device.names["ADDR"]
    assert isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)
    return value[0], value[1]


def vgen_device(dsdt: bytes) -> AmlDevice:
    assert dsdt[:4] == b"DSDT" and dsdt[8] >= 2  # revision 2: 64-bit integers
    devices: list[AmlDevice] = []
    decode_terms(dsdt, 36, len(dsdt), "", devices)
    [device] = [d for d in devices if d.path.endswith("VGEN")]
    return device


# -- tests ------------------------------------------------------------------------------------------


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.with_size(64 * MiB) as mem:
        yield mem


def test_pkg_length_encoding() -> None:
    assert aml_pkg_length(0) == b"\x01"
    assert aml_pkg_length(62) == b"\x3f"                    # 63: the largest one-byte value
    assert aml_pkg_length(63) == b"\x41\x04"                # 65 = 0x41: lead 0x40 | 1, then 0x04
    assert aml_pkg_length(4093) == b"\x4f\xff"              # 4095: the largest two-byte value
    assert aml_pkg_length(4094) == b"\x81\x00\x01"          # 4097
    assert aml_pkg_length((1 << 20) - 4) == b"\x8f\xff\xff"
    assert aml_pkg_length((1 << 20) - 3) == b"\xc1\x00\x00\x01"
    for n in (0, 1, 61, 62, 63, 64, 100, 4093, 4094, 70000, (1 << 20) - 3, (1 << 28) - 5):
        encoded = aml_pkg_length(n)
        assert decode_pkg_length(encoded, 0) == (n + len(encoded), len(encoded))
    with pytest.raises(Exception, match="longer than PkgLength can encode"):
        aml_pkg_length(1 << 28)


def test_tables_parse_and_the_dsdt_describes_the_generation_id() -> None:
    image, rsdp = build_acpi(2)
    assert rsdp == acpi.ACPI_START
    assert acpi.ACPI_START + len(image) <= layout.VMGENID_ADDR
    tables = parse_tables(image, acpi.ACPI_START, rsdp)
    assert set(tables) == {"XSDT", "FACP", "DSDT", "APIC"}
    device = vgen_device(tables["DSDT"])
    assert device.path == "\\_SB_.VGEN"
    assert device.names["_HID"] == "KVML0001"   # a well-formed ACPI ID (4 characters, 4 hex digits)
    # Linux's driver IDs; ACPICA upper-cases the second to its "VM_GEN_COUNTER"; Microsoft's spec names it
    assert device.names["_CID"] == ["VMGENCTR", "VM_Gen_Counter"]
    assert device.names["_DDN"] == "VM_Gen_Counter"
    low, high = addr_of(device)
    assert low | high << 32 == VMGENID_ADDRESS == 0xF7000


def test_dsdt_bytes_and_a_high_address() -> None:
    aml = build_vmgenid_aml(0x1_2345_6788)
    assert aml[:3] == bytes([0x10, 0x47, 0x06]) and len(aml) == 104  # as the encoder's docstring shows
    assert aml.endswith(bytes([0x08]) + b"ADDR" + bytes([0x12, 0x0C, 0x02, 0x0C]) + struct.pack("<I", 0x2345_6788)
                        + bytes([0x0C]) + struct.pack("<I", 1))
    dsdt = acpi._table(b"DSDT", 2, aml)
    low, high = addr_of(vgen_device(dsdt))
    assert (low, high) == (0x2345_6788, 1)
    assert build_dsdt(None)[4:8] == struct.pack("<I", 36)  # no device: an empty DSDT
    with pytest.raises(ValueError, match="not 8-byte aligned"):
        build_vmgenid_aml(0xF7004)


# `iasl -oa` (ACPICA 20200925) output for the ASL that `iasl -d` prints for kvmlet's DSDT (the AML after the
# table header): the same but for its shortest integer encodings ("0A 00" for the high half), hence two
# PkgLengths 3 smaller.
IASL_AML = bytes.fromhex(
    "1044065c5f53425f5b824b055647454e085f4849440d4b564d4c303030310008"
    "5f434944121c020d564d47454e435452000d564d5f47656e5f436f756e746572"
    "00085f44444e0d564d5f47656e5f436f756e7465720008414444521209020c00"
    "700f000a00")


def test_aml_matches_what_iasl_compiles() -> None:
    ours = build_vmgenid_aml(0xF7000)
    dsdt_ours, dsdt_iasl = acpi._table(b"DSDT", 2, ours), acpi._table(b"DSDT", 2, IASL_AML)
    assert vgen_device(dsdt_ours) == vgen_device(dsdt_iasl)
    addr_ours, addr_iasl = ours.index(b"ADDR"), IASL_AML.index(b"ADDR")
    assert ours[3:10] == IASL_AML[3:10] and ours[12:addr_ours] == IASL_AML[12:addr_iasl]
    assert ours[:3] == bytes([0x10, 0x47, 0x06]) and IASL_AML[:3] == bytes([0x10, 0x44, 0x06])
    assert ours[addr_ours + 4:] == bytes.fromhex("120c020c00700f000c00000000")


def test_generation_id_place_in_the_memory_map(memory: GuestMemory) -> None:
    """8-byte aligned, inside one page, in memory the e820 map reserves, clear of the ACPI and MP tables."""
    assert VMGENID_ADDRESS % 8 == 0
    assert VMGENID_ADDRESS // 4096 == (VMGENID_ADDRESS + GENERATION_ID_SIZE - 1) // 4096
    reserved = [e for e in build_e820(memory) if e.type is E820Type.RESERVED]
    assert any(e.addr <= VMGENID_ADDRESS and e.end >= VMGENID_ADDRESS + GENERATION_ID_SIZE for e in reserved)
    areas = {area.name: area for area in layout.BOOT_STRUCTURES}
    assert areas["VM generation ID"].start == VMGENID_ADDRESS
    assert areas["ACPI tables"].end <= VMGENID_ADDRESS < layout.MP_CONFIG_ADDR


def test_written_tables_in_guest_memory(memory: GuestMemory) -> None:
    rsdp = write_acpi(memory, 4)
    image = memory.read(acpi.ACPI_START, acpi.ACPI_END - acpi.ACPI_START)
    tables = parse_tables(image, acpi.ACPI_START, rsdp)
    low, high = addr_of(vgen_device(tables["DSDT"]))
    assert low | high << 32 == VMGENID_ADDRESS
    assert read_generation_id(memory) == bytes(16)  # the tables do not write the ID


def test_write_and_read_round_trip(memory: GuestMemory) -> None:
    memory.start_dirty_tracking()
    written = write_generation_id(memory)
    assert len(written) == 16 and any(written)
    assert read_generation_id(memory) == written == memory.read(0xF7000, 16)
    dirty = memory.take_dirty()[0]
    assert [page for page, flag in enumerate(dirty) if flag] == [VMGENID_ADDRESS // 4096]
    chosen = bytes(range(1, 17))
    assert write_generation_id(memory, chosen) == chosen
    assert read_generation_id(memory) == chosen
    assert write_generation_id(memory) not in (chosen, written)
    with pytest.raises(ValueError, match="16 bytes, not 15"):
        write_generation_id(memory, bytes(15))


def test_new_generation_ids_differ() -> None:
    ids = {new_generation_id() for _ in range(64)}
    assert len(ids) == 64 and all(any(i) and len(i) == 16 for i in ids)
