"""One typed, validated config: YAML files plus `--set a.b=c` overrides.

Every section forbids unknown keys, so a typo is an error that names the key
(`rule.nmae: unknown key`) rather than a silently ignored setting.
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from .errors import ConfigError
from .registry import Checked, did_you_mean

ModelName = Literal["mlp", "resnet8", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                    "resnet18", "resnet34", "resnet50"]
DataName = Literal["mnist", "fashion_mnist", "cifar10", "imagefolder", "synthetic"]


def _absolute(v: str | None) -> str | None:
    # a path is taken from the directory the command runs in, and a run's config.yaml
    # must name the same file when --resume runs elsewhere (or a sweep's Ray task does)
    return os.path.abspath(os.path.expanduser(v)) if v else v


# a file or folder a setting names: kept absolute, as resolved where the command ran
PathSetting = Annotated[str | None, AfterValidator(_absolute)]


class Section(Checked):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _plugin_options(section: Section, registry, name: str, name_key: str, prefix: str):
    """A section that names a plugin (rule, codec) and holds that plugin's options beside
    the name: the name checked against the registry, the other keys against the plugin's
    `Options` model, and every option kept explicit, defaults included (a run's
    config.yaml then shows what it ran with)."""
    try:
        registry.get(name)
    except ValueError as err:  # the registry's own words, with the key in front
        raise ValueError(f"{name_key}: {err}") from None
    opts = registry.options(name, section.__pydantic_extra__, prefix,
                            also=list(type(section).model_fields))
    object.__setattr__(section, "__pydantic_extra__", opts.model_dump())
    return section


class PluginSection(Section):
    """A section naming a plugin (rule, schedule, a link's codec) with that plugin's
    options beside the name; its validator checks them (`_plugin_options`)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)

    def options(self) -> dict:
        """The chosen plugin's options, checked: what its constructor takes."""
        return dict(self.__pydantic_extra__ or {})


class RuleConfig(PluginSection):
    """The learning rule: its `name`, and beside it that rule's own options -- the
    `Options` model in its file under localnet/rules/ (pfa: r, ortho, mode; fa, kp:
    feedback_gain; wm: feedback_gain, mirror.*) -- plus the update modifiers every rule
    shares.  A key the chosen rule does not declare is an error naming it."""

    name: str = "bp"
    batch_manhattan: bool = Field(False, description="update with the sign of the gradient (Moskovitz et al. 2018)")
    norm_constraint: bool = Field(False, description="keep each forward weight's norm at most its initial norm")

    @model_validator(mode="after")
    def _rule_options(self):
        from .rules import RULES  # the registry: every rule file, discovered

        return _plugin_options(self, RULES, self.name, "rule.name", "rule")


class ModelConfig(Section):
    name: ModelName = "mlp"
    widths: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [512, 512], description="mlp hidden widths ([]: one linear layer)")
    init: Literal["torch", "xavier"] = Field(
        "torch", description="forward weights: torch's default (Kaiming-uniform a=sqrt(5), "
        "random biases) or xavier (Xavier-uniform, zero biases: BioTorch's and the PFA "
        "authors'); sign-concordant magnitudes and PFA's R are drawn the same way")


class DataConfig(Section):
    name: DataName = "synthetic"
    root: PathSetting = Field(None, description="data root; else $LOCALNET_DATA; else the user cache dir")
    subset: int | None = Field(None, ge=1, description="use only the first N training samples")
    test_subset: int | None = Field(None, ge=1, description="use only the first N test samples")
    augment: bool | None = Field(None, description="None: the dataset's default (CIFAR: crop+flip)")
    download: bool = Field(False, description="allow torchvision downloads (needs a network)")
    image_size: int = Field(224, ge=8, description="imagefolder crop size")

    @model_validator(mode="after")
    def _check(self):
        if self.augment and self.name in ("mnist", "fashion_mnist", "synthetic"):
            raise ValueError(f"data.augment: {self.name} has no augmentation; set it to false "
                             f"or null")
        return self


