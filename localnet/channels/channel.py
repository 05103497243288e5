"""A `Channel` is one direction of one edge between stages: a codec plus faults.

    ch = Channel(codec, src="fc1", dst="fc2", kind="activation", delay=0, drop=0.0,
                 bandwidth=None, seed=...)
    out = ch.transmit(x)     # the tensor the receiver gets now, or None: nothing arrived

Semantics (per message; a step carries `slots_per_step` messages, one per micro-batch):

  codec      the sender encodes, the receiver decodes; the encoded payload bytes are
             counted when sent (`ch.bytes`, which a checkpoint keeps).
  drop p     each sent message is lost with probability p, drawn from the channel's own
             seeded generator.  Lost messages are still counted as sent bytes.
  delay k    a message arrives k steps late (a FIFO of k·slots_per_step messages).  The
             receiver pairs it with its own stored forward of that micro-batch (stale
             errors, as in delayed-gradient training): during the first k steps nothing
             has arrived yet (WAIT), so the stored forwards wait and the receiver passes
             WAIT down (a stage below a delayed edge waits for the sum of the delays).
  bandwidth  bytes/s cap.  Accounted: `bandwidth_s` is the time the traffic would take at
             that cap.  With `enforce=True` the sender also sleeps that long per message.
  noise r    what arrives is the decode plus Gaussian noise, each sample's of standard
             deviation r times that sample's root mean square, so its squared size is
             r^2 times the sample's: an unbiased rest of about r on any codec
             (`with_noise`).  The sender draws a seed from the channel's stream and the
             message carries it, so the sender's fidelity and the receiver see the same
             noise; it costs no byte (the channel's model, not a message).

Fidelity (`stats`: `cos`, `norm_ratio`): how much of its messages a link delivers.
With x each message the sender's stage made and d what the receiver decodes, taken over
all the messages sent as one: the cosine sum<d, x> / sqrt(sum|d|^2 sum|x|^2) and the
norm ratio sqrt(sum|d|^2 / sum|x|^2) (pooled, so that a message whose error is nearly
zero weighs as little as it carries; a lost message counts as sent: the codec's share
alone).  x is taken before any error feedback adds earlier messages' rest, so a codec
whose messages carry mostly others' rest shows a low cosine at a ratio near or above 1.
Measured on the sender, which decodes each message once more (error-feedback codecs
reuse the decode their residual took; a lossless codec, fp32, not at all).

A slot is DATA (a tensor), LOST (dropped, or the sender had nothing: that micro-batch
gets no update) or WAIT (not arrived yet: its micro-batch's error is still to come).
What a receiver does with each is the executor's business (localnet/channels/README.md).
"""

from __future__ import annotations

import math
import time
import zlib
from collections import deque

import torch

from ..errors import ConfigError
from ..ledger import Ledger
from .codecs import Codec, Encoded, make_codec
from .wire import pack, unpack

ACTIVATION, ERROR = "activation", "error"
DATA, LOST, WAIT = "data", "lost", "wait"  # what a receiver finds in a slot


def edge_seed(seed: int, kind: str, src: str, dst: str) -> int:
    """A deterministic per-channel seed (not Python's salted hash)."""
    return (int(seed) * 2_654_435_761 + zlib.crc32(f"{kind}:{src}->{dst}".encode())) % (2**63 - 1)


