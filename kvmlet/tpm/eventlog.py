"""The TCG crypto-agile event log (TCG PC Client Platform Firmware Profile, "Crypto Agile Log Format").

Layout, all integers little-endian:

* the header, an SHA-1-format ``TCG_PCR_EVENT``: PCRIndex 0 (u32), EventType ``EV_NO_ACTION`` (u32), a zero
  SHA-1 digest (20 bytes), EventSize (u32) and ``TCG_EfiSpecIDEvent``: the signature ``"Spec ID Event03\\0"``,
  platformClass (u32, 0: client), specVersionMinor 0, specVersionMajor 2, specErrata 2, uintnSize 2 (u8 each),
  numberOfAlgorithms (u32), per algorithm its TPM_ALG_ID (u16) and digest size (u16), vendorInfoSize (u8) and
  the vendor information;
* then one ``TCG_PCR_EVENT2`` per measurement: PCRIndex (u32), EventType (u32), a ``TPML_DIGEST_VALUES`` (count
  u32, then per bank TPM_ALG_ID u16 and the digest), EventSize (u32) and the event data.

Replaying a log (:func:`replay`) extends, per bank, a PCR starting at zero with each event's digest:
``PCR = H(PCR || digest)``. ``EV_NO_ACTION`` events are not extended. kvmlet's PCRs 17 and 18 start at zero
as well: the dynamic launch (:meth:`kvmlet.tpm.swtpm.Swtpm.dynamic_launch`) resets them.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from kvmlet.tpm.errors import AttestationError

EV_PREBOOT_CERT = 0x0
EV_POST_CODE = 0x1
EV_NO_ACTION = 0x3
EV_SEPARATOR = 0x4
EV_EVENT_TAG = 0x6
EV_S_CRTM_CONTENTS = 0x7
EV_S_CRTM_VERSION = 0x8
EV_PLATFORM_CONFIG_FLAGS = 0xA
EV_COMPACT_HASH = 0xC
EV_IPL = 0xD

TPM_ALG_SHA256 = 0x000B
TPM_ALG_SHA384 = 0x000C
ALGORITHMS: dict[int, tuple[str, int]] = {TPM_ALG_SHA256: ("sha256", 32), TPM_ALG_SHA384: ("sha384", 48)}
BANKS = (TPM_ALG_SHA256, TPM_ALG_SHA384)
ALG_BY_NAME = {name: alg for alg, (name, _) in ALGORITHMS.items()}

SPEC_ID_SIGNATURE = b"Spec ID Event03\0"
VENDOR_INFO = b"kvmlet"
_SHA1_EVENT = struct.Struct("<II20sI")


def digest(alg: int, data: bytes) -> bytes:
    return hashlib.new(ALGORITHMS[alg][0], data).digest()


def extend(alg: int, pcr: bytes, measurement: bytes) -> bytes:
    return digest(alg, pcr + measurement)


@dataclass(frozen=True)
class Event:
    """One TCG_PCR_EVENT2."""

    pcr: int
    event_type: int
    digests: dict[int, bytes]       # TPM_ALG_ID -> digest
    data: bytes = field(default=b"")

    def pack(self) -> bytes:
        out = bytearray(struct.pack("<III", self.pcr, self.event_type, len(self.digests)))
        for alg, value in self.digests.items():
            out += struct.pack("<H", alg) + value
        out += struct.pack("<I", len(self.data)) + self.data
        return bytes(out)


@dataclass(frozen=True)
class EventLog:
    """A parsed log: the banks its header announces and its events."""

    algorithms: dict[int, int]      # TPM_ALG_ID -> digest size
    events: list[Event]
    vendor_info: bytes = b""


def spec_id_event(algorithms: tuple[int, ...] = BANKS, vendor_info: bytes = VENDOR_INFO) -> bytes:
    body = bytearray(SPEC_ID_SIGNATURE + struct.pack("<IBBBBI", 0, 0, 2, 2, 2, len(algorithms)))
    for alg in algorithms:
        body += struct.pack("<HH", alg, ALGORITHMS[alg][1])
    body += bytes([len(vendor_info)]) + vendor_info
    return _SHA1_EVENT.pack(0, EV_NO_ACTION, bytes(20), len(body)) + bytes(body)


def build_log(events: list[Event], algorithms: tuple[int, ...] = BANKS) -> bytes:
    """The header and ``events`` as one log."""
    for event in events:
        if set(event.digests) != set(algorithms):
            raise ValueError(f"event for PCR {event.pcr} has digests for {sorted(event.digests)}, "
                             f"the log for {sorted(algorithms)}")
    return spec_id_event(algorithms) + b"".join(event.pack() for event in events)


def parse_log(data: bytes) -> EventLog:
    """Parse a crypto-agile log; trailing zero bytes (the rest of the log area) end it. AttestationError
    names what is malformed."""
    view = memoryview(data)
    if len(data) < _SHA1_EVENT.size:
        raise AttestationError("event log: shorter than its header")
    pcr, event_type, _, size = _SHA1_EVENT.unpack_from(view, 0)
    at = _SHA1_EVENT.size
    body = bytes(view[at:at + size])
    if pcr != 0 or event_type != EV_NO_ACTION or len(body) != size or not body.startswith(SPEC_ID_SIGNATURE):
        raise AttestationError("event log: the first event is not a TCG Spec ID event (not a crypto-agile log)")
    try:
        count = struct.unpack_from("<I", body, 24)[0]
        algorithms: dict[int, int] = {}
        for index in range(count):
            alg, length = struct.unpack_from("<HH", body, 28 + 4 * index)
            algorithms[alg] = length
        vendor_size = body[28 + 4 * count]
        vendor_info = body[29 + 4 * count:29 + 4 * count + vendor_size]
    except (struct.error, IndexError):
        raise AttestationError("event log: the Spec ID event is truncated") from None
    at += size
    events: list[Event] = []
    while at + 12 <= len(data):
        pcr, event_type, count = struct.unpack_from("<III", view, at)
        if pcr == 0 and event_type == 0 and count == 0:
            break                      # zero padding: the end of the log
        position = at + 12
        digests: dict[int, bytes] = {}
        try:
            for _ in range(count):
                alg = struct.unpack_from("<H", view, position)[0]
                if alg not in algorithms:
                    raise AttestationError(f"event log: event {len(events) + 1} has a digest of algorithm "
                                           f"{alg:#06x}, which the header does not announce")
                length = algorithms[alg]
                digests[alg] = bytes(view[position + 2:position + 2 + length])
                position += 2 + length
            size = struct.unpack_from("<I", view, position)[0]
        except struct.error:
            raise AttestationError(f"event log: event {len(events) + 1} is truncated") from None
        position += 4
        if position + size > len(data):
            raise AttestationError(f"event log: event {len(events) + 1} is truncated")
        events.append(Event(pcr, event_type, digests, bytes(view[position:position + size])))
        at = position + size
    return EventLog(algorithms, events, vendor_info)


def replay(log: EventLog, alg: int) -> dict[int, bytes]:
    """The PCR values of bank ``alg`` that the log's events produce (PCRs it does not touch are left out)."""
    if alg not in log.algorithms:
        raise AttestationError(f"event log: no {ALGORITHMS.get(alg, (hex(alg),))[0]} digests")
    size = log.algorithms[alg]
    pcrs: dict[int, bytes] = {}
    for event in log.events:
        if event.event_type == EV_NO_ACTION:
            continue
        value = event.digests.get(alg)
        if value is None:
            raise AttestationError(f"event log: an event for PCR {event.pcr} has no {ALGORITHMS[alg][0]} digest")
        pcrs[event.pcr] = extend(alg, pcrs.get(event.pcr, bytes(size)), value)
    return pcrs
