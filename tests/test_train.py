"""The trainer and the `localnet run` CLI, end to end on small data."""

import contextlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from localnet.config import load_config, load_run_config
from localnet.errors import ConfigError
from localnet.train import NonFiniteLossError, lr_at, train, wd_at

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"rule", "model", "dataset", "epochs", "steps", "test_accuracy", "test_loss",
                "train_loss", "samples_per_s", "wall_s", "alignment"}


def small(*extra):
    return load_config(None, ["data.name=synthetic", "model.name=mlp", "model.widths=[32]",
                              "train.epochs=2", "train.batch_size=32", "train.lr=0.05",
                              "metrics.alignment_every=4", *extra])


def test_run_directory_contents(tmp_path):
    summary = train(small("rule.name=fa"), tmp_path, progress=False)
    assert SUMMARY_KEYS <= set(summary)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["test_accuracy"] == summary["test_accuracy"]
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["epochs"] == 2 and summary["steps"] == 2 * (512 // 32)
    # the synthetic problem is learnable: far above the 10% of chance after 2 epochs
    assert summary["test_accuracy"] > 0.5
    epochs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1]
    for e in epochs:
        assert {"train_loss", "test_loss", "test_accuracy", "lr", "alignment"} <= set(e)
        assert set(e["alignment"]) == {"fc1.linear", "head"}
        # each epoch's own speed: its 512 samples over its training seconds
        assert e["train_s"] > 0 and e["samples_per_s"] == pytest.approx(512 / e["train_s"])
    assert sum(e["train_s"] for e in epochs) == pytest.approx(summary["train_s"])
    steps = [json.loads(l) for l in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 33, 4))
    assert load_config(tmp_path / "config.yaml") == small("rule.name=fa")
    assert (tmp_path / "checkpoint.pt").exists()


def test_fa_alignment_angle_falls_below_90_while_learning(tmp_path):
    summary = train(small("rule.name=fa", "train.epochs=4"), tmp_path, progress=False)
    first = json.loads((tmp_path / "steps.jsonl").read_text().splitlines()[0])
    # W starts random w.r.t. B (~90 deg) and aligns with it as it learns (Lillicrap et al.)
    assert first["alignment"]["head"]["angle"] > 80
    assert summary["alignment"]["head"] < first["alignment"]["head"]["angle"] - 10


def test_bp_update_angle_is_zero_for_bp_and_positive_for_fa(tmp_path):
    bp = train(small("rule.name=bp", "metrics.bp_angle=true", "train.epochs=1"), tmp_path / "bp",
               progress=False)
    fa = train(small("rule.name=fa", "metrics.bp_angle=true", "train.epochs=1"), tmp_path / "fa",
               progress=False)
    line = lambda d: json.loads((d / "steps.jsonl").read_text().splitlines()[1])
    assert max(line(tmp_path / "bp")["bp_update_angle"].values()) < 1e-3
    angles = line(tmp_path / "fa")["bp_update_angle"]
    assert angles["head"] < 1e-3          # the output layer's update is exact under FA
    assert angles["fc1.linear"] > 1       # the hidden layer's is not
    assert bp["steps"] == fa["steps"]


def test_max_steps_and_determinism(tmp_path):
    a = train(small("rule.name=pfa", "rule.r=2", "train.max_steps=5"), tmp_path / "a", progress=False)
    b = train(small("rule.name=pfa", "rule.r=2", "train.max_steps=5"), tmp_path / "b", progress=False)
    assert a["steps"] == 5 and a["epochs"] == 1
    assert a["test_loss"] == b["test_loss"]
    wa = torch.load(tmp_path / "a/checkpoint.pt", weights_only=True)["executor"]
    wb = torch.load(tmp_path / "b/checkpoint.pt", weights_only=True)["executor"]
    for k, v in wa["stages"][0]["module"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, wb["stages"][0]["module"][k]), k


def test_each_step_names_the_next_batch_unless_something_reads_the_model_between(
        tmp_path, monkeypatch):
    """The loop looks one batch ahead (`train_step(..., upcoming=)`, which the async
    runtime issues early): upcoming is exactly the next call's batch, lr and wd, and
    None where an alignment record, a probe, a checkpoint or the epoch's end comes
    between."""
    from localnet.engine import InProcessExecutor

    calls, step = [], InProcessExecutor.train_step

    def record(self, x, y, lr, wd, upcoming=None):
        calls.append((x, y, lr, wd, upcoming))
        return step(self, x, y, lr, wd, upcoming)

    monkeypatch.setattr(InProcessExecutor, "train_step", record)
    train(small("rule.name=fa", "train.max_steps=30", "runtime.checkpoint_every=6",
                "metrics.bp_angle=true", "train.lr_schedule=cosine"), tmp_path, progress=False)
    assert len(calls) == 30
    records = {n for n in range(1, 31) if (n - 1) % 4 == 0}   # alignment after step n
    probes = {n - 1 for n in records}                          # bp angle before step n
    saves = {6, 12, 18, 24}                                     # checkpoint after step n
    ends = {16, 30}                                             # the epoch's, the run's
    for n, (_, _, _, _, up) in enumerate(calls, 1):
        assert (up is None) == (n in records | probes | saves | ends), n
        if up is not None:
            x, y, lr, wd, _ = calls[n]
            assert up[0] is x and up[1] is y and (up[2], up[3]) == (lr, wd), n
    assert len({c[2] for c in calls}) > 10  # (a cosine lr: each step's own)


DELAYED = ("channel.error.delay=1", "channel.error.codec=lowrank", "channel.error.q=2",
           "channel.error.drop=0.2", "train.micro_batches=2")


@pytest.mark.parametrize("extra", [(), DELAYED, ("train.lr_warmup_steps=40",)],
                         ids=["plain", "delayed-errors", "warm-up"])
