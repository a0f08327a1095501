"""The vTPM's parts without swtpm: the event log, the ACPI additions, the launch policy, the TIS state machine
(against a scripted back end), the configuration and the measurements."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path

import msgspec
import pytest

from kvmlet.boot import acpi, layout
from kvmlet.boot.acpi import AcpiExtras, build_acpi, build_tpm2_table, build_tpm_aml
from kvmlet.config import decode
from kvmlet.config.models import BootSource, Drive, Tpm, VmConfig
from kvmlet.devices import tpm_tis
from kvmlet.devices.state import DeviceStateError, TpmState, decode_device_states, encode_device_states
from kvmlet.devices.tpm_tis import TIS_BASE, TIS_SIZE, TpmTis, failure_response
from kvmlet.errors import ConfigError
from kvmlet.tpm import eventlog
from kvmlet.tpm.errors import AttestationError, PolicyError
from kvmlet.tpm.eventlog import (
    EV_IPL,
    EV_NO_ACTION,
    TPM_ALG_SHA256,
    TPM_ALG_SHA384,
    Event,
    build_log,
    parse_log,
    replay,
)
from kvmlet.tpm.measure import LAUNCH_PCRS, Measurement, config_document, launch_measurements
from kvmlet.tpm.policy import generate_key, load_policy, no_policy_measurement, sign_policy

# -- the event log -------------------------------------------------------------------------------------------


def test_the_log_header_is_a_spec_id_event_as_the_firmware_profile_lays_it_out() -> None:
    log = build_log([])
    pcr, event_type, sha1, size = struct.unpack_from("<II20sI", log)
    assert (pcr, event_type, sha1) == (0, EV_NO_ACTION, bytes(20))
    body = log[32:32 + size]
    assert len(log) == 32 + size
    assert body[:16] == b"Spec ID Event03\0"
    platform_class, minor, major, errata, uintn, count = struct.unpack_from("<IBBBBI", body, 16)
    assert (platform_class, minor, major, errata, uintn, count) == (0, 0, 2, 2, 2, 2)
    assert struct.unpack_from("<HHHH", body, 28) == (0x000B, 32, 0x000C, 48)
    assert body[36] == len(body) - 37 and body[37:] == b"kvmlet"


def test_an_event_is_a_tcg_pcr_event2() -> None:
    digests = {TPM_ALG_SHA256: bytes(range(32)), TPM_ALG_SHA384: bytes(range(48))}
    packed = Event(8, EV_IPL, digests, b"console=ttyS0").pack()
    assert struct.unpack_from("<III", packed) == (8, EV_IPL, 2)
    assert struct.unpack_from("<H", packed, 12)[0] == 0x000B and packed[14:46] == bytes(range(32))
    assert struct.unpack_from("<H", packed, 46)[0] == 0x000C and packed[48:96] == bytes(range(48))
    assert struct.unpack_from("<I", packed, 96)[0] == 13 and packed[100:] == b"console=ttyS0"


def test_replay_extends_from_zero_and_skips_no_action_events() -> None:
    first = Measurement("kernel", b"kernel bytes", b"kernel")
    second = Measurement("cmdline", b"console=ttyS0", b"console=ttyS0")
    marker = Event(4, EV_NO_ACTION, {TPM_ALG_SHA256: bytes(32), TPM_ALG_SHA384: bytes(48)}, b"marker")
    log = parse_log(build_log([first.event(), marker, second.event()]) + bytes(4096))   # the area's zero padding
    assert [event.pcr for event in log.events] == [4, 4, 8]
    pcrs = replay(log, TPM_ALG_SHA256)
    assert pcrs[4] == hashlib.sha256(bytes(32) + hashlib.sha256(b"kernel bytes").digest()).digest()
    assert pcrs[8] == hashlib.sha256(bytes(32) + hashlib.sha256(b"console=ttyS0").digest()).digest()
    assert replay(log, TPM_ALG_SHA384)[4] == hashlib.sha384(bytes(48) + hashlib.sha384(b"kernel bytes").digest()
                                                             ).digest()


@pytest.mark.parametrize("damage", ["header", "truncated", "algorithm"])
def test_a_malformed_log_is_refused_with_the_reason(damage: str) -> None:
    log = bytearray(build_log([Measurement("kernel", b"k", b"kernel").event()]))
    if damage == "header":
        log[32:36] = b"XXXX"
        match = "Spec ID"
    elif damage == "truncated":
        log = log[:-3]
        match = "truncated"
    else:
        struct.pack_into("<H", log, len(build_log([])) + 12, 0x0004)   # SHA-1, which the header does not announce
        match = "does not announce"
    with pytest.raises(AttestationError, match=match):
        parse_log(bytes(log))


def test_the_log_refuses_events_without_every_bank() -> None:
    with pytest.raises(ValueError, match="digests"):
        build_log([Event(4, EV_IPL, {TPM_ALG_SHA256: bytes(32)})])


# -- ACPI ----------------------------------------------------------------------------------------------------


def test_the_tpm2_table_points_at_the_event_log() -> None:
    table = build_tpm2_table(layout.TPM_EVENT_LOG_ADDR, layout.TPM_EVENT_LOG_SIZE)
    assert table[:4] == b"TPM2" and len(table) == 76 == struct.unpack_from("<I", table, 4)[0]
    assert table[8] == 4 and sum(table) % 256 == 0
    platform_class, _, control, start, params, laml, lasa = struct.unpack_from("<HHQI12sIQ", table, 36)
    assert (platform_class, control, start, params) == (0, 0, 6, bytes(12))
    assert (laml, lasa) == (0x10000, 0xE0000)


def test_the_dsdt_device_is_msft0101_with_the_tis_window() -> None:
    aml = build_tpm_aml(TIS_BASE, TIS_SIZE)
    assert b"\x08_HID\x0dMSFT0101\x00" in aml and b"TPM_" in aml
    descriptor = struct.pack("<BHBII", 0x86, 9, 1, 0xFED40000, 0x5000)
    # Name(_CRS, Buffer: PkgLength 17 (itself, BufferSize 0A 0E, 14 bytes) {Memory32Fixed..., EndTag})
    assert b"\x08_CRS\x11\x11\x0a\x0e" + descriptor + b"\x79\x00" in aml


def test_extra_tables_are_listed_in_the_xsdt_and_nothing_changes_without_them() -> None:
    plain, rsdp = build_acpi(2)
    assert build_acpi(2, extras=AcpiExtras()) == (plain, rsdp)
    image, rsdp = build_acpi(2, extras=AcpiExtras((build_tpm2_table(0xE0000, 0x10000),), build_tpm_aml(TIS_BASE,
                                                                                                      TIS_SIZE)))
    base = acpi.ACPI_START
    xsdt_at = struct.unpack_from("<Q", image, rsdp - base + 24)[0]
    xsdt_len = struct.unpack_from("<I", image, xsdt_at - base + 4)[0]
    entries = [struct.unpack_from("<Q", image, xsdt_at - base + 36 + 8 * i)[0] for i in range((xsdt_len - 36) // 8)]
    signatures = [image[at - base:at - base + 4] for at in entries]
    assert signatures == [b"FACP", b"APIC", b"TPM2"]
    tpm2 = image[entries[2] - base:entries[2] - base + 76]
    assert sum(tpm2) % 256 == 0
    dsdt_at = struct.unpack_from("<Q", image, entries[0] - base + 140)[0]
    dsdt_len = struct.unpack_from("<I", image, dsdt_at - base + 4)[0]
    dsdt = image[dsdt_at - base:dsdt_at - base + dsdt_len]
    assert sum(dsdt) % 256 == 0 and b"MSFT0101" in dsdt and b"VGEN" in dsdt


def test_the_event_log_area_is_outside_the_boot_structures_and_below_the_bios_area() -> None:
    start, end = layout.TPM_EVENT_LOG_ADDR, layout.TPM_EVENT_LOG_ADDR + layout.TPM_EVENT_LOG_SIZE
    assert start >= layout.VGA_HOLE_START and end <= layout.BIOS_AREA_START
    assert all(end <= area.start or area.end <= start for area in layout.BOOT_STRUCTURES)


# -- the launch policy ---------------------------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    generate_key(tmp_path / "owner.key", tmp_path / "owner.pub")
    return tmp_path / "owner.key", tmp_path / "owner.pub"


def _launch(kernel: bytes = b"kernel", cmdline: str = "console=ttyS0") -> list[Measurement]:
    config = VmConfig(boot_source=BootSource(kernel_image_path="/boot/vmlinux"))
    return launch_measurements(config, kernel, None, cmdline, no_policy_measurement())


def _write_policy(path: Path, key: Path, allow: dict[str, object]) -> Path:
    path.write_text(json.dumps(sign_policy({"name": "test", "allow": allow}, key)))
    return path


def test_a_policy_that_lists_every_measurement_allows_the_launch(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    measurements = _launch()
    allow: dict[str, object] = {m.name: [m.sha256] for m in measurements if m.name != "policy"}
    policy = load_policy(_write_policy(tmp_path / "p.json", private, allow), public)
    policy.check(measurements)
    assert policy.key_id == hashlib.sha256(policy.public_key).hexdigest()
    assert (tmp_path / "owner.key").stat().st_mode & 0o777 == 0o600


def test_a_launch_the_policy_does_not_allow_is_refused_naming_expected_and_actual(
        tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    allowed = _launch()
    allow: dict[str, object] = {m.name: [m.sha256] for m in allowed if m.name != "policy"}
    policy = load_policy(_write_policy(tmp_path / "p.json", private, allow), public)
    tampered = _launch(kernel=b"another kernel", cmdline="console=ttyS0 init=/bin/sh")
    with pytest.raises(PolicyError) as refused:
        policy.check(tampered)
    text = str(refused.value)
    expected = {m.name: m.sha256 for m in allowed}
    actual = {m.name: m.sha256 for m in tampered}
    for name in ("kernel", "cmdline"):
        assert f"{name} sha256 {actual[name]} is not allowed (expected {expected[name]})" in text
    assert "config" not in text


def test_any_and_missing_components(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    policy = load_policy(_write_policy(tmp_path / "p.json", private, {"kvmlet": "any", "config": "any",
                                                                       "kernel": "any"}), public)
    with pytest.raises(PolicyError, match="the policy lists no allowed cmdline"):
        policy.check(_launch())


def test_an_unsigned_policy_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    _, public = keys
    document = {"kvmlet_launch_policy": 1, "policy": {"allow": {"kernel": "any"}}}
    (tmp_path / "p.json").write_text(json.dumps(document))
    with pytest.raises(PolicyError, match="is not signed"):
        load_policy(tmp_path / "p.json", public)


def test_a_changed_policy_has_a_bad_signature(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    path = _write_policy(tmp_path / "p.json", private, {"kernel": [hashlib.sha256(b"a").hexdigest()]})
    document = json.loads(path.read_text())
    document["policy"]["allow"]["kernel"] = [hashlib.sha256(b"b").hexdigest()]
    path.write_text(json.dumps(document))
    with pytest.raises(PolicyError, match="bad signature"):
        load_policy(path, public)
    document["signature"]["value"] = base64.b64encode(bytes(64)).decode()
    path.write_text(json.dumps(document))
    with pytest.raises(PolicyError, match="bad signature"):
        load_policy(path, public)


def test_a_policy_signed_by_another_key_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, _ = keys
    generate_key(tmp_path / "other.key", tmp_path / "other.pub")
    path = _write_policy(tmp_path / "p.json", private, {"kernel": "any"})
    with pytest.raises(PolicyError, match="not by the trusted key"):
        load_policy(path, tmp_path / "other.pub")


def test_malformed_policies_are_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, _ = keys
    with pytest.raises(PolicyError, match="unknown component"):
        sign_policy({"allow": {"bios": "any"}}, private)
    with pytest.raises(PolicyError, match="SHA-256 digests"):
        sign_policy({"allow": {"kernel": ["ABC"]}}, private)


def test_the_policy_measurement_depends_on_key_and_body(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    one = load_policy(_write_policy(tmp_path / "a.json", private, {"kernel": "any"}), public).measurement()
    two = load_policy(_write_policy(tmp_path / "b.json", private, {"kernel": "any", "config": "any"}),
                      public).measurement()
    assert one.pcr == two.pcr == 18 and one.sha256 != two.sha256
    assert no_policy_measurement().payload == b"no launch policy"


# -- measurements and configuration ---------------------------------------------------------------------------


def test_the_config_measurement_leaves_out_host_paths(tmp_path: Path) -> None:
    disk_a, disk_b = tmp_path / "a.img", tmp_path / "b.img"
    for disk in (disk_a, disk_b):
        disk.write_bytes(bytes(4096))
    base = VmConfig(boot_source=BootSource(kernel_image_path="/k"), tpm=Tpm())
    one = msgspec.structs.replace(base, drives=[Drive(drive_id="root", path_on_host=str(disk_a))])
    two = msgspec.structs.replace(base, drives=[Drive(drive_id="root", path_on_host=str(disk_b))])
    three = msgspec.structs.replace(base, drives=[Drive(drive_id="root", path_on_host=str(disk_a),
                                                        is_read_only=True)])
    assert config_document(one) == config_document(two) != config_document(three)
    document = json.loads(config_document(one))
    assert document["drives"] == [{"drive_id": "root", "is_root_device": False, "is_read_only": False,
                                   "partuuid": None}]
    assert str(tmp_path) not in config_document(one).decode()


def test_the_launch_measures_the_documented_pcrs() -> None:
    config = VmConfig(boot_source=BootSource(kernel_image_path="/k", initrd_path="/i"))
    measurements = launch_measurements(config, b"k", b"i", "c", no_policy_measurement())
    assert {m.name: m.pcr for m in measurements} == {"kvmlet": 17, "policy": 18, "config": 1, "kernel": 4,
                                                      "cmdline": 8, "initrd": 9}
    assert tuple(sorted(m.pcr for m in measurements)) == LAUNCH_PCRS
    kvmlet = measurements[0]
    assert kvmlet.payload.startswith(b"kvmlet ") and b"  tpm/measure.py\n" in kvmlet.payload
    assert eventlog.digest(TPM_ALG_SHA256, kvmlet.payload) == kvmlet.digests[TPM_ALG_SHA256]


def test_the_tpm_config_and_its_spec(tmp_path: Path) -> None:
    from kvmlet.tpm.cli import parse_tpm

    assert decode(b"{}", Tpm) == Tpm()
    with pytest.raises(ConfigError, match="unknown field"):
        decode(b'{"statedir": "x"}', Tpm)
    with pytest.raises(ConfigError, match="give both policy and policy_key"):
        Tpm(policy=str(tmp_path)).validate()
    with pytest.raises(ConfigError, match="does not exist"):
        Tpm(policy=str(tmp_path / "none"), policy_key=str(tmp_path / "none")).validate()
    assert parse_tpm("") == Tpm()
    assert parse_tpm(f"state={tmp_path / 'vtpm'}").state_dir == str(tmp_path / "vtpm")
    with pytest.raises(ConfigError):
        parse_tpm("colour=blue")
    assert VmConfig().tpm is None


# -- the TIS front end ---------------------------------------------------------------------------------------


class ScriptedTpm:
    """A back end that answers each command with its own bytes reversed after a 10-byte header."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.commands: list[tuple[bytes, int]] = []
        self.restored: tuple[bytes, ...] | None = None

    def execute(self, command: bytes, locality: int) -> bytes:
        self.commands.append((command, locality))
        if self.fail:
            raise OSError("swtpm is gone")
        body = command[10:][::-1]
        return struct.pack(">HII", 0x8001, 10 + len(body), 0) + body

    def established(self) -> bool:
        return True

    def save_blobs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return b"permanent", b"volatile", b"", b"log"

    def restore_blobs(self, permanent: bytes, volatile: bytes, savestate: bytes, event_log: bytes) -> None:
        self.restored = (permanent, volatile, savestate, event_log)


