"""Live migration of real VMs between `kvmlet serve` processes in two network namespaces joined by a veth pair.

The guest runs the `snapwork` check (guest/README.md): a CPL3 computation that keeps dirtying its memory,
prints a checksum every few rounds and writes numbered records to a virtio-blk drive. Its output does not
depend on time, so a run migrated in the middle must print exactly what an unmigrated run prints, and leave
the same drive. Source and destination share the drive file (one host), as live migration may: only one of
them runs the guest at a time. No test asserts a time: other work shares these hosts.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.apiclient import ApiServer, Servers, guest_boot_source, ok, server_group

SNAPWORK = "kvmlet.snap_mib=8 kvmlet.snap_rounds=300 kvmlet.snap_every=4 kvmlet.snap_steps=1024"
DISK_SIZE = 1 << 20
MEMORY_MIB = 64
SLOW_LINK = 8          # MiB/s: a first pass of about 10 MiB takes more than a second
MIGRATION_TIMEOUT = 60.0


def _root_with_netns() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is missing: apt-get install iproute2"
    return None


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


@dataclass
class NetPair:
    """Two namespaces, "hosts" A and B, joined by a veth pair (10.231.0.1 in A, 10.231.0.2 in B)."""

    a: str
    b: str
    veth_a: str
    veth_b: str
    ip_a: str = "10.231.0.1"
    ip_b: str = "10.231.0.2"

    def link(self, up: bool) -> None:
        run("ip", "-n", self.a, "link", "set", self.veth_a, "up" if up else "down")


@pytest.fixture(scope="module")
def netpair() -> Iterator[NetPair]:
    problem = _root_with_netns()
    if problem is not None:
        pytest.skip(problem)
    suffix = secrets.token_hex(3)
    pair = NetPair(f"kvmig{suffix}a", f"kvmig{suffix}b", f"kvmg{suffix}a", f"kvmg{suffix}b")
    try:
        run("ip", "netns", "add", pair.a)
        run("ip", "netns", "add", pair.b)
        run("ip", "link", "add", pair.veth_a, "netns", pair.a, "type", "veth", "peer", "name", pair.veth_b,
            "netns", pair.b)
        for namespace, veth, address in ((pair.a, pair.veth_a, pair.ip_a), (pair.b, pair.veth_b, pair.ip_b)):
            run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", veth)
            run("ip", "-n", namespace, "link", "set", veth, "up")
            run("ip", "-n", namespace, "link", "set", "lo", "up")
        yield pair
    finally:
        for namespace in (pair.a, pair.b):
            run("ip", "netns", "del", namespace, check=False)


class Server(ApiServer):
    """`kvmlet serve` (in a network namespace if given), with the migration calls."""

    def migration(self) -> dict[str, Any]:
        status, body = self.call("GET", "/migration")
        assert status == 200, body
        return dict(body)

    def listen_address(self) -> str:
        return str(self.migration()["listen_address"])

    def wait_migration(self, done: tuple[str, ...] = ("completed", "failed", "cancelled"),
                       timeout: float = MIGRATION_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.migration()
            if status["state"] in done:
                return status
            time.sleep(0.02)
        raise TimeoutError(f"the migration did not end within {timeout} s: {self.migration()}")

    def wait_bytes(self, count: int, timeout: float = MIGRATION_TIMEOUT) -> dict[str, Any]:
        """Until the outgoing migration has sent ``count`` bytes (it is mid-stream)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.migration()
            assert status["state"] == "active", status
            if status["bytes"] >= count:
                return status
            time.sleep(0.005)
        raise TimeoutError(f"{count} bytes not sent within {timeout} s: {self.migration()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def final_output(self, timeout: float = 120) -> str:
        """The console once the guest has ended (the last line whole)."""
        self.wait_console("TESTS DONE", timeout=timeout)
        self.wait_state("Halted", timeout=timeout)
        return self.console_text()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers[Server]]:
    with server_group(tmp_path, Server) as group:
        yield group


