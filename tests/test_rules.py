"""The learning rules' mathematics, checked against independent truth.

The reference everywhere is plain torch autograd through F.linear / F.conv2d (or
torch.nn.grad's transposed convolutions), or the papers' equations written out here
by hand -- never the library's own geometry helpers.  Float64 where exactness matters.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from localnet.alignment import angle as lib_angle
from localnet.engine import OptimConfig, Stage
from localnet.layers import LocalConv2d, LocalLinear
from localnet.rules import RULES, make_rule, output_error

DT = torch.float64
ALL_RULES = sorted(RULES)

# ----------------------------------------------------------------------------- fixtures
# Layer geometries, described independently of the library: the reference forward is
# built from these numbers, not from the layer's own `geometry`.
GEOMS = {
    "linear": dict(kind="linear", n_in=5, n_out=4, bias=True, x=(3, 5)),
    "linear_3d": dict(kind="linear", n_in=5, n_out=6, bias=True, x=(2, 3, 5)),
    "linear_nobias": dict(kind="linear", n_in=7, n_out=3, bias=False, x=(4, 7)),
    # stride 2 with padding on an even input: the transposed conv needs output_padding
    "conv_s2_p1_g2": dict(kind="conv", c_in=4, c_out=6, k=3, stride=2, padding=1,
                          dilation=1, groups=2, bias=True, x=(2, 4, 8, 8)),
    "conv_dil2_p2": dict(kind="conv", c_in=3, c_out=4, k=3, stride=1, padding=2,
                         dilation=2, groups=1, bias=False, x=(2, 3, 6, 6)),
    "conv_s2_p0_odd": dict(kind="conv", c_in=2, c_out=3, k=(3, 2), stride=(2, 1),
                           padding=(0, 1), dilation=1, groups=1, bias=True, x=(3, 2, 7, 5)),
    "conv_s2_p1": dict(kind="conv", c_in=3, c_out=5, k=3, stride=2, padding=1,
                       dilation=1, groups=1, bias=True, x=(2, 3, 8, 8)),
    "conv_1x1_s2": dict(kind="conv", c_in=4, c_out=6, k=1, stride=2, padding=0,
                        dilation=1, groups=1, bias=False, x=(2, 4, 7, 7)),
    "conv_dw_s2": dict(kind="conv", c_in=4, c_out=4, k=3, stride=2, padding=1,
                       dilation=2, groups=4, bias=True, x=(2, 4, 9, 9)),
}


def make_layer(geom: str, rule, seed: int = 0, init: str = "torch"):
    g = GEOMS[geom]
    if isinstance(rule, str):
        rule = make_rule(rule)
    # every draw (W, b, feedback) comes from the layer's own generator: equal seeds, equal layers
    if g["kind"] == "linear":
        layer = LocalLinear(g["n_in"], g["n_out"], g["bias"], rule=rule, seed=seed, init=init)
    else:
        layer = LocalConv2d(g["c_in"], g["c_out"], g["k"], g["stride"], g["padding"],
                            g["dilation"], g["groups"], g["bias"], rule=rule, seed=seed,
                            init=init)
    return layer.to(DT)


def ref_op(geom: str, x, w, b=None):
    """The layer's forward written with plain torch functional ops."""
    g = GEOMS[geom]
    if g["kind"] == "linear":
        return F.linear(x, w, b)
    return F.conv2d(x, w, b, g["stride"], g["padding"], g["dilation"], g["groups"])


