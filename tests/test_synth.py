"""Synthetic grounding scenes: determinism, tight boxes, box formats, size coverage, refs, dataset_info merge."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from llamafactory_vision.boxes import to_xyxy
from llamafactory_vision.synth import (
    BBOX_FORMATS,
    COLOURS,
    PRESETS,
    SHAPES,
    encode_box,
    generate_grounding,
    main,
    make_scene,
)
from PIL import Image

# The varied preset on a plain background: every non-background pixel is a shape pixel.
PLAIN_VARIED = dataclasses.replace(PRESETS["varied"], backgrounds=("plain",))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def varied(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("varied")
    return out, generate_grounding(out, n=20, seed=7, val_frac=0.2, preset="varied")


def test_same_seed_same_bytes(varied: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = varied
    generate_grounding(tmp_path / "again", n=20, seed=7, val_frac=0.2, preset="varied")
    assert _all_files(out) == _all_files(tmp_path / "again")
    generate_grounding(tmp_path / "other", n=20, seed=8, val_frac=0.2, preset="varied")
    assert _all_files(out)["ground_train.jsonl"] != _all_files(tmp_path / "other")["ground_train.jsonl"]


def test_layout_split_and_relative_paths(varied: tuple[Path, dict]) -> None:
    out, summary = varied
    train, val = _rows(out / "ground_train.jsonl"), _rows(out / "ground_val.jsonl")
    assert (summary["n_train"], summary["n_val"]) == (len(train), len(val)) == (16, 4)
    paths = [row["images"][0] for row in train + val]
    assert len(set(paths)) == 20
    # LLaMA-Factory's converter joins each path with media_dir (= dataset_dir by default) and keeps it if it exists.
    assert all(not Path(p).is_absolute() and (out / p).is_file() for p in paths)
    info = json.loads((out / "dataset_info.json").read_text())
    assert info == {
        name: {"file_name": file, "formatting": "grounding", "columns": {"images": "images", "objects": "objects"}}
        for name, file in (("synth_ground_train", "ground_train.jsonl"), ("synth_ground_val", "ground_val.jsonl"))
    }


def test_varied_covers_extreme_sizes_tasks_and_formats(varied: tuple[Path, dict]) -> None:
    out, _ = varied
    rows = _rows(out / "ground_train.jsonl") + _rows(out / "ground_val.jsonl")
    sizes = [Image.open(out / row["images"][0]).size for row in rows]
    assert any(w <= 64 and h <= 48 for w, h in sizes), "tiny"
    assert any(w / h >= 7 for w, h in sizes), "very wide"
    assert any(h / w >= 7 for w, h in sizes), "very tall"
    assert any(w * h > 768 * 768 for w, h in sizes), "larger than 768*768"
    assert {row["task"] for row in rows} == {"rec", "reg", "detect"}
    assert {row["bbox_format"] for row in rows} == set(BBOX_FORMATS)
    assert max(len(row["objects"]) for row in rows) > 1
    for row in rows:
        assert 1 <= len(row["objects"]) <= 4
        if row["task"] == "detect":
            assert {obj["ref"] for obj in row["objects"]} <= set(SHAPES)
            assert len({obj["ref"] for obj in row["objects"]}) == 1


def test_boxes_inside_image_for_every_row(varied: tuple[Path, dict]) -> None:
    out, _ = varied
    for row in _rows(out / "ground_train.jsonl") + _rows(out / "ground_val.jsonl"):
        width, height = Image.open(out / row["images"][0]).size
        for obj in row["objects"]:
            x1, y1, x2, y2 = to_xyxy(obj["bbox"], row["bbox_format"])
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height


@pytest.mark.parametrize("seed", range(40))
def test_scene_boxes_are_tight_on_plain_background(seed: int) -> None:
    preset_sizes = PLAIN_VARIED.size_classes
    scene = make_scene(np.random.default_rng(seed), PLAIN_VARIED, preset_sizes[seed % len(preset_sizes)])
    pixels = np.asarray(scene.image)
    height, width = pixels.shape[:2]
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        is_colour = (pixels == COLOURS[obj.colour]).all(axis=-1)
        # Every pixel of this colour lies in the box of some object of this colour ...
        same_colour = np.zeros_like(is_colour)
        for other in scene.objects:
            if other.colour == obj.colour:
                ox1, oy1, ox2, oy2 = other.box
                same_colour[oy1:oy2, ox1:ox2] = True
        assert not (is_colour & ~same_colour).any()
        # ... and each side of the box touches a pixel of the shape.
        inside = is_colour[y1:y2, x1:x2]
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


def test_written_boxes_of_every_format_are_tight(tmp_path: Path) -> None:
    generate_grounding(tmp_path, n=25, seed=3, val_frac=0.0, preset=PLAIN_VARIED)
    rows = _rows(tmp_path / "ground_train.jsonl")
    assert {row["bbox_format"] for row in rows} == set(BBOX_FORMATS)
    shape_colours = np.array(list(COLOURS.values()))
    for row in rows:
        pixels = np.asarray(Image.open(tmp_path / row["images"][0]).convert("RGB"))
        is_shape = (pixels[:, :, None, :] == shape_colours).all(axis=-1).any(axis=-1)
        for obj in row["objects"]:
            x1, y1, x2, y2 = (int(v) for v in to_xyxy(obj["bbox"], row["bbox_format"]))
            inside = is_shape[y1:y2, x1:x2]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            # A one-pixel ring around the box holds no pixel of this shape (shapes keep a 2 px gap).
            ring = is_shape[max(y1 - 1, 0) : y2 + 1, max(x1 - 1, 0) : x2 + 1].sum()
            assert ring == inside.sum()


@pytest.mark.parametrize("box", [(0, 0, 1, 1), (3, 5, 40, 9), (10, 20, 1600, 90), (7, 1, 8, 1100)])
def test_every_format_decodes_to_the_same_xyxy(box: tuple[int, int, int, int]) -> None:
    for fmt in BBOX_FORMATS:
        assert to_xyxy(encode_box(box, fmt), fmt) == tuple(float(v) for v in box)


def _oracle_position(box: tuple[int, int, int, int], size: tuple[int, int]) -> str:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    horizontal = "left" if cx < size[0] / 3 else "right" if cx > 2 * size[0] / 3 else ""
    vertical = "top" if cy < size[1] / 3 else "bottom" if cy > 2 * size[1] / 3 else ""
    if vertical and horizontal:
        return f"at the {vertical} {horizontal}"
    if vertical or horizontal:
        return f"at the {vertical}" if vertical else f"on the {horizontal}"
    return "in the middle"


def _oracle_size(i: int, areas: list[int]) -> str:
    others = areas[:i] + areas[i + 1 :]
    if others and areas[i] >= 2 * max(others):
        return "large"
    if others and 2 * areas[i] <= min(others):
        return "small"
    return ""


def _matches(ref: str, obj, size_word: str, position: str) -> bool:
    words = ref.split(" ")
    assert words[0] == "the"
    rest = words[1:]
    if rest and rest[0] in ("small", "large") and rest.pop(0) != size_word:
        return False
    if rest and rest[0] in COLOURS and rest.pop(0) != obj.colour:
        return False
    if not rest or rest.pop(0) != obj.shape:
        return False
    return not rest or " ".join(rest) == position


@pytest.mark.parametrize("seed", range(30))
def test_refs_are_true_and_unambiguous(seed: int) -> None:
    scene = make_scene(np.random.default_rng(seed), PRESETS["varied"], "normal")
    areas = [(o.box[2] - o.box[0]) * (o.box[3] - o.box[1]) for o in scene.objects]
    facts = [(_oracle_size(i, areas), _oracle_position(o.box, scene.image.size)) for i, o in enumerate(scene.objects)]
    for target in scene.objects:
        matched = [o for o, (size, pos) in zip(scene.objects, facts) if _matches(target.ref, o, size, pos)]
        assert matched == [target], target.ref


def test_demo_preset_is_learnable(tmp_path: Path) -> None:
    summary = generate_grounding(tmp_path, n=12, seed=0, preset="demo")
    assert summary["tasks"] == {"rec": 12}
    for row in _rows(tmp_path / "ground_train.jsonl") + _rows(tmp_path / "ground_val.jsonl"):
        assert row["task"] == "rec" and row["bbox_format"] == "xyxy" and len(row["objects"]) == 1
        width, height = Image.open(tmp_path / row["images"][0]).size
        assert 0.7 <= width / height <= 1.4 and max(width, height) <= 160 and min(width, height) >= 65
        x1, y1, x2, y2 = row["objects"][0]["bbox"]
        assert 0.25 * min(width, height) <= max(x2 - x1, y2 - y1) <= 0.75 * min(width, height)
        colour, shape = row["objects"][0]["ref"].split(" ")[1:]
        assert colour in ("green", "yellow", "cyan") and shape in ("circle", "square", "triangle")


def test_dataset_info_is_merged_not_overwritten(tmp_path: Path) -> None:
    other = {"file_name": "mine.json", "formatting": "sharegpt"}
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": other, "synth_ground_train": {"stale": 1}}))
    assert main(["grounding", "--out", str(tmp_path), "--n", "3", "--seed", "1", "--preset", "demo"]) == 0
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info["mine"] == other
    assert info["synth_ground_train"]["file_name"] == "ground_train.jsonl"
    assert info["synth_ground_val"]["file_name"] == "ground_val.jsonl"


def test_no_val_file_without_split_and_max_objects(tmp_path: Path) -> None:
    summary = generate_grounding(tmp_path, n=8, seed=2, val_frac=0.0, preset="varied", max_objects=1)
    assert summary["val_file"] is None and summary["datasets"] == ["synth_ground_train"]
    assert not (tmp_path / "ground_val.jsonl").exists()
    rows = _rows(tmp_path / "ground_train.jsonl")
    assert len(rows) == 8 and all(len(row["objects"]) == 1 for row in rows)


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"n": 0}, "n"), ({"val_frac": 1.0}, "val_frac"), ({"preset": "nope"}, "preset")]
)
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        generate_grounding(tmp_path, **{"n": 2, **kwargs})
