"""Box <-> text codecs, one per model family: the only place that knows each family's coordinate convention.

The package carries boxes as :class:`GroundedObject`: a referring expression and an ``xyxy`` box normalised to
``[0, 1]`` of the image (unchanged by a resize without cropping). A codec writes that box the way its family was
pre-trained to read and write it, and reads it back:

============  ====================================================================  ===============================
family        assistant text for one object (``compact`` style)                     coordinates
============  ====================================================================  ===============================
qwen2_vl      ``<|object_ref_start|>car<|object_ref_end|><|box_start|>(x1,y1),``    ints 0-1000 of the image
              ``(x2,y2)<|box_end|>``
qwen2_5_vl    ``[{"bbox_2d": [x1, y1, x2, y2], "label": "car"}]``                   int pixels of the model view,
                                                                                    within ``[0, W'-1] x [0, H'-1]``
qwen3_vl      same JSON as qwen2_5_vl                                               ints 0-1000 of the image
llava         ``car [x1, y1, x2, y2]``                                              floats 0-1 (3 decimals) of the
                                                                                    image centre-padded to a square
============  ====================================================================  ===============================

Answer styles (:data:`ANSWER_STYLES`, YAML key ``ground_answer_style``): ``native`` is how the model itself answers a
grounding prompt zero-shot, so fine-tuning need not first unlearn its output format; ``compact`` is one line. They
differ for the JSON families only: Qwen2.5-VL and Qwen3-VL answer with a ```json fenced list, one object per line,
indented by a tab (their cookbooks, e.g. QwenLM/Qwen3-VL cookbooks/spatial_understanding.ipynb)::

    ```json
    [
    \t{"bbox_2d": [x1, y1, x2, y2], "label": "car"},
    \t{"bbox_2d": [x1, y1, x2, y2], "label": "dog"}
    ]
    ```

Qwen2-VL's native answer is its box-token form and LLaVA's the bare list: both styles write them the same.
Qwen2.5-VL pixels are rounded after scaling and clamped to ``[0, W'-1] x [0, H'-1]``, as Qwen's own converter
``convert_to_qwen25vl_format`` (QwenLM/Qwen3-VL, qwen-vl-finetune/tools/process_bbox.ipynb) does.

``model_size`` is ``(width, height)`` in pixels of the image as the model sees it (after both resizes, see
:func:`llamafactory_vision.boxes.model_view_size`); only Qwen2.5-VL's absolute coordinates depend on it. LLaVA's
padding depends on the aspect ratio, so its ``model_size`` is the original ``(width, height)`` (same aspect).

:func:`parse_answer` is family-agnostic: it reads every form above, also with the special tokens stripped by
``skip_special_tokens``, and reports failure instead of raising.
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

Box = tuple[float, float, float, float]

OBJECT_REF_START, OBJECT_REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"
RELATIVE_SCALE = 1000  # Qwen2-VL and Qwen3-VL write coordinates as ints in [0, 1000] of the image
ANSWER_STYLES = ("native", "compact")


@dataclass(frozen=True)
class GroundedObject:
    """A referring expression and its box.

    Attributes:
        ref (str): the referring expression / label, e.g. ``"red car"``.
        box (tuple[float, float, float, float]): ``xyxy`` normalised to ``[0, 1]`` of the image.
    """

    ref: str
    box: Box


def _scale_to_ints(box_norm: Sequence[float], scale_x: float, scale_y: float) -> list[int]:
    x1, y1, x2, y2 = box_norm
    return [round(x1 * scale_x), round(y1 * scale_y), round(x2 * scale_x), round(y2 * scale_y)]


def _unscale(coords: Sequence[float], scale_x: float, scale_y: float) -> Box:
    x1, y1, x2, y2 = coords
    return x1 / scale_x, y1 / scale_y, x2 / scale_x, y2 / scale_y


def _require_objects(objects: Sequence[GroundedObject], style: str) -> None:
    if len(objects) == 0:
        raise ValueError("format_answer needs at least one GroundedObject, got none")
    if style not in ANSWER_STYLES:
        raise ValueError(f"answer style {style!r} is not one of {ANSWER_STYLES}")


class BoxCodec(ABC):
    """How one model family writes boxes in text.

    Attributes:
        family (str): registry name, e.g. ``"qwen2_vl"``.
        box_pattern (str): regex matching one box as written, with groups ``open`` (the text right before the
            coordinates) and ``close`` (the text right after them). The bbox head reads the hidden state of the token
            holding the last character of one of the two groups (``bbox_head_source``: box_start or box_end).
    """

    family: ClassVar[str]
    box_pattern: ClassVar[str]

    @abstractmethod
    def encode_box(self, box_norm: Sequence[float], model_size: tuple[int, int]) -> list[int] | list[float]:
        """Normalised ``xyxy`` -> the 4 coordinates as the family writes them."""

    @abstractmethod
    def decode_box(self, coords: Sequence[float], model_size: tuple[int, int]) -> Box:
        """The 4 coordinates as written (e.g. from :func:`parse_answer`) -> normalised ``xyxy``."""

    @abstractmethod
    def format_answer(
        self, objects: Sequence[GroundedObject], model_size: tuple[int, int], style: str = "native"
    ) -> str:
        """Assistant text grounding ``objects`` (at least one), in order, in ``style`` (one of
        :data:`ANSWER_STYLES`)."""

    @abstractmethod
    def format_region(self, box_norm: Sequence[float], model_size: tuple[int, int]) -> str:
        """A box as it appears inside a user prompt (region captioning: "what is in <region>?")."""


class Qwen2VLCodec(BoxCodec):
    """Qwen2-VL: special tokens around ``(x1,y1),(x2,y2)``, ints 0-1000 of the image; objects concatenated."""

    family = "qwen2_vl"
    box_pattern = rf"(?P<open>{re.escape(BOX_START)})[^<]*?(?P<close>{re.escape(BOX_END)})"

    def encode_box(self, box_norm: Sequence[float], model_size: tuple[int, int]) -> list[int]:
        return _scale_to_ints(box_norm, RELATIVE_SCALE, RELATIVE_SCALE)

    def decode_box(self, coords: Sequence[float], model_size: tuple[int, int]) -> Box:
        return _unscale(coords, RELATIVE_SCALE, RELATIVE_SCALE)

    def format_region(self, box_norm: Sequence[float], model_size: tuple[int, int]) -> str:
        x1, y1, x2, y2 = self.encode_box(box_norm, model_size)
        return f"{BOX_START}({x1},{y1}),({x2},{y2}){BOX_END}"

    def format_answer(
        self, objects: Sequence[GroundedObject], model_size: tuple[int, int], style: str = "native"
    ) -> str:
        _require_objects(objects, style)  # the box-token form is Qwen2-VL's native answer: one style
        return "".join(
            f"{OBJECT_REF_START}{obj.ref}{OBJECT_REF_END}{self.format_region(obj.box, model_size)}" for obj in objects
        )


class _QwenJsonCodec(BoxCodec):
    """Qwen2.5-VL / Qwen3-VL: a JSON list of ``{"bbox_2d": [...], "label": ...}``; subclasses set the scale."""

    box_pattern = r'(?P<open>"bbox_2d":\s*\[)[^\]]*(?P<close>\])'

    @abstractmethod
    def _scale(self, model_size: tuple[int, int]) -> tuple[float, float]:
        """``(scale_x, scale_y)``: written coordinate = normalised coordinate * scale."""

    def encode_box(self, box_norm: Sequence[float], model_size: tuple[int, int]) -> list[int]:
        return _scale_to_ints(box_norm, *self._scale(model_size))

    def decode_box(self, coords: Sequence[float], model_size: tuple[int, int]) -> Box:
        return _unscale(coords, *self._scale(model_size))

    def format_region(self, box_norm: Sequence[float], model_size: tuple[int, int]) -> str:
        return json.dumps(self.encode_box(box_norm, model_size))

    def format_answer(
        self, objects: Sequence[GroundedObject], model_size: tuple[int, int], style: str = "native"
    ) -> str:
        _require_objects(objects, style)
        items = [{"bbox_2d": self.encode_box(obj.box, model_size), "label": obj.ref} for obj in objects]
        if style == "compact":
            return json.dumps(items, ensure_ascii=False, separators=(", ", ": "))
        lines = ",\n".join("\t" + json.dumps(item, ensure_ascii=False, separators=(", ", ": ")) for item in items)
        return f"```json\n[\n{lines}\n]\n```"


class Qwen25VLCodec(_QwenJsonCodec):
    """Qwen2.5-VL: absolute int pixels of the model-view image ``(W', H')`` (after both resizes), clamped to
    ``[0, W'-1] x [0, H'-1]`` as Qwen's ``convert_to_qwen25vl_format`` does."""

    family = "qwen2_5_vl"

    def _scale(self, model_size: tuple[int, int]) -> tuple[float, float]:
        width, height = model_size
        return width, height

    def encode_box(self, box_norm: Sequence[float], model_size: tuple[int, int]) -> list[int]:
        width, height = model_size
        # Qwen computes round(x * (W' / W)) from pixels; from a normalised x, x_norm * W' can land a float ulp off an
        # exact .5 tie (167.5 / 308 * 308 = 167.49999999999997). Snapping to 1e-6 px first rounds the exact value.
        x1, y1, x2, y2 = (round(round(v * s, 6)) for v, s in zip(box_norm, (width, height) * 2))
        return [min(max(x1, 0), width - 1), min(max(y1, 0), height - 1),
                min(max(x2, 0), width - 1), min(max(y2, 0), height - 1)]  # fmt: skip


