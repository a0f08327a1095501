"""``kvmlet attest``: keys and signed launch policies, the measurements of a launch, quotes and their check;
and ``kvmlet run --tpm [state=DIR][,policy=FILE,policy-key=FILE]``.

* ``kvmlet attest keygen --out NAME``: an Ed25519 key pair, ``NAME.key`` (private, 0600) and ``NAME.pub``.
* ``kvmlet attest measure [run flags]``: build the VM ``kvmlet run`` would (with a vTPM), print what its launch
  measures as a policy body (``{"name": ..., "allow": {...}}``), and stop without running it.
* ``kvmlet attest sign BODY --key NAME.key --out POLICY``: sign a policy body.
* ``kvmlet attest quote --api-sock SOCK --nonce HEX [--pcrs 1,4,...] [--out FILE]``: a quote of a running VM.
* ``kvmlet attest verify QUOTE --nonce HEX [--policy POLICY --policy-key NAME.pub] [--ak AK.pem]
  [--checkquote]``: check a quote (exit 0) or name why it is rejected (exit 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvmlet.config.models import Tpm
from kvmlet.errors import ConfigError, KvmletError

TPM_KEYS = ("state", "policy", "policy-key")


def parse_tpm(spec: str) -> Tpm:
    """``--tpm [state=DIR][,policy=FILE,policy-key=FILE]`` -> Tpm."""
    from kvmlet.config.specs import key_values

    option = f"--tpm {spec!r}" if spec else "--tpm"
    values = key_values(option, spec, TPM_KEYS, None)
    tpm = Tpm(state_dir=values.get("state"), policy=values.get("policy"), policy_key=values.get("policy-key"))
    tpm.validate()
    return tpm


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               run_flags: argparse.ArgumentParser | None = None) -> None:
    attest = sub.add_parser("attest", help="vTPM launch policies, quotes and their verification",
                            description="Measured launch and attestation (docs/tpm.md).")
    actions = attest.add_subparsers(dest="attest_command", required=True)
    keygen = actions.add_parser("keygen", help="a new Ed25519 key pair for signing launch policies")
    keygen.add_argument("--out", type=Path, required=True, help="writes OUT.key (private) and OUT.pub")
    measure = actions.add_parser("measure", help="print what a launch measures, as a policy body",
                                 parents=[run_flags] if run_flags is not None else [])
    measure.add_argument("--name", default="kvmlet-launch", help="the policy's name")
    sign = actions.add_parser("sign", help="sign a policy body into a launch policy")
    sign.add_argument("body", type=Path, help="JSON: {\"name\": ..., \"allow\": {component: [sha256, ...]}}")
    sign.add_argument("--key", type=Path, required=True, help="the Ed25519 private key (PEM)")
    sign.add_argument("--out", type=Path, required=True, help="the signed policy to write")
    quote = actions.add_parser("quote", help="a TPM quote of a running VM (through its API socket)")
    quote.add_argument("--api-sock", type=Path, required=True)
    quote.add_argument("--nonce", required=True, help="hex, at most 64 bytes")
    quote.add_argument("--pcrs", help="PCRs to quote, e.g. 1,4,8,9,17,18,23 (default: the launch PCRs)")
    quote.add_argument("--out", type=Path, help="where to write the quote (default: standard output)")
    verify = actions.add_parser("verify", help="check a quote: signature, nonce, PCRs, event log, policy")
    verify.add_argument("quote", type=Path)
    verify.add_argument("--nonce", required=True, help="the nonce the quote was asked for (hex)")
    verify.add_argument("--policy", type=Path, help="a signed launch policy the measurements must satisfy")
    verify.add_argument("--policy-key", type=Path, help="the Ed25519 public key that signed the policy")
    verify.add_argument("--ak", type=Path, help="the trusted AK public key (PEM); default: the quote's own")
    verify.add_argument("--checkquote", action="store_true", help="also run tpm2_checkquote (tpm2-tools)")


def main(args: argparse.Namespace) -> int:
    try:
        command = args.attest_command
        if command == "keygen":
            from kvmlet.tpm.policy import generate_key

            identity = generate_key(args.out.with_suffix(".key"), args.out.with_suffix(".pub"))
            print(f"wrote {args.out.with_suffix('.key')} and {args.out.with_suffix('.pub')} (key id {identity})")
            return 0
        if command == "sign":
            return _sign(args)
        if command == "measure":
            return _measure(args)
        if command == "quote":
            return _quote(args)
        return _verify(args)
    except KvmletError as exc:
        print(f"kvmlet: {exc}", file=sys.stderr)
        return 1


def _nonce(text: str) -> bytes:
    try:
        nonce = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"--nonce {text!r} is not hex") from None
    if not 1 <= len(nonce) <= 64:
        raise ConfigError("--nonce: give 1 to 64 bytes")
    return nonce


def _sign(args: argparse.Namespace) -> int:
    from kvmlet.tpm.policy import sign_policy

    try:
        body = json.loads(args.body.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"policy body {args.body}: {exc}") from None
    args.out.write_text(json.dumps(sign_policy(body, args.key), indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _measure(args: argparse.Namespace) -> int:
    import msgspec

    from kvmlet.eventloop import EventLoopThread
    from kvmlet.machine import build_machine
    from kvmlet.run_command import config_from_args

    config = config_from_args(args)
    config = msgspec.structs.replace(config, tpm=Tpm())   # a throw-away vTPM: no kept state, no policy
    events = EventLoopThread()
    try:
        machine = build_machine(config, events)
        try:
            from kvmlet.tpm.launch import find_vtpm

            assert machine.devices is not None
            measurements = find_vtpm(machine.devices).measurements
        finally:
            machine.close()
    finally:
        events.stop()
    body = {"name": args.name, "allow": {m.name: [m.sha256] for m in measurements if m.name != "policy"}}
    print(json.dumps(body, indent=2))
    return 0


def _api(socket_path: Path, method: str, target: str, body: dict[str, object] | None = None) -> object:
    """One request to a `kvmlet serve` API socket; ConfigError with its fault message unless it succeeded."""
    import http.client
    import socket

    class Connection(http.client.HTTPConnection):
        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(60)
            sock.connect(str(socket_path))
            self.sock = sock

    connection = Connection("localhost")
    try:
        payload = json.dumps(body).encode() if body is not None else None
        connection.request(method, target, body=payload,
                           headers={"Content-Type": "application/json"} if payload is not None else {})
        response = connection.getresponse()
        data = response.read()
    except OSError as exc:
        raise ConfigError(f"API socket {socket_path}: {exc.strerror or exc}") from None
    finally:
        connection.close()
    reply = json.loads(data) if data else None
    if response.status >= 300:
        fault = reply.get("fault_message") if isinstance(reply, dict) else None
        raise ConfigError(f"{method} {target}: {fault or response.status}")
    return reply


def _quote(args: argparse.Namespace) -> int:
    nonce = _nonce(args.nonce)
    body: dict[str, object] = {"nonce": nonce.hex()}
    if args.pcrs:
        try:
            body["pcrs"] = [int(p) for p in args.pcrs.split(",")]
        except ValueError:
            raise ConfigError(f"--pcrs {args.pcrs!r}: give PCR numbers separated by commas") from None
    _api(args.api_sock, "PUT", "/tpm/quote", body)
    bundle = _api(args.api_sock, "GET", "/tpm/quote")
    text = json.dumps(bundle, indent=2) + "\n"
    if args.out is not None:
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from kvmlet.tpm.attest import load_bundle, verify_bundle
    from kvmlet.tpm.policy import load_policy

    nonce = _nonce(args.nonce)
    try:
        bundle = load_bundle(args.quote.read_text())
    except OSError as exc:
        raise ConfigError(f"quote {args.quote}: {exc.strerror}") from None
    policy = None
    if args.policy is not None or args.policy_key is not None:
        if args.policy is None or args.policy_key is None:
            raise ConfigError("give both --policy and --policy-key")
        policy = load_policy(args.policy, args.policy_key)
    ak = args.ak.read_bytes() if args.ak is not None else None
    result = verify_bundle(bundle, nonce, policy=policy, trusted_ak_pem=ak)
    checkquote = _checkquote(bundle, nonce) if args.checkquote else None
    for name, digest in result.components.items():
        print(f"  {name:<8} sha256 {digest}")
    for index in result.extra_pcrs:
        print(f"  PCR {index} (not in the event log) {result.pcrs[index]}")
    if checkquote is not None:
        result.problems.extend([checkquote] if checkquote else [])
    if result.problems:
        for problem in result.problems:
            print(f"REJECTED: {problem}")
        return 1
    print(f"OK: quote verified (nonce, signature, PCR digest, event log{', policy' if policy else ''}"
          f"{', tpm2_checkquote' if args.checkquote else ''}); AK {'trusted key' if ak else 'from the quote'}")
    return 0


def _checkquote(bundle: dict[str, object], nonce: bytes) -> str:
    """Run tpm2_checkquote on the bundle; "" if it agrees, else why not."""
    import shutil
    import subprocess
    import tempfile

    from kvmlet.tpm.attest import checkquote_files

    program = shutil.which("tpm2_checkquote")
    if program is None:
        return "tpm2_checkquote is not installed (Debian: tpm2-tools)"
    with tempfile.TemporaryDirectory(prefix="kvmlet-checkquote-") as directory:
        done = subprocess.run([program, *checkquote_files(bundle, directory, nonce)], capture_output=True, text=True,
                              check=False)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        return f"tpm2_checkquote rejected the quote: {lines[-1] if lines else f'exit {done.returncode}'}"
    return ""
