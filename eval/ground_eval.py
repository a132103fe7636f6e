"""Score grounding predictions written by LLaMA-Factory's predict stage.

Reads ``generated_predictions.jsonl`` (one JSON object per line with ``prompt``, ``predict`` and ``label``, both
decoded without special tokens; optionally ``predict_boxes_head`` from a bbox regression head), prints one JSON
object with the metrics of :mod:`llamafactory_vision.grounding.metrics` (rec rows: the first predicted box, as
published Acc@0.5; detect rows: matching, recall/precision@0.5; reg rows: text match) plus ``family``,
``bad_rows`` (lines that are not such an object, or rows that cannot be scored; skipped, never fatal, reported on
stderr with their row number counting from 0), ``decoding`` (the generation settings of the predict run, read from
the ``predict_results.json`` beside the predictions; ``null`` when not recorded) and, when the answers look like
another coordinate space than the labels, ``coord_space_warning``; and writes it to ``--out``.

    python eval/ground_eval.py --predictions saves/x/predict/generated_predictions.jsonl --out metrics.json

``--images`` names the dataset the predictions came from (same row order: LLaMA-Factory's predict keeps it;
``--dataset-dir`` for relative paths). Rows are then scored against the dataset's own float boxes (not the label
text, rounded to the family's grid) and its ``task`` column, all compared in ``[0, 1]`` of the image; Qwen2.5-VL
writes pixels of the image as the model sees it, so it needs the model's processor (``--model``).
``--visualize DIR`` (needs ``--images``) writes ``DIR/{row:05d}.png`` per row: label boxes green, predicted boxes
red, head boxes blue.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamafactory_vision.boxes import (
    HOST_IMAGE_MAX_PIXELS,
    HOST_IMAGE_MIN_PIXELS,
    BoxError,
    denormalize_xyxy,
    model_view_size,
    normalize_xyxy,
    to_xyxy,
)
from llamafactory_vision.grounding.formats import RELATIVE_SCALE, Box, get_codec, parse_answer
from llamafactory_vision.grounding.metrics import (
    HEAD_BOX_FIELDS,
    KINDS,
    GroundingMetricAccumulator,
    head_boxes_for_family,
)
from llamafactory_vision.grounding.predictions import (
    NORMALIZED_BOUNDS,
    NormalizedBoxes,
    image_path,
    normalize_row_boxes,
    read_dataset,
    read_predictions,
    score_normalized_rows,
)
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
    if args.model is not None and args.images is None:
        parser.error("--model is used with --images (Qwen2.5-VL model-view pixels of the dataset's images)")
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
            print(f"row {index} (counting from 0): skipped: {err}", file=sys.stderr)
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
            "error: qwen2_5_vl answers are pixels of the image as the model sees it; pairing them with the dataset's "
            "boxes (--images) needs --model DIR (a local model dir whose processor fixes that size)"
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
            f"error: predictions row {index} does not match row {index} of --images (rows count from 0; label boxes "
            f"{label} vs dataset boxes {expected}, normalised). Rows are paired by position: pass the dataset file "
            "the predictions were made from, without rows skipped by `grounding_invalid: skip`."
        )


@dataclass
class ResolvedRow:
    """A prediction row paired with its dataset row, every box normalised xyxy in ``[0, 1]`` of the image.

    ``boxes.label`` holds the dataset's float boxes when the dataset row has readable ones, else the label text's.
    """

    index: int
    obj: dict[str, Any]
    task: str | None
    image_path: Path | None
    image_size: tuple[int, int]
    boxes: NormalizedBoxes


def _head_failed(obj: dict[str, Any]) -> bool:
    """The predict run recorded that its bbox head could not run for this row (``bbox_head_failed``)."""
    return obj.get("bbox_head_failed") is True


def _dataset_task(row: Any) -> str | None:
    task = row.get("task", "rec") if isinstance(row, dict) else None
    return task if task in KINDS else None


def resolve_rows(
    rows: list[tuple[int, dict[str, Any]]],
    heads: list[list[Box] | None],
    family: str,
    processor: Any,
    args: argparse.Namespace,
) -> tuple[list[ResolvedRow], int]:
    """Pair each prediction with row ``index`` of ``--images`` and normalise its boxes; returns the rows and how many
    could not be scored (no image size where the family needs one: reported on stderr)."""
    codec = get_codec(family)
    dataset = read_dataset(args.images)
    dataset_dir = args.dataset_dir if args.dataset_dir is not None else args.images.parent
    resolved, bad = [], 0
    for (index, obj), head in zip(rows, heads):
        row = dataset[index] if index < len(dataset) else None
        path = image_path(row, dataset_dir)
        try:
            if path is None:
                raise OSError(f"no image in row {index} of {args.images}")
            with Image.open(path) as opened:  # the header is enough for the size
                size = opened.size
            model_size = model_view_size(*size, processor) if processor is not None else size
        except (OSError, ValueError) as err:  # unreadable, or a size the host cannot process (aspect ratio > 200)
            if family in ("qwen2_5_vl", "llava"):  # their coordinates depend on the image size
                print(f"row {index} (counting from 0): skipped: {err}", file=sys.stderr)
                bad += 1
                continue
            print(f"row {index} (counting from 0): {err}; scored on the label text", file=sys.stderr)
            path, size, model_size = None, (RELATIVE_SCALE, RELATIVE_SCALE), (RELATIVE_SCALE, RELATIVE_SCALE)

        def decode(boxes: Sequence[Sequence[float]], view: tuple[int, int] = model_size) -> list[Box]:
            return [codec.decode_box(box, model_size=view) for box in boxes]

        label_text = decode(parse_answer(obj["label"]).boxes)
        dataset_label = dataset_boxes(row, size) if path is not None else None
        if dataset_label is not None:
            # one unit of the coarsest written grid (1/1000, or a model-view pixel) plus rounding and clamping
            check_alignment(index, label_text, row, size, 1.5 / min(RELATIVE_SCALE, *model_size))
        boxes = normalize_row_boxes(obj["predict"], obj["label"], codec, model_size, dataset_label, head)
        resolved.append(ResolvedRow(index, obj, _dataset_task(row), path, size, boxes))
    return resolved, bad


def score_resolved(rows: list[ResolvedRow], family: str) -> tuple[dict[str, Any], str | None]:
    """Metrics over rows resolved against the dataset (boxes in ``[0, 1]``); and the coordinate-space warning."""
    accumulator = GroundingMetricAccumulator(family, bounds=NORMALIZED_BOUNDS)
    scored = score_normalized_rows(
        [row.obj["predict"] for row in rows],
        [row.obj["label"] for row in rows],
        [row.boxes for row in rows],
        [row.task for row in rows],
        [_head_failed(row.obj) for row in rows],
    )
    for row in scored:
        accumulator.add(row)
    return accumulator.compute(), accumulator.warning


def visualize(rows: list[ResolvedRow], args: argparse.Namespace) -> dict[str, int]:
    """Draw every resolved row onto its image; returns ``visualized`` and ``visualize_failures`` counts."""
    args.visualize.mkdir(parents=True, exist_ok=True)
    done, failed = 0, 0
    for row in rows:
        if row.image_path is None:
            failed += 1
            continue
        with Image.open(row.image_path) as opened:
            image = opened.convert("RGB")
        boxes = row.boxes
        image = draw_prediction(
            image,
            [denormalize_xyxy(box, image.size) for box in boxes.label],
            parse_answer(row.obj["label"]).refs,
            [denormalize_xyxy(box, image.size) for box in boxes.predict],
            parse_answer(row.obj["predict"]).refs,
            [denormalize_xyxy(box, image.size) for box in boxes.head] if boxes.head else None,
        )
        image.save(args.visualize / f"{row.index:05d}.png")
        done += 1
    return {"visualized": done, "visualize_failures": failed}


def read_decoding(predictions: Path) -> dict[str, float | int] | None:
    """The decoding settings the predict run recorded in the ``predict_results.json`` beside ``predictions``
    (``predict_decoding_*`` keys, see the grounding workflow), or ``None``."""
    path = predictions.parent / "predict_results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    prefix = "predict_decoding_"
    found = {k.removeprefix(prefix): v for k, v in results.items() if k.startswith(prefix)} if isinstance(
        results, dict) else {}  # fmt: skip
    return found or None


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector (``gc``) inside the block. Scoring keeps a dozen new containers per row
    alive (the parsed JSON objects, boxes, scores) and makes no reference cycles, so every collection would only walk
    the growing row lists again: about a third of ground_eval's time on 20k rows. Reference counting still frees
    everything dropped; the collector is switched back on (if it was on) when the block ends."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    with collector_paused():
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`main` after argument parsing."""
    rows, bad = read_predictions(args.predictions)
    detected = detect_family([obj["label"] for _, obj in rows])
    # Settle everything that can stop the run before any work is done.
    family = detected if args.family == "auto" else args.family
    processor = None
    if args.images is not None:
        family = resolve_family(args.family, detected, "--images")
        processor = load_processor(family, args)
    heads: list[list[Box] | None] = [None] * len(rows)
    if any("predict_boxes_head" in obj for _, obj in rows):
        head_family = resolve_family(args.family, detected, "predict_boxes_head")
        if head_family not in HEAD_BOX_FIELDS:
            raise SystemExit(f"error: predict_boxes_head has no box space for family {head_family!r}")
        rows, heads, bad_heads = collect_head_boxes(rows, head_family)
        bad += bad_heads

    metrics: dict[str, Any] = {"family": family}
    if args.images is not None:
        resolved, bad_resolved = resolve_rows(rows, heads, family, processor, args)
        bad += bad_resolved
        scores, warning = score_resolved(resolved, family)
    else:
        accumulator = GroundingMetricAccumulator(family if family in FAMILIES else None)
        accumulator.update(
            [obj["predict"] for _, obj in rows],
            [obj["label"] for _, obj in rows],
            heads,
            head_failed=[_head_failed(obj) for _, obj in rows],
        )
        scores, warning = accumulator.compute(), accumulator.warning
    metrics.update(scores)
    metrics["bad_rows"] = bad
    metrics["decoding"] = read_decoding(args.predictions)
    if metrics["decoding"] is None:
        print("note: no decoding settings recorded beside the predictions (predict_results.json)", file=sys.stderr)
    if warning:
        metrics["coord_space_warning"] = warning
        print(f"warning: {warning}", file=sys.stderr)
    if args.visualize is not None:
        metrics.update(visualize(resolved, args))

    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    return metrics


if __name__ == "__main__":
    main()
