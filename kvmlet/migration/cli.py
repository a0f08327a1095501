"""``kvmlet migrate``: send the VM of a ``kvmlet serve`` to another kvmlet (with a progress bar), cancel it,
ask how it goes, or receive one here and run it in the foreground (``listen``)."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

from kvmlet.errors import ConfigError, KvmletError

POLL_SECONDS = 0.1


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate = sub.add_parser("migrate", help="live-migrate a VM to another kvmlet, or receive one",
                             description="Live migration (docs/migration.md).")
    actions = migrate.add_subparsers(dest="migrate_command", required=True)
    send = actions.add_parser("send", help="migrate the VM of a running `kvmlet serve` (its API socket)")
    send.add_argument("--api-sock", type=Path, required=True, help="the VM's API socket")
    send.add_argument("--to", required=True, metavar="DEST",
                      help="the destination: HOST:PORT, tcp:HOST:PORT or unix:PATH")
    send.add_argument("--downtime-limit", type=int, metavar="MS",
                      help="switch over once the rest can be sent within this many ms (default 50)")
    send.add_argument("--max-rounds", type=int, help="switch over after this many passes at most (default 30)")
    send.add_argument("--max-bandwidth", type=int, metavar="MIB_S", help="cap the stream (MiB/s; default none)")
    send.add_argument("--no-auto-converge", action="store_true", help="never throttle the vCPUs")
    send.add_argument("--verify-memory", action="store_true",
                      help="hash all guest memory on both sides at the switchover (adds to the downtime)")
    send.add_argument("--timeout", type=int, metavar="S", help="a stream that moves nothing this long has failed "
                      "(default 10)")
    send.add_argument("--tls-ca", metavar="FILE", help="use TLS; the destination's certificate chains to these CAs")
    send.add_argument("--tls-cert", metavar="FILE", help="use TLS with this client certificate")
    send.add_argument("--tls-key", metavar="FILE", help="the client certificate's key")
    send.add_argument("--tls-server-name", metavar="NAME", help="the name the destination's certificate carries")
    send.add_argument("--tls", action="store_true", help="use TLS with the system's CAs")
    send.add_argument("--no-progress", action="store_true", help="no progress bar, only the report")
    listen = actions.add_parser("listen", help="receive a VM here and run it in the foreground, like `kvmlet run`")
    add_listen_arguments(listen, prefix="")
    listen.add_argument("address", metavar="ADDRESS", help="where to listen: HOST:PORT, tcp:HOST:PORT, unix:PATH")
    listen.add_argument("--console", help="serial console: stdio, file:PATH, socket:PATH or none (default stdio)")
    listen.add_argument("--run-timeout", type=float, metavar="S", help="stop the VM after this many seconds")
    cancel = actions.add_parser("cancel", help="cancel the outgoing migration of a `kvmlet serve`")
    cancel.add_argument("--api-sock", type=Path, required=True)
    status = actions.add_parser("status", help="print GET /migration of a `kvmlet serve`")
    status.add_argument("--api-sock", type=Path, required=True)


def add_listen_arguments(parser: argparse.ArgumentParser, prefix: str) -> None:
    """The receiving side's options (``kvmlet migrate listen``, and ``kvmlet serve`` with ``migrate-``)."""
    parser.add_argument(f"--{prefix}cpu-capture", type=Path, metavar="FILE",
                        help="check incoming VMs' CPUs against this capture (`kvmlet cpu capture`) instead of this "
                             "host's KVM")
    parser.add_argument(f"--{prefix}tls-cert", type=Path, metavar="FILE", help="serve the stream in TLS")
    parser.add_argument(f"--{prefix}tls-key", type=Path, metavar="FILE", help="the certificate's key")
    parser.add_argument(f"--{prefix}tls-ca", type=Path, metavar="FILE",
                        help="require client certificates from these CAs")
    parser.add_argument(f"--{prefix}timeout", type=float, metavar="S",
                        help="a source silent this long has failed (default 10)")