class Channel:
    def __init__(self, codec: Codec, *, src: str, dst: str, kind: str, delay: int = 0,
                 drop: float = 0.0, bandwidth: float | None = None, enforce: bool = False,
                 seed: int = 0, slots_per_step: int = 1, noise: float = 0.0):
        if delay < 0 or not 0.0 <= drop <= 1.0 or not 0.0 <= noise < math.inf:
            raise ValueError(f"channel {src}->{dst}: delay must be >= 0, drop in [0, 1] and "
                             f"noise finite and >= 0")
        self.codec, self.src, self.dst, self.kind = codec, src, dst, kind
        self.delay, self.drop, self.bandwidth, self.enforce = delay, drop, bandwidth, enforce
        self.noise = noise
        self.slots_per_step = slots_per_step
        self.rng = torch.Generator().manual_seed(seed)  # codec randomness and drops
        self.fifo: deque = deque()
        self.sent = self.delivered = self.dropped = self.missing = 0
        self.bytes = 0
        # messages measured, sum <d, x>, sum |x|^2, sum |d|^2: kept as a tensor on the
        # message's device, so measuring never waits for a GPU (read in `stats`)
        self._fid: torch.Tensor | None = None

    @property
    def edge(self) -> str:
        return f"{self.src}->{self.dst}"

    def send(self, x) -> None:
        """Sender side: encode, count, maybe lose, enqueue.  x None: the sender has
        nothing to send this slot (it received no error itself); no bytes, and the
        slot arrives empty, so later messages keep their delay.  x WAIT: the sender's
        own error has not arrived yet; the slot says so."""
        if x is None or isinstance(x, str):
            self.arrive(x)
            return
        enc, lost = self.encode(x)
        self.arrive(None if lost else enc)

    def encode(self, x: torch.Tensor) -> tuple[Encoded, bool]:
        """The sender's half: encode x, count its bytes (a lost message was still sent),
        enforce the bandwidth cap, and draw whether the message is lost."""
        enc = self.codec.encode(x, self.rng)
        arrives = None if self.codec.lossless else self.codec.what_arrives(enc)
        if self.noise:  # (drawn only on a noisy link: the others' streams are as before)
            enc.noise = (int(torch.randint(2**62, (), generator=self.rng)), self.noise)
            arrives = with_noise(x if arrives is None else arrives, enc.noise)
        self._measure(x, arrives)
        n = enc.nbytes
        self.sent += 1
        self.bytes += n
        if self.enforce and self.bandwidth:
            time.sleep(n / self.bandwidth)
        lost = self.drop > 0 and (self.drop >= 1.0 or
                                  torch.rand((), generator=self.rng).item() < self.drop)
        if lost:
            self.dropped += 1
        return enc, lost

    def _measure(self, x: torch.Tensor, d: torch.Tensor | None) -> None:
        """Add one message to the sums; d None: it arrives as sent (a lossless codec),
        so one product gives all three."""
        x = x.detach().float().reshape(-1)
        sent = x @ x
        if d is None:
            dot = arrived = sent
        else:
            d = d.detach().float().reshape(-1)
            dot, arrived = d @ x, d @ d
        one = torch.stack([(sent > 0).to(sent.dtype), dot, sent, arrived]).double()
        self._fid = one if self._fid is None else one + self._fid.to(one.device)

    def fidelity_sums(self) -> list[float]:
        """[messages measured (an all-zero one is not), sum <d, x>, sum |x|^2, sum |d|^2]."""
        return self._fid.tolist() if self._fid is not None else [0.0] * 4

    def arrive(self, enc) -> None:
        """The receiver's half, on arrival: queue the slot (an Encoded message, None for
        a lost or empty one, or WAIT)."""
        self.fifo.append(enc)

    def receive_slot(self) -> tuple[str, torch.Tensor | None]:
        """Receiver side: the slot due now -- (DATA, decoded tensor), (LOST, None) or
        (WAIT, None): nothing has arrived yet (the first `delay` steps, or the sender
        was itself still waiting)."""
        if len(self.fifo) <= self.delay * self.slots_per_step:
            self.missing += 1
            return WAIT, None
        enc = self.fifo.popleft()
        if enc is None:
            return LOST, None
        if isinstance(enc, str):
            self.missing += 1
            return WAIT, None
        self.delivered += 1
        x = self.codec.decode(enc)
        return DATA, with_noise(x, enc.noise) if enc.noise else x

    def receive(self) -> torch.Tensor | None:
        """The tensor due now, or None (lost, empty, or not arrived yet)."""
        return self.receive_slot()[1]

    def transmit(self, x: torch.Tensor | None) -> torch.Tensor | None:
        self.send(x)
        return self.receive()

    @property
    def bandwidth_s(self) -> float:
        return self.bytes / self.bandwidth if self.bandwidth else 0.0

    def stats(self, samples: int) -> dict:
        return {"codec": self.codec.name, "messages": self.sent, "delivered": self.delivered,
                "dropped": self.dropped, "not_yet_arrived": self.missing, "bytes": self.bytes,
                "bytes_per_sample": self.bytes / samples if samples else 0.0,
                "delay": self.delay, "drop": self.drop, "noise": self.noise,
                "bandwidth": self.bandwidth,
                "bandwidth_s": self.bandwidth_s, **fidelity(self.fidelity_sums())}

    def state_dict(self) -> dict:
        """What a checkpoint keeps of this link: its random stream (codec noise, drops),
        its codec's state, its counts, and the messages queued on it -- a delayed link
        holds `delay` steps of them between steps, which a resumed run must still
        deliver.  A queued message is kept as the wire has it (`wire.pack`)."""
        return {"rng": self.rng.get_state(), "codec": self.codec.state_dict(),
                "counts": [self.sent, self.delivered, self.dropped, self.missing, self.bytes],
                "fidelity": None if self._fid is None else self._fid.tolist(),
                "fifo": [_slot_state(enc) for enc in self.fifo]}

    def load_state_dict(self, state: dict) -> None:
        self.fifo.clear()
        self.fifo.extend(_slot_from_state(s) for s in state.get("fifo", []))
        self.rng.set_state(state["rng"])
        self.codec.load_state_dict(state["codec"])
        self.sent, self.delivered, self.dropped, self.missing, self.bytes = state["counts"]
        f = state.get("fidelity")  # (a checkpoint from before fidelity was measured: none)
        self._fid = torch.tensor(f, dtype=torch.float64) if f and len(f) == 4 else None

    def reset(self) -> None:
        """Forget queued messages and codec state (counters and bytes are kept)."""
        self.fifo.clear()
        self.codec.reset()


