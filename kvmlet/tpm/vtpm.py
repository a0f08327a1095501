"""A VM's vTPM: its swtpm, the measured launch, the attestation key, quotes, and its state for snapshots.

It is the back end of the TIS front end (:class:`kvmlet.devices.tpm_tis.TpmTis`). swtpm starts lazily: a
fresh boot starts it in :meth:`Vtpm.launch` (provisioning a new state directory first), a restore in
:meth:`Vtpm.restore_blobs` (the snapshot's state replaces whatever the directory held). kvmlet's own TPM
commands go through tpm2-pytss's ESAPI over a Python TCTI that shares swtpm's data channel with the guest
(:meth:`kvmlet.tpm.swtpm.Swtpm.execute` serializes them).

The attestation key (AK) is an ECC P-256 restricted signing key (ECDSA, SHA-256) created under the endorsement
hierarchy and made persistent at :data:`AK_HANDLE`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmlet.tpm.errors import SwtpmDied, TpmError
from kvmlet.tpm.eventlog import ALGORITHMS, BANKS, TPM_ALG_SHA256, build_log
from kvmlet.tpm.measure import DRTM_LOCALITY, LAUNCH_PCRS, PCR_KVMLET, Measurement
from kvmlet.tpm.swtpm import Blob, Swtpm, SwtpmStats, is_provisioned, provision

if TYPE_CHECKING:
    from tpm2_pytss import ESAPI

    from kvmlet.config.models import Tpm

log = logging.getLogger("kvmlet.tpm")

RUN_DIR_PREFIX = "kvmlet-vtpm-"   # then the pid of the kvmlet that made it
AK_HANDLE = 0x81000100
EK_CERT_ECC_NV_INDEX = 0x01C00016
AK_TEMPLATE = "ecc256:ecdsa-sha256:null"
AK_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign"


@dataclass
class VtpmStats:
    """The vTPM's figures for the metrics: swtpm's and the launch's."""

    swtpm: SwtpmStats = field(default_factory=SwtpmStats)
    launch_ms: float = 0.0
    measured_bytes: int = 0


