"""``do_predict`` with ``stage: edit``: edit every eval row with the trained model, the host's way.

Writes into ``output_dir``: ``edited/{i:05d}.png`` (row i of the eval set), ``generated_predictions.jsonl`` (the
expressive instruction per row), ``edit_grid.png`` (source | edited | target, first rows) and the edit metrics
(``predict_l1``, ``predict_l2`` and, with ``edit_clip_model``, ``predict_clip_i``/``predict_clip_t``) into
``predict_results.json`` through the trainer's ``save_metrics``.

Under ``torchrun`` each process edits every ``world_size``-th row (row ``i`` always with the generator seeded
``seed + i``, so which process edits it changes nothing); the edited images (PNG bytes, lossless) and texts are
gathered to the main process only (the others would just hold them), which writes and scores them in row order:
the same files and metrics as one process.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import EulerAncestralDiscreteScheduler
from PIL import Image, ImageOps
from tqdm import tqdm

from llamafactory_vision.distributed import gather_to_main
from llamafactory_vision.editing.diffusion import DiffusionParts
from llamafactory_vision.editing.metrics import ClipScorer, edit_metrics
from llamafactory_vision.editing.parts import EditRecord, get_parts
from llamafactory_vision.editing.pipeline import EditPipeline

GRID_ROWS = 8


def edit_grid(rows: list[tuple[Image.Image, Image.Image, Image.Image]], side: int) -> Image.Image:
    """Source | edited | target, one row per example, each cell ``side`` x ``side``."""
    grid = Image.new("RGB", (3 * side, len(rows) * side), "white")
    for r, cells in enumerate(rows):
        for c, cell in enumerate(cells):
            grid.paste(ImageOps.fit(cell.convert("RGB"), (side, side)), (c * side, r * side))
    return grid


@dataclass(frozen=True)
class EditedRow:
    """One edited eval row, as gathered across processes: its index, the edited image as PNG bytes and its line of
    ``generated_predictions.jsonl`` (without the image path, which the writing process adds)."""

    index: int
    png: bytes
    line: dict


def predict_edits(trainer, dataset, tokenizer_module, parts: DiffusionParts, record: EditRecord, finetuning_args):
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    head, attached = get_parts(model, parts.scheduler)
    pipe = EditPipeline(
        mllm=model,
        processor=tokenizer_module["processor"],
        edit_head=head,
        unet=attached.unet,
        vae=attached.vae,
        scheduler=EulerAncestralDiscreteScheduler.from_config(parts.scheduler.config),
        template=record.template,
    )
    rank, world = trainer.args.process_index, trainer.args.world_size
    mine = edit_rows(pipe, dataset, range(rank, len(dataset), world), record, finetuning_args, trainer.args.seed,
                     progress=trainer.is_local_process_zero())  # fmt: skip
    edited = gather_to_main(mine, world)
    if edited is not None:
        edited.sort(key=lambda row: row.index)
        metrics = write_predictions(edited, len(dataset), Path(trainer.args.output_dir), record, finetuning_args)
        trainer.save_metrics("predict", {f"predict_{k}": v for k, v in metrics.items()})
        trainer.log_metrics("predict", {f"predict_{k}": v for k, v in metrics.items()})
    trainer.accelerator.wait_for_everyone()


def edit_rows(
    pipe: EditPipeline, dataset, indices: range, record: EditRecord, finetuning_args, seed: int, progress: bool = True
) -> list[EditedRow]:
    """Edit the rows ``indices`` of ``dataset``, row ``i`` with the generator seeded ``seed + i``."""
    pipe.set_progress_bar_config(disable=True)
    edited = []
    for i in tqdm(indices, desc="Editing eval images", disable=not progress):
        row = dataset[i]
        with Image.open(row["edit_source"]) as image:
            source = image.convert("RGB")
        result = pipe(
            source,
            row["edit_instruction"],
            num_inference_steps=finetuning_args.edit_num_inference_steps,
            text_guidance_scale=finetuning_args.edit_text_guidance,
            image_guidance_scale=finetuning_args.edit_image_guidance,
            resolution=record.resolution,
            max_new_tokens=finetuning_args.edit_max_new_tokens,
            generator=torch.Generator().manual_seed(seed + i),
        )
        png = io.BytesIO()
        result.images[0].save(png, format="PNG")
        edited.append(EditedRow(i, png.getvalue(), {
            "source": row["edit_source"], "target": row["edit_target"], "instruction": row["edit_instruction"],
            "target_caption": row["edit_caption"], "predict": result.expressive[0],
        }))  # fmt: skip
    return edited


def write_predictions(edited: list[EditedRow], num_rows: int, out: Path, record: EditRecord, finetuning_args) -> dict:
    """Write ``edited/``, ``generated_predictions.jsonl`` and ``edit_grid.png`` from the gathered rows (every row
    of the eval set once, in row order) and return the edit metrics."""
    if [row.index for row in edited] != list(range(num_rows)):  # each process must have edited its own share
        raise RuntimeError(f"edit predict gathered {len(edited)} rows for an eval set of {num_rows}.")
    (out / "edited").mkdir(parents=True, exist_ok=True)
    outputs, targets, captions, grid_rows, lines = [], [], [], [], []
    for row in edited:
        path = out / "edited" / f"{row.index:05d}.png"
        path.write_bytes(row.png)
        with Image.open(io.BytesIO(row.png)) as image:
            outputs.append(image.convert("RGB"))
        with Image.open(row.line["target"]) as image:
            targets.append(image.convert("RGB"))
        captions.append(row.line["target_caption"] or None)
        if len(grid_rows) < GRID_ROWS:
            with Image.open(row.line["source"]) as image:
                grid_rows.append((image.convert("RGB"), outputs[-1], targets[-1]))
        lines.append({**row.line, "image": str(path)})
    with open(out / "generated_predictions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    edit_grid(grid_rows, record.resolution).save(out / "edit_grid.png")
    clip = ClipScorer(finetuning_args.edit_clip_model) if finetuning_args.edit_clip_model else None
    return edit_metrics(outputs, targets, captions, clip=clip)
