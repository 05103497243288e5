"""Config: typed schema, YAML + --set overrides, errors that name the key."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from localnet.config import ConfigError, dump_config, load_config, load_run_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.train.epochs >= 1


def test_overrides_are_typed_and_nested():
    cfg = load_config(ROOT / "configs/mnist_mlp.yaml",
                      ["rule.name=fa", "train.lr=0.5", "data.subset=100", "model.widths=[8, 4]",
                       "train.wd_milestones={2: 0.001}"])
    assert cfg.rule.name == "fa"
    assert cfg.train.lr == 0.5
    assert cfg.data.subset == 100
    assert cfg.model.widths == [8, 4]
    assert cfg.train.wd_milestones == {2: 0.001}


@pytest.mark.parametrize("override, key", [
    (["rule.nmae=fa"], "rule.nmae"),
    (["rule.name=backprop"], "rule.name"),
    (["train.lr=-1"], "train.lr"),
    (["train.batch_size=lots"], "train.batch_size"),
    (["bogus=1"], "bogus"),
    (["data.subset=0"], "data.subset"),
    (["train.batch_size=10", "train.micro_batches=3"], "micro_batches"),
    (["data.augment=true"], "data.augment: mnist has no augmentation"),
    (["train.lrr=0.1"], "train.lrr: unknown key (did you mean train.lr?)"),
    (["trian.lr=0.1"], "trian: unknown key (did you mean train?)"),
    # a key in the wrong section has no near name in its own: name the section holding it
    (["runtime.micro_batches=2"], "runtime.micro_batches: unknown key (did you mean "
                                  "train.micro_batches?)"),
    (["data.executor=ray"], "data.executor: unknown key (did you mean runtime.executor?)"),
    # ... even where its own section has a near name (data.image_size)
    (["data.batch_size=3"], "data.batch_size: unknown key (did you mean train.batch_size?)"),
    # ... or at the top level
    (["train.seed=1"], "train.seed: unknown key (did you mean seed?)"),
    (["channel.error.codc=int8"], "channel.error.codc: unknown key (the options of codec "
                                  "'fp32': none; did you mean codec?)"),
    (["runtime.executor=ray", "train.device=cuda"], "train.device: cuda is the in-process"),
    # `gt=0` alone lets inf through: every float of the schema and of a plugin's options
    (["train.lr=inf"], "train.lr: Input should be a finite number (got 'inf')"),
    (["train.weight_decay=nan"], "train.weight_decay: Input should be a finite number"),
    (["train.wd_milestones={1: .inf}"], "train.wd_milestones.1: Input should be a finite"),
    (["runtime.timeout_s=inf"], "runtime.timeout_s: Input should be a finite number"),
    (["rule.name=fa", "rule.feedback_gain=inf"], "rule.feedback_gain: Input should be a finite"),
    # pydantic's lax mode read true as 1: batches of one, a rate of 1.0
    (["train.batch_size=true"], "train.batch_size: expected a number, not true or false"),
    (["train.wd_milestones={1: false}"], "train.wd_milestones: expected a number, not true"),
    (["model.widths=[512, true]"], "model.widths: expected a number, not true or false"),
    (["rule.r=true"], "rule.r: expected a number, not true or false"),
    (["channel.error.codec=topk", "channel.error.k=true"], "channel.error.k: expected a number"),
    # a layer of no units was a ZeroDivisionError in its init, reported as a bug
    (["model.widths=[512, 0]"], "model.widths.1: Input should be greater than or equal to 1"),
    # epochs count from 0: a milestone at 0 or below lowered the rate from the start
    (["train.lr_milestones=[-1]"], "train.lr_milestones.0: Input should be greater than or "
                                   "equal to 1"),
    # the run directory is out_dir/<name>-<stamp>: these put it elsewhere
    (["name=../up"], "name: a run's name is one folder name"),
    (["name=a/b"], "name: a run's name is one folder name"),
    # the range the RNGs it seeds take: one beyond it was a crash at the run's start
    (["seed=99999999999999999999"], "seed: Input should be less than or equal to 4294967295"),
    (["seed=-1"], "seed: Input should be greater than or equal to 0"),
    # each was a crash reported as a bug, an error naming the recipe's key, or ignored
    (["rule=5"], "rule: Input should be a valid dictionary"),
    (["train=5"], "train: Input should be a valid dictionary"),
    (["train..lr=1"], "--set train..lr: a key's parts are names between dots, and one is empty"),
    (["per_rule.pfaa={train.lr: 1}"], "per_rule.pfaa: unknown rule (did you mean per_rule.pfa?)"),
    (["per_rule.PFA={train.lr: 1}"], "per_rule.PFA: unknown rule (did you mean per_rule.pfa?)"),
    (["per_rule.xyz={train.lr: 1}"], "per_rule.xyz: unknown rule; choose one of bp,"),
    # a name as the papers write it: the registry's and the schema's own spelling named
    (["rule.name=PFA"], "rule.name: unknown rule 'PFA' (did you mean pfa?); choose one of"),
    (["runtime.schedule=GPipe"], "unknown schedule 'GPipe' (did you mean gpipe?)"),
    (["channel.error.codec=Sign"], "channel.error.codec: unknown codec 'Sign' (did you mean "
                                   "sign?)"),
    (["model.name=ResNet20"], "model.name: Input should be 'mlp', "),
    (["model.name=ResNet20"], "(got 'ResNet20'; did you mean resnet20?)"),
    (["data.name=mnsit"], "(got 'mnsit'; did you mean mnist?)"),
    (["rule.name=xyz"], "rule.name: unknown rule 'xyz'; choose one of bp,"),  # none near
    (["train.nesterov=true", "train.momentum=0"], "train.nesterov: Nesterov's step needs"),
    # settings of the metrics endpoint with none: a run announced nowhere, silently
    (["metrics.sd_dir=/tmp/sd"], "metrics.sd_dir: it acts on the metrics endpoint, and "
                                 "metrics.port is null"),
    (["metrics.linger_s=5"], "metrics.linger_s: it acts on the metrics endpoint"),
    (["metrics.tls.certfile=a.pem", "metrics.tls.keyfile=a.key"],
     "metrics.tls.certfile: it acts on the metrics endpoint"),
    (["metrics.bp_angle=true", "metrics.alignment_every=0"],
     "metrics.bp_angle: measured with each alignment record every metrics.alignment_every"),
])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs/mnist_mlp.yaml", override)
    assert key in str(info.value)


def test_a_rule_by_its_bare_name(tmp_path):
    """`rule: fa`, as `runtime.schedule: 1f1b` may be written; --set rule=NAME too, which
    replaces the section (the old rule's options go with it) and so chooses the recipe."""
    bare = tmp_path / "bare.yaml"
    bare.write_text("rule: fa\nmodel: {name: mlp}\ndata: {name: synthetic}\n")
    assert load_config(bare) == load_config(None, ["rule.name=fa", "model.name=mlp",
                                                  "data.name=synthetic"])
    kp = load_config(ROOT / "configs/mnist_mlp.yaml", ["rule=kp"])
    assert kp.rule.name == "kp" and kp.train.weight_decay == 9e-5  # not PFA's recipe


def test_unknown_key_in_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 1\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key"):
        load_config(bad)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML") as err:
        load_config(broken)
    assert f'in "{broken}", line 2' in str(err.value)  # where in which file


def test_validate_cli_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "localnet", "validate", str(CONFIGS[0])],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "localnet", "validate", str(CONFIGS[0]),
                          "--set", "rule.colour=blue"], capture_output=True, text=True)
    assert bad.returncode != 0
    assert "rule.colour" in bad.stderr and "unknown key" in bad.stderr


