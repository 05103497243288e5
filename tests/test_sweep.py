"""`localnet sweep`: a small grid on synthetic data, its outputs, and resuming."""

import csv
import json
import math
import os

import pytest
import torch
import yaml

from localnet.cli import main
from localnet.config import ConfigError
from localnet.files import run_lock
from localnet.sweep import parse_grid, point_name, points, sweep


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def test_grid_points_and_names():
    grid = parse_grid(["rule.name=fa,kp", "channel.error.codec=fp32,int8,sign"])
    pts = points(grid)
    assert len(pts) == 6 and pts[0] == [("rule.name", "fa"), ("channel.error.codec", "fp32")]
    assert point_name(pts[-1]) == "rule.name-kp__channel.error.codec-sign"
    with pytest.raises(ConfigError, match=r"^--grid expects key=v1,v2,\.\.\., got 'rule.name'"):
        parse_grid(["rule.name"])
    with pytest.raises(ConfigError, match=r"^--vary 'channel.error.drop=': needs a key"):
        parse_grid(["channel.error.drop="], "--vary")  # named as given (it said --grid)
    # a list or a map is one value (its commas split it into '[64' and '64]' before)
    assert parse_grid(["model.widths=[64],[64, 64]", "runtime.partition={stages: 2},'a,b'"]) == [
        ("model.widths", ["[64]", "[64, 64]"]), ("runtime.partition", ["{stages: 2}", "'a,b'"])]


def test_points_that_are_one_run_or_share_a_directory_are_refused(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: synthetic}\nmodel: {name: mlp, widths: [16]}\n")
    out = tmp_path / "sw"
    assert main(["sweep", str(cfg), "--grid", "channel.error.drop=0.5,.5", "--out", str(out)]) == 2
    assert ("localnet: sweep: channel.error.drop-0.5 and channel.error.drop-.5 are the same run "
            "(the same config); give one of them") in capsys.readouterr().err
    assert main(["sweep", str(cfg), "--grid", "rule.name=fa", "--vary", "channel.error.drop=0",
                 "--vary", "channel.error.delay=0", "--out", str(out)]) == 2
    assert "rule.name-fa__channel.error.drop-0 and rule.name-fa__channel.error.delay-0 are the " \
           "same run" in capsys.readouterr().err
    # values a directory name cannot tell apart
    assert main(["sweep", str(cfg), "--grid", "model.widths=[8,8],[8, 8]", "--out", str(out)]) == 2
    assert ("localnet: --grid model.widths: [8,8] and [8, 8] would share one point's directory, "
            "model.widths-_8_8_; give one of them") in capsys.readouterr().err
    assert not out.exists()


