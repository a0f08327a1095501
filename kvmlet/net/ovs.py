"""Open vSwitch with DPDK as kvmlet's managed switch: a private instance with VF-like ports (docs/networking.md).

An :class:`OvsSwitch` is one private Open vSwitch: its own directory (database, sockets, logs, pid files), its own
``ovsdb-server`` and the DPDK build of ``ovs-vswitchd`` (Debian ``openvswitch-switch-dpdk``) started directly as
child processes: never the system's service, never ``update-alternatives``. DPDK runs without huge pages
(``--no-huge --legacy-mem``: OVS adds ``--in-memory`` otherwise, which ``--no-huge`` refuses), with no PCI devices
and a file prefix of its own. One ``netdev`` (user-space) bridge, fail mode ``secure`` (no frame moves before
kvmlet's flows are in), holds:

* one ``dpdkvhostuser`` port per VM interface: Open vSwitch serves the socket (in the switch's directory, named
  after the port; the path the user gave is a symlink to it) and kvmlet's vhost-user front end connects as the
  client. That port type is deprecated upstream in favour of ``dpdkvhostuserclient`` (the VMM serves), but
  kvmlet's front end is a client only, as QEMU's ``-chardev socket`` without ``server=on`` is;
* an uplink to the host: the bridge's internal port (a host interface named after the bridge, optionally with an
  address), and/or a TAP (``type=tap``: Open vSwitch holds it, the host stack is its other side, it can join a
  Linux bridge).

Per-port controls (kvmlet/net/ports.py) live in the database, so they survive a restart of ``ovs-vswitchd``: the
VLAN tag on the Port (``vlan_mode=access``), the rate as ingress policing on the Interface, the MAC and trust in
the Interface's ``external_ids``, from which the OpenFlow table is rebuilt (``ovs-ofctl replace-flows``) whenever a
port changes or ``ovs-vswitchd`` starts. Port numbers are fixed with ``ofport_request``. :class:`OvsControl` does
all of that through the ``ovs-vsctl`` / ``ovs-ofctl`` / ``ovs-appctl`` commands against a switch directory, also
from another process (``kvmlet net port``).

Polling: a PMD thread on one CPU. ``pmd-maxsleep`` (OVS 3.1) lets it sleep up to that many microseconds when its
queues are idle; ``busy`` polls all the time (a whole CPU, idle or not). ``auto`` busy-polls only where a CPU is
spare (at least :data:`BUSY_POLL_MIN_CPUS`), otherwise sleeps: measured on 2-CPU hosts in docs/networking.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kvmlet.errors import ConfigError
from kvmlet.net.ports import PortPolicy, VhostPort, bridge_flows, check_port_name
from kvmlet.net.switch import SwitchError
from kvmlet.process import die_with_parent

VSWITCHD_DPDK = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk"
SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
TOOLS = ("ovsdb-tool", "ovsdb-server", "ovs-vsctl", "ovs-ofctl", "ovs-appctl")
START_TIMEOUT = 30.0
COMMAND_TIMEOUT = 10
POLL_MODES = ("auto", "busy", "sleep")
BUSY_POLL_MIN_CPUS = 4
MAX_SLEEP_US = 500          # pmd-maxsleep of the sleep policy (measured: docs/networking.md)
DEFAULT_NAME = "kvmlet0"
NETDEV_DATAPATH = "ovs-netdev"   # the user-space datapath's name and TAP: one per network namespace
EXT_MAC, EXT_TRUST, EXT_SOCKET, EXT_QUEUES = "kvmlet-mac", "kvmlet-trust", "kvmlet-socket", "kvmlet-queues"


def ovs_problem() -> str | None:
    """What is missing to run Open vSwitch with DPDK here, or None."""
    if not os.access(VSWITCHD_DPDK, os.X_OK):
        return f"{VSWITCHD_DPDK} is not installed (Debian package openvswitch-switch-dpdk)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing or not os.path.exists(SCHEMA):
        return f"{', '.join(missing) or SCHEMA} missing (Debian packages openvswitch-switch, openvswitch-common)"
    return None


def vswitchd_processes() -> list[str]:
    """Every ovs-vswitchd running here, as "pid N: command"."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmdline.read_bytes().split(b"\0")
            if b"ovs-vswitchd" in argv[0]:
                found.append(f"pid {cmdline.parent.name}: {b' '.join(argv[:2]).decode(errors='replace')}")
    return found


