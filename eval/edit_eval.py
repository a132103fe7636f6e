"""Score edited images against their targets (MagicBrush / MGIE protocol), printing one JSON object.

    python eval/edit_eval.py --outputs DIR --dataset edit.jsonl [--clip_model PATH] [--dino_model PATH]
                             [--dataset_dir DIR] [--out metrics.json]

``DIR/{i:05d}.png`` is the edited image of row ``i`` of ``edit.jsonl`` (what ``do_predict`` with ``stage: edit``
writes into ``output_dir/edited/``). Rows are ``edit`` rows (``target`` path relative to ``--dataset_dir``, default
the jsonl's folder; optional ``target_caption``). Keys: ``n``, ``l1``, ``l2``; with a CLIP model ``clip_i``,
``clip_t`` (100 * cosine, over rows with a caption) and ``clip_t_n`` (how many rows have one); with a DINO model
``dino``. The metric functions live in ``llamafactory_vision.editing.metrics``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llamafactory_vision.editing.metrics import ClipScorer, DinoScorer, edit_metrics
from PIL import Image


def load_rows(dataset: Path, outputs: Path, dataset_dir: Path) -> tuple[list, list, list]:
    """(outputs, targets, captions) aligned by row; a missing output or target is an error naming the row."""
    rows = [json.loads(line) for line in dataset.read_text().splitlines() if line.strip()]
    images, targets, captions = [], [], []
    for i, row in enumerate(rows):
        out_path = outputs / f"{i:05d}.png"
        if not out_path.is_file():
            raise FileNotFoundError(f"{dataset}, row {i}: no edited image {out_path}.")
        if not isinstance(row.get("target"), str):
            raise TypeError(f"{dataset}, row {i}, field `target`: expected an image path, got {row.get('target')!r}.")
        target_path = dataset_dir / row["target"]
        if not target_path.is_file():
            raise FileNotFoundError(f"{dataset}, row {i}, field `target`: image file not found: {target_path}.")
        images.append(Image.open(out_path).convert("RGB"))
        targets.append(Image.open(target_path).convert("RGB"))
        captions.append(row.get("target_caption") or None)
    return images, targets, captions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--outputs", required=True, type=Path, help="folder of edited images {i:05d}.png")
    parser.add_argument("--dataset", required=True, type=Path, help="the edit jsonl the outputs were made from")
    parser.add_argument("--dataset_dir", type=Path, default=None, help="folder image paths are relative to")
    parser.add_argument("--clip_model", default=None, help="local CLIP folder (clip_i, clip_t)")
    parser.add_argument("--dino_model", default=None, help="local DINO ViT folder (dino)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    images, targets, captions = load_rows(args.dataset, args.outputs, args.dataset_dir or args.dataset.parent)
    clip = ClipScorer(args.clip_model) if args.clip_model else None
    dino = DinoScorer(args.dino_model) if args.dino_model else None
    metrics = edit_metrics(images, targets, captions, clip=clip, dino=dino)
    text = json.dumps(metrics)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
