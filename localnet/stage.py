"""A stage: a slice of the model with its own optimizer and local state.

`Stage` owns a contiguous slice of a model's units, their optimizer and every piece of
local state.  Its interface is the whole contract between units:

    y = stage.forward(x, mb)            activations go up
    dx = stage.backward(dy, mb, e)      projected errors come down (e: DFA's output error)
    stage.step(lr, wd)                  each stage steps its own optimizer

Nothing else crosses: no weights, no global optimizer.  `NodeStage` is the same stage for
one actor of the runtime's graph: several inputs, a device, and weight stashing for the
async schedule and delayed error channels (each micro-batch's forward and backward see
the same weights, while updates land on the live ones).

Pure torch, imported by both executors: the in-process one chains stages with plain
calls (`engine.py`), the runtime runs the very same classes inside actors
(`runtime/worker.py`), so neither imports the other.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .alignment import weight_alignment
from .layers import local_layers
from .optim import SGD
from .rules import output_error
from .rules.base import channels_last


def run_backward(y: torch.Tensor, grad_y: torch.Tensor) -> None:
    """`y.backward(grad_y)`, through autograd's engine entry.  The public call checks the
    error's shape with torch.fx's symbolic-shape helpers, whose first use imports sympy --
    a large import, once per process, which every actor would pay again on its first
    backward (benchmarks/RESULTS.md, the notes on issue 12).  The check it makes (same
    shape and dtype) is made here instead."""
    if grad_y.shape != y.shape or grad_y.dtype != y.dtype:
        raise RuntimeError(f"an error of {grad_y.dtype}{list(grad_y.shape)} for an output of "
                           f"{y.dtype}{list(y.shape)}")
    engine = getattr(torch.autograd.graph, "_engine_run_backward", None)
    if engine is None:  # a torch without it: the public call
        y.backward(grad_y)
        return
    engine((y,), (grad_y,), False, False, (), allow_unreachable=True, accumulate_grad=True)


@dataclass
class OptimConfig:
    lr: float
    momentum: float
    weight_decay: float
    nesterov: bool = False
    batch_manhattan: bool = False
    norm_constraint: bool = False


class Stage:
    def __init__(self, units: list[nn.Module], optim: OptimConfig, first: bool,
                 names: list[str] | None = None):
        self.module = nn.Sequential(*units)
        self.names = list(names or [str(i) for i in range(len(units))])
        # layer names as in the full model ("layer1.0.conv1.conv"), not stage-local indices
        self.layers = [(self._model_name(n), m) for n, m in local_layers(self.module)]
        self.first = first  # the first stage's input is data: no error to send down
        self.optim = optim
        params = [p for p in self.module.parameters() if p.requires_grad]
        # fused SGD: one kernel over all parameters (PFA's R is r times W's size on CPU)
        self.opt = SGD(params, lr=optim.lr, momentum=optim.momentum,
                       weight_decay=optim.weight_decay, nesterov=optim.nesterov,
                       fused=params[0].dtype in (torch.float32, torch.float64)) \
            if params else None
        if optim.norm_constraint:  # Moskovitz et al.: forward weights keep their initial norm
            self.norm_limits = {n: l.weight.detach().norm().item() for n, l in self.layers}
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.steps = 0
        # the layout the model's conv weights were given (`train.memory_format`): inputs
        # and errors that arrive in another (a codec's output, a driver's batch) are put
        # in it, so a stage computes with the same kernels wherever its inputs came from
        self.channels_last = any(channels_last(p) for p in self.module.parameters())

    def _layout(self, t):
        if t is not None and self.channels_last and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)  # no copy if it is
        return t

    def _model_name(self, name: str) -> str:
        idx, _, rest = name.partition(".")
        return ".".join(p for p in (self.names[int(idx)], rest) if p)

    # -- data path --------------------------------------------------------------------
    def forward(self, x: torch.Tensor, mb: int = 0) -> torch.Tensor:
        x = self._layout(x.detach()).requires_grad_(not self.first)
        y = self.module(x)
        self._pending[mb] = (x, y)
        return y.detach()

    def drop(self, mb=None) -> None:
        """Forget a stored forward (all of them: mb None) whose backward will never run,
        with the autograd graph it holds."""
        if mb is None:
            self._pending.clear()
        else:
            self._pending.pop(mb, None)

    def backward(self, grad_y: torch.Tensor, mb: int = 0, e: torch.Tensor | None = None):
        x, y = self._pending.pop(mb)
        if grad_y is None:  # DFA: nothing came down; the taps in this stage inject D_l e
            grad_y = torch.zeros_like(y)
        grad_y = self._layout(grad_y)
        ctx = output_error(e) if e is not None else contextlib.nullcontext()
        with ctx:
            run_backward(y, grad_y)
        return None if self.first else x.grad

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(self._layout(x))

    # -- learning ---------------------------------------------------------------------
    def step(self, lr: float, weight_decay: float) -> None:
        self.update(lr, weight_decay)
        self.count_step()

    def update(self, lr, weight_decay: float) -> None:
        """The step's tensor work, and nothing that reads a tensor back on the host, so
        that a CUDA graph can capture it (graphs.py); lr may be a 0-d device tensor."""
        for _, layer in self.layers:
            layer.rule.before_step(layer)  # gradients a rule forms once per step (PFA's g_R)
        if self.opt is not None:
            for group in self.opt.param_groups:
                group["lr"], group["weight_decay"] = lr, weight_decay
            if self.optim.batch_manhattan:
                for group in self.opt.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.sign_()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            if self.optim.norm_constraint:
                for n, layer in self.layers:
                    norm = layer.weight.norm()
                    if norm > self.norm_limits[n]:
                        layer.weight.mul_(self.norm_limits[n] / norm)
            for _, layer in self.layers:
                layer.rule.after_step(layer)

    def count_step(self) -> None:
        """The step's bookkeeping on the host, after its tensor work."""
        self.steps += 1
        for _, layer in self.layers:  # a no-op but for rules that mirror (wm)
            if self.steps % layer.rule.mirror_every == 0:
                layer.rule.mirror_step(layer)

    def mirror_steps(self, n: int) -> None:
        for _ in range(n):
            for _, layer in self.layers:
                layer.rule.mirror_step(layer)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    # -- metrics ----------------------------------------------------------------------
    def alignment(self) -> dict:
        return {self._model_name(n): a for n, a in weight_alignment(self.module).items()}

    def weight_grads(self) -> dict[str, torch.Tensor]:
        return {n: l.weight.grad.detach().clone() for n, l in self.layers if l.weight.grad is not None}

    def zero_grad(self) -> None:
        self.module.zero_grad(set_to_none=True)
        for _, layer in self.layers:
            layer.rule.drop_grads(layer)

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(),
                "opt": self.opt.state_dict() if self.opt else None, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        if self.opt and state["opt"]:
            self.opt.load_state_dict(state["opt"])
        self.steps = state["steps"]