def _at(locality: int, register: int) -> int:
    return locality * tpm_tis.LOCALITY_SIZE + register


def _command(payload: bytes) -> bytes:
    return struct.pack(">HII", 0x8001, 10 + len(payload), 0x17B) + payload


def _send(tis: TpmTis, command: bytes, locality: int = 0) -> bytes:
    """Drive one command as a driver would; returns the response."""
    tis.bus_write(_at(locality, tpm_tis.REG_STS), 1, tpm_tis.STS_COMMAND_READY)
    assert tis.bus_read(_at(locality, tpm_tis.REG_STS), 1) & tpm_tis.STS_COMMAND_READY
    for index, byte in enumerate(command):
        tis.bus_write(_at(locality, tpm_tis.REG_DATA_FIFO), 1, byte)
        sts = tis.bus_read(_at(locality, tpm_tis.REG_STS), 4)
        assert bool(sts & tpm_tis.STS_EXPECT) == (index < len(command) - 1), index
    tis.bus_write(_at(locality, tpm_tis.REG_STS), 1, tpm_tis.STS_GO)
    assert tis.wait_idle(5.0)
    sts = tis.bus_read(_at(locality, tpm_tis.REG_STS), 4)
    assert sts & (tpm_tis.STS_VALID | tpm_tis.STS_DATA_AVAIL) == tpm_tis.STS_VALID | tpm_tis.STS_DATA_AVAIL
    header = bytes(tis.bus_read(_at(locality, tpm_tis.REG_DATA_FIFO), 1) for _ in range(10))
    size = struct.unpack(">HII", header)[1]
    assert (tis.bus_read(_at(locality, tpm_tis.REG_STS), 4) >> 8) & 0xFFFF == size - 10   # burstCount
    rest = bytes(tis.bus_read(_at(locality, tpm_tis.REG_XDATA_FIFO), 1) for _ in range(size - 10))
    assert not tis.bus_read(_at(locality, tpm_tis.REG_STS), 1) & tpm_tis.STS_DATA_AVAIL
    return header + rest


