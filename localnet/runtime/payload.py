"""How a payload's bytes lie, on the wire and in memory.

A payload keeps its logical shape; its header's `order` says how its bytes lie: []
row-major, [0, 2, 3, 1] a 4-d (N, C, H, W) payload stored channels-last, as (N, H, W, C),
which is how convolutions on the CPU run fastest (`train.memory_format`).  Only the bytes
on the wire follow `order`, so neither end copies a payload into the other layout.
A payload made on an accelerator stays a tensor there (`on_device`); `host` gives the
host array wherever one is needed.
"""

from __future__ import annotations

import numpy as np
import torch

CHANNELS_LAST = (0, 2, 3, 1)


def layout(arr) -> tuple[int, ...] | None:
    """The `order` in which an array's (or tensor's) bytes lie densely: () row-major,
    CHANNELS_LAST for a 4-d one stored channels-last; None for any other strides (it
    needs a copy before it can travel)."""
    if isinstance(arr, torch.Tensor):
        if arr.is_contiguous():
            return ()
        if arr.dim() == 4 and arr.is_contiguous(memory_format=torch.channels_last):
            return CHANNELS_LAST
        return None
    if arr.flags.c_contiguous:
        return ()
    if arr.ndim == 4 and arr.transpose(CHANNELS_LAST).flags.c_contiguous:
        return CHANNELS_LAST
    return None


def wire_bytes(arr, order: tuple[int, ...] = ()):
    """The payload's bytes as they lie (`order`), flat uint8: a view, never a copy of
    a dense payload."""
    if isinstance(arr, torch.Tensor):
        t = arr.permute(order) if order else arr
        return t.contiguous().reshape(-1).view(torch.uint8)
    a = arr.transpose(order) if order else arr
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def from_wire_bytes(data, shape, order: tuple[int, ...] = ()):
    """The inverse of `wire_bytes`, for bytes already viewed as the dtype: the array of
    logical `shape` whose bytes lie in `order` (a view)."""
    if not order:
        return data.reshape(shape)
    phys = data.reshape([shape[i] for i in order])
    back = tuple(order.index(i) for i in range(len(order)))
    return phys.permute(back) if isinstance(phys, torch.Tensor) else phys.transpose(back)


def dense(t):
    """A tensor or array as it lies when that is dense (row-major or channels-last),
    else a row-major copy."""
    if layout(t) is not None:
        return t
    return t.contiguous() if isinstance(t, torch.Tensor) else np.ascontiguousarray(t)


def on_device(payload) -> bool:
    """Is this payload a tensor on an accelerator (not host memory)?"""
    return isinstance(payload, torch.Tensor) and payload.device.type != "cpu"


def host(payload) -> np.ndarray:
    """A payload as a host array: itself, or a device tensor copied to the host."""
    if isinstance(payload, torch.Tensor):
        return dense(payload.detach().cpu()).numpy()  # in the layout its header names
    return payload