class _Chain(nn.Sequential):
    """nn.Sequential whose first module takes every input (a merge node takes two)."""

    def forward(self, *xs):
        it = iter(self)
        h = next(it)(*xs)
        for m in it:
            h = m(h)
        return h


class _Catch(torch.autograd.Function):
    """x as it is, whose error lands in box[i] (summed, if x is read twice) instead of
    in a leaf's .grad; saves nothing, so x lives only as long as a layer keeps it."""

    @staticmethod
    def forward(ctx, x, anchor, box, i):
        ctx.box, ctx.i = box, i
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.box[ctx.i] = g if ctx.box[ctx.i] is None else ctx.box[ctx.i] + g
        return None, None, None, None


class NodeStage(Stage):
    """`Stage` for one actor of the graph.

    forward(x, mb, rest)  x: first input, rest: the others (a merge's skip); -> y
    backward(dy, mb, e)   -> one error per input (None where the input is data)
    Everything else (step, mirror_steps, alignment, state_dict, ...) is Stage's.

    device: the module lives there; inputs are moved there; outputs stay there (the
    worker turns them into CPU numpy payloads).  stash: weight stashing (see module doc).
    """

    def __init__(self, modules: list[nn.Module], optim, names: list[str], *,
                 grad_inputs: list[bool], device="cpu", stash: bool = False):
        self.device = torch.device(device)
        for m in modules:
            m.to(self.device)
        super().__init__(modules, optim, first=not any(grad_inputs), names=names)
        self.module = _Chain(*modules)  # the same modules under the same keys
        self.grad_inputs = list(grad_inputs)
        self.stash = bool(stash)
        skip = {f"{n}.{b}" if n else b for n, m in self.module.named_modules()
                if isinstance(m, _BatchNorm) for b, _ in m.named_buffers(recurse=False)}
        self._stashable_buffers = [n for n, _ in self.module.named_buffers() if n not in skip]
        self._snap: dict | None = None
        self._snap_versions: dict = {}
        self._mutations = 0  # bumped by every update: fused SGD leaves version counters alone
        self._snap_mutations = -1
        # makes each input's _Catch part of the graph (its output needs a grad-requiring
        # input); receives no gradient itself
        self._anchor = torch.zeros((), device=self.device, requires_grad=True)

    # -- data path --------------------------------------------------------------------
    def forward(self, x: torch.Tensor, mb=0, rest=()) -> torch.Tensor:
        xs = [self._layout(t.to(self.device).detach()) for t in (x, *rest)]
        if self.stash:  # a checkpoint may need the inputs to rebuild this forward
            xs = [t.requires_grad_(g) for t, g in zip(xs, self.grad_inputs)]
            snap = self._snapshot()
            y = torch.func.functional_call(self.module, snap, tuple(xs), strict=False)
            self._pending[mb] = (xs, y, snap)
            return y.detach()
        # Each input's error is caught on its way out of the graph instead of read from
        # a leaf's .grad: a leaf stays alive with the graph, and an input no layer saves
        # (a merge's skip, read once by the add) would then be kept for every
        # micro-batch in flight.
        box: list = [None] * len(xs)
        y = self.module(*[_Catch.apply(t, self._anchor, box, i) if g else t
                          for i, (t, g) in enumerate(zip(xs, self.grad_inputs))])
        self._pending[mb] = (box, y, None)
        return y.detach()

    def backward(self, grad_y, mb=0, e=None):
        xs, y, snap = self._pending.pop(mb)
        grad_y = torch.zeros_like(y) if grad_y is None else self._layout(grad_y.to(self.device))
        ctx = output_error(e.to(self.device)) if e is not None else contextlib.nullcontext()
        with ctx:
            run_backward(y, grad_y)
        if snap is None:  # the errors _Catch caught
            return [xs[i] if g else None for i, g in enumerate(self.grad_inputs)]
        self._collect(snap)
        return [x.grad if g else None for x, g in zip(xs, self.grad_inputs)]

    @torch.no_grad()
    def infer(self, x, rest=()):
        return self.module(*[self._layout(t.to(self.device)) for t in (x, *rest)])

    # -- weight stashing (async) --------------------------------------------------------
    def _snapshot(self) -> dict:
        """Copies of the parameters (and of buffers other than BatchNorm's running
        statistics) as they are now.  Parameters are copied again after every update
        (the fused optimizer does not bump torch's version counters); a buffer is
        copied again when its version counter moved (a weight-mirror step), so constant
        feedback (DFA's D, PFA's B_p) is copied once.  Between two updates micro-batches
        share one snapshot."""
        params = dict(self.module.named_parameters())
        bufs = dict(self.module.named_buffers())
        prev, versions = self._snap or {}, {}
        fresh = self._snap_mutations != self._mutations
        if not fresh and prev:
            if all(self._snap_versions.get(n) == bufs[n]._version
                   for n in self._stashable_buffers):
                return prev
        snap = {}
        for n, p in params.items():
            snap[n] = (p.detach().clone().requires_grad_(p.requires_grad)
                       if fresh or n not in prev else prev[n])
        for n in self._stashable_buffers:
            b = bufs[n]
            versions[n] = b._version
            snap[n] = prev[n] if n in prev and self._snap_versions.get(n) == b._version \
                else b.detach().clone()
        self._snap, self._snap_versions, self._snap_mutations = snap, versions, self._mutations
        return snap

    def _collect(self, snap: dict) -> None:
        """Move gradients from the stashed copies onto the live parameters."""
        for n, p in self.module.named_parameters():
            s = snap.get(n)
            if s is not None and s.grad is not None:
                p.grad = s.grad if p.grad is None else p.grad + s.grad
                s.grad = None

    def drop_snapshot(self) -> None:
        self._snap, self._snap_versions, self._snap_mutations = None, {}, -1

    def step(self, lr: float, weight_decay: float) -> None:
        super().step(lr, weight_decay)
        self._mutations += 1

    def mirror_steps(self, n: int) -> None:
        super().mirror_steps(n)
        self._mutations += 1

    # -- forwards in flight across a checkpoint (delayed errors) -------------------------
    def state_dict(self) -> dict:
        """Stage's state, plus each stored forward whose error is still to come (a
        delayed error link keeps some across every step).  Its autograd graph cannot be
        saved, but what rebuilds it can: the inputs and the stashed weights it used."""
        st = super().state_dict()
        if self._pending and self.stash:  # without stashing, no forward outlives a batch
            st["pending"] = [{"key": key, "xs": [x.detach() for x in xs], "snap": snap}
                             for key, (xs, _, snap) in self._pending.items()]
        return st

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.drop_snapshot()
        self._pending.clear()
        if state.get("pending"):
            self._rebuild(state["pending"])
            # the rebuilt forwards moved BatchNorm's running statistics: the checkpoint's
            # go back through .data, whose writes autograd does not count -- a plain copy
            # would bump the version the rebuilt graphs saved, and their backward refuse
            live = dict(self.module.named_buffers())
            with torch.no_grad():
                for n, t in state["module"].items():
                    if n in live:
                        live[n].data.copy_(t)

    def _rebuild(self, pending: list) -> None:
        """Run each saved forward again on its own inputs and stashed weights, in train
        mode: the same operations on the same values, so the graph -- and the backward
        that will run through it -- is the one the interrupted run had.  Forwards that
        shared a snapshot share it again (torch.save keeps shared tensors shared)."""
        if not self.stash:
            raise ValueError("a checkpoint with stored forwards needs weight stashing (the "
                             "run had delayed error links; this one does not)")
        grads = {n: p.requires_grad for n, p in self.module.named_parameters()}
        revived: dict[int, torch.Tensor] = {}

        def revive(n, t):
            if id(t) not in revived:
                revived[id(t)] = t.to(self.device).detach().requires_grad_(grads.get(n, False))
            return revived[id(t)]

        was = self.module.training
        self.module.train(True)
        try:
            for e in pending:
                snap = {n: revive(n, t) for n, t in e["snap"].items()}
                xs = [x.to(self.device).detach().requires_grad_(g)
                      for x, g in zip(e["xs"], self.grad_inputs)]
                y = torch.func.functional_call(self.module, snap, tuple(xs), strict=False)
                key = tuple(e["key"]) if isinstance(e["key"], list) else e["key"]
                self._pending[key] = (xs, y, snap)
        finally:
            self.module.train(was)

    def transported_bytes(self) -> int:
        """Bytes of forward weights this stage's backward reads, under a rule that
        transports weights (bp): what a separate feedback pathway would need after
        every update.  0 for every other rule."""
        return sum(layer.weight.numel() * layer.weight.element_size()
                   for _, layer in self.layers if layer.rule.transports_weights)
