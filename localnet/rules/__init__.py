"""Local learning rules: one file per rule, pure torch, no Ray.

`make_rule(name, **options)` builds one; `RULES` maps names to classes.
"""

from .base import Rule
from .bp import Backprop
from .brsf import BatchRandomSignConcordant
from .dfa import DirectFeedbackAlignment, output_error
from .fa import FeedbackAlignment
from .frsf import FixedRandomSignConcordant
from .kp import KolenPollack
from .pfa import ProductFeedbackAlignment
from .usf import UniformSignConcordant
from .wm import WeightMirror

RULES: dict[str, type[Rule]] = {
    cls.name: cls
    for cls in (Backprop, FeedbackAlignment, DirectFeedbackAlignment, UniformSignConcordant,
                BatchRandomSignConcordant, FixedRandomSignConcordant, KolenPollack,
                WeightMirror, ProductFeedbackAlignment)
}


def make_rule(name: str, **options) -> Rule:
    try:
        cls = RULES[name]
    except KeyError:
        raise ValueError(f"unknown rule {name!r}; choose one of {sorted(RULES)}") from None
    return cls(**options)


__all__ = ["RULES", "Rule", "make_rule", "output_error"]
