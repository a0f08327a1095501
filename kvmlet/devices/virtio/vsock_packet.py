"""The virtio-vsock packet header and its numbers (virtio 1.2 section 5.10.6)."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

HOST_CID = 2
VSOCK_HDR = struct.Struct("<QQIIIHHIII")   # src_cid dst_cid src_port dst_port len type op flags buf_alloc fwd_cnt
HDR_SIZE = VSOCK_HDR.size
assert HDR_SIZE == 44
TYPE_STREAM = 1
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
MAX_PAYLOAD = 64 * 1024                   # the largest RW payload either side sends
U32 = 0xFFFFFFFF


class Op(enum.IntEnum):
    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


@dataclass(frozen=True)
class VsockHeader:
    """One packet header (all fields little-endian on the wire)."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    @classmethod
    def unpack(cls, raw: bytes) -> VsockHeader:
        return cls(*VSOCK_HDR.unpack(raw))

    def pack(self) -> bytes:
        return VSOCK_HDR.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len,
                              self.type, self.op, self.flags, self.buf_alloc & U32, self.fwd_cnt & U32)

    @property
    def op_name(self) -> str:
        try:
            return Op(self.op).name
        except ValueError:
            return f"op {self.op}"
