"""The Prometheus endpoint of a run (localnet/metrics.py): what it exports, where it binds,
that it goes away, and the per-actor and per-edge series of the Ray executor (in local
mode: the same StageWorkers and ledger, no Ray processes)."""

import json
import os
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import localnet.train as train_mod
from localnet.config import ConfigError, load_config
from localnet.engine import OptimConfig, Stage
from localnet.metrics import METRICS, Metrics, RunObserver
from localnet.timing import StageTimer
from localnet.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"fc1.linear", "head"}


def small(*extra):
    return load_config(None, ["data.name=synthetic", "model.name=mlp", "model.widths=[32]",
                              "train.epochs=1", "train.batch_size=32", "train.lr=0.05",
                              "metrics.alignment_every=4", *extra])


def samples(text: str) -> dict:
    """Exposition text -> {(sample name, ((label, value), ...)): value}."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(scraped: dict, name: str, **labels):
    return scraped[(name, tuple(sorted((k, str(v)) for k, v in labels.items())))]


def labelsets(scraped: dict, name: str) -> list[dict]:
    return [dict(lab) for (n, lab) in scraped if n == name]


def run_and_scrape(cfg, run_dir: Path, sd_dir: Path, failed: list | None = None):
    """train() with its endpoint announced in sd_dir; a thread scrapes it, as file SD
    would, until its target file has been gone for 0.3 s.  Returns (summary, the last
    scrape as samples(), seconds train() took); each failed scrape goes into `failed`."""
    last, stop = {}, threading.Event()

    def scrape():
        url, gone = None, None
        while not stop.is_set():
            files = list(sd_dir.glob("*.json"))
            if url is None and files:
                url = f"http://{json.loads(files[0].read_text())[0]['targets'][0]}/metrics"
            if url is not None and not files:
                gone = gone or time.monotonic()
                if time.monotonic() - gone > 0.3:  # the scraper has dropped the target
                    url = None
            if url is not None:
                try:
                    last["text"] = urllib.request.urlopen(url, timeout=5).read().decode()
                except OSError as err:
                    if failed is not None:
                        failed.append(err)
            time.sleep(0.05)

    th = threading.Thread(target=scrape, daemon=True)
    th.start()
    t0 = time.perf_counter()
    try:
        summary = train_mod.train(cfg, run_dir, progress=False)
    finally:
        took = time.perf_counter() - t0
        stop.set()
        th.join(10)
    assert "text" in last, "the endpoint was never scraped"
    return summary, samples(last["text"]), took


# ------------------------------------------------------------------ config and endpoint


def test_metrics_config_defaults_and_bounds():
    m = small().metrics
    assert m.port is None and m.address == "127.0.0.1" and m.linger_s == 0
    assert small("metrics.port=0").metrics.port == 0
    for bad in ("metrics.port=-1", "metrics.port=70000", "metrics.linger_s=-1",
                "metrics.poll_every=0", "metrics.prot=1"):
        with pytest.raises(ConfigError, match="metrics"):
            small(bad)


def test_endpoint_binds_loopback_on_an_ephemeral_port_and_stops():
    m = Metrics()
    url = m.start(0)
    try:
        assert url.startswith("http://127.0.0.1:") and m.port > 0
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        assert "localnet_step 0.0" in text
        names = {f.name for f in text_string_to_metric_families(text)}
        assert names and all(n.startswith("localnet_") for n in names)
    finally:
        m.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", m.port), timeout=1).close()


def test_linger_waits_for_a_scrape_that_starts_after_the_run():
    m = Metrics()
    m.start(0)
    try:
        assert not m.wait_for_scrape(0.2)  # nobody scrapes
        m.watch.first.collect()  # a scrape already under way when the run ends ...
        m.watch.arm()
        m.watch.last.collect()
        assert not m.watch.scraped.is_set()  # ... does not count
        done = threading.Timer(0.3, lambda: urllib.request.urlopen(m.url, timeout=5).read())
        done.start()
        t0 = time.perf_counter()
        assert m.wait_for_scrape(20)
        assert time.perf_counter() - t0 < 10
        done.join()
    finally:
        m.stop()


def test_after_the_run_the_endpoint_answers_until_the_scraper_stops_coming(monkeypatch):
    """wait_until_dropped returns once no scrape came for two of the scraper's intervals
    (at least 1 s), or for QUIET_UNKNOWN_S when one scrape in all gave no interval: a
    run shorter than the scrape interval lingered its whole metrics.linger_s."""
    m = Metrics()
    m.start(0)
    try:
        monkeypatch.setattr(Metrics, "QUIET_UNKNOWN_S", 0.6)
        urllib.request.urlopen(m.url, timeout=5).read()  # the run's one scrape
        t0 = time.perf_counter()
        assert m.wait_until_dropped(30)
        assert 0.6 <= time.perf_counter() - t0 < 10

        last = []

        def scraper():  # every 0.2 s for 1.5 s, then dropped
            end = time.perf_counter() + 1.5
            while time.perf_counter() < end:
                urllib.request.urlopen(m.url, timeout=5).read()
                last[:] = [time.perf_counter()]
                time.sleep(0.2)

        th = threading.Thread(target=scraper)
        th.start()
        assert m.wait_until_dropped(30)
        done = time.perf_counter()
        th.join()
        # quiet for 2 x 0.2 s, at least 1 s, after the last scrape: not the 0.6 s unknown
        assert 1.0 - 0.05 <= done - last[0] < 5, done - last[0]
        assert not m.wait_until_dropped(0.3)  # timed out while waiting: not quiet
    finally:
        m.stop()


def test_a_taken_port_is_a_config_error_naming_the_key(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _, _, _, ex = train_mod.build(small())
        with pytest.raises(ConfigError, match=f"metrics.port={port}"):
            RunObserver(small(f"metrics.port={port}"), tmp_path, ex)


def test_no_endpoint_unless_metrics_port_is_set(tmp_path):
    data, _, _, ex = train_mod.build(small())
    obs = RunObserver(small(), tmp_path, ex)
    assert not obs.enabled and obs.url is None
    assert obs.timed_step(lambda: 7) == 7
    obs.close(linger=True)
    assert not (tmp_path / "messages.json").exists()  # in-process: no wire, no ledger


def test_every_metric_is_documented_with_its_type_and_labels():
    doc = (ROOT / "deploy/README.md").read_text()
    rows = {m.group(1): m for m in re.finditer(r"^\| `(localnet_\w+)` \| (\w+) \| ([^|]*) \|",
                                               doc, re.M)}
    for _, spec in METRICS:
        assert spec.name in rows, f"{spec.name} missing from deploy/README.md"
        row = rows[spec.name]
        assert row.group(2) == spec.type
        labels = [x.strip() for x in row.group(3).split(",") if x.strip() not in ("", "—")]
        assert labels == list(spec.labels), spec.name
    assert set(rows) == {s.name for _, s in METRICS}


class _Sleepy(torch.nn.Module):
    """A linear layer whose forward also sleeps a known time (wall clock, no CPU)."""

    def __init__(self, seconds: float):
        super().__init__()
        self.lin, self.seconds = torch.nn.Linear(4, 3), seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.lin(x)


def test_stage_timer_records_each_calls_wall_and_cpu_time_and_changes_nothing():
    torch.manual_seed(0)
    opt = OptimConfig(lr=0.1, momentum=0.0, weight_decay=0.0)
    timed, plain = _Sleepy(0.05), _Sleepy(0.0)
    plain.load_state_dict(timed.state_dict())
    stage, ref = Stage([timed], opt, first=True), Stage([plain], opt, first=True)
    timer = StageTimer(stage)
    for mb, n in enumerate((5, 3)):
        x = torch.randn(n, 4)
        y, y_ref = stage.forward(x, mb), ref.forward(x, mb)
        assert torch.equal(y, y_ref)  # the wrapped call returns what the stage computes
        stage.backward(torch.ones_like(y), mb)
        ref.backward(torch.ones_like(y_ref), mb)
    stage.step(0.1, 0.0)
    ref.step(0.1, 0.0)
    assert torch.equal(timed.lin.weight, plain.lin.weight)
    got = timer.take()
    assert [len(got[k]) for k in ("forward", "backward", "update")] == [2, 2, 1]
    # the forward slept 0.05 s: that is wall time, and no CPU time
    assert all(0.05 <= t < 5.0 for t in got["forward"])
    assert all(c < t - 0.04 for c, t in zip(got["forward_cpu"], got["forward"]))
    assert got["samples"] == 5 + 3
    assert got["gpu_memory_bytes"] is None or got["gpu_memory_bytes"] >= 0
    again = timer.take()  # take() clears what it returned
    assert again["samples"] == 0 and again["forward"] == [] and stage.steps == 1


def test_stage_timer_keeps_its_lists_short_and_its_sums_whole(monkeypatch):
    """Unread for a long run (metrics off), a timer folds its older calls into sums:
    its lists stay bounded and the run's CPU account loses nothing."""
    import localnet.timing as timing
    from localnet.timing import cpu_parts

    monkeypatch.setattr(timing, "KEEP", 8)
    opt = OptimConfig(lr=0.1, momentum=0.0, weight_decay=0.0)
    stage = Stage([_Sleepy(0.0)], opt, first=True)
    timer = StageTimer(stage)
    for mb in range(50):
        stage.forward(torch.randn(2, 4), mb)
        assert len(timer.times["forward"]) <= 8 and len(timer.cpu["forward"]) <= 8
    got = timer.take()
    f = got["folded"]["forward"]
    assert f["calls"] + len(got["forward"]) == 50 and got["samples"] == 100
    total = f["cpu_s"] + sum(got["forward_cpu"])
    assert cpu_parts(got)["compute"] == pytest.approx(total, abs=1e-12)
    assert timer.take()["folded"] == {}  # a read starts afresh


