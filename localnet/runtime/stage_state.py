"""`StageState`: what a stage actor holds beyond one batch, a part of `StageWorker`
(worker.py): its state and checkpoint file, BP-angle probes, its timings, and the
coordinator's commands on them (step, mirror, mode, reset).

An actor writes and reads its own checkpoint file; only a small receipt goes back to the
coordinator, so weights never cross the wire, not even to be saved.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from ..files import load_state, save_state
from ..layers import restore_rules, set_rule
from ..rules import make_rule
from .messages import CONTROL, DRIVER, Control, MessageError


def _cpu(obj):
    """A copy of a (nested) state with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


class StageState:
    """Mixed into `StageWorker`, whose setup provides stage, name, kind, units,
    node_name, unit_ids, device, ch, ch_dfa, broadcast_output_error and _timer."""

    # ------------------------------------------------------------------ BP-angle probe
    def probe_begin(self) -> None:
        """Save BatchNorm statistics and zero gradients before extra measuring passes."""
        self._probe = {"bn": {k: v.clone() for k, v in self.stage.module.state_dict().items()
                              if "running" in k or "num_batches" in k},
                       "broadcast": self.broadcast_output_error, "rules": None}
        self.stage.zero_grad()

    def probe_rule(self, name: str | None) -> None:
        """Switch every layer to rule `name` (None: back to the configured rule)."""
        if self._probe["rules"] is not None:
            restore_rules(self.stage.module, self._probe["rules"])
            self._probe["rules"] = None
        if name is not None:
            rule = make_rule(name)
            self._probe["rules"] = set_rule(self.stage.module, rule)
            self.broadcast_output_error = rule.broadcast_output_error
        else:
            self.broadcast_output_error = self._probe["broadcast"]

    def weight_grads(self, zero: bool = True) -> dict:
        g = {k: v.cpu() for k, v in self.stage.weight_grads().items()}
        if zero:
            self.stage.zero_grad()
        return g

    def probe_end(self) -> None:
        if self._probe is None:
            return
        self.probe_rule(None)
        self.stage.zero_grad()
        self.stage.module.load_state_dict(self._probe["bn"], strict=False)
        self.stage.drop_snapshot()
        self._probe = None

    # ------------------------------------------------------------------ metrics and state
    def alignment(self) -> dict:
        return self.stage.alignment()

    def _member(self) -> dict:
        if self.kind == "units":
            return {"units": list(self.units)}
        return {"node": self.node_name}

    def state_dict(self) -> dict:
        """This stage's own state: weights, feedback weights (layer buffers/parameters,
        with each layer's RNG), optimizer state, step count and the actor's torch RNG --
        on the CPU, whatever device the stage computes on."""
        st = {**self.stage.state_dict(), "rng": torch.get_rng_state(), **self._member()}
        if self.ch or self.ch_dfa:  # communication restrictions: each link's state
            st["channels"] = {"links": {k: c.state_dict() for k, c in self.ch.items()},
                              "dfa": [c.state_dict() for c in self.ch_dfa]}
        if self._inflight:  # forwards waiting for a delayed error (the stage keeps them)
            st["inflight"] = [[list(k), n, list(shape)]
                              for k, (n, shape) in self._inflight.items()]
            st["order"] = [list(k) for k in self._order.state_dict()]
        if self._join:  # error parts that came ahead of another link's (JoinedErrors)
            st["joined"] = self._join.state_dict()
        if self.device.type == "cuda":
            st["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return _cpu(st)

    def load_state_dict(self, state: dict) -> None:
        if "units" in state and (self.kind != "units" or tuple(state["units"]) != self.units):
            raise ValueError(f"{self.name}: checkpoint holds units {state['units']}, this "
                             f"stage runs {self._member()} (different runtime.partition?)")
        if "node" in state and state["node"] != self.node_name:
            raise ValueError(f"{self.name}: checkpoint holds layer {state['node']!r}, this "
                             f"stage runs {self._member()} (different runtime.partition?)")
        self.stage.load_state_dict(state)
        if "channels" in state:
            links = state["channels"]["links"]
            for k, c in self.ch.items():
                # a chain's checkpoint written before links were keyed by peer names
                # each role once ("act_out"), which is that chain's one link of the role
                c.load_state_dict(links[k] if k in links else links[k.split(":", 1)[1]])
            for c, s in zip(self.ch_dfa, state["channels"]["dfa"]):
                c.load_state_dict(s)
        self._inflight = {tuple(k): (n, tuple(shape)) for k, n, shape in state.get("inflight", [])}
        self._order.load_state_dict(state.get("order", []))
        self._join.clear()
        if "joined" in state:
            self._join.load_state_dict(state["joined"])
        if "rng" in state:
            torch.set_rng_state(state["rng"].cpu() if hasattr(state["rng"], "cpu") else state["rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)

    def save_checkpoint(self, directory: str) -> dict:
        """Write this actor's state to <directory>/<name>.pt itself (atomically); nothing
        but this small receipt goes back to the driver."""
        if self._inflight and not (self._ch_on and self._order):
            raise RuntimeError(f"{self.name}: checkpoint with micro-batches "
                               f"{sorted(self._inflight)} in flight")
        # forwards still waiting for a delayed error are in it (NodeStage.state_dict),
        # and so are the messages queued on the links (Channel.state_dict)
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{self.name}.pt"
        save_state(self.state_dict(), path)
        return {"actor": self.name, "file": path.name, "bytes": path.stat().st_size,
                "steps": self.stage.steps, **self._member(), "host": socket.gethostname(),
                "pid": os.getpid()}

    def load_checkpoint(self, directory: str) -> int:
        """Drop in-flight work and load <directory>/<name>.pt; returns the stage's steps."""
        path = Path(directory) / f"{self.name}.pt"
        if not path.exists():
            raise FileNotFoundError(f"{self.name}: no checkpoint file {path} (is the run "
                                    f"directory on a filesystem every node shares?)")
        # on the CPU: layer RNG states must stay CPU tensors; load_state_dict copies the
        # weights (and the optimizer its state) onto this actor's device
        state = load_state(path, f"{self.name}'s checkpoint")
        self.reset()
        self.load_state_dict(state)
        return self.stage.steps

    def unit_state(self) -> dict:
        """This stage's slice of the model state dict, keyed as in the full model
        ("units.<i>.<...>"), on the CPU."""
        out = {}
        for k, v in self.stage.module.state_dict().items():
            i, _, rest = k.partition(".")
            out[f"units.{self.unit_ids[int(i)]}.{rest}"] = v.cpu() if hasattr(v, "cpu") else v
        return out

    # -- observability (localnet/metrics.py) --
    def timings(self, clear: bool = True, ledger: bool = False) -> dict:
        """Seconds per forward / backward / update call since the last call, training
        samples forwarded, and torch's GPU memory in use (None without CUDA); and the
        main thread's CPU seconds since then: `run_cpu` inside the batch calls (of which
        `plane_cpu` in the data plane's send and recv, and the compute the *_cpu lists
        hold), `calls_cpu` between them (Ray's task machinery, other calls).  ledger:
        this actor's ledger too (`WireEnd.ledger`), as "ledger": a metrics poll's one call."""
        out = self._timer.take(clear)
        if ledger:
            out["ledger"] = self.ledger()
        own = self._cpu
        plane = getattr(self.plane, "cpu", None)  # local mode's queues keep no account
        out["run_cpu"], out["calls_cpu"] = own["run"], own["calls"]
        out["plane_cpu"] = dict(plane) if plane is not None else None
        if clear:
            own["run"] = own["calls"] = 0.0
            if plane is not None:
                plane["send"] = plane["recv"] = 0.0
        return out

    # -- the timeline (localnet/timeline.py) --
    def record_spans(self, first: int, last: int) -> None:
        """From now on, note when each training action of steps first..last-1 runs
        (`interpreter.interpret`); what was noted before is dropped."""
        self._span_window, self._spans = (int(first), int(last)), []

    def spans(self) -> list:
        """The noted actions, [op, step, micro-batch, start, end] (wall-clock seconds, so
        that actors' notes line up), and forget them."""
        out, self._spans = getattr(self, "_spans", []), []
        return out

    # ------------------------------------------------------------------ control path
    def control(self, raw: bytes):
        """Run a driver command (step / mirror / mode / reset)."""
        c = Control.decode(raw)
        if self.audit_enabled:
            self._audit.append({"src": c.src, "dst": self.name, "kind": CONTROL, "detail": c.op,
                                "step": c.step, "mb": -1, "header_bytes": len(raw),
                                "payload_bytes": 0, "payload": None})
        if c.dst != self.name or c.src != DRIVER:
            raise MessageError(f"control {c.op} from {c.src} addressed to {c.dst}",
                               c.src, self.name, CONTROL, c.step)
        if c.op == "step":
            if self._failed is not None:  # a forward / backward of this batch failed
                raise self._failed
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
        if self._inflight and not self.stage.stash:
            raise RuntimeError(f"{self.name}: STEP with micro-batches {sorted(self._inflight)} "
                               f"still in flight (a schedule bug)")
        if self._ch_on and self._bwd_since_step == 0:
            return  # no error reached this stage since its last update: nothing to apply
        self._bwd_since_step = 0
        self.stage.step(lr, wd)
        if self._transport:
            self._ledger.record_transport(self._transport)

    def mirror_steps(self, n: int) -> None:
        self.stage.mirror_steps(n)

    def train(self, mode: bool = True) -> None:
        self.stage.train(mode)

    def reset(self) -> None:
        """Drop every in-flight micro-batch and gradient (after a failed step), and leave
        this actor as training expects it: a measuring pass or an evaluation that failed
        midway left its rule swapped, its channels bypassed or its layers in eval mode
        (whoever measures or evaluates again sets them so again)."""
        if self._probe is not None:
            self.probe_end()
        self.set_channels(True)
        self.stage.train(True)
        self._failed = None
        self._inflight.clear()
        self._order.clear()
        self._join.clear()
        self._errors.clear()
        self.stage.drop()
        self.stage.zero_grad()
        self.stage.drop_snapshot()