class Qwen3VLCodec(_QwenJsonCodec):
    """Qwen3-VL: ints 0-1000 of the image."""

    family = "qwen3_vl"

    def _scale(self, model_size: tuple[int, int]) -> tuple[float, float]:
        return RELATIVE_SCALE, RELATIVE_SCALE


class LlavaCodec(BoxCodec):
    """LLaVA v1.5: ``[x1, y1, x2, y2]`` floats (3 decimals) in ``[0, 1]`` of the image centre-padded to a square.

    LLaVA's ``expand2square`` pastes the image at offset ``(S - w) // 2`` / ``(S - h) // 2`` of an ``S = max(w, h)``
    square; ``model_size`` is the original ``(w, h)`` (any size with the same aspect gives the same text up to
    that integer offset).
    """

    family = "llava"
    box_pattern = r"(?P<open>\[)(?=\s*[-+.\d])[^\]]*(?P<close>\])"
    decimals = 3

    @staticmethod
    def _padding(model_size: tuple[int, int]) -> tuple[int, int, int]:
        width, height = model_size
        side = max(width, height)
        return side, (side - width) // 2, (side - height) // 2

    def encode_box(self, box_norm: Sequence[float], model_size: tuple[int, int]) -> list[float]:
        width, height = model_size
        side, pad_x, pad_y = self._padding(model_size)
        x1, y1, x2, y2 = box_norm
        padded = ((x1 * width + pad_x) / side, (y1 * height + pad_y) / side)
        padded += ((x2 * width + pad_x) / side, (y2 * height + pad_y) / side)
        return [round(v, self.decimals) for v in padded]

    def decode_box(self, coords: Sequence[float], model_size: tuple[int, int]) -> Box:
        width, height = model_size
        side, pad_x, pad_y = self._padding(model_size)
        x1, y1, x2, y2 = coords
        return (
            (x1 * side - pad_x) / width,
            (y1 * side - pad_y) / height,
            (x2 * side - pad_x) / width,
            (y2 * side - pad_y) / height,
        )

    def format_region(self, box_norm: Sequence[float], model_size: tuple[int, int]) -> str:
        return "[" + ", ".join(f"{v:.{self.decimals}f}" for v in self.encode_box(box_norm, model_size)) + "]"

    def format_answer(
        self, objects: Sequence[GroundedObject], model_size: tuple[int, int], style: str = "native"
    ) -> str:
        _require_objects(objects, style)  # LLaVA-1.5 answers with bare lists: one style
        return "; ".join(f"{obj.ref} {self.format_region(obj.box, model_size)}" for obj in objects)


