"""The frame: what every message on the data plane starts with (`plane.py`, and the
in-process queues of `local_plane.py`, which frame each message the same way so the
local mode checks the same contract).

A frame is FRAME bytes: three lengths (the msgpack header's, the payload's, and whether
the payload comes through the device group), the versioned header of `messages.py`, zero
padding, and optionally the payload's bytes right behind it.  An *abort* frame (header
length -1) carries the name of an actor that failed and why, so its peers stop at once.
The receiver turns a frame back into the header and the array it describes, and every
mismatch is a `MessageError` naming the edge.
"""

from __future__ import annotations

import math
import struct

import msgpack
import numpy as np
import torch

from .messages import Header, MessageError
from .payload import from_wire_bytes

FRAME = 1024                 # bytes: lengths + header (a header is ~110-300 bytes)
_LEN = struct.Struct("<iqi")  # header length (-1: abort), payload bytes, on the device (1)


class PeerFailed(RuntimeError):
    """Another actor failed during this batch (its abort frame arrived, or its process
    went away); the coordinator reports the first actor's own error instead."""

    def __init__(self, src: str, dst: str, reason: str):
        self.src, self.dst, self.reason = src, dst, reason
        super().__init__(f"{src} failed, so {dst} stopped: {reason}")

    def __reduce__(self):
        return (type(self), (self.src, self.dst, self.reason))


def frame(raw: bytes, nbytes: int, room: int = 0, device: bool = False) -> torch.Tensor:
    """A frame for a header and a payload of `nbytes`, with `room` bytes behind it for the
    payload itself (the caller fills them); device: the payload follows through the
    device group."""
    if len(raw) > FRAME - _LEN.size:
        raise ValueError(f"a header of {len(raw)} bytes does not fit a {FRAME}-byte frame")
    head = _LEN.pack(len(raw), nbytes, int(device)) + raw
    buf = torch.empty(FRAME + room, dtype=torch.uint8)
    b = buf.numpy()  # numpy views: a torch slice costs several times more per message
    b[:len(head)] = np.frombuffer(head, np.uint8)
    b[len(head):FRAME] = 0  # never send stale memory: the padding is zeros
    return buf


def abort_frame(src: str, reason: str) -> torch.Tensor:
    raw = msgpack.packb({"src": src, "reason": reason[:FRAME - 100]}, use_bin_type=True)
    buf = bytearray(FRAME)
    _LEN.pack_into(buf, 0, -1, 0, 0)
    buf[_LEN.size:_LEN.size + len(raw)] = raw[:FRAME - _LEN.size]
    return torch.frombuffer(buf, dtype=torch.uint8)


def unframe(buf, src: str, dst: str) -> tuple[bytes, int, bool]:
    """(header bytes, payload bytes, whether the payload comes through the device group)
    of a received frame (a tensor or its numpy view); PeerFailed for an abort."""
    b = buf.numpy() if isinstance(buf, torch.Tensor) else buf
    n, nbytes, device = _LEN.unpack_from(b, 0)
    if n < 0:
        try:
            d = msgpack.unpackb(b[_LEN.size:].tobytes().rstrip(b"\0"), raw=False)
            raise PeerFailed(d.get("src", src), dst, d.get("reason", "?"))
        except (ValueError, msgpack.UnpackException):
            raise PeerFailed(src, dst, "an abort frame") from None
    if not 0 <= n <= FRAME - _LEN.size or nbytes < 0 or device not in (0, 1):
        raise MessageError(f"bad frame (header {n} bytes, payload {nbytes}, device "
                           f"{device})", src, dst)
    return b[_LEN.size:_LEN.size + n].tobytes(), nbytes, bool(device)


def as_array(raw: bytes, data, src: str, dst: str):
    """The payload bytes (a uint8 array, or a uint8 tensor on a device) viewed as the
    array (tensor) its header describes."""
    try:
        h = Header.decode(raw)
    except MessageError as err:
        raise MessageError(err.reason, src, dst) from None
    try:
        dt = np.dtype(h.dtype)
        want = math.prod(h.shape) * dt.itemsize  # Header.decode made them ints
    except (TypeError, ValueError):
        raise h.error(f"dtype {h.dtype!r} is not a wire dtype", dst) from None
    if want != data.nbytes:
        raise h.error(f"payload of {data.nbytes} bytes, its header says {h.dtype}"
                      f"{list(h.shape)}", dst)
    if isinstance(data, torch.Tensor):  # numpy's names of the wire dtypes are torch's
        return from_wire_bytes(data.view(getattr(torch, dt.name)), h.shape, h.order)
    return from_wire_bytes(data.view(dt), h.shape, h.order)
