"""The diffusion-coupled trainer of ``stage: edit``: the host's ``CustomSeq2SeqTrainer`` plus the edit loss.

Total loss = LM cross-entropy (the expressive instruction and the [IMG] tokens) + ``edit_diffusion_weight`` *
noise MSE of the UNet conditioned on the edit head's reading of the [IMG] hidden states. ``lm_loss`` and
``diffusion_loss`` are logged beside ``loss``. The edit head and UNet are saved beside the adapter in every
checkpoint (gathered first under DeepSpeed ZeRO-3), restored on resume and by ``load_best_model_at_end``.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from diffusers import DDPMScheduler
from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
from torch import nn
from typing_extensions import override

from llamafactory_vision.editing.diffusion import sample_generators
from llamafactory_vision.editing.loss import EditLossConfig, edit_loss
from llamafactory_vision.editing.parts import (
    EditRecord,
    get_parts,
    load_parts_into,
    part_states,
    save_parts,
    without_parts,
)

EDIT_INPUTS = ("edit_source_pixels", "edit_target_pixels", "edit_positions", "edit_keys")  # from EditCollator
LOG_KEYS = ("lm_loss", "diffusion_loss")


class EditTrainer(CustomSeq2SeqTrainer):
    def __init__(self, *args, edit_loss_config: EditLossConfig, scheduler: DDPMScheduler, record: EditRecord, **kwargs):
        super().__init__(*args, **kwargs)
        self.edit_loss_config = edit_loss_config
        self.noise_scheduler = scheduler
        self.record = record
        self._stored_metrics: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self._gathered_parts: dict[str, dict[str, torch.Tensor]] | None = None

    def _unwrapped(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    @override
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)  # the caller's batch is not changed
        edit_inputs = {key: inputs.pop(key) for key in EDIT_INPUTS}
        loss, outputs = super().compute_loss(
            model, {**inputs, "output_hidden_states": True}, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        unwrapped = self._unwrapped(model)
        head, parts = get_parts(unwrapped, self.noise_scheduler)
        keys = edit_inputs["edit_keys"].tolist()
        generators = sample_generators(self.args.seed, self.state.global_step, keys)
        diffusion = edit_loss(
            head, parts, outputs.hidden_states[-1], unwrapped.get_input_embeddings(), edit_inputs, generators,
            self.edit_loss_config,
        )  # fmt: skip
        # As in the grounding trainer: when the model took `num_items_in_batch`, the trainer does not divide the loss
        # by the accumulation steps, so a per-batch mean is scaled here to keep its weight; the LM loss is also
        # multiplied by the number of processes (token averaging across devices), which logging undoes.
        scale, lm_scale = 1.0, 1.0
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            scale = 1.0 / self.current_gradient_accumulation_steps
            lm_scale = float(self.current_gradient_accumulation_steps)
            if self.args.average_tokens_across_devices:
                lm_scale /= self.accelerator.num_processes
        total = loss + self.edit_loss_config.diffusion_weight * scale * diffusion.to(loss.dtype)

        split = "train" if model.training else "eval"
        self._stored_metrics[split]["lm_loss"].append(loss.detach().item() * lm_scale)
        self._stored_metrics[split]["diffusion_loss"].append(diffusion.detach().item())
        if return_outputs:
            outputs["hidden_states"] = None  # keep evaluation from gathering every layer's states as "logits"
            return total, outputs
        return total

    @override
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        split = "train" if "loss" in logs else "eval"
        prefix = "" if split == "train" else "eval_"
        stored = self._stored_metrics.pop(split, {})
        # Every compute_loss stores both keys, so every rank holds the same keys here: each gather is a collective.
        for key in LOG_KEYS if stored else ():
            mean = torch.tensor(stored[key]).mean().to(self.args.device)
            logs[prefix + key] = round(self.accelerator.gather_for_metrics(mean).mean().item(), 4)
        super().log(logs, *args, **kwargs)

    @override
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Every process runs save_model (only the main one runs _save): gather the parts here, where a ZeRO-3
        # collective can run, keep the copy on the saving process only, and hand it to _save.
        self._gathered_parts = part_states(self._unwrapped(self.model), keep=self.args.should_save)
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._gathered_parts = None

    @override
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if state_dict is None:
            state_dict = self._unwrapped(self.model).state_dict()
        super()._save(output_dir, state_dict=without_parts(state_dict))
        save_parts(self._unwrapped(self.model), output_dir, states=self._gathered_parts)
        self.record.save(output_dir)

    @override
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        load_parts_into(self._unwrapped(model or self.model), resume_from_checkpoint)

    @override
    def _load_best_model(self) -> None:
        """The best checkpoint's parts come back with its adapter or model. Under DeepSpeed the host restores the
        whole engine from its own checkpoint, parts included (and ZeRO-3 parameters are placeholders that
        ``load_state_dict`` cannot fill)."""
        super()._load_best_model()
        if not self.is_deepspeed_enabled:
            load_parts_into(self._unwrapped(self.model), self.state.best_model_checkpoint)

    @override
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        loss, _, _ = super().prediction_step(model, inputs, True, ignore_keys=ignore_keys, **gen_kwargs)
        return loss, None, None  # evaluation reports losses; edited images come from `do_predict` (workflow.py)