# ------------------------------------------------------------------ a run, scraped


def test_inprocess_run_exports_run_actor_and_layer_series(tmp_path):
    sd = tmp_path / "sd"
    cfg = small("rule.name=fa", "metrics.port=0", f"metrics.sd_dir={sd}", "metrics.linger_s=30",
                "metrics.bp_angle=true", "train.micro_batches=2")
    failed = []
    summary, s, took = run_and_scrape(cfg, tmp_path / "run", sd, failed)
    steps = summary["steps"]
    assert steps == 16
    assert took < 25, "linger must end once the scraper has dropped the target, not at linger_s"
    # the endpoint answered every scrape, those after its file went among them
    assert failed == []
    assert value(s, "localnet_step") == steps == value(s, "localnet_total_steps")
    assert value(s, "localnet_epoch") == 0
    assert value(s, "localnet_accuracy", split="test") == pytest.approx(summary["test_accuracy"])
    assert value(s, "localnet_loss", split="test") == pytest.approx(summary["test_loss"])
    assert value(s, "localnet_loss", split="train") == pytest.approx(summary["train_loss"])
    assert value(s, "localnet_learning_rate") == pytest.approx(0.05)
    assert value(s, "localnet_train_samples_total") == 512
    assert value(s, "localnet_samples_per_second") > 0
    assert 0 <= value(s, "localnet_bubble_fraction") <= 1
    info = labelsets(s, "localnet_run_info")
    assert info == [{"run": "run", "rule": "fa", "model": "mlp", "dataset": "synthetic",
                     "executor": "inprocess"}]
    # per layer: the final alignment, and the update angle of the last recorded step
    for layer in LAYERS:
        assert value(s, "localnet_alignment_angle_degrees", layer=layer) == pytest.approx(
            summary["alignment"][layer])
        assert value(s, "localnet_feedback_norm_ratio", layer=layer) > 0
    last_step = json.loads((tmp_path / "run/steps.jsonl").read_text().splitlines()[-1])
    for layer, deg in last_step["bp_update_angle"].items():
        assert value(s, "localnet_bp_update_angle_degrees", layer=layer) == pytest.approx(deg)
    # per actor: one in-process stage holding every unit; the BP probes are not counted
    actor = {"rank": 0, "unit": "fc1..head"}
    assert value(s, "localnet_actor_forward_seconds_count", **actor) == steps * 2
    assert value(s, "localnet_actor_backward_seconds_count", **actor) == steps * 2
    assert value(s, "localnet_actor_update_seconds_count", **actor) == steps
    assert value(s, "localnet_actor_wait_seconds_count", **actor) == steps
    assert value(s, "localnet_actor_samples_total", **actor) == 512
    assert value(s, "localnet_actor_forward_seconds_sum", **actor) > 0
    # in-process there is no data plane: the stage's CPU is its compute alone
    assert value(s, "localnet_actor_cpu_seconds_total", part="compute", **actor) > 0
    assert {a["part"] for a in labelsets(s, "localnet_actor_cpu_seconds_total")} == {"compute"}
    assert value(s, "localnet_actor_forward_seconds_bucket", le="+Inf", **actor) == steps * 2
    assert not list(sd.glob("*.json")), "the file-SD target outlives the endpoint"
    for name in ("localnet_channel_cos", "localnet_link_cos"):
        assert labelsets(s, name) == []  # no channels: no such series


