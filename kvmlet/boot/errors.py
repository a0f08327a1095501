"""Errors raised while reading boot images."""


class BootImageError(ValueError):
    """A kernel or boot image is malformed or unsupported; the message says what is wrong."""
