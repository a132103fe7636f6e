"""The ``llava_mg`` template: the host's ``llava`` (LLaVA v1.5 conversation) with the MG-LLaVA plugin."""

from __future__ import annotations

from collections.abc import Callable

from llamafactory_vision.template_specs import add_derived_template

MG_TEMPLATE = "llava_mg"
# Key beside "path"/"bytes" in an image entry written by the mg_llava converter: the image's boxes as JSON. Defined
# here (no host imports) because the converter and the plugin are imported while host modules are mid-import.
BOXES_KEY = "mg_boxes"


def register_mg_template(templates: dict, get_mm_plugin: Callable) -> None:
    plugin = get_mm_plugin("llava_mg", image_token=templates["llava"].mm_plugin.image_token)
    add_derived_template(templates, MG_TEMPLATE, "llava", plugin)
