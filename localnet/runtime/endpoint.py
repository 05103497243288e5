"""`WireEnd`: one actor's end of the wire, a part of `StageWorker` (worker.py).

Every message an actor sends is made here and counted in its ledger; every message it
receives is decoded, audited and validated here before the stage sees it -- kind, edge,
step, micro-batch, shape, dtype, finite values.  Communication restrictions
(localnet/channels) sit on the same seam: this actor owns the sending half of its
outgoing links and the receiving half of its incoming ones.  Tests corrupt outgoing
messages through `inject_fault`.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from ..channels.channel import (DATA, WAIT, JoinedErrors, StoredForwards, check_edge_keys,
                                link_options, make_channel)
from ..channels.wire import EMPTY, LOST, WAITING, marker, pack, unpack
from ..errors import ConfigError
from .graph import Placement
from .messages import (ACTIVATION, CHAIN, CONTROL, ERROR, OUTPUT, Control, Header, Message,
                       MessageError, dtype_name, host, stage_name, validate)


def check_channel_graph(channel, pl: Placement, unit_names: list[str]) -> None:
    """Refuse channels an actor graph cannot keep, before any actor starts: a
    `channel.edges` key that names no edge of it, and two edges between one pair of
    actors (a link is keyed by the pair).  Delays are fine on a graph: an actor read by
    several others joins each forward's error parts as they arrive (`JoinedErrors`)."""
    if not channel.active():
        return
    check_edge_keys(channel, pl.links(unit_names))
    if pl.is_chain:
        return
    for s, cons in enumerate(pl.consumers):  # one link per edge: each consumer reads s once
        ranks = [c for c, _ in cons]
        if len(set(ranks)) < len(ranks):
            raise ConfigError(f"channel: actor {s} ({pl.names[s][0]}) feeds one actor through "
                              f"two inputs; channels need one edge per pair of actors")


def error_delays_in(channel, pl: Placement, unit_names: list[str], dfa: bool) -> list[dict]:
    """Per actor, the delay in steps of each error link into it, by the sending actor's
    rank: one link from each consumer, or under DFA one from the last actor."""
    S = pl.num_actors
    if not channel.active() or S == 1:
        return [{} for _ in range(S)]
    ends = lambda j: pl.link_names(j, unit_names)  # noqa: E731

    def delay(src, dst, boundary):  # the error link src -> dst, as the workers build it
        return int(link_options(channel, "error", ends(src)[0], ends(dst)[1], boundary)["delay"])

    if dfa:
        return [{} if i == pl.sink else {pl.sink: delay(pl.sink, i, ends(i)[3])}
                for i in range(S)]
    return [{c: delay(c, i, ends(c)[2]) for c, _ in pl.consumers[i]} for i in range(S)]


def error_lags(channel, pl: Placement, unit_names: list[str], dfa: bool) -> list[int]:
    """Steps each actor's forwards wait for their whole error: the delays of the error
    links along its longest path to the last actor (`JoinedErrors` waits for the last
    part), or under DFA its own link's from the last actor.  Each of those steps keeps
    `train.micro_batches` more forwards stored (the memory preflight counts them)."""
    links = error_delays_in(channel, pl, unit_names, dfa)
    if dfa:
        return [sum(d.values()) for d in links]
    lag: dict[int, int] = {}

    def longest(i):
        if i not in lag:
            lag[i] = max((longest(c) + d for c, d in links[i].items()), default=0)
        return lag[i]

    return [longest(i) for i in range(pl.num_actors)]


