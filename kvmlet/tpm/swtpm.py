"""One swtpm process per VM, supervised: provisioning, start, the control channel, the data channel, death.

swtpm (Debian's ``swtpm``) is started as ``swtpm socket --tpm2 --terminate --ctrl type=unixio,clientfd=N``:
its control channel is one end of a socketpair kvmlet keeps, and its data channel another socketpair whose end
is handed over with the control command ``CMD_SET_DATAFD`` (SCM_RIGHTS). No socket file exists anywhere, and
``--terminate`` makes swtpm exit as soon as kvmlet's end of the data channel closes, which the kernel does
when kvmlet exits in any way (even SIGKILL): nothing is left behind.

The control channel (swtpm's ``tpm_ioctl.h``, socket variant) carries big-endian messages: a u32 command code
and the request's fields; the reply is the response's fields, a u32 result first (0: success). The data
channel carries TPM 2.0 commands and responses as they are (a 10-byte header with the size at bytes 2-5).
Commands from the guest (the TIS front end) and from kvmlet (measured launch, quotes) share the data channel;
:meth:`Swtpm.execute` serializes them and sets the locality of each with ``CMD_SET_LOCALITY``.

Provisioning (:func:`provision`) runs ``swtpm_setup``: an EK (ECC P-256) and its certificate signed by
swtpm's local CA, in NV index 0x01c00016, with the SHA-256 and SHA-384 PCR banks active.
"""

from __future__ import annotations

import array
import enum
import logging
import os
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvmlet.tpm.errors import SwtpmDied, TpmError

log = logging.getLogger("kvmlet.tpm")

INSTALL_HINT = "install Debian's swtpm and swtpm-tools packages (scripts/setup.sh does)"
PCR_BANKS = "sha256,sha384"
STATE_FILE = "tpm2-00.permall"      # what swtpm keeps in its state directory once provisioned
CTRL_TIMEOUT = 10.0                  # seconds for a control command
DATA_TIMEOUT = 120.0                 # seconds for a TPM command (an RSA key generation takes seconds)
TPM_HEADER = struct.Struct(">HII")   # tag, size, command code / response code
MAX_RESPONSE = 1 << 20


class Ctrl(enum.IntEnum):
    """swtpm's control commands (tpm_ioctl.h, "Commands used by the non-CUSE TPMs")."""

    GET_CAPABILITY = 1
    INIT = 2
    SHUTDOWN = 3
    GET_TPMESTABLISHED = 4
    SET_LOCALITY = 5
    HASH_START = 6
    HASH_DATA = 7
    HASH_END = 8
    CANCEL_TPM_CMD = 9
    STORE_VOLATILE = 10
    RESET_TPMESTABLISHED = 11
    GET_STATEBLOB = 12
    SET_STATEBLOB = 13
    STOP = 14
    GET_CONFIG = 15
    SET_DATAFD = 16
    SET_BUFFERSIZE = 17


class Blob(enum.IntEnum):
    """The state blobs a TPM's whole state is made of."""

    PERMANENT = 1
    VOLATILE = 2
    SAVESTATE = 3


INIT_DELETE_VOLATILE = 1
HASH_DATA_CHUNK = 4096


def tool(name: str) -> str:
    """The path of swtpm's tool ``name`` or TpmError saying how to install it."""
    path = shutil.which(name)
    if path is None:
        raise TpmError(f"the vTPM needs {name}, which is not installed: {INSTALL_HINT}")
    return path


def is_provisioned(state_dir: Path) -> bool:
    return (state_dir / STATE_FILE).is_file()