class TrainConfig(Section):
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(64, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after N optimizer steps")
    micro_batches: int = Field(1, ge=1, description="split each batch into M micro-batches")
    eval_batch_size: int = Field(1000, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    wd_milestones: dict[int, float] = Field(
        default_factory=dict, description="epoch -> weight decay from that epoch on (PFA: {1: 1e-4})")
    lr_schedule: Literal["constant", "milestones", "cosine"] = "constant"
    # an epoch is counted from 0, so a milestone at 0 or below is a smaller train.lr
    lr_milestones: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list, description="epochs where lr *= lr_gamma")
    lr_gamma: float = Field(0.1, gt=0)
    # deep ResNets at a rate of 0.1 from their first step can fall to a constant output
    # (the loss at ln 10 for good); He et al. 2016 (sec. 4.2) warmed ResNet-110 up
    lr_warmup_steps: int = Field(0, ge=0, description="the first N optimizer steps ramp "
                                 "the rate linearly up to the schedule's: step s (from 0) "
                                 "at (s+1)/N of it")
    threads: int | None = Field(None, ge=1, description="torch threads of this process; default: "
                                "torch's choice in-process, 1 for a Ray run's coordinator")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="in-process executor: where the model and each batch live "
        "(auto: cuda when torch sees a GPU); Ray actors use runtime.num_gpus")
    cuda_graph: bool = Field(
        True, description="on a GPU, the in-process executor captures each step once as a "
        "CUDA graph and replays it: one launch instead of hundreds (localnet/graphs.py "
        "says which steps cannot be captured; those run eagerly)")
    memory_format: Literal["channels_last", "contiguous"] = Field(
        "channels_last", description="how conv weights, and so every 4-d activation and "
        "error, lie in memory: channels_last lets oneDNN convolve without reordering "
        "(faster on the CPU, less scratch memory); activations cross the wire as they lie")

    @property
    def micro_batch_size(self) -> int:
        """Samples per micro-batch (batch_size is a multiple of micro_batches)."""
        return self.batch_size // self.micro_batches

    @model_validator(mode="after")
    def _check(self):
        if self.batch_size % self.micro_batches:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be divisible by "
                             f"train.micro_batches ({self.micro_batches})")
        for e, wd in self.wd_milestones.items():
            if e < 0 or wd < 0:
                raise ValueError(f"train.wd_milestones: epoch and decay must be >= 0, got {e}: {wd}")
        if self.nesterov and not self.momentum:  # (torch's SGD would refuse it at the start)
            raise ValueError("train.nesterov: Nesterov's step needs momentum, and "
                             "train.momentum is 0")
        return self


class MetricsTLS(Section):
    """HTTPS for the metrics endpoint (prometheus-client's TLS server).  PEM files."""

    certfile: PathSetting = Field(None, description="the endpoint's certificate (PEM); "
                                 "set with keyfile to serve HTTPS")
    keyfile: PathSetting = Field(None, description="its private key (PEM)")
    client_cafile: PathSetting = Field(None, description="require client certificates "
                                      "signed by this CA (PEM): only scrapers holding one "
                                      "are served")

    @model_validator(mode="after")
    def _pairs(self):
        if (self.certfile is None) != (self.keyfile is None):
            missing = "keyfile" if self.keyfile is None else "certfile"
            raise ValueError(f"metrics.tls.{missing}: HTTPS needs both certfile and keyfile")
        if self.client_cafile is not None and self.certfile is None:
            raise ValueError("metrics.tls.client_cafile: client certificates need HTTPS "
                             "(metrics.tls.certfile and keyfile)")
        return self

    @property
    def enabled(self) -> bool:
        return self.certfile is not None


def is_loopback(address: str) -> bool:
    import ipaddress

    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


