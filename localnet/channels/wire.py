"""An `Encoded` message on the runtime's wire: one uint8 payload plus a header `meta` entry.

The runtime's messages carry exactly one ndarray (`runtime.messages`), so the encoded
parts (int8 values and a scale, top-k values and indices, packed sign bits, ...) are laid
end to end as raw bytes, and the header's meta says how to cut them apart again:

    meta["codec"] = {"name": "int8", "x": ["float32", [16, 32, 8, 8]],
                     "parts": [["q", "int8", [16, 32, 8, 8]], ["scale", "float32", [1, 1, 1, 1]]],
                     "m": {...codec scalars, e.g. low-rank's counter...}, "sb": 4}

and on a link with `noise`, "nz": [seed, size], from which the receiver draws the noise the
sender measured (`channel.with_noise`).

A message the channel lost is sent as {"name": ..., "lost": true} with an empty payload
(the receiver's step bookkeeping stays aligned, and it learns that nothing arrived); a
sender with nothing to send (it received no error itself) sends {"name": ..., "empty":
true}, and one whose own (delayed) error has not arrived yet {"name": ..., "wait": true}.  No weight is ever in here: the codecs see only the tensor they encode.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .codecs import Encoded

LOST, EMPTY, WAITING = "lost", "empty", "wait"


def _dtype(name: str) -> torch.dtype:
    d = getattr(torch, name, None)
    if not isinstance(d, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return d


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pack(enc: Encoded) -> tuple[np.ndarray, dict]:
    """(uint8 payload, meta) for an encoded message."""
    parts, chunks = [], []
    for key, t in enc.payload.items():
        t = t.detach().contiguous().cpu()
        parts.append([key, _name(t.dtype), list(t.shape)])
        chunks.append(t.reshape(-1).view(torch.uint8))
    flat = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
    meta = {"name": enc.codec, "x": [_name(enc.dtype), list(enc.shape)], "parts": parts,
            "m": dict(enc.meta), "sb": int(enc.scalar_bytes)}
    if enc.noise:
        meta["nz"] = [int(enc.noise[0]), float(enc.noise[1])]
    return flat.numpy(), meta


def marker(codec: str, what: str) -> tuple[np.ndarray, dict]:
    """The payload and meta of a lost (LOST), empty (EMPTY) or waiting (WAITING) slot."""
    return np.zeros(0, np.uint8), {"name": codec, what: True}


def _noise(nz) -> tuple[int, float] | None:
    """A message's noise entry, [seed, size], checked: the receiver draws from it."""
    if nz is None:
        return None
    ok = isinstance(nz, (list, tuple)) and len(nz) == 2 and isinstance(nz[0], int) \
        and isinstance(nz[1], (int, float)) and nz[0] >= 0 and 0 <= nz[1] < math.inf
    if not ok:
        raise ValueError(f"noise {nz!r}: [seed >= 0, finite size >= 0] expected")
    return int(nz[0]), float(nz[1])


def unpack(payload: np.ndarray, meta: dict) -> Encoded | None:
    """The Encoded message back: None for a lost or empty slot, channel.WAIT for a
    waiting one.  Raises ValueError when the meta and the payload do not fit together."""
    if meta.get(LOST) or meta.get(EMPTY):
        return None
    if meta.get(WAITING):
        return WAITING  # == channel.WAIT
    try:
        xdtype, xshape = _dtype(meta["x"][0]), tuple(int(n) for n in meta["x"][1])
        parts = [(str(k), _dtype(d), tuple(int(n) for n in s)) for k, d, s in meta["parts"]]
        name, m, sb = str(meta["name"]), dict(meta.get("m") or {}), int(meta.get("sb", 0))
        noise = _noise(meta.get("nz"))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"malformed codec meta ({type(exc).__name__}: {exc})") from None
    if payload.dtype != np.uint8 or payload.ndim != 1:
        raise ValueError(f"an encoded payload is flat uint8, got {payload.dtype}{list(payload.shape)}")
    sizes = [math.prod(s) * torch.empty(0, dtype=d).element_size() for _, d, s in parts]
    if sum(sizes) != payload.size:
        raise ValueError(f"codec parts need {sum(sizes)} bytes, the payload has {payload.size}")
    raw = torch.from_numpy(payload) if payload.flags.writeable else torch.tensor(payload)
    out, at = {}, 0
    for (key, d, s), n in zip(parts, sizes):
        out[key] = raw[at:at + n].clone().view(d).reshape(s)  # clone: aligned storage
        at += n
    return Encoded(name, xshape, xdtype, out, m, sb, noise)
