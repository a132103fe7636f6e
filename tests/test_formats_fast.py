"""parse_answer's fast path (well-formed answers) against the full parser it stands in for, on generated texts."""

from __future__ import annotations

import random

import pytest
from llamafactory_vision.grounding.formats import (
    _FAST_PAIR,
    _FAST_PAIR_EXACT,
    ANSWER_STYLES,
    BOX_END,
    BOX_START,
    CODECS,
    OBJECT_REF_END,
    OBJECT_REF_START,
    GroundedObject,
    _parse_any,
    _parse_common,
    parse_answer,
)

SPECIAL_TOKENS = (OBJECT_REF_START, OBJECT_REF_END, BOX_START, BOX_END)
# Refs a model or a dataset may write, including every character the fast path treats specially.
REFS = (
    "car", "red car", "the man on the left", "车", "  padded  ", "", " ", "a; b", "x\ny", "tab\there", "(left)", "[x]",
    "{y}", 'say "hi"', "it's", "back\\slash", "a<b", "bbox_2d", "1, 2, 3, 4", "-", "car:", "…", "\u2028", "\x1f",
)  # fmt: skip
# Characters and pieces that decide between the forms, for random texts and edits.
PIECES = (
    *SPECIAL_TOKENS, "(", ")", "[", "]", "{", "}", ",", ", ", ".", "-", "+", "e", "E", "0", "1", "12", "999", "1e999",
    " ", "\n", "\t", ";", ":", '"', "'", "\\", "bbox_2d", '"bbox_2d": ', '"label": ', "```json\n", "\n```", "car",
    "<|im_end|>", "<", "|", ">", "٣",
)  # fmt: skip


def _objects(rng: random.Random, count: int) -> list[GroundedObject]:
    objects = []
    for _ in range(count):
        x1, y1 = rng.random(), rng.random()
        box = (x1, y1, min(1.0, x1 + rng.random()), min(1.0, y1 + rng.random()))
        objects.append(GroundedObject(rng.choice(REFS), box))
    return objects


def _answers(rng: random.Random) -> list[str]:
    """Every codec's answers in every style, and the same with special tokens stripped (skip_special_tokens)."""
    texts = []
    for codec in CODECS.values():
        for style in ANSWER_STYLES:
            size = (rng.randrange(28, 2000), rng.randrange(28, 2000))
            text = codec.format_answer(_objects(rng, rng.randrange(1, 4)), size, style)
            texts.append(text)
            for token in SPECIAL_TOKENS:
                text = text.replace(token, "")
            texts.append(text)
    return texts


def _variants(rng: random.Random, text: str) -> list[str]:
    """Truncations, wrappings and random edits of ``text``."""
    cut = rng.randrange(len(text) + 1)
    wrapped = rng.choice(("", "Sure. ", "```json\n", "[", "{", "(", "answer:\n")) + text
    wrapped += rng.choice(("", ".", "\n```", "]", "}", ")", " (1,2),(3,4)", " [1, 2, 3, 4]", "<|im_end|>"))
    edited = list(text)
    for _ in range(rng.randrange(1, 4)):
        at = rng.randrange(len(edited) + 1)
        action = rng.randrange(3)
        if action == 0:
            edited.insert(at, rng.choice(PIECES))
        elif edited:
            index = min(at, len(edited) - 1)
            if action == 1:
                del edited[index]
            else:
                edited[index] = rng.choice(PIECES)
    return [text[:cut], text[cut:], wrapped, "".join(edited)]


def _numbers(rng: random.Random) -> str:
    return rng.choice(
        ("12", "-3", "0.5", "-0.25", ".5", "5.", "+7", "1e3", "1E-2", "1e999", "0" * 20, "9" * 16, "007")
    )