class MetricsConfig(Section):
    alignment_every: int = Field(100, ge=0, description="log per-layer alignment every N steps (0: per epoch only)")
    bp_angle: bool = Field(False, description="also measure the angle to the true BP gradient (extra BP pass)")
    # -- live Prometheus endpoint (localnet/metrics.py; every series is named localnet_*)
    port: int | None = Field(None, ge=0, le=65535,
                             description="serve /metrics on this port; null: no endpoint; "
                                         "0: an ephemeral port (printed, and written to sd_dir)")
    address: str = Field("127.0.0.1", min_length=1,
                         description="address the endpoint binds (0.0.0.0: every interface; "
                                     "anything but loopback needs metrics.tls or "
                                     "metrics.allow_insecure)")
    tls: MetricsTLS = MetricsTLS()
    allow_insecure: bool = Field(False, description="allow plain HTTP on a non-loopback "
                                 "address: anyone who can reach it reads the run's metrics")
    linger_s: float = Field(0.0, ge=0, description="after the run, keep the endpoint up until "
                            "it is scraped once more (and, with sd_dir, until the scraper "
                            "has dropped the target), at most this many seconds in all")
    poll_every: int = Field(10, ge=1, description="ray: collect actor timings and the message "
                            "ledger every N steps (in-process stages are timed every step)")
    sd_dir: PathSetting = Field(None, description="write a Prometheus file-SD target file "
                               "<sd_dir>/<run>.json while the endpoint is up")
    timeline_steps: int = Field(2, ge=0, description="actors (ray, local): note when each "
                                "actor runs each action over this many training steps, after "
                                "the first 10 when the run has them, into timeline.json "
                                "(localnet report draws it); 0: off")

    @model_validator(mode="after")
    def _bp_angle_recorded(self):
        # the probe runs before each step-level alignment record, and there would be none
        if self.bp_angle and not self.alignment_every:
            raise ValueError("metrics.bp_angle: measured with each alignment record every "
                             "metrics.alignment_every steps, which is 0 (per epoch only), so "
                             "it would never be measured; set metrics.alignment_every to N > 0")
        return self

    @model_validator(mode="after")
    def _endpoint_settings_need_one(self):
        # each of these acts on the endpoint; without one it would do nothing, silently
        # (a run announced nowhere is a run Prometheus never watches)
        if self.port is None:
            for key, value in (("sd_dir", self.sd_dir), ("tls.certfile", self.tls.certfile),
                               ("linger_s", self.linger_s)):
                if value:
                    raise ValueError(f"metrics.{key}: it acts on the metrics endpoint, and "
                                     f"metrics.port is null (no endpoint); set metrics.port "
                                     f"(0: an ephemeral one)")
        return self

    @model_validator(mode="after")
    def _secure_binding(self):
        # a routable endpoint without TLS serves anyone on the network, unauthenticated
        if not is_loopback(self.address) and not self.tls.enabled and not self.allow_insecure:
            raise ValueError(f"metrics.address: {self.address!r} is not a loopback address; "
                             f"serve it over HTTPS (metrics.tls.certfile, metrics.tls.keyfile, "
                             f"and metrics.tls.client_cafile to require client certificates), "
                             f"or set metrics.allow_insecure=true to serve plain HTTP anyway")
        return self

    @property
    def insecure(self) -> bool:
        """Plain HTTP on a non-loopback address (allowed by allow_insecure)."""
        return self.port is not None and not is_loopback(self.address) and not self.tls.enabled


class PartitionStages(Section):
    """`runtime.partition: {stages: N, balance: params|cost}`: N consecutive groups of units."""

    stages: int = Field(..., ge=1, description="number of pipeline stages (actors)")
    balance: Literal["params", "cost"] = Field(
        "params", description="balance groups by parameter count (the same cut everywhere) "
                              "or by fwd+bwd time, measured at start (faster stages, but the "
                              "cut may differ between machines; a resume keeps its own)")


class ScheduleConfig(PluginSection):
    """`runtime.schedule`: a schedule's `name` -- one file of localnet/schedules -- and
    that schedule's own options beside it.  A bare name is short for `{name: ...}`."""

    name: str = Field("gpipe", description="gpipe / 1f1b (one update per batch, the "
                                           "in-process maths) or async (an update per "
                                           "micro-batch, no flush; stale by at most the "
                                           "pipeline depth)")

    @model_validator(mode="after")
    def _schedule_options(self):
        from .schedules import SCHEDULES  # the registry: every schedule file

        return _plugin_options(self, SCHEDULES, self.name, "runtime.schedule.name",
                               "runtime.schedule")


