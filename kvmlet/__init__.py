"""kvmlet: a virtual machine monitor in Python on Linux KVM."""

import time as _time

__version__ = "0.1.0"

IMPORTED_AT = _time.perf_counter()
"""When the kvmlet package was first imported (perf_counter): the boot timer's end of interpreter start."""
