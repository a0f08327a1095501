"""`kvmlet net`: the vhost-user switch for VMs (docs/networking.md).

``kvmlet net switch --port vm0=/run/kvmlet/vm0.sock[,queues=2] [--port ...] [--uplink-tap NAME] [--mode io]``
runs DPDK's testpmd in the foreground with one vhost-user port per VM interface (each with its queue pairs) and an
optional TAP uplink, until Ctrl+C or SIGTERM; it is stopped and its sockets removed on every exit path. VMs attach
with ``kvmlet run --net vhost-user=SOCKET[,queues=N]``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from kvmlet.errors import ConfigError
from kvmlet.net.switch import FORWARD_MODES, SwitchError, TestpmdSwitch, VhostPort


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    net = sub.add_parser("net", help="the vhost-user software switch for VMs' interfaces (DPDK)",
                         description="Software switch for vhost-user interfaces (docs/networking.md).")
    actions = net.add_subparsers(dest="net_command", required=True)
    switch = actions.add_parser("switch", help="run a DPDK testpmd switch in the foreground (one polling core)")
    switch.add_argument("--port", action="append", default=[], required=True, metavar="NAME=SOCKET[,queues=N]",
                        help="a vhost-user port for one VM interface (repeatable)")
    switch.add_argument("--uplink-tap", metavar="NAME", help="a host TAP interface as the last port")
    switch.add_argument("--mode", choices=FORWARD_MODES, default="io",
                        help="io: port 0 <-> 1, 2 <-> 3, ...; rxonly: drop what arrives; macswap: send it back")
    switch.add_argument("--cores", default="0,1", help="DPDK lcores: main and forwarding (default 0,1)")


def parse_port(spec: str) -> VhostPort:
    name, sep, rest = spec.partition("=")
    socket_path, _, options = rest.partition(",")
    if not sep or not name or not socket_path:
        raise ConfigError(f"--port {spec!r}: use NAME=SOCKET[,queues=N]")
    queues = 1
    if options:
        key, _, value = options.partition("=")
        if key != "queues" or not value.isdigit() or not 1 <= int(value) <= 16:
            raise ConfigError(f"--port {spec!r}: the only option is queues=N (1 to 16)")
        queues = int(value)
    return VhostPort(name, socket_path, queues)


def main(args: argparse.Namespace) -> int:
    try:
        ports = [parse_port(spec) for spec in args.port]
        switch = TestpmdSwitch(ports, uplink_tap=args.uplink_tap, forward_mode=args.mode, cores=args.cores)
    except ConfigError as exc:
        print(f"kvmlet net: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        switch.start()
        for port in ports:
            print(f"port {port.name}: {port.socket} ({port.queues} queue pairs): "
                  f"kvmlet run --net vhost-user={port.socket},queues={port.queues}", flush=True)
        print(f"switch running (testpmd pid {switch.pid}, mode {args.mode}); Ctrl+C stops it", flush=True)
        while not stop.wait(0.5):
            if not switch.running():
                print(f"kvmlet net: testpmd exited: {switch.output()[-800:]}", file=sys.stderr)
                return 1
    except SwitchError as exc:
        print(f"kvmlet net: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        switch.stop()
        signal.signal(signal.SIGTERM, previous)
    return 0
