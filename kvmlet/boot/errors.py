"""Errors raised while reading boot images."""

from kvmlet.errors import KvmletError


class BootImageError(KvmletError, ValueError):
    """A kernel or boot image is malformed or unsupported; the message says what is wrong."""
