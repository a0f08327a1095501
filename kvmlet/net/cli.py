"""`kvmlet net`: the software switch for VMs' vhost-user interfaces (docs/networking.md).

``kvmlet net switch [--engine ovs|testpmd] [--name NAME] [--dir DIR] --port NAME=SOCKET[,queues=N][,mac=M][,vlan=V]
[,rate=MBIT][,trust=on|off] ... [--uplink internal[=IP/PREFIX]] [--uplink-tap NAME] [--poll auto|busy|sleep]``
runs the switch in the foreground until Ctrl+C or SIGTERM, and stops it (processes, sockets, DPDK runtime files) on
every exit path. The engine is Open vSwitch with DPDK (kvmlet/net/ovs.py) where ``ovs-vswitchd-dpdk`` is installed,
else DPDK's testpmd (kvmlet/net/switch.py), which forwards port to port and takes no per-port controls.

``kvmlet net port list|set|add|del [--name NAME | --dir DIR]`` works on a running Open vSwitch switch:
``set vm0 vlan=20 rate=100 mac=none trust=on`` changes a port's controls in place. VMs attach with
``kvmlet run --net vhost-user=SOCKET[,queues=N][,mac=M]``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from kvmlet.errors import ConfigError
from kvmlet.net.ports import VhostPort, parse_changes
from kvmlet.net.ports import parse_port as parse_port
from kvmlet.net.switch import FORWARD_MODES, SwitchError, TestpmdSwitch, check_huge_dir

ENGINES = ("ovs", "testpmd")
RESTART_MIN_UPTIME = 10.0    # ovs-vswitchd that dies sooner after its start is not restarted again


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    net = sub.add_parser("net", help="the vhost-user software switch for VMs' interfaces (Open vSwitch or testpmd)",
                         description="Software switch for vhost-user interfaces (docs/networking.md).")
    actions = net.add_subparsers(dest="net_command", required=True)
    switch = actions.add_parser("switch", help="run the switch in the foreground (one polling core)")
    switch.add_argument("--engine", choices=ENGINES,
                        help="ovs: Open vSwitch with DPDK (the default where ovs-vswitchd-dpdk is installed); "
                             "testpmd: DPDK's testpmd, port to port, no per-port controls")
    switch.add_argument("--port", action="append", default=[],
                        metavar="NAME=SOCKET[,queues=N][,mac=M][,vlan=V][,rate=MBIT][,trust=on|off]",
                        help="a vhost-user port for one VM interface (repeatable); mac: the only source MAC the VM "
                             "may send from (unless trust=on); vlan: access VLAN; rate: the VM's send rate in Mbit/s")
    _switch_location(switch)
    switch.add_argument("--uplink", metavar="internal[=IP/PREFIX]",
                        help="ovs: bring the bridge's internal port (host interface NAME) up, with this address")
    switch.add_argument("--uplink-tap", metavar="NAME",
                        help="a new host TAP interface as a port, removed when the switch stops")
    switch.add_argument("--huge-dir", metavar="DIR",
                        help="DPDK's memory from huge pages in this hugetlbfs mount (default: none, --no-huge)")
    switch.add_argument("--poll", choices=("auto", "busy", "sleep"), default="auto",
                        help="ovs: busy polls a whole CPU; sleep lets the poller sleep when idle (pmd-maxsleep); "
                             "auto: busy only with 4 or more CPUs")
    switch.add_argument("--mode", choices=FORWARD_MODES,
                        help="testpmd: io (port 0 <-> 1, 2 <-> 3, ...; default), rxonly (drop), macswap (send back)")
    switch.add_argument("--cores", default="0,1", help="testpmd: DPDK lcores, main and forwarding (default 0,1)")

    port = actions.add_parser("port", help="list or change the ports of a running Open vSwitch switch")
    port_actions = port.add_subparsers(dest="port_command", required=True)
    listing = port_actions.add_parser("list", help="ports, their controls, queue pairs and counters")
    _switch_location(listing)
    listing.add_argument("--json", action="store_true", help="as JSON")
    setting = port_actions.add_parser("set", help="change a port's controls: mac=M|none vlan=V|none rate=MBIT|none "
                                                  "trust=on|off")
    _switch_location(setting)
    setting.add_argument("port_name", metavar="PORT")
    setting.add_argument("changes", nargs="+", metavar="KEY=VALUE")
    adding = port_actions.add_parser("add", help="add a VM port to the running switch")
    _switch_location(adding)
    adding.add_argument("spec", metavar="NAME=SOCKET[,queues=N][,mac=M][,vlan=V][,rate=MBIT][,trust=on|off]")
    removing = port_actions.add_parser("del", help="remove a port from the running switch")
    _switch_location(removing)
    removing.add_argument("port_name", metavar="PORT")


def _switch_location(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="kvmlet0", help="ovs: the switch's name: its bridge and host interface "
                                                          "(default kvmlet0)")
    parser.add_argument("--dir", help="ovs: the switch's directory (default $XDG_RUNTIME_DIR/kvmlet/switch-NAME, "
                                      "else /run/kvmlet/switch-NAME)")


def default_engine() -> str:
    from kvmlet.net.ovs import ovs_problem

    return "ovs" if ovs_problem() is None else "testpmd"


def main(args: argparse.Namespace) -> int:
    try:
        if args.net_command == "port":
            return port_main(args)
        return switch_main(args)
    except (ConfigError, SwitchError) as exc:
        print(f"kvmlet net: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except OSError as exc:   # a directory or socket path that cannot be made, a missing command
        print(f"kvmlet net: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1


def switch_main(args: argparse.Namespace) -> int:
    ports = [parse_port(spec) for spec in args.port]
    engine = args.engine or default_engine()
    if engine == "testpmd":
        return run_testpmd(args, ports)
    return run_ovs(args, ports)


def _refuse(engine: str, args: argparse.Namespace, options: dict[str, str]) -> None:
    for option, why in options.items():
        if getattr(args, option.lstrip("-").replace("-", "_"), None) not in (None, False):
            raise ConfigError(f"{option} does not apply to the {engine} engine: {why}")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)   # and SIGINT, as KeyboardInterrupt


def _stop_on_signals(stop: threading.Event) -> dict[signal.Signals, Any]:
    """Make SIGTERM and SIGHUP (a closed terminal) set ``stop``, so the switch is stopped on those too."""
    return {sig: signal.signal(sig, lambda *_: stop.set()) for sig in STOP_SIGNALS}


def _restore_signals(previous: dict[signal.Signals, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def run_testpmd(args: argparse.Namespace, ports: list[VhostPort]) -> int:
    _refuse("testpmd", args, {"--uplink": "the internal port is Open vSwitch's; use --uplink-tap",
                              "--dir": "testpmd keeps no directory"})
    if args.poll == "sleep":
        raise ConfigError("--poll sleep needs the ovs engine: testpmd's forwarding core polls all the time")
    if not ports:
        raise ConfigError("give at least one --port NAME=SOCKET")
    mode = args.mode or "io"
    switch = TestpmdSwitch(ports, uplink_tap=args.uplink_tap, forward_mode=mode, cores=args.cores,
                           huge_dir=check_huge_dir(args.huge_dir))

    def started() -> None:
        switch.start()
        for port in ports:
            print(f"port {port.name}: {port.socket} ({port.queues} queue pairs): {port.hint()}", flush=True)
        print(f"switch running (testpmd pid {switch.pid}, mode {mode}); Ctrl+C stops it", flush=True)

    def check() -> int | None:
        if switch.running():
            return None
        print(f"kvmlet net: testpmd exited: {switch.output()[-800:]}", file=sys.stderr)
        return 1

    return _foreground(started, check, switch.stop)


def _foreground(start: Callable[[], None], check: Callable[[], int | None], stop_switch: Callable[[], None]) -> int:
    """Start the switch, then ``check`` it every half second until it returns an exit status or Ctrl+C, SIGTERM or
    SIGHUP arrives; the switch is stopped on every way out."""
    stop = threading.Event()
    previous = _stop_on_signals(stop)
    try:
        start()
        while not stop.wait(0.5):
            status = check()
            if status is not None:
                return status
    except KeyboardInterrupt:
        pass
    finally:
        stop_switch()
        _restore_signals(previous)
    return 0


def run_ovs(args: argparse.Namespace, ports: list[VhostPort]) -> int:
    from kvmlet.net.ovs import OvsSwitch

    _refuse("ovs", args, {"--mode": "Open vSwitch is a learning switch (NORMAL) with per-port controls"})
    internal, address = False, None
    if args.uplink is not None:
        kind, _, address = args.uplink.partition("=")
        if kind != "internal":
            raise ConfigError(f"--uplink {args.uplink}: use internal[=IP/PREFIX] (or --uplink-tap NAME)")
        internal, address = True, address or None
    huge_dir = check_huge_dir(args.huge_dir)
    switch = OvsSwitch(ports, name=args.name, directory=args.dir, uplink_internal=internal, uplink_address=address,
                       uplink_tap=args.uplink_tap, poll=args.poll,
                       eal_args=("--huge-dir", huge_dir) if huge_dir else ())

    def started() -> None:
        switch.start()
        for port in ports:
            print(f"port {port.name}: {port.socket} ({port.queues} queue pairs; {port.policy.describe()}): "
                  f"{port.hint()}", flush=True)
        if internal:
            print(f"uplink: host interface {switch.name}{' ' + address if address else ''}", flush=True)
        if args.uplink_tap:
            print(f"uplink: TAP {args.uplink_tap}", flush=True)
        polling = f"pmd-maxsleep={switch.max_sleep_us} us" if switch.max_sleep_us else "busy polling"
        print(f"switch running (ovs-vswitchd pid {switch.pids()[-1]}, ovsdb-server pid {switch.pids()[0]}, "
              f"dir {switch.path}, {polling}); Ctrl+C stops it", flush=True)

    def check() -> int | None:
        if switch.ovsdb is None or switch.ovsdb.poll() is not None:
            print(f"kvmlet net: ovsdb-server exited: {switch.log_tail('ovsdb-server')}", file=sys.stderr)
            return 1
        if switch.vswitchd is None or switch.vswitchd.poll() is not None:
            tail = switch.log_tail("ovs-vswitchd")
            if time.monotonic() - switch.vswitchd_started < RESTART_MIN_UPTIME:
                print(f"kvmlet net: ovs-vswitchd exited again soon after its start: {tail}", file=sys.stderr)
                return 1
            print(f"kvmlet net: ovs-vswitchd exited ({tail}); restarting it", file=sys.stderr, flush=True)
            switch.restart_vswitchd()
        return None

    return _foreground(started, check, switch.stop)


def port_main(args: argparse.Namespace) -> int:
    from kvmlet.net.ovs import OvsControl, default_directory

    control = OvsControl(args.dir or default_directory(args.name))
    if not (control.directory / "db.sock").is_socket():
        raise SwitchError(f"no running switch in {control.directory} (start one with kvmlet net switch"
                          f"{' --dir ' + args.dir if args.dir else ''})")
    if args.port_command == "set":
        status = control.port(args.port_name)
        policy = status.port.policy.changed(parse_changes(args.changes))
        control.set_policy(args.port_name, policy)
        print(f"port {args.port_name}: {policy.describe()}")
    elif args.port_command == "add":
        port = parse_port(args.spec)
        control.add_port(port)
        print(f"port {port.name}: {port.socket} ({port.policy.describe()}): {port.hint()}")
    elif args.port_command == "del":
        control.remove_port(args.port_name)
        print(f"port {args.port_name} removed")
    else:
        statuses = control.ports()
        if args.json:
            print(json.dumps([{"name": s.port.name, "socket": s.port.socket, "ofport": s.ofport,
                               "queues": s.port.queues, "connected": s.connected, "queue_pairs": s.queue_pairs,
                               "mac": s.port.policy.mac, "vlan": s.port.policy.vlan, "rate": s.port.policy.rate,
                               "trust": s.port.policy.trust, "rx_packets": s.rx_packets, "tx_packets": s.tx_packets,
                               "policed_drops": s.policed_drops} for s in statuses], indent=2))
        for s in [] if args.json else statuses:
            link = f"connected, {s.queue_pairs} queue pairs" if s.connected else "not connected"
            print(f"{s.port.name:12s} {s.port.socket}  {s.port.policy.describe()}  {link}  "
                  f"from VM {s.rx_packets} (policed {s.policed_drops}), to VM {s.tx_packets}")
    return 0
