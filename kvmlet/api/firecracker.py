"""``kvmlet-firecracker``: kvmlet behind Firecracker's command line, for tools that spawn ``firecracker``.

Flags as Firecracker's: ``--api-sock`` (default /run/firecracker.socket), ``--config-file`` (boots at
once), ``--no-api`` (needs ``--config-file``), ``--id``, ``--level``, ``--log-path``, ``--show-level``,
``--show-log-origin``, ``--metrics-path``, ``--boot-timer``, ``--http-api-max-payload-size``,
``--version``, ``--describe-snapshot``; the seccomp and start-time flags are accepted and have no effect
(kvmlet installs no seccomp filter). The process ends when the guest does, as Firecracker's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kvmlet.api.routes import VMM_VERSION

DEFAULT_API_SOCK = "/run/firecracker.socket"
EXIT_BAD_CONFIGURATION = 152
EXIT_ARGUMENT_PARSING = 153


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"kvmlet-firecracker: {message}", file=sys.stderr)
        sys.exit(EXIT_ARGUMENT_PARSING)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvmlet-firecracker", add_help=True,
                     description="kvmlet with Firecracker's command line and API.")
    parser.add_argument("--api-sock", default=DEFAULT_API_SOCK, help="the API's Unix socket")
    parser.add_argument("--config-file", type=Path, help="a JSON VM configuration; the VM boots at once")
    parser.add_argument("--no-api", action="store_true", help="no API socket (needs --config-file)")
    parser.add_argument("--id", default="anonymous-instance", help="the microVM's id")
    parser.add_argument("--level", default="Info", help="log level: Error, Warning, Info, Debug, Trace, Off")
    parser.add_argument("--log-path", help="where the log goes (default: standard error)")
    parser.add_argument("--show-level", action="store_true", help="put the level in log lines")
    parser.add_argument("--show-log-origin", action="store_true", help="put file:line in log lines")
    parser.add_argument("--module", help="accepted; kvmlet logs every module")
    parser.add_argument("--metrics-path", help="where the metrics JSON lines go")
    parser.add_argument("--boot-timer", action="store_true", help="log the time to the first guest byte")
    parser.add_argument("--http-api-max-payload-size", type=int, default=51200, help="largest request body")
    parser.add_argument("--mmds-size-limit", type=int, help="accepted; kvmlet has no MMDS")
    parser.add_argument("--seccomp-filter", help="accepted; kvmlet installs no seccomp filter")
    parser.add_argument("--no-seccomp", action="store_true", help="accepted (kvmlet installs no filter)")
    parser.add_argument("--start-time-us", type=int, help="accepted; the process start time")
    parser.add_argument("--start-time-cpu-us", type=int, help="accepted")
    parser.add_argument("--parent-cpu-time-us", type=int, help="accepted")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--describe-snapshot", metavar="FILE", help="print a snapshot's format version")
    return parser


def set_process_name(name: str) -> None:
    """The name ps and psutil show (tools that manage Firecracker look for ``firecracker``)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)   # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    if args.version:
        print(f"Firecracker v{VMM_VERSION} (kvmlet)\n")
        return 0
    if args.describe_snapshot:
        from kvmlet.errors import KvmletError
        from kvmlet.snapshot.format import FORMAT_VERSION, SnapshotFile

        try:
            SnapshotFile(Path(args.describe_snapshot))
        except KvmletError as exc:
            print(f"kvmlet-firecracker: {exc}", file=sys.stderr)
            return 1
        print(f"v{FORMAT_VERSION}.0.0")   # Firecracker prints the snapshot's data format version
        return 0
    if args.no_api and args.config_file is None:
        print("kvmlet-firecracker: --no-api needs --config-file", file=sys.stderr)
        return EXIT_ARGUMENT_PARSING
    set_process_name("firecracker")
    from kvmlet.api.serve import LEVELS, ServeOptions, serve

    if args.level.lower() not in LEVELS:
        print(f"kvmlet-firecracker: invalid log level {args.level!r}", file=sys.stderr)
        return EXIT_BAD_CONFIGURATION
    options = ServeOptions(api_sock=None if args.no_api else Path(args.api_sock), config_file=args.config_file,
                           instance_id=args.id, log_path=args.log_path, level=args.level,
                           show_level=args.show_level, show_log_origin=args.show_log_origin,
                           metrics_path=args.metrics_path, max_payload=args.http_api_max_payload_size,
                           exit_with_vm=True, boot_timer=args.boot_timer, started_at=started)
    return serve(options)


if __name__ == "__main__":
    sys.exit(main())
