"""Host paths that bypass the grounding workflow, checked at start-up (called from ``hparams.validate_parsed_args``).

Grounding rows become text in our plugin's ``process_messages`` (called by the host's supervised, unsupervised,
pairwise and feedback processors), and IoU metrics and the bbox head live in our SFT workflow
(``patches.dispatch_sft``). LLaMA-Factory picks a training function by ``stage`` and by launcher settings; a path that
reaches neither would train on raw box markers, or drop the metrics and the head without a word. Each such path is
refused here, naming the setting:

================================  ====================================  ===========================================
path                              ``formatting: grounding`` dataset     grounding template, IoU metrics, bbox head
================================  ====================================  ===========================================
``stage: sft``                    rendered (our workflow)               all supported
``stage: ppo``                    prompts rendered (unsupervised proc.)  template ok; ``bbox_head`` refused (hparams)
``stage: pt`` (also ``USE_MCA``)  refused: reads prompt text only       template ok (stock data has no markers)
``stage: rm``/``dpo``/``kto``     refused: one answer, no pair/tag      template ok with ranked / kto stock data
``use_hyper_parallel: true``      training rendered                     generate-predict and ``bbox_head`` refused
``USE_MCA=1``                     training rendered                     ``bbox_head`` refused (host disables predict)
================================  ====================================  ===========================================
"""

from __future__ import annotations

import json
import os
from typing import Any

GROUNDING_FORMATTING = "grounding"
_NO_GROUNDING_DATA = {
    "pt": "`stage: pt` trains on the prompt text alone and drops the images, so the boxes would be written as raw "
    "markers with no image to refer to",
    "rm": "`stage: rm` needs a chosen and a rejected answer per row (`ranking: true`), and a grounding row has one",
    "dpo": "`stage: dpo` needs a chosen and a rejected answer per row (`ranking: true`), and a grounding row has one",
    "kto": "`stage: kto` needs a desirable/undesirable tag per row (`kto_tag`), and a grounding row has none",
}


def grounding_datasets(data_args) -> list[str]:
    """Names in ``dataset`` and ``eval_dataset`` whose dataset_info entry has ``formatting: grounding``.

    Reads the local ``dataset_info.json`` (or the dict given as ``dataset_dir``) only; online and ``REMOTE:``
    dataset_info files are not fetched at start-up.
    """
    names = [*(data_args.dataset or []), *(data_args.eval_dataset or [])]
    info: Any = data_args.dataset_dir
    if not names:
        return []
    if isinstance(info, str):
        path = os.path.join(info, "dataset_info.json")
        if not os.path.isfile(path):
            return []
        with open(path, encoding="utf-8") as f:
            try:
                info = json.load(f)
            except json.JSONDecodeError:  # the host reports a malformed file itself, as it always has
                return []
    return [name for name in names if isinstance(info.get(name), dict) and info[name].get("formatting") == "grounding"]


def validate_host_path(parsed: tuple[Any, ...], data_args, finetuning_args, is_grounding_template: bool) -> None:
    """Refuse, before any model or data is loaded, a stage or launcher that would bypass grounding rendering, the
    IoU metrics or the bbox head (see the module docstring for the table)."""
    from transformers import Seq2SeqTrainingArguments

    from llamafactory_vision import patches

    if patches.failed_hooks and (is_grounding_template or finetuning_args.bbox_head):
        raise ValueError(patches.failure_report())

    stage = finetuning_args.stage
    if stage in _NO_GROUNDING_DATA:
        datasets = grounding_datasets(data_args)
        if datasets:
            raise ValueError(
                f"dataset(s) {', '.join(datasets)} have `formatting: grounding`, which `stage: {stage}` cannot use: "
                f"{_NO_GROUNDING_DATA[stage]}. Train grounding data with `stage: sft` (or `stage: ppo` for prompts)."
            )

    training_args = next((a for a in parsed if isinstance(a, Seq2SeqTrainingArguments)), None)
    if getattr(finetuning_args, "use_mca", False) and finetuning_args.bbox_head:
        raise ValueError(
            "`bbox_head: true` is not supported with `USE_MCA=1` (Megatron-Core training runs its own workflow, which "
            "never attaches the head). Unset USE_MCA, or set `bbox_head: false`."
        )
    if finetuning_args.use_hyper_parallel and stage == "sft":
        if finetuning_args.bbox_head:
            raise ValueError(
                "`bbox_head: true` is not supported with `use_hyper_parallel: true` (the hyper-parallel SFT workflow "
                "never attaches the head). Set `use_hyper_parallel: false`, or `bbox_head: false`."
            )
        if is_grounding_template and training_args is not None and training_args.predict_with_generate:
            raise ValueError(
                "`predict_with_generate: true` with a grounding template is not supported with "
                "`use_hyper_parallel: true`: its workflow computes no IoU metrics and stops generation at the first "
                "box token. Predict with `use_hyper_parallel: false` (training with it works)."
            )
