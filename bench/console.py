"""A VMM process with its serial console on a pipe: when each byte arrived, what it printed, its memory.

Timestamps are ``time.perf_counter()`` (CLOCK_MONOTONIC) in this process: ``spawned_at`` is taken right
before the process is created and every chunk read from its stdout is stamped as it arrives, so "first
guest byte" is measured from outside, the same way for every VMM.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from types import TracebackType

from bench.vmms import Launch


class BenchError(RuntimeError):
    """A benchmark run went wrong (a VMM failed, timed out or printed something unexpected)."""


@dataclass(frozen=True)
class Mapping:
    """One VMA from /proc/PID/smaps (sizes in bytes)."""

    name: str
    size: int
    rss: int
    pss: int
    private: int


def read_smaps(pid: int) -> list[Mapping]:
    """Every mapping of process ``pid`` with its size, Rss, Pss and private bytes."""
    mappings: list[Mapping] = []
    fields: dict[str, int] = {}
    name: str | None = None

    def flush() -> None:
        if name is not None:
            mappings.append(Mapping(name, fields.get("Size", 0), fields.get("Rss", 0), fields.get("Pss", 0),
                                    fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)))

    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if parts[0].endswith(":"):
                if len(parts) == 3 and parts[2] == "kB":
                    fields[parts[0][:-1]] = int(parts[1]) * 1024
                continue
            flush()
            fields = {}
            name = " ".join(parts[5:])
    flush()
    return mappings


def read_rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup: the process's Rss, Pss, ... in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[0].endswith(":") and parts[2] == "kB":
                out[parts[0][:-1]] = int(parts[1]) * 1024
    return out


class ConsoleProcess:
    """Start a VMM with stdout on a pipe read by a thread that stamps each chunk's arrival."""

    def __init__(self, launch: Launch, *, stdin_pipe: bool = False, origin_env: str | None = None) -> None:
        """``origin_env``: an environment variable that receives ``spawned_at`` (for kvmlet's boot timer)."""
        self.launch = launch
        self._buffer = bytearray()
        self._chunks: list[tuple[float, int]] = []   # (arrival time, buffer length after the chunk)
        self._changed = threading.Condition()
        self._eof = False
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.exited_at: float | None = None
        env = launch.env
        self.spawned_at = time.perf_counter()
        if origin_env is not None:
            env = {**env, origin_env: repr(self.spawned_at)}
        self.proc = subprocess.Popen(launch.argv, stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=self._stderr, env=env,
                                     cwd=launch.cwd, bufsize=0, start_new_session=True)
        assert self.proc.stdout is not None
        self._stdout_fd = self.proc.stdout.fileno()
        self._reader = threading.Thread(target=self._read, name=f"bench-{launch.side}-console", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._stdout_fd, 65536)
            except OSError:
                data = b""
            now = time.perf_counter()
            with self._changed:
                if not data:
                    self._eof = True
                    self._changed.notify_all()
                    return
                self._buffer += data
                self._chunks.append((now, len(self._buffer)))
                self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> bytes:
        with self._changed:
            return bytes(self._buffer)

    def text(self) -> str:
        return self.output().decode(errors="replace")

    def stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def first_byte_at(self, timeout: float) -> float:
        """When the first byte arrived on the console."""
        with self._changed:
            if not self._changed.wait_for(lambda: bool(self._chunks) or self._eof, timeout):
                raise self._failure("no console output", timeout)
            if not self._chunks:
                raise self._failure("no console output before the process ended", timeout)
            return self._chunks[0][0]

    def wait_for(self, pattern: bytes, timeout: float, start: int = 0) -> tuple[float, int]:
        """When ``pattern`` (at or after offset ``start``) had fully arrived, and the offset after it."""
        found = -1

        def present() -> bool:
            nonlocal found
            found = self._buffer.find(pattern, start)
            return found >= 0 or self._eof

        with self._changed:
            if not self._changed.wait_for(present, timeout) or found < 0:
                raise self._failure(f"{pattern.decode(errors='replace')!r} not seen", timeout)
            end = found + len(pattern)
            for at, length in self._chunks:
                if length >= end:
                    return at, end
        raise AssertionError("a found pattern lies in a chunk")

    def _failure(self, what: str, timeout: float) -> BenchError:
        tail = self.output()[-400:].decode(errors="replace")
        status = self.proc.poll()
        state = f"exited with {status}" if status is not None else f"still running after {timeout:g} s"
        return BenchError(f"{self.launch.side}: {what} ({state}); console tail: {tail!r}; "
                          f"stderr: {self.stderr_text()[-400:]!r}")

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to end; ``exited_at`` is when waitpid returned."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self._failure("did not exit", timeout) from None
        self.exited_at = time.perf_counter()
        self._reader.join(5)
        return code

    def check_exit(self, timeout: float, guest_status: int = 0) -> float:
        """Wait for exit and check that it reports ``guest_status``; returns when it exited."""
        code = self.wait_exit(timeout)
        expected = self.launch.expected_returncode(guest_status)
        if code != expected:
            raise self._failure(f"exit status {code}, expected {expected}", timeout)
        assert self.exited_at is not None
        return self.exited_at

    def memory(self) -> list[Mapping]:
        return read_smaps(self.proc.pid)

    def close(self) -> None:
        """Kill the process if it still runs and release its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._stderr.close()

    def __enter__(self) -> ConsoleProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
