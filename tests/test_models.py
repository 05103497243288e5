"""Models and the in-process engine, against independent truth: finite differences,
plain-autograd re-runs of the same network, torchvision's ResNets, the published
parameter counts, and hand-written SGD."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from localnet.engine import InProcessExecutor, OptimConfig, loss_and_error
from localnet.layers import LocalConv2d, LocalLinear, local_layers
from localnet.models import MODELS, UnitModel, build_model
from localnet.models.resnet_cifar import BasicBlock, PadShortcut
from localnet.rules import RULES, make_rule

DT = torch.float64
ALL_RULES = sorted(RULES)


def build(name, rule="bp", shape=(3, 8, 8), classes=3, seed=0, **kw):
    if name == "mlp":
        kw.setdefault("widths", (8, 6))
    return build_model(name, make_rule(rule) if isinstance(rule, str) else rule, shape,
                       classes, seed=seed, **kw)


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def close(a, b, tol=1e-12):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def plain_autograd(model: nn.Module):
    """Re-route every rule layer through plain F.linear / F.conv2d (torch's own backward)."""
    for _, layer in local_layers(model):
        if isinstance(layer, LocalLinear):
            layer.forward = (lambda m: lambda x: F.linear(x, m.weight, m.bias))(layer)
        else:
            g = layer.geometry
            layer.forward = (lambda m, g: lambda x: F.conv2d(
                x, m.weight, m.bias, g.stride, g.padding, g.dilation, g.groups))(layer, g)
    return model


def grads_of(model, x, c):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    (model(x) * c).sum().backward()
    return x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_grads(model, reference, x, c):
    """Every input and parameter gradient of `model` equals plain autograd's on `reference`."""
    gx, gp = grads_of(model, x, c)
    rx, rp = grads_of(plain_autograd(reference), x, c)
    close(gx, rx, 1e-10)
    assert gp.keys() == rp.keys()
    for n in gp:
        close(gp[n], rp[n], 1e-10)


# ----------------------------------------------------------------------------- bp == autograd
@pytest.mark.parametrize("name, shape", [("mlp", (1, 4, 4)), ("resnet20", (3, 8, 8))])
def test_bp_model_gradients_equal_plain_autograd(name, shape):
    model = build(name, "bp", shape).to(DT).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *shape, generator=gen, dtype=DT)
    c = torch.randn(2, 3, generator=gen, dtype=DT)
    assert_same_grads(model, build(name, "bp", shape).to(DT).train(), x, c)


def test_fa_with_b_equal_w_in_a_resnet_is_bp():
    model = build("resnet20", "fa").to(DT).train()
    with torch.no_grad():
        for _, layer in local_layers(model):
            layer.feedback_weight.copy_(layer.weight)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=DT)
    c = torch.randn(2, 3, generator=gen, dtype=DT)
    assert_same_grads(model, build("resnet20", "fa").to(DT).train(), x, c)


@pytest.mark.parametrize("name, shape", [("mlp", (1, 4, 4)), ("resnet20", (3, 7, 7))])
def test_bp_model_gradients_match_finite_differences(name, shape):
    """Directional derivatives: <grad, v> against a central difference, float64."""
    model = build(name, "bp", shape).to(DT).train()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, *shape, generator=gen, dtype=DT)
    c = torch.randn(3, 3, generator=gen, dtype=DT)
    gx, gp = grads_of(model, x, c)
    params = dict(model.named_parameters())
    for trial in range(2):
        vx = torch.randn(x.shape, generator=gen, dtype=DT)
        vp = {n: torch.randn(p.shape, generator=gen, dtype=DT) for n, p in params.items()}
        analytic = (gx * vx).sum() + sum((gp[n] * vp[n]).sum() for n in params)
        eps = 1e-7

        def f(s):
            with torch.no_grad():
                for n, p in params.items():
                    p.add_(vp[n], alpha=s * eps)
                out = (model(x + s * eps * vx) * c).sum()
                for n, p in params.items():
                    p.sub_(vp[n], alpha=s * eps)
            return out

        numeric = (f(1) - f(-1)) / (2 * eps)
        assert numeric.item() == pytest.approx(analytic.item(), rel=1e-6, abs=1e-8)


