"""`StageWorker`: one pipeline stage, the unit of placement of the distributed runtime.

A plain class (no Ray in here): the executor makes it an actor at spawn time with
`ray.remote(num_cpus=..., num_gpus=...)(StageWorker)`, and tests can drive it directly.
It builds the whole model from the config (deterministic in the seed), keeps only its
slice of units and wraps an `engine.Stage` around them -- so the maths is the in-process
engine's, line for line.

Everything it receives is a wire message (header bytes + ndarray) and is validated before
use: kind, edge, step, micro-batch, shape, dtype, finite values.  Everything it sends is
counted in its ledger.  The last stage also owns the loss: given the targets, its forward
computes loss and e = dL/dlogits (`engine.loss_and_error`).

Wire calls (what the executor invokes):
  forward(hdr, payload[, t_hdr, t_payload]) -> (hdr, payload)             stages < last
                                            -> stats | (stats, e_hdr, e_payload)   last
  backward(mb, hdr, payload, e_hdr, e_payload, dep) -> (hdr, payload) | None
  infer(hdr, payload[, t_hdr, t_payload])   -> (hdr, payload) | stats
  control(raw, *deps)                       step / mirror / mode / reset commands
"""

from __future__ import annotations

import itertools
import os
import socket

import numpy as np
import torch
import torch.nn.functional as F

from ..engine import Stage, loss_and_error
from ..layers import ErrorTap, restore_rules, set_rule
from ..rules import make_rule
from ..builders import as_config, build_rule_and_model, optim_config
from ..metrics import StageTimer
from .ledger import Ledger
from .messages import (ACTIVATION, BROADCAST, CHAIN, CONTROL, ERROR, OUTPUT, TARGET, Control,
                       Header, Message, MessageError, validate)

DRIVER = "driver"


def stage_name(i: int) -> str:
    return f"stage{i}"