def ref_grads(geom: str, x, w, b, delta):
    """(grad x, grad w, grad b) of <delta, op(x, w) + b> by autograd."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True) if b is not None else None
    ref_op(geom, x, w, b).backward(delta)
    return x.grad, w.grad, (b.grad if b is not None else None)


def ref_input_grad(geom: str, x, feedback, delta):
    """op^T(feedback) delta: the error autograd would send down if the weight were `feedback`."""
    return ref_grads(geom, x, feedback, None, delta)[0]


def run_layer(layer, x, delta):
    """Forward, backward with upstream `delta`; returns (y, grad x, grad W, grad b).
    The feedback gradients are complete once `before_step` has run (PFA forms g_R
    there, once per optimizer step), as the trainer does before every step."""
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(delta)
    layer.rule.before_step(layer)
    gb = layer.bias.grad if layer.bias is not None else None
    return y, x.grad, layer.weight.grad, gb


def inputs(geom: str, seed: int = 0):
    gen = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(GEOMS[geom]["x"], generator=gen, dtype=DT)
    with torch.no_grad():
        w_shape = make_layer(geom, "bp").weight.shape
        y_shape = ref_op(geom, x, torch.zeros(w_shape, dtype=DT)).shape
    delta = torch.randn(y_shape, generator=gen, dtype=DT)
    return x, delta


def xavier_c(w_shape) -> float:
    receptive = math.prod(w_shape[2:])
    return math.sqrt(2.0 / (w_shape[1] * receptive + w_shape[0] * receptive))


def deg(a, b) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    cos = (a @ b) / (a.norm() * b.norm())
    return math.degrees(math.acos(float(cos.clamp(-1, 1))))


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def close(a, b, tol=1e-12):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- 1. FA(B=W) == BP
@pytest.mark.parametrize("geom", list(GEOMS))
def test_bp_equals_autograd(geom):
    layer = make_layer(geom, "bp", seed=1)
    x, delta = inputs(geom)
    y, gx, gw, gb = run_layer(layer, x, delta)
    close(y, ref_op(geom, x, layer.weight.detach(), None if layer.bias is None else layer.bias.detach()))
    rx, rw, rb = ref_grads(geom, x, layer.weight, layer.bias, delta)
    close(gx, rx)
    close(gw, rw)
    if rb is not None:
        close(gb, rb)


@pytest.mark.parametrize("rule", ["fa", "wm", "kp"])
@pytest.mark.parametrize("geom", list(GEOMS))
def test_feedback_equal_to_w_reproduces_bp(rule, geom):
    """Lillicrap et al.: with B = W, feedback alignment *is* backprop."""
    layer = make_layer(geom, rule, seed=2)
    assert not torch.equal(layer.feedback_weight, layer.weight)  # starts random
    with torch.no_grad():
        layer.feedback_weight.copy_(layer.weight)
    x, delta = inputs(geom, seed=1)
    _, gx, gw, gb = run_layer(layer, x, delta)
    rx, rw, rb = ref_grads(geom, x, layer.weight, layer.bias, delta)
    close(gx, rx)
    close(gw, rw)
    if rb is not None:
        close(gb, rb)


@pytest.mark.parametrize("geom", ["linear", "conv_s2_p1_g2"])
def test_fa_with_random_b_differs_from_bp(geom):
    """The converse: a random B sends a different error (the test above can fail)."""
    layer = make_layer(geom, "fa", seed=3)
    x, delta = inputs(geom)
    _, gx, _, _ = run_layer(layer, x, delta)
    rx, _, _ = ref_grads(geom, x, layer.weight, layer.bias, delta)
    assert (gx - rx).abs().max() > 1e-3
    close(gx, ref_input_grad(geom, x, layer.feedback_weight, delta))
    # B is fixed: neither a parameter nor touched by a step's hooks
    assert "feedback_weight" not in dict(layer.named_parameters())
    b0 = layer.feedback_weight.clone()
    layer.rule.after_step(layer)
    layer.rule.mirror_step(layer)
    assert torch.equal(layer.feedback_weight, b0)


# ----------------------------------------------------------------------------- 2. dW = delta x^T
@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("geom", list(GEOMS))
def test_weight_gradient_is_local_for_every_rule(rule, geom):
    layer = make_layer(geom, rule, seed=4)
    x, delta = inputs(geom, seed=2)
    y, _, gw, gb = run_layer(layer, x, delta)
    b = None if layer.bias is None else layer.bias.detach()
    close(y, ref_op(geom, x, layer.weight.detach(), b))  # forward through W, whatever the rule
    _, rw, rb = ref_grads(geom, x, layer.weight, layer.bias, delta)
    close(gw, rw)
    if rb is not None:
        close(gb, rb)


def _expected_feedback(rule: str, layer):
    """The feedback matrix each paper prescribes, rebuilt from the layer's state by hand."""
    w = layer.weight.detach()
    if rule == "bp":
        return w
    if rule in ("fa", "wm", "kp"):
        return layer.feedback_weight.detach()
    if rule == "usf":  # c: the std of W's init (Xavier's, or torch's U(+-1/sqrt(fan_in)))
        c = (xavier_c(w.shape) if layer.init_scheme == "xavier"
             else 1 / math.sqrt(3 * math.prod(w.shape[1:])))
        return c * torch.sign(w)
    if rule in ("frsf", "brsf"):
        return layer.feedback_magnitude.abs() * torch.sign(w)
    if rule == "pfa":
        bp, r = layer.feedback_fixed, layer.feedback_plastic.detach()
        return (bp @ r.reshape(r.shape[0], -1)).reshape(w.shape)
    raise AssertionError(rule)


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("geom", list(GEOMS))
def test_error_sent_down_is_transpose_through_the_rules_feedback(rule, geom):
    layer = make_layer(geom, rule, seed=5)
    x, delta = inputs(geom, seed=3)
    _, gx, _, _ = run_layer(layer, x, delta)
    if rule == "dfa":
        assert gx is None  # DFA: nothing goes down through a rule layer
        return
    close(gx, ref_input_grad(geom, x, _expected_feedback(rule, layer), delta))


