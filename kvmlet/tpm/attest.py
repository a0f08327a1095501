"""Checking a quote bundle (what ``PUT /tpm/quote`` and ``kvmlet attest quote`` return).

A bundle is JSON: ``nonce`` (hex), ``bank`` (sha256), ``pcrs`` (index -> hex value), ``quoted`` (base64 of the
marshalled TPMS_ATTEST the TPM signed), ``signature`` (base64 of the marshalled TPMT_SIGNATURE), ``ak_public``
(PEM), ``event_log`` (base64 of the TCG crypto-agile log) and ``ek_certificate`` (base64 DER, or null).

:func:`verify_bundle` checks, in order, and reports every problem it finds:

1. the quote: TPM_GENERATED magic, a quote structure;
2. the nonce: the quote's qualifying data is the verifier's nonce (an old quote replayed fails here);
3. the signature: ECDSA by the AK (the verifier's trusted AK key if given, else the bundle's);
4. the PCR digest: the hash of the bundle's PCR values, in the quote's selection order, is the quote's digest;
5. the event log: replayed, it gives the quoted values of every PCR it touches, and it covers the launch PCRs;
6. the policy, if given: every measured component is allowed.

Marshalling is tpm2-pytss's; the signature check is ``cryptography``'s.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from kvmlet.tpm.errors import AttestationError
from kvmlet.tpm.eventlog import ALG_BY_NAME, ALGORITHMS, EventLog, parse_log, replay
from kvmlet.tpm.measure import LAUNCH_PCRS, NAME_BY_PCR
from kvmlet.tpm.policy import LaunchPolicy

TPM_GENERATED = 0xFF544347


@dataclass
class Verification:
    """What :func:`verify_bundle` found."""

    problems: list[str] = field(default_factory=list)
    pcrs: dict[int, str] = field(default_factory=dict)          # the quoted values (hex)
    components: dict[str, str] = field(default_factory=dict)    # launch component -> sha256 (from the log)
    extra_pcrs: list[int] = field(default_factory=list)         # quoted PCRs the log does not cover
    clock: int = 0
    reset_count: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self) -> None:
        if self.problems:
            raise AttestationError("quote rejected: " + "; ".join(self.problems))


def load_bundle(text: str | bytes) -> dict[str, Any]:
    try:
        bundle = json.loads(text)
    except ValueError as exc:
        raise AttestationError(f"quote bundle: not JSON ({exc})") from None
    if not isinstance(bundle, dict) or bundle.get("kvmlet_quote") != 1:
        raise AttestationError("quote bundle: not a kvmlet quote (kvmlet_quote 1)")
    return bundle


def _b64(bundle: dict[str, Any], key: str) -> bytes:
    try:
        return base64.b64decode(str(bundle[key]), validate=True)
    except (KeyError, ValueError):
        raise AttestationError(f"quote bundle: {key} is missing or not base64") from None


def _selection(attest: Any) -> tuple[str, list[int]]:
    selection = attest.attested.quote.pcrSelect
    if selection.count != 1:
        raise AttestationError(f"the quote selects {selection.count} banks; kvmlet quotes one")
    item = selection.pcrSelections[0]
    bank = ALGORITHMS.get(int(item.hash), (f"alg {int(item.hash):#x}", 0))[0]
    bits = [item.pcrSelect[index] for index in range(item.sizeofSelect)]
    return bank, [8 * byte + bit for byte, value in enumerate(bits) for bit in range(8) if value >> bit & 1]


def _check_signature(message: bytes, signature: Any, public_pem: bytes) -> str | None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    from tpm2_pytss import TPM2_ALG

    if int(signature.sigAlg) != int(TPM2_ALG.ECDSA):
        return f"the signature is {signature.sigAlg}, kvmlet's AK signs with ECDSA"
    hash_name = ALGORITHMS.get(int(signature.signature.ecdsa.hash), ("",))[0]
    algorithm = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384()}.get(hash_name)
    if algorithm is None:
        return f"the signature's hash {signature.signature.ecdsa.hash} is not SHA-256 or SHA-384"
    try:
        key = serialization.load_pem_public_key(public_pem)
    except ValueError as exc:
        return f"the AK public key cannot be read ({exc})"
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return "the AK public key is not an ECC key"
    r = int.from_bytes(bytes(signature.signature.ecdsa.signatureR), "big")
    s = int.from_bytes(bytes(signature.signature.ecdsa.signatureS), "big")
    try:
        key.verify(encode_dss_signature(r, s), message, ec.ECDSA(algorithm))
    except InvalidSignature:
        return "bad signature: the quote was not signed by this AK, or it was changed"
    return None


def verify_bundle(bundle: dict[str, Any], nonce: bytes, *, policy: LaunchPolicy | None = None,
                  trusted_ak_pem: bytes | None = None) -> Verification:
    """Check ``bundle`` against the verifier's ``nonce`` (and ``policy``); see the module's docstring."""
    from tpm2_pytss import TPM2_ST, TPMS_ATTEST, TPMT_SIGNATURE

    result = Verification()
    problems = result.problems
    quoted = _b64(bundle, "quoted")
    try:
        attest, _ = TPMS_ATTEST.unmarshal(quoted)
        signature, _ = TPMT_SIGNATURE.unmarshal(_b64(bundle, "signature"))
    except Exception as exc:       # tpm2-pytss raises its own errors for short or malformed buffers
        raise AttestationError(f"quote bundle: the quote or signature cannot be unmarshalled ({exc})") from None
    if attest.magic != TPM_GENERATED or attest.type != TPM2_ST.ATTEST_QUOTE:
        problems.append("not a TPM-generated quote (magic or type)")
    result.clock = int(attest.clockInfo.clock)
    result.reset_count = int(attest.clockInfo.resetCount)
    quoted_nonce = bytes(attest.extraData)
    if quoted_nonce != nonce:
        problems.append(f"nonce mismatch: the quote is for nonce {quoted_nonce.hex() or '(none)'}, not "
                        f"{nonce.hex()} (a replayed or someone else's quote)")
    ak_pem = trusted_ak_pem if trusted_ak_pem is not None else str(bundle.get("ak_public", "")).encode()
    failure = _check_signature(quoted, signature, ak_pem)
    if failure:
        problems.append(failure)

    bank, selected = _selection(attest)
    try:
        values = {int(k): bytes.fromhex(v) for k, v in dict(bundle.get("pcrs", {})).items()}
    except (ValueError, TypeError, AttributeError):
        raise AttestationError("quote bundle: pcrs must map PCR numbers to hex values") from None
    result.pcrs = {index: value.hex() for index, value in sorted(values.items())}
    if sorted(values) != selected:
        problems.append(f"the bundle's PCRs {sorted(values)} are not the quoted ones {selected}")
    else:
        computed = hashlib.new(bank, b"".join(values[index] for index in selected)).digest()
        if computed != bytes(attest.attested.quote.pcrDigest):
            problems.append("PCR digest mismatch: the bundle's PCR values are not the ones the TPM quoted")

    try:
        log: EventLog | None = parse_log(_b64(bundle, "event_log"))
    except AttestationError as exc:
        problems.append(str(exc))
        log = None
    if log is not None:
        _check_log(log, bank, values, selected, policy, result)
    return result


def _check_log(log: EventLog, bank: str, values: dict[int, bytes], selected: list[int],
               policy: LaunchPolicy | None, result: Verification) -> None:
    problems = result.problems
    alg = ALG_BY_NAME.get(bank)
    if alg is None:
        problems.append(f"the quoted bank {bank} is not one the event log can be replayed in")
        return
    try:
        replayed = replay(log, alg)
    except AttestationError as exc:
        problems.append(str(exc))
        return
    for index in LAUNCH_PCRS:
        if index in replayed and index not in selected:
            problems.append(f"PCR {index} ({NAME_BY_PCR[index]}) is in the event log but not quoted")
    for index, value in sorted(replayed.items()):
        if index in values and values[index] != value:
            name = NAME_BY_PCR.get(index, "?")
            problems.append(f"PCR {index} ({name}): the event log replays to {value.hex()}, the quote says "
                            f"{values[index].hex()} (the event log or the launch was tampered with)")
    result.extra_pcrs = [index for index in selected if index not in replayed]
    sha256 = ALG_BY_NAME["sha256"]
    measured: list[tuple[str, str]] = []
    for event in log.events:
        component = NAME_BY_PCR.get(event.pcr)
        if component is None or sha256 not in event.digests:
            continue
        result.components[component] = event.digests[sha256].hex()
        measured.append((component, event.digests[sha256].hex()))
    if policy is not None:
        problems.extend(f"policy: {problem}" for problem in policy.refusals(measured))


def checkquote_files(bundle: dict[str, Any], directory: Any, nonce: bytes | None = None) -> list[str]:
    """Write the files ``tpm2_checkquote`` reads and return its arguments (without the program name):
    ``-u ak.pem -m quote.msg -s quote.sig -f pcrs.bin -l <bank>:<pcrs> -g sha256 -q <nonce>`` (the verifier's
    ``nonce``, else the one the bundle says it was asked for)."""
    from pathlib import Path

    where = Path(directory)
    (where / "ak.pem").write_text(str(bundle["ak_public"]))
    (where / "quote.msg").write_bytes(_b64(bundle, "quoted"))
    (where / "quote.sig").write_bytes(_b64(bundle, "signature"))
    pcrs = {int(k): bytes.fromhex(v) for k, v in dict(bundle["pcrs"]).items()}
    (where / "pcrs.bin").write_bytes(b"".join(pcrs[index] for index in sorted(pcrs)))
    selection = f"{bundle['bank']}:{','.join(str(index) for index in sorted(pcrs))}"
    return ["-u", str(where / "ak.pem"), "-m", str(where / "quote.msg"), "-s", str(where / "quote.sig"),
            "-f", str(where / "pcrs.bin"), "-l", selection, "-g", "sha256", "-q",
            nonce.hex() if nonce is not None else str(bundle["nonce"])]
