"""Fetch and cache Debian 12's cloud kernel (linux-image-cloud-amd64), the boot protocol's reference client.

The cache is ``$KVMLET_CACHE/linux`` or ``~/.cache/kvmlet/linux``. Once a kernel is cached it is used
without asking apt; ``refresh=True`` (``--refresh``) looks again for a newer one.
Prefetch (CI set-up): ``python -m tests.support.debian_kernel``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvmlet.boot.vmlinux_extract import extract_vmlinux

METAPACKAGE = "linux-image-cloud-amd64"
_CURRENT = "current"  # file in the cache root naming the entry in use
_META = "kernel.json"
_APT_LOCK_WAIT_S = 600.0


@dataclass(frozen=True)
class DebianKernel:
    """A cached Debian kernel: its release (``uname -r``), bzImage and extracted vmlinux."""

    version: str  # kernel release, as in "Linux version 6.1.0-56-cloud-amd64"
    bzimage: Path
    vmlinux: Path
    config: Path
    package: str  # e.g. linux-image-6.1.0-56-cloud-amd64
    package_version: str  # e.g. 6.1.192-2


def cache_dir() -> Path:
    """Return the directory the kernels are cached in."""
    root = os.environ.get("KVMLET_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "kvmlet"
    return base / "linux"


def debian_cloud_kernel(refresh: bool = False) -> DebianKernel:
    """Return the cached Debian cloud kernel, downloading and extracting it first if needed."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):
        if not refresh:
            cached = _load_current(cache)
            if cached is not None:
                return cached
        package = _resolve_image_package()
        return _fetch(cache, package)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_current(cache: Path) -> DebianKernel | None:
    try:
        entry = cache / (cache / _CURRENT).read_text().strip()
        meta = json.loads((entry / _META).read_text())
    except (OSError, ValueError):
        return None
    kernel = DebianKernel(
        version=meta["release"],
        bzimage=entry / meta["bzimage"],
        vmlinux=entry / "vmlinux",
        config=entry / meta["config"],
        package=meta["package"],
        package_version=meta["package_version"],
    )
    if kernel.bzimage.is_file() and kernel.vmlinux.is_file():
        return kernel
    return None


def _run(cmd: Sequence[str], cwd: Path | None = None) -> str:
    """Run a command; raise RuntimeError naming it and quoting its stderr if it fails."""
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise RuntimeError(f"command {' '.join(cmd)!r} could not run: {exc}") from exc
    if proc.returncode != 0:
        raise RuntimeError(
            f"command {' '.join(cmd)!r} failed with exit status {proc.returncode}: {proc.stderr.strip()}"
        )
    return proc.stdout


def _apt(cmd: Sequence[str], cwd: Path | None = None) -> str:
    """Run an apt command; if apt has no package lists, run 'apt-get update' once and retry."""
    try:
        return _run(cmd, cwd)
    except RuntimeError as first:
        if not _no_lists(str(first)):
            raise
    _apt_update()
    return _run(cmd, cwd)


def _no_lists(message: str) -> bool:
    return any(
        s in message
        for s in (
            "No packages found",
            "Unable to locate package",
            "has no installation candidate",
            "404  Not Found",
            "404 Not Found",
        )
    )


def _apt_update() -> None:
    """Run 'apt-get update', waiting while another apt holds its lock."""
    deadline = time.monotonic() + _APT_LOCK_WAIT_S
    while True:
        try:
            _run(["apt-get", "update"])
            return
        except RuntimeError as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise
        time.sleep(2.0)


def _resolve_image_package() -> str:
    """Return the real image package behind the metapackage (e.g. linux-image-6.1.0-56-cloud-amd64)."""
    out = _apt(["apt-cache", "depends", METAPACKAGE])
    found = re.findall(r"^\s*\|?Depends:\s*(linux-image-[^\s<>]+)", out, re.MULTILINE)
    if not found:
        raise RuntimeError(f"command 'apt-cache depends {METAPACKAGE}' names no linux-image package:\n{out}")
    return str(found[0])


def _fetch(cache: Path, package: str) -> DebianKernel:
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
    try:
        sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
        _apt(["apt-get", "download", *sandbox, package], cwd=work)
        debs = sorted(work.glob(f"{package}_*.deb"))
        if not debs:
            raise RuntimeError(f"command 'apt-get download {package}' left no .deb in {work}")
        deb = debs[0]
        fields = _run(["dpkg-deb", "-f", str(deb), "Package", "Version"])
        info = dict(line.split(": ", 1) for line in fields.splitlines() if ": " in line)
        name, version = info["Package"], info["Version"]
        entry = cache / f"{name}_{version}"
        if entry.exists():
            shutil.rmtree(entry)
        staging = work / "entry"
        staging.mkdir()
        bzimage, config = _extract_boot_files(deb, staging)
        release = bzimage.name.removeprefix("vmlinuz-")
        (staging / "vmlinux").write_bytes(extract_vmlinux(bzimage.read_bytes()))
        meta = {
            "release": release,
            "package": name,
            "package_version": version,
            "bzimage": bzimage.name,
            "config": config.name,
        }
        (staging / _META).write_text(json.dumps(meta, indent=1) + "\n")
        staging.rename(entry)
        tmp = cache / f".{_CURRENT}.tmp"
        tmp.write_text(entry.name + "\n")
        tmp.replace(cache / _CURRENT)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kernel = _load_current(cache)
    if kernel is None:
        raise RuntimeError(f"kernel cache entry {entry} is incomplete after extraction")
    return kernel


def _extract_boot_files(deb: Path, dest: Path) -> tuple[Path, Path]:
    """Copy boot/vmlinuz-* and boot/config-* out of the package into dest."""
    cmd = ["dpkg-deb", "--fsys-tarfile", str(deb)]
    found: dict[str, Path] = {}
    with (
        tempfile.TemporaryFile() as errfile,
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errfile) as proc,
    ):
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                m = re.fullmatch(r"boot/(vmlinuz|config)-[^/]+", name)
                if m is None or not member.isfile():
                    continue
                src = tar.extractfile(member)
                assert src is not None
                path = dest / Path(name).name
                with open(path, "wb") as out:
                    shutil.copyfileobj(src, out)
                found[m.group(1)] = path
        while proc.stdout.read(1 << 16):  # drain the archive's padding
            pass
        if proc.wait() != 0:
            errfile.seek(0)
            stderr = errfile.read().decode(errors="replace").strip()
            raise RuntimeError(
                f"command {' '.join(cmd)!r} failed with exit status {proc.returncode}: {stderr}"
            )
    if "vmlinuz" not in found or "config" not in found:
        raise RuntimeError(f"{deb.name} has no boot/vmlinuz-* and boot/config-* (found {sorted(found)})")
    return found["vmlinuz"], found["config"]


def main(argv: list[str] | None = None) -> int:
    """Prefetch the kernel and print where it is."""
    args = sys.argv[1:] if argv is None else argv
    if any(a not in ("--refresh",) for a in args):
        print("usage: python -m tests.support.debian_kernel [--refresh]", file=sys.stderr)
        return 2
    try:
        kernel = debian_cloud_kernel(refresh="--refresh" in args)
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"debian_kernel: {exc}", file=sys.stderr)
        return 1
    print(f"package: {kernel.package} {kernel.package_version}")
    print(f"release: {kernel.version}")
    print(f"bzimage: {kernel.bzimage} ({kernel.bzimage.stat().st_size} bytes)")
    print(f"vmlinux: {kernel.vmlinux} ({kernel.vmlinux.stat().st_size} bytes)")
    print(f"config:  {kernel.config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
