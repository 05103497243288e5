"""The Ray runtime against the in-process engine: same weights, nothing but activations
and errors crossing, bad messages caught, bytes accounted.

One Ray session and one set of three stage actors serve the whole module: executors
reuse the actors (`RayExecutor(..., actors=...)`), and teardown kills them and shuts
Ray down.
"""

import os
from collections import defaultdict

import pytest

from localnet.config import Config
from localnet.runtime.messages import MessageError
from localnet.runtime.testing import batches, leaks, reference, state_diff, tensors_of

ray = pytest.importorskip("ray")
from localnet.runtime.ray_executor import RayExecutor  # noqa: E402

MLP = {"model": {"name": "mlp", "widths": [16, 16]}, "data": {"name": "synthetic"}}
SHAPE, NC, BS, M = (1, 8, 8), 10, 16, 4
NON_BP = ["fa", "dfa", "usf", "brsf", "frsf", "kp", "wm", "pfa"]


def cfg_for(rule, schedule="gpipe", model=None, partition="per_unit", m=M, bs=BS):
    return Config.model_validate({
        "seed": 5, "rule": {"name": rule}, **(model or MLP),
        "train": {"batch_size": bs, "micro_batches": m, "lr": 0.05, "weight_decay": 1e-3},
        "runtime": {"executor": "ray", "schedule": schedule, "partition": partition,
                    "timeout_s": 120}})


@pytest.fixture(scope="module")
def ray_session():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def spawner(ray_session):
    """An executor that spawned the module's three actors (in a PACK placement group)."""
    ex = RayExecutor(cfg_for("fa"), SHAPE, NC)
    assert ex.num_stages == 3 and len({a["pid"] for a in ex.stage_info}) == 3
    yield ex
    ex.close()


@pytest.fixture
def actors(spawner):
    return spawner.workers


def train_both(cfg, actors, steps, shape=SHAPE, bs=BS, **kw):
    ref, model = reference(cfg, shape, NC)
    ex = RayExecutor(cfg, shape, NC, actors=actors, model=model, **kw)  # model: layout only
    if cfg.rule.name == "wm":
        ref.mirror_steps(5)
        ex.mirror_steps(5)
    for x, y in batches(steps, bs, shape, NC, seed=2):
        a, b = ref.train_step(x, y, 0.05, 1e-3), ex.train_step(x, y, 0.05, 1e-3)
        assert (a.correct, a.samples) == (b.correct, b.samples)
        assert b.loss_sum == pytest.approx(a.loss_sum, rel=1e-5, abs=1e-5)
    return ref, model, ex


# ---------------------------------------------------------------------------- same weights
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("rule", ["fa", "kp", "pfa", "dfa", "wm"])
def test_ray_matches_inprocess_after_20_steps(actors, rule, schedule):
    ref, model, ex = train_both(cfg_for(rule, schedule), actors, steps=20)
    worst, rng = state_diff(model.state_dict(), ex.model_state_dict())
    assert worst < 1e-5, f"{rule}/{schedule}: weights differ by {worst}"
    assert not rng, f"layer RNG states differ: {rng}"
    al, bl = ref.alignment(), ex.alignment()
    assert al.keys() == bl.keys()
    assert all(bl[k]["angle"] == pytest.approx(al[k]["angle"], abs=1e-3) for k in al)
    assert ex.ledger_summary()["parameter_bytes"] == 0


@pytest.mark.parametrize("rule, schedule", [("pfa", "1f1b"), ("dfa", "gpipe")])
def test_ray_matches_inprocess_resnet20(actors, rule, schedule):
    cfg = cfg_for(rule, schedule, {"model": {"name": "resnet20"}}, {"stages": 3}, m=2, bs=8)
    ref, model, ex = train_both(cfg, actors, steps=3, shape=(3, 8, 8), bs=8)
    worst, rng = state_diff(model.state_dict(), ex.model_state_dict())  # BN statistics too
    assert worst < 1e-5 and not rng
    loader = batches(2, 8, (3, 8, 8), NC, seed=7)
    assert ex.evaluate(loader) == pytest.approx(ref.evaluate(loader), rel=1e-5)


# ---------------------------------------------------------------------------- audit
@pytest.mark.parametrize("rule", NON_BP)
def test_audit_nothing_but_activations_and_errors_cross(actors, rule):
    """Every payload that crossed an actor boundary (received by a stage or the driver)
    during training and evaluation is compared with every parameter and buffer of every
    layer, before and after each step: not equal, not its transpose, not its sign."""
    cfg = cfg_for(rule, "1f1b")
    ex = RayExecutor(cfg, SHAPE, NC, actors=actors, audit=True)
    ex.audit_log()  # drop setup traffic (none expected)
    records = []
    for x, y in batches(3, BS, SHAPE, NC, seed=4):
        before = tensors_of(ex.model_state_dict())
        ex.train_step(x, y, 0.05, 1e-3)
        after = tensors_of(ex.model_state_dict())
        log = ex.audit_log()
        for rec in log:
            assert rec["kind"] in ("activation", "error", "target", "control"), rec["kind"]
            if rec["payload"] is not None:
                found = leaks(rec["payload"], before) + leaks(rec["payload"], after)
                assert not found, f"{rule}: {rec['kind']} {rec['src']}->{rec['dst']} step " \
                                  f"{rec['step']} reproduces {found}"
        records += log
    ex.evaluate(batches(2, BS, SHAPE, NC, seed=8))
    records += ex.audit_log()
    kinds = {r["kind"] for r in records}
    assert kinds == {"activation", "error", "target", "control"}
    if rule == "dfa":  # no chain error, only the broadcast output error
        assert {r["detail"] for r in records if r["kind"] == "error"} == {"output"}
    summary = ex.ledger_summary()
    assert summary["parameter_bytes"] == 0
    _assert_ledger_matches(ex.ledger(), records)