class WireEnd:
    """Mixed into `StageWorker`, whose setup provides name, inputs, receivers,
    in_shapes, dtype, stage, run_id, audit_enabled, _ledger, _audit and _fault."""

    # ------------------------------------------------------------------ channels
    def _setup_channels(self, cfg, pl: Placement, unit_names: list[str], dfa: bool) -> None:
        """Communication restrictions (localnet/channels), split at send / receive: this
        actor owns the sending half of its outgoing links (codec state, drops, bytes) and
        the receiving half of its incoming ones (decode, delay FIFO) -- one link per edge
        of the actor graph and direction, keyed "<peer rank>:<role>".  On a chain, edges
        and seeds are `InProcessExecutor`'s (`ChannelSet`), so both executors draw the
        same numbers; on a layer graph each edge is named by its two layers."""
        self.ch = {}                 # "<peer>:act_in" | act_out | err_in | err_out -> Channel
        self.ch_dfa: list = []       # last stage, DFA: one error link per other stage
        self._ch_on = self._ch_cfg = False
        self._bwd_since_step = 0
        self._order = StoredForwards()  # the forwards that wait for their error slot
        # the error parts that came ahead of another link's (one link per consumer)
        self._join = JoinedErrors(1 if dfa else len(self.consumer_ranks))
        if not cfg.channel.active() or self.num_stages == 1:
            return
        check_channel_graph(cfg.channel, pl, unit_names)
        i, sink = self.index, pl.sink

        def ends(j):  # (first name, last name, boundary below j, boundary above j)
            return pl.link_names(j, unit_names)

        def mk(kind, src, dst, boundary):
            return make_channel(cfg.channel, kind, src, dst, boundary=boundary, seed=cfg.seed,
                                slots_per_step=cfg.train.micro_batches)

        first, last, below, above = ends(i)
        for r in self.receiver_ranks:   # activations up to r; r's errors back down
            self.ch[f"{r}:act_out"] = mk("activation", last, ends(r)[0], ends(r)[2])
            if not dfa:
                self.ch[f"{r}:err_in"] = mk("error", ends(r)[0], last, ends(r)[2])
        for p in self.producer_ranks:   # activations from p; errors back down to p
            self.ch[f"{p}:act_in"] = mk("activation", ends(p)[1], first, below)
            if not dfa:
                self.ch[f"{p}:err_out"] = mk("error", first, ends(p)[1], below)
        if dfa and i != sink:
            self.ch[f"{sink}:err_in"] = mk("error", ends(sink)[0], last, above)
        if dfa and i == sink:
            self.ch_dfa = [mk("error", first, ends(j)[1], ends(j)[3]) for j in range(sink)]
        self._ch_on = self._ch_cfg = True

    def set_channels(self, on: bool) -> None:
        """Route training messages through the channels (True, when configured) or not
        (measuring passes: BP-angle probes, forward_backward).  Forwards still waiting
        for delayed errors stay stored across the pause."""
        self._ch_on = bool(on) and self._ch_cfg

    def channel_stats(self) -> dict:
        """This actor's halves of its links: the sender's counts (messages, bytes, drops)
        and the receiver's (delivered, not yet arrived), by kind and edge."""
        out = {"send": [], "recv": []}
        senders = [c for k, c in self.ch.items() if k.endswith("_out")] + self.ch_dfa
        for c in senders:  # the sender counts what it put on the wire
            out["send"].append({"edge": c.edge, "kind": c.kind, **c.stats(0)})
        for k, c in self.ch.items():
            if k.endswith("_in"):
                out["recv"].append({"edge": c.edge, "kind": c.kind, **c.stats(0)})
        return out

    def _coded_errors(self, wire, step, mb, batch):
        """A backward's error slots through the channels, one per link: (key, batch, grad,
        e, state).  Each link's slot belongs to the oldest stored forward that link has
        not yet delivered (StoredForwards); `JoinedErrors` holds parts that arrive ahead.
        The key and batch of the oldest forward come back once all its parts are in;
        state WAIT (a part still to come: key None, batch as given) or LOST (all lost or
        empty: that forward is dropped) leaves grad and e None."""
        srcs = [self.last_rank] if self.broadcast_output_error else self.consumer_ranks
        if len(wire) != 2 * len(srcs):
            raise MessageError(f"{self.name} expects {len(srcs)} error message(s), got "
                               f"{len(wire) // 2}", "?", self.name, ERROR, step, mb)
        detail = OUTPUT if self.broadcast_output_error else CHAIN
        for j, c in enumerate(srcs):
            ahead = self._join.ahead(j)
            fwd = self._inflight[self._order[ahead]] if ahead < len(self._order) else None
            shape = None if fwd is None else (
                (fwd[0], self.num_classes) if self.broadcast_output_error else fwd[1])
            state, msg = self._receive_coded(self.ch[f"{c}:err_in"], wire[2 * j],
                                             wire[2 * j + 1], ERROR, shape, self.dtype,
                                             src=stage_name(c), detail=detail, step=step, mb=mb)
            if state != WAIT and fwd is None:
                raise MessageError(f"an error slot for a forward {self.name} has not sent "
                                   f"(it holds {len(self._order)})", stage_name(c), self.name,
                                   ERROR, step, mb)
            self._join.arrive(j, state, msg.tensor() if state == DATA else None)
        state, got = self._join.take()
        key = self._order.pair(state, self.stage)
        if key is None:
            return None, batch, None, None, WAIT
        batch, out_shape = self._inflight[key]
        if state != DATA:
            del self._inflight[key]
            return key, batch, None, None, state
        if self.broadcast_output_error:
            return key, batch, torch.zeros((), dtype=self.dtype).expand(out_shape), got[0], DATA
        grad = got[0]  # the parts that arrived, summed as autograd sums a tensor's uses
        for g in got[1:]:
            grad = grad + g
        return key, batch, grad, None, DATA

    def _send_coded(self, kind, x, ch, dst, step, mb, detail) -> Message:
        """Send x through channel ch (x None: an empty slot; WAIT: a waiting one).  The
        ledger counts the encoded bytes, a lost message's too (it was sent; the channel
        lost it)."""
        pbytes = 0
        if x is None:
            arr, meta = marker(ch.codec.name, EMPTY)
        elif isinstance(x, str):
            arr, meta = marker(ch.codec.name, WAITING)
        else:
            if self._aliases_state(x):
                raise RuntimeError(f"{self.name}: a {kind} message would carry a parameter")
            enc, lost = ch.encode(x)
            arr, meta = marker(ch.codec.name, LOST) if lost else pack(enc)
            pbytes = enc.nbytes - enc.scalar_bytes  # the scalars travel in the header
        msg = Message.make(kind, arr, src=self.name, dst=dst, step=step, mb=mb, run=self.run_id,
                           detail=detail, meta={"codec": meta})
        msg = self._maybe_fault(msg)
        self._ledger.record(self.name, dst, msg.header.kind, msg.header_bytes, pbytes)
        return msg

    def _receive_coded(self, ch, raw, payload, kind, shape, dtype, *, src, detail, step,
                       mb) -> tuple[str, Message | None]:
        """Receive through channel ch: the slot due now (after `delay`) -- (DATA, the
        message decoded and validated like any other), (LOST, None) when it was lost or
        sent empty, (WAIT, None) when nothing has arrived yet."""
        msg = self._open(raw, payload, kind, src)
        h = msg.header
        validate(msg, kind, None, None, detail=detail, dst=self.name, step=step, mb=mb,
                 finite=False)
        meta = h.meta.get("codec")
        if not isinstance(meta, dict) or meta.get("name") != ch.codec.name:
            raise h.error(f"expected a {ch.codec.name}-encoded message on this channel",
                          self.name)
        try:
            enc = unpack(msg.host(), meta)
        except ValueError as err:
            raise h.error(str(err), self.name) from None
        ch.arrive(enc)
        state, x = ch.receive_slot()
        if state != DATA:
            return state, None
        arr = x.detach().contiguous().numpy()
        dec = Header(kind=kind, src=h.src, dst=h.dst, step=h.step, mb=h.mb,
                     dtype=dtype_name(arr.dtype), shape=tuple(arr.shape), run=h.run,
                     detail=h.detail)
        return DATA, validate(Message(dec, arr, raw), kind, shape, dtype, dst=self.name)

    # ------------------------------------------------------------------ wire helpers
    def _receive(self, raw, payload, kind, shape, dtype, *, src, detail=None, step=None,
                 mb=None) -> Message:
        msg = self._open(raw, payload, kind, src)
        if "codec" in msg.header.meta:
            raise msg.header.error("an encoded message where a plain one was expected "
                                   "(channels on one side only)", self.name)
        return validate(msg, kind, shape, dtype, detail=detail, dst=self.name, step=step, mb=mb)

    def _open(self, raw, payload, kind, src) -> Message:
        """Decode the header (naming the edge on failure), audit, check the sender."""
        try:
            msg = Message.from_wire(raw, payload)
        except MessageError as err:
            raise type(err)(err.reason, err.src if err.src != "?" else src, self.name,
                            err.kind if err.kind != "?" else kind, err.step, err.mb) from None
        if self.audit_enabled:
            self._audit.append({"src": msg.header.src, "dst": self.name, "kind": msg.header.kind,
                                "detail": msg.header.detail, "step": msg.header.step,
                                "mb": msg.header.mb, "header_bytes": len(raw),
                                # what arrived, on the wire or through shared memory
                                "payload_bytes": msg.payload_bytes,
                                "payload": np.array(msg.host())})
        if msg.header.src != src:
            raise msg.header.error(f"expected a message from {src}", self.name)
        return msg

    def _aliases_state(self, t: torch.Tensor) -> bool:
        """Does `t` share memory with a parameter or buffer of this actor's module?  The
        audit asks this of every message, so it reads the submodules' own dicts (a
        stage's structure is fixed once built) instead of walking the module tree each
        time; the dicts are read afresh, so a reassigned parameter is still caught."""
        m = self.stage.module
        if getattr(self, "_state_of", None) is not m:
            self._state_of = m
            self._state_mods = list(m.modules())
        ptr = t.untyped_storage().data_ptr()
        return any(p is not None and p.untyped_storage().data_ptr() == ptr
                   for s in self._state_mods
                   for p in itertools.chain(s._parameters.values(), s._buffers.values()))

    def _send(self, kind, tensor, dst, step, mb, detail, *, meta=None, receivers=None) -> Message:
        pbytes = tensor.numel() * tensor.element_size() if self._aliases_state(tensor) else 0
        msg = Message.make(kind, tensor, src=self.name, dst=dst, step=step, mb=mb, run=self.run_id,
                           detail=detail, meta=meta)
        msg = self._maybe_fault(msg)
        for r in receivers or [dst]:
            self._ledger.record(self.name, r, msg.header.kind, msg.header_bytes, msg.payload_bytes,
                                parameter_bytes=pbytes)
        return msg

    def _send_control(self, op, dst, step, args) -> bytes:
        raw = Control(op, src=self.name, dst=dst, step=step, run=self.run_id, args=args).encode()
        self._ledger.record(self.name, dst, CONTROL, len(raw), 0)
        return raw

    def _activations(self, wire, detail=None, at=None) -> list[Message]:
        """The input activations, validated; `at` (step, mb): the micro-batch the
        schedule says comes next, which every one of them must be."""
        step, mb = at if at is not None else (None, None)
        k = len(self.inputs)
        if len(wire) < 2 * k:
            raise MessageError(f"{self.name} expects {k} activation(s), got {len(wire) // 2}",
                               "?", self.name, ACTIVATION)
        msgs = []
        for i, p in enumerate(self.input_ranks):
            ch = self.ch.get(f"{p}:act_in") if self._ch_on and detail is None else None
            if ch is None:  # the driver's batch, evaluation, or no channels
                msgs.append(self._receive(wire[2 * i], wire[2 * i + 1], ACTIVATION,
                                          (None, *self.in_shapes[i]), self.dtype,
                                          src=self.inputs[i], detail=detail, step=step, mb=mb))
                continue
            state, msg = self._receive_coded(ch, wire[2 * i], wire[2 * i + 1], ACTIVATION,
                                             (None, *self.in_shapes[i]), self.dtype,
                                             src=self.inputs[i], detail="train", step=step,
                                             mb=mb)
            if state != DATA:
                raise MessageError("an activation went missing (activations have no delay "
                                   "or drop)", self.inputs[i], self.name, ACTIVATION)
            msgs.append(msg)
        h0 = msgs[0].header
        for m in msgs[1:]:
            if (m.header.step, m.header.mb) != (h0.step, h0.mb):
                raise m.header.error(f"step {m.header.step} micro-batch {m.header.mb} merged "
                                     f"with step {h0.step} micro-batch {h0.mb}", self.name)
            if m.payload.shape[0] != msgs[0].payload.shape[0]:
                raise m.header.error("batch size differs between the merged inputs", self.name)
        return msgs

    def _send_up(self, y, step, mb, detail) -> tuple:
        """The activation for every receiver: one message to all of them, or through
        channels one per receiver's link, in `receiver_ranks` order (each link has its
        own codec state and ledger)."""
        if self._ch_on and detail == "train":
            return tuple(part for r in self.receiver_ranks
                         for part in self._send_coded(ACTIVATION, y, self.ch[f"{r}:act_out"],
                                                      stage_name(r), step, mb, detail).wire())
        return self._send(ACTIVATION, y, ",".join(self.receivers), step, mb, detail,
                          receivers=self.receivers).wire()

    def ledger(self, clear: bool = False) -> dict:
        d = self._ledger.to_dict()
        if clear:
            self._ledger.clear()
        return d

    def audit_log(self, clear: bool = True) -> list[dict]:
        out = list(self._audit)
        if clear:
            self._audit.clear()
        return out
    # ------------------------------------------------------------------ fault injection
    def inject_fault(self, kind: str, mode: str, step: int | None = None,
                     mb: int | None = None) -> None:
        """Test hook: corrupt this worker's next outgoing `kind` message (at `step`/`mb`
        when given).  mode: nan | inf | shape | dtype | kind | silent (never sent)."""
        if mode not in ("nan", "inf", "shape", "dtype", "kind", "silent"):
            raise ValueError(f"unknown fault mode {mode!r}")
        self._fault = {"kind": kind, "mode": mode, "step": step, "mb": mb}

    def _maybe_fault(self, msg: Message) -> Message:
        f, h = self._fault, msg.header
        if (f is None or f["kind"] != h.kind or f["step"] not in (None, h.step)
                or f["mb"] not in (None, h.mb)):
            return msg
        self._fault = None
        if f["mode"] == "silent":
            self._fault_silent = True  # the interpreter drops it (interpreter._ship)
            return msg
        arr, kind = host(msg.payload), h.kind
        if f["mode"] in ("nan", "inf"):
            arr = arr.copy()
            arr.flat[0] = np.nan if f["mode"] == "nan" else np.inf
        elif f["mode"] == "shape":
            arr = np.ascontiguousarray(arr[..., :-1]) if arr.shape[-1] > 1 else arr[..., None]
        elif f["mode"] == "dtype":
            arr = arr.astype(np.float64, order="C")
        else:
            kind = ERROR if kind == ACTIVATION else ACTIVATION
        bad = Header(kind=kind, src=h.src, dst=h.dst, step=h.step, mb=h.mb,
                     dtype=dtype_name(arr.dtype), shape=tuple(arr.shape), run=h.run,
                     detail=h.detail, meta=h.meta)
        return Message(bad, arr, bad.encode())
