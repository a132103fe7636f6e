"""Our YAML keys, as subclasses of LLaMA-Factory's argument dataclasses (swapped into its parser by patches.py).

Each field carries its help text once; the parser, ``--help`` and the web UI read it from here. Checks that involve
one argument group live in ``__post_init__``; checks across groups (template vs. model) in
:func:`validate_parsed_args`, which runs right after the host parses a YAML file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from llamafactory.hparams.data_args import DataArguments
from llamafactory.hparams.finetuning_args import FinetuningArguments
from llamafactory.hparams.model_args import ModelArguments


@dataclass
class VisionDataArguments(DataArguments):
    grounding_invalid: Literal["error", "skip"] = field(
        default="error",
        metadata={
            "help": "What to do with an invalid row of a `grounding` dataset (box outside the image, x2 <= x1, "
            "NaN, missing or corrupt image, no objects, ...): `error` stops with the dataset, row and field; "
            "`skip` drops the row and reports a count per reason."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.grounding_invalid not in ("error", "skip"):
            raise ValueError(f"`grounding_invalid` must be `error` or `skip`, got {self.grounding_invalid!r}.")


@dataclass
class VisionFinetuningArguments(FinetuningArguments):
    pass


def _model_type(model_args: ModelArguments) -> str:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        trust_remote_code=model_args.trust_remote_code,
        cache_dir=model_args.cache_dir,
        token=model_args.hf_hub_token,
    )
    return config.model_type


def validate_parsed_args(parsed: tuple[Any, ...]) -> None:
    """Reject settings that contradict each other across argument groups, before any model or data is loaded."""
    from llamafactory_vision.grounding.templates import get_grounding_spec

    model_args = next(a for a in parsed if isinstance(a, ModelArguments))
    data_args = next(a for a in parsed if isinstance(a, DataArguments))
    spec = get_grounding_spec(data_args.template)
    if spec is not None and model_args.model_name_or_path is not None:
        model_type = _model_type(model_args)
        if model_type not in spec.model_types:
            raise ValueError(
                f"template {spec.name!r} writes {spec.box_family} boxes and needs a model of type "
                f"{' or '.join(spec.model_types)}, but {model_args.model_name_or_path!r} is {model_type!r}. "
                f"Use the grounding template of that model family instead."
            )
