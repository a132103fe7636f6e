"""``stage: edit``: what ``llamafactory-cli train`` runs for it (dispatched from ``_training_function``, patches.py).

:func:`run_edit_stage` mirrors the host's ``train.tuner._training_function`` (argument parsing, the same callbacks,
process-group teardown); :func:`run_edit` mirrors ``train.sft.workflow.run_sft`` with our dataset processor,
collator and trainer, and ``do_predict`` writing edited images (predict.py).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.extras.constants import IGNORE_INDEX
from llamafactory.extras.ploting import plot_loss
from llamafactory.hparams import get_train_args
from llamafactory.model import load_model, load_tokenizer
from llamafactory.train.callbacks import LogCallback, ReporterCallback
from llamafactory.train.trainer_utils import create_modelcard_and_push
from transformers import EarlyStoppingCallback
from transformers.integrations import is_deepspeed_zero3_enabled

from llamafactory_vision.editing.args import EDIT_STAGE
from llamafactory_vision.editing.data import EditCollator
from llamafactory_vision.editing.parts import EditRecord, attach_parts, parts_dir
from llamafactory_vision.editing.tokens import img_token_ids, with_img_tokens
from llamafactory_vision.editing.trainer import LOG_KEYS, EditLossConfig, EditTrainer
from llamafactory_vision.log import get_logger

logger = get_logger(__name__)


def run_edit_stage(config: dict[str, Any]) -> None:
    """``_training_function`` for ``stage: edit`` (host callbacks: logging, early stopping, web UI reporter)."""
    callbacks: list[Any] = config.get("callbacks")
    model_args, data_args, training_args, finetuning_args, generating_args = get_train_args(config.get("args"))
    callbacks.append(LogCallback())
    if finetuning_args.early_stopping_steps is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=finetuning_args.early_stopping_steps))
    callbacks.append(ReporterCallback(model_args, data_args, finetuning_args, generating_args))  # add to last
    run_edit(model_args, data_args, training_args, finetuning_args, generating_args, callbacks)
    if dist.is_initialized():
        dist.destroy_process_group()


def check_edit_predict(training_args) -> None:
    """Refuse ``do_predict`` under DeepSpeed ZeRO-3 at start-up: every forward pass of a partitioned model is a
    collective, which the processes' edits (generations of different lengths, different row counts) cannot keep in
    step, so prediction would hang instead of failing.

    Raises:
        ValueError: naming the setting and the separate predict run to use instead.
    """
    if training_args.do_predict and is_deepspeed_zero3_enabled():
        raise ValueError(
            "`stage: edit` cannot `do_predict` under DeepSpeed ZeRO-3 (`deepspeed` points at a stage-3 config): "
            "train with it, then predict in a separate run with `deepspeed: null` and `adapter_name_or_path` (or "
            "`model_name_or_path` after full fine-tuning) set to the training output_dir."
        )


def run_edit(model_args, data_args, training_args, finetuning_args, generating_args, callbacks=None):
    check_edit_predict(training_args)
    trainer, dataset_module, tokenizer_module, parts, record = build_edit_trainer(
        model_args, data_args, training_args, finetuning_args, callbacks
    )
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        if trainer.is_world_process_zero() and finetuning_args.plot_loss:
            plot_loss(training_args.output_dir, keys=["loss", "eval_loss", *LOG_KEYS, *(f"eval_{k}" for k in LOG_KEYS)])

    if training_args.do_eval:
        metrics = trainer.evaluate(metric_key_prefix="eval")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.do_predict:
        from llamafactory_vision.editing.predict import predict_edits

        predict_edits(trainer, dataset_module["eval_dataset"], tokenizer_module, parts, record, finetuning_args)

    create_modelcard_and_push(trainer, model_args, data_args, training_args, finetuning_args)


def build_edit_trainer(model_args, data_args, training_args, finetuning_args, callbacks=None):
    """Tokenizer (+ [IMG] tokens), template, dataset, model (+ edit head, UNet, VAE), collator and trainer of an edit
    run. Returns ``(trainer, dataset_module, tokenizer_module, parts, record)``."""
    model_args = with_img_tokens(model_args)  # [IMG0]..[IMG7] through the host's add_special_tokens
    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    dataset_module = get_dataset(template, model_args, data_args, training_args, stage=EDIT_STAGE, **tokenizer_module)
    model = load_model(tokenizer, model_args, finetuning_args, training_args.do_train)
    trained = parts_dir(model_args) if (model_args.adapter_name_or_path or not training_args.do_train) else None
    parts = attach_parts(
        model,
        finetuning_args.diffusion_model_name_or_path,
        trained,
        is_trainable=training_args.do_train,
        finetuning_args=finetuning_args,
        seed=training_args.seed,
    )
    record = EditRecord(
        diffusion_model_name_or_path=str(finetuning_args.diffusion_model_name_or_path),
        template=data_args.template,
        resolution=data_args.edit_resolution,
        num_inference_steps=finetuning_args.edit_num_inference_steps,
        text_guidance=finetuning_args.edit_text_guidance,
        image_guidance=finetuning_args.edit_image_guidance,
        max_new_tokens=finetuning_args.edit_max_new_tokens,
    )
    data_collator = EditCollator(
        template=template,
        model=model,
        pad_to_multiple_of=8 if training_args.do_train else None,
        label_pad_token_id=IGNORE_INDEX if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id,
        block_diag_attn=model_args.block_diag_attn,
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        compute_dtype=model_args.compute_dtype,
        resolution=data_args.edit_resolution,
        **tokenizer_module,
    )
    trainer = EditTrainer(
        model=model,
        args=training_args,
        finetuning_args=finetuning_args,
        data_collator=data_collator,
        callbacks=callbacks,
        edit_loss_config=EditLossConfig(
            finetuning_args.edit_diffusion_weight, finetuning_args.edit_cfg_dropout, tuple(img_token_ids(tokenizer))
        ),
        scheduler=parts.scheduler,
        record=record,
        **dataset_module,
        **tokenizer_module,
    )
    return trainer, dataset_module, tokenizer_module, parts, record
