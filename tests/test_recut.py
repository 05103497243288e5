"""`recut`: a checkpoint's stage states dealt out to stages cut elsewhere."""

from __future__ import annotations

import pytest
import torch

from localnet.builders import build_rule_and_model, optim_config
from localnet.config import ConfigError, load_config
from localnet.recut import recut
from localnet.stage import NodeStage, Stage


def _model(seed: int, name="resnet8", rule="kp"):
    cfg = load_config(None, ["data.name=synthetic", f"model.name={name}", f"rule.name={rule}",
                             f"seed={seed}"])
    torch.manual_seed(seed)
    shape = (16,) if name == "mlp" else (3, 8, 8)
    return cfg, build_rule_and_model(cfg, shape, 3)[1]


def _units(cuts):
    return [("units", a, b) for a, b in zip(cuts, cuts[1:])]


def _stages(cfg, model, members):
    """Stages as the executors build them: a group of whole units (a `Stage`), or one
    node of the layer graph (a `NodeStage`, as a per_layer actor)."""
    units, names = list(model.units), model.unit_names
    graph = {n.name: n for n in model.layer_graph()}
    out = []
    for i, m in enumerate(members):
        if m[0] == "units":
            out.append(Stage(units[m[1]:m[2]], optim_config(cfg), first=(i == 0),
                             names=names[m[1]:m[2]]))
        else:
            node = graph[m[1]]
            out.append(NodeStage([node.module], optim_config(cfg), [node.unit_name],
                                 grad_inputs=[i > 0] * len(node.inputs)))
    return out


def _momenta(model, stages) -> dict:
    """Each parameter's momentum, keyed by its name in the whole model: the truth the
    re-cut must keep, whatever position a stage's optimizer gives it."""
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: s.opt.state[p]["momentum_buffer"].clone()
            for s in stages if s.opt for p in s.opt.param_groups[0]["params"]}


def _same(model, stages, want_state, want_mom) -> None:
    got = model.state_dict()
    assert got.keys() == want_state.keys()
    for k, v in want_state.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(got[k], v), k
    mom = _momenta(model, stages)
    assert mom.keys() == want_mom.keys()
    for n, m in want_mom.items():
        assert torch.equal(mom[n], m), n


def test_every_tensor_and_momentum_goes_to_its_unit_and_layer_whatever_the_cut():
    """Units in two stages -> one actor per layer of the layer graph -> one stage: each
    parameter ends with its own weights and momentum (by name in the whole model), BN's
    running statistics and every layer's RNG too, though each model started from other
    random weights."""
    cfg, model = _model(1)
    n = len(model.units)
    first = _units([0, 2, n])
    stages = _stages(cfg, model, first)
    gen = torch.Generator().manual_seed(7)
    for s in stages:  # a distinct gradient for every parameter: its momentum after a step
        for p in s.opt.param_groups[0]["params"]:
            p.grad = torch.randn(p.shape, generator=gen)
        s.step(0.1, 1e-3)
        s.steps = 5
        for b in s.module.buffers():  # running statistics too
            if b.is_floating_point():
                b.add_(torch.randn(b.shape, generator=gen))
    want_state, want_mom = model.state_dict(), _momenta(model, stages)
    assert len(want_mom) > 3 * n

    _, layered = _model(2)
    nodes = [("node", nd.name) for nd in layered.layer_graph()]
    assert len(nodes) > n  # residual blocks split into their layers
    into = _stages(cfg, layered, nodes)
    states = recut([s.state_dict() for s in stages], first, nodes, layered)
    assert [st["node"] for st in states] == [m[1] for m in nodes]
    for s, st in zip(into, states):
        s.load_state_dict(st)
    _same(layered, into, want_state, want_mom)

    _, whole = _model(3)
    one = _stages(cfg, whole, _units([0, n]))
    (st,) = recut([s.state_dict() for s in into], nodes, _units([0, n]), whole)
    assert st["units"] == [0, n] and st["steps"] == 5
    one[0].load_state_dict(st)
    _same(whole, one, want_state, want_mom)


def test_what_does_not_fit_is_refused_naming_why():
    cfg, model = _model(1, "mlp", "kp")
    n = len(model.units)
    stages = _stages(cfg, model, _units([0, 2, n]))
    states = [s.state_dict() for s in stages]
    states[1]["steps"] = 3
    with pytest.raises(ConfigError, match=r"stepped \[0, 3\] times"):
        recut(states, _units([0, 2, n]), _units([0, n]), model)
    states[1]["steps"] = 0
    with pytest.raises(ConfigError, match=rf"do not fit this model's {n} units"):
        recut(states, _units([0, 2, n + 1]), _units([0, n]), model)
    _, fa = _model(1, "mlp", "fa")  # FA does not learn its feedback weights: fewer parameters
    with pytest.raises(ConfigError, match=r"stage of units \[0, 2\) optimizes 6 parameters, "
                                          r"where this model's have 4"):
        recut(states, _units([0, 2, n]), _units([0, n]), fa)
    states[0]["channels"] = {"links": {}, "dfa": []}
    with pytest.raises(ConfigError, match="has communication channels"):
        recut(states, _units([0, 2, n]), _units([0, n]), model)
