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