class RuntimeConfig(Section):
    """Where the stages run.  `inprocess` (default): this process; `ray`: one Ray actor per
    stage, activations and errors travelling actor to actor (localnet/runtime); `local`:
    the Ray runtime's stage workers and schedules in this process, without Ray (debugging)."""

    executor: Literal["inprocess", "ray", "local"] = "inprocess"
    schedule: ScheduleConfig = Field(ScheduleConfig(), description="pipeline schedule "
                                     "(ray): a name, or {name, ...its options}")
    partition: Literal["per_unit", "per_layer"] | PartitionStages | list[int] | list[list[str | int]] = Field(
        "per_unit", description="per_unit (one actor per unit), per_layer (one actor per layer; "
                                "skip connections become edges), {stages: N, balance: "
                                "params|cost}, explicit unit boundaries [b1, b2, ...], or "
                                "explicit groups [[stem, layer1.0], [layer1.1, ...], ...]")
    address: str | None = Field(None, description="Ray cluster address; default $RAY_ADDRESS, "
                                                  "else an embedded local Ray")
    num_cpus: float = Field(0.0, ge=0, description="CPUs reserved per stage actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per stage actor; an actor "
                                                   "holding one computes on it")
    placement: Literal["PACK", "SPREAD"] = Field("PACK", description="placement group strategy")
    threads: int = Field(1, ge=1, description="torch threads inside each actor")
    cpu_policy: Literal["rr", "batch", "normal"] = Field(
        "rr", description="Linux scheduling policy of the actors' threads: rr (SCHED_RR at "
                          "the lowest real-time priority) runs each action to its end "
                          "before another actor takes the core, and falls back to batch "
                          "where the kernel refuses it; batch (SCHED_BATCH) lets a thread "
                          "that a message wakes wait for the running one's time slice "
                          "instead of preempting it; normal leaves Linux's default "
                          "(runtime/cpu_policy.py)")
    allocator: Literal["jemalloc", "glibc"] = Field(
        "jemalloc", description="the actors' malloc: jemalloc (the one Ray ships, preloaded "
                                "into each actor) keeps size classes apart, so a layer's "
                                "actor holds little beyond its live activations; glibc "
                                "fragments around them (localnet/alloc.py)")
    start_window: int | None = Field(
        None, ge=0, description="actors that start at once: each imports torch and builds "
                                "its part, seconds of CPU, and more starting at once than "
                                "there are cores only makes them take turns and slows every "
                                "one.  Default: the cores (this machine's for an embedded "
                                "Ray, the nodes' CPUs for a cluster) plus one; 0: all at once")
    local_cpus: int = Field(4, ge=1, description="num_cpus of the embedded local Ray")
    local_object_store_mb: int = Field(
        1024, ge=100, description="object store of the embedded local Ray.  Only the "
                                  "coordinator's calls use it (batches, gathered state); "
                                  "activations and errors take the data plane.  Ray's own "
                                  "default, 30% of memory, is withheld from the actors.  "
                                  "Raise it for large inputs (a batch of 224x224 images is "
                                  "tens of MB, and a few are in flight)")
    actor_baseline_mb: float = Field(
        340.0, ge=0, description="an actor process's own memory before its share of the "
                                 "model: Ray's worker, import torch and the runtime's own "
                                 "(the data plane, what its build leaves); "
                                 "benchmarks/scaling.py measures it (a bare torch actor, "
                                 "and what set-up adds)")
    memory_preflight: bool = Field(True, description="refuse, before any actor starts, a "
                                                     "partition whose estimated memory "
                                                     "exceeds the Ray nodes' (runtime/memory.py)")
    batches_per_call: int = Field(
        2, ge=1, le=2, description="training batches in each actor's call under a flushing "
                                   "schedule (gpipe, 1f1b): 2 puts the next batch, when the "
                                   "training loop knows it, in the same calls right behind "
                                   "this one -- half the coordinator's calls and the "
                                   "actors' call overhead, the same maths; 1 calls per batch "
                                   "(async has its own runtime.schedule.ahead)")
    timeout_s: float = Field(600.0, gt=0, description="longest wait for any actor reply, and "
                                                      "for any message on the data plane (a "
                                                      "silent peer is an error naming the "
                                                      "edge after this long)")
    checkpoint_every: int | None = Field(
        None, ge=1, description="checkpoint every N steps (each actor writes its own state "
                                "into the run directory); default: at the end of every epoch")
    max_recoveries: int = Field(3, ge=0, description="actor deaths the coordinator recovers "
                                                     "from (from the last checkpoint) per run")

    @field_validator("schedule", mode="before")
    @classmethod
    def _bare_name(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @field_validator("partition", mode="wrap")
    @classmethod
    def _one_partition_error(cls, v, handler):
        """pydantic reports a bad union value once per form it might have been; say
        once which forms there are, and what is wrong with the one the value looks like."""
        try:
            return handler(v)
        except ValidationError as err:
            form = ("PartitionStages" if isinstance(v, dict) else "list" if isinstance(v, list)
                    else "literal")
            detail = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'value'}: "
                      + ("unknown key" if e["type"] == "extra_forbidden" else e["msg"])
                      for e in err.errors() if str(e["loc"][0]).startswith(form)]
            detail = "; ".join(detail) if form != "literal" else ""
            raise PydanticCustomError(
                "partition", "expected per_unit, per_layer, {stages: N, balance: params|cost}, "
                "boundaries [b1, b2, ...] or groups [[unit, ...], ...]"
                + (f" ({detail})" if detail else "")) from None

    @model_validator(mode="after")
    def _check(self):
        p = self.partition
        if isinstance(p, list) and p and all(isinstance(b, int) for b in p):
            if p != sorted(set(p)):
                raise ValueError(f"runtime.partition: boundaries must be strictly increasing, "
                                 f"got {p}")
            if any(b < 1 for b in p):
                raise ValueError("runtime.partition: boundaries must be >= 1")
        if isinstance(p, list) and any(isinstance(g, list) and not g for g in p):
            raise ValueError("runtime.partition: explicit groups may not be empty")
        return self