def boot(api: ApiServer, guest_elf: Path, disk: Path, *, metrics: Path | None = None) -> None:
    ok(api.call("PUT", "/boot-source", guest_boot_source(guest_elf, "snapwork", SNAPWORK)))
    ok(api.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": MEMORY_MIB}))
    ok(api.call("PUT", "/drives/data", {"drive_id": "data", "path_on_host": str(disk), "is_root_device": False,
                                        "is_read_only": False}))
    if metrics is not None:
        ok(api.call("PUT", "/metrics", {"metrics_path": str(metrics)}))
    ok(api.call("PUT", "/actions", {"action_type": "InstanceStart"}))


def new_disk(path: Path) -> Path:
    path.write_bytes(bytes(DISK_SIZE))
    return path


def acked_records(output: str) -> list[int]:
    return [int(number) for number in re.findall(r"snapwork record (\d+) acked", output)]


def missing_records(disk: bytes, numbers: list[int]) -> list[int]:
    def present(number: int) -> bool:
        sector = disk[number * 512:(number + 1) * 512]
        return sector.startswith(b"SNAPREC") and struct.unpack_from("<I", sector, 8)[0] == number

    return [number for number in numbers if not present(number)]


def from_banner(output: str) -> str:
    return output[output.index("kvmlet-guest"):]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, guest_elf: Path) -> tuple[str, bytes]:
    """An unmigrated run: its console output and its drive."""
    root = tmp_path_factory.mktemp("reference")
    with server_group(root, Server) as group:
        api = group.new("vm")
        disk = new_disk(root / "disk.img")
        boot(api, guest_elf, disk)
        output = api.final_output()
        assert "TEST snapwork PASS" in output, output[-800:]
        return from_banner(output), disk.read_bytes()


def test_snapwork_migrated_between_namespaces_finishes_as_if_it_had_not_moved(
        netpair: NetPair, servers: Servers, guest_elf: Path, tmp_path: Path, reference: tuple[str, bytes]) -> None:
    """Over TCP on the veth pair, with `kvmlet migrate send` and verify_memory: the memory hashes match at
    the switchover, every record acknowledged before it is on the drive, the output and the drive are the
    unmigrated run's, the source is Halted and its metrics carry the report."""
    expected_output, expected_disk = reference
    destination = servers.new("destination", "--migrate-listen", f"tcp:{netpair.ip_b}:0", namespace=netpair.b)
    source = servers.new("source", namespace=netpair.a)
    disk = new_disk(tmp_path / "disk.img")
    boot(source, guest_elf, disk, metrics=tmp_path / "metrics.json")
    source.wait_console("snapwork round", timeout=60)
    time.sleep(random.Random(0x316).uniform(0.0, 0.3))
    sent = subprocess.run([sys.executable, "-m", "kvmlet", "migrate", "send", "--api-sock", str(source.socket),
                           "--to", destination.listen_address(), "--verify-memory", "--no-progress"],
                          capture_output=True, text=True, timeout=MIGRATION_TIMEOUT)
    assert sent.returncode == 0, (sent.stdout, sent.stderr, source.log_text()[-2000:])
    assert "migrated to tcp:" in sent.stdout and "of downtime" in sent.stdout
    outgoing, incoming = source.migration(), destination.migration()
    assert outgoing["state"] == "completed" and incoming["state"] == "completed", (outgoing, incoming)
    report = outgoing["report"]
    assert report["memory_sha256"] and report["memory_sha256"] == incoming["memory_sha256"]
    assert report["rounds"] >= 2 and report["pages_data"] > 0 and report["pages_zero"] > 0
    assert report["bytes"] == incoming["report"]["bytes"]
    assert source.state() == "Halted"
    before = source.console_text()
    missing = missing_records(disk.read_bytes(), acked_records(before))
    assert not missing, f"acknowledged before the switchover but not on the drive: {missing}"
    after = destination.final_output()
    assert from_banner(before) + after == expected_output
    assert disk.read_bytes() == expected_disk
    ok(source.call("PUT", "/actions", {"action_type": "FlushMetrics"}))
    line = json.loads((tmp_path / "metrics.json").read_text().splitlines()[-1])
    assert line["migration"]["state"] == "completed"
    assert line["migration"]["report_downtime_ms"] == pytest.approx(report["downtime_ms"])
    assert line["migration"]["report_rounds"] == report["rounds"]
    status, text = source.call("GET", "/metrics")
    assert status == 200 and "kvmlet_migration_report_downtime_ms" in text
    config = destination.call("GET", "/vm/config")[1]
    assert config["drives"] == source.call("GET", "/vm/config")[1]["drives"]