def with_noise(d: torch.Tensor, noise: tuple[int, float]) -> torch.Tensor:
    """d plus Gaussian noise drawn from noise = (seed, r): each sample's (d's first
    dimension) of standard deviation r times that sample's root mean square, so that the
    noise's squared size is about r^2 times the sample's own.  Per sample, not per
    message: errors differ across samples by orders of magnitude, and noise sized to the
    message would bury the small ones.  Drawn on the CPU from the seed alone, so the
    sender and the receiver, on any device, add the same."""
    seed, r = noise
    xi = torch.randn(d.shape, generator=torch.Generator().manual_seed(int(seed)))
    df = d.float()
    rows = df.flatten(1) if d.dim() > 1 else df.reshape(1, -1)  # (an empty batch too)
    rms = rows.pow(2).mean(1).sqrt().reshape(-1, *([1] * (d.dim() - 1)))
    return (df + (r * rms) * xi.to(d.device)).to(d.dtype)


def fidelity(sums) -> dict:
    """A link's (or a kind's) fidelity from its `Channel.fidelity_sums`: {"measured",
    "cos", "norm_ratio", "rest", and the sums, "dot", "sent_sq", "arrived_sq", which add
    up over links and runs}; the figures None where nothing was measured.

    rest: |d - (<d, x> / |x|^2) x| / |x|, what arrived besides the messages' own
    direction, over their size (norm_ratio * sqrt(1 - cos^2)).  At one cosine a small
    rest and a large one are different links: a projection's 0.29 trains FA where sign
    with error feedback's 0.97 blows it up (README.md here, "What error feedback keeps")."""
    n, dot, sent, arrived = (float(v) for v in sums)
    cos = ratio = rest = None
    if sent > 0:
        ratio = math.sqrt(arrived / sent)
        cos = dot / math.sqrt(sent * arrived) if arrived > 0 else 0.0
        rest = math.sqrt(max(arrived / sent - (dot / sent) ** 2, 0.0))  # (rounding: >= 0)
    return {"measured": int(n), "cos": cos, "norm_ratio": ratio, "rest": rest, "dot": dot,
            "sent_sq": sent, "arrived_sq": arrived}


SUMS = ("measured", "dot", "sent_sq", "arrived_sq")  # what `fidelity` adds up from
FIGURES = ("cos", "norm_ratio", "rest")  # what it makes of them, per kind and link


def _slot_state(enc):
    """A queued slot as plain data: None (lost or empty), WAIT, or the packed message."""
    if enc is None or isinstance(enc, str):
        return enc
    arr, meta = pack(enc)
    return {"payload": torch.from_numpy(arr.copy()), "meta": meta}


