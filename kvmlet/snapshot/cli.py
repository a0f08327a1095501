"""``kvmlet snapshot``: create (through a running VM's API), load (run a snapshot in the foreground),
describe and merge snapshot files."""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
from pathlib import Path

from kvmlet.errors import ConfigError, KvmletError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    snapshot = sub.add_parser("snapshot", help="save a VM to files, restore it, describe or merge snapshots",
                              description="Snapshots (docs/snapshots.md).")
    actions = snapshot.add_subparsers(dest="snapshot_command", required=True)
    create = actions.add_parser("create", help="snapshot the VM of a running `kvmlet serve` (pause, save, resume)")
    create.add_argument("--api-sock", type=Path, required=True, help="the VM's API socket")
    create.add_argument("--snapshot-path", type=Path, required=True, help="the state file to write")
    create.add_argument("--mem-file-path", type=Path, required=True, help="the memory file to write")
    create.add_argument("--diff", action="store_true",
                        help="a diff snapshot: only pages written since the last one (needs track_dirty_pages)")
    create.add_argument("--keep-paused", action="store_true", help="leave the VM paused afterwards")
    load = actions.add_parser("load", help="restore a snapshot and run it here, like `kvmlet run`")
    load.add_argument("snapshot", type=Path, help="the state file")
    load.add_argument("--mem-file", type=Path, required=True, help="the memory file (a diff's merged base)")
    load.add_argument("--console", help="serial console: stdio, file:PATH, socket:PATH or none (default stdio)")
    load.add_argument("--net-override", action="append", default=[], metavar="IFACE=TAP",
                      help="attach interface IFACE to another TAP (repeatable)")
    load.add_argument("--drive-override", action="append", default=[], metavar="DRIVE=FILE",
                      help="back drive DRIVE with another file (repeatable)")
    load.add_argument("--vsock-override", metavar="PATH", help="the vsock device's Unix socket")
    load.add_argument("--mem-copy", choices=("none", "background"),
                      help="background: copy the memory file's data into the VM's memory on a thread after restore "
                           "(default); none: page by page at the guest's first writes")
    load.add_argument("--track-dirty-pages", action="store_true", help="allow diff snapshots of the restored VM")
    load.add_argument("--timeout", type=float, help="stop the VM after this many seconds")
    describe = actions.add_parser("describe", help="print what a state file holds")
    describe.add_argument("snapshot", type=Path)
    merge = actions.add_parser("merge", help="lay a diff snapshot's pages onto its base's memory file")
    merge.add_argument("diff", type=Path, help="the diff snapshot's state file")
    merge.add_argument("--diff-mem", type=Path, required=True, help="the diff snapshot's memory file")
    merge.add_argument("--base-mem", type=Path, required=True, help="the base snapshot's memory file (changed)")


def main(args: argparse.Namespace) -> int:
    try:
        if args.snapshot_command == "describe":
            return describe(args.snapshot)
        if args.snapshot_command == "merge":
            return merge(args)
        if args.snapshot_command == "create":
            return create(args)
        return load(args)
    except KvmletError as exc:
        print(f"kvmlet: {exc}", file=sys.stderr)
        return 1


def describe(path: Path) -> int:
    from kvmlet.snapshot.format import SnapshotFile

    print(SnapshotFile(path).describe())
    return 0


def merge(args: argparse.Namespace) -> int:
    from kvmlet.snapshot.format import SnapshotFile
    from kvmlet.snapshot.memory_file import merge_diff

    info = SnapshotFile(args.diff).header.memory
    copied = merge_diff(info, args.diff_mem, args.base_mem)
    print(f"merged {copied} bytes ({len(info.runs)} runs) of {args.diff_mem} onto {args.base_mem}")
    return 0


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=600)
        self.socket_path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def _call(api_sock: Path, method: str, path: str, body: dict[str, object] | None = None) -> dict[str, object]:
    connection = _UnixHTTPConnection(api_sock)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        data = response.read()
    except OSError as exc:
        raise ConfigError(f"API socket {api_sock}: {exc.strerror or exc}") from None
    finally:
        connection.close()
    reply = json.loads(data) if data else {}
    if response.status >= 300:
        raise ConfigError(f"{method} {path}: {reply.get('fault_message', response.status)}")
    return reply if isinstance(reply, dict) else {}


def create(args: argparse.Namespace) -> int:
    state = _call(args.api_sock, "GET", "/").get("state")
    if state not in ("Running", "Paused"):
        raise ConfigError(f"the VM at {args.api_sock} is {state}: nothing to snapshot")
    if state == "Running":
        _call(args.api_sock, "PATCH", "/vm", {"state": "Paused"})
    try:
        _call(args.api_sock, "PUT", "/snapshot/create",
              {"snapshot_path": str(args.snapshot_path.resolve()), "mem_file_path": str(args.mem_file_path.resolve()),
               "snapshot_type": "Diff" if args.diff else "Full"})
    finally:
        if state == "Running" and not args.keep_paused:
            _call(args.api_sock, "PATCH", "/vm", {"state": "Resumed"})
    print(f"snapshot written: {args.snapshot_path} and {args.mem_file_path}")
    return 0


def _pairs(values: list[str], what: str) -> list[tuple[str, str]]:
    out = []
    for value in values:
        name, sep, target = value.partition("=")
        if not sep or not name or not target:
            raise ConfigError(f"{what} {value!r}: give NAME=VALUE")
        out.append((name, target))
    return out


def load(args: argparse.Namespace) -> int:
    from kvmlet.config.models import DriveOverride, NetworkOverride, SnapshotLoadParams, VsockOverride
    from kvmlet.eventloop import EventLoopThread
    from kvmlet.process import raise_open_file_limit
    from kvmlet.run_command import release, run_in_foreground
    from kvmlet.snapshot.restore import load_snapshot

    params = SnapshotLoadParams(
        snapshot_path=str(args.snapshot), mem_file_path=str(args.mem_file),
        track_dirty_pages=args.track_dirty_pages, resume_vm=True,
        network_overrides=[NetworkOverride(iface_id=i, host_dev_name=t)
                           for i, t in _pairs(args.net_override, "--net-override")],
        drive_overrides=[DriveOverride(drive_id=d, path_on_host=p)
                         for d, p in _pairs(args.drive_override, "--drive-override")],
        vsock_override=VsockOverride(uds_path=args.vsock_override) if args.vsock_override else None,
        **({"mem_copy": args.mem_copy} if args.mem_copy else {}))
    raise_open_file_limit()
    events = EventLoopThread()
    try:
        machine = load_snapshot(params, events, console_spec=args.console or "stdio")
    except KvmletError:
        events.stop()
        raise
    try:
        status = run_in_foreground(machine, args.timeout)
        if status is None:
            return 1
    finally:
        release(machine, events)
    if status.kind.value != "guest-exit":
        print(f"kvmlet: {status.message}", file=sys.stderr)
    return status.code
