"""Local learning rules: one file per rule, pure torch, no Ray.

Each file defines a `Rule` subclass with its `name`, its `Options` and its capabilities;
defining it registers it in `RULES`, and this package imports every module in it, so a
new rule is one new file.  `make_rule(name, **options)` builds one.
"""

from ..registry import discover
from .base import RULES, Rule

discover(__name__, __path__)

from .dfa import output_error  # noqa: E402 - after discovery, like every rule module


def make_rule(name: str, **options) -> Rule:
    """The rule registered as `name`, its options checked against its `Options` model."""
    return RULES.get(name)(**options)


__all__ = ["RULES", "Rule", "make_rule", "output_error"]
