"""A real multi-node Ray cluster on this machine: `ray start --head` plus two
`ray start --address` worker nodes, each its own raylet and object store, told apart by a
custom resource (node0, node1, node2), with token authentication on.

- The README's route: its `ray job submit` command, as written (plus a smaller data set),
  finishes, and summary.json puts actors on all three nodes.
- Node loss: a worker node's raylet is killed mid-run; the coordinator recreates that
  node's actors on the surviving nodes from the last checkpoint, replays the steps since,
  and the run finishes with the recovery in summary.json.
- A run with no address beside the cluster starts its own embedded Ray.

Needs `ray[default]` (the Jobs CLI; `pip install -e '.[cluster]'`, which .ci/run does).
Without it the module is skipped, except under CI, where that is a failure.  The cluster's
processes are found by its own temp dir and killed at the end; other Ray sessions on the
machine are left alone.
"""

import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "data.subset=640", "--set", "train.epochs=1", "--set", "data.test_subset=200",
         "--no-progress"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need_jobs_cli() -> None:
    try:
        import aiohttp  # noqa: F401  (what ray[default] adds for the Jobs CLI and dashboard)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI: ray[default] is missing (pip install -e '.[cluster]')")
        pytest.skip("ray[default] not installed (pip install -e '.[cluster]')")


