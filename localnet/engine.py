"""The in-process executor: the model's stages (`stage.py`) chained with plain calls.

Each stage owns a slice of the units, its optimizer and its local state; only
activations go up and errors come down between them, as between the runtime's actors,
which run the very same `Stage` classes.  This executor is the reference the runtime is
tested against, and what `runtime.executor: inprocess` runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .alignment import update_angles
from .errors import ConfigError
from .graphs import GraphedSteps
from .layers import local_layers, restore_rules, set_rule
from .rules import make_rule
from .stage import NodeStage, OptimConfig, Stage

__all__ = ["InProcessExecutor", "OptimConfig", "Stage", "StepStats", "loss_and_error"]


def _first(dx):
    """A stage's error for its input (a graph stage returns one per input)."""
    return dx[0] if isinstance(dx, list) else dx


def loss_and_error(logits: torch.Tensor, targets: torch.Tensor, batch_total: int):
    """The summed cross-entropy and the count of correct samples, as 0-d tensors on the
    logits' device, and e = dL/dlogits for the loss averaged over the *whole* batch (so
    micro-batch errors add up to the batch's), the error that enters the network.

    The sums stay tensors because reading one is a host sync: on a GPU, a sync between
    the forward and the backward leaves the device idle while the backward is launched,
    so callers read them once per step."""
    logits = logits.detach().requires_grad_(True)
    loss = F.cross_entropy(logits, targets, reduction="sum")
    (loss / batch_total).backward()
    return loss.detach(), (logits.argmax(1) == targets).sum(), logits.grad


@dataclass
class StepStats:
    loss_sum: float   # summed over samples
    correct: int
    samples: int


def _sums(pairs: list) -> torch.Tensor:
    """The micro-batches' (loss_sum, correct) 0-d tensors as one tensor [loss, correct]."""
    return torch.stack([torch.stack((l, c.to(l.dtype))) for l, c in pairs]).sum(0)


def _add_sums(stats: StepStats, sums: torch.Tensor) -> None:
    """Add a [loss, correct] tensor to stats: the step's one host sync."""
    loss, correct = sums.tolist()
    stats.loss_sum += loss
    stats.correct += int(correct)