class Vtpm:
    """One VM's vTPM (see the module's docstring); closed with the VM's devices."""

    def __init__(self, config: Tpm) -> None:
        import importlib.util

        if importlib.util.find_spec("tpm2_pytss") is None:
            raise TpmError("the vTPM needs the Python package tpm2-pytss: pip install 'kvmlet[tpm]' (it builds "
                           "against Debian's libtss2-dev; scripts/setup.sh installs both)")
        self.config = config
        remove_stale_run_dirs()
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-"))
        self.state_dir = Path(config.state_dir) if config.state_dir else self.run_dir / "state"
        self.swtpm: Swtpm | None = None
        self.event_log = b""
        self.measurements: list[Measurement] = []
        self.launch_ms = 0.0
        self._lock = threading.RLock()
        self._closed = False
        self._write_back: Path | None = None    # a restored vTPM's kept state directory (see restore_blobs)

    @property
    def log_path(self) -> Path:
        return self.run_dir / "swtpm.log"

    def _start(self) -> Swtpm:
        if self._closed:
            raise TpmError("the vTPM is closed")
        if self.swtpm is None:
            self.swtpm = Swtpm.start(self.state_dir, self.log_path)
        return self.swtpm

    # -- the TIS front end's back end ---------------------------------------------------------------
    def execute(self, command: bytes, locality: int) -> bytes:
        swtpm = self.swtpm
        if swtpm is None:
            raise SwtpmDied("the vTPM has not been started")
        return swtpm.execute(command, locality)

    def established(self) -> bool:
        return self.swtpm.established() if self.swtpm is not None else False

    def save_blobs(self) -> tuple[bytes, bytes, bytes, bytes]:
        swtpm = self.swtpm
        if swtpm is None:
            raise TpmError("the vTPM has not been started: nothing to save")
        try:
            savestate = swtpm.get_state_blob(Blob.SAVESTATE)
        except SwtpmDied:
            raise
        except TpmError:
            savestate = b""         # only a TPM shut down with TPM2_Shutdown(STATE) has one
        return (swtpm.get_state_blob(Blob.PERMANENT), swtpm.get_state_blob(Blob.VOLATILE), savestate,
                self.event_log)

    def restore_blobs(self, permanent: bytes, volatile: bytes, savestate: bytes, event_log: bytes) -> None:
        """Start swtpm with a saved TPM (nothing is provisioned) and power it on where it was.

        The restored TPM runs on a private directory: a kept ``state_dir`` may still be in use by the swtpm
        of the VM this one was saved from (a live migration on one host; swtpm locks its directory). The
        state is copied back into ``state_dir`` when this VM closes."""
        if self.config.state_dir is not None and self.swtpm is None:
            self._write_back = Path(self.config.state_dir)
            self.state_dir = self.run_dir / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        swtpm = self._start()
        swtpm.stop()
        swtpm.set_state_blob(Blob.PERMANENT, permanent)
        if volatile:
            swtpm.set_state_blob(Blob.VOLATILE, volatile)
        if savestate:
            swtpm.set_state_blob(Blob.SAVESTATE, savestate)
        swtpm.init()
        self.event_log = event_log

    # -- ESAPI --------------------------------------------------------------------------------------
    @contextmanager
    def esys(self, locality: int = 0) -> Iterator[ESAPI]:
        """An ESAPI context over swtpm's data channel at ``locality``."""
        from tpm2_pytss import ESAPI
        from tpm2_pytss.TCTI import PyTCTI

        swtpm = self.swtpm
        if swtpm is None:
            raise TpmError("the vTPM has not been started")

        class Channel(PyTCTI):   # type: ignore[misc]
            def __init__(self) -> None:
                super().__init__(max_size=4096)
                self.locality = locality
                self.response = b""

            def do_transmit(self, command: bytes) -> None:
                assert swtpm is not None
                self.response = swtpm.execute(bytes(command), self.locality)

            def do_receive(self, timeout: int) -> bytes:
                return self.response

            def do_set_locality(self, value: int) -> None:
                self.locality = value

        from tpm2_pytss.TSS2_Exception import TSS2_Exception

        context = ESAPI(Channel())
        try:
            yield context
        except TSS2_Exception as exc:
            if not swtpm.alive:
                raise SwtpmDied(f"the vTPM is gone: {exc}") from None
            raise TpmError(f"the vTPM refused a command: {exc}") from None
        finally:
            context.close()

    # -- measured launch ----------------------------------------------------------------------------
    def launch(self, measurements: list[Measurement]) -> bytes:
        """Provision (a new state directory), start swtpm, power the TPM on, TPM2_Startup(CLEAR), measure:
        the dynamic launch of kvmlet into PCR 17, the rest extended; create the AK. Returns the event log."""
        from tpm2_pytss import ESYS_TR, TPM2_ALG, TPM2_SU, TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

        started = time.perf_counter()
        with self._lock:
            if not is_provisioned(self.state_dir):
                provision(self.state_dir)
            swtpm = self._start()
            swtpm.init()
            with self.esys() as esys:
                esys.startup(TPM2_SU.CLEAR)
            for measurement in measurements:
                if measurement.pcr == PCR_KVMLET:
                    swtpm.dynamic_launch(measurement.payload)
                    continue
                values = TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG(alg), digest=TPMU_HA(
                    **{ALGORITHMS[alg][0]: measurement.digests[alg]})) for alg in BANKS])
                locality = DRTM_LOCALITY if measurement.pcr >= 16 else 0
                with self.esys(locality) as esys:
                    esys.pcr_extend(ESYS_TR.parse(f"PCR{measurement.pcr}"), values)
            if not any(m.pcr == PCR_KVMLET for m in measurements):
                raise TpmError("a measured launch needs the kvmlet measurement (PCR 17)")
            self._ensure_ak()
            self.measurements = list(measurements)
            self.event_log = build_log([m.event() for m in measurements])
        self.launch_ms = (time.perf_counter() - started) * 1000
        return self.event_log

    def _ensure_ak(self) -> None:
        from tpm2_pytss import ESYS_TR, TPM2_CAP, TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE

        with self.esys() as esys:
            _, handles = esys.get_capability(TPM2_CAP.HANDLES, AK_HANDLE, 1)
            if handles.data.handles.count and handles.data.handles.handle[0] == AK_HANDLE:
                return                      # a kept state directory already has it
            template = TPM2B_PUBLIC.parse(AK_TEMPLATE, objectAttributes=AK_ATTRIBUTES)
            handle, *_ = esys.create_primary(TPM2B_SENSITIVE_CREATE(), primary_handle=ESYS_TR.ENDORSEMENT,
                                             in_public=template)
            try:
                esys.evict_control(ESYS_TR.OWNER, handle, AK_HANDLE)
            finally:
                esys.flush_context(handle)

    # -- attestation --------------------------------------------------------------------------------
    def ak_public_pem(self) -> bytes:
        with self.esys() as esys:
            handle = esys.tr_from_tpmpublic(AK_HANDLE)
            public, _, _ = esys.read_public(handle)
            pem: bytes = public.to_pem()
            return pem

    def pcr_values(self, pcrs: tuple[int, ...], alg: int = TPM_ALG_SHA256) -> dict[int, bytes]:
        from tpm2_pytss import TPML_PCR_SELECTION

        name = ALGORITHMS[alg][0]
        values: dict[int, bytes] = {}
        with self.esys() as esys:
            for start in range(0, len(pcrs), 8):      # TPM2_PCR_Read returns at most 8 digests
                chunk = pcrs[start:start + 8]
                _, selection, digests = esys.pcr_read(
                    TPML_PCR_SELECTION.parse(f"{name}:{','.join(map(str, chunk))}"))
                got = _selected(selection)
                values.update(zip(got, (bytes(d) for d in digests), strict=True))
        return values

    def ek_certificate(self) -> bytes | None:
        """The EK certificate (DER) swtpm_setup stored, if it can be read."""
        from tpm2_pytss import ESYS_TR
        from tpm2_pytss.TSS2_Exception import TSS2_Exception

        try:
            with self.esys() as esys:
                index = esys.tr_from_tpmpublic(EK_CERT_ECC_NV_INDEX)
                public, _ = esys.nv_read_public(index)
                size = public.nvPublic.dataSize
                out = b""
                while len(out) < size:
                    chunk = min(512, size - len(out))
                    out += bytes(esys.nv_read(index, chunk, len(out), auth_handle=ESYS_TR.OWNER))
                return out
        except TSS2_Exception as exc:
            log.debug("vTPM: no EK certificate: %s", exc)
            return None

    def quote(self, nonce: bytes, pcrs: tuple[int, ...] = LAUNCH_PCRS, alg: int = TPM_ALG_SHA256) -> dict[str, Any]:
        """A TPM2_Quote by the AK over ``pcrs`` of bank ``alg`` with ``nonce`` as qualifying data, with the
        PCR values, the event log and the AK's public key: the bundle `kvmlet attest verify` checks."""
        import base64

        from tpm2_pytss import TPM2_ALG, TPM2B_DATA, TPML_PCR_SELECTION, TPMT_SIG_SCHEME

        if len(nonce) > 64:
            raise TpmError(f"a nonce is at most 64 bytes, not {len(nonce)}")
        name = ALGORITHMS[alg][0]
        selection = TPML_PCR_SELECTION.parse(f"{name}:{','.join(map(str, sorted(pcrs)))}")
        with self._lock:
            for _ in range(5):       # the guest may extend meanwhile: values read before and after must agree
                before = self.pcr_values(tuple(sorted(pcrs)), alg)
                with self.esys() as esys:
                    handle = esys.tr_from_tpmpublic(AK_HANDLE)
                    quoted, signature = esys.quote(handle, selection, TPM2B_DATA(nonce),
                                                   TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
                if self.pcr_values(tuple(sorted(pcrs)), alg) == before:
                    break
            else:
                raise TpmError("the PCRs kept changing while they were quoted")
            certificate = self.ek_certificate()
            return {
                "kvmlet_quote": 1,
                "nonce": nonce.hex(),
                "bank": name,
                "pcrs": {str(index): value.hex() for index, value in sorted(before.items())},
                "quoted": base64.b64encode(bytes(quoted)).decode(),
                "signature": base64.b64encode(signature.marshal()).decode(),
                "ak_public": self.ak_public_pem().decode(),
                "event_log": base64.b64encode(self.event_log).decode(),
                "ek_certificate": base64.b64encode(certificate).decode() if certificate else None,
            }

    def extend(self, pcr: int, data: bytes, locality: int = 0) -> None:
        """Extend ``pcr`` of every bank with the digests of ``data`` (tests, the API)."""
        from tpm2_pytss import ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

        from kvmlet.tpm.eventlog import digest

        values = TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG(alg), digest=TPMU_HA(
            **{ALGORITHMS[alg][0]: digest(alg, data)})) for alg in BANKS])
        with self.esys(locality) as esys:
            esys.pcr_extend(ESYS_TR.parse(f"PCR{pcr}"), values)

    # -- status and teardown ------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.swtpm is not None and self.swtpm.alive

    def stats(self) -> VtpmStats:
        swtpm = self.swtpm.stats if self.swtpm is not None else SwtpmStats()
        return VtpmStats(swtpm=swtpm, launch_ms=self.launch_ms,
                         measured_bytes=sum(len(m.payload) for m in self.measurements))

    def close(self) -> None:
        """Stop swtpm and remove the run directory (and the state, unless it is a kept state_dir)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self.swtpm is not None:
                    self.swtpm.close()
                    if self._write_back is not None and self.swtpm.stats.deaths == 0:
                        self._copy_back(self._write_back)
            finally:
                shutil.rmtree(self.run_dir, ignore_errors=True)

    def _copy_back(self, target: Path) -> None:
        """Replace the TPM state in ``target`` with this (restored) TPM's, file by file, atomically."""
        try:
            target.mkdir(parents=True, exist_ok=True)
            for path in self.state_dir.iterdir():
                if path.is_file() and not path.name.startswith("."):
                    partial = target / f".{path.name}.kvmlet"
                    shutil.copyfile(path, partial)
                    os.replace(partial, target / path.name)
        except OSError as exc:
            log.error("vTPM: the restored TPM's state could not be written back to %s: %s", target, exc)


def remove_stale_run_dirs(directory: Path | None = None) -> None:
    """Remove the run directories (in ``directory``, default the temporary directory) of kvmlet processes that
    are gone: killed before they could clean up, their swtpm exited with them, the directory stayed."""
    for path in (directory or Path(tempfile.gettempdir())).glob(f"{RUN_DIR_PREFIX}*-*"):
        pid = path.name.removeprefix(RUN_DIR_PREFIX).split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)


def _selected(selection: Any) -> list[int]:
    """The PCR indices a TPML_PCR_SELECTION selects, in order."""
    out: list[int] = []
    for item in selection.pcrSelections[:selection.count]:
        bits = [item.pcrSelect[index] for index in range(item.sizeofSelect)]
        out += [8 * byte + bit for byte, value in enumerate(bits) for bit in range(8) if value >> bit & 1]
    return out
