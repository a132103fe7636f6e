"""Pictures for LLaMA Board: the grounding preview, the prediction galleries (boxes, edits), boxes of a chat answer.

Every file read here is checked to lie inside the dataset directory chosen in the UI (dataset files and the images
their rows name) or the run's output directory (predictions); see :mod:`.safe_paths`. Images go to gradio as PIL
objects, so gradio serves copies from its own cache and no path of ours is exposed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from llamafactory_vision.boxes import model_view_size
from llamafactory_vision.grounding.formats import get_codec, parse_answer
from llamafactory_vision.grounding.metrics import head_boxes_for_family
from llamafactory_vision.grounding.predictions import read_dataset, read_predictions, to_pixels
from llamafactory_vision.grounding.templates import get_grounding_spec
from llamafactory_vision.grounding.visualize import draw_prediction
from llamafactory_vision.webui.safe_paths import resolve_under

DATA_CONFIG = "dataset_info.json"
PREDICTIONS = "generated_predictions.jsonl"
MAX_PICTURES = 16
EDITED_DIR = "edited"  # editing/predict.py: edited/{i:05d}.png is the output of row i
MAX_EDIT_ROWS = 8


def dataset_file(dataset_dir: str, name: str) -> Path:
    """The file of dataset ``name`` in ``dataset_dir/dataset_info.json``, refused when it leaves ``dataset_dir``."""
    info_path = resolve_under(dataset_dir, DATA_CONFIG, "dataset_info.json")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if name not in info or "file_name" not in info[name]:
        raise ValueError(f"dataset {name!r} has no local file in {info_path}.")
    return resolve_under(dataset_dir, info[name]["file_name"], f"dataset {name!r} file_name")


def row_image(row: Any, dataset_dir: str, where: str) -> Path:
    """First image of a dataset row (``images`` list or ``image`` string), refused when outside ``dataset_dir``."""
    image = row.get("images", row.get("image")) if isinstance(row, dict) else None
    if isinstance(image, list):
        image = image[0] if image else None
    if not isinstance(image, str):
        raise TypeError(f"{where}: no image path.")
    return resolve_under(dataset_dir, image, f"{where} image")


def _processor(family: str, model_path: str, image_max_pixels: int, image_min_pixels: int) -> Any:
    """The processor that fixes the model-view size, for families that write model-view pixels (else None)."""
    if family != "qwen2_5_vl":
        return None
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path, local_files_only=True)
    # LLaMA-Factory's load_tokenizer sets these on the processor; model_view_size reads them there
    processor.image_max_pixels, processor.image_min_pixels = image_max_pixels, image_min_pixels
    return processor


def prediction_pictures(
    output_dir: str,
    dataset_dir: str,
    datasets: list[str],
    max_samples: int,
    template: str,
    model_path: str,
    image_max_pixels: int,
    image_min_pixels: int,
    limit: int = MAX_PICTURES,
) -> list[tuple[Image.Image, str]]:
    """Label (green), predicted (red) and head (blue) boxes of the first ``limit`` rows of a predict run.

    Predictions are paired with the dataset rows by position (LLaMA-Factory's predict keeps the order; each dataset
    is cut to ``max_samples`` rows). Returns ``(picture, caption)`` pairs; empty when ``template`` is not a grounding
    template or the run wrote no predictions.
    """
    spec = get_grounding_spec(template)
    predictions = resolve_under(output_dir, PREDICTIONS, "predictions")
    if spec is None or not predictions.is_file():
        return []
    rows, _ = read_predictions(predictions)
    dataset_rows = []
    for name in datasets:
        dataset_rows += [
            (name, i, r) for i, r in enumerate(read_dataset(dataset_file(dataset_dir, name))[:max_samples])
        ]
    family = spec.box_family
    codec = get_codec(family)
    processor = _processor(family, model_path, image_max_pixels, image_min_pixels)
    pictures = []
    for index, obj in rows[:limit]:
        if index >= len(dataset_rows):
            break
        name, row_index, row = dataset_rows[index]
        with Image.open(row_image(row, dataset_dir, f"dataset {name!r} row {row_index}")) as opened:
            image = opened.convert("RGB")
        model_size = model_view_size(*image.size, processor) if processor is not None else image.size
        label, predict = parse_answer(obj["label"]), parse_answer(obj["predict"])
        head = obj.get("predict_boxes_head")
        head_boxes = to_pixels(head_boxes_for_family(head, family), codec, model_size, image.size) if head else None
        picture = draw_prediction(
            image,
            to_pixels(label.boxes, codec, model_size, image.size),
            label.refs,
            to_pixels(predict.boxes, codec, model_size, image.size),
            predict.refs,
            head_boxes,
        )
        pictures.append((picture, f"{name} #{row_index}: {obj['predict'][:80]}"))
    return pictures


def edit_pictures(
    output_dir: str, dataset_dir: str, template: str, limit: int = MAX_EDIT_ROWS
) -> list[tuple[Image.Image, str]]:
    """Source / output / target of the first ``limit`` rows of an edit predict run: three pictures per row.

    The edit stage's ``generated_predictions.jsonl`` names each row's source and target image as the run read them
    (paths relative to the working directory LLaMA Board and its runs share); they must lie inside ``dataset_dir``,
    and the output ``edited/{i:05d}.png`` inside ``output_dir``. Empty when ``template`` is not the edit template or
    the run wrote no predictions.

    Raises:
        OutsideError: a file outside its directory. TypeError: a predictions row without ``source``/``target``.
    """
    from llamafactory_vision.editing.tokens import EDIT_TEMPLATE

    predictions = resolve_under(output_dir, PREDICTIONS, "predictions")
    if template != EDIT_TEMPLATE or not predictions.is_file():
        return []
    pictures = []
    lines = [line for line in predictions.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, line in enumerate(lines[:limit]):
        row = json.loads(line)
        where = f"{predictions}, row {i}"
        files = {}
        for field in ("source", "target"):
            if not isinstance(row.get(field), str):
                raise TypeError(f"{where}, field `{field}`: expected an image path, got {row.get(field)!r}.")
            files[field] = resolve_under(dataset_dir, os.path.abspath(row[field]), f"{where} {field}")
        files["output"] = resolve_under(output_dir, f"{EDITED_DIR}/{i:05d}.png", f"{where} edited image")
        captions = {
            "source": f"#{i} source: {row.get('instruction', '')}",
            "output": f"#{i} output: {row.get('predict', '')}",
            "target": f"#{i} target",
        }
        for field in ("source", "output", "target"):
            with Image.open(files[field]) as opened:
                pictures.append((opened.convert("RGB"), captions[field][:120]))
    return pictures


def preview_pictures(
    model_path: str,
    template: str,
    dataset_dir: str,
    dataset: str,
    image_max_pixels: int,
    image_min_pixels: int,
    n: int,
) -> list[tuple[Image.Image, str]]:
    """The pictures of ``llamafactory-vision preview`` for the first ``n`` rows of ``dataset``: the real data
    pipeline of this model and template, target boxes decoded from the tokenized target, on the model-view image.

    The rows' images are checked to lie inside ``dataset_dir`` before the pipeline reads them.
    """
    from llamafactory_vision.grounding.preview import preview

    if get_grounding_spec(template) is None:
        raise ValueError(f"template {template!r} is not a grounding template.")
    path = dataset_file(dataset_dir, dataset)
    for i, row in enumerate(read_dataset(path)[:n]):
        row_image(row, dataset_dir, f"dataset {dataset!r} row {i}")
    with tempfile.TemporaryDirectory() as work:
        config = {
            "model_name_or_path": model_path,
            "template": template,
            "dataset_dir": dataset_dir,
            "dataset": dataset,
            "stage": "sft",
            "finetuning_type": "lora",
            "cutoff_len": 4096,
            "image_max_pixels": image_max_pixels,
            "image_min_pixels": image_min_pixels,
            "output_dir": str(Path(work) / "run"),
        }
        config_path = Path(work) / "preview.yaml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        out = preview(str(config_path), str(Path(work) / "pictures"), n=n)
        rows = [json.loads(line) for line in (out / "preview.jsonl").read_text(encoding="utf-8").splitlines()]
        pictures = []
        for i, row in enumerate(rows):
            with Image.open(out / f"{i:05d}.png") as opened:
                pictures.append((opened.convert("RGB"), f"#{i} model view {row['model_image_size']}"))
    return pictures


def answer_picture(image: Image.Image, answer: str, template: str, processor: Any) -> Image.Image | None:
    """The boxes of a grounding ``answer`` drawn (red) on the chat's input ``image``; None when it has no box."""
    spec = get_grounding_spec(template)
    if spec is None or image is None:
        return None
    parsed = parse_answer(answer)
    if parsed.failed:
        return None
    codec = get_codec(spec.box_family)
    model_size = model_view_size(*image.size, processor) if spec.box_family == "qwen2_5_vl" else image.size
    return draw_prediction(image, [], [], to_pixels(parsed.boxes, codec, model_size, image.size), parsed.refs)
