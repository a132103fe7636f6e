"""``do_predict`` with ``stage: edit``: edit every eval row with the trained model, the host's way.

Writes into ``output_dir``: ``edited/{i:05d}.png`` (row i of the eval set), ``generated_predictions.jsonl`` (the
expressive instruction per row), ``edit_grid.png`` (source | edited | target, first rows) and the edit metrics
(``predict_l1``, ``predict_l2`` and, with ``edit_clip_model``, ``predict_clip_i``/``predict_clip_t``) into
``predict_results.json`` through the trainer's ``save_metrics``. Runs on the main process (the others wait).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import EulerAncestralDiscreteScheduler
from PIL import Image, ImageOps
from tqdm import tqdm

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


def predict_edits(trainer, dataset, tokenizer_module, parts: DiffusionParts, record: EditRecord, finetuning_args):
    out = Path(trainer.args.output_dir)
    if trainer.is_world_process_zero():
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
        metrics = _predict(pipe, dataset, out, record, finetuning_args, trainer.args.seed)
        trainer.save_metrics("predict", {f"predict_{k}": v for k, v in metrics.items()})
        trainer.log_metrics("predict", {f"predict_{k}": v for k, v in metrics.items()})
    trainer.accelerator.wait_for_everyone()


def _predict(pipe: EditPipeline, dataset, out: Path, record: EditRecord, finetuning_args, seed: int) -> dict:
    (out / "edited").mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    outputs, targets, captions, grid_rows, lines = [], [], [], [], []
    for i, row in enumerate(tqdm(dataset, desc="Editing eval images")):
        source = Image.open(row["edit_source"]).convert("RGB")
        target = Image.open(row["edit_target"]).convert("RGB")
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
        edited = result.images[0]
        path = out / "edited" / f"{i:05d}.png"
        edited.save(path)
        outputs.append(edited)
        targets.append(target)
        captions.append(row["edit_caption"] or None)
        if len(grid_rows) < GRID_ROWS:
            grid_rows.append((source, edited, target))
        lines.append({
            "source": row["edit_source"], "target": row["edit_target"], "instruction": row["edit_instruction"],
            "target_caption": row["edit_caption"], "predict": result.expressive[0], "image": str(path),
        })  # fmt: skip
    with open(out / "generated_predictions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    edit_grid(grid_rows, record.resolution).save(out / "edit_grid.png")
    clip = ClipScorer(finetuning_args.edit_clip_model) if finetuning_args.edit_clip_model else None
    return edit_metrics(outputs, targets, captions, clip=clip)