# ----------------------------------------------------------------------------- 3. sign-concordant
@pytest.mark.parametrize("init", ["xavier", "torch"])
@pytest.mark.parametrize("geom", ["linear", "conv_s2_p1_g2", "conv_dw_s2"])
def test_usf_feedback_is_the_init_std_times_sign(geom, init):
    """c is the std of W's initial distribution (`model.init`): Glorot & Bengio's
    sqrt(2 / (fan_in + fan_out)) under xavier (Moskovitz et al., BioTorch); under torch's
    default, U(+-1/sqrt(fan_in)), whose std is 1/sqrt(3 fan_in)."""
    layer = make_layer(geom, "usf", seed=6, init=init)
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(layer.weight)
    c = (math.sqrt(2.0 / (fan_in + fan_out)) if init == "xavier"
         else 1.0 / math.sqrt(3 * fan_in))
    if init == "xavier":
        assert c == pytest.approx(xavier_c(layer.weight.shape), rel=1e-15)
    assert layer.sign_scale == pytest.approx(c, rel=1e-12)
    x, delta = inputs(geom, seed=4)
    _, gx, _, _ = run_layer(layer, x, delta)
    close(gx, ref_input_grad(geom, x, c * torch.sign(layer.weight.detach()), delta))
    # B follows sign(W) as W learns: flip half of W's signs, the error follows
    with torch.no_grad():
        layer.weight[: layer.weight.shape[0] // 2].neg_()
    layer.weight.grad = None
    _, gx2, _, _ = run_layer(layer, x, delta)
    close(gx2, ref_input_grad(geom, x, c * torch.sign(layer.weight.detach()), delta))
    assert (gx2 - gx).abs().max() > 1e-6


@pytest.mark.parametrize("geom", ["linear", "conv_s2_p1_g2"])
def test_frsf_magnitudes_fixed_signs_follow_w(geom):
    layer = make_layer(geom, "frsf", seed=7)
    m0 = layer.feedback_magnitude.clone()
    assert m0.shape == layer.weight.shape and (m0 >= 0).all()
    assert "feedback_magnitude" not in dict(layer.named_parameters())
    x, delta = inputs(geom, seed=5)
    for step in range(3):
        layer.weight.grad = None
        _, gx, _, _ = run_layer(layer, x, delta)
        close(gx, ref_input_grad(geom, x, m0 * torch.sign(layer.weight.detach()), delta))
        with torch.no_grad():  # an "update" that flips signs
            layer.weight.mul_(-1.0).add_(0.01 * (step + 1))
        layer.rule.after_step(layer)
        assert torch.equal(layer.feedback_magnitude, m0)  # M fixed across steps


@pytest.mark.parametrize("geom", ["linear", "conv_s2_p1_g2"])
def test_brsf_magnitudes_redrawn_each_step_signs_follow_w(geom):
    layer = make_layer(geom, "brsf", seed=8)
    twin = make_layer(geom, "brsf", seed=8)  # same seed: same redraws (reproducibility)
    x, delta = inputs(geom, seed=6)
    seen = []
    for step in range(3):
        m = layer.feedback_magnitude.clone()
        assert (m >= 0).all()
        assert torch.equal(m, twin.feedback_magnitude)
        assert all(not torch.equal(m, s) for s in seen)  # redrawn every step
        seen.append(m)
        layer.weight.grad = None
        _, gx, _, _ = run_layer(layer, x, delta)
        w = layer.weight.detach()
        close(gx, ref_input_grad(geom, x, m * torch.sign(w), delta))
        # the effective B's signs are W's signs exactly
        b = layer.rule.effective_feedback(layer)
        assert torch.equal(torch.sign(b), torch.sign(w))
        with torch.no_grad():
            layer.weight.mul_(-1.0)
            twin.weight.mul_(-1.0)
        layer.rule.after_step(layer)
        twin.rule.after_step(twin)


@pytest.mark.parametrize("init", ["xavier", "torch"])
@pytest.mark.parametrize("rule", ["frsf", "brsf"])
def test_random_magnitudes_are_drawn_like_the_weights(rule, init):
    """M is drawn like W (`model.init`), so |M| is U(0, a) with a W's uniform bound:
    sqrt(6 / (fan_in + fan_out)) under xavier, 1/sqrt(fan_in) under torch's default;
    mean a/2, second moment a^2/3, nothing above a -- at init and after brSF's redraws."""
    layer = LocalLinear(150, 200, rule=make_rule(rule), seed=9, init=init).to(DT)
    a = math.sqrt(6 / 350) if init == "xavier" else 1 / math.sqrt(150)
    assert layer.weight.abs().max().item() <= a
    for _ in range(2):
        m = layer.feedback_magnitude
        assert m.max().item() <= a and m.min().item() >= 0
        assert m.mean().item() == pytest.approx(a / 2, rel=0.02)
        assert (m ** 2).mean().item() == pytest.approx(a ** 2 / 3, rel=0.02)
        layer.rule.after_step(layer)


# ----------------------------------------------------------------------------- 4. Kolen-Pollack
@pytest.mark.parametrize("geom", ["linear", "conv_s2_p1_g2"])
def test_kp_feedback_grad_equals_weight_grad(geom):
    layer = make_layer(geom, "kp", seed=10)
    assert "feedback_weight" in dict(layer.named_parameters())
    x, delta = inputs(geom, seed=7)
    _, gx, gw, _ = run_layer(layer, x, delta)
    assert torch.equal(layer.feedback_weight.grad, gw)
    close(gx, ref_input_grad(geom, x, layer.feedback_weight, delta))
    # accumulation over micro-batches keeps them equal (and not aliased)
    x2, delta2 = inputs(geom, seed=8)
    run_layer(layer, x2, delta2)
    _, rw1, _ = ref_grads(geom, x, layer.weight, None, delta)
    _, rw2, _ = ref_grads(geom, x2, layer.weight, None, delta2)
    close(layer.weight.grad, rw1 + rw2)
    assert torch.equal(layer.feedback_weight.grad, layer.weight.grad)


def _momentum_factors(lr, wd, mu, steps):
    """Scalar a_t with (W_t - B_t) = a_t (W_0 - B_0) under torch's SGD (Akrout eq. 8):
    the shared gradient cancels, leaving only decay and momentum acting on the difference."""
    a, buf, out = 1.0, None, [1.0]
    for _ in range(steps):
        g = wd * a
        buf = g if buf is None else mu * buf + g
        a = a - lr * (buf if mu else g)
        out.append(a)
    return out


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("geom", ["linear", "conv_s2_p1_g2"])
def test_kp_difference_decays_geometrically(geom, momentum):
    lr, wd, steps = 0.1, 0.5, 8
    layer = make_layer(geom, "kp", seed=11)
    stage = Stage([layer], OptimConfig(lr=lr, momentum=momentum, weight_decay=wd), first=False)
    d0 = (layer.weight - layer.feedback_weight).detach().clone()
    factors = _momentum_factors(lr, wd, momentum, steps)
    if momentum == 0:
        assert factors == pytest.approx([(1 - lr * wd) ** t for t in range(steps + 1)], rel=1e-14)
    w0 = layer.weight.detach().clone()
    for t in range(1, steps + 1):
        x, delta = inputs(geom, seed=20 + t)
        stage.forward(x)
        stage.backward(delta)
        assert torch.equal(layer.feedback_weight.grad, layer.weight.grad)
        stage.step(lr, wd)
        d = (layer.weight - layer.feedback_weight).detach()
        assert d.norm().item() / d0.norm().item() == pytest.approx(abs(factors[t]), rel=1e-9)
        close(d, factors[t] * d0, tol=1e-10)
    assert (layer.weight.detach() - w0).abs().max() > 1e-2  # W really moved


# ----------------------------------------------------------------------------- 5. weight mirror
@pytest.mark.parametrize("geom_kw", [
    dict(kind="linear", n_in=20, n_out=10),
    dict(kind="conv", c_in=4, c_out=6, k=3, stride=2, padding=1, dilation=1, groups=2),
    dict(kind="conv", c_in=3, c_out=4, k=3, stride=1, padding=2, dilation=2, groups=1),
], ids=["linear", "conv_s2_g2", "conv_dil2"])
def test_wm_mirror_steps_align_b_with_w(geom_kw):
    rule = make_rule("wm", mirror={"sigma": 1.0, "lr": 0.05, "batch": 128})
    assert rule.decay == pytest.approx(0.05)  # default lambda_m = eta_m * sigma^2
    g = geom_kw
    if g["kind"] == "linear":
        layer = LocalLinear(g["n_in"], g["n_out"], rule=rule, seed=12).to(DT)
    else:
        layer = LocalConv2d(g["c_in"], g["c_out"], g["k"], g["stride"], g["padding"],
                            g["dilation"], g["groups"], rule=rule, seed=12).to(DT)
    w0 = layer.weight.detach().clone()
    a0 = deg(layer.feedback_weight, w0)
    assert 60 < a0 < 120
    angles = [a0]
    for i in range(150):
        rule.mirror_step(layer)
        if i % 50 == 49:
            angles.append(deg(layer.feedback_weight, w0))
    assert torch.equal(layer.weight, w0)  # mirroring never writes W
    assert angles[1] < a0 - 30
    assert angles[-1] < 10, angles
    # the fixed point is B = W, norm included
    assert layer.feedback_weight.norm().item() == pytest.approx(w0.norm().item(), rel=0.15)


def test_wm_warmup_runs_on_a_fresh_start_and_other_rules_do_nothing():
    """`rule.on_start(executor)`: wm's warm-up (rule.mirror.warmup_steps) is exactly that
    many mirror steps of the whole network -- the same B as calling mirror_steps -- and it
    brings B towards W; a rule without a warm-up leaves every weight alone."""
    from localnet.config import Config
    import copy

    from localnet.runtime.testing import reference, state_diff

    def build(rule, warmup=None):
        d = {"seed": 3, "rule": {"name": rule}, "model": {"name": "mlp", "widths": [32]},
             "data": {"name": "synthetic"}}
        if warmup is not None:
            d["rule"]["mirror"] = {"warmup_steps": warmup}
        cfg = Config.model_validate(d)
        ex, model = reference(cfg, (1, 8, 8), 10)
        return cfg, ex, model

    cfg, ex, model = build("wm", warmup=40)
    _, ref, ref_model = build("wm", warmup=40)
    before = {k: v.clone() for k, v in model.state_dict().items() if "feedback" in k}
    assert before
    make_rule(cfg.rule.name, **cfg.rule.options()).on_start(ex)
    ref.mirror_steps(40)
    after, want = model.state_dict(), ref_model.state_dict()
    for k, b0 in before.items():
        assert torch.equal(after[k], want[k])
        w = after[k.replace("feedback_weight", "weight")]
        assert deg(after[k], w) < deg(b0, w) - 5
    cfg, ex, model = build("fa")
    s0 = copy.deepcopy(model.state_dict())
    make_rule(cfg.rule.name, **cfg.rule.options()).on_start(ex)
    assert state_diff(model.state_dict(), s0) == (0.0, [])


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_wm_mirror_estimate_is_sigma_squared_w(kind):
    """One step with decay 1 and lr 1 sets B to the estimate of E[y x^T] = sigma^2 W."""
    sigma = 0.5
    rule = make_rule("wm", mirror={"sigma": sigma, "lr": 1.0, "decay": 1.0,
                                   "batch": 40000 if kind == "linear" else 4000})
    if kind == "linear":
        layer = LocalLinear(6, 4, rule=rule, seed=13).to(DT)
    else:
        layer = LocalConv2d(4, 6, 3, 2, 1, 2, 2, rule=rule, seed=13).to(DT)
    w = layer.weight.detach().clone()
    rule.mirror_step(layer)
    b = layer.feedback_weight
    rel = ((b - sigma ** 2 * w).norm() / (sigma ** 2 * w).norm()).item()
    assert rel < 0.06
    # and it is sigma^2 W, not W or sigma W
    assert ((b - sigma * w).norm() / (sigma * w).norm()).item() > 0.3


# ----------------------------------------------------------------------------- 6. PFA
@pytest.mark.parametrize("mode", ["auto", "fused", "factored"])
@pytest.mark.parametrize("geom", ["linear", "linear_3d", "linear_nobias"])
def test_pfa_linear_error_and_r_gradient(geom, mode):
    layer = make_layer(geom, make_rule("pfa", r=3, mode=mode), seed=14)
    bp, r = layer.feedback_fixed, layer.feedback_plastic
    n_out, n_in = layer.weight.shape
    assert bp.shape == (n_out, 3 * n_out) and r.shape == (3 * n_out, n_in)
    assert "feedback_fixed" not in dict(layer.named_parameters())
    assert "feedback_plastic" in dict(layer.named_parameters())
    x, delta = inputs(geom, seed=9)
    _, gx, gw, _ = run_layer(layer, x, delta)
    close(gx, delta @ bp @ r.detach())          # R^T (B_p^T delta), two steps
    close(r.grad, bp.t() @ gw)                  # g_R = B_p^T g_W
    assert bp.grad is None


def assert_pfa_conv_two_step(layer, g, x, delta):
    """PFA at r = 2 sends R^T B_p^T delta and gives R the gradient B_p^T g_W (Li & Benna
    2024), both computed here the long way, apart from the layer's fused W_eff = B_p R."""
    bp, r = layer.feedback_fixed, layer.feedback_plastic
    c_out = layer.weight.shape[0]
    _, gx, gw, _ = run_layer(layer, x, delta)
    # first B_p^T delta: a transposed 1x1 conv (B_p as a kernel maps r*C_out -> C_out)
    d = F.conv_transpose2d(delta, bp.reshape(c_out, 2 * c_out, 1, 1))
    # then R^T d: the transposed conv by R, the layer's own geometry
    two_step = torch.nn.grad.conv2d_input(x.shape, r.detach(), d, g["stride"], g["padding"],
                                          g["dilation"], g["groups"])
    close(gx, two_step)
    close(r.grad, (bp.t() @ gw.flatten(1)).reshape(r.shape))


@pytest.mark.parametrize("geom", ["conv_s2_p1", "conv_dil2_p2", "conv_s2_p0_odd", "conv_1x1_s2"])
def test_pfa_conv_error_is_two_transposed_convs(geom):
    g = GEOMS[geom]
    layer = make_layer(geom, make_rule("pfa", r=2), seed=15)
    bp, r = layer.feedback_fixed, layer.feedback_plastic
    c_out = layer.weight.shape[0]
    assert bp.shape == (c_out, 2 * c_out) and r.shape == (2 * c_out, *layer.weight.shape[1:])
    assert_pfa_conv_two_step(layer, g, *inputs(geom, seed=10))


# Grouped convolutions: B_p is block-diagonal per group, so the fused W_eff = B_p R
# sends exactly the two-step R^T B_p^T delta (a 1x1 transposed conv, then a grouped one).
def test_pfa_grouped_conv_matches_two_step():
    geom = "conv_s2_p1_g2"
    g = GEOMS[geom]
    layer = make_layer(geom, make_rule("pfa", r=2), seed=16)
    bp = layer.feedback_fixed
    c_out = layer.weight.shape[0]
    x, delta = inputs(geom, seed=11)
    # B_p couples an output channel only to hidden channels of its own group
    n, h = c_out // g["groups"], 2 * c_out // g["groups"]
    mask = torch.block_diag(*[torch.ones(n, h, dtype=DT)] * g["groups"])
    assert not (bp * (1 - mask)).any()
    assert_pfa_conv_two_step(layer, g, x, delta)


def test_pfa_factored_mode_on_conv_agrees_with_fused():
    geom = "conv_dil2_p2"
    x, delta = inputs(geom, seed=12)
    out = []
    for mode in ("fused", "factored"):
        layer = make_layer(geom, make_rule("pfa", r=2, mode=mode), seed=17)
        _, gx, _, _ = run_layer(layer, x, delta)
        out.append((gx, layer.feedback_plastic.grad))
    close(out[0][0], out[1][0])
    close(out[0][1], out[1][1])


@pytest.mark.parametrize("kind", ["linear", "conv", "conv_groups4"])
def test_pfa_fixed_matrix_is_identity_on_average(kind):
    """Xavier-uniform with gain sqrt((1 + 1/r)/2) gives E[B_p B_p^T] = I (r = 10)."""
    acc = 0
    seeds = range(4)
    for s in seeds:
        if kind == "linear":
            layer = LocalLinear(3, 48, rule=make_rule("pfa", r=10), seed=s).to(DT)
        elif kind == "conv":
            layer = LocalConv2d(2, 48, 3, rule=make_rule("pfa", r=10), seed=s).to(DT)
        else:
            layer = LocalConv2d(4, 48, 3, groups=4, rule=make_rule("pfa", r=10), seed=s).to(DT)
        bp = layer.feedback_fixed
        assert bp.shape == (48, 480)
        acc = acc + bp @ bp.t()
    m = acc / len(seeds)
    assert m.diagonal().mean().item() == pytest.approx(1.0, abs=0.02)
    assert m.diagonal().min().item() > 0.8 and m.diagonal().max().item() < 1.2
    off = m - torch.diag(m.diagonal())
    assert off.abs().max().item() < 0.15
    assert off.abs().mean().item() < 0.04


@pytest.mark.parametrize("geom", ["linear", "conv_dil2_p2", "conv_s2_p0_odd", "conv_s2_p1_g2"])
def test_pfa_ortho_with_r_equal_bpt_w_reproduces_bp(geom):
    layer = make_layer(geom, make_rule("pfa", ortho=True), seed=18)
    bp = layer.feedback_fixed
    n = layer.weight.shape[0]
    assert bp.shape == (n, n)
    # B_p is drawn in float32 at build time: orthogonal to float32 precision
    close(bp @ bp.t(), torch.eye(n, dtype=DT), tol=1e-6)
    with torch.no_grad():
        layer.feedback_plastic.copy_((bp.t() @ layer.weight.flatten(1)).reshape(layer.weight.shape))
    x, delta = inputs(geom, seed=13)
    _, gx, gw, gb = run_layer(layer, x, delta)
    rx, rw, rb = ref_grads(geom, x, layer.weight, layer.bias, delta)
    close(gx, rx, tol=1e-6)  # W_eff = B_p B_p^T W = W up to B_p's float32 orthogonality
    close(gw, rw)
    if rb is not None:
        close(gb, rb)
    # and a random R (not B_p^T W) does not
    with torch.no_grad():
        layer.feedback_plastic.mul_(-1)
    layer.weight.grad = None
    _, gx2, _, _ = run_layer(layer, x, delta)
    assert (gx2 - rx).abs().max() > 1e-3


@pytest.mark.parametrize("geom", ["linear", "conv_dil2_p2"])
def test_pfa_r_tracks_bpt_w_under_sgd(geom):
    """g_R = B_p^T g_W and equal weight decay: R - B_p^T W shrinks by (1 - eta*lambda) per step."""
    lr, wd, steps = 0.1, 0.4, 5
    layer = make_layer(geom, make_rule("pfa", r=2), seed=19)
    stage = Stage([layer], OptimConfig(lr=lr, momentum=0.0, weight_decay=wd), first=False)
    bp = layer.feedback_fixed

    def gap():
        return (layer.feedback_plastic.flatten(1) - bp.t() @ layer.weight.flatten(1)).detach()

    g0 = gap()
    for t in range(1, steps + 1):
        x, delta = inputs(geom, seed=40 + t)
        stage.forward(x)
        stage.backward(delta)
        stage.step(lr, wd)
        close(gap(), (1 - lr * wd) ** t * g0, tol=1e-10)


def _two_step_error(geom, x, delta, bp, r):
    """R^T B_p^T delta, by autograd through a conv/linear with weight B_p R."""
    return ref_input_grad(geom, x, (bp @ r.detach().flatten(1)).view(bp.shape[0], *r.shape[1:]),
                          delta)


@pytest.mark.parametrize("geom", ["conv_s2_p1", "conv_s2_p1_g2"])
def test_pfa_micro_batches_form_w_eff_and_g_r_once_per_step(geom):
    """W_eff = B_p R is formed once per value of R and g_R once per step, from the summed
    g_W: every micro-batch still sends R^T B_p^T delta with the R of its forward, the
    step's g_R is B_p^T (sum of g_W), a backward that arrives after a step (async)
    counts in the next one, and zero_grad forgets what was collected."""
    lr = 0.5
    layer = make_layer(geom, make_rule("pfa", r=2), seed=23)
    stage = Stage([layer], OptimConfig(lr=lr, momentum=0.0, weight_decay=0.0), first=False)
    bp, r = layer.feedback_fixed, layer.feedback_plastic
    mbs = [inputs(geom, seed=60 + m) for m in range(3)]
    r0 = r.detach().clone()
    products = 0
    real_feedback = layer.rule.feedback

    def counting(lay):
        nonlocal products
        products += 1
        return real_feedback(lay)

    layer.rule.feedback = counting
    for m, (x, delta) in enumerate(mbs):
        stage.forward(x, m)
    for m, (x, delta) in enumerate(mbs):
        close(stage.backward(delta, m), _two_step_error(geom, x, delta, bp, r0))
    assert products == 1
    assert r.grad is None  # not yet: g_R waits for the step
    g_w = layer.weight.grad.clone()
    stage.step(lr, 0.0)
    close(r.detach(), r0 - lr * (bp.t() @ g_w.flatten(1)).view(r.shape))
    r1 = r.detach().clone()
    assert (r1 - r0).abs().max() > 1e-3

    # after the step the product is formed again, from the new R
    x, delta = mbs[0]
    stage.forward(x, 0)
    assert products == 2
    # ... and a forward from before the next step, backpropagated after it (async):
    # its error uses the R it was forwarded with, its g_W counts in the step after
    x1, delta1 = mbs[1]
    stage.forward(x1, 1)
    close(stage.backward(delta, 0), _two_step_error(geom, x, delta, bp, r1))
    g_w0 = layer.weight.grad.clone()
    stage.step(lr, 0.0)
    r2 = r.detach().clone()
    close(r2, r1 - lr * (bp.t() @ g_w0.flatten(1)).view(r.shape))
    close(stage.backward(delta1, 1), _two_step_error(geom, x1, delta1, bp, r1))
    g_w1 = layer.weight.grad.clone()
    stage.step(lr, 0.0)
    close(r.detach(), r2 - lr * (bp.t() @ g_w1.flatten(1)).view(r.shape))

    # zero_grad drops the collected g_W: the next step moves R by nothing from it
    stage.forward(x, 0)
    stage.backward(delta, 0)
    stage.zero_grad()
    r3 = r.detach().clone()
    stage.step(lr, 0.0)
    close(r.detach(), r3)

    # an in-place write to R (as load_state_dict does) is seen by the next forward
    stage.forward(x, 0)
    close(stage.backward(delta, 0), _two_step_error(geom, x, delta, bp, r3))
    with torch.no_grad():
        r.mul_(-1)
    stage.forward(x, 0)
    close(stage.backward(delta, 0), _two_step_error(geom, x, delta, bp, -r3))


# ----------------------------------------------------------------------------- 7. DFA
def _hook_taps(taps):
    """Record, per tap, the gradient arriving at its output and the one it passes down."""
    arriving, passed, inputs_, outputs = {}, {}, {}, {}

    def make(i):
        def fwd(_m, inp, out):
            inputs_[i], outputs[i] = inp[0], out
            inp[0].register_hook(lambda g: passed.__setitem__(i, g))
            out.register_hook(lambda g: arriving.__setitem__(i, g))
        return fwd

    handles = [t.register_forward_hook(make(i)) for i, t in enumerate(taps)]
    return arriving, passed, inputs_, outputs, handles


def test_dfa_mlp_follows_nokland_equations():
    from localnet.layers import ErrorTap
    from localnet.models import build_model

    model = build_model("mlp", make_rule("dfa"), (1, 4, 4), 3, widths=(8, 6)).to(DT)
    taps = [m for m in model.modules() if isinstance(m, ErrorTap)]
    assert len(taps) == 2
    arriving, passed, _, _, handles = _hook_taps(taps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 4, 4, generator=gen, dtype=DT).requires_grad_(True)
    e = torch.randn(5, 3, generator=gen, dtype=DT)
    logits = model(x)
    with output_error(e):
        logits.backward(e)
    for h in handles:
        h.remove()
    assert x.grad is None  # no error below the first rule layer

    l1, l2, head = model.units[0].linear, model.units[1].linear, model.units[2]
    d1, d2 = taps[0].projection, taps[1].projection
    assert d1.shape == (3, 8) and d2.shape == (3, 6)
    for i, d in enumerate((d1, d2)):
        close(passed[i], e @ d)  # the error at each hidden layer is D_l e
        # what arrived from above (nothing: the rule layer above sends no error) is ignored
        assert arriving.get(i) is None or not arriving[i].abs().any()
    # Nokland eq. 3 by hand: delta_l = (D_l e) o f'(a_l); dW_l = delta_l h_{l-1}^T
    with torch.no_grad():
        h0 = x.flatten(1)
        a1 = h0 @ l1.weight.t() + l1.bias
        h1 = a1.relu()
        a2 = h1 @ l2.weight.t() + l2.bias
        h2 = a2.relu()
        dl1 = (e @ d1) * (a1 > 0)
        dl2 = (e @ d2) * (a2 > 0)
    close(l1.weight.grad, dl1.t() @ h0)
    close(l1.bias.grad, dl1.sum(0))
    close(l2.weight.grad, dl2.t() @ h1)
    close(l2.bias.grad, dl2.sum(0))
    close(head.weight.grad, e.t() @ h2)  # the output layer gets e itself
    close(head.bias.grad, e.sum(0))


def test_dfa_without_output_error_refuses():
    from localnet.models import build_model

    model = build_model("mlp", make_rule("dfa"), (1, 4, 4), 3, widths=(8,))
    with pytest.raises(RuntimeError, match="output error"):
        model(torch.randn(2, 1, 4, 4)).sum().backward()


def test_dfa_resnet_taps_get_projected_error():
    from localnet.layers import ErrorTap
    from localnet.models import build_model

    model = build_model("resnet20", make_rule("dfa"), (3, 8, 8), 3, seed=1).to(DT)
    taps = [m for m in model.modules() if isinstance(m, ErrorTap)]
    assert len(taps) == 19  # one per ReLU: the stem and two per block
    arriving, passed, tin, tout, handles = _hook_taps(taps)
    block = model.units[1]  # layer1.0: identity shortcut
    cap = {}
    hb = block.register_forward_hook(lambda m, i, o: cap.update(x=i[0], y=o))
    hf = model.units[-1].fc.register_forward_hook(lambda m, i, o: cap.update(feat=i[0]))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=gen, dtype=DT).requires_grad_(True)
    e = torch.randn(4, 3, generator=gen, dtype=DT)
    logits = model(x)
    with output_error(e):
        logits.backward(e)
    for h in (*handles, hb, hf):
        h.remove()
    assert x.grad is None
    nonzero_arrivals = 0
    for i, t in enumerate(taps):
        n = math.prod(t.shape)
        assert t.projection.shape == (3, n)
        close(passed[i], (e @ t.projection).view(passed[i].shape))
        nonzero_arrivals += int(arriving.get(i) is not None and bool(arriving[i].abs().any()))
    # Shortcuts do carry the tap error of the block above into the tap below, which
    # discards it: without the discard, the checks above would fail.
    assert nonzero_arrivals > 0
    # D_l entries are N(0, 1/n): ||D_l e|| ~ ||e|| (checked on the widest taps)
    big = torch.cat([(t.projection * math.sqrt(math.prod(t.shape))).flatten() for t in taps])
    assert big.std().item() == pytest.approx(1.0, rel=0.05)
    assert big.mean().abs().item() < 0.05

    # conv weight gradients of one block, by plain autograd from the tap errors
    xb = cap["x"].detach()
    c1, c2 = block.conv1, block.conv2
    t1 = taps.index(c1.tap)
    tb = taps.index(block.tap)

    def bn(z, mod):
        return F.batch_norm(z, None, None, mod.weight.detach(), mod.bias.detach(), True, 0.0, mod.eps)

    w1 = c1.conv.weight.detach().clone().requires_grad_(True)
    h1 = bn(F.conv2d(xb, w1, None, 1, 1), c1.bn).relu()
    (h1 * (e @ taps[t1].projection).view_as(h1)).sum().backward()
    close(c1.conv.weight.grad, w1.grad, tol=1e-10)
    w2 = c2.conv.weight.detach().clone().requires_grad_(True)
    out = (bn(F.conv2d(h1.detach(), w2, None, 1, 1), c2.bn) + xb).relu()
    (out * (e @ taps[tb].projection).view_as(out)).sum().backward()
    close(c2.conv.weight.grad, w2.grad, tol=1e-10)
    # the head gets e itself
    close(model.units[-1].fc.weight.grad, e.t() @ cap["feat"].detach())


