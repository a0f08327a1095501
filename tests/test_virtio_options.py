"""--drive and --rng: the syntax, the configuration it gives, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvmlet.config import ConfigError, MachineConfig
from kvmlet.devices.virtio.options import DriveConfig, RngConfig, parse_drive, parse_rng, validate_devices
from kvmlet.devices.virtio.ratelimit import RateLimiterConfig, TokenBucketConfig

REPO = Path(__file__).resolve().parent.parent


def test_full_drive_spec() -> None:
    drive = parse_drive("path=/tmp/d.img,readonly=on,direct=yes,id=root,bps=10M,bps-burst=1G,iops=500,"
                        "iops-burst=100,refill-ms=500")
    assert drive == DriveConfig(Path("/tmp/d.img"), readonly=True, direct=True, id="root",
                                rate_limit=RateLimiterConfig(
                                    bandwidth=TokenBucketConfig(10 << 20, 500, 1 << 30),
                                    ops=TokenBucketConfig(500, 500, 100)))


def test_bare_path_and_defaults() -> None:
    drive = parse_drive("disk.img")
    assert drive == DriveConfig(Path("disk.img"))
    assert not drive.rate_limit.enabled


def test_rng_spec() -> None:
    assert parse_rng("") == RngConfig()
    assert parse_rng("bps=64K") == RngConfig(RateLimiterConfig(bandwidth=TokenBucketConfig(65536, 1000)))


@pytest.mark.parametrize(("spec", "message"), [
    ("", "path=FILE is required"),
    ("readonly=on", "path=FILE is required"),
    ("path=a,bogus=1", "unknown key 'bogus'"),
    ("path=a,readonly=maybe", "use on or off"),
    ("path=a,bps=fast", "is not a number"),
    ("path=a,path=b", "given twice"),
    ("path=a,iops-burst=5", "iops-burst needs iops"),
    ("path=a,bps=0", "bps must be positive"),
    ("path=a,refill-ms=0", "refill-ms must be positive"),
    ("path=a,x", "is not key=value"),
])
def test_bad_drive_specs(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_drive(spec)
    assert "\n" not in str(info.value) and str(info.value).startswith("--drive")


def test_bad_rng_spec() -> None:
    with pytest.raises(ConfigError, match="unknown key 'iops'"):
        parse_rng("iops=5")


def test_validation(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(4096))
    validate_devices([DriveConfig(image), DriveConfig(image, readonly=True, id="second")], RngConfig())
    with pytest.raises(ConfigError, match="No such file"):
        validate_devices([DriveConfig(tmp_path / "missing.img")], None)
    with pytest.raises(ConfigError, match="not a regular file or a block device"):
        validate_devices([DriveConfig(tmp_path)], None)
    with pytest.raises(ConfigError, match="is used by another drive"):
        validate_devices([DriveConfig(image, id="x"), DriveConfig(image, id="x")], None)
    with pytest.raises(ConfigError, match="printable ASCII"):
        validate_devices([DriveConfig(image, id="x" * 21)], None)
    with pytest.raises(ConfigError, match="bucket size must be positive"):
        validate_devices([DriveConfig(image, rate_limit=RateLimiterConfig(ops=TokenBucketConfig(0)))], None)
    config = MachineConfig(drives=[DriveConfig(tmp_path / "missing.img")])
    with pytest.raises(ConfigError):
        config.validate()


def _kvmlet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmlet", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_cli_reports_a_bad_drive_in_one_line() -> None:
    result = _kvmlet("run", "--drive", "path=x.img,speed=fast")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "kvmlet: --drive 'path=x.img,speed=fast': unknown key 'speed' (known keys: path, readonly, direct, id, "
        "bps, bps-burst, iops, iops-burst, refill-ms)"]


def test_cli_reports_a_missing_image(tmp_path: Path) -> None:
    result = _kvmlet("run", "--drive", f"path={tmp_path}/nope.img", "--console", "none")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.img: No such file or directory" in lines[0]


def test_cli_runs_the_guest_with_a_drive_and_rng(tmp_path: Path, guest_elf: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * 512))
    result = _kvmlet("run", "--cmdline", "console=ttyS0 kvmlet.test=virtio-blk,virtio-rng", "--drive",
                     f"path={image},id=cli-disk", "--rng", "bps=1M", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BLK id=cli-disk" in result.stdout and "TEST virtio-rng PASS" in result.stdout
