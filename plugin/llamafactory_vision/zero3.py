"""Saving the modules we attach to the host's model (bbox head, edit head, UNet) under DeepSpeed ZeRO-3.

ZeRO-3 partitions every parameter of the engine's model, ours included: each rank keeps an empty placeholder per
parameter (marked by ``ds_id``), so ``module.state_dict()`` holds empty tensors and a file written from it loads
nothing. The weights are gathered first, as the host's ZeRO-3 save gathers the model's; the gather is a collective,
so every rank must run it (in ``save_model``, which every rank calls), while only the saving rank keeps the copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from torch import Tensor, nn


def gathered_parameters(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    """DeepSpeed's read-only gather of ZeRO-3 partitioned ``params`` (only a ZeRO-3 run has them, and deepspeed)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def gathered_state_dict(module: nn.Module, keep: bool = True) -> dict[str, Tensor]:
    """Full CPU copies of ``module``'s weights (``state_dict`` keys), gathered first when ZeRO-3 partitioned them.

    Args:
        module: any module; without partitioned parameters this is a plain copy of its state dict.
        keep: False on ranks that only take part in the gather and save nothing: they return ``{}`` instead of
            holding a CPU copy (a whole UNet per rank otherwise).
    """
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    with gathered_parameters(partitioned) if partitioned else contextlib.nullcontext():
        if not keep:
            return {}
        return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def require_full(state: Mapping[str, Tensor], what: str) -> None:
    """Refuse to save ZeRO-3 placeholders (empty tensors): the file would hold a module that loads nothing.

    Raises:
        ValueError: naming ``what`` and the empty keys.
    """
    empty = [key for key, value in state.items() if value.numel() == 0]
    if empty:
        raise ValueError(f"{what} weights {empty} are empty: gather them (zero3.gathered_state_dict) before saving.")
