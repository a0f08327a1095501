"""API: process start to the API answering, and InstanceStart to the first guest byte in a running server.

Start-up: ``kvmlet serve --api-sock S --console none`` from spawn to a complete ``200`` answer to ``GET /``
on S, against QEMU (microvm, stopped with ``-S``, no guest) from spawn to its QMP greeting on a Unix
socket: each VMM's control socket answering, a fresh process per run, alternating. Both sockets are
polled with ``connect()`` every 0.25 ms until one succeeds. Then, kvmlet only: in a running server
configured through the API (``PUT /boot-source``, ``PUT /machine-config``: the test guest, 1 vCPU, 64 MiB,
console on a FIFO this process reads), from sending ``PUT /actions`` InstanceStart to the arrival of the
guest's first console byte, after the server has been up for ``SETTLE_SECONDS``. The HTTP client is a
few lines of HTTP/1.1 over the socket (standard library).
"""

from __future__ import annotations

import json
import os
import select
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.console import BenchError, ConsoleProcess
from bench.context import Context, alternate
from bench.model import BenchResult, Row, Series, Target, paired_row
from bench.vmms import QEMU_CPU, Launch, kvmlet_env

NAME = "api"
GUEST_MEMORY_MIB = 64
GUEST_CMDLINE = "console=ttyS0 kvmlet.test="     # the banner, no checks, exit
GUEST_DONE = b"TESTS DONE 0 0"
POLL_SECONDS = 0.00025          # between connect() attempts while the VMM starts
GET_ROUND_TRIPS = 20            # GET / on a ready server, per run
TIMEOUT = 60.0
INSTANCE_INFO_KEYS = {"id", "state", "vmm_version", "app_name"}
FIRECRACKER_READY = "Firecracker: ~12 ms to its API socket"
NO_SITE = "kvmlet-S"   # python -S: no site module (kvmlet's dependencies put on PYTHONPATH by kvmlet_env)