# ----------------------------------------------------------------------------- CIFAR ResNets
@pytest.fixture(scope="module")
def cifar_resnets():
    return {d: build(f"resnet{d}", "bp", (3, 8, 8), classes=10) for d in (20, 32, 56)}


@pytest.mark.parametrize("depth, params", [(20, 269_722), (32, 464_154), (56, 853_018)])
def test_cifar_resnet_depth_and_parameter_count(cifar_resnets, depth, params):
    """He et al. 2016 sec. 4.2: 6n+2 weighted layers; 0.27M / 0.46M / 0.85M parameters."""
    model = cifar_resnets[depth]
    layers = local_layers(model)
    convs = [l for _, l in layers if isinstance(l, LocalConv2d)]
    fcs = [l for _, l in layers if isinstance(l, LocalLinear)]
    assert len(layers) == depth and len(convs) == depth - 1 and len(fcs) == 1
    n = (depth - 2) // 6
    # widths 16/32/64 with 2n layers each, plus the 16-wide stem
    widths = sorted(l.weight.shape[0] for l in convs)
    assert widths == [16] * (2 * n + 1) + [32] * (2 * n) + [64] * (2 * n)
    assert all(l.weight.shape[2:] == (3, 3) for l in convs)
    # the same count, from first principles
    conv = 3 * 16 * 9 + 16 * 16 * 9 * 2 * n + (16 * 32 + 32 * 32 * (2 * n - 1)) * 9 \
        + (32 * 64 + 64 * 64 * (2 * n - 1)) * 9
    bn = 2 * (16 + 16 * 2 * n + 32 * 2 * n + 64 * 2 * n)
    assert conv + bn + 64 * 10 + 10 == params
    assert sum(p.numel() for p in model.parameters()) == params
    assert round(params / 1e6, 2) == {20: 0.27, 32: 0.46, 56: 0.85}[depth]
    assert len(model.units) == 3 * n + 2  # stem, 3n blocks, head


