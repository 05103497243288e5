"""deploy/: every manifest parses, and the commands, config keys, files, ports and metric
names it mentions exist."""

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from localnet.cli import parser
from localnet.config import load_config
from localnet.metrics import METRICS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
IMAGE = "localnet:0.1.0"


def load_yaml(rel: str) -> list:
    return [d for d in yaml.safe_load_all((DEPLOY / rel).read_text()) if d is not None]


def exposed_names() -> set[str]:
    """Sample names a scrape can show."""
    out = set()
    for _, s in METRICS:
        if s.type == "histogram":
            out |= {s.name + x for x in ("_bucket", "_sum", "_count", "_created")}
        elif s.type == "counter":
            out |= {s.name, s.name.removesuffix("_total") + "_created"}
        else:
            out.add(s.name)
    return out


def check_localnet_command(cmd: str):
    """Parse a `localnet ...` command line as the CLI would; `run` configs must load."""
    argv = shlex.split(cmd)
    assert argv[0] == "localnet", cmd
    args = parser().parse_args(argv[1:])
    if args.command == "run":
        assert args.config and (ROOT / args.config).is_file(), cmd
        return load_config(ROOT / args.config, args.set)  # every --set key must exist
    return args


def test_every_file_parses():
    files = sorted(p for p in DEPLOY.rglob("*") if p.is_file())
    assert files
    for p in files:
        if p.suffix in (".yml", ".yaml"):
            assert list(yaml.safe_load_all(p.read_text())), p
        elif p.suffix == ".json":
            json.loads(p.read_text())


def test_named_files_exist():
    """Every deploy/... and configs/... path that a manifest or the README names."""
    texts = [p.read_text() for p in DEPLOY.rglob("*") if p.is_file() and p.suffix != ".json"]
    named = set()
    for text in texts:
        named |= set(re.findall(r"(?<![\w/])((?:deploy|configs)/[\w./-]*\w)", text))
    assert {"deploy/Dockerfile", "deploy/ray/cluster.yaml", "deploy/kuberay/rayjob.yaml",
            "configs/resnet_pfa.yaml", "deploy/prometheus/prometheus.yml"} <= named
    for rel in named:
        assert (ROOT / rel).exists(), f"{rel} is named in deploy/ but does not exist"


def test_documented_localnet_commands_parse():
    """In the README's code blocks and in the manifests' comments."""
    cmds = []
    for p in [DEPLOY / "README.md", *DEPLOY.rglob("*.yaml"), DEPLOY / "Dockerfile"]:
        text = re.sub(r"\\\n\s*", " ", p.read_text())  # join continued lines
        if p.suffix == ".md":
            text = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S))
        for line in text.splitlines():
            line = line.lstrip("# ")
            for m in re.finditer(r"(?:^|&& |\s)(localnet (?:run|report|validate|rules)\b[^'\n#`]*)", line):
                cmds.append(m.group(1).strip())
    assert len(cmds) >= 6
    for cmd in cmds:
        check_localnet_command(cmd)


# ------------------------------------------------------------------ Prometheus


def test_prometheus_config():
    (cfg,) = load_yaml("prometheus/prometheus.yml")
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == {"localnet", "ray"}
    assert jobs["localnet"]["static_configs"][0]["targets"] == ["127.0.0.1:9464"]
    sd_glob = jobs["localnet"]["file_sd_configs"][0]["files"][0]
    assert sd_glob == "/tmp/localnet/sd/*.json"
    assert "metrics.sd_dir=/tmp/localnet/sd" in (DEPLOY / "README.md").read_text()
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    # Ray writes its service-discovery file under exactly that name
    from ray._private import ray_constants
    assert ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE == "prom_metrics_service_discovery.json"


def test_promtool_accepts_the_config():
    promtool = promtool_binary()
    r = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus/prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def promtool_binary() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("CI: promtool (Debian's prometheus package) is missing")
        pytest.skip("no promtool")
    return promtool


def alert_rules() -> list[dict]:
    (doc,) = load_yaml("prometheus/alerts.yml")
    return doc["groups"]


