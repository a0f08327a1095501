"""The `kvmlet` command: run a VM, report on the host."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _run_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="boot a VM (the built-in test guest when no --kernel is given)",
                         description="Boot a VM and show its console; exits with the guest's status.")
    add_run_arguments(run)


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """The flags that describe a VM (`kvmlet run`, `kvmlet attest measure`)."""
    run.add_argument("--kernel", type=Path, help="vmlinux (ELF), bzImage or PVH ELF to boot")
    run.add_argument("--initrd", type=Path, help="initial ramdisk")
    run.add_argument("--cmdline", help="kernel command line")
    run.add_argument("--config-file", type=Path,
                     help="a Firecracker-style JSON VM configuration (the flags below add to it or override it)")
    run.add_argument("--vcpus", type=int, help="number of vCPUs (default 1)")
    run.add_argument("--memory", help="guest memory, e.g. 128M or 2G (default 128M)")
    run.add_argument("--cpu-model", metavar="NAME|FILE",
                     help="the vCPUs' CPU: host (default), a model of 'kvmlet cpu list', a model file or a "
                          "custom template (Firecracker's JSON)")
    run.add_argument("--boot", choices=("auto", "linux64", "pvh"),
                     help="boot protocol: the 64-bit Linux entry or the PVH entry (default auto)")
    run.add_argument("--console",
                     help="serial console: stdio, file:PATH, socket:PATH or none (default stdio)")
    run.add_argument("--stats", action="store_true", help="print exits by reason per vCPU at exit")
    run.add_argument("--boot-timer", action="store_true",
                     help="print the start-up breakdown (imports, VM set-up, image load, first byte)")
    run.add_argument("--timeout", type=float, help="stop the VM after this many seconds")
    run.add_argument("--iommu", choices=("none", "vtd"),
                     help="vtd: put the PCI devices (transport=pci) behind an emulated Intel VT-d unit")
    run.add_argument("--drive", action="append", default=[], metavar="SPEC",
                     help="a virtio-blk drive (repeatable): path=FILE[,readonly=on][,direct=on][,id=NAME][,root=on]"
                          "[,bps=SIZE][,bps-burst=SIZE][,iops=N][,iops-burst=N][,refill-ms=MS]")
    run.add_argument("--rng", nargs="?", const="", default=None, metavar="SPEC",
                     help="a virtio-rng entropy device, optionally rate limited: [bps=SIZE][,bps-burst=SIZE]"
                          "[,refill-ms=MS]")
    run.add_argument("--net", action="append", default=[], metavar="SPEC",
                     help="a virtio-net interface on a TAP (repeatable): tap=NAME|auto[,id=NAME][,mac=MAC][,queues=N]"
                          "[,offload=on|off][,mtu=N][,address=IP/LEN][,bridge=BR][,rx-bps=SIZE][,rx-pps=N]"
                          "[,tx-bps=SIZE][,tx-pps=N][,...-burst=N][,refill-ms=MS][,vhost=on] (vhost=on: the kernel's "
                          "vhost-net moves the frames, docs/vhost-net.md); or vhost-user=SOCKET[,queues=N]"
                          "[,id=NAME][,mac=MAC][,mtu=N] (the data path in a vhost-user back end: docs/networking.md)")
    run.add_argument("--vsock", metavar="SPEC",
                     help="a virtio-vsock device: cid=N,uds=PATH (host clients connect to PATH and send "
                          "'CONNECT <port>'; guest connections to host port P go to PATH_P)")
    run.add_argument("--tpm", nargs="?", const="", default=None, metavar="SPEC",
                     help="a vTPM (swtpm, TPM TIS) and a measured launch: [state=DIR][,policy=FILE,"
                          "policy-key=FILE] (docs/tpm.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmlet", description="A virtual machine monitor on Linux KVM.")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    serve = sub.add_parser("serve", help="serve the Firecracker-compatible API on a Unix socket",
                           description="Serve the API (docs/api.md); a VM is configured and started through it.")
    serve.add_argument("--api-sock", type=Path, required=True, help="the API's Unix socket (created 0600)")
    serve.add_argument("--config-file", type=Path, help="a JSON VM configuration to boot at once")
    serve.add_argument("--id", default="anonymous-instance", help="the VM's id (GET /, logs)")
    serve.add_argument("--log-path", help="where the log goes (default: standard error)")
    serve.add_argument("--level", default="Info", help="log level: Error, Warning, Info, Debug, Trace, Off")
    serve.add_argument("--metrics-path", help="where the metrics JSON lines go")
    serve.add_argument("--console", help="serial console of the VM: stdio, file:PATH, socket:PATH or none")
    serve.add_argument("--exit-with-vm", action="store_true", help="exit when the guest ends (as Firecracker)")
    serve.add_argument("--migrate-listen", metavar="ADDRESS",
                       help="wait for an incoming migration on HOST:PORT, tcp:HOST:PORT or unix:PATH (configure "
                            "nothing else; GET /migration follows it)")
    from kvmlet.migration.cli import add_listen_arguments
    from kvmlet.migration.cli import add_parser as add_migrate_parser

    add_listen_arguments(serve, prefix="migrate-")
    from kvmlet.snapshot.cli import add_parser as add_snapshot_parser

    add_snapshot_parser(sub)
    add_migrate_parser(sub)
    from kvmlet.cpu.cli import add_parser as add_cpu_parser

    add_cpu_parser(sub)
    from kvmlet.net.cli import add_parser as add_net_parser

    add_net_parser(sub)
    from kvmlet.tpm.cli import add_parser as add_attest_parser

    run_flags = argparse.ArgumentParser(add_help=False)
    add_run_arguments(run_flags)   # `kvmlet attest measure` describes the VM as `kvmlet run` does
    add_attest_parser(sub, run_flags)
    host = sub.add_parser("host", help="what this host offers for virtualization")
    host.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("bench", add_help=False,
                   help="benchmarks side by side with QEMU (source checkout; 'kvmlet bench --help')")
    return parser


def _bench_main(argv: list[str]) -> int:
    """`kvmlet bench`: runs bench/ of the source checkout (it is not installed with the package)."""
    checkout = str(Path(__file__).resolve().parent.parent)
    if Path(checkout, "bench", "__init__.py").is_file() and sys.path[:1] != [checkout]:
        sys.path.insert(0, checkout)
    try:
        from bench.cli import main as bench_main
    except ImportError as exc:
        print(f"kvmlet bench: the benchmarks (bench/) come with a source checkout of kvmlet ({exc})",
              file=sys.stderr)
        return 2
    return bench_main(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["bench"]:
        return _bench_main(arguments[1:])
    args = build_parser().parse_args(argv)
    if args.command == "host":
        from kvmlet.host import host_main

        return host_main(json_output=args.json)
    if args.command == "snapshot":
        from kvmlet.snapshot.cli import main as snapshot_main

        return snapshot_main(args)
    if args.command == "attest":
        from kvmlet.tpm.cli import main as attest_main

        return attest_main(args)
    if args.command == "net":
        from kvmlet.net.cli import main as net_main

        return net_main(args)
    if args.command == "cpu":
        from kvmlet.cpu.cli import main as cpu_main

        return cpu_main(args)
    if args.command == "migrate":
        from kvmlet.migration.cli import main as migrate_main

        return migrate_main(args)
    if args.command == "serve":
        from kvmlet.api.serve import ServeOptions, serve

        listen = None
        if args.migrate_listen is not None:
            from kvmlet.errors import KvmletError
            from kvmlet.migration.cli import listen_options

            try:
                listen = listen_options(args.migrate_listen, args, prefix="migrate_")
            except KvmletError as exc:
                print(f"kvmlet: {exc}", file=sys.stderr)
                return 1
        return serve(ServeOptions(api_sock=args.api_sock, config_file=args.config_file, instance_id=args.id,
                                  log_path=args.log_path, level=args.level, metrics_path=args.metrics_path,
                                  console=args.console, exit_with_vm=args.exit_with_vm, migrate_listen=listen))
    from kvmlet.run_command import run_main

    return run_main(args)


if __name__ == "__main__":
    sys.exit(main())