CODECS: dict[str, BoxCodec] = {}


def register_codec(codec: BoxCodec) -> None:
    """Add ``codec`` to :data:`CODECS` under ``codec.family``; refuses a family registered twice."""
    if codec.family in CODECS:
        raise ValueError(f"box codec family {codec.family!r} is already registered")
    CODECS[codec.family] = codec


for _codec in (Qwen2VLCodec(), Qwen25VLCodec(), Qwen3VLCodec(), LlavaCodec()):
    register_codec(_codec)


def get_codec(family: str) -> BoxCodec:
    """The codec registered for ``family``; ValueError naming the known families otherwise."""
    if family not in CODECS:
        raise ValueError(f"unknown box family {family!r}; known families: {sorted(CODECS)}")
    return CODECS[family]


# ----------------------------------------------------------------------------------------------------------------
# Parsing model output
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ParsedAnswer:
    """Boxes read from an answer, in order of appearance.

    Attributes:
        boxes (list[tuple[float, float, float, float]]): ``xyxy`` in the coordinates as written (decode with the
            family's :meth:`BoxCodec.decode_box`); corner order is kept as written.
        refs (list[str | None]): the label / referring expression per box, ``None`` where none was found.
        failed (bool): no readable box was found.
    """

    boxes: list[Box] = field(default_factory=list)
    refs: list[str | None] = field(default_factory=list)
    failed: bool = True