def test_each_epoch_says_what_arrived_of_its_own_messages_and_the_endpoint_the_last(tmp_path):
    """With channels each epoch's metrics.jsonl record has its own messages' fidelity,
    and the endpoint the last epoch's.  The run's, in summary.json, pools the epochs'
    messages: its norm ratio lies between theirs, and its cosine is at most their
    largest (Cauchy-Schwarz)."""
    sd = tmp_path / "sd"
    cfg = small("rule.name=fa", "metrics.port=0", f"metrics.sd_dir={sd}", "metrics.linger_s=30",
                "train.epochs=3", "train.lr=0.002", "channel.error.codec=sign",
                "channel.activation.codec=int8")  # (a rate at which no epoch fits exactly)
    summary, s, _ = run_and_scrape(cfg, tmp_path / "run", sd)
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    ch = summary["channels"]
    for kind in ("error", "activation"):
        per_epoch = [line[f"{kind}_cos"] for line in lines]
        ratios = [line[f"{kind}_norm_ratio"] for line in lines]
        assert len(per_epoch) == 3 and len(set(per_epoch)) == 3  # each epoch its own
        assert ch[f"{kind}_cos"] <= max(per_epoch) + 1e-9
        assert min(ratios) - 1e-9 <= ch[f"{kind}_norm_ratio"] <= max(ratios) + 1e-9
        assert value(s, "localnet_channel_cos", kind=kind) == pytest.approx(per_epoch[-1])
        assert value(s, "localnet_channel_norm_ratio", kind=kind) == pytest.approx(
            lines[-1][f"{kind}_norm_ratio"])
        # per link: the mlp's one boundary is one link of each kind, whose messages are
        # all of the kind's, and the endpoint names it
        (link, f), = lines[-1]["fidelity"][kind].items()
        assert f == pytest.approx({"cos": per_epoch[-1], "norm_ratio": ratios[-1],
                                   "rest": lines[-1][f"{kind}_rest"]})
        assert value(s, "localnet_link_cos", kind=kind, link=link) == pytest.approx(f["cos"])
        assert value(s, "localnet_link_norm_ratio", kind=kind, link=link) == pytest.approx(
            f["norm_ratio"])
        assert value(s, "localnet_link_rest", kind=kind, link=link) == pytest.approx(f["rest"])
        assert value(s, "localnet_channel_rest", kind=kind) == pytest.approx(
            lines[-1][f"{kind}_rest"])
    # one-scale sign: |x|_1 / (sqrt(n) |x|_2) of each message, in (0, 1]
    assert 0 < lines[-1]["error_cos"] < 1 and lines[-1]["activation_cos"] > 0.99