def _request(tis: TpmTis, locality: int) -> int:
    tis.bus_write(_at(locality, tpm_tis.REG_ACCESS), 1, tpm_tis.ACCESS_REQUEST_USE)
    return tis.bus_read(_at(locality, tpm_tis.REG_ACCESS), 1)


def test_identity_registers() -> None:
    tis = TpmTis(ScriptedTpm())
    assert tis.bus_read(_at(0, tpm_tis.REG_DID_VID), 4) == 0x0001_1014
    assert tis.bus_read(_at(2, tpm_tis.REG_DID_VID), 2) == 0x1014
    assert tis.bus_read(_at(0, tpm_tis.REG_INTERFACE_ID), 4) & 0xF == 0       # FIFO interface for TPM 2.0
    assert tis.bus_read(_at(0, tpm_tis.REG_INTF_CAPABILITY), 4) >> 28 == 0b011
    assert tis.bus_read(_at(0, tpm_tis.REG_ACCESS), 1) == tpm_tis.ACCESS_VALID   # established: bit 0 clear
    assert tis.bus_read(_at(0, tpm_tis.REG_STS), 4) == 0xFFFF_FFFF               # no active locality


def test_a_command_round_trip_with_byte_and_word_fifo_accesses() -> None:
    backend = ScriptedTpm()
    tis = TpmTis(backend)
    assert _request(tis, 0) & tpm_tis.ACCESS_ACTIVE_LOCALITY
    assert _send(tis, _command(b"\x01\x02\x03")) == struct.pack(">HII", 0x8001, 13, 0) + b"\x03\x02\x01"
    assert backend.commands == [(_command(b"\x01\x02\x03"), 0)]
    # 4-byte FIFO writes and reads, and responseRetry
    tis.bus_write(_at(0, tpm_tis.REG_STS), 1, tpm_tis.STS_COMMAND_READY)
    command = _command(b"abcdef")
    for at in range(0, len(command), 4):
        chunk = command[at:at + 4]
        tis.bus_write(_at(0, tpm_tis.REG_DATA_FIFO), len(chunk), int.from_bytes(chunk, "little"))
    tis.bus_write(_at(0, tpm_tis.REG_STS), 1, tpm_tis.STS_GO)
    assert tis.wait_idle(5.0)
    first = tis.bus_read(_at(0, tpm_tis.REG_DATA_FIFO), 4).to_bytes(4, "little")
    tis.bus_write(_at(0, tpm_tis.REG_STS), 1, tpm_tis.STS_RESPONSE_RETRY)
    assert tis.bus_read(_at(0, tpm_tis.REG_DATA_FIFO), 4).to_bytes(4, "little") == first == b"\x80\x01\x00\x00"
    tis.close()


