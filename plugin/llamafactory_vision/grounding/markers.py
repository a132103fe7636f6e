"""Neutral box markers: how a box travels from the dataset converter to the model-specific text.

The converter cannot know the size the model will see (LLaMA-Factory decides it later, from the processor), so it
writes each box as a marker holding the box normalised to the original image. The grounding plugin renders markers
into the family's exact text inside ``process_messages``, once the final image size is known. Markers never reach a
tokenizer.

Syntax: ``⟦lfv:objects <image index> <style> <json list of {"ref", "box"}>⟧`` (an answer, written in ``style``, one
of :data:`~llamafactory_vision.grounding.formats.ANSWER_STYLES`, chosen by ``ground_answer_style``; without a style
the answer is ``compact``) and ``⟦lfv:region <image index> <json box>⟧`` (a box inside a prompt); the JSON is
ASCII-only, so it never contains ``⟧``. The style travels in the marker because the converter knows the run's
settings and the plugin, shared by every run of its template, must not hold them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

from llamafactory_vision.grounding.formats import ANSWER_STYLES, BoxCodec, GroundedObject

_MARKER = re.compile(r"⟦lfv:(objects|region) (\d+) (?:(native|compact) )?(.*?)⟧", re.DOTALL)

Size = tuple[int, int]


def objects_marker(image_index: int, objects: Sequence[GroundedObject], style: str = "native") -> str:
    """Marker for an answer listing ``objects`` (boxes normalised xyxy in [0, 1] of image ``image_index``), to be
    written in answer ``style``."""
    if style not in ANSWER_STYLES:
        raise ValueError(f"answer style {style!r} is not one of {ANSWER_STYLES}")
    payload = [{"ref": o.ref, "box": list(o.box)} for o in objects]
    return f"⟦lfv:objects {image_index} {style} {json.dumps(payload, ensure_ascii=True)}⟧"


def region_marker(image_index: int, box: Sequence[float]) -> str:
    """Marker for a region (normalised xyxy in [0, 1]) mentioned in a prompt."""
    return f"⟦lfv:region {image_index} {json.dumps(list(box))}⟧"


def has_markers(text: str) -> bool:
    return _MARKER.search(text) is not None


def _objects(payload: str) -> list[GroundedObject]:
    return [GroundedObject(ref=item["ref"], box=tuple(item["box"])) for item in json.loads(payload)]


def marker_objects(text: str) -> list[GroundedObject]:
    """Objects of every answer marker in ``text``, in order (region markers are not objects)."""
    return [obj for kind, _, _, payload in _MARKER.findall(text) if kind == "objects" for obj in _objects(payload)]


def render_markers(text: str, codec: BoxCodec, model_size: Callable[[int], Size]) -> str:
    """Replace every marker in ``text`` with ``codec``'s text; ``model_size(i)`` gives image ``i``'s
    (width, height) as the model sees it."""

    def render(match: re.Match) -> str:
        kind, index, style, payload = match.group(1), int(match.group(2)), match.group(3), match.group(4)
        size = model_size(index)
        if kind == "region":
            return codec.format_region(tuple(json.loads(payload)), size)
        return codec.format_answer(_objects(payload), size, style or "compact")

    return _MARKER.sub(render, text)
