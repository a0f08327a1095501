"""Switch ports for VMs' vhost-user interfaces and their per-port controls, the SR-IOV VF settings in software.

What ``ip link set PF vf N mac M vlan V max_tx_rate R trust on|off spoofchk on|off`` sets for a virtual function,
:class:`PortPolicy` sets for a switch port (the Open vSwitch engine, kvmlet/net/ovs.py, enforces it):

* ``mac``: the MAC address the VM may send from. Frames from the port with another source MAC, and ARP whose
  sender hardware address is another MAC, are dropped (OpenFlow flows, :func:`port_flows`): the VF's admin MAC
  with ``spoofchk on``.
* ``vlan``: the port is an access port on that VLAN: the VM's frames are tagged inside the switch, frames to it are
  untagged, and frames the VM tags itself are dropped (``vlan V`` on a VF).
* ``rate``: the VM's transmit rate in Mbit/s, policed where its frames enter the switch (``max_tx_rate``), with a
  burst of a tenth of a second's worth (at least 64 kbit).
* ``trust``: on = any source MAC (``trust on`` + ``spoofchk off``); off = the anti-spoofing flows when a MAC is set.

The VM's queue pairs (its VMDq pool) are the front end's: ``queues`` is the number the port expects and the
``kvmlet run --net vhost-user=...,queues=N`` hint prints.

Specs: ``NAME=SOCKET[,queues=N][,mac=M][,vlan=V][,rate=MBIT][,trust=on|off]`` (``--port``) and ``key=value`` changes
(``kvmlet net port set``), where ``none`` clears mac, vlan or rate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from kvmlet.errors import ConfigError

MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
MAX_QUEUES = 16
RESERVED_SUFFIXES = (".sock", ".ctl", ".mgmt", ".snoop", ".pid", ".log", ".db")
POLICY_KEYS = ("mac", "vlan", "rate", "trust")

# OpenFlow priorities of the per-port flows (the table's last flow, priority 0, is NORMAL)
PRIORITY_TAGGED_DROP = 400
PRIORITY_ARP_ALLOW = 300
PRIORITY_ARP_DROP = 290
PRIORITY_MAC_ALLOW = 200
PRIORITY_MAC_DROP = 100


@dataclass(frozen=True)
class PortPolicy:
    """The VF-like controls of one port (see the module docstring); the defaults control nothing."""

    mac: str | None = None          # lower case, aa:bb:cc:dd:ee:ff
    vlan: int | None = None         # 1..4094: an access port on that VLAN
    rate: int | None = None         # Mbit/s the VM may send
    trust: bool = False

    def __post_init__(self) -> None:
        if self.mac is not None and not MAC_RE.match(self.mac):
            raise ConfigError(f"mac {self.mac!r}: use six colon-separated hex bytes, e.g. 52:54:00:12:34:56")
        if self.mac is not None and int(self.mac[:2], 16) & 1:
            raise ConfigError(f"mac {self.mac}: a multicast address cannot be a VM's source address")
        if self.vlan is not None and not 1 <= self.vlan <= 4094:
            raise ConfigError(f"vlan {self.vlan}: a VLAN ID is 1 to 4094")
        if self.rate is not None and not 1 <= self.rate <= 1_000_000:
            raise ConfigError(f"rate {self.rate}: Mbit/s from 1 to 1000000")

    @property
    def controlled(self) -> bool:
        """Whether any control is set (the testpmd engine can enforce none)."""
        return self != PortPolicy()

    @property
    def anti_spoofing(self) -> bool:
        return self.mac is not None and not self.trust

    @property
    def burst_kbit(self) -> int:
        """The policer's burst: a tenth of a second at the rate, at least 64 kbit (several full frames)."""
        return max(64, (self.rate or 0) * 100)

    def changed(self, changes: Mapping[str, str]) -> PortPolicy:
        """This policy with ``key=value`` changes applied (``none`` clears mac, vlan or rate)."""
        values: dict[str, object] = {}
        for key, value in changes.items():
            values[key] = _policy_value(key, value)
        return replace(self, **values)  # type: ignore[arg-type]

    def describe(self) -> str:
        parts = [f"mac={self.mac or 'any'}", f"vlan={self.vlan or 'none'}",
                 f"rate={self.rate or 'unlimited'}{' Mbit/s' if self.rate else ''}",
                 f"trust={'on' if self.trust else 'off'}"]
        return " ".join(parts)