def _slot_from_state(s):
    if s is None or isinstance(s, str):
        return s
    return unpack(s["payload"].numpy(), s["meta"])


class StoredForwards:
    """One stage's forwards that wait for their error, oldest first: where both executors
    pair each slot of the error channel with the forward it belongs to.  Errors come down
    in the order the forwards went up, so a slot pairs with the oldest stored forward --
    the same micro-batch, the channel's delay later:

      DATA  that forward's backward runs with the error;
      LOST  (lost, or sent empty by a stage that had no error itself) that forward is
            dropped, with its autograd state: no update comes from it;
      WAIT  (nothing arrived yet) every forward stays stored.
    """

    def __init__(self):
        self._keys: deque = deque()

    def store(self, key) -> None:
        self._keys.append(key)

    def oldest(self):
        return self._keys[0]

    def pair(self, state: str, stage):
        """The key of the forward this slot belongs to, or None for WAIT.  LOST drops
        that forward from `stage` (a Stage: `Stage.drop`)."""
        if state == WAIT:
            return None
        key = self._keys.popleft()
        if state != DATA:
            stage.drop(key)
        return key

    def clear(self) -> None:
        self._keys.clear()

    def state_dict(self) -> list:
        return list(self._keys)

    def load_state_dict(self, keys: list) -> None:
        self._keys = deque(tuple(k) if isinstance(k, list) else k for k in keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, k: int):
        return self._keys[k]


class JoinedErrors:
    """The error slots of a stage whose output several others read, one link each -- a
    residual block's input, per layer, feeds the block's first layer and its merge.  Each
    link delivers a slot per forward, in the order the forwards went up, but links can lag
    by different numbers of steps: with a delay on every link the skip's error comes down
    one link and the block's down two.  A slot that arrives ahead waits here for the same
    forward's slots on the other links, so the stage gets a forward's error when its last
    part has arrived (the longest path's delay), never parts of different forwards.

    A forward's joined slot is DATA when any link's was (a lost part counts as zero, as
    autograd sums a tensor's uses), LOST when every part was lost or empty, and WAIT while
    some link has not delivered it.  One link is a plain chain: each slot passes straight
    through."""

    def __init__(self, links: int):
        self._parts: list[deque] = [deque() for _ in range(links)]

    def ahead(self, link: int) -> int:
        """How many forwards' slots `link` has delivered that wait for the others: its
        next slot belongs to the stored forward at that index, oldest first."""
        return len(self._parts[link])

    def arrive(self, link: int, state: str, x: torch.Tensor | None) -> None:
        if state != WAIT:  # WAIT: nothing new on this link
            self._parts[link].append((state, x if state == DATA else None))

    def take(self) -> tuple[str, list[torch.Tensor]]:
        """The oldest forward's joined slot: (state, the parts that arrived as DATA)."""
        if not all(self._parts):
            return WAIT, []
        got = [x for st, x in (q.popleft() for q in self._parts) if st == DATA]
        return (DATA if got else LOST), got

    def clear(self) -> None:
        for q in self._parts:
            q.clear()

    def state_dict(self) -> list:
        return [[[st, x] for st, x in q] for q in self._parts]

    def load_state_dict(self, parts: list) -> None:
        if len(parts) != len(self._parts):
            raise ValueError(f"joined errors: {len(parts)} links saved, {len(self._parts)} here")
        self._parts = [deque((st, x) for st, x in q) for q in parts]

    def __bool__(self) -> bool:
        return any(self._parts)


LINK_FAULTS = ("delay", "drop", "bandwidth", "noise")


def merge_link(base: dict, over: dict) -> dict:
    """A link's settings with an edge's overrides on top; an override that names another
    codec drops the base codec's options (they are that codec's, not the new one's)."""
    if "codec" in over and over["codec"] != base.get("codec"):
        base = {k: v for k, v in base.items() if k in LINK_FAULTS}
    return {**base, **over}