def test_option_a_shortcut_is_subsample_and_zero_pad(cifar_resnets):
    model = cifar_resnets[20]
    pads = [m for m in model.modules() if isinstance(m, PadShortcut)]
    assert len(pads) == 2  # 16 -> 32 and 32 -> 64
    for m in pads:
        assert sum(p.numel() for p in m.parameters()) == 0 and not list(m.buffers())
    gen = torch.Generator().manual_seed(3)
    for c_in, (h, w) in [(16, (8, 8)), (32, (7, 5))]:
        sc = PadShortcut(2, c_in)
        x = torch.randn(2, c_in, h, w, generator=gen)
        ref = torch.zeros(2, 2 * c_in, (h + 1) // 2, (w + 1) // 2)
        for i in range(ref.shape[2]):
            for j in range(ref.shape[3]):
                ref[:, c_in // 2: c_in // 2 + c_in, i, j] = x[:, :, 2 * i, 2 * j]
        assert torch.equal(sc(x), ref)


def test_downsampling_block_equals_its_equation(cifar_resnets):
    """y = relu(BN(conv3x3(relu(BN(conv3x3_s2(x))))) + pad(x[::2, ::2])), eval mode."""
    block = cifar_resnets[20].units[4]  # layer2.0: 16 -> 32, stride 2
    assert isinstance(block, BasicBlock)
    block = block.eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # make BN matter
        for bn in (block.conv1.bn, block.conv2.bn):
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            bn.bias.normal_(generator=gen)
            bn.running_mean.normal_(generator=gen)
            bn.running_var.uniform_(0.5, 2.0, generator=gen)
    x = torch.randn(2, 16, 8, 8, generator=gen)

    def bn(z, m):
        return F.batch_norm(z, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    h = bn(F.conv2d(x, block.conv1.conv.weight, None, 2, 1), block.conv1.bn).relu()
    h = bn(F.conv2d(h, block.conv2.conv.weight, None, 1, 1), block.conv2.bn)
    sc = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    with torch.no_grad():
        close(block(x), (h + sc).relu(), 1e-5)
    block.train()


def test_cifar_resnet_rejects_bad_depth():
    with pytest.raises(ValueError, match="6n\\+2"):
        build("resnet20", depth=21)
    with pytest.raises(ValueError, match="unknown model"):
        build("resnet21")


# ----------------------------------------------------------------------------- ImageNet ResNets
torchvision = pytest.importorskip("torchvision")
BIG = (3, 65, 65)  # > 64: the ImageNet stem (7x7/2 conv + max-pool)


@pytest.fixture(scope="module")
def imagenet_resnets():
    """Built once (they are large): rule bp, 10 classes, ImageNet stem."""
    return {name: build(name, "bp", BIG, classes=10) for name in ("resnet18", "resnet34", "resnet50")}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_imagenet_resnet_equals_torchvision(imagenet_resnets, name):
    """Same tensors in the same order, and with them the same function."""
    model = imagenet_resnets[name].eval()
    tv = getattr(torchvision.models, name)(num_classes=10).eval()
    ours = [(k, v) for k, v in model.state_dict().items() if not k.endswith("_extra_state")]
    theirs = list(tv.state_dict().items())
    assert [v.shape for _, v in ours] == [v.shape for _, v in theirs]
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # randomise BN so its placement matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    ours = [v for k, v in model.state_dict().items() if not k.endswith("_extra_state")]
    tv.load_state_dict({k: v for (k, _), v in zip(theirs, ours)})
    x = torch.randn(1, *BIG, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x), rtol=1e-4, atol=1e-4)
    model.train()


@pytest.mark.parametrize("name, depth", [("resnet18", 18), ("resnet34", 34), ("resnet50", 50)])
def test_imagenet_resnet_depth_and_parameter_count(imagenet_resnets, name, depth):
    with torch.device("meta"):
        tv = getattr(torchvision.models, name)(num_classes=10)
    big = imagenet_resnets[name]
    assert sum(p.numel() for p in big.parameters()) == sum(p.numel() for p in tv.parameters())
    # documented depth: every weighted layer except the projection shortcuts
    main = [n for n, _ in local_layers(big) if ".shortcut" not in n]
    proj = [n for n, _ in local_layers(big) if ".shortcut" in n]
    assert len(main) == depth
    assert len(proj) == (4 if depth == 50 else 3)


def test_imagenet_resnet_small_input_stem(imagenet_resnets):
    """Inputs <= 64 px: a 3x3 stride-1 stem and no max-pool; nothing else changes."""
    small = build("resnet18", "bp", (3, 16, 16), classes=10)
    big = imagenet_resnets["resnet18"]
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small == sum(p.numel() for p in big.parameters()) - 3 * 64 * (49 - 9)
    assert not any(isinstance(m, nn.MaxPool2d) for m in small.modules())
    stem = local_layers(small)[0][1]
    assert stem.weight.shape == (64, 3, 3, 3) and stem.geometry.stride == (1, 1)


# ----------------------------------------------------------------------------- UnitModel, build
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_with_named_units_and_finite_logits(name, imagenet_resnets):
    if name in imagenet_resnets:
        shape, classes, model = BIG, 10, imagenet_resnets[name]
    else:
        shape, classes = ((1, 4, 4) if name == "mlp" else (3, 8, 8)), 5
        model = build(name, "fa", shape, classes=classes)
    assert isinstance(model, UnitModel)
    assert len(model.units) == len(model.unit_names) == len(set(model.unit_names))
    assert model.unit_names[-1] == "head"
    model.eval()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y = model(x)
    model.train()
    assert y.shape == (2, classes)
    assert torch.isfinite(y).all() and y.std() > 0


@pytest.mark.parametrize("name, rule", [("mlp", "fa"), ("mlp", "dfa"), ("mlp", "pfa"),
                                        ("mlp", "frsf"), ("resnet20", "kp")])
def test_build_model_is_deterministic_in_the_seed(name, rule):
    rng = torch.get_rng_state()
    a, b, c = (build(name, rule, seed=s).state_dict() for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        if k.endswith("_extra_state"):
            assert torch.equal(a[k]["rng"], b[k]["rng"])
            continue
        assert torch.equal(a[k], b[k]), k
    differ = [k for k in a if not k.endswith("_extra_state") and a[k].is_floating_point()
              and a[k].numel() > 1 and a[k].std() > 0]
    assert differ and all(not torch.equal(a[k], c[k]) for k in differ)
    # every layer gets its own feedback: no two equal feedback tensors
    fb = [v for k, v in a.items() if "feedback" in k or "projection" in k]
    assert fb
    for i in range(len(fb)):
        for j in range(i):
            assert fb[i].shape != fb[j].shape or not torch.equal(fb[i], fb[j])


# ----------------------------------------------------------------------------- engine
def _data(step, n=6, shape=(1, 4, 4), classes=3):
    gen = torch.Generator().manual_seed(100 + step)
    return (torch.randn(n, *shape, generator=gen, dtype=DT),
            torch.randint(0, classes, (n,), generator=gen))


def _train(model, steps=3, lr=0.1, wd=1e-3, momentum=0.9, shape=(1, 4, 4), **kw):
    ex = InProcessExecutor(model, OptimConfig(lr=lr, momentum=momentum, weight_decay=wd), **kw)
    for s in range(steps):
        stats = ex.train_step(*_data(s, shape=shape), lr, wd)
        assert stats.samples == 6 and math.isfinite(stats.loss_sum)
    return model.state_dict()


def _assert_same_state(a, b, tol=1e-10):
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("_extra_state"):
            assert torch.equal(a[k]["rng"], b[k]["rng"]), k
        elif a[k].is_floating_point():
            close(a[k], b[k], tol)
        else:
            assert torch.equal(a[k], b[k]), k


def test_loss_and_error_is_softmax_minus_onehot():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 5, generator=gen, dtype=DT)
    y = torch.tensor([0, 4, 2, 2])
    loss_sum, correct, e = loss_and_error(logits, y, batch_total=10)
    close(e, (logits.softmax(1) - F.one_hot(y, 5).to(DT)) / 10)
    assert float(loss_sum) == pytest.approx(-logits.log_softmax(1)[torch.arange(4), y].sum().item())
    assert int(correct) == int((logits.argmax(1) == y).sum())


def test_engine_bp_step_equals_hand_written_sgd():
    """bp through the engine == torch.optim.SGD on a plain-autograd MLP with mean CE."""
    lr, wd, mom = 0.2, 1e-2, 0.9
    model = build("mlp", "bp", (1, 4, 4)).to(DT)
    ref = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    opt = torch.optim.SGD(ref, lr=lr, momentum=mom, weight_decay=wd)
    ex = InProcessExecutor(model, OptimConfig(lr=lr, momentum=mom, weight_decay=wd),
                           micro_batches=3)
    for s in range(4):
        x, y = _data(s)
        ex.train_step(x, y, lr, wd)
        w1, b1, w2, b2, w3, b3 = ref
        h = F.relu(F.linear(x.flatten(1), w1, b1))
        h = F.relu(F.linear(h, w2, b2))
        loss = F.cross_entropy(F.linear(h, w3, b3), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p, r in zip(model.parameters(), ref):
        close(p.detach(), r.detach(), 1e-10)
    assert (ref[0] - build("mlp", "bp", (1, 4, 4)).units[0].linear.weight.to(DT)).abs().max() > 1e-3


@pytest.mark.parametrize("rule", ALL_RULES)
def test_micro_batches_do_not_change_the_update(rule):
    init = build("mlp", rule, (1, 4, 4)).to(DT).state_dict()
    one = _train(build("mlp", rule, (1, 4, 4)).to(DT), micro_batches=1)
    two = _train(build("mlp", rule, (1, 4, 4)).to(DT), micro_batches=2)
    three = _train(build("mlp", rule, (1, 4, 4)).to(DT), micro_batches=3)
    _assert_same_state(one, two)
    _assert_same_state(one, three)
    weights = [k for k in init if k.endswith(".weight")]
    assert len(weights) == 3 and all(not torch.equal(init[k], one[k]) for k in weights)


@pytest.mark.parametrize("rule, boundaries", [("kp", [1]), ("kp", [3, 7]), ("dfa", [1])])
def test_pipeline_stages_do_not_change_the_update(rule, boundaries):
    shape = (3, 8, 8)
    one = _train(build("resnet20", rule, shape).to(DT), steps=2, shape=shape)
    split = _train(build("resnet20", rule, shape).to(DT), steps=2, shape=shape,
                   boundaries=boundaries)
    _assert_same_state(one, split)


def test_pipeline_stages_dfa_mlp():
    one = _train(build("mlp", "dfa", (1, 4, 4)).to(DT))
    split = _train(build("mlp", "dfa", (1, 4, 4)).to(DT), boundaries=[1])
    _assert_same_state(one, split)


@pytest.mark.parametrize("rule", ["fa", "dfa", "usf"])
def test_bp_update_angles(rule):
    model = build("mlp", rule, (1, 4, 4)).to(DT)
    ex = InProcessExecutor(model, OptimConfig(lr=0.1, momentum=0.0, weight_decay=0.0))
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    x, y = _data(0)
    angles = ex.bp_update_angles(x, y)
    assert set(angles) == {"fc1.linear", "fc2.linear", "head"}
    assert angles["head"] < 1e-3  # the output layer gets the true error e under every rule
    assert angles["fc1.linear"] > 1 and angles["fc2.linear"] > 1
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k])
    if rule == "fa":  # with B = W everywhere, every update is BP's
        with torch.no_grad():
            for _, layer in local_layers(model):
                layer.feedback_weight.copy_(layer.weight)
        assert all(a < 1e-3 for a in ex.bp_update_angles(x, y).values())


@pytest.mark.parametrize("rule", ["brsf", "wm", "kp", "pfa"])
def test_checkpoint_resume_continues_the_same_run(rule):
    """State (weights, feedback, momentum, each layer's RNG) round-trips through a file:
    2 steps + save + load into a differently seeded model + 2 steps == 4 steps."""
    import io

    opt = OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-3)

    def steps(ex, rng):
        for s in rng:
            ex.train_step(*_data(s), 0.1, 1e-3)

    full = build("mlp", rule, (1, 4, 4)).to(DT)
    steps(InProcessExecutor(full, opt), range(4))
    first = build("mlp", rule, (1, 4, 4)).to(DT)
    ex = InProcessExecutor(first, opt)
    steps(ex, range(2))
    buf = io.BytesIO()
    torch.save(ex.state_dict(), buf)
    buf.seek(0)
    resumed = build("mlp", rule, (1, 4, 4), seed=5).to(DT)
    ex2 = InProcessExecutor(resumed, opt)
    ex2.load_state_dict(torch.load(buf, weights_only=True))
    steps(ex2, range(2, 4))
    _assert_same_state(full.state_dict(), resumed.state_dict())


