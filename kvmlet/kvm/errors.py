"""Errors raised at the KVM boundary, each with a message a user can act on."""

from __future__ import annotations

import errno
import os

from kvmlet.errors import KvmletError


class KvmError(OSError):
    """A KVM ioctl failed."""


class KvmUnavailableError(KvmletError, RuntimeError):
    """The host has no usable KVM (no /dev/kvm, no permission, wrong API, missing capability)."""


def ioctl_error(name: str, exc: OSError) -> KvmError:
    """Wrap an OSError from an ioctl with the ioctl's name."""
    code = exc.errno or 0
    text = os.strerror(code) if code else str(exc)
    return KvmError(code, f"{name} failed: {text} ({errno.errorcode.get(code, code)})")


def ioctl_ulong(fd: int, request: int, value: int) -> int:
    """An ioctl whose argument is an unsigned long (fcntl.ioctl only passes a C int)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
    result = int(libc.ioctl(fd, request, value))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result
