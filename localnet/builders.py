"""Building the model, rule and optimizer settings from a config, without data.

Used by `localnet.train.build()` (which also loads data) and by every runtime worker,
with the input shape and class count the coordinator hands over.  `build_model` is
deterministic in the seed, unit by unit, so a worker builds only its own units (`units`,
with their input shapes) and gets the whole model's weights for them.
"""

from __future__ import annotations

import torch

from .config import Config
from .engine import OptimConfig
from .models import build_model
from .rules import make_rule


def as_config(cfg) -> Config:
    return cfg if isinstance(cfg, Config) else Config.model_validate(cfg)


def build_rule_and_model(cfg: Config, input_shape, num_classes: int, units=None,
                         unit_shapes=None):
    rule = make_rule(cfg.rule.name, **cfg.rule.options())
    kwargs = {"widths": tuple(cfg.model.widths)} if cfg.model.name == "mlp" else {}
    model = build_model(cfg.model.name, rule, tuple(input_shape), int(num_classes),
                        seed=cfg.seed, units=units, unit_shapes=unit_shapes,
                        init=cfg.model.init, **kwargs)
    if cfg.train.memory_format == "channels_last":
        # conv weights channels-last: a convolution then returns channels-last output
        # whatever its input, so every later activation and error follows (the
        # values are the same; only their order in memory changes)
        model.to(memory_format=torch.channels_last)
    return rule, model


def optim_config(cfg: Config) -> OptimConfig:
    t = cfg.train
    return OptimConfig(lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                       nesterov=t.nesterov, batch_manhattan=cfg.rule.batch_manhattan,
                       norm_constraint=cfg.rule.norm_constraint)
