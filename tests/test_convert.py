"""COCO / RefCOCO -> grounding jsonl conversion on small handmade fixtures."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from llamafactory_vision.boxes import to_xyxy
from llamafactory_vision.cli import main as cli_main
from llamafactory_vision.grounding.convert import (
    ConvertStats,
    convert_coco,
    convert_refcoco,
)
from PIL import Image

INSTANCES = {
    "images": [
        {"id": 1, "file_name": "a.jpg", "width": 640, "height": 480},
        {"id": 2, "file_name": "b.jpg", "width": 100, "height": 50},
        {"id": 3, "file_name": "empty.jpg", "width": 10, "height": 10},
    ],
    "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
    "annotations": [
        {"id": 10, "image_id": 1, "category_id": 18, "bbox": [10, 20, 30, 40], "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [100.5, 50.25, 60, 120], "iscrowd": 0},
        {"id": 12, "image_id": 1, "category_id": 18, "bbox": [300, 200, 50, 60], "iscrowd": 0},
        {"id": 13, "image_id": 1, "category_id": 1, "bbox": [0, 0, 640, 480], "iscrowd": 1},
        {"id": 14, "image_id": 2, "category_id": 1, "bbox": [90, 10, 20.3, 10]},  # reaches past x = 100
        {"id": 15, "image_id": 2, "category_id": 18, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # no width
        {"id": 16, "image_id": 3, "category_id": 1, "bbox": [1, 1, 2, 2], "iscrowd": 1},
    ],
}

REFS = [
    {"ref_id": 0, "ann_id": 11, "image_id": 1, "split": "train", "sentences": [{"sent": "man in red"}]},
    {
        "ref_id": 1,
        "ann_id": 12,
        "image_id": 1,
        "split": "val",
        "sentences": [{"sent": "dog on the right"}, {"sent": "  "}, {"sent": "brown dog"}],
    },
    {"ref_id": 2, "ann_id": 14, "image_id": 2, "split": "testA", "sentences": [{"sent": "person at the edge"}]},
]


@pytest.fixture()
def imgs(tmp_path: Path) -> str:
    """The images of INSTANCES, at the sizes its records give, in ``tmp_path/imgs``."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for record in INSTANCES["images"]:
        Image.new("RGB", (record["width"], record["height"])).save(folder / record["file_name"])
    return str(folder)


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_coco_rows_group_boxes_by_image_and_category(tmp_path: Path, imgs: str) -> None:
    instances = _write(tmp_path / "instances.json", INSTANCES)
    stats = convert_coco(instances, imgs, tmp_path / "out" / "coco.jsonl")
    rows = _rows(tmp_path / "out" / "coco.jsonl")
    assert rows[:2] == [
        {
            "images": ["../imgs/a.jpg"],
            "objects": [{"ref": "dog", "bbox": [10, 20, 30, 40]}, {"ref": "dog", "bbox": [300, 200, 50, 60]}],
            "bbox_format": "xywh",
            "task": "detect",
        },
        {
            "images": ["../imgs/a.jpg"],
            "objects": [{"ref": "person", "bbox": [100.5, 50.25, 60, 120]}],
            "bbox_format": "xywh",
            "task": "detect",
        },
    ]
    # The box reaching past the right edge is clipped to x2 <= 100 exactly (as the grounding format checks it).
    assert rows[2]["images"] == ["../imgs/b.jpg"] and rows[2]["objects"][0]["ref"] == "person"
    x1, y1, x2, y2 = to_xyxy(rows[2]["objects"][0]["bbox"], "xywh")
    assert (x1, y1, y2) == (90, 10, 20) and 99.99 < x2 <= 100
    assert len(rows) == 3
    assert stats == ConvertStats(
        rows=3, images=2, objects=4, skipped_crowd=2, skipped_degenerate=1, clipped=1, skipped_empty_sentences=0
    )


def test_refcoco_rows_one_per_sentence(tmp_path: Path, imgs: str) -> None:
    instances = _write(tmp_path / "instances.json", INSTANCES)
    refs = _write(tmp_path / "refs.json", REFS)
    stats = convert_refcoco(refs, instances, imgs, tmp_path / "ref.jsonl")
    rows = _rows(tmp_path / "ref.jsonl")
    assert [(row["objects"][0]["ref"], row["images"][0]) for row in rows] == [
        ("man in red", "imgs/a.jpg"),
        ("dog on the right", "imgs/a.jpg"),
        ("brown dog", "imgs/a.jpg"),
        ("person at the edge", "imgs/b.jpg"),
    ]
    assert rows[1] == {
        "images": ["imgs/a.jpg"],
        "objects": [{"ref": "dog on the right", "bbox": [300, 200, 50, 60]}],
        "bbox_format": "xywh",
        "task": "rec",
    }
    assert stats.rows == 4 and stats.images == 2 and stats.skipped_empty_sentences == 1 and stats.clipped == 1


