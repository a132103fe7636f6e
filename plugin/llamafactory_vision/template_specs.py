"""The loader behind our declarative template specs (grounding, Draw&Guess): YAML files in a folder of the
``llamafactory_vision.templates`` data package, each one frozen dataclass keyed by its ``name``.

Imports nothing from the host: specs are read while host modules are being imported.
"""

from __future__ import annotations

import dataclasses
from importlib.resources.abc import Traversable
from typing import Any, TypeVar

import yaml

Spec = TypeVar("Spec")


def _freeze(value: Any) -> Any:
    """YAML lists as tuples, also inside mappings (``prompts: {task: [...]}``), so a spec is immutable."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        return {key: _freeze(item) for key, item in value.items()}
    return value


def load_specs(folder: Traversable, spec_type: type[Spec], kind: str) -> dict[str, Spec]:
    """Read every ``*.yaml`` file directly in ``folder`` (in name order) as a ``spec_type``, keyed by its ``name``.

    Args:
        folder (Traversable): e.g. ``importlib.resources.files("llamafactory_vision.templates") / "strokes"``.
        spec_type (type): a dataclass with a ``name`` field; every field must be given in the YAML (KeyError
            otherwise), lists become tuples.
        kind (str): what the specs are, for error messages (``"grounding"``, ``"stroke"``).

    Raises:
        ValueError: a YAML key that is no field of ``spec_type``, or a ``name`` defined twice; both name the file.
    """
    fields = [field.name for field in dataclasses.fields(spec_type)]
    specs = {}
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".yaml"):
            continue
        raw = yaml.safe_load(entry.read_text(encoding="utf-8"))
        unknown = set(raw) - set(fields)
        if unknown:
            raise ValueError(f"{kind} template spec {entry.name}: unknown keys {sorted(unknown)}.")
        spec = spec_type(**{name: _freeze(raw[name]) for name in fields})
        if spec.name in specs:
            raise ValueError(f"{kind} template {spec.name!r} is defined twice (second in {entry.name}).")
        specs[spec.name] = spec
    return specs


def add_derived_template(templates: dict, name: str, base_name: str, plugin: Any) -> None:
    """Register ``templates[name]``: a copy of the host template ``base_name`` whose multimodal plugin is ``plugin``.

    ``templates`` is the host's ``TEMPLATES`` registry; each derived template gets its own plugin instance. Refuses
    to replace a template already registered under ``name`` (ours or the host's).
    """
    if name in templates:
        raise ValueError(f"Template {name} already exists.")
    templates[name] = dataclasses.replace(templates[base_name], mm_plugin=plugin)
