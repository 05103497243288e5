"""`localnet report`: plots of run directories and the side-by-side table."""

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from localnet.cli import main
from localnet.config import load_config, parse_override, value_at
from localnet.files import run_lock
from localnet.ledger import MessageLog
from localnet.report import MAX_PANELS, STATE_LEGEND, report
from localnet.runs import load_run
from localnet.ledger import Ledger
from localnet.train import train

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A real FA run (with BP angles), a hand-written 'ray' run with a messages.json made
    by MessageLog, and a run still in progress (steps.jsonl only)."""
    root = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, ["data.name=synthetic", "model.name=mlp", "model.widths=[32]",
                             "train.epochs=2", "train.batch_size=64", "train.lr=0.05",
                             "rule.name=fa", "metrics.alignment_every=2", "metrics.bp_angle=true"])
    train(cfg, root / "fa", progress=False)

    ray = root / "pfa"
    ray.mkdir()
    align = {"fc1.linear": {"angle": 80.0, "norm_ratio": 1.0}, "head": {"angle": 40.0, "norm_ratio": 2.0}}
    (ray / "metrics.jsonl").write_text("".join(json.dumps(
        {"epoch": e, "step": 8 * (e + 1), "train_loss": 1.0 / (e + 1), "train_accuracy": 0.5 + e / 10,
         "test_loss": 1.1 / (e + 1), "test_accuracy": 0.6 + e / 10, "lr": 0.1, "weight_decay": 0.0,
         "alignment": align}) + "\n" for e in range(2)))
    (ray / "steps.jsonl").write_text("".join(json.dumps(
        {"step": s, "epoch": s // 8, "loss": 2.0 / s, "lr": 0.1, "alignment": align}) + "\n"
        for s in range(1, 17, 3)))
    (ray / "summary.json").write_text(json.dumps(
        {"rule": "pfa", "model": "mlp", "dataset": "synthetic", "epochs": 2, "steps": 16,
         "test_accuracy": 0.7, "samples_per_s": 123.0, "alignment": {"fc1.linear": 80.0, "head": 40.0},
         "runtime": {"executor": "ray"},
         # 2 cores for 4 s: 3 s of them idle
         "machine_cpu_s": {"user": 4.0, "system": 0.5, "idle": 2.5, "iowait": 0.5,
                           "softirq": 0.5}}))

    class FakeExecutor:  # what MessageLog reads off a RayExecutor
        def __init__(self):
            self.led = Ledger()

        def ledger(self):
            return Ledger().merge(self.led)

    ex = FakeExecutor()
    log = MessageLog(ray, ex)
    ex.led.record("driver", "stage0", "activation", 100, 4000)
    ex.led.record("stage0", "stage1", "activation", 100, 2000)
    ex.led.record("stage1", "stage0", "error", 100, 2000)
    log.begin("eval")
    ex.led.record("driver", "stage0", "activation", 100, 900)  # evaluation traffic
    log.write(epoch=1, step=16, samples=64)

    stopped = root / "stopped"
    stopped.mkdir()
    (stopped / "metrics.jsonl").write_text("")
    (stopped / "stopped.json").write_text(json.dumps(
        {"how": "diverged", "after_step": 5, "checkpoint_step": 4, "error": "NonFiniteLossError",
         "message": "training diverged at step 6 (epoch 1 of 3): the loss is nan"}))

    live = root / "live"
    live.mkdir()
    (live / "steps.jsonl").write_text(json.dumps({"step": 1, "epoch": 0, "loss": 2.3, "lr": 0.1,
                                                  "alignment": align}) + "\n{\"step\": 2, \"ep")
    return root


def test_report_writes_plots_and_rows(runs, tmp_path):
    res = report([runs / "fa", runs / "pfa", runs / "live"], tmp_path / "out")
    names = sorted(Path(f).name for f in res["files"])
    assert names == ["alignment.png", "bp_update_angle.png", "curves.png", "messages.png",
                     "norm_ratio.png"]
    for f in res["files"]:
        data = Path(f).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    rows = {r["run"]: r for r in res["rows"]}
    fa, pfa, live = rows["fa"], rows["pfa"], rows["live"]
    summary = json.loads((runs / "fa/summary.json").read_text())
    assert fa["rule"] == "fa" and fa["test_accuracy"] == summary["test_accuracy"]
    assert fa["alignment_deg"] == pytest.approx(sum(summary["alignment"].values()) / 2)
    assert fa["samples_per_s"] == summary["samples_per_s"] and fa["bytes_per_sample"] is None
    assert pfa["rule"] == "pfa" and pfa["alignment_deg"] == 60.0
    assert pfa["bytes_per_sample"] == pytest.approx((300 + 8000) / 64)  # eval bytes left out
    assert live["rule"] == "?" and live["test_accuracy"] is None
    # the share of the machine's cores busy while it trained: 5 of 8 core-seconds
    assert pfa["cores_busy"] == pytest.approx(5 / 8) and live["cores_busy"] is None
    if Path("/proc/stat").exists():  # a real run records its machine (Linux)
        assert 0.0 < fa["cores_busy"] <= 1.0
    # a run with no summary says how far its logs reach (the half-written line is not a step)
    assert (fa["state"], pfa["state"], live["state"]) == ("done", "done", "at step 1")
    assert load_run(runs / "live").alignment_series()["head"] == [(1, 40.0)]


def test_norm_ratio_plot_draws_each_layers_feedback_over_weight_norm(runs):
    """norm_ratio.png: the records' |feedback| / |W| per layer, on an axis from 0 (FA's
    B is fixed, so a falling line is W growing); a record without the field is skipped."""
    from localnet.report_plots import layer_angles_figure
    from localnet.runs import Run

    fa = load_run(runs / "fa")
    want = {layer: [(r["step"], r["alignment"][layer]["norm_ratio"]) for r in fa.steps]
            for layer in fa.steps[0]["alignment"]}
    got = fa.alignment_series("alignment", "norm_ratio")  # the epoch lines' among them
    logged = {r["step"] for r in fa.steps}
    assert {k: [p for p in v if p[0] in logged] for k, v in got.items()} == want
    fig = layer_angles_figure([fa], "alignment", "|feedback| / |W|", "norm_ratio")
    ax = fig.axes[0]
    assert [list(ln.get_ydata()) for ln in ax.get_lines()] == [[v for _, v in pts]
                                                               for pts in got.values()]
    top = max(v for pts in got.values() for _, v in pts)
    assert ax.get_ylim() == pytest.approx((0.0, 1.05 * top))  # not the angles' 95 degrees
    old = Run(Path("o"), "o", steps=[{"step": 1, "alignment": {"head": {"angle": 40.0}}}])
    assert old.alignment_series("alignment", "norm_ratio") == {}


def test_a_run_without_a_summary_is_running_killed_or_elsewhere(runs, tmp_path):
    """The run directory's lock file (files.run_lock) tells a run still training from one
    whose process died without a word, which the logs alone cannot."""
    live = tmp_path / "live"
    shutil.copytree(runs / "live", live)
    with run_lock(live):  # this process trains there
        assert load_run(live).row()["state"] == "running, step 1"
    # kill -9 leaves the lock file, naming a process that holds no lock any more
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (live / "run.lock").write_text(f"pid {gone.stdout.strip()} on {socket.gethostname()}, "
                                   f"since 2026-12-01 10:00:00")
    assert load_run(live).row()["state"] == "killed, step 1"
    (live / "run.lock").write_text("pid 7 on elsewhere.example, since 2026-12-01 10:00:00")
    assert load_run(live).row()["state"] == "at step 1 (pid 7 on elsewhere.example)"


def test_a_stopped_runs_state_says_where_its_checkpoint_is(tmp_path):
    """A resume goes on from the checkpoint, so the state names it where it is behind the
    last step trained (those steps are trained again), or says none was saved."""
    from localnet.runs import Run
    def state(**stopped):
        return Run(tmp_path, "r", stopped={"how": "interrupted", **stopped}).state()
    assert state(after_step=40, checkpoint_step=20) == "interrupted after step 40, checkpoint 20"
    assert state(after_step=40, checkpoint_step=40) == "interrupted after step 40"
    assert state(after_step=7, checkpoint_step=None) == "interrupted after step 7, none saved"
    assert Run(tmp_path, "r", stopped={"how": "failed", "after_step": 9, "checkpoint_step": 8}
               ).state() == "failed after step 9, checkpoint 8"


def test_cli_prints_the_table_and_skips_what_it_cannot_plot(runs, tmp_path, capsys):
    assert main(["report", str(runs / "fa"), str(runs / "pfa"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # a console of 80 columns (not a terminal): every number whole, on its run's line
    assert re.search(r"^ +pfa +pfa +0\.7000 +60\.0 +123\.0 +62% +130 *$", out, re.M), out
    assert f"wrote {tmp_path / 'bp_update_angle.png'}\n" in out  # a path whole, to copy
    for word in ("rule", "acc", "samples", "/sample", "fa", "pfa", "0.7000", "130",
                 "curves.png", "messages.png"):
        assert word in out, word
    assert "state" not in out  # every run is done: no column for it
    assert main(["report", str(runs / "fa"), str(runs / "live"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "state" in out and "at step 1" in out
    assert " ".join(STATE_LEGEND.split()) in " ".join(out.split())  # whole, not cropped
    assert main(["report", str(runs / "stopped"), "--json", "--out", str(tmp_path)]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["state"] == "diverged at step 6"  # the step its message names
    assert row["stopped"]["message"].startswith("training diverged at step 6")
    assert main(["report", str(runs / "fa"), "--json", "--out", str(tmp_path / "one")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["rule"] for r in doc["rows"]] == ["fa"]
    assert "runtime.executor: ray" in doc["skipped"]["messages.png"]  # an in-process run
    assert {Path(f).name for f in doc["files"]} == {"curves.png", "alignment.png",
                                                    "norm_ratio.png", "bp_update_angle.png"}
    assert doc["rows"][0]["resumed_with"] is None
    # a run resumed under other settings says so below the table: its config.yaml holds
    # only the last ones
    changed = tmp_path / "changed"
    changed.mkdir()
    summary = json.loads((runs / "fa" / "summary.json").read_text())
    summary["resumed_with"] = [{"at_step": 16, "settings": {"train.lr": [0.05, 0.01]}},
                               {"at_step": 32, "settings": {"train.epochs": [2, 3]}}]
    (changed / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(changed), "--out", str(tmp_path / "two")]) == 0
    assert ("changed: resumed with other settings, at step 16 train.lr 0.05 -> 0.01; at "
            "step 32 train.epochs 2 -> 3") in " ".join(capsys.readouterr().out.split())


def test_default_output_directory_and_errors(runs, tmp_path, capsys, monkeypatch):
    assert main(["report", str(runs / "pfa"), "--json"]) == 0
    assert (runs / "pfa/report/curves.png").exists()
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(runs / "pfa"), str(runs / "fa"), "--json"]) == 0
    assert (tmp_path / "report/messages.png").exists()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no run directory" in capsys.readouterr().err
    (tmp_path / "pfa.log").write_text("a run's console output\n")  # what runs/* matches
    assert main(["report", str(runs / "pfa"), str(tmp_path / "pfa.log")]) == 2
    assert "pfa.log is a file, not a run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    # a directory of runs stands for the runs in it; its report sits beside them
    assert main(["report", str(runs), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert sorted(r["run"] for r in rows) == sorted(p.name for p in runs.iterdir()
                                                    if p.name != "report")  # all three
    # a run named beside the directory that holds it is one run (it was two rows, and
    # two curves in one colour)
    assert main(["report", str(runs / "fa"), str(runs), f"{runs}/./fa", "--json",
                 "--out", str(tmp_path / "twice")]) == 0
    again = json.loads(capsys.readouterr().out)["rows"]
    assert [r["run"] for r in again] == ["fa"] + sorted(r["run"] for r in rows if r["run"] != "fa")
    assert (runs / "report" / "curves.png").exists()
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "summary.json").write_text('{"rule": "fa",')
    assert main(["report", str(tmp_path / "torn")]) == 2
    err = capsys.readouterr().err
    assert f"report: {tmp_path / 'torn' / 'summary.json'} does not parse" in err
    assert "Traceback" not in err and not (tmp_path / "torn" / "report").exists()
    (tmp_path / "a_file").write_text("mine")  # --out naming a file: the file stays as it was
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "sub"):
        assert main(["report", str(runs / "pfa"), "--out", str(out)]) == 2
        assert (f"localnet: report: --out {out}: a file is in the way"
                in capsys.readouterr().err)
    assert (tmp_path / "a_file").read_text() == "mine"


def test_edges_are_listed_in_the_pipelines_order():
    """stage10->stage9 after stage2->stage1, not between stage1 and stage2 as plain string
    order puts it (messages.png lists the edges by this key)."""
    from localnet.report_plots import natural_key
    names = ["stage10->stage9", "stage2->stage1", "driver->stage0", "stage9->stage10",
             "stage1->stage2", "stage10->driver"]
    assert sorted(names, key=natural_key) == [
        "driver->stage0", "stage1->stage2", "stage2->stage1", "stage9->stage10",
        "stage10->driver", "stage10->stage9"]


def test_the_edges_of_a_per_layer_run_have_room_for_their_names():
    """ResNet-20 per layer sends over 61 edges: at the height of a per-unit run's panel
    their names ran into one another.  Drawn, no two of a panel's edge names overlap, for
    the per-layer run beside a per-unit one; and one legend below names every kind."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from localnet.report_plots import messages_figure
    from localnet.runs import Run

    def run(label, stages):
        edges = {"driver->stage0": {"activation": {"bytes": 4000}}}
        for i in range(stages - 1):
            edges[f"stage{i}->stage{i + 1}"] = {"activation": {"bytes": 1000}}
            edges[f"stage{i + 1}->stage{i}"] = {"error": {"bytes": 900}}
            edges[f"driver->stage{i + 1}"] = {"control": {"bytes": 10}}
        units = [[f"unit{i}"] for i in range(stages)]
        units[-1].append("head")  # an actor of two units
        return Run(Path(label), label, messages={"edges": edges},
                   summary={"rule": "pfa", "runtime": {"units": units}})

    fig = messages_figure([run("per_layer", 21), run("per_unit", 11)])
    FigureCanvasAgg(fig).draw()
    for ax, n in zip(fig.axes, (61, 31)):
        boxes = sorted((t.get_window_extent() for t in ax.get_yticklabels()),
                       key=lambda b: b.y0)
        assert len(boxes) == n
        assert all(a.y1 <= b.y0 + 0.5 for a, b in zip(boxes, boxes[1:])), ax.get_title()
    # the edges are named by what their actors hold, in the pipeline's order
    labels = [t.get_text() for t in fig.axes[1].get_yticklabels()]
    assert labels[:3] == ["driver->unit0", "driver->unit1", "driver->unit2"]
    assert labels[-2:] == ["unit9->unit10..head", "unit10..head->unit9"]
    (legend,) = fig.legends
    assert sorted(t.get_text() for t in legend.get_texts()) == ["activation", "control",
                                                                 "error"]
    assert messages_figure([Run(Path("x"), "x")]) is None