def test_per_rule_recipe_applies_only_to_its_rule_and_set_wins():
    path = ROOT / "configs/mnist_mlp.yaml"
    pfa = load_config(path)
    assert pfa.rule.name == "pfa"
    assert pfa.train.weight_decay == 3e-2 and pfa.train.wd_milestones == {1: 9e-5}
    bp = load_config(path, ["rule.name=bp"])
    assert bp.train.weight_decay == 9e-5 and bp.train.wd_milestones == {}
    explicit = load_config(path, ["train.weight_decay=0.5"])
    assert explicit.train.weight_decay == 0.5
    # a recipe may set the rule's options (FA's B scale), never the rule itself
    recipe = "per_rule={fa: {rule.feedback_gain: 0.5}}"
    assert load_config(path, [recipe, "rule.name=fa"]).rule.feedback_gain == 0.5
    assert load_config(path, [recipe, "rule.name=kp"]).rule.feedback_gain == 1.0
    assert load_config(path, [recipe, "rule.name=fa", "rule.feedback_gain=2"]).rule.feedback_gain == 2.0
    with pytest.raises(ConfigError, match="rule.name: a recipe may not change the rule"):
        load_config(None, ["per_rule={fa: {rule.name: bp}}", "rule.name=fa"])


def test_resolved_config_round_trips(tmp_path):
    from localnet.config import dump_config
    cfg = load_config(ROOT / "configs/resnet_pfa.yaml", ["train.epochs=3"])
    out = tmp_path / "resolved.yaml"
    out.write_text(dump_config(cfg))
    assert load_config(out) == cfg


