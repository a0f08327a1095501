"""Virtio devices (OASIS virtio 1.2): split virtqueues, the MMIO transport (version 2), block,
entropy, network and socket devices.

Modules: ``queue`` (split virtqueues, every guest-controlled value checked), ``transport`` (the device status
state machine, negotiation, queues and notifications every transport shares), ``mmio`` (the virtio-mmio register
interface; virtio-pci is ``kvmlet.devices.pci.virtio_pci``), ``translated`` (a queue whose addresses an IOMMU
translates), ``device`` (what a device type implements),
``blk`` and ``blk_backend`` (virtio-blk on a raw file or block device), ``rng`` (virtio-rng),
``ratelimit`` (token buckets); ``net`` (virtio-net on a TAP, see ``kvmlet.net.tap``), ``vsock`` with
``vsock_packet`` and ``vsock_connection`` (virtio-vsock with a Unix-socket host side). They are built
from the configuration models by ``kvmlet.devices.factory`` and placed by ``kvmlet.devices.manager``.
Nothing here is imported unless a VM has virtio devices.
"""
