"""Our YAML keys as LLaMA Board controls, read from the argument dataclasses (no per-key UI code).

Every field of :class:`~llamafactory_vision.hparams.VisionDataArguments` and
:class:`~llamafactory_vision.hparams.VisionFinetuningArguments` that the host's base classes lack becomes one
:class:`Option`: its control kind follows the field type, its help text is the field's ``help``, and its group is the
capability whose module defines it (a mixin in ``editing/args.py`` -> ``editing``). Fields added later appear in the UI
without changes here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from typing import Any, Literal

# module of the class that defines a field -> capability group; fields written directly in hparams.py are grounding's
_MODULE_GROUPS = {"llamafactory_vision.hparams": "grounding"}
GROUP_ORDER = ("grounding", "editing", "fusion", "strokes")


@dataclasses.dataclass(frozen=True)
class Option:
    """One YAML key shown as a control.

    ``kind``: ``checkbox`` (bool), ``dropdown`` (Literal, ``choices``), ``int``, ``float``, ``text`` (str) or ``json``
    (lists, dicts, anything else: typed as JSON). ``optional``: the field accepts None (an empty control means None).
    """

    name: str
    group: str
    kind: str
    default: Any
    help: str
    choices: tuple[Any, ...] = ()
    optional: bool = False

    def to_value(self, ui_value: Any) -> Any:
        """The YAML value for a control's value. Raises ValueError naming the key when it does not parse."""
        if self.kind == "checkbox":
            return bool(ui_value)
        if ui_value is None or (isinstance(ui_value, str) and not ui_value.strip()):
            if self.optional:
                return None
            if self.kind in ("text",):
                return ""
            raise ValueError(f"`{self.name}` needs a value.")
        if self.kind == "int":
            if float(ui_value) != int(float(ui_value)):
                raise ValueError(f"`{self.name}` must be an integer, got {ui_value!r}.")
            return int(float(ui_value))
        if self.kind == "float":
            return float(ui_value)
        if self.kind == "json":
            try:
                return json.loads(ui_value)
            except json.JSONDecodeError as err:
                raise ValueError(f"`{self.name}` must be JSON: {err}") from err
        return ui_value

    def to_ui(self, value: Any) -> Any:
        """The control's value for a YAML value (inverse of :meth:`to_value`)."""
        if self.kind == "json":
            return "" if value is None else json.dumps(value)
        if value is None:
            return "" if self.kind in ("text", "json") else None
        return value


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _kind(tp: Any) -> tuple[str, tuple[Any, ...]]:
    if tp is bool:
        return "checkbox", ()
    if typing.get_origin(tp) is Literal:
        return "dropdown", typing.get_args(tp)
    if tp is int:
        return "int", ()
    if tp is float:
        return "float", ()
    if tp is str:
        return "text", ()
    return "json", ()


def _defining_module(cls: type, name: str) -> str:
    """Module of the class in ``cls``'s MRO whose own annotations declare ``name`` (mixins included)."""
    for klass in cls.__mro__:
        if name in vars(klass).get("__annotations__", {}):
            return klass.__module__
    return cls.__module__


def _group(module: str) -> str:
    if module in _MODULE_GROUPS:
        return _MODULE_GROUPS[module]
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "llamafactory_vision" else parts[-1]


def options_of(ours: type, host: type) -> list[Option]:
    """Options for the dataclass fields of ``ours`` that ``host`` does not have, in declaration order."""
    host_names = {f.name for f in dataclasses.fields(host)}
    hints = typing.get_type_hints(ours)
    out = []
    for f in dataclasses.fields(ours):
        if f.name in host_names or not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        kind, choices = _kind(tp)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append(
            Option(
                name=f.name,
                group=_group(_defining_module(ours, f.name)),
                kind=kind,
                default=default,
                help=f.metadata.get("help", ""),
                choices=choices,
                optional=optional or default is None,
            )
        )
    return out


@functools.cache
def train_options() -> tuple[Option, ...]:
    """Our data and finetuning keys (the Train tab), grouped by capability in :data:`GROUP_ORDER`."""
    from llamafactory.hparams.data_args import DataArguments
    from llamafactory.hparams.finetuning_args import FinetuningArguments

    from llamafactory_vision.hparams import VisionDataArguments, VisionFinetuningArguments

    found = options_of(VisionDataArguments, DataArguments) + options_of(VisionFinetuningArguments, FinetuningArguments)
    rank = {g: i for i, g in enumerate(GROUP_ORDER)}
    return tuple(sorted(found, key=lambda o: rank.get(o.group, len(rank))))  # stable: declaration order per group


@functools.cache
def data_options() -> tuple[Option, ...]:
    """Our data keys only (the Evaluate & Predict tab: they shape how predict reads the dataset)."""
    from llamafactory.hparams.data_args import DataArguments

    from llamafactory_vision.hparams import VisionDataArguments

    return tuple(options_of(VisionDataArguments, DataArguments))


def to_args(options: tuple[Option, ...], ui_values: dict[str, Any]) -> dict[str, Any]:
    """YAML keys for the options whose value differs from the field default (stock runs get no extra keys)."""
    args = {}
    for option in options:
        value = option.to_value(ui_values[option.name])
        if value != option.default:
            args[option.name] = value
    return args