def test_the_layers_of_a_deep_run_are_told_apart_by_a_colour_bar():
    """ResNet-56 has 57 layers: their legend, in five columns, outgrew its panel and
    covered the curves and the next panel.  Beyond LEGEND_LAYERS layers a colour bar of
    depth names the first and the last; a few layers keep a legend inside the panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from localnet.report_plots import LEGEND_LAYERS, layer_angles_figure
    from localnet.runs import Run

    def run(n):
        names = ["stem.conv"] + [f"layer{i}.conv" for i in range(1, n - 1)] + ["head.fc"]
        steps = [{"step": k, "alignment": {m: {"angle": 90.0 - k * i / n} for i, m in
                                           enumerate(names)}} for k in (1, 5, 9)]
        return Run(Path(f"r{n}"), f"r{n}", summary={"rule": "fa"}, steps=steps), names

    (deep, _), (shallow, few) = run(57), run(LEGEND_LAYERS)
    fig = layer_angles_figure([deep, shallow], "alignment", "deg")
    FigureCanvasAgg(fig).draw()
    ax_deep, ax_shallow, bar = fig.axes
    assert ax_deep.get_legend() is None
    ticks = [t.get_text() for t in bar.get_yticklabels()]
    assert ticks[0] == "stem.conv" and ticks[-1] == "head.fc" and len(ticks) == 5
    legend = ax_shallow.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == few
    box, frame = legend.get_window_extent(), ax_shallow.get_window_extent()
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 <= box.y1 <= frame.y1
    assert layer_angles_figure([Run(Path("x"), "x")], "alignment", "deg") is None


def test_a_sweep_points_long_name_stays_over_its_own_panel():
    """A sweep's point is named by its settings; as one line its title ran across the
    next panel.  Wrapped, each title lies within its panel's width."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from localnet.report_plots import layer_angles_figure
    from localnet.runs import Run

    name = ("rule.name-fa__channel.edges-_1_error_codec_sign_error_feedback_true_2_error_"
            "codec_sign_two_scales_true_error_feedback_true___seed-0")
    steps = [{"step": k, "alignment": {"head": {"angle": 60.0 + k}}} for k in (1, 5)]
    runs = [Run(Path(f"{name}{i}"), f"{name}{i}", summary={"rule": "fa"}, steps=steps)
            for i in range(3)]
    fig = layer_angles_figure(runs, "alignment", "deg")
    FigureCanvasAgg(fig).draw()
    for i, ax in enumerate(fig.axes[:3]):
        box, frame = ax.title.get_window_extent(), ax.get_window_extent()
        assert frame.x0 - 1 <= box.x0 and box.x1 <= frame.x1 + 1, (box, frame)
        # the whole name, only broken into lines
        assert ax.get_title().replace("\n", "").replace(" ", "") == f"{name}{i}(fa)"