def test_the_prometheus_configs_load_the_alerts():
    for rel in ("prometheus/prometheus.yml", "prometheus/prometheus-tls.yml"):
        (cfg,) = load_yaml(rel)
        assert cfg["rule_files"] == ["alerts.yml"], rel  # beside the config
    (compose,) = load_yaml("compose.yaml")
    mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"])
    assert mounts["./prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
    assert mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    # the operator's copy is the same rules, for kube-prometheus-stack
    (rule,) = load_yaml("kuberay/prometheusrule.yaml")
    assert rule["kind"] == "PrometheusRule" and rule["spec"]["groups"] == alert_rules()
    (mon, _) = load_yaml("kuberay/podmonitor.yaml")
    assert rule["metadata"]["labels"]["release"] == mon["metadata"]["labels"]["release"]


def test_alerts_read_only_series_a_run_serves():
    known = exposed_names() | {"up"}
    rules = [r for g in alert_rules() for r in g["rules"]]
    assert len({r["alert"] for r in rules}) == len(rules)
    for r in rules:
        names = set(re.findall(r"\b(localnet_\w+|up)\b(?=[\[{\s]|$)", r["expr"]))
        assert names and names <= known, (r["alert"], names - known)
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


def test_alerts_fire_when_they_should_and_only_then():
    """promtool evaluates the rules on the series of tests/prometheus/alerts_test.yml: each
    alert fires on its case, with its text rendered, and stays quiet on the others."""
    promtool = promtool_binary()
    r = subprocess.run([promtool, "check", "rules", str(DEPLOY / "prometheus/alerts.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT / "tests/prometheus")
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------ Grafana


def test_grafana_provisioning():
    (ds,) = load_yaml("grafana/provisioning/datasources/prometheus.yml")
    (src,) = ds["datasources"]
    assert src["type"] == "prometheus" and src["url"] == "http://127.0.0.1:9090"
    (dash,) = load_yaml("grafana/provisioning/dashboards/localnet.yml")
    paths = {p["name"]: p["options"]["path"] for p in dash["providers"]}
    assert paths["localnet"] == "${LOCALNET_DASHBOARDS}"
    (compose,) = load_yaml("compose.yaml")
    graf = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in graf["volumes"])
    assert mounts["./grafana/dashboards"] == graf["environment"]["LOCALNET_DASHBOARDS"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    for svc in compose["services"].values():
        for v in svc.get("volumes", []):
            host = v.split(":")[0]
            if host.startswith("./"):
                assert (DEPLOY / host).exists(), v
    prom = compose["services"]["prometheus"]
    assert "--web.listen-address=127.0.0.1:9090" in prom["command"]
    assert graf["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"


def test_dashboard_panels_and_queries():
    d = json.loads((DEPLOY / "grafana/dashboards/localnet.json").read_text())
    panels = [p for p in d["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"].lower() for p in panels)
    for topic in ("loss", "accuracy", "angle between w and the feedback", "throughput per actor",
                  "wait per step per actor", "message bytes/s per edge",
                  "cos(sent, decoded) per link", "alerts"):
        assert topic in titles, topic
    # the alerts' panel reads the series Prometheus keeps for deploy/'s rules
    (alerts,) = [p for p in panels if "alerts" in p["title"].lower()]
    assert [t["expr"] for t in alerts["targets"]] == ['ALERTS{instance=~"$instance"}']
    known = exposed_names()
    used = set()
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            for name in re.findall(r"\b(localnet_\w+)", t["expr"]):
                assert name in known, f"{p['title']}: unknown series {name}"
                used.add(name)
    assert {"localnet_alignment_angle_degrees", "localnet_message_bytes_total",
            "localnet_actor_samples_total", "localnet_actor_wait_seconds_sum",
            "localnet_loss", "localnet_accuracy", "localnet_link_cos",
            "localnet_link_rest"} <= used
    var = {v["name"]: v for v in d["templating"]["list"]}
    assert var["datasource"]["query"] == "prometheus" and "localnet_step" in var["instance"]["definition"]


# ------------------------------------------------------------------ Ray and KubeRay


def test_ray_cluster_launcher_config():
    import jsonschema
    import ray

    (cfg,) = load_yaml("ray/cluster.yaml")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler/ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["docker"]["image"] == IMAGE
    assert cfg["head_node_type"] in cfg["available_node_types"]
    for dst, src in cfg["file_mounts"].items():
        assert (ROOT / src).exists(), src
        assert dst.startswith(docker_workdir()), dst
    commands = cfg["setup_commands"] + cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    for cmd in commands:
        for part in re.split(r";|&&", cmd):
            assert shlex.split(part)[0] in ("ray", "localnet", "ulimit"), part
    starts = [c for c in commands if "ray start" in c]
    assert len(starts) == 2 and all("--metrics-export-port=8080" in c for c in starts)


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("rel", ["kuberay/rayjob.yaml", "kuberay/raycluster.yaml"])
def test_kuberay_manifests(rel):
    (doc,) = load_yaml(rel)
    assert doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    assert doc["kind"] in ("RayJob", "RayCluster")
    assert spec["rayVersion"] == docker_arg("RAY_VERSION")
    for c in containers(spec):
        assert c["image"] == IMAGE
    head = spec["headGroupSpec"]
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["localnet"] == 9464 and ports["metrics"] == 8080
    for g in [head, *spec["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        assert g["rayStartParams"]["metrics-export-port"] == "8080"
    # the PodMonitors scrape ports these pods name, on pods with these labels
    mons = load_yaml("kuberay/podmonitor.yaml")
    names = {p["name"] for c in containers(spec) for p in c.get("ports", [])}
    labels = head["template"]["metadata"]["labels"]
    for m in mons:
        assert m["kind"] == "PodMonitor"
        for ep in m["spec"]["podMetricsEndpoints"]:
            assert ep["port"] in names
        wanted = {k: v for k, v in m["spec"]["selector"]["matchLabels"].items()
                  if not k.startswith("ray.io/")}  # ray.io/ labels are KubeRay's own
        assert wanted.items() <= labels.items()


def test_rayjob_runs_resnet_pfa_on_ray_with_an_open_endpoint():
    (job,) = load_yaml("kuberay/rayjob.yaml")
    parts = [p.strip() for p in job["spec"]["entrypoint"].split("&&")]
    assert parts[0] == f"cd {docker_workdir()}"
    assert parts[1].startswith("localnet run configs/resnet_pfa.yaml")
    cfg = check_localnet_command(parts[1])
    assert cfg.runtime.executor == "ray" and cfg.rule.name == "pfa" and cfg.model.name == "resnet20"
    assert cfg.metrics.port == 9464 and cfg.metrics.address == "0.0.0.0"


# ------------------------------------------------------------------ the image


def dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def docker_workdir() -> str:
    return [rest for op, rest in dockerfile() if op == "WORKDIR"][-1]


def docker_arg(name: str) -> str:
    for op, rest in dockerfile():
        if op == "ARG" and rest.startswith(name + "="):
            return rest.split("=", 1)[1]
    raise KeyError(name)


def test_dockerfile():
    ins = dockerfile()
    ops = [op for op, _ in ins]
    assert ops[0] in ("ARG", "FROM") and "FROM" in ops
    for op, rest in ins:
        if op == "COPY":
            *srcs, _ = rest.split()
            for s in srcs:
                assert (ROOT / s).exists(), f"COPY {s}: not in the repository"
    assert docker_workdir() == "/app"
    cmd = json.loads([rest for op, rest in ins if op == "CMD"][-1])
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert cmd[0] == "localnet" and 'localnet = "localnet.cli:main"' in pyproject
    exposed = {int(p) for op, rest in ins if op == "EXPOSE" for p in rest.split()}
    assert {9464, 8080, 6379, 8265} <= exposed
    run = " ".join(rest for op, rest in ins if op == "RUN")
    assert "ray[default]==${RAY_VERSION}" in run  # dashboard, job server, metrics agent
    assert "localnet --help" in run