# -- failures ----------------------------------------------------------------------------------------------
class FlippingProxy:
    """Relays a Unix-socket stream to another socket, flipping one byte at ``offset`` of the forward direction."""

    def __init__(self, listen: Path, target: Path, offset: int) -> None:
        self.target, self.offset = target, offset
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(listen))
        self.server.listen(1)
        self.flipped = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        client, _ = self.server.accept()
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(str(self.target))
        back = threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True)
        back.start()
        self._pipe(client, upstream, True)
        back.join(5)

    def _pipe(self, source: socket.socket, sink: socket.socket, forward: bool) -> None:
        """Relay one direction; at its end, half-close it (as a TCP relay would): the other goes on."""
        seen = 0
        try:
            while True:
                data = bytearray(source.recv(65536))
                if not data:
                    break
                if forward and not self.flipped and seen <= self.offset < seen + len(data):
                    data[self.offset - seen] ^= 0x40
                    self.flipped = True
                seen += len(data)
                sink.sendall(data)
        except OSError:
            pass
        for end, how in ((source, socket.SHUT_RD), (sink, socket.SHUT_WR)):
            try:
                end.shutdown(how)
            except OSError:
                pass

    def close(self) -> None:
        self.server.close()


def lacking_capture(path: Path) -> str:
    """This host's CPU capture without SSE2 (which every x86-64 VM has); returns the feature's name."""
    captured = run(sys.executable, "-m", "kvmlet", "cpu", "capture").stdout
    data = json.loads(captured)
    for row in data["cpuid"]:
        if int(row["leaf"], 16) == 1:
            row["edx"] = hex(int(row["edx"], 16) & ~(1 << 26))
    data["description"] = "a test host without SSE2"
    path.write_text(json.dumps(data))
    return "sse2"


def assert_cleaned_up(destination: Server, words: str, expected_files: set[str]) -> None:
    """The destination is back to waiting, with no VM, nothing left behind, and says why it failed."""
    deadline = time.monotonic() + 20
    status = destination.migration()
    while (status["state"] != "listening" or not status["error"]) and time.monotonic() < deadline:
        time.sleep(0.02)
        status = destination.migration()
    assert status["state"] == "listening" and words in status["error"], status
    assert destination.state() == "Not started"
    assert {path.name for path in destination.directory.iterdir()} <= expected_files