def provision(state_dir: Path, *, timeout: float = 60.0) -> None:
    """Manufacture a TPM 2.0 in ``state_dir`` (created if missing): EK and EK certificate, SHA-256 and
    SHA-384 banks. A directory that already holds a TPM is left alone."""
    state_dir.mkdir(parents=True, exist_ok=True)
    if is_provisioned(state_dir):
        return
    command = [tool("swtpm_setup"), "--tpm2", "--tpmstate", str(state_dir), "--create-ek-cert", "--ecc",
               "--pcr-banks", PCR_BANKS, "--not-overwrite"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise TpmError(f"swtpm_setup did not provision {state_dir} within {timeout:g} s") from None
    if done.returncode != 0 or not is_provisioned(state_dir):
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise TpmError(f"swtpm_setup could not provision a TPM in {state_dir} (exit {done.returncode}): "
                       f"{lines[-1] if lines else 'no output'}")


@dataclass
class SwtpmStats:
    """What the metrics show of the vTPM's back end."""

    commands: int = 0
    failed_commands: int = 0   # commands that got no response from swtpm (answered with TPM_RC_FAILURE)
    deaths: int = 0            # 1 once swtpm died while the VM ran
    alive: int = 0


class Swtpm:
    """A running swtpm and kvmlet's two channels to it (see the module's docstring)."""

    def __init__(self, process: subprocess.Popen[bytes], ctrl: socket.socket, data: socket.socket,
                 log_path: Path) -> None:
        self.process = process
        self.ctrl = ctrl
        self.data = data
        self.log_path = log_path
        self.stats = SwtpmStats(alive=1)
        self.on_death: list[Callable[[str], None]] = []
        self._lock = threading.RLock()      # one exchange at a time on either channel
        self._locality = -1
        self._closing = False
        self._dead_reason: str | None = None
        self._monitor = threading.Thread(target=self._watch, name="kvmlet-swtpm-monitor", daemon=True)
        self._monitor.start()

    @classmethod
    def start(cls, state_dir: Path, log_path: Path) -> Swtpm:
        """Start swtpm on ``state_dir`` (provisioned or holding state to be set) with its log at
        ``log_path``; the TPM is not initialized yet (:meth:`init`)."""
        binary = tool("swtpm")
        ctrl, ctrl_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        data, data_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        process = None
        try:
            with open(log_path, "ab") as log_file:
                process = subprocess.Popen(
                    [binary, "socket", "--tpm2", "--terminate", "--tpmstate", f"dir={state_dir}",
                     "--ctrl", f"type=unixio,clientfd={ctrl_peer.fileno()}",
                     "--log", f"file={log_path}"],
                    pass_fds=(ctrl_peer.fileno(),), stdin=subprocess.DEVNULL, stdout=log_file,
                    stderr=log_file, start_new_session=True)
            ctrl_peer.close()
            ctrl.settimeout(CTRL_TIMEOUT)
            data.settimeout(DATA_TIMEOUT)
            swtpm = cls(process, ctrl, data, log_path)
        except BaseException:
            for sock in (ctrl, ctrl_peer, data, data_peer):
                sock.close()
            if process is not None:
                process.kill()
                process.wait()
            raise
        try:
            swtpm._control(Ctrl.SET_DATAFD, fds=[data_peer.fileno()])
        except BaseException:
            swtpm.close()
            raise
        finally:
            data_peer.close()
        return swtpm

    # -- supervision --------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._dead_reason is None and self.process.poll() is None

    @property
    def pid(self) -> int:
        return self.process.pid

    def _watch(self) -> None:
        code = self.process.wait()
        if self._closing:
            return
        self._died(f"swtpm (pid {self.process.pid}) exited with status {code}{self._last_log_line()}")

    def _died(self, reason: str) -> None:
        with self._lock:
            if self._dead_reason is not None or self._closing:
                return
            self._dead_reason = reason
            self.stats.deaths = 1
            self.stats.alive = 0
        log.error("vTPM: %s; the guest's TPM commands fail from now on", reason)
        for callback in list(self.on_death):
            callback(reason)

    def _last_log_line(self) -> str:
        try:
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        return f" ({lines[-1].strip()})" if lines else ""

    def _check_alive(self) -> None:
        if self._dead_reason is not None:
            raise SwtpmDied(f"the vTPM is gone: {self._dead_reason}")

    # -- control channel ----------------------------------------------------------------------------
    def _control(self, command: Ctrl, payload: bytes = b"", *, fds: list[int] | None = None,
                 reply: int = 4) -> bytes:
        """Send a control command, return its ``reply`` bytes (TpmError unless the result is 0)."""
        with self._lock:
            self._check_alive()
            message = struct.pack(">I", command) + payload
            try:
                if fds:
                    self.ctrl.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                else:
                    self.ctrl.sendall(message)
                answer = self._recv_exact(self.ctrl, reply)
            except OSError as exc:
                self._died(f"swtpm's control channel failed ({exc}){self._last_log_line()}")
                self._check_alive()
                raise
        result = struct.unpack_from(">I", answer)[0]
        if result != 0:
            raise TpmError(f"swtpm refused control command {command.name} (TPM result {result:#x})"
                           f"{self._last_log_line()}")
        return answer

    def _recv_exact(self, sock: socket.socket, count: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < count:
            chunk = sock.recv(count - len(chunks))
            if not chunk:
                raise ConnectionResetError("swtpm closed the channel")
            chunks += chunk
        return bytes(chunks)

    def init(self, *, delete_volatile: bool = False) -> None:
        """CMD_INIT: power the TPM on (with the state set by :meth:`set_state_blob`, if any)."""
        self._control(Ctrl.INIT, struct.pack(">I", INIT_DELETE_VOLATILE if delete_volatile else 0))
        self._locality = -1

    def stop(self) -> None:
        """CMD_STOP: the TPM stops executing commands (before its state blobs are set)."""
        self._control(Ctrl.STOP)

    def set_locality(self, locality: int) -> None:
        with self._lock:
            if locality != self._locality:
                self._control(Ctrl.SET_LOCALITY, bytes([locality]))
                self._locality = locality

    def established(self) -> bool:
        """The TPM's tpmEstablished flag (a dynamic launch happened since it was last reset)."""
        answer = self._control(Ctrl.GET_TPMESTABLISHED, reply=8)
        return bool(answer[4])

    def dynamic_launch(self, data: bytes) -> None:
        """A dynamic root of trust measurement (_TPM_Hash_Start, _TPM_Hash_Data, _TPM_Hash_End, as a TXT
        SINIT does at locality 4): PCRs 17-22 are reset to zero, then PCR 17 of every bank is extended with
        the digest of ``data``."""
        with self._lock:
            self._control(Ctrl.HASH_START)
            for at in range(0, len(data), HASH_DATA_CHUNK):
                chunk = data[at:at + HASH_DATA_CHUNK]
                self._control(Ctrl.HASH_DATA, struct.pack(">I", len(chunk)) + chunk)
            self._control(Ctrl.HASH_END)

    def get_state_blob(self, blob: Blob) -> bytes:
        """One of the TPM's state blobs, decrypted (the TPM must not be executing a command)."""
        with self._lock:
            header = self._control(Ctrl.GET_STATEBLOB, struct.pack(">III", 0, blob, 0), reply=16)
            _, _flags, total, length = struct.unpack(">IIII", header)
            try:
                data = bytearray(self._recv_exact(self.ctrl, length))
                while len(data) < total:   # the socket variant sends it whole; read on if it did not
                    chunk = self.ctrl.recv(total - len(data))
                    if not chunk:
                        raise ConnectionResetError("swtpm closed the channel")
                    data += chunk
            except OSError as exc:
                self._died(f"swtpm's control channel failed ({exc})")
                raise SwtpmDied(f"the vTPM is gone: {exc}") from None
            return bytes(data)

    def set_state_blob(self, blob: Blob, data: bytes) -> None:
        """Set a state blob (after :meth:`stop`, or before the first :meth:`init`)."""
        self._control(Ctrl.SET_STATEBLOB, struct.pack(">III", 0, blob, len(data)) + data)

    # -- data channel -------------------------------------------------------------------------------
    def execute(self, command: bytes, locality: int = 0) -> bytes:
        """Run one TPM command at ``locality`` and return its response (SwtpmDied if swtpm is gone)."""
        with self._lock:
            self._check_alive()
            self.stats.commands += 1
            try:
                self.set_locality(locality)
                self.data.sendall(command)
                header = self._recv_exact(self.data, TPM_HEADER.size)
                size = TPM_HEADER.unpack(header)[1]
                if not TPM_HEADER.size <= size <= MAX_RESPONSE:
                    raise ConnectionResetError(f"swtpm sent a response of size {size}")
                return header + self._recv_exact(self.data, size - TPM_HEADER.size)
            except OSError as exc:
                self.stats.failed_commands += 1
                self._died(f"swtpm's data channel failed ({exc})")
                raise SwtpmDied(f"the vTPM is gone: {self._dead_reason}") from None
            except SwtpmDied:
                self.stats.failed_commands += 1
                raise

    # -- teardown -----------------------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """Shut the TPM down (its state is saved in its directory) and reap swtpm (idempotent)."""
        with self._lock:
            if self._closing:
                return
            alive = self._dead_reason is None and self.process.poll() is None
            if alive:
                try:
                    self._control(Ctrl.SHUTDOWN)   # swtpm saves its state and exits
                except (OSError, TpmError):
                    pass
            self._closing = True
            self.stats.alive = 0
        self.ctrl.close()
        self.data.close()     # --terminate: swtpm exits when its data channel closes
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._monitor.join(timeout)

    def kill(self) -> None:
        """SIGKILL swtpm (tests: a back end that dies under a running guest)."""
        os.kill(self.process.pid, 9)
