"""Draw&Guess (``stroke_guess``): rendering, bbox corners, square padding, the converter's errors, the plugin's
pixels and the answer metrics, each against hand-computed values or the HF processor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from llamafactory_vision.strokes import render
from llamafactory_vision.strokes.metrics import guess_scores, load_synonyms, normalize_answer
from PIL import Image


def test_stroke_mask_pixels_and_bbox_corners_by_hand():
    # A horizontal stroke from pixel (2, 3) to (6, 3), 1 px wide, on a 10 x 8 image: exactly row 3, columns 2..6.
    mask = render.strokes_mask([[[2, 3], [6, 3]]], (10, 8), width=1)
    expected = np.zeros((8, 10), bool)
    expected[3, 2:7] = True
    np.testing.assert_array_equal(mask, expected)
    bbox = render.stroke_bbox(mask)
    assert bbox == (2, 3, 7, 4)  # pixel edges
    assert render.normalized_corners(bbox, (10, 8)) == (0.2, 0.375, 0.7, 0.5)
    # A 3 px brush around one point is the 3 x 3 block (round cap of radius 1 covers the 4-neighbours and corners).
    dot = render.strokes_mask([[[5, 4]]], (10, 8), width=3)
    assert render.stroke_bbox(dot) == (4, 3, 7, 6)
    assert dot[4, 5] and dot[3, 5] and dot[5, 5] and dot[4, 4] and dot[4, 6]
    assert dot.sum() <= 9


@pytest.mark.parametrize(("grey", "painted"), [(230, 0), (205, 0), (204, 255), (100, 255)])
def test_guess_paints_black_above_0_8_brightness_else_white(grey, painted):
    # 205/255 = 0.804 > 0.8 -> black; 204/255 = 0.8 exactly is not above -> white.
    image = np.full((8, 10, 3), grey, np.uint8)
    image[0, 0] = (0, 0, 0)  # outside the mask: must not influence the mean, must stay as is
    mask = np.zeros((8, 10), bool)
    mask[3, 2:7] = True
    out = render.paint_guess(image, mask)
    assert (out[mask] == painted).all()
    np.testing.assert_array_equal(out[~mask], image[~mask])
    assert image[3, 2, 0] == grey  # the input is not modified


def test_contour_is_the_outer_ring_in_red():
    mask = np.zeros((9, 9), bool)
    mask[3:6, 3:6] = True
    image = np.full((9, 9, 3), 50, np.uint8)
    thin = render.paint_contour(image, mask, width=1)
    ring = mask.copy()
    ring[4, 4] = False  # the 3 x 3 block's boundary is its 8 outer pixels
    assert (thin[ring] == (255, 0, 0)).all()
    assert (thin[~ring] == 50).all()
    thick = render.paint_contour(image, mask, width=3)  # one pixel either side of the ring: the 5 x 5 block
    band = np.zeros((9, 9), bool)
    band[2:7, 2:7] = True
    assert (thick[band] == (255, 0, 0)).all()
    assert (thick[~band] == 50).all()


def test_expand2square_by_hand():
    tall = Image.fromarray(np.arange(2 * 4 * 3, dtype=np.uint8).reshape(4, 2, 3))  # W=2, H=4
    out = np.asarray(render.expand2square(tall, (9, 8, 7)))
    assert out.shape == (4, 4, 3)
    np.testing.assert_array_equal(out[:, 1:3], np.asarray(tall))  # (4 - 2) // 2 = 1 column on the left
    assert (out[:, 0] == (9, 8, 7)).all() and (out[:, 3] == (9, 8, 7)).all()
    wide = Image.fromarray(np.full((2, 3, 3), 200, np.uint8))  # W=3, H=2: one pad row, after (offset (3-2)//2 = 0)
    out = np.asarray(render.expand2square(wide, (1, 2, 3)))
    assert (out[:2] == 200).all() and (out[2] == (1, 2, 3)).all()
    # LLaVA pads with int(mean * 255) of the CLIP mean (0.48145466, 0.4578275, 0.40821073).
    assert render.mean_colour((0.48145466, 0.4578275, 0.40821073)) == (122, 116, 104)


def test_plugin_pads_to_square_before_the_clip_processor(tiny_models, tmp_path):
    """The llava_strokes plugin's pixels equal the HF processor on a hand-padded image; the stock llava plugin's
    (centre crop) differ, so the test can fail."""
    from llamafactory.data.template import TEMPLATES
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_models["llava"]), local_files_only=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(20, 48, 3), dtype=np.uint8)  # W=48, H=20
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)
    padded = np.empty((48, 48, 3), np.uint8)
    padded[:] = (122, 116, 104)
    padded[14:34] = pixels  # (48 - 20) // 2 = 14 rows above
    expected = processor.image_processor(Image.fromarray(padded), return_tensors="pt")["pixel_values"]
    ours = TEMPLATES["llava_strokes"].mm_plugin.get_mm_inputs([str(path)], [], [], [1], [0], [0], [[0]], processor)
    stock = TEMPLATES["llava"].mm_plugin.get_mm_inputs([str(path)], [], [], [1], [0], [0], [[0]], processor)
    np.testing.assert_allclose(ours["pixel_values"].numpy(), expected.numpy(), atol=1e-6)
    assert not np.allclose(stock["pixel_values"].numpy(), expected.numpy(), atol=1e-3)


def _write_rows(tmp_path: Path, rows: list[dict]) -> Path:
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = {"d": {"file_name": "d.jsonl", "formatting": "stroke_guess"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    return tmp_path


def _convert(tmp_path: Path, rows: list[dict]):
    from llamafactory_vision.hparams import VisionDataArguments
    from llamafactory_vision.strokes.data import StrokeGuessDatasetConverter
    from llamafactory_vision.strokes.dataset_attr import StrokeDatasetAttr

    _write_rows(tmp_path, rows)
    data_args = VisionDataArguments(template="llava_strokes", dataset_dir=str(tmp_path),
                                    stroke_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    attr = StrokeDatasetAttr("file", dataset_name="d")
    attr.join({"formatting": "stroke_guess"})
    converter = StrokeGuessDatasetConverter(attr, data_args)
    return [converter(row, index) for index, row in enumerate(rows)]


@pytest.fixture()
def picture(tmp_path) -> str:
    Image.fromarray(np.full((8, 10, 3), 230, np.uint8)).save(tmp_path / "p.png")
    Image.fromarray(np.zeros((8, 10), np.uint8)).save(tmp_path / "empty_mask.png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "small_mask.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    return "p.png"


def test_converter_renders_and_writes_corners(tmp_path, picture):
    row = {"image": picture, "strokes": [[[2, 3], [6, 3]]], "stroke_width": 1, "answer": "line"}
    (out,) = _convert(tmp_path, [row])
    prompt = out["_prompt"][0]["content"]
    assert prompt.startswith("<image>\n")
    assert "(0.200, 0.375)" in prompt and "(0.700, 0.500)" in prompt
    assert out["_response"] == [{"role": "assistant", "content": "line"}]
    rendered = np.asarray(Image.open(out["_images"][0]))
    assert (rendered[3, 2:7] == 0).all() and (rendered[4] == 230).all()  # bright image -> black sketch


@pytest.mark.parametrize(
    ("row", "field", "text"),
    [
        ({"strokes": []}, "strokes", "non-empty list of strokes"),
        ({"strokes": [[]]}, "strokes[0]", "non-empty list"),
        ({"strokes": [[[1, 1], [10, 3]]]}, "strokes[0][1]", "outside the 10x8 image"),
        ({"strokes": [[[1, "a"]]]}, "strokes[0][0]", "2 finite numbers"),
        ({"stroke_mask": "broken.png"}, "stroke_mask", "cannot read mask"),
        ({"stroke_mask": "missing.png"}, "stroke_mask", "not found"),
        ({"stroke_mask": "empty_mask.png"}, "stroke_mask", "no stroked pixel"),
        ({"stroke_mask": "small_mask.png"}, "stroke_mask", "mask is 5x5, the image 10x8"),
        ({}, "strokes", "no `strokes` and no `stroke_mask`"),
        ({"strokes": [[[1, 1]]], "task": "draw"}, "task", "unknown task"),
        ({"strokes": [[[1, 1]]], "answer": " "}, "answer", "non-empty string"),
        ({"strokes": [[[1, 1]]], "stroke_width": 0}, "stroke_width", "int >= 1"),
    ],
)
def test_bad_rows_name_dataset_row_and_field(tmp_path, picture, row, field, text):
    good = {"image": picture, "answer": "cat", "strokes": [[[1, 1]]]}
    rows = [good, {"image": picture, "answer": "cat", **row}]
    with pytest.raises(ValueError, match=r"stroke_guess dataset 'd', row 1 \(counting from 0\), field `" + field.replace("[", r"\[")
                       .replace("]", r"\]") + "`: .*" + text):  # fmt: skip
        _convert(tmp_path, rows)


def test_answer_metrics_on_hand_cases(tmp_path):
    assert normalize_answer("  The Cats. ") == "cat"
    assert normalize_answer("a bus") == "bus" and normalize_answer("boxes") == "box"
    assert normalize_answer("butterflies!") == "butterfly"
    pairs = [
        ("Cat.", "cat"),  # exact (case, end punctuation)
        ("a cat", "cat"),  # article: accurate, not exact
        ("cats", "cat"),  # plural: accurate, not exact
        ("automobile", "car"),  # synonym only with the file
        ("dog", "cat"),  # wrong
    ]
    assert guess_scores(pairs) == {"n": 5, "exact_match": 0.2, "accuracy": 0.6}
    syn = tmp_path / "syn.json"
    syn.write_text(json.dumps({"car": ["automobile", "auto"]}))
    assert guess_scores(pairs, load_synonyms(syn)) == {"n": 5, "exact_match": 0.2, "accuracy": 0.8}
    assert guess_scores([]) == {"n": 0, "exact_match": 0.0, "accuracy": 0.0}
    syn.write_text(json.dumps([["car", "auto"], ["vehicle", "auto"]]))
    with pytest.raises(ValueError, match="two synonym groups"):
        load_synonyms(syn)


def test_chat_inputs_match_the_training_row(tmp_path, picture):
    """A chat caller gets the same rendered picture and prompt as the converter gives a training row."""
    from llamafactory_vision.strokes.data import chat_inputs

    row = {"image": picture, "strokes": [[[2, 3], [6, 3], [6, 6]]], "stroke_width": 2, "answer": "hook"}
    (out,) = _convert(tmp_path, [row])
    mask = render.strokes_mask(row["strokes"], (10, 8), width=2)
    image, prompt = chat_inputs(Image.open(tmp_path / picture), mask, "guess", width=2, key="p.png|guess|hook")
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(out["_images"][0])))
    assert prompt == out["_prompt"][0]["content"]


def test_stroke_template_refuses_a_non_llava_model(tiny_models, tmp_path, picture):
    from conftest import run_cli, train_config, write_yaml

    _write_rows(tmp_path, [{"image": picture, "strokes": [[[1, 1]]], "answer": "dot"}])
    config = train_config(tiny_models["qwen2_vl"], tmp_path, tmp_path / "out", "llava_strokes", dataset="d")
    result = run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "c.yaml", config))], tmp_path, check=False)
    assert result.returncode != 0
    assert "template 'llava_strokes' pads images the LLaVA-1.5 way and needs a model of type llava" in result.stderr