class LinkConfig(PluginSection):
    """One direction of the messages between stages: a codec, with that codec's own
    options beside it -- the `Options` of its class in localnet/channels/codecs.py (topk:
    k, error_feedback; sign: two_scales, error_feedback; int8: per_channel, stochastic;
    lowrank: q, unbiased) -- and its faults."""

    codec: str = "fp32"
    delay: int = Field(0, ge=0, description="messages arrive this many steps late")
    drop: float = Field(0.0, ge=0, le=1, description="probability that a message is lost")
    bandwidth: float | None = Field(None, gt=0, description="bytes/s cap (accounted)")
    noise: float = Field(0.0, ge=0, description="Gaussian noise added to what arrives, each "
                         "sample's at this many times its root mean square (an unbiased "
                         "rest of about this size)")

    @model_validator(mode="after")
    def _codec_options(self):
        from .channels.codecs import CODECS  # the registry: every codec class

        # keys relative to the link: _keyed puts channel.<kind> in front
        return _plugin_options(self, CODECS, self.codec, "codec", "")


class EdgeChannelConfig(Section):
    """Overrides for one edge: any LinkConfig keys, per direction."""

    activation: dict[str, Any] = Field(default_factory=dict)
    error: dict[str, Any] = Field(default_factory=dict)


class ChannelConfig(Section):
    """Communication-restricted learning (localnet/channels): codecs and bandwidth on the
    activations (up) and errors (down) between stages; delay, drop and noise on the
    errors."""

    enabled: bool | None = Field(None, description="None: on iff anything differs from the "
                                 "defaults; true: always (fp32 is still accounted); false: off")
    activation: LinkConfig = LinkConfig()
    error: LinkConfig = LinkConfig()
    edges: dict[int | str, EdgeChannelConfig] = Field(
        default_factory=dict, description="boundary index (unit index of the cut) or "
                                          "'unitA->unitB' -> {activation: {...}, error: {...}}")
    enforce_bandwidth: bool = Field(False, description="sleep to enforce bandwidth caps")

    @model_validator(mode="after")
    def _check(self):
        from .channels.channel import merge_link

        for key, over in self.edges.items():
            for kind in ("activation", "error"):
                try:
                    LinkConfig(**merge_link(getattr(self, kind).model_dump(), getattr(over, kind)))
                except ValidationError as err:
                    raise ValueError("\n  ".join(
                        _keyed(f"channel.edges.{key}.{kind}", e) for e in err.errors())) from None
            link = merge_link(self.activation.model_dump(), over.activation)
            if link["delay"] or link["drop"] or link["noise"]:
                raise ValueError(f"channel.edges.{key}.activation: delay/drop/noise on "
                                 "activations are not modelled (use codecs/bandwidth)")
        if self.activation.delay or self.activation.drop or self.activation.noise:
            raise ValueError("channel.activation: delay/drop/noise on activations are not "
                             "modelled (faults apply to the error path; use codecs/bandwidth "
                             "here)")
        return self

    def active(self) -> bool:
        if self.enabled is not None:
            return self.enabled
        return self != ChannelConfig()

    def error_biases(self) -> list[str]:
        """What biases the errors of each error link set here (channel.error, then each
        channel.edges override of it), as "<key>: <why, and the option that mends it>"
        (the codec's `bias`); empty where no codec says so or channels are off."""
        if not self.active():
            return []
        from .channels.channel import merge_link
        from .channels.codecs import make_codec

        links = [("channel.error", self.error)] + [
            (f"channel.edges.{key}.error",
             LinkConfig(**merge_link(self.error.model_dump(), over.error)))
            for key, over in self.edges.items() if over.error]
        notes = []
        for key, link in links:
            why = make_codec(link.codec, **link.options()).bias()
            if why:
                notes.append(f"{key}: {why}")
        return notes


