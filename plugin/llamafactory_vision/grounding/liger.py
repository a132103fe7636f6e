"""``enable_liger_kernel`` (the host's key) with grounding templates: where it applies, and what is refused at start-up.

LLaMA-Factory 0.9.5 (``model/model_utils/liger_kernel.py``) patches Qwen2-VL and Qwen2.5-VL with Liger's kernels
(RoPE, RMSNorm, LayerNorm, SwiGLU and, for ``stage: sft``, the fused linear cross-entropy) before the model is built,
and has no branch for Qwen3-VL: there it logs a warning and trains without Liger. Read against liger-kernel's
``lce_forward`` for Qwen2-VL / Qwen2.5-VL: in training, with labels, it computes the LM loss from the last hidden
states chunk by chunk and returns **no logits**, but still returns ``hidden_states`` when asked, and passes the
host's ``num_items_in_batch`` to its loss as transformers' own loss does. So:

- grounding SFT without the head: works as in stock LLaMA-Factory; token ids, labels and batches are untouched
  (Liger changes kernels only, so losses match the unfused path to kernel precision, not bit for bit);
- with ``bbox_head: true``: works; the head reads ``outputs.hidden_states[-1]``, which the fused forward returns, and
  normalises its loss against the same ``num_items_in_batch``;
- refused here: Qwen3-VL (the host would silently train without Liger), and ``use_dft_loss`` / ``use_eaft_loss``
  (the host's DFT/EAFT loss needs logits; given none it returns the plain cross-entropy, silently training another
  objective).

Liger's Triton kernels need a GPU; on a CPU only this start-up check can be tested.
"""

from __future__ import annotations

LIGER_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")  # grounding families the host patches with Liger's kernels


def validate_liger(model_args, finetuning_args, model_type: str) -> None:
    """Refuse ``enable_liger_kernel: true`` with a grounding template where the host would not apply it, or would
    train another loss than the one asked for (see the module docstring)."""
    if not getattr(model_args, "enable_liger_kernel", False):
        return
    if model_type not in LIGER_MODEL_TYPES:
        raise ValueError(
            f"`enable_liger_kernel: true` has no effect on {model_type!r} models in LLaMA-Factory 0.9.5 (its Liger "
            f"patches cover {', '.join(LIGER_MODEL_TYPES)} among the grounding families): training would run "
            "without Liger. Set `enable_liger_kernel: false`."
        )
    for key, loss in (("use_dft_loss", "DFT"), ("use_eaft_loss", "EAFT")):
        if finetuning_args.stage == "sft" and getattr(finetuning_args, key, False):
            raise ValueError(
                f"`enable_liger_kernel: true` does not support `{key}: true`: Liger's fused cross-entropy returns no "
                f"logits in training, and the host's {loss} loss then falls back to the plain "
                "cross-entropy. Set one of them to false."
            )
