"""--drive and --rng: the syntax, the configuration it gives, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvmlet.config import ConfigError, Drive, Entropy, RateLimiterConfig, TokenBucketConfig, VmConfig, simple_config
from kvmlet.config.specs import parse_drive, parse_rng

REPO = Path(__file__).resolve().parent.parent


def test_full_drive_spec() -> None:
    drive = parse_drive("path=/tmp/d.img,readonly=on,direct=yes,id=root,bps=10M,bps-burst=1G,iops=500,"
                        "iops-burst=100,refill-ms=500", 0)
    assert drive == Drive(drive_id="root", path_on_host="/tmp/d.img", is_read_only=True, direct=True,
                          rate_limiter=RateLimiterConfig(
                              bandwidth=TokenBucketConfig(size=10 << 20, refill_time=500, one_time_burst=1 << 30),
                              ops=TokenBucketConfig(size=500, refill_time=500, one_time_burst=100)))


def test_bare_path_and_defaults() -> None:
    drive = parse_drive("disk.img", 0)
    assert drive == Drive(drive_id="drive0", path_on_host="disk.img")
    assert drive.rate_limiter is None and not drive.is_read_only and not drive.direct
    assert parse_drive("disk.img", 3).drive_id == "drive3"  # named by its position unless id= is given


def test_rng_spec() -> None:
    assert parse_rng("") == Entropy()
    assert parse_rng("bps=64K") == Entropy(rate_limiter=RateLimiterConfig(
        bandwidth=TokenBucketConfig(size=65536, refill_time=1000)))


@pytest.mark.parametrize(("spec", "message"), [
    ("", "path=FILE is required"),
    ("readonly=on", "path=FILE is required"),
    ("path=a,bogus=1", "unknown key 'bogus'"),
    ("path=a,readonly=maybe", "use on or off"),
    ("path=a,bps=fast", "is not a size"),
    ("path=a,path=b", "given twice"),
    ("path=a,iops-burst=5", "iops-burst needs iops"),
    ("path=a,bps=0", "bps must be positive"),
    ("path=a,refill-ms=0", "refill-ms must be positive"),
    ("path=a,x", "is not key=value"),
])
def test_bad_drive_specs(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_drive(spec, 0)
    assert "\n" not in str(info.value) and str(info.value).startswith("--drive")


def test_bad_rng_spec() -> None:
    with pytest.raises(ConfigError, match="unknown key 'iops'"):
        parse_rng("iops=5")


def _config(tmp_path: Path, drives: list[Drive], entropy: Entropy | None = None) -> VmConfig:
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"")
    return simple_config(kernel, drives=drives, entropy=entropy)


def test_validation(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(4096))
    _config(tmp_path, [Drive(drive_id="drive0", path_on_host=str(image)),
                       Drive(drive_id="second", path_on_host=str(image), is_read_only=True)], Entropy()).validate()
    with pytest.raises(ConfigError, match="No such file"):
        _config(tmp_path, [Drive(drive_id="drive0", path_on_host=str(tmp_path / "missing.img"))]).validate()
    with pytest.raises(ConfigError, match="not a regular file or a block device"):
        _config(tmp_path, [Drive(drive_id="drive0", path_on_host=str(tmp_path))]).validate()
    with pytest.raises(ConfigError, match="drive_id 'x' is used twice"):
        _config(tmp_path, [Drive(drive_id="x", path_on_host=str(image)),
                           Drive(drive_id="x", path_on_host=str(image))]).validate()
    with pytest.raises(ConfigError, match="longer than 20 bytes"):
        _config(tmp_path, [Drive(drive_id="x" * 21, path_on_host=str(image))]).validate()
    with pytest.raises(ConfigError, match="bucket size must be positive"):
        bad = RateLimiterConfig(ops=TokenBucketConfig(size=0, refill_time=1000))
        _config(tmp_path, [Drive(drive_id="drive0", path_on_host=str(image), rate_limiter=bad)]).validate()
    with pytest.raises(ConfigError, match="bucket size must be positive"):
        _config(tmp_path, [], Entropy(rate_limiter=RateLimiterConfig(
            bandwidth=TokenBucketConfig(size=0, refill_time=1000)))).validate()
    with pytest.raises(ConfigError):
        Drive(drive_id="drive0", path_on_host=str(tmp_path / "missing.img")).validate()


def _kvmlet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmlet", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_cli_reports_a_bad_drive_in_one_line() -> None:
    result = _kvmlet("run", "--drive", "path=x.img,speed=fast")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "kvmlet: --drive 'path=x.img,speed=fast': unknown key 'speed' (known keys: path, readonly, direct, id, "
        "root, bps, bps-burst, iops, iops-burst, refill-ms, transport)"]


def test_cli_reports_a_missing_image(tmp_path: Path) -> None:
    result = _kvmlet("run", "--drive", f"path={tmp_path}/nope.img", "--console", "none")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.img: No such file or directory" in lines[0]


def test_cli_runs_the_guest_with_a_drive_and_rng(tmp_path: Path, guest_elf: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * 512))
    result = _kvmlet("run", "--cmdline", "console=ttyS0 kvmlet.test=virtio-blk,virtio-rng", "--drive",
                     f"path={image},id=cli_disk", "--rng", "bps=1M", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BLK id=cli_disk" in result.stdout and "TEST virtio-rng PASS" in result.stdout
