"""Configuration of network interfaces and the vsock device, and their command-line syntax.

``--net tap=NAME|auto[,mac=02:..][,queues=N][,offload=on|off][,mtu=N][,address=IP/LEN][,bridge=BR]
[,rx-bps=SIZE][,rx-bps-burst=SIZE][,rx-pps=N][,rx-pps-burst=N][,tx-...][,refill-ms=MS]`` (repeatable; a bare
first item is the TAP: ``--net auto``). ``tap=auto`` creates a new TAP ``kvmlet<N>`` that goes away with the
VM; a name attaches to that TAP (creating it if missing). ``mtu``, ``address`` and ``bridge`` configure the
host side of the TAP. Without ``mac`` the interface gets a locally administered address derived from the
VM (host name, process, TAP name) and the interface's position.

``--vsock cid=N,uds=PATH``: the guest's context ID (3 or more) and the Unix socket the host connects to
(``CONNECT <port>\\n``); guest connections to host port P go to ``PATH_P``.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from kvmlet.config import ConfigError
from kvmlet.devices.virtio.options import _amount, _boolean, _key_values, bucket_pair
from kvmlet.devices.virtio.ratelimit import RateLimiterConfig, RateLimitError
from kvmlet.net.tap import AUTO_NAME, MAX_QUEUES, TapError, TapSettings, valid_ifname

_RATE_KEYS = tuple(f"{side}-{kind}" for side in ("rx", "tx") for kind in ("bps", "bps-burst", "pps", "pps-burst"))
NET_KEYS = ("tap", "mac", "queues", "offload", "mtu", "address", "bridge", *_RATE_KEYS, "refill-ms")
VSOCK_KEYS = ("cid", "uds")
MAX_CID = 0xFFFFFFFE            # 0xFFFFFFFF is VMADDR_CID_ANY
UNIX_PATH_MAX = 107             # sun_path without its NUL
_MAC = re.compile(r"^([0-9a-f]{2})(:[0-9a-f]{2}){5}$", re.IGNORECASE)


def parse_mac(text: str) -> bytes:
    if not _MAC.match(text):
        raise ConfigError(f"mac {text!r} is not like 02:00:00:12:34:56")
    mac = bytes.fromhex(text.replace(":", ""))
    if mac[0] & 1:
        raise ConfigError(f"mac {text} is a multicast address (the lowest bit of the first byte is set)")
    if mac == bytes(6):
        raise ConfigError("mac 00:00:00:00:00:00 is not a usable address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def default_mac(vm_seed: str, index: int) -> bytes:
    """A locally administered unicast MAC derived from the VM and the interface's position."""
    digest = bytearray(hashlib.sha256(f"kvmlet/{vm_seed}/net{index}".encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFC) | 0x02
    return bytes(digest)


def vm_seed() -> str:
    """What identifies this VM for derived values: the host and the VMM process (callers add the TAP's
    name, unique on the host while the VM runs)."""
    return f"{socket.gethostname()}/{os.getpid()}"


@dataclass
class NetConfig:
    """One virtio-net interface on a TAP."""

    tap: str = AUTO_NAME
    mac: str | None = None
    queues: int = 1
    offload: bool = True
    mtu: int | None = None
    address: str | None = None
    bridge: str | None = None
    rx_rate_limit: RateLimiterConfig = field(default_factory=RateLimiterConfig)
    tx_rate_limit: RateLimiterConfig = field(default_factory=RateLimiterConfig)

    @property
    def settings(self) -> TapSettings:
        return TapSettings(mtu=self.mtu, address=self.address, bridge=self.bridge)

    def mac_bytes(self, index: int, seed: str | None = None) -> bytes:
        return parse_mac(self.mac) if self.mac else default_mac(seed or vm_seed(), index)

    def validate(self, label: str) -> None:
        if self.tap != AUTO_NAME and not valid_ifname(self.tap):
            raise ConfigError(f"{label}: tap {self.tap!r} is not an interface name (1-15 characters, no "
                              "'/', ':' or spaces) or auto")
        if self.mac is not None:
            try:
                parse_mac(self.mac)
            except ConfigError as exc:
                raise ConfigError(f"{label}: {exc}") from None
        if not 1 <= self.queues <= MAX_QUEUES:
            raise ConfigError(f"{label}: queues={self.queues}: choose 1 to {MAX_QUEUES} queue pairs")
        try:
            self.settings.validate(label)
        except TapError as exc:
            raise ConfigError(str(exc)) from None
        try:
            self.rx_rate_limit.validate(f"{label} rx")
            self.tx_rate_limit.validate(f"{label} tx")
        except RateLimitError as exc:
            raise ConfigError(str(exc)) from None


@dataclass
class VsockConfig:
    """The virtio-vsock device: the guest's CID and the host's Unix socket."""

    cid: int
    uds: Path

    def validate(self, label: str = "--vsock") -> None:
        if not 3 <= self.cid <= MAX_CID:
            raise ConfigError(f"{label}: cid={self.cid}: the guest's CID must be 3 to {MAX_CID} (0-2 are reserved)")
        if len(os.fsencode(self.uds)) + len("_4294967295") > UNIX_PATH_MAX:
            raise ConfigError(f"{label}: uds={self.uds} is too long for a Unix socket path with a port suffix "
                              f"(at most {UNIX_PATH_MAX - 11} bytes)")
        parent = self.uds.parent
        if not parent.is_dir():
            raise ConfigError(f"{label}: uds={self.uds}: directory {parent} does not exist")
        if self.uds.exists() and not self.uds.is_socket():
            raise ConfigError(f"{label}: uds={self.uds} exists and is not a socket")


def validate_network(nets: list[NetConfig], vsock: VsockConfig | None) -> None:
    """Check each interface and the vsock device; TAP names and MACs must not repeat."""
    taps: set[str] = set()
    macs: set[bytes] = set()
    for index, net in enumerate(nets):
        label = f"--net #{index + 1} (tap={net.tap})"
        net.validate(label)
        if net.tap != AUTO_NAME:
            if net.tap in taps:
                raise ConfigError(f"{label}: TAP {net.tap} is used by another --net")
            taps.add(net.tap)
        if net.mac is not None:
            mac = parse_mac(net.mac)
            if mac in macs:
                raise ConfigError(f"{label}: mac {net.mac} is used by another --net")
            macs.add(mac)
    if vsock is not None:
        vsock.validate()


def _int(option: str, key: str, text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise ConfigError(f"{option}: {key}={text!r} is not a number") from None


def _limits(option: str, side: str, values: dict[str, str], refill: int) -> RateLimiterConfig:
    return bucket_pair(option, values, (f"{side}-bps", f"{side}-pps"), refill)


def parse_net(spec: str) -> NetConfig:
    """``tap=auto,queues=2,...`` -> NetConfig (ConfigError with a one-line reason)."""
    option = f"--net {spec!r}"
    values = _key_values(option, spec, NET_KEYS, "tap")
    refill = _amount(option, "refill-ms", values["refill-ms"]) if "refill-ms" in values else 1000
    if refill <= 0:
        raise ConfigError(f"{option}: refill-ms must be positive")
    net = NetConfig(
        tap=values.get("tap") or AUTO_NAME,
        mac=values.get("mac") or None,
        queues=_int(option, "queues", values["queues"]) if "queues" in values else 1,
        offload=_boolean(option, "offload", values["offload"]) if "offload" in values else True,
        mtu=_int(option, "mtu", values["mtu"]) if "mtu" in values else None,
        address=values.get("address") or None,
        bridge=values.get("bridge") or None,
        rx_rate_limit=_limits(option, "rx", values, refill),
        tx_rate_limit=_limits(option, "tx", values, refill))
    net.validate(option)
    return net


def parse_vsock(spec: str) -> VsockConfig:
    """``cid=3,uds=/run/vm.vsock`` -> VsockConfig."""
    option = f"--vsock {spec!r}"
    values = _key_values(option, spec, VSOCK_KEYS, None)
    if "cid" not in values or not values.get("uds"):
        raise ConfigError(f"{option}: both cid=N and uds=PATH are required")
    config = VsockConfig(cid=_int(option, "cid", values["cid"]), uds=Path(values["uds"]))
    if not 3 <= config.cid <= MAX_CID:
        raise ConfigError(f"{option}: cid={config.cid}: the guest's CID must be 3 to {MAX_CID} "
                          "(0-2 are reserved)")
    return config
