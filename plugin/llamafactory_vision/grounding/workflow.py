"""SFT with a grounding template: the host's SFT workflow, with IoU metrics in evaluate/predict.

Mirrors ``llamafactory.train.sft.workflow.run_sft`` step for step (the host offers no seam to change its metric);
what differs is marked ``# grounding:``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_dataset, get_template_and_fix_tokenizer
from llamafactory.extras.constants import IGNORE_INDEX
from llamafactory.extras.logging import get_logger
from llamafactory.extras.misc import calculate_tps
from llamafactory.extras.ploting import plot_loss
from llamafactory.model import load_model, load_tokenizer
from llamafactory.train.sft.metric import ComputeAccuracy, ComputeSimilarity, eval_logit_processor
from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
from llamafactory.train.trainer_utils import create_modelcard_and_push

from llamafactory_vision.grounding.metrics import GroundingMetricAccumulator

logger = get_logger(__name__)


@dataclass
class ComputeGroundingMetrics:
    """ROUGE/BLEU from the host's ``ComputeSimilarity`` plus acc@0.5, acc@0.75, mIoU on the decoded boxes."""

    tokenizer: object
    similarity: ComputeSimilarity = field(init=False)
    boxes: GroundingMetricAccumulator = field(init=False, default_factory=GroundingMetricAccumulator)

    def __post_init__(self):
        self.similarity = ComputeSimilarity(tokenizer=self.tokenizer)

    def __call__(self, eval_preds, compute_result: bool = True) -> dict[str, float] | None:
        pad = self.tokenizer.pad_token_id
        preds = np.where(eval_preds.predictions != IGNORE_INDEX, eval_preds.predictions, pad)
        labels = np.where(eval_preds.label_ids != IGNORE_INDEX, eval_preds.label_ids, pad)
        self.boxes.update(
            self.tokenizer.batch_decode(preds, skip_special_tokens=True),
            self.tokenizer.batch_decode(labels, skip_special_tokens=True),
        )
        text_scores = self.similarity(eval_preds, compute_result=compute_result)
        if compute_result:
            return {**text_scores, **self.boxes.compute()}
        return None


def run_grounding_sft(model_args, data_args, training_args, finetuning_args, generating_args, callbacks=None):
    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    dataset_module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    model = load_model(tokenizer, model_args, finetuning_args, training_args.do_train)

    data_collator = SFTDataCollatorWith4DAttentionMask(
        template=template,
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
    if training_args.predict_with_generate:
        metric_module["compute_metrics"] = ComputeGroundingMetrics(tokenizer=tokenizer)  # grounding: IoU metrics
    elif finetuning_args.compute_accuracy:
        metric_module["compute_metrics"] = ComputeAccuracy()
        metric_module["preprocess_logits_for_metrics"] = eval_logit_processor

    gen_kwargs = generating_args.to_dict(obey_generation_config=True)
    # grounding: stop on the template's stop words only. The host adds every additional special token as an EOS id,
    # and Qwen-VL tokenizers list <|object_ref_start|> and <|box_start|> among them: generation would stop at the box.
    stop_ids = [tokenizer.eos_token_id] + tokenizer.convert_tokens_to_ids(template.stop_words)
    gen_kwargs["eos_token_id"] = list(dict.fromkeys(stop_ids))
    gen_kwargs["pad_token_id"] = tokenizer.pad_token_id

    trainer = CustomSeq2SeqTrainer(
        model=model,
        args=training_args,
        finetuning_args=finetuning_args,
        data_collator=data_collator,
        callbacks=callbacks,
        gen_kwargs=gen_kwargs,
        **dataset_module,
        **tokenizer_module,
        **metric_module,
    )

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        if finetuning_args.include_effective_tokens_per_second:
            train_result.metrics["effective_tokens_per_sec"] = calculate_tps(
                dataset_module["train_dataset"], train_result.metrics, stage="sft"
            )
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        if trainer.is_world_process_zero() and finetuning_args.plot_loss:
            plot_loss(training_args.output_dir, keys=["loss", "eval_loss", "eval_accuracy"])

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