def listen_options(address: str, args: argparse.Namespace, prefix: str = "") -> Any:
    from kvmlet.migration.params import DEFAULT_TIMEOUT_S, ListenOptions, parse_address

    def get(name: str) -> Any:
        return getattr(args, f"{prefix}{name}")

    timeout = get("timeout")
    options = ListenOptions(parse_address(address, listening=True, what="listen address"),
                            cpu_capture=get("cpu_capture"), tls_cert=get("tls_cert"), tls_key=get("tls_key"),
                            tls_ca=get("tls_ca"), timeout_s=timeout if timeout is not None else DEFAULT_TIMEOUT_S)
    options.validate()
    return options


def main(args: argparse.Namespace) -> int:
    try:
        if args.migrate_command == "send":
            return send(args)
        if args.migrate_command == "cancel":
            _call(args.api_sock, "PATCH", "/migration", {"state": "Cancelled"})
            print("migration cancelled (the VM goes on here)")
            return 0
        if args.migrate_command == "status":
            import json

            print(json.dumps(_call(args.api_sock, "GET", "/migration"), indent=1))
            return 0
        return listen(args)
    except KvmletError as exc:
        print(f"kvmlet: {exc}", file=sys.stderr)
        return 1


def _call(api_sock: Path, method: str, path: str, body: dict[str, object] | None = None) -> dict[str, Any]:
    from kvmlet.snapshot.cli import _call as call

    return call(api_sock, method, path, body)


def send_body(args: argparse.Namespace) -> dict[str, object]:
    body: dict[str, object] = {"destination": args.to}
    for option, field in (("downtime_limit", "downtime_limit_ms"), ("max_rounds", "max_rounds"),
                          ("max_bandwidth", "max_bandwidth_mib_s"), ("timeout", "timeout_s")):
        value = getattr(args, option)
        if value is not None:
            body[field] = value
    if args.no_auto_converge:
        body["auto_converge"] = False
    if args.verify_memory:
        body["verify_memory"] = True
    tls = {field: value for field, value in (("ca_file", args.tls_ca), ("cert_file", args.tls_cert),
                                             ("key_file", args.tls_key), ("server_name", args.tls_server_name))
           if value is not None}
    if tls or args.tls:
        body["tls"] = {key: str(Path(value).resolve()) if key != "server_name" else value
                       for key, value in tls.items()}
    return body


