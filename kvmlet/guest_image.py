"""The built-in test guest (guest/ in the source tree): where its ELF is, and building it if needed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from kvmlet.errors import KvmletError

if TYPE_CHECKING:
    from kvmlet.config.models import VmConfig

DEFAULT_GUEST_CMDLINE = "console=ttyS0 kvmlet.test=serial,bootinfo,cmdline,e820,cpl3,smp kvmlet.loops=1000000"
GUEST_ENV = "KVMLET_GUEST"


class GuestBuildError(KvmletError, RuntimeError):
    """The built-in guest is missing and could not be built."""


def guest_source_dir() -> Path:
    """guest/ next to the kvmlet package in a source checkout."""
    return Path(__file__).resolve().parent.parent / "guest"


def guest_elf_path() -> Path:
    override = os.environ.get(GUEST_ENV)
    if override:
        return Path(override)
    return guest_source_dir() / "build" / "kvmlet-guest.elf"


def is_builtin_guest(path: Path) -> bool:
    try:
        return path.resolve() == guest_elf_path().resolve()
    except OSError:
        return False


def with_builtin_guest(config: VmConfig) -> VmConfig:
    """``config`` with the built-in guest as its kernel when it has no boot source, and the guest's own
    command line when it boots the built-in guest without one (builds the guest if needed)."""
    import msgspec

    from kvmlet.config.models import BootSource

    boot = config.boot_source
    if boot is None:
        boot = BootSource(kernel_image_path=str(builtin_guest()))
    if boot.boot_args is None and is_builtin_guest(Path(boot.kernel_image_path)):
        boot = msgspec.structs.replace(boot, boot_args=DEFAULT_GUEST_CMDLINE)
    return msgspec.structs.replace(config, boot_source=boot)


def _stale(elf: Path, source: Path) -> bool:
    if not elf.exists():
        return True
    built = elf.stat().st_mtime
    return any(p.stat().st_mtime > built for p in source.iterdir()
               if p.is_file() and (p.suffix in (".c", ".S", ".h", ".ld") or p.name == "Makefile"))


def builtin_guest(rebuild: bool = False) -> Path:
    """The guest ELF, built with make and gcc first when it is missing or older than its sources."""
    elf = guest_elf_path()
    if os.environ.get(GUEST_ENV):
        if not elf.is_file():
            raise GuestBuildError(f"{GUEST_ENV}={elf} does not exist")
        return elf
    source = guest_source_dir()
    if not (source / "Makefile").is_file():
        if elf.is_file():
            return elf
        raise GuestBuildError(f"the built-in guest is not installed: no {elf} and no sources in {source}; "
                              f"pass --kernel or set {GUEST_ENV}")
    if not rebuild and not _stale(elf, source):
        return elf
    import fcntl  # building is rare: keep these imports off the path to the first guest instruction
    import shutil
    import subprocess

    if shutil.which("make") is None or shutil.which("gcc") is None:
        raise GuestBuildError("building the test guest needs make and gcc: apt-get install build-essential")
    elf.parent.mkdir(parents=True, exist_ok=True)
    with open(elf.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if rebuild or _stale(elf, source):
            result = subprocess.run(["make", "-s", "-C", str(source)], capture_output=True, text=True)
            if result.returncode != 0:
                raise GuestBuildError(f"building the test guest failed:\n{result.stderr.strip()}")
    return elf
