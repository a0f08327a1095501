"""Host networking for VMs: TAP devices (``tap``)."""