_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_SEP = r"\s*,\s*"
# `(x1,y1),(x2,y2)`, optionally wrapped in box tokens (absent after skip_special_tokens).
_PAIR_BOX = re.compile(
    rf"(?:{re.escape(BOX_START)}\s*)?\(\s*({_NUM}){_SEP}({_NUM})\s*\){_SEP}\(\s*({_NUM}){_SEP}({_NUM})\s*\)"
    rf"(?:\s*{re.escape(BOX_END)})?"
)
# `"bbox_2d": [x1, y1, x2, y2]` (JSON, also single-quoted Python-style keys).
_JSON_BOX = re.compile(rf"[\"']bbox_2d[\"']\s*:\s*\[\s*({_NUM}){_SEP}({_NUM}){_SEP}({_NUM}){_SEP}({_NUM})\s*\]")
# A bare `[x1, y1, x2, y2]`.
_LIST_BOX = re.compile(rf"\[\s*({_NUM}){_SEP}({_NUM}){_SEP}({_NUM}){_SEP}({_NUM})\s*\]")
_JSON_LABEL = re.compile(r"[\"']label[\"']\s*:\s*\"((?:[^\"\\]|\\.)*)\"")
_REF_BLOCK = re.compile(rf"{re.escape(OBJECT_REF_START)}(.*?)(?:{re.escape(OBJECT_REF_END)}|$)", re.DOTALL)
_SPECIAL_TOKEN = re.compile(r"<\|[a-z_]+\|>")
_REF_TRIM = " \t\r\n:;,.-=\"'`{}[]()*"


def _json_label(text: str, start: int, end: int) -> str | None:
    """The ``label`` of the JSON object enclosing ``text[start:end]`` (possibly cut off), if any."""
    open_brace = text.rfind("{", 0, start)
    close_brace = text.find("}", end)
    stop = len(text) if close_brace < 0 else close_brace
    next_open = text.find("{", end, stop)
    if next_open >= 0:  # the enclosing object was cut off before its `}`: do not read the next object's label
        stop = next_open
    match = _JSON_LABEL.search(text, max(open_brace, 0), stop)
    if match is None:
        return None
    try:
        return json.loads(f'"{match.group(1)}"')
    except ValueError:  # an invalid escape: keep the label as written
        return match.group(1)


