"""The runtime's pieces without Ray: ledger, partition, plan, and the schedule
interpreter driving plain StageWorker objects in this process (`local=True`)."""

import json
import os
import sys

import pytest
import torch

from localnet.config import Config, RuntimeConfig
from localnet.ledger import Ledger
from localnet.runtime.messages import Control, MessageError
from localnet.runtime.partition import balanced_boundaries, resolve_partition
from localnet.runtime.plan import simulate_config
from localnet.runtime.ray_executor import RayExecutor
from localnet.runtime.testing import batches, codec_on_every_edge, reference, state_diff
from localnet.runtime.worker import StageWorker

MLP = {"model": {"name": "mlp", "widths": [16, 16]}, "data": {"name": "synthetic"}}
SHAPE, NC = (1, 8, 8), 10
RESNET8 = {"model": {"name": "resnet8"}, "data": {"name": "synthetic"}}


def cfg_for(rule, schedule="gpipe", model=None, partition="per_unit", M=4, bs=16, **train):
    d = {"seed": 3, "rule": {"name": rule}, **(model or MLP),
         "train": {"batch_size": bs, "micro_batches": M, "lr": 0.05, "weight_decay": 1e-3, **train},
         "runtime": {"executor": "ray", "schedule": schedule, "partition": partition}}
    return Config.model_validate(d)


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def run_both(cfg, shape, nc, steps, bs, **kw):
    ref, model = reference(cfg, shape, nc)
    ex = RayExecutor(cfg, shape, nc, local=True, **kw)
    if cfg.rule.name == "wm":
        ref.mirror_steps(3)
        ex.mirror_steps(3)
    for x, y in batches(steps, bs, shape, nc, seed=1):
        a, b = ref.train_step(x, y, 0.05, 1e-3), ex.train_step(x, y, 0.05, 1e-3)
        assert (a.correct, a.samples) == (b.correct, b.samples)
        assert b.loss_sum == pytest.approx(a.loss_sum, rel=1e-5, abs=1e-5)
    return ref, model, ex


# ---------------------------------------------------------------------------- interpreter
@pytest.mark.parametrize("rule", ["bp", "fa", "dfa", "usf", "brsf", "frsf", "kp", "wm", "pfa"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_local_interpreter_matches_inprocess_mlp(rule, schedule):
    ref, model, ex = run_both(cfg_for(rule, schedule), SHAPE, NC, steps=8, bs=16)
    worst, rng = state_diff(model.state_dict(), ex.model_state_dict())
    assert worst < 1e-5 and not rng
    assert ex.alignment().keys() == ref.alignment().keys()


@pytest.mark.parametrize("rule, schedule, partition", [
    ("dfa", "1f1b", "per_unit"),            # skip paths: each block's tap discards the chain
    ("pfa", "gpipe", {"stages": 3}),
    ("bp", "1f1b", [2, 5]),
])
def test_local_interpreter_matches_inprocess_resnet(rule, schedule, partition):
    cfg = cfg_for(rule, schedule, {"model": {"name": "resnet20"}}, partition, M=2, bs=8)
    ref, model, ex = run_both(cfg, (3, 8, 8), NC, steps=3, bs=8)
    worst, rng = state_diff(model.state_dict(), ex.model_state_dict())
    assert worst < 1e-5 and not rng
    loader = batches(2, 8, (3, 8, 8), NC, seed=9)
    assert ex.evaluate(loader) == pytest.approx(ref.evaluate(loader), rel=1e-5)


def test_evaluation_goes_through_the_actors_in_training_sized_micro_batches():
    """An actor keeps the largest buffers it ever held (alloc.py), so a whole evaluation
    batch per message would grow every actor by that batch's activations: the driver
    cuts each one into pieces of training's micro-batch size.  Same loss and accuracy."""
    cfg = cfg_for("pfa", "1f1b")  # micro-batches of 16 / 4 = 4 samples
    ref, model, ex = run_both(cfg, SHAPE, NC, steps=2, bs=16)
    ex.reset_ledger()
    loader = batches(2, 10, SHAPE, NC, seed=4)  # 10 samples: pieces of 4, 4, 2
    assert ex.evaluate(loader) == pytest.approx(ref.evaluate(loader), rel=1e-5)
    rows = ex.ledger().rows
    assert rows[("driver", "stage0", "activation")][0] == 2 * 3
    assert rows[("driver", f"stage{ex.num_stages - 1}", "target")][0] == 2 * 3


def test_local_bp_angles_state_and_eval():
    cfg = cfg_for("fa", "1f1b")
    ref, model, ex = run_both(cfg, SHAPE, NC, steps=2, bs=16)
    x, y = batches(1, 16, SHAPE, NC, seed=5)[0]
    a, b = ref.bp_update_angles(x, y), ex.bp_update_angles(x, y)
    assert a.keys() == b.keys() and all(b[k] == pytest.approx(a[k], abs=1e-3) for k in a)
    st = ex.state_dict()
    assert [s["units"] for s in st["stages"]] == [[0, 1], [1, 2], [2, 3]]
    ex2 = RayExecutor(cfg, SHAPE, NC, local=True)
    ex2.load_state_dict(st)
    assert state_diff(ex.model_state_dict(), ex2.model_state_dict()) == (0.0, [])
    bad = RayExecutor(cfg_for("fa", partition=[2]), SHAPE, NC, local=True)
    with pytest.raises(ValueError, match="runtime.partition that wrote it"):
        bad.load_state_dict(st)


def _spec(cfg, pl, **common):
    """Actor 0's setup spec, as the coordinator makes it."""
    from localnet.builders import build_rule_and_model
    from localnet.runtime.worker import worker_specs

    model = build_rule_and_model(Config.model_validate(cfg) if isinstance(cfg, dict) else cfg,
                                 SHAPE, NC)[1]
    return worker_specs(cfg, pl, model, SHAPE, NC, **common)[0]


@pytest.mark.parametrize("rule, model, partition, shape", [
    ("pfa", RESNET8, "per_layer", (3, 8, 8)),
    ("dfa", RESNET8, "per_unit", (3, 8, 8)),
    ("brsf", {"model": {"name": "resnet18"}, "data": {"name": "synthetic"}}, "per_layer",
     (3, 16, 16)),
    ("wm", None, {"stages": 2}, SHAPE),
])
def test_each_actor_builds_only_its_units_with_the_whole_models_weights(rule, model, partition,
                                                                       shape):
    """An actor builds its own units only (layers.py: seeds per layer), and starts from
    exactly the weights, feedback weights, buffers and layer RNGs that the whole model
    gives those units."""
    from localnet.builders import build_rule_and_model
    from localnet.models.base import Absent
    from localnet.runtime.partition import resolve_placement
    from localnet.runtime.worker import worker_specs

    cfg = Config.model_validate(cfg_for(rule, model=model, partition=partition))
    whole = build_rule_and_model(cfg, shape, NC)[1]
    pl = resolve_placement(cfg.runtime.partition, whole, None)
    specs = worker_specs(cfg, pl, whole, shape, NC, threads=0)
    built, compared = set(), 0
    for spec in specs:
        _, part = build_rule_and_model(cfg, shape, NC, units=spec["units"],
                                       unit_shapes=spec["unit_shapes"])
        absent = {u for u, m in enumerate(part.units) if isinstance(m, Absent)}
        assert absent == set(range(len(whole.units))) - set(spec["units"])
        built |= set(spec["units"])
        lean = StageWorker(spec, threads=0).stage.module.state_dict()
        full = StageWorker(spec, threads=0,
                           model=build_rule_and_model(cfg, shape, NC)[1]).stage.module.state_dict()
        worst, rng = state_diff(lean, full)
        assert worst == 0 and not rng, (spec["index"], worst, rng)
        compared += len(lean)
    assert built == set(range(len(whole.units)))
    assert compared == len(whole.state_dict())  # every tensor, feedback and RNG compared


def test_dfa_needs_stage_boundaries_at_taps():
    from localnet.runtime.graph import Placement

    pl = Placement("units", [[0, 1], [1, 3]], [["fc1"], ["fc2", "head"]], [[-1], [0]])
    spec = _spec(cfg_for("dfa"), pl, threads=0)
    StageWorker(spec, threads=0)  # fc1 ends with its error tap: fine

    class NoTap(StageWorker):
        def _ends_with_tap(self):
            return False
    with pytest.raises(ValueError, match="after an error tap"):
        NoTap(spec, threads=0)


def test_worker_rejects_bad_messages_in_process():
    """Each actor validates what arrives over the data plane; a failure poisons the
    actor until the coordinator resets it, so a later call -- an update included --
    never runs on half a batch."""
    from localnet.runtime.messages import Message

    ex = RayExecutor(cfg_for("fa", partition=[1]), SHAPE, NC, local=True)
    w0, w1 = (w._obj for w in ex.workers)
    x = Message.make("activation", torch.randn(4, *SHAPE), src="driver", dst="stage0", step=1, mb=0)
    y = Message.make("target", torch.zeros(4, dtype=torch.int64), src="driver", dst="stage1",
                     step=1, mb=0)
    w0.run([("F", 1, 0)], inputs={(1, 0): list(x.wire())})   # sent to stage1 over the plane
    assert w1.plane.ready(0)
    w1.plane.recv(0)                                          # (dropped)
    w0.plane.send(1, *x.wire())   # the driver's message, arriving on the edge from stage0
    with pytest.raises(MessageError, match="expected a message from stage0") as info:
        w1.run([("F", 1, 0)], targets={(1, 0): list(y.wire())})
    assert "step 1" in str(info.value) and info.value.edge == "driver->stage1"
    with pytest.raises(MessageError, match="already in flight"):
        w0.run([("F", 1, 0)], inputs={(1, 0): list(x.wire())})
    with pytest.raises(MessageError, match="already in flight"):  # poisoned until reset
        w0.run([("S", 1, 0.1, 0.0)])
    step = Control("step", src="driver", dst="stage1", step=1, args={"lr": 0.1, "wd": 0.0})
    with pytest.raises(MessageError, match="expected a message from stage0"):
        w1.control(step.encode())
    w1.reset()  # what the coordinator does after a failed batch: the worker runs again
    with pytest.raises(RuntimeError, match="without its forward"):
        w1.run([("B", 1, 5)])
    w1.reset()
    w1.control(step.encode())


# ---------------------------------------------------------------------------- ledger
def test_ledger_merge_and_summary():
    a, b = Ledger(), Ledger()
    a.record("stage0", "stage1", "activation", 100, 4000)
    a.record("stage1", "stage0", "error", 90, 4000)
    b.record("stage0", "stage1", "activation", 100, 4000)
    b.record("driver", "stage0", "control", 60)
    m = Ledger.merged([a, b.to_dict()])
    s = m.as_summary()
    assert s["activation"] == {"count": 2, "bytes": 8200, "header_bytes": 200, "payload_bytes": 8000}
    assert s["error"]["bytes"] == 4090 and s["control"]["count"] == 1
    assert s["total_bytes"] == 8200 + 4090 + 60 and s["parameter_bytes"] == 0
    assert m.edges()["stage0->stage1"]["activation"]["count"] == 2
    assert Ledger.from_dict(m.to_dict()).as_summary() == s


def test_crowding_counts_cores_per_machine_and_only_cpu_actors():
    """More CPU actors than their machines' cores is what `localnet run` warns about;
    Ray nodes on one machine share its cores, GPU actors do not compute on them."""
    from types import SimpleNamespace

    from localnet.runtime.executor_state import StateMixin

    def crowding(hosts, devices=None, local=False):
        info = [{"host": h, "host_cores": c, "device": d}
                for (h, c), d in zip(hosts, devices or ["cpu"] * len(hosts))]
        return StateMixin.crowding(SimpleNamespace(local=local, stage_info=info))

    assert crowding([("box", 2)] * 11) == (11, 2)
    assert crowding([("a", 2)] * 5 + [("b", 4)] * 6) == (11, 6)  # two machines' cores
    assert crowding([("a", 8)] * 5 + [("b", 8)] * 6) is None
    assert crowding([("box", 2)] * 3, ["cuda:0", "cuda:0", "cpu"]) is None  # one CPU actor
    assert crowding([("box", 2)] * 3, ["cuda:0", "cpu", "cpu"]) is None
    assert crowding([("box", 2)] * 11, local=True) is None  # one process: no messages


def test_gpu_sharing_counts_actors_per_gpu_by_its_identity():
    """Actors on one GPU (by UUID: `cuda:0` names a different GPU on each machine) are
    what `localnet run` advises against; one actor per GPU, or CPU actors, are not."""
    from types import SimpleNamespace

    from localnet.runtime.executor_state import StateMixin

    def sharing(gpus, local=False):
        info = [{"gpu": g, "device": "cuda" if g else "cpu"} for g in gpus]
        return StateMixin.gpu_sharing(SimpleNamespace(local=local, stage_info=info))

    assert sharing(["GPU-a"] * 11) == (11, 1)
    assert sharing(["GPU-a", "GPU-a", "GPU-b", None]) == (3, 2)
    assert sharing(["GPU-a", "GPU-b", "GPU-c"]) is None  # one each, on any machines
    assert sharing([None] * 11) is None
    assert sharing(["GPU-a"] * 2, local=True) is None


# ---------------------------------------------------------------------------- partition / plan
def test_partition():
    assert resolve_partition("per_unit", 4) == [1, 2, 3]
    assert resolve_partition([1, 3], 4) == [1, 3]
    assert resolve_partition({"stages": 2}, 4, [10, 1, 1, 8]) == [1]
    assert resolve_partition({"stages": 2, "balance": "cost"}, 4, None, lambda: [1, 1, 1, 3]) == [3]
    assert balanced_boundaries([1] * 6, 3) == [2, 4]
    with pytest.raises(ValueError, match="within 1..3"):
        resolve_partition([4], 4)
    with pytest.raises(ValueError, match="exceeds"):
        resolve_partition({"stages": 5}, 4, [1] * 4)


def test_simulate_config_given_and_measured_costs():
    cfg = cfg_for("fa", "gpipe")
    plan = simulate_config(cfg, SHAPE, NC, fwd=[1, 1, 1], bwd=[1, 1, 1])
    assert plan["stages"] == 3 and plan["bubble_fraction"] == pytest.approx(2 / 6)
    assert plan["samples_per_s"] == pytest.approx(16 / 12)
    # every message between actors costs its receiver 0.5 s of CPU (the data plane's
    # hop cost): F on stages 1 and 2 and B on stages 0 and 1 take 1.5 s, stage 2's B
    # (its own error) 1 s.  Stage 0 forwards in [0, 4], stage 1 in [1, 7]; the last
    # stage's F(m) B(m) pairs run [2.5, 5], [5, 7.5], [7.5, 10], [10, 12.5]; stage 1's
    # backwards follow them, ending at 14, and stage 0's B(3) runs [14, 15.5]
    plan = simulate_config(cfg, SHAPE, NC, fwd=[1, 1, 1], bwd=[1, 1, 1], hop_cost=0.5)
    assert plan["makespan_s"] == pytest.approx(15.5)
    # the same, from the payloads' size: fc1 and fc2 send 4 x 16 floats (256 bytes) up,
    # and the errors coming back down have those shapes too, so at 0.5 s per 256 bytes
    # every message costs 0.5 s again (the head's 4 x 10 logits never cross)
    assert plan["payload_bytes"] == [256, 256, 160]
    per_mib = 0.5 * 2**20 / 256
    plan = simulate_config(cfg, SHAPE, NC, fwd=[1, 1, 1], bwd=[1, 1, 1], hop_cost_per_mib=per_mib)
    assert plan["makespan_s"] == pytest.approx(15.5)
    # the coordinator's: one per actor per call, and each call carries two batches
    assert plan["calls_per_batch"] == 1.5 and plan["batches_per_call"] == 2
    plan = simulate_config(cfg, SHAPE, NC, fwd=[1, 1, 1], bwd=[1, 1, 1], call_cost=0.25)
    assert plan["makespan_s"] == pytest.approx(12 + 3 * 0.125)  # half per batch, along the fill
    one = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"batches_per_call": 1})})
    plan = simulate_config(one, SHAPE, NC, fwd=[1, 1, 1], bwd=[1, 1, 1], call_cost=0.25)
    assert plan["makespan_s"] == pytest.approx(12 + 3 * 0.25) and plan["calls_per_batch"] == 3
    # one core for three actors: nothing overlaps, the makespan is all the work
    plan = simulate_config(cfg, SHAPE, NC, fwd=[1, 1, 1], bwd=[1, 1, 1], cores=1)
    assert plan["makespan_s"] == pytest.approx(3 * 4 * 2) and plan["bubble_fraction"] > 0.6
    with pytest.raises(ValueError, match="hop_cost"):
        simulate_config(cfg, SHAPE, NC, fwd=[1, 1, 1], bwd=[1, 1, 1], hop_cost=-1)
    plan = simulate_config(cfg_for("dfa", "1f1b"), SHAPE, NC, repeats=1)
    assert plan["cost_source"] == "measured" and plan["dfa_broadcast"]
    assert all(s["fwd_s"] > 0 and s["bwd_s"] > 0 for s in plan["per_stage"])
    assert 0 <= plan["bubble_fraction"] < 1 and plan["samples_per_s"] > 0


