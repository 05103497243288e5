"""Whole steps as CUDA graphs (localnet/graphs.py), tested on the CPU.

A stand-in backend records the step's work at capture without running it, and runs it
again at each replay on the graph's own input tensors -- what a replay does to the
numbers.  So the plumbing is checked here, against eager steps: the batch copied into
the graph's inputs, the learning rate as a device tensor, the warm-up, a new capture for
a new weight decay, the host's bookkeeping, and what drops or refuses a graph.  That a
real capture replays the same kernels is the GPU check in benchmarks/gpu.py."""

import contextlib
import copy
import warnings

import pytest
import torch

from localnet.config import ChannelConfig
from localnet.engine import InProcessExecutor, OptimConfig
from localnet.graphs import KEEP, WARMUP, GraphedSteps, why_not
from localnet.models import build_model
from localnet.rules import make_rule

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
SHAPE = (3, 8, 8)


class Recorder:
    """Capture keeps the work and runs nothing; replay runs it into the same outputs."""

    def __init__(self, fail=None):
        self.captures, self.replays, self.fail = 0, 0, fail

    def side_stream(self):
        return contextlib.nullcontext()

    def capture(self, work):
        if self.fail:
            raise RuntimeError(self.fail)
        self.captures += 1
        out = torch.zeros(2, dtype=DT)

        def replay():
            self.replays += 1
            out.copy_(work())
        return replay, out


def executor(rule="pfa", micro=2, backend=None, **optim):
    model = build_model("resnet8", make_rule(rule), SHAPE, 4, seed=3).to(DT)
    opt = OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-3, **optim)
    ex = InProcessExecutor(model, opt, micro_batches=micro)
    if backend is not None:
        ex.graphs = GraphedSteps(ex, backend)
    return ex


def batches(n, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, *SHAPE, generator=g, dtype=DT), torch.randint(0, 4, (bs,), generator=g))
            for _ in range(n)]


def state(ex):
    out = dict(ex.model.state_dict())
    for i, s in enumerate(ex.stages):
        for j, st in s.opt.state_dict()["state"].items():
            out[f"momentum.{i}.{j}"] = st["momentum_buffer"]
    return out


def run(ex, data, schedule):
    return [(st.loss_sum, st.correct, st.samples)
            for (x, y), (lr, wd) in zip(data, schedule)
            for st in [ex.train_step(x, y, lr, wd)]]


def assert_same(a, b):
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("rule", ["pfa", "bp", "dfa", "kp"])
def test_replayed_steps_equal_eager_steps(rule):
    """A learning rate that changes every step, and a weight decay that changes once
    (PFA's recipe): every weight, buffer and momentum as eager steps leave them."""
    data = batches(12)
    sched = [(0.1 / (1 + i), 5e-3 if i < 6 else 1e-4) for i in range(12)]
    eager, rec = executor(rule), Recorder()
    graphed = executor(rule, backend=rec)
    assert run(graphed, data, sched) == pytest.approx(run(eager, data, sched), rel=1e-12)
    assert_same(eager, graphed)
    # each weight decay: WARMUP eager steps, then one capture replayed for the rest
    assert rec.captures == 2 and rec.replays == 12 - 2 * WARMUP
    assert [s.steps for s in graphed.stages] == [12] * len(graphed.stages)


def test_a_short_last_batch_gets_its_own_graph_and_the_full_one_stays():
    rec = Recorder()
    ex = executor(backend=rec)
    full, short = batches(1)[0], batches(1, bs=4, seed=1)[0]
    for _ in range(WARMUP + 1):
        ex.train_step(*full, 0.1, 1e-3)
    for _ in range(WARMUP + 1):
        ex.train_step(*short, 0.1, 1e-3)
    ex.train_step(*full, 0.1, 1e-3)
    assert rec.captures == 2 and len(ex.graphs.graphs) <= KEEP


def test_loading_a_checkpoint_drops_the_graphs():
    """The loaded momentum buffers are new tensors: a kept graph would update the old ones."""
    data, sched = batches(10), [(0.05, 1e-3)] * 10
    eager, graphed = executor(), executor(backend=Recorder())
    run(eager, data[:5], sched[:5])
    run(graphed, data[:5], sched[:5])
    saved = copy.deepcopy(eager.state_dict())  # as read back from checkpoint.pt
    graphed.load_state_dict(saved)
    assert graphed.graphs.graphs == {}
    run(eager, data[5:], sched[5:])
    run(graphed, data[5:], sched[5:])
    assert_same(eager, graphed)


def test_a_capture_that_fails_warns_once_and_every_step_runs_eagerly():
    data, sched = batches(8), [(0.1, 1e-3)] * 8
    eager, graphed = executor(), executor(backend=Recorder(fail="operation not permitted"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(graphed, data, sched)
    assert [str(w.message) for w in caught if "cuda_graph" in str(w.message)] == [
        "train.cuda_graph: the step could not be captured as a CUDA graph, so every step "
        "runs eagerly (RuntimeError: operation not permitted)"]
    run(eager, data, sched)
    assert_same(eager, graphed)


def test_steps_that_cannot_be_captured_say_why():
    assert why_not(executor("pfa")) is None
    assert "brsf" in why_not(executor("brsf"))
    assert "wm" in why_not(executor("wm"))
    assert "norm_constraint" in why_not(executor("fa", norm_constraint=True))
    model = build_model("resnet8", make_rule("fa"), SHAPE, 4).to(DT)
    ch = ChannelConfig.model_validate({"error": {"drop": 0.1}})
    ex = InProcessExecutor(model, OptimConfig(lr=0.1, momentum=0.9, weight_decay=0.0),
                           channels=ch)
    assert "channels" in why_not(ex)


def test_no_graphs_off_the_gpu_or_when_switched_off():
    ex = executor()
    assert ex.graphs is None and ex.runtime_info()["cuda_graph"] is False
    assert GraphedSteps.for_executor(ex, enabled=True) is None
    ex.device = torch.device("cuda")  # as a GPU executor would be
    assert GraphedSteps.for_executor(ex, enabled=False) is None
    assert GraphedSteps.for_executor(ex, enabled=True) is not None