class HttpClient:
    """HTTP/1.1 on a connected Unix socket: keep-alive, bodies with a Content-Length (or none)."""

    def __init__(self, sock: socket.socket, side: str) -> None:
        self.sock = sock
        self.side = side
        self._buffer = bytearray()

    def send(self, method: str, path: str, body: dict[str, Any] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + data)

    def receive(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise BenchError(f"{self.side}: the API closed the connection mid-response: {bytes(self._buffer)!r}")
        self._buffer += data

    def parsed(self) -> tuple[int, bytes] | None:
        """The next complete response (status, body), taken from the buffer; None while incomplete."""
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = bytes(self._buffer[:end]).split(b"\r\n")
        parts = lines[0].split(maxsplit=2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise BenchError(f"{self.side}: not an HTTP response: {lines[0]!r}")
        status = int(parts[1])
        length: int | None = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            if status != 204 and status != 304 and status >= 200:
                raise BenchError(f"{self.side}: a {status} response without Content-Length")
            length = 0
        if len(self._buffer) < end + 4 + length:
            return None
        body = bytes(self._buffer[end + 4:end + 4 + length])
        del self._buffer[:end + 4 + length]
        return status, body

    def response(self) -> tuple[int, bytes]:
        while (answer := self.parsed()) is None:
            self.receive()
        return answer

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                expect: int | None = None) -> bytes:
        self.send(method, path, body)
        status, payload = self.response()
        if expect is not None and status != expect:
            raise BenchError(f"{self.side}: {method} {path} answered {status}, expected {expect}: {payload!r}")
        return payload


SETTLE_SECONDS = 0.5


def _failure(vmm: ConsoleProcess, what: str) -> BenchError:
    status = vmm.proc.poll()
    state = f"exited with {status}" if status is not None else "still running"
    return BenchError(f"{vmm.launch.side}: {what} ({state}); stderr: {vmm.stderr_text()[-600:]!r}")


def connect_when_listening(path: Path, vmm: ConsoleProcess, timeout: float) -> tuple[socket.socket, float]:
    """A connection to the Unix socket ``path`` as soon as the VMM listens on it, and when it succeeded."""
    deadline = time.perf_counter() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        except BaseException:
            sock.close()
            raise
        else:
            connected = time.perf_counter()
            sock.settimeout(timeout)
            return sock, connected
        if vmm.proc.poll() is not None:
            raise _failure(vmm, f"ended before listening on {path}")
        if time.perf_counter() > deadline:
            raise _failure(vmm, f"not listening on {path} after {timeout:g} s")
        time.sleep(POLL_SECONDS)


def check_instance_info(payload: bytes, side: str, state: str = "Not started") -> None:
    info = json.loads(payload)
    if not isinstance(info, dict) or not info.keys() >= INSTANCE_INFO_KEYS or info["state"] != state:
        raise BenchError(f"{side}: GET / answered {payload!r}")


# -- process start to the API answering -----------------------------------------------------------------
@dataclass
class ReadyRun:
    listening_ms: float     # spawn to the first connect() that succeeded
    answered_ms: float      # spawn to the whole answer: GET / 200 and its body, or QMP's greeting line


@dataclass(frozen=True)
class Contender:
    launch: Launch
    sock: Path
    qmp: bool = False


def serve_launch(api_sock: Path, console: str, python_flags: tuple[str, ...], side: str = "kvmlet") -> Launch:
    argv = [sys.executable, *python_flags, "-m", "kvmlet", "serve", "--api-sock", str(api_sock),
            "--console", console]
    return Launch(side, argv, kvmlet_env(python_flags=python_flags))


def qemu_qmp_launch(qemu: str, qmp_sock: Path) -> Launch:
    argv = [qemu, "-M", "microvm", "-accel", "kvm", "-cpu", QEMU_CPU, "-nographic", "-nodefaults",
            "-qmp", f"unix:{qmp_sock},server,wait=off", "-S"]
    return Launch("qemu", argv, dict(os.environ))


def ready_run(contender: Contender, timeout: float = TIMEOUT) -> ReadyRun:
    contender.sock.unlink(missing_ok=True)
    try:
        with ConsoleProcess(contender.launch) as vmm:
            sock, connected = connect_when_listening(contender.sock, vmm, timeout)
            with sock:
                try:
                    if contender.qmp:
                        answer = b""
                        while not answer.endswith(b"\n"):
                            data = sock.recv(65536)
                            if not data:
                                raise BenchError(f"qemu: QMP closed the connection: {answer!r}")
                            answer += data
                        answered = time.perf_counter()
                        if "QMP" not in json.loads(answer):
                            raise BenchError(f"qemu: not a QMP greeting: {answer!r}")
                    else:
                        client = HttpClient(sock, vmm.launch.side)
                        client.send("GET", "/")
                        status, payload = client.response()
                        answered = time.perf_counter()
                        if status != 200:
                            raise BenchError(f"{vmm.launch.side}: GET / answered {status}: {payload!r}")
                        check_instance_info(payload, vmm.launch.side)
                except (OSError, ValueError) as exc:
                    raise _failure(vmm, f"no answer on {contender.sock}: {exc}") from None
            return ReadyRun(1000 * (connected - vmm.spawned_at), 1000 * (answered - vmm.spawned_at))
    finally:
        contender.sock.unlink(missing_ok=True)


# -- InstanceStart to the first guest byte ----------------------------------------------------------------
@dataclass
class StartRun:
    first_byte_ms: float    # PUT /actions InstanceStart sent -> the guest's first console byte arrived
    response_ms: float      # PUT /actions InstanceStart sent -> its 204 response read
    get_us: float           # median GET / round trip on the ready server, before the VM


def start_run(ctx: Context, launch: Launch, api_sock: Path, fifo: Path, timeout: float = TIMEOUT) -> StartRun:
    api_sock.unlink(missing_ok=True)
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo, 0o600)
    # Read and write: the FIFO can be opened before kvmlet opens it for writing, and never reads as at end.
    console = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with ConsoleProcess(launch) as vmm:
            sock, _ = connect_when_listening(api_sock, vmm, timeout)
            with sock:
                try:
                    return _instance_start(ctx, HttpClient(sock, launch.side), console, vmm, timeout)
                except (OSError, ValueError) as exc:
                    raise _failure(vmm, f"API request failed: {exc}") from None
    finally:
        os.close(console)
        fifo.unlink(missing_ok=True)
        api_sock.unlink(missing_ok=True)


def _instance_start(ctx: Context, api: HttpClient, console: int, vmm: ConsoleProcess, timeout: float) -> StartRun:
    check_instance_info(api.request("GET", "/", expect=200), api.side)
    # a running server: let it finish what it does after its socket answers (it imports the machine-building
    # code on a thread then), as a server does that waits for an orchestrator's first VM
    time.sleep(SETTLE_SECONDS)
    round_trips = []
    for _ in range(GET_ROUND_TRIPS):
        before = time.perf_counter()
        api.request("GET", "/", expect=200)
        round_trips.append(1e6 * (time.perf_counter() - before))
    api.request("PUT", "/boot-source", {"kernel_image_path": str(ctx.guest), "boot_args": GUEST_CMDLINE},
                expect=204)
    api.request("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": GUEST_MEMORY_MIB}, expect=204)
    output = bytearray()
    first: float | None = None
    answered: float | None = None
    poller = select.poll()
    poller.register(console, select.POLLIN)
    poller.register(api.sock.fileno(), select.POLLIN)
    sent = time.perf_counter()
    api.send("PUT", "/actions", {"action_type": "InstanceStart"})
    deadline = sent + timeout
    while answered is None or GUEST_DONE not in output:
        left = deadline - time.perf_counter()
        ready = poller.poll(max(0, int(1000 * left))) if left > 0 else []
        now = time.perf_counter()
        if not ready:
            raise _failure(vmm, f"InstanceStart: response {'read' if answered else 'missing'}, console "
                                f"{bytes(output[-300:])!r} after {timeout:g} s")
        for fd, _ in ready:
            if fd == console:
                try:
                    output += os.read(console, 65536)
                except BlockingIOError:
                    continue
                if first is None and output:
                    first = now
            elif answered is None:
                api.receive()
                answer = api.parsed()
                if answer is not None:
                    answered = now
                    if answer[0] != 204:
                        raise _failure(vmm, f"InstanceStart answered {answer[0]}: {answer[1]!r}")
                    poller.unregister(api.sock.fileno())
    if not output.startswith(b"k"):
        raise BenchError(f"{api.side}: unexpected console output {bytes(output[-300:])!r}")
    assert first is not None
    return StartRun(1000 * (first - sent), 1000 * (answered - sent), statistics.median(round_trips))