class Config(Section):
    # the range every RNG it seeds takes (torch's own takes more, numpy's and Ray's not)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    per_rule: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="rule name -> {dotted.key: value} applied when that rule is chosen "
                    "(a rule's own recipe, e.g. PFA's large first-epoch weight decay); "
                    "--set still wins")
    name: str | None = Field(None, description="run name; default <model>_<rule>_<dataset>")
    out_dir: str = Field("runs", description="parent directory of run directories")
    rule: RuleConfig = RuleConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    metrics: MetricsConfig = MetricsConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    channel: ChannelConfig = ChannelConfig()

    def run_name(self) -> str:
        return self.name or f"{self.model.name}_{self.rule.name}_{self.data.name}"

    @field_validator("name")
    @classmethod
    def _one_folder(cls, v, info):
        # the run directory is out_dir/<name>-<stamp>: a '/' or a leading '.' ('../x')
        # put it somewhere else, where `localnet report out_dir` and sweeps never look.
        # A run that has its directory (an earlier localnet's) still resumes.
        if (info.context or {}).get("recorded"):
            return v
        if v is not None and (not v.strip() or v.startswith(".") or any(c in v for c in "/\\\0")):
            raise PydanticCustomError("run_name", "a run's name is one folder name: not blank, "
                                      "no '/' or '\\', and not starting with '.'")
        return v

    @field_validator("rule", mode="before")
    @classmethod
    def _bare_rule(cls, v):  # `rule: fa`, as `runtime.schedule: 1f1b`
        return {"name": v} if isinstance(v, str) else v

    @field_validator("per_rule")
    @classmethod
    def _recipes_of_rules(cls, v):
        # a misspelt rule's recipe would never apply, and say nothing
        from .rules import RULES

        for name in v:
            if name not in RULES:
                raise ValueError(f"per_rule.{name}: unknown rule" + (
                    did_you_mean(name, RULES.names(), " (did you mean per_rule.{}?)") or
                    f"; choose one of {', '.join(RULES.names())}"))
        return v

    @model_validator(mode="after")
    def _device(self):
        # asked for a GPU where this setting does nothing: the actors would run on CPUs
        if self.train.device == "cuda" and self.runtime.executor != "inprocess" \
                and not self.runtime.num_gpus:
            raise ValueError("train.device: cuda is the in-process executor's; the actors "
                             "(runtime.executor: ray, local) take a GPU with "
                             "runtime.num_gpus (a fraction shares one, e.g. 0.25)")
        return self


def _keyed(where: str, e: dict) -> str:
    """One pydantic error as `section.key: message`.  A section's own check (a
    model_validator) names its keys itself: in full (`rule.r: ...`), or relative to its
    section (`k: ...`, a link's codec option), which gets the section's path in front."""
    key = ".".join([where] * bool(where) + [str(p) for p in e["loc"]]) or "<root>"
    if e["type"] == "value_error" and isinstance(e.get("input"), (dict, BaseModel)):
        lines = e["msg"].removeprefix("Value error, ").split("\n  ")
        return "\n  ".join(ln if ln.startswith(key) or key == "<root>" else f"{key}.{ln}"
                            for ln in lines)
    msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
    if e["type"] == "extra_forbidden" and not where:
        msg += _did_you_mean(e["loc"])
    if e["type"] not in ("extra_forbidden", "missing") and "input" in e:
        hint = ""
        if e["type"] == "literal_error":  # `model.name: ResNet20`, `data.name: MNIST`
            hint = did_you_mean(e["input"], re.findall(r"'([^']*)'", e["ctx"]["expected"]),
                                "; did you mean {}?")
        msg += f" (got {e['input']!r}{hint})"
    return f"{key}: {msg}"


