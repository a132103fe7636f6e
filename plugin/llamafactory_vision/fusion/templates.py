"""The ``llava_mg`` template: the host's ``llava`` (LLaVA v1.5 conversation) with the MG-LLaVA plugin."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

MG_TEMPLATE = "llava_mg"
# Key beside "path"/"bytes" in an image entry written by the mg_llava converter: the image's boxes as JSON. Defined
# here (no host imports) because the converter and the plugin are imported while host modules are mid-import.
BOXES_KEY = "mg_boxes"


def register_mg_template(templates: dict, get_mm_plugin: Callable) -> None:
    if MG_TEMPLATE in templates:
        raise ValueError(f"Template {MG_TEMPLATE} already exists.")
    base = templates["llava"]
    plugin = get_mm_plugin("llava_mg", image_token=base.mm_plugin.image_token)
    templates[MG_TEMPLATE] = dataclasses.replace(base, mm_plugin=plugin)