def contenders(ctx: Context) -> list[Contender]:
    work = ctx.work_dir
    out = [Contender(serve_launch(work / "api-ready.sock", "none", ctx.python_flags), work / "api-ready.sock")]
    if "-S" not in ctx.python_flags:  # show what skipping site (and its .pth files) saves
        out.append(Contender(serve_launch(work / "api-ready-S.sock", "none", (*ctx.python_flags, "-S"), NO_SITE),
                             work / "api-ready-S.sock"))
    if ctx.qemu is not None:
        out.append(Contender(qemu_qmp_launch(ctx.qemu, work / "qmp.sock"), work / "qmp.sock", qmp=True))
    return out


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME)
    work = ctx.work_dir
    starters = contenders(ctx)
    rounds, warmup = ctx.sizes.cold_rounds, ctx.sizes.warmup
    runs = alternate(starters, rounds, warmup, ready_run,
                     lambda n, order: ctx.log(f"api start-up round {n}: {', '.join(c.launch.side for c in order)}"))
    by_side = dict(zip([c.launch.side for c in starters], runs, strict=True))
    qemu = by_side.get("qemu")
    for side, metric, attribute, extra in (
            ("kvmlet", "process start to the API answering (QEMU: QMP greeting)", "answered_ms",
             {"target": Target(1.0), "reference": FIRECRACKER_READY,
              "note": "kvmlet: serve --console none, a complete 200 answer to GET /; QEMU: microvm -S, no guest"}),
            ("kvmlet", "  process start to the socket accepting connect()", "listening_ms", {}),
            (NO_SITE, "process start to the API answering, python -S", "answered_ms",
             {"target": Target(1.0), "reference": FIRECRACKER_READY,
              "note": "the interpreter without the site module (kvmlet's dependencies on PYTHONPATH)"})):
        if side not in by_side:
            continue
        subject = Series(side, [getattr(r, attribute) for r in by_side[side]])
        baseline = Series("qemu", [getattr(r, attribute) for r in qemu]) if qemu is not None else None
        result.rows.append(paired_row(NAME, metric, "ms", subject, baseline, **extra))

    api_sock, fifo = work / "api.sock", work / "console.fifo"
    launch = serve_launch(api_sock, f"file:{fifo}", ctx.python_flags)
    starts = alternate([launch], rounds, warmup, lambda item: start_run(ctx, item, api_sock, fifo),
                       lambda n, _: ctx.log(f"api InstanceStart round {n}"))[0]
    result.rows += [
        Row(NAME, "InstanceStart request to the first guest byte", "ms",
            Series("kvmlet", [r.first_byte_ms for r in starts]), target=Target(3.0, on="value"),
            reference="Firecracker's 12 ms: another span, see note",
            note=f"a running server, the test guest ({GUEST_MEMORY_MIB} MiB, 1 vCPU) configured through the API, "
                 "console on a FIFO; Firecracker publishes ~12 ms (6-60 ms) from process start to its API "
                 "socket (the first row) and <=125 ms from InstanceStart to a Linux guest's /sbin/init"),
        Row(NAME, "  InstanceStart request to its 204 response", "ms",
            Series("kvmlet", [r.response_ms for r in starts])),
        Row(NAME, "  GET / round trip, server up, no VM", "us", Series("kvmlet", [r.get_us for r in starts])),
    ]
    result.details = {"start_up": {side: [vars(r) for r in rs] for side, rs in by_side.items()},
                      "instance_start": [vars(r) for r in starts],
                      "argv": {"start_up": {c.launch.side: c.launch.argv for c in starters},
                               "instance_start": launch.argv},
                      "guest_cmdline": GUEST_CMDLINE}
    if ctx.qemu is None:
        result.skipped.append("QEMU half: qemu-system-x86_64 not found")
    return result