def test_simulate_timeline_is_the_schedule_as_run():
    """The plan's timeline holds every action once, each actor's one after another, each
    after what it waits for; on one core nothing overlaps at all."""
    cfg = cfg_for("fa", "gpipe")  # 3 actors, 4 micro-batches, 1 s per F and per B
    for cores in (None, 1):
        plan = simulate_config(cfg, SHAPE, NC, fwd=[1, 1, 1], bwd=[1, 1, 1], cores=cores)
        tl = plan["timeline"]
        assert sorted((s, op, mb) for s, op, mb, _, _ in tl) == sorted(
            [(s, op, m) for s in range(3) for op in "FB" for m in range(4)]
            + [(s, "STEP", -1) for s in range(3)])
        at = {(s, op, mb): (t0, t1) for s, op, mb, t0, t1 in tl}
        for s in range(3):
            mine = sorted((t0, t1) for st, _, _, t0, t1 in tl if st == s)
            assert all(a[1] <= b[0] + 1e-12 for a, b in zip(mine, mine[1:]))
            for m in range(4):
                assert at[(s, "B", m)][0] >= at[(s, "F", m)][1]
                if s:
                    assert at[(s, "F", m)][0] >= at[(s - 1, "F", m)][1]
                if s < 2:
                    assert at[(s, "B", m)][0] >= at[(s + 1, "B", m)][1]
        assert max(t1 for *_, t1 in tl) == pytest.approx(plan["makespan_s"])
        if cores is None:  # the first actor never waits: its forwards back to back
            assert [at[(0, "F", m)] for m in range(4)] == [(m, m + 1) for m in range(4)]
        else:
            spans = sorted((t0, t1) for *_, t0, t1 in tl if t1 > t0)
            assert all(a[1] <= b[0] + 1e-12 for a, b in zip(spans, spans[1:]))


def test_simulate_hints_at_cost_balance_when_parameters_cut_unevenly():
    """fwd+bwd per stage 6 and 2: the busiest does 1.5x the mean, so balancing by
    parameters missed; by cost, or even work, no hint."""
    params = cfg_for("fa", "1f1b", partition={"stages": 2})
    plan = simulate_config(params, SHAPE, NC, fwd=[3, 1], bwd=[3, 1])
    assert "1.50x" in plan["balance_hint"] and "balance: cost" in plan["balance_hint"]
    assert simulate_config(params, SHAPE, NC, fwd=[1, 1], bwd=[1, 1])["balance_hint"] is None
    cost = cfg_for("fa", "1f1b", partition={"stages": 2, "balance": "cost"})
    assert simulate_config(cost, SHAPE, NC, fwd=[3, 1], bwd=[3, 1])["balance_hint"] is None