def processes_of(temp_dir: str) -> list[int]:
    """PIDs whose command line names the cluster's temp dir (its raylets, GCS, agents)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and temp_dir.encode() in (d / "cmdline").read_bytes():
                out.append(int(d.name))
        except OSError:
            pass
    return out


def children_of(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
        except (OSError, ValueError, IndexError):
            pass
    return out


def kill_node(raylet: int) -> None:
    """What a lost machine does to its node: the raylet and every process it started
    (the node's workers, hence its actors) die at once."""
    for pid in [*children_of(raylet), raylet]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def raylet_of(resource: str, temp_dir: str) -> int:
    for pid in processes_of(temp_dir):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "raylet/raylet" in cmd and f"--static_resource_list={resource},1," in cmd:
            return pid
    raise AssertionError(f"no raylet with resource {resource}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three Ray nodes on this machine; yields (env for Ray commands, dashboard URL,
    GCS address, temp dir)."""
    need_jobs_cli()
    d = tmp_path_factory.mktemp("cluster")
    token = d / "token"
    token.write_text(secrets.token_hex(32))
    temp_dir = f"/tmp/lnc{os.getpid()}"  # short: Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token),
           # absolute: a job runs in its uploaded copy of the working dir, not here
           "LOCALNET_DATA": str(Path(os.environ.get("LOCALNET_DATA", ROOT.parent / "shared/data"))
                                .resolve())}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()

    def ray_start(*args):
        r = subprocess.run(["ray", "start", *args, "--num-cpus=2", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    try:
        ray_start("--head", f"--port={gcs}", "--resources={\"node0\": 1}",
                  f"--temp-dir={temp_dir}", "--include-dashboard=true",
                  "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}")
        for n in (1, 2):
            ray_start(f"--address=127.0.0.1:{gcs}", f"--resources={{\"node{n}\": 1}}")
        yield env, f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", temp_dir
    finally:
        for pid in processes_of(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        subprocess.run(["rm", "-rf", temp_dir], timeout=60)


def readme_job_command() -> str:
    """The README's `ray job submit` command (its continued lines joined)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "README.md").read_text())
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    cmds = [ln.strip() for b in blocks for ln in b.splitlines()
            if ln.strip().startswith("ray job submit")]
    assert len(cmds) == 1, cmds
    return cmds[0]


def test_the_readmes_cluster_route_spreads_actors_over_every_node(cluster, tmp_path):
    env, dashboard, _, _ = cluster
    argv = shlex.split(readme_job_command())
    argv[argv.index("--address") + 1] = dashboard  # this cluster's dashboard port
    assert "--working-dir" in argv and "runtime.placement=SPREAD" in argv
    out = tmp_path / "run"
    r = subprocess.run([*argv, *SMALL, "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    nodes = summary["runtime"]["actor_nodes"]
    assert summary["runtime"]["actors"] == len(nodes) == 11
    assert all(nodes) and len(set(nodes)) == 3  # every actor named, on all three nodes
    # three Ray nodes on one machine share its cores: counted once, per host
    cores = len(os.sched_getaffinity(0))
    assert summary["runtime"]["crowding"] == ([11, cores] if cores < 11 else None)
    assert summary["runtime"]["gpu_sharing"] is None  # CPU actors
    # CPU actors: every payload over gloo, none through a device group
    assert summary["runtime"]["device_edges"] == []
    assert summary["runtime"]["data_plane"] == "torch.distributed gloo"
    # on a cluster it did not start, the runtime still gives every actor jemalloc
    # (runtime.allocator's default), through each actor's runtime env
    assert summary["runtime"]["allocators"] == ["jemalloc"]
    # the edges between nodes carried activations one way and errors back
    cross = summary["runtime"]["cross_node_edges"]
    edges = json.loads((out / "messages.json").read_text())["edges"]
    assert cross, summary["runtime"]["actor_nodes"]
    for e in cross:
        src, dst = e.split("->")
        assert edges[e]["activation"]["payload_bytes"] > 0, e
        assert edges[f"{dst}->{src}"]["error"]["payload_bytes"] > 0, e


def test_a_run_without_an_address_beside_a_ray_start_gets_its_own_ray(cluster, tmp_path):
    """`ray start` on this machine records its address where a bare ray.init() looks for
    one to join (the temp dir's ray_current_cluster).  A run with no runtime.address and
    no $RAY_ADDRESS still starts its embedded Ray, as the README says, rather than
    joining that cluster -- where Ray refuses the embedded Ray's CPU count -- and leaves
    the record pointing at the cluster."""
    env, _, gcs, _ = cluster
    tmp = Path(f"/tmp/lnr{os.getpid()}")  # short: Ray's socket paths live under it
    record = tmp / "ray" / "ray_current_cluster"
    record.parent.mkdir(parents=True)
    record.write_text(gcs)
    try:
        sets = ["data.name=synthetic", "model.name=mlp", "model.widths=[32]", "rule.name=fa",
                "train.epochs=1", "train.batch_size=32", "data.subset=128",
                "runtime.executor=ray"]
        r = subprocess.run([sys.executable, "-m", "localnet", "run",
                            str(ROOT / "configs/mnist_mlp.yaml"), "--no-progress", "--out",
                            str(tmp_path / "run")] + [a for s in sets for a in ("--set", s)],
                           cwd=ROOT, env={**env, "RAY_TMPDIR": str(tmp)}, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["steps"] == 128 // 32 and len(set(summary["runtime"]["actor_nodes"])) == 1
        assert record.read_text() == gcs
    finally:
        subprocess.run(["rm", "-rf", str(tmp)], timeout=60)


def test_a_lost_node_costs_no_step(cluster, tmp_path):
    """Worker node 2 dies mid-run (kill -9 of its raylet and its workers): the
    coordinator recreates its actors on the surviving nodes from the last checkpoint,
    replays the steps since, and the run finishes."""
    env, _, gcs, temp_dir = cluster
    out = tmp_path / "run"
    sets = ["data.name=synthetic", "model.name=mlp", "model.widths=[256,256,256]",
            "rule.name=fa", "train.epochs=1", "train.batch_size=8", "train.lr=0.01",
            "metrics.alignment_every=1", "runtime.executor=ray", f"runtime.address={gcs}",
            "runtime.placement=SPREAD", "runtime.checkpoint_every=4", "runtime.timeout_s=120"]
    cmd = [sys.executable, "-m", "localnet", "run", str(ROOT / "configs/mnist_mlp.yaml"),
           "--no-progress", "--out", str(out)] + [a for s in sets for a in ("--set", s)]
    victim = raylet_of("node2", temp_dir)
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    killed = False
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        steps = (out / "steps.jsonl").read_text().splitlines() if (out / "steps.jsonl").exists() else []
        if not killed and len(steps) >= 6:
            kill_node(victim)
            killed = True
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    log.close()
    text = (tmp_path / "log.txt").read_text()
    assert killed and proc.returncode == 0, text[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 512 // 8
    recs = summary["runtime"]["recoveries"]
    assert recs and all(r["lost_steps"] == 0 for r in recs), recs
    # The restore point is a checkpoint, and the replay retrains every step that had
    # finished since: up to the one before the failed step, or up to that step itself
    # when the call that failed came after it (saving the checkpoint at step 8, say).
    # How many depends on when the loss is noticed.
    rec = recs[0]
    assert rec["restored_step"] % 4 == 0 and 0 <= rec["replayed_steps"] <= 4, rec
    assert rec["restored_step"] + rec["replayed_steps"] in (rec["at_step"] - 1,
                                                           rec["at_step"]), rec
    assert len(set(summary["runtime"]["actor_nodes"])) == 2  # node 2 is gone


def test_prometheus_scrapes_localnet_and_every_ray_node(cluster, tmp_path):
    """deploy/prometheus/prometheus.yml against the three-node cluster: its `ray` job
    reads the service-discovery file the Ray head writes and scrapes Ray's metrics agent
    on every node; its `localnet` job scrapes a run on the cluster (metrics.sd_dir)."""
    import yaml
    from test_metrics_prometheus import FAST, query, serve, wait_for

    env, _, gcs, temp_dir = cluster
    ray_sd = Path(temp_dir) / "prom_metrics_service_discovery.json"
    deadline = time.monotonic() + 120
    while not ray_sd.exists() and time.monotonic() < deadline:
        time.sleep(1)
    assert ray_sd.exists(), f"the Ray head wrote no {ray_sd.name} in {temp_dir}"
    sd = tmp_path / "sd"
    sd.mkdir()
    doc = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    assert set(jobs) == {"localnet", "ray"}
    jobs["localnet"].pop("static_configs")
    jobs["localnet"]["file_sd_configs"] = [{"files": [str(sd / "*.json")], "refresh_interval": "1s"}]
    jobs["ray"]["file_sd_configs"] = [{"files": [str(ray_sd)], "refresh_interval": "1s"}]
    # Ray's agents render every node's series: on a busy 2-core box that can take over FAST's 1 s
    jobs["ray"].update(scrape_interval="3s", scrape_timeout="3s")
    doc["global"] = FAST
    for base in serve(tmp_path, doc):
        sets = ["data.name=synthetic", "model.name=mlp", "model.widths=[32,32]",
                "rule.name=fa", "train.epochs=1", "train.batch_size=32", "data.subset=256",
                "runtime.executor=ray", f"runtime.address={gcs}", "runtime.placement=SPREAD",
                "metrics.port=0", f"metrics.sd_dir={sd}", "metrics.linger_s=30"]
        r = subprocess.run([sys.executable, "-m", "localnet", "run",
                            str(ROOT / "configs/mnist_mlp.yaml"), "--no-progress", "--out",
                            str(tmp_path / "run")] + [a for s in sets for a in ("--set", s)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        steps = json.loads((tmp_path / "run" / "summary.json").read_text())["steps"]
        res = wait_for(base, 'last_over_time(localnet_step{job="localnet"}[10m])',
                       lambda r: r and float(r[0]["value"][1]) == steps)
        assert res and float(res[0]["value"][1]) == steps
        # every target in Ray's file up, one metrics agent per node at least
        targets = {t for group in json.loads(ray_sd.read_text()) for t in group["targets"]}
        # each agent answered a scrape at least once: a busy machine's agent may miss the
        # first ones (1-s timeout), so wait for its first success, not its first try
        up = wait_for(base, 'max_over_time(up{job="ray"}[10m])',
                      lambda r: {x["metric"]["instance"] for x in r
                                 if float(x["value"][1]) == 1.0} >= targets, timeout=90)
        assert len(targets) >= 3, targets
        assert {x["metric"]["instance"]: float(x["value"][1]) for x in up} == \
            {t: 1.0 for t in targets}
        exporting = query(base, 'count by (instance) ({job="ray", __name__=~"ray_.+"})')
        assert len(exporting) >= 3, exporting  # Ray's own series from each node's agent
        # each actor's account of its main thread: the data plane's part is there, per actor
        plane = query(base, 'last_over_time(localnet_actor_cpu_seconds_total'
                            '{job="localnet", part="plane"}[10m])')
        assert sorted(x["metric"]["rank"] for x in plane) == ["0", "1", "2"], plane
        assert all(float(x["value"][1]) > 0 for x in plane), plane