def test_a_runs_config_yaml_run_again_is_the_same_run(tmp_path):
    """A run's config.yaml given to `localnet run` trains with the run's settings: its
    --set that beat the rule's recipe too (loading applies the recipe again, and PFA's
    would put train.weight_decay back at 5e-3 and rule.r at 10)."""
    from localnet.config import dump_config
    sets = ["train.weight_decay=0.1", "rule.r=4", "train.wd_milestones={1: 0.001}"]
    cfg = load_config(ROOT / "configs/resnet_pfa.yaml", sets)
    out = tmp_path / "config.yaml"
    out.write_text(dump_config(cfg))
    again = load_config(out)
    assert (again.train.weight_decay, again.rule.r, again.train.wd_milestones) == \
        (0.1, 4, {1: 0.001})
    assert again.model_dump(exclude={"per_rule"}) == cfg.model_dump(exclude={"per_rule"})
    assert dump_config(again) == out.read_text()
    # another rule's recipe stays as written; the run's own shows the values it ran with
    assert again.per_rule["pfa"] == {"rule.r": 4, "train.weight_decay": 0.1,
                                     "train.wd_milestones": {1: 0.001}}


OLD_FLAT = """
rule: {name: pfa, r: 4, ortho: false, pfa_mode: fused, batch_manhattan: false,
       norm_constraint: false, feedback_gain: 0.5,
       mirror: {sigma: 1.0, lr: 0.01, decay: null, batch: 16, warmup_steps: 100, every: 1}}
model: {name: mlp, widths: [16]}
data: {name: synthetic}
channel:
  activation: {codec: topk, k: 0.3, error_feedback: true, q: 8, per_channel: false,
               stochastic: true, delay: 0, drop: 0.0, bandwidth: null}
  error: {codec: fp32, k: 0.1, error_feedback: false, q: 8, per_channel: false,
          stochastic: true, delay: 1, drop: 0.0, bandwidth: null}
"""


