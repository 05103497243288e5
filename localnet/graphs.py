"""The in-process executor's training step as one CUDA graph (`train.cuda_graph`).

On a GPU, a small network's step is bound by the host, not the device: each of its
hundreds of kernels costs the host Python, dispatch and a launch, and runs for a few
microseconds, so the device idles between them.  Local rules add kernels and Python per
layer (PFA forms B_p R, sums g_W, forms g_R), and so they lose the most.  Captured once
and replayed, a whole step -- every micro-batch's forward and backward, the rules'
hooks and the optimizer -- is one launch (benchmarks/RESULTS.md, "One GPU").

A replay repeats the captured kernels on the same memory, so:
- the batch is first copied into the graph's input tensors;
- the learning rate is a 0-d device tensor that each step fills, so a schedule needs no
  new capture; a new weight decay or batch shape is a new capture, and the last two are
  kept (an epoch's short last batch does not evict the full one);
- the host's share of a step (its count, a rule's cached products) runs after each replay;
- whatever gives the optimizer or the layers new tensors (loading a checkpoint) drops
  the graphs, since they would go on writing the old ones.

As in PyTorch's whole-network capture, the first steps of each shape run eagerly on a
side stream, so that what is made lazily (momentum buffers, DFA's taps, cuDNN's and
cuBLAS's choices and workspaces) exists before the capture.

A step that reads a tensor back on the host or draws from a host RNG cannot be captured:
channels, the norm constraint, and rules marked `graph_safe = False` (brsf, wm).  Those
run eagerly, as does every step if a capture fails (with one warning saying why).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter

import torch

from .layers import local_layers

WARMUP = 3   # eager steps of a shape before its capture (PyTorch's docs use 3)
KEEP = 2     # graphs kept at once


def why_not(ex) -> str | None:
    """Why the executor's steps cannot be captured, or None when they can."""
    if ex.channels is not None:
        return "channels draw losses and delays on the host"
    if any(s.optim.norm_constraint for s in ex.stages):
        return "train.norm_constraint compares norms on the host"
    for _, layer in local_layers(ex.model):
        if not layer.rule.graph_safe:
            return f"rule {layer.rule.name} draws from a host RNG at every step"
    return None


class _CudaGraphs:
    """torch.cuda's graphs, streams and memory pools."""

    def __init__(self, device: torch.device):
        self.device = device

    @contextlib.contextmanager
    def side_stream(self):
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            yield
        torch.cuda.current_stream(self.device).wait_stream(s)

    def capture(self, work):
        """(replay, outputs): work's kernels recorded, not run."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = work()
        return graph.replay, out


class _Captured:
    def __init__(self, x, y, lr, replay, sums):
        self.x, self.y, self.lr, self.replay, self.sums = x, y, lr, replay, sums


class GraphedSteps:
    """Captures and replays an InProcessExecutor's steps."""

    def __init__(self, ex, backend=None):
        self.ex = ex
        self.backend = backend or _CudaGraphs(ex.device)
        self.graphs: dict[tuple, _Captured] = {}
        self.seen: Counter = Counter()
        self.failed: str | None = None
        self._warming = False
        self.layers = [layer for _, layer in local_layers(ex.model)]

    @classmethod
    def for_executor(cls, ex, enabled: bool):
        """The graphs for a GPU executor whose steps can be captured, else None."""
        if not enabled or ex.device.type != "cuda" or why_not(ex) is not None:
            return None
        return cls(ex)

    def drop(self) -> None:
        """Forget every graph: the tensors they write were replaced."""
        self.graphs.clear()
        self.seen.clear()

    def replay(self, x, y, lr: float, wd: float):
        """The step on (x, y) replayed: its [loss, correct] sums on the device.  None
        when the executor must run this step eagerly itself, in `eager_context()`."""
        self._warming = False
        if self.failed:
            return None
        key = (tuple(x.shape), x.dtype, tuple(y.shape), float(wd), self.ex.micro_batches)
        cap = self.graphs.get(key)
        if cap is None:
            self.seen[key] += 1
            if self.seen[key] <= WARMUP:
                self._warming = True
                return None
            cap = self._capture(key, x, y, wd)
            if cap is None:
                return None
        cap.x.copy_(x, non_blocking=True)
        cap.y.copy_(y, non_blocking=True)
        cap.lr.fill_(lr)
        cap.replay()
        for stage in self.ex.stages:
            stage.count_step()
        for layer in self.layers:
            layer.rule.weights_changed(layer)
        return cap.sums

    def eager_context(self):
        """Where an eager step runs: a warm-up on a side stream, as PyTorch's docs do."""
        return self.backend.side_stream() if self._warming else contextlib.nullcontext()

    def _capture(self, key, x, y, wd: float):
        ex, dev = self.ex, self.ex.device
        sx, sy = torch.empty_like(x, device=dev), torch.empty_like(y, device=dev)
        dtype = next(ex.model.parameters()).dtype
        lr = torch.zeros((), dtype=dtype, device=dev)  # the optimizer reads it as a param

        def work():
            sums, _ = ex.passes(sx, sy)
            for stage in ex.stages:
                stage.update(lr, wd)
            return sums

        try:
            replay, sums = self.backend.capture(work)
        except Exception as exc:  # noqa: BLE001 -- any capture failure means: run eagerly
            self.failed = f"{type(exc).__name__}: {exc}"
            for stage in ex.stages:  # what the broken capture left half done
                stage.drop()
                stage.zero_grad()
            for layer in self.layers:
                layer.rule.weights_changed(layer)
            warnings.warn(f"train.cuda_graph: the step could not be captured as a CUDA "
                          f"graph, so every step runs eagerly ({self.failed})", stacklevel=2)
            return None
        if len(self.graphs) >= KEEP:
            self.graphs.pop(next(iter(self.graphs)))
        cap = self.graphs[key] = _Captured(sx, sy, lr, replay, sums)
        return cap