# ----------------------------------------------------------------------------- 8. locality
@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("geom", ["linear", "linear_3d", "conv_s2_p1_g2", "conv_dil2_p2"])
def test_corrupting_w_after_forward_changes_nothing_but_bp(rule, geom):
    """LocalOp keeps x and F, never W: a local rule's backward cannot read W."""
    x, delta = inputs(geom, seed=14)
    gen = torch.Generator().manual_seed(99)
    clean = make_layer(geom, rule, seed=21)
    clean_state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in clean.state_dict().items()}
    clean_params = [p.detach().clone() for p in clean.parameters()]
    results = []
    for corrupt in (False, True):
        layer = make_layer(geom, rule, seed=21)
        layer.load_state_dict(clean_state)  # both runs start from the very same state
        for a, b in zip(layer.parameters(), clean_params):
            assert torch.equal(a, b)
        xx = x.clone().requires_grad_(True)
        y = layer(xx)
        if corrupt:
            noise = torch.randn(layer.weight.shape, generator=gen, dtype=DT)
            layer.weight.data.mul_(-3).add_(noise)
        y.backward(delta)
        results.append((xx.grad, layer.weight.grad.clone()))
    (gx0, gw0), (gx1, gw1) = results
    assert torch.equal(gw0, gw1)  # dW = delta x^T never involves W
    if rule == "dfa":
        assert gx0 is None and gx1 is None
    elif rule == "bp":
        assert (gx0 - gx1).abs().max() > 1e-3  # BP reads W: the test can fail
    else:
        assert torch.equal(gx0, gx1)


