"""``kvmlet cpu``: list the CPU models, capture this host, compute a pool's baseline, compare a model with a
host (docs/cpu-models.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kvmlet.errors import KvmletError
from kvmlet.jsonfile import read_json_file

if TYPE_CHECKING:
    from kvmlet.cpu.capture import HostCapture
    from kvmlet.cpu.models import CpuModel

COMPARE_EXIT = {"identical": 0, "superset": 0, "incompatible": 1}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cpu = sub.add_parser("cpu", help="CPU models: list, capture this host, baseline of hosts, compare",
                         description="CPU models, host captures, pool baselines (docs/cpu-models.md).")
    actions = cpu.add_subparsers(dest="cpu_command", required=True)
    listing = actions.add_parser("list", help="the catalog of CPU models, or one model's features")
    listing.add_argument("model", nargs="?", help="a model name or model file: print its features")
    capture = actions.add_parser("capture", help="print this host's CPU as KVM offers it (JSON)")
    capture.add_argument("--description", default="", help="what to call this host in the capture")
    capture.add_argument("--from-dump", type=Path, metavar="FILE",
                         help="convert an AIDA64/InstLatx64 CPUID dump instead of capturing this host")
    capture.add_argument("--source", default="", help="where the dump comes from (kept in the capture)")
    capture.add_argument("-o", "--output", type=Path, help="write to FILE instead of standard output")
    base = actions.add_parser("baseline", help="the largest CPU common to hosts (captures)")
    base.add_argument("captures", type=Path, nargs="+", help="captures made with 'kvmlet cpu capture'")
    base.add_argument("--json", action="store_true",
                      help="print the baseline as a model file (for --cpu-model FILE / cpu_template)")
    base.add_argument("--name", default="baseline", help="the model's name in --json output")
    comp = actions.add_parser("compare", help="can a host run a CPU model: identical, superset or incompatible")
    comp.add_argument("model", help="a model name, model file, custom template or capture")
    comp.add_argument("host", type=Path, help="the host's capture")
    comp.add_argument("--json", action="store_true", help="machine-readable output")


def main(args: argparse.Namespace) -> int:
    try:
        if args.cpu_command == "list":
            return list_models(args.model)
        if args.cpu_command == "capture":
            return capture(args)
        if args.cpu_command == "baseline":
            return baseline(args)
        return compare(args)
    except KvmletError as exc:
        print(f"kvmlet: {exc}", file=sys.stderr)
        return 1


def list_models(name: str | None) -> int:
    from kvmlet.cpu.features import sorted_features
    from kvmlet.cpu.models import catalog, resolve_model

    if name is not None:
        model = resolve_model(name)
        if model is None:
            print("host: the host's CPU as KVM offers it (pass-through); 'kvmlet cpu capture' lists it")
            return 0
        print(f"{model.name} ({model.vendor or 'any vendor'}): {model.description}")
        print(" ".join(sorted_features(model.features)))
        return 0
    print(f"{'model':<20} {'vendor':<13} {'features':>8}  description")
    print(f"{'host':<20} {'this host':<13} {'':>8}  pass-through of what KVM offers (the default)")
    for model in catalog():
        print(f"{model.name:<20} {model.vendor or 'any':<13} {len(model.features):>8}  {model.description}")
    return 0


def capture(args: argparse.Namespace) -> int:
    from kvmlet.cpu.capture import capture_from_dump, capture_host, dumps

    if args.from_dump is not None:
        try:
            text = args.from_dump.read_text(errors="replace")
        except OSError as exc:
            raise KvmletError(f"{args.from_dump}: {exc.strerror}") from None
        result = capture_from_dump(text, description=args.description, source=args.source,
                                   converted_from=args.from_dump.name)
    else:
        result = capture_host(args.description)
    output = dumps(result)
    if args.output is not None:
        args.output.write_text(output)
    else:
        sys.stdout.write(output)
    return 0


def baseline(args: argparse.Namespace) -> int:
    from kvmlet.cpu.baseline import baseline as compute
    from kvmlet.cpu.capture import load_capture

    result = compute([load_capture(path) for path in args.captures])
    if args.json:
        base = result.model.name if result.model is not None else None
        print(json.dumps(result.as_model(args.name).to_file(base), indent=1))
        return 0
    print(f"vendor: {result.vendor}")
    print(f"hosts: {result.hosts}, common features: {len(result.features)}"
          + ("" if result.msrs_compared else " (MSR features not compared: a capture has no MSRs)"))
    print(f"closest model: {result.model.name if result.model is not None else 'none'}")
    print(f"extra features: {' '.join(result.extra) if result.extra else 'none'}")
    return 0


def guest_from_spec(spec: str) -> CpuModel | HostCapture:
    """A model name, model file, custom template (applied to nothing: its named bits), or capture."""
    from kvmlet.cpu.capture import capture_from_json, is_capture
    from kvmlet.cpu.models import is_model_file, model_from_dict, resolve_model

    if is_model_file(spec):
        data = read_json_file(spec, spec)
        if is_capture(data):
            return capture_from_json(data, spec)
        return model_from_dict(data, spec)
    model = resolve_model(spec)
    if model is None:
        raise KvmletError("compare: 'host' is this host's CPU; capture it ('kvmlet cpu capture') and give the file")
    return model


def compare(args: argparse.Namespace) -> int:
    from kvmlet.cpu.capture import load_capture
    from kvmlet.cpu.compat import compare as compute

    guest = guest_from_spec(args.model)
    result = compute(guest, load_capture(args.host))
    if args.json:
        print(json.dumps({"result": result.verdict.value, "guest": result.guest, "host": result.host,
                          "missing": result.missing, "extra": result.extra,
                          "vendor_mismatch": result.vendor_mismatch or None,
                          "unchecked": list(result.unchecked)}, indent=1))
    else:
        print(result.summary())
        if result.unchecked:
            print(f"not checked (the capture has no MSRs): {' '.join(result.unchecked)}")
    return COMPARE_EXIT[result.verdict.value]