def _text_ref(segment: str) -> str | None:
    """The label in the text between the previous box and this one (``None`` if it holds no words)."""
    blocks = _REF_BLOCK.findall(segment)
    if blocks:
        return blocks[-1].strip() or None
    text = _SPECIAL_TOKEN.sub("", segment)
    # Only the clause right before the box: "A; B [box]" and "intro\nB (box)" label the box "B".
    text = re.split(r"[\n;]", text)[-1].strip(_REF_TRIM)
    return text or None


def parse_answer(text: str) -> ParsedAnswer:
    """Read every box in a model answer or label, in order of appearance; never raises on a ``str``.

    Reads ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` and its token-less form ``(x1,y1),(x2,y2)``, JSON objects
    with ``"bbox_2d": [...]`` (also fenced, and from a truncated list: every box written in full is kept), and bare
    ``[x1, y1, x2, y2]`` with int or float numbers. Refs come from ``<|object_ref_start|>...``, a JSON ``label``,
    or the text right before a bare box; a box preceded by no words shares the previous box's ref
    (``car: [..], [..]``). Boxes with a non-finite number are dropped.

    Args:
        text (str): decoded model output, with or without special tokens.

    Returns:
        ParsedAnswer: ``failed`` is True when no box was read.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_answer expects str, got {type(text).__name__}")
    parsed = _parse_common(text)
    return parsed if parsed is not None else _parse_any(text)


# ---- Fast path: the well-formed answers every codec writes, read by one anchored regex match per box. ----
# Each form below is read only where the full parser (:func:`_parse_any`) provably finds exactly the boxes the form
# holds: every character of the text belongs to a box unit or to a tail that holds no box, and the free text around
# the boxes excludes each character that could start another candidate (``(`` for pair boxes, ``[`` for JSON and
# bare lists, ``<`` for special tokens). Numbers have at most 15 digits per part, so they are finite. Anything else
# returns None and goes to the full parser; tests/test_formats_fast.py compares both on generated texts.
_FAST_NUM = r"(-?\d{1,15}(?:\.\d{1,15})?)"
_FAST_LIST = rf"\[\s*{_FAST_NUM}\s*,\s*{_FAST_NUM}\s*,\s*{_FAST_NUM}\s*,\s*{_FAST_NUM}\s*\]"
_FAST_FREE = r"[^(\[<]*+"  # free text: no candidate can start in it, and no special token
_FAST_TAIL = r"(?P<tail>[^(\[]*+\Z)?"  # after the last box: text where no candidate can start
# Qwen2-VL: [free text][<|object_ref_start|>ref<|object_ref_end|>][<|box_start|>](x1,y1),(x2,y2)[<|box_end|>]
_FAST_PAIR = re.compile(
    rf"({_FAST_FREE})(?:{re.escape(OBJECT_REF_START)}({_FAST_FREE}){re.escape(OBJECT_REF_END)})?"
    rf"(?:{re.escape(BOX_START)}\s*)?\(\s*{_FAST_NUM}\s*,\s*{_FAST_NUM}\s*\)\s*,\s*\(\s*{_FAST_NUM}\s*,\s*{_FAST_NUM}\s*\)"
    rf"(?:\s*{re.escape(BOX_END)})?{_FAST_TAIL}"
)
# The same, as Qwen2VLCodec writes it (int coordinates, no spaces): a cheaper match, and the same groups wherever it
# matches, so it is tried first.
_FAST_PAIR_EXACT = re.compile(
    rf"({_FAST_FREE})(?:{re.escape(OBJECT_REF_START)}({_FAST_FREE}){re.escape(OBJECT_REF_END)})?"
    rf"(?:{re.escape(BOX_START)})?\((-?\d{{1,15}}),(-?\d{{1,15}})\),\((-?\d{{1,15}}),(-?\d{{1,15}})\)"
    rf"(?:\s*{re.escape(BOX_END)})?{_FAST_TAIL}"
)
# LLaVA: [free text][x1, y1, x2, y2] (text holding no "bbox_2d" and no "(").
_FAST_BARE = re.compile(rf"({_FAST_FREE}){_FAST_LIST}{_FAST_TAIL}")
# Qwen2.5-VL / Qwen3-VL: [free text, e.g. a ```json fence][ then {"bbox_2d": [...], "label": "..."} objects.
_FAST_JSON_HEAD = re.compile(r"[^(\[]*+\[")
_FAST_JSON = re.compile(
    rf'\s*\{{\s*"bbox_2d"\s*:\s*{_FAST_LIST}\s*,\s*"label"\s*:\s*"([^"\\\[\]{{}}(]*+)"\s*\}}\s*,?{_FAST_TAIL}'
)


def _plain_ref(segment: str) -> str | None:
    """:func:`_text_ref` of a segment without ``<``: the clause after the last newline or ``;``, trimmed."""
    return segment[max(segment.rfind("\n"), segment.rfind(";")) + 1 :].strip(_REF_TRIM) or None


def _parse_common(text: str) -> ParsedAnswer | None:
    """:func:`_parse_any` of a well-formed answer of one of the codecs' forms; None for any other text."""
    if "bbox_2d" in text:
        head = _FAST_JSON_HEAD.match(text)
        if head is None:
            return None
        pattern, pos = _FAST_JSON, head.end()
    elif "(" in text:
        pattern, pos = _FAST_PAIR, 0
    elif "[" in text:
        pattern, pos = _FAST_BARE, 0
    else:  # every candidate starts at "(" or "["
        return ParsedAnswer()
    boxes, refs, ref = [], [], None
    while True:
        match = (pattern is _FAST_PAIR and _FAST_PAIR_EXACT.match(text, pos)) or pattern.match(text, pos)
        if match is None:
            return None
        groups = match.groups()
        if pattern is _FAST_JSON:  # (x1, y1, x2, y2, label, tail)
            coords, ref = groups[:4], groups[4]  # no quote or backslash: the JSON string is its text as written
        else:  # (free text, [ref block,] x1, y1, x2, y2, tail)
            coords = groups[-5:-1]
            if pattern is _FAST_PAIR and groups[1] is not None:
                ref = groups[1].strip() or None  # an <|object_ref_start|> block names the box
            else:
                segment = groups[0]
                words = segment.strip(_REF_TRIM)
                if words or not boxes:  # free text without words: the previous box's ref
                    ref = _plain_ref(segment) if "\n" in segment or ";" in segment else words or None
        boxes.append((float(coords[0]), float(coords[1]), float(coords[2]), float(coords[3])))
        refs.append(ref)
        if groups[-1] is not None:  # the tail: no box after this one
            return ParsedAnswer(boxes, refs, False)
        pos = match.end()


