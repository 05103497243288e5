"""The runtime's pieces without Ray: ledger, partition, plan, and the schedule
interpreter driving plain StageWorker objects in this process (`local=True`)."""

import pytest
import torch

from localnet.config import Config
from localnet.runtime.ledger import Ledger
from localnet.runtime.messages import MessageError
from localnet.runtime.partition import balanced_boundaries, resolve_partition
from localnet.runtime.plan import simulate_config
from localnet.runtime.ray_executor import RayExecutor
from localnet.runtime.testing import batches, reference, state_diff
from localnet.runtime.worker import StageWorker

MLP = {"model": {"name": "mlp", "widths": [16, 16]}, "data": {"name": "synthetic"}}
SHAPE, NC = (1, 8, 8), 10


def cfg_for(rule, schedule="gpipe", model=None, partition="per_unit", M=4, bs=16, **train):
    d = {"seed": 3, "rule": {"name": rule}, **(model or MLP),
         "train": {"batch_size": bs, "micro_batches": M, "lr": 0.05, "weight_decay": 1e-3, **train},
         "runtime": {"executor": "ray", "schedule": schedule, "partition": partition}}
    return Config.model_validate(d)


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


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
    with pytest.raises(ValueError, match="same runtime.partition"):
        bad.load_state_dict(st)


def test_dfa_needs_stage_boundaries_at_taps():
    spec = {"config": cfg_for("dfa"), "index": 0, "num_stages": 2, "units": (0, 1),
            "input_shape": SHAPE, "num_classes": NC, "threads": 0}
    StageWorker(spec, threads=0)  # fc1 ends with its error tap: fine

    class NoTap(StageWorker):
        def _ends_with_tap(self):
            return False
    with pytest.raises(ValueError, match="after an error tap"):
        NoTap(spec, threads=0)


def test_worker_rejects_bad_messages_in_process():
    cfg = cfg_for("fa")
    w0, w1 = (StageWorker({"config": cfg, "index": i, "num_stages": 2, "units": u,
                           "input_shape": SHAPE, "num_classes": NC, "threads": 0}, threads=0)
              for i, u in ((0, (0, 1)), (1, (1, 3))))
    from localnet.runtime.messages import Message
    x = Message.make("activation", torch.randn(4, *SHAPE), src="driver", dst="stage0", step=1, mb=0)
    hdr, payload = w0.forward(*x.wire())
    with pytest.raises(MessageError, match="expected a message from stage0") as info:
        w1.forward(*x.wire())  # the driver may not feed stage1
    assert "step 1" in str(info.value)
    with pytest.raises(MessageError, match="already in flight"):
        w0.forward(*x.wire())
    with pytest.raises(RuntimeError, match="without its forward"):
        w1.backward(5)


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
    plan = simulate_config(cfg_for("dfa", "1f1b"), SHAPE, NC, repeats=1)
    assert plan["cost_source"] == "measured" and plan["dfa_broadcast"]
    assert all(s["fwd_s"] > 0 and s["bwd_s"] > 0 for s in plan["per_stage"])
    assert 0 <= plan["bubble_fraction"] < 1 and plan["samples_per_s"] > 0


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
    assert main(["simulate", str(p), "--input-shape", "1,8,8", "--num-classes", "10",
                 "--repeats", "1"]) == 0
    assert "bubble fraction" in capsys.readouterr().out


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