@dataclass(frozen=True)
class VhostPort:
    """A vhost-user port: the socket a VM's interface connects to, its queue pairs, and its controls."""

    name: str
    socket: str
    queues: int = 1
    policy: PortPolicy = field(default_factory=PortPolicy)

    def hint(self) -> str:
        """How a VM attaches to this port."""
        mac = f",mac={self.policy.mac}" if self.policy.mac else ""
        return f"kvmlet run --net vhost-user={self.socket},queues={self.queues}{mac}"


def _policy_value(key: str, value: str) -> object:
    value = value.strip()
    lowered = value.lower()
    if key == "mac":
        return None if lowered in ("", "none") else lowered
    if key in ("vlan", "rate"):
        if lowered in ("", "none", "0"):
            return None
        if not value.isdigit():
            raise ConfigError(f"{key}={value}: a whole number or none")
        return int(value)
    if key == "trust":
        if lowered not in ("on", "off"):
            raise ConfigError(f"trust={value}: on or off")
        return lowered == "on"
    raise ConfigError(f"{key}={value}: unknown port control; the controls are {', '.join(POLICY_KEYS)}")


def parse_changes(items: Iterable[str]) -> dict[str, str]:
    """``key=value`` items (``kvmlet net port set``) as a mapping, each key checked."""
    changes: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in POLICY_KEYS:
            raise ConfigError(f"{item!r}: use {'|'.join(POLICY_KEYS)}=VALUE (none clears mac, vlan or rate)")
        changes[key] = value
    PortPolicy().changed(changes)   # every value checked before anything is applied
    return changes


def check_port_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ConfigError(f"port name {name!r}: 1 to 32 letters, digits, '_', '.' or '-', starting with a letter "
                          "or digit")
    if name.endswith(RESERVED_SUFFIXES):
        raise ConfigError(f"port name {name!r}: names ending in {', '.join(RESERVED_SUFFIXES)} are the switch's own "
                          "files (its socket is named after the port)")
    return name


def parse_port(spec: str) -> VhostPort:
    """``NAME=SOCKET[,queues=N][,mac=M][,vlan=V][,rate=MBIT][,trust=on|off]``."""
    name, sep, rest = spec.partition("=")
    socket_path, _, options = rest.partition(",")
    if not sep or not name or not socket_path:
        raise ConfigError(f"--port {spec!r}: use NAME=SOCKET[,queues=N][,mac=M][,vlan=V][,rate=MBIT][,trust=on|off]")
    check_port_name(name)
    queues = 1
    changes: dict[str, str] = {}
    for option in filter(None, options.split(",")):
        key, _, value = option.partition("=")
        if key == "queues":
            if not value.isdigit() or not 1 <= int(value) <= MAX_QUEUES:
                raise ConfigError(f"--port {spec!r}: queues=N, 1 to {MAX_QUEUES}")
            queues = int(value)
        elif key in POLICY_KEYS:
            changes[key] = value
        else:
            raise ConfigError(f"--port {spec!r}: unknown option {key!r}; the options are queues, "
                              f"{', '.join(POLICY_KEYS)}")
    try:
        policy = PortPolicy().changed(changes)
    except ConfigError as exc:
        raise ConfigError(f"--port {spec!r}: {exc}") from None
    return VhostPort(name, socket_path, queues, policy)


def port_flows(ofport: int, policy: PortPolicy) -> list[str]:
    """The OpenFlow flows (``ovs-ofctl`` syntax) that enforce ``policy`` on frames entering from ``ofport``.

    Frames that pass go to ``NORMAL`` (learning switch with the ports' VLAN tags), as every other frame does.
    """
    flows: list[str] = []
    port = f"in_port={ofport}"
    if policy.vlan is not None:
        # an access port: a frame the VM tagged itself (any 802.1Q header, VID 0 too) never enters the switch
        flows.append(f"priority={PRIORITY_TAGGED_DROP},{port},vlan_tci=0x1000/0x1000,actions=drop")
    if policy.anti_spoofing:
        mac = policy.mac
        flows += [f"priority={PRIORITY_ARP_ALLOW},{port},arp,dl_src={mac},arp_sha={mac},actions=NORMAL",
                  f"priority={PRIORITY_ARP_DROP},{port},arp,actions=drop",
                  f"priority={PRIORITY_MAC_ALLOW},{port},dl_src={mac},actions=NORMAL",
                  f"priority={PRIORITY_MAC_DROP},{port},actions=drop"]
    return flows


def bridge_flows(ports: Iterable[tuple[int, PortPolicy]]) -> list[str]:
    """The whole flow table of a bridge: every port's flows, then NORMAL for everything else."""
    flows: list[str] = []
    for ofport, policy in ports:
        flows += port_flows(ofport, policy)
    flows.append("priority=0,actions=NORMAL")
    return flows
