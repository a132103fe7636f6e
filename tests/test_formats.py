"""Box codecs: golden texts per family, round trips, and a parser that never crashes."""

from __future__ import annotations

import json
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llamafactory_vision.boxes import normalize_xyxy
from llamafactory_vision.grounding.formats import (
    ANSWER_STYLES,
    CODECS,
    GroundedObject,
    LlavaCodec,
    ParsedAnswer,
    get_codec,
    parse_answer,
    register_codec,
)
from qwen_reference import convert_to_qwen2vl_format, convert_to_qwen25vl_format, convert_to_qwen25vl_format_exact

# An original image of 640 x 480 pixels; smart_resize(480, 640, factor 28) makes the model view 644 x 476.
ORIGINAL_SIZE = (640, 480)
MODEL_SIZE = (644, 476)  # (width, height) of the model view; 644 = 23 * 28, 476 = 17 * 28
PIXEL_BOXES = {"red car": [64, 96, 221.184, 240], 'blue "x" 车': [320, 240, 576, 475.2], "dog": [0, 0, 640, 480]}
ONE = [GroundedObject("red car", normalize_xyxy(PIXEL_BOXES["red car"], ORIGINAL_SIZE))]
THREE = [GroundedObject(ref, normalize_xyxy(box, ORIGINAL_SIZE)) for ref, box in PIXEL_BOXES.items()]


def qwen_reference_boxes(family: str) -> list[list[int]]:
    """Each of ``THREE``'s pixel boxes as Qwen's own converter writes it (tests/qwen_reference.py)."""
    width, height = ORIGINAL_SIZE
    if family == "qwen2_5_vl":
        return [convert_to_qwen25vl_format(b, height, width, MODEL_SIZE[1], MODEL_SIZE[0]) for b in PIXEL_BOXES.values()]
    return [convert_to_qwen2vl_format(b, height, width) for b in PIXEL_BOXES.values()]


# The compact style, written out by hand; test_golden_boxes_are_qwens_own checks every number against Qwen's converter.
GOLDEN = {
    ("qwen2_vl", 1): "<|object_ref_start|>red car<|object_ref_end|><|box_start|>(100,200),(346,500)<|box_end|>",
    ("qwen2_vl", 3): (
        "<|object_ref_start|>red car<|object_ref_end|><|box_start|>(100,200),(346,500)<|box_end|>"
        '<|object_ref_start|>blue "x" 车<|object_ref_end|><|box_start|>(500,500),(900,990)<|box_end|>'
        "<|object_ref_start|>dog<|object_ref_end|><|box_start|>(0,0),(1000,1000)<|box_end|>"
    ),
    # 64 * 644/640 = 64.4 -> 64, 96 * 476/480 = 95.2 -> 95, 221.184 * 644/640 = 222.6 -> 223, 240 * 476/480 = 238;
    # the whole image clamps to [0, 643] x [0, 475].
    ("qwen2_5_vl", 1): '[{"bbox_2d": [64, 95, 223, 238], "label": "red car"}]',
    ("qwen2_5_vl", 3): (
        '[{"bbox_2d": [64, 95, 223, 238], "label": "red car"}, '
        '{"bbox_2d": [322, 238, 580, 471], "label": "blue \\"x\\" 车"}, '
        '{"bbox_2d": [0, 0, 643, 475], "label": "dog"}]'
    ),
    ("qwen3_vl", 1): '[{"bbox_2d": [100, 200, 346, 500], "label": "red car"}]',
    ("qwen3_vl", 3): (
        '[{"bbox_2d": [100, 200, 346, 500], "label": "red car"}, '
        '{"bbox_2d": [500, 500, 900, 990], "label": "blue \\"x\\" 车"}, '
        '{"bbox_2d": [0, 0, 1000, 1000], "label": "dog"}]'
    ),
    # Padded to a 644 x 644 square, 84 px above: y1 = (0.2 * 476 + 84) / 644 = 0.278.
    ("llava", 1): "red car [0.100, 0.278, 0.346, 0.500]",
    ("llava", 3): (
        "red car [0.100, 0.278, 0.346, 0.500]; "
        'blue "x" 车 [0.500, 0.500, 0.900, 0.862]; '
        "dog [0.000, 0.130, 1.000, 0.870]"
    ),
}
# The native style of the JSON families: how Qwen2.5-VL / Qwen3-VL answer zero-shot (their cookbooks print e.g.
# "```json\n[\n\t{\"point_2d\": [925, 618], \"label\": \"point_1\"}\n]\n```"): a fenced list, one object per line.
NATIVE = {
    ("qwen2_5_vl", 3): "```json\n[\n"
    '\t{"bbox_2d": [64, 95, 223, 238], "label": "red car"},\n'
    '\t{"bbox_2d": [322, 238, 580, 471], "label": "blue \\"x\\" 车"},\n'
    '\t{"bbox_2d": [0, 0, 643, 475], "label": "dog"}\n'
    "]\n```",
    ("qwen3_vl", 1): '```json\n[\n\t{"bbox_2d": [100, 200, 346, 500], "label": "red car"}\n]\n```',
}
REGIONS = {
    "qwen2_vl": "<|box_start|>(100,200),(346,500)<|box_end|>",
    "qwen2_5_vl": "[64, 95, 223, 238]",
    "qwen3_vl": "[100, 200, 346, 500]",
    "llava": "[0.100, 0.278, 0.346, 0.500]",
}