def test_resume_reads_a_run_written_with_every_plugins_options(tmp_path):
    """A run directory from before rules and codecs declared their own options: --resume
    keeps what the run's rule and codecs take (pfa_mode is PFA's mode now) and names
    what it dropped -- options that never reached that run.  Any other bad key is still
    an error naming it."""
    from localnet.config import load_run_config

    (tmp_path / "config.yaml").write_text(OLD_FLAT)
    with pytest.raises(ConfigError, match="rule.feedback_gain"):
        load_config(tmp_path / "config.yaml")  # as a config to start from: refused
    cfg, dropped = load_run_config(tmp_path, ["train.epochs=3"])
    assert cfg.rule.options() == {"r": 4, "ortho": False, "mode": "fused"}
    assert cfg.channel.activation.options() == {"k": 0.3, "error_feedback": True}
    assert cfg.channel.error.options() == {} and cfg.channel.error.delay == 1
    assert cfg.train.epochs == 3
    assert sorted(dropped) == sorted(
        ["rule.feedback_gain", "rule.mirror"]
        + [f"channel.activation.{k}" for k in ("q", "per_channel", "stochastic")]
        + [f"channel.error.{k}" for k in ("k", "error_feedback", "q", "per_channel",
                                          "stochastic")])
    (tmp_path / "config.yaml").write_text(OLD_FLAT.replace("r: 4", "rr: 4"))
    with pytest.raises(ConfigError, match="rule.rr"):
        load_run_config(tmp_path)


def test_resume_keeps_what_the_run_set_over_its_rule_recipe(tmp_path):
    """A run's config.yaml is resolved: its --set beat the per_rule recipe once, and
    reading it back for --resume must not let the recipe win this time."""
    from localnet.config import dump_config, load_run_config

    cfg = load_config(ROOT / "configs/resnet_pfa.yaml", ["train.weight_decay=0.001", "rule.r=4"])
    assert (cfg.rule.r, cfg.train.weight_decay) == (4, 0.001)
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    again, dropped = load_run_config(tmp_path)
    assert again == cfg and dropped == []


@pytest.mark.parametrize("value, detail", [
    ("bogus", None),
    ("{stages: 0}", "stages: Input should be greater than or equal to 1"),
    ("{stages: 2, balance: speed}", "balance: Input should be 'params' or 'cost'"),
    ("{stage: 2}", "stage: unknown key"),
])
def test_a_bad_partition_is_one_error_naming_its_forms(value, detail):
    """pydantic would report the value once per form of the union; the user gets one line
    naming the forms, and what is wrong with the form the value has."""
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs/resnet_pfa.yaml", [f"runtime.partition={value}"])
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == 1 and lines[0].strip().startswith("runtime.partition: expected per_unit")
    assert detail is None or detail in lines[0]
    assert "literal" not in lines[0] and "PartitionStages" not in lines[0]


