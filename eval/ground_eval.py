"""Score grounding predictions written by LLaMA-Factory's predict stage.

Reads ``generated_predictions.jsonl`` (one JSON object per line with ``prompt``, ``predict`` and ``label``, both
decoded without special tokens; optionally ``predict_boxes_head`` from a bbox regression head), prints one JSON
object with the metrics of :mod:`llamafactory_vision.grounding.metrics` plus ``family`` and ``bad_rows`` (lines
that are not such an object; they are skipped, never fatal), and writes it to ``--out``.

    python eval/ground_eval.py --predictions saves/x/predict/generated_predictions.jsonl --out metrics.json

``--visualize DIR`` writes ``DIR/{row:05d}.png`` per row: label boxes green, predicted boxes red, head boxes blue.
The predictions file holds no image paths, so pass the dataset the predictions came from with ``--images`` (same
row order: LLaMA-Factory's predict keeps it) and ``--dataset-dir`` for relative paths. Qwen2.5-VL writes pixels
of the image as the model sees it; drawing those needs the model's processor (``--model``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llamafactory_vision.boxes import (
    HOST_IMAGE_MAX_PIXELS,
    HOST_IMAGE_MIN_PIXELS,
    BoxError,
    model_view_size,
    normalize_xyxy,
    to_xyxy,
)
from llamafactory_vision.grounding.formats import Box, get_codec, parse_answer
from llamafactory_vision.grounding.metrics import HEAD_BOX_FIELDS, grounding_scores, head_boxes_for_family
from llamafactory_vision.grounding.predictions import image_path, read_dataset, read_predictions, to_pixels
from llamafactory_vision.grounding.visualize import draw_prediction
from PIL import Image

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava")

_NUM = r"-?\d+(?:\.\d+)?"
_PAREN_BOX = re.compile(rf"\(\s*{_NUM}\s*,\s*{_NUM}\s*\)\s*,\s*\(\s*{_NUM}\s*,\s*{_NUM}\s*\)")
_LIST_BOX = re.compile(rf"\[\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*\]")


def detect_family(labels: Sequence[str]) -> str:
    """Guess the answer format from label texts (the most common one wins).

    Returns ``"json"`` for ``bbox_2d`` JSON (Qwen2.5-VL pixels or Qwen3-VL 0-1000: the text cannot tell them apart),
    ``"qwen2_vl"`` for ``(x1,y1),(x2,y2)``, ``"llava"`` for bare ``[x1, y1, x2, y2]`` lists, ``"unknown"`` otherwise.
    """
    kinds = Counter()
    for text in labels:
        if "bbox_2d" in text:
            kinds["json"] += 1
        elif _PAREN_BOX.search(text):
            kinds["qwen2_vl"] += 1
        elif _LIST_BOX.search(text):
            kinds["llava"] += 1
    return kinds.most_common(1)[0][0] if kinds else "unknown"








def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", type=Path, required=True, help="generated_predictions.jsonl")
    parser.add_argument("--out", type=Path, help="also write the metrics JSON here")
    parser.add_argument(
        "--family",
        choices=("auto", *FAMILIES),
        default="auto",
        help="model family that wrote the answers; needed to score head boxes or draw JSON answers",
    )
    parser.add_argument("--visualize", type=Path, metavar="DIR", help="write one PNG per row into DIR")
    parser.add_argument("--images", type=Path, help="dataset file (JSON or JSONL) the predictions came from")
    parser.add_argument("--dataset-dir", type=Path, help="base for relative image paths (default: --images' folder)")
    parser.add_argument("--model", type=Path, help="local model dir whose processor sets the Qwen2.5-VL model view")
    parser.add_argument(
        "--image-max-pixels",
        type=int,
        default=HOST_IMAGE_MAX_PIXELS,
        help="image_max_pixels of the predict run (LLaMA-Factory resizes before the processor; qwen2_5_vl only)",
    )
    parser.add_argument(
        "--image-min-pixels", type=int, default=HOST_IMAGE_MIN_PIXELS, help="image_min_pixels of the predict run"
    )
    args = parser.parse_args(argv)
    if args.visualize is not None and args.images is None:
        parser.error("--visualize needs --images: the predictions file holds no image paths")
    return args


def resolve_family(requested: str, detected: str, purpose: str) -> str:
    """The family to convert coordinates with: ``requested`` unless auto, else an unambiguous ``detected`` one."""
    if requested != "auto":
        return requested
    if detected in FAMILIES:
        return detected
    raise SystemExit(
        f"error: answers look like {detected!r}, which does not fix a coordinate space; {purpose} needs "
        f"--family, one of {', '.join(FAMILIES)} (qwen2_5_vl: model-view pixels, qwen3_vl: 0-1000)"
    )


def collect_head_boxes(
    rows: list[tuple[int, dict[str, Any]]], family: str
) -> tuple[list[tuple[int, dict[str, Any]]], list[list[Box] | None], int]:
    """Keep rows whose ``predict_boxes_head`` (if any) is readable; return them, their head boxes, and the dropped."""
    kept, heads, bad = [], [], 0
    for index, obj in rows:
        objects = obj.get("predict_boxes_head")
        if objects is None:
            kept.append((index, obj))
            heads.append(None)
            continue
        try:
            if not isinstance(objects, list):
                raise TypeError(f"predict_boxes_head={objects!r} is not a list")
            heads.append(head_boxes_for_family(objects, family))
        except (TypeError, ValueError) as err:
            print(f"row {index}: skipped: {err}", file=sys.stderr)
            bad += 1
            continue
        kept.append((index, obj))
    return kept, heads, bad


def load_processor(family: str, args: argparse.Namespace) -> Any:
    """The processor that fixes the model-view size, needed only for families writing model-view pixels."""
    if family != "qwen2_5_vl":
        return None
    if args.model is None:
        raise SystemExit(
            "error: qwen2_5_vl answers are pixels of the image as the model sees it; drawing them needs "
            "--model DIR (a local model dir whose processor fixes that size)"
        )
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(args.model), local_files_only=True)
    # LLaMA-Factory's load_tokenizer sets these on the processor; model_view_size reads them from there.
    processor.image_max_pixels = args.image_max_pixels
    processor.image_min_pixels = args.image_min_pixels
    return processor




def dataset_boxes(row: Any, image_size: tuple[int, int]) -> list[Box] | None:
    """A grounding row's object boxes, normalised xyxy; None when the row has no readable boxes."""
    if not isinstance(row, dict) or not isinstance(row.get("objects"), list):
        return None
    try:
        return [
            normalize_xyxy(to_xyxy(o["bbox"], row.get("bbox_format") or "xyxy"), image_size) for o in row["objects"]
        ]
    except (BoxError, KeyError, TypeError):
        return None