def _assert_ledger_matches(ledger, records):
    """The sender-side ledger equals what the receivers actually got, edge by edge."""
    got = defaultdict(lambda: [0, 0, 0])
    for r in records:
        row = got[(r["src"], r["dst"], r["kind"])]
        row[0] += 1
        row[1] += r["header_bytes"]
        row[2] += r["payload_bytes"]
    assert {k: list(v) for k, v in ledger.rows.items()} == dict(got)


def test_ledger_bytes_equal_header_plus_payload_sent(actors):
    cfg = cfg_for("dfa", "gpipe")
    ex = RayExecutor(cfg, SHAPE, NC, actors=actors, audit=True)
    steps = 2
    for x, y in batches(steps, BS, SHAPE, NC, seed=3):
        ex.train_step(x, y, 0.1, 0.0)
    records = ex.audit_log()
    _assert_ledger_matches(ex.ledger(), records)
    e = ex.ledger().edges()
    mb = BS // M
    # payload bytes from first principles: float32 activations mb x 16, labels int64,
    # DFA's e (mb x 10) broadcast to stage0 and stage1; no chain errors at all
    assert e["driver->stage0"]["activation"]["payload_bytes"] == steps * BS * 64 * 4
    assert e["stage0->stage1"]["activation"]["payload_bytes"] == steps * BS * 16 * 4
    assert e["driver->stage2"]["target"]["payload_bytes"] == steps * BS * 8
    for dst in ("stage0", "stage1"):
        err = e[f"stage2->{dst}"]["error"]
        assert err["count"] == steps * M and err["payload_bytes"] == steps * M * mb * NC * 4
    assert "error" not in e.get("stage1->stage0", {})
    s = ex.ledger_summary()
    assert s["error"]["bytes"] == s["error"]["header_bytes"] + s["error"]["payload_bytes"]
    assert s["total_bytes"] == sum(r["header_bytes"] + r["payload_bytes"] for r in records)


# ---------------------------------------------------------------------------- bad messages
@pytest.mark.parametrize("mode, match", [("kind", "expected kind 'activation', got 'error'"),
                                         ("shape", "expected shape"),
                                         ("dtype", "expected dtype float32, got float64")])
def test_malformed_activation_fails_the_step_naming_edge_and_step(actors, mode, match):
    ex = RayExecutor(cfg_for("fa", "1f1b"), SHAPE, NC, actors=actors)
    data = batches(3, BS, SHAPE, NC, seed=6)
    ex.train_step(*data[0], 0.05, 0.0)
    before = ex.model_state_dict()
    ex.inject_fault(0, "activation", mode, step=2, mb=1)
    with pytest.raises(MessageError, match=match) as info:
        ex.train_step(*data[1], 0.05, 0.0)
    err = info.value
    assert err.edge == "stage0->stage1" and err.step == 2 and err.mb == 1
    assert "stage0->stage1 at step 2" in str(err)
    # no stage stepped on the failed batch, and the executor keeps working
    assert state_diff(before, ex.model_state_dict())[0] == 0.0
    ex.train_step(*data[2], 0.05, 0.0)


def test_nan_in_error_fails_the_run_naming_edge_and_step(actors):
    ex = RayExecutor(cfg_for("kp", "gpipe"), SHAPE, NC, actors=actors)
    data = batches(2, BS, SHAPE, NC, seed=6)
    ex.train_step(*data[0], 0.05, 0.0)
    ex.inject_fault(2, "error", "nan", step=2)
    with pytest.raises(MessageError, match="not finite") as info:
        ex.train_step(*data[1], 0.05, 0.0)
    assert info.value.edge == "stage2->stage1" and info.value.kind == "error"
    assert "bad error message on edge stage2->stage1 at step 2" in str(info.value)


def test_nan_in_dfa_broadcast_error(actors):
    ex = RayExecutor(cfg_for("dfa", "1f1b"), SHAPE, NC, actors=actors)
    ex.inject_fault(2, "error", "nan", step=1, mb=0)
    with pytest.raises(MessageError, match="not finite") as info:
        ex.train_step(*batches(1, BS, SHAPE, NC)[0], 0.05, 0.0)
    assert info.value.edge in ("stage2->stage0", "stage2->stage1") and info.value.step == 1


# ---------------------------------------------------------------------------- wiring
def test_train_build_chooses_the_ray_executor(ray_session):
    from localnet.train import build

    cfg = Config.model_validate({
        "seed": 1, "rule": {"name": "pfa"}, "model": {"name": "mlp", "widths": [16]},
        "data": {"name": "synthetic", "subset": 64, "test_subset": 32},
        "train": {"batch_size": 16, "micro_batches": 2, "eval_batch_size": 32},
        "runtime": {"executor": "ray", "schedule": "1f1b", "placement": "SPREAD",
                    "timeout_s": 120}})
    data, rule, model, ex = build(cfg)
    try:
        assert ex.name == "ray" and ex.num_stages == 2
        x, y = next(iter(data.train_loader(16, cfg.seed, 0)))
        st = ex.train_step(x, y, 0.01, 0.0)
        assert st.samples == 16 and st.loss_sum > 0
        loss, acc = ex.evaluate(data.test_loader(32))
        assert loss > 0 and 0 <= acc <= 1
        info = ex.runtime_info()
        assert info["schedule"] == "1f1b" and info["units"] == [["fc1"], ["head"]]
        assert [s["units"] for s in ex.state_dict()["stages"]] == [[0, 1], [1, 2]]
    finally:
        ex.close()