def test_cpu_parts_split_the_main_thread_as_the_actor_accounted_it():
    from localnet.timing import cpu_parts

    t = {"forward_cpu": [0.1, 0.1], "backward_cpu": [0.2], "update_cpu": [0.05],
         "run_cpu": 0.6, "calls_cpu": 0.03, "plane_cpu": {"send": 0.1, "recv": 0.05}}
    parts = cpu_parts(t)
    assert parts == pytest.approx({"compute": 0.45, "plane": 0.15, "interpreter": 0.0,
                                   "calls": 0.03})
    assert sum(parts.values()) == pytest.approx(t["run_cpu"] + t["calls_cpu"])
    t["run_cpu"] = 0.9
    assert cpu_parts(t)["interpreter"] == pytest.approx(0.3)
    # in-process, or local mode's queues: the compute only
    assert cpu_parts({**t, "plane_cpu": None}) == pytest.approx({"compute": 0.45})
    assert cpu_parts({"forward_cpu": [0.2]}) == {"compute": 0.2}


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads Linux's /proc/stat")
def test_the_machines_cpu_accounts_every_core_for_the_time_and_counts_a_busy_thread():
    from localnet.timing import busy_s, cpu_since, machine_cpu_s

    hz, cores = os.sysconf("SC_CLK_TCK"), os.cpu_count()
    t0, before = time.perf_counter(), machine_cpu_s()
    c0 = time.thread_time()
    while time.thread_time() - c0 < 0.3:  # this thread alone keeps a core busy
        pass
    spent = cpu_since(before)
    wall = time.perf_counter() - t0
    # every core's time is in one kind or another (to the kernel's tick, per core)
    assert sum(spent.values()) == pytest.approx(cores * wall, abs=2 * cores / hz + 0.02)
    assert busy_s(spent) >= 0.3 - 2 / hz
    assert cpu_since(None) == {}


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads Linux's /proc/stat")
def test_a_runs_summary_has_the_machines_cpu_over_its_training(tmp_path):
    from localnet.train import train

    cfg = load_config(None, ["data.name=synthetic", "model.name=mlp", "model.widths=[32]",
                             "train.epochs=2", "train.batch_size=32", "metrics.alignment_every=0"])
    s = train(cfg, tmp_path, progress=False)
    cpu = s["machine_cpu_s"]
    assert {"user", "system", "idle", "softirq"} <= set(cpu)
    # over the same spans as train_s (two epochs): all cores' time, to the tick
    hz, cores = os.sysconf("SC_CLK_TCK"), os.cpu_count()
    assert sum(cpu.values()) == pytest.approx(cores * s["train_s"], abs=4 * cores / hz + 0.05)
    assert cpu["user"] > 0