def _did_you_mean(loc: tuple) -> str:
    """' (did you mean train.lr?)' for a misspelt key of a section of the schema."""
    import difflib

    section = Config
    for part in loc[:-1]:
        field = section.model_fields.get(str(part))
        section = field.annotation if field is not None else None
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            return ""
    # A key put in the wrong section (`runtime.micro_batches`): the section that holds
    # that very name is what the user was looking for, before a near name in its own
    # (`data.batch_size` is train.batch_size, not data.image_size).
    if len(loc) == 2:
        home = [name for name, f in Config.model_fields.items()
                if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
                and str(loc[-1]) in f.annotation.model_fields]
        if home:
            return f" (did you mean {' or '.join(f'{h}.{loc[-1]}' for h in home)}?)"
        if str(loc[-1]) in Config.model_fields:  # a top-level key put in a section (seed)
            return f" (did you mean {loc[-1]}?)"
    near = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.6)
    if near:
        return f" (did you mean {'.'.join([*map(str, loc[:-1]), near[0]])}?)"
    return ""


def _format(err: ValidationError) -> str:
    return "invalid config:\n" + "\n".join(f"  {_keyed('', e)}" for e in err.errors())


def parse_override(item: str) -> tuple[list[str], object]:
    """'train.lr=0.1' -> (['train', 'lr'], 0.1); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not key.strip():
        raise ConfigError(f"--set has an empty key: {item!r}")
    if not all(path):
        raise ConfigError(f"--set {key.strip()}: a key's parts are names between dots, and "
                          f"one is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from None
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for i, k in enumerate(path[:-1]):
            child = node.setdefault(k, {})
            if isinstance(child, str):
                # a plugin given by its bare name (runtime.schedule: 1f1b): its options
                # go beside the name, and a new name replaces it
                child = node[k] = {"name": child}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[:i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _rule_recipe(data: dict, overrides: list[str]) -> list[str]:
    """The `per_rule` entries for the chosen rule, as --set style items."""
    per_rule = data.get("per_rule") or {}
    rule = data.get("rule") or {}
    rule = rule if isinstance(rule, str) else rule.get("name", "bp") if isinstance(rule, dict) \
        else None  # (not a rule: the schema's check says so)
    if not isinstance(per_rule, dict) or not isinstance(per_rule.get(rule, {}), dict):
        raise ConfigError("per_rule must map rule names to {dotted.key: value} mappings")
    items = []
    for key, value in (per_rule.get(rule) or {}).items():
        if not isinstance(key, str) or key.split(".")[0] == "per_rule" or key == "rule.name":
            raise ConfigError(f"per_rule.{rule}.{key}: a recipe may not change the rule itself "
                              f"(its options, rule.<option>, it may)")
        items.append(setting_text(key, value))
    return items


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error: PyYAML would
    keep the last silently, and a second `train:` section would drop the first."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges, and is
                continue                                    # overridden by design
            key = self.construct_object(key_node, deep=True)
            try:
                again = key in seen
            except TypeError:  # an unhashable key: the loader's own error follows
                continue
            if again:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _read_yaml(path) -> dict:
    path = Path(path)
    if path.is_dir():  # a run directory, say: its config is one file in it
        yaml_files = sorted(path.glob("*.yaml"))
        raise ConfigError(f"{path} is a directory, not a config file" + (
            f"; it holds {', '.join(f.name for f in yaml_files[:3])}" if yaml_files else "")
            + (f"; a run directory goes on with: localnet run --resume {path}"
               if (path / "checkpoint.pt").exists() else ""))
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        # a stream, so YAML's error names the file and line; of bytes, so it also names a
        # byte that is no text (a binary file given by mistake) and reads UTF-16
        with path.open("rb") as f:
            data = yaml.load(f, _UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    return _config_from({} if path is None else _read_yaml(path), overrides)


def load_run_config(run_dir, overrides: list[str] | None = None) -> tuple[Config, list[str]]:
    """The config a run directory was written with (for --resume), and the keys dropped
    from it.  A run written before rules and codecs declared their own options has every
    rule's and every codec's options in one flat section; the options the run's rule or
    codec does not take had no effect on it, so they are dropped (and named), and
    `pfa_mode` is PFA's `mode` now.  Any other bad key is the usual error."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        sweep = (run_dir / "sweep.csv").is_file()  # its points are runs; the sweep goes on
        raise FileNotFoundError(                   # with its own command
            f"--resume: {run_dir} is not a run directory (no config.yaml)" + (
                f"; it is a sweep's: run the sweep's command again with --out {run_dir}, or "
                f"--resume one of its points" if sweep else "") if run_dir.is_dir()
            else f"--resume: no run directory {run_dir}")
    data = _read_yaml(run_dir / "config.yaml")
    # a run's config.yaml is already resolved: its per_rule recipe was applied, and then
    # beaten by the run's --set, so applying it again would undo those
    try:
        return _config_from(data, overrides, recipes=False), []
    except ConfigError:
        migrated, dropped = _migrate_flat_plugins(data)
        if not dropped:
            raise
        return _config_from(migrated, overrides, recipes=False), dropped