# ----------------------------------------------------------------------------- misc
@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("geom", ["linear", "conv_s2_p1"])
def test_weight_alignment_reports_angle_to_the_rules_feedback(rule, geom):
    from localnet.alignment import weight_alignment

    layer = make_layer(geom, rule, seed=22)
    report = weight_alignment(torch.nn.Sequential(layer))
    if rule == "dfa":
        assert report == {}  # D_l is not W-shaped
        return
    fb = _expected_feedback(rule, layer)
    w = layer.weight.detach()
    assert report["0"]["angle"] == pytest.approx(deg(w, fb), abs=1e-6)
    assert report["0"]["norm_ratio"] == pytest.approx((fb.norm() / w.norm()).item(), rel=1e-9)
    if rule == "bp":
        assert report["0"]["angle"] < 1e-3
    else:
        assert report["0"]["angle"] > 10  # random feedback at init


def test_alignment_angle_matches_independent_formula():
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    assert lib_angle(a, b) == pytest.approx(deg(a, b), abs=1e-9)
    assert lib_angle(a, a) == pytest.approx(0.0, abs=1e-5)
    assert lib_angle(a, -a) == pytest.approx(180.0, abs=1e-5)


def test_unknown_rule_and_bad_options_rejected():
    with pytest.raises(ValueError, match="unknown rule"):
        make_rule("backprop")
    with pytest.raises(ValueError, match=r"rule\.r: .*greater than or equal to 1"):
        make_rule("pfa", r=0)
    with pytest.raises(ValueError, match=r"rule\.mode: "):
        make_rule("pfa", mode="sideways")
    with pytest.raises(ValueError, match=r"rule\.r: unknown key \(the options of rule 'fa': "
                                         r"feedback_gain\)"):
        make_rule("fa", r=3)


