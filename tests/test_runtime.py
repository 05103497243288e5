"""The Ray runtime against the in-process engine: same weights, nothing but activations
and errors crossing, bad messages caught, bytes accounted; per-layer placement with skip
edges, the async schedule, per-actor checkpoints and recovery from a killed actor.

One Ray session and one pool of eight stage actors (enough for ResNet-8 per layer) serve
the whole module: executors reuse the actors (`RayExecutor(..., actors=...)`), and
teardown kills them and shuts Ray down.
"""

import math
import os
import re
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from localnet.config import Config, RuntimeConfig
from localnet.errors import DivergedError
from localnet.runtime.messages import MessageError
from localnet.runtime.testing import (batches, codec_on_every_edge, leaks, reference,
                                      state_diff, tensors_of)
from policies import rr_allowed

ray = pytest.importorskip("ray")
from localnet.runtime.ray_executor import RayExecutor  # noqa: E402
from localnet.runtime.session import ensure_ray  # noqa: E402

MLP = {"model": {"name": "mlp", "widths": [16, 16]}, "data": {"name": "synthetic"}}
RESNET8 = {"model": {"name": "resnet8"}, "data": {"name": "synthetic"}}
IMG = (3, 8, 8)
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
    started = ensure_ray(RuntimeConfig(local_cpus=4))  # the embedded Ray `localnet run` starts
    yield started
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def spawner(ray_session):
    """An executor that spawned the module's eight actors (in a PACK placement group):
    ResNet-8, one actor per layer."""
    said = []  # what a user's start-up display shows, phase by phase
    ex = RayExecutor(cfg_for("fa", model=RESNET8, partition="per_layer", m=2, bs=8), IMG, NC,
                     on_phase=said.append)
    assert ex.num_stages == 8 and len({a["pid"] for a in ex.stage_info}) == 8
    starting = "starting 8 actors (each imports torch, builds its part): "
    assert said[said.index("placing 8 actors") + 1] == starting + "0/8 ready"
    assert said[-2:] == [starting + "8/8 ready", "connecting the actors' data plane"]
    # started a few at a time (runtime.start_window: this machine's cores + 1): at no
    # moment were more actors loading torch or building their parts
    window = len(os.sched_getaffinity(0)) + 1
    assert ex.starting_at_once() <= min(window, 8)
    yield ex
    ex.close()


@pytest.fixture
def actors(spawner):
    return spawner.workers


# The reference computes with the actors' thread count (runtime.threads): a different
# count changes float reduction order (BN statistics move by ~1e-5 over 20 steps).
pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def train_both(cfg, actors, steps, shape=SHAPE, bs=BS, ahead=False, **kw):
    """ahead: each step names the next batch (as the training loop does), so with
    runtime.batches_per_call 2 one call per actor carries two batches."""
    ref, model = reference(cfg, shape, NC)
    ex = RayExecutor(cfg, shape, NC, actors=actors, model=model, **kw)  # model: layout only
    if cfg.rule.name == "wm":
        ref.mirror_steps(5)
        ex.mirror_steps(5)
    data = batches(steps, bs, shape, NC, seed=2)
    for i, (x, y) in enumerate(data):
        up = (*data[i + 1], 0.05, 1e-3) if ahead and i + 1 < steps else None
        a, b = ref.train_step(x, y, 0.05, 1e-3), ex.train_step(x, y, 0.05, 1e-3, up)
        assert (a.correct, a.samples) == (b.correct, b.samples)
        assert b.loss_sum == pytest.approx(a.loss_sum, rel=1e-5, abs=1e-5)
    return ref, model, ex


# ---------------------------------------------------------------------------- same weights
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("rule", ["fa", "kp", "pfa", "dfa", "wm"])
def test_ray_matches_inprocess_after_20_steps(actors, rule, schedule):
    # 1f1b as the training loop drives it: each call carries two batches
    paired = schedule == "1f1b"
    ref, model, ex = train_both(cfg_for(rule, schedule), actors, steps=20, ahead=paired)
    # one driver call per actor per batch, or per two
    assert ex.calls == (10 if paired else 20) * ex.num_stages
    assert ex.runtime_info()["driver_calls_per_batch"] == ex.num_stages / (2 if paired else 1)
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