class InProcessExecutor:
    """Runs stages in this process, unit slices in order; the reference for the runtime."""

    name = "inprocess"

    def __init__(self, model: nn.Module, optim: OptimConfig, micro_batches: int = 1,
                 boundaries: list[int] | None = None, channels=None, channel_seed: int = 0,
                 device: torch.device | str = "cpu", cuda_graph: bool = True):
        self.device = torch.device(device)
        model.to(self.device)
        units = list(model.units)
        if channels is not None and boundaries is None:  # channels sit between stages
            boundaries = list(range(1, len(units)))
        self.cuts = cuts = [0] + list(boundaries or []) + [len(units)]
        names = model.unit_names
        self.stages = [Stage(units[a:b], optim, first=(i == 0), names=names[a:b])
                       for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]
        self.micro_batches = micro_batches
        self.model = model
        self.channels = None
        if channels is not None:  # a ChannelConfig: localnet/channels
            from .channels.channel import ChannelSet, StoredForwards, error_delays
            bcast = any(layer.rule.broadcast_output_error for _, layer in local_layers(model))
            self.channels = ChannelSet(channels, names, cuts, broadcast_output_error=bcast,
                                       seed=channel_seed, slots_per_step=micro_batches)
            if error_delays(channels):
                # delayed errors meet their own micro-batch's stored forward steps later:
                # each stage stashes the weights that forward used (as the async schedule)
                self.stages = [NodeStage(units[a:b], optim, names[a:b], grad_inputs=[i > 0],
                                         stash=True)
                               for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]
            self._waiting = [StoredForwards() for _ in self.stages]
            self._mb_id = 1  # (forward_backward, which bypasses channels, uses key 0)
        # on a GPU, whole steps captured once and replayed (graphs.py); None: eager
        self.graphs = GraphedSteps.for_executor(self, cuda_graph)

    def _on_device(self, x: torch.Tensor, y: torch.Tensor):
        """The batch on the executor's device: one copy each, asynchronous from pinned
        memory (train.device); nothing on the CPU."""
        if x.device == self.device:
            return x, y
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float, wd: float,
                   upcoming: tuple | None = None) -> StepStats:
        """upcoming: the next step's batch, a hint for the Ray runtime (which trains it in
        the same calls, or issues it early under async); one process has no calls to
        save, so it is unused."""
        graphs = self.graphs
        if graphs is None:
            return self.eager_step(x, y, lr, wd)
        sums = graphs.replay(x, y, lr, wd)
        if sums is None:  # a warm-up, or a step that cannot be captured
            with graphs.eager_context():
                return self.eager_step(x, y, lr, wd)
        stats = StepStats(0.0, 0, x.shape[0])
        _add_sums(stats, sums)
        return stats

    def eager_step(self, x: torch.Tensor, y: torch.Tensor, lr: float, wd: float) -> StepStats:
        x, y = self._on_device(x, y)
        if self.channels is not None:
            return self._train_step_channels(x, y, lr, wd)
        self.forward_backward(x, y, stats := StepStats(0.0, 0, 0))
        for stage in self.stages:
            stage.step(lr, wd)
        return stats

    def forward_backward(self, x, y, stats: StepStats) -> None:
        sums, samples = self.passes(x, y)
        _add_sums(stats, sums)
        stats.samples += samples

    def passes(self, x, y) -> tuple[torch.Tensor, int]:
        """Every micro-batch's forward and backward: the [loss, correct] sums, still on
        the device, and the samples.  Nothing here reads a tensor back on the host, so a
        CUDA graph can capture it (graphs.py)."""
        n, pairs = x.shape[0], []
        for xm, ym in zip(x.chunk(self.micro_batches), y.chunk(self.micro_batches)):
            h = xm
            for stage in self.stages:
                h = stage.forward(h)
            loss_sum, correct, e = loss_and_error(h, ym, n)
            g = e
            for stage in reversed(self.stages):
                g = stage.backward(g, e=e)
            pairs.append((loss_sum, correct))
        return _sums(pairs), n

    def _train_step_channels(self, x, y, lr: float, wd: float) -> StepStats:
        """train_step with every activation and error through its channel.

        Each stage stores its forwards in order, and each error slot coming down pairs
        with one of them (`StoredForwards`, as on the Ray actors); a LOST or WAIT slot is
        passed on down as an empty or a waiting one.  A stage that ran no backward in the
        whole step does not step its optimizer (no momentum or weight-decay drift)."""
        from .channels.channel import DATA, WAIT

        ch, stages, last = self.channels, self.stages, len(self.stages) - 1
        bcast = ch.broadcast_output_error  # DFA: e goes to every stage, no chain error
        stats, n, pairs = StepStats(0.0, 0, 0), x.shape[0], []
        updated = [False] * len(stages)
        for xm, ym in zip(x.chunk(self.micro_batches), y.chunk(self.micro_batches)):
            key, self._mb_id = self._mb_id, self._mb_id + 1
            h = xm
            for i, stage in enumerate(stages):
                h = stage.forward(h, key)
                if i < last:
                    self._waiting[i].store(key)
                    h = ch.activations[i].transmit(h)  # activations are never lost
            loss_sum, correct, e = loss_and_error(h, ym, n)
            g = _first(stages[last].backward(e, key, e=e))
            updated[last] = True
            for i in range(last - 1, -1, -1):
                link, stage = ch.errors[i], stages[i]
                link.send(e if bcast else g)
                state, got = link.receive_slot()
                old = self._waiting[i].pair(state, stage)
                if state != DATA:  # WAIT, or LOST (that forward dropped): passed on down
                    g = WAIT if state == WAIT else None
                    continue
                g = _first(stage.backward(None, old, e=got) if bcast else stage.backward(got, old))
                updated[i] = True
            pairs.append((loss_sum, correct))
            stats.samples += xm.shape[0]
        _add_sums(stats, _sums(pairs))
        ch.samples += n
        for stage, up in zip(stages, updated):
            if up:
                stage.step(lr, wd)
        return stats

    def channel_summary(self) -> dict | None:
        """Bytes per edge and kind, bytes per sample, error bits per sample (channels)."""
        return self.channels.summary() if self.channels is not None else None

    @torch.no_grad()
    def evaluate(self, loader) -> tuple[float, float]:
        self.train(False)
        loss, correct, n = 0.0, 0, 0
        for x, y in loader:
            h, y = self._on_device(x, y)
            for stage in self.stages:
                h = stage.infer(h)
            loss += F.cross_entropy(h, y, reduction="sum").item()
            correct += (h.argmax(1) == y).sum().item()
            n += y.shape[0]
        self.train(True)
        return loss / max(n, 1), correct / max(n, 1)

    def train(self, mode: bool) -> None:
        for s in self.stages:
            s.train(mode)

    def mirror_steps(self, n: int) -> None:
        for s in self.stages:
            s.mirror_steps(n)

    def alignment(self) -> dict:
        out = {}
        for s in self.stages:
            out.update(s.alignment())
        return out

    def bp_update_angles(self, x, y) -> dict[str, float]:
        """Angle between each layer's update under its rule and the true BP gradient on
        the same batch.  Runs two extra passes; BatchNorm statistics are restored."""
        x, y = self._on_device(x, y)
        bn_state = {k: v.clone() for k, v in self.model.state_dict().items() if "running" in k or "num_batches" in k}
        try:
            grads = []
            for rule in (None, make_rule("bp")):
                old = set_rule(self.model, rule) if rule is not None else None
                try:
                    for s in self.stages:
                        s.zero_grad()
                    self.forward_backward(x, y, StepStats(0.0, 0, 0))
                    g = {}
                    for s in self.stages:
                        g.update(s.weight_grads())
                    grads.append(g)
                finally:
                    if old is not None:
                        restore_rules(self.model, old)
        finally:
            for s in self.stages:
                s.zero_grad()
            self.model.load_state_dict(bn_state, strict=False)
        return update_angles(grads[0], grads[1])

    def state_dict(self) -> dict:
        # where the units were cut into stages: a resume under another cut re-cuts it
        st = {"stages": [s.state_dict() for s in self.stages], "boundaries": self.cuts[1:-1]}
        if self.channels is not None:  # each link's random stream, codec state and queue
            st["channels"] = [c.state_dict() for c in self.channels.all()]
            # the forwards still waiting for a delayed error, in the order they pair
            st["waiting"] = [w.state_dict() for w in self._waiting]
            st["mb_id"] = self._mb_id
            st["channel_samples"] = self.channels.samples  # what the links' counts cover
        return st

    def load_state_dict(self, state: dict) -> None:
        if self.graphs is not None:  # the optimizer's loaded state is new tensors
            self.graphs.drop()
        for s, st in zip(self.stages, state["stages"]):
            s.load_state_dict(st)
        if self.channels is not None and "channels" in state:
            for c, st in zip(self.channels.all(), state["channels"]):
                c.load_state_dict(st)
            for w, keys in zip(self._waiting, state.get("waiting", [[]] * len(self._waiting))):
                w.load_state_dict(keys)
            self._mb_id = state.get("mb_id", self._mb_id)
            self.channels.samples = int(state.get("channel_samples", 0))

    # -- what train.py uses of every executor (the distributed runtime has the same) --
    def save_state(self, run_dir) -> dict:
        """What checkpoint.pt keeps: the whole state (it all lives in this process)."""
        return self.state_dict()

    def load_saved_state(self, run_dir, saved: dict) -> None:
        if "stages" not in saved:  # the actors' checkpoint: each wrote its own file
            raise ConfigError("--resume: the checkpoint was written by actors "
                              "(runtime.executor: ray or local), each saving its own part; "
                              "resume it with the executor and runtime.partition that "
                              "wrote it")
        self.load_state_dict(saved)
        self._steps_base = [s.steps for s in self.stages]

    def stage_members(self) -> list[tuple]:
        """What each stage holds, ("units", a, b), as recut.py names it."""
        return [("units", a, b) for a, b in zip(self.cuts, self.cuts[1:])]

    def crowding(self) -> None:
        """No actors take turns on the cores here (the runtime's `crowding`)."""
        return None

    def flush(self) -> None:
        """Every step has finished when train_step returns here (the runtime's `flush`
        waits for the actors' replies it has not checked yet)."""

    def gpu_sharing(self) -> None:
        """No actors share a GPU here (the runtime's `gpu_sharing`)."""
        return None

    def cpu_policy_fallback(self) -> None:
        """No actor threads to schedule here (the runtime's `cpu_policy_fallback`)."""
        return None

    def runtime_info(self) -> dict:
        return {"executor": self.name, "actors": 0, "schedule": "sequential",
                "micro_batches": self.micro_batches, "staleness": 0,
                "stages": len(self.stages), "cuda_graph": self.graphs is not None}

    def ledger_summary(self) -> dict:
        """No messages: nothing crosses a wire.  parameter_bytes counts weight transport
        as the runtime does (localnet/ledger.py): bp's backward reads W, once
        per update of each layer; 0 for every other rule."""
        from .ledger import Ledger

        led = Ledger()
        base = getattr(self, "_steps_base", None) or [0] * len(self.stages)
        for s, b in zip(self.stages, base):
            w = sum(layer.weight.numel() * layer.weight.element_size()
                    for _, layer in s.layers if layer.rule.transports_weights)
            led.record_transport((s.steps - b) * w)
        return led.run_summary()

    def close(self) -> None:
        """Nothing to release in-process."""
