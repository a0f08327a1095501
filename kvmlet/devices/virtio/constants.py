"""Numbers from the virtio 1.2 specification shared by the transport, the queues and the devices."""

from __future__ import annotations

import enum


class DeviceType(enum.IntEnum):
    """Virtio device IDs (virtio 1.2 section 5)."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4
    VSOCK = 19


class DeviceStatus(enum.IntFlag):
    """The device status field (section 2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


# Device-independent feature bits (section 6).
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_RING_RESET = 40


def feature_bit(bit: int) -> int:
    """The mask of feature bit number ``bit``."""
    return 1 << bit


# The transport features kvmlet's split-ring implementation offers for every device.
COMMON_FEATURES = (feature_bit(VIRTIO_F_VERSION_1) | feature_bit(VIRTIO_F_INDIRECT_DESC)
                   | feature_bit(VIRTIO_F_EVENT_IDX))


class InterruptReason(enum.IntFlag):
    """Bits of the MMIO InterruptStatus register (section 4.2.2)."""

    USED_BUFFER = 1
    CONFIG_CHANGE = 2


class MmioRegister(enum.IntEnum):
    """virtio-mmio version 2 register offsets (section 4.2.2)."""

    MAGIC_VALUE = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    SHM_SEL = 0x0AC
    SHM_LEN_LOW = 0x0B0
    SHM_LEN_HIGH = 0x0B4
    SHM_BASE_LOW = 0x0B8
    SHM_BASE_HIGH = 0x0BC
    QUEUE_RESET = 0x0C0
    CONFIG_GENERATION = 0x0FC
    CONFIG = 0x100


MMIO_MAGIC = 0x74726976  # "virt"
MMIO_VERSION = 2
MMIO_VENDOR_ID = 0x4B564D4C  # "KVML"
MMIO_WINDOW_SIZE = 0x1000