def _local_ray_build(monkeypatch):
    from localnet.runtime.ray_executor import RayExecutor

    orig = train_mod.build

    def build(cfg, on_phase=None):
        data, rule, model, _ = orig(cfg)
        return data, rule, model, RayExecutor(cfg, data.input_shape, data.num_classes,
                                              model=model, local=True)
    monkeypatch.setattr(train_mod, "build", build)


def test_ray_executor_exports_per_actor_and_per_edge_series(tmp_path, monkeypatch):
    _local_ray_build(monkeypatch)
    sd = tmp_path / "sd"
    cfg = load_config(None, ["data.name=synthetic", "model.name=mlp", "model.widths=[16,16]",
                             "data.subset=256", "data.test_subset=64", "train.batch_size=32",
                             "train.micro_batches=2", "rule.name=fa", "metrics.alignment_every=4",
                             "metrics.bp_angle=true", "metrics.port=0", "metrics.poll_every=3",
                             f"metrics.sd_dir={sd}", "metrics.linger_s=30"])
    summary, s, _ = run_and_scrape(cfg, tmp_path / "run", sd)
    steps = summary["steps"]
    assert steps == 8
    assert labelsets(s, "localnet_run_info")[0]["executor"] == "ray"
    units = {a["rank"]: a["unit"] for a in labelsets(s, "localnet_actor_samples_total")}
    assert units == {"0": "fc1", "1": "fc2", "2": "head"}
    for rank, unit in units.items():
        assert value(s, "localnet_actor_forward_seconds_count", rank=rank, unit=unit) == steps * 2
        assert value(s, "localnet_actor_backward_seconds_count", rank=rank, unit=unit) == steps * 2
        assert value(s, "localnet_actor_update_seconds_count", rank=rank, unit=unit) == steps
        assert value(s, "localnet_actor_wait_seconds_count", rank=rank, unit=unit) == steps
        assert value(s, "localnet_actor_samples_total", rank=rank, unit=unit) == 256
    assert 0 <= value(s, "localnet_bubble_fraction") <= 1

    # per edge: the exported counters are the ledger in messages.json
    msgs = json.loads((tmp_path / "run/messages.json").read_text())
    led = Ledger.from_dict(msgs["ledger"])
    assert led.rows
    for (src, dst, kind), (c, h, p) in led.rows.items():
        assert value(s, "localnet_messages_total", src=src, dst=dst, kind=kind) == c
        assert value(s, "localnet_message_bytes_total", src=src, dst=dst, kind=kind) == h + p
    assert {"driver->stage0", "stage0->stage1", "stage1->stage0", "stage2->driver"} <= set(msgs["edges"])
    assert value(s, "localnet_message_parameter_bytes_total") == 0
    assert msgs["samples"] == 256 and msgs["steps"] == steps
    assert msgs["eval_bytes"] > 0 and msgs["probe_bytes"] > 0
    total = msgs["kinds"]["total_bytes"]
    assert msgs["train_bytes"] == total - msgs["eval_bytes"] - msgs["probe_bytes"] > 0
    assert msgs["bytes_per_sample"] == pytest.approx(msgs["train_bytes"] / 256)