def test_a_sweep_with_nothing_to_sweep_two_ways_to_run_or_a_file_for_out_is_refused(tmp_path, capsys):
    """No --grid and no --vary would run the config once, as `localnet run` does, under a
    sweep's name; --jobs beside --ray would be ignored.  Both are refused, and no sweep
    directory is made."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: synthetic}\nmodel: {name: mlp, widths: [16]}\n")
    out = tmp_path / "sw"
    assert main(["sweep", str(cfg), "--out", str(out)]) == 2
    assert ("localnet: sweep: nothing to sweep: give --grid and/or --vary (one run of the "
            "config as it is: localnet run CONFIG)") in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(cfg), "--grid", "rule.name=fa,kp", "--jobs", "2", "--ray",
              "--out", str(out)])
    assert exit_.value.code == 2
    assert "argument --ray: not allowed with argument --jobs" in capsys.readouterr().err
    assert not out.exists()
    # a key swept twice, a value twice, a key both set and swept: points whose names lie,
    # or one point run twice into one directory
    for args, says in ((["--grid", "rule.name=fa,fa"], "--grid rule.name: fa given twice"),
                       (["--grid", "rule.name=fa", "--vary", "rule.name=kp"],
                        "sweep: rule.name is swept twice (--grid and --vary)"),
                       (["--grid", "rule.name=fa", "--grid", "rule.name=kp"],
                        "sweep: rule.name is swept twice (--grid and --grid)"),
                       (["--grid", "rule.name=fa,kp", "--set", "rule.name=pfa"],
                        "sweep: rule.name is both --set and swept (--grid)")):
        assert main(["sweep", str(cfg), *args, "--out", str(out)]) == 2
        assert f"localnet: {says}" in capsys.readouterr().err
    assert not out.exists()
    for out in (cfg, cfg / "sub"):  # a file in --out's way is named, and left as it was
        assert main(["sweep", str(cfg), "--grid", "rule.name=fa", "--out", str(out)]) == 2
        assert (f"localnet: sweep: --out {out}: a file is in the way"
                in capsys.readouterr().err)
    assert cfg.read_text().startswith("data: {name: synthetic}")
    # a directory of other files (`--out .`): its own sweep.csv would be written over,
    # and the points' runs put among its files
    (tmp_path / "sweep.csv").write_text("mine\n")
    (tmp_path / "empty").mkdir()  # a point's directory before its run began holds nothing
    (tmp_path / ".nfs0001").write_text("")  # a shared filesystem's, for a file still open
    assert main(["sweep", str(cfg), "--grid", "rule.name=fa", "--out", str(tmp_path)]) == 2
    assert (f"localnet: sweep: --out {tmp_path} holds other files (c.yaml): a sweep goes into "
            f"a new or empty directory, or one a sweep made" in capsys.readouterr().err)
    assert (tmp_path / "sweep.csv").read_text() == "mine\n"
    assert sorted(f.name for f in tmp_path.iterdir()) == [".nfs0001", "c.yaml", "empty",
                                                          "sweep.csv"]


def test_sweep_writes_table_and_plot_and_resumes(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: synthetic}\nmodel: {name: mlp, widths: [16]}\n"
                   "train: {batch_size: 32, max_steps: 3, lr: 0.05}\n"
                   "metrics: {alignment_every: 0}\n")
    out = tmp_path / "sweep"
    grid = ["rule.name=fa,kp", "channel.error.codec=fp32,sign"]
    res = sweep(cfg, grid, ["seed=1"], out, log=lambda m: None)
    assert len(res["ran"]) == 4 and res["skipped"] == []
    for f in ("sweep.csv", "sweep.md", "sweep.png"):
        assert (out / f).stat().st_size > 0
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["rule"], r["restriction"]) for r in rows] == [
        ("fa", "error.codec=fp32"), ("fa", "error.codec=sign"),
        ("kp", "error.codec=fp32"), ("kp", "error.codec=sign")]
    bits = {r["restriction"]: float(r["error_bits_per_sample"]) for r in rows}
    assert bits == {"error.codec=fp32": 16 * 32, "error.codec=sign": (16 * 32 // 8 + 4) * 8 / 32}
    assert all(0 <= float(r["test_accuracy"]) <= 1 and r["status"] == "ok" for r in rows)
    md = (out / "sweep.md").read_text()
    assert ("| rule | restriction | test accuracy | test loss | error bits/sample | error cos "
            "| wall s |") in md
    summary = out / "rule.name-fa__channel.error.codec-sign" / "summary.json"
    ch = json.loads(summary.read_text())["channels"]
    assert ch["error"]["head->fc1"]["codec"] == "sign"
    # what arrives of each error message: all of it under fp32, a direction's share under
    # sign (about sqrt(2/pi) on errors near Gaussian), as the run's summary says
    cos = {(r["rule"], r["restriction"]): float(r["error_cos"]) for r in rows}
    assert cos["fa", "error.codec=fp32"] == 1.0
    assert cos["fa", "error.codec=sign"] == pytest.approx(ch["error_cos"])
    assert 0.3 < cos["fa", "error.codec=sign"] < 0.95
    # and what arrived besides each message's direction: none under fp32
    rest = {(r["rule"], r["restriction"]): float(r["error_rest"]) for r in rows}
    assert rest["fa", "error.codec=fp32"] == 0.0
    assert rest["fa", "error.codec=sign"] == pytest.approx(ch["error_rest"])
    assert rest["fa", "error.codec=sign"] == pytest.approx(
        ch["error_norm_ratio"] * math.sqrt(1 - ch["error_cos"] ** 2))
    assert f"| {ch['error_cos']:.3f} |" in md
    # each run's CPU, as its summary records it: one kind here, so sweep.md says nothing
    kind = json.loads(summary.read_text())["cpu"]
    assert kind["capability"] == torch.backends.cpu.get_cpu_capability()
    assert {r["cpu"] for r in rows} == {f"{kind['model']} ({kind['id']}; {kind['capability']})"}
    assert "kinds of CPU" not in md
    stamp = summary.stat().st_mtime_ns

    # a rerun (through the CLI) does not redo finished points, beside the report of them
    assert main(["report", str(out)]) == 0 and (out / "report" / "curves.png").exists()
    assert main(["sweep", str(cfg), "--grid", grid[0], "--grid", grid[1], "--set", "seed=1",
                 "--out", str(out)]) == 0
    assert "ran 0, skipped 4 finished" in capsys.readouterr().out
    assert summary.stat().st_mtime_ns == stamp
    # an unfinished point goes on from its checkpoint: here it had nothing left to
    # train, so it reports what its checkpoint holds, as it did
    point = out / "rule.name-kp__channel.error.codec-sign"
    first = json.loads((point / "summary.json").read_text())
    (point / "summary.json").unlink()
    res = sweep(cfg, grid, ["seed=1"], out, log=lambda m: None)
    assert res["ran"] == [point.name] and len(res["skipped"]) == 3
    again = json.loads((point / "summary.json").read_text())
    assert (again["steps"], again["test_accuracy"]) == (first["steps"], first["test_accuracy"])
    # a rerun with another config reports nothing under settings it did not run with
    stamp = summary.stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"was run with another config \(seed: 1 there, 2 now"):
        sweep(cfg, grid, ["seed=2"], out, log=lambda m: None)
    assert summary.stat().st_mtime_ns == stamp
    # a point an earlier localnet ran, before sign had `error_feedback`: the option comes
    # in at its default, which is what that run did, so the point is no other config
    saved = yaml.safe_load((summary.parent / "config.yaml").read_text())
    assert saved["channel"]["error"].pop("error_feedback") is False
    (summary.parent / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    res = sweep(cfg, grid, ["seed=1"], out, log=lambda m: None)
    assert res["ran"] == [] and summary.stat().st_mtime_ns == stamp
    # a second sweep into a directory a sweep is running in is refused before any point
    tables = {f: (out / f).read_bytes() for f in ("sweep.csv", "sweep.md")}
    (point / "summary.json").unlink()
    with run_lock(out, "sweep"):
        assert main(["sweep", str(cfg), "--grid", grid[0], "--grid", grid[1], "--set",
                     "seed=1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{out} is in use by another localnet sweep (pid {os.getpid()} " in err
    assert "run this command again" in err and "Traceback" not in err
    assert not (point / "summary.json").exists()  # the unfinished point did not run
    assert {f: (out / f).read_bytes() for f in tables} == tables


def test_a_point_whose_logits_blew_up_is_named_beside_its_accuracy(tmp_path):
    """A rate past a rule's stable one can end at a fair accuracy and a loss above ln C
    (train.py, `above_chance`): the run's row gives its test loss, and sweep.md names it
    under the table; the point at a stable rate is not named."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: synthetic}\nmodel: {name: mlp, widths: [32]}\n"
                   "train: {batch_size: 32, epochs: 2}\nrule: {name: bp}\n"
                   "metrics: {alignment_every: 0}\n")
    res = sweep(cfg, ["train.lr=0.5,0.05"], [], tmp_path / "s", log=lambda m: None)
    rows = {r["point"]: r for r in csv.DictReader(open(tmp_path / "s" / "sweep.csv"))}
    blown, calm = rows["train.lr-0.5"], rows["train.lr-0.05"]
    summaries = {}
    for name, r in rows.items():
        summaries[name] = json.loads((tmp_path / "s" / name / "summary.json").read_text())
        assert float(r["test_loss"]) == summaries[name]["test_loss"]
    b = summaries["train.lr-0.5"]["loss_above_chance"]
    assert blown["loss_above_chance"] == (f"epoch 2: train loss {b['loss']:.4g} > ln C = 2.303 "
                                          f"at accuracy {b['accuracy']:.4f}")
    assert float(blown["test_accuracy"]) > 0.5  # a fair accuracy: not what it reads as
    assert calm["loss_above_chance"] == "" and float(calm["test_loss"]) < math.log(10)
    assert res["ran"] == ["train.lr-0.5", "train.lr-0.05"]
    md = (tmp_path / "s" / "sweep.md").read_text()
    assert "| rule | restriction | test accuracy | test loss | error bits/sample |" in md
    named = md.split("that no lower rate mends:", 1)[1]
    assert f"- bp, train.lr=0.5: {blown['loss_above_chance']}" in named
    assert "train.lr=0.05" not in named


