"""Declarative Draw&Guess templates: ``templates/strokes/*.yaml`` specs, loaded once and registered into
LLaMA-Factory (the same pattern as grounding/templates.py, with the two stroke tasks instead of box tasks)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import zlib
from collections.abc import Callable, Mapping

from llamafactory_vision.strokes.render import TASKS
from llamafactory_vision.template_specs import add_derived_template, load_specs

SPEC_FOLDER = "strokes"
CORNER_FIELDS = ("{x1}", "{y1}", "{x2}", "{y2}")


@dataclasses.dataclass(frozen=True)
class StrokeTemplateSpec:
    name: str
    base_template: str
    mm_plugin: str
    model_types: tuple[str, ...]
    prompts: Mapping[str, tuple[str, ...]]

    def __post_init__(self):
        for task in TASKS:
            if not self.prompts.get(task):
                raise ValueError(f"stroke template {self.name!r}: no prompts for task {task!r}.")
            for phrasing in self.prompts[task]:
                missing = [f for f in CORNER_FIELDS if f not in phrasing]
                if missing:
                    raise ValueError(f"stroke template {self.name!r}, task {task!r}: a phrasing lacks {missing}.")

    def prompt(self, task: str, key: str, corners: tuple[float, float, float, float]) -> str:
        """One phrasing for ``task`` chosen by a stable hash of ``key``, with the normalised corners (3 decimals)."""
        phrasings = self.prompts[task]
        text = phrasings[zlib.crc32(key.encode("utf-8")) % len(phrasings)]
        for field, value in zip(CORNER_FIELDS, corners):
            text = text.replace(field, f"{value:.3f}")
        return text


@functools.cache
def load_stroke_specs() -> dict[str, StrokeTemplateSpec]:
    """Read every spec in the ``strokes/`` folder of the ``llamafactory_vision.templates`` data package."""
    folder = importlib.resources.files("llamafactory_vision.templates") / SPEC_FOLDER
    return load_specs(folder, StrokeTemplateSpec, "stroke")


def get_stroke_spec(template_name: str | None) -> StrokeTemplateSpec | None:
    return load_stroke_specs().get(template_name) if template_name else None


def register_stroke_templates(templates: dict, get_mm_plugin: Callable) -> None:
    """Add one host ``Template`` per spec: a copy of its base template with its own stroke plugin instance."""
    for spec in load_stroke_specs().values():
        plugin = get_mm_plugin(spec.mm_plugin, image_token=templates[spec.base_template].mm_plugin.image_token)
        add_derived_template(templates, spec.name, spec.base_template, plugin)