@pytest.mark.parametrize("family,count", sorted(GOLDEN))
def test_golden_answers(family, count):
    objects = ONE if count == 1 else THREE
    text = get_codec(family).format_answer(objects, MODEL_SIZE, "compact")
    assert text == GOLDEN[(family, count)]
    parsed = parse_answer(text)
    assert not parsed.failed
    assert parsed.refs == [obj.ref for obj in objects]
    if family in ("qwen2_vl", "llava"):  # one style: their native answer is this form
        assert get_codec(family).format_answer(objects, MODEL_SIZE, "native") == text


@pytest.mark.parametrize("family,count", sorted(NATIVE))
def test_golden_native_answers(family, count):
    objects = ONE if count == 1 else THREE
    text = get_codec(family).format_answer(objects, MODEL_SIZE)  # native is the default
    assert text == NATIVE[(family, count)]
    assert json.loads(text.removeprefix("```json\n").removesuffix("\n```")) == json.loads(GOLDEN[(family, count)])
    parsed = parse_answer(text)
    assert parsed.boxes == parse_answer(GOLDEN[(family, count)]).boxes
    assert parsed.refs == [obj.ref for obj in objects]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_golden_boxes_are_qwens_own(family):
    reference = qwen_reference_boxes(family)
    for style in ANSWER_STYLES:
        written = parse_answer(get_codec(family).format_answer(THREE, MODEL_SIZE, style)).boxes
        assert written == [tuple(float(v) for v in box) for box in reference]


def test_qwen2_5_vl_boxes_follow_qwens_converter_on_random_boxes():
    # Oracle: convert_to_qwen25vl_format's arithmetic (tests/qwen_reference.py) with qwen_vl_utils' smart_resize.
    from qwen_vl_utils import smart_resize

    codec, rng, ties = get_codec("qwen2_5_vl"), random.Random(7), 0
    for _ in range(3000):
        width, height = rng.randint(28, 3000), rng.randint(28, 3000)
        if max(width, height) / min(width, height) > 150:
            continue
        new_height, new_width = smart_resize(height, width, 28, 56 * 56, 14 * 14 * 4 * 1280)
        xs = sorted(rng.randint(0, width * 4) / 4 for _ in range(2))  # quarter pixels make exact .5 ties common
        ys = sorted(rng.randint(0, height * 4) / 4 for _ in range(2))
        box = [xs[0], ys[0], xs[1], ys[1]]
        ours = codec.encode_box(normalize_xyxy(box, (width, height)), (new_width, new_height))
        exact = convert_to_qwen25vl_format_exact(box, height, width, new_height, new_width)
        assert ours == exact, (box, width, height)
        literal = convert_to_qwen25vl_format(box, height, width, new_height, new_width)
        ties += literal != exact  # the notebook's float product fell an ulp to the other side of a .5 tie
    assert ties <= 3


def test_golden_regions_and_styles():
    for family, region in REGIONS.items():
        assert get_codec(family).format_region(ONE[0].box, MODEL_SIZE) == region
    with pytest.raises(ValueError, match="answer style 'fancy'"):
        get_codec("qwen3_vl").format_answer(ONE, MODEL_SIZE, "fancy")


