"""Score Draw&Guess predictions written by LLaMA-Factory's predict stage.

Reads ``generated_predictions.jsonl`` (``prompt``, ``predict``, ``label`` per line) and prints one JSON object:
``n``, ``exact_match`` (answer equals label after trimming whitespace and end punctuation, ignoring case),
``accuracy`` (also ignoring articles and plurals and equating the ``--synonyms`` groups) and ``bad_rows`` (lines
that are not such an object; skipped, never fatal). ``--out`` also writes it to a file.

    python eval/guess_eval.py --predictions saves/x/predict/generated_predictions.jsonl [--synonyms syn.json]

``--gallery FILE.png`` draws the stroked images the model saw with guess vs answer (green: accurate, red: not). The
predictions hold no image paths: pass the ``stroke_guess`` dataset file they came from with ``--data`` (same row
order; LLaMA-Factory's predict keeps it); rows are rendered by the same converter as in training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llamafactory_vision.strokes.metrics import guess_scores, is_accurate, load_synonyms
from PIL import Image, ImageDraw, ImageFont

TILE = 192


def read_predictions(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], int]:
    """``(row index, object)`` per valid line (the index counts every non-empty line, so it matches the dataset row
    even after a bad line) and the number of bad lines."""
    rows, bad = [], 0
    numbered = enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
    lines = [(n, line) for n, line in numbered if line.strip()]
    for index, (number, line) in enumerate(lines):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            print(f"line {number}: skipped: not JSON ({err})", file=sys.stderr)
            bad += 1
            continue
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("predict", "label")):
            print(f"line {number}: skipped: needs string `predict` and `label`", file=sys.stderr)
            bad += 1
            continue
        rows.append((index, obj))
    return rows, bad


def rendered_images(data: Path, dataset_dir: Path, cache_dir: Path | None, indices: list[int]) -> list[str]:
    """Rows ``indices`` of a ``stroke_guess`` file, rendered by the training converter (the picture the model saw)."""
    from llamafactory_vision.hparams import VisionDataArguments
    from llamafactory_vision.strokes.data import StrokeGuessDatasetConverter
    from llamafactory_vision.strokes.dataset_attr import StrokeDatasetAttr

    lines = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    data_args = VisionDataArguments(template="llava_strokes", dataset_dir=str(dataset_dir),
                                    stroke_cache_dir=str(cache_dir) if cache_dir else None)  # fmt: skip
    attr = StrokeDatasetAttr("file", dataset_name=data.name)
    attr.join({"formatting": "stroke_guess"})
    converter = StrokeGuessDatasetConverter(attr, data_args)
    if indices and max(indices) >= len(lines):
        raise SystemExit(f"error: --data {data} has {len(lines)} rows, the predictions at least {max(indices) + 1}")
    return [converter.convert(lines[index], index)["_images"][0] for index in indices]


def draw_gallery(images: list[str], rows: list[dict[str, Any]], synonyms, out: Path, columns: int = 6) -> None:
    """A grid of tiles: each rendered image fitted into ``TILE`` px with ``guess / answer`` underneath."""
    font = ImageFont.load_default()
    tiles_rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * TILE, tiles_rows * (TILE + 28)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (path, row) in enumerate(zip(images, rows)):
        x, y = (i % columns) * TILE, (i // columns) * (TILE + 28)
        with Image.open(path) as image:
            thumb = image.convert("RGB")
            thumb.thumbnail((TILE, TILE))
        sheet.paste(thumb, (x + (TILE - thumb.width) // 2, y + (TILE - thumb.height) // 2))
        colour = (0, 150, 0) if is_accurate(row["predict"], row["label"], synonyms) else (210, 0, 0)
        draw.text((x + 4, y + TILE + 2), f"guess: {row['predict'][:28]}", fill=colour, font=font)
        draw.text((x + 4, y + TILE + 14), f"answer: {row['label'][:27]}", fill=(0, 0, 0), font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", type=Path, required=True, help="generated_predictions.jsonl")
    parser.add_argument("--synonyms", type=Path, help="JSON: [[\"car\", \"automobile\"], ...] or {\"car\": [...]}")
    parser.add_argument("--out", type=Path, help="also write the metrics JSON here")
    parser.add_argument("--gallery", type=Path, metavar="PNG", help="draw stroked images with guess vs answer")
    parser.add_argument("--data", type=Path, help="stroke_guess dataset file (JSONL) the predictions came from")
    parser.add_argument("--dataset-dir", type=Path, help="base for relative paths (default: --data's folder)")
    parser.add_argument("--stroke-cache-dir", type=Path, help="stroke_cache_dir of the run (default: the default)")
    parser.add_argument("--gallery-rows", type=int, default=24, help="rows drawn in the gallery (default 24)")
    args = parser.parse_args(argv)
    if args.gallery is not None and args.data is None:
        parser.error("--gallery needs --data: the predictions file holds no image paths")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    synonyms = load_synonyms(args.synonyms) if args.synonyms else None
    rows, bad = read_predictions(args.predictions)
    metrics: dict[str, Any] = guess_scores(((r["predict"], r["label"]) for _, r in rows), synonyms)
    metrics["bad_rows"] = bad
    if args.gallery is not None:
        shown = rows[: args.gallery_rows]
        images = rendered_images(
            args.data, args.dataset_dir or args.data.parent, args.stroke_cache_dir, [i for i, _ in shown]
        )
        draw_gallery(images, [r for _, r in shown], synonyms, args.gallery)
        metrics["gallery"] = str(args.gallery)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    return metrics


if __name__ == "__main__":
    main()
