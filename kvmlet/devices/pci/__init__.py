"""PCI: the host bridge and bus 0 (ECAM and 0xCF8/0xCFC), configuration space, BARs, MSI-X, and virtio over PCI.

Modules: ``config`` (a function's configuration space), ``bus`` (bus 0, configuration access, BAR decoding),
``msix`` (the MSI-X table through KVM MSI routes and irqfds), ``virtio_pci`` (the virtio-pci transport),
``platform`` (the PCI side of a VM wired into the device manager and ACPI). See docs/pci.md.
"""