def _hand_written(rng: random.Random) -> list[str]:
    """Boxes written by hand: odd numbers, spacing, nesting, missing refs and several boxes."""
    n = [_numbers(rng) for _ in range(8)]
    sp = rng.choice(("", " ", "  ", "\n", "\t"))
    return [
        f"{rng.choice(REFS)}({n[0]},{sp}{n[1]}),{sp}({n[2]},{n[3]}){sp}and ({n[4]},{n[5]}),({n[6]},{n[7]})",
        f"{BOX_START}{sp}({n[0]},{n[1]}),({n[2]},{n[3]}){sp}{BOX_END}{BOX_START}({n[4]},{n[5]}),({n[6]},{n[7]})",
        (
            f'[{{"bbox_2d": [{n[0]}, {n[1]}, {n[2]}, {n[3]}]{sp}}}, {{"label": "{rng.choice(REFS)}", "bbox_2d": '
            f"[{n[4]},{n[5]},{n[6]},{n[7]}]}}]"
        ),
        f'{{"objects": [{{"bbox_2d": [{n[0]}, {n[1]}, {n[2]}, {n[3]}], "label": "a", "parts": [{{"label": "b"}}]}}]}}',
        f"{rng.choice(REFS)} [{n[0]}, {n[1]}, {n[2]}, {n[3]}], [{n[4]},{sp}{n[5]}, {n[6]}, {n[7]}]; {rng.choice(REFS)}",
        f"{rng.choice(REFS)}: [[{n[0]}, {n[1]}, {n[2]}, {n[3]}]]",
        "".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 30))),
    ]


def generated_texts(seed: int, rounds: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(rounds):
        for text in _answers(rng) + _hand_written(rng):
            texts.append(text)
            texts.extend(_variants(rng, text))
    return texts


@pytest.mark.parametrize("seed", range(3))
def test_fast_path_equals_full_parser(seed):
    texts = generated_texts(seed, rounds=40)
    fast = 0
    for text in texts:
        expected = _parse_any(text)
        assert parse_answer(text) == expected, text
        parsed = _parse_common(text)
        if parsed is not None:
            assert parsed == expected, text
            fast += parsed.boxes != []
    # The comparison means something only if the fast path read many of the texts itself.
    assert fast > len(texts) // 8, (fast, len(texts))


def test_exact_pair_pattern_is_the_general_one_where_it_matches():
    """The no-space Qwen2-VL pattern, tried first, must match what the general fast pattern matches, group for group."""
    matched = 0
    for text in generated_texts(7, rounds=20):
        for pos in range(len(text)):
            exact = _FAST_PAIR_EXACT.match(text, pos)
            if exact is not None:
                general = _FAST_PAIR.match(text, pos)
                assert general is not None and general.span() == exact.span(), text
                assert general.groups() == exact.groups(), text
                matched += 1
    assert matched > 1000


@pytest.mark.parametrize("family", sorted(CODECS))
@pytest.mark.parametrize("style", ANSWER_STYLES)
def test_fast_path_reads_every_codecs_answers(family, style):
    """Well-formed answers with plain refs never fall back to the full parser, with or without special tokens."""
    rng = random.Random(family)
    for _ in range(50):
        objects = [GroundedObject(rng.choice(("car", "red car", "车", "man: left")), o.box) for o in _objects(rng, 3)]
        text = CODECS[family].format_answer(objects, (rng.randrange(28, 2000), rng.randrange(28, 2000)), style)
        for candidate in (text, text.replace(OBJECT_REF_START, "").replace(OBJECT_REF_END, "")):
            parsed = _parse_common(candidate)
            assert parsed is not None and parsed == _parse_any(candidate), candidate
            assert (
                parsed.refs == [o.ref for o in objects] or family == "qwen2_vl" and OBJECT_REF_START not in candidate
            )


def test_fast_path_boundaries():
    """The cases where the fast path must step aside or keep the full parser's answer (each compared with it)."""
    cases = {
        "car (1,2),(3,4)": True,
        "car (1,2),(3,4) (5,6),(7,8)": True,  # no words between: the second box shares "car"
        "a; b (1,2),(3,4)": True,  # the clause after ';' names the box
        "car (left) (1,2),(3,4)": False,  # a '(' in free text: full parser
        "car (1e3,2),(3,4)": False,  # exponent
        "car (1,2),(3,4) [5, 6, 7, 8]": False,  # two forms
        "x (1,2),(3,4)" + "9" * 16: True,  # digits in the tail are not a box
        f"car ({'9' * 16},2),(3,4)": False,  # too many digits for the fast path
        '[{"bbox_2d": [1, 2, 3, 4], "label": "a\\"b"}]': False,  # an escape in the label
        '[{"label": "a", "bbox_2d": [1, 2, 3, 4]}]': False,  # key order
        '[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6': False,  # truncated
        "plain text without boxes": True,
        "": True,
    }
    for text, fast in cases.items():
        parsed = _parse_common(text)
        assert (parsed is not None) == fast, text
        assert parse_answer(text) == _parse_any(text), text