class StageWorker:
    def __init__(self, spec: dict | None = None, threads: int = 1):
        if threads:  # 0: leave the process's setting alone (in-process use)
            torch.set_num_threads(int(threads))
        self._ledger = Ledger()
        self._audit: list[dict] = []
        self._fault: dict | None = None
        self.stage = None
        if spec is not None:
            self.setup(spec)

    # ------------------------------------------------------------------ construction
    def setup(self, spec: dict) -> dict:
        """(Re)build this worker for a stage.  spec: config (dict or Config), index,
        num_stages, units (a, b), input_shape, num_classes, run, audit."""
        cfg = as_config(spec["config"])
        threads = spec.get("threads", cfg.runtime.threads)
        if threads:
            torch.set_num_threads(int(threads))
        self.index, self.num_stages = int(spec["index"]), int(spec["num_stages"])
        self.units = tuple(spec["units"])
        self.name = stage_name(self.index)
        self.prev = DRIVER if self.index == 0 else stage_name(self.index - 1)
        self.next = None if self.index == self.num_stages - 1 else stage_name(self.index + 1)
        self.last_name = stage_name(self.num_stages - 1)
        self.is_first, self.is_last = self.index == 0, self.index == self.num_stages - 1
        self.run = str(spec.get("run", ""))
        self.audit_enabled = bool(spec.get("audit", False))
        self.num_classes = int(spec["num_classes"])
        torch.manual_seed(cfg.seed)

        rule, model = build_rule_and_model(cfg, spec["input_shape"], self.num_classes)
        a, b = self.units
        all_units = list(model.units)
        if not (0 <= a < b <= len(all_units)):
            raise ValueError(f"{self.name}: units [{a}, {b}) outside the model's {len(all_units)}")
        units, names = all_units[a:b], list(model.unit_names[a:b])
        was = model.training
        model.eval()
        with torch.no_grad():  # per-sample input/output shapes of this stage
            h = torch.zeros(2, *spec["input_shape"])
            for u in all_units[:a]:
                h = u(h)
            self.in_shape = tuple(h.shape[1:])
            for u in units:
                h = u(h)
            self.out_shape = tuple(h.shape[1:])
        model.train(was)
        self.rule = rule
        self.unit_names = names
        self.stage = Stage(units, optim_config(cfg), first=self.is_first, names=names)
        self.stage.train(True)
        self._timer = StageTimer(self.stage)  # observability: see timings()
        del model, all_units
        params = list(self.stage.module.parameters())
        self.dtype = params[0].dtype if params else torch.float32
        # DFA: no error is sent down; e is broadcast and each stage's output tap discards
        # whatever gradient arrives from above -- check that it really does.
        self.broadcast_error = not rule.sends_error
        if self.broadcast_error and not self.is_last and not self._ends_with_tap():
            raise ValueError(f"{self.name}: rule {rule.name} needs every stage boundary right "
                             f"after an error tap; units {names} do not end with one")
        self._probe = None
        self._inflight: dict[int, tuple[int, int, tuple]] = {}  # mb -> (step, batch, out shape)
        self._errors: dict[int, torch.Tensor] = {}               # last stage: mb -> e
        self._ledger.clear()
        self._audit.clear()
        self._fault = None
        return self.info()

    def _ends_with_tap(self) -> bool:
        outs = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o))
                 for m in self.stage.module.modules() if isinstance(m, ErrorTap)]
        was = self.stage.module.training
        self.stage.module.eval()
        try:
            with torch.no_grad():
                y = self.stage.module(torch.zeros(2, *self.in_shape, dtype=self.dtype))
        finally:
            for hk in hooks:
                hk.remove()
            self.stage.module.train(was)
        return any(y is o for o in outs)

    def info(self) -> dict:
        return {"name": self.name, "index": self.index, "units": list(self.units),
                "unit_names": self.unit_names, "in_shape": list(self.in_shape),
                "out_shape": list(self.out_shape),
                "params": sum(p.numel() for p in self.stage.module.parameters()),
                "rule": self.rule.name, "broadcast_error": self.broadcast_error,
                "pid": os.getpid(), "host": socket.gethostname(),
                "threads": torch.get_num_threads()}

    # ------------------------------------------------------------------ wire helpers
    def _receive(self, raw, payload, kind, shape, dtype, *, src, detail=None, step=None,
                 mb=None) -> Message:
        try:
            msg = Message.from_wire(raw, payload)
        except MessageError as err:
            raise MessageError(err.reason, err.src if err.src != "?" else src, self.name,
                               err.kind if err.kind != "?" else kind, err.step, err.mb) from None
        if self.audit_enabled:
            self._audit.append({"src": msg.header.src, "dst": self.name, "kind": msg.header.kind,
                                "detail": msg.header.detail, "step": msg.header.step,
                                "mb": msg.header.mb, "header_bytes": len(raw),
                                "payload_bytes": int(payload.nbytes), "payload": np.array(payload)})
        h = msg.header
        if h.src != src:
            raise h.error(f"expected a message from {src}", self.name)
        return validate(msg, kind, shape, dtype, detail=detail, dst=self.name, step=step, mb=mb)

    def _aliases_state(self, t: torch.Tensor) -> bool:
        ptr = t.untyped_storage().data_ptr()
        m = self.stage.module
        return any(p.untyped_storage().data_ptr() == ptr
                   for p in itertools.chain(m.parameters(), m.buffers()))

    def _send(self, kind, tensor, dst, step, mb, detail, *, meta=None, receivers=None) -> Message:
        pbytes = tensor.numel() * tensor.element_size() if self._aliases_state(tensor) else 0
        msg = Message.make(kind, tensor, src=self.name, dst=dst, step=step, mb=mb, run=self.run,
                           detail=detail, meta=meta)
        msg = self._maybe_fault(msg)
        for r in receivers or [dst]:
            self._ledger.record(self.name, r, msg.header.kind, msg.header_bytes, msg.payload_bytes,
                                parameter_bytes=pbytes)
        return msg

    def _send_control(self, op, dst, step, args) -> bytes:
        raw = Control(op, src=self.name, dst=dst, step=step, run=self.run, args=args).encode()
        self._ledger.record(self.name, dst, CONTROL, len(raw), 0)
        return raw

    # ------------------------------------------------------------------ data path
    def forward(self, hdr, payload, t_hdr=None, t_payload=None):
        msg = self._receive(hdr, payload, ACTIVATION, (None, *self.in_shape), self.dtype,
                            src=self.prev)
        step, mb = msg.header.step, msg.header.mb
        if mb in self._inflight:
            raise msg.header.error(f"micro-batch {mb} is already in flight on {self.name}",
                                   self.name)
        x = msg.tensor()
        tmsg = None
        if self.is_last:  # check the targets before touching any state
            tmsg = self._receive(t_hdr, t_payload, TARGET, (x.shape[0],), torch.int64,
                                 src=DRIVER, step=step, mb=mb)
        y = self.stage.forward(x, mb)
        self._inflight[mb] = (step, x.shape[0], tuple(y.shape))
        if not self.is_last:
            return self._send(ACTIVATION, y, self.next, step, mb, "train").wire()
        total = int(tmsg.header.meta.get("batch", x.shape[0]))
        loss_sum, correct, e = loss_and_error(y, tmsg.tensor(), total)
        self._errors[mb] = e
        stats = self._send_control("stats", DRIVER, step, {
            "mb": mb, "loss_sum": float(loss_sum), "correct": int(correct),
            "samples": int(x.shape[0])})
        if self.broadcast_error and self.num_stages > 1:
            others = [stage_name(i) for i in range(self.num_stages - 1)]
            emsg = self._send(ERROR, e, BROADCAST, step, mb, OUTPUT, receivers=others)
            return (stats, *emsg.wire())
        return stats

    def backward(self, mb: int, hdr=None, payload=None, e_hdr=None, e_payload=None, dep=None):
        """Backward of micro-batch mb.  hdr/payload: the chain error from the next stage;
        e_hdr/e_payload: DFA's broadcast output error; dep: ignored (orders the call
        after the last stage's forward)."""
        if mb not in self._inflight:
            raise RuntimeError(f"{self.name}: backward of micro-batch {mb} without its forward")
        step, batch, out_shape = self._inflight[mb]
        if self.is_last:
            grad = e = self._errors.pop(mb)
        elif self.broadcast_error:
            emsg = self._receive(e_hdr, e_payload, ERROR, (batch, self.num_classes), self.dtype,
                                 src=self.last_name, detail=OUTPUT, step=step, mb=mb)
            e = emsg.tensor()
            # the stage ends at an error tap, which discards the gradient from above
            grad = torch.zeros((), dtype=self.dtype).expand(out_shape)
        else:
            gmsg = self._receive(hdr, payload, ERROR, out_shape, self.dtype, src=self.next,
                                 detail=CHAIN, step=step, mb=mb)
            grad, e = gmsg.tensor(), None
        del self._inflight[mb]
        dx = self.stage.backward(grad, mb, e)
        if self.is_first or self.broadcast_error:
            return None
        if dx is None:  # no path from the input to the output: the error is zero
            dx = torch.zeros(batch, *self.in_shape, dtype=self.dtype)
        return self._send(ERROR, dx, self.prev, step, mb, CHAIN).wire()

    @torch.no_grad()
    def infer(self, hdr, payload, t_hdr=None, t_payload=None):
        msg = self._receive(hdr, payload, ACTIVATION, (None, *self.in_shape), self.dtype,
                            src=self.prev, detail="eval")
        step, mb = msg.header.step, msg.header.mb
        x = msg.tensor()
        y = self.stage.infer(x)
        if not self.is_last:
            return self._send(ACTIVATION, y, self.next, step, mb, "eval").wire()
        t = self._receive(t_hdr, t_payload, TARGET, (x.shape[0],), torch.int64, src=DRIVER,
                          step=step, mb=mb).tensor()
        return self._send_control("stats", DRIVER, step, {
            "mb": mb, "loss_sum": F.cross_entropy(y, t, reduction="sum").item(),
            "correct": int((y.argmax(1) == t).sum().item()), "samples": int(x.shape[0])})

    # ------------------------------------------------------------------ control path
    def control(self, raw: bytes, *deps):
        """Run a driver command (step / mirror / mode / reset).  deps: results of earlier
        calls this one must wait for (Ray resolves them first; an error in one aborts)."""
        c = Control.decode(raw)
        if self.audit_enabled:
            self._audit.append({"src": c.src, "dst": self.name, "kind": CONTROL, "detail": c.op,
                                "step": c.step, "mb": -1, "header_bytes": len(raw),
                                "payload_bytes": 0, "payload": None})
        if c.dst != self.name or c.src != DRIVER:
            raise MessageError(f"control {c.op} from {c.src} addressed to {c.dst}",
                               c.src, self.name, CONTROL, c.step)
        if c.op == "step":
            self.step(c.args["lr"], c.args["wd"])
        elif c.op == "mirror":
            self.mirror_steps(int(c.args["n"]))
        elif c.op == "mode":
            self.train(bool(c.args["train"]))
        elif c.op == "reset":
            self.reset()
        else:
            raise MessageError(f"{c.op} is not a command", c.src, self.name, CONTROL, c.step)
        return None

    def step(self, lr: float, wd: float) -> None:
        if self._inflight:
            raise RuntimeError(f"{self.name}: STEP with micro-batches {sorted(self._inflight)} "
                               f"still in flight (a schedule bug)")
        self.stage.step(lr, wd)

    def mirror_steps(self, n: int) -> None:
        self.stage.mirror_steps(n)

    def train(self, mode: bool = True) -> None:
        self.stage.train(mode)

    def reset(self) -> None:
        """Drop every in-flight micro-batch and gradient (after a failed step)."""
        self._inflight.clear()
        self._errors.clear()
        self.stage._pending.clear()
        self.stage.zero_grad()

    # ------------------------------------------------------------------ BP-angle probe
    def probe_begin(self) -> None:
        """Save BatchNorm statistics and zero gradients before extra measuring passes."""
        self._probe = {"bn": {k: v.clone() for k, v in self.stage.module.state_dict().items()
                              if "running" in k or "num_batches" in k},
                       "broadcast": self.broadcast_error, "rules": None}
        self.stage.zero_grad()

    def probe_rule(self, name: str | None) -> None:
        """Switch every layer to rule `name` (None: back to the configured rule)."""
        if self._probe["rules"] is not None:
            restore_rules(self.stage.module, self._probe["rules"])
            self._probe["rules"] = None
        if name is not None:
            rule = make_rule(name)
            self._probe["rules"] = set_rule(self.stage.module, rule)
            self.broadcast_error = not rule.sends_error
        else:
            self.broadcast_error = self._probe["broadcast"]

    def weight_grads(self, zero: bool = True) -> dict:
        g = self.stage.weight_grads()
        if zero:
            self.stage.zero_grad()
        return g

    def probe_end(self) -> None:
        if self._probe is None:
            return
        self.probe_rule(None)
        self.stage.zero_grad()
        self.stage.module.load_state_dict(self._probe["bn"], strict=False)
        self._probe = None

    # ------------------------------------------------------------------ metrics and state
    def alignment(self) -> dict:
        return self.stage.alignment()

    def state_dict(self) -> dict:
        """This stage's own state: weights, feedback weights (layer buffers/parameters,
        with each layer's RNG), optimizer state, step count and the actor's torch RNG."""
        return {**self.stage.state_dict(), "rng": torch.get_rng_state(),
                "units": list(self.units)}

    def load_state_dict(self, state: dict) -> None:
        if "units" in state and tuple(state["units"]) != self.units:
            raise ValueError(f"{self.name}: checkpoint holds units {state['units']}, this "
                             f"stage runs {list(self.units)} (different runtime.partition?)")
        self.stage.load_state_dict(state)
        if "rng" in state:
            torch.set_rng_state(state["rng"])

    def unit_state(self) -> dict:
        """This stage's slice of the model state dict, keyed as in the full model
        ("units.<i>.<...>")."""
        a = self.units[0]
        out = {}
        for k, v in self.stage.module.state_dict().items():
            i, _, rest = k.partition(".")
            out[f"units.{a + int(i)}.{rest}"] = v
        return out

    # -- observability (localnet/metrics.py) --
    def timings(self, clear: bool = True) -> dict:
        """Seconds per forward / backward / update call since the last call, training
        samples forwarded, and torch's GPU memory in use (None without CUDA)."""
        return self._timer.take(clear)

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
        when given).  mode: nan | inf | shape | dtype | kind."""
        if mode not in ("nan", "inf", "shape", "dtype", "kind"):
            raise ValueError(f"unknown fault mode {mode!r}")
        self._fault = {"kind": kind, "mode": mode, "step": step, "mb": mb}

    def _maybe_fault(self, msg: Message) -> Message:
        f, h = self._fault, msg.header
        if (f is None or f["kind"] != h.kind or f["step"] not in (None, h.step)
                or f["mb"] not in (None, h.mb)):
            return msg
        self._fault = None
        arr, kind = msg.payload, h.kind
        if f["mode"] in ("nan", "inf"):
            arr = arr.copy()
            arr.flat[0] = np.nan if f["mode"] == "nan" else np.inf
        elif f["mode"] == "shape":
            arr = np.ascontiguousarray(arr[..., :-1]) if arr.shape[-1] > 1 else arr[..., None]
        elif f["mode"] == "dtype":
            arr = arr.astype(np.float64)
        else:
            kind = ERROR if kind == ACTIVATION else ACTIVATION
        bad = Header(kind=kind, src=h.src, dst=h.dst, step=h.step, mb=h.mb, dtype=arr.dtype.name,
                     shape=tuple(arr.shape), run=h.run, detail=h.detail, meta=h.meta)
        return Message(bad, arr, bad.encode())
