"""Codecs for the messages between stages: what one activation or error costs on the wire.

Every codec maps a tensor to an `Encoded` (the compact payload tensors, exactly what a
sender would put on the wire, and their byte count) and back:

    enc = codec.encode(x, rng)      # rng: the channel's torch.Generator (stochastic parts)
    x_hat = codec.decode(enc)       # same shape and dtype as x

`Encoded.nbytes` is the size of the real encoded payload: the sum of the payload
tensors' bytes plus the scalars the codec must send (scales, a projection counter).

Codecs may be stateful per edge (top-k's error-feedback residual, low-rank's message
counter); make one instance per `Channel`.  No codec ever sees a weight: low-rank's
projection is generated from a seed that sender and receiver share.

A codec is one class here (or in any imported module): a `Codec` subclass with its `name`
and its `Options` model registers itself in `CODECS`, and the config accepts its options
beside `codec:` in a link (`channel.error: {codec: topk, k: 0.05}`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from pydantic import Field

from ..registry import NoOptions, Registry

CODECS = Registry("codec")


@dataclass
class Encoded:
    """One encoded message: `payload` tensors, `meta` scalars, `nbytes` on the wire."""

    codec: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    payload: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    scalar_bytes: int = 0  # bytes of scalars sent besides the payload tensors (in meta)
    # the link's noise on this message, (seed, size): the receiver draws it from the
    # seed, so both ends of a link add the same noise (channel.with_noise); the channel's
    # model, not what a real link would send, so no byte of it counts
    noise: tuple[int, float] | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.payload.values()) + self.scalar_bytes


class Codec:
    name: str = ""
    Options = NoOptions
    # the codec draws from a seed that sender and receiver share (the link's), not from
    # the channel's random stream
    seeded: bool = False
    # decode(encode(x)) == x for every x: a link measures its fidelity without decoding
    lossless: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        CODECS.add(cls)

    def __init__(self, **options):
        self.options = CODECS.options(self.name, options, "codec")

    def encode(self, x: torch.Tensor, rng: torch.Generator | None = None) -> Encoded:
        raise NotImplementedError

    def decode(self, enc: Encoded) -> torch.Tensor:
        raise NotImplementedError

    def what_arrives(self, enc: Encoded) -> torch.Tensor:
        """What the receiver will decode from `enc`, on the sender's side (the link's
        fidelity compares it with the message the sender meant to send)."""
        return self.decode(enc)

    def bias(self) -> str | None:
        """Why, with these options, the decoded errors are biased in a way a lower rate
        does not mend, naming the option that removes it; None where they are not (or
        where no option mends it).  A run whose logits grow huge quotes it."""
        return None

    def reset(self) -> None:
        """Forget per-edge state (residuals, counters)."""

    def state_dict(self) -> dict:
        """Per-edge state a checkpoint keeps (tensors and numbers only)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def _enc(self, x, payload, meta=None, scalar_bytes=0) -> Encoded:
        return Encoded(self.name, tuple(x.shape), x.dtype, payload, meta or {}, scalar_bytes)


class Cast(Codec):
    """fp32 / fp16 / bf16: the tensor itself, in that dtype (fp32: unchanged)."""

    dtype: torch.dtype = torch.float32

    def encode(self, x, rng=None):
        return self._enc(x, {"x": x.detach().to(self.dtype)})

    def decode(self, enc):
        return enc.payload["x"].to(enc.dtype)


class Fp32(Cast):
    name, dtype, lossless = "fp32", torch.float32, True


class Fp16(Cast):
    name, dtype = "fp16", torch.float16


class Bf16(Cast):
    name, dtype = "bf16", torch.bfloat16


class Int8(Codec):
    """Symmetric int8: q = round(x / s) in [-127, 127], s = max|x| / 127, per tensor or
    per channel (dim 1).  `stochastic` (default): round up with probability equal to the
    fraction, so E[decode(encode(x))] = x and the error is below one step s; otherwise
    round to nearest, error at most s/2."""

    name = "int8"

    class Options(NoOptions):
        per_channel: bool = Field(False, description="one scale per channel (dim 1)")
        stochastic: bool = Field(True, description="stochastic (unbiased) rounding")

    def __init__(self, **options):
        super().__init__(**options)
        self.per_channel, self.stochastic = self.options.per_channel, self.options.stochastic

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        a = x.detach().abs().float()
        if self.per_channel and x.dim() >= 2:
            dims = [d for d in range(x.dim()) if d != 1]
            m = a.amax(dim=dims, keepdim=True)
        else:
            m = a.amax().reshape([1] * max(x.dim(), 1))
        s = m / 127.0
        return torch.where(s > 0, s, torch.ones_like(s))

    def encode(self, x, rng=None):
        s = self.scale(x)
        v = x.detach().float() / s
        if self.stochastic:
            u = torch.rand(v.shape, generator=rng, dtype=v.dtype)
            q = torch.floor(v + u)
        else:
            q = torch.round(v)
        q = q.clamp_(-127, 127).to(torch.int8)
        return self._enc(x, {"q": q, "scale": s.to(torch.float32)})

    def decode(self, enc):
        return (enc.payload["q"].float() * enc.payload["scale"]).to(enc.dtype)


