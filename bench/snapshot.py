"""Snapshots: create and restore at 128 MiB, 1 GiB and 4 GiB, against QEMU's save to a file and -incoming.

One guest for every part, on both VMMs (1 vCPU): ``kvmlet.test=touch,echo,touch,touch,echo``. It writes
``touch_mib`` MiB (one byte per 4 KiB page at CPL3, from 16 MiB), then waits in ``echo`` (HLT, woken by the
UART's IRQ), where it is paused and saved. The restored guest is sent ``quit``: it echoes it, writes the same
pages twice more (a line after each pass) and waits in ``echo`` again, alive, so its resident memory can be
read; a second ``quit`` ends it.

kvmlet (``kvmlet serve``, the Firecracker API): ``PATCH /vm`` Paused, ``PUT /snapshot/create`` (Full), then in
fresh server processes, started and settled beforehand, ``PUT /snapshot/load`` with ``resume_vm`` once with
``mem_copy`` "none" (guest memory mapped copy on write from the memory file: a page is copied at the guest's
first write to it) and once with "background" (a thread copies the whole memory file in right after the
restore). Console: a FIFO for the first server, a socket console (``socket:PATH``) for the restored ones.
QEMU (microvm, PVH, the same ELF and command line): QMP ``stop``, ``migrate "exec:cat > FILE"`` (polling
``query-migrate`` until completed; max-bandwidth raised so QEMU's 128 MiB/s default does not throttle a save
to a local file), then a QEMU started beforehand with ``-incoming defer -S``: ``migrate-incoming "exec:cat
FILE"``, poll until completed, ``cont``. Console on the process's stdin/stdout.

Every time is taken by this process (``time.perf_counter()``): a request's round trip from right before it
is sent to its whole answer, a console line from its arrival.
"""

from __future__ import annotations

import functools
import json
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.api import HttpClient, connect_when_listening, serve_launch
from bench.console import BenchError, ConsoleProcess, read_smaps
from bench.context import Context, Sizes, alternate
from bench.model import BenchResult, Row, Series, Target, paired_row
from bench.vmms import Launch, qemu_launch

NAME = "snapshot"
SUMMARY = "snapshot create and restore (128 MiB-4 GiB guests) against QEMU's migrate to a file and -incoming"
MiB = 1 << 20
TIMEOUT = 120.0
SETTLE_SECONDS = 0.5        # a restoring server has been up this long (it imports the machine code on a thread)
POLL_SECONDS = 0.0005       # between query-migrate polls
COPY_POLL_SECONDS = 0.005   # between reads of a restored kvmlet's resident memory (mem_copy background)
COPY_TIMEOUT = 30.0         # ... for at most this long
UNTHROTTLED = 1 << 40       # QMP max-bandwidth for a save to a local file (bytes/s)
RESTORE_TARGET = Target(5.0, on="value")
FIRECRACKER_RESTORE = "Firecracker: ~4 ms"
_CREATED = re.compile(r"Snapshot created: .* in ([\d.]+) ms \(state ([\d.]+) ms, memory ([\d.]+) ms, "
                      r"state file ([\d.]+) ms\)")


@dataclass
class SnapshotSizes:
    """What the snapshot benchmark does: guest sizes, MiB the guest writes, rounds."""

    guest_mib: tuple[int, ...] = (128, 1024, 4096)
    touch_mib: int = 64
    rounds: int = 5
    warmup: int = 1

    @classmethod
    def tiny(cls) -> SnapshotSizes:
        return cls(guest_mib=(32,), touch_mib=4, rounds=1, warmup=0)

    @classmethod
    def following(cls, sizes: Sizes) -> SnapshotSizes:
        """The default sizes with the run's rounds and warm-up."""
        return cls(rounds=sizes.rounds, warmup=sizes.warmup)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def cmdline(self) -> str:
        return f"console=ttyS0 kvmlet.test=touch,echo,touch,touch,echo kvmlet.touch={self.touch_mib}"