def send(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    memory_mib = int(_call(args.api_sock, "GET", "/machine-config").get("mem_size_mib") or 0)
    _call(args.api_sock, "PUT", "/migration/send", send_body(args))
    try:
        if args.no_progress or not console.is_terminal:
            status = _follow_plain(args.api_sock, console, quiet=args.no_progress)
        else:
            status = _follow_bar(args.api_sock, console, memory_mib * 256)
    except KeyboardInterrupt:     # Ctrl-C cancels the migration (unless it is too late); the VM goes on here
        try:
            _call(args.api_sock, "PATCH", "/migration", {"state": "Cancelled"})
        except KvmletError as exc:
            print(f"kvmlet: {exc}", file=sys.stderr)
        status = _follow_plain(args.api_sock, console, quiet=True)
    return _final(status)


def _describe(status: dict[str, Any]) -> str:
    expected = status.get("expected_downtime_ms")
    return (f"round {status['round']}: {status['dirty_pages']:,} pages dirty ({status['dirty_rate_pages_s']:,.0f}/s), "
            f"{status['bandwidth_mib_s']:.0f} MiB/s, {status['remaining_bytes'] / (1 << 20):.1f} MiB left, expected "
            f"downtime {'-' if expected is None else f'{expected:.1f} ms'}, throttle {status['throttle_pct']} %")


def _follow_bar(api_sock: Path, console: Any, total_pages: int) -> dict[str, Any]:
    """A bar for the current round's pages (all memory in round 0, the dirty pages after), and a line per
    round above it (dirty rate, rate, what is left, expected downtime, throttle)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description:<10}"), BarColumn(bar_width=30), MofNCompleteColumn(),
               TextColumn("pages"), TimeElapsedColumn())
    shown_round, round_base = -1, 0
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("connecting", total=max(total_pages, 1))
        while True:
            status = _call(api_sock, "GET", "/migration")
            pages = status["pages_data"] + status["pages_zero"] + status["pages_unchanged"]
            if status["round"] != shown_round and status["phase"] in ("precopy", "switchover"):
                if status["round"] > 0 and status["phase"] == "precopy":
                    progress.console.print(_describe(status), highlight=False)
                shown_round, round_base = status["round"], pages if status["round"] > 0 else 0
            total = total_pages if shown_round <= 0 else max(status["dirty_pages"], 1)
            progress.update(task, description=status["phase"] or status["state"], total=total,
                            completed=min(pages - round_base, total))
            if status["state"] != "active":
                return status
            time.sleep(POLL_SECONDS)


def _follow_plain(api_sock: Path, console: Any, quiet: bool) -> dict[str, Any]:
    shown = None
    while True:
        status = _call(api_sock, "GET", "/migration")
        key = (status["phase"], status["round"])
        if not quiet and key != shown and status["state"] == "active":
            console.print(f"{status['phase']}, {_describe(status)}", highlight=False)
            shown = key
        if status["state"] != "active":
            return status
        time.sleep(POLL_SECONDS)


def _final(status: dict[str, Any]) -> int:
    report = status.get("report") or {}
    if status["state"] == "completed":
        print(f"migrated to {status['peer']}: {report['total_ms']:.1f} ms in all, {report['downtime_ms']:.1f} ms of "
              f"downtime, {report['bytes']} bytes ({report['pages_data']} pages of data, {report['pages_zero']} zero, "
              f"{report['pages_unchanged']} unchanged), {report['rounds']} rounds, throttle {report['throttle_pct']} %")
        return 0
    print(f"kvmlet: migration {status['state']}: {status.get('error')} (the VM goes on here)", file=sys.stderr)
    return 1


def listen(args: argparse.Namespace) -> int:
    """Receive one VM, then run it like `kvmlet run` (exit status: the guest's)."""
    from kvmlet.eventloop import EventLoopThread
    from kvmlet.machine import Machine, MachineError
    from kvmlet.migration.destination import Incoming
    from kvmlet.process import raise_open_file_limit
    from kvmlet.vcpu_kick import install_kick_handler

    install_kick_handler()
    raise_open_file_limit()
    options = listen_options(args.address, args)
    events = EventLoopThread()
    arrived: list[Machine] = []
    incoming = Incoming(options, events, on_machine=arrived.append, console_spec=args.console or "stdio",
                        once=True)
    try:
        incoming.start()
    except KvmletError:
        events.stop()
        raise
    print(f"kvmlet: waiting for a migration on {incoming.status().listen_address}", file=sys.stderr)
    signal.signal(signal.SIGTERM, lambda signum, frame: incoming.close())
    try:
        while not incoming.wait(0.2):
            pass
    except KeyboardInterrupt:
        incoming.close()
    if not arrived:
        incoming.close()
        events.stop()
        raise ConfigError(f"no VM arrived: {incoming.status().error or 'interrupted'}")
    machine = arrived[0]
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: machine.request_stop())
        try:
            status = machine.wait(args.run_timeout)
        except KeyboardInterrupt:
            machine.request_stop()
            status = machine.wait(10)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            machine.close(wait=False)
        except MachineError as exc:
            print(f"kvmlet: {exc}", file=sys.stderr)
        incoming.close()
        events.stop()
    if status.kind.value != "guest-exit":
        print(f"kvmlet: {status.message}", file=sys.stderr)
    return status.code
