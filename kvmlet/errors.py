"""kvmlet's error hierarchy: every error a user can cause or fix is a :class:`KvmletError`.

``str(error)`` is one line that names what is wrong and, where it can, what to do about it. The command
line prints it after ``kvmlet:`` and exits with status 1; the API returns it as Firecracker's
``{"fault_message": ...}`` with status 400. Anything else that escapes is a bug in kvmlet.
"""

from __future__ import annotations


class KvmletError(Exception):
    """A user error (bad flag, spec, file, API body, or a call in the wrong state), in one line."""


class ConfigError(KvmletError, ValueError):
    """A configuration value that cannot work, with what to change."""


class StateError(KvmletError):
    """An operation the VM cannot do in its current lifecycle state (e.g. resume a running VM)."""


class UnsupportedError(KvmletError):
    """A feature kvmlet does not implement (yet); the message says which."""
