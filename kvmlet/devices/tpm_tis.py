"""The TPM TIS interface (TCG PC Client Platform TPM Profile, "FIFO interface") at 0xFED40000.

Five localities of 4 KiB each; in each, the registers the TPM profile defines for a TPM 2.0 FIFO interface:

==========  =====  ===================================================================================
offset      size   register
==========  =====  ===================================================================================
0x00        1      TPM_ACCESS: tpmRegValidSts (7), activeLocality (5), beenSeized (4), Seize (3, write),
                   pendingRequest (2), requestUse (1), tpmEstablishment (0: 0 once a dynamic launch happened)
0x08        4      TPM_INT_ENABLE: globalIntEnable (31), commandReady (7), localityChange (2), stsValid (1),
                   dataAvail (0)
0x0C        1      TPM_INT_VECTOR (0: no interrupt line)
0x10        4      TPM_INT_STATUS (write 1 to clear)
0x14        4      TPM_INTF_CAPABILITY: interface version "TIS 1.3 for TPM 2.0", 64-byte transfers; no
                   interrupt types (the interface is polled)
0x18        4      TPM_STS: stsValid (7), commandReady (6), tpmGo (5, write), dataAvail (4), Expect (3),
                   selfTestDone (2), responseRetry (1, write), burstCount (8-23), tpmFamily (26-27: TPM 2.0)
0x24, 0x80  1-4    TPM_DATA_FIFO, TPM_XDATA_FIFO
0x30        4      TPM_INTERFACE_ID: FIFO interface for TPM 2.0, five localities, selector locked to FIFO
0xF00       4      TPM_DID_VID (vendor 0x1014, device 0x0001, as QEMU's tpm-tis)
0xF04       1      TPM_RID
==========  =====  ===================================================================================

The FIFO state machine: Idle -> Ready (commandReady written) -> Reception (bytes written; Expect until the
header's size has arrived) -> Execution (tpmGo) -> Completion (dataAvail while response bytes remain) -> Ready
(commandReady). A command runs on the device's worker thread, never on the vCPU that wrote tpmGo: the guest polls
STS, as it would poll a real TPM. If the back end (swtpm) is gone, the command completes with a TPM response
of ``TPM_RC_FAILURE`` and the VM runs on.

Localities 3 and 4 belong to kvmlet (as TXT keeps them for the processor and the SINIT module): their windows
read as valid but are never granted to the guest, so a guest cannot reset PCRs 17-22 nor extend as the launch
environment. The guest may use localities 0-2. Interrupts are latched in TPM_INT_STATUS as enabled, but no
interrupt line is wired (the ACPI device announces none, and Linux's tpm_tis polls).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import queue
import struct
import threading
from dataclasses import dataclass
from typing import Protocol

from kvmlet.devices.state import DeviceStateError, TpmState, expect_state

log = logging.getLogger("kvmlet.tpm")

TIS_BASE = 0xFED4_0000
LOCALITY_SIZE = 0x1000
LOCALITIES = 5
TIS_SIZE = LOCALITIES * LOCALITY_SIZE
GUEST_LOCALITIES = 3            # 0-2; 3 and 4 are kvmlet's
BUFFER_SIZE = 4096              # the largest command or response (swtpm's default buffer)
VENDOR_ID = 0x1014
DEVICE_ID = 0x0001
REVISION_ID = 0x01

REG_ACCESS = 0x00
REG_INT_ENABLE = 0x08
REG_INT_VECTOR = 0x0C
REG_INT_STATUS = 0x10
REG_INTF_CAPABILITY = 0x14
REG_STS = 0x18
REG_DATA_FIFO = 0x24
REG_INTERFACE_ID = 0x30
REG_XDATA_FIFO = 0x80
REG_DID_VID = 0xF00
REG_RID = 0xF04

ACCESS_ESTABLISHMENT = 1 << 0   # reads 1 until a dynamic launch established the TPM
ACCESS_REQUEST_USE = 1 << 1
ACCESS_PENDING_REQUEST = 1 << 2
ACCESS_SEIZE = 1 << 3
ACCESS_BEEN_SEIZED = 1 << 4
ACCESS_ACTIVE_LOCALITY = 1 << 5
ACCESS_VALID = 1 << 7

STS_RESPONSE_RETRY = 1 << 1
STS_SELFTEST_DONE = 1 << 2
STS_EXPECT = 1 << 3
STS_DATA_AVAIL = 1 << 4
STS_GO = 1 << 5
STS_COMMAND_READY = 1 << 6
STS_VALID = 1 << 7
STS_COMMAND_CANCEL = 1 << 24
STS_FAMILY_TPM2 = 1 << 26

INT_DATA_AVAIL = 1 << 0
INT_STS_VALID = 1 << 1
INT_LOCALITY_CHANGE = 1 << 2
INT_COMMAND_READY = 1 << 7
INT_GLOBAL_ENABLE = 1 << 31
INT_ENABLE_MASK = INT_GLOBAL_ENABLE | INT_COMMAND_READY | INT_LOCALITY_CHANGE | INT_STS_VALID | INT_DATA_AVAIL \
    | (3 << 3)

# TPM_INTF_CAPABILITY: InterfaceVersion 011 (TIS 1.3 for TPM 2.0), DataTransferSizeSupport 11 (64 bytes).
INTF_CAPABILITY = (0b011 << 28) | (0b11 << 9)
# TPM_INTERFACE_ID: InterfaceType 0 (FIFO for TPM 2.0), InterfaceVersion 0, CapLocality (8), CapFIFO (13),
# InterfaceSelector 0 (FIFO), IntfSelLock (19).
INTERFACE_ID = (1 << 8) | (1 << 13) | (1 << 19)

TPM_ST_NO_SESSIONS = 0x8001
TPM_RC_FAILURE = 0x101
TPM_HEADER_SIZE = 10


def failure_response(code: int = TPM_RC_FAILURE) -> bytes:
    """A TPM 2.0 error response: no sessions, 10 bytes, ``code``."""
    return struct.pack(">HII", TPM_ST_NO_SESSIONS, TPM_HEADER_SIZE, code)


class TpmBackend(Protocol):
    """What executes the commands: the vTPM (kvmlet.tpm.vtpm.Vtpm)."""

    def execute(self, command: bytes, locality: int) -> bytes:
        """The response to ``command``; raises (any exception) when the TPM cannot answer."""
        ...

    def established(self) -> bool:
        ...

    def save_blobs(self) -> tuple[bytes, bytes, bytes, bytes]:
        """The TPM's permanent, volatile and savestate blobs, and kvmlet's copy of the event log."""
        ...

    def restore_blobs(self, permanent: bytes, volatile: bytes, savestate: bytes, event_log: bytes) -> None:
        ...


class FifoState(enum.Enum):
    IDLE = "idle"
    READY = "ready"
    RECEPTION = "reception"
    EXECUTION = "execution"
    COMPLETION = "completion"


@dataclass
class TisStats:
    commands: int = 0
    failed_commands: int = 0       # answered with TPM_RC_FAILURE because the back end could not answer
    aborted_commands: int = 0      # the guest wrote commandReady while the command ran
    locality_changes: int = 0
    refused_localities: int = 0    # requests for localities 3 and 4


@dataclass
class TpmMetrics(TisStats):
    backend_alive: int = 0         # swtpm runs
    backend_deaths: int = 0        # swtpm died under the running VM
    launch_ms: float = 0.0         # the measured launch (provisioning included)


class TpmTis:
    """The TIS front end of one vTPM (a BusDevice on the MMIO bus at :data:`TIS_BASE`)."""

    def __init__(self, backend: TpmBackend, *, name: str = "tpm") -> None:
        self.backend = backend
        self.name = name
        self.counters = TisStats()
        self._lock = threading.Condition()
        self._active: int | None = None
        self._requests: set[int] = set()
        self._seized: set[int] = set()
        self._state = FifoState.IDLE
        self._buffer = bytearray()          # the command being received, then the response
        self._read_offset = 0
        self._command_locality = 0
        self._generation = 0                # which command the worker's answer belongs to
        self._int_enable = 0
        self._int_status = 0
        self._int_vector = 0
        self._established_cache: bool | None = None
        self._paused = False
        self._work: queue.Queue[tuple[int, bytes, int] | None] = queue.Queue()
        self._worker: threading.Thread | None = None

    # -- bus ----------------------------------------------------------------------------------------
    def bus_read(self, offset: int, size: int) -> int:
        locality, register = divmod(offset, LOCALITY_SIZE)
        with self._lock:
            if REG_DATA_FIFO <= register < REG_DATA_FIFO + 4 or REG_XDATA_FIFO <= register < REG_XDATA_FIFO + 4:
                return self._fifo_read(locality, size)
            base = register & ~3
            value = self._register(locality, base)
            shift = 8 * (register - base)
            return (value >> shift) & ((1 << (8 * size)) - 1)

    def bus_write(self, offset: int, size: int, value: int) -> None:
        locality, register = divmod(offset, LOCALITY_SIZE)
        value &= (1 << (8 * size)) - 1
        with self._lock:
            if REG_DATA_FIFO <= register < REG_DATA_FIFO + 4 or REG_XDATA_FIFO <= register < REG_XDATA_FIFO + 4:
                self._fifo_write(locality, value.to_bytes(size, "little"))
                return
            base = register & ~3
            shifted = value << (8 * (register - base))
            if base == REG_ACCESS and register == REG_ACCESS:
                self._access_write(locality, value & 0xFF)
            elif base == REG_STS:
                self._sts_write(locality, shifted)
            elif base == REG_INT_ENABLE and locality == self._active:
                mask = ((1 << (8 * size)) - 1) << (8 * (register - base))
                self._int_enable = ((self._int_enable & ~mask) | (shifted & mask)) & INT_ENABLE_MASK
            elif base == REG_INT_VECTOR and register == REG_INT_VECTOR and locality == self._active:
                self._int_vector = value & 0xF
            elif base == REG_INT_STATUS and locality == self._active:
                self._int_status &= ~shifted

    # -- registers ----------------------------------------------------------------------------------
    def _register(self, locality: int, register: int) -> int:
        if register == REG_ACCESS:
            return self._access_read(locality)
        if register == REG_STS:
            return self._sts_read(locality)
        if register == REG_INT_ENABLE:
            return self._int_enable
        if register == REG_INT_VECTOR:
            return self._int_vector
        if register == REG_INT_STATUS:
            return self._int_status
        if register == REG_INTF_CAPABILITY:
            return INTF_CAPABILITY
        if register == REG_INTERFACE_ID:
            return INTERFACE_ID
        if register == REG_DID_VID:
            return (DEVICE_ID << 16) | VENDOR_ID
        if register == REG_RID:
            return REVISION_ID
        return 0xFFFF_FFFF

    def _established(self) -> bool:
        if self._established_cache is None:
            try:
                self._established_cache = self.backend.established()
            except Exception:
                return False
        return self._established_cache

    def _access_read(self, locality: int) -> int:
        value = ACCESS_VALID
        if not self._established():
            value |= ACCESS_ESTABLISHMENT
        if locality >= GUEST_LOCALITIES:
            return value
        if self._active == locality:
            value |= ACCESS_ACTIVE_LOCALITY
            if self._requests - {locality}:
                value |= ACCESS_PENDING_REQUEST
        if locality in self._requests:
            value |= ACCESS_REQUEST_USE
        if locality in self._seized:
            value |= ACCESS_BEEN_SEIZED
        return value

    def _access_write(self, locality: int, value: int) -> None:
        if locality >= GUEST_LOCALITIES:
            if value & (ACCESS_REQUEST_USE | ACCESS_SEIZE):
                self.counters.refused_localities += 1
            return
        if value & ACCESS_BEEN_SEIZED:
            self._seized.discard(locality)
        if value & ACCESS_ACTIVE_LOCALITY:          # relinquish (or withdraw a request)
            self._requests.discard(locality)
            if self._active == locality:
                self._set_active(max(self._requests) if self._requests else None)
            return
        if value & ACCESS_SEIZE and self._active is not None and locality > self._active:
            self._seized.add(self._active)
            self._set_active(locality)
            return
        if value & ACCESS_REQUEST_USE:
            if self._active is None:
                self._set_active(locality)
            elif self._active != locality:
                self._requests.add(locality)

    def _set_active(self, locality: int | None) -> None:
        if locality == self._active:
            return
        if locality is not None:
            self._requests.discard(locality)
        self._active = locality
        self.counters.locality_changes += 1
        if self._state is FifoState.EXECUTION:
            self._generation += 1           # the running command's answer is for nobody now
            self.counters.aborted_commands += 1
        self._state = FifoState.IDLE
        self._buffer = bytearray()
        self._raise(INT_LOCALITY_CHANGE)

    def _expected(self) -> int:
        """The size of the command being received (from its header), or 0 while the header is incomplete."""
        return int.from_bytes(self._buffer[2:6], "big") if len(self._buffer) >= 6 else 0

    def _sts_read(self, locality: int) -> int:
        if locality != self._active:
            return 0xFFFF_FFFF
        value = STS_FAMILY_TPM2 | STS_SELFTEST_DONE | STS_VALID
        burst = 0
        if self._state is FifoState.READY:
            value |= STS_COMMAND_READY
            burst = BUFFER_SIZE
        elif self._state is FifoState.RECEPTION:
            expected = self._expected()
            if expected == 0 or len(self._buffer) < expected:
                value |= STS_EXPECT
            burst = BUFFER_SIZE - len(self._buffer)
        elif self._state is FifoState.COMPLETION:
            burst = len(self._buffer) - self._read_offset
            if burst > 0:
                value |= STS_DATA_AVAIL
        return value | (min(burst, 0xFFFF) << 8)

    def _sts_write(self, locality: int, value: int) -> None:
        if locality != self._active:
            return
        if value & STS_COMMAND_READY:
            if self._state is FifoState.EXECUTION:
                self._generation += 1       # abort: the answer, when it comes, is dropped
                self.counters.aborted_commands += 1
            self._state = FifoState.READY
            self._buffer = bytearray()
            self._read_offset = 0
            self._raise(INT_COMMAND_READY)
        elif value & STS_GO:
            expected = self._expected()
            if self._state is FifoState.RECEPTION and expected and len(self._buffer) == expected:
                self._execute(bytes(self._buffer), locality)
        elif value & STS_RESPONSE_RETRY and self._state is FifoState.COMPLETION:
            self._read_offset = 0

    def _fifo_write(self, locality: int, data: bytes) -> None:
        if locality != self._active or self._state not in (FifoState.READY, FifoState.RECEPTION):
            return
        self._state = FifoState.RECEPTION
        room = BUFFER_SIZE - len(self._buffer)
        self._buffer += data[:room]
        expected = self._expected()
        if expected and len(self._buffer) >= expected:
            del self._buffer[expected:]
            self._raise(INT_STS_VALID)

    def _fifo_read(self, locality: int, size: int) -> int:
        if locality != self._active or self._state is not FifoState.COMPLETION:
            return (1 << (8 * size)) - 1
        chunk = bytes(self._buffer[self._read_offset:self._read_offset + size])
        self._read_offset += len(chunk)
        return int.from_bytes(chunk.ljust(size, b"\xff"), "little")

    def _raise(self, bit: int) -> None:
        if self._int_enable & INT_GLOBAL_ENABLE:
            self._int_status |= bit & self._int_enable

    # -- execution ----------------------------------------------------------------------------------
    def _execute(self, command: bytes, locality: int) -> None:
        self._state = FifoState.EXECUTION
        self._generation += 1
        self._command_locality = locality
        self.counters.commands += 1
        if self._worker is None:
            self._worker = threading.Thread(target=self._serve, name=f"kvmlet-{self.name}", daemon=True)
            self._worker.start()
        self._work.put((self._generation, command, locality))

    def _serve(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            generation, command, locality = item
            try:
                response = self.backend.execute(command, locality)
            except Exception as exc:
                log.warning("%s: a command of the guest failed: %s", self.name, exc)
                with self._lock:
                    self.counters.failed_commands += 1
                response = failure_response()
            self._complete(generation, response)

    def _complete(self, generation: int, response: bytes) -> None:
        with self._lock:
            if generation == self._generation and self._state is FifoState.EXECUTION:
                self._buffer = bytearray(response[:BUFFER_SIZE])
                self._read_offset = 0
                self._state = FifoState.COMPLETION
                self._raise(INT_DATA_AVAIL | INT_STS_VALID)
            self._lock.notify_all()

    def stats(self) -> TpmMetrics:
        """The front end's counters and the back end's health, for the metrics."""
        health = getattr(self.backend, "stats", None)
        backend = health() if callable(health) else None
        swtpm = getattr(backend, "swtpm", None)
        return TpmMetrics(**dataclasses.asdict(self.counters),
                          backend_alive=int(getattr(swtpm, "alive", 0)),
                          backend_deaths=int(getattr(swtpm, "deaths", 0)),
                          launch_ms=float(getattr(backend, "launch_ms", 0.0)))

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._state is FifoState.EXECUTION

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no command runs; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._state is not FifoState.EXECUTION, timeout)

    # -- quiescing and state ------------------------------------------------------------------------
    def pause(self) -> None:
        """Returns once no command runs (a guest command in flight completes first)."""
        if not self.wait_idle(30.0):
            from kvmlet.errors import StateError

            raise StateError(f"{self.name}: a TPM command is still running after 30 s")
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def save_state(self) -> TpmState:
        with self._lock:
            if self._state is FifoState.EXECUTION:
                raise DeviceStateError(f"{self.name}: a TPM command is running (pause the device first)")
            permanent, volatile, savestate, event_log = self.backend.save_blobs()
            return TpmState(active_locality=self._active, requests=sorted(self._requests),
                            seized=sorted(self._seized), fifo=self._state.value, buffer=bytes(self._buffer),
                            read_offset=self._read_offset, int_enable=self._int_enable,
                            int_status=self._int_status, int_vector=self._int_vector, permanent=permanent,
                            volatile=volatile, savestate=savestate, event_log=event_log)

    def check_state(self, state: object) -> None:
        saved = expect_state(state, TpmState, self.name)
        if saved.fifo not in {s.value for s in FifoState} or saved.fifo == FifoState.EXECUTION.value:
            raise DeviceStateError(f"{self.name}: the saved TIS state {saved.fifo!r} cannot be restored")
        if not saved.permanent:
            raise DeviceStateError(f"{self.name}: the saved state has no TPM state blob")

    def restore_state(self, state: object) -> None:
        saved = expect_state(state, TpmState, self.name)
        self.backend.restore_blobs(saved.permanent, saved.volatile, saved.savestate, saved.event_log)
        with self._lock:
            self._active = saved.active_locality
            self._requests = set(saved.requests)
            self._seized = set(saved.seized)
            self._state = FifoState(saved.fifo)
            self._buffer = bytearray(saved.buffer)
            self._read_offset = saved.read_offset
            self._int_enable = saved.int_enable
            self._int_status = saved.int_status
            self._int_vector = saved.int_vector
            self._established_cache = None

    def close(self) -> None:
        if self._worker is not None:
            self._work.put(None)
            self._worker.join(10.0)
            self._worker = None
        closer = getattr(self.backend, "close", None)
        if closer is not None:
            closer()
