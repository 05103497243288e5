"""localnet.optim.SGD: torch.optim.SGD's update, without importing torch._dynamo."""

import subprocess
import sys

import pytest
import torch

from localnet.optim import SGD


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_equals_torch_sgd_bit_for_bit(fused, nesterov):
    g = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(4, generator=g))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=nesterov, fused=fused)
    mine, ref = SGD(a, **kw), torch.optim.SGD(b, **kw)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=g) for p in a]
        for opt, ps in ((mine, a), (ref, b)):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            opt.step()
            opt.zero_grad()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    mine.load_state_dict(ref.state_dict())
    assert torch.equal(mine.state_dict()["state"][0]["momentum_buffer"],
                       ref.state_dict()["state"][0]["momentum_buffer"])


def test_training_never_imports_dynamo():
    """A stage's whole life -- build, steps, state dicts -- leaves torch._dynamo out of
    the process (it costs every actor seconds of CPU and over 100 MB; localnet/optim.py)."""
    code = """
import sys, torch
from localnet.config import Config
from localnet.runtime.testing import reference
cfg = Config.model_validate({"rule": {"name": "pfa"}, "model": {"name": "resnet8"},
                             "train": {"micro_batches": 2, "nesterov": True}})
ex, model = reference(cfg, (3, 8, 8), 10)
for _ in range(2):
    ex.train_step(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)), 0.05, 1e-4)
ex.load_state_dict(ex.state_dict())
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_a_gradient_laid_out_unlike_its_parameter_updates_the_right_elements():
    """torch's fused SGD walks parameter and gradient as flat memory; a channels-last
    parameter with a row-major gradient (PFA's g_R) must still get torch.optim.SGD's
    update of the row-major pair, element for element."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, 3, generator=g)
    grads = [torch.randn(4, 3, 3, 3, generator=g) for _ in range(3)]
    cl = torch.nn.Parameter(w.clone().contiguous(memory_format=torch.channels_last))
    rm = torch.nn.Parameter(w.clone())
    opt_cl = SGD([cl], lr=0.1, momentum=0.9, weight_decay=1e-3, fused=True)
    opt_rm = torch.optim.SGD([rm], lr=0.1, momentum=0.9, weight_decay=1e-3)
    for gr in grads:
        cl.grad, rm.grad = gr.clone(), gr.clone()
        opt_cl.step(), opt_rm.step()
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(cl, rm, atol=1e-6)