def datapath_in_use() -> str | None:
    """Which Open vSwitch holds this network namespace's user-space datapath, or None.

    Every ``netdev`` datapath is called ``ovs-netdev`` and has a TAP of that name: one ovs-vswitchd with a user-space
    datapath per network namespace; a second one cannot create its bridges ("failed to open datapath")."""
    if not Path(f"/sys/class/net/{NETDEV_DATAPATH}").exists():
        return None
    owners = vswitchd_processes()
    if owners:
        return "; ".join(owners)
    # no ovs-vswitchd: a TAP an unclean exit left behind (OVS makes its TAPs persistent)
    subprocess.run(["ip", "link", "del", NETDEV_DATAPATH], capture_output=True, check=False)
    return None


RESERVED_NAMES = ("all", "default", "lo", NETDEV_DATAPATH)   # sysctl keywords and interfaces that are not ours


def interface_name_ok(name: str) -> bool:
    return (0 < len(name) <= 15 and name.replace("-", "").replace("_", "").isalnum()
            and name not in RESERVED_NAMES)


def remove_stale_dpdk_runtime() -> None:
    """Remove the DPDK runtime directories of kvmlet switches whose process is gone (killed before its clean-up)."""
    for directory in Path("/var/run/dpdk").glob("kvmlet-ovs-*"):
        pid = directory.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(directory, ignore_errors=True)


def default_directory(name: str) -> str:
    """``$XDG_RUNTIME_DIR/kvmlet/switch-NAME``, or ``/run/kvmlet/switch-NAME``."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/run"
    return os.path.join(base, "kvmlet", f"switch-{name}")


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity: a container's cpuset, taskset), lowest first."""
    return sorted(os.sched_getaffinity(0))


def max_sleep_for(poll: str, cpus: int | None = None) -> int:
    """``pmd-maxsleep`` in microseconds for a polling policy (0 = busy polling)."""
    if poll not in POLL_MODES:
        raise ConfigError(f"--poll {poll}: choose one of {', '.join(POLL_MODES)}")
    if poll == "auto":
        poll = "busy" if (cpus or len(usable_cpus())) >= BUSY_POLL_MIN_CPUS else "sleep"
    return 0 if poll == "busy" else MAX_SLEEP_US


