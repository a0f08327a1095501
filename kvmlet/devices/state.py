"""The state model of every device: typed, versioned, and encodable with msgspec (msgpack or JSON).

Each device saves one of the states below (``save_state()``) and loads it into a freshly built device of the
same kind in another process (``restore_state(state)``). Every state struct carries a ``version``; a state of
another version is refused on restore with a :class:`DeviceStateError`, as is a state that does not fit the
device it is restored into (another kind of device, a drive of another size), with one line that names the
device and what does not fit.

The device states form one tagged union (the ``kind`` field), so the device manager's whole state is one
``dict[str, DeviceState]`` keyed by device name: :func:`encode_device_states` / :func:`decode_device_states`.

What is deliberately not here: host resources (file descriptors, sockets, vsock connections), statistics a
host reads (except a few counters the API reports per device), and anything timed by the monotonic clock of
the process that saved it (a rate limiter saves how long ago it last refilled, never when).
"""

from __future__ import annotations

from functools import cache
from typing import TypeVar

import msgspec

from kvmlet.errors import KvmletError


class DeviceStateError(KvmletError, ValueError):
    """A saved device state that cannot be restored into this device; the message names both."""


class VersionedState(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """The base of every state struct: ``version`` is the layout's version (bump it with the layout)."""

    version: int = 1


S = TypeVar("S", bound=VersionedState)


@cache
def current_version(cls: type[VersionedState]) -> int:
    """The version this kvmlet writes (and restores) for ``cls``: the default of its ``version`` field."""
    for field in msgspec.structs.fields(cls):
        if field.name == "version":
            return int(field.default)
    raise TypeError(f"{cls.__name__} has no version field")


def expect_state(state: object, cls: type[S], device: str) -> S:
    """``state`` as a ``cls`` of the current version, or DeviceStateError naming ``device``."""
    if not isinstance(state, cls):
        kind = getattr(type(state), "__struct_config__", None)
        saved = kind.tag if kind is not None and kind.tag is not None else type(state).__name__
        wanted = cls.__struct_config__.tag
        raise DeviceStateError(f"{device}: the saved state is a {saved} state, not a {wanted} state")
    expected = current_version(cls)
    if state.version != expected:
        raise DeviceStateError(f"{device}: the saved {cls.__struct_config__.tag} state is version {state.version}; "
                               f"this kvmlet restores version {expected}")
    return state


# -- rate limiters -------------------------------------------------------------------------------------------
class TokenBucketState(VersionedState, frozen=True, tag="token-bucket"):
    """One bucket: what is left of it, and how long ago (seconds) it last refilled."""

    budget: float                 # tokens left (negative: debt)
    one_time_burst: float         # what is left of the one-time burst
    since_refill: float           # a duration, never a timestamp: the restoring process has its own clock


class RateLimiterState(VersionedState, frozen=True, tag="rate-limiter"):
    bandwidth: TokenBucketState | None = None
    ops: TokenBucketState | None = None
    throttled: int = 0


# -- virtio --------------------------------------------------------------------------------------------------
class QueueState(VersionedState, frozen=True, tag="virtqueue"):
    """One split virtqueue: the driver's configuration and the device's positions in the rings."""

    max_size: int
    size: int
    ready: bool
    desc_addr: int
    driver_addr: int
    device_addr: int
    next_avail: int
    next_used: int
    signalled_used: int           # the used index when the driver was last considered for a signal
    event_idx: bool               # VIRTIO_F_EVENT_IDX negotiated
    indirect: bool                # VIRTIO_F_INDIRECT_DESC negotiated
    no_notify: bool               # the device set VIRTQ_USED_F_NO_NOTIFY in the used ring


class BlockCounters(VersionedState, frozen=True, tag="blk-counters"):
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    discards: int = 0
    write_zeroes: int = 0
    get_ids: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    io_errors: int = 0
    unsupported: int = 0
    unanswerable: int = 0
    throttled: int = 0


class BlockState(VersionedState, frozen=True, tag="virtio-blk"):
    """A drive: its identity (the new backing must be the same size and mode) and its counters."""

    drive_id: str
    path: str                     # informational: the restored drive may be another file
    size: int                     # bytes
    sectors: int                  # the capacity the guest sees
    read_only: bool
    counters: BlockCounters = BlockCounters()
    rate_limiter: RateLimiterState | None = None


class NetFrameState(VersionedState, frozen=True, tag="net-rx-frame"):
    """A received frame already in guest receive buffers, not yet given to the driver (rate limited, or waiting
    for more buffers): the chains by head, the bytes in each, and what still needs buffers."""

    heads: list[int]
    lengths: list[int]
    size: int
    rest: bytes = b""
    admitted: bool = False


class NetRxState(VersionedState, frozen=True, tag="net-rx-pair"):
    """Receive chains of one queue pair the device took from the ring and still holds."""

    spare: list[int] = []         # heads taken and not used yet, in order
    frame: NetFrameState | None = None
    expected: int = 0             # the size of frame the next read is prepared for


class NetState(VersionedState, frozen=True, tag="virtio-net"):
    mac: bytes                    # the guest keeps it, whatever the new TAP
    tap_name: str                 # informational: the TAP it was attached to
    offloads: int                 # TUNSETOFFLOAD flags applied to the TAP (the negotiated receive offloads)
    active_pairs: int
    link_up: bool
    rx: list[NetRxState] = []
    rx_rate_limiter: RateLimiterState | None = None
    tx_rate_limiter: RateLimiterState | None = None


class RngState(VersionedState, frozen=True, tag="virtio-rng"):
    requests: int = 0
    bytes: int = 0
    refused: int = 0
    throttled: int = 0
    rate_limiter: RateLimiterState | None = None


class VsockState(VersionedState, frozen=True, tag="virtio-vsock"):
    """The guest's CID; connections are not saved (the guest is told of a transport reset)."""

    guest_cid: int


VirtioDeviceState = BlockState | NetState | RngState | VsockState


class MmioTransportState(VersionedState, frozen=True, tag="virtio-mmio"):
    """A virtio-mmio device: the transport's registers, its queues and the device's own state."""

    device_type: int
    status: int
    device_features_sel: int
    driver_features_sel: int
    driver_features: int
    unknown_driver_features: bool
    queue_sel: int
    shm_sel: int
    interrupt_status: int
    config_generation: int
    queues: list[QueueState]
    device: VirtioDeviceState


# -- legacy devices ------------------------------------------------------------------------------------------
class SerialState(VersionedState, frozen=True, tag="serial"):
    """The guest-visible state of a 16550A UART."""

    ier: int
    lcr: int
    mcr: int
    fcr: int
    scr: int
    dll: int
    dlm: int
    lsr_errors: int
    msr_deltas: int
    thr_empty_pending: bool
    rx: bytes


class I8042State(VersionedState, frozen=True, tag="i8042"):
    output: list[tuple[int, bool]]      # (byte, from aux) waiting in the output buffer
    keyboard_buffer: bytes              # keys the keyboard has not sent yet
    translate_break: bool
    command_byte: int
    output_port: int
    pending_command: int | None
    last_write_command: bool
    keyboard_pending: int | None
    keyboard_scanning: bool
    scan_code_set: int
    resets: int = 0
    commands: int = 0
    unknown_commands: int = 0
    interrupts: int = 0


class DebugExitState(VersionedState, frozen=True, tag="debug-exit"):
    writes: int = 0
    last_status: int | None = None


class PostCodeState(VersionedState, frozen=True, tag="post-code"):
    writes: int = 0
    reads: int = 0
    last_code: int | None = None


# -- PCI, virtio-pci and the VT-d unit (kvmlet.devices.pci, kvmlet.devices.iommu) -----------------------------
class MsixState(VersionedState, frozen=True, tag="msix"):
    """An MSI-X capability's table and pending bits: (address low, address high, data, vector control) each."""

    enabled: bool
    function_mask: bool
    entries: list[tuple[int, int, int, int]]
    pending: int                  # the PBA, bit n for vector n


class PciFunctionState(VersionedState, frozen=True, tag="pci-function"):
    """A PCI function's configuration space (the header and capabilities; BARs as the guest programmed them)."""

    config: bytes
    msix: MsixState | None = None


class PciTransportState(VersionedState, frozen=True, tag="virtio-pci"):
    """A virtio-pci device: the common configuration, ISR, vectors, its PCI function, queues and device."""

    device_type: int
    status: int
    device_features_sel: int
    driver_features_sel: int
    driver_features: int
    unknown_driver_features: bool
    queue_sel: int
    config_generation: int
    isr: int
    config_vector: int
    queue_vectors: list[int]
    function: PciFunctionState
    queues: list[QueueState]
    device: VirtioDeviceState


class PciHostState(VersionedState, frozen=True, tag="pci-host"):
    """The PCI host bridge: the legacy configuration address register (0xCF8) and the bridge's own function."""

    config_address: int
    bridge: PciFunctionState


class VtdFaultRecordState(VersionedState, frozen=True, tag="vtd-fault"):
    iova: int
    source_id: int
    reason: int
    write: bool
    pending: bool


class VtdState(VersionedState, frozen=True, tag="vtd"):
    """The VT-d unit's registers; its caches are not saved (the restored unit reads the tables again)."""

    gsts: int
    rtaddr: int
    root: int                     # the root table pointer latched by GCMD.SRTP
    ccmd: int
    pfo: bool
    iqe: bool
    fri: int
    next_record: int
    records: list[VtdFaultRecordState]
    fectl_im: bool
    fectl_ip: bool
    fedata: int
    feaddr: int
    feuaddr: int
    iqh: int
    iqt: int
    iqa: int
    iwc: bool
    iectl_im: bool
    iectl_ip: bool
    iedata: int
    ieaddr: int
    ieuaddr: int
    iva: int
    iotlb: int


# -- the vTPM (kvmlet.devices.tpm_tis, kvmlet.tpm) -----------------------------------------------------------
class TpmState(VersionedState, frozen=True, tag="tpm-tis"):
    """The TIS front end's registers and FIFO, and the whole TPM: swtpm's state blobs (decrypted, as swtpm's
    control channel gives them) and kvmlet's own copy of the launch event log (quotes carry it)."""

    active_locality: int | None
    requests: list[int]
    seized: list[int]
    fifo: str                     # idle, ready, reception or completion (never a running command)
    buffer: bytes                 # the command received so far, or the response
    read_offset: int
    int_enable: int
    int_status: int
    int_vector: int
    permanent: bytes
    volatile: bytes
    savestate: bytes
    event_log: bytes


DeviceState = (SerialState | I8042State | DebugExitState | PostCodeState | MmioTransportState | PciTransportState
               | PciHostState | VtdState | TpmState)
DeviceStates = dict[str, DeviceState]

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(DeviceStates)


def encode_device_states(states: DeviceStates) -> bytes:
    """The device manager's state as msgpack."""
    return _ENCODER.encode(states)


def decode_device_states(data: bytes) -> DeviceStates:
    """The inverse of :func:`encode_device_states` (DeviceStateError if ``data`` is not such a state)."""
    try:
        return _DECODER.decode(data)
    except msgspec.DecodeError as exc:
        raise DeviceStateError(f"device states: {exc}") from None