def _parse_any(text: str) -> ParsedAnswer:
    """:func:`parse_answer` of any text: every candidate box of every form, overlaps resolved, refs found."""

    # (start, end, number strings, JSON label, is JSON) per candidate; overlaps go to the earliest, then longest.
    candidates = []
    for pattern in (_JSON_BOX, _PAIR_BOX, _LIST_BOX):
        for match in pattern.finditer(text):
            label = _json_label(text, match.start(), match.end()) if pattern is _JSON_BOX else None
            candidates.append((match.start(), match.end(), match.groups(), label, pattern is _JSON_BOX))
    candidates.sort(key=lambda c: (c[0], -c[1]))

    parsed = ParsedAnswer()
    previous_end, previous_ref = 0, None
    for start, end, groups, label, is_json in candidates:
        if start < previous_end:
            continue
        coords = tuple(float(g) for g in groups)
        segment = text[previous_end:start]
        previous_end = end
        if not all(math.isfinite(v) for v in coords):
            continue
        if is_json:
            ref = label
        else:
            has_words = _SPECIAL_TOKEN.sub("", segment).strip(_REF_TRIM) or OBJECT_REF_START in segment
            ref = _text_ref(segment) if has_words or not parsed.boxes else previous_ref
        parsed.boxes.append(coords)
        parsed.refs.append(ref)
        previous_ref = ref
    parsed.failed = not parsed.boxes
    return parsed
