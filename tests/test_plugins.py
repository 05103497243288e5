"""A rule, a codec and a schedule added from this file alone -- no source file touched --
run in-process and in the local runtime, each checked against what its maths must give."""

import pytest
import torch

from localnet.channels.codecs import CODECS, Codec
from localnet.config import ConfigError, load_config
from localnet.layers import LocalLinear
from localnet.registry import NoOptions
from localnet.rules import RULES, Rule
from localnet.runtime.ray_executor import RayExecutor
from localnet.runtime.testing import batches, reference, state_diff
from localnet.schedules import SCHEDULES, STEP, B, F, PipelineSchedule, make_schedule, simulate

SHAPE, NC = (1, 8, 8), 10
pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture
def toys():
    """Defined inside a fixture, so they are registered only while a test here runs."""

    class ScaledBackprop(Rule):
        """Backprop whose error is scaled on the way down: F = scale * W."""

        name = "toy_scaled_bp"
        transports_weights = True

        class Options(NoOptions):
            scale: float = 0.5

        def feedback(self, layer):
            return self.options.scale * layer.weight

    class Doubled(Codec):
        """Sends factor * x; the receiver divides it out (a power of two: exact)."""

        name = "toy_doubled"
        decoded = 0

        class Options(NoOptions):
            factor: float = 2.0

        def encode(self, x, rng=None):
            return self._enc(x, {"x": x.detach().float() * self.options.factor})

        def decode(self, enc):
            type(self).decoded += 1
            return (enc.payload["x"] / self.options.factor).to(enc.dtype)

    class ReversedGPipe(PipelineSchedule):
        """GPipe with the backwards in descending micro-batch order (`reverse`)."""

        name = "toy_reversed"

        class Options(NoOptions):
            reverse: bool = True

        def stages(self, S, M, graph):
            order = list(reversed(range(M)) if self.options.reverse else range(M))
            return [[F(m) for m in range(M)] + [B(m) for m in order] + [STEP]
                    for _ in range(S)]

    yield ScaledBackprop, Doubled, ReversedGPipe
    RULES.discard(ScaledBackprop.name)
    CODECS.discard(Doubled.name)
    SCHEDULES.discard(ReversedGPipe.name)


def _cfg(*sets):
    return load_config(None, ["seed=3", "model.name=mlp", "model.widths=[16,16]",
                              "train.batch_size=16", "train.micro_batches=4",
                              "train.momentum=0", "runtime.executor=ray", *sets])


def _step(ex, steps=1):
    for x, y in batches(steps, 16, SHAPE, NC, seed=1):
        ex.train_step(x, y, 0.05, 0.0)


def test_a_toy_rule_scales_each_layers_update_by_scale_per_layer_above(toys):
    """One SGD step (no momentum, no decay): the top layer's update is BP's; a layer k
    layers below gets scale^k times BP's, since its error went through k feedback
    matrices scale * W (and the same ReLU masks: the forward pass is BP's)."""
    ups = {}
    for rule in ("bp", "toy_scaled_bp"):
        ex, model = reference(_cfg(f"rule.name={rule}"), SHAPE, NC)
        layers = [m for m in model.modules() if isinstance(m, LocalLinear)]
        w0 = [m.weight.detach().clone() for m in layers]
        _step(ex)
        ups[rule] = [m.weight.detach() - w for m, w in zip(layers, w0)]
    n = len(ups["bp"])
    for i, (bp, toy) in enumerate(zip(ups["bp"], ups["toy_scaled_bp"])):
        assert bp.abs().max() > 0
        torch.testing.assert_close(toy, 0.5 ** (n - 1 - i) * bp, rtol=1e-5, atol=1e-7)
    # its options are checked like any rule's, by the model it declared
    assert load_config(None, ["rule.name=toy_scaled_bp", "rule.scale=0.25"]).rule.options() \
        == {"scale": 0.25}
    with pytest.raises(ConfigError, match=r"rule\.r: unknown key \(the options of rule "
                                          r"'toy_scaled_bp': scale\)"):
        load_config(None, ["rule.name=toy_scaled_bp", "rule.r=2"])