def test_refcoco_split_filter(tmp_path: Path, imgs: str) -> None:
    instances = _write(tmp_path / "instances.json", INSTANCES)
    refs = _write(tmp_path / "refs.json", REFS)
    convert_refcoco(refs, instances, imgs, tmp_path / "val.jsonl", split="val")
    assert [row["objects"][0]["ref"] for row in _rows(tmp_path / "val.jsonl")] == ["dog on the right", "brown dog"]
    with pytest.raises(ValueError, match=r"split='testC'.*testA"):
        convert_refcoco(refs, instances, imgs, tmp_path / "x.jsonl", split="testC")


def test_pickled_refs_need_the_flag(tmp_path: Path, imgs: str) -> None:
    instances = _write(tmp_path / "instances.json", INSTANCES)
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(pickle.dumps(REFS, protocol=2))
    with pytest.raises(ValueError, match="allow-pickle"):
        convert_refcoco(refs, instances, imgs, tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()
    # Content decides too: a pickle renamed to .json is still refused.
    disguised = tmp_path / "refs.json"
    disguised.write_bytes(refs.read_bytes())
    with pytest.raises(ValueError, match="allow_pickle=True"):
        convert_refcoco(disguised, instances, imgs, tmp_path / "x.jsonl")
    stats = convert_refcoco(refs, instances, imgs, tmp_path / "x.jsonl", split="train", allow_pickle=True)
    assert stats.rows == 1 and _rows(tmp_path / "x.jsonl")[0]["objects"][0]["ref"] == "man in red"
    # protocol 0, as the original Python 2 files: loads the same
    protocol0 = tmp_path / "refs0.p"
    protocol0.write_bytes(pickle.dumps(REFS, protocol=0))
    assert convert_refcoco(protocol0, instances, imgs, tmp_path / "y.jsonl", split="train", allow_pickle=True).rows == 1


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_would_run_code_is_refused_before_it_runs(
    tmp_path: Path, imgs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even with the flag: a pickle naming any global (here ``os.system``, the classic exploit) is refused while
    loading, before the call is built, and nothing runs."""
    instances = _write(tmp_path / "instances.json", INSTANCES)
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(pickle.dumps([_RunsCode()], protocol=2))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p: the pickle names `(posix|os)\.system`"):
        convert_refcoco(refs, instances, imgs, tmp_path / "x.jsonl", allow_pickle=True)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda d: d["annotations"][1].pop("bbox"), r"instances\.json: annotations\[1\]\.bbox: missing field"),
        (lambda d: d["annotations"][2].update(bbox=[1, 2, 3]), r"annotations\[2\]\.bbox.*4 numbers"),
        (lambda d: d["annotations"][0].update(bbox=[1, "x", 3, 4]), r"annotations\[0\]\.bbox.*numbers"),
        (lambda d: d["annotations"][3].update(category_id=99), r"annotations\[3\]\.category_id: 99"),
        (lambda d: d["images"][1].update(file_name=None), r"images\[1\]\.file_name: expected str"),
    ],
)
def test_errors_name_file_record_and_field(tmp_path: Path, imgs: str, mutate, pattern: str) -> None:
    data = json.loads(json.dumps(INSTANCES))
    mutate(data)
    instances = _write(tmp_path / "instances.json", data)
    with pytest.raises(ValueError, match=pattern):
        convert_coco(instances, imgs, tmp_path / "x.jsonl")


def test_refcoco_errors_name_the_ref(tmp_path: Path, imgs: str) -> None:
    instances = _write(tmp_path / "instances.json", INSTANCES)
    refs = _write(tmp_path / "refs.json", [REFS[0], {**REFS[1], "ann_id": 404}])
    with pytest.raises(ValueError, match=r"refs\.json: refs\[1\]\.ann_id: 404"):
        convert_refcoco(refs, instances, imgs, tmp_path / "x.jsonl")
    refs = _write(tmp_path / "refs.json", [{**REFS[0], "sentences": [{"raw": "no sent"}]}])
    with pytest.raises(ValueError, match=r"refs\[0\]\.sentences\[0\]\.sent: missing field"):
        convert_refcoco(refs, instances, imgs, tmp_path / "x.jsonl")


def test_cli_and_console_script(tmp_path: Path, imgs: str, capsys: pytest.CaptureFixture[str]) -> None:
    instances = _write(tmp_path / "instances.json", INSTANCES)
    refs = _write(tmp_path / "refs.json", REFS)
    argv = ["convert", "coco", "--instances", str(instances), "--images", imgs, "--out", str(tmp_path / "c.jsonl")]
    assert cli_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["skipped_crowd"] == 2
    assert len(_rows(tmp_path / "c.jsonl")) == 3

    script = Path(sys.executable).parent / "llamafactory-vision"
    argv = ["convert", "refcoco", "--refs", str(refs), "--instances", str(instances), "--images", imgs]
    result = subprocess.run([str(script), *argv, "--out", str(tmp_path / "r.jsonl"), "--split", "testA"],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [row["objects"][0]["ref"] for row in _rows(tmp_path / "r.jsonl")] == ["person at the edge"]


# ----------------------------------------------------------------------------------------------------------------
# The image files are the truth: sizes read from each header, folders checked, paths usable as dataset_dir
# ----------------------------------------------------------------------------------------------------------------

ORIGINAL, FILE = (4032, 3024), (1008, 756)  # annotated on the camera original, shipped downsized 4x


def _downsized(tmp_path: Path) -> tuple[Path, Path]:
    """One image whose record gives the original's size while its file is 4x smaller."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", FILE).save(folder / "IMG_1.jpg")
    instances = {
        "images": [{"id": 7, "file_name": "IMG_1.jpg", "width": ORIGINAL[0], "height": ORIGINAL[1]}],
        "categories": [{"id": 1, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [400, 300, 2000, 1200]},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [3000, 2000, 1032, 1024]},  # to the corner
        ],
    }
    return _write(tmp_path / "instances.json", instances), folder


def test_json_size_that_differs_from_the_file_is_an_error_naming_both(tmp_path: Path) -> None:
    instances, folder = _downsized(tmp_path)
    pattern = r"images\[0\]\.width/height: the JSON gives 4032x3024 but image file '.*IMG_1\.jpg' is 1008x756"
    with pytest.raises(ValueError, match=pattern):
        convert_coco(instances, str(folder), tmp_path / "x.jsonl")
    refs = _write(tmp_path / "refs.json", [{"ref_id": 0, "ann_id": 1, "image_id": 7, "split": "val",
                                            "sentences": [{"sent": "the cat"}]}])  # fmt: skip
    with pytest.raises(ValueError, match=pattern):
        convert_refcoco(refs, instances, str(folder), tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_rescale_to_file_scales_the_boxes_and_counts_the_image(tmp_path: Path) -> None:
    instances, folder = _downsized(tmp_path)
    stats = convert_coco(instances, str(folder), tmp_path / "x.jsonl", rescale_to_file=True)
    assert stats.rescaled_images == 1 and stats.clipped == 0
    boxes = [obj["bbox"] for obj in _rows(tmp_path / "x.jsonl")[0]["objects"]]
    assert boxes[0] == pytest.approx([100, 75, 500, 300])  # every number / 4
    x1, y1, x2, y2 = to_xyxy(boxes[1], "xywh")
    assert (x1, y1) == (750, 500) and x2 <= FILE[0] and y2 <= FILE[1]
    assert (x2, y2) == pytest.approx(FILE)

    argv = ["convert", "coco", "--instances", str(instances), "--images", str(folder), "--out", str(tmp_path / "c.j")]
    with pytest.raises(ValueError, match="--rescale-to-file"):
        cli_main(argv)
    assert cli_main([*argv, "--rescale-to-file"]) == 0


def test_missing_images_folder_or_file_is_an_error(tmp_path: Path, imgs: str) -> None:
    instances = _write(tmp_path / "instances.json", INSTANCES)
    with pytest.raises(ValueError, match=r"images folder '.*no_such_dir' does not exist"):
        convert_coco(instances, str(tmp_path / "no_such_dir"), tmp_path / "x.jsonl")
    (Path(imgs) / "b.jpg").unlink()
    with pytest.raises(ValueError, match=r"images\[1\]\.file_name: image file '.*b\.jpg' not found"):
        convert_coco(instances, imgs, tmp_path / "x.jsonl")


def _truncated_png_header() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (100, 50)).save(out, format="PNG")
    return out.getvalue()[:20]  # cut inside IHDR


def _jpeg_without_sof() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (100, 50)).save(out, format="JPEG")
    data = out.getvalue()
    return data[: data.index(b"\xff\xc0")] + b"\xff\xda\x00\x02"  # tables, then a scan without a frame header


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda: b"", "cannot identify image file"),
        (_truncated_png_header, "Truncated File Read"),
        (_jpeg_without_sof, "cannot identify image file"),
    ],
    ids=["zero-byte", "truncated-png-header", "jpeg-without-sof"],
)
def test_unreadable_image_is_an_error_naming_the_record(tmp_path: Path, imgs: str, content, message: str) -> None:
    (Path(imgs) / "b.jpg").write_bytes(content())
    instances = _write(tmp_path / "instances.json", INSTANCES)
    pattern = rf"instances\.json: images\[1\]\.file_name: cannot read image '.*b\.jpg': .*{message}"
    with pytest.raises(ValueError, match=pattern):
        convert_coco(instances, imgs, tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_a_png_named_jpg_is_read_as_the_png_it_is(tmp_path: Path, imgs: str) -> None:
    Image.new("RGB", (100, 50)).save(Path(imgs) / "b.jpg", format="PNG")
    instances = _write(tmp_path / "instances.json", INSTANCES)
    assert convert_coco(instances, imgs, tmp_path / "x.jsonl").rows == 3
    data = json.loads(json.dumps(INSTANCES))
    data["images"][1]["height"] = 60
    with pytest.raises(ValueError, match=r"images\[1\]\.width/height: the JSON gives 100x60 but .* is 100x50"):
        convert_coco(_write(tmp_path / "instances.json", data), imgs, tmp_path / "x.jsonl")


def test_written_paths_resolve_from_the_output_folder_as_dataset_dir(tmp_path: Path, imgs: str, monkeypatch) -> None:
    """Oracle: LLaMA-Factory's own media lookup (through the grounding converter) with dataset_dir = the output
    folder, run from another working directory."""
    from llamafactory_vision.grounding.data import GroundingDatasetConverter
    from llamafactory_vision.grounding.dataset_attr import GroundingDatasetAttr
    from llamafactory_vision.hparams import VisionDataArguments

    instances = _write(tmp_path / "instances.json", INSTANCES)
    data_dir = tmp_path / "data" / "coco"
    monkeypatch.chdir(tmp_path)
    convert_coco(instances, "imgs", Path("data/coco/train.jsonl"))  # relative arguments, as typed in a shell
    attr = GroundingDatasetAttr("file", dataset_name="train.jsonl")
    attr.join({"file_name": "train.jsonl", "formatting": "grounding"})
    data_args = VisionDataArguments(template="qwen2_vl_ground", dataset_dir=str(data_dir))
    converter = GroundingDatasetConverter(attr, data_args)
    monkeypatch.chdir(Path(imgs))  # somewhere else: only dataset_dir may make the paths resolve
    rows = _rows(data_dir / "train.jsonl")
    assert [row["images"][0] for row in rows] == ["../../imgs/a.jpg", "../../imgs/a.jpg", "../../imgs/b.jpg"]
    for i, row in enumerate(rows):
        (found,) = converter(row, i)["_images"]
        assert Path(found).resolve() == (Path(imgs) / Path(row["images"][0]).name).resolve()


def test_written_paths_equal_resolving_each_file(tmp_path: Path, imgs: str) -> None:
    """The converter resolves the images folder once; the paths it writes are what resolving every file gives
    (``os.path.relpath(file.resolve(), out.resolve().parent)``): a symlinked file as its target, a file name with a
    folder, an images folder reached through a symlink, and an output beside the images."""
    import os

    other = tmp_path / "elsewhere"
    other.mkdir()
    (Path(imgs) / "a.jpg").rename(other / "a.jpg")
    (Path(imgs) / "a.jpg").symlink_to(other / "a.jpg")  # the file itself is a symlink
    (Path(imgs) / "sub").mkdir()
    (Path(imgs) / "b.jpg").rename(Path(imgs) / "sub" / "b.jpg")
    data = json.loads(json.dumps(INSTANCES))
    data["images"][1]["file_name"] = "sub/b.jpg"
    instances = _write(tmp_path / "instances.json", data)
    (tmp_path / "link").symlink_to(imgs)  # the images folder reached through a symlink
    for images_dir, out in ((imgs, tmp_path / "out" / "x.jsonl"), (str(tmp_path / "link"), Path(imgs) / "x.jsonl")):
        convert_coco(instances, images_dir, out)
        expected = {
            name: os.path.relpath((Path(images_dir) / name).resolve(), out.resolve().parent)
            for name in ("a.jpg", "sub/b.jpg")
        }
        assert [row["images"][0] for row in _rows(out)] == [expected["a.jpg"]] * 2 + [expected["sub/b.jpg"]]
        assert expected["a.jpg"].endswith("elsewhere/a.jpg")


# ----------------------------------------------------------------------------------------------------------------
# The written bytes: what json.dumps of each row gives, and what the converter wrote before its fast paths
# ----------------------------------------------------------------------------------------------------------------

TRICKY_TEXT = ["person", 'a "quoted" \\ name', "café ünï 人 🐕", "tab\tnew\nline", "\x01\x1f\x7f", "\u2028 sep", ""]


def _coco_like(root: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """A COCO-like set in ``root``: 30 PNG/JPEG images (sizes 1-700 px, names needing JSON escapes, two whose JSON
    size is 2x their file), 7 categories with tricky names, 300 annotations with int and float boxes, boxes past
    the border, without area, crowd, negative zero and tiny/huge numbers; RefCOCO refs on them."""
    import random

    rng = random.Random(seed)
    folder = root / "imgs"
    folder.mkdir()
    images = []
    for i in range(30):
        size = (rng.randint(1, 700), rng.randint(1, 700))
        name = f'im {i} é"\\{i}.{"png" if i % 3 == 0 else "jpg"}'
        Image.new("RGB", size).save(folder / name, format="PNG" if i % 3 == 0 else "JPEG")
        scale = 2 if i in (4, 9) else 1
        images.append({"id": 100 + i, "file_name": name, "width": size[0] * scale, "height": size[1] * scale})
    categories = [{"id": 3 * c + 1, "name": name} for c, name in enumerate(TRICKY_TEXT)]
    annotations = []
    for k in range(300):
        image = rng.choice(images)
        w, h = image["width"], image["height"]
        kind = rng.random()
        if kind < 0.3:
            bbox = [rng.randint(0, w), rng.randint(0, h), rng.randint(0, w), rng.randint(0, h)]
        elif kind < 0.9:
            bbox = [rng.uniform(-5, w), rng.uniform(-5, h), rng.uniform(0, w / 2), rng.uniform(0, h / 2)]
        else:
            bbox = rng.choice([[-0.0, 0.0, 1e-7, 2.5], [0, 0, w, h], [1e-300, 3, 12345678901234567890, 0.1]])
        annotations.append({"id": k, "image_id": image["id"], "category_id": rng.choice(categories)["id"],
                            "bbox": bbox, "iscrowd": int(rng.random() < 0.05)})  # fmt: skip
    refs = [
        {"ref_id": r, "ann_id": k, "image_id": annotations[k]["image_id"], "split": rng.choice(["train", "val"]),
         "sentences": [{"sent": rng.choice(TRICKY_TEXT)} for _ in range(rng.randint(1, 3))]}
        for r, k in enumerate(rng.sample(range(300), 120))
    ]  # fmt: skip
    data = {"images": images, "annotations": annotations, "categories": categories}
    return _write(root / "instances.json", data), _write(root / "refs.json", refs), folder


# sha256 of the files written by the converter of commit d3f50c2 (json.dumps of each row, every image opened with
# PIL), on _coco_like(tmp_path) with the outputs in tmp_path/out.
BEFORE_FAST_PATHS = {
    "coco.jsonl": "a932b8b3a898476c97f161b1d19f825d688cd5072131bfec3b067a2c0af4ca03",
    "refcoco.jsonl": "0fd4aabf7763e693a5cdc8f5e2105a9e0a7f9b04aa80c67bacfef342e069df08",
}


def test_written_bytes_equal_json_dumps_and_the_converter_before_its_fast_paths(tmp_path: Path) -> None:
    import hashlib

    instances, refs, folder = _coco_like(tmp_path)
    out = tmp_path / "out"
    stats = convert_coco(instances, str(folder), out / "coco.jsonl", rescale_to_file=True)
    assert stats.clipped > 0 and stats.skipped_degenerate > 0 and stats.skipped_crowd > 0 and stats.rescaled_images
    convert_refcoco(refs, instances, str(folder), out / "refcoco.jsonl", rescale_to_file=True)
    for name, digest in BEFORE_FAST_PATHS.items():
        data = (out / name).read_bytes()
        *lines, end = data.decode("utf-8").split("\n")  # not splitlines: U+2028 in a JSON string is no line end
        assert lines and end == "" and all(json.dumps(json.loads(line), ensure_ascii=False) == line for line in lines)
        assert hashlib.sha256(data).hexdigest() == digest, name
