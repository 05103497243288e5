"""Plugins that declare themselves: rules, codecs and schedules.

A plugin is a class with a `name`, a pydantic `Options` model and its capabilities as
class attributes.  Defining the class registers it (its base class's `__init_subclass__`
calls `Registry.add`), and each plugin package imports its own modules (`discover`), so
no central list names them: a new rule, codec or schedule is one file, and the config
checks its options against the model that file declares.

    RULES = Registry("rule")
    class Rule:
        def __init_subclass__(cls, **kw):
            super().__init_subclass__(**kw)
            RULES.add(cls)
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import types
import typing

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from pydantic_core import PydanticCustomError


def bool_as_number(annotation, value) -> bool:
    """Whether `value` holds a boolean where `annotation` wants a number.  pydantic's lax
    mode reads true as 1, so `train.batch_size: true` trained on batches of one."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return bool_as_number(args[0], value)
    if origin in (typing.Union, types.UnionType):
        return not (isinstance(value, bool) and bool in args) and any(
            bool_as_number(a, value) for a in args)
    if isinstance(value, bool):
        return annotation in (int, float)
    if isinstance(value, (list, tuple)) and origin in (list, tuple) and args:
        each = args[:1] * len(value) if origin is list or args[-1] is Ellipsis else args
        return any(bool_as_number(a, v) for a, v in zip(each, value))
    if isinstance(value, dict) and origin is dict and args:
        return any(bool_as_number(args[0], k) or bool_as_number(args[1], v)
                   for k, v in value.items())
    return False


def did_you_mean(given, choices, form: str = " (did you mean {}?)") -> str:
    """' (did you mean pfa?)' for a name given where one of `choices` was meant: the one
    it spells in other case first (papers write PFA, GPipe, MNIST), else a near one."""
    if not isinstance(given, str):
        return ""
    same = [c for c in choices if c.lower() == given.lower()]
    near = same or difflib.get_close_matches(given, list(choices), n=1, cutoff=0.6)
    return form.format(near[0]) if near else ""


class Checked(BaseModel):
    """The base of every model of the config: an unknown key, inf or NaN, and a boolean
    given for a number are errors naming the key."""

    # no setting of localnet means anything at inf or NaN (and `gt=0` lets inf through)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, v, info):
        if bool_as_number(cls.model_fields[info.field_name].annotation, v):
            raise PydanticCustomError("bool_as_number", "expected a number, not true or false")
        return v


class NoOptions(Checked):
    """A plugin without options: any key is an error naming it."""


class Registry:
    """name -> plugin class, for one kind of plugin ("rule", "codec", "schedule")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._by_name: dict[str, type] = {}

    def add(self, cls: type) -> type:
        """Register cls under the `name` it defines itself; a class that defines none (an
        abstract base shared by several plugins) is not a plugin."""
        name = cls.__dict__.get("name")
        if not name:
            return cls
        old = self._by_name.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__,
                                                                     cls.__qualname__):
            raise ValueError(f"two {self.kind}s are named {name!r}: "
                             f"{old.__module__}.{old.__qualname__} and "
                             f"{cls.__module__}.{cls.__qualname__}")
        self._by_name[name] = cls  # the same class defined again (a reload) replaces it
        return cls

    def discard(self, name: str) -> None:
        """Forget a plugin (one defined for a while: a test's toy)."""
        self._by_name.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def __contains__(self, name) -> bool:
        return name in self._by_name

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._by_name)

    def items(self) -> list[tuple[str, type]]:
        return [(n, self._by_name[n]) for n in self.names()]

    def get(self, name: str) -> type:
        try:
            return self._by_name[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())}; "
                             f"choose one of {', '.join(self.names())}") from None

    def options(self, name: str, values: dict | None, where: str,
                also: list[str] = ()) -> BaseModel:
        """values checked against the plugin's Options model; a ValueError naming each bad
        key as `where.key` (`rule.r: ...`), with the plugin's own keys for an unknown one."""
        cls = self.get(name)
        model = getattr(cls, "Options", NoOptions)
        try:
            return model(**(values or {}))
        except ValidationError as err:
            known = ", ".join(model.model_fields) or "none"
            lines = []
            for e in err.errors():
                key = ".".join(p for p in [where, *map(str, e["loc"])] if p)
                if e["type"] == "extra_forbidden":
                    # also: the section's own keys, beside the options (a misspelt `codec`)
                    near = difflib.get_close_matches(str(e["loc"][-1]),
                                                     [*model.model_fields, *also], n=1)
                    hint = f"; did you mean {near[0]}?" if near else ""
                    lines.append(f"{key}: unknown key (the options of {self.kind} "
                                 f"{name!r}: {known}{hint})")
                else:
                    lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
            raise ValueError("\n  ".join(lines)) from None


def discover(package: str, path) -> None:
    """Import every module of a plugin package, so that each registers its plugins."""
    for mod in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{mod.name}")