def test_actions_fill_is_the_share_of_the_cores_the_actions_kept_busy():
    from localnet.report_plots import actions_fill
    tl = {"spans": [[0, "F", 1, 0, 0.0, 1.0], [1, "F", 1, 0, 1.0, 2.0],
                    [0, "B", 1, 0, 2.0, 3.0], [1, "B", 1, 0, 1.5, 4.0]]}
    assert actions_fill(tl, 1) == pytest.approx(5.5 / 4)  # more than one core's worth
    assert actions_fill(tl, 2) == pytest.approx(5.5 / 8)
    assert actions_fill({"spans": []}, 2) == 0.0


def test_curves_of_many_runs_keep_them_apart_and_a_diverged_one_off_the_scale():
    """A sweep's directory: 12 runs, one of which diverged.  Ten colours repeated, each
    panel's legend listed every series over the curves, and the diverged run's loss set the
    scale (1e16), pressing the others against the axis."""
    from localnet.report_plots import curves_figure
    from localnet.runs import Run
    runs = []
    for i in range(12):
        loss = [2.3, 1.0, 0.5] if i else [2.3, 40.0, 1e16]
        runs.append(Run(Path(f"p{i}"), f"p{i}", epochs=[
            {"step": 10 * (e + 1), "train_loss": v, "test_loss": v, "test_accuracy": 0.5}
            for e, v in enumerate(loss)]))
    fig = curves_figure(runs)
    ax_loss, ax_acc = fig.axes
    assert ax_loss.get_yscale() == "log" and ax_loss.get_ylim()[1] == pytest.approx(23.0)
    assert "a run diverged" in ax_loss.get_title()
    assert ax_loss.get_legend() is None and ax_acc.get_legend() is None
    (legend,) = fig.legends  # one, beside both: a line per run, then the three styles
    assert [t.get_text() for t in legend.get_texts()] == [f"p{i}" for i in range(12)] + [
        "train (batch)", "train (epoch)", "test"]
    colours = {tuple(h.get_color()) for h in legend.legend_handles[:12]}
    assert len(colours) == 12
    fig = curves_figure(runs[1:3])  # no run diverged: the scale is the data's
    assert fig.axes[0].get_ylim()[1] < 3 and fig.axes[0].get_title() == "loss"


