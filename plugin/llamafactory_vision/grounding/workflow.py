"""SFT with a grounding template: the host's SFT workflow, with IoU metrics and the optional bbox head.

Mirrors ``llamafactory.train.sft.workflow.run_sft`` step for step (the host offers no seam to change its metric,
collator or trainer); what differs is marked ``# grounding:``. With ``bbox_head: false`` training is exactly the
host's (its dataset processor, collator and loss); generation (``predict_with_generate``) goes through
``GroundingPredictTrainer``, so that each generated row carries its dataset row index and label boxes, with or without
the head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_dataset, get_template_and_fix_tokenizer
from llamafactory.extras.constants import IGNORE_INDEX
from llamafactory.extras.misc import calculate_tps
from llamafactory.extras.ploting import plot_loss
from llamafactory.model import load_model, load_tokenizer
from llamafactory.train.sft.metric import ComputeAccuracy, ComputeSimilarity, eval_logit_processor
from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
from llamafactory.train.trainer_utils import create_modelcard_and_push, create_ref_model
from transformers import EvalPrediction

from llamafactory_vision.grounding.bbox_head import attach_head
from llamafactory_vision.grounding.formats import get_codec
from llamafactory_vision.grounding.head_data import BBOX_COLUMNS, BBOX_STAGE, ROWS_STAGE, GroundingBBoxCollator
from llamafactory_vision.grounding.head_rows import ROW_COLUMN, first_occurrences, unpack_head_rows
from llamafactory_vision.grounding.image_cache import MIB, with_image_cache
from llamafactory_vision.grounding.metrics import GroundingMetricAccumulator, head_boxes_for_family
from llamafactory_vision.grounding.predict_trainer import GroundingPredictTrainer
from llamafactory_vision.grounding.predictions import NORMALIZED_BOUNDS, normalize_row_boxes, score_normalized_row
from llamafactory_vision.grounding.templates import get_grounding_spec
from llamafactory_vision.grounding.trainer import BBoxLossConfig, GroundingTrainer
from llamafactory_vision.log import get_logger

logger = get_logger(f"llamafactory.{__name__}")  # under the host's library logger, so info lines show


# Generation settings recorded beside the scores: greedy and sampled IoU are not comparable.
DECODING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "num_beams", "max_new_tokens", "repetition_penalty")
_SAMPLING_KEYS = ("temperature", "top_p", "top_k")  # ignored by generate() when do_sample is off


def decoding_settings(gen_kwargs: dict) -> dict[str, float | int]:
    """``decoding_<key>`` for each of :data:`DECODING_KEYS` set in ``gen_kwargs`` (``do_sample`` as 0/1; the sampling
    keys only when sampling)."""
    sampling = bool(gen_kwargs.get("do_sample"))
    out: dict[str, float | int] = {}
    for key in DECODING_KEYS:
        value = gen_kwargs.get(key)
        if value is None or (key in _SAMPLING_KEYS and not sampling):
            continue
        out[f"decoding_{key}"] = int(value) if isinstance(value, (bool, int)) else float(value)
    return out


@dataclass
class ComputeGroundingMetrics:
    """ROUGE/BLEU from the host's ``ComputeSimilarity`` plus the box metrics of
    :mod:`llamafactory_vision.grounding.metrics`, and the decoding settings used (``decoding``, see
    :func:`decoding_settings`). A coordinate-space warning is logged when the answers look like another space.

    Box metrics are computed one of two ways:

    - ``predict_rows`` (what the workflow uses, with or without the head): the predictions are
      ``(tokens, packed rows)`` from ``GroundingPredictTrainer.prediction_step``, gathered with the tokens (see
      head_rows.py). Each row is scored as ``eval/ground_eval.py --images`` scores it
      (``predictions.score_normalized_row``): boxes in ``[0, 1]`` of the image, against the dataset's float label
      boxes (not the label text rounded to the family's grid); with ``head``, also the head's boxes, and
      ``head_failures`` for rows the head could not run for.
    - otherwise (a caller with token ids only): on the decoded texts alone, label boxes read from the label text, in
      the family's coordinates.
    """

    tokenizer: object
    family: str
    decoding: dict[str, float | int] = field(default_factory=dict)
    predict_rows: bool = False
    head: bool = False  # the rows carry bbox head boxes (``predict_rows`` only)
    similarity: ComputeSimilarity = field(init=False)
    boxes: GroundingMetricAccumulator = field(init=False)
    _seen_rows: set[int] = field(init=False, default_factory=set)

    def __post_init__(self):
        self.similarity = ComputeSimilarity(tokenizer=self.tokenizer)
        self.boxes = GroundingMetricAccumulator(self.family, NORMALIZED_BOUNDS if self.predict_rows else None)

    def __call__(self, eval_preds, compute_result: bool = True) -> dict[str, float] | None:
        predictions, rows = eval_preds.predictions, None
        if isinstance(predictions, tuple) != self.predict_rows:
            raise ValueError(f"predict_rows={self.predict_rows} but the predictions are a {type(predictions)}")
        if self.predict_rows:  # each row once: the sampler's repeats of an uneven split go
            predictions, packed = predictions
            rows = unpack_head_rows(packed)
            keep = first_occurrences([r.row for r in rows], self._seen_rows)
            rows = [rows[i] for i in keep]
            predictions = predictions[keep]
            eval_preds = EvalPrediction(predictions=predictions, label_ids=eval_preds.label_ids[keep])
        pad = self.tokenizer.pad_token_id
        preds = np.where(predictions != IGNORE_INDEX, predictions, pad)
        labels = np.where(eval_preds.label_ids != IGNORE_INDEX, eval_preds.label_ids, pad)
        preds = self.tokenizer.batch_decode(preds, skip_special_tokens=True)
        labels = self.tokenizer.batch_decode(labels, skip_special_tokens=True)
        if rows is None:
            self.boxes.update(preds, labels)
        else:
            codec = get_codec(self.family)
            for pred, label, row in zip(preds, labels, rows, strict=True):
                head_failed = self.head and row.head is None
                head = head_boxes_for_family(row.head, self.family) if self.head and not head_failed else None
                boxes = normalize_row_boxes(pred, label, codec, row.model_size, row.label, head)
                self.boxes.add(score_normalized_row(pred, label, boxes, head_failed=head_failed))
        text_scores = self.similarity(eval_preds, compute_result=compute_result)
        if compute_result:
            self._seen_rows.clear()
            box_scores = self.boxes.compute()
            if self.boxes.warning:
                logger.warning_rank0(f"grounding metrics: {self.boxes.warning}")
            return {**text_scores, **box_scores, **self.decoding}
        return None


def generation_stop_ids(tokenizer, template) -> list[int]:
    """EOS ids for generation: the tokenizer's EOS and the template's stop words.

    The host's ``run_sft`` adds every extra special token as an EOS id, and Qwen-VL tokenizers list
    ``<|object_ref_start|>`` and ``<|box_start|>`` among them: a grounding answer would stop at its first box.
    """
    stop_ids = [tokenizer.eos_token_id] + tokenizer.convert_tokens_to_ids(template.stop_words)
    return list(dict.fromkeys(stop_ids))


def run_grounding_sft(model_args, data_args, training_args, finetuning_args, generating_args, callbacks=None):
    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    head_on = finetuning_args.bbox_head
    stage = BBOX_STAGE if head_on else ROWS_STAGE  # grounding: box targets (head), label boxes (generation)
    dataset_module = get_dataset(template, model_args, data_args, training_args, stage=stage, **tokenizer_module)
    model = load_model(tokenizer, model_args, finetuning_args, training_args.do_train)
    family = get_grounding_spec(data_args.template).box_family

    ref_model = None
    if finetuning_args.use_asft_loss:
        ref_model = create_ref_model(model_args, finetuning_args)

    if getattr(model, "is_quantized", False) and not training_args.do_train:
        model._hf_peft_config_loaded = True  # as the host: makes a quantized model usable for prediction

    trainer_class, trainer_extra, collator_class = CustomSeq2SeqTrainer, {}, SFTDataCollatorWith4DAttentionMask
    if head_on:  # grounding: the bbox head
        head = attach_head(model, model_args, finetuning_args, training_args.do_train)
        if training_args.do_train:
            _check_box_columns(dataset_module["train_dataset"], data_args)
        _report_cut_boxes(dataset_module)
        trainer_class, collator_class = GroundingTrainer, GroundingBBoxCollator
        trainer_extra = {
            "bbox_loss": BBoxLossConfig(
                finetuning_args.bbox_loss_weight,
                finetuning_args.bbox_l1_weight,
                finetuning_args.bbox_giou_weight,
                head.config.source,
                finetuning_args.bbox_fused_loss,
            ),
            "box_pattern": get_codec(family).box_pattern,
        }
    elif training_args.predict_with_generate:  # grounding: generated rows carry their index and label boxes
        trainer_class, collator_class = GroundingPredictTrainer, GroundingBBoxCollator
    if training_args.predict_with_generate:  # each generated row carries its index through the gather
        dataset_module["eval_dataset"] = _with_row_index(dataset_module.get("eval_dataset"))

    data_collator = collator_class(
        template=with_image_cache(template, data_args.grounding_image_cache, data_args.grounding_image_cache_mib),
        model=model if not training_args.predict_with_generate else None,
        pad_to_multiple_of=8 if training_args.do_train else None,
        label_pad_token_id=IGNORE_INDEX if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id,
        block_diag_attn=model_args.block_diag_attn,
        neat_packing=data_args.neat_packing,
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        compute_dtype=model_args.compute_dtype,
        **tokenizer_module,
    )

    metric_module = {}
    if model_args.use_kt:
        if training_args.predict_with_generate:
            raise NotImplementedError("`predict_with_generate` is not supported in KTransformers SFT yet.")
        elif finetuning_args.compute_accuracy:
            raise NotImplementedError("`compute_accuracy` is not supported in KTransformers SFT yet.")

    if training_args.predict_with_generate:
        # grounding: IoU metrics
        metric_module["compute_metrics"] = ComputeGroundingMetrics(tokenizer, family, predict_rows=True, head=head_on)
    elif finetuning_args.compute_accuracy:
        metric_module["compute_metrics"] = ComputeAccuracy()
        metric_module["preprocess_logits_for_metrics"] = eval_logit_processor

    gen_kwargs = generating_args.to_dict(obey_generation_config=True)
    gen_kwargs["eos_token_id"] = generation_stop_ids(tokenizer, template)  # grounding: see its docstring
    gen_kwargs["pad_token_id"] = tokenizer.pad_token_id
    if training_args.predict_with_generate:
        metric_module["compute_metrics"].decoding = decoding_settings(gen_kwargs)  # grounding: recorded with scores

    if data_args.streaming:  # grounding: see the function's docstring
        _split_streamed_batches_per_process(training_args)
    trainer = trainer_class(
        model=model,
        args=training_args,
        finetuning_args=finetuning_args,
        data_collator=data_collator,
        callbacks=callbacks,
        gen_kwargs=gen_kwargs,
        ref_model=ref_model,
        **dataset_module,
        **tokenizer_module,
        **metric_module,
        **trainer_extra,
    )

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        _report_image_cache(data_collator, training_args)
        trainer.save_model()
        if finetuning_args.include_effective_tokens_per_second:
            train_result.metrics["effective_tokens_per_sec"] = calculate_tps(
                dataset_module["train_dataset"], train_result.metrics, stage="sft"
            )
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        if trainer.is_world_process_zero() and finetuning_args.plot_loss:
            keys = ["loss"]
            if isinstance(dataset_module.get("eval_dataset"), dict):
                keys += [f"eval_{key}_{metric}" for key in dataset_module["eval_dataset"] for metric in ("loss", "accuracy")]
            else:
                keys += ["eval_loss", "eval_accuracy"]
            if head_on:
                keys += ["lm_loss", "bbox_l1", "bbox_giou"]
            plot_loss(training_args.output_dir, keys=keys)

    if training_args.predict_with_generate:
        tokenizer.padding_side = "left"

    if training_args.do_eval:
        metrics = trainer.evaluate(metric_key_prefix="eval", **gen_kwargs)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.do_predict:
        predict_results = trainer.predict(dataset_module["eval_dataset"], metric_key_prefix="predict", **gen_kwargs)
        trainer.log_metrics("predict", predict_results.metrics)
        trainer.save_metrics("predict", predict_results.metrics)
        trainer.save_predictions(dataset_module["eval_dataset"], predict_results, generating_args.skip_special_tokens)

    create_modelcard_and_push(trainer, model_args, data_args, training_args, finetuning_args)


def _report_image_cache(data_collator, training_args) -> None:
    """Log what ``grounding_image_cache`` did in this process (the workers' own caches are out of reach)."""
    cache = getattr(data_collator.template.mm_plugin, "image_cache", None)
    if cache is None or training_args.dataloader_num_workers > 0:
        return
    counts = cache.counts
    logger.info_rank0(
        f"grounding_image_cache: {counts.hits} hits, {counts.misses} misses, {counts.uncached} uncached, "
        f"{counts.evictions} evictions; {len(cache)} images, {cache.nbytes / MIB:.1f} MiB held."
    )


def _split_streamed_batches_per_process(training_args) -> None:
    """With a streamed (iterable) dataset accelerate by default reads each batch on the main process and cuts every
    tensor along its first axis for the processes (``dispatch_batches``), even with one process: a Qwen-VL batch's
    ``pixel_values`` (image patches, not rows) then no longer match ``image_grid_thw`` and the vision tower fails.
    Each process reads its own rows instead (accelerate's ``IterableDatasetShard``)."""
    config = training_args.accelerator_config
    if config.dispatch_batches:
        raise ValueError(
            "`streaming: true` with a grounding template needs `accelerator_config: {dispatch_batches: false}`: "
            "dispatching cuts the batch's image patches as if they were rows."
        )
    if config.dispatch_batches is None:
        config.dispatch_batches = False
        logger.info_rank0("streaming: each process reads its own rows (accelerator_config.dispatch_batches = false).")


def _columns(dataset) -> list[str]:
    # an iterable (streaming) dataset may not know its columns after `map`: read them off its first row
    return list(dataset.column_names or next(iter(dataset)).keys())


def _check_box_columns(dataset, data_args) -> None:
    """Refuse a training set without the head's box columns (one tokenized by the host, or without the head, and
    reloaded from ``tokenized_path``): training on it would never train the head."""
    missing = [column for column in BBOX_COLUMNS if column not in _columns(dataset)]
    if missing:
        where = "the training set"
        if data_args.tokenized_path:
            where = f"the tokenized dataset in `tokenized_path: {data_args.tokenized_path}`"
        raise ValueError(
            f"`bbox_head: true` but {where} has no {', '.join(missing)} column(s): it was tokenized without the "
            "bbox head. Delete that folder (or point `tokenized_path` to a new one) so that the dataset is tokenized "
            "again with `bbox_head: true`."
        )


def _with_row_index(dataset):
    """The evaluation set(s) with column ``lfv_row``: each row's index in its set, from 0."""
    if dataset is None:
        return None
    if isinstance(dataset, dict):  # eval_on_each_dataset
        return {name: _with_row_index(d) for name, d in dataset.items()}
    if hasattr(dataset, "add_column") and dataset.column_names is not None:
        return dataset.add_column(ROW_COLUMN, list(range(len(dataset))))
    return dataset.map(lambda _, index: {ROW_COLUMN: index}, with_indices=True)


def _report_cut_boxes(dataset_module) -> None:
    splits = []
    for split, dataset in dataset_module.items():
        if isinstance(dataset, dict):  # eval_on_each_dataset: one eval split per dataset
            splits += [(f"{split}/{name}", d) for name, d in dataset.items()]
        elif dataset is not None:
            splits.append((split, dataset))
    for split, dataset in splits:
        if "bbox_cut" not in _columns(dataset):
            continue
        if not hasattr(dataset, "__len__"):  # streaming: rows are tokenized as training reads them
            logger.warning_rank0(
                f"bbox head: with `streaming: true` the boxes that `cutoff_len` cuts off in the {split} split cannot "
                "be counted before training; they are not trained by the head. Check with a non-streaming run or "
                "`llamafactory-vision preview` that cutoff_len keeps them."
            )
            continue
        cut = sum(dataset["bbox_cut"])
        if cut:
            logger.warning_rank0(
                f"bbox head: {cut} box(es) in the {split} split were cut off by `cutoff_len` and are not trained "
                "by the head (raise cutoff_len to keep them)."
            )
