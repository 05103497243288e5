"""A real Prometheus scrapes a short run; its HTTP API must then hold the run's series.

Needs the `prometheus` binary (Debian's package; .ci/run installs it).  Without it the
test is skipped, except under CI (env CI set), where a missing binary is a failure.
Everything listens on 127.0.0.1 only.
"""

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from localnet.config import load_config
from localnet.train import train

ROOT = Path(__file__).resolve().parents[1]


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI: the prometheus binary is missing (.ci/run installs Debian's "
                        "prometheus package)")
        pytest.skip("no prometheus binary (apt-get install prometheus)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


FAST = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}


def sd_job(name: str, sd) -> dict:
    return {"job_name": name,
            "file_sd_configs": [{"files": [str(sd / "*.json")], "refresh_interval": "1s"}]}


@pytest.fixture
def prometheus(tmp_path):
    """A Prometheus on 127.0.0.1:<free port> scraping every 1 s the targets that runs
    announce in tmp_path/sd (metrics.sd_dir), with deploy/'s alerting rules.  Yields (api
    base URL, sd dir)."""
    sd = tmp_path / "sd"
    sd.mkdir()
    doc = {"global": FAST, "scrape_configs": [sd_job("localnet", sd)],
           "rule_files": [str(ROOT / "deploy/prometheus/alerts.yml")]}
    for base in serve(tmp_path, doc):
        yield base, sd


