"""Typed, versioned messages: the only things that cross between pipeline stages.

A data message is a small msgpack header plus one tensor payload:

    header  {v, run, step, mb, src, dst, kind, detail, dtype, shape, order, meta}
    payload numpy.ndarray of that dtype and shape -- or, made on an accelerator, the
            torch tensor itself, so that the data plane can keep it on the device
            (`plane.py`); anything that needs host memory asks `host()`

`order` says how the payload's bytes lie: [] row-major, or channels-last (`payload.py`).

Data kinds (`DATA_KINDS`):

  activation  forward, stage s -> its consumers (detail "train" or "eval"; the driver's
              input batch is an activation driver -> stage0 with detail "input"/"eval").
              An output read by several actors (a residual block's input, read by conv1
              and by the merge) is one message whose dst lists them: "stage3,stage5"
              (through channels, one encoded message per reader's link)
  error       backward, consumer -> producer (detail "chain": a projected error
              B^T delta; a producer with several consumers sums what it receives),
              or DFA's output error e broadcast by the last stage (detail "output",
              dst "*": every stage receives it)
  target      class labels, driver -> last stage (int64)

There is deliberately no kind that carries a parameter: weights, feedback weights and
optimizer state never travel between stages, and `Message.make` refuses an
`nn.Parameter` payload outright.

Control messages (`Control`) carry no tensor at all, only msgpack scalars: the driver's
`step`, `mirror`, `mode` commands and a stage's `stats` reply (loss, correct, samples).

Every receiver calls `validate` on what it gets; a bad message raises `MessageError`
naming the edge (src->dst), the kind and the step.

Between actors a message travels over the data plane (`plane.py`) as a frame holding the
header (`frames.py`), then the payload's bytes; the receiver rebuilds the array from the header.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import msgpack
import numpy as np
import torch
import torch.nn as nn

from ..errors import DivergedError
from .payload import dense, host, layout, on_device

SCHEMA_VERSION = 2  # 2: `order`, the payload's layout

ACTIVATION, ERROR, TARGET = "activation", "error", "target"
DATA_KINDS = (ACTIVATION, ERROR, TARGET)
CONTROL = "control"
# details of an error message
CHAIN, OUTPUT = "chain", "output"
BROADCAST = "*"
CONTROL_KINDS = ("step", "mirror", "mode", "stats", "reset")
# the names on the wire: the coordinator, and actor i of the placement
DRIVER = "driver"


def stage_name(i: int) -> str:
    return f"stage{i}"


# numpy dtype names allowed on the wire
_DTYPES = {"float16", "bfloat16", "float32", "float64", "int64", "int32", "uint8"}


class MessageError(RuntimeError):
    """A malformed or unexpected message; names the edge, the kind and the step."""

    def __init__(self, reason: str, src: str = "?", dst: str = "?", kind: str = "?",
                 step: int = -1, mb: int = -1, t: float | None = None):
        self.reason, self.src, self.dst, self.kind, self.step, self.mb = reason, src, dst, kind, step, mb
        # when it was raised: of several actors' errors, the first is the cause (a peer
        # waiting on a silent one times out after it, since it started waiting later)
        self.t = time.time() if t is None else t
        super().__init__(f"bad {kind} message on edge {src}->{dst} at step {step} "
                         f"(micro-batch {mb}): {reason}")

    @property
    def edge(self) -> str:
        return f"{self.src}->{self.dst}"

    def __reduce__(self):  # survives pickling through Ray
        return (type(self), (self.reason, self.src, self.dst, self.kind, self.step, self.mb,
                             self.t))


class NonFiniteMessage(MessageError, DivergedError):
    """A well-formed message whose values are NaN or inf: the run diverged upstream of this
    edge.  Kept apart from a malformed message because its fix is the config, not the
    runtime."""

    @property
    def what(self) -> str:
        return f"the {self.kind} on edge {self.edge} (micro-batch {self.mb}): {self.reason}"


# ------------------------------------------------------------------------------ header
_decoded: list = [None]  # (raw bytes, Header) of the last header decoded (Header.decode)


@dataclass(frozen=True)
class Header:
    kind: str
    src: str
    dst: str
    step: int
    mb: int
    dtype: str
    shape: tuple[int, ...]
    run: str = ""
    detail: str = ""
    meta: dict = field(default_factory=dict)
    version: int = SCHEMA_VERSION
    order: tuple[int, ...] = ()  # the bytes' axis order (module doc); () row-major

    def encode(self) -> bytes:
        return msgpack.packb({
            "v": self.version, "run": self.run, "step": self.step, "mb": self.mb,
            "src": self.src, "dst": self.dst, "kind": self.kind, "detail": self.detail,
            "dtype": self.dtype, "shape": list(self.shape), "order": list(self.order),
            "meta": self.meta,
        }, use_bin_type=True)

    @classmethod
    def decode(cls, raw: bytes) -> "Header":
        # The plane decodes a header to shape the payload, and the receiver decodes it
        # again to validate the message: the second time is the first's result.  Only
        # the same bytes object hits, so two messages never share a header by accident.
        last = _decoded[0]
        if last is not None and last[0] is raw:
            return last[1]
        h = cls._decode(raw)
        _decoded[0] = (raw, h)
        return h

    @classmethod
    def _decode(cls, raw: bytes) -> "Header":
        try:
            d = msgpack.unpackb(raw, raw=False)
            h = cls(kind=d["kind"], src=d["src"], dst=d["dst"], step=int(d["step"]),
                    mb=int(d["mb"]), dtype=d["dtype"], shape=tuple(int(n) for n in d["shape"]),
                    run=d["run"], detail=d.get("detail", ""), meta=d.get("meta") or {},
                    version=int(d["v"]), order=tuple(int(n) for n in d.get("order") or ()))
        except Exception as exc:  # noqa: BLE001 - any decode failure is a bad message
            raise MessageError(f"undecodable header ({type(exc).__name__}: {exc})") from None
        if h.version != SCHEMA_VERSION:
            raise MessageError(f"schema version {h.version}, this build speaks {SCHEMA_VERSION}",
                               h.src, h.dst, h.kind, h.step, h.mb)
        if h.order and sorted(h.order) != list(range(len(h.shape))):
            raise h.error(f"order {list(h.order)} is not an order of the axes of shape "
                          f"{list(h.shape)}")
        return h

    @property
    def edge(self) -> str:
        return f"{self.src}->{self.dst}"

    def error(self, reason: str, dst: str | None = None) -> MessageError:
        return MessageError(reason, self.src, dst or self.dst, self.kind, self.step, self.mb)


def _to_payload(t):
    """A message's payload: a numpy array on the host; a tensor on an accelerator stays
    one (contiguous, detached) -- copying it to the host here would cost every GPU
    message a round trip that the plane may not need."""
    if isinstance(t, nn.Parameter):
        raise TypeError("a message payload cannot be an nn.Parameter: parameters never "
                        "cross between stages")
    if isinstance(t, torch.Tensor):
        t = t.detach()
        if t.dtype == torch.bfloat16:
            raise TypeError("bfloat16 payloads are not supported on the wire yet")
        if t.device.type != "cpu":
            return dense(t)
        return dense(t).numpy()
    if isinstance(t, np.ndarray):
        return dense(t)
    raise TypeError(f"a message payload must be a tensor or ndarray, got {type(t).__name__}")


@dataclass
class Message:
    header: Header
    payload: np.ndarray | torch.Tensor  # a tensor only on an accelerator (_to_payload)
    raw_header: bytes = b""

    @classmethod
    def make(cls, kind: str, tensor, *, src: str, dst: str, step: int, mb: int,
             run: str = "", detail: str = "", meta: dict | None = None) -> "Message":
        if kind not in DATA_KINDS:
            raise ValueError(f"unknown data kind {kind!r}; one of {DATA_KINDS} "
                             f"(control messages are `Control`)")
        arr = _to_payload(tensor)
        name = dtype_name(arr.dtype)
        if name not in _DTYPES:
            raise TypeError(f"dtype {name} not allowed on the wire")
        h = Header(kind=kind, src=src, dst=dst, step=int(step), mb=int(mb),
                   dtype=name, shape=tuple(arr.shape), run=run, detail=detail,
                   meta=dict(meta or {}), order=layout(arr))
        return cls(h, arr, h.encode())

    @classmethod
    def from_wire(cls, raw_header: bytes, payload) -> "Message":
        if not isinstance(raw_header, (bytes, bytearray)):
            raise MessageError(f"header must be bytes, got {type(raw_header).__name__}")
        raw = raw_header if type(raw_header) is bytes else bytes(raw_header)
        h = Header.decode(raw)
        if not isinstance(payload, np.ndarray) and not on_device(payload):
            raise h.error(f"payload must be an ndarray or a device tensor, got "
                          f"{type(payload).__name__}")
        return cls(h, payload, raw)

    def wire(self) -> tuple[bytes, np.ndarray]:
        return self.raw_header, self.payload

    @property
    def header_bytes(self) -> int:
        return len(self.raw_header)

    @property
    def payload_bytes(self) -> int:
        return int(self.payload.nbytes)

    def tensor(self) -> torch.Tensor:
        """The payload as a torch tensor (a device payload as it is).  Arrays from Ray's
        object store are read-only shared memory; those are copied once so autograd may
        never write into them."""
        if isinstance(self.payload, torch.Tensor):
            return self.payload
        arr = self.payload if self.payload.flags.writeable else self.payload.copy()
        return torch.from_numpy(arr)

    def host(self) -> np.ndarray:
        """The payload in host memory (a copy off the device for a device payload)."""
        return host(self.payload)


def validate(msg: Message, expected_kind: str, expected_shape=None, dtype=None, *,
             detail: str | None = None, dst: str | None = None, step: int | None = None,
             mb: int | None = None, finite: bool = True) -> Message:
    """Check a received message; raise MessageError naming edge, kind and step.

    expected_shape: a tuple whose None entries match any size (e.g. (None, 16) for an
    activation whose batch dimension is free).  dtype: a torch or numpy dtype or name.
    dst: the receiver's name (a broadcast "*", or a comma-separated list naming it, is
    accepted too).
    """
    h, arr = msg.header, msg.payload
    who = dst or h.dst
    if h.kind != expected_kind:
        raise h.error(f"expected kind {expected_kind!r}, got {h.kind!r}", who)
    if detail is not None and h.detail != detail:
        raise h.error(f"expected {expected_kind} detail {detail!r}, got {h.detail!r}", who)
    if dst is not None and h.dst != BROADCAST and dst not in h.dst.split(","):
        raise h.error(f"addressed to {h.dst!r}, delivered to {dst!r}", who)
    if step is not None and h.step != step:
        raise h.error(f"expected step {step}, got step {h.step}", who)
    if mb is not None and h.mb != mb:
        raise h.error(f"expected micro-batch {mb}, got {h.mb}", who)
    got = dtype_name(arr.dtype)
    if tuple(arr.shape) != tuple(h.shape) or got != h.dtype:
        raise h.error(f"payload {got}{list(arr.shape)} does not match its header "
                      f"{h.dtype}{list(h.shape)}", who)
    if expected_shape is not None:
        exp = tuple(expected_shape)
        if len(exp) != arr.ndim or any(e is not None and e != n for e, n in zip(exp, arr.shape)):
            shown = ["*" if e is None else e for e in exp]
            raise h.error(f"expected shape {shown}, got {list(arr.shape)}", who)
    if dtype is not None:
        want = dtype_name(dtype)
        if got != want:
            raise h.error(f"expected dtype {want}, got {got}", who)
    if finite and not all_finite(arr):  # a device payload is checked where it lies
        dev = isinstance(arr, torch.Tensor)
        n = arr.numel() if dev else arr.size
        good = int((torch if dev else np).isfinite(arr).sum())
        raise NonFiniteMessage(f"{n - good} of {n} values are not finite (NaN/inf)", h.src,
                               who or h.dst, h.kind, h.step, h.mb)
    return msg


def all_finite(arr) -> bool:
    """Whether every value of a floating payload (ndarray, or a tensor where it lies) is
    finite.  One sum first: any NaN or inf makes the sum NaN or inf, and a sum reads the
    payload once without allocating a mask as large as it.  Only a non-finite sum --
    a bad value, or finite values whose sum overflows -- pays for the exact check."""
    if isinstance(arr, torch.Tensor):
        if not arr.is_floating_point() or not arr.numel():
            return True
        t = arr
    else:
        if arr.dtype.kind != "f" or not arr.size:
            return True
        if not arr.flags.writeable:  # torch views only writable arrays without a warning
            return bool(np.isfinite(arr).all())
        t = torch.from_numpy(arr)
    # fp16/bf16 sums in fp32, so a large half payload does not overflow into the slow path
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    # .item(): a Python float is checked in a fraction of what a 0-d torch.isfinite costs
    return math.isfinite(t.sum(dtype=acc).item()) or bool(torch.isfinite(t).all())


_NAMES: dict = {}


def dtype_name(dtype) -> str:
    """The wire name of a numpy or torch dtype (or a name).  Cached: numpy computes
    `dtype.name` afresh on every access, and every message asks several times."""
    try:
        return _NAMES[dtype]
    except KeyError:
        pass
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = np.dtype(dtype).name
    return _NAMES.setdefault(dtype, name)


# ------------------------------------------------------------------------------ control
@dataclass(frozen=True)
class Control:
    """A command or reply without tensors: {v, run, step, src, dst, kind: control, op, args}."""

    op: str
    src: str
    dst: str
    step: int = 0
    run: str = ""
    args: dict = field(default_factory=dict)
    version: int = SCHEMA_VERSION

    def __post_init__(self):
        if self.op not in CONTROL_KINDS:
            raise ValueError(f"unknown control op {self.op!r}; one of {CONTROL_KINDS}")
        for k, v in self.args.items():
            if not (v is None or isinstance(v, (bool, int, float, str))):
                raise TypeError(f"control arg {k!r} must be a scalar, got {type(v).__name__}")
            if isinstance(v, float) and not math.isfinite(v) and self.op != "stats":
                raise ValueError(f"control arg {k!r} is not finite: {v}")

    def encode(self) -> bytes:
        return msgpack.packb({"v": self.version, "run": self.run, "step": self.step,
                              "src": self.src, "dst": self.dst, "kind": CONTROL,
                              "op": self.op, "args": self.args}, use_bin_type=True)

    @classmethod
    def decode(cls, raw: bytes, expected_op: str | None = None) -> "Control":
        try:
            d = msgpack.unpackb(raw, raw=False)
            kind = d.get("kind")
            if kind != CONTROL:
                raise MessageError(f"expected a control message, got kind {kind!r}",
                                   d.get("src", "?"), d.get("dst", "?"), str(kind),
                                   int(d.get("step", -1)))
            c = cls(op=d["op"], src=d["src"], dst=d["dst"], step=int(d["step"]), run=d["run"],
                    args=dict(d["args"]), version=int(d["v"]))
        except MessageError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise MessageError(f"undecodable control message ({type(exc).__name__}: {exc})",
                               kind=CONTROL) from None
        if c.version != SCHEMA_VERSION:
            raise MessageError(f"schema version {c.version}, this build speaks {SCHEMA_VERSION}",
                               c.src, c.dst, CONTROL, c.step)
        if expected_op is not None and c.op != expected_op:
            raise MessageError(f"expected control op {expected_op!r}, got {c.op!r}",
                               c.src, c.dst, CONTROL, c.step)
        return c