def _index_dtype(n: int) -> torch.dtype:
    if n <= 256:
        return torch.uint8
    if n <= 32768:
        return torch.int16
    return torch.int32


class _ErrorFeedback(Codec):
    """`error_feedback`: the sender adds to each message what its codec left out of its
    last one on this edge (the residual, x - decode(encode(x))), so nothing is lost, only
    late -- the memory of Seide et al. 2014's 1-bit SGD, and of Stich, Cordonnier & Jaggi
    2018 ("Sparsified SGD with Memory", NeurIPS) for top-k.  On an error edge the residual
    of one micro-batch's sample i joins the next one's: what the receiver's update sums
    over all messages keeps its total."""

    class Options(NoOptions):
        error_feedback: bool = Field(False, description="the sender re-sends what it left out")

    residual: torch.Tensor | None = None
    _last_decoded: tuple | None = None  # (enc, its decode): the residual's, reused

    def _fed(self, x: torch.Tensor) -> torch.Tensor:
        """x flat and in fp32, plus the residual where error feedback holds one."""
        flat = x.detach().float().reshape(-1)
        if self.options.error_feedback and self.residual is not None \
                and self.residual.shape == flat.shape:
            flat = flat + self.residual
        return flat

    def _keep_rest(self, fed: torch.Tensor, enc: Encoded) -> Encoded:
        if self.options.error_feedback:
            d = self.decode(enc)
            self._last_decoded = (enc, d)
            self.residual = fed - d.float().reshape(-1)
        return enc

    def what_arrives(self, enc):
        last = self._last_decoded
        return last[1] if last is not None and last[0] is enc else self.decode(enc)

    def reset(self):
        self.residual = self._last_decoded = None

    def state_dict(self):
        return {"residual": self.residual}


class TopK(_ErrorFeedback):
    """The k·n largest-magnitude entries (k a fraction), as fp32 values plus flat indices
    in the narrowest integer type that holds n (1, 2 or 4 bytes).  With `error_feedback`
    the sender keeps what it did not send and adds it to the next message on this edge."""

    name = "topk"

    class Options(_ErrorFeedback.Options):
        k: float = Field(0.1, gt=0, le=1, description="fraction of entries sent")

    def __init__(self, **options):
        super().__init__(**options)
        self.k = self.options.k

    def count(self, n: int) -> int:
        return min(n, max(1, int(round(self.k * n))))

    def bias(self):
        # DFA's softmax error's largest entry is always its target's (|p_y - 1| is the sum
        # of the others), so the entries kept are the targets' and those dropped the wrong
        # classes': the errors that arrive no longer sum to zero, and push every hidden
        # layer one way at every step.  Fixed feedback (FA, DFA, uSF) cannot undo it.
        if self.options.error_feedback:
            return None
        return ("topk without error_feedback never sends the entries it leaves out, so "
                "the errors that arrive are biased (DFA's softmax error keeps its targets' "
                "entries and loses the other classes'); error_feedback: true sends them "
                "in later messages")

    def encode(self, x, rng=None):
        flat = self._fed(x)
        n = flat.numel()
        idx = flat.abs().topk(self.count(n), sorted=False).indices
        ix = idx.to(torch.int32)
        if _index_dtype(n) == torch.uint8:
            ix = ix.to(torch.uint8)
        elif _index_dtype(n) == torch.int16:
            ix = ix.to(torch.int16)
        return self._keep_rest(flat, self._enc(x, {"values": flat[idx], "index": ix}))

    def decode(self, enc):
        n = math.prod(enc.shape)
        out = torch.zeros(n, dtype=torch.float32)
        idx = enc.payload["index"].long()
        out[idx] = enc.payload["values"]
        return out.reshape(enc.shape).to(enc.dtype)


