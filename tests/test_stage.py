"""`stage.run_backward`: the same gradients as `Tensor.backward`, without its import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from localnet.stage import run_backward


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5)).double()


def test_run_backward_gives_exactly_what_tensor_backward_gives():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    g = torch.randn(2, 5, dtype=torch.float64)
    grads = []
    for use_ours in (True, False):
        net, xx = _net(), x.clone().requires_grad_(True)
        y = net(xx)
        run_backward(y, g) if use_ours else y.backward(g)
        grads.append([xx.grad] + [p.grad for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    y = _net()(x)
    with pytest.raises(RuntimeError, match=r"an error of torch.float64\[2, 4\] for an output"):
        run_backward(y, g[:, :4])


def test_a_stage_trains_without_importing_sympy():
    """An actor's first backward must not import sympy (torch.fx's symbolic shapes): every
    process pays for that import, and a pipeline has many processes."""
    code = (
        "import sys, torch\n"
        "from localnet.config import Config\n"
        "from localnet.builders import build_rule_and_model, optim_config\n"
        "from localnet.stage import NodeStage, Stage\n"
        "cfg = Config.model_validate({'rule': {'name': 'pfa'}, 'model': {'name': 'resnet20'}})\n"
        "_, model = build_rule_and_model(cfg, (3, 8, 8), 10)\n"
        "st = Stage(list(model.units[:2]), optim_config(cfg), first=True)\n"
        "y = st.forward(torch.randn(4, 3, 8, 8)); st.backward(torch.randn_like(y))\n"
        "st.step(0.1, 0.0)\n"
        "ns = NodeStage(list(model.units[2:3]), optim_config(cfg), ['u2'], grad_inputs=[True])\n"
        "y = ns.forward(torch.randn(4, 16, 8, 8)); ns.backward(torch.randn_like(y))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sympy'"
        " or m == 'torch.fx.experimental.symbolic_shapes'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_memory_format_lays_out_the_convs_and_keeps_the_maths():
    """`train.memory_format: channels_last` gives conv weights (and so every 4-d
    activation and error after them) channels-last storage and nothing else: the same
    weights as the row-major build, and the same step to float tolerance.  A stage puts
    an input that arrives row-major (a codec's output) into its layout."""
    from localnet.builders import build_rule_and_model, optim_config
    from localnet.config import Config
    from localnet.engine import InProcessExecutor
    from localnet.runtime.payload import CHANNELS_LAST, layout

    def build(fmt):
        cfg = Config.model_validate({"model": {"name": "resnet20"}, "rule": {"name": "pfa"},
                                     "train": {"memory_format": fmt, "micro_batches": 2}})
        _, model = build_rule_and_model(cfg, (3, 16, 16), 10)
        return model, InProcessExecutor(model, optim_config(cfg), micro_batches=2)

    (cl, ex_cl), (rm, ex_rm) = build("channels_last"), build("contiguous")
    convs = [(n, p) for n, p in cl.named_parameters() if p.dim() == 4]
    assert convs and all(layout(p) == CHANNELS_LAST and not p.is_contiguous() for _, p in convs)
    assert all(p.is_contiguous() for p in rm.parameters())
    for (n, a), (_, b) in zip(cl.state_dict().items(), rm.state_dict().items()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else True, n
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    a, b = ex_cl.train_step(x, y, 0.05, 1e-3), ex_rm.train_step(x, y, 0.05, 1e-3)
    assert a.loss_sum == pytest.approx(b.loss_sum, rel=1e-5)
    for (n, p), (_, q) in zip(cl.named_parameters(), rm.named_parameters()):
        assert torch.allclose(p, q, atol=1e-5), n
    stage = ex_cl.stages[0]
    assert stage.channels_last and not ex_rm.stages[0].channels_last
    h = torch.randn(2, 16, 8, 8)
    assert layout(stage._layout(h)) == CHANNELS_LAST and torch.equal(stage._layout(h), h)
    assert stage._layout(torch.randn(2, 5)).is_contiguous()


def test_a_merge_keeps_no_input_that_no_layer_saves():
    """A node's errors for its inputs are caught on their way out of the graph, so an
    input only the add reads (a merge's skip) is freed after the forward instead of
    living with the graph until the backward; the errors are autograd's for both
    inputs, the skip's summed over both paths it takes."""
    import torch.nn as nn

    from localnet.stage import NodeStage, OptimConfig

    class Merge(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, skip):
            return self.lin(x) + skip + 2 * skip

    torch.manual_seed(0)
    m = Merge()
    ref = Merge()
    ref.load_state_dict(m.state_dict())
    st = NodeStage([m], OptimConfig(lr=0.1, momentum=0.0, weight_decay=0.0), ["m"],
                   grad_inputs=[True, True])
    x, skip, g = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    st.forward(x, mb=0, rest=(skip,))

    def held(fn, seen):  # every tensor the graph below fn keeps: leaves and saved ones
        if fn is None or fn in seen:
            return []
        seen.add(fn)
        out = [getattr(fn, "variable", None)] + [
            getattr(fn, a) for a in dir(fn) if a.startswith("_saved_")]
        out = [t for t in out if isinstance(t, torch.Tensor)]
        return out + [t for nxt, _ in fn.next_functions for t in held(nxt, seen)]

    kept = {t.data_ptr() for t in held(st._pending[0][1].grad_fn, set())}
    assert x.data_ptr() in kept  # the linear layer saves x for its weight's gradient
    assert skip.data_ptr() not in kept  # the skip, read only by the adds, is not kept
    dx, dskip = st.backward(g, mb=0)
    xr, sr = x.clone().requires_grad_(), skip.clone().requires_grad_()
    ref(xr, sr).backward(g)
    assert torch.allclose(dx, xr.grad) and torch.allclose(dskip, sr.grad)
    assert torch.allclose(dskip, 3 * g)
