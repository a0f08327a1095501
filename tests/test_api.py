"""The Firecracker-compatible API, driven over its Unix socket against a real `kvmlet serve` process.

Integration tests: the VM ones boot the test guest on /dev/kvm through the API.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.apiclient import ApiServer, call, guest_boot_source

MACHINE = {"vcpu_count": 1, "mem_size_mib": 64}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ApiServer]:
    api = ApiServer(tmp_path)
    try:
        yield api
    finally:
        api.stop()


def boot(api: ApiServer, guest_elf: Path, tests: str, extra: str = "",
         resources: dict[str, object] | None = None) -> None:
    """Configure the test guest running ``tests`` (plus PUTs of ``resources``: target -> body) and start it."""
    assert api.call("PUT", "/boot-source", guest_boot_source(guest_elf, tests, extra)) == (204, None)
    assert api.call("PUT", "/machine-config", MACHINE) == (204, None)
    for target, body in (resources or {}).items():
        status, reply = api.call("PUT", target, body)
        assert status == 204, reply
    status, reply = api.call("PUT", "/actions", {"action_type": "InstanceStart"})
    assert status == 204, reply


# -- before boot ---------------------------------------------------------------------------------------
def test_instance_info_and_version(server: ApiServer) -> None:
    status, info = server.call("GET", "/")
    assert status == 200
    assert info["state"] == "Not started" and info["app_name"] == "kvmlet" and info["id"] == "anonymous-instance"
    status, version = server.call("GET", "/version")
    assert status == 200 and version["firecracker_version"] == info["vmm_version"]


def test_socket_is_owner_only(server: ApiServer) -> None:
    assert stat.S_IMODE(os.stat(server.socket).st_mode) == 0o600


def test_configuration_round_trips_through_vm_config(server: ApiServer, guest_elf: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    drive = {"drive_id": "root", "path_on_host": str(disk), "is_root_device": True, "is_read_only": True,
             "rate_limiter": {"bandwidth": {"size": 1 << 20, "refill_time": 100}}}
    calls = [("PUT", "/boot-source", guest_boot_source(guest_elf, "serial")),
             ("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 96}),
             ("PATCH", "/machine-config", {"mem_size_mib": 80}),
             ("PUT", "/drives/root", drive),
             ("PUT", "/entropy", {}),
             ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "auto", "queues": 2,
                                                  "guest_mac": "02:00:00:00:00:01"}),
             ("PUT", "/logger", {"log_path": str(tmp_path / "vm.log"), "level": "Debug", "show_level": True}),
             ("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "v.sock")}),
             ("PUT", "/cpu-config", {"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": [
                 {"register": "ecx", "bitmap": "0b" + "x" * 32}]}]})]
    for method, target, body in calls:
        assert server.call(method, target, body) == (204, None), target
    status, config = server.call("GET", "/vm/config")
    assert status == 200
    assert config["machine-config"]["vcpu_count"] == 2 and config["machine-config"]["mem_size_mib"] == 80
    assert config["drives"][0]["path_on_host"] == str(disk) and config["drives"][0]["is_root_device"]
    assert config["drives"][0]["rate_limiter"]["bandwidth"]["size"] == 1 << 20
    assert config["entropy"] == {"rate_limiter": None, "transport": "mmio"}
    assert config["vsock"]["guest_cid"] == 3
    assert config["network-interfaces"][0]["guest_mac"] == "02:00:00:00:00:01"
    assert config["network-interfaces"][0]["queues"] == 2
    assert config["logger"]["level"] == "Debug"
    assert config["cpu-config"]["cpuid_modifiers"][0]["leaf"] == "0x1"
    assert server.call("GET", "/machine-config")[1]["mem_size_mib"] == 80
    # the same drive id replaces the drive; a second root device is refused
    assert server.call("PUT", "/drives/root", {**drive, "is_read_only": False})[0] == 204
    status, reply = server.call("PUT", "/drives/other", {**drive, "drive_id": "other"})
    assert status == 400 and "root" in reply["fault_message"]
    assert len(server.call("GET", "/vm/config")[1]["drives"]) == 1


@pytest.mark.parametrize(("method", "target", "body", "names"), [
    ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64, "bogus": 1}, "bogus"),
    ("PUT", "/machine-config", {"vcpu_count": "two", "mem_size_mib": 64}, "vcpu_count"),
    ("PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 64}, "vcpu_count"),
    ("PATCH", "/machine-config", {"mem_size_mib": 4}, "mem_size_mib"),
    ("PUT", "/boot-source", {"boot_args": "x"}, "kernel_image_path"),
    ("PUT", "/boot-source", {"kernel_image_path": "/nonexistent/vmlinux"}, "kernel_image_path"),
    ("PUT", "/drives/a", {"drive_id": "b", "path_on_host": "/dev/null", "is_root_device": False}, "id"),
    ("PUT", "/drives/a", {"drive_id": "a", "path_on_host": "/nonexistent", "is_root_device": False}, "/nonexistent"),
    ("PUT", "/drives/a-b", {"drive_id": "a-b", "path_on_host": "/dev/null", "is_root_device": False}, "drive_id"),
    ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "01:00:00:00:00:01"},
     "multicast"),
    ("PUT", "/vsock", {"guest_cid": 2, "uds_path": "/tmp/v.sock"}, "guest_cid"),
    ("PUT", "/actions", {"action_type": "Reboot"}, "action_type"),
    ("PATCH", "/vm", {"state": "Running"}, "state"),
    ("PUT", "/logger", {"level": "Loud"}, "level"),
    ("PUT", "/metrics", {"metrics_path": "/nonexistent/dir/m.json"}, "metrics_path"),
    ("PUT", "/cpu-config", {"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b01"}]}, "bitmap"),
])
def test_bad_bodies_are_refused_naming_the_field(server: ApiServer, method: str, target: str, body: object,
                                                  names: str) -> None:
    before = server.call("GET", "/vm/config")
    status, reply = server.call(method, target, body)
    assert status == 400, reply
    assert names in reply["fault_message"] and "\n" not in reply["fault_message"]
    after = server.call("GET", "/vm/config")   # a call that fails changes nothing
    assert after == before, {k: (v, after[1].get(k)) for k, v in before[1].items() if after[1].get(k) != v}


def test_malformed_json_and_unknown_paths(server: ApiServer) -> None:
    status, reply = server.call("PUT", "/machine-config", raw=b'{"vcpu_count": 1,')
    assert status == 400 and "JSON" in reply["fault_message"]
    for method, target in (("GET", "/nothing"), ("POST", "/actions"), ("DELETE", "/drives/a"), ("GET", "/vm")):
        status, reply = server.call(method, target)
        assert status == 400 and reply["fault_message"].startswith("Invalid request method and/or path"), target


@pytest.mark.parametrize(("target", "body", "words"), [
    ("/balloon", {"amount_mib": 1, "deflate_on_oom": True}, "balloon"),
    ("/mmds", {"latest": {}}, "MMDS"),
])
def test_unsupported_resources_say_so(server: ApiServer, target: str, body: object, words: str) -> None:
    status, reply = server.call("PUT", target, body)
    assert status == 400 and words in reply["fault_message"] and "not supported" in reply["fault_message"]


def test_post_boot_calls_before_boot(server: ApiServer) -> None:
    for method, target, body in (("PATCH", "/vm", {"state": "Paused"}),
                                 ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
                                 ("PUT", "/actions", {"action_type": "FlushMetrics"}),
                                 ("PATCH", "/drives/a", {"drive_id": "a", "path_on_host": "/dev/null"})):
        status, reply = server.call(method, target, body)
        assert status == 400
        assert reply["fault_message"] == "The requested operation is not supported before starting the microVM."
    status, reply = server.call("PUT", "/actions", {"action_type": "InstanceStart"})
    assert status == 400 and "kernel" in reply["fault_message"]
    assert server.state() == "Not started"


# -- the HTTP layer ------------------------------------------------------------------------------------
def test_a_body_of_10_mib_is_refused_without_reading_it(server: ApiServer) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(server.socket))
    size = 10 << 20
    sock.sendall(f"PUT /boot-source HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {size}\r\n\r\n".encode() + b" " * 65536)
    reply = b""
    while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        reply += chunk
    sock.close()
    assert reply.startswith(b"HTTP/1.1 400")
    assert b"larger than the limit" in reply
    assert server.state() == "Not started"


def test_a_client_that_disconnects_mid_request_loses_only_its_request(server: ApiServer) -> None:
    for partial in (b"PUT /machine-config HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"vcpu",
                    b"GET / HTT", b"\x00\xff garbage\r\n\r\n"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(server.socket))
        sock.sendall(partial)
        sock.close()
    assert server.call("GET", "/machine-config") == (200, server.call("GET", "/machine-config")[1])
    assert server.call("GET", "/machine-config")[1]["vcpu_count"] == 1


def test_an_existing_socket_path_is_refused_unless_stale(tmp_path: Path, server: ApiServer) -> None:
    def serve(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kvmlet", "serve", "--api-sock", str(path)],
                              capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)

    regular = tmp_path / "file.sock"
    regular.write_text("not a socket")
    result = serve(regular)
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert "not a socket" in result.stderr and regular.read_text() == "not a socket"
    result = serve(server.socket)            # a live server owns it
    assert result.returncode == 1 and "in use" in result.stderr
    assert server.state() == "Not started"
    stale = tmp_path / "stale.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(stale))
    listener.close()                          # the path stays, nobody accepts: stale
    stale_server = subprocess.Popen([sys.executable, "-m", "kvmlet", "serve", "--api-sock", str(stale)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if call(stale, "GET", "/", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.05)
        assert call(stale, "GET", "/")[0] == 200
    finally:
        stale_server.terminate()
        stale_server.communicate(timeout=15)


# -- a running VM --------------------------------------------------------------------------------------
def test_boot_pause_resume_and_ctrl_alt_del(server: ApiServer, guest_elf: Path, tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.json"
    assert server.call("PUT", "/metrics", {"metrics_path": str(metrics)}) == (204, None)
    boot(server, guest_elf, "serial,ctrlaltdel", "kvmlet.timeout=0")
    server.wait_console("ctrlaltdel: waiting")
    assert server.state() == "Running"
    status, reply = server.call("PUT", "/boot-source", guest_boot_source(guest_elf, "serial"))
    assert status == 400
    assert reply["fault_message"] == "The requested operation is not supported after starting the microVM."
    for target, body in (("/machine-config", MACHINE), ("/drives/d", {"drive_id": "d", "path_on_host": "/dev/null",
                                                                     "is_root_device": False}),
                         ("/network-interfaces/n", {"iface_id": "n", "host_dev_name": "auto"}),
                         ("/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "v.sock")}), ("/entropy", {}),
                         ("/logger", {"level": "Debug"}), ("/metrics", {"metrics_path": str(metrics)}),
                         ("/cpu-config", {}), ("/actions", {"action_type": "InstanceStart"})):
        status, reply = server.call("PUT", target, body)
        assert status == 400, target
        assert reply["fault_message"] == "The requested operation is not supported after starting the microVM."
    assert server.call("PATCH", "/machine-config", {"vcpu_count": 2})[0] == 400
    assert server.call("PATCH", "/vm", {"state": "Paused"}) == (204, None)
    assert server.state() == "Paused"
    assert server.call("PATCH", "/vm", {"state": "Paused"}) == (204, None)    # idempotent, as Firecracker
    status, reply = server.call("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    assert status == 400 and "paused" in reply["fault_message"]
    assert server.call("PATCH", "/vm", {"state": "Resumed"}) == (204, None)
    assert server.state() == "Running"
    assert server.call("PUT", "/actions", {"action_type": "SendCtrlAltDel"}) == (204, None)
    server.wait_state("Halted")              # the guest has written its last line whole
    output = server.console_text()
    assert "TEST ctrlaltdel PASS" in output and "TESTS DONE 2 0" in output
    assert server.call("PATCH", "/vm", {"state": "Paused"})[0] == 400
    # metrics: a flushed line shows the VM's exits and console output
    assert server.call("PUT", "/actions", {"action_type": "FlushMetrics"}) == (204, None)
    line = json.loads(metrics.read_text().splitlines()[-1])
    assert line["vcpu"]["kvmlet_io"] > 0 and line["vcpu"]["kvm_exits"] > 0
    assert line["uart"]["bytes_out"] > 0
    assert line["put_api_requests"]["actions_count"] >= 3
    status, text = server.call("GET", "/metrics")
    assert status == 200 and "kvmlet_vcpu_kvm_exits" in text and 'instance="anonymous-instance"' in text


def test_drive_updates_after_boot(server: ApiServer, guest_elf: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a.img", tmp_path / "b.img"
    first.write_bytes(bytes(1 << 20))
    second.write_bytes(bytes(2 << 20))
    drive = {"drive_id": "data", "path_on_host": str(first), "is_root_device": False}
    boot(server, guest_elf, "ctrlaltdel", "kvmlet.timeout=0", {"/drives/data": drive})
    server.wait_console("ctrlaltdel: waiting")
    status, reply = server.call("PUT", "/drives/data", drive)
    assert status == 400 and "after starting" in reply["fault_message"]
    update = {"drive_id": "data", "path_on_host": str(second),
              "rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}}
    assert server.call("PATCH", "/drives/data", update) == (204, None)
    config = server.call("GET", "/vm/config")[1]
    assert config["drives"][0]["path_on_host"] == str(second)
    assert config["drives"][0]["rate_limiter"]["ops"]["size"] == 100
    status, reply = server.call("PATCH", "/drives/data", {"drive_id": "data", "path_on_host": "/nonexistent"})
    assert status == 400 and "/nonexistent" in reply["fault_message"]
    assert server.call("GET", "/vm/config")[1]["drives"][0]["path_on_host"] == str(second)
    status, reply = server.call("PATCH", "/drives/nope", {"drive_id": "nope"})
    assert status == 400 and "nope" in reply["fault_message"]
    status, reply = server.call("PATCH", "/network-interfaces/eth0", {"iface_id": "eth0"})
    assert status == 400 and "eth0" in reply["fault_message"]


def test_fifty_concurrent_clients_against_one_vm(server: ApiServer, guest_elf: Path) -> None:
    boot(server, guest_elf, "ctrlaltdel", "kvmlet.timeout=0")
    server.wait_console("ctrlaltdel: waiting")
    requests = [("GET", "/", None), ("GET", "/vm/config", None), ("GET", "/machine-config", None),
                ("PATCH", "/vm", {"state": "Paused"}), ("PATCH", "/vm", {"state": "Resumed"}),
                ("PUT", "/machine-config", MACHINE), ("GET", "/metrics", None), ("GET", "/nothing", None)]
    failures: list[str] = []
    counts = {"ok": 0, "refused": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + 4.0

    def client(number: int) -> None:
        index = number
        while time.monotonic() < deadline:
            method, target, body = requests[index % len(requests)]
            index += 1
            try:
                status, reply = server.call(method, target, body, timeout=20)
            except OSError as exc:
                failures.append(f"{method} {target}: {exc}")
                return
            with lock:
                if status >= 500 or status not in (200, 204, 400):
                    failures.append(f"{method} {target}: {status} {reply}")
                elif status == 400 and not reply.get("fault_message"):
                    failures.append(f"{method} {target}: 400 without fault_message")
                counts["ok" if status < 400 else "refused"] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a client is stuck (deadlock?)"
    assert not failures, failures[:5]
    assert counts["ok"] > 100
    for state, expected in (("Paused", "Paused"), ("Resumed", "Running"), ("Paused", "Paused")):
        assert server.call("PATCH", "/vm", {"state": state}) == (204, None)
        assert server.state() == expected


# -- the Firecracker command line ----------------------------------------------------------------------
def test_firecracker_command_line(tmp_path: Path, guest_elf: Path) -> None:
    command = [sys.executable, "-m", "kvmlet.api.firecracker"]
    version = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith("Firecracker v")
    refused = subprocess.run([*command, "--no-api"], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 153 and "--config-file" in refused.stderr
    unknown = subprocess.run([*command, "--bogus"], capture_output=True, text=True, timeout=30)
    assert unknown.returncode == 153
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({"boot-source": guest_boot_source(guest_elf, "serial"), "drives": [],
                                  "machine-config": MACHINE}))
    # boots at once, serial output on stdout, exits with the guest (status 0), as Firecracker does
    result = subprocess.run([*command, "--no-api", "--config-file", str(config), "--id", "vm1"],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "TEST serial PASS" in result.stdout


def test_the_api_answers_while_a_vcpu_spins(server: ApiServer, guest_elf: Path) -> None:
    # about 10^12 iterations of `dec; jnz` at CPL3: minutes of a vCPU that never exits on its own
    boot(server, guest_elf, "cpl3", "kvmlet.loops=1000000000000")
    server.wait_console("kvmlet-guest")
    deadline = time.monotonic() + 2.0
    answered = 0
    while time.monotonic() < deadline:
        status, info = server.call("GET", "/", timeout=10)
        assert status == 200 and info["state"] == "Running"
        answered += 1
    assert answered > 10
    assert server.call("PATCH", "/vm", {"state": "Paused"}, timeout=10) == (204, None)
    assert server.state() == "Paused"
    assert server.call("PATCH", "/vm", {"state": "Resumed"}, timeout=10) == (204, None)
    assert "CPL3 loops" not in server.console_text()   # still spinning