_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)  # 1-bit codes, 8 a byte
_TRITS = torch.tensor([64, 16, 4, 1], dtype=torch.uint8)  # 2-bit codes, 4 a byte


def _pack(codes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Small uint8 codes, len(weights) to a byte (the first in the high bits); the last
    byte padded with zeros."""
    per = len(weights)
    pad = (-codes.numel()) % per
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    return (codes.reshape(-1, per) * weights).sum(1, dtype=torch.int32).to(torch.uint8)


def _unpack(packed: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """The first n codes of `_pack(codes, weights)` back."""
    bits = 8 // len(weights)  # each code's width
    return (packed.unsqueeze(1) // weights % (1 << bits)).reshape(-1)[:n]


class Sign(_ErrorFeedback):
    """1 bit per entry (x >= 0), packed 8 to a byte, plus fp32 magnitudes: decode gives
    scale · sign(x), with scale = mean |x| (`ceil(n/8) + 4` bytes).

    `two_scales`: the entries >= 0 decode to their own mean and the others to minus the
    mean of their magnitudes, the 1-bit quantizer of Seide et al. 2014 ("1-Bit
    Stochastic Gradient Descent", Interspeech; there per column), `ceil(n/8) + 8` bytes.
    The decoded tensor then keeps x's sum and its L1 norm.  That matters for DFA's
    broadcast error e = softmax - onehot: its signs are + on every wrong class and - on
    the target whatever the network predicts, so one scale decodes it as
    scale · (1 - 2 onehot), whose sum over the classes is (C - 2) scale instead of 0,
    and every hidden layer receives the same D·1 push at every step.

    `error_feedback`: Seide et al.'s memory -- each message adds what the last one's
    quantization left out on this edge."""

    name = "sign"

    class Options(_ErrorFeedback.Options):
        two_scales: bool = Field(False, description="one magnitude for the entries >= 0 "
                                 "and one for the others (keeps the sum and L1 norm)")

    def encode(self, x, rng=None):
        flat = self._fed(x)
        keep = flat >= 0
        packed = _pack(keep.to(torch.uint8), _BITS)
        mag = flat.abs()
        if self.options.two_scales:
            # an empty side decodes to nothing, so its magnitude is 0
            scale = torch.stack([_mean_or_zero(mag[keep]), _mean_or_zero(mag[~keep])])
        else:
            scale = _mean_or_zero(mag).reshape(1)
        return self._keep_rest(flat, self._enc(x, {"bits": packed, "scale": scale}))

    def bias(self):
        # one or two magnitudes for every entry: what each message rounds away is never
        # sent (on the MNIST MLP that blew FA, KP and uSF up, and error feedback mended it)
        if self.options.error_feedback:
            return None
        return ("sign without error_feedback never sends what its rounding to one or two "
                "magnitudes leaves out, so the errors that arrive are biased; "
                "error_feedback: true sends it in later messages")

    def decode(self, enc):
        n = math.prod(enc.shape)
        bits = _unpack(enc.payload["bits"], _BITS, n).bool()
        scale = enc.payload["scale"]  # [s] or [s_plus, s_minus]
        out = torch.where(bits, scale[0], -scale[-1])
        return out.reshape(enc.shape).to(enc.dtype)


def _mean_or_zero(t: torch.Tensor) -> torch.Tensor:
    return t.mean() if t.numel() else t.new_zeros(())


class Ternary(Codec):
    """TernGrad (Wen et al. 2017, "TernGrad: Ternary Gradients to Reduce Communication in
    Distributed Deep Learning", NeurIPS, eq. 2-3): each entry is sent as s · sign(x) · b,
    s = max |x| and b ~ Bernoulli(|x| / s), so E[decode(encode(x))] = x, and a zero stays
    0 -- which `sign` cannot say (an error sent down through a ReLU is exactly 0 where
    the unit was off, and one bit sends that as +scale).  Two bits an entry (0, +s, -s),
    packed four to a byte, plus the fp32 s: ceil(n/4) + 4 bytes.  The draws come from
    the channel's random stream, as int8's stochastic rounding does."""

    name = "ternary"

    def encode(self, x, rng=None):
        flat = x.detach().float().reshape(-1)
        n = flat.numel()
        s = flat.abs().amax() if n else flat.new_zeros(())
        p = flat.abs() / torch.where(s > 0, s, torch.ones_like(s))
        sent = torch.rand(n, generator=rng) < p
        code = torch.where(sent, torch.where(flat >= 0, 1, 2), 0).to(torch.uint8)
        return self._enc(x, {"codes": _pack(code, _TRITS), "scale": s.reshape(1)})

    def decode(self, enc):
        n = math.prod(enc.shape)
        code = _unpack(enc.payload["codes"], _TRITS, n)
        s = enc.payload["scale"][0]
        out = torch.where(code == 1, s, torch.where(code == 2, -s, torch.zeros_like(s)))
        return out.reshape(enc.shape).to(enc.dtype)


class LowRank(_ErrorFeedback):
    """Random projection of rank q.  Each sample (row of the flattened tensor) x is sent
    as z = x P, P an n×q matrix with orthonormal columns drawn from (seed, message
    counter); the receiver regenerates P from the same seed and counter and decodes
    x_hat = z P^T, the orthogonal projection of x onto span(P): exact for inputs in that
    span.  Sender and receiver share only the seed; the 4-byte counter travels with the
    message.  Bytes: batch·q·4 + 4.

    Over the draws of P, E[P P^T] = (q/n) I: the decoded tensor is x shrunk by q/n on
    average, as if the receiving layer learnt at q/n of the others' rate.  Where a
    large weight decay pulls the weights down meanwhile (PFA's first-epoch recipe), that
    shrunken signal loses to it, and the network falls to chance (benchmarks/RESULTS.md,
    the channel tables).  `unbiased` decodes (n/q) x P P^T instead, whose mean over the
    draws is x: the scaling of stochastic subspace descent (Kozak, Becker, Doostan &
    Tenorio, arXiv:1904.01145).  It pays in variance: its mean squared error is
    (n/q - 1) |x|^2, against the plain decode's (1 - q/n) |x|^2.  The plain decode is
    the unbiased one at q/n of the receiving layer's rate, so which is better is a
    question of step size: on the MNIST MLP at lr 0.01 the unbiased decode learns better
    at q = n/2 and diverges at q = n/8 (RESULTS.md, "Notes: a low-rank error shrinks by
    q/n").  No byte changes.

    `error_feedback`: the sender adds what the last message's projection left out, as
    PowerSGD does (Vogels, Karimireddy & Jaggi 2019, NeurIPS)."""

    name = "lowrank"
    seeded = True

    class Options(_ErrorFeedback.Options):
        q: int = Field(8, ge=1, description="rank of the seeded random projection")
        unbiased: bool = Field(False, description="decode (n/q) x P P^T, whose mean over "
                               "projections is x (default: the projection x P P^T)")

    def __init__(self, seed: int = 0, **options):
        super().__init__(**options)
        self.q, self.seed = self.options.q, seed
        self.counter = 0

    _last: tuple | None = None  # ((n, counter), P): the QR is most of a message's cost

    def projection(self, n: int, counter: int) -> torch.Tensor:
        # the same P serves the encode, the residual's decode and, where one instance is
        # both ends (in-process), the receiver's decode
        if self._last is not None and self._last[0] == (n, counter):
            return self._last[1]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + counter) % (2**63 - 1))
        q = min(self.q, n)
        p = torch.linalg.qr(torch.randn(n, q, generator=g)).Q  # (n, q), orthonormal columns
        self._last = ((n, counter), p)
        return p

    def _rows(self, shape):
        return (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, math.prod(shape))

    def encode(self, x, rng=None):
        b, n = self._rows(tuple(x.shape))
        counter = self.counter
        self.counter += 1
        flat = self._fed(x)
        z = flat.reshape(b, n) @ self.projection(n, counter)
        return self._keep_rest(flat, self._enc(x, {"z": z}, {"counter": counter},
                                               scalar_bytes=4))

    def decode(self, enc):
        b, n = self._rows(enc.shape)
        p = self.projection(n, enc.meta["counter"])
        out = enc.payload["z"] @ p.T
        if self.options.unbiased:
            out = out * (n / p.shape[1])
        return out.reshape(enc.shape).to(enc.dtype)

    def reset(self):
        super().reset()
        self.counter = 0

    def state_dict(self):
        return {**super().state_dict(), "counter": self.counter}


def make_codec(name: str, *, seed: int = 0, **options) -> Codec:
    """The codec registered as `name`, its options checked against its `Options`; seed:
    the link's, for a codec that draws from a seed its two ends share."""
    cls = CODECS.get(name)
    return cls(seed=seed, **options) if cls.seeded else cls(**options)