@pytest.mark.parametrize("schedule", ["gpipe", "toy_reversed"])
def test_a_toy_rule_and_schedule_in_the_local_runtime_match_in_process(toys, schedule):
    cfg = _cfg("rule.name=toy_scaled_bp", f"runtime.schedule={schedule}")
    ref, model = reference(cfg, SHAPE, NC)
    ex = RayExecutor(cfg, SHAPE, NC, local=True)
    assert ex.runtime_info()["schedule"] == schedule
    _step(ref, 4)
    _step(ex, 4)
    worst, rng = state_diff(model.state_dict(), ex.model_state_dict())
    assert worst < 1e-5 and not rng


def test_a_toy_schedule_is_data_the_simulator_runs(toys):
    sched = make_schedule("toy_reversed", 3, 4)
    assert sched.stages[0] == [F(0), F(1), F(2), F(3), B(3), B(2), B(1), B(0), STEP]
    res = simulate(sched, 1.0, 1.0)
    assert res.makespan == pytest.approx(simulate(make_schedule("gpipe", 3, 4), 1.0, 1.0).makespan)
    with pytest.raises(ConfigError, match="runtime.schedule.name: unknown schedule 'nope'"):
        load_config(None, ["runtime.schedule=nope"])


def test_a_schedules_options_sit_beside_its_name(toys):
    """`runtime.schedule: NAME` is short for {name: NAME}; options go beside it, checked
    against the schedule's Options, and reach the lists the actors run."""
    rt = load_config(None, ["runtime.schedule=toy_reversed",
                            "runtime.schedule.reverse=false"]).runtime
    assert (rt.schedule.name, rt.schedule.options()) == ("toy_reversed", {"reverse": False})
    ex = RayExecutor(_cfg("runtime.schedule={name: toy_reversed, reverse: false}"), SHAPE, NC,
                     local=True)
    assert ex._schedule(ex.schedule_name, 4).stages[0][4:8] == [B(0), B(1), B(2), B(3)]
    # a config's bare name takes a new name and that schedule's options by key
    rt = load_config(None, ["runtime.schedule=1f1b", "runtime.schedule.name=async",
                            "runtime.schedule.ahead=0"]).runtime
    assert (rt.schedule.name, rt.schedule.options()) == ("async", {"ahead": 0})
    with pytest.raises(ConfigError, match=r"runtime\.schedule\.ahead: .*less than or equal to 1"):
        load_config(None, ["runtime.schedule=async", "runtime.schedule.ahead=2"])
    with pytest.raises(ConfigError, match=r"runtime\.schedule\.k: unknown key \(the options "
                                          r"of schedule 'toy_reversed': reverse\)"):
        load_config(None, ["runtime.schedule=toy_reversed", "runtime.schedule.k=1"])


@pytest.mark.parametrize("executor", ["inprocess", "local"])
def test_a_toy_codec_decodes_exactly_on_every_executor(toys, tmp_path, executor):
    """factor * x / factor is x exactly, so a run through the toy codec ends exactly
    where the same run through fp32 does -- and its summary names the codec."""
    from localnet.train import train

    _, Doubled, _ = toys
    base = ["data.name=synthetic", "data.subset=64", "data.test_subset=32", "model.name=mlp",
            "model.widths=[16]", "train.batch_size=16", "train.micro_batches=2",
            "rule.name=fa", f"runtime.executor={executor}", "channel.enabled=true"]
    plain = train(load_config(None, base), tmp_path / "fp32", progress=False)
    Doubled.decoded = 0
    toy = train(load_config(None, [*base, "channel.error.codec=toy_doubled",
                                   "channel.error.factor=4"]), tmp_path / "toy", progress=False)
    assert Doubled.decoded >= 4  # every error message of the 4 steps went through it
    assert toy["test_loss"] == plain["test_loss"] and toy["train_loss"] == plain["train_loss"]
    codecs = {e["codec"] for e in toy["channels"]["error"].values()}
    assert codecs == {"toy_doubled"}
    with pytest.raises(ConfigError, match=r"channel\.error\.k: unknown key \(the options of "
                                          r"codec 'toy_doubled': factor\)"):
        load_config(None, [*base, "channel.error.codec=toy_doubled", "channel.error.k=0.1"])
