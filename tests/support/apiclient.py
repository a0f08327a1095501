"""A small HTTP client for kvmlet's API on a Unix socket, and a `kvmlet serve` process to test against."""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def call(path: str | Path, method: str, target: str, body: Any = None, *,
         raw: bytes | None = None, timeout: float = 30.0) -> tuple[int, Any]:
    """One request; returns (status, decoded JSON, text, or None)."""
    connection = UnixHTTPConnection(path, timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        connection.request(method, target, body=data, headers=headers)
        response = connection.getresponse()
        payload = response.read()
        if not payload:
            return response.status, None
        if response.getheader("Content-Type", "").startswith("application/json"):
            return response.status, json.loads(payload)
        return response.status, payload.decode()
    finally:
        connection.close()


def wait_for_socket(path: Path, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        if path.exists():
            try:
                call(path, "GET", "/", timeout=2)
                return
            except OSError:
                pass
        time.sleep(0.02)
    raise TimeoutError(f"{path} did not answer within {timeout} s")


class ApiServer:
    """`python -m kvmlet serve` in a child process, its console in a file."""

    def __init__(self, directory: Path, *extra: str, command: tuple[str, ...] = ("serve",),
                 namespace: str | None = None) -> None:
        """In ``directory`` (made if missing); in network namespace ``namespace`` if given (the API socket is a
        path: reachable from any)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.socket = directory / "api.sock"
        self.console = directory / "console.log"
        self.log = directory / "server.log"    # a file, not a pipe nobody reads: a full pipe would block it
        prefix = ["ip", "netns", "exec", namespace] if namespace else []
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [*prefix, sys.executable, "-m", "kvmlet", *command, "--api-sock", str(self.socket),
                 "--console", f"file:{self.console}", *extra],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        wait_for_socket(self.socket, self.process)

    def call(self, method: str, target: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        return call(self.socket, method, target, body, **kwargs)

    def state(self) -> str:
        status, info = self.call("GET", "/")
        assert status == 200, info
        return str(info["state"])

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_console(self, text: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            output = self.console_text()
            if text in output:
                return output
            time.sleep(0.02)
        raise TimeoutError(f"{text!r} not on the console within {timeout} s: {self.console_text()[-500:]!r}")

    def wait_state(self, state: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state() == state:
                return
            time.sleep(0.02)
        raise TimeoutError(f"state {state!r} not reached within {timeout} s (is {self.state()!r})")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def guest_boot_source(guest_elf: Path, tests: str, extra: str = "") -> dict[str, Any]:
    return {"kernel_image_path": str(guest_elf),
            "boot_args": f"console=ttyS0 kvmlet.test={tests} {extra}".strip()}



S = TypeVar("S", bound=ApiServer)


class Servers(Generic[S]):
    """`kvmlet serve` processes of one kind, each in its own directory under ``root``, all stopped at the end."""

    def __init__(self, root: Path, kind: type[S]) -> None:
        self.root = root
        self.kind = kind
        self.started: list[S] = []

    def new(self, name: str, *extra: str, namespace: str | None = None) -> S:
        server = self.kind(self.root / name, *extra, namespace=namespace)
        self.started.append(server)
        return server

    def stop(self) -> None:
        for server in self.started:
            server.stop()


@contextlib.contextmanager
def server_group(root: Path, kind: type[S]) -> Iterator[Servers[S]]:
    """:class:`Servers` for a test (a fixture's body): every one stopped on exit, whatever happened."""
    group = Servers(root, kind)
    try:
        yield group
    finally:
        group.stop()


def ok(reply: tuple[int, Any]) -> None:
    """An API call that answered 204 No Content."""
    assert reply[0] == 204, reply
