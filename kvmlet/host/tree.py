"""Reading a host's /proc, /sys and /dev under a root directory, so tests can point it at a fake tree.

Every function takes ``root`` (default ``/``) and an absolute host path; a missing or unreadable file
reads as ``None`` (or an empty list): a host report must print whatever the host lacks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

Root = str | os.PathLike[str]

# Searched for helper binaries (swtpm) in addition to $PATH, so a report run by a service finds them too.
STANDARD_BIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def host_path(root: Root, path: str) -> Path:
    """``path`` (absolute, as on the host) inside ``root``."""
    return Path(root) / path.lstrip("/")


def exists(root: Root, path: str) -> bool:
    return os.path.lexists(host_path(root, path))


def read_text(root: Root, path: str) -> str | None:
    try:
        return host_path(root, path).read_text(errors="replace")
    except OSError:
        return None


def read_line(root: Root, path: str) -> str | None:
    """The first line of a file, stripped."""
    text = read_text(root, path)
    if text is None:
        return None
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


def read_int(root: Root, path: str) -> int | None:
    line = read_line(root, path)
    try:
        return int(line, 0) if line else None
    except ValueError:
        return None


def list_dir(root: Root, path: str) -> list[str]:
    """Entry names of a directory, sorted; empty when it is missing."""
    try:
        return sorted(os.listdir(host_path(root, path)))
    except OSError:
        return []


def link_name(root: Root, path: str) -> str | None:
    """The last component of a symlink's target (a sysfs ``driver`` link gives the driver's name)."""
    try:
        return os.path.basename(os.readlink(host_path(root, path)))
    except OSError:
        return None


def module_params(root: Root, module: str) -> dict[str, str] | None:
    """A kernel module's parameters (``/sys/module/<name>/parameters``), or None when it is not loaded."""
    if not os.path.isdir(host_path(root, f"/sys/module/{module}")):
        return None
    params: dict[str, str] = {}
    for name in list_dir(root, f"/sys/module/{module}/parameters"):
        value = read_line(root, f"/sys/module/{module}/parameters/{name}")
        if value is not None:
            params[name] = value
    return params


def param_enabled(value: str | None) -> bool | None:
    """A module parameter as a switch: ``Y``/``N`` for bools, a number for ints; None when unknown."""
    if value is None or value == "":
        return None
    if value[0] in "YyNn":
        return value[0] in "Yy"
    try:
        return int(value, 0) != 0
    except ValueError:
        return None


def which(root: Root, name: str) -> str | None:
    """An executable named ``name`` on $PATH or a standard bin directory, under root; its host path."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d.startswith("/")]
    dirs += [d for d in STANDARD_BIN_DIRS if d not in dirs]
    found = shutil.which(name, path=os.pathsep.join(str(host_path(root, d)) for d in dirs))
    if found is None:
        return None
    rel = os.path.relpath(found, host_path(root, "/"))
    return "/" + rel