def test_go_before_the_whole_command_does_nothing() -> None:
    backend = ScriptedTpm()
    tis = TpmTis(backend)
    _request(tis, 0)
    tis.bus_write(_at(0, tpm_tis.REG_STS), 1, tpm_tis.STS_COMMAND_READY)
    for byte in _command(b"xyz")[:8]:
        tis.bus_write(_at(0, tpm_tis.REG_DATA_FIFO), 1, byte)
    tis.bus_write(_at(0, tpm_tis.REG_STS), 1, tpm_tis.STS_GO)
    assert tis.wait_idle(1.0) and not backend.commands
    assert tis.bus_read(_at(0, tpm_tis.REG_STS), 1) & tpm_tis.STS_EXPECT


def test_localities_three_and_four_are_never_granted_and_others_wait_their_turn() -> None:
    tis = TpmTis(ScriptedTpm())
    assert not _request(tis, 4) & tpm_tis.ACCESS_ACTIVE_LOCALITY
    assert not _request(tis, 3) & tpm_tis.ACCESS_ACTIVE_LOCALITY
    assert tis.counters.refused_localities == 2
    assert _request(tis, 0) & tpm_tis.ACCESS_ACTIVE_LOCALITY
    waiting = _request(tis, 1)
    assert waiting & tpm_tis.ACCESS_REQUEST_USE and not waiting & tpm_tis.ACCESS_ACTIVE_LOCALITY
    assert tis.bus_read(_at(0, tpm_tis.REG_ACCESS), 1) & tpm_tis.ACCESS_PENDING_REQUEST
    assert tis.bus_read(_at(1, tpm_tis.REG_STS), 4) == 0xFFFF_FFFF
    tis.bus_write(_at(0, tpm_tis.REG_ACCESS), 1, tpm_tis.ACCESS_ACTIVE_LOCALITY)     # relinquish
    assert tis.bus_read(_at(1, tpm_tis.REG_ACCESS), 1) & tpm_tis.ACCESS_ACTIVE_LOCALITY
    tis.bus_write(_at(2, tpm_tis.REG_ACCESS), 1, tpm_tis.ACCESS_SEIZE)              # a higher locality seizes
    assert tis.bus_read(_at(2, tpm_tis.REG_ACCESS), 1) & tpm_tis.ACCESS_ACTIVE_LOCALITY
    assert tis.bus_read(_at(1, tpm_tis.REG_ACCESS), 1) & tpm_tis.ACCESS_BEEN_SEIZED
    assert _send(tis, _command(b"\x09"), locality=2)[-1] == 9


