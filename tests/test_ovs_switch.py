"""Open vSwitch with DPDK as kvmlet's switch: port specs and flows (unit), a private switch's lifecycle, and real VMs
(kvmlet and QEMU) exchanging frames through it under per-port controls (MAC anti-spoofing, VLAN, rate, trust).

The switch tests start a private ``ovsdb-server`` and ``ovs-vswitchd-dpdk`` (Debian ``openvswitch-switch-dpdk``)
inside the test and stop them on every exit path (its polling thread takes a CPU); starting one takes about half a
second here, so every test has its own. They skip, naming what is missing, without the OVS DPDK build or root.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmlet.config import NetworkInterface
from kvmlet.devices.legacy.console import BufferConsole
from kvmlet.devices.virtio.vhost_user_net import VhostUserNet
from kvmlet.errors import ConfigError
from kvmlet.machine import Machine
from kvmlet.memory import MiB
from kvmlet.net import ovs
from kvmlet.net.ovs import OvsControl, OvsSwitch
from kvmlet.net.ports import PortPolicy, VhostPort, bridge_flows, parse_changes, parse_port, port_flows
from kvmlet.net.switch import SwitchError, TestpmdSwitch
from tests.support.vmrun import built_machine, vm_config

IP_HOST, IP_A, IP_B = "10.200.0.1", "10.200.0.2", "10.200.0.3"
MAC_A, MAC_B, MAC_OTHER = "52:54:00:c0:00:02", "52:54:00:c0:00:03", "52:54:00:c0:00:99"
ECHO_PORT = 7


# -- port specs, policies, flows (no switch) -----------------------------------------------------------------
def test_port_specs_with_controls() -> None:
    port = parse_port("vm0=/run/vm0.sock,queues=2,mac=52:54:00:AB:CD:EF,vlan=10,rate=100,trust=off")
    assert port == VhostPort("vm0", "/run/vm0.sock", 2, PortPolicy("52:54:00:ab:cd:ef", 10, 100, False))
    assert port.hint() == "kvmlet run --net vhost-user=/run/vm0.sock,queues=2,mac=52:54:00:ab:cd:ef"
    assert parse_port("vm0=/run/vm0.sock") == VhostPort("vm0", "/run/vm0.sock")
    assert not parse_port("vm0=/s").policy.controlled and parse_port("vm0=/s,trust=on").policy.controlled
    for spec, message in [("vm0=/s,vlan=4095", "1 to 4094"), ("vm0=/s,mac=01:00:5e:00:00:01", "multicast"),
                          ("vm0=/s,mac=zz", "six colon-separated"), ("vm0=/s,rate=fast", "whole number"),
                          ("vm0=/s,trust=yes", "on or off"), ("vm0=/s,speed=1", "unknown option 'speed'"),
                          ("vm0=/s,queues=17", "1 to 16"), ("a/b=/s", "port name"), ("/s", "NAME=SOCKET"),
                          ("db.sock=/s", "the switch's own files")]:
        with pytest.raises(ConfigError, match=message):
            parse_port(spec)


def test_policy_changes_and_clearing() -> None:
    policy = PortPolicy(mac=MAC_A, vlan=10, rate=50)
    assert policy.changed(parse_changes(["vlan=none", "rate=20", "trust=on"])) == PortPolicy(MAC_A, None, 20, True)
    assert policy.changed({"mac": "none"}).mac is None
    assert policy.burst_kbit == 5000 and PortPolicy(rate=1).burst_kbit == 100
    with pytest.raises(ConfigError, match=r"mac\|vlan\|rate\|trust=VALUE"):
        parse_changes(["queues=2"])
    with pytest.raises(ConfigError, match="1 to 4094"):
        parse_changes(["vlan=5000"])


def test_flows_enforce_the_mac_and_the_access_vlan_and_trust_lifts_the_mac_check() -> None:
    flows = port_flows(3, PortPolicy(mac=MAC_A, vlan=10))
    assert flows == [
        "priority=400,in_port=3,vlan_tci=0x1000/0x1000,actions=drop",     # tagged by the VM on an access port
        f"priority=300,in_port=3,arp,dl_src={MAC_A},arp_sha={MAC_A},actions=NORMAL",
        "priority=290,in_port=3,arp,actions=drop",                         # ARP claiming another MAC
        f"priority=200,in_port=3,dl_src={MAC_A},actions=NORMAL",
        "priority=100,in_port=3,actions=drop"]                             # any other source MAC
    assert port_flows(3, PortPolicy(mac=MAC_A, trust=True)) == []
    assert port_flows(3, PortPolicy()) == [] and port_flows(3, PortPolicy(rate=10)) == []
    assert bridge_flows([(1, PortPolicy())])[-1] == "priority=0,actions=NORMAL"


def test_polling_policy_busy_only_with_a_spare_cpu() -> None:
    assert ovs.max_sleep_for("auto", cpus=2) == ovs.MAX_SLEEP_US > 0
    assert ovs.max_sleep_for("auto", cpus=8) == 0 and ovs.max_sleep_for("busy", cpus=2) == 0
    assert ovs.max_sleep_for("sleep", cpus=64) == ovs.MAX_SLEEP_US
    with pytest.raises(ConfigError, match="auto, busy, sleep"):
        ovs.max_sleep_for("spin")


def test_testpmd_refuses_per_port_controls_naming_why() -> None:
    switch = TestpmdSwitch([parse_port("vm0=/tmp/x.sock,vlan=3")])
    with pytest.raises(SwitchError, match=r"need the ovs engine: dpdk-testpmd .* no anti-spoofing, VLAN"):
        switch.start()
    assert not switch.running()


def test_names_that_would_reach_host_wide_settings_are_refused() -> None:
    for name in ("all", "default", "lo", "ovs-netdev", "a" * 16, "bad/name"):
        with pytest.raises(ConfigError, match="a host interface name"):
            OvsSwitch(name=name)
        with pytest.raises(ConfigError, match="uplink TAP"):
            OvsSwitch(name="kvok", uplink_tap=name)


def test_a_switch_directory_that_cannot_be_made_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from kvmlet.cli import main

    if ovs.ovs_problem() is not None:
        pytest.skip(ovs.ovs_problem() or "")
    assert main(["net", "switch", "--engine", "ovs", "--name", _name(), "--dir", "/proc/kvmlet-switch",
                 "--port", "vm0=/tmp/x.sock"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kvmlet net: cannot create the switch's directory /proc/kvmlet-switch"), err
    assert err.count("\n") == 1


def test_kvmlet_net_switch_refusals(capsys: pytest.CaptureFixture[str]) -> None:
    from kvmlet.cli import main

    assert main(["net", "switch", "--engine", "testpmd", "--port", "vm0=/tmp/x.sock,mac=52:54:00:00:00:01"]) == 1
    assert "need the ovs engine" in capsys.readouterr().err
    assert main(["net", "switch", "--engine", "testpmd", "--port", "vm0=/tmp/x.sock", "--uplink", "internal"]) == 2
    assert "--uplink does not apply to the testpmd engine" in capsys.readouterr().err
    assert main(["net", "switch", "--engine", "testpmd", "--port", "vm0=/tmp/x.sock", "--poll", "sleep"]) == 2
    assert "polls all the time" in capsys.readouterr().err
    assert main(["net", "switch", "--engine", "ovs", "--port", "vm0=/tmp/x.sock", "--mode", "rxonly"]) == 2
    assert "learning switch" in capsys.readouterr().err
    assert main(["net", "port", "list", "--dir", "/nonexistent/kvmlet-switch"]) == 1
    assert "no running switch in /nonexistent/kvmlet-switch" in capsys.readouterr().err


# -- a private Open vSwitch ------------------------------------------------------------------------------------
def _host_problem() -> str | None:
    problem = ovs.ovs_problem()
    if problem is not None:
        return problem
    if os.geteuid() != 0:
        return "Open vSwitch's DPDK datapath, its internal port and TAPs need root"
    return None


needs_ovs = pytest.mark.skipif(_host_problem() is not None, reason=_host_problem() or "")
needs_vms = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm")
STARTED: list[OvsSwitch] = []


def _name() -> str:
    return f"kvo{secrets.token_hex(3)}"


@pytest.fixture
def make_switch(tmp_path: Path) -> Iterator[Callable[..., OvsSwitch]]:
    """Starts private switches for a test (in tmp_path) and stops every one afterwards, whatever happened."""
    mine: list[OvsSwitch] = []

    def start(*specs: str, **options: object) -> OvsSwitch:
        _wait_for_the_datapath()
        ports = [parse_port(spec.replace("SOCK:", f"{tmp_path}/")) for spec in specs]
        options.setdefault("directory", str(tmp_path / f"switch{len(mine)}"))
        switch = OvsSwitch(ports, name=_name(), **options)  # type: ignore[arg-type]
        mine.append(switch)
        STARTED.append(switch)
        return switch.start()

    try:
        yield start
    finally:
        for switch in mine:
            switch.stop()
        assert not any(switch.running() for switch in mine)


def _wait_for_the_datapath(timeout: float = 120.0) -> None:
    """One user-space Open vSwitch per network namespace: wait while another one (another engineer's benchmark or
    test run on a shared host) holds it, skip naming it if it does not end."""
    deadline = time.monotonic() + timeout
    while (owner := ovs.datapath_in_use()) is not None:
        if time.monotonic() > deadline:
            pytest.skip(f"another Open vSwitch holds this host's user-space datapath: {owner}")
        time.sleep(0.5)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


@needs_ovs
def test_an_existing_interface_as_uplink_or_bridge_name_is_refused_before_anything_starts(tmp_path: Path) -> None:
    existing = f"kvx{secrets.token_hex(3)}"
    subprocess.run(["ip", "tuntap", "add", "dev", existing, "mode", "tap"], check=True)
    try:
        for switch in (OvsSwitch(name=_name(), directory=tmp_path / "a", uplink_tap=existing),
                       OvsSwitch(name=existing, directory=tmp_path / "b")):
            with pytest.raises(SwitchError, match=f"{existing}.*exists") as refused:
                switch.start()
            assert "\n" not in str(refused.value) and switch.ovsdb is None and not switch.path.exists()
        assert Path(f"/sys/class/net/{existing}").exists()   # the user's interface is left alone
    finally:
        subprocess.run(["ip", "link", "del", existing], check=False)


@needs_ovs
def test_start_and_stop_leave_nothing_behind(make_switch: Callable[..., OvsSwitch], tmp_path: Path) -> None:
    began = time.monotonic()
    switch = make_switch("vm0=SOCK:vm0.sock,mac=52:54:00:c0:00:02,vlan=10,rate=50", "vm1=SOCK:vm1.sock,queues=2",
                         uplink_address="10.200.9.1/24", uplink_tap=f"kvt{secrets.token_hex(3)}")
    started = time.monotonic() - began
    assert started < 15, f"start took {started:.1f} s"
    pids, runtime, tap = switch.pids(), switch.dpdk_runtime_dirs()[0], switch.uplink_tap
    assert switch.running() and len(pids) == 2 and runtime.is_dir()
    assert (tmp_path / "vm0.sock").is_symlink() and (tmp_path / "vm0.sock").is_socket()
    assert Path(f"/sys/class/net/{switch.name}").exists() and Path(f"/sys/class/net/{tap}").exists()
    statuses = {status.port.name: status for status in switch.port_status()}
    assert statuses["vm0"].port.policy == PortPolicy(MAC_A, 10, 50, False)
    assert statuses["vm1"].port.queues == 2 and not statuses["vm1"].connected
    switch.stop()
    assert all(_gone(pid) for pid in pids), pids
    assert not runtime.exists(), runtime
    assert not (tmp_path / "vm0.sock").exists() and not (tmp_path / "vm0.sock").is_symlink()
    left = [entry.name for entry in switch.path.iterdir() if entry.is_socket() or entry.suffix == ".pid"]
    assert left == [], left
    assert not Path(f"/sys/class/net/{switch.name}").exists() and not Path(f"/sys/class/net/{tap}").exists()
    switch.stop()    # idempotent


@needs_ovs
def test_a_start_failing_half_way_stops_what_started(make_switch: Callable[..., OvsSwitch], tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file where the port's socket should go")
    with pytest.raises(SwitchError, match="taken exists and is not a socket") as failure:
        make_switch("vm0=SOCK:taken")
    assert "\n" not in str(failure.value)
    [switch] = [s for s in STARTED if s.path.parent == tmp_path]
    assert switch.ovsdb is None and switch.vswitchd is None and not switch.dpdk_runtime_dirs()[0].exists()
    assert not [entry for entry in switch.path.iterdir() if entry.is_socket()]


@needs_ovs
def test_dpdk_failing_to_start_is_one_line_with_the_log(make_switch: Callable[..., OvsSwitch]) -> None:
    failed = r"ovs-vswitchd (died|exited).* while starting: .*Unable to initialize DPDK"
    with pytest.raises(SwitchError, match=failed) as fail:
        make_switch("vm0=SOCK:vm0.sock", eal_args=["--no-such-eal-option"])
    assert "\n" not in str(fail.value)
    switch = STARTED[-1]
    assert switch.ovsdb is None and not switch.dpdk_runtime_dirs()[0].exists()


@needs_ovs
def test_controls_change_on_the_running_switch(make_switch: Callable[..., OvsSwitch], tmp_path: Path) -> None:
    switch = make_switch("vm0=SOCK:vm0.sock", "vm1=SOCK:vm1.sock,mac=52:54:00:c0:00:03")
    flows = switch.control.dump_flows()
    assert f"in_port=2,dl_src={MAC_B}" in flows and "in_port=1" not in flows
    assert switch.set_port("vm0", vlan="20", mac=MAC_A, rate="30") == PortPolicy(MAC_A, 20, 30, False)
    assert switch.set_port("vm1", trust="on").trust
    flows = switch.control.dump_flows()
    assert f"in_port=1,dl_src={MAC_A}" in flows and "in_port=1,vlan_tci=0x1000/0x1000" in flows
    assert "in_port=2" not in flows
    assert switch.control.vsctl("get", "Port", "vm0", "tag", "vlan_mode", wait=False).split() == ["20", "access"]
    assert switch.control.vsctl("get", "Interface", "vm0", "ingress_policing_rate", "ingress_policing_burst",
                                wait=False).split() == ["30000", "3000"]
    switch.add_port(parse_port(f"vm2={tmp_path}/vm2.sock,vlan=7"))
    assert (tmp_path / "vm2.sock").is_socket() and switch.control.port("vm2").ofport == 3
    switch.remove_port("vm1")
    assert [status.port.name for status in switch.port_status()] == ["vm0", "vm2"]
    assert switch.vswitchd is not None
    switch.vswitchd.kill()                      # a crash leaves its sockets behind: they must not look ready
    switch.vswitchd.wait()
    switch.restart_vswitchd()                   # the controls live in the database: the flows come back
    assert f"in_port=1,dl_src={MAC_A}" in switch.control.dump_flows()
    assert switch.control.vsctl("get", "Port", "vm2", "tag", wait=False).strip() == "7"


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) for line in meminfo if line.startswith(key + ":"))


@contextlib.contextmanager
def _huge_pages(mount: Path, pages: int) -> Iterator[None]:
    """A hugetlbfs mount with ``pages`` more 2 MiB pages reserved, both undone on exit; skips where the kernel
    cannot give them (no hugetlbfs, or not enough contiguous memory)."""
    nr = Path("/proc/sys/vm/nr_hugepages")
    before = int(nr.read_text())
    mount.mkdir()
    if subprocess.run(["mount", "-t", "hugetlbfs", "nodev", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("no hugetlbfs on this host (mount -t hugetlbfs failed)")
    try:
        nr.write_text(str(before + pages))
        if _meminfo("HugePages_Free") < pages:
            pytest.skip(f"the kernel could not reserve {pages} huge pages of 2 MiB here")
        yield
    finally:
        nr.write_text(str(before))
        subprocess.run(["umount", str(mount)], check=False)


@needs_ovs
def test_the_switch_runs_on_huge_pages_and_gives_them_back(tmp_path: Path) -> None:
    from kvmlet.cli import main

    assert main(["net", "switch", "--engine", "ovs", "--huge-dir", str(tmp_path), "--port", "vm0=/tmp/x.sock"]) == 2
    mount, sock = tmp_path / "huge", tmp_path / "vm0.sock"
    with _huge_pages(mount, 300):
        free = _meminfo("HugePages_Free")
        _wait_for_the_datapath()
        process = subprocess.Popen([sys.executable, "-m", "kvmlet", "net", "switch", "--engine", "ovs", "--name",
                                    _name(), "--dir", str(tmp_path / "sw"), "--port", f"vm0={sock}",
                                    "--huge-dir", str(mount)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert process.stdout is not None
            output = b""
            deadline = time.monotonic() + 60
            while b"switch running" not in output:
                ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
                chunk = os.read(process.stdout.fileno(), 65536) if ready else b""
                assert chunk, f"the switch did not start on huge pages: {output.decode()}"
                output += chunk
            assert sock.is_socket()
            assert _meminfo("HugePages_Free") <= free - 128   # DPDK's 512 MiB: 256 pages of 2 MiB
            process.send_signal(signal.SIGTERM)
            assert process.wait(20) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        assert _meminfo("HugePages_Free") == free and not list(mount.iterdir())   # every page back


@needs_ovs
def test_kvmlet_net_switch_and_port_commands(tmp_path: Path) -> None:
    directory, sock, name = tmp_path / "sw", tmp_path / "vm0.sock", _name()
    kvmlet = [sys.executable, "-m", "kvmlet", "net"]
    process = subprocess.Popen([*kvmlet, "switch", "--engine", "ovs", "--name", name, "--dir", str(directory),
                                "--port", f"vm0={sock},queues=2,vlan=5", "--uplink", "internal=10.200.9.1/24"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert process.stdout is not None
        output = b""   # read from the descriptor (no buffer to hide lines from select), until it runs or 60 s
        deadline = time.monotonic() + 60
        while b"\nswitch running" not in b"\n" + output:
            ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(process.stdout.fileno(), 65536) if ready else b""
            assert chunk, f"kvmlet net switch did not report running within 60 s: {output.decode()}"
            output += chunk
        lines = output.decode().splitlines(keepends=True)
        assert sock.is_socket(), lines
        assert f"kvmlet run --net vhost-user={sock},queues=2" in "".join(lines)
        at = ["--dir", str(directory)]
        listed = json.loads(subprocess.run([*kvmlet, "port", "list", *at, "--json"], capture_output=True,
                                           text=True, check=True).stdout)
        assert [(p["name"], p["vlan"], p["queues"], p["connected"]) for p in listed] == [("vm0", 5, 2, False)]
        done = subprocess.run([*kvmlet, "port", "set", *at, "vm0", "vlan=none", "rate=10", f"mac={MAC_A}"],
                              capture_output=True, text=True)
        assert done.returncode == 0 and "vlan=none rate=10 Mbit/s" in done.stdout, done
        bad = subprocess.run([*kvmlet, "port", "set", *at, "vm9", "vlan=3"], capture_output=True, text=True)
        assert bad.returncode == 1 and "no port 'vm9'" in bad.stderr
        listed = json.loads(subprocess.run([*kvmlet, "port", "list", *at, "--json"], capture_output=True,
                                           text=True, check=True).stdout)
        assert (listed[0]["vlan"], listed[0]["rate"], listed[0]["mac"]) == (None, 10, MAC_A)
        added = tmp_path / "vm1.sock"
        subprocess.run([*kvmlet, "port", "add", *at, f"vm1={added},trust=on"], capture_output=True, check=True)
        assert added.is_socket()
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        assert not sock.exists() and not sock.is_symlink() and not added.is_symlink()
        assert not [entry for entry in directory.iterdir() if entry.is_socket()]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


# -- real VMs through the switch -------------------------------------------------------------------------------
def _serve(ip: str, peer: str, echoes: int = 1, timeout: int = 20, extra: str = "") -> str:
    return (f"kvmlet.test=virtio-net-serve,serial kvmlet.net_ip={ip} kvmlet.net_peer={peer} "
            f"kvmlet.net_port={ECHO_PORT} kvmlet.net_serve={echoes} kvmlet.timeout={timeout} {extra}").strip()


def _client(timeout: int = 10, extra: str = "") -> str:
    return (f"kvmlet.test=virtio-net kvmlet.net_ip={IP_A} kvmlet.net_peer={IP_B} kvmlet.net_port={ECHO_PORT} "
            f"kvmlet.timeout={timeout} {extra}").strip()


@contextlib.contextmanager
def booted(guest_elf: Path, sock: str, mac: str, cmdline: str,
           queues: int = 1) -> Iterator[tuple[Machine, BufferConsole, VhostUserNet]]:
    """A kvmlet VM on a vhost-user port, started; stopped and closed on exit."""
    console = BufferConsole()
    net = NetworkInterface(iface_id="net0", vhost_user_socket=sock, guest_mac=mac, queues=queues)
    config = vm_config(guest_elf, cmdline=f"console=ttyS0 {cmdline}", memory=64 * MiB, nets=[net])
    with built_machine(config, console=console) as machine:
        assert machine.devices is not None
        [device] = machine.devices.virtio_devices()
        assert isinstance(device, VhostUserNet)
        machine.start()
        yield machine, console, device


def run_client(guest_elf: Path, sock: str, extra: str = "", timeout: int = 10, mac: str = MAC_A) -> str:
    with booted(guest_elf, sock, mac, _client(timeout, extra)) as (machine, console, _):
        machine.wait(60)
    return console.output().decode(errors="replace")


def _wait_ready(console: BufferConsole) -> None:
    assert console.wait_for(b"NET serve ready", 30), console.output()


def _finish(machine: Machine, console: BufferConsole, timeout: float = 60) -> str:
    status = machine.wait(timeout)
    output = console.output().decode(errors="replace")
    assert status.code == 0, output
    return output


@needs_ovs
@needs_vms
def test_two_kvmlet_vms_exchange_frames_through_the_switch(guest_elf: Path,
                                                          make_switch: Callable[..., OvsSwitch]) -> None:
    switch = make_switch(f"a=SOCK:a.sock,mac={MAC_A}", f"b=SOCK:b.sock,queues=2,mac={MAC_B}")
    a, b = (str(port.socket) for port in switch.ports)
    with booted(guest_elf, b, MAC_B, _serve(IP_B, IP_A, extra="kvmlet.net_queues=2"), queues=2) as (vm, console, _):
        _wait_ready(console)
        status = switch.control.wait_connected("b")
        assert status.connected and status.queue_pairs == 2, status    # B's VMDq pool: the front end's 2 pairs
        client = run_client(guest_elf, a)
        served = _finish(vm, console)
    assert "TEST virtio-net PASS" in client and f"NET arp reply from {MAC_B}" in client, client
    assert "NET served echoes=1" in served and "TEST serial PASS" in served, served


class QemuVm:
    """QEMU 7.2 microvm with the test guest on a vhost-user port; its console collected on a thread."""

    def __init__(self, guest_elf: Path, sock: str, mac: str, cmdline: str) -> None:
        qemu = shutil.which("qemu-system-x86_64")
        if qemu is None:
            pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
        argv = [qemu, "-M", "microvm,acpi=off,memory-backend=mem", "-accel", "kvm", "-cpu", "qemu64", "-m", "64",
                "-nographic", "-no-reboot", "-kernel", str(guest_elf), "-append", f"console=ttyS0 {cmdline}",
                "-global", "virtio-mmio.force-legacy=false", "-device", "isa-debug-exit,iobase=0x501,iosize=2",
                "-object", "memory-backend-memfd,id=mem,size=64M,share=on",
                "-chardev", f"socket,id=c0,path={sock}", "-netdev", "vhost-user,id=n0,chardev=c0",
                "-device", f"virtio-net-device,netdev=n0,mac={mac}"]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)
        self.output = b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for chunk in iter(lambda: os.read(self.process.stdout.fileno(), 4096), b""):  # type: ignore[union-attr]
            self.output += chunk

    def wait_for(self, text: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while text not in self.output and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return text in self.output

    def finish(self, timeout: float) -> tuple[int, str]:
        try:
            code = self.process.wait(timeout)
        finally:
            self.close()
        return code, self.output.decode(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()


@needs_ovs
@needs_vms
def test_kvmlet_and_qemu_exchange_frames_through_the_switch(guest_elf: Path,
                                                           make_switch: Callable[..., OvsSwitch]) -> None:
    switch = make_switch(f"a=SOCK:a.sock,mac={MAC_A}", f"b=SOCK:b.sock,mac={MAC_B}")
    a, b = (str(port.socket) for port in switch.ports)
    qemu = QemuVm(guest_elf, b, MAC_B, _serve(IP_B, IP_A))
    try:
        assert qemu.wait_for(b"NET serve ready", 30), qemu.output
        client = run_client(guest_elf, a)
        code, served = qemu.finish(60)
    finally:
        qemu.close()
    assert "TEST virtio-net PASS" in client and f"NET arp reply from {MAC_B}" in client, client
    assert "NET served echoes=1" in served and "TEST virtio-net-serve PASS" in served, served
    assert code == 1, served     # QEMU's isa-debug-exit: (status 0 << 1) | 1


@needs_ovs
@needs_vms
def test_a_vm_sending_from_a_mac_it_was_not_given_is_dropped_unless_trusted(
        guest_elf: Path, make_switch: Callable[..., OvsSwitch]) -> None:
    switch = make_switch(f"a=SOCK:a.sock,mac={MAC_A}", f"b=SOCK:b.sock,mac={MAC_B}")
    a, b = (str(port.socket) for port in switch.ports)
    with booted(guest_elf, b, MAC_B, _serve(IP_B, IP_A, timeout=60)) as (vm, console, _):
        _wait_ready(console)
        spoofed = run_client(guest_elf, a, f"kvmlet.net_mac={MAC_OTHER}", timeout=2)
        assert f"NET mac={MAC_OTHER}" in spoofed and f"TEST virtio-net FAIL no ARP reply from {IP_B}" in spoofed, \
            spoofed
        switch.set_port("a", trust="on")          # trust on + spoofchk off: any source MAC
        trusted = run_client(guest_elf, a, f"kvmlet.net_mac={MAC_OTHER}")
        assert "TEST virtio-net PASS" in trusted, trusted
        served = _finish(vm, console)
    assert "NET served echoes=1" in served, served


@needs_ovs
@needs_vms
def test_vlans_separate_ports_and_an_access_port_drops_the_vms_own_tags(
        guest_elf: Path, make_switch: Callable[..., OvsSwitch]) -> None:
    switch = make_switch(f"a=SOCK:a.sock,vlan=10,mac={MAC_A}", f"b=SOCK:b.sock,vlan=20,mac={MAC_B}")
    a, b = (str(port.socket) for port in switch.ports)
    with booted(guest_elf, b, MAC_B, _serve(IP_B, IP_A, timeout=60)) as (vm, console, _):
        _wait_ready(console)
        apart = run_client(guest_elf, a, timeout=2)
        assert f"TEST virtio-net FAIL no ARP reply from {IP_B}" in apart, apart
        switch.set_port("b", vlan="10")
        tagged = run_client(guest_elf, a, "kvmlet.net_vlan=10", timeout=2)   # its own tag, even the port's VLAN
        assert "NET vlan=10" in tagged and f"TEST virtio-net FAIL no ARP reply from {IP_B}" in tagged, tagged
        together = run_client(guest_elf, a)
        assert "TEST virtio-net PASS" in together, together
        served = _finish(vm, console)
    assert "NET served echoes=1" in served, served


def _count_datagrams(sock: socket.socket, seconds: float, stop: Callable[[], bool]) -> tuple[int, float]:
    """Datagrams received from the first one on, for ``seconds``: (count, seconds from the first to the last)."""
    count, first, last = 0, 0.0, 0.0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not stop():
        ready, _, _ = select.select([sock], [], [], 0.2)
        if not ready:
            continue
        while True:
            try:
                sock.recv(2048, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            last = time.monotonic()
            if not count:
                first = last
                deadline = first + seconds
            count += 1
    return count, last - first


@needs_ovs
@needs_vms
def test_a_rate_limited_port_holds_its_rate(guest_elf: Path, make_switch: Callable[..., OvsSwitch]) -> None:
    limit_mbit = 20
    switch = make_switch(f"a=SOCK:a.sock,mac={MAC_A},rate={limit_mbit}", uplink_address=f"{IP_HOST}/24")
    cmdline = (f"kvmlet.test=virtio-net-bench kvmlet.net_ip={IP_A} kvmlet.net_peer={IP_HOST} kvmlet.net_port=9000 "
               "kvmlet.loops=100000000 kvmlet.timeout=30")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
        sink.bind((IP_HOST, 9000))
        with booted(guest_elf, str(switch.ports[0].socket), MAC_A, cmdline) as (vm, console, _):
            count, seconds = _count_datagrams(sink, 2.0, lambda: b"TESTS DONE" in console.output())
            vm.stop()
        output = console.output().decode(errors="replace")
    assert "BENCH net-udp-tx start" in output, output
    assert seconds > 1.0, f"{count} datagrams in {seconds:.2f} s: the guest did not send for long enough\n{output}"
    rate_mbit = count * 1514 * 8 / seconds / 1e6
    deadline = time.monotonic() + 8          # the counters in the database are refreshed every 5 s
    while not (drops := switch.control.port("a").policed_drops) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert 0.5 * limit_mbit <= rate_mbit <= 1.3 * limit_mbit, (rate_mbit, count, seconds, drops)
    assert drops > 0, "the guest sent faster than the limit, so the policer dropped"


@needs_ovs
@needs_vms
def test_the_switch_restarting_under_a_running_vm(guest_elf: Path, make_switch: Callable[..., OvsSwitch]) -> None:
    switch = make_switch(f"b=SOCK:b.sock,mac={MAC_B}", uplink_address=f"{IP_HOST}/24")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as host, \
            booted(guest_elf, str(switch.ports[0].socket), MAC_B, _serve(IP_B, IP_HOST, 2, 60)) as (vm, console,
                                                                                                     device):
        host.bind((IP_HOST, 0))
        _wait_ready(console)
        assert _echo(host, b"before the restart")
        switch.restart_vswitchd()                  # a new ovs-vswitchd: new socket, new internal port, flows again
        deadline = time.monotonic() + 10
        while not (device.link_up and device.stats.connects == 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert device.link_up and device.stats.connects == 2 and device.stats.disconnects == 1, device.stats
        assert _echo(host, b"after the restart"), console.output()
        served = _finish(vm, console)
    assert "NET served echoes=2" in served and "TEST serial PASS" in served, served


def _echo(host: socket.socket, payload: bytes, attempts: int = 10) -> bool:
    for _ in range(attempts):
        host.sendto(payload, (IP_B, ECHO_PORT))
        ready, _, _ = select.select([host], [], [], 1.0)
        if ready and host.recv(2048) == payload:
            return True
    return False


def test_no_switch_of_this_module_is_left_running() -> None:
    running = [switch.pids() for switch in STARTED if switch.running()]
    assert running == [], running
    alive = [pid for switch in STARTED for pid in switch.started_pids if Path(f"/proc/{pid}").exists()
             and b"<defunct>" not in Path(f"/proc/{pid}/stat").read_bytes()
             and Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert alive == [], alive   # every daemon this module's switches ever started has ended


def test_ovs_control_paths() -> None:
    control = OvsControl("/run/kvmlet/switch-x")
    assert control.db == "unix:/run/kvmlet/switch-x/db.sock" and control.env()["OVS_RUNDIR"] == "/run/kvmlet/switch-x"