def link_options(cfg, kind: str, src: str, dst: str, boundary: int | None = None) -> dict:
    """The settings of one link: channel.<kind>, then any channel.edges entry keyed by
    the boundary index or by "src->dst" in either direction (checked by the config)."""
    base = getattr(cfg, kind).model_dump()
    for key, over in (cfg.edges or {}).items():
        k = str(key)
        if (boundary is not None and k == str(boundary)) or k in (f"{src}->{dst}", f"{dst}->{src}"):
            base = merge_link(base, getattr(over, kind))
    return base


def check_edge_keys(cfg, links) -> None:
    """Every `channel.edges` key must name a link of this run -- a boundary index, or
    "a->b" in either direction -- or the override would silently do nothing.  links:
    (boundary or None, lower name, upper name) per edge."""
    known: dict[str, None] = {}
    for b, lo, up in links:
        if b is not None:
            known[str(b)] = None
        known[f"{lo}->{up}"] = None
    names = set(known) | {"->".join(reversed(k.split("->"))) for k in known if "->" in k}
    for key in cfg.edges or {}:
        if str(key) not in names:
            raise ConfigError(f"channel.edges.{key}: no edge of this run is called that; "
                              f"its edges are {', '.join(known)}")


def error_delays(cfg) -> bool:
    """Whether any error link of a ChannelConfig is delayed (stages then stash the
    weights each forward used, for the backward that comes steps later)."""
    return cfg.active() and (cfg.error.delay > 0 or any(
        int((over.error or {}).get("delay", 0) or 0) > 0 for over in (cfg.edges or {}).values()))


def make_channel(cfg, kind: str, src: str, dst: str, *, boundary: int | None = None,
                 seed: int = 0, slots_per_step: int = 1) -> Channel:
    """The channel of one link from a ChannelConfig.  Sender and receiver build it from
    the same config and seed, so they share the codec's seed (low-rank) and nothing else."""
    o = link_options(cfg, kind, src, dst, boundary)
    s = edge_seed(seed, kind, src, dst)
    codec = make_codec(o["codec"], seed=s % (2**31),
                       **{k: v for k, v in o.items() if k not in ("codec", *LINK_FAULTS)})
    return Channel(codec, src=src, dst=dst, kind=kind, delay=o["delay"], drop=o["drop"],
                   bandwidth=o["bandwidth"], enforce=cfg.enforce_bandwidth, seed=s,
                   slots_per_step=slots_per_step, noise=o["noise"])


def summarize(activations: list[dict], errors: list[dict], samples: int, dfa: bool) -> dict:
    """The run summary's `channels` section from per-channel `Channel.stats` dicts
    (each with its "edge").  samples: the training samples of the whole run (a resumed
    one's too, as the checkpointed counts are)."""
    out = {"samples": samples, "dfa_broadcast": dfa}
    ledger = Ledger()  # the encoded payloads as the runtime's ledger counts messages
    for kind, chans in ((ACTIVATION, activations), (ERROR, errors)):
        for c in chans:
            src, dst = c["edge"].split("->", 1)
            ledger.rows[(src, dst, kind)] = [c["messages"], 0, c["bytes"]]
        out[kind] = {c["edge"]: {k: v for k, v in c.items() if k != "edge"} for c in chans}
        total = sum(c["bytes"] for c in chans)
        out[f"{kind}_bytes"] = total
        out[f"{kind}_bytes_per_sample"] = total / samples if samples else 0.0
        out[f"{kind}_bandwidth_s"] = sum(c["bandwidth_s"] for c in chans)
        # over every message of this kind's links, as one
        f = fidelity([sum(c.get(k, 0.0) for c in chans) for k in SUMS])
        out.update({f"{kind}_{k}": f[k] for k in FIGURES})
        out[f"{kind}_fidelity"] = {k: f[k] for k in SUMS}
    out["error_bits_per_sample"] = 8 * out["error_bytes_per_sample"]
    out["activation_bits_per_sample"] = 8 * out["activation_bytes_per_sample"]
    out["ledger"] = ledger.as_summary()
    return out