# -- reading a console that is not a process's stdout ---------------------------------------------------
class StampedStream:
    """Read an fd (a FIFO or a connected socket) on a thread, stamping each chunk's arrival."""

    def __init__(self, fd: int, label: str) -> None:
        self.fd, self.label = fd, label
        self._buffer = bytearray()
        self._chunks: list[tuple[float, int]] = []
        self._changed = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._read, name=f"bench-{label}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while not self._stop:
            if not poller.poll(50):
                continue
            try:
                data = os.read(self.fd, 65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            now = time.perf_counter()
            with self._changed:
                if not data:
                    self._stop = True
                else:
                    self._buffer += data
                    self._chunks.append((now, len(self._buffer)))
                self._changed.notify_all()

    def text(self) -> str:
        with self._changed:
            return self._buffer.decode(errors="replace")

    def wait_for(self, pattern: bytes, timeout: float, start: int = 0) -> tuple[float, int]:
        """When ``pattern`` (at or after offset ``start``) had fully arrived, and the offset after it."""
        found = -1

        def present() -> bool:
            nonlocal found
            found = self._buffer.find(pattern, start)
            return found >= 0 or self._stop

        with self._changed:
            if not self._changed.wait_for(present, timeout) or found < 0:
                raise BenchError(f"{self.label}: {pattern.decode()!r} not on the console after {timeout:g} s; "
                                 f"tail: {bytes(self._buffer[-300:])!r}")
            end = found + len(pattern)
            return next(at for at, length in self._chunks if length >= end), end

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)


# -- QMP -------------------------------------------------------------------------------------------------
class Qmp:
    """QEMU's QMP on a Unix socket: one command at a time; events are skipped."""

    def __init__(self, path: Path, vmm: ConsoleProcess) -> None:
        self.sock, _ = connect_when_listening(path, vmm, TIMEOUT)
        self.file = self.sock.makefile("rwb")
        self.file.readline()                       # the greeting
        self.command("qmp_capabilities")

    def command(self, name: str, **arguments: Any) -> Any:
        message = {"execute": name, **({"arguments": arguments} if arguments else {})}
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()
        while True:
            line = self.file.readline()
            if not line:
                raise BenchError(f"qemu: QMP closed the connection during {name}")
            answer = json.loads(line)
            if "return" in answer:
                return answer["return"]
            if "error" in answer:
                raise BenchError(f"qemu: QMP {name}: {answer['error']}")

    def wait_migration(self) -> None:
        while True:
            status = self.command("query-migrate").get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise BenchError(f"qemu: migration {status}")
            time.sleep(POLL_SECONDS)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


# -- one round ---------------------------------------------------------------------------------------------
@dataclass
class Restored:
    """A restored guest, timed from right before the restore request was sent."""

    restore_ms: float           # kvmlet: the load request's round trip; QEMU: migrate-incoming to cont's answer
    answer_ms: float            # to the arrival of the guest's echo of "quit" (sent right after the restore)
    first_pass_ms: float        # "quit" sent to the first pass over touch_mib MiB done (its line arrived)
    second_pass_ms: float       # the second pass (every page already the VM's own)
    resident_mib: float         # guest RAM resident after the passes
    all_resident_ms: float | None = None   # mem_copy background: to all guest RAM resident (None: not reached)


@dataclass
class SnapshotRun:
    pause_ms: float
    create_ms: float            # the create request's round trip (QEMU: migrate sent to query-migrate completed)
    files: dict[str, tuple[int, int]]   # file name -> (apparent bytes, allocated bytes)
    restores: dict[str, Restored]       # kvmlet: "none", "background"; QEMU: "qemu"
    log_ms: dict[str, float] = field(default_factory=dict)   # kvmlet's own account of the create

    def size_mib(self, allocated: bool) -> float:
        return sum(sizes[1 if allocated else 0] for sizes in self.files.values()) / MiB


