"""vhost: handing a virtio device's rings and guest memory to a data path outside kvmlet: a vhost-user back-end
process (protocol.py, docs/networking.md) or the kernel's vhost-net (kernel.py, docs/vhost-net.md); common.py is
what both share."""