def _migrate_flat_plugins(data: dict) -> tuple[dict, list[str]]:
    from .channels.codecs import CODECS
    from .rules import RULES

    data, dropped = copy.deepcopy(data), []

    def keep_own(section, where: str, registry, name_key: str, fixed) -> None:
        if not isinstance(section, dict) or section.get(name_key) not in registry:
            return
        own = set(registry.get(section[name_key]).Options.model_fields) | set(fixed)
        if "pfa_mode" in section and "mode" in own and "mode" not in section:
            section["mode"] = section.pop("pfa_mode")
        # another plugin's option: inert in that run.  A key no plugin declares stays,
        # and fails validation as any unknown key does.
        others = {f for _, cls in registry.items() for f in cls.Options.model_fields}
        for key in [k for k in section if k not in own and k in others | {"pfa_mode"}]:
            del section[key]
            dropped.append(f"{where}.{key}")

    keep_own(data.get("rule"), "rule", RULES, "name", RuleConfig.model_fields)
    for kind in ("activation", "error"):
        keep_own((data.get("channel") or {}).get(kind), f"channel.{kind}", CODECS, "codec",
                 LinkConfig.model_fields)
    return data, dropped


def _config_from(data: dict, overrides: list[str] | None, recipes: bool = True) -> Config:
    overrides = list(overrides or [])
    data = apply_overrides(data, overrides)
    if not recipes:  # a run's own config.yaml: what made its directory is no longer asked
        return _validate(data, {"recorded": True})
    try:
        recipe = apply_overrides(copy.deepcopy(data), _rule_recipe(data, overrides))
    except ConfigError:
        _validate(data)  # a section the recipe sets into is no section: that is the error
        raise
    cfg = _validate(apply_overrides(recipe, overrides))  # explicit --set beats the recipe
    # the chosen rule's recipe as applied: with the values the run has, which a --set may
    # have beaten.  Its config.yaml, given to `localnet run` again, applies the recipe
    # again -- and PFA's would otherwise undo a run's --set train.weight_decay.
    own = cfg.per_rule.get(cfg.rule.name)
    if own:
        now = cfg.model_dump(mode="python")
        cfg.per_rule[cfg.rule.name] = {key: value_at(now, key) for key in own}
    return cfg


def _validate(data: dict, context: dict | None = None) -> Config:
    try:
        return Config.model_validate(data, context=context)
    except ValidationError as err:
        raise ConfigError(_format(err)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="python"), sort_keys=False)


def read_recorded(data: dict) -> Config | None:
    """A config a run recorded (its checkpoint's, a sweep point's config.yaml), read as
    this localnet reads config.yaml: every key this schema has, so an option added since
    comes in at its default -- the value that keeps what the run did -- and is no change
    of settings; a path an earlier localnet kept relative resolves the same way on both
    sides.  None where this schema refuses it (an older schema's: compare it as it is)."""
    try:
        return Config.model_validate(data, context={"recorded": True})
    except ValidationError:
        return None


def value_at(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def config_diff(there: dict, here: dict) -> list[tuple[str, object, object]]:
    """The dotted keys whose values differ between two configs given as dicts (a run's
    recorded one and another), each with its two values, sorted by key."""
    a, b = flat_settings(there), flat_settings(here)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def flat_settings(d: dict, prefix: str = "") -> dict:
    """A config given as nested dicts, as {dotted key: value}.  A mapping keyed by
    numbers (epoch -> weight decay, edge index -> link) is one value, as --set takes it."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and all(isinstance(key, str) for key in v):
            out.update(flat_settings(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def setting_text(key: str, value) -> str:
    """'key=value' as --set takes it: the value in YAML's flow style, on one line (a
    scalar without the '...' that ends a YAML document of one scalar)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf)
    return f"{key}={text.removesuffix(chr(10)).removesuffix('...').strip()}"