def file_sizes(*paths: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for path in paths:
        info = path.stat()
        out[path.name] = (info.st_size, info.st_blocks * 512)
    return out


def guest_resident_mib(pid: int, memory_file: str | None, guest_bytes: int) -> float:
    """Resident guest RAM: kvmlet's mappings of the memory file, QEMU's mappings at least as large as RAM."""
    mappings = read_smaps(pid)
    if memory_file is not None:
        return sum(m.rss for m in mappings if m.name == memory_file) / MiB
    return sum(m.rss for m in mappings if m.size >= guest_bytes) / MiB


def process_resident_mib(pid: int) -> float:
    """The process's whole resident memory, from its counters (/proc/PID/statm: no page-table walk)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def copy_probe(pid: int, memory_file: str, guest_mib: int) -> Callable[[], bool]:
    """A cheap test of kvmlet's whole guest RAM being resident: the process's resident memory less what is
    not guest RAM now (smaps, read once: reading it walks the page tables, which would slow the copy)."""
    other = process_resident_mib(pid) - guest_resident_mib(pid, memory_file, guest_mib * MiB)
    return lambda: process_resident_mib(pid) - other >= guest_mib - 1


def after_restore(send: Callable[[bytes], None], wait_for: Callable[[bytes, float, int], tuple[float, int]],
                  sent: float, restored: float, resident: Callable[[], float],
                  make_copy_test: Callable[[], Callable[[], bool]] | None = None) -> Restored:
    """Send "quit" to the restored guest and time its answer and its two passes over the touched pages;
    with ``make_copy_test`` (which makes a test of all guest RAM being resident), then wait for that test
    to pass, at most ``COPY_TIMEOUT``."""
    quit_sent = time.perf_counter()
    send(b"quit\n")
    answered, offset = wait_for(b"ECHO quit\n", TIMEOUT, 0)
    first, offset = wait_for(b"TEST touch PASS\n", TIMEOUT, offset)
    second, offset = wait_for(b"TEST touch PASS\n", TIMEOUT, offset)
    wait_for(b"READY echo\n", TIMEOUT, offset)
    resident_mib = resident()
    all_resident: float | None = None
    if make_copy_test is not None:
        copied = make_copy_test()
        deadline = time.perf_counter() + COPY_TIMEOUT
        while all_resident is None and time.perf_counter() < deadline:
            if copied():
                all_resident = 1000 * (time.perf_counter() - sent)
            else:
                time.sleep(COPY_POLL_SECONDS)
    send(b"quit\n")
    wait_for(b"TESTS DONE 5 0\n", TIMEOUT, offset)
    return Restored(1000 * (restored - sent), 1000 * (answered - sent), 1000 * (first - quit_sent),
                    1000 * (second - first), resident_mib, all_resident)


class KvmletSide:
    """One kvmlet round: a server boots the guest and snapshots it; two fresh servers restore it."""

    side = "kvmlet"

    def __init__(self, ctx: Context, sizes: SnapshotSizes, guest_mib: int, work: Path) -> None:
        self.ctx, self.sizes, self.guest_mib, self.work = ctx, sizes, guest_mib, work
        self.calls = 0

    def run(self) -> SnapshotRun:
        work = self.work
        modes = ["none", "background"] if self.calls % 2 == 0 else ["background", "none"]
        self.calls += 1
        fifo = work / "console.fifo"
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo, 0o600)
        console_fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        console = StampedStream(console_fd, "kvmlet console")
        restorers = {mode: ConsoleProcess(serve_launch(work / f"restore-{mode}.sock",
                                                       f"socket:{work / f'console-{mode}.sock'}",
                                                       self.ctx.python_flags, side=f"kvmlet-{mode}"))
                     for mode in modes}
        source = ConsoleProcess(serve_launch(work / "source.sock", f"file:{fifo}", self.ctx.python_flags))
        state, memory = work / "kvmlet.snap", work / "kvmlet.mem"
        try:
            ready = {mode: self._ready(vmm, work / f"restore-{mode}.sock") for mode, vmm in restorers.items()}
            sock, _ = connect_when_listening(work / "source.sock", source, TIMEOUT)
            with sock:
                api = HttpClient(sock, "kvmlet")
                api.request("PUT", "/boot-source", {"kernel_image_path": str(self.ctx.guest),
                                                    "boot_args": self.sizes.cmdline()}, expect=204)
                api.request("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": self.guest_mib},
                            expect=204)
                api.request("PUT", "/actions", {"action_type": "InstanceStart"}, expect=204)
                console.wait_for(b"READY echo\n", TIMEOUT)
                for client, _ in ready.values():
                    client.request("GET", "/", expect=200)
                settled = max(at for _, at in ready.values()) + SETTLE_SECONDS
                time.sleep(max(0.0, settled - time.perf_counter()))
                pause_ms = _timed(lambda: api.request("PATCH", "/vm", {"state": "Paused"}, expect=204))
                create_ms = _timed(lambda: api.request("PUT", "/snapshot/create", {
                    "snapshot_path": str(state), "mem_file_path": str(memory), "snapshot_type": "Full"},
                    expect=204))
            run = SnapshotRun(pause_ms, create_ms, file_sizes(state, memory), {}, _created_log(source))
            source.close()
            for mode in modes:
                run.restores[mode] = self._restore(restorers[mode], ready[mode][0], mode, state, memory)
            return run
        finally:
            for vmm in (source, *restorers.values()):
                vmm.close()
            console.close()
            os.close(console_fd)
            sockets = [work / "source.sock", *(work / f"{kind}-{mode}.sock" for kind in ("restore", "console")
                                                for mode in modes)]
            for path in (fifo, state, memory, *sockets):
                path.unlink(missing_ok=True)

    def _ready(self, vmm: ConsoleProcess, path: Path) -> tuple[HttpClient, float]:
        sock, _ = connect_when_listening(path, vmm, TIMEOUT)
        client = HttpClient(sock, vmm.launch.side)
        client.request("GET", "/", expect=200)
        return client, time.perf_counter()

    def _restore(self, vmm: ConsoleProcess, api: HttpClient, mode: str, state: Path, memory: Path) -> Restored:
        body = {"snapshot_path": str(state), "resume_vm": True, "mem_copy": mode,
                "mem_backend": {"backend_type": "File", "backend_path": str(memory)}}
        sent = time.perf_counter()
        api.send("PUT", "/snapshot/load", body)
        status, payload = api.response()
        restored = time.perf_counter()
        if status != 204:
            raise BenchError(f"kvmlet: PUT /snapshot/load (mem_copy {mode}) answered {status}: {payload!r}")
        guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        guest.connect(str(self.work / f"console-{mode}.sock"))
        stream = StampedStream(guest.fileno(), f"kvmlet-{mode} console")
        try:
            return after_restore(guest.sendall, stream.wait_for, sent, restored,
                                 lambda: guest_resident_mib(vmm.pid, str(memory), self.guest_mib * MiB),
                                 functools.partial(copy_probe, vmm.pid, str(memory), self.guest_mib)
                                 if mode == "background" else None)
        except BenchError as exc:
            raise BenchError(f"{exc}; server log: {vmm.stderr_text()[-600:]!r}") from None
        finally:
            stream.close()
            guest.close()
            api.sock.close()


class QemuSide:
    """One QEMU round: QEMU boots the guest and saves it to a file; a QEMU started with -incoming loads it."""

    side = "qemu"

    def __init__(self, ctx: Context, sizes: SnapshotSizes, guest_mib: int, work: Path) -> None:
        assert ctx.qemu is not None
        self.ctx, self.sizes, self.guest_mib, self.work = ctx, sizes, guest_mib, work
        self.qemu = ctx.qemu

    def launch(self, qmp: Path, *extra: str) -> Launch:
        return qemu_launch(self.qemu, self.ctx.guest, self.sizes.cmdline(), self.guest_mib,
                           extra_args=("-qmp", f"unix:{qmp},server,wait=off", *extra))

    def run(self) -> SnapshotRun:
        work = self.work
        saved = work / "qemu.state"
        target = ConsoleProcess(self.launch(work / "qmp-in.sock", "-incoming", "defer", "-S"), stdin_pipe=True)
        source = ConsoleProcess(self.launch(work / "qmp-out.sock"), stdin_pipe=True)
        try:
            incoming = Qmp(work / "qmp-in.sock", target)
            outgoing = Qmp(work / "qmp-out.sock", source)
            source.wait_for(b"READY echo\n", TIMEOUT)
            outgoing.command("migrate-set-parameters", **{"max-bandwidth": UNTHROTTLED})
            pause_ms = _timed(lambda: outgoing.command("stop"))
            started = time.perf_counter()
            outgoing.command("migrate", uri=f"exec:cat > {saved}")
            outgoing.wait_migration()
            create_ms = 1000 * (time.perf_counter() - started)
            outgoing.close()
            source.close()
            run = SnapshotRun(pause_ms, create_ms, file_sizes(saved), {})
            sent = time.perf_counter()
            incoming.command("migrate-incoming", uri=f"exec:cat {saved}")
            incoming.wait_migration()
            incoming.command("cont")
            restored = time.perf_counter()
            run.restores["qemu"] = after_restore(
                target.send, target.wait_for, sent, restored,
                lambda: guest_resident_mib(target.pid, None, self.guest_mib * MiB))
            target.check_exit(TIMEOUT)
            incoming.close()
            return run
        finally:
            for vmm in (source, target):
                vmm.close()
            for path in (saved, work / "qmp-in.sock", work / "qmp-out.sock"):
                path.unlink(missing_ok=True)


def _log_round(ctx: Context, label: str, number: int, order: list[KvmletSide | QemuSide]) -> None:
    ctx.log(f"snapshot {label} round {number}: {', '.join(side.side for side in order)}")


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return 1000 * (time.perf_counter() - started)


def _created_log(vmm: ConsoleProcess) -> dict[str, float]:
    """kvmlet's log line for the create: its total and its parts, in ms."""
    match = _CREATED.search(vmm.stderr_text())
    if match is None:
        return {}
    return dict(zip(("total", "state", "memory", "state file"), map(float, match.groups()), strict=True))


# -- the table ---------------------------------------------------------------------------------------------
def size_label(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib % 1024 == 0 else f"{mib} MiB"


def verdict(none: list[float], background: list[float]) -> str:
    """Which mem_copy serves the restored guest better, from the medians of its first pass."""
    import statistics

    a, b = statistics.median(none), statistics.median(background)
    if a <= b:
        return f"mem_copy none serves the restored guest better here: its first pass takes {a / b:.2f}x background's"
    return f"mem_copy background serves the restored guest better here: its first pass takes {b / a:.2f}x none's"


def rows_for(guest_mib: int, sizes: SnapshotSizes, kvmlet: list[SnapshotRun],
             qemu: list[SnapshotRun] | None) -> list[Row]:
    label = size_label(guest_mib)

    def series(side: str, runs: list[SnapshotRun] | None, value: Callable[[SnapshotRun], float]) -> Series | None:
        return Series(side, [value(run) for run in runs]) if runs is not None else None

    def pair(metric: str, unit: str, value: Callable[[SnapshotRun], float],
             qemu_value: Callable[[SnapshotRun], float] | None = None, **extra: Any) -> Row:
        subject = series("kvmlet", kvmlet, value)
        assert subject is not None
        return paired_row(NAME, metric, unit, subject, series("qemu", qemu, qemu_value or value), **extra)

    def restored(mode: str, attribute: str) -> Callable[[SnapshotRun], float]:
        return lambda run: float(getattr(run.restores[mode], attribute))

    written = f"{label} guest, {sizes.touch_mib} MiB written by the guest"
    rows = [
        pair(f"{label}: create (paused VM to files written)", "ms", lambda r: r.create_ms,
             note=f"{written}; kvmlet: PUT /snapshot/create (Full) round trip; QEMU: migrate exec:cat > FILE "
                  "to query-migrate completed"),
    ]
    for part in ("state", "memory", "state file"):
        if all(part in run.log_ms for run in kvmlet):
            rows.append(Row(NAME, f"  create: {part} (kvmlet's log)", "ms",
                            Series("kvmlet", [run.log_ms[part] for run in kvmlet])))
    rows += [
        pair("  pause (QEMU: stop)", "ms", lambda r: r.pause_ms),
        pair(f"{label}: restore, resume_vm, mem_copy none (QEMU: migrate-incoming to cont)", "ms",
             restored("none", "restore_ms"), restored("qemu", "restore_ms"), target=RESTORE_TARGET,
             reference=FIRECRACKER_RESTORE,
             note=f"{label}: kvmlet: PUT /snapshot/load round trip in a running server; QEMU: a running "
                  "-incoming defer -S process, migrate-incoming exec:cat FILE, query-migrate completed, cont"),
        Row(NAME, "  restore, mem_copy background", "ms",
            Series("kvmlet-bg", [r.restores["background"].restore_ms for r in kvmlet]), target=RESTORE_TARGET),
        pair("  restore request to the guest's first answer (echo)", "ms", restored("none", "answer_ms"),
             restored("qemu", "answer_ms")),
        pair("  snapshot files, allocated on disk", "MiB", lambda r: r.size_mib(True),
             note=f"{label}: kvmlet: state file + memory file (sparse); QEMU: its migration stream"),
        pair("  snapshot files, apparent size", "MiB", lambda r: r.size_mib(False)),
    ]
    none = Series("kvmlet-none", [r.restores["none"].first_pass_ms for r in kvmlet])
    background = Series("kvmlet-bg", [r.restores["background"].first_pass_ms for r in kvmlet])
    second_none = Series("kvmlet-none", [r.restores["none"].second_pass_ms for r in kvmlet])
    rows += [
        paired_row(NAME, f"{label}: first {sizes.touch_mib} MiB pass after restore, mem_copy none vs background",
                   "ms", none, background, note=f"{label}: {verdict(none.values, background.values)}"),
        paired_row(NAME, "  the same, mem_copy none vs QEMU", "ms", none,
                   series("qemu", qemu, restored("qemu", "first_pass_ms"))),
        paired_row(NAME, "  the same, mem_copy background vs QEMU", "ms", background,
                   series("qemu", qemu, restored("qemu", "first_pass_ms"))),
        paired_row(NAME, "  second pass (pages already the VM's), none vs background", "ms", second_none,
                   Series("kvmlet-bg", [r.restores["background"].second_pass_ms for r in kvmlet])),
        paired_row(NAME, "  second pass, mem_copy none vs QEMU", "ms", second_none,
                   series("qemu", qemu, restored("qemu", "second_pass_ms"))),
    ]
    copied = [r.restores["background"].all_resident_ms for r in kvmlet]
    if all(value is not None for value in copied):
        rows.append(Row(NAME, "  mem_copy background: restore request to all guest RAM resident", "ms",
                        Series("kvmlet-bg", [value for value in copied if value is not None])))
    rows.append(paired_row(NAME, "  guest RAM resident after the passes, none vs background", "MiB",
                           Series("kvmlet-none", [r.restores["none"].resident_mib for r in kvmlet]),
                           Series("kvmlet-bg", [r.restores["background"].resident_mib for r in kvmlet])))
    if qemu is not None:
        rows.append(Row(NAME, "  guest RAM resident after the passes, QEMU", "MiB",
                        Series("qemu", [r.restores["qemu"].resident_mib for r in qemu])))
    return rows


def run(ctx: Context, sizes: SnapshotSizes | None = None) -> BenchResult:
    sizes = sizes if sizes is not None else SnapshotSizes.following(ctx.sizes)
    result = BenchResult(NAME)
    work = ctx.work_dir / NAME
    work.mkdir(exist_ok=True)
    details: dict[str, Any] = {"sizes": sizes.to_json(), "cmdline": sizes.cmdline(), "runs": {}}
    for guest_mib in sizes.guest_mib:
        if guest_mib < 16 + sizes.touch_mib + 8:
            raise BenchError(f"a {guest_mib} MiB guest cannot hold {sizes.touch_mib} MiB written from 16 MiB")
        sides: list[KvmletSide | QemuSide] = [KvmletSide(ctx, sizes, guest_mib, work)]
        if ctx.qemu is not None:
            sides.append(QemuSide(ctx, sizes, guest_mib, work))
        runs = alternate(sides, sizes.rounds, sizes.warmup, lambda side: side.run(),
                         functools.partial(_log_round, ctx, size_label(guest_mib)))
        result.rows += rows_for(guest_mib, sizes, runs[0], runs[1] if ctx.qemu is not None else None)
        details["runs"][str(guest_mib)] = {side.side: [asdict(r) for r in side_runs]
                                           for side, side_runs in zip(sides, runs, strict=True)}
    result.details = details
    if ctx.qemu is None:
        result.skipped.append("QEMU half: qemu-system-x86_64 not found")
    return result
