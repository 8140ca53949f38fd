"""UDP datagrams inside a deadline-mode byte stream (sans-IO).

Deadline mode delivers bytes in order but may skip ranges, so a plain length prefix
would lose its place after a gap. Each datagram is framed as::

    magic 0xD7 0x55 | length u16 | CRC-32 of the payload u32 | payload

and after a gap the decoder scans forward to the next magic whose length and CRC
check out: the datagrams a gap touched are lost, every other one arrives intact.
"""

from __future__ import annotations

import struct
import zlib

MAGIC = b"\xd7\x55"
_HEAD = struct.Struct("!2sHI")
HEAD_LEN = _HEAD.size  # 8
MAX_PAYLOAD = 0xFFFF


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"datagram of {len(payload)} bytes is too large to frame")
    return _HEAD.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


class FrameDecoder:
    """Datagrams out of a byte stream that may have gaps (call ``gap()`` at each)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.resyncs = 0  # bytes skipped looking for a frame (after a gap or damage)

    def gap(self) -> None:
        self._buf.clear()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        buf = self._buf
        while len(buf) >= HEAD_LEN:
            if buf[:2] != MAGIC:
                i = buf.find(MAGIC, 1)
                skip = len(buf) - 1 if i < 0 else i
                self.resyncs += skip
                del buf[:skip]
                continue
            _, n, crc = _HEAD.unpack_from(buf)
            if len(buf) < HEAD_LEN + n:
                break
            payload = bytes(buf[HEAD_LEN : HEAD_LEN + n])
            if zlib.crc32(payload) != crc:
                self.resyncs += 1
                del buf[:1]  # a false magic (the rest of a frame a gap cut): look further
                continue
            del buf[: HEAD_LEN + n]
            out.append(payload)
        return out


__all__ = ["HEAD_LEN", "MAGIC", "FrameDecoder", "frame"]