def _kill(worker) -> None:
    """ray.kill, then wait until Ray reports the actor dead: the kill is asynchronous,
    and a call made right after it may still run on the doomed actor (the step would
    then pass and the actor die later, under the next test)."""
    ray.kill(worker)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get(worker.ping.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            continue  # queued behind a call of the batch in flight: ask again
        time.sleep(0.05)
    raise AssertionError("ray.kill: the actor still answers after 60 s")


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


def test_each_actor_accounts_for_its_main_threads_cpu(actors):
    """The CPU account benchmarks/scaling.py splits the runtime's cost by: the batch
    calls hold the compute and the data plane's send and recv, and the account starts
    afresh once read."""
    ex = RayExecutor(cfg_for("fa", "1f1b"), SHAPE, NC, actors=actors)
    ex.stage_timings()  # clears what earlier tests left
    for x, y in batches(3, BS, SHAPE, NC, seed=4):
        ex.train_step(x, y, 0.05, 0.0)
    for t in ex.stage_timings():
        compute = sum(sum(t[f"{op}_cpu"]) for op in ("forward", "backward", "update"))
        plane = t["plane_cpu"]
        assert plane["send"] > 0 and plane["recv"] > 0  # every actor of the graph does both
        assert t["run_cpu"] > 0 and t["calls_cpu"] >= 0
        # thread_time reads one clock: the parts of a call cannot outgrow the call
        assert compute + plane["send"] + plane["recv"] <= t["run_cpu"] + 1e-6
    again = ex.stage_timings()
    assert all(t["run_cpu"] == 0 and t["plane_cpu"] == {"send": 0.0, "recv": 0.0}
               for t in again)


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
        ex.flush()  # the batch returns with the last actor's reply; the tail is checked here
    assert info.value.edge == "stage2->stage1" and info.value.kind == "error"
    assert "bad error message on edge stage2->stage1 at step 2" in str(info.value)
    # through Ray it is still a divergence, which the trainer words as one
    assert isinstance(info.value, DivergedError)


def test_a_nan_in_a_batchs_tail_is_found_at_once_and_names_its_own_step(actors):
    """The driver has a batch's loss from the last actor while the first ones still run
    their backward passes; a NaN error the last actor sends them then fails the run at
    the next step or flush at the latest, naming its edge and its own step, without
    waiting for runtime.timeout_s."""
    import time

    ex = RayExecutor(cfg_for("fa", "1f1b"), SHAPE, NC, actors=actors)
    last = ex.num_stages - 1
    data = batches(3, BS, SHAPE, NC, seed=6)
    ex.train_step(*data[0], 0.05, 0.0)
    ex.inject_fault(last, "error", "nan", step=2, mb=M - 1)  # its last message of step 2
    t0 = time.perf_counter()
    with pytest.raises(MessageError, match="not finite") as info:
        for x, y in data[1:]:
            ex.train_step(x, y, 0.05, 0.0)
        ex.flush()
    assert time.perf_counter() - t0 < 30  # runtime.timeout_s is 120 here
    err = info.value
    assert (err.edge, err.kind, err.step, err.mb) == (f"stage{last}->stage{last - 1}", "error",
                                                      2, M - 1)
    assert isinstance(err, DivergedError)


def test_nan_in_dfa_broadcast_error(actors):
    ex = RayExecutor(cfg_for("dfa", "1f1b"), SHAPE, NC, actors=actors)
    ex.inject_fault(2, "error", "nan", step=1, mb=0)
    with pytest.raises(MessageError, match="not finite") as info:
        ex.train_step(*batches(1, BS, SHAPE, NC)[0], 0.05, 0.0)
        ex.flush()  # the last actor broadcast the NaN, and may have replied first
    assert info.value.edge in ("stage2->stage0", "stage2->stage1") and info.value.step == 1


def test_silent_peer_is_an_error_naming_the_edge(actors):
    """An actor that never sends: its reader gives up after runtime.timeout_s with an
    error naming the edge, kind and step -- never a hang -- and the next step runs on a
    rebuilt data plane."""
    import time

    cfg = cfg_for("fa", "1f1b")
    # short, but not so short that the set-up's replies (the plane's rendezvous among
    # actors that share 2 cores with the rest of the suite) ever miss it
    cfg.runtime.timeout_s = 8
    ex = RayExecutor(cfg, SHAPE, NC, actors=actors)
    data = batches(2, BS, SHAPE, NC, seed=9)
    ex.inject_fault(1, "activation", "silent", step=1, mb=3)  # the batch's last one
    t0 = time.perf_counter()
    with pytest.raises(MessageError, match="nothing arrived within 8 s") as info:
        ex.train_step(*data[0], 0.05, 0.0)
    assert time.perf_counter() - t0 < 8 * 1.5 + 10  # the plane's error, not Ray's timeout
    err = info.value
    assert (err.edge, err.kind, err.step, err.mb) == ("stage1->stage2", "activation", 1, 3)
    assert ex.train_step(*data[1], 0.05, 0.0).samples == BS


def test_a_partition_that_cannot_fit_is_refused_before_any_actor_starts(ray_session,
                                                                       monkeypatch):
    """The memory preflight compares the actors' estimate (process floor + state +
    activations in flight) with what the Ray nodes offer, and refuses before spawning."""
    from localnet.runtime import memory, placement

    def spawn(*a, **k):
        raise AssertionError("an actor was started")
    monkeypatch.setattr(placement.Placer, "reserve", spawn)
    monkeypatch.setattr(placement.Placer, "spawn_one", spawn)
    monkeypatch.setattr(memory, "node_memory", lambda: (2 * 400 * memory.MB, 1))
    cfg = cfg_for("pfa", "1f1b", RESNET8, "per_layer", m=2, bs=8)
    with pytest.raises(memory.MemoryPreflightError) as info:
        RayExecutor(cfg, IMG, NC)
    msg = str(info.value)
    for part in ("runtime.partition='per_layer'", "8 actors", "but the Ray node offers 800 MB",
                 "per_unit", "{stages: N}", "add nodes", "Nothing was started"):
        assert part in msg, part
    est = memory.estimate(cfg, RayExecutor(cfg, IMG, NC, local=True).placement,
                          reference(cfg, IMG, NC)[1], IMG, [2] * 8)
    assert all(r["total"] == r["baseline"] + r["state"] + r["activations"] for r in est)
    assert all(r["baseline"] == RuntimeConfig().actor_baseline_mb * memory.MB for r in est)


def test_the_embedded_ray_keeps_its_object_store_out_of_the_actors_memory(ray_session):
    """Ray withholds its object store from the memory it offers workers (what the
    preflight compares with); the embedded session sizes the store by
    runtime.local_object_store_mb, not Ray's default of 30% of the machine."""
    if not ray_session:
        pytest.skip("Ray was started outside this module")
    want = RuntimeConfig().local_object_store_mb * 2**20
    assert ray.cluster_resources()["object_store_memory"] == pytest.approx(want, rel=0.01)


# ---------------------------------------------------------------------------- wiring
def test_train_build_chooses_the_ray_executor(ray_session):
    from localnet.train import build

    cfg = Config.model_validate({
        "seed": 1, "rule": {"name": "pfa"}, "model": {"name": "mlp", "widths": [16]},
        "data": {"name": "synthetic", "subset": 64, "test_subset": 32},
        "train": {"batch_size": 16, "micro_batches": 2, "eval_batch_size": 32},
        "runtime": {"executor": "ray", "schedule": "1f1b", "placement": "SPREAD",
                    "timeout_s": 120}})
    driver_policy = os.sched_getscheduler(0)
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
        # runtime.cpu_policy (default rr; batch where the kernel refuses real-time
        # scheduling) reached every thread of every actor, the data plane's gloo threads
        # (started after it was set) too; the driver keeps its own
        want = "rr" if rr_allowed() else "batch"
        kernel = os.SCHED_RR if want == "rr" else os.SCHED_BATCH
        assert info["cpu_policies"] == [want]
        assert ex.cpu_policy_fallback() == (None if want == "rr" else ["batch"])
        # runtime.allocator (default jemalloc): the embedded Ray gave it to every actor
        assert info["allocators"] == ["jemalloc"]
        for a in info["actor_info"]:
            tids = os.listdir(f"/proc/{a['pid']}/task")
            names = {Path(f"/proc/{a['pid']}/task/{t}/comm").read_text().strip() for t in tids}
            assert "gloo_tcp_loop" in names, names
            assert {os.sched_getscheduler(int(t)) for t in tids} == {kernel}
        assert os.sched_getscheduler(0) == driver_policy
        assert [s["units"] for s in ex.state_dict()["stages"]] == [[0, 1], [1, 2]]
    finally:
        ex.close()


def test_actors_with_several_threads_on_shared_cores_let_openmp_sleep(ray_session):
    """runtime.threads=2 with no CPU reserved per thread: every actor starts with
    OMP_WAIT_POLICY=PASSIVE, so its idle OpenMP worker sleeps instead of spinning on a
    core another actor needs (cpu_policy.openmp_env); one thread, or a CPU reserved per
    thread, leaves libgomp's default; and a policy the user set is never overridden."""
    from localnet.runtime.cpu_policy import openmp_env
    from localnet.train import build

    assert openmp_env(2, 0.0, {}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_env(1, 0.0, {}) == {} and openmp_env(2, 2.0, {}) == {}
    assert openmp_env(4, 2.0, {"OMP_WAIT_POLICY": "ACTIVE"}) == {}
    cfg = Config.model_validate({
        "seed": 1, "rule": {"name": "fa"}, "model": {"name": "mlp", "widths": [16]},
        "data": {"name": "synthetic", "subset": 64, "test_subset": 32},
        "train": {"batch_size": 16, "eval_batch_size": 32},
        "runtime": {"executor": "ray", "threads": 2, "timeout_s": 120}})
    data, rule, model, ex = build(cfg)
    try:
        st = ex.train_step(*next(iter(data.train_loader(16, cfg.seed, 0))), 0.01, 0.0)
        assert st.samples == 16
        for a in ex.runtime_info()["actor_info"]:
            env = Path(f"/proc/{a['pid']}/environ").read_bytes().split(b"\0")
            assert b"OMP_WAIT_POLICY=PASSIVE" in env and a["threads"] == 2
    finally:
        ex.close()


def test_a_metrics_poll_between_steps_waits_for_no_actor(ray_session, tmp_path, monkeypatch):
    """With metrics on, the coordinator asks every actor for its timings and ledger each
    metrics.poll_every steps and reads the answers a poll later.  An actor answers after
    the calls issued to it before, and the later batches' replies came meanwhile, so
    every answer read between steps has come already: no poll drains the pipeline.
    Every step's window still reaches the metrics, and the actors' CPU account."""
    import ray as ray_mod

    from localnet.metrics import Metrics
    from localnet.runtime.polls import PollMixin
    from localnet.train import train

    waited, windows = [], []
    asked_timings = PollMixin.asked_timings

    def read(self):
        refs = list(self._asked or ())
        if refs:
            ready, _ = ray_mod.wait(refs, num_returns=len(refs), timeout=0)
            waited.append(len(refs) - len(ready))
        return asked_timings(self)

    stage_values = Metrics.stage_values
    monkeypatch.setattr(PollMixin, "asked_timings", read)
    monkeypatch.setattr(Metrics, "stage_values",
                        lambda self, labels, t, walls: (windows.append(len(walls)),
                                                        stage_values(self, labels, t, walls)))
    cfg = Config.model_validate({
        "seed": 1, "rule": {"name": "fa"}, "model": {"name": "mlp", "widths": [16, 16]},
        "data": {"name": "synthetic", "subset": 160, "test_subset": 32},
        "train": {"batch_size": 16, "micro_batches": 2, "eval_batch_size": 32, "epochs": 1},
        "metrics": {"port": 0, "poll_every": 2, "alignment_every": 0},
        "runtime": {"executor": "ray", "schedule": "1f1b", "timeout_s": 120}})
    summary = train(cfg, tmp_path, progress=False)
    assert summary["steps"] == 10
    assert len(waited) == 5 and waited == [0] * 5  # 4 between steps, 1 before evaluation
    assert sum(windows) == 10  # every step's wall time, in one window or another
    assert summary["runtime"]["actor_cpu_s"]["compute"] > 0


# ---------------------------------------------------------------------------- per layer
@pytest.mark.parametrize("rule, schedule", [("fa", "gpipe"), ("kp", "1f1b"), ("pfa", "gpipe"),
                                            ("dfa", "1f1b"), ("wm", "gpipe")])
def test_ray_per_layer_resnet8_matches_inprocess_after_20_steps(actors, rule, schedule):
    """Every layer on its own actor; identity (layer1.0) and option-A (layer2.0, layer3.0)
    skip connections are edges between actors.  (Every rule x schedule pair runs in
    test_runtime_local; here each rule once, both schedules, over Ray.)"""
    cfg = cfg_for(rule, schedule, RESNET8, "per_layer", m=2, bs=8)
    ref, model, ex = train_both(cfg, actors, steps=20, shape=IMG, bs=8)
    assert ex.num_stages == 8
    skips = [(p, c) for p, c in ex.placement.edges() if c - p > 1]
    assert skips == [(0, 2), (2, 4), (4, 6)]  # block input -> the block's merge
    worst, rng = state_diff(model.state_dict(), ex.model_state_dict())  # BN statistics too
    assert worst < 1e-5 and not rng, f"{rule}/{schedule}: weights differ by {worst}"
    e = ex.ledger().edges()
    assert e["stage0->stage2"]["activation"]["count"] == 20 * 2  # the skip's activation
    if rule != "dfa":  # the merge's error goes back along both edges
        assert e["stage2->stage0"]["error"]["count"] == e["stage1->stage0"]["error"]["count"] == 40
    assert ex.ledger_summary()["parameter_bytes"] == 0


# ---------------------------------------------------------------------------- async
@pytest.mark.parametrize("rule", ["pfa", "dfa"])
def test_ray_async_equals_the_local_interpreter_and_drains(actors, rule):
    """The async stream on Ray does exactly what the in-process interpreter does (each
    actor runs its list in order), with backwards still in flight between steps.  DFA:
    the last actor's error reaches the first actor's backward 7 micro-batches (4 calls)
    after it was sent, and the sender must not wait for it sooner (`take_lags`)."""
    cfg = cfg_for(rule, "async", RESNET8, "per_layer", m=2, bs=8)
    cfg.runtime.timeout_s = 30  # a sender that waits too soon: an error, not a long hang
    data = batches(6, 8, IMG, NC, seed=11)
    outs = []
    for local in (True, False):
        ex = RayExecutor(cfg, IMG, NC, **({"local": True} if local else {"actors": actors}))
        losses = []
        for i, (x, y) in enumerate(data):
            # on Ray each next batch is issued ahead, behind this one (local ignores it)
            up = (*data[i + 1], 0.05, 1e-3) if i + 1 < len(data) else None
            losses.append(ex.train_step(x, y, 0.05, 1e-3, up).loss_sum)
            if not local and up is not None:
                assert ex._ahead.step == i + 2 and ex._ahead.refs
        if not local:
            assert ex._outstanding or ex._streams[0].start < ex._g  # work still in flight
        outs.append((losses, ex.model_state_dict(), ex.runtime_info()))
    (la, sa, ia), (lb, sb, ib) = outs
    assert lb == pytest.approx(la, rel=1e-6)
    assert state_diff(sa, sb)[0] < 1e-6
    assert ib["staleness"] == 7 and ib["staleness_per_actor"] == [7, 6, 5, 4, 3, 2, 1, 0]
    # the batch issued ahead must be the one trained next; a drain (here for the state)
    # finishes it, and its own step then returns its loss
    ex.train_step(*data[0], 0.05, 1e-3, (*data[1], 0.05, 1e-3))
    with pytest.raises(RuntimeError, match="upcoming"):
        ex.train_step(*data[2], 0.05, 1e-3)
    ex.model_state_dict()
    assert ex._ahead.refs is None and ex._step == 7
    st = ex.train_step(*data[1], 0.05, 1e-3)
    assert st.samples == 8 and math.isfinite(st.loss_sum) and ex._step == 8
    assert ex._ahead is None


# ---------------------------------------------------------------------------- recovery
def test_killed_actor_is_recreated_from_the_last_checkpoint(actors, spawner, tmp_path):
    """ray.kill an actor with its async backwards in flight, and the next batch issued
    ahead: the coordinator recreates it from the last checkpoint (every actor rolls
    back), replays the steps since the checkpoint, retries the step and goes on; no
    step is lost."""
    cfg = cfg_for("kp", "async")
    data = batches(6, BS, SHAPE, NC, seed=12)
    ex = RayExecutor(cfg, SHAPE, NC, actors=actors)
    try:
        for x, y in data[:3]:
            ex.train_step(x, y, 0.05, 1e-3)
        saved = ex.save_state(tmp_path)          # every actor writes its own file
        files = sorted(p.name for p in (tmp_path / saved["checkpoint"]).iterdir())
        assert files == ["manifest.json", "stage0.pt", "stage1.pt", "stage2.pt"]
        seen = ex.ledger().rows                  # (what a metrics poll asks)
        old_pid = ex.stage_info[1]["pid"]
        # after the checkpoint: replayed; data[4] goes in behind it, and stage1 dies
        # while it runs or just after (the race decides which: both are exactly once)
        ex.record_spans(4, 6)  # the timeline of steps 4 and 5, across the recovery
        ex.train_step(*data[3], 0.05, 1e-3, (*data[4], 0.05, 1e-3))
        assert ex._ahead.step == 5 and ex._ahead.refs
        _kill(ex.workers[1])
        st = ex.train_step(*data[4], 0.05, 1e-3)  # fails, recovers, retries
        ex.flush()  # (or here, if step 5 was done before the kill)
        assert st.samples == BS
        # every actor noted each forward and backward of those steps once: the recovery
        # asked the new actor too, and the replay's notes replaced the first attempt's
        for mine in ex.spans():
            assert sorted((op, step, mb) for op, step, mb, *_ in mine if op != "STEP") == \
                sorted((op, step, mb) for op in "FB" for step in (4, 5) for mb in range(M))
        # every step sends the same activations and errors: 5 steps' are 5/3 of what 3
        # steps sent, the dead actor's too (its ledger died with it, and the replay's
        # counts replaced the failed attempt's, not added to them)
        rows = ex.ledger().rows
        flows = [k for k in seen if k[2] in ("activation", "error")]
        assert any(k[0] == "stage1" for k in flows)
        assert {k: rows[k][0] for k in flows} == {k: seen[k][0] * 5 // 3 for k in flows}
        (rec,) = ex.recoveries
        assert rec["dead"] == ["stage1"] and rec["restored_step"] == 3
        assert rec["replayed_steps"] in (1, 2) and rec["lost_steps"] == 0
        assert ex.stage_info[1]["pid"] != old_pid
        got = ex.model_state_dict()
        info = ex.runtime_info()
        assert info["recoveries"] == [rec]
        from types import SimpleNamespace

        from localnet.train import _tell_recoveries
        said = []  # what `localnet run` prints about it
        assert _tell_recoveries(SimpleNamespace(note=said.append), ex, 0) == 1
        assert re.fullmatch(r"recovered: stage1 died at step 5; every actor went back to the "
                            r"checkpoint of step 3 and replayed (1 step|2 steps) in \d+\.\d s "
                            r"\(0 lost\)",
                            said[0]), said
        assert _tell_recoveries(SimpleNamespace(note=said.append), ex, 1) == 1 and len(said) == 1
    finally:
        _give_back(ex, spawner)
    # the same run in-process, never interrupted: 3 steps, (checkpoint: drain), 2 steps
    assert state_diff(_uninterrupted(cfg, data[:5], 3, tmp_path), got)[0] < 1e-6


def test_an_actor_killed_after_a_call_of_two_batches_replays_both(actors, spawner, tmp_path):
    """1f1b, two batches per call: steps 4 and 5 went in one call, and stage1 dies right
    after it.  The next step's call fails, and the recovery goes back to the checkpoint
    of step 3 and replays both before it retries: the weights are an uninterrupted
    run's."""
    cfg = cfg_for("kp", "1f1b")
    data = batches(6, BS, SHAPE, NC, seed=13)
    ex = RayExecutor(cfg, SHAPE, NC, actors=actors)
    try:
        for x, y in data[:3]:
            ex.train_step(x, y, 0.05, 1e-3)
        ex.save_state(tmp_path)
        ex.train_step(*data[3], 0.05, 1e-3, (*data[4], 0.05, 1e-3))
        assert ex._ahead.step == 5 and ex._ahead.refs is None  # trained, its stats kept
        ex.flush()
        _kill(ex.workers[1])
        assert ex.train_step(*data[4], 0.05, 1e-3).samples == BS  # the kept stats
        assert ex.train_step(*data[5], 0.05, 1e-3).samples == BS  # fails, recovers, retries
        (rec,) = ex.recoveries
        assert rec["restored_step"] == 3 and rec["replayed_steps"] == 2
        assert rec["lost_steps"] == 0
        got = ex.model_state_dict()
    finally:
        _give_back(ex, spawner)
    assert state_diff(_uninterrupted(cfg, data, 3, tmp_path), got)[0] < 1e-6


def _give_back(ex, spawner) -> None:
    """Hand the actors a recovery made back to the module's pool, and detach."""
    for i in ex._owned:
        spawner.workers[i] = ex.workers[i]
    ex.detach_actors()


def _uninterrupted(cfg, data, checkpoint_at: int, tmp_path) -> dict:
    """The model state of the same run in-process, never interrupted, with its
    checkpoint (which drains the pipeline) after `checkpoint_at` steps."""
    ref = RayExecutor(cfg, SHAPE, NC, local=True)
    for i, (x, y) in enumerate(data):
        if i == checkpoint_at:
            ref.save_state(tmp_path / "ref")
        ref.train_step(x, y, 0.05, 1e-3)
    return ref.model_state_dict()


def test_an_actor_lost_right_after_a_checkpoint_is_written_replays_nothing(
        actors, spawner, tmp_path, monkeypatch):
    """Once its manifest is written, the checkpoint holds every step so far.  An actor
    that dies right after rolls every actor back to it with nothing to replay: the steps
    it holds must not be trained twice (a node lost in the CI of dbd7f6a did that), nor
    counted twice in the ledger."""
    from localnet.runtime import checkpoint

    cfg = cfg_for("fa", "1f1b")
    data = batches(3, BS, SHAPE, NC, seed=5)
    ex = RayExecutor(cfg, SHAPE, NC, actors=actors)
    write = checkpoint.save

    def dying(*args):
        out = write(*args)
        _kill(ex.workers[1])
        return out
    try:
        for x, y in data[:2]:
            ex.train_step(x, y, 0.05, 1e-3)
        monkeypatch.setattr(checkpoint, "save", dying)
        saved = ex.save_state(tmp_path)
        monkeypatch.undo()
        assert saved["step"] == 2
        two = {k: r[0] for k, r in ex._ckpt_ledger.rows.items() if k[2] != "control"}
        ex.train_step(*data[2], 0.05, 1e-3)  # finds stage1 dead
        (rec,) = ex.recoveries
        assert (rec["restored_step"], rec["replayed_steps"], rec["lost_steps"]) == (2, 0, 0), rec
        three = {k: r[0] for k, r in ex.ledger().rows.items() if k[2] != "control"}
        assert three == {k: n * 3 // 2 for k, n in two.items()}  # each step's messages once
        got = ex.model_state_dict()
    finally:
        _give_back(ex, spawner)
    assert state_diff(_uninterrupted(cfg, data, 2, tmp_path), got)[0] < 1e-6


LOSSY = {"activation": {"codec": "topk", "k": 0.3, "error_feedback": True},
         "error": {"codec": "lowrank", "q": 2, "drop": 0.1, "delay": 1, "noise": 0.2}}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "async"])
@pytest.mark.parametrize("partition", ["per_unit", "per_layer", "channels"])
def test_recovery_replays_to_exactly_the_uninterrupted_run(actors, spawner, tmp_path,
                                                           schedule, partition):
    """An actor killed between checkpoints: the run ends with every weight and feedback
    weight bit-identical to the same run never interrupted -- also through lossy links
    (top-k residuals, low-rank counters, drop draws and queued noise seeds are
    checkpointed) -- and its ledger counts what that run's does, an evaluation since the
    checkpoint included."""
    model, shape = (RESNET8, IMG) if partition == "per_layer" else (MLP, SHAPE)
    cfg = cfg_for("kp", schedule, model=model, m=2, bs=8,
                  partition="per_layer" if partition == "per_layer" else "per_unit")
    if partition == "channels":
        cfg = Config.model_validate({**cfg.model_dump(), "channel": LOSSY})
    data = batches(6, 8, shape, NC, seed=21)

    def run(kill: int | None):
        ex = RayExecutor(cfg, shape, NC, actors=spawner.workers)
        try:
            for i, (x, y) in enumerate(data):
                if i == 2:
                    ex.save_state(tmp_path / f"kill{kill}")
                if i == 3:  # an evaluation, which no replay repeats, stays counted
                    ex.evaluate(batches(1, 8, shape, NC, seed=22))
                if i == 4 and kill is not None:
                    _kill(ex.workers[kill])  # steps 3 and 4 are since the checkpoint
                ex.train_step(x, y, 0.05, 1e-3)
            return ex.model_state_dict(), list(ex.recoveries), ex.ledger()
        finally:
            for i in ex._owned:
                spawner.workers[i] = ex.workers[i]
            ex.detach_actors()

    want, none, sent = run(None)
    got, (rec,), counted = run(1)
    assert none == []
    assert rec["restored_step"] == 2 and rec["replayed_steps"] == 2 and rec["lost_steps"] == 0
    assert state_diff(want, got) == (0.0, [])  # every tensor equal, layer RNGs too
    # and the ledger counts every message once, as the uninterrupted run's
    assert counted.edges() == sent.edges() and counted.parameter_bytes == 0


@pytest.mark.parametrize("during", ["probe", "evaluation"])
def test_an_actor_killed_during_a_probe_or_an_evaluation(actors, spawner, tmp_path, during):
    """An actor dies in the middle of a BP-angle probe (the others' layers switched to
    BP, their channels bypassed) or of an evaluation (the others' BatchNorm layers in
    eval mode).  The recovery leaves every actor as training expects it, replays, and
    measures or evaluates again: the run ends as one that was never interrupted, the
    probe's angles and the evaluation's loss included, its ledger too."""
    cfg = cfg_for("kp", "async", model=RESNET8, m=2, bs=8)
    cfg = Config.model_validate({**cfg.model_dump(), "channel": {
        "error": {"codec": "topk", "k": 0.5, "error_feedback": True}}})
    data = batches(5, 8, IMG, NC, seed=23)
    held = batches(1, 8, IMG, NC, seed=24)

    def run(kill: bool):
        ex = RayExecutor(cfg, IMG, NC, actors=spawner.workers)
        run_, wire_in = ex._run, ex._wire_in

        def dying(*a, **k):
            if kill and not ex.recoveries and not getattr(ex, "_killed", False):
                ex._killed = True
                _kill(ex.workers[1])
        if during == "probe":  # the probe's forward and backward carry no settings
            ex._run = lambda x, y, step, settings, *a, **k: (
                dying() if settings is None else None, run_(x, y, step, settings, *a, **k))[1]
        else:
            ex._wire_in = lambda *a, **k: (dying() if a[5] == "eval" else None,
                                           wire_in(*a, **k))[1]
        try:
            seen = None
            for i, (x, y) in enumerate(data):
                if i == 2:
                    ex.save_state(tmp_path / f"kill{kill}")
                if i == 3:
                    seen = (ex.bp_update_angles(*held[0]) if during == "probe"
                            else ex.evaluate(held))
                ex.train_step(x, y, 0.05, 1e-3)
            return ex.model_state_dict(), list(ex.recoveries), ex.ledger(), seen
        finally:
            for i in ex._owned:
                spawner.workers[i] = ex.workers[i]
            ex.detach_actors()

    want, none, sent, seen = run(False)
    got, (rec,), counted, again = run(True)
    assert none == [] and rec["restored_step"] == 2 and rec["replayed_steps"] == 1
    assert state_diff(want, got) == (0.0, [])
    assert again == seen
    assert counted.edges() == sent.edges()


def test_recovery_refuses_a_checkpoint_that_would_run_code(actors, spawner, tmp_path):
    """An actor's checkpoint file replaced by one whose pickle runs code: the recovery
    that would load it is refused with an error naming the file, and nothing runs."""
    from test_files import plant

    from localnet.files import load_state

    cfg = cfg_for("fa", "1f1b")
    data = batches(3, BS, SHAPE, NC, seed=13)
    ex = RayExecutor(cfg, SHAPE, NC, actors=actors)
    marker = tmp_path / "marker"
    try:
        ex.train_step(*data[0], 0.05, 1e-3)
        saved = ex.save_state(tmp_path)
        victim = tmp_path / saved["checkpoint"] / "stage1.pt"
        plant(victim, marker, keep=load_state(victim))
        _kill(ex.workers[1])
        with pytest.raises(RuntimeError, match="CheckpointError") as info:
            ex.train_step(*data[1], 0.05, 1e-3)
        assert str(victim) in str(info.value) and "could run code" in str(info.value)
        assert not marker.exists()
    finally:
        for i in ex._owned:
            spawner.workers[i] = ex.workers[i]
        ex.detach_actors()


def test_a_checkpoint_an_actor_cannot_write_is_the_machines_error_and_keeps_the_last(
        actors, spawner, tmp_path):
    """An actor whose file cannot be written (a full disk, here a directory in its way):
    an OSError naming the file, as the CLI shows the machine's errors; the unfinished
    generation is removed, the last whole one stays the one the manifest names."""
    import json

    from localnet.runtime.checkpoint import CHECKPOINT_DIR

    cfg = cfg_for("fa", "1f1b")
    data = batches(3, BS, SHAPE, NC, seed=14)
    ex = RayExecutor(cfg, SHAPE, NC, actors=actors)
    try:
        ex.train_step(*data[0], 0.05, 1e-3)
        first = ex.save_state(tmp_path)
        ex.train_step(*data[1], 0.05, 1e-3)
        root = tmp_path / CHECKPOINT_DIR
        blocked = root / "step-000000002" / "stage1.pt"
        blocked.mkdir(parents=True)
        with pytest.raises(OSError, match=rf"during checkpoint, on an actor: cannot write "
                                          rf"{blocked} \(Is a directory\)"):
            ex.save_state(tmp_path)
        assert not (root / "step-000000002").exists()
        assert json.loads((root / "manifest.json").read_text())["generation"] == \
            Path(first["checkpoint"]).name
        ex.train_step(*data[2], 0.05, 1e-3)  # and the run goes on
    finally:
        for i in ex._owned:
            spawner.workers[i] = ex.workers[i]
        ex.detach_actors()


# ---------------------------------------------------------------------------- train()
def test_train_on_ray_checkpoints_per_actor_and_summarises(ray_session, tmp_path):
    import json

    from localnet.train import train

    cfg = Config.model_validate({
        "seed": 1, "rule": {"name": "pfa"}, "model": {"name": "mlp", "widths": [16]},
        "data": {"name": "synthetic", "subset": 96, "test_subset": 32},
        "train": {"batch_size": 16, "micro_batches": 2, "eval_batch_size": 32, "max_steps": 5},
        "metrics": {"alignment_every": 0},
        "runtime": {"executor": "ray", "schedule": "async", "checkpoint_every": 2,
                    "timeout_s": 120}})
    s = train(cfg, tmp_path, progress=False)
    assert s["steps"] == 5
    rt, msg = s["runtime"], s["messages"]
    assert {k: rt[k] for k in ("executor", "actors", "schedule", "micro_batches", "staleness")} \
        == {"executor": "ray", "actors": 2, "schedule": "async", "micro_batches": 2, "staleness": 1}
    assert msg["parameter_bytes"] == 0 and msg["activation"]["count"] > 0
    assert all(msg[k]["bytes"] > 0 for k in ("activation", "error", "target", "control"))
    # where the actors' CPU went over the run: every part of it, and the data plane's
    # within the batch calls; the coordinator's own since its actors were ready
    cpu = rt["actor_cpu_s"]
    assert set(cpu) == {"compute", "plane", "interpreter", "calls"}
    assert cpu["compute"] > 0 and cpu["plane"] > 0 and min(cpu.values()) >= 0
    assert rt["coordinator_cpu_s"] > 0
    man = json.loads((tmp_path / "checkpoint/manifest.json").read_text())
    assert man["step"] == 5 and [a["actor"] for a in man["actors"]] == ["stage0", "stage1"]
    assert all(a["pid"] != os.getpid() for a in man["actors"])  # written by the actors
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert "stages" not in ckpt["executor"]  # no weights went through the driver


# ---------------------------------------------------------------------------- channels
@pytest.mark.parametrize("rule, channel", [
    ("fa", {"error": {"codec": "int8", "drop": 0.3, "noise": 0.5},
            "activation": {"codec": "fp16"}}),
    ("dfa", {"error": {"codec": "sign", "delay": 1, "drop": 0.2}}),
])
def test_ray_channels_match_inprocess_channels(actors, rule, channel):
    # the sender actor encodes and draws the drop, the receiver actor decodes and holds
    # the delay FIFO: through Ray's object store the weights and every count still equal
    # the in-process executor's with the same channels and seed
    from localnet.engine import InProcessExecutor
    from localnet.builders import build_rule_and_model, optim_config

    cfg = Config.model_validate({**cfg_for(rule).model_dump(), "channel": channel})
    _, model = build_rule_and_model(cfg, SHAPE, NC)
    ref = InProcessExecutor(model, optim_config(cfg), micro_batches=M, channels=cfg.channel,
                            channel_seed=cfg.seed)
    ex = RayExecutor(cfg, SHAPE, NC, actors=actors, model=model)
    for x, y in batches(8, BS, SHAPE, NC, seed=2):
        a, b = ref.train_step(x, y, 0.05, 1e-3), ex.train_step(x, y, 0.05, 1e-3)
        assert b.loss_sum == pytest.approx(a.loss_sum, rel=1e-5, abs=1e-5)
    worst, rng = state_diff(model.state_dict(), ex.model_state_dict())
    assert worst < 1e-5 and not rng
    want, got = ref.channel_summary(), ex.channel_summary()
    for kind in ("activation", "error"):
        for edge, w in want[kind].items():
            assert {k: got[kind][edge][k] for k in ("messages", "dropped", "delivered", "bytes")} \
                == {k: w[k] for k in ("messages", "dropped", "delivered", "bytes")}
    assert sum(v["dropped"] for v in got["error"].values()) > 0
    assert ex.ledger_summary()["parameter_bytes"] == 0


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_ray_per_layer_channels_are_a_codec_on_every_edge(actors, schedule):
    """ResNet-8 per layer on eight actors, every edge of the layer graph through its own
    pair of lossy links: the weights are the whole model's with a codec round trip on
    each edge (`codec_on_every_edge`), and no parameter byte crossed."""
    lossy = {"activation": {"codec": "int8", "stochastic": False}, "error": {"codec": "bf16"}}
    cfg = Config.model_validate({**cfg_for("pfa", schedule, model=RESNET8, m=2, bs=8,
                                           partition="per_layer").model_dump(),
                                 "channel": lossy})
    data = batches(20, 8, IMG, NC, seed=5)
    ex = RayExecutor(cfg, IMG, NC, actors=actors)
    for x, y in data:
        ex.train_step(x, y, 0.05, 1e-3)
    want = codec_on_every_edge(cfg, IMG, NC, data)
    worst, _ = state_diff(want.state_dict(), ex.model_state_dict())
    assert worst < 1e-5, worst
    s = ex.channel_summary()
    assert len(s["error"]) == len(ex.placement.edges()) and s["error_bytes"] > 0
    # the links in the actors' order, input to output, as a plot by depth draws them
    assert next(iter(s["activation"])).startswith("stem->")
    assert list(s["error"])[-1].startswith("head->")
    assert ex.ledger_summary()["parameter_bytes"] == 0


def test_ray_per_layer_delayed_errors_are_the_local_actors(actors):
    """A delay on every error link of ResNet-8's layer graph: through Ray's data plane each
    actor joins the parts of a forward's error that come down paths of different lengths
    just as the same actors do in one process (`runtime.executor: local`, whose lags the
    tests of test_runtime_local.py check), every loss and weight."""
    cfg = Config.model_validate({**cfg_for("kp", "1f1b", model=RESNET8, m=2, bs=8,
                                           partition="per_layer").model_dump(),
                                 "channel": {"error": {"delay": 1, "codec": "fp16"}}})
    ex = RayExecutor(cfg, IMG, NC, actors=actors)
    here = RayExecutor(cfg, IMG, NC, local=True)
    for x, y in batches(10, 8, IMG, NC, seed=5):
        a, b = here.train_step(x, y, 0.05, 1e-3), ex.train_step(x, y, 0.05, 1e-3)
        assert b.loss_sum == pytest.approx(a.loss_sum, rel=1e-5, abs=1e-5)
    worst, _ = state_diff(here.model_state_dict(), ex.model_state_dict())
    assert worst < 1e-5, worst
    errors = ex.channel_summary()["error"]
    assert errors["layer1.0.conv1->stem"]["delivered"] == 2 * (10 - 7)  # the stem lags 7
    assert ex.ledger_summary()["parameter_bytes"] == 0