def test_cli_simulate(tmp_path, capsys):
    from localnet.cli import main
    p = tmp_path / "c.yaml"
    p.write_text("model: {name: mlp, widths: [16, 16]}\nrule: {name: pfa}\n"
                 "train: {batch_size: 16, micro_batches: 4}\n"
                 "runtime: {executor: ray, schedule: 1f1b}\n")
    assert main(["simulate", str(p), "--input-shape", "1,8,8", "--num-classes", "10",
                 "--fwd", "1,1,1", "--bwd", "2,2,2"]) == 0
    out = capsys.readouterr().out
    assert "bubble fraction: 0.3333" in out and "predicted samples/s: 0.9" in out
    assert "no runtime overhead" in out
    assert "coordinator calls per batch: 1.5 (one per actor per 2 batches)" in out
    assert "1f1b: 3 stages x 4 micro-batches" in " ".join(out.split())
    floor = RuntimeConfig().actor_baseline_mb
    assert "memory estimate:" in out and f"process floor {floor:.0f} MB each" in out
    assert main(["simulate", str(p), "--input-shape", "1,8,8", "--num-classes", "10",
                 "--fwd", "1,1,1", "--bwd", "2,2,2", "--cores", "1",
                 "--hop-cost", "0.5"]) == 0
    out = capsys.readouterr().out  # one core: 3 x 4 x (1 + 2) + 16 hops x 0.5 s = 44 s
    assert "predicted samples/s: 0.4" in out and "(1 core, 500.000 ms CPU per hop" in out
    # no cost at all: no batch time to divide by (it was a bug in localnet)
    assert main(["simulate", str(p), "--input-shape", "1,8,8", "--num-classes", "10",
                 "--fwd", "0,0,0", "--bwd", "0,0,0"]) == 0
    assert "predicted samples/s: unbounded, a batch taking no time" in capsys.readouterr().out
    assert main(["simulate", str(p), "--input-shape", "1,8,8", "--num-classes", "10",
                 "--repeats", "1"]) == 0
    assert "bubble fraction" in capsys.readouterr().out
    p1 = tmp_path / "one.yaml"  # one micro-batch is named in the singular
    p1.write_text(p.read_text().replace("micro_batches: 4", "micro_batches: 1"))
    assert main(["simulate", str(p1), "--input-shape", "1,8,8", "--num-classes", "10",
                 "--fwd", "1,1,1", "--bwd", "2,2,2"]) == 0
    assert "3 stages x 1 micro-batch (given costs" in " ".join(capsys.readouterr().out.split())
    png = tmp_path / "timeline.png"
    assert main(["simulate", str(p), "--input-shape", "1,8,8", "--num-classes", "10",
                 "--fwd", "1,1,1", "--bwd", "2,2,2", "--plot", str(png), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["timeline"]) == 3 * (4 + 4 + 1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["simulate", str(p), "--input-shape", "1,8,8", "--num-classes", "10",
                 "--fwd", "1,1,1", "--bwd", "2,2,2", "--plot", str(tmp_path / "no" / "t.png")]) == 2
    assert "--plot" in (err := capsys.readouterr().err) and "no directory" in err
    capsys.readouterr()
    for bad, says in ((["--fwd", "1,1", "--bwd", "2,2"], "makes 3 actors, so give 3 costs each"),
                      (["--fwd", "1,x,1", "--bwd", "2,2,2"], "--fwd: expected one or more"),
                      # nan passed the check that a cost is not negative: a bug in localnet
                      (["--fwd", "1,nan,1", "--bwd", "2,2,2"], "--fwd: expected one or more"),
                      (["--fwd", "1,1,1", "--bwd", "2,inf,2"], "--bwd: expected one or more"),
                      (["--input-shape", "8,8"], "--input-shape (C,H,W): expected 3 positive"),
                      # half the costs given: the plan would be neither the given nor the
                      # measured one (and was labelled measured)
                      (["--fwd", "1,1,1"], "--bwd: give it beside --fwd"),
                      (["--bwd", "1,1,1"], "--fwd: give it beside --bwd")):
        args = ["simulate", str(p), "--input-shape", "1,8,8", "--num-classes", "10", *bad]
        assert main(args) == 2 and says in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: a usage error
        main(["simulate", str(p), "--num-classes", "0"])
    # a negative cost shortened the batch (--comm), or was a "bug in localnet" (the others)
    for option in ("--comm", "--hop-cost", "--hop-cost-per-mib", "--call-cost"):
        for bad in ("-1", "nan", "inf"):
            with pytest.raises(SystemExit) as exit_:
                main(["simulate", str(p), "--input-shape", "1,8,8", "--num-classes", "10",
                      "--fwd", "1,1,1", "--bwd", "2,2,2", option, bad])
            assert exit_.value.code == 2
            assert (f"argument {option}: expected seconds >= 0, got '{bad}'"
                    in capsys.readouterr().err)


def _finished_run(path, cfg, compute_s, hop_s, steps=10, before=0, **runtime):
    """A run directory as a finished Ray run of cfg leaves it, with the CPU account of
    one whose actors computed compute_s per batch and whose 3 actors (2 edges, 4
    micro-batches: 16 messages a batch) cost the machine hop_s more per message, over
    `steps` batches -- after `before` that an earlier process trained (resumed)."""
    from localnet.config import dump_config
    path.mkdir()
    (path / "config.yaml").write_text(dump_config(cfg))
    busy = steps * (compute_s + 16 * hop_s)
    rt = {"executor": "ray", "actors": 3, "edges": [[0, 1], [1, 2]], "micro_batches": 4,
          "dfa_broadcast": False, "partition": "per_unit", "schedule": "1f1b",
          "crowding": [3, 1], "actor_cpu_s": {"compute": steps * compute_s}, **runtime}
    # as train.py writes it: steps, speed and seconds count the earlier processes too
    (path / "summary.json").write_text(json.dumps({
        "steps": before + steps, "samples_per_s": 0.37, "train_s": (before + steps) * 16 / 0.37,
        "trained_here": {"steps": steps, "train_s": steps * 16 / 0.37}, "runtime": rt,
        "machine_cpu_s": {"user": 0.75 * busy, "system": 0.25 * busy, "idle": 3.0}}))
    return path


def test_simulate_calibrated_on_a_finished_runs_own_account(tmp_path, monkeypatch):
    """--costs-from: the run's machine CPU beyond its actors' compute, spread over its
    messages, is each message's hop cost; its cores come along; and the unit costs
    measured now are scaled to what its actors spent on the same work."""
    from localnet.runtime import plan as plan_mod
    cfg = cfg_for("pfa", "1f1b")
    run = _finished_run(tmp_path / "run", cfg, compute_s=72.0, hop_s=0.5)
    costs = plan_mod.run_costs(run)
    assert costs["messages"] == 16 and costs["hop_cost_s"] == pytest.approx(0.5)
    assert costs["cores"] == 1 and costs["compute_s"] == pytest.approx(72.0)
    # given costs are left as given: one core, 3 x 4 x (1 + 2) s of work + 16 x 0.5 s
    plan = simulate_config(cfg, SHAPE, NC, fwd=[1, 1, 1], bwd=[2, 2, 2], costs=costs)
    assert plan["makespan_s"] == pytest.approx(36 + 8)
    assert plan["costs_from"]["compute_scale"] is None and plan["costs_from"]["same_plan"]
    # measured ones are scaled: the units take 36 s a batch now, the run's actors 72
    monkeypatch.setattr(plan_mod, "measure_costs",
                        lambda *a, **k: ([1.0] * 3, [2.0] * 3, [0.0] * 3))
    plan = simulate_config(cfg, SHAPE, NC, costs=costs)
    assert plan["costs_from"]["compute_scale"] == pytest.approx(2.0)
    assert [s["fwd_s"] for s in plan["per_stage"]] == pytest.approx([2.0] * 3)
    assert plan["makespan_s"] == pytest.approx(72 + 8)
    # what is given explicitly wins over the run's: a core each, a free plane
    plan = simulate_config(cfg, SHAPE, NC, fwd=[1, 1, 1], bwd=[2, 2, 2], costs=costs,
                           cores=3, hop_cost=1e-9)
    assert plan["makespan_s"] == pytest.approx(simulate_config(
        cfg, SHAPE, NC, fwd=[1, 1, 1], bwd=[2, 2, 2])["makespan_s"], rel=1e-6)
    # a resumed run: its account is this process's 10 batches, not all 30 steps
    resumed = plan_mod.run_costs(_finished_run(tmp_path / "resumed", cfg, 72.0, 0.5, before=20))
    assert resumed["hop_cost_s"] == pytest.approx(0.5) and resumed["compute_s"] == pytest.approx(72)
    # DFA's e goes from the last actor to each other one instead of down every edge
    dfa = _finished_run(tmp_path / "dfa", cfg, 72.0, 0.5, dfa_broadcast=True, edges=[[0, 1]])
    assert plan_mod.run_costs(dfa)["messages"] == 4 * (1 + 2)


def test_the_compute_lost_to_crowding_grows_with_actors_per_core():
    """11 actors on 2 cores computed 1.2x the units timed alone: 4.5 actors too many
    per core cost 0.2, so 20 (9 too many) cost 0.4, 4 cost 0.04, and 2 -- a core each --
    nothing; a run with a core per actor, or faster than now, carries over as it is."""
    from localnet.runtime.plan import compute_scale
    assert compute_scale(1.2, 11, 20, 2, 2) == pytest.approx(1.4)
    assert compute_scale(1.2, 11, 4, 2, 2) == pytest.approx(1 + 0.2 / 4.5)
    assert compute_scale(1.2, 11, 2, 2, 2) == pytest.approx(1.0)
    assert compute_scale(1.2, 11, 11, 2, 11) == pytest.approx(1.0)  # given a core each
    assert compute_scale(1.2, 2, 20, 2, 2) == 1.2  # the run said nothing of crowding
    assert compute_scale(1.2, 11, 20, None, 2) == 1.2
    assert compute_scale(0.9, 11, 20, 2, 2) == 0.9


def test_costs_from_a_run_that_cannot_give_them_names_why(tmp_path, capsys):
    from localnet.cli import main
    from localnet.config import ConfigError, dump_config
    from localnet.runtime.plan import run_costs
    cfg = cfg_for("pfa", "1f1b")
    with pytest.raises(ConfigError, match="no summary.json there"):
        run_costs(tmp_path)
    inproc = _finished_run(tmp_path / "inproc", cfg, 1.0, 0.1, executor="inprocess")
    with pytest.raises(ConfigError, match="runtime.executor=inprocess"):
        run_costs(inproc)
    nocfg = _finished_run(tmp_path / "nocfg", cfg, 1.0, 0.1)
    (nocfg / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="no config.yaml beside its summary.json"):
        run_costs(nocfg)
    blank = _finished_run(tmp_path / "blank", cfg, 1.0, 0.1, actor_cpu_s={})
    with pytest.raises(ConfigError, match="no CPU account"):
        run_costs(blank)
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert main(["simulate", str(p), "--input-shape", "1,8,8", "--num-classes", "10",
                 "--costs-from", str(inproc)]) == 2
    assert "only Ray actors account" in capsys.readouterr().err
    good = _finished_run(tmp_path / "good", cfg, 36.0, 0.5)
    assert main(["simulate", str(p), "--input-shape", "1,8,8", "--num-classes", "10",
                 "--fwd", "1,1,1", "--bwd", "2,2,2", "--costs-from", str(good)]) == 0
    out = capsys.readouterr().out  # one core from the run: (36 + 8) s a batch of 16
    assert "predicted samples/s: 0.4 (1 core, 500.000 ms CPU per hop" in out
    assert f"costs from {good}: 500.000 ms of the machine's CPU per message" in out
    assert "(16 a batch" in out and "that run trained at 0.4 samples/s" in out
    # its compute per batch over another model's measured now would be no scale at all
    other = cfg.model_copy(update={"model": cfg.model.model_copy(update={"widths": [64]})})
    p.write_text(dump_config(other))
    assert main(["simulate", str(p), "--input-shape", "1,8,8", "--num-classes", "10",
                 "--costs-from", str(good)]) == 2
    assert (f"--costs-from {good}: a run of mlp[16-16] on synthetic, and "
            f"this config is mlp[64] on synthetic") in capsys.readouterr().err


def test_leak_detector_catches_weights_transposes_and_signs():
    from localnet.runtime.testing import leaks, tensors_of
    _, model = reference(cfg_for("fa"), SHAPE, NC)
    ts = tensors_of(model.state_dict())
    w = ts["units.1.linear.weight"]
    assert "units.1.linear.weight (value)" in leaks(w.numpy(), ts)
    assert "units.1.linear.weight (transpose)" in leaks(w.t().contiguous().numpy() * 3, ts)
    assert "units.1.linear.weight (sign)" in leaks(w.sign().numpy(), ts)
    assert "units.1.linear.feedback_weight (value)" in leaks(ts["units.1.linear.feedback_weight"], ts)
    assert leaks(torch.randn(w.shape).numpy(), ts) == []


# ---------------------------------------------------------------------------- layer graph
IMG = (3, 8, 8)
FIVE = ["fa", "kp", "pfa", "dfa", "wm"]


@pytest.mark.parametrize("name, shape, nodes", [("mlp", (1, 4, 4), 3), ("resnet8", IMG, 8),
                                                ("resnet20", IMG, 20), ("resnet18", (3, 16, 16), 21)])
def test_layer_graph_composes_to_the_model(name, shape, nodes):
    from localnet.models import build_model
    from localnet.models.base import run_layer_graph
    from localnet.rules import make_rule

    model = build_model(name, make_rule("fa"), shape, NC).eval()
    graph = model.layer_graph()
    assert len(graph) == nodes and graph[-1].name == "head"
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.equal(run_layer_graph(graph, x), model(x))
    # the nodes share the model's modules: together they hold every parameter once
    ids = [id(p) for n in graph for p in n.module.parameters()]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    if name == "resnet8":
        merges = {n.name: n.inputs for n in graph if len(n.inputs) == 2}
        assert merges == {"layer1.0.conv2": [1, 0], "layer2.0.conv2": [3, 2],
                          "layer3.0.conv2": [5, 4]}
        assert type(graph[2].module.shortcut).__name__ == "Identity"      # identity skip
        assert type(graph[4].module.shortcut).__name__ == "PadShortcut"   # option A
    if name == "resnet18":  # option B: the projection is a layer (and actor) of its own
        assert [n.name for n in graph[5:8]] == ["layer2.0.conv1", "layer2.0.shortcut",
                                                "layer2.0.conv2"]
        assert graph[7].inputs == [5, 6]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("rule", FIVE)
def test_per_layer_resnet8_matches_inprocess_after_20_steps(rule, schedule):
    """One actor per layer; the skip's activation goes to the merge's actor, the merge's
    error back along both edges, and the block input's actor sums the two."""
    cfg = cfg_for(rule, schedule, RESNET8, "per_layer", M=2, bs=8)
    ref, model, ex = run_both(cfg, IMG, NC, steps=20, bs=8)
    assert ex.num_stages == 8 and ex.runtime_info()["partition"] == "per_layer"
    worst, rng = state_diff(model.state_dict(), ex.model_state_dict())
    assert worst < 1e-5 and not rng, f"{rule}/{schedule}: {worst}"
    al, bl = ref.alignment(), ex.alignment()
    assert al.keys() == bl.keys()
    assert all(bl[k]["angle"] == pytest.approx(al[k]["angle"], abs=1e-3) for k in al)
    if rule == "pfa":
        loader = batches(2, 8, IMG, NC, seed=9)
        assert ex.evaluate(loader) == pytest.approx(ref.evaluate(loader), rel=1e-5)
        x, y = batches(1, 8, IMG, NC, seed=4)[0]
        a, b = ref.bp_update_angles(x, y), ex.bp_update_angles(x, y)
        assert a.keys() == b.keys() and all(b[k] == pytest.approx(a[k], abs=1e-3) for k in a)
    if rule != "dfa":  # the block input's actor receives (and sums) two errors
        e = ex.ledger().edges()
        assert e["stage1->stage0"]["error"]["count"] == e["stage2->stage0"]["error"]["count"]


@pytest.mark.parametrize("rule", ["kp", "dfa"])
def test_per_layer_projection_shortcut(rule):
    """ResNet-18's projection shortcuts per layer.  Under kp each is an actor of its
    own, and the merge sends its error back to it.  Under DFA no error goes down, and a
    shortcut (no tap after it) would get none: it stays in its merge's actor, whose
    autograd gives it the merge's error -- so both agree with one process."""
    cfg = cfg_for(rule, "1f1b", {"model": {"name": "resnet18"}}, "per_layer", M=2, bs=4)
    ref, model, ex = run_both(cfg, IMG, NC, steps=3, bs=4)
    shortcuts = [n for n in ex.placement.names if ".shortcut" in n[0]]
    if rule == "kp":
        assert ex.num_stages == 21 and shortcuts == [[f"layer{i}.0.shortcut"] for i in (2, 3, 4)]
    else:
        assert ex.num_stages == 18 and not shortcuts
        merge = ex.placement.names.index(["layer2.0.conv2"])
        assert ex.placement.inputs[merge] == [merge - 1, merge - 2]  # conv1, the block input
    want, got = model.state_dict(), ex.model_state_dict()
    assert state_diff(want, got)[0] < 1e-5
    # the shortcuts learned, as in one process (not merely left alone)
    key = "units.3.shortcut.conv.weight"
    assert not torch.equal(got[key], reference(cfg, IMG, NC)[1].state_dict()[key])


def test_dfa_refuses_an_actor_that_ends_without_a_tap(monkeypatch):
    """The actor's own check, should a model's layer graph cut where DFA delivers no
    error (here: blocks that split their projection shortcut out whatever the rule)."""
    from localnet.models.resnet_imagenet import BasicBlock, residual_nodes

    monkeypatch.setattr(BasicBlock, "layer_nodes",
                        lambda self, own_shortcut=True: residual_nodes(self, ["conv1"], "conv2"))
    cfg = cfg_for("dfa", "1f1b", {"model": {"name": "resnet18"}}, "per_layer", M=2, bs=4)
    with pytest.raises(ValueError, match="layer2.0.shortcut.*does not end with"):
        RayExecutor(cfg, IMG, NC, local=True)


def test_explicit_groups_and_placement_checks():
    from localnet.runtime.graph import Placement
    from localnet.runtime.partition import groups_to_boundaries

    names = ["stem", "layer1.0", "layer2.0", "layer3.0", "head"]
    assert groups_to_boundaries([["stem", "layer1.0"], ["layer2.0"], ["layer3.0", "head"]],
                                names) == [2, 3]
    with pytest.raises(ValueError, match="once each, in order"):
        groups_to_boundaries([["stem"], ["layer2.0", "layer1.0", "layer3.0", "head"]], names)
    with pytest.raises(ValueError, match="no unit named"):
        groups_to_boundaries([["stem", "layer9"]], names)
    cfg = cfg_for("fa", "1f1b", RESNET8, [["stem", "layer1.0"], ["layer2.0", "layer3.0"],
                                          ["head"]], M=2, bs=8)
    ref, model, ex = run_both(cfg, IMG, NC, steps=2, bs=8, )
    assert ex.boundaries == [2, 4] and ex.runtime_info()["units"][0] == ["stem", "layer1.0"]
    assert state_diff(model.state_dict(), ex.model_state_dict())[0] < 1e-5
    info = ex.runtime_info()  # in one process: no payload stays on a device
    assert info["device_edges"] == [] and info["data_plane"] == "local queues"
    ex.device_peers = [[1], [0], []]  # as a plane reports actors 0 and 1 on two GPUs
    assert ex.runtime_info()["device_edges"] == ["stage0->stage1"]
    with pytest.raises(ValueError, match="topological"):
        Placement("layers", [0, 1], [["a"], ["b"]], [[-1], [1]])
    with pytest.raises(ValueError, match="feed nobody"):
        Placement("layers", [0, 1, 2], [["a"], ["b"], ["c"]], [[-1], [0], [0]])


# ---------------------------------------------------------------------------- async
def _async_cfg(rule="fa", model=None, partition="per_unit", M=4, bs=16):
    return cfg_for(rule, "async", model, partition, M=M, bs=bs)


@pytest.mark.parametrize("rule, model, partition, shape", [
    ("kp", None, [["fc1", "fc2", "head"]], SHAPE),
    # PFA's convs collect g_W and form g_R at each update (rules/pfa.py)
    ("pfa", {"model": {"name": "resnet8"}}, {"stages": 1}, (3, 8, 8))])
def test_async_on_one_actor_is_sgd_on_each_micro_batch(rule, model, partition, shape):
    """Staleness 0: an update per micro-batch (its gradient is 1/M of the batch's, and
    it uses wd/M) is plain SGD on the micro-batches with lr/M."""
    M = 4
    cfg = _async_cfg(rule, model, partition=partition, M=M)
    ex = RayExecutor(cfg, shape, NC, local=True)
    assert ex.staleness() == [0]
    ref, model = reference(cfg_for(rule, model=model, M=1, bs=4), shape, NC)
    for x, y in batches(5, 16, shape, NC, seed=2):
        b = ex.train_step(x, y, 0.05, 1e-3)
        a = sum(ref.train_step(xm, ym, 0.05 / M, 1e-3).loss_sum
                for xm, ym in zip(x.chunk(M), y.chunk(M)))
        assert b.loss_sum == pytest.approx(a, rel=1e-6)
    assert state_diff(model.state_dict(), ex.model_state_dict())[0] < 1e-6


@pytest.mark.parametrize("model, partition, depth", [(None, "per_unit", [2, 1, 0]),
                                                     (RESNET8, "per_layer", [7, 6, 5, 4, 3, 2, 1, 0])])
def test_async_staleness_is_the_depth_below_each_actor(model, partition, depth):
    """White box: when actor s forwards micro-batch g (global count), it has applied
    exactly max(g - d(s), 0) updates -- it misses the d(s) before g -- and when it runs
    g's backward it has applied g (weight stashing: the gradient is taken at the
    forward's weights)."""
    cfg = _async_cfg("pfa", model, partition, M=2, bs=8)
    shape = IMG if model else SHAPE
    ex = RayExecutor(cfg, shape, NC, local=True)
    assert ex.staleness() == depth and ex.runtime_info()["staleness"] == depth[0]
    seen = [[] for _ in range(ex.num_stages)]
    for s, w in enumerate(ex.workers):
        st = w._obj.stage
        for op in ("forward", "backward"):
            fn = getattr(st, op)
            setattr(st, op, (lambda fn, op, s, st: lambda *a, **k: (
                seen[s].append((op, a[1], st.steps)), fn(*a, **k))[1])(fn, op, s, st))
    for x, y in batches(5, 8, shape, NC, seed=3):
        ex.train_step(x, y, 0.05, 1e-3)
    ex.model_state_dict()  # drains the stream
    for s, log in enumerate(seen):
        order = {}
        for op, key, steps in log:
            g = 2 * (key[0] - 1) + key[1]  # (step, mb) -> global micro-batch
            order.setdefault(op, []).append(g)
            want = max(g - depth[s], 0) if op == "forward" else g
            assert steps == want, (s, op, g, steps)
        assert order["forward"] == order["backward"] == list(range(10))


@pytest.mark.parametrize("rule, schedule, model, partition, shape", [
    ("pfa", "1f1b", None, "per_unit", SHAPE),
    ("dfa", "gpipe", RESNET8, "per_layer", (3, 8, 8)),   # DFA's e, a layer graph
    ("kp", "1f1b", None, "per_unit", SHAPE),             # + delayed errors across batches
])
def test_two_batches_per_call_are_the_same_maths(rule, schedule, model, partition, shape):
    """runtime.batches_per_call 2: when the step says which batch comes next, each actor's
    call carries both lists, one after the other, and the next step returns the stats
    kept for it.  Every loss and weight is what one call per batch gives; a batch that
    is not the one announced is refused."""
    channel = {"error": {"delay": 1}} if rule == "kp" else {}
    data = batches(5, 8, shape, NC, seed=2)
    outs = []
    for k in (1, 2):
        cfg = cfg_for(rule, schedule, model, partition, M=2, bs=8)
        cfg = Config.model_validate({**cfg.model_dump(), "channel": channel,
                                     "runtime": {**cfg.runtime.model_dump(),
                                                 "batches_per_call": k}})
        ex = RayExecutor(cfg, shape, NC, local=True)
        losses = []
        for i, (x, y) in enumerate(data):
            up = (*data[i + 1], 0.05, 1e-3) if i + 1 < len(data) else None
            losses.append(ex.train_step(x, y, 0.05, 1e-3, up).loss_sum)
            # steps 1, 3: the next one went in the same calls; 2, 4 returned it, and
            # their own next one waits for its step
            paired = k == 2 and i % 2 == 0 and up is not None
            assert (ex._ahead is not None) == paired
            if paired:
                assert ex._ahead.step == i + 2 and ex._ahead.refs is None
        outs.append((losses, ex.model_state_dict()))
    (la, sa), (lb, sb) = outs
    assert lb == la  # the very same numbers, batch by batch
    assert state_diff(sa, sb) == (0.0, [])
    ex.train_step(*data[0], 0.05, 1e-3, (*data[1], 0.05, 1e-3))
    with pytest.raises(RuntimeError, match="upcoming"):
        ex.train_step(*data[2], 0.05, 1e-3)


def test_async_learns_and_drains_for_state_eval_and_probes():
    from localnet.data import load_data

    data = load_data("synthetic", subset=256, test_subset=128, seed=0)
    for rule in ("dfa", "pfa"):
        cfg = cfg_for(rule, "async", {"model": {"name": "mlp", "widths": [32, 32]}}, M=4, bs=32)
        ex = RayExecutor(cfg, data.input_shape, data.num_classes, local=True)
        losses = [ex.train_step(x, y, 0.01, 1e-4).loss_sum / 32
                  for e in range(3) for x, y in data.train_loader(32, 0, e)]
        assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, rule
        assert ex._streams[0].start < ex._g  # backwards still in flight ...
        loss, acc = ex.evaluate(data.test_loader(64))  # ... drained first
        assert ex._streams[0].start == ex._g and not ex._mb and acc > 0.5
        angles = ex.bp_update_angles(*next(iter(data.train_loader(32, 0, 0))))
        assert set(angles) >= {"head"}
        st = ex.state_dict()
        ex2 = RayExecutor(cfg, data.input_shape, data.num_classes, local=True)
        ex2.load_state_dict(st)
        assert state_diff(ex.model_state_dict(), ex2.model_state_dict()) == (0.0, [])


# ---------------------------------------------------------------------------- checkpoints
def test_save_state_writes_one_file_per_actor_and_a_manifest(tmp_path):
    import json

    cfg = cfg_for("wm", "1f1b", RESNET8, "per_layer", M=2, bs=8)
    ex = RayExecutor(cfg, IMG, NC, local=True)
    for x, y in batches(2, 8, IMG, NC, seed=1):
        ex.train_step(x, y, 0.05, 1e-3)
    saved = ex.save_state(tmp_path)
    assert "stages" not in saved and saved["checkpoint"] == "checkpoint/step-000000002"
    gen = tmp_path / saved["checkpoint"]
    man = json.loads((gen / "manifest.json").read_text())
    assert [a["file"] for a in man["actors"]] == [f"stage{i}.pt" for i in range(8)]
    assert [a["node"] for a in man["actors"]][:3] == ["stem", "layer1.0.conv1", "layer1.0.conv2"]
    assert json.loads((tmp_path / "checkpoint/manifest.json").read_text())["generation"] == gen.name
    for x, y in batches(3, 8, IMG, NC, seed=5):  # two more generations; the oldest goes
        ex.train_step(x, y, 0.05, 1e-3)
        ex.save_state(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoint").glob("step-*")) == \
        ["step-000000004", "step-000000005"]
    ex2 = RayExecutor(cfg, IMG, NC, local=True)
    ex2.load_saved_state(tmp_path, ex.save_state(tmp_path))
    assert state_diff(ex.model_state_dict(), ex2.model_state_dict()) == (0.0, [])
    other = RayExecutor(cfg_for("wm", "1f1b", RESNET8, "per_unit", M=2, bs=8), IMG, NC, local=True)
    with pytest.raises(ValueError, match="runtime.partition that wrote it"):
        other.load_saved_state(tmp_path, ex.save_state(tmp_path))


def _small(*extra):
    from localnet.config import load_config

    return load_config(None, ["data.name=synthetic", "data.subset=128", "data.test_subset=64",
                              "model.name=mlp", "model.widths=[16]", "train.epochs=2",
                              "train.batch_size=16", "train.micro_batches=2", "train.lr=0.05",
                              "metrics.alignment_every=3", *extra])


def final_state(run_dir) -> dict:
    """Every actor's state in the run's last checkpoint, keyed by actor."""
    from localnet.files import load_state

    manifest = json.loads((run_dir / "checkpoint/manifest.json").read_text())
    gen = run_dir / "checkpoint" / manifest["generation"]
    return {a["actor"]: load_state(gen / a["file"]) for a in manifest["actors"]}


def same(a, b, path="") -> list[str]:
    """Paths where two nested states differ (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor):
        return [] if torch.equal(a, b) else [path]
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        return [p for k in a for p in same(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)):
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in same(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "async"])
@pytest.mark.parametrize("variant", ["per_unit", "per_layer", "channels", "graph_channels"])
def test_resume_a_killed_run_mid_epoch(tmp_path, monkeypatch, schedule, variant):
    """runtime.checkpoint_every=3; the run dies at step 5; `--resume` continues from
    step 3 and ends exactly where an uninterrupted run does: every weight, feedback
    weight, optimizer and RNG state bit for bit, and every count of messages.json."""
    from localnet.train import train

    per_layer = variant in ("per_layer", "graph_channels")
    sets = ["rule.name=kp", "runtime.executor=local", f"runtime.schedule={schedule}",
            "runtime.checkpoint_every=3", "model.widths=[16,16]",
            f"runtime.partition={'per_layer' if per_layer else 'per_unit'}"]
    lossy = ["channel.activation.codec=topk", "channel.activation.k=0.3",
             "channel.activation.error_feedback=true", "channel.error.codec=lowrank",
             "channel.error.q=2", "channel.error.drop=0.1"]
    if variant == "channels":
        sets += [*lossy, "channel.error.delay=1"]
    if variant == "graph_channels":  # per layer with skips: a link on every edge, whose
        # delays differ by path, so error parts wait in the checkpoint for their forward's rest
        sets += ["model.name=resnet8", *lossy, "channel.error.delay=1"]
    full = train(_small(*sets), tmp_path / "full", progress=False)
    if variant == "graph_channels":  # the skip's own link is among them
        assert "layer1.0.conv2->stem" in full["channels"]["error"]
    orig = RayExecutor.train_step

    def dies_at_5(self, *a, **k):
        if self._step == 4:
            raise KeyboardInterrupt("killed")
        return orig(self, *a, **k)

    monkeypatch.setattr(RayExecutor, "train_step", dies_at_5)
    with pytest.raises(KeyboardInterrupt):
        train(_small(*sets), tmp_path / "part", progress=False)
    monkeypatch.setattr(RayExecutor, "train_step", orig)
    ckpt = torch.load(tmp_path / "part/checkpoint.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch"]) == (3, 0, 3)
    res = train(_small(*sets), tmp_path / "part", resume=True, progress=False)
    assert (res["steps"], res["test_loss"]) == (full["steps"], full["test_loss"])
    steps = lambda d: [json.loads(ln)["step"] for ln in (d / "steps.jsonl").read_text().splitlines()]
    assert steps(tmp_path / "part") == steps(tmp_path / "full")
    diff = same(final_state(tmp_path / "full"), final_state(tmp_path / "part"))
    # local mode: every worker's "rng" is this one process's global torch RNG, which the
    # driver draws from too (data order); the layers' own RNG streams are compared
    assert [d for d in diff if not d.endswith(".rng")] == []
    # and every message counted once: the checkpoint kept the count of steps 1-3
    msgs = lambda d: json.loads((d / "messages.json").read_text())
    assert msgs(tmp_path / "part") == msgs(tmp_path / "full")
    assert res["messages"] == full["messages"]
    # the links' counts (checkpointed) over the whole run's samples, not this process's
    assert res.get("channels") == full.get("channels")


def test_summary_runtime_and_messages_for_every_executor(tmp_path):
    from localnet.train import train

    keys = {"executor", "actors", "schedule", "micro_batches", "staleness"}
    s = train(_small("rule.name=bp", "train.epochs=1"), tmp_path / "a", progress=False)
    assert {k: s["runtime"][k] for k in keys} == {"executor": "inprocess", "actors": 0,
                                                  "schedule": "sequential",
                                                  "micro_batches": 2, "staleness": 0}
    m = s["messages"]
    assert all(m[k] == {"count": 0, "bytes": 0, "header_bytes": 0, "payload_bytes": 0}
               for k in ("activation", "error", "target", "control"))
    # bp transports weights: 8 updates x (fc1 16x3072 + head 10x16) float32
    assert m["parameter_bytes"] == m["weight_transport_bytes"] == 8 * (16 * 3072 + 10 * 16) * 4
    for rule in ("bp", "pfa"):
        s = train(_small(f"rule.name={rule}", "train.epochs=1", "runtime.executor=local",
                         "runtime.partition=per_layer"), tmp_path / rule, progress=False)
        assert {k: s["runtime"][k] for k in keys} == {"executor": "local", "actors": 2,
                                                      "schedule": "gpipe",
                                                      "micro_batches": 2, "staleness": 0}
        assert s["messages"]["error"]["count"] == 8 * 2 and s["messages"]["wire_parameter_bytes"] == 0
        assert (s["messages"]["parameter_bytes"] > 0) == (rule == "bp")


def test_audit_counts_any_payload_that_aliases_a_parameter_or_buffer():
    """The ledger's parameter_bytes: a payload sharing memory with the actor's weights (a
    view of one, a buffer, a parameter assigned after the stage was built) counts; a
    fresh tensor of the same values does not."""
    from localnet.runtime.graph import Placement

    pl = Placement("units", [[0, 1], [1, 3]], [["fc1"], ["fc2", "head"]], [[-1], [0]])
    w = StageWorker(_spec(cfg_for("fa"), pl, threads=0), threads=0)
    mod = w.stage.module
    p = next(mod.parameters())
    assert w._aliases_state(p.detach()) and w._aliases_state(p.detach()[:1].t())
    assert not w._aliases_state(p.detach().clone())
    sub = next(s for s in mod.modules() if s._parameters)
    name = next(k for k, v in sub._parameters.items() if v is not None)
    fresh = torch.nn.Parameter(torch.randn_like(getattr(sub, name)))
    setattr(sub, name, fresh)  # reassigned: must be caught without rebuilding anything
    assert w._aliases_state(fresh.detach())
    sub.register_buffer("probe", torch.zeros(3))
    assert w._aliases_state(sub.probe)
    before = w._ledger.parameter_bytes
    w._send("activation", fresh.detach(), "stage1", 1, 0, "train")
    assert w._ledger.parameter_bytes - before == fresh.numel() * 4


# ---------------------------------------------------------------------------- devices
def test_device_plumbing_on_cpu():
    """num_gpus > 0 makes each actor compute on its GPU (module and incoming tensors
    moved there, CPU numpy out).  Here: the CPU path, and a clear error without a GPU."""
    from localnet.runtime.graph import Placement
    from localnet.runtime.messages import Message
    from localnet.runtime.local_plane import LocalPlane

    pl = Placement("units", [[0, 1], [1, 3]], [["fc1"], ["fc2", "head"]], [[-1], [0]])
    spec = _spec(cfg_for("fa"), pl, threads=0, device="cpu")
    w = StageWorker(spec, threads=0)
    assert w.info()["device"] == "cpu" and w.stage.device.type == "cpu"
    plane = LocalPlane(["stage0", "stage1"])
    w.plane = plane.endpoint(0)
    x = Message.make("activation", torch.randn(4, *SHAPE), src="driver", dst="stage0", step=1, mb=0)
    w.run([("F", 1, 0)], inputs={(1, 0): list(x.wire())})
    hdr, payload = plane.endpoint(1).recv(0)
    assert type(payload).__name__ == "ndarray" and payload.shape == (4, 16)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no GPU"):
            StageWorker({**spec, "device": "cuda"}, threads=0)


def test_simulate_config_per_layer_and_async():
    plan = simulate_config(cfg_for("pfa", "async", RESNET8, "per_layer", M=2, bs=8), IMG, NC,
                           fwd=[1.0] * 8, bwd=[1.0] * 8, step=0.0)
    assert plan["stages"] == 8 and plan["staleness"] == 7 and plan["batches"] == 8
    assert plan["deadlock_free"] == {"gpipe": "ok", "1f1b": "ok", "async": "ok"}
    assert [2, 4] in plan["edges"]
    sync = simulate_config(cfg_for("pfa", "1f1b", RESNET8, "per_layer", M=2, bs=8), IMG, NC,
                           fwd=[1.0] * 8, bwd=[1.0] * 8)
    assert plan["makespan_s"] < sync["makespan_s"]  # no flush: the bubble is paid once
    measured = simulate_config(cfg_for("dfa", "async", M=2, bs=8), SHAPE, NC, repeats=1)
    assert measured["cost_source"] == "measured" and measured["samples_per_s"] > 0
    assert all(s["step_s"] > 0 for s in measured["per_stage"])


def test_cli_simulate_reports_a_deadlock(tmp_path, capsys, monkeypatch):
    from localnet.cli import main
    from localnet.runtime import plan
    from localnet.schedules import STEP, B, F, Schedule

    p = tmp_path / "c.yaml"
    p.write_text("model: {name: mlp, widths: [16]}\nrule: {name: fa}\n"
                 "train: {batch_size: 16, micro_batches: 2}\nruntime: {schedule: async}\n")
    crossed = Schedule("crossed", [[F(0), B(0), F(1), B(1), STEP], [F(0), F(1), B(0), B(1), STEP]], 2)
    monkeypatch.setattr(plan, "make_schedule", lambda name, S, M, graph=None: crossed)
    assert main(["simulate", str(p), "--input-shape", "1,8,8", "--num-classes", "10",
                 "--fwd", "1,1", "--bwd", "1,1"]) == 2
    err = capsys.readouterr().err
    assert "deadlocks" in err and "stage0 B(0) waits for stage1 B(0)" in err


@pytest.mark.parametrize("rule, schedule, partition, channel", [
    ("pfa", "1f1b", "per_layer", None),     # a DAG: a block input feeds two actors
    ("dfa", "gpipe", "per_unit", None),     # e from the last actor to every other
    ("pfa", "async", "per_layer", None),    # a stream: messages taken a call later
    ("fa", "1f1b", "per_unit", {"error": {"codec": "sign", "delay": 1}}),
])
def test_receives_counts_what_each_actor_takes(monkeypatch, rule, schedule, partition, channel):
    """`interpreter.receives(w, actions)` -- what the plane posts receives ahead for -- is
    exactly how many messages each actor's interpreter takes from each other actor."""
    from collections import Counter

    import localnet.runtime.ray_executor as rx
    from localnet.runtime.interpreter import interpret, receives

    seen = []

    def counting(w, actions, inputs, targets):
        want, got = receives(w, actions), Counter()
        gen = interpret(w, actions, inputs, targets)
        try:
            req = next(gen)
            while True:
                got[req[0]] += 1
                req = gen.send((yield req))
        except StopIteration as stop:
            seen.append((w.name, want, got))
            return stop.value

    monkeypatch.setattr(rx, "interpret", counting)
    cfg = cfg_for(rule, schedule, {"model": {"name": "resnet20"}}, partition, M=2, bs=8)
    if channel:
        cfg = Config.model_validate({**cfg.model_dump(), "channel": channel})
    ex = RayExecutor(cfg, (3, 8, 8), NC, local=True)
    for x, y in batches(3, 8, (3, 8, 8), NC, seed=1):
        ex.train_step(x, y, 0.05, 1e-3)
    ex.flush()
    assert len(seen) >= 3 * ex.num_stages
    assert any(sum(want.values()) > 0 for _, want, _ in seen)
    for name, want, got in seen:
        assert +want == +got, name


# ---------------------------------------------------------------------------- channels per layer
@pytest.mark.parametrize("rule, schedule", [("fa", "gpipe"), ("pfa", "1f1b"), ("bp", "1f1b")])
def test_per_layer_channels_are_a_codec_on_every_edge_of_the_layer_graph(rule, schedule):
    """Per layer, each edge of the actor graph -- the skips included -- has its own pair of
    channels, and an actor read by two others sums the two decoded errors."""
    lossy = {"activation": {"codec": "int8", "stochastic": False},
             "error": {"codec": "fp16"}}
    cfg = Config.model_validate({**cfg_for(rule, schedule, RESNET8, "per_layer", M=2,
                                           bs=8).model_dump(), "channel": lossy})
    ex = RayExecutor(cfg, IMG, NC, local=True)
    for x, y in batches(20, 8, IMG, NC, seed=1):
        ex.train_step(x, y, 0.05, 1e-3)
    want = codec_on_every_edge(cfg, IMG, NC, batches(20, 8, IMG, NC, seed=1))
    worst, _ = state_diff(want.state_dict(), ex.model_state_dict())
    assert worst < 1e-5, f"{rule}/{schedule}: {worst}"
    # and the codecs do change the result: the same run without them ends elsewhere
    plain = RayExecutor(cfg_for(rule, schedule, RESNET8, "per_layer", M=2, bs=8), IMG, NC,
                        local=True)
    for x, y in batches(20, 8, IMG, NC, seed=1):
        plain.train_step(x, y, 0.05, 1e-3)
    assert state_diff(want.state_dict(), plain.model_state_dict())[0] > 1e-3
    # every edge of the graph, and only those, carried activations up and errors down
    s, pl, name = ex.channel_summary(), ex.placement, lambda j: ex.placement.names[j][0]
    edges = {f"{name(p)}->{name(c)}" for p, c in pl.edges()}
    assert set(s["activation"]) == edges
    assert set(s["error"]) == {f"{name(c)}->{name(p)}" for p, c in pl.edges()}
    assert all(v["messages"] == 40 for v in [*s["activation"].values(), *s["error"].values()])


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_per_layer_delayed_errors_join_each_forwards_parts(schedule):
    """A delay on the skip's error link alone: the stem, read by layer1.0's conv1 and
    (through the skip) its conv2, gets conv1's part at once and the skip's a step later,
    and joins the two parts of the same forward.  That is the in-process executor's
    result with the delay on the edge between the stem's unit and layer1.0's, and per
    layer's with the delay on both of the stem's links (parts that arrive together)."""
    from localnet.builders import build_rule_and_model, optim_config
    from localnet.engine import InProcessExecutor

    data = batches(20, 8, IMG, NC, seed=1)

    def per_layer(edges):
        cfg = cfg_for("fa", schedule, RESNET8, "per_layer", M=2, bs=8)
        ex = RayExecutor(Config.model_validate({**cfg.model_dump(),
                                                "channel": {"edges": edges}}), IMG, NC,
                         local=True)
        for x, y in data:
            ex.train_step(x, y, 0.05, 1e-3)
        return ex

    late = {"error": {"delay": 1}}
    skip = per_layer({"layer1.0.conv2->stem": late})
    both = per_layer({"layer1.0.conv2->stem": late, "layer1.0.conv1->stem": late})
    cfg = Config.model_validate({**cfg_for("fa", schedule, RESNET8, M=2, bs=8).model_dump(),
                                 "channel": {"edges": {"layer1.0->stem": late}}})
    _, model = build_rule_and_model(cfg, IMG, NC)
    ref = InProcessExecutor(model, optim_config(cfg), micro_batches=2, channels=cfg.channel,
                            channel_seed=cfg.seed)
    for x, y in data:
        ref.train_step(x, y, 0.05, 1e-3)
    for ex in (skip, both):
        worst, rng = state_diff(model.state_dict(), ex.model_state_dict())
        assert worst < 1e-5 and not rng
    errors = skip.channel_summary()["error"]
    assert errors["layer1.0.conv2->stem"]["delivered"] == 38  # a step's 2 slots still queued
    assert errors["layer1.0.conv1->stem"]["delivered"] == 40
    # and the delay does change the result: without it the stem ends elsewhere
    assert state_diff(model.state_dict(), per_layer({}).model_state_dict())[0] > 1e-3


def test_per_layer_delay_on_every_error_link_lags_each_layer_by_its_longest_path():
    """channel.error.delay=1 per layer: a layer's error parts come down paths of
    different lengths, and it learns from a forward once the longest path's part has
    arrived -- so its weights first move at step 1 + the most links between it and the
    head, and not before.  The memory preflight counts the forwards that wait that long."""
    from localnet.builders import build_rule_and_model
    from localnet.runtime import memory
    from localnet.runtime.endpoint import error_lags

    plain = cfg_for("fa", "gpipe", RESNET8, "per_layer", M=2, bs=8)
    cfg = Config.model_validate({**plain.model_dump(), "channel": {"error": {"delay": 1}}})
    ex = RayExecutor(cfg, IMG, NC, local=True)
    pl = ex.placement
    lag = {pl.sink: 0}
    for s in reversed(range(pl.num_actors)):  # consumers come after their producers
        if s != pl.sink:
            lag[s] = max(lag[c] + 1 for c, _ in pl.consumers[s])
    assert max(lag.values()) == 7 and lag[0] == 7  # the stem: 7 links by the convolutions
    assert error_lags(cfg.channel, pl, ex.unit_names, dfa=False) == [lag[s] for s in sorted(lag)]
    model = build_rule_and_model(cfg, IMG, NC)[1]
    grows = [b["total"] - a["total"] for a, b in zip(
        memory.estimate(plain, pl, model, IMG, [2] * pl.num_actors),
        memory.estimate(cfg, pl, model, IMG, [2] * pl.num_actors))]
    assert [g > 0 for g in grows] == [lag[s] > 0 for s in sorted(lag)]

    def prefix(s):  # the actor's layer in the model's state: "layer2.0.conv1" -> units.2.conv1.
        unit, _, part = pl.names[s][0].partition(".conv")
        return f"units.{ex.unit_names.index(unit)}." + (f"conv{part}." if part else "")

    def weights():
        st = ex.model_state_dict()
        return {s: torch.cat([v.flatten() for k, v in st.items() if k.startswith(prefix(s))
                              and k.endswith(("conv.weight", "fc.weight"))])
                for s in lag}

    first, before = {}, weights()
    for step, (x, y) in enumerate(batches(9, 8, IMG, NC, seed=1), 1):
        ex.train_step(x, y, 0.05, 1e-3)
        now = weights()
        for s in lag:
            if s not in first and not torch.equal(now[s], before[s]):
                first[s] = step
        before = now
    assert first == {s: 1 + lag[s] for s in lag}


def test_a_waiting_forward_holds_its_input_and_what_autograd_saves():
    """The preflight's bytes per stored forward: Linear keeps its input (and W, which the
    state counts), ReLU its output; the modules themselves are left as they were."""
    from localnet.runtime.memory import saved_bytes

    lin, bn = torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(8)
    assert saved_bytes([lin, torch.nn.ReLU()], [(8,)], 4) == 4 * 8 * 4 + 4 * 16 * 4
    before = bn.running_var.clone()
    # BatchNorm: its input, and four vectors of 8 (the batch's mean and inverse std, the
    # running mean and variance)
    assert saved_bytes([bn], [(8,)], 4) == 4 * 8 * 4 + 4 * 8 * 4
    assert torch.equal(bn.running_var, before) and bn.num_batches_tracked == 0


def test_per_layer_lost_errors_and_the_limits_of_channels_on_a_graph(tmp_path):
    """Every error lost: no actor below the last gets one, so none of them updates; the
    in-process executor, whose channels sit between units, does not pretend to run
    per-layer ones."""
    from localnet.config import ConfigError, load_config

    cfg = Config.model_validate({**cfg_for("fa", "1f1b", RESNET8, "per_layer", M=2,
                                           bs=8).model_dump(),
                                 "channel": {"error": {"drop": 1.0}}})
    ex = RayExecutor(cfg, IMG, NC, local=True)
    before = {k: v.clone() for k, v in ex.model_state_dict().items() if torch.is_tensor(v)}
    for x, y in batches(3, 8, IMG, NC, seed=1):
        ex.train_step(x, y, 0.05, 1e-3)
    after = ex.model_state_dict()
    moved = {k for k in before if k.endswith("weight") and not torch.equal(before[k], after[k])}
    head = f"units.{ex.unit_names.index('head')}."
    assert moved and all(k.startswith(head) for k in moved), moved
    errors = ex.channel_summary()["error"]
    assert errors["head->layer3.0.conv2"]["dropped"] == 6  # 3 steps of 2 micro-batches
    assert all(v["messages"] == 0 for k, v in errors.items() if not k.startswith("head"))

    named = {"error": {"codec": "fp16"},
             "edges": {"layer1.0.conv2->stem": {"error": {"codec": "sign"}}}}
    ex = RayExecutor(Config.model_validate({**cfg.model_dump(), "channel": named}), IMG, NC,
                     local=True)  # a layer graph's edges are named by their two layers
    codecs = {k: v["codec"] for k, v in ex.channel_summary()["error"].items()}
    assert codecs.pop("layer1.0.conv2->stem") == "sign" and set(codecs.values()) == {"fp16"}
    with pytest.raises(ConfigError, match="channel.edges.layer1.0->stem: no edge"):
        RayExecutor(Config.model_validate({**cfg.model_dump(), "channel": {
            "edges": {"layer1.0->stem": {"error": {"codec": "sign"}}}}}), IMG, NC, local=True)
    dfa = Config.model_validate({**cfg_for("dfa", "1f1b", RESNET8, "per_layer", M=2,
                                           bs=8).model_dump(),
                                 "channel": {"error": {"delay": 1, "codec": "fp16"}}})
    ex = RayExecutor(dfa, IMG, NC, local=True)  # DFA's links run straight from the last actor
    for x, y in batches(3, 8, IMG, NC, seed=1):
        ex.train_step(x, y, 0.05, 1e-3)
    assert ex.channel_summary()["error"]["head->layer1.0.conv1"]["delivered"] == 4
    from localnet.runtime.endpoint import error_lags  # each actor waits for its own link
    assert error_lags(dfa.channel, ex.placement, ex.unit_names, dfa=True) == [1] * 7 + [0]

    from localnet.train import build
    sets = ["model.name=resnet8", "data.name=synthetic", "runtime.partition=per_layer",
            "channel.error.codec=fp16"]
    with pytest.raises(ConfigError, match="per_layer.*runtime.executor: local"):
        build(load_config(None, sets))


from policies import child, rr_allowed  # noqa: E402

CPU_POLICY_CHILD = """
import os, sys, threading
from localnet.runtime import cpu_policy
stop = threading.Event()
before = threading.Thread(target=stop.wait); before.start()
assert cpu_policy.apply(sys.argv[1]) == sys.argv[1]
after = threading.Thread(target=stop.wait); after.start()  # inherits the starter's policy
tids = [int(t) for t in os.listdir("/proc/self/task")]
first = {os.sched_getscheduler(t) for t in tids}
assert cpu_policy.apply("normal") == "normal"
normal = {os.sched_getscheduler(t) for t in tids}
stop.set(); before.join(); after.join()
print(len(tids), sorted(first), normal == {os.SCHED_OTHER}, cpu_policy.current())
"""

# the kernel refuses real-time scheduling, as it does an unprivileged process
RR_REFUSED_CHILD = """
import os, sys
from localnet.runtime import cpu_policy
real = os.sched_setscheduler
def refuse(tid, policy, param):
    if policy == os.SCHED_RR:
        raise PermissionError(1, "Operation not permitted")
    return real(tid, policy, param)
os.sched_setscheduler = refuse
print(cpu_policy.apply("rr"), os.sched_getscheduler(0) == os.SCHED_BATCH)
"""


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
@pytest.mark.parametrize("policy", ["batch", "rr"])
def test_cpu_policy_covers_every_thread_and_those_started_later(policy):
    # in a child process: the test process's own threads keep their policy
    if policy == "rr" and not rr_allowed():
        pytest.skip("this machine refuses SCHED_RR (the fallback is tested below)")
    n, first, normal, now = child(CPU_POLICY_CHILD, policy)
    kernel = {"batch": os.SCHED_BATCH, "rr": os.SCHED_RR}[policy]
    assert int(n) >= 3 and first == f"[{kernel}]" and normal == "True" and now == "normal"
    from localnet.runtime import cpu_policy
    with pytest.raises(ValueError, match="runtime.cpu_policy"):
        cpu_policy.apply("realtime")


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
def test_rr_falls_back_to_batch_where_refused_or_with_spinning_threads():
    """Where the kernel refuses SCHED_RR the actors still get batch, and say so; with
    several torch threads (OpenMP workers spin while idle) rr is never set."""
    assert child(RR_REFUSED_CHILD) == ["batch", "True"]
    assert child("from localnet.runtime import cpu_policy; print(cpu_policy.apply('rr', 2),"
                  " cpu_policy.current())") == ["batch", "batch"]


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
def test_an_actor_on_a_gpu_leaves_rr_for_batch():
    """Once an actor knows its device: rr stays on a CPU actor; one on a GPU (whose
    CUDA and NCCL threads may poll) moves every thread to batch."""
    if not rr_allowed():
        pytest.skip("this machine refuses SCHED_RR")
    code = ("import os; from localnet.runtime import cpu_policy; cpu_policy.apply('rr'); "
            "a = cpu_policy.for_actor('cpu', 1); b = cpu_policy.for_actor('cuda', 1); "
            "print(a, b, {os.sched_getscheduler(int(t)) for t in os.listdir('/proc/self/task')}"
            " == {os.SCHED_BATCH})")
    assert child(code) == ["rr", "batch", "True"]
    # threads raised after start (a spec's runtime.threads): batch as well
    assert child("from localnet.runtime import cpu_policy; cpu_policy.apply('rr'); "
                 "print(cpu_policy.for_actor('cpu', 2))") == ["batch"]


def test_cpu_policy_fallback_names_what_the_actors_run():
    """The note at start-up: actors whose policy is not the configured one."""
    from types import SimpleNamespace

    from localnet.runtime.executor_state import StateMixin

    def fallback(got, want="rr", local=False, devices=None):
        info = [{"cpu_policy": g, "device": d}
                for g, d in zip(got, devices or ["cpu"] * len(got))]
        ns = SimpleNamespace(local=local, stage_info=info,
                             cfg=SimpleNamespace(runtime=SimpleNamespace(cpu_policy=want)))
        return StateMixin.cpu_policy_fallback(ns)

    assert fallback(["rr"] * 3) is None
    assert fallback(["batch"] * 3) == ["batch"]
    assert fallback(["rr", "batch", "rr"]) == ["batch", "rr"]  # one node refused
    assert fallback(["batch"] * 3, want="batch") is None
    assert fallback(["normal"] * 3, local=True) is None  # the driver's own threads
    # GPU actors run batch by design (cpu_policy.for_actor): nothing to tell
    assert fallback(["batch", "rr"], devices=["cuda:0", "cpu"]) is None
    assert fallback(["batch", "batch"], devices=["cuda:0", "cpu"]) == ["batch"]


def test_an_address_where_no_cluster_answers_is_an_error_naming_it(monkeypatch):
    """Ray retries an unreachable GCS for minutes; the coordinator fails at once, naming
    the setting, and never calls ray.init for it.  `auto` with no cluster is the same
    error, from what Ray says."""
    import socket

    import ray

    from localnet.runtime import session

    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(session.ClusterUnreachable,
                       match=rf"runtime.address=127.0.0.1:{port}: nothing answers there"):
        session.ensure_ray(RuntimeConfig(address=f"127.0.0.1:{port}"))
    assert calls == []
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(session.ClusterUnreachable, match=r"\$RAY_ADDRESS=127.0.0.1"):
        session.ensure_ray(RuntimeConfig())
    with socket.socket() as live:  # something answers: ray.init is called with it
        live.bind(("127.0.0.1", 0))
        live.listen()
        addr = f"127.0.0.1:{live.getsockname()[1]}"
        assert session.ensure_ray(RuntimeConfig(address=addr)) is True
    assert calls == [{"address": addr}]

    def no_cluster(**kw):
        raise ConnectionError("Could not find any running Ray instance.")
    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(session.ClusterUnreachable,
                       match=r"runtime.address=auto: Could not find any running Ray instance\.  Start"):
        session.ensure_ray(RuntimeConfig(address="auto"))


def test_actors_that_do_not_answer_are_a_timeout_naming_the_setting(monkeypatch):
    """No reply within runtime.timeout_s: a TimeoutError naming the call and the setting;
    at start-up it also says why starting takes time, and what to raise."""
    import ray
    from ray.exceptions import GetTimeoutError

    from localnet.runtime import session

    def slow(refs, timeout):
        raise GetTimeoutError("timed out")

    monkeypatch.setattr(ray, "get", slow)
    with pytest.raises(TimeoutError) as info:
        session.get([], 2.0, "setup")
    assert str(info.value).startswith("ray executor: no reply within 2 s during setup "
                                      "(runtime.timeout_s).  Each actor starts a process")
    assert str(info.value).endswith("Raise runtime.timeout_s")
    with pytest.raises(TimeoutError) as info:
        session.get([], 30.0, "checkpoint")
    assert str(info.value) == ("ray executor: no reply within 30 s during checkpoint "
                               "(runtime.timeout_s)")


def test_the_embedded_rays_raylet_does_not_warn_about_the_runs_own_actors(monkeypatch):
    """The embedded Ray's raylet warns every driver once (workers - 8 I/O workers) // its
    startup concurrency reaches 4 (worker_pool.cc, WarnAboutSize): with Ray's default of
    the CPUs (2 here), at 16 workers, so twice for ResNet-20 per layer's 20 actors.  The
    gate keeps the run's own actors under it, is Ray's own where they already are (the
    main job's 11), and a concurrency the user set stays theirs."""
    import ray

    from localnet.runtime import session

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_worker_maximum_startup_concurrency", raising=False)

    def gate(actors, **rt):
        calls.clear()
        session.ensure_ray(RuntimeConfig(**rt), actors)
        return calls[0]["_system_config"]["worker_maximum_startup_concurrency"]

    rays = min(os.cpu_count(), 4)  # ray.init's own: the CPUs, at most num_cpus (local_cpus)
    for actors in (1, 3, 11, 20, 56, 112, 400):
        g = gate(actors)
        assert (actors + 4 - 8) // g < 4, (actors, g)  # no warning, nor with 4 workers more
        assert g >= rays
        if (actors + 4 - 8) // rays < 4:  # Ray's default already warns of nothing
            assert g == rays, (actors, g)  # (the main job's 11 actors on 2 cores)
    assert gate(20, local_cpus=1) == 5

    monkeypatch.setenv("RAY_worker_maximum_startup_concurrency", "3")
    calls.clear()
    session.ensure_ray(RuntimeConfig(), 20)
    assert "worker_maximum_startup_concurrency" not in calls[0].get("_system_config", {})


def test_the_process_keeps_its_sigterm_handler_over_ray_init(monkeypatch):
    """ray.init makes SIGTERM a bare exit: a handler the process had (`localnet run`'s,
    which stops the run as Ctrl-C does) is put back, and a SIGTERM that came during
    ray.init reaches it, after Ray's half-started processes are shut down."""
    import signal

    import ray

    from localnet.runtime import session

    class Stop(Exception):
        pass

    def ours(signum, frame):
        raise Stop

    def rays(signum, frame):
        sys.exit(signum)

    def init(**kw):  # what ray.init does to the handler
        signal.signal(signal.SIGTERM, rays)

    def init_hit(**kw):  # ... and a SIGTERM while it starts the node
        init()
        rays(signal.SIGTERM, None)

    shut = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: shut.append(1))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = signal.signal(signal.SIGTERM, ours)
    try:
        monkeypatch.setattr(ray, "init", init)
        assert session.ensure_ray(RuntimeConfig()) is True
        assert signal.getsignal(signal.SIGTERM) is ours and shut == []
        monkeypatch.setattr(ray, "init", init_hit)
        with pytest.raises(Stop):
            session.ensure_ray(RuntimeConfig())
        assert signal.getsignal(signal.SIGTERM) is ours and shut == [1]
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # no handler of its own: Ray's stays
        with pytest.raises(SystemExit):
            session.ensure_ray(RuntimeConfig())
        monkeypatch.setattr(ray, "init", init)
        session.ensure_ray(RuntimeConfig())
        assert signal.getsignal(signal.SIGTERM) is rays
    finally:
        signal.signal(signal.SIGTERM, before)


def test_actors_the_cluster_can_never_hold_are_refused_before_placement():
    """Identical bundles, each on one node: counted per node, never pooled across nodes."""
    from localnet.runtime.placement import places, unplaceable

    two = [{"CPU": 2.0}, {"CPU": 2.0}]
    assert places({"CPU": 1.0}, 4, two) == 4 and unplaceable({"CPU": 1.0}, 4, two) is None
    assert places({"CPU": 1.5}, 2, two) == 2
    assert places({"CPU": 3.0}, 1, two) == 0  # 4 CPUs in all, but no node holds 3
    why = unplaceable({"CPU": 0.001, "GPU": 1.0}, 11, [{"CPU": 4.0}])
    assert "11 actors" in why and "runtime.num_gpus" in why and "at most 0" in why
    assert "the Ray cluster's 1 node," in why  # not "1 node(s)"
    assert "cluster's 2 nodes," in unplaceable({"CPU": 3.0}, 1, two)
    assert unplaceable({"CPU": 0.001}, 20, [{"CPU": 4.0}]) is None  # the token share
    assert places({"CPU": 0.5, "GPU": 0.25}, 8, [{"CPU": 16.0, "GPU": 1.0}]) == 4


def test_actors_start_a_few_at_a_time(monkeypatch):
    """runtime.start_window: the next actor is spawned only when one of those starting
    has finished its setup, so no more than the window import torch at once; every
    actor still gets its own spec, in order, and the display counts them as they end."""
    import ray

    from localnet.runtime import placement

    starting, most, told = set(), [0], []

    class Handle:
        def __init__(self, i):
            self.i = i
            self.setup = self

        def remote(self, spec):
            assert spec == {"index": self.i}
            starting.add(self.i)
            most[0] = max(most[0], len(starting))
            return ("ref", self.i)

    def wait(refs, num_returns, timeout):  # the oldest one finishes first
        done = min(refs)
        starting.discard(done[1])
        return [done], [r for r in refs if r != done]

    failed = set()

    def get(refs, timeout):  # a setup's reply, or its actor's death
        if any(r[1] in failed for r in refs):
            raise ray.exceptions.RayActorError()
        return [{} for _ in refs]

    monkeypatch.setattr(ray, "wait", wait)
    monkeypatch.setattr(ray, "get", get)
    placer = placement.Placer(RuntimeConfig(), timeout=60)
    monkeypatch.setattr(placer, "spawn_one", lambda cls, i: Handle(i))
    specs = [{"index": i} for i in range(7)]
    out = []
    refs, _ = placer.start(object, specs, 3, told.append, out)
    assert most[0] == 3 and [h.i for h in out] == list(range(7))
    assert refs == [("ref", i) for i in range(7)]
    assert told == list(range(8)) and not starting
    most[0] = 0
    placer.start(object, specs, 0, told.append, [])  # 0: all at once
    assert most[0] == 7
    # an actor whose setup fails: its error, and no actor starts after it
    failed.add(1)
    out.clear()
    with pytest.raises(RuntimeError, match="a stage actor died during setup"):
        placer.start(object, specs, 3, told.append, out)
    assert [h.i for h in out] == [0, 1, 2, 3]  # 3 started as 0 finished; 1 then failed

    # the default: the cores the actors start on, plus one
    assert placement.start_window(RuntimeConfig(start_window=5)) == 5
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert placement.start_window(RuntimeConfig()) == len(os.sched_getaffinity(0)) + 1
    # on a cluster, Ray nodes on one machine share its cores: each host counted once
    nodes = [{"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 2.0}},
             {"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 2.0}},
             {"Alive": True, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 8.0}},
             {"Alive": False, "NodeManagerAddress": "10.0.0.3", "Resources": {"CPU": 64.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert placement.start_window(RuntimeConfig(address="10.0.0.1:6379")) == 11


def test_the_actors_starting_at_once_are_counted_from_their_spans():
    """The start-up account's overlap: the most actors between loading localnet and the
    end of their setup at one moment."""
    from types import SimpleNamespace

    from localnet.runtime.executor_state import StateMixin

    def most(spans, local=False):
        info = [{"loaded_at": a, "ready_at": b} for a, b in spans]
        return StateMixin.starting_at_once(SimpleNamespace(stage_info=info, local=local))

    assert most([(0, 2), (2, 4), (4, 6)]) == 1  # one after another
    assert most([(0, 3), (1, 4), (2, 5), (6, 7)]) == 3
    assert most([(0, 9)] * 5) == 5
    assert most([(0, 1)], local=True) is None