def test_curves_of_one_epoch_share_the_loss_panels_steps():
    """A one-epoch run logs its batches' loss from step 1 and its accuracy only at the
    epoch's end: both panels read optimizer steps, so both span the same steps."""
    from localnet.report_plots import curves_figure
    from localnet.runs import Run
    run = Run(Path("p"), "p", steps=[{"step": s, "loss": 2.3 - 0.1 * s} for s in (1, 5)],
              epochs=[{"step": 10, "train_loss": 1.5, "test_loss": 1.4,
                       "test_accuracy": 0.5}])
    ax_loss, ax_acc = curves_figure([run]).axes
    low, high = ax_acc.get_xlim()
    assert ax_loss.get_xlim() == (low, high) and low <= 1 and high >= 10


def test_an_in_process_run_with_channels_reports_the_bytes_they_carried(tmp_path):
    """No messages.json in-process: bytes per sample are the channels' encoded payloads.
    mlp 16 wide, batch 32, one boundary: activations fp32, 16 x 4 bytes a sample; errors
    int8, 16 bytes a sample plus a 4-byte scale per message of 32 samples."""
    cfg = load_config(None, ["data.name=synthetic", "model.name=mlp", "model.widths=[16]",
                             "train.batch_size=32", "train.max_steps=3", "rule.name=fa",
                             "metrics.alignment_every=0", "channel.enabled=true",
                             "channel.error.codec=int8"])
    summary = train(cfg, tmp_path / "run", progress=False)
    (row,) = report([tmp_path / "run"], tmp_path / "out")["rows"]
    assert row["bytes_per_sample"] == pytest.approx(16 * 4 + 16 + 4 / 32)
    # and what arrived of each error message: int8 keeps nearly all of its direction
    assert row["error_cos"] == summary["channels"]["error_cos"]
    assert 0.99 < row["error_cos"] < 1