def log_tail(path: str | Path, lines: int = 3, start: int = 0) -> str:
    """The last errors of an OVS log from byte ``start`` on, on one line (its last lines if it has no error)."""
    try:
        with open(path, "rb") as log:
            log.seek(start)
            text = log.read().decode(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    errors = [line for line in text if "|ERR|" in line or "|EMER|" in line]
    warnings = [line for line in text if "|WARN|" in line]
    chosen = (errors or warnings or [line for line in text if line.strip()])[-lines:]
    return " / ".join(line.strip() for line in chosen) or "(empty log)"


@dataclass(frozen=True)
class PortStatus:
    """One VM port as the switch sees it."""

    port: VhostPort
    ofport: int
    connected: bool
    queue_pairs: int | None     # what the front end set up (vrings / 2), when connected
    # counters from the database: ovs-vswitchd refreshes them every 5 s (stats-update-interval)
    rx_packets: int = 0         # from the VM
    tx_packets: int = 0         # to the VM
    policed_drops: int = 0      # frames from the VM over its rate (ovs_rx_qos_drops)


def _ovs_map(value: Any) -> dict[str, str]:
    """An ``ovs-vsctl --format=json`` map column as a dict."""
    if isinstance(value, list) and len(value) == 2 and value[0] == "map":
        return {str(key): str(item) for key, item in value[1]}
    return {}


def _ovs_atom(value: Any) -> Any:
    """A scalar column; an empty set (``["set", []]``) is None."""
    if isinstance(value, list) and value and value[0] == "set":
        return value[1][0] if value[1] else None
    return value


class OvsControl:
    """The commands of one switch directory: its database, its bridge's flows, its daemons' control sockets."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.db = f"unix:{self.directory / 'db.sock'}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for variable in ("OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR"):
            env[variable] = str(self.directory)
        return env

    def run(self, *args: str, stdin: str | None = None, timeout: float = COMMAND_TIMEOUT) -> str:
        try:
            done = subprocess.run(list(args), input=stdin, capture_output=True, text=True, timeout=timeout + 5,
                                  env=self.env())
        except subprocess.TimeoutExpired:
            raise SwitchError(f"{args[0]} {args[1] if len(args) > 1 else ''} took more than {timeout + 5:.0f} s; "
                              f"vswitchd log: {log_tail(self.directory / 'ovs-vswitchd.log')}") from None
        if done.returncode != 0:
            message = (done.stderr or done.stdout).strip().replace("\n", " / ")
            raise SwitchError(f"{' '.join(args[:3])}: {message}")
        return done.stdout

    def vsctl(self, *args: str, wait: bool = True, timeout: int = COMMAND_TIMEOUT) -> str:
        """``ovs-vsctl``; with ``wait``, until ovs-vswitchd has applied the change."""
        options = [f"--db={self.db}", f"--timeout={timeout}"] + ([] if wait else ["--no-wait"])
        return self.run("ovs-vsctl", *options, *args, timeout=timeout)

    def appctl(self, daemon: str, *args: str) -> str:
        return self.run("ovs-appctl", "-t", str(self.directory / f"{daemon}.ctl"), f"--timeout={COMMAND_TIMEOUT}",
                        *args)

    def bridge(self) -> str:
        bridges = self.vsctl("list-br", wait=False).split()
        if len(bridges) != 1:
            raise SwitchError(f"the switch in {self.directory} has {len(bridges)} bridges; kvmlet manages one")
        return bridges[0]

    def _table(self, table: str, columns: str) -> list[dict[str, Any]]:
        out = json.loads(self.vsctl("--format=json", f"--columns={columns}", "list", table, wait=False))
        names = out["headings"]
        return [dict(zip(names, row, strict=True)) for row in out["data"]]

    # -- ports ---------------------------------------------------------------------------------------------
    def port_records(self) -> list[tuple[VhostPort, int, dict[str, str], dict[str, int]]]:
        """Every VM port: (port, ofport, interface status, statistics)."""
        tags = {row["name"]: _ovs_atom(row["tag"]) for row in self._table("Port", "name,tag")}
        records = []
        for row in self._table("Interface", "name,type,ofport,ofport_request,external_ids,ingress_policing_rate,"
                                            "status,statistics"):
            if row["type"] != "dpdkvhostuser":
                continue
            ext = _ovs_map(row["external_ids"])
            rate_kbit = int(row["ingress_policing_rate"] or 0)
            policy = PortPolicy(mac=ext.get(EXT_MAC) or None, vlan=tags.get(row["name"]),
                                rate=rate_kbit // 1000 or None, trust=ext.get(EXT_TRUST) == "on")
            port = VhostPort(row["name"], ext.get(EXT_SOCKET, str(self.directory / row["name"])),
                             int(ext.get(EXT_QUEUES, "1")), policy)
            assigned = _ovs_atom(row["ofport"])   # what ovs-vswitchd gave the port (the request may have clashed)
            ofport = assigned if isinstance(assigned, int) and assigned > 0 else _ovs_atom(row["ofport_request"]) or -1
            stats = {key: int(value) for key, value in _ovs_map(row["statistics"]).items() if value.isdigit()}
            records.append((port, int(ofport), _ovs_map(row["status"]), stats))
        return sorted(records, key=lambda record: record[1])

    def ports(self) -> list[PortStatus]:
        result = []
        for port, ofport, status, stats in self.port_records():
            vrings = status.get("num_of_vrings")
            connected = status.get("status") == "connected"
            result.append(PortStatus(port, ofport, connected, int(vrings) // 2 if connected and vrings else None,
                                     rx_packets=stats.get("rx_packets", 0), tx_packets=stats.get("tx_packets", 0),
                                     policed_drops=stats.get("ovs_rx_qos_drops", 0)))
        return result

    def wait_connected(self, name: str, timeout: float = 10.0) -> PortStatus:
        """The port's status once a front end is connected (ovs-vswitchd updates it within about half a second)."""
        deadline = time.monotonic() + timeout
        while not (status := self.port(name)).connected and time.monotonic() < deadline:
            time.sleep(0.1)
        return status

    def port(self, name: str) -> PortStatus:
        for status in self.ports():
            if status.port.name == name:
                return status
        raise SwitchError(f"no port {name!r} on the switch in {self.directory}")

    def add_port_commands(self, bridge: str, port: VhostPort, ofport: int) -> list[str]:
        """``ovs-vsctl`` arguments that add a VM port with its controls."""
        check_port_name(port.name)
        args = ["--", "add-port", bridge, port.name, "--", "set", "Interface", port.name, "type=dpdkvhostuser",
                f"ofport_request={ofport}", f"external_ids:{EXT_SOCKET}=\"{port.socket}\"",
                f"external_ids:{EXT_QUEUES}={port.queues}"]
        return args + self.policy_commands(port.name, port.policy)

    @staticmethod
    def policy_commands(name: str, policy: PortPolicy) -> list[str]:
        args = ["--", "set", "Interface", name, f"ingress_policing_rate={(policy.rate or 0) * 1000}",
                f"ingress_policing_burst={policy.burst_kbit if policy.rate else 0}",
                f"external_ids:{EXT_TRUST}={'on' if policy.trust else 'off'}"]
        args += (["--", "set", "Interface", name, f"external_ids:{EXT_MAC}=\"{policy.mac}\""] if policy.mac else
                 ["--", "remove", "Interface", name, "external_ids", EXT_MAC])
        if policy.vlan is not None:
            args += ["--", "set", "Port", name, f"tag={policy.vlan}", "vlan_mode=access"]
        else:
            args += ["--", "clear", "Port", name, "tag", "vlan_mode"]
        return args

    def next_ofport(self) -> int:
        used = {ofport for _, ofport, _, _ in self.port_records()}
        return next(number for number in range(1, 65280) if number not in used)

    def add_port(self, port: VhostPort) -> None:
        """Add a VM port to a running switch, with its controls and flows; its socket is ready on return."""
        bridge = self.bridge()
        if any(record[0].name == port.name for record in self.port_records()):
            raise SwitchError(f"port {port.name} exists already; kvmlet net port set changes its controls")
        check_socket_path(port.socket)
        self.vsctl(*self.add_port_commands(bridge, port, self.next_ofport()))
        self.apply_flows(bridge)
        link_socket(self.directory / port.name, port.socket)

    def set_policy(self, name: str, policy: PortPolicy) -> None:
        """Change a port's controls on a running switch (database, then flows)."""
        self.port(name)
        self.vsctl(*self.policy_commands(name, policy))
        self.apply_flows()

    def remove_port(self, name: str) -> None:
        port = self.port(name).port
        self.vsctl("del-port", name)
        self.apply_flows()
        unlink_socket_link(port.socket, self.directory)

    def flows(self) -> list[str]:
        return bridge_flows((ofport, port.policy) for port, ofport, _, _ in self.port_records())

    def apply_flows(self, bridge: str | None = None) -> None:
        """Replace the bridge's flow table with the one its ports' controls call for."""
        bridge = bridge or self.bridge()
        self.run("ovs-ofctl", "replace-flows", f"unix:{self.directory / bridge}.mgmt", "-",
                 stdin="\n".join(self.flows()) + "\n")

    def dump_flows(self) -> str:
        return self.run("ovs-ofctl", "dump-flows", f"unix:{self.directory / self.bridge()}.mgmt")


def check_socket_path(socket_path: str) -> None:
    """SwitchError unless a port's socket path is free or a socket/symlink kvmlet may replace."""
    target = Path(socket_path)
    if target.exists() and not target.is_symlink() and not target.is_socket():
        raise SwitchError(f"{socket_path} exists and is not a socket: choose another path for the port's socket")


def link_socket(served: Path, socket_path: str) -> None:
    """Make the path the user gave for a port lead to the socket Open vSwitch serves (a symlink)."""
    target = Path(socket_path)
    if target.absolute() == served.absolute():
        return
    check_socket_path(socket_path)
    try:
        if target.is_symlink() or target.is_socket():
            target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(served.absolute())
    except OSError as exc:
        raise SwitchError(f"cannot link the port's socket at {socket_path}: {exc.strerror}") from None


def unlink_socket_link(socket_path: str, directory: Path) -> None:
    """Remove the user's path to a port's socket, if it is kvmlet's symlink into ``directory``."""
    target = Path(socket_path)
    with contextlib.suppress(OSError):
        if target.is_symlink() and Path(os.readlink(target)).parent == directory.absolute():
            target.unlink()


@dataclass
class OvsSwitch:
    """A private Open vSwitch with DPDK (see the module docstring); ``with`` stops it on every exit path."""

    ports: Sequence[VhostPort] = ()
    name: str = DEFAULT_NAME                 # the bridge, and the host interface of its internal port
    directory: str | Path | None = None      # default: default_directory(name)
    uplink_internal: bool = False            # bring the internal port up on the host ...
    uplink_address: str | None = None        # ... with this IP/PREFIX
    uplink_tap: str | None = None            # a TAP (existing or new) as a port
    poll: str = "auto"
    memory_mib: int = 512
    eal_args: Sequence[str] = ()             # more DPDK EAL arguments (e.g. --huge-dir instead of --no-huge)
    start_timeout: float = START_TIMEOUT
    prefix: str = field(default_factory=lambda: f"kvmlet-ovs-{os.getpid()}-{secrets.token_hex(3)}", init=False)
    ovsdb: subprocess.Popen[bytes] | None = field(default=None, init=False)
    vswitchd: subprocess.Popen[bytes] | None = field(default=None, init=False)
    vswitchd_started: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        for what, name in (("switch name", self.name), ("uplink TAP", self.uplink_tap)):
            if name is not None and not interface_name_ok(name):
                raise ConfigError(f"{what} {name!r}: a host interface name (1 to 15 letters, digits, - or _; not "
                                  f"{', '.join(RESERVED_NAMES)})")
        names = [port.name for port in self.ports]
        if len(set(names)) != len(names) or self.name in names or self.uplink_tap in names:
            raise ConfigError(f"port names must differ from each other, the switch ({self.name}) and the uplink")
        self.max_sleep_us = max_sleep_for(self.poll)
        self.path = Path(self.directory or default_directory(self.name)).absolute()
        self.control = OvsControl(self.path)
        self._logs: list[IO[bytes]] = []
        self._log_starts: dict[str, int] = {}
        self.started_pids: list[int] = []   # every daemon process this switch started (restarts too)

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> OvsSwitch:
        """Create the database, start both daemons, add the bridge and ports, install the flows; SwitchError (with
        the log's last errors) if anything fails, after everything started so far has been stopped."""
        if self.ovsdb is not None:
            return self
        problem = ovs_problem()
        if problem is not None:
            raise SwitchError(problem)
        owner = datapath_in_use()
        if owner is not None:
            raise SwitchError(f"another Open vSwitch with a user-space datapath runs in this network namespace "
                              f"({owner}): there can be one, as its datapath device {NETDEV_DATAPATH} is a host-wide "
                              "name; stop it, or add the ports to it")
        if Path(f"/sys/class/net/{self.name}").exists():
            raise SwitchError(f"an interface named {self.name} exists: the bridge's internal port needs that name (a "
                              f"switch killed uncleanly leaves its TAP: 'ip link del {self.name}'), or use --name")
        remove_stale_dpdk_runtime()
        if self.uplink_tap is not None and Path(f"/sys/class/net/{self.uplink_tap}").exists():
            raise SwitchError(f"--uplink-tap {self.uplink_tap}: that interface exists; Open vSwitch makes the uplink "
                              "TAP its own and removes it when the switch stops, so give a name that is not in use")
        try:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SwitchError(f"cannot create the switch's directory {self.path}: {exc.strerror}") from None
            self._remove_runtime_files()
            for stale in ("conf.db", ".conf.db.~lock~"):
                with contextlib.suppress(FileNotFoundError):
                    (self.path / stale).unlink()
            self.control.run("ovsdb-tool", "create", str(self.path / "conf.db"), SCHEMA)
            self.ovsdb = self._spawn("ovsdb-server", [
                "ovsdb-server", str(self.path / "conf.db"), f"--remote=punix:{self.path / 'db.sock'}"])
            self._wait("ovsdb-server", self.ovsdb, lambda: (self.path / "db.sock").is_socket())
            self.control.vsctl("init", wait=False)
            self.control.vsctl(*self._configuration(), wait=False)
            self._start_vswitchd()
            for port in self.ports:
                link_socket(self.path / port.name, port.socket)
        except BaseException:
            self.stop()
            raise
        return self

    def _configuration(self) -> list[str]:
        cpus = usable_cpus()
        memory = [] if any(arg.startswith("--huge-dir") for arg in self.eal_args) else ["--no-huge", "--legacy-mem"]
        extra = " ".join([*memory, "-m", str(self.memory_mib), "--no-pci", f"--file-prefix={self.prefix}",
                          *self.eal_args])
        args = ["set", "Open_vSwitch", ".", "other_config:dpdk-init=true", f"other_config:dpdk-extra=\"{extra}\"",
                f"other_config:dpdk-lcore-mask={1 << cpus[0]:#x}", f"other_config:pmd-cpu-mask={1 << cpus[-1]:#x}",
                f"other_config:pmd-maxsleep={self.max_sleep_us}", "other_config:per-port-memory=true",
                "--", "add-br", self.name, "--", "set", "Bridge", self.name, "datapath_type=netdev",
                "fail_mode=secure", "other_config:disable-in-band=true"]
        for number, port in enumerate(self.ports, start=1):
            args += self.control.add_port_commands(self.name, port, number)
        if self.uplink_tap is not None:
            args += ["--", "add-port", self.name, self.uplink_tap, "--", "set", "Interface", self.uplink_tap,
                     "type=tap", f"ofport_request={len(self.ports) + 1000}"]
        return args

    def _start_vswitchd(self) -> None:
        self.vswitchd = self._spawn("ovs-vswitchd", [VSWITCHD_DPDK, f"unix:{self.path / 'db.sock'}"])
        self.vswitchd_started = time.monotonic()
        sockets = [self.path / record[0].name for record in self.control.port_records()]
        self._wait("ovs-vswitchd", self.vswitchd, lambda: self._vswitchd_ready(sockets))
        self.control.apply_flows(self.name)
        self._configure_uplink()

    def _vswitchd_ready(self, sockets: list[Path]) -> bool:
        if not (self.path / f"{self.name}.mgmt").is_socket() or not all(sock.is_socket() for sock in sockets):
            return False
        state = self.control.vsctl("get", "Open_vSwitch", ".", "dpdk_initialized", "cur_cfg", "next_cfg",
                                   wait=False).split()
        return state[0] == "true" and state[1] == state[2]

    def _configure_uplink(self) -> None:
        _disable_ipv6(self.name)
        if self.uplink_tap is not None:
            _disable_ipv6(self.uplink_tap)
            self.control.run("ip", "link", "set", self.uplink_tap, "up")
        if self.uplink_internal or self.uplink_address:
            self.control.run("ip", "link", "set", self.name, "up")
            if self.uplink_address:
                self.control.run("ip", "addr", "replace", self.uplink_address, "dev", self.name)

    def log_tail(self, daemon: str) -> str:
        """The last errors ``daemon`` (ovsdb-server, ovs-vswitchd) logged since its last start, on one line."""
        return log_tail(self.path / f"{daemon}.log", start=self._log_starts.get(daemon, 0))

    def _spawn(self, daemon: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.path / f"{daemon}.log", "ab")  # noqa: SIM115 (closed in stop)
        self._log_starts[daemon] = log.tell()
        self._logs.append(log)
        argv = [*argv, f"--pidfile={self.path / daemon}.pid", f"--unixctl={self.path / daemon}.ctl",
                f"--log-file={self.path / daemon}.log", "--no-chdir", "-vconsole:off"]
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env=self.control.env(), start_new_session=True, preexec_fn=die_with_parent)
        self.started_pids.append(process.pid)
        return process

    def _wait(self, daemon: str, process: subprocess.Popen[bytes], ready: Any) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if process.poll() is not None:
                code = process.returncode
                how = f"died of {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
                raise SwitchError(f"{daemon} {how} while starting: {self.log_tail(daemon)}")
            with contextlib.suppress(SwitchError):
                if ready():
                    return
            if time.monotonic() > deadline:
                raise SwitchError(f"{daemon} was not ready after {self.start_timeout:.0f} s: {self.log_tail(daemon)}")
            time.sleep(0.05)

    def restart_vswitchd(self) -> None:
        """Stop ovs-vswitchd and start it again on the same database (ports, sockets, flows come back)."""
        self._stop_vswitchd()
        try:
            self._start_vswitchd()
        except BaseException:
            self.stop()
            raise

    def running(self) -> bool:
        return all(process is not None and process.poll() is None for process in (self.ovsdb, self.vswitchd))

    def pids(self) -> list[int]:
        """ovsdb-server's and ovs-vswitchd's process IDs (while they run)."""
        return [process.pid for process in (self.ovsdb, self.vswitchd) if process is not None]

    def _stop_vswitchd(self) -> None:
        process, self.vswitchd = self.vswitchd, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(SwitchError):
                self.control.run("ovs-appctl", "-t", str(self.path / "ovs-vswitchd.ctl"), "--timeout=5", "exit",
                                 "--cleanup", timeout=5)
            _end(process, asked=True)
        elif process is not None:
            process.wait()
        self._remove_dpdk_runtime()
        self._remove_leftover_taps()
        # what a killed ovs-vswitchd leaves (control, bridge and vhost-user sockets, pid file) would look ready
        self._remove_runtime_files(keep={"db.sock", "ovsdb-server.ctl", "ovsdb-server.pid"})

    def stop(self) -> None:
        """End both daemons (``ovs-appctl exit``, SIGTERM, SIGKILL) and remove every socket, pid file, symlink and
        the DPDK runtime directory; idempotent, safe on every exit path. The database and logs stay."""
        sockets = {port.socket for port in self.ports}
        if self.ovsdb is not None and self.ovsdb.poll() is None:
            with contextlib.suppress(SwitchError, ValueError, KeyError):   # ports added by kvmlet net port add
                sockets.update(record[0].socket for record in self.control.port_records())
        try:
            self._stop_vswitchd()
        finally:
            ovsdb, self.ovsdb = self.ovsdb, None
            if ovsdb is not None:
                _end(ovsdb)
            for socket_path in sockets:
                unlink_socket_link(socket_path, self.path)
            self._remove_runtime_files()
            self._remove_dpdk_runtime()
            for log in self._logs:
                log.close()
            self._logs.clear()

    def _remove_leftover_taps(self) -> None:
        """The TAPs Open vSwitch made persistent (the datapath's, the bridge's, the uplink): a clean exit removes
        them, a killed or crashed ovs-vswitchd does not, and the next switch could not start."""
        ours = [self.name, *([self.uplink_tap] if self.uplink_tap else [])]
        for ifname in ours + ([NETDEV_DATAPATH] if not vswitchd_processes() else []):
            if Path(f"/sys/class/net/{ifname}").exists():
                subprocess.run(["ip", "link", "del", ifname], capture_output=True, check=False)

    def _remove_runtime_files(self, keep: set[str] | None = None) -> None:
        if not self.path.is_dir():
            return
        for entry in self.path.iterdir():
            if (entry.is_socket() or entry.suffix == ".pid") and entry.name not in (keep or set()):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()

    def dpdk_runtime_dirs(self) -> list[Path]:
        dirs = [Path("/var/run/dpdk") / self.prefix]
        if os.geteuid() != 0 and os.environ.get("XDG_RUNTIME_DIR"):
            dirs.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "dpdk" / self.prefix)
        return dirs

    def _remove_dpdk_runtime(self) -> None:
        for directory in self.dpdk_runtime_dirs():
            shutil.rmtree(directory, ignore_errors=True)

    def __enter__(self) -> OvsSwitch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- ports on the running switch ------------------------------------------------------------------------
    def add_port(self, port: VhostPort) -> None:
        self.control.add_port(port)
        self.ports = [*self.ports, port]

    def set_port(self, name: str, **changes: str) -> PortPolicy:
        """Change a port's controls (``mac="aa:..."``, ``vlan="20"``, ``rate="none"``, ``trust="on"``)."""
        policy = self.control.port(name).port.policy.changed(changes)
        self.control.set_policy(name, policy)
        return policy

    def remove_port(self, name: str) -> None:
        self.control.remove_port(name)
        self.ports = [port for port in self.ports if port.name != name]

    def port_status(self) -> list[PortStatus]:
        return self.control.ports()

    def cpu_seconds(self) -> float:
        """CPU time ovs-vswitchd has used (user + system), from /proc."""
        if self.vswitchd is None:
            return 0.0
        fields = Path(f"/proc/{self.vswitchd.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _end(process: subprocess.Popen[bytes], *, asked: bool = False, timeout: float = 5.0) -> None:
    """End a daemon: wait if it was ``asked`` to exit, else SIGTERM; SIGKILL if it does not exit in time."""
    for sig in ((None,) if asked else ()) + (signal.SIGTERM, signal.SIGKILL):
        if sig is not None and process.poll() is None:
            process.send_signal(sig)
        try:
            process.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def _disable_ipv6(ifname: str) -> None:
    """Keep the host from sending router solicitations and MLD reports through the switch's host interfaces."""
    if not Path(f"/sys/class/net/{ifname}").exists():
        return
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6").write_text("1")