def test_resume_continues_to_the_same_result(tmp_path, extra):
    """Stopped after epoch 2 and resumed: the same run, bit for bit.  With a delayed error
    link, the checkpoint holds the messages queued on it and the forwards still waiting
    for them (rebuilt from their inputs and stashed weights on resume)."""
    full = train(small("rule.name=kp", "train.epochs=3", *extra), tmp_path / "full", progress=False)
    train(small("rule.name=kp", "train.epochs=2", *extra), tmp_path / "part", progress=False)
    if extra == DELAYED:
        saved = torch.load(tmp_path / "part/checkpoint.pt", weights_only=True)["executor"]
        assert saved["stages"][0]["pending"] and saved["channels"][-1]["fifo"]
    resumed = train(small("rule.name=kp", "train.epochs=3", *extra), tmp_path / "part",
                    resume=True, progress=False)
    assert resumed["steps"] == full["steps"]
    assert resumed["test_loss"] == full["test_loss"]
    # the links' bytes over the run's samples, the earlier process's too
    assert resumed.get("channels") == full.get("channels")
    # what the resumed process's own CPU account covers: the third epoch's batches only
    assert resumed["trained_here"]["steps"] == full["steps"] // 3 == full["trained_here"]["steps"] // 3
    assert 0 < resumed["trained_here"]["train_s"] < resumed["train_s"]
    a = torch.load(tmp_path / "full/checkpoint.pt", weights_only=True)["executor"]["stages"]
    b = torch.load(tmp_path / "part/checkpoint.pt", weights_only=True)["executor"]["stages"]
    for sa, sb in zip(a, b):
        for k, v in sa["module"].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, sb["module"][k]), k
    lines = (tmp_path / "part/metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [0, 1, 2]


def test_a_run_resumed_under_other_settings_keeps_what_each_step_trained_with(tmp_path,
                                                                               monkeypatch):
    """config.yaml holds the settings a run goes on with; summary.json's `resumed_with`
    keeps, per resume that changed any, the step and each key's value before and after,
    and agrees with the rates metrics.jsonl logged per epoch.  A re-cut's resume writes
    the checkpoint at once, so a process killed before its own first checkpoint loses
    nothing of the record."""
    from localnet.runtime.ray_executor import RayExecutor

    run = tmp_path / "run"
    train(small("rule.name=fa", "train.epochs=1"), run, progress=False)
    from localnet.config import load_run_config

    cfg, _ = load_run_config(run, ["train.epochs=2", "train.lr=0.01"])
    train(cfg, run, resume=True, progress=False)
    cfg, _ = load_run_config(run, ["train.epochs=3", "runtime.executor=local"])
    monkeypatch.setattr(RayExecutor, "train_step", lambda *a, **k: (_ for _ in ()).throw(
        KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, resume=True, progress=False)
    monkeypatch.undo()
    # the 2-epoch run's summary went as the run went on: it is not done, and says how
    # it stopped (the summary kept would have made it "done" with the old accuracy)
    from localnet.runs import load_run

    assert not (run / "summary.json").exists()
    assert load_run(run).state() == "interrupted after step 32"
    cfg, _ = load_run_config(run)  # the same command again: nothing changes now
    summary = train(cfg, run, resume=True, progress=False)
    assert summary["resumed_with"] == [
        {"at_step": 16, "settings": {"train.epochs": [1, 2], "train.lr": [0.05, 0.01]}},
        {"at_step": 32, "settings": {"runtime.executor": ["inprocess", "local"],
                                     "train.epochs": [2, 3]}}]
    assert json.loads((run / "summary.json").read_text())["resumed_with"] == summary["resumed_with"]
    assert [json.loads(ln)["lr"] for ln in (run / "metrics.jsonl").read_text().splitlines()] \
        == [0.05, 0.01, 0.01]
    now = load_config(run / "config.yaml")
    assert (now.train.lr, now.runtime.executor, now.train.epochs) == (0.01, "local", 3)
    # an unchanged resume records nothing
    again = tmp_path / "again"
    train(small("rule.name=fa", "train.epochs=1"), again, progress=False)
    (again / "summary.json").unlink()
    assert "resumed_with" not in train(small("rule.name=fa", "train.epochs=1"), again,
                                       resume=True, progress=False)


def test_a_resume_the_checkpoint_does_not_fit_changes_no_file(tmp_path):
    """--resume with a config the checkpoint cannot load into (PFA's r changed): the
    error names the mismatch, and the run directory is left byte for byte as it was."""
    from localnet.config import load_run_config

    train(small("rule.name=pfa", "rule.r=2", "train.epochs=1"), tmp_path, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    cfg, _ = load_run_config(tmp_path, ["train.epochs=2", "rule.r=3"])
    with pytest.raises(RuntimeError, match="size mismatch"):
        train(cfg, tmp_path, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def _final_states(run_dir: Path) -> list[dict]:
    """The stage states of a run's last checkpoint, in-process or the actors' files."""
    from localnet.recut import read_actor_states

    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["executor"]
    return saved["stages"] if "stages" in saved else read_actor_states(run_dir, saved)


def _files(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


THREE = ("model.widths=[32,32]", "rule.name=fa", "train.lr=0.01")  # 3 units
# a residual network: per_layer splits its blocks into their layers (BN statistics too)
RES = ("model.name=resnet8", "data.subset=128", "train.micro_batches=2")


@pytest.mark.parametrize("wrote, resumes", [
    (("runtime.executor=inprocess",), ("runtime.executor=local",)),
    (("runtime.executor=local",), ("runtime.executor=inprocess",)),
    (("runtime.executor=local",), ("runtime.executor=local", "runtime.partition={stages: 2}")),
    (("runtime.executor=local", "runtime.partition=per_layer", *RES),
     ("runtime.executor=inprocess", *RES)),
    (("runtime.executor=inprocess", *RES),
     ("runtime.executor=local", "runtime.partition=per_layer", *RES)),
], ids=["one-stage-to-actors", "actors-to-one-stage", "three-actors-to-two",
        "layers-to-one-stage", "one-stage-to-layers"])
def test_a_resume_under_another_cut_goes_on_as_that_run_would_have(tmp_path, wrote, resumes):
    """A checkpoint written by one cut of the units (one in-process stage, or actors)
    resumed under another: every weight, feedback weight and momentum is dealt out to
    the new stages, so the run ends where a run in the new cut from the start ends
    (1f1b's maths does not depend on the cut).  Dropping the momenta, or a unit's
    tensors landing in another's place, would leave them apart."""
    from localnet.config import load_run_config

    full = train(small(*THREE, "train.epochs=3", *resumes), tmp_path / "full", progress=False)
    train(small(*THREE, *wrote), tmp_path / "part", progress=False)
    old_files = set(_files(tmp_path / "part"))
    cfg, _ = load_run_config(tmp_path / "part", ["train.epochs=3", *resumes])
    resumed = train(cfg, tmp_path / "part", resume=True, progress=False)
    assert resumed["steps"] == full["steps"] == (12 if "data.subset=128" in wrote else 48)
    want, got = _final_states(tmp_path / "full"), _final_states(tmp_path / "part")
    assert len(got) == len(want) and len(want) in (1, 2, 3, 8)
    for a, b in zip(want, got):
        assert a["module"].keys() == b["module"].keys()
        for k, v in a["module"].items():
            if isinstance(v, torch.Tensor):
                assert torch.allclose(v, b["module"][k], atol=1e-5, rtol=0), k
        moms = [s["momentum_buffer"] for s in a["opt"]["state"].values()]
        assert len(moms) == len(b["opt"]["state"]) > 0
        for m, s in zip(moms, b["opt"]["state"].values()):
            assert torch.allclose(m, s["momentum_buffer"], atol=1e-5, rtol=0)
    lines = (tmp_path / "part/metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [0, 1, 2]
    (rec,) = resumed["recuts"]  # the summary keeps the run's history
    assert rec["at_step"] == resumed["steps"] * 2 // 3 and rec["from"] != rec["to"]
    assert "recuts" not in full
    # the old cut's files are kept until newer checkpoints replace them: a re-cut at the
    # same step writes a generation of its own, never over what it read
    if "runtime.executor=local" in wrote and "runtime.executor=local" in resumes:
        gens = sorted(p.name for p in (tmp_path / "part/checkpoint").glob("step-*"))
        assert gens == ["step-000000032.1", "step-000000048"]
    assert "checkpoint.pt" in old_files


@pytest.mark.parametrize("wrote, resumes, advice", [
    (("runtime.executor=local", "channel.error.codec=sign"), ("runtime.executor=inprocess",),
     "runtime.executor=local"),
    (("channel.error.codec=sign",), ("runtime.executor=local",), "runtime.executor=inprocess"),
])
def test_a_resume_that_cannot_be_re_cut_names_why_and_changes_no_file(tmp_path, wrote, resumes,
                                                                      advice):
    """What no other cut can take: a channel's state (codec residuals, queued messages)
    belongs to an edge of its cut.  The error says so, and the run directory is left
    byte for byte as it was; the executor it advises goes on from the checkpoint."""
    from localnet.config import ConfigError, load_run_config

    train(small(*THREE, "train.epochs=1", *wrote), tmp_path, progress=False)
    before = _files(tmp_path)
    cfg, _ = load_run_config(tmp_path, ["train.epochs=2", *resumes])
    with pytest.raises(ConfigError, match=f"--resume: the checkpoint has communication "
                                          f"channels .*{re.escape(advice)}"):
        train(cfg, tmp_path, resume=True, progress=False)
    assert _files(tmp_path) == before
    cfg, _ = load_run_config(tmp_path, ["train.epochs=2", advice])
    assert train(cfg, tmp_path, resume=True, progress=False)["steps"] == 32  # 2 epochs


def test_nan_fails_clearly_keeps_the_checkpoint_and_its_advice_works(tmp_path, capsys):
    """A rate that blows up stops the run at the first non-finite loss, names the step,
    quotes the losses, leaves the checkpoint as it was -- and the command it suggests
    (resume at a tenth of the rate) does finish."""
    from localnet.config import load_run_config

    train(small("rule.name=fa", "train.epochs=1"), tmp_path, progress=False)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(NonFiniteLossError) as info:
        train(small("rule.name=fa", "train.epochs=3", "train.lr=1e12"), tmp_path, resume=True,
              progress=False)
    msg = str(info.value)
    # the checkpoint's own weights gave the finite loss of step 17; the 1e12 update after
    # it is what diverged, so it is worth going on from
    assert re.search(r"diverged at step (1[89]|2\d) \(epoch 2 of 3\): the loss is (nan|inf)", msg)
    assert "The last checkpoint is from step 16 (the loss on its weights: " in msg
    assert msg.endswith(f"localnet run --resume {tmp_path} --set train.lr=1e+11")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    # the directory says why it stopped, for whoever reads it later
    stopped = json.loads((tmp_path / "stopped.json").read_text())
    assert stopped["how"] == "diverged" and stopped["message"] == msg
    assert (stopped["checkpoint_step"], stopped["error"]) == (16, "NonFiniteLossError")
    assert stopped["after_step"] == int(re.search(r"at step (\d+)", msg).group(1)) - 1
    # resumed as it was, it says it will diverge again -- and it does, at the same step
    from localnet.cli import main

    assert main(["run", "--resume", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert (f"localnet: note: this run diverged after step {stopped['after_step']}, and it "
            f"goes on with the same config") in err
    assert re.search(r"diverged at step (\d+)", err).group(1) == str(stopped["after_step"] + 1)
    cfg, _ = load_run_config(tmp_path, ["train.epochs=2", "train.lr=0.05"])
    summary = train(cfg, tmp_path, resume=True, progress=False)
    assert summary["steps"] == 32 and summary["test_loss"] < 10
    assert not (tmp_path / "stopped.json").exists()  # it went on


@pytest.mark.parametrize("saved,says", [
    (None, "No checkpoint was saved before it: start again at a smaller rate, for example "
           "--set train.lr=0.5 (train.lr is 5), or ramp the rate up past this step: --set "
           "train.lr_warmup_steps=100."),
    (7, "The last checkpoint (step 7) holds the weights that diverged: start again"),
    (6, "The last checkpoint is from step 6 (the loss on its weights: 40).  To go on from it "
        "at a smaller rate (train.lr is 5): localnet run --resume RUN --set train.lr=0.5"),
])
def test_a_divergence_judges_the_checkpoint_by_the_loss_on_its_weights(saved, says):
    """Step k's forward runs on the weights step k-1 left: a NaN at step 8 condemns a
    checkpoint of step 7, not one of step 6 (whose weights step 7's finite loss tested)."""
    from localnet.train import _LossTrail

    trail = _LossTrail(None)
    for step, loss in enumerate([2.5, 3.0, 5.0, 9.0, 20.0, 30.0, 40.0], start=1):
        trail.step(step, loss)
        if step == saved:
            trail.saved = step
    trail.saved = saved
    err = trail.diverged("the loss is nan", 8, 0, small("train.lr=5"), Path("RUN"))
    assert str(err).startswith("training diverged at step 8 (epoch 1 of 2): the loss is nan (the "
                               "loss: 2.5 at step 1, 40 at step 7).")
    assert says in str(err)
    assert ("--resume" in str(err)) == (saved == 6)


def test_a_loss_above_ln_c_at_an_accuracy_far_above_chance_is_noted_as_huge_logits(tmp_path,
                                                                                   capsys):
    """FA on the MNIST MLP at twice its rate ended at 83% of its training images right and
    a mean training loss of 92; with low-rank errors at 0.01, at 72% of its test images
    right and a test loss of 2.74: worse than the ln 10 = 2.303 of an output that ignores
    its input, which only logits grown huge on the images it gets wrong can score.  Its
    accuracy alone read as a rule a little worse.  Such an epoch gives a note, and the
    summary records the last epoch's; a run below ln C, or at chance's accuracy, none."""
    from localnet.train import _LossTrail

    cfg = small()
    for last, on in [({"train_loss": 91.80, "train_accuracy": 0.8314,  # FA, lr 0.02
                       "test_loss": 95.67, "test_accuracy": 0.9158}, "train"),
                     ({"train_loss": 0.6530, "train_accuracy": 0.8360,  # lowrank q=256
                       "test_loss": 2.7391, "test_accuracy": 0.7247}, "test"),
                     ({"train_loss": 0.5243, "train_accuracy": 0.8673,  # FA at 0.01
                       "test_loss": 0.2614, "test_accuracy": 0.9377}, None),
                     ({"train_loss": 2.3100, "train_accuracy": 0.1130,  # a constant output
                       "test_loss": 2.3050, "test_accuracy": 0.1135}, None),
                     ({"train_loss": 2.4, "train_accuracy": 0.1999,  # under twice chance
                       "test_loss": 2.0, "test_accuracy": 0.5}, None)]:
        huge = _LossTrail.above_chance(last, 10, 0, cfg)
        assert (huge[0]["on"] if huge else None) == on
        if on:
            assert huge[0] == {"epoch": 1, "on": on, "loss": round(last[f"{on}_loss"], 4),
                               "accuracy": last[f"{on}_accuracy"], "chance_loss": 2.3026}
            assert "is above ln 10 = 2.303" in huge[1] and "train.lr is 0.05" in huge[1]
    # end to end: BP on the synthetic problem at ten times small()'s rate
    blown = train(small("rule.name=bp", "train.lr=0.5"), tmp_path / "blown", progress=False)
    assert blown["train_loss"] > math.log(10) and blown["test_accuracy"] > 0.5
    b = blown["loss_above_chance"]
    assert (b["epoch"], b["on"], b["loss"]) == (2, "train", round(blown["train_loss"], 4))
    err = " ".join(capsys.readouterr().err.split())  # (the note is wrapped to the terminal)
    assert err.count("the logits have grown huge") == 1  # noted once
    calm = train(small("rule.name=bp"), tmp_path / "calm", progress=False)
    assert "loss_above_chance" not in calm and "logits" not in capsys.readouterr().err
    from localnet.cli import main

    assert main(["report", str(tmp_path / "blown"), str(tmp_path / "calm"),
                 "--out", str(tmp_path / "report")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"blown: epoch 2's train loss {b['loss']:g} was above ln of the classes (2.3026)" \
        in out and "calm: epoch" not in out


def test_huge_logits_name_the_error_codec_that_biases_what_arrives():
    """DFA on the MNIST MLP with topk errors (k = 0.1, no error feedback) blew up at every
    seed at lr 0.01 and at 0.005: its mean training loss ended at 393 with 76% of the
    images right.  With error feedback the same runs trained (0.949 at 0.01, none blown
    up), and so did FA, uSF and KP with sign errors, which blew up without it; so the
    note names the link and that option.  Error feedback, another codec, or channels off
    leave the plain note; an edge's own topk override is named by its key."""
    from localnet.train import _LossTrail

    last = {"train_loss": 392.6, "train_accuracy": 0.7605,  # DFA, topk, lr 0.01, seed 0
            "test_loss": 134.49, "test_accuracy": 0.8876}
    named = "without error_feedback never sends"
    for sets, key in [(["channel.error.codec=topk"], "channel.error"),
                      (["channel.error.codec=topk", "channel.error.error_feedback=true"], None),
                      (["channel.error.codec=int8"], None),
                      ([], None),
                      (["channel.error.codec=topk", "channel.enabled=false"], None),
                      (["channel.edges={1: {error: {codec: topk, k: 0.05}}}"],
                       "channel.edges.1.error"),
                      (["channel.error.codec=sign"], "channel.error"),
                      (["channel.error.codec=sign", "channel.error.error_feedback=true"], None)]:
        record, note = _LossTrail.above_chance(last, 10, 0, small("rule.name=dfa", *sets))
        assert record["on"] == "train" and "the logits have grown huge" in note
        assert (named in note) == (key is not None), sets
        if key:
            codec = sets[0].split("=")[1] if sets[0].startswith("channel.error.") else "topk"
            assert f"Here {key}: {codec} {named}" in note and "error_feedback: true" in note
            assert note.count(named) == 1


def test_huge_logits_say_what_each_error_link_delivered(tmp_path, capsys):
    """FA on the MNIST MLP with one-bit errors (error feedback) on both links passed ln C
    in epoch 4 of 5 at lr 0.005, and the last link alone did it: in epoch 5 fc2->fc1
    delivered a cosine of 0.644 and a rest of 0.726 of its messages' size, head->fc2 0.287
    and 0.965 (RESULTS.md).  The note gives each link's two figures, input to output, and
    where a rest is that large, that a finer codec on one link can mend it; exact links
    get their figures alone, and a run without channels neither."""
    from localnet.train import _LossTrail

    last = {"train_loss": 6.142, "train_accuracy": 0.8691, "test_loss": 4.116,
            "test_accuracy": 0.9163}
    cfg = small("rule.name=fa", "channel.error.codec=sign", "channel.error.error_feedback=true")
    one_bit = {"fc2->fc1": {"cos": 0.644, "norm_ratio": 1.0, "rest": 0.726},
               "head->fc2": {"cos": 0.287, "norm_ratio": 1.006, "rest": 0.965}}
    exact = {e: {"cos": 1.0, "norm_ratio": 1.0, "rest": 0.0} for e in one_bit}
    advice = "A rest near 1 or more on one link can blow a rule up"
    notes = [_LossTrail.above_chance(last, 10, 4, cfg, links)[1]
             for links in (one_bit, exact, None)]
    assert ("This epoch's error links, input to output, delivered: fc2->fc1 cos 0.64, "
            "rest 0.73; head->fc2 cos 0.29, rest 0.96") in notes[0] and advice in notes[0]
    assert "fc2->fc1 cos 1.00, rest 0.00; head->fc2 cos 1.00, rest 0.00" in notes[1] \
        and advice not in notes[1]
    assert "error links" not in notes[2]
    # a link's own noise is a rest by itself, not the codec's: no codec to refine there
    noisy = {"fc2->fc1": {"cos": 0.99, "norm_ratio": 1.0, "rest": 0.1, "noise": 0.0},
             "head->fc2": {"cos": 0.74, "norm_ratio": 1.35, "rest": 0.91, "noise": 0.9}}
    note = _LossTrail.above_chance(last, 10, 4, cfg, noisy)[1]
    assert "head->fc2 cos 0.74, rest 0.91 (noise 0.9)" in note and advice not in note
    assert "The noise set on head->fc2 is a rest of its size by itself" in note
    assert "half the rate bears twice the noise" in note
    noisy["head->fc2"]["noise"] = 0.3  # the rest beyond it is the codec's, 0.86
    note = _LossTrail.above_chance(last, 10, 4, cfg, noisy)[1]
    assert advice in note and "The noise set on" not in note
    # end to end: the run's own epoch records reach the note (exact links, accounted)
    blown = train(small("rule.name=bp", "train.lr=0.5", "channel.enabled=true"),
                  tmp_path / "blown", progress=False)
    assert blown["loss_above_chance"]
    err = " ".join(capsys.readouterr().err.split())
    assert "delivered: head->fc1 cos 1.00, rest 0.00 (rest:" in err and advice not in err
    # and the noise set on a link, from the run's own channel summary
    train(small("rule.name=bp", "train.lr=0.5", "channel.error.noise=0.8"), tmp_path / "noisy",
          progress=False)
    err = " ".join(capsys.readouterr().err.split())
    assert re.search(r"delivered: head->fc1 cos 0\.\d\d, rest 0\.[78]\d \(noise 0\.8\)", err)
    assert "The noise set on head->fc1 is a rest" in err


def test_a_loss_that_sits_at_ln_c_is_noted_as_an_output_that_ignores_its_input(tmp_path,
                                                                              capsys):
    """ResNet-56 at 0.1 from its first step ended at a constant output, and nothing said so
    but the chance accuracy at the end.  Twenty steps within 0.02 of ln C give a note (once);
    a run that learns gives none, and neither do fewer steps or one step outside the band."""
    from localnet.train import _LossTrail

    measured = [2.296, 2.289, 2.302, 2.291, 2.289, 2.29, 2.301, 2.306, 2.311, 2.304] * 2
    for losses, noted in [(measured, True), (measured[:19], False),
                          (measured[:19] + [2.33], False), ([0.9] * 20, False)]:
        trail = _LossTrail(None)
        for step, loss in enumerate(losses, 1):
            trail.step(step, loss)
        note = trail.constant_output(10, small())
        assert (note is not None) == noted
        if noted:
            assert "within 0.02 of ln 10 = 2.303 for the last 20 steps" in note
    # end to end: weight decay takes an MLP's weights to zero, so its logits to 0
    collapsed = small("rule.name=bp", "train.weight_decay=5", "train.lr=0.1", "train.momentum=0",
                      "train.batch_size=16", "model.init=xavier")
    summary = train(collapsed, tmp_path / "flat", progress=False)
    assert summary["test_loss"] == pytest.approx(math.log(10), abs=1e-3)
    assert capsys.readouterr().err.count("note: the training loss has stayed within") == 1
    # noted after the first epoch's 32 steps; summary.json keeps it, and a report says it
    assert summary["constant_output"] == {"after_step": 32, "loss": 2.3026}
    learns = train(small("rule.name=bp"), tmp_path / "learns", progress=False)
    assert "note: the training loss" not in capsys.readouterr().err
    assert "constant_output" not in learns
    from localnet.cli import main

    assert main(["report", str(tmp_path / "flat"), str(tmp_path / "learns"),
                 "--out", str(tmp_path / "report")]) == 0  # not the checkout's ./report
    out = " ".join(capsys.readouterr().out.split())
    assert ("flat: the training loss sat at 2.3026 (ln of the classes: an output that ignores "
            "its input) by step 32") in out and "learns: the training loss" not in out


def test_the_progress_display_keeps_a_diverging_loss_short_and_reports_each_epoch(capsys):
    """A loss of 7e18 is 7.44e+18 on the bar, not nineteen digits that push the rest off
    the line; each epoch's line has its number out of all, losses, accuracy and time."""
    from localnet.progress import TrainProgress, _loss

    assert (_loss(2.302585), _loss(9999.4), _loss(7.441e18), _loss(float("nan"))) == \
        ("2.303", "9999.400", "7.44e+18", "nan")
    bar = TrainProgress(10, enabled=True)
    bar.epoch_done(2, 40, {"train_loss": 1.23456, "test_loss": 1.5, "test_accuracy": 0.4213},
                   41.6)
    bar.close()
    assert "epoch 3/40: train loss 1.235  test loss 1.500  test accuracy 0.4213  (42 s)" in \
        capsys.readouterr().err


def test_schedules():
    cfg = load_config(ROOT / "configs/resnet_pfa.yaml")
    assert lr_at(cfg, 0, 0, 100) == 0.1
    assert lr_at(cfg, 150, 0, 100) == pytest.approx(0.1 * 0.1 ** 2)
    assert wd_at(cfg, 0) == 5e-3 and wd_at(cfg, 1) == 1e-4 and wd_at(cfg, 249) == 1e-4
    cos = load_config(None, ["train.lr_schedule=cosine", "train.lr=1.0", "train.epochs=10"])
    assert lr_at(cos, 0, 0, 10) == 1.0
    assert lr_at(cos, 5, 0, 10) == pytest.approx(0.5)


def test_a_warm_up_ramps_the_schedules_rate_by_the_step():
    """Step s (counted from 0 over the whole run) of a warm-up over N steps gets (s+1)/N
    of the schedule's rate, across an epoch's end, and then the schedule's own."""
    cfg = load_config(None, ["train.lr=0.1", "train.lr_warmup_steps=4", "train.epochs=3",
                             "train.lr_schedule=milestones", "train.lr_milestones=[2]"])
    assert [lr_at(cfg, e, i, 3) for e in range(3) for i in range(3)] == pytest.approx(
        [0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])
    cos = load_config(None, ["train.lr_schedule=cosine", "train.lr=1.0", "train.epochs=10",
                             "train.lr_warmup_steps=10"])
    assert lr_at(cos, 0, 4, 10) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.04)))
    with pytest.raises(ConfigError, match="train.lr_warmup_steps"):
        load_config(None, ["train.lr_warmup_steps=-1"])


@pytest.mark.parametrize("executor", ["inprocess", "local"])
def test_a_warm_up_reaches_the_optimizer(tmp_path, executor):
    """The first step of a 2-step warm-up at lr 0.1 is a step at 0.05: the same weights
    to the bit, in one process and in the actors' code."""
    for name, sets in {"warm": ["train.lr=0.1", "train.lr_warmup_steps=2"],
                       "half": ["train.lr=0.05"]}.items():
        train(small("rule.name=fa", "train.max_steps=1", "train.micro_batches=2",
                    "train.weight_decay=1e-3", f"runtime.executor={executor}", *sets),
              tmp_path / name, progress=False)
    warm, half = _final_states(tmp_path / "warm"), _final_states(tmp_path / "half")
    assert len(warm) == len(half) > 0
    for a, b in zip(warm, half):
        assert a["module"].keys() == b["module"].keys()
        for k, v in a["module"].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, b["module"][k]), k
        assert len(a["opt"]["state"]) == len(b["opt"]["state"]) > 0
        for m, n in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
            assert torch.equal(m["momentum_buffer"], n["momentum_buffer"])


def test_version_names_localnet_and_its_engines(capsys):
    from localnet.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("localnet ") and f"torch {torch.__version__.split('+')[0]}" in out


def test_cli_run_and_rules(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "localnet", "run", str(ROOT / "configs/mnist_mlp.yaml"),
                          "--set", "data.name=synthetic", "--set", "data.subset=256",
                          "--set", "train.epochs=1", "--set", "model.widths=[16]",
                          "--out", str(out), "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[0])["steps"] == 256 // 64
    assert (out / "summary.json").exists()
    rules = subprocess.run([sys.executable, "-m", "localnet", "rules"], capture_output=True,
                           text=True, timeout=120)
    for name in ("bp", "fa", "dfa", "usf", "brsf", "frsf", "kp", "wm", "pfa"):
        assert name in rules.stdout
    assert "Li & Benna" in rules.stdout


@pytest.mark.parametrize("sig,code,says", [("SIGINT", 130, "interrupted"),
                                           ("SIGTERM", 143, "terminated (SIGTERM)")])
def test_ctrl_c_ends_a_run_with_one_line_and_its_checkpoint_kept(tmp_path, sig, code, says):
    """Ctrl-C in the middle of a run -- or SIGTERM, what a scheduler or `ray job stop`
    sends: no traceback; the line says how to resume, and the checkpoint it points to is
    intact."""
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "localnet", "run", str(ROOT / "configs/mnist_mlp.yaml"),
                             "--set", "data.name=synthetic", "--set", "data.subset=256",
                             "--set", "train.epochs=100000", "--set", "model.widths=[16]",
                             "--out", str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (out / "checkpoint.pt").exists() and proc.poll() is None
        time.sleep(0.5)  # into the next epoch
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] >= 256 // 64
    stopped = json.loads((out / "stopped.json").read_text())
    assert (stopped["how"], stopped["message"]) == (
        "interrupted", "SIGTERM" if sig == "SIGTERM" else "Ctrl-C")
    # the line names the last step trained and the checkpoint's, and so the steps lost
    done, kept = stopped["after_step"], stopped["checkpoint_step"]
    assert kept == state["step"] <= done, (stopped, state["step"], err)
    lost = "" if done == kept else f"; step {done} is trained again" if done == kept + 1 \
        else f"; steps {kept + 1}-{done} are trained again"
    assert (f"localnet: {says} after step {done}; resume from the last checkpoint (step "
            f"{kept}{lost}) with: localnet run --resume {out}") in err


def test_sigterm_to_the_whole_process_group_stops_a_ray_run_with_its_line(tmp_path):
    """`timeout`, a job scheduler or a systemd stop sends SIGTERM to every process of
    the group at once, so the embedded Ray's GCS ends with the driver.  The run still
    stops with its one line and its checkpoint, in seconds: without the GCS, removing
    the placement group would wait 60 s, and then Ray would end the process before the
    line is printed."""
    import signal
    import time

    pytest.importorskip("ray")
    out = tmp_path / "run"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "localnet", "run", str(ROOT / "configs/mnist_mlp.yaml"),
                             "--set", "data.name=synthetic", "--set", "data.subset=256",
                             "--set", "train.epochs=100000", "--set", "model.widths=[16]",
                             "--set", "runtime.executor=ray", "--out", str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own group, as under a shell
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (out / "checkpoint.pt").exists() and proc.poll() is None
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err
    assert took < 45, f"{took:.0f} s to stop"
    assert "Traceback" not in err and "Failed to connect to GCS" not in err
    stopped = json.loads((out / "stopped.json").read_text())
    assert (stopped["how"], stopped["message"]) == ("interrupted", "SIGTERM")
    assert re.search(rf"localnet: terminated \(SIGTERM\) after step {stopped['after_step']}; "
                     rf"resume from the last checkpoint \(step {stopped['checkpoint_step']}"
                     rf"[^)]*\) with: localnet run --resume {re.escape(str(out))}", err), err


def test_a_stop_the_main_thread_could_not_record_is_recorded_for_it(tmp_path):
    """A SIGTERM to the process group can leave the main thread in a Ray call that waits
    for Ray's ended processes; the watchdog then says the line and ends the process, and
    the run's stopped.json was missing (a flaky CI failure of the test above)."""
    import signal
    from localnet.train import record_signal_stop
    record_signal_stop(tmp_path, signal.SIGTERM, {})  # no step reached: only the line
    assert not (tmp_path / "stopped.json").exists()
    record_signal_stop(tmp_path, signal.SIGTERM, {"step": 7, "saved": 4})
    rec = json.loads((tmp_path / "stopped.json").read_text())
    assert (rec["how"], rec["message"], rec["after_step"], rec["checkpoint_step"]) == (
        "interrupted", "SIGTERM", 7, 4)
    record_signal_stop(tmp_path, signal.SIGINT, {"step": 9, "saved": 8})  # recorded already
    assert json.loads((tmp_path / "stopped.json").read_text()) == rec
    (tmp_path / "stopped.json").unlink()
    record_signal_stop(tmp_path, signal.SIGINT, {"step": 9, "saved": None})
    assert json.loads((tmp_path / "stopped.json").read_text())["message"] == "Ctrl-C"


def test_cli_missing_dataset_message(tmp_path):
    res = subprocess.run([sys.executable, "-m", "localnet", "run", str(ROOT / "configs/mnist_mlp.yaml"),
                          "--set", f"data.root={tmp_path}", "--out", str(tmp_path / "r"), "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert str(tmp_path) in res.stderr and "MNIST" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "r").exists()  # a run that never started leaves no directory


def test_a_run_that_cannot_start_leaves_no_directory_but_keeps_a_given_one(tmp_path, capsys):
    from localnet.cli import main

    args = ["run", str(ROOT / "configs/mnist_mlp.yaml"), "--set", "data.name=synthetic",
            "--set", "data.subset=50", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "new" / "run")]) == 2
    assert "train.batch_size: 64 is more than the 50 training samples (data.subset: 50)" \
        in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # nor the parent it brought
    (tmp_path / "mine").mkdir()  # given empty: kept, with what the failed start wrote
    assert main(args + ["--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine").is_dir()
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "mine")]) == 2  # those leftovers are no bar
    assert "more than the 50 training samples" in capsys.readouterr().err
    # a run's files among the user's would be hard to tell apart: refused, nothing written
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("the user's own")
    assert main(args + ["--out", str(tmp_path / "theirs")]) == 2
    assert (f"--out {tmp_path / 'theirs'} holds other files (notes.txt): a run goes into a new "
            f"or empty directory") in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "theirs").iterdir()] == ["notes.txt"]


def test_ctrl_c_during_start_up_leaves_no_directory(tmp_path, capsys, monkeypatch):
    import localnet.train as T
    from localnet.cli import main

    def interrupted(*a, **k):  # Ctrl-C while the actors start
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "build", interrupted)
    assert main(["run", str(ROOT / "configs/mnist_mlp.yaml"), "--set", "data.name=synthetic",
                 "--out", str(tmp_path / "r"), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "localnet: interrupted; it had not trained yet, so nothing was kept" in err
    assert not (tmp_path / "r").exists()


def test_the_stop_line_comes_before_the_executor_closes(tmp_path, capsys, monkeypatch):
    """After a SIGTERM to the whole process group, closing a Ray executor can take
    seconds, or Ray can end the process: the line naming --resume is said first."""
    import localnet.train as T
    from localnet.cli import main
    from localnet.engine import InProcessExecutor

    def stopped(cfg, run_dir, *a):
        (run_dir / "checkpoint.pt").write_bytes(b"")  # as if a checkpoint were kept
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "_train", stopped)
    monkeypatch.setattr(InProcessExecutor, "close", lambda self: print("closing", file=sys.stderr))
    assert main(["run", str(ROOT / "configs/mnist_mlp.yaml"), "--set", "data.name=synthetic",
                 "--out", str(tmp_path / "r"), "--no-progress"]) == 130
    err = capsys.readouterr().err
    line = f"localnet: interrupted; resume from the last checkpoint with: localnet run --resume {tmp_path / 'r'}"
    assert err.count(line) == 1 and err.index(line) < err.index("closing")


@pytest.mark.parametrize("step,saved,says", [
    (8, 8, "after step 8; resume from the last checkpoint (step 8) with"),
    (9, 8, "after step 9; resume from the last checkpoint (step 8; step 9 is trained "
           "again) with"),
    (40, 20, "after step 40; resume from the last checkpoint (step 20; steps 21-40 are "
             "trained again) with")])
def test_the_stop_line_says_which_steps_a_resume_trains_again(tmp_path, capsys, monkeypatch,
                                                              step, saved, says):
    """Stopped in the middle of an epoch, the steps since the last checkpoint are lost:
    the line says how many, so a user can wait for the epoch's end instead."""
    import localnet.train as T
    from localnet.cli import main

    def stopped(cfg, run_dir, ckpt, progress, data, rule, ex, model, killed, position):
        (run_dir / "checkpoint.pt").write_bytes(b"")  # as if a checkpoint were kept
        position.update(step=step, saved=saved)
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "_train", stopped)
    assert main(["run", str(ROOT / "configs/mnist_mlp.yaml"), "--set", "data.name=synthetic",
                 "--out", str(tmp_path / "r"), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert f"localnet: interrupted {says}: localnet run --resume {tmp_path / 'r'}" in err


def test_actors_sharing_a_gpu_get_the_advice_to_run_in_one_process(tmp_path, capsys, monkeypatch):
    """What the runtime reports as GPU sharing (executor_state.gpu_sharing) is said once,
    with the setting that fixes it; a run without it says nothing of GPUs."""
    from localnet.engine import InProcessExecutor

    train(small("train.epochs=1"), tmp_path / "alone", progress=False)
    assert "GPU" not in capsys.readouterr().err
    monkeypatch.setattr(InProcessExecutor, "gpu_sharing", lambda self: (11, 1))
    train(small("train.epochs=1"), tmp_path / "shared", progress=False)
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("note: 11 actors share 1 GPU, each") == 1
    assert "--set runtime.executor=inprocess" in err


def test_a_ray_runs_coordinator_is_single_threaded_and_a_caller_gets_its_threads_back(tmp_path):
    """The coordinator only cuts batches on the cores its actors use (one torch thread
    unless train.threads says otherwise); train() leaves the caller's own count as it was."""
    from localnet.train import process_threads

    assert process_threads(small("runtime.executor=ray")) == 1
    assert process_threads(small("runtime.executor=ray", "train.threads=3")) == 3
    assert process_threads(small("runtime.executor=inprocess")) is None
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train(small("train.epochs=1", "train.threads=1"), tmp_path, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_resume_of_what_is_not_a_run_says_so(tmp_path, capsys):
    from localnet.cli import main

    assert main(["run", "--resume", str(tmp_path / "nope")]) == 2
    assert f"--resume: no run directory {tmp_path / 'nope'}" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert f"--resume: {tmp_path} is not a run directory (no config.yaml)" in \
        capsys.readouterr().err
    (tmp_path / "sweep.csv").write_text("rule\n")  # a sweep's directory
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert (f"no config.yaml); it is a sweep's: run the sweep's command again with --out "
            f"{tmp_path}, or --resume one of its points") in capsys.readouterr().err


def test_resume_with_a_config_or_an_out_that_it_would_ignore_is_refused(tmp_path, capsys):
    """--resume goes on with the run's own config.yaml in its own directory: a CONFIG
    (perhaps another model's) or an --out beside it would be ignored, so the command is
    refused, naming what to leave out, and nothing is written anywhere."""
    from localnet.cli import main

    run = tmp_path / "run"
    train(small("rule.name=fa", "train.epochs=1"), run, progress=False)
    before = _files(tmp_path)
    config = str(ROOT / "configs/resnet_pfa.yaml")
    with pytest.raises(SystemExit) as exit_:
        main(["run", config, "--resume", str(run), "--set", "train.epochs=2"])
    assert exit_.value.code == 2
    assert (f"--resume {run} goes on with that run's own config.yaml, in its own directory: "
            f"give no CONFIG ({config}); --set what should change") in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--resume", str(run), "--out", str(tmp_path / "elsewhere")])
    assert exit_.value.code == 2
    assert f"give no --out ({tmp_path / 'elsewhere'})" in capsys.readouterr().err
    assert _files(tmp_path) == before


def test_a_new_run_into_a_directory_holding_a_run_changes_nothing(tmp_path, capsys):
    """It would restart the logs and write over the checkpoint: refused, naming --resume."""
    from localnet.cli import main

    train(small("train.epochs=1"), tmp_path, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert main(["run", str(ROOT / "configs/mnist_mlp.yaml"), "--set", "data.name=synthetic",
                 "--out", str(tmp_path), "--no-progress"]) == 2
    assert f"continue it with: localnet run --resume {tmp_path}" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_a_run_that_diverged_before_its_first_checkpoint_says_what_to_do(tmp_path, capsys):
    """One line, exit 1, naming the step and a smaller rate; its logs stay, and neither a
    --resume nor a new run into the same --out touches them."""
    from localnet.cli import main

    run = ["run", str(ROOT / "configs/mnist_mlp.yaml"), "--set", "data.name=synthetic",
           "--set", "train.lr=1e12", "--out", str(tmp_path / "r"), "--no-progress"]
    assert main(run) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"localnet: training diverged at step \d+ \(epoch 1 of 40\): the loss is "
                        r"(nan|inf)( \(the loss: .*\))?\.  No checkpoint was saved before it: start again at a "
                        r"smaller rate, for example --set train.lr=1e\+11 \(train.lr is "
                        r"1e\+12\), or ramp the rate up past this step: --set "
                        r"train.lr_warmup_steps=100\.", err)
    kept = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()}
    assert "steps.jsonl" in kept and "checkpoint.pt" not in kept
    assert main(["run", "--resume", str(tmp_path / "r")]) == 2
    assert "the run stopped before its first one, so there is nothing to resume" in \
        capsys.readouterr().err
    assert main(run) == 2
    assert "holds a run that stopped before its first checkpoint" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()} == kept


@pytest.mark.parametrize("raised,says", [
    ("ours", "localnet: no Ray cluster at runtime.address=x:1: nothing answers"),
    ("theirs", "localnet: RuntimeError: CUDA error: out of memory"),
])
def test_a_runtime_error_is_one_line_named_by_class_only_when_not_ours(tmp_path, capsys,
                                                                       monkeypatch, raised,
                                                                       says):
    """localnet's own errors say what happened; a library's RuntimeError needs its class
    to be read.  Either way: one line, exit 1, no traceback."""
    import localnet.train as T
    from localnet.cli import main
    from localnet.runtime.session import ClusterUnreachable

    def fail(*a, **k):
        raise (ClusterUnreachable("no Ray cluster at runtime.address=x:1: nothing answers")
               if raised == "ours" else RuntimeError("CUDA error: out of memory"))

    monkeypatch.setattr(T, "build", fail)
    assert main(["run", str(ROOT / "configs/mnist_mlp.yaml"), "--set", "data.name=synthetic",
                 "--out", str(tmp_path / "r"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == says and "Traceback" not in "\n".join(err)


def test_an_unexpected_error_is_one_line_and_its_traceback_a_file(tmp_path, capsys, monkeypatch):
    import localnet.train as T
    from localnet.cli import main

    def bug(*a, **k):
        raise KeyError("a bug")

    monkeypatch.setattr(T, "build", bug)
    monkeypatch.delenv("LOCALNET_DEBUG", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR afresh
    args = ["run", str(ROOT / "configs/mnist_mlp.yaml"), "--set", "data.name=synthetic",
            "--out", str(tmp_path / "r"), "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "localnet: unexpected KeyError: 'a bug'" in err and "Traceback" not in err
    (trace,) = tmp_path.glob("localnet-error-*.txt")
    assert trace.name in err and "raise KeyError" in trace.read_text()
    assert trace.read_text().startswith("localnet ") and "torch " in trace.read_text()
    monkeypatch.setenv("LOCALNET_DEBUG", "1")
    with pytest.raises(KeyError):
        main(args)

    def full(*a, **k):  # the machine's error, not a bug: said as it is
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(T, "build", full)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "localnet: [Errno 28] No space left on device" in err and "localnet: unexpected" not in err


def test_a_run_that_fails_after_a_checkpoint_names_the_resume_command(tmp_path, capsys,
                                                                       monkeypatch):
    """A failure mid-run (a peer that went silent, say) is its one line, then where the
    saved work is and the command that goes on from it -- which does."""
    from localnet.cli import main
    from localnet.engine import InProcessExecutor

    step, calls = InProcessExecutor.train_step, []

    def silent_on_the_sixth(self, *a, **k):
        calls.append(1)
        if len(calls) == 6:
            raise TimeoutError("nothing arrived within 60 s on edge stage2->stage1")
        if len(calls) > 6:  # resumed: a run going on has no record of having stopped
            assert not (run / "stopped.json").exists()
        return step(self, *a, **k)

    monkeypatch.setattr(InProcessExecutor, "train_step", silent_on_the_sixth)
    run = tmp_path / "r"
    args = ["run", str(ROOT / "configs/mnist_mlp.yaml"), "--set", "data.name=synthetic",
            "--set", "runtime.checkpoint_every=4", "--set", "train.epochs=1",
            "--out", str(run), "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2:] == [
        "localnet: TimeoutError: nothing arrived within 60 s on edge stage2->stage1",
        f"localnet: its last checkpoint is kept; once that is fixed, go on from it with: "
        f"localnet run --resume {run}"]
    stopped = json.loads((run / "stopped.json").read_text())
    assert (stopped["how"], stopped["after_step"], stopped["checkpoint_step"]) == ("failed", 5, 4)
    assert main(["run", "--resume", str(run), "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 512 // 64


def test_a_run_directory_that_cannot_be_made_names_it_and_the_setting(tmp_path, capsys):
    from localnet.cli import main

    (tmp_path / "file").write_text("not a directory")
    args = ["run", str(ROOT / "configs/mnist_mlp.yaml"), "--set", "data.name=synthetic",
            "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "file" / "run")]) == 1
    assert capsys.readouterr().err.strip().endswith(
        f"localnet: cannot make the run directory {tmp_path / 'file' / 'run'} (Not a "
        f"directory); --out names where it goes")
    assert main(args + ["--set", f"out_dir={tmp_path / 'file'}"]) == 1
    assert "); out_dir names where it goes" in capsys.readouterr().err


def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    """A retried command on a run that completed: every file stays byte-identical, and
    the command says the run finished, where and with what."""
    from localnet.cli import main

    run = tmp_path / "run"
    summary = train(small("rule.name=fa", "train.epochs=1"), run, progress=False)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    mtimes = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert main(["run", "--resume", str(run), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert f"finished at step {summary['steps']} (1 epoch);" in err
    assert str(run / "summary.json") in err
    assert json.loads(out.splitlines()[0])["test_accuracy"] == summary["test_accuracy"]
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == mtimes
    # asking for more epochs is a continuation, not a finished run
    more = train(small("rule.name=fa", "train.epochs=2"), run, resume=True, progress=False)
    assert more["steps"] == 2 * summary["steps"] and "finished" not in more


def test_a_path_an_earlier_localnet_kept_relative_is_no_change_of_settings(tmp_path, capsys,
                                                                           monkeypatch):
    """Paths are kept absolute now; a run recorded with `data.root: data` (relative) reads
    as the same path on both sides of the comparison, not as a --set of another root:
    its finished run stays finished, and nothing is refused or recorded as a change.
    A name that a new run may no longer take (`old/style`) is its directory's already."""
    from localnet.cli import main
    from localnet.files import load_state, save_state

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    summary = train(small("rule.name=fa", "train.epochs=1"), run, progress=False)
    ckpt = load_state(run / "checkpoint.pt")
    ckpt["config"]["data"]["root"] = "data"  # as an earlier localnet wrote it
    ckpt["config"]["name"] = "old/style"
    save_state(ckpt, run / "checkpoint.pt")
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(
        "root: null", "root: data").replace("name: null", "name: old/style"))
    assert main(["run", "--resume", str(run), "--no-progress"]) == 0
    assert f"finished at step {summary['steps']}" in capsys.readouterr().err
    more = train(load_run_config(run, ["train.epochs=2"])[0], run, resume=True, progress=False)
    assert [c["settings"] for c in more.get("resumed_with", [])] == [
        {"train.epochs": [1, 2]}]


def _killed_mid_epoch(run: Path, monkeypatch, *extra) -> None:
    """A run of 2 epochs of 16 steps, a checkpoint every 4, killed in step 22."""
    from localnet.engine import InProcessExecutor

    orig, calls = InProcessExecutor.train_step, []

    def dies_at_22(self, *a, **k):
        calls.append(1)
        if len(calls) == 22:
            raise KeyboardInterrupt("killed")
        return orig(self, *a, **k)

    monkeypatch.setattr(InProcessExecutor, "train_step", dies_at_22)
    with pytest.raises(KeyboardInterrupt):
        train(small("rule.name=fa", "runtime.checkpoint_every=4", *extra), run, progress=False)
    monkeypatch.setattr(InProcessExecutor, "train_step", orig)


@pytest.mark.parametrize("sets, says", [
    (["train.epochs=1"], "train.epochs: {run} has trained 2 epochs (step 32); --resume goes "
                         "on from there, so train.epochs must be at least 2 (it is 1)"),
    (["train.max_steps=5"], "train.max_steps: {run} has trained 32 steps; --resume goes on "
                            "from there, so train.max_steps must be at least 32 (it is 5)"),
    (["train.lr=0.5"], "train.lr: {run} finished at step 32 (2 epochs), so --set "
                       "train.lr=0.5 (the run's: 0.05) would apply to no step"),
    (["runtime.executor=local", "train.momentum=0.5"],
     "runtime.executor: {run} finished at step 32 (2 epochs), so --set "
     "runtime.executor=local (the run's: inprocess), train.momentum=0.5 (the run's: 0.9)"),
    (["train.epochs=1", "mid-epoch"], "train.epochs: {run} has trained 1 epoch and part of "
                                      "the next (step 20); --resume goes on from there, so "
                                      "train.epochs must be at least 2 (it is 1)"),
], ids=["fewer-epochs", "fewer-steps", "finished-other-lr", "finished-other-executor",
        "mid-epoch-fewer-epochs"])
def test_a_resume_that_would_train_no_step_is_refused_naming_the_key(tmp_path, capsys,
                                                                       monkeypatch, sets, says):
    """--resume with a --set under which the run has nothing left to train, or has
    trained more than it asks: the command fails naming the key, and no file changes --
    no summary that misreports the run's epochs, no config.yaml naming settings it never
    trained with."""
    from localnet.cli import main

    run = tmp_path / "run"
    if "mid-epoch" in sets:
        _killed_mid_epoch(run, monkeypatch)
        sets = [s for s in sets if s != "mid-epoch"]
    else:
        train(small("rule.name=fa"), run, progress=False)
    before = _files(run)
    mtimes = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    capsys.readouterr()
    args = ["run", "--resume", str(run), "--no-progress"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 2
    err = capsys.readouterr().err
    assert f"localnet: {says.format(run=run)}" in err and "Nothing changed" in err
    assert _files(run) == before
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == mtimes


@pytest.mark.parametrize("extra", [(), ("runtime.executor=local",)], ids=["same", "actors"])
def test_a_run_killed_before_its_summary_resumes_to_the_same_summary(tmp_path, extra):
    """Killed after its last checkpoint but before summary.json: the resume has nothing
    to train, and reports what the checkpoint holds -- the same accuracy and losses --,
    on the executor it ran on or another (a cluster lost at the very end)."""
    summary = train(small("rule.name=fa", "train.epochs=1"), tmp_path, progress=False)
    (tmp_path / "summary.json").unlink()
    again = train(small("rule.name=fa", "train.epochs=1", *extra), tmp_path, resume=True,
                  progress=False)
    assert again["steps"] == summary["steps"]
    for k in ("test_accuracy", "test_loss", "train_loss"):
        assert again[k] == pytest.approx(summary[k], rel=1e-6), k


def test_a_non_finite_value_never_replaces_a_recorded_one(tmp_path):
    from localnet.resume import keep_recorded

    f = tmp_path / "summary.json"
    f.write_text(json.dumps({"test_loss": 1.25, "train_loss": 2.0, "steps": 3}))
    got = keep_recorded({"test_loss": float("nan"), "train_loss": 1.5, "steps": 4}, f)
    assert got == {"test_loss": 1.25, "train_loss": 1.5, "steps": 4}


def test_resume_drops_a_half_written_log_line(tmp_path):
    full = train(small("rule.name=kp", "train.epochs=2"), tmp_path / "full", progress=False)
    train(small("rule.name=kp", "train.epochs=1"), tmp_path / "part", progress=False)
    with open(tmp_path / "part/steps.jsonl", "a") as f:
        f.write('{"step": 17, "epo')  # the writer was killed mid-line
    resumed = train(small("rule.name=kp", "train.epochs=2"), tmp_path / "part", resume=True,
                    progress=False)
    assert resumed["test_loss"] == full["test_loss"]
    assert (tmp_path / "part/steps.jsonl").read_text() == (tmp_path / "full/steps.jsonl").read_text()


def test_train_device_cpu_and_a_clear_error_without_a_gpu(tmp_path, capsys):
    """train.device: auto picks the CPU here; cuda without a GPU is a config error that
    names the key, from the CLI too (no traceback); on the CPU nothing is pinned."""
    from localnet.cli import main
    from localnet.config import Config, ConfigError
    from localnet.train import build, train_device

    cfg = Config.model_validate({"data": {"name": "synthetic", "subset": 64},
                                 "model": {"name": "mlp", "widths": [8]},
                                 "train": {"device": "auto", "batch_size": 32}})
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert train_device(cfg).type == want
    _, _, model, ex = build(cfg)
    assert ex.device.type == want and all(p.device.type == want for p in model.parameters())
    if torch.cuda.is_available():
        return
    bad = cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": "cuda"})})
    with pytest.raises(ConfigError, match="train.device: cuda"):
        build(bad)
    rc = main(["run", str(ROOT / "configs/mnist_mlp.yaml"), "--set", "train.device=cuda",
               "--set", "data.name=synthetic", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "train.device: cuda" in err and "Traceback" not in err


def test_resume_keeps_the_cut_that_cost_balancing_made(tmp_path, monkeypatch):
    """`{stages: N, balance: cost}` times the units at every start.  A resume whose
    timings would cut elsewhere still continues the run: it takes the checkpoint's cut,
    and ends where the uninterrupted run ends."""
    import localnet.runtime.cost as cost

    timings = {"now": [1.0, 1.0, 1.0, 1.0]}  # fc1, fc2, fc3, head: cut after fc2
    monkeypatch.setattr(cost, "measure_unit_costs",
                        lambda *a, **k: (timings["now"], [0.0] * 4))
    cfg = lambda epochs: small("rule.name=fa", "model.widths=[32,32,32]",  # noqa: E731
                               "runtime.executor=local", f"train.epochs={epochs}",
                               "runtime.partition={stages: 2, balance: cost}")
    full = train(cfg(2), tmp_path / "full", progress=False)
    train(cfg(1), tmp_path / "part", progress=False)
    saved = lambda d: torch.load(d / "checkpoint.pt", weights_only=True)["executor"]  # noqa: E731
    assert saved(tmp_path / "part")["boundaries"] == [2]
    timings["now"] = [5.0, 1.0, 1.0, 1.0]  # a busy machine: now it would cut after fc1
    resumed = train(cfg(2), tmp_path / "part", resume=True, progress=False)
    assert saved(tmp_path / "part")["boundaries"] == [2]
    assert resumed["steps"] == full["steps"] and resumed["test_loss"] == full["test_loss"]
    assert load_config(tmp_path / "part/config.yaml") == cfg(2)  # still balanced by cost


def test_timeline_notes_each_actors_actions_as_they_ran(tmp_path):
    """timeline.json holds every actor's forwards, backwards and updates of the noted
    steps (the two after the first ten), each actor's one after another, each after
    the message it waited for; `localnet report` draws it.  In-process, or with
    metrics.timeline_steps=0, there is none."""
    from localnet.report import report
    from localnet.timeline import window

    assert window(0, 16, 2) == (11, 13)   # after the first 10 steps
    assert window(0, 5, 2) == (4, 6)      # a short run: its last steps
    assert window(14, 16, 2) == (15, 17)  # resumed near the end
    assert window(16, 16, 2) is None and window(0, 16, 0) is None
    sets = ("rule.name=fa", "runtime.executor=local", "runtime.schedule=1f1b",
            "train.micro_batches=2", "train.epochs=1")
    train(small(*sets), tmp_path / "a", progress=False)
    tl = json.loads((tmp_path / "a/timeline.json").read_text())
    assert tl["steps"] == [11, 12] and tl["schedule"] == "1f1b" and tl["micro_batches"] == 2
    assert tl["actors"] == ["fc1", "head"]
    at = {(a, op, step, mb): (t0, t1) for a, op, step, mb, t0, t1 in tl["spans"]}
    assert sorted(at) == sorted(
        [(a, op, s, m) for a in (0, 1) for op in "FB" for s in (11, 12) for m in (0, 1)]
        + [(a, "STEP", s, -1) for a in (0, 1) for s in (11, 12)])
    assert min(t0 for t0, _ in at.values()) == 0.0
    for a in (0, 1):
        mine = sorted(v for k, v in at.items() if k[0] == a)
        assert all(t0 <= t1 <= n0 for (t0, t1), (n0, _) in zip(mine, mine[1:]))
        for s in (11, 12):
            assert at[(a, "STEP", s, -1)][0] >= max(at[(a, "B", s, m)][1] for m in (0, 1))
    for s in (11, 12):
        for m in (0, 1):
            assert at[(1, "F", s, m)][0] >= at[(0, "F", s, m)][1]  # the activation came
            assert at[(0, "B", s, m)][0] >= at[(1, "B", s, m)][1]  # the error came back
    res = report([tmp_path / "a"], tmp_path / "r")
    assert str(tmp_path / "r/timeline.png") in res["files"]
    train(small(*sets, "metrics.timeline_steps=0"), tmp_path / "off", progress=False)
    train(small("rule.name=fa", "train.epochs=1"), tmp_path / "one", progress=False)
    assert not (tmp_path / "off/timeline.json").exists()
    assert not (tmp_path / "one/timeline.json").exists()
    assert "timeline.png" in report([tmp_path / "one"], tmp_path / "r1")["skipped"]


def test_an_async_schedule_in_process_says_it_trains_the_synchronous_maths(tmp_path, capsys):
    """The in-process executor has no pipeline: under runtime.schedule=async it trains
    what 1f1b gives (the same weights), says so once, and names the executor that runs
    async in one process; a 1f1b run gets no such note."""
    sync = train(small("train.epochs=1", "train.micro_batches=2", "runtime.schedule=1f1b"),
                 tmp_path / "sync", progress=False)
    assert "micro-batch, stale" not in capsys.readouterr().err
    stale = train(small("train.epochs=1", "train.micro_batches=2", "runtime.schedule=async"),
                  tmp_path / "async", progress=False)
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("note: runtime.schedule async updates each actor per micro-batch") == 1
    assert "runtime.executor=local runs async in this process" in err
    assert stale["runtime"]["schedule"] == "sequential"
    assert stale["test_loss"] == sync["test_loss"]