def test_the_table_gives_the_error_cos_only_where_channels_ran(tmp_path, capsys):
    base = ["data.name=synthetic", "model.name=mlp", "model.widths=[16]",
            "train.batch_size=32", "train.max_steps=2", "rule.name=fa",
            "metrics.alignment_every=0"]
    train(load_config(None, base), tmp_path / "plain", progress=False)
    assert main(["report", str(tmp_path / "plain"), "--out", str(tmp_path / "o1")]) == 0
    assert "cos" not in capsys.readouterr().out
    s = train(load_config(None, [*base, "channel.error.codec=sign"]), tmp_path / "sign",
              progress=False)
    assert main(["report", str(tmp_path / "plain"), str(tmp_path / "sign"),
                 "--out", str(tmp_path / "o2")]) == 0
    out = capsys.readouterr().out
    assert "cos" in out and f"{s['channels']['error_cos']:.3f}" in out


def test_fidelity_plot_draws_what_arrived_on_each_link_each_epoch(tmp_path):
    """A line per link through each epoch's own figure, in the model's order: mlp 16-16,
    two boundaries, sign errors (cos below 1, each epoch its own) and lossless fp32
    activations (cos 1), dashed.  A run without channels has no such plot."""
    from localnet.report_plots import fidelity_figure

    base = ["data.name=synthetic", "model.name=mlp", "model.widths=[16,16]",
            "train.batch_size=32", "train.epochs=2", "train.lr=0.002", "rule.name=fa",
            "metrics.alignment_every=0"]
    train(load_config(None, [*base, "channel.error.codec=sign"]), tmp_path / "sign",
          progress=False)
    train(load_config(None, base), tmp_path / "plain", progress=False)
    res = report([tmp_path / "sign", tmp_path / "plain"], tmp_path / "out")
    assert "fidelity.png" in [Path(f).name for f in res["files"]]
    lines = [json.loads(x) for x in (tmp_path / "sign/metrics.jsonl").read_text().splitlines()]
    assert list(lines[0]["fidelity"]["error"]) == ["fc2->fc1", "head->fc2"]
    fig = fidelity_figure([load_run(tmp_path / "sign"), load_run(tmp_path / "plain")])
    (ax,) = [a for a in fig.axes if a.get_visible() and a.get_lines()]  # one panel
    drawn = [(ln.get_linestyle(), list(ln.get_xdata()), list(ln.get_ydata()))
             for ln in ax.get_lines()]
    steps = [line["step"] for line in lines]
    solid = [y for style, x, y in drawn if style == "-" and x == steps]
    assert solid == [[line["fidelity"]["error"][link]["cos"] for line in lines]
                     for link in ("fc2->fc1", "head->fc2")]
    assert all(0 < min(y) and max(y) < 1 and y[0] != y[1] for y in solid)
    dashed = [y for style, x, y in drawn if style == "--" and x == steps]
    assert len(dashed) == 2 and all(y == pytest.approx([1.0, 1.0]) for y in dashed)
    assert len(drawn) == 4
    # beside it, the rest: sign's well off each error's direction, fp32's none at all
    assert "fidelity_rest.png" in [Path(f).name for f in res["files"]]
    fig = fidelity_figure([load_run(tmp_path / "sign")], "rest")
    (ax,) = [a for a in fig.axes if a.get_visible() and a.get_lines()]
    lines_drawn = [(ln.get_linestyle(), list(ln.get_ydata())) for ln in ax.get_lines()]
    assert [y for style, y in lines_drawn if style == "-"] == [
        [line["fidelity"]["error"][link]["rest"] for line in lines]
        for link in ("fc2->fc1", "head->fc2")]
    assert all(0.3 < v < 1 for style, y in lines_drawn if style == "-" for v in y)
    assert [y for style, y in lines_drawn if style == "--"] == [[0.0, 0.0]] * 2
    res = report([tmp_path / "plain"], tmp_path / "out2")
    assert "channel.enabled" in res["skipped"]["fidelity.png"]


