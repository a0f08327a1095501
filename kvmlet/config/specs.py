"""The command line's device specs, parsed into the same models the config file and the API use.

``--drive path=disk.img[,readonly=on][,direct=on][,id=NAME][,root=on][,bps=SIZE][,bps-burst=SIZE][,iops=N]
[,iops-burst=N][,refill-ms=MS]`` (a bare first item is the path), ``--rng [bps=SIZE][,bps-burst=SIZE]
[,refill-ms=MS]``, ``--net tap=NAME|auto[,id=NAME][,mac=02:..][,queues=N][,offload=on|off][,mtu=N]
[,address=IP/LEN][,bridge=BR][,rx-bps=SIZE][,rx-pps=N][,tx-...][,...-burst=N][,refill-ms=MS][,vhost=on|off]``
(a bare first item is the TAP; ``vhost=on``: the kernel's vhost-net moves the TAP's frames, docs/vhost-net.md),
``--net vhost-user=SOCKET[,queues=N][,id=NAME][,mac=..][,mtu=N][,offload=on|off]`` (the data path
in a vhost-user back end, docs/networking.md) and ``--vsock cid=N,uds=PATH``. Every device takes
``transport=mmio|pci`` (kvmlet: virtio-mmio, the
default, or virtio-pci with MSI-X; behind the VT-d unit with ``--iommu vtd``). Rates are token buckets refilled
every ``refill-ms`` milliseconds (default 1000, so per second); sizes take K, M, G suffixes and are bytes without
one.
"""

from __future__ import annotations

from typing import Literal

from kvmlet.config.models import (
    AUTO_TAP,
    MAX_QUEUE_PAIRS,
    MAX_TAP_MTU,
    Drive,
    Entropy,
    NetworkInterface,
    RateLimiterConfig,
    TokenBucketConfig,
    Vsock,
)
from kvmlet.config.size import parse_size
from kvmlet.errors import ConfigError

_BOOLEANS = {"on": True, "yes": True, "true": True, "1": True,
             "off": False, "no": False, "false": False, "0": False}
_RATE_KEYS = ("bps", "bps-burst", "iops", "iops-burst", "refill-ms")
DRIVE_KEYS = ("path", "readonly", "direct", "id", "root", *_RATE_KEYS, "transport")
RNG_KEYS = ("bps", "bps-burst", "refill-ms", "transport")
_NET_RATE_KEYS = tuple(f"{side}-{kind}" for side in ("rx", "tx") for kind in ("bps", "bps-burst", "pps", "pps-burst"))
NET_KEYS = ("tap", "id", "mac", "queues", "offload", "mtu", "address", "bridge", *_NET_RATE_KEYS, "refill-ms",
            "transport", "vhost-user", "vhost")
VSOCK_KEYS = ("cid", "uds", "transport")
TRANSPORTS = ("mmio", "pci")


def _amount(option: str, key: str, text: str) -> int:
    return parse_size(text, what=f"{option}: {key}=")


def _boolean(option: str, key: str, text: str) -> bool:
    try:
        return _BOOLEANS[text.lower()]
    except KeyError:
        raise ConfigError(f"{option}: {key}={text!r}: use on or off") from None


def _transport(option: str, values: dict[str, str]) -> Literal["mmio", "pci"]:
    text = values.get("transport", "mmio").lower()
    if text == "pci":
        return "pci"
    if text == "mmio":
        return "mmio"
    raise ConfigError(f"{option}: transport={text!r}: use mmio or pci")