def serve(tmp_path, doc: dict):
    """Run Prometheus with config `doc` until the generator is closed; yields its API URL."""
    binary = prometheus_binary()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(doc))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited with {proc.returncode}:\n"
                            f"{(tmp_path / 'prometheus.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("prometheus not ready within 60 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def query(base: str, promql: str) -> list[dict]:
    d = get_json(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
    assert d["status"] == "success", d
    return d["data"]["result"]


def wait_for(base: str, promql: str, ok, timeout: float = 20.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        res = query(base, promql)
        if ok(res) or time.monotonic() > deadline:
            return res
        time.sleep(0.3)


def test_prometheus_scrapes_a_run(prometheus, tmp_path):
    base, sd = prometheus
    cfg = load_config(None, [
        "data.name=synthetic", "model.name=mlp", "model.widths=[32]", "train.epochs=2",
        "train.batch_size=32", "train.lr=0.05", "rule.name=fa", "metrics.alignment_every=4",
        "metrics.port=0", f"metrics.sd_dir={sd}", "metrics.linger_s=45"])
    summary = train(cfg, tmp_path / "run", progress=False)
    steps = summary["steps"]
    assert steps == 32
    # train() returned once Prometheus had dropped the run's target, after its file went
    active = get_json(f"{base}/api/v1/targets?state=active")["data"]["activeTargets"]
    assert [t for t in active if t["labels"].get("job") == "localnet"] == [], active

    # the final values: the endpoint lingered until Prometheus had scraped them
    res = wait_for(base, "last_over_time(localnet_step[10m])",
                   lambda r: r and float(r[0]["value"][1]) == steps)
    assert len(res) == 1, res
    assert float(res[0]["value"][1]) == steps
    m = res[0]["metric"]
    assert m["job"] == "localnet" and m["run"] == "run" and m["rule"] == "fa"
    assert m["instance"].startswith("127.0.0.1:")

    res = query(base, 'last_over_time(localnet_accuracy{split="test"}[10m])')
    assert float(res[0]["value"][1]) == pytest.approx(summary["test_accuracy"])

    # per layer
    res = query(base, "last_over_time(localnet_alignment_angle_degrees[10m])")
    got = {r["metric"]["layer"]: float(r["value"][1]) for r in res}
    assert got.keys() == summary["alignment"].keys() == {"fc1.linear", "head"}
    for layer, deg in summary["alignment"].items():
        assert got[layer] == pytest.approx(deg)

    # per actor: a histogram, one stage holding every unit
    res = query(base, "last_over_time(localnet_actor_update_seconds_count[10m])")
    assert [(r["metric"]["rank"], r["metric"]["unit"], float(r["value"][1])) for r in res] \
        == [("0", "fc1..head", float(steps))]

    # deploy/'s alerts, evaluated on the run's real series: every rule without an error,
    # and none firing for a healthy run -- the audit's counter among them, at 0
    res = query(base, "last_over_time(localnet_message_parameter_bytes_total[10m])")
    assert [float(r["value"][1]) for r in res] == [0.0]
    rules = [r for g in get_json(f"{base}/api/v1/rules")["data"]["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} >= {"LocalnetWeightTransport", "LocalnetRunStalled"}
    for r in rules:
        assert r["health"] == "ok" and r["state"] == "inactive", r
        assert not r["lastEvaluation"].startswith("0001"), r  # evaluated, not just loaded
    # nor pending or firing at any evaluation while the run was up (its series are stale
    # now, so a rule that fired would read inactive again)
    assert query(base, "last_over_time(ALERTS[10m])") == []
    # the run answered every scrape: it took its target file back and answered until
    # Prometheus had dropped the target, so no scrape found it gone
    res = query(base, 'min_over_time(up{job="localnet"}[10m])')
    assert [float(r["value"][1]) for r in res] == [1.0], res

    # the series the run left behind, all named localnet_*
    d = get_json(f"{base}/api/v1/label/__name__/values?"
                 + urllib.parse.urlencode({"match[]": '{job="localnet"}'}))
    names = set(d["data"])
    assert {"localnet_step", "localnet_loss", "localnet_accuracy", "localnet_learning_rate",
            "localnet_samples_per_second", "localnet_bubble_fraction", "localnet_epoch",
            "localnet_feedback_norm_ratio", "localnet_actor_forward_seconds_bucket",
            "localnet_actor_wait_seconds_sum", "localnet_actor_samples_total",
            "localnet_run_info"} <= names
    ours = {n for n in names if not n.startswith("scrape_") and n != "up"}
    assert all(n.startswith("localnet_") for n in ours), ours
    assert not list(sd.glob("*.json"))


def test_prometheus_scrapes_a_run_over_tls_with_a_client_certificate(tmp_path):
    """deploy/prometheus/prometheus-tls.yml, with test certificates: Prometheus scrapes a
    run's HTTPS endpoint presenting its client certificate and stores localnet_ series;
    the same scrape without the certificate is refused by the run."""
    from certs import make_certs

    certs = make_certs(tmp_path / "tls")
    sd = tmp_path / "sd"
    sd.mkdir()
    doc = yaml.safe_load((ROOT / "deploy/prometheus/prometheus-tls.yml").read_text())
    (job,) = doc["scrape_configs"]
    assert job["scheme"] == "https"
    tls = job["tls_config"]
    tls.update(ca_file=certs["ca"], cert_file=certs["client_cert"], key_file=certs["client_key"])
    job.pop("static_configs")
    job.update(sd_job("localnet", sd))
    nocert = {**sd_job("nocert", sd), "scheme": "https", "tls_config": {"ca_file": certs["ca"]}}
    doc.update({"global": FAST, "scrape_configs": [job, nocert]})
    for base in serve(tmp_path, doc):
        cfg = load_config(None, [
            "data.name=synthetic", "model.name=mlp", "model.widths=[32]", "train.epochs=1",
            "train.batch_size=32", "rule.name=fa", "metrics.port=0", f"metrics.sd_dir={sd}",
            "metrics.linger_s=45", f"metrics.tls.certfile={certs['server_cert']}",
            f"metrics.tls.keyfile={certs['server_key']}", f"metrics.tls.client_cafile={certs['ca']}"])
        summary = train(cfg, tmp_path / "run", progress=False)
        res = wait_for(base, "last_over_time(localnet_step[10m])",
                       lambda r: r and float(r[0]["value"][1]) == summary["steps"])
        assert [r["metric"]["job"] for r in res] == ["localnet"]
        assert float(res[0]["value"][1]) == summary["steps"]
        # each job scrapes on its own phase: the refused one may not have tried yet
        res = wait_for(base, "max_over_time(up[10m])", lambda r: len(r) == 2)
        up = {r["metric"]["job"]: float(r["value"][1]) for r in res}
        assert up == {"localnet": 1.0, "nocert": 0.0}  # the same target, without the cert