def test_a_failed_run_closes_its_endpoint(tmp_path, monkeypatch):
    seen = []
    orig = RunObserver.close

    def close(self, linger=False):
        seen.append((self.metrics.port, linger))
        return orig(self, linger)
    monkeypatch.setattr(RunObserver, "close", close)
    cfg = small("train.lr=1e6", "train.momentum=0", "metrics.port=0", "metrics.linger_s=30")
    with pytest.raises(train_mod.NonFiniteLossError):
        train_mod.train(cfg, tmp_path, progress=False)
    (port, linger), = seen
    assert not linger
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_exported_message_counters_never_go_back():
    """A recovery takes the ledger back to its checkpoint's counts; the Prometheus
    counters go on from where they were (what crossed the wire), never down."""
    from localnet.metrics import _LedgerCollector

    def led(**rows):
        out = Ledger()
        for edge, (c, nbytes) in rows.items():
            out.rows[(*edge.split("_"), "error")] = [c, 0, nbytes]
        return out

    col = _LedgerCollector()
    col.update(led(stage1_stage0=(10, 1000)))
    col.update(led(stage1_stage0=(6, 600)))            # rewound to the checkpoint's
    assert col.rows[("stage1", "stage0", "error")] == [10, 0, 1000]
    col.update(led(stage1_stage0=(12, 1200), stage2_stage1=(3, 30)))  # the replay, and on
    assert col.rows == {("stage1", "stage0", "error"): [16, 0, 1600],
                        ("stage2", "stage1", "error"): [3, 0, 30]}
    col.update(led(stage1_stage0=(12, 1200)))         # a row rewound to nothing
    assert col.rows[("stage2", "stage1", "error")] == [3, 0, 30]


