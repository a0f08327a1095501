"""--net and --vsock: the syntax, the configuration it gives, one-line errors, and the `kvmlet run` wiring."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kvmlet.config import ConfigError, MachineConfig
from kvmlet.devices.virtio.net_options import (
    NetConfig,
    VsockConfig,
    default_mac,
    format_mac,
    parse_mac,
    parse_net,
    parse_vsock,
    validate_network,
)
from kvmlet.devices.virtio.ratelimit import RateLimiterConfig, TokenBucketConfig

REPO = Path(__file__).resolve().parent.parent


def test_full_net_spec() -> None:
    net = parse_net("tap=tap7,mac=02:00:00:12:34:56,queues=4,offload=off,mtu=9000,address=10.213.5.1/24,"
                    "bridge=br0,rx-bps=10M,rx-pps=1000,tx-bps=1M,tx-bps-burst=64K,refill-ms=100")
    assert net == NetConfig(tap="tap7", mac="02:00:00:12:34:56", queues=4, offload=False, mtu=9000,
                            address="10.213.5.1/24", bridge="br0",
                            rx_rate_limit=RateLimiterConfig(bandwidth=TokenBucketConfig(10 << 20, 100),
                                                            ops=TokenBucketConfig(1000, 100)),
                            tx_rate_limit=RateLimiterConfig(bandwidth=TokenBucketConfig(1 << 20, 100, 65536)))


def test_bare_tap_and_defaults() -> None:
    assert parse_net("auto") == NetConfig()
    assert parse_net("") == NetConfig()
    net = parse_net("mytap")
    assert net.tap == "mytap" and net.queues == 1 and net.offload and net.mac is None
    assert not net.rx_rate_limit.enabled and not net.tx_rate_limit.enabled


@pytest.mark.parametrize(("spec", "message"), [
    ("tap=a/b", "not an interface name"),
    ("tap=averyveryverylongname", "not an interface name"),
    ("queues=0", "choose 1 to 16"),
    ("queues=17", "choose 1 to 16"),
    ("queues=two", "is not a number"),
    ("mac=01:00:5e:00:00:01", "multicast"),
    ("mac=02:00:00:00:00", "is not like"),
    ("mac=00:00:00:00:00:00", "not a usable address"),
    ("offload=maybe", "use on or off"),
    ("mtu=20", "outside 68..65521"),
    ("address=10.0.0.300/24", "is not like 10.0.0.1/24"),
    ("bridge=a:b", "is not an interface name"),
    ("rx-bps-burst=5", "rx-bps-burst needs rx-bps"),
    ("tx-pps=0", "tx-pps must be positive"),
    ("refill-ms=0", "refill-ms must be positive"),
    ("speed=10", "unknown key 'speed'"),
    ("auto,auto", "is not key=value"),
])
def test_bad_net_specs(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_net(spec)
    assert "\n" not in str(info.value) and str(info.value).startswith("--net")


def test_vsock_spec(tmp_path: Path) -> None:
    config = parse_vsock(f"cid=42,uds={tmp_path}/v.sock")
    assert config == VsockConfig(42, tmp_path / "v.sock")
    config.validate()


@pytest.mark.parametrize(("spec", "message"), [
    ("cid=3", "both cid=N and uds=PATH are required"),
    ("uds=/tmp/x", "both cid=N and uds=PATH are required"),
    ("cid=2,uds=/tmp/x", "must be 3 to"),
    ("cid=4294967295,uds=/tmp/x", "must be 3 to"),
    ("cid=x,uds=/tmp/x", "is not a number"),
    ("cid=3,uds=/tmp/x,port=5", "unknown key 'port'"),
])
def test_bad_vsock_specs(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_vsock(spec)


def test_vsock_path_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        VsockConfig(3, tmp_path / "missing" / "v.sock").validate()
    with pytest.raises(ConfigError, match="too long"):
        VsockConfig(3, tmp_path / ("x" * 120)).validate()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a socket"):
        VsockConfig(3, tmp_path / "file").validate()


def test_taps_and_macs_must_not_repeat() -> None:
    with pytest.raises(ConfigError, match="TAP tap1 is used by another --net"):
        validate_network([NetConfig(tap="tap1"), NetConfig(tap="tap1")], None)
    with pytest.raises(ConfigError, match="mac 02:00:00:00:00:01 is used by another --net"):
        validate_network([NetConfig(mac="02:00:00:00:00:01"), NetConfig(mac="02:00:00:00:00:01")], None)
    validate_network([NetConfig(), NetConfig()], None)  # two auto TAPs are fine


def test_machine_config_checks_the_network() -> None:
    config = MachineConfig(nets=[NetConfig(queues=99)])
    with pytest.raises(ConfigError, match="queues=99"):
        config.validate()


def test_default_mac_is_locally_administered_unicast_and_stable() -> None:
    mac = default_mac("host/123/kvmlet0", 0)
    assert mac[0] & 0x02 and not mac[0] & 0x01
    assert mac == default_mac("host/123/kvmlet0", 0)
    assert mac != default_mac("host/123/kvmlet0", 1) and mac != default_mac("host/123/kvmlet1", 0)
    assert parse_mac(format_mac(mac)) == mac
    assert NetConfig(mac="02:aa:bb:cc:dd:ee").mac_bytes(0) == bytes.fromhex("02aabbccddee")


def _kvmlet(*args: str, console: str = "none") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmlet", "run", "--console", console, "--timeout", "30", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize(("args", "message"), [
    (("--net", "queues=0"), "kvmlet: --net 'queues=0': queues=0: choose 1 to 16 queue pairs"),
    (("--vsock", "cid=1,uds=/tmp/x"), "kvmlet: --vsock 'cid=1,uds=/tmp/x': cid=1: the guest's CID must be 3"),
    (("--net", "tap=lo"), "kvmlet: --net tap=lo: interface lo exists and is not a TAP device"),
])
def test_cli_errors_are_one_line(args: tuple[str, ...], message: str) -> None:
    result = _kvmlet(*args)
    assert result.returncode == 1
    assert result.stderr.strip().startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="TAP devices need root")
def test_cli_runs_a_vm_with_net_and_vsock(guest_elf: Path, tmp_path: Path) -> None:
    uds = tmp_path / "vm.vsock"
    result = _kvmlet("--kernel", str(guest_elf), "--cmdline", "console=ttyS0 kvmlet.test=cmdline",
                     "--net", "auto,queues=2,mtu=1400", "--net", "tap=auto,offload=off",
                     "--vsock", f"cid=5,uds={uds}", console=f"file:{tmp_path / 'console.log'}")
    assert result.returncode == 0, result.stderr
    output = (tmp_path / "console.log").read_text()
    [line] = [line for line in output.splitlines() if line.startswith("CMDLINE ")]
    assert line.count("virtio_mmio.device=") == 3  # two interfaces and the vsock device
    assert not uds.exists()
    with pytest.raises(OSError):
        socket.socket(socket.AF_UNIX).connect(str(uds))
