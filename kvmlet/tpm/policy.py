"""The launch control policy (TXT's LCP, in software): a signed list of allowed measurements.

A policy file is JSON::

    {"kvmlet_launch_policy": 1,
     "policy": {"name": "web-tier",
                "allow": {"kvmlet": ["<sha256>", ...], "config": [...], "kernel": [...], "cmdline": [...],
                          "initrd": [...] | "any"}},
     "signature": {"algorithm": "ed25519", "key_id": "<sha256 of the raw public key>", "value": "<base64>"}}

The signature (Ed25519, through the ``cryptography`` package) is over ``SIGNED_PREFIX`` followed by the
canonical JSON of ``policy`` (sorted keys, no spaces, ASCII). Every component a launch measures must be
listed under ``allow`` with its SHA-256 digest (as ``kvmlet attest measure`` prints them), or be ``"any"``;
a launch with a component not allowed is refused before the VM runs, naming the component, its digest and
the allowed ones. An unsigned policy, one signed by another key than the one configured, or one whose body
was changed after signing, is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmlet.jsonfile import read_json_file
from kvmlet.tpm.errors import PolicyError
from kvmlet.tpm.measure import NO_POLICY, PCR_MAP, Measurement

FORMAT_VERSION = 1
SIGNED_PREFIX = b"kvmlet launch policy v1\n"
COMPONENTS = tuple(name for name in PCR_MAP if name != "policy")
ANY = "any"


def canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()


# -- keys -------------------------------------------------------------------------------------------
def generate_key(private_path: Path, public_path: Path) -> str:
    """A new Ed25519 key pair as PEM files (the private one 0600); returns the key id."""
    import os

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(pem)
    public = private.public_key()
    public_path.write_bytes(public.public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_id(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def load_public_key(path: Path) -> bytes:
    """The raw 32 bytes of an Ed25519 public key file (PEM, or 64 hex digits)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"policy key {path}: {exc.strerror}") from None
    text = data.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode())
        except ValueError:
            pass
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise PolicyError(f"policy key {path}: not an Ed25519 public key in PEM or hex ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PolicyError(f"policy key {path}: a {type(key).__name__}, not an Ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign_policy(body: dict[str, Any], private_path: Path) -> dict[str, Any]:
    """The policy file for ``body`` (``{"name": ..., "allow": {...}}``) signed with the key at ``private_path``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    check_body(body)
    try:
        private = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise PolicyError(f"signing key {private_path}: {exc}") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise PolicyError(f"signing key {private_path}: not an Ed25519 private key")
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    signature = private.sign(SIGNED_PREFIX + canonical(body))
    return {"kvmlet_launch_policy": FORMAT_VERSION, "policy": body,
            "signature": {"algorithm": "ed25519", "key_id": key_id(raw),
                          "value": base64.b64encode(signature).decode()}}


# -- policies ---------------------------------------------------------------------------------------
def check_body(body: object) -> None:
    if not isinstance(body, dict) or not isinstance(body.get("allow"), dict):
        raise PolicyError("policy: the body must be an object with an 'allow' object")
    for name, allowed in body["allow"].items():
        if name not in COMPONENTS:
            raise PolicyError(f"policy: unknown component {name!r} (components: {', '.join(COMPONENTS)})")
        if allowed == ANY:
            continue
        if not isinstance(allowed, list) or not all(
                isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
                for value in allowed):
            raise PolicyError(f"policy: {name} must be \"any\" or a list of SHA-256 digests (64 lower-case hex)")


@dataclass(frozen=True)
class LaunchPolicy:
    """A policy whose signature was checked against a trusted key."""

    path: str
    body: dict[str, Any]
    public_key: bytes

    @property
    def name(self) -> str:
        return str(self.body.get("name", Path(self.path).stem))

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def allowed(self, name: str) -> list[str] | str | None:
        value = self.body["allow"].get(name)
        return value if isinstance(value, list | str) else None

    def measurement(self) -> Measurement:
        """What PCR 18 records of this policy: its signer's key and its canonical body."""
        payload = self.public_key + SIGNED_PREFIX + canonical(self.body)
        return Measurement("policy", payload, f"launch policy {self.name} key {self.key_id[:16]}".encode())

    def refusals(self, components: list[tuple[str, str]]) -> list[str]:
        """Why each measured component, given as (name, SHA-256 hex), is not allowed (empty: allowed)."""
        problems = []
        for name, sha256 in components:
            if name == "policy":
                continue
            allowed = self.allowed(name)
            if allowed == ANY:
                continue
            if allowed is None:
                problems.append(f"{name} sha256 {sha256} (the policy lists no allowed {name})")
            elif sha256 not in allowed:
                problems.append(f"{name} sha256 {sha256} is not allowed (expected "
                                f"{' or '.join(allowed) if allowed else 'nothing'})")
        return problems

    def check(self, measurements: list[Measurement]) -> None:
        """PolicyError naming every component that is not allowed."""
        problems = self.refusals([(m.name, m.sha256) for m in measurements])
        if problems:
            raise PolicyError(f"launch refused by policy {self.name!r}: " + "; ".join(problems))


def no_policy_measurement() -> Measurement:
    return Measurement("policy", NO_POLICY, NO_POLICY)


def load_policy(path: Path, public_key_path: Path) -> LaunchPolicy:
    """A policy file whose signature verifies with the trusted key at ``public_key_path``; PolicyError
    otherwise (unsigned, signed by another key, changed after signing, malformed)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    trusted = load_public_key(public_key_path)
    document = read_json_file(path, f"policy {path}", PolicyError)
    if not isinstance(document, dict) or document.get("kvmlet_launch_policy") != FORMAT_VERSION:
        raise PolicyError(f"policy {path}: not a kvmlet launch policy (version {FORMAT_VERSION})")
    body = document.get("policy")
    check_body(body)
    assert isinstance(body, dict)
    signature = document.get("signature")
    if not isinstance(signature, dict) or not signature.get("value"):
        raise PolicyError(f"policy {path} is not signed: sign it with 'kvmlet attest sign'")
    if signature.get("algorithm") != "ed25519":
        raise PolicyError(f"policy {path}: signature algorithm {signature.get('algorithm')!r} is not ed25519")
    if signature.get("key_id") != key_id(trusted):
        raise PolicyError(f"policy {path} is signed by key {str(signature.get('key_id'))[:16]}..., not by the "
                          f"trusted key {key_id(trusted)[:16]}... ({public_key_path})")
    try:
        value = base64.b64decode(str(signature["value"]), validate=True)
        Ed25519PublicKey.from_public_bytes(trusted).verify(value, SIGNED_PREFIX + canonical(body))
    except (ValueError, InvalidSignature):
        raise PolicyError(f"policy {path}: bad signature (the policy was changed after signing, or the "
                          f"signature is not from {public_key_path})") from None
    return LaunchPolicy(str(path), body, trusted)
