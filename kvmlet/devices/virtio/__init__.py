"""Virtio devices (OASIS virtio 1.2): split virtqueues, the MMIO transport (version 2), block and entropy.

Modules: ``queue`` (split virtqueues, every guest-controlled value checked), ``mmio`` (the virtio-mmio
register interface and device status state machine), ``device`` (what a device type implements),
``blk`` and ``blk_backend`` (virtio-blk on a raw file or block device), ``rng`` (virtio-rng),
``ratelimit`` (token buckets), ``options`` (drive / rng configuration), ``attach`` (wiring into a VM).
Nothing here is imported unless a VM has virtio devices.
"""
