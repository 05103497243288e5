"""The `bp` rule through localnet's layers is exactly stock PyTorch backprop.

build_model(name, None, ...) builds the same network from nn.Conv2d / nn.Linear with the
same initial weights; one step must give the same gradient (to float32 rounding)
for every parameter, for every model.
"""

import pytest
import torch
import torch.nn.functional as F

from localnet.engine import InProcessExecutor, OptimConfig
from localnet.models import MODELS, build_model
from localnet.rules import make_rule

SHAPES = {"mlp": (1, 8, 8)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bp_rule_equals_stock_pytorch(name):
    shape = SHAPES.get(name, (3, 16, 16))
    torch.manual_seed(0)
    x, y = torch.randn(4, *shape), torch.randint(0, 5, (4,))
    native = build_model(name, None, shape, 5, seed=3)
    ours = build_model(name, make_rule("bp"), shape, 5, seed=3)
    F.cross_entropy(native(x), y).backward()
    F.cross_entropy(ours(x), y).backward()
    n_params = dict(native.named_parameters())
    checked = 0
    for n, p in ours.named_parameters():
        assert torch.allclose(p.grad, n_params[n].grad, rtol=1e-5, atol=1e-7), n
        checked += 1
    assert checked == len(n_params)


def test_training_trajectory_matches_stock_pytorch():
    torch.manual_seed(0)
    shape = (3, 8, 8)
    native = build_model("resnet20", None, shape, 10, seed=1)
    ours = build_model("resnet20", make_rule("bp"), shape, 10, seed=1)
    opt = torch.optim.SGD(native.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    ex = InProcessExecutor(ours, OptimConfig(lr=0.05, momentum=0.9, weight_decay=1e-3))
    for _ in range(5):
        x, y = torch.randn(8, *shape), torch.randint(0, 10, (8,))
        F.cross_entropy(native(x), y).backward()
        opt.step()
        opt.zero_grad()
        ex.train_step(x, y, 0.05, 1e-3)
    theirs = native.state_dict()
    for n, b in theirs.items():
        a = ours.state_dict()[n]
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-6), n


def test_stock_pytorch_baseline_has_the_same_weights_under_either_init():
    """Plain BP (stock nn layers) and localnet's layers start from the same weights under
    model.init xavier too, so benchmarks divide by the same network."""
    for init in ("torch", "xavier"):
        native = build_model("resnet8", None, (3, 8, 8), 5, seed=2, init=init)
        ours = build_model("resnet8", make_rule("bp"), (3, 8, 8), 5, seed=2, init=init)
        theirs = dict(native.named_parameters())
        for n, p in ours.named_parameters():
            assert torch.equal(p, theirs[n]), (init, n)
