"""`recut`: a checkpoint's stage states dealt out to stages cut elsewhere."""

from __future__ import annotations

import pytest
import torch

from localnet.builders import build_rule_and_model, optim_config
from localnet.config import ConfigError, load_config
from localnet.recut import recut, unit_params
from localnet.stage import Stage


def _model(seed: int):
    cfg = load_config(None, ["data.name=synthetic", "model.name=mlp", "model.widths=[8,8,8]",
                             "rule.name=kp", f"seed={seed}"])
    torch.manual_seed(seed)
    return cfg, build_rule_and_model(cfg, (16,), 3)[1]


def _stages(cfg, model, cuts):
    units, names = list(model.units), model.unit_names
    return [Stage(units[a:b], optim_config(cfg), first=(i == 0), names=names[a:b])
            for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]


def _by_name(model, stages, cuts) -> dict:
    """Each parameter's momentum, keyed by its name in the whole model: the truth the
    re-cut must keep, whatever position a stage's optimizer gives it."""
    ids = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for s in stages:
        for p in s.opt.param_groups[0]["params"]:
            out[ids[id(p)]] = s.opt.state[p]["momentum_buffer"].clone()
    return out


def test_every_parameter_keeps_its_tensors_and_its_momentum_under_a_new_cut():
    cfg, model = _model(1)
    old = [0, 1, 3, 4]
    stages = _stages(cfg, model, old)
    gen = torch.Generator().manual_seed(7)
    for s in stages:  # a distinct gradient for every parameter: its momentum after a step
        for p in s.opt.param_groups[0]["params"]:
            p.grad = torch.randn(p.shape, generator=gen)
        s.step(0.1, 1e-3)
        s.steps = 5
    want_mom, want_state = _by_name(model, stages, old), model.state_dict()

    cfg2, fresh = _model(2)  # other initial weights: everything must come from the states
    new = [0, 2, 4]
    into = _stages(cfg2, fresh, new)
    states = recut([s.state_dict() for s in stages], old, new, unit_params(fresh.units))
    assert [st["units"] for st in states] == [[0, 2], [2, 4]]
    for s, st in zip(into, states):
        s.load_state_dict(st)
    got = fresh.state_dict()
    assert got.keys() == want_state.keys()
    for k, v in want_state.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(got[k], v), k
    got_mom = _by_name(fresh, into, new)
    assert got_mom.keys() == want_mom.keys() and len(want_mom) >= 8
    for n, m in want_mom.items():
        assert torch.equal(got_mom[n], m), n
    assert {s.steps for s in into} == {5}


def test_stages_out_of_step_or_another_model_are_refused():
    cfg, model = _model(1)
    stages = _stages(cfg, model, [0, 2, 4])
    states = [s.state_dict() for s in stages]
    params = unit_params(model.units)
    states[1]["steps"] = 3
    with pytest.raises(ConfigError, match=r"stepped \[0, 3\] times"):
        recut(states, [0, 2, 4], [0, 4], params)
    states[1]["steps"] = 0
    with pytest.raises(ConfigError, match="does not fit this model's 4 units"):
        recut(states, [0, 2, 5], [0, 4], params)
    with pytest.raises(ConfigError, match=r"units \[0, 2\) optimizes 6 parameters, where this model's have 3"):
        recut(states, [0, 2, 4], [0, 4], params[:1] + [[]] + params[2:])