def test_resume_adds_to_messages_json(tmp_path, monkeypatch):
    _local_ray_build(monkeypatch)
    base = ["data.name=synthetic", "model.name=mlp", "model.widths=[16]", "data.subset=128",
            "data.test_subset=32", "train.batch_size=32", "rule.name=kp"]
    train_mod.train(load_config(None, base + ["train.epochs=1"]), tmp_path, progress=False)
    first = json.loads((tmp_path / "messages.json").read_text())
    train_mod.train(load_config(None, base + ["train.epochs=2"]), tmp_path, resume=True,
                    progress=False)
    both = json.loads((tmp_path / "messages.json").read_text())
    assert [e["epoch"] for e in both["per_epoch"]] == [0, 1]
    assert both["samples"] == 256 and both["steps"] == 8
    assert both["eval_bytes"] == 2 * first["eval_bytes"]
    assert both["train_bytes"] == 2 * first["train_bytes"]  # same traffic every epoch
    assert both["kinds"]["total_count"] == 2 * first["kinds"]["total_count"]


# ------------------------------------------------------------------ TLS and bindings
def https_get(url: str, certs: dict, client: str | None = "client") -> str:
    import ssl

    ctx = ssl.create_default_context(cafile=certs["ca"])
    if client:
        ctx.load_cert_chain(certs[f"{client}_cert"], certs[f"{client}_key"])
    with urllib.request.urlopen(url, timeout=5, context=ctx) as r:
        return r.read().decode()


def test_tls_endpoint_serves_only_clients_with_a_certificate(tmp_path):
    from certs import make_certs

    certs = make_certs(tmp_path / "tls")
    cfg = small("metrics.port=0", f"metrics.tls.certfile={certs['server_cert']}",
                f"metrics.tls.keyfile={certs['server_key']}",
                f"metrics.tls.client_cafile={certs['ca']}", f"metrics.sd_dir={tmp_path / 'sd'}")
    _, _, _, ex = train_mod.build(cfg)
    obs = RunObserver(cfg, tmp_path / "run", ex)
    try:
        assert obs.url.startswith("https://127.0.0.1:")
        assert "localnet_step 0.0" in https_get(obs.url, certs)
        for client in (None, "other"):  # no certificate; one from a CA it does not trust
            with pytest.raises(OSError):
                https_get(obs.url, certs, client)
        with pytest.raises(OSError):  # and never plain HTTP
            urllib.request.urlopen(obs.url.replace("https:", "http:"), timeout=5).read()
        (target,) = json.loads(next((tmp_path / "sd").glob("*.json")).read_text())
        assert target["labels"]["__scheme__"] == "https"
    finally:
        obs.close()


def test_tls_settings_are_checked_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="metrics.tls.keyfile: HTTPS needs both"):
        small("metrics.tls.certfile=a.pem")
    with pytest.raises(ConfigError, match="metrics.tls.client_cafile: client certificates"):
        small("metrics.tls.client_cafile=ca.pem")
    cfg = small("metrics.port=0", f"metrics.tls.certfile={tmp_path / 'no.pem'}",
                f"metrics.tls.keyfile={tmp_path / 'no.key'}")
    _, _, _, ex = train_mod.build(cfg)
    with pytest.raises(ConfigError, match="metrics.tls.certfile: no such file"):
        RunObserver(cfg, tmp_path / "run", ex)
    (tmp_path / "junk.pem").write_text("not a certificate")
    cfg = small("metrics.port=0", f"metrics.tls.certfile={tmp_path / 'junk.pem'}",
                f"metrics.tls.keyfile={tmp_path / 'junk.pem'}")
    with pytest.raises(ConfigError, match="metrics.tls: cannot serve HTTPS"):
        RunObserver(cfg, tmp_path / "run", ex)