def check_alignment(index: int, label: list[Box], row: Any, image_size: tuple[int, int], tolerance: float) -> None:
    """Stop if a prediction's label boxes are not the boxes of dataset row ``index`` (normalised, within
    ``tolerance``): predictions carry no image path, so rows are paired by position, and a dataset whose invalid
    rows were skipped (``grounding_invalid: skip``) no longer lines up."""
    expected = dataset_boxes(row, image_size)
    if expected is None or not label or row.get("task", "rec") == "reg":
        return
    if len(expected) != len(label) or any(
        abs(a - b) > tolerance for box, exp in zip(label, expected) for a, b in zip(box, exp)
    ):
        raise SystemExit(
            f"error: predictions row {index} does not match row {index} of --images (label boxes {label} vs "
            f"dataset boxes {expected}, normalised). Rows are paired by position: pass the dataset file the "
            "predictions were made from, without rows skipped by `grounding_invalid: skip`."
        )


def visualize(
    rows: list[tuple[int, dict[str, Any]]],
    heads: list[list[Box] | None],
    family: str,
    processor: Any,
    args: argparse.Namespace,
) -> dict[str, int]:
    """Draw every row onto its image; returns ``visualized`` and ``visualize_failures`` counts."""
    codec = get_codec(family)
    dataset = read_dataset(args.images)
    dataset_dir = args.dataset_dir if args.dataset_dir is not None else args.images.parent
    args.visualize.mkdir(parents=True, exist_ok=True)
    done, failed = 0, 0
    for (index, obj), head in zip(rows, heads):
        path = image_path(dataset[index], dataset_dir) if index < len(dataset) else None
        if path is None:
            print(f"row {index}: no image in {args.images}", file=sys.stderr)
            failed += 1
            continue
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except OSError as err:
            print(f"row {index}: cannot open {path}: {err}", file=sys.stderr)
            failed += 1
            continue
        width, height = image.size
        try:
            model_size = model_view_size(width, height, processor) if processor is not None else (width, height)
        except ValueError as err:  # a size the host cannot process either (e.g. aspect ratio over 200)
            print(f"row {index}: {path}: {err}", file=sys.stderr)
            failed += 1
            continue
        label, predict = parse_answer(obj["label"]), parse_answer(obj["predict"])
        label_norm = [codec.decode_box(box, model_size=model_size) for box in label.boxes]
        # one unit of the coarsest written grid (1/1000, or a model-view pixel) plus rounding
        tolerance = 1.5 / min(1000, *model_size)
        check_alignment(index, label_norm, dataset[index], image.size, tolerance)
        image = draw_prediction(
            image,
            to_pixels(label.boxes, codec, model_size, image.size),
            label.refs,
            to_pixels(predict.boxes, codec, model_size, image.size),
            predict.refs,
            to_pixels(head, codec, model_size, image.size) if head else None,
        )
        image.save(args.visualize / f"{index:05d}.png")
        done += 1
    return {"visualized": done, "visualize_failures": failed}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    rows, bad = read_predictions(args.predictions)
    detected = detect_family([obj["label"] for _, obj in rows])
    # Settle everything that can stop the run before any work is done.
    draw_family = processor = None
    if args.visualize is not None:
        draw_family = resolve_family(args.family, detected, "--visualize")
        processor = load_processor(draw_family, args)
    heads: list[list[Box] | None] = [None] * len(rows)
    if any("predict_boxes_head" in obj for _, obj in rows):
        head_family = resolve_family(args.family, detected, "predict_boxes_head")
        if head_family not in HEAD_BOX_FIELDS:
            raise SystemExit(f"error: predict_boxes_head has no box space for family {head_family!r}")
        rows, heads, bad_heads = collect_head_boxes(rows, head_family)
        bad += bad_heads

    metrics: dict[str, Any] = {"family": detected if args.family == "auto" else args.family}
    metrics.update(grounding_scores(((obj["predict"], obj["label"]) for _, obj in rows), head_boxes=heads))
    metrics["bad_rows"] = bad
    if draw_family is not None:
        metrics.update(visualize(rows, heads, draw_family, processor, args))

    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    return metrics


if __name__ == "__main__":
    main()