def test_registry():
    assert set(CODECS) == {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava"}
    with pytest.raises(ValueError, match="qwen2_5_vl"):  # the message lists the known families
        get_codec("qwen2.5")
    with pytest.raises(ValueError, match="already registered"):
        register_codec(LlavaCodec())
    with pytest.raises(ValueError, match="at least one"):
        get_codec("qwen2_vl").format_answer([], MODEL_SIZE)


@pytest.mark.parametrize("style", ANSWER_STYLES)
@pytest.mark.parametrize("family", sorted(REGIONS))
def test_box_pattern_brackets_each_box(family, style):
    codec = get_codec(family)
    text = codec.format_answer(THREE, MODEL_SIZE, style)
    matches = list(re.finditer(codec.box_pattern, text))
    assert len(matches) == len(THREE)
    for match, obj in zip(matches, THREE):
        between = text[match.end("open") : match.start("close")]
        assert [float(v) for v in re.findall(r"[\d.]+", between)] == codec.encode_box(obj.box, MODEL_SIZE)


# ---------------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------------


def _tolerance(family: str, model_size: tuple[int, int]) -> tuple[float, float]:
    """Largest rounding error of a decoded box, in normalised units (x, y)."""
    width, height = model_size
    if family == "qwen2_5_vl":  # rounding, or the clamp of 1.0 to W' - 1
        return 1.0 / width, 1.0 / height
    if family == "llava":
        side = max(width, height)
        return 0.0005 * side / width, 0.0005 * side / height
    return 0.0005, 0.0005


def _random_box(rng: random.Random) -> tuple[float, float, float, float]:
    x1, x2 = sorted(rng.uniform(0, 1) for _ in range(2))
    y1, y2 = sorted(rng.uniform(0, 1) for _ in range(2))
    return x1, y1, x2, y2


@pytest.mark.parametrize("family", sorted(REGIONS))
def test_round_trip_random_boxes(family):
    codec = get_codec(family)
    rng = random.Random(family)
    for _ in range(200):
        model_size = (rng.randint(28, 3000), rng.randint(28, 3000))
        objects = [GroundedObject(f"thing {i}", _random_box(rng)) for i in range(rng.randint(1, 4))]
        parsed = parse_answer(codec.format_answer(objects, model_size))
        assert parsed.refs == [obj.ref for obj in objects]
        tol_x, tol_y = _tolerance(family, model_size)
        for written, obj in zip(parsed.boxes, objects, strict=True):
            assert written == tuple(codec.encode_box(obj.box, model_size))
            decoded = codec.decode_box(written, model_size)
            for got, want, tol in zip(decoded, obj.box, (tol_x, tol_y, tol_x, tol_y)):
                assert abs(got - want) <= tol + 1e-12, (family, model_size, obj.box, decoded)


REFS = st.text(alphabet="abcdefghij XYZ 0123456789车", min_size=1, max_size=12).map(str.strip).filter(bool)


@settings(max_examples=150, deadline=None)
@given(
    family=st.sampled_from(sorted(REGIONS)),
    refs=st.lists(REFS, min_size=1, max_size=4),
    width=st.integers(1, 5000),
    height=st.integers(1, 5000),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(family, refs, width, height, seed):
    rng = random.Random(seed)
    codec = get_codec(family)
    objects = [GroundedObject(ref, _random_box(rng)) for ref in refs]
    parsed = parse_answer(codec.format_answer(objects, (width, height)))
    assert parsed.refs == refs
    tol_x, tol_y = _tolerance(family, (width, height))
    for written, obj in zip(parsed.boxes, objects, strict=True):
        decoded = codec.decode_box(written, (width, height))
        for got, want, tol in zip(decoded, obj.box, (tol_x, tol_y, tol_x, tol_y)):
            assert abs(got - want) <= tol + 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------------------


def _check_shape(parsed: ParsedAnswer) -> None:
    assert isinstance(parsed, ParsedAnswer)
    assert len(parsed.boxes) == len(parsed.refs)
    assert parsed.failed == (len(parsed.boxes) == 0)
    assert all(len(box) == 4 and all(isinstance(v, float) for v in box) for box in parsed.boxes)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_never_raises_on_text(text):
    _check_shape(parse_answer(text))


@settings(max_examples=300, deadline=None)
@given(
    key=st.sampled_from(sorted(GOLDEN)),
    edits=st.lists(st.tuples(st.integers(0, 400), st.sampled_from(["del", "ins", "rep"]), st.text(max_size=3))),
    cut=st.integers(0, 400),
)
def test_parse_never_raises_on_mutated_answers(key, edits, cut):
    text = GOLDEN[key]
    for position, op, chunk in edits:
        position %= len(text) + 1
        if op == "del":
            text = text[:position] + text[position + 1 :]
        elif op == "ins":
            text = text[:position] + chunk + text[position:]
        else:
            text = text[:position] + chunk + text[position + len(chunk) :]
    _check_shape(parse_answer(text[:cut]))


@settings(max_examples=200, deadline=None)
@given(family=st.sampled_from(["qwen2_5_vl", "qwen3_vl"]), cut=st.integers(0, 10_000), fenced=st.booleans())
def test_truncated_json_keeps_complete_objects(family, cut, fenced):
    full = GOLDEN[(family, 3)]
    if fenced:
        full = f"```json\n{full}\n```"
    cut %= len(full) + 1
    text = full[:cut]
    complete = sum(1 for m in re.finditer(r"\}", full) if m.end() <= cut)
    expected = parse_answer(full)
    parsed = parse_answer(text)
    assert parsed.boxes[:complete] == expected.boxes[:complete]
    assert parsed.refs[:complete] == expected.refs[:complete]
    # Beyond the complete objects only a box written in full may appear (the one whose label was cut).
    assert len(parsed.boxes) <= complete + 1


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("fence", ["```json\n{}\n```", "```\n{}\n```", "Here you go:\n```json\n{}\n```\nDone."])
def test_fenced_json(family, fence):
    parsed = parse_answer(fence.format(GOLDEN[(family, 3)]))
    assert parsed.boxes == parse_answer(GOLDEN[(family, 3)]).boxes
    assert parsed.refs == [obj.ref for obj in THREE]


def test_skip_special_tokens_forms():
    stripped = re.sub(r"<\|[a-z_]+\|>", "", GOLDEN[("qwen2_vl", 3)])
    assert stripped.startswith("red car(100,200),(346,500)blue")
    parsed = parse_answer(stripped)
    assert parsed.boxes == [(100.0, 200.0, 346.0, 500.0), (500.0, 500.0, 900.0, 990.0), (0.0, 0.0, 1000.0, 1000.0)]
    assert parsed.refs == [obj.ref for obj in THREE]

    parsed = parse_answer("the red circle(120,340),(560,780)")
    assert parsed.boxes == [(120.0, 340.0, 560.0, 780.0)] and parsed.refs == ["the red circle"]
    parsed = parse_answer("<|box_start|>(1, 2), (3, 4)<|box_end|>")
    assert parsed.boxes == [(1.0, 2.0, 3.0, 4.0)] and parsed.refs == [None]


def test_parser_details():
    # Bare lists, int or float, several per answer; a box preceded by no words shares the previous ref.
    parsed = parse_answer("cars: [1, 2, 3, 4], [5.5, 6, 7, 8]; dog [0.1,0.2,0.3,0.4]")
    assert parsed.boxes == [(1.0, 2.0, 3.0, 4.0), (5.5, 6.0, 7.0, 8.0), (0.1, 0.2, 0.3, 0.4)]
    assert parsed.refs == ["cars", "cars", "dog"]
    # Reversed corners are returned as written; non-finite numbers drop the box.
    parsed = parse_answer("[30, 40, 10, 20] [1, 2, 3, 1e999] [1, 2, nan, 4]")
    assert parsed.boxes == [(30.0, 40.0, 10.0, 20.0)]
    # A JSON object without a label, and labels before the box key.
    parsed = parse_answer('[{"bbox_2d": [1, 2, 3, 4]}, {"label": "b", "bbox_2d": [5, 6, 7, 8]}]')
    assert parsed.refs == [None, "b"]
    # Nothing readable.
    for text in ["", "I cannot see any car.", "[1, 2, 3]", "(1,2)", '{"bbox_2d": [1, 2]}']:
        assert parse_answer(text).failed
    with pytest.raises(TypeError):
        parse_answer(None)