def test_a_point_that_diverges_is_a_result_and_the_sweep_goes_on(tmp_path, capsys):
    """Too high a rate is what a sweep over rates finds: its row says where it diverged,
    and the other points run and report as usual."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: synthetic}\nmodel: {name: mlp, widths: [16]}\n"
                   "train: {batch_size: 32, max_steps: 4, lr: 0.05}\n"
                   "metrics: {alignment_every: 1}\n")
    lines = []
    res = sweep(cfg, ["train.lr=1e12,0.05"], [], tmp_path / "s", log=lines.append)
    rows = {r["point"]: r for r in res["rows"]}
    bad, good = rows["train.lr-1e12"], rows["train.lr-0.05"]
    step = len((tmp_path / "s" / "train.lr-1e12" / "steps.jsonl").read_text().splitlines()) + 1
    assert bad["status"] == f"diverged at step {step} (NaN or inf; train.lr-1e12/stopped.json)"
    stopped = json.loads((tmp_path / "s" / "train.lr-1e12" / "stopped.json").read_text())
    assert (stopped["how"], stopped["after_step"]) == ("diverged", step - 1)
    assert good["status"] == "ok" and 0 <= good["test_accuracy"] <= 1
    assert res["ran"] == ["train.lr-0.05"] and res["diverged"] == ["train.lr-1e12"]
    assert f"[sweep 1/2] train.lr-1e12: diverged at step {step}" in "\n".join(lines)
    # the command succeeds: the sweep found what it was run for (it reruns the diverged
    # point, which has nothing to resume, and diverges the same way)
    assert main(["sweep", str(cfg), "--grid", "train.lr=1e12,0.05", "--out",
                 str(tmp_path / "s")]) == 0
    assert "(ran 1 (1 diverged), skipped 1 finished)" in capsys.readouterr().out


def test_a_stopped_sweep_names_the_command_that_goes_on(tmp_path, monkeypatch, capsys):
    """SIGTERM (or Ctrl-C) mid-sweep: one line with the command that goes on -- the same
    one, with --out the sweep's directory -- which then runs only what is left."""
    import shlex
    import signal
    import subprocess
    import sys
    import time

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: synthetic}\nmodel: {name: mlp, widths: [16]}\n"
                   "train: {batch_size: 32, epochs: 100, lr: 0.05, threads: 1}\n"
                   "metrics: {alignment_every: 0}\n")
    cmd = ["sweep", str(cfg), "--grid", "rule.name=fa,kp,dfa", "--set", "seed=3"]
    proc = subprocess.Popen([sys.executable, "-m", "localnet", *cmd], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("runs/sweep-*/rule.name-fa/summary.json")) and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    (out,) = tmp_path.glob("runs/sweep-*")
    done = sorted(p.parent.name for p in out.glob("*/summary.json"))
    assert "rule.name-fa" in done and len(done) < 3
    line = err.strip().splitlines()[-1]
    assert line.startswith("localnet: terminated (SIGTERM); the points that ended are kept."
                           "  Go on with: localnet sweep ") and "Traceback" not in err
    again = shlex.split(line.split("Go on with: ", 1)[1])
    assert again == ["localnet", *cmd, "--out", str(out.relative_to(tmp_path))]
    monkeypatch.chdir(tmp_path)  # where it was said
    assert main(again[1:]) == 0
    assert f"ran {3 - len(done)}, skipped {len(done)} finished" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["rule"], r["status"]) for r in rows] == [("fa", "ok"), ("kp", "ok"), ("dfa", "ok")]