def test_built_feedback_is_independent_of_w():
    """Random feedback starts near 90 degrees from W in every layer of a built model."""
    from localnet.alignment import weight_alignment

    for seed, rule in ((0, "fa"), (1, "wm")):
        report = weight_alignment(build("resnet20", rule, seed=seed))
        assert len(report) == 20
        assert all(60 < a["angle"] < 120 for a in report.values())


@pytest.mark.parametrize("init", ["torch", "xavier"])
def test_model_init_and_pfas_r_drawn_like_the_weights(init):
    """model.init: every rule-driven W is uniform on +-a, a = sqrt(6 / (fan_in + fan_out))
    under xavier (biases zero), a = 1/sqrt(fan_in) under torch's default (biases uniform
    in the same bound); PFA's R is drawn the same way for its own shape."""
    model = build_model("mlp", make_rule("pfa"), (1, 16, 16), 10, seed=0, init=init,
                        widths=(300, 300))

    def bound(shape):
        fan_in, fan_out = math.prod(shape[1:]), shape[0] * math.prod(shape[2:])
        return math.sqrt(6 / (fan_in + fan_out)) if init == "xavier" else 1 / math.sqrt(fan_in)

    layers = local_layers(model)
    assert layers
    for name, layer in layers:
        for t in (layer.weight, layer.feedback_plastic):
            a = bound(t.shape)
            t = t.detach()
            assert 0.98 * a < t.abs().max().item() <= a, (name, init)
            assert t.std().item() == pytest.approx(a / math.sqrt(3), rel=0.05), (name, init)
        b = layer.bias.detach()
        if init == "xavier":
            assert torch.count_nonzero(b) == 0
        else:
            assert 0 < b.abs().max().item() <= 1 / math.sqrt(layer.weight.shape[1])