def test_curves_of_a_sweeps_many_runs_are_coloured_by_rule():
    """Beyond 20 runs no colour tells a run apart, and a line each filled the legend (198
    runs: a figure 3,500 pixels wide, the panels a strip): a colour per rule instead."""
    from localnet.report_plots import curves_figure
    from localnet.runs import Run
    rules = ["fa", "kp", "pfa"]
    runs = [Run(Path(f"p{i}"), f"p{i}", summary={"rule": rules[i % 3]}, epochs=[
        {"step": 10, "test_loss": 1.0, "test_accuracy": 0.5}]) for i in range(21)]
    fig = curves_figure(runs)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "fa (7 runs)", "kp (7 runs)", "pfa (7 runs)", "train (batch)", "train (epoch)", "test"]
    colour = {t.get_text().split()[0]: h.get_color()
              for t, h in zip(legend.get_texts(), legend.legend_handles)}
    ax_acc = fig.axes[1]
    assert [line.get_color() for line in ax_acc.get_lines()] == [colour[r.rule] for r in runs]
    assert len({str(c) for c in colour.values()}) == 4  # three rules' colours, the styles' grey


def test_a_plot_of_a_panel_per_run_draws_the_first_runs_and_says_so(tmp_path, capsys):
    from PIL import Image
    for i in range(MAX_PANELS + 2):
        run = tmp_path / "sweep" / f"p{i:02d}"
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(json.dumps(
            {"epoch": 0, "step": 5, "test_accuracy": 0.5,
             "alignment": {"fc1": {"angle": 80.0 - i}}}) + "\n")
    assert main(["report", str(tmp_path / "sweep"), "--out", str(tmp_path / "all")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert (f"alignment.png: the first {MAX_PANELS} of the {MAX_PANELS + 2} runs that have it, "
            f"a panel each" in out)
    few = report(sorted((tmp_path / "sweep").iterdir())[:MAX_PANELS], tmp_path / "few")
    assert few["notes"] == {}
    size = lambda d: Image.open(d / "alignment.png").size  # noqa: E731
    assert size(tmp_path / "all") == size(tmp_path / "few")


def test_a_directory_of_runs_stands_for_the_runs_of_its_sweeps_too(runs, tmp_path, capsys):
    """`localnet report runs` (the out_dir): a sweep's points sit a level deeper, in
    runs/sweep-<time>/, and were left out without a word."""
    out_dir = tmp_path / "runs"
    shutil.copytree(runs / "fa", out_dir / "fa")
    for name in ("pfa", "live"):
        shutil.copytree(runs / name, out_dir / "sweep-1" / name)
    (out_dir / "sweep-1" / "sweep.csv").write_text("rule\n")
    (out_dir / "sweep-1" / "report").mkdir()  # its report: no run
    assert main(["report", str(out_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["run"] for r in rows] == ["fa", "sweep-1/live", "sweep-1/pfa"]


def test_the_table_says_what_set_the_runs_apart(tmp_path, capsys):
    """Below the table, each run's settings that the others do not share, as --set takes
    them back; the run's name and rule (a column of its own) are not differences."""
    base = ["data.name=synthetic", "model.name=mlp", "train.batch_size=64",
            "train.max_steps=1", "metrics.alignment_every=0"]
    for name, sets in (("a", ["rule.name=fa", "model.widths=[32]"]),
                       ("b", ["rule.name=fa", "model.widths=[32, 16]",
                              "channel.error.codec=sign", "channel.error.two_scales=true"]),
                       ("c", ["rule.name=bp", "model.widths=[32]",
                              "train.wd_milestones={1: 0.001}"])):
        train(load_config(None, base + sets + [f"name={name}"]), tmp_path / name,
              progress=False)
    dirs = [str(tmp_path / n) for n in "abc"]
    assert main(["report", *dirs, "--json", "--out", str(tmp_path / "r")]) == 0
    diff = {r["run"]: r["differs"] for r in json.loads(capsys.readouterr().out)["rows"]}
    assert diff == {  # fa's own option is recorded, and bp has none: a difference too
        "a": ["channel.error.codec=fp32", "model.widths=[32]", "rule.feedback_gain=1.0",
              "train.wd_milestones={}"],
        "b": ["channel.error.codec=sign", "channel.error.error_feedback=false",
              "channel.error.two_scales=true", "model.widths=[32, 16]",
              "rule.feedback_gain=1.0", "train.wd_milestones={}"],
        "c": ["channel.error.codec=fp32", "model.widths=[32]",
              "train.wd_milestones={1: 0.001}"]}, diff
    # each is a --set item that gives the run's own value back
    recorded = yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())
    for item in diff["c"]:
        key, value = parse_override(item)
        assert value_at(recorded, ".".join(key)) == value, item
    assert main(["report", *dirs, "--out", str(tmp_path / "r")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert ("what differs between the runs (their config.yaml): a: channel.error.codec=fp32, "
            "model.widths=[32], rule.feedback_gain=1.0, train.wd_milestones={} b:") in out, out
    assert "model.widths=[32, 16]" in out  # a list printed, not taken for a style
    # one run, or runs whose names say it (a sweep's points): nothing to add
    assert main(["report", dirs[0], "--out", str(tmp_path / "r")]) == 0
    assert "what differs" not in capsys.readouterr().out
    for names, said in ((["model.widths-1", "model.widths-2"], False),
                        (["channel.error.codec-fp32__model.widths-1",
                          "channel.error.codec-sign__channel.error.error_feedback-false__"
                          "channel.error.two_scales-true__model.widths-2"], True)):
        sweep = tmp_path / f"sweep-{said}"
        for n, name in zip("ab", names):
            shutil.copytree(tmp_path / n, sweep / name)
        assert main(["report", str(sweep), "--out", str(tmp_path / "r")]) == 0
        assert ("what differs" in capsys.readouterr().out) is not said


def test_the_table_says_which_runs_ran_on_which_kind_of_cpu(tmp_path, capsys):
    """The same sweep point, FA with one-bit errors on both links, ended at 0.8844 on
    one box and 0.9158 on another: torch's kernels round differently on another CPU and
    a blow-up grows it.  Runs recorded on more than one kind of CPU are listed under
    the table by kind; runs on one kind, or from before the CPU was recorded, are not."""
    base = ["data.name=synthetic", "model.name=mlp", "model.widths=[16]",
            "train.batch_size=64", "train.max_steps=1", "metrics.alignment_every=0"]
    for name in "abc":
        train(load_config(None, base + [f"name={name}"]), tmp_path / name, progress=False)
    here = json.loads((tmp_path / "a" / "summary.json").read_text())["cpu"]
    assert here["capability"] == torch.backends.cpu.get_cpu_capability()
    dirs = [str(tmp_path / n) for n in "abc"]
    assert main(["report", *dirs, "--out", str(tmp_path / "r")]) == 0
    assert "kinds of CPU" not in capsys.readouterr().out
    other = {"model": "Intel Xeon", "id": "vendor GenuineIntel family 6 model 143",
             "capability": "AVX512"}
    for name, kind in (("b", other), ("c", None)):  # (c: a run from before)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        summary["cpu"] = kind
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    assert main(["report", *dirs, "--out", str(tmp_path / "r")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "these runs ran on 2 kinds of CPU" in out
    assert f"{here['model']} ({here['id']}; {here['capability']}): 1 run (a) " in out
    assert "Intel Xeon (vendor GenuineIntel family 6 model 143; AVX512): 1 run (b)" in out
