"""vhost-user: handing a virtio device's rings and guest memory to a back-end process (docs/networking.md)."""
