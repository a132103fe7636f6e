"""Declarative grounding templates: ``templates/*.yaml`` specs, loaded once and registered into LLaMA-Factory.

A spec names a host chat template to copy (``base_template``), our multimodal plugin that writes the boxes
(``mm_plugin``), the box codec (``box_family``), the model types it fits and the prompt phrasings per task.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import zlib
from collections.abc import Callable, Mapping

from llamafactory_vision.template_specs import add_derived_template, load_specs

TASKS = ("rec", "reg", "detect")


@dataclasses.dataclass(frozen=True)
class GroundingTemplateSpec:
    name: str
    base_template: str
    mm_plugin: str
    box_family: str
    model_types: tuple[str, ...]
    prompts: Mapping[str, tuple[str, ...]]

    def __post_init__(self):
        missing = [task for task in TASKS if not self.prompts.get(task)]
        if missing:
            raise ValueError(f"grounding template {self.name!r}: no prompts for task(s) {', '.join(missing)}.")

    def pick_prompt(self, task: str, key: str) -> str:
        """One phrasing for ``task``, chosen by a stable hash of ``key`` (same row, same prompt, every run)."""
        phrasings = self.prompts[task]
        return phrasings[zlib.crc32(key.encode("utf-8")) % len(phrasings)]


@functools.cache
def load_grounding_specs() -> dict[str, GroundingTemplateSpec]:
    """Read every spec shipped in the ``llamafactory_vision.templates`` data package, keyed by template name."""
    return load_specs(importlib.resources.files("llamafactory_vision.templates"), GroundingTemplateSpec, "grounding")


def get_grounding_spec(template_name: str | None) -> GroundingTemplateSpec | None:
    return load_grounding_specs().get(template_name) if template_name else None


def is_grounding_template(template_name: str | None) -> bool:
    return get_grounding_spec(template_name) is not None


def register_grounding_templates(templates: dict, get_mm_plugin: Callable) -> None:
    """Add one host ``Template`` per spec: a copy of its base template whose multimodal plugin writes the boxes.

    Each template gets its own plugin instance (no plugin object shared between templates).
    """
    for spec in load_grounding_specs().values():
        base = templates[spec.base_template]
        plugin = get_mm_plugin(
            spec.mm_plugin,
            image_token=base.mm_plugin.image_token,
            video_token=base.mm_plugin.video_token,
            box_family=spec.box_family,
        )
        add_derived_template(templates, spec.name, spec.base_template, plugin)