def test_a_dead_back_end_answers_tpm_rc_failure_and_the_device_goes_on() -> None:
    tis = TpmTis(ScriptedTpm(fail=True))
    _request(tis, 0)
    assert _send(tis, _command(b"\x01")) == failure_response() == struct.pack(">HII", 0x8001, 10, 0x101)
    assert _send(tis, _command(b"\x02")) == failure_response()
    assert tis.counters.failed_commands == 2 and tis.counters.commands == 2


def test_interrupt_status_latches_enabled_events_only() -> None:
    tis = TpmTis(ScriptedTpm())
    _request(tis, 0)
    tis.bus_write(_at(0, tpm_tis.REG_INT_ENABLE), 4, tpm_tis.INT_GLOBAL_ENABLE | tpm_tis.INT_DATA_AVAIL)
    _send(tis, _command(b"\x01"))
    assert tis.bus_read(_at(0, tpm_tis.REG_INT_STATUS), 4) == tpm_tis.INT_DATA_AVAIL
    tis.bus_write(_at(0, tpm_tis.REG_INT_STATUS), 4, tpm_tis.INT_DATA_AVAIL)
    assert tis.bus_read(_at(0, tpm_tis.REG_INT_STATUS), 4) == 0


def test_the_tis_state_round_trips_through_the_device_state_encoding() -> None:
    backend = ScriptedTpm()
    tis = TpmTis(backend)
    _request(tis, 1)
    tis.bus_write(_at(1, tpm_tis.REG_STS), 1, tpm_tis.STS_COMMAND_READY)
    for byte in _command(b"ab")[:7]:                  # half a command received
        tis.bus_write(_at(1, tpm_tis.REG_DATA_FIFO), 1, byte)
    tis.pause()
    state = tis.save_state()
    decoded = decode_device_states(encode_device_states({"tpm": state}))["tpm"]
    assert decoded == state and isinstance(decoded, TpmState)
    other_backend = ScriptedTpm()
    other = TpmTis(other_backend)
    other.check_state(decoded)
    other.restore_state(decoded)
    assert other_backend.restored == (b"permanent", b"volatile", b"", b"log")
    for byte in _command(b"ab")[7:]:
        other.bus_write(_at(1, tpm_tis.REG_DATA_FIFO), 1, byte)
    other.bus_write(_at(1, tpm_tis.REG_STS), 1, tpm_tis.STS_GO)
    assert other.wait_idle(5.0)
    assert other_backend.commands == [(_command(b"ab"), 1)]
    with pytest.raises(DeviceStateError, match="no TPM state blob"):
        other.check_state(msgspec.structs.replace(state, permanent=b""))