def test_an_sd_dir_that_cannot_be_written_is_named_and_serves_nothing(tmp_path):
    """A run announced nowhere would be scraped by no one: it stops at its start, naming
    the key, and the endpoint it had opened to learn its port is shut."""
    (tmp_path / "a-file").write_text("not a folder")
    cfg = small("metrics.port=0", f"metrics.sd_dir={tmp_path / 'a-file' / 'sd'}")
    _, _, _, ex = train_mod.build(cfg)
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(ConfigError, match=rf"metrics.sd_dir={tmp_path / 'a-file' / 'sd'}: "
                                          rf"cannot write this run's Prometheus target there"):
        RunObserver(cfg, tmp_path / "run", ex)
    time.sleep(0.2)
    assert {t.ident for t in threading.enumerate() if t.is_alive()} <= before


@pytest.mark.parametrize("address", ["0.0.0.0", "'::'", "192.0.2.7", "node1.example"])
def test_a_routable_binding_without_tls_is_refused(address):
    with pytest.raises(ConfigError, match=r"metrics.address: .* is not a loopback address") as info:
        small(f"metrics.address={address}")
    assert "metrics.allow_insecure" in str(info.value) and "metrics.tls" in str(info.value)
    assert small(f"metrics.address={address}", "metrics.allow_insecure=true").metrics.insecure \
        is False  # no port: nothing served
    for loop in ("127.0.0.1", "'::1'", "localhost"):
        assert small(f"metrics.address={loop}", "metrics.port=0").metrics.insecure is False


def test_allow_insecure_serves_plain_http_with_a_warning(tmp_path, capsys):
    cfg = small("metrics.port=0", "metrics.address=0.0.0.0", "metrics.allow_insecure=true")
    assert cfg.metrics.insecure
    _, _, _, ex = train_mod.build(cfg)
    obs = RunObserver(cfg, tmp_path / "run", ex)
    try:
        assert "warning: metrics are served over plain HTTP on 0.0.0.0" in capsys.readouterr().err
        text = urllib.request.urlopen(f"http://127.0.0.1:{obs.metrics.port}/metrics",
                                      timeout=5).read().decode()
        assert "localnet_step 0.0" in text
    finally:
        obs.close()


def test_recoveries_are_counted_with_the_steps_they_replayed_and_lost(tmp_path):
    """What `localnet run` tells the endpoint of each recovery the runtime lists: the
    count, and the steps replayed and lost (zero from the start, so a rate exists)."""
    from types import SimpleNamespace

    cfg = small("metrics.port=0")
    _, _, _, ex = train_mod.build(cfg)
    obs = RunObserver(cfg, tmp_path / "run", ex)
    try:
        before = samples(obs.metrics.exposition())
        assert value(before, "localnet_recoveries_total") == 0
        assert value(before, "localnet_recovery_steps_total", outcome="lost") == 0
        fake = SimpleNamespace(recoveries=[
            {"dead": ["stage1"], "at_step": 9, "restored_step": 6, "replayed_steps": 2,
             "lost_steps": 0, "seconds": 1.0},
            {"dead": ["stage0", "stage2"], "at_step": 30, "restored_step": 24,
             "replayed_steps": 3, "lost_steps": 2, "seconds": 2.0}])
        said = []
        bar = SimpleNamespace(note=said.append)
        assert train_mod._tell_recoveries(bar, fake, 0, obs) == 2
        assert train_mod._tell_recoveries(bar, fake, 2, obs) == 2  # nothing new: not again
        got = samples(obs.metrics.exposition())
        assert value(got, "localnet_recoveries_total") == 2
        assert value(got, "localnet_recovery_steps_total", outcome="replayed") == 5
        assert value(got, "localnet_recovery_steps_total", outcome="lost") == 2
        assert len(said) == 2 and "stage0, stage2 died at step 30" in said[1]
    finally:
        obs.close()
