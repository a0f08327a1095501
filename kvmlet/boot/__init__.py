"""Guest boot: kernel images and boot protocols.

The public API is :mod:`kvmlet.boot.loader` (``identify_kernel``, ``read_kernel``, ``load``,
``BootInfo``); the vCPU entry state is in :mod:`kvmlet.boot.cpu_state` and the fixed low-memory
layout in :mod:`kvmlet.boot.layout`. Nothing is imported here, so that importing one module stays
cheap.
"""