@pytest.mark.slow
def test_refusal_cancel_corruption_a_dead_destination_and_a_dropped_link_leave_the_source_running(
        netpair: NetPair, servers: Servers, guest_elf: Path, tmp_path: Path, reference: tuple[str, bytes]) -> None:
    """One source VM meets every failure in turn, each mid-stream (but the gate's, before any memory): the
    CPU gate of a destination whose capture lacks a feature the VM has, a cancel, a frame corrupted on the
    way, a destination killed, the link dropped. After each it runs on; the destination has no VM and
    nothing left behind; at the end the guest finishes exactly as an unmigrated run."""
    expected_output, expected_disk = reference
    capture = tmp_path / "lacking.json"
    feature = lacking_capture(capture)
    listen = f"tcp:{netpair.ip_b}:0"
    gated = servers.new("gated", "--migrate-listen", listen, "--migrate-cpu-capture", str(capture),
                        namespace=netpair.b)
    plain = servers.new("plain", "--migrate-listen", listen, namespace=netpair.b)
    local = servers.new("local", "--migrate-listen", f"unix:{tmp_path / 'local' / 'mig.sock'}")
    patient = servers.new("patient", "--migrate-listen", listen, "--migrate-timeout", "2", namespace=netpair.b)
    source = servers.new("source", namespace=netpair.a)
    disk = new_disk(tmp_path / "disk.img")
    boot(source, guest_elf, disk)
    source.wait_console("snapwork round", timeout=60)
    files = {"api.sock", "console.log", "server.log"}

    def send(destination: str, **extra: Any) -> None:
        assert "TESTS DONE" not in source.console_text(), "the guest ended before the failures were done"
        ok(source.call("PUT", "/migration/send", {"destination": destination, "max_bandwidth_mib_s": SLOW_LINK,
                                                  **extra}))

    # the CPU gate: refused before any memory moves
    send(gated.listen_address())
    status = source.wait_migration()
    assert status["state"] == "failed" and feature in status["missing_features"], status
    assert f"lacks {feature}" in status["error"] and "a test host without SSE2" in status["error"]
    assert status["pages_data"] == status["pages_zero"] == status["memory_bytes"] == 0
    assert source.state() == "Running"
    assert_cleaned_up(gated, f"lacks {feature}", files)

    # cancelled mid-stream
    send(plain.listen_address())
    source.wait_bytes(1 << 20)
    ok(source.call("PATCH", "/migration", {"state": "Cancelled"}))
    status = source.wait_migration()
    assert status["state"] == "cancelled" and status["report"]["outcome"] == "cancelled", status
    assert source.state() == "Running"
    assert_cleaned_up(plain, "cancelled", files)
    status, body = source.call("PATCH", "/migration", {"state": "Cancelled"})
    assert status == 400 and "nothing to cancel" in body["fault_message"]

    # a frame corrupted on the way (a relay flips one byte 2 MiB into the stream)
    proxy = FlippingProxy(tmp_path / "proxy.sock", tmp_path / "local" / "mig.sock", 2 << 20)
    try:
        send(f"unix:{tmp_path / 'proxy.sock'}")
        status = source.wait_migration()
    finally:
        proxy.close()
    assert proxy.flipped and status["state"] == "failed" and "checksum" in status["error"], status
    assert source.state() == "Running"
    assert_cleaned_up(local, "checksum", files | {"mig.sock"})

    # the destination killed mid-stream
    send(plain.listen_address())
    source.wait_bytes(1 << 20)
    plain.process.send_signal(signal.SIGKILL)
    plain.process.wait(10)
    status = source.wait_migration()
    assert status["state"] == "failed", status
    assert source.state() == "Running"

    # the link dropped mid-stream: both sides give up after their 2 s timeout
    send(patient.listen_address(), timeout_s=2)
    source.wait_bytes(1 << 20)
    netpair.link(False)
    try:
        status = source.wait_migration()
        assert status["state"] == "failed" and "stalled" in status["error"], status
        assert source.state() == "Running"
        assert_cleaned_up(patient, "stalled", files)
    finally:
        netpair.link(True)

    output = source.final_output()
    assert from_banner(output) == expected_output
    assert disk.read_bytes() == expected_disk
    metrics = source.call("GET", "/metrics")[1]
    assert "kvmlet_migration_bytes" in metrics


@pytest.mark.slow
def test_auto_converge_and_tls_over_a_unix_socket_into_kvmlet_migrate_listen(
        servers: Servers, guest_elf: Path, tmp_path: Path, reference: tuple[str, bytes]) -> None:
    """A capped link the guest outruns: auto-converge throttles the vCPUs until the round limit; the stream
    is TLS (a self-signed certificate the source trusts); the destination is `kvmlet migrate listen`, which
    runs the guest to its end in the foreground."""
    expected_output, expected_disk = reference
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
        "-days", "1", "-subj", "/CN=kvmlet-test", "-addext", "subjectAltName=DNS:kvmlet-test")
    stream = tmp_path / "mig.sock"
    console = tmp_path / "destination.log"
    listener = subprocess.Popen([sys.executable, "-m", "kvmlet", "migrate", "listen", f"unix:{stream}",
                                 "--tls-cert", str(cert), "--tls-key", str(key), "--console", f"file:{console}"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        source = servers.new("source")
        disk = new_disk(tmp_path / "disk.img")
        boot(source, guest_elf, disk)
        deadline = time.monotonic() + 30
        while not stream.exists():
            assert time.monotonic() < deadline and listener.poll() is None, listener.communicate()[0]
            time.sleep(0.02)
        source.wait_console("snapwork round", timeout=60)
        ok(source.call("PUT", "/migration/send", {
            "destination": f"unix:{stream}", "max_bandwidth_mib_s": 16, "max_rounds": 6, "downtime_limit_ms": 1,
            "tls": {"ca_file": str(cert), "server_name": "kvmlet-test"}}))
        status = source.wait_migration()
        assert status["state"] == "completed", (status, source.log_text()[-1500:])
        report = status["report"]
        assert report["rounds"] == 7 and report["throttle_pct"] >= 20, report
        before = source.console_text()
        assert not missing_records(disk.read_bytes(), acked_records(before))
        output, _ = listener.communicate(timeout=120)
        assert listener.returncode == 0, output
        assert from_banner(before) + console.read_text() == expected_output
        assert disk.read_bytes() == expected_disk
        assert not stream.exists()
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait(5)