def test_vary_is_one_restriction_at_a_time_and_jobs_run_in_processes(tmp_path):
    grid, vary = parse_grid(["rule.name=fa,kp"]), parse_grid(["channel.error.codec=int8",
                                                              "channel.error.drop=0.5,1.0"])
    pts = points(grid, vary)  # each grid point, then it with each restriction in turn
    assert pts[:4] == [[("rule.name", "fa")], [("rule.name", "fa"), ("channel.error.codec", "int8")],
                       [("rule.name", "fa"), ("channel.error.drop", "0.5")],
                       [("rule.name", "fa"), ("channel.error.drop", "1.0")]]
    assert len(pts) == 2 * 4 and pts[4] == [("rule.name", "kp")]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: synthetic}\nmodel: {name: mlp, widths: [16]}\n"
                   "train: {batch_size: 32, max_steps: 3, lr: 0.05, threads: 1}\n"
                   "metrics: {alignment_every: 0}\n")
    # the reference each restriction is read against runs too (it did not: a sweep's
    # table held only restricted points), once: the drop of 0 restates the config's
    said = []
    res = sweep(cfg, ["rule.name=fa"], [], tmp_path / "s", log=said.append,
                vary_items=["channel.error.drop=0,0.5,1.0"], jobs=2)
    # before the first point ends, a line says what runs (nothing did, for minutes)
    assert said[0] == "[sweep] 3 points to run, 2 at a time"
    assert sorted(res["ran"]) == ["rule.name-fa__channel.error.drop-0",
                                  "rule.name-fa__channel.error.drop-0.5",
                                  "rule.name-fa__channel.error.drop-1.0"]
    assert [r["restriction"] for r in res["rows"]] == [
        "error.drop=0", "error.drop=0.5", "error.drop=1.0"]
    # a column per swept key, so a table tool can group by it
    table = list(csv.DictReader(open(tmp_path / "s" / "sweep.csv")))
    assert [r["channel.error.drop"] for r in table] == ["0", "0.5", "1.0"]
    dead = json.loads((tmp_path / "s" / res["ran"][2] / "summary.json").read_text())
    # --vary alone: the reference is the config as it is, in a directory of its own (it
    # was the sweep's own directory, where its run and the sweep's lock met)
    res = sweep(cfg, [], [], tmp_path / "v", log=lambda m: None,
                vary_items=["channel.error.drop=0.5", "channel.error.codec=int8"])
    assert res["ran"] == ["reference", "channel.error.drop-0.5", "channel.error.codec-int8"]
    table = list(csv.DictReader(open(tmp_path / "v" / "sweep.csv")))  # the config's values
    assert [(r["channel.error.drop"], r["channel.error.codec"]) for r in table] == [
        ("0.0", "fp32"), ("0.5", "fp32"), ("0.0", "int8")]
    assert (tmp_path / "v" / "reference" / "summary.json").is_file()
    err = dead["channels"]["error"]["head->fc1"]
    assert err["drop"] == 1.0 and err["delivered"] == 0 and err["dropped"] == err["messages"] == 3