class FidelityWindow:
    """Each kind's and each link's fidelity over the messages sent since the last look,
    from two run summaries' (`summarize`) sums: what an epoch's record says, where the
    summary's figure is the whole run's.

        w = FidelityWindow(ex.channel_summary())     # where training starts (or resumes)
        w.since(ex.channel_summary())  # {"error_cos": ..., "error_norm_ratio": ...,
                                       #  "fidelity": {"error": {"b->a": {"cos": ..., ...
    """

    def __init__(self, summary: dict):
        self._last = self._sums(summary)

    @staticmethod
    def _sums(summary: dict) -> dict:
        """{(kind, None): the kind's sums, (kind, edge): each link's}."""
        out = {}
        for kind in (ACTIVATION, ERROR):
            out[(kind, None)] = [(summary.get(f"{kind}_fidelity") or {}).get(k, 0.0)
                                 for k in SUMS]
            for edge, st in (summary.get(kind) or {}).items():
                out[(kind, edge)] = [st.get(k, 0.0) for k in SUMS]
        return out

    def since(self, summary: dict) -> dict:
        """cos, norm_ratio and rest over the messages measured since the last call, per
        kind that sent any, and under "fidelity" per link that did ({kind: {edge: {"cos",
        "norm_ratio", "rest"}}}, in the summary's order of links: input to output).  A recovery
        that took the counts back to a checkpoint leaves the window short of the
        messages sent twice; a kind or link with none measured is left out."""
        now, out, links = self._sums(summary), {}, {}
        for (kind, edge), sums in now.items():
            f = fidelity([a - b for a, b in zip(sums, self._last.get((kind, edge), (0.0,) * 4))])
            if f["measured"] <= 0 or f["cos"] is None:
                continue
            if edge is None:
                out.update({f"{kind}_{k}": f[k] for k in FIGURES})
            else:
                links.setdefault(kind, {})[edge] = {k: f[k] for k in FIGURES}
        self._last = now
        if links:
            out["fidelity"] = links
        return out


class ChannelSet:
    """The channels of one partitioned model, as `InProcessExecutor` uses them.

    Stage i holds units[cuts[i]:cuts[i+1]].  The boundary above stage i is the unit index
    b = cuts[i+1] (the numbering of `runtime.partition: [b1, b2, ...]`).

      activation(i)  stage i -> stage i+1 across boundary cuts[i+1];
                     edge "<last unit of i>-><first unit of i+1>"
      error(i)       the error that reaches stage i (i < last stage): the chain error
                     from stage i+1 across boundary cuts[i+1], edge "<first unit of
                     i+1>-><last unit of i>"; with DFA, the output error e broadcast by
                     the last stage, edge "<first unit of last stage>-><last unit of i>".

    Per-edge overrides (`channel.edges`) are keyed by the boundary index (int or string)
    or by "unitA->unitB" in either direction.
    """

    def __init__(self, cfg, unit_names: list[str], cuts: list[int], *,
                 broadcast_output_error: bool = False, seed: int = 0, slots_per_step: int = 1):
        self.cfg, self.broadcast_output_error = cfg, broadcast_output_error
        dfa = broadcast_output_error
        n = len(cuts) - 1
        first = lambda i: unit_names[cuts[i]]
        last = lambda i: unit_names[cuts[i + 1] - 1]
        check_edge_keys(cfg, [(cuts[i + 1], last(i), first(i + 1)) for i in range(n - 1)])
        self.activations: list[Channel] = []
        self.errors: list[Channel] = []
        for i in range(n - 1):
            b = cuts[i + 1]
            a_src, a_dst = last(i), first(i + 1)
            self.activations.append(self._make(ACTIVATION, b, a_src, a_dst, seed, slots_per_step))
            e_src = first(n - 1) if dfa else first(i + 1)
            self.errors.append(self._make(ERROR, b, e_src, last(i), seed, slots_per_step))
        self.samples = 0

    def _make(self, kind, boundary, src, dst, seed, slots) -> Channel:
        return make_channel(self.cfg, kind, src, dst, boundary=boundary, seed=seed,
                            slots_per_step=slots)

    def all(self) -> list[Channel]:
        return self.activations + self.errors

    def summary(self) -> dict:
        s = self.samples
        return summarize([{"edge": c.edge, **c.stats(s)} for c in self.activations],
                         [{"edge": c.edge, **c.stats(s)} for c in self.errors], s,
                         self.broadcast_output_error)
