"""``llamafactory-vision preview``: run the real data pipeline of a training or predict YAML and draw the target boxes.

For each sample the boxes are decoded back from the *tokenized target text* (not from the dataset file), so the
picture shows exactly what the model is trained to say (or, for the eval set, what its predictions are scored
against), on the image as the model sees it.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import yaml
from llamafactory.extras.constants import IGNORE_INDEX

from llamafactory_vision.boxes import denormalize_xyxy, model_view_size
from llamafactory_vision.grounding.formats import get_codec, parse_answer
from llamafactory_vision.grounding.plugin import original_size
from llamafactory_vision.grounding.templates import get_grounding_spec
from llamafactory_vision.grounding.visualize import draw_boxes

SPLITS = ("train", "eval")


def _load_pipeline(config_path: str, workdir: str, n: int, split: str | None):
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    config = yaml.safe_load(Path(config_path).read_text())
    if split is None:  # a predict YAML names only an `eval_dataset`
        split = "train" if config.get("dataset") else "eval"
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    # Only the data pipeline runs: no checkpoint is written, and the YAML's output_dir is left untouched.
    config.update(output_dir=workdir, overwrite_output_dir=True, report_to="none")
    if split == "train":
        config["do_train"] = True
    else:
        if not config.get("eval_dataset"):
            raise ValueError(f"{config_path}: previewing the eval set needs `eval_dataset` in the YAML.")
        # Tokenized as for evaluation with targets (the supervised layout: prompt masked in `labels`), one merged set.
        config.update(do_train=False, do_eval=True, do_predict=False, predict_with_generate=False)
        config.update(eval_on_each_dataset=False)
        config.pop("dataset", None)
    config["max_samples"] = min(n, config.get("max_samples") or n)  # tokenize only the rows to draw
    config.pop("resume_from_checkpoint", None)
    model_args, data_args, training_args, _, _ = get_train_args(config)
    spec = get_grounding_spec(data_args.template)
    if spec is None:
        raise ValueError(f"{config_path}: `template: {data_args.template}` is not a grounding template.")
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    dataset = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    return spec, template, tokenizer_module, dataset[f"{split}_dataset"]


def _collapse_runs(text: str, token: str) -> str:
    """Shorten the hundreds of repeated image tokens in a decoded prompt to ``<token>*N``."""
    return re.sub(f"(?:{re.escape(token)})+", lambda m: f"{token}*{len(m.group(0)) // len(token)}", text)


def preview(config_path: str, out_dir: str, n: int = 16, split: str | None = None) -> Path:
    """Write ``out_dir/{i:05d}.png`` and ``out_dir/preview.jsonl`` for the first ``n`` samples of ``split``
    (``train`` or ``eval``; default: ``train`` when the YAML names a ``dataset``, else its ``eval_dataset``).

    jsonl rows: ``messages`` (decoded prompt and target), ``model_image_size`` [w, h], ``boxes_model`` (xyxy pixels of
    the model-view image) and ``boxes_original`` (xyxy pixels of the original image).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        spec, template, tokenizer_module, dataset = _load_pipeline(config_path, workdir, n, split)
    tokenizer, processor = tokenizer_module["tokenizer"], tokenizer_module["processor"]
    codec = get_codec(spec.box_family)
    rows = []
    for i, sample in enumerate(dataset.select(range(min(n, len(dataset))))):
        path = sample["images"][0]
        width, height = original_size(path)
        model_size = model_view_size(width, height, processor)
        target_ids = [t for t in sample["labels"] if t != IGNORE_INDEX]
        target = tokenizer.decode(target_ids, skip_special_tokens=False)
        prompt_ids = [t for t, label in zip(sample["input_ids"], sample["labels"]) if label == IGNORE_INDEX]
        prompt = _collapse_runs(
            tokenizer.decode(prompt_ids, skip_special_tokens=False), template.mm_plugin.image_token
        )
        parsed = parse_answer(target)
        labels = [ref or "" for ref in parsed.refs]
        if parsed.failed:  # task `reg`: the box is the region in the prompt, the target is its name
            parsed = parse_answer(prompt)
            labels = [tokenizer.decode(target_ids, skip_special_tokens=True).strip()] * len(parsed.boxes)
        norm = [codec.decode_box(box, model_size) for box in parsed.boxes]
        boxes_model = [list(denormalize_xyxy(b, model_size)) for b in norm]
        boxes_original = [list(denormalize_xyxy(b, (width, height))) for b in norm]

        image = template.mm_plugin._regularize_images(
            [path],
            image_max_pixels=getattr(processor, "image_max_pixels", 768 * 768),
            image_min_pixels=getattr(processor, "image_min_pixels", 32 * 32),
        )["images"][0]
        image = image.resize(model_size)
        draw_boxes(image, boxes_model, color=(0, 200, 0), labels=labels).save(out / f"{i:05d}.png")
        rows.append(
            {
                "image": path,
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": target}],
                "model_image_size": list(model_size),
                "boxes_model": boxes_model,
                "boxes_original": boxes_original,
            }
        )
    with open(out / "preview.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return out