@pytest.mark.parametrize("rule", ["fa", "kp", "wm"])
def test_feedback_gain_scales_the_random_b_and_so_the_error_sent_down(rule):
    # B is Xavier-uniform x gain: same draw (same layer seed), scaled; bound gain*sqrt(3)*std
    base = make_layer("linear", make_rule(rule), seed=4)
    scaled = make_layer("linear", make_rule(rule, feedback_gain=0.5), seed=4)
    b, b2 = base.feedback_weight.detach(), scaled.feedback_weight.detach()
    close(b2, 0.5 * b)
    assert b.abs().max() <= math.sqrt(3) * xavier_c(b.shape) + 1e-12
    assert b.abs().max() > 0.9 * math.sqrt(3) * xavier_c(b.shape)  # uniform fills the bound
    x, delta = inputs("linear")
    _, gx, _, _ = run_layer(base, x, delta)
    _, gx2, _, _ = run_layer(scaled, x, delta)
    close(gx2, 0.5 * gx)
    from localnet.config import load_config
    assert load_config(None, [f"rule.name={rule}", "rule.feedback_gain=0.5"]).rule.options()["feedback_gain"] == 0.5


def test_channels_last_keeps_pfa_and_dfa_feedback_and_their_layout():
    """Under `train.memory_format: channels_last`, PFA's W_eff = B_p R and g_R = B_p^T g_W
    and DFA's D_l e are the row-major values, laid out channels-last like the conv
    tensors around them (a row-major one would put the conv off oneDNN's fast path)."""
    from localnet.rules.dfa import _Inject, output_error
    from localnet.rules.pfa import _times

    g = torch.Generator().manual_seed(0)
    b = torch.randn(6, 30, generator=g)
    r = torch.randn(30, 4, 3, 3, generator=g)
    cl = r.contiguous(memory_format=torch.channels_last)
    for m, t in ((b, r), (b.t().contiguous(), torch.randn(6, 4, 3, 3, generator=g))):
        want = (m @ t.flatten(1)).view(len(m), *t.shape[1:])
        got = _times(m, t.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(got, want, atol=1e-5)
        assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
        assert torch.equal(_times(m, t), want)
    assert torch.allclose(_times(b, cl), _times(b, r), atol=1e-5)

    proj = torch.randn(10, 4 * 5 * 6, generator=g)
    e = torch.randn(3, 10, generator=g)
    outs = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        h = torch.randn(3, 4, 5, 6, generator=g).contiguous(memory_format=fmt).requires_grad_()
        y = _Inject.apply(h, proj)
        with output_error(e):  # autograd.grad: the error as made, not re-laid like h
            outs.append(torch.autograd.grad(y, h, torch.zeros_like(y))[0])
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert torch.allclose(outs[0], (e @ proj).view(3, 4, 5, 6), atol=1e-5)
    assert outs[1].is_contiguous(memory_format=torch.channels_last)