@pytest.mark.parametrize("value, says", [
    ("{stages: 40}", "stages=40 exceeds the model's 11 units"),
    ("[[stem, nope]]", "no unit named 'nope'"),
    ("[3, 11]", "within 1..10 (11 units)"),
])
def test_validate_and_run_check_the_partition_against_the_model(tmp_path, value, says,
                                                              capsys, monkeypatch):
    """What only the built model can tell (its units) is still a config error, found
    before any data loads, and `run` leaves no run directory behind.  In this process:
    the command-line route itself is `test_validate_cli_exit_codes`'s."""
    from localnet.cli import main
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("LOCALNET_DATA", str(tmp_path))  # no data: none may be read
    args = ["configs/resnet_pfa.yaml", "--set", f"runtime.partition={value}"]
    for cmd in (["validate"], ["run", "--out", str(tmp_path / "runs"), "--no-progress"]):
        assert main([*cmd, *args]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
    if value == "{stages: 40}":  # a partition that fits passes (once: the model is the same)
        assert main(["validate", "configs/resnet_pfa.yaml",
                     "--set", "runtime.partition={stages: 3}"]) == 0
        assert "makes 3 actors" in capsys.readouterr().out


def test_paths_are_kept_absolute_as_resolved_where_the_command_ran(tmp_path, monkeypatch):
    """A run's config.yaml must name the same data when --resume (or a sweep's Ray task)
    runs in another directory: a relative data.root there named another place."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(None, ["data.root=../data", "metrics.port=0", "metrics.sd_dir=~/sd",
                             "metrics.tls.certfile=c.pem", "metrics.tls.keyfile=k.pem"])
    assert cfg.data.root == str(tmp_path.parent / "data")
    assert cfg.metrics.sd_dir == str(tmp_path / "home" / "sd")
    assert (cfg.metrics.tls.certfile, cfg.metrics.tls.keyfile) == (str(tmp_path / "c.pem"),
                                                                   str(tmp_path / "k.pem"))
    assert load_config(None, []).data.root is None  # unset: $LOCALNET_DATA, as before
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(dump_config(cfg))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert load_run_config(tmp_path / "run")[0].data.root == str(tmp_path.parent / "data")


def test_validate_checks_channel_edges_against_the_actors_edges(capsys):
    """A `channel.edges` key that names no edge would change nothing: the run refuses it
    as its actors start, and validate as well, before any."""
    from localnet.cli import main

    args = ["validate", str(ROOT / "configs/resnet_pfa.yaml"), "--set"]
    assert main(args + ["channel.edges={99: {error: {drop: 0.5}}}"]) == 2
    assert ("channel.edges.99: no edge of this run is called that; its edges are 1, "
            "stem->layer1.0, 2,") in capsys.readouterr().err
    for key in ("3", "layer1.1->layer1.0"):  # a boundary, or a pair either way round
        assert main(args + [f"channel.edges={{{key}: {{error: {{drop: 0.5}}}}}}"]) == 0


def test_a_key_given_twice_in_a_yaml_file_is_an_error(tmp_path):
    """YAML would keep the last silently: a second `train:` section would drop the first."""
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 2\n  lr: 0.1\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"the key 'epochs' appears twice \(lines 2 and 4\)"):
        load_config(p)
    p.write_text("base: &b {lr: 0.5, epochs: 2}\ntrain:\n  <<: *b\n  lr: 0.2\n")  # merge keys
    with pytest.raises(ConfigError, match="base: unknown key"):  # ... are no duplicates
        load_config(p)
    p.write_text("train: &b {lr: 0.5, epochs: 2}\nmodel: {name: mlp}\n")
    assert load_config(p).train.lr == 0.5


def test_a_config_that_is_not_text_is_named_and_utf16_is_read(tmp_path):
    """A binary file given by mistake (a checkpoint, an image) was a bug in localnet: a
    UnicodeDecodeError from the locale's decoder.  YAML itself names the byte."""
    p = tmp_path / "c.yaml"
    p.write_bytes(b"train: {lr: 0.5}\n\x80\x81 junk")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML: .*#x0080"):
        load_config(p)
    p.write_text("train: {lr: 0.5}  # caf\u00e9\n", encoding="utf-16")  # an editor's choice
    assert load_config(p).train.lr == 0.5


def test_validate_estimates_the_actors_memory_and_refuses_what_this_machine_cannot_hold(
        capsys, monkeypatch):
    """The runtime's preflight, before anything starts: on the embedded Ray, actors that
    need more memory than this machine has are an error naming the estimate."""
    from localnet.cli import main
    from localnet.runtime.plan import check_partition

    cfg = load_config(ROOT / "configs/resnet_pfa.yaml")
    actors, mem = check_partition(cfg, memory_too=True)
    assert actors == 11 and mem["actors"] == 11
    # each actor at least its process floor, and the floors are not all of it
    assert mem["total_mb"] > 11 * cfg.runtime.actor_baseline_mb
    assert main(["validate", str(ROOT / "configs/resnet_pfa.yaml")]) == 0
    assert f"makes 11 actors, about {mem['total_mb']} MB in all" in capsys.readouterr().out
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": (2 << 30) // 4096}  # a 2 GB machine
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    assert main(["validate", str(ROOT / "configs/resnet_pfa.yaml")]) == 2
    assert "more than this machine's 2048 MB: the embedded Ray would refuse it" in \
        capsys.readouterr().err
    # delayed errors keep forwards stored for the delays down to each actor: 10 links of 2
    assert main(["validate", str(ROOT / "configs/resnet_pfa.yaml"), "--set",
                 "channel.error.delay=2"]) == 2
    assert "a shorter channel.error.delay (forwards wait up to 20 steps" in capsys.readouterr().err
    assert main(["validate", str(ROOT / "configs/resnet_pfa.yaml"), "--set",
                 "runtime.address=10.0.0.1:6379"]) == 0  # a cluster's memory is its own


@pytest.mark.parametrize("gpus,each,says", [
    (0, "1", "1 asked for each actor, but this machine has no GPU that torch can see"),
    (4, "1", "11 actors asking for 1 GPU each need 11 GPUs; this machine has 4, and the "
             "embedded Ray offers only those.  Ask for a fraction (runtime.num_gpus=0.363"),
    (4, "0.363", None),  # 11 x 0.363 = 3.99: fits
    (1, "0.1", "need 1.1 GPUs; this machine has 1"),
])
def test_validate_refuses_gpus_the_embedded_ray_cannot_offer(capsys, monkeypatch, gpus, each,
                                                             says):
    """On the embedded Ray, the actors' GPUs are this machine's: asking for more is an
    error at validate (a run would stop at placement); a cluster's GPUs are its own."""
    from localnet.cli import main

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = ["validate", str(ROOT / "configs/resnet_pfa.yaml"), "--set",
            f"runtime.num_gpus={each}", "--set", "train.device=cuda"]
    assert main(args) == (2 if says else 0)
    err = capsys.readouterr().err
    assert says is None or says in err
    assert main(args + ["--set", "runtime.address=10.0.0.1:6379"]) == 0


@pytest.mark.parametrize("each,says", [
    ("0.363", None),  # 11 x 0.363 = 3.99 of runtime.local_cpus' 4
    ("0.5", "runtime.num_cpus: 11 actors asking for 0.5 CPU each need 5.5; the embedded Ray "
            "offers runtime.local_cpus=4.  Ask for less (runtime.num_cpus=0.36)"),
])
def test_validate_refuses_cpus_the_embedded_ray_cannot_offer(capsys, monkeypatch, each, says):
    """A run would find it out at placement, after Ray's start; a cluster's are its own."""
    from localnet.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = ["validate", str(ROOT / "configs/resnet_pfa.yaml"), "--set", f"runtime.num_cpus={each}"]
    assert main(args) == (2 if says else 0)
    assert says is None or says in capsys.readouterr().err
    assert main(args + ["--set", "runtime.local_cpus=6"]) == 0
    assert main(args + ["--set", "runtime.address=10.0.0.1:6379"]) == 0


def test_a_directory_given_as_the_config_names_what_it_holds(tmp_path):
    """`localnet run configs/` or a run directory instead of its config: the error says
    it is a directory, names the YAML files in it, and for a run the --resume command."""
    with pytest.raises(ConfigError, match=r"configs is a directory, not a config file; it "
                                          r"holds cifar10_resnet20.yaml, mnist_mlp.yaml"):
        load_config(ROOT / "configs")
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value).endswith(f"it holds config.yaml; a run directory goes on with: "
                                    f"localnet run --resume {tmp_path}")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")


def test_validate_notes_what_this_machine_lacks(tmp_path, capsys, monkeypatch):
    """The config is fine either way (exit 0); a dataset missing here is a note saying
    where it looked, since a run here would stop at its start."""
    from localnet.cli import main

    monkeypatch.setenv("LOCALNET_DATA", str(tmp_path))
    assert main(["validate", str(ROOT / "configs/mnist_mlp.yaml")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("localnet: note: on this machine, dataset 'mnist' not found. Looked at:")
    assert str(tmp_path / "MNIST" / "raw") in err
    assert main(["validate", str(ROOT / "configs/mnist_mlp.yaml"), "--set",
                 "data.name=synthetic"]) == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["validate", str(ROOT / "configs/mnist_mlp.yaml"), "--set",
                 "data.name=synthetic", "--set", "train.device=cuda"]) == 0
    assert capsys.readouterr().err.startswith(
        "localnet: note: on this machine, train.device: cuda, but torch sees no GPU here")