def test_sweep_points_run_as_ray_tasks(tmp_path):
    pytest.importorskip("ray")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: synthetic}\nmodel: {name: mlp, widths: [16]}\n"
                   "train: {batch_size: 32, max_steps: 2, lr: 0.05, threads: 1}\n"
                   "metrics: {alignment_every: 0}\nruntime: {local_cpus: 2}\n")
    res = sweep(cfg, ["channel.error.codec=fp32,sign"], [], tmp_path / "s", log=lambda m: None,
                use_ray=True)
    assert sorted(res["ran"]) == ["channel.error.codec-fp32", "channel.error.codec-sign"]
    bits = {r["restriction"]: r["error_bits_per_sample"] for r in res["rows"]}
    assert bits == {"error.codec=fp32": 16 * 32, "error.codec=sign": (16 * 32 // 8 + 4) * 8 / 32}
    import ray
    assert not ray.is_initialized()  # the sweep shut down the Ray it started


def test_ray_tasks_get_absolute_run_directories(tmp_path, monkeypatch):
    """A task runs in its worker's directory, which on another node is not this
    command's: a sweep given a relative --out hands each point an absolute one."""
    from localnet.runtime import session

    seen = []
    monkeypatch.setattr(session, "run_tasks", lambda fn, jobs, runtime, log, failed: {
        name: seen.append(args[1]) or ({}, "ok") for name, args, _ in jobs})
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: synthetic}\nmodel: {name: mlp, widths: [16]}\n")
    sweep(cfg, ["train.lr=0.1,0.2"], [], "s", log=lambda m: None, use_ray=True)
    assert seen == [tmp_path / "s" / "train.lr-0.1", tmp_path / "s" / "train.lr-0.2"]


def test_the_plot_joins_points_that_differ_in_one_key_from_their_reference():
    """sweep.png's per-key panels: a line joins one rule's points that differ in that key
    alone, a --vary key's starting at the point without it, which a restated value
    (codec=fp32 on an fp32 config) ran under its own name."""
    from localnet.sweep_plot import panels
    pts = points(parse_grid(["rule.name=fa,kp"]),
                 parse_grid(["channel.error.codec=fp32,int8", "channel.error.drop=0.5"]))
    pts = [p for p in pts if len(p) > 1]  # each grid point ran as its codec=fp32 point
    same = {point_name(p): p[:1] for p in pts if p[1] == ("channel.error.codec", "fp32")}
    acc = {"fa": [0.9, 0.8, 0.5], "kp": [0.7, 0.6, float("nan")]}  # kp's drop diverged
    rows = [{"rule": p[0][1], "point": point_name(p), "test_accuracy": acc[p[0][1]][i % 3],
             "status": "ok" if i != 5 else "diverged at step 3"} for i, p in enumerate(pts)]
    codec, drop = panels(rows, pts, same)
    assert (codec["key"], codec["values"]) == ("channel.error.codec", ["fp32", "int8"])
    assert [(ln["rule"], ln["others"], ln["points"]) for ln in codec["lines"]] == [
        ("fa", "", [(0, 0.9), (1, 0.8)]), ("kp", "", [(0, 0.7), (1, 0.6)])]
    assert (drop["key"], drop["values"]) == ("channel.error.drop", ["none", "0.5"])
    # kp's drop did not finish: its reference alone makes no line
    assert [(ln["rule"], ln["points"]) for ln in drop["lines"]] == [("fa", [(0, 0.9), (1, 0.5)])]


def _three_seeds(tmp_path):
    """A config whose three seeds give three accuracies, and a sweep directory."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: synthetic}\nmodel: {name: mlp, widths: [16]}\n"
                   "train: {batch_size: 32, max_steps: 3, lr: 0.05}\n"
                   "metrics: {alignment_every: 0}\n")
    return cfg, tmp_path / "sweep"


def test_seeds_are_replicates_summed_up_by_their_mean_and_deviation(tmp_path):
    """--grid seed=...: each point's runs over the seeds are one row of sweep.md (mean and
    sample standard deviation of the runs' own accuracies, and how many finished), and one
    point per x in the plot's panels, not an axis of their own."""
    import statistics

    from localnet.sweep_plot import panels
    cfg, out = _three_seeds(tmp_path)
    res = sweep(cfg, ["rule.name=fa", "seed=0,1,2"], [], out, log=lambda m: None,
                vary_items=["channel.error.codec=sign"])
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == 6 and {r["seed"] for r in rows} == {"0", "1", "2"}
    acc = {}
    for r in rows:
        acc.setdefault(r["restriction"].replace(f"seed={r['seed']}", "").strip() or "none",
                       []).append(float(r["test_accuracy"]))
    assert len(set(acc["none"])) > 1  # the seeds did differ
    md = (out / "sweep.md").read_text()
    assert md.startswith("Over seeds")
    for restr, a in acc.items():
        assert (f"| fa | {restr} | 3/3 | {statistics.mean(a):.4f} | {statistics.stdev(a):.4f} |"
                in md)
    assert md.count("| fa |") == 2 + 1 + 6  # the sign's cost, then the per-run table
    means = list(csv.DictReader(open(out / "sweep_seeds.csv")))
    assert [(m["restriction"], m["seeds"], float(m["mean"])) for m in means] == [
        (r, "3/3", pytest.approx(statistics.mean(a))) for r, a in acc.items()]
    (codec,) = panels(res["rows"], points(parse_grid(["rule.name=fa", "seed=0,1,2"]),
                                          parse_grid(["channel.error.codec=sign"])))
    assert codec["values"] == ["none", "sign"]
    (line,) = codec["lines"]
    assert line["points"] == [(0, pytest.approx(statistics.mean(acc["none"]))),
                              (1, pytest.approx(statistics.mean(acc["error.codec=sign"])))]
    assert line["sd"] == [pytest.approx(statistics.stdev(acc["none"])),
                          pytest.approx(statistics.stdev(acc["error.codec=sign"]))]


def test_a_missing_dataset_is_said_once_before_any_point(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{name: mnist, root: {tmp_path / 'nowhere'}}}\n"
                   "model: {name: mlp, widths: [16]}\n")
    out = tmp_path / "sweep"
    assert main(["sweep", str(cfg), "--grid", "rule.name=fa,kp", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("dataset 'mnist' not found") == 1 and "Traceback" not in err
    assert not out.exists()


def test_the_plot_of_a_sweep_where_no_point_finished_is_drawn(tmp_path):
    from localnet.sweep_plot import write_png
    pts = points(parse_grid(["rule.name=fa,kp"]))  # two rules, no point: a log axis failed
    rows = [{"rule": p[0][1], "point": point_name(p), "status": "failed: X",
             "test_accuracy": float("nan"), "error_bits_per_sample": float("nan")} for p in pts]
    assert write_png(rows, pts, tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_a_mean_over_fewer_seeds_than_ran_is_marked():
    from localnet.sweep_plot import panels
    pts = points(parse_grid(["rule.name=fa", "seed=0,1"]), parse_grid(["channel.error.drop=0.5"]))
    acc = {"seed-0": 0.9, "seed-1": 0.7, "seed-0__channel.error.drop-0.5": 0.6,
           "seed-1__channel.error.drop-0.5": float("nan")}  # seed 1 diverged with drops
    rows = [{"rule": "fa", "point": point_name(p), "status": "ok" if i != 3 else "diverged",
             "test_accuracy": acc[point_name(p).removeprefix("rule.name-fa__")]}
            for i, p in enumerate(pts)]
    (drop,) = panels(rows, pts)
    (line,) = drop["lines"]
    assert line["points"] == [(0, pytest.approx(0.8)), (1, 0.6)] and line["partial"] == [1]


def test_a_dry_run_lists_the_points_and_what_a_run_would_do_and_writes_nothing(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: synthetic}\nmodel: {name: mlp, widths: [16]}\n"
                   "train: {batch_size: 32, max_steps: 2}\nmetrics: {alignment_every: 0}\n")
    out = tmp_path / "sweep"
    args = ["sweep", str(cfg), "--grid", "rule.name=fa,kp", "--vary", "channel.error.drop=0.5",
            "--out", str(out)]
    assert main([*args, "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "rule.name-fa: to run", "rule.name-fa__channel.error.drop-0.5: to run",
        "rule.name-kp: to run", "rule.name-kp__channel.error.drop-0.5: to run",
        f"4 points, 4 to run, in {out}; nothing was run (--dry-run)"]
    assert not out.exists()
    sweep(cfg, ["rule.name=fa"], [], out, log=lambda m: None, vary_items=["channel.error.drop=0.5"])
    (out / "rule.name-fa__channel.error.drop-0.5" / "summary.json").unlink()  # a checkpoint left
    before = sorted(str(f) for f in out.rglob("*"))
    assert main([*args, "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        "rule.name-fa: finished: skipped",
        "rule.name-fa__channel.error.drop-0.5: goes on from its checkpoint"]
    assert sorted(str(f) for f in out.rglob("*")) == before
    # a point's directory that ran another config is named before anything runs
    assert main([*args, "--set", "train.lr=0.5", "--dry-run"]) == 2
    assert "was run with another config (train.lr" in capsys.readouterr().err
    # one point of one value: counted in the singular
    assert main(["sweep", str(cfg), "--grid", "rule.name=fa", "--out", str(tmp_path / "one"),
                 "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("1 point, 1 to run, in ")


def test_a_points_process_killed_ends_those_points_not_the_sweep(tmp_path):
    """kill -9 of a --jobs worker (or the out-of-memory killer) broke the whole pool, and
    the sweep ended on BrokenProcessPool with no table; now the points it ended are rows
    that say so, and the sweep's tables are written."""
    import multiprocessing as mp
    import signal
    import threading
    import time

    cfg = tmp_path / "c.yaml"  # long enough that the kill comes first
    cfg.write_text("data: {name: synthetic}\nmodel: {name: mlp, widths: [16]}\n"
                   "train: {batch_size: 32, epochs: 100000}\nmetrics: {alignment_every: 0}\n")
    out = tmp_path / "sweep"
    res = {}
    t = threading.Thread(target=lambda: res.update(sweep(
        cfg, ["rule.name=fa,kp"], [], out, log=lambda m: None, jobs=2)))
    t.start()
    deadline = time.monotonic() + 120
    while not list(out.glob("*/config.yaml")) and time.monotonic() < deadline:
        time.sleep(0.2)  # a point has begun its run
    # the pool's first worker: its death is seen at once.  (The pool may be waiting on its
    # workers as they were before the second one started, and then sees that one's death
    # only at the next result: when the other point ends.)
    first = min(mp.active_children(), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    os.kill(first.pid, signal.SIGKILL)
    t.join(120)
    assert not t.is_alive()
    assert [r["status"] for r in res["rows"]] == ["failed: a point's process ended abruptly "
                                                  "(killed, or out of memory?); run the sweep "
                                                  "again to go on"] * 2
    assert "ended abruptly" in (out / "sweep.md").read_text() and (out / "sweep.csv").exists()


def test_the_means_over_seeds_of_an_earlier_sweep_in_its_directory_are_not_kept(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: synthetic}\nmodel: {name: mlp, widths: [16]}\n"
                   "train: {batch_size: 32, max_steps: 2}\nmetrics: {alignment_every: 0}\n")
    out = tmp_path / "sweep"
    sweep(cfg, ["rule.name=fa", "seed=0,1"], [], out, log=lambda m: None)
    assert (out / "sweep_seeds.csv").exists()
    sweep(cfg, ["rule.name=fa,kp"], [], out, log=lambda m: None)  # the same directory
    assert not (out / "sweep_seeds.csv").exists()


def test_each_vary_restriction_costs_its_reference_paired_seed_by_seed(tmp_path):
    """sweep.md and sweep_costs.csv: a --vary restriction's cost is, seed by seed, its
    reference's test accuracy minus its own, averaged over the seeds, with the standard
    error of that mean; a vary value that restates the config's own (codec=fp32 here) is
    the reference itself, not a restriction."""
    import math
    import statistics

    cfg, out = _three_seeds(tmp_path)
    res = sweep(cfg, ["rule.name=fa", "seed=0,1,2"], [], out, log=lambda m: None,
                vary_items=["channel.error.codec=fp32,sign"])
    acc, bits = {}, {}
    for r in csv.DictReader(open(out / "sweep.csv")):
        acc[r["channel.error.codec"], r["seed"]] = float(r["test_accuracy"])
        bits[r["channel.error.codec"], r["seed"]] = float(r["error_bits_per_sample"])
    lost = [100 * (acc["fp32", s] - acc["sign", s]) for s in "012"]
    assert len(set(lost)) > 1  # the pairs did differ
    (cost,) = res["costs"]
    assert (cost["rule"], cost["against"], cost["restriction"], cost["pairs"]) == (
        "fa", "none", "error.codec=sign", "3/3")
    assert cost["points_lost"] == pytest.approx(statistics.mean(lost))
    assert cost["se"] == pytest.approx(statistics.stdev(lost) / math.sqrt(3))
    assert cost["bits_ratio"] == pytest.approx(bits["sign", "0"] / bits["fp32", "0"])
    assert 0 < cost["bits_ratio"] < 1 / 16  # sign: about a bit an entry, against 32
    md = (out / "sweep.md").read_text()
    assert (f"| fa | error.codec=sign | 3/3 | {statistics.mean(lost):+.2f} | "
            f"{statistics.stdev(lost) / math.sqrt(3):.2f} |") in md
    (row,) = csv.DictReader(open(out / "sweep_costs.csv"))
    assert float(row["points_lost"]) == pytest.approx(statistics.mean(lost))
    # without --vary there is no reference to read a cost against: no table, no file
    sweep(cfg, ["rule.name=fa", "seed=0,1"], [], out, log=lambda m: None)
    assert "costs" not in (out / "sweep.md").read_text()
    assert not (out / "sweep_costs.csv").exists()


def test_a_restriction_that_diverged_at_a_seed_is_left_out_of_its_cost_and_marked():
    from localnet.sweep_tables import costs
    pts = points(parse_grid(["rule.name=fa", "seed=0,1,2"]),
                 parse_grid(["channel.error.drop=0.5", "channel.error.delay=2"]))
    acc = {"": [0.9, 0.8, 0.7], "channel.error.drop-0.5": [0.85, float("nan"), 0.6],
           "channel.error.delay-2": [0.9, 0.9, 0.9]}
    rows = []
    for p in pts:
        name = point_name(p)
        seed = int(dict(p)["seed"])
        extra = name.split(f"seed-{seed}")[1].removeprefix("__")
        a = acc[extra][seed]
        rows.append({"rule": "fa", "point": name, "test_accuracy": a,
                     "status": "ok" if a == a else "diverged at step 2",
                     "error_bits_per_sample": 640.0})
    drop, delay = costs(rows, pts, ["channel.error.drop", "channel.error.delay"])
    assert (drop["restriction"], drop["pairs"]) == ("error.drop=0.5", "2/3")
    assert drop["points_lost"] == pytest.approx((5 + 10) / 2)
    # two values: their sd, |5 - 10| / 2 ** 0.5, over 2 ** 0.5
    assert drop["se"] == pytest.approx(2.5)
    assert (delay["restriction"], delay["pairs"], delay["bits_ratio"]) == (
        "error.delay=2", "3/3", 1.0)
    assert delay["points_lost"] == pytest.approx((0 - 10 - 20) / 3)


def test_the_means_over_seeds_count_the_runs_whose_logits_blew_up(tmp_path):
    """FA with lowrank errors at q = 256 and lr 0.01 finished at every seed with a mean of
    0.74 and a loss above ln C at each: a table of means alone read it as a rule that
    learns worse.  Its row counts such runs among those that finished; a table where none
    blew up has no such column."""
    from localnet.sweep_tables import over_seeds, write_md
    pts = points(parse_grid(["rule.name=fa", "channel.error.q=64,256", "seed=0,1,2"]))
    acc = {"64": [0.9036, 0.9094, 0.9038], "256": [0.7247, 0.7171, float("nan")]}
    rows = []
    for p in pts:
        q, seed = dict(p)["channel.error.q"], int(dict(p)["seed"])
        a = acc[q][seed]
        rows.append({"rule": "fa", "restriction": f"error.q={q} seed={seed}", "point":
                     point_name(p), "test_accuracy": a, "test_loss": 0.3 if q == "64" else 9.0,
                     "status": "ok" if a == a else "diverged at step 9",
                     "error_bits_per_sample": 128.0 * int(q), "wall_s": 1.0,
                     "error_cos": 0.353 if q == "64" else 0.707 + 0.002 * seed,
                     "loss_above_chance": "" if q == "64" or a != a else "epoch 1: ..."})
    means = over_seeds(rows, pts)
    assert [(g["restriction"], g["seeds"], g["huge"]) for g in means] == [
        ("error.q=64", "3/3", 0), ("error.q=256", "2/3", 2)]
    md = write_md(rows, tmp_path / "sweep.md", means).read_text()
    assert "| wall s | huge logits |" in md and "ended above ln C: huge logits" in md
    # (the error cos over the runs that finished: seeds 0 and 1 at q = 256)
    assert "| fa | error.q=64 | 3/3 | 0.9056 | 0.0033 | 8192.0 | 0.353 | 1.0 | 0 |" in md
    assert "| fa | error.q=256 | 2/3 | 0.7209 | 0.0054 | 32768.0 | 0.708 | 1.0 | 2 |" in md
    calm = write_md(rows[:3], tmp_path / "calm.md", means[:1]).read_text()
    assert "huge" not in calm and \
        "| fa | error.q=64 | 3/3 | 0.9056 | 0.0033 | 8192.0 | 0.353 | 1.0 |\n" in calm


def test_sweep_md_says_when_its_runs_ran_on_several_kinds_of_cpu(tmp_path):
    """FA with one-bit errors on both links, seed 0, five epochs: 0.9163 on one AMD EPYC
    box and a recorded 0.8844 on another, same command and training code (RESULTS.md).
    A sweep whose runs ran on two kinds of CPU (--ray over a mixed cluster) names each
    and its runs; one kind, or runs from before the CPU was recorded, add nothing."""
    from localnet.sweep_tables import write_md
    zen3, xeon = "AMD EPYC (vendor AuthenticAMD family 25 model 1; AVX2)", \
        "Intel Xeon (vendor GenuineIntel family 6 model 143; AVX512)"
    rows = [{"rule": "fa", "restriction": f"seed={i}", "point": f"p{i}", "test_accuracy": 0.9,
             "test_loss": 0.3, "status": "ok", "error_bits_per_sample": 1025.0,
             "wall_s": 1.0, "error_cos": 0.45, "cpu": cpu}
            for i, cpu in enumerate([zen3, xeon, zen3, ""])]
    md = write_md(rows, tmp_path / "mixed.md").read_text()
    assert "These runs ran on 2 kinds of CPU, whose kernels round differently" in md
    assert f"\n- {zen3}: 2 runs (p0, p2)\n- {xeon}: 1 run (p1)\n" in md
    for one in (rows[:1] + rows[2:], rows[1:2]):
        assert "kinds of CPU" not in write_md(one, tmp_path / "one.md").read_text()


def test_a_cost_counts_the_pairs_where_a_run_blew_up():
    """On the MNIST channel table, FA with ternary errors lost points at every seed with
    test losses in the thousands: the rate's edge moving, not what ternary takes away at
    a stable rate.  Its cost row counts those pairs (a blown reference counts too); a
    table where none blew up has no such column."""
    from localnet.sweep_tables import costs, costs_markdown
    pts = points(parse_grid(["rule.name=fa", "seed=0,1"]),
                 parse_grid(["channel.error.codec=ternary", "channel.error.codec=int8"]))
    rows = []
    for p in pts:
        name, seed = point_name(p), int(dict(p)["seed"])
        codec = dict(p).get("channel.error.codec", "fp32")
        rows.append({"rule": "fa", "point": name, "status": "ok",
                     "test_accuracy": {"fp32": 0.93, "ternary": 0.80, "int8": 0.93}[codec],
                     "error_bits_per_sample": 640.0,
                     "loss_above_chance": "epoch 1: ..." if codec == "ternary"
                     or (codec == "fp32" and seed == 1) else ""})
    ternary, int8 = costs(rows, pts, ["channel.error.codec"])
    assert (ternary["huge"], int8["huge"]) == (2, 1)  # seed 1's reference blew up
    md = costs_markdown([ternary, int8])
    assert "| rule | restriction | pairs | points lost | se | bits | huge logits |" in md
    assert "| fa | error.codec=ternary | 2/2 | +13.00 | 0.00 | 1.000 | 2 |" in md
    for r in rows:
        r["loss_above_chance"] = ""
    calm = "\n".join(costs_markdown(costs(rows, pts, ["channel.error.codec"])))
    assert "huge" not in calm and "| fa | error.codec=ternary | 2/2 | +13.00 | 0.00 | 1.000 |\n" \
        in calm


def test_the_cost_panel_puts_each_restriction_on_a_row_and_each_rule_apart_within_it():
    """sweep.png's cost panel: a row per restriction in the sweep's order (the grid point
    it varies said where it is not the config itself), each rule's dot at its mean points
    lost with its standard error, rules spread within the row; no dot where no pair
    finished."""
    from localnet.sweep_plot import cost_rows
    nan = float("nan")
    cost = [{"rule": r, "against": a, "restriction": x, "points_lost": lost, "se": se}
            for r, a, x, lost, se in [
                ("fa", "none", "error.codec=int8", 0.2, 0.1),
                ("kp", "none", "error.codec=int8", 0.2, 0.3),
                ("fa", "none", "error.drop=0.5", 4.0, nan),  # one seed: no bar
                ("kp", "none", "error.drop=0.5", nan, nan),  # none of its pairs finished
                ("fa", "error.codec=sign", "error.drop=0.5", 30.0, 2.0)]]
    layout = cost_rows(cost)
    assert layout["labels"] == ["error.codec=int8", "error.drop=0.5",
                                "error.drop=0.5 at error.codec=sign"]
    assert layout["dots"] == [("fa", pytest.approx(-0.3), 0.2, 0.1),
                              ("kp", pytest.approx(0.3), 0.2, 0.3),
                              ("fa", pytest.approx(0.7), 4.0, 0.0),
                              ("fa", pytest.approx(1.7), 30.0, 2.0)]
    assert cost_rows([dict(cost[0], se=nan)])["dots"] == [("fa", 0, 0.2, 0.0)]  # one rule
    # sweep.md names the grid point a restriction varies where some is not the config
    from localnet.sweep_tables import costs_markdown
    md = costs_markdown([dict(c, pairs="3/3", bits_ratio=1.0) for c in cost])
    assert md[2] == "| rule | against | restriction | pairs | points lost | se | bits |"
    assert "| fa | error.codec=sign | error.drop=0.5 | 3/3 | +30.00 | 2.00 | 1.000 |" in md
    assert "| kp | none | error.drop=0.5 | 3/3 | — | — | 1.000 |" in md
    assert costs_markdown([dict(cost[0], pairs="3/3", bits_ratio=0.25)])[2:] == [
        "| rule | restriction | pairs | points lost | se | bits |",
        "|---|---|---:|---:|---:|---:|", "| fa | error.codec=int8 | 3/3 | +0.20 | 0.10 | 0.250 |"]
