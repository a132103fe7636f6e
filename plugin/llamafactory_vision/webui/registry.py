"""What our capabilities show in LLaMA Board: stages, templates offered per model family.

- :data:`STAGES`: ``stage`` YAML value -> display name in the Train tab's stage list (the editing stage today).
- :data:`TEMPLATE_SOURCES`: callables returning ``{our template: (host base template, model types)}``; the web UI
  offers each template as ``<host model name>-<suffix>`` beside every host model of a matching family.
"""

from __future__ import annotations

from collections.abc import Callable

STAGES: dict[str, str] = {"edit": "Edit (diffusion-coupled)"}

# config.model_type -> prefix of LLaMA-Factory's model names of that family (extras/constants.py)
MODEL_NAME_PREFIXES: dict[str, tuple[str, ...]] = {
    "qwen2_vl": ("Qwen2-VL-", "QVQ-"),
    "qwen2_5_vl": ("Qwen2.5-VL-",),
    "qwen3_vl": ("Qwen3-VL-",),
    "llava": ("LLaVA-1.5-",),
}


def _grounding_templates() -> dict[str, tuple[str, tuple[str, ...], str]]:
    from llamafactory_vision.grounding.templates import load_grounding_specs

    return {s.name: (s.base_template, s.model_types, "Grounding") for s in load_grounding_specs().values()}


def _llava_templates() -> dict[str, tuple[str, tuple[str, ...], str]]:
    """LLaVA-1.5 templates of editing (MGIE), Draw&Guess and MG-LLaVA; each is the host's ``llava`` conversation."""
    from llamafactory_vision.editing.tokens import BASE_TEMPLATE, EDIT_TEMPLATE
    from llamafactory_vision.fusion.templates import MG_TEMPLATE
    from llamafactory_vision.strokes.templates import load_stroke_specs

    templates = {EDIT_TEMPLATE: (BASE_TEMPLATE, ("llava",), "Edit"), MG_TEMPLATE: (BASE_TEMPLATE, ("llava",), "MG")}
    for spec in load_stroke_specs().values():
        templates[spec.name] = (spec.base_template, spec.model_types, "DrawGuess")
    return templates


# Each returns {template name: (host base template, config.model_type values, model-name suffix)}.
TEMPLATE_SOURCES: list[Callable[[], dict[str, tuple[str, tuple[str, ...], str]]]] = [
    _grounding_templates,
    _llava_templates,
]


def our_templates() -> dict[str, tuple[str, tuple[str, ...], str]]:
    merged: dict[str, tuple[str, tuple[str, ...], str]] = {}
    for source in TEMPLATE_SOURCES:
        for name, entry in source().items():
            if name in merged:
                raise ValueError(f"web UI template {name!r} comes from two registries.")
            merged[name] = entry
    return merged


def model_groups(
    supported_models: dict, default_template: dict[str, str], multimodal: set[str]
) -> list[tuple[dict, str]]:
    """``(models, template)`` pairs for the host's ``register_model_group(models, template, multimodal=True)``.

    For each of our templates, every host multimodal model whose default template is that template's base and whose
    name marks one of its model types gets a twin named ``<name>-<suffix>`` (same download paths) defaulting to ours.
    """
    groups = []
    for template, (base, model_types, suffix) in our_templates().items():
        prefixes = tuple(p for t in model_types for p in MODEL_NAME_PREFIXES.get(t, ()))
        models = {
            f"{name}-{suffix}": dict(paths)
            for name, paths in supported_models.items()
            if name in multimodal and default_template.get(name) == base and name.startswith(prefixes)
        }
        if models:
            groups.append((models, template))
    return groups


def training_stages(host_stages: dict[str, str]) -> dict[str, str]:
    """Display name -> stage entries to add to the host's ``TRAINING_STAGES`` (refuses clashes)."""
    added = {}
    for stage, display in STAGES.items():
        if host_stages.get(display) == stage:  # already added (the hook ran before)
            continue
        if display in host_stages or stage in host_stages.values():
            raise ValueError(f"stage {stage!r} ({display!r}) clashes with a LLaMA-Factory stage.")
        added[display] = stage
    return added
