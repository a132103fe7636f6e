"""The grounding SFT trainer: the host's ``CustomSeq2SeqTrainer`` plus the bbox head's loss, logs, save and predict.

Total loss = LM loss + ``bbox_loss_weight`` * (``bbox_l1_weight`` * L1 + ``bbox_giou_weight`` * (1 - GIoU)) over the
boxes of the batch (DETR weighting), normalised like the LM loss in every path the host takes (see
:meth:`GroundingTrainer._head_term`). ``lm_loss`` (the LM term as the host's ``loss`` averages it), ``bbox_l1`` and
``bbox_giou`` (means over the boxes seen since the last log) are logged beside ``loss``, from sums reduced across
processes. Predict rows carry their dataset index and label boxes as without the head (predict_trainer.py), plus the
head's boxes. With the head off this class is never used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from typing_extensions import override

from llamafactory_vision.boxes import bbox_regression_loss, box_convert
from llamafactory_vision.grounding.bbox_head import (
    HEAD_ATTR,
    HEAD_WEIGHTS,
    BBoxHead,
    find_box_spans,
    save_head,
    select_anchor,
)
from llamafactory_vision.grounding.formats import RELATIVE_SCALE
from llamafactory_vision.grounding.fused_loss import fused_bbox_regression_loss
from llamafactory_vision.grounding.head_data import BBOX_COLUMNS
from llamafactory_vision.grounding.head_rows import HeadBox, PredictRow
from llamafactory_vision.grounding.predict_trainer import GroundingPredictTrainer
from llamafactory_vision.log import get_logger
from llamafactory_vision.zero3 import gathered_state_dict

logger = get_logger(__name__)

# Sums kept per split between two logs, reduced across processes in one collective: the LM term (see compute_loss)
# and its count, then the head's L1 and 1 - GIoU summed over boxes, and the number of boxes.
_LM_SUM, _LM_COUNT, _L1_SUM, _GIOU_SUM, _BOXES = range(5)
# Token ids a Qwen-VL model reads as vision input; generated ones are masked before the head's forward pass.
_VISION_TOKEN_ATTRS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
# What the head's forward pass over prompt + generated text raises for a row it cannot read: transformers checks the
# image tokens against the image features (and other inputs) with ValueError. Such a row loses its head boxes only.
_HEAD_ROW_ERRORS = (ValueError,)
# Batch inputs with one entry per row (sliced to run one row alone); the image inputs are sliced per image.
_PER_ROW_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids")


@dataclass(frozen=True)
class BBoxLossConfig:
    loss_weight: float
    l1_weight: float
    giou_weight: float
    source: str
    fused: bool = False  # `bbox_fused_loss`: fused_bbox_regression_loss instead of bbox_regression_loss


def bbox_head_loss(
    head: torch.nn.Module, hidden: torch.Tensor, spans: torch.Tensor, targets: torch.Tensor, config: BBoxLossConfig
) -> dict[str, torch.Tensor]:
    """The head's loss terms for one batch, summed over its boxes: ``l1``, ``giou``, ``total`` (unweighted by
    ``loss_weight``) and ``boxes`` (their number).

    hidden: ``Tensor[B, L, H]`` last hidden states; spans: ``LongTensor[B, K, 2]`` (-1 = no box); targets:
    ``Tensor[B, K, 4]`` cxcywh in [0, 1]. With no box in the batch the terms are zeros still connected to the head's
    graph (DDP expects a gradient for every parameter).
    """  # fmt: skip
    anchors = select_anchor(spans, config.source)
    rows, slots = (anchors >= 0).nonzero(as_tuple=True)
    pred = head(hidden[rows, anchors[rows, slots]])
    loss_fn = fused_bbox_regression_loss if config.fused else bbox_regression_loss
    terms = loss_fn(pred, targets[rows, slots], config.l1_weight, config.giou_weight, reduction="sum")
    return {**terms, "boxes": torch.tensor(len(rows), device=pred.device)}


class GroundingTrainer(GroundingPredictTrainer):
    def __init__(self, *args, bbox_loss: BBoxLossConfig, box_pattern: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.bbox_loss = bbox_loss
        self.box_pattern = box_pattern
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._eval_prefix = "eval"
        self._boxes_in_step: torch.Tensor | None = None  # the box count matching the host's `num_items_in_batch`
        self._gathered_head: dict[str, torch.Tensor] | None = None

    def _head(self, model: torch.nn.Module) -> BBoxHead:
        return getattr(self.accelerator.unwrap_model(model), HEAD_ATTR)

    @override
    def _get_num_items_in_batch(self, batch_samples, device):
        """Count the boxes wherever the host counts its label tokens (``num_items_in_batch``; transformers calls
        this on every process for each optimizer step and each evaluation batch): over the micro-batches of the step
        and, with ``average_tokens_across_devices``, over every process."""
        num_items_in_batch = super()._get_num_items_in_batch(batch_samples, device)
        self._boxes_in_step = None
        if num_items_in_batch is not None and batch_samples and "bbox_spans" in batch_samples[0]:
            boxes = sum(int((batch["bbox_spans"][..., 0] >= 0).sum()) for batch in batch_samples)
            boxes = torch.tensor(boxes, device=device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                boxes = self.accelerator.gather(boxes).sum()
            self._boxes_in_step = boxes
        return num_items_in_batch

    def _host_divides_by_accumulation(self, num_items_in_batch) -> bool:
        # transformers' training_step divides the loss by the accumulation steps exactly in this case
        return (not self.model_accepts_loss_kwargs or num_items_in_batch is None) and self.compute_loss_func is None

    def _head_term(self, terms: dict[str, torch.Tensor], num_items_in_batch) -> torch.Tensor:
        """The head loss, normalised the way the host normalises the LM loss of this micro-batch.

        - Mean path (the host's default for VLMs, and evaluation): the LM loss is this micro-batch's token mean, then
          divided by the accumulation steps, and DDP averages gradients over processes; the head's is this
          micro-batch's box mean and goes through the same division and average.
        - Global path (``num_items_in_batch`` given: ``use_dft_loss``, ``use_eaft_loss``, models that take loss
          kwargs): the LM loss is a token sum over the global token count of the optimizer step, times the number
          of processes (undoing DDP's average); the head's is a box sum over the step's global box count, times the
          same factor. Gradients then equal those of one process on the whole global batch.
        """
        scaled_by_host = self.model_accepts_loss_kwargs or self.compute_loss_func is not None
        if num_items_in_batch is None or not scaled_by_host:  # evaluation passes no num_items_in_batch
            return terms["total"] / terms["boxes"].clamp_min(1)
        boxes = self._boxes_in_step if self._boxes_in_step is not None else terms["boxes"]
        factor = 1
        if self.args.average_tokens_across_devices:  # as transformers' compute_loss scales the LM loss
            factor = self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu
        return terms["total"] / boxes.to(terms["total"].device).clamp_min(1) * factor

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
        head_term = self._head_term(terms, num_items_in_batch)
        total = loss + self.bbox_loss.loss_weight * head_term.to(loss.dtype)

        # The host's `loss` log averages, over processes and micro-batches, the loss of each micro-batch, after its
        # division by the accumulation steps in the mean path only: the global path's LM term is scaled back here.
        lm_value = loss.detach().float()
        if model.training and not self._host_divides_by_accumulation(num_items_in_batch):
            lm_value = lm_value * self.current_gradient_accumulation_steps
        split = "train" if model.training else "eval"
        sums = torch.stack([lm_value, torch.ones_like(lm_value), terms["l1"].detach().float(),
                            terms["giou"].detach().float(), terms["boxes"].float()])  # fmt: skip
        self._metric_sums[split] = self._metric_sums.get(split, 0) + sums
        if return_outputs:
            outputs["hidden_states"] = None  # keep evaluation from gathering every layer's states as "logits"
            return total, outputs
        return total

    @override
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **gen_kwargs):
        self._eval_prefix = metric_key_prefix  # eval_on_each_dataset calls back with `eval_<name>`
        return super().evaluate(
            eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix, **gen_kwargs
        )

    @override
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the means of the stored sums. Every process calls ``log`` at the same points with the same keys, and
        reduces one fixed-size tensor there (zeros where it saw nothing), so no process can wait for another."""
        if "loss" in logs:
            split, prefix = "train", ""
        elif f"{self._eval_prefix}_loss" in logs:
            split, prefix = "eval", f"{self._eval_prefix}_"
        else:  # the end-of-training summary and other logs: nothing of ours to add
            return super().log(logs, *args, **kwargs)
        sums = self._metric_sums.pop(split, None)
        if sums is None:
            sums = torch.zeros(5)
        sums = self.accelerator.reduce(sums.to(self.args.device), reduction="sum").tolist()
        if sums[_LM_COUNT]:
            logs[f"{prefix}lm_loss"] = round(sums[_LM_SUM] / sums[_LM_COUNT], 4)
        if sums[_BOXES]:
            logs[f"{prefix}bbox_l1"] = round(sums[_L1_SUM] / sums[_BOXES], 4)
            logs[f"{prefix}bbox_giou"] = round(sums[_GIOU_SUM] / sums[_BOXES], 4)
        super().log(logs, *args, **kwargs)

    @override
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Every process runs save_model (only the main one runs _save): gather the head here, where a ZeRO-3
        # collective can run, and hand the full weights to _save.
        self._gathered_head = gathered_state_dict(self._head(self.model))
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._gathered_head = None

    @override
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        # The head is saved in its own file; keeping it out of model.safetensors keeps that file loadable as is.
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(f"{HEAD_ATTR}.")}
        super()._save(output_dir, state_dict=state_dict)
        save_head(self._head(self.model), output_dir, state=self._gathered_head)

    @override
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        head = self._head(model or self.model)
        head.load_state_dict(load_file(os.path.join(resume_from_checkpoint, HEAD_WEIGHTS)))

    @override
    def _load_best_model(self):
        """``load_best_model_at_end``: the host restores the best checkpoint's model or adapter; its head comes too.
        (Under DeepSpeed the host restores the whole engine, head included.)"""
        super()._load_best_model()
        if not self.is_deepspeed_enabled:
            path = os.path.join(self.state.best_model_checkpoint, HEAD_WEIGHTS)
            self._head(self.model).load_state_dict(load_file(path))

    @override
    def evaluation_loop(self, *args, **kwargs):
        self._metric_sums.pop("eval", None)  # a loss-only predict stores eval sums that no log reads
        return super().evaluation_loop(*args, **kwargs)

    @override
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        if self.args.predict_with_generate:  # generation takes prompts only; the eval loss keeps the box targets
            inputs = {k: v for k, v in inputs.items() if k not in BBOX_COLUMNS}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)

    def _generated_for_head(self, new_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Generated tokens as the head's forward pass reads them, and their attention mask: padding and any vision
        token the model generated (``<|image_pad|>``, ``<|vision_start|>``, ...) become masked padding, since the
        model would otherwise look for image features that do not exist."""
        pad = self.processing_class.pad_token_id
        config = self.accelerator.unwrap_model(self.model).config
        vision_ids = [getattr(config, attr) for attr in _VISION_TOKEN_ATTRS if getattr(config, attr, None) is not None]
        keep = (new_tokens != pad) & ~torch.isin(new_tokens, torch.tensor(vision_ids, device=new_tokens.device))
        return torch.where(keep, new_tokens, pad), keep.long()

    def _row_inputs(self, inputs, row: int, images: range) -> dict[str, torch.Tensor]:
        """The batch inputs of one row (its left padding kept, so positions are unchanged) and of its images."""
        out = {k: v[row : row + 1] for k, v in inputs.items() if k in _PER_ROW_INPUTS}
        grid = inputs["image_grid_thw"]
        patches = grid.prod(dim=-1).tolist()  # pixel_values has one line per patch, image after image
        start = sum(patches[: images.start])
        out["pixel_values"] = inputs["pixel_values"][start : start + sum(patches[images.start : images.stop])]
        out["image_grid_thw"] = grid[images.start : images.stop]
        return out

    @override
    def _generated_head_boxes(self, model, inputs, generated, row_ids) -> list[list[HeadBox] | None]:
        return self._head_boxes(model, inputs, generated, row_ids)

    @torch.no_grad()
    def _head_boxes(self, model, inputs, generated, row_ids=None) -> list[list[HeadBox] | None]:
        """Run the head at every box the model generated: one forward pass over prompt + generated tokens.

        Returns per row a list of ``{"xyxy_1000": [4 ints], "xyxy_model": [4 floats]}`` (0-1000 of the image, and
        pixels of the model-view image), or ``None`` for a row the forward pass cannot read (one of
        :data:`_HEAD_ROW_ERRORS`): the batch then runs again row by row, so that one bad row loses only its own head
        boxes (logged with its ``row_ids`` entry, the dataset row) and the predict run goes on.
        """
        try:
            return self._head_boxes_of(model, inputs, generated)
        except _HEAD_ROW_ERRORS as err:
            logger.warning(f"bbox head: the forward pass failed for a batch ({err}); running its rows one by one.")
        row_ids = row_ids if row_ids is not None else [-1] * generated.size(0)
        rows = []
        for i, images in enumerate(self._image_ranges(inputs["input_ids"])):
            try:
                (boxes,) = self._head_boxes_of(model, self._row_inputs(inputs, i, images), generated[i : i + 1])
            except _HEAD_ROW_ERRORS as err:
                where = f"row {row_ids[i]} (counting from 0)" if row_ids[i] >= 0 else "a row of unknown index"
                logger.warning(f"bbox head: no head boxes for {where}: {err}")
                boxes = None
            rows.append(boxes)
        return rows

    def _head_boxes_of(self, model, inputs, generated) -> list[list[HeadBox]]:
        """:meth:`_head_boxes` for a batch every row of which the forward pass reads."""
        prompt_len = inputs["input_ids"].size(1)
        new_tokens = generated[:, prompt_len:]
        read_tokens, read_mask = self._generated_for_head(new_tokens)
        full = {k: v for k, v in inputs.items() if k != "labels"}
        full["input_ids"] = torch.cat([inputs["input_ids"], read_tokens], dim=1)
        full["attention_mask"] = torch.cat([inputs["attention_mask"], read_mask], dim=1)
        if "mm_token_type_ids" in self.mm_processor.model_input_names:  # M-RoPE needs it for a plain forward
            type_ids = self.mm_processor.create_mm_token_type_ids(full["input_ids"].tolist())
            full["mm_token_type_ids"] = torch.tensor(type_ids, device=full["input_ids"].device)
        hidden = model(**full, output_hidden_states=True).hidden_states[-1]
        head = self._head(model)
        sizes = self._model_sizes(inputs)
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
            width, height = sizes[i]
            scale = torch.tensor([width, height, width, height], dtype=boxes.dtype)
            rows.append(
                [
                    {"xyxy_1000": (b * RELATIVE_SCALE).round().int().tolist(), "xyxy_model": (b * scale).tolist()}
                    for b in boxes
                ]
            )
        return rows

    @override
    def _traced_fields(self, predicted: PredictRow) -> dict:
        """``predict_boxes_head``; a row for which the head could not run has none and ``bbox_head_failed: true``."""
        if predicted.head is None:  # the head could not run for this row (logged at predict)
            return {"predict_boxes_head": [], "bbox_head_failed": True}
        return {"predict_boxes_head": predicted.head}
