"""The grounding SFT trainer: the host's ``CustomSeq2SeqTrainer`` plus the bbox head's loss, logs, save and predict.

Total loss = LM loss + ``bbox_loss_weight`` * (``bbox_l1_weight`` * L1 + ``bbox_giou_weight`` * (1 - GIoU)) over the
boxes of the batch (DETR weighting). ``lm_loss``, ``bbox_l1`` and ``bbox_giou`` are logged beside ``loss``.
With the head off this class is never used: the workflow builds the host's trainer.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass

import torch
from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
from safetensors.torch import load_file
from typing_extensions import override

from llamafactory_vision.boxes import bbox_regression_loss, box_convert
from llamafactory_vision.grounding.bbox_head import HEAD_ATTR, HEAD_WEIGHTS, find_box_spans, save_head, select_anchor
from llamafactory_vision.grounding.formats import RELATIVE_SCALE
from llamafactory_vision.grounding.head_data import BBOX_COLUMNS


@dataclass(frozen=True)
class BBoxLossConfig:
    loss_weight: float
    l1_weight: float
    giou_weight: float
    source: str


def bbox_head_loss(
    head: torch.nn.Module, hidden: torch.Tensor, spans: torch.Tensor, targets: torch.Tensor, config: BBoxLossConfig
) -> dict[str, torch.Tensor]:
    """The head's loss terms for one batch (``l1``, ``giou``, ``total``, unweighted by ``loss_weight``).

    hidden: ``Tensor[B, L, H]`` last hidden states; spans: ``LongTensor[B, K, 2]`` (-1 = no box); targets:
    ``Tensor[B, K, 4]`` cxcywh in [0, 1]. With no box in the batch the terms are zeros still connected to the head's
    graph (DDP expects a gradient for every parameter).
    """  # fmt: skip
    anchors = select_anchor(spans, config.source)
    rows, slots = (anchors >= 0).nonzero(as_tuple=True)
    pred = head(hidden[rows, anchors[rows, slots]])
    return bbox_regression_loss(pred, targets[rows, slots], config.l1_weight, config.giou_weight)


class GroundingTrainer(CustomSeq2SeqTrainer):
    def __init__(self, *args, bbox_loss: BBoxLossConfig, box_pattern: str, **kwargs):
        self.mm_processor = kwargs["processor"]
        super().__init__(*args, **kwargs)
        self.bbox_loss = bbox_loss
        self.box_pattern = box_pattern
        self._stored_metrics: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.predicted_head_boxes: list[list[dict[str, list[float]]]] = []

    def _head(self, model: torch.nn.Module) -> torch.nn.Module:
        return getattr(self.accelerator.unwrap_model(model), HEAD_ATTR)

    @override
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)  # the caller's batch is not changed
        spans, targets = inputs.pop("bbox_spans", None), inputs.pop("bbox_targets", None)
        if spans is None:  # generation batches carry prompts only
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(
            model, {**inputs, "output_hidden_states": True}, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        terms = bbox_head_loss(self._head(model), outputs.hidden_states[-1], spans, targets, self.bbox_loss)
        # The trainer divides the loss by the accumulation steps unless the model took `num_items_in_batch`; a
        # per-batch mean must be scaled the same way to keep its weight under gradient accumulation.
        scale = 1.0
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            scale = 1.0 / self.current_gradient_accumulation_steps
        total = loss + self.bbox_loss.loss_weight * scale * terms["total"].to(loss.dtype)

        split = "train" if model.training else "eval"
        self._stored_metrics[split]["lm_loss"].append(loss.detach().item())
        if (spans[..., 0] >= 0).any():
            self._stored_metrics[split]["bbox_l1"].append(terms["l1"].detach().item())
            self._stored_metrics[split]["bbox_giou"].append(terms["giou"].detach().item())
        if return_outputs:
            outputs["hidden_states"] = None  # keep evaluation from gathering every layer's states as "logits"
            return total, outputs
        return total

    @override
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        split = "train" if "loss" in logs else "eval"
        prefix = "" if split == "train" else "eval_"
        for key, values in self._stored_metrics.pop(split, {}).items():
            if values:
                mean = torch.tensor(values).mean()
                logs[prefix + key] = round(
                    self.accelerator.gather_for_metrics(mean.to(self.args.device)).mean().item(), 4
                )
        super().log(logs, *args, **kwargs)

    @override
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        # The head is saved in its own file; keeping it out of model.safetensors keeps that file loadable as is.
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(f"{HEAD_ATTR}.")}
        super()._save(output_dir, state_dict=state_dict)
        save_head(self._head(self.model), output_dir)

    @override
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        head = self._head(model or self.model)
        head.load_state_dict(load_file(os.path.join(resume_from_checkpoint, HEAD_WEIGHTS)))

    @override
    def evaluation_loop(self, *args, **kwargs):
        self.predicted_head_boxes.clear()  # one list per evaluate/predict call; the metric reads it by reference
        return super().evaluation_loop(*args, **kwargs)

    @override
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        if self.args.predict_with_generate:  # generation takes prompts only; the eval loss keeps the box targets
            inputs = {k: v for k, v in inputs.items() if k not in BBOX_COLUMNS}
        loss, generated, labels = super().prediction_step(
            model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs
        )
        if generated is not None and self.args.predict_with_generate:
            self.predicted_head_boxes.extend(self._head_boxes(model, inputs, generated))
        return loss, generated, labels

    @torch.no_grad()
    def _head_boxes(self, model, inputs, generated) -> list[list[dict[str, list[float]]]]:
        """Run the head at every box the model generated: one forward pass over prompt + generated tokens.

        Returns per row a list of ``{"xyxy_1000": [4 ints], "xyxy_model": [4 floats]}`` (0-1000 of the image, and
        pixels of the model-view image).
        """
        prompt_len = inputs["input_ids"].size(1)
        pad = self.processing_class.pad_token_id
        new_tokens = generated[:, prompt_len:]
        full = {k: v for k, v in inputs.items() if k != "labels"}
        full["input_ids"] = torch.cat([inputs["input_ids"], new_tokens], dim=1)
        full["attention_mask"] = torch.cat([inputs["attention_mask"], (new_tokens != pad).long()], dim=1)
        if "mm_token_type_ids" in self.mm_processor.model_input_names:  # M-RoPE needs it for a plain forward
            type_ids = self.mm_processor.create_mm_token_type_ids(full["input_ids"].tolist())
            full["mm_token_type_ids"] = torch.tensor(type_ids, device=full["input_ids"].device)
        hidden = model(**full, output_hidden_states=True).hidden_states[-1]
        head = self._head(model)
        grid = inputs["image_grid_thw"]
        patch = self.mm_processor.image_processor.patch_size
        rows = []
        for i in range(new_tokens.size(0)):
            # every generated position, pads included, so that span indices stay positions in `hidden`
            texts = [self.processing_class.decode([t]) for t in new_tokens[i].tolist()]
            spans = find_box_spans(texts, self.box_pattern)
            if not spans:
                rows.append([])
                continue
            anchors = select_anchor(torch.tensor(spans), self.bbox_loss.source) + prompt_len
            boxes = box_convert(head(hidden[i, anchors]).float(), "cxcywh", "xyxy").clamp(0, 1).cpu()
            width, height = (grid[i, 2] * patch).item(), (grid[i, 1] * patch).item()
            scale = torch.tensor([width, height, width, height], dtype=boxes.dtype)
            rows.append(
                [
                    {"xyxy_1000": (b * RELATIVE_SCALE).round().int().tolist(), "xyxy_model": (b * scale).tolist()}
                    for b in boxes
                ]
            )
        return rows

    @override
    def save_predictions(self, dataset, predict_results, skip_special_tokens=True) -> None:
        super().save_predictions(dataset, predict_results, skip_special_tokens)
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "generated_predictions.jsonl")
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(
                json.dumps({**row, "predict_boxes_head": boxes}, ensure_ascii=False) + "\n"
                for row, boxes in zip(rows, self.predicted_head_boxes, strict=True)
            )
