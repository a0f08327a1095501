"""--net and --vsock: the syntax, the configuration it gives, one-line errors, and the `kvmlet run` wiring."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kvmlet.config import (
    ConfigError,
    NetworkInterface,
    RateLimiterConfig,
    TokenBucketConfig,
    VmConfig,
    Vsock,
    decode,
    encode,
    simple_config,
)
from kvmlet.config.models import format_mac, parse_mac
from kvmlet.config.specs import parse_net, parse_vsock
from kvmlet.devices.factory import default_mac
from kvmlet.net.tap import MAX_QUEUES

REPO = Path(__file__).resolve().parent.parent


def test_full_net_spec() -> None:
    net = parse_net("tap=tap7,mac=02:00:00:12:34:56,queues=4,offload=off,mtu=9000,address=10.213.5.1/24,"
                    "bridge=br0,rx-bps=10M,rx-pps=1000,tx-bps=1M,tx-bps-burst=64K,refill-ms=100", 0)
    assert net == NetworkInterface(
        iface_id="net0", host_dev_name="tap7", guest_mac="02:00:00:12:34:56", queues=4, offload=False, mtu=9000,
        address="10.213.5.1/24", bridge="br0",
        rx_rate_limiter=RateLimiterConfig(bandwidth=TokenBucketConfig(size=10 << 20, refill_time=100),
                                          ops=TokenBucketConfig(size=1000, refill_time=100)),
        tx_rate_limiter=RateLimiterConfig(bandwidth=TokenBucketConfig(size=1 << 20, refill_time=100,
                                                                      one_time_burst=65536)))
    net.validate()


def test_bare_tap_and_defaults() -> None:
    assert parse_net("auto", 0) == NetworkInterface(iface_id="net0")
    assert parse_net("", 2) == NetworkInterface(iface_id="net2")
    assert parse_net("id=eth_0", 0).iface_id == "eth_0"
    net = parse_net("mytap", 0)
    assert net.host_dev_name == "mytap" and net.queues == 1 and net.offload and net.guest_mac is None
    assert net.rx_rate_limiter is None and net.tx_rate_limiter is None


@pytest.mark.parametrize(("spec", "message"), [
    ("queues=0", "queues=0: choose 1 to "),
    ("queues=17", "queues=17: choose 1 to "),
    ("queues=two", "is not a number"),
    ("offload=maybe", "use on or off"),
    ("mtu=20", "mtu=20: choose 68 to "),
    ("rx-bps-burst=5", "rx-bps-burst needs rx-bps"),
    ("tx-pps=0", "tx-pps must be positive"),
    ("refill-ms=0", "refill-ms must be positive"),
    ("speed=10", "unknown key 'speed'"),
    ("auto,auto", "is not key=value"),
])
def test_bad_net_specs(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_net(spec, 0)
    assert "\n" not in str(info.value) and str(info.value).startswith("--net")


def test_queue_pairs_up_to_the_tap_limit() -> None:
    assert parse_net(f"queues={MAX_QUEUES}", 0).queues == MAX_QUEUES
    with pytest.raises(ConfigError, match=f"choose 1 to {MAX_QUEUES} queue pairs"):
        parse_net(f"queues={MAX_QUEUES + 1}", 0)


def test_mtu_up_to_the_tap_limit() -> None:
    assert parse_net("mtu=65521", 0).mtu == 65521
    with pytest.raises(ConfigError, match="mtu=65522: choose 68 to 65521"):
        parse_net("mtu=65522", 0)


@pytest.mark.parametrize(("spec", "message"), [
    ("tap=a/b", "not an interface name"),
    ("tap=averyveryverylongname", "not an interface name"),
    ("mac=01:00:5e:00:00:01", "multicast"),
    ("mac=02:00:00:00:00", "is not like"),
    ("mac=00:00:00:00:00:00", "not a usable address"),
    ("address=10.0.0.300/24", "is not like"),
    ("bridge=a:b", "is not an interface name"),
])
def test_bad_net_values_are_refused_by_validation(spec: str, message: str) -> None:
    """What the syntax accepts but cannot work is refused when the configuration is checked, naming the
    interface."""
    net = parse_net(spec, 0)
    with pytest.raises(ConfigError, match=message) as info:
        net.validate()
    assert "\n" not in str(info.value) and str(info.value).startswith("network interface 'net0'")


def test_vsock_spec(tmp_path: Path) -> None:
    config = parse_vsock(f"cid=42,uds={tmp_path}/v.sock")
    assert config == Vsock(guest_cid=42, uds_path=str(tmp_path / "v.sock"))
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
        Vsock(guest_cid=3, uds_path=str(tmp_path / "missing" / "v.sock")).validate()
    with pytest.raises(ConfigError, match="too long"):
        Vsock(guest_cid=3, uds_path=str(tmp_path / ("x" * 120))).validate()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a socket"):
        Vsock(guest_cid=3, uds_path=str(tmp_path / "file")).validate()


def _config(tmp_path: Path, nets: list[NetworkInterface]) -> VmConfig:
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"")
    return simple_config(kernel, network_interfaces=nets)


def test_taps_and_macs_must_not_repeat(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="host_dev_name 'tap1' is used twice"):
        _config(tmp_path, [NetworkInterface(iface_id="a", host_dev_name="tap1"),
                           NetworkInterface(iface_id="b", host_dev_name="tap1")]).validate()
    with pytest.raises(ConfigError, match="guest_mac '02:00:00:00:00:01' is used twice"):
        _config(tmp_path, [NetworkInterface(iface_id="a", guest_mac="02:00:00:00:00:01"),
                           NetworkInterface(iface_id="b", guest_mac="02:00:00:00:00:01")]).validate()
    with pytest.raises(ConfigError, match="iface_id 'a' is used twice"):
        _config(tmp_path, [NetworkInterface(iface_id="a"), NetworkInterface(iface_id="a")]).validate()
    _config(tmp_path, [NetworkInterface(iface_id="a"), NetworkInterface(iface_id="b")]).validate()  # two auto TAPs


def test_vm_config_checks_the_network(tmp_path: Path) -> None:
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"")
    body = encode({"boot-source": {"kernel_image_path": str(kernel)},
                   "network-interfaces": [{"iface_id": "net0", "host_dev_name": "auto", "queues": 99}]})
    with pytest.raises(ConfigError, match="queues"):
        decode(body, VmConfig, "config file").validate()


def test_default_mac_is_locally_administered_unicast_and_stable() -> None:
    mac = default_mac("host/123/kvmlet0", 0)
    assert mac[0] & 0x02 and not mac[0] & 0x01
    assert mac == default_mac("host/123/kvmlet0", 0)
    assert mac != default_mac("host/123/kvmlet0", 1) and mac != default_mac("host/123/kvmlet1", 0)
    assert parse_mac(format_mac(mac)) == mac
    net = NetworkInterface(iface_id="net0", guest_mac="02:aa:bb:cc:dd:ee")
    assert net.guest_mac is not None and parse_mac(net.guest_mac) == bytes.fromhex("02aabbccddee")


def _kvmlet(*args: str, console: str = "none") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmlet", "run", "--console", console, "--timeout", "30", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize(("args", "message"), [
    (("--net", "queues=0"), "kvmlet: --net 'queues=0': queues=0: choose 1 to "),
    (("--vsock", "cid=1,uds=/tmp/x"), "kvmlet: --vsock 'cid=1,uds=/tmp/x': cid=1: the guest's CID must be 3"),
    (("--net", "tap=lo"), "kvmlet: network interface 'net0': interface lo exists and is not a TAP device"),
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