def _int(option: str, key: str, text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise ConfigError(f"{option}: {key}={text!r} is not a number") from None


def key_values(option: str, spec: str, known: tuple[str, ...], bare_key: str | None) -> dict[str, str]:
    """``a=1,b=2`` -> {"a": "1", "b": "2"}; unknown and repeated keys are refused."""
    values: dict[str, str] = {}
    for position, item in enumerate(part for part in spec.split(",") if part.strip()):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep:
            if position == 0 and bare_key is not None:
                key, value = bare_key, item
            else:
                raise ConfigError(f"{option}: {item!r} is not key=value (known keys: {', '.join(known)})")
        if key not in known:
            raise ConfigError(f"{option}: unknown key {key!r} (known keys: {', '.join(known)})")
        if key in values:
            raise ConfigError(f"{option}: {key} is given twice")
        values[key] = value.strip()
    return values


def bucket_pair(option: str, values: dict[str, str], keys: tuple[str, str]) -> RateLimiterConfig | None:
    """A bandwidth and an operations bucket from ``<key>``/``<key>-burst`` and ``refill-ms``."""
    refill = _amount(option, "refill-ms", values["refill-ms"]) if "refill-ms" in values else 1000
    if refill <= 0:
        raise ConfigError(f"{option}: refill-ms must be positive")
    buckets: list[TokenBucketConfig | None] = []
    for key in keys:
        burst = _amount(option, f"{key}-burst", values[f"{key}-burst"]) if f"{key}-burst" in values else 0
        if key in values:
            size = _amount(option, key, values[key])
            if size <= 0:
                raise ConfigError(f"{option}: {key} must be positive")
            buckets.append(TokenBucketConfig(size=size, refill_time=refill, one_time_burst=burst))
        elif burst:
            raise ConfigError(f"{option}: {key}-burst needs {key}")
        else:
            buckets.append(None)
    if buckets[0] is None and buckets[1] is None:
        return None
    return RateLimiterConfig(bandwidth=buckets[0], ops=buckets[1])


def parse_drive(spec: str, number: int) -> Drive:
    """``path=FILE,readonly=on,...`` -> Drive; ``number`` names it ``drive<number>`` unless id= is given."""
    option = f"--drive {spec!r}"
    values = key_values(option, spec, DRIVE_KEYS, "path")
    if not values.get("path"):
        raise ConfigError(f"{option}: path=FILE is required")
    return Drive(
        drive_id=values.get("id") or f"drive{number}",
        path_on_host=values["path"],
        is_read_only=_boolean(option, "readonly", values["readonly"]) if "readonly" in values else False,
        is_root_device=_boolean(option, "root", values["root"]) if "root" in values else False,
        direct=_boolean(option, "direct", values["direct"]) if "direct" in values else False,
        rate_limiter=bucket_pair(option, values, ("bps", "iops")), transport=_transport(option, values))


def parse_rng(spec: str) -> Entropy:
    """``""`` or ``bps=1M,...`` -> Entropy."""
    option = f"--rng {spec!r}" if spec else "--rng"
    values = key_values(option, spec, RNG_KEYS, None)
    return Entropy(rate_limiter=bucket_pair(option, values, ("bps", "iops")), transport=_transport(option, values))


def parse_net(spec: str, number: int) -> NetworkInterface:
    """``tap=auto,queues=2,...`` -> NetworkInterface named ``net<number>`` unless id= is given."""
    option = f"--net {spec!r}"
    values = key_values(option, spec, NET_KEYS, "tap")
    net = NetworkInterface(
        iface_id=values.get("id") or f"net{number}",
        host_dev_name=values.get("tap") or AUTO_TAP,
        guest_mac=values.get("mac") or None,
        queues=_int(option, "queues", values["queues"]) if "queues" in values else 1,
        offload=_boolean(option, "offload", values["offload"]) if "offload" in values else True,
        mtu=_int(option, "mtu", values["mtu"]) if "mtu" in values else None,
        address=values.get("address") or None,
        bridge=values.get("bridge") or None,
        rx_rate_limiter=bucket_pair(option, values, ("rx-bps", "rx-pps")),
        tx_rate_limiter=bucket_pair(option, values, ("tx-bps", "tx-pps")), transport=_transport(option, values),
        vhost_user_socket=values.get("vhost-user") or None,
        vhost_net=_boolean(option, "vhost", values["vhost"]) if "vhost" in values else False)
    if "vhost-user" in values and "tap" in values:
        raise ConfigError(f"{option}: give tap= or vhost-user=, not both")
    if "vhost-user" in values and net.vhost_net:
        raise ConfigError(f"{option}: vhost=on is the kernel's data path for a TAP; a vhost-user interface has its "
                          "own back end (give tap=NAME,vhost=on or vhost-user=SOCKET)")
    if net.vhost_user_socket is not None or net.vhost_net:
        net.validate()   # what a vhost interface cannot take (vhost-user: address, bridge; rates, transport pci)
    if not 1 <= net.queues <= MAX_QUEUE_PAIRS:
        raise ConfigError(f"{option}: queues={net.queues}: choose 1 to {MAX_QUEUE_PAIRS} queue pairs")
    if net.mtu is not None and not 68 <= net.mtu <= MAX_TAP_MTU:
        raise ConfigError(f"{option}: mtu={net.mtu}: choose 68 to {MAX_TAP_MTU}")
    return net


def parse_vsock(spec: str) -> Vsock:
    """``cid=3,uds=/run/vm.vsock`` -> Vsock."""
    option = f"--vsock {spec!r}"
    values = key_values(option, spec, VSOCK_KEYS, None)
    if "cid" not in values or not values.get("uds"):
        raise ConfigError(f"{option}: both cid=N and uds=PATH are required")
    cid = _int(option, "cid", values["cid"])
    if not 3 <= cid <= 0xFFFFFFFE:
        raise ConfigError(f"{option}: cid={cid}: the guest's CID must be 3 to {0xFFFFFFFE} (0-2 are reserved)")
    return Vsock(guest_cid=cid, uds_path=values["uds"], transport=_transport(option, values))
