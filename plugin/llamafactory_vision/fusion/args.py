"""YAML keys of MG-LLaVA: mixins of ``VisionModelArguments`` and ``VisionDataArguments`` (hparams.py)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MGModelArguments:
    mg_hr_vision_tower: str | None = field(
        default=None,
        metadata={
            "help": "Local folder of the MG-LLaVA high-resolution branch: a transformers ConvNextModel (config.json + "
            "model.safetensors). Setting it turns a LLaVA-1.5 model into MG-LLaVA (template `llava_mg`): its features "
            "are fused into the CLIP tokens by a zero-initialised Conv-Gate and pooled into object tokens."
        },
    )
    mg_hr_image_size: int = field(
        default=768,
        metadata={
            "help": "Side of the square image the high-resolution branch sees (MG-LLaVA: 768). Its feature map "
            "(side / total stride, 24 for a ConvNeXt at 768) must equal the CLIP token grid (24 at 336 / 14)."
        },
    )
    mg_roi_size: int = field(
        default=4,
        metadata={"help": "roi_align output side per object; the s x s samples are averaged into one object token."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.mg_hr_image_size < 1 or self.mg_roi_size < 1:
            raise ValueError(
                f"`mg_hr_image_size` and `mg_roi_size` must be >= 1, got {self.mg_hr_image_size}, {self.mg_roi_size}."
            )


@dataclass
class MGDataArguments:
    mg_max_objects: int = field(
        default=32,
        metadata={
            "help": "Most object boxes per image in an `mg_llava` dataset (one object token each, appended after the "
            "image tokens). A row with more stops with an error naming it (or is skipped with "
            "`grounding_invalid: skip`); nothing is dropped silently."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.mg_max_objects < 0:
            raise ValueError(f"`mg_max_objects` must be >= 0, got {self.mg_max_objects}.")


def validate_mg_args(model_args, data_args) -> None:
    """Template ``llava_mg`` and ``mg_hr_vision_tower`` go together (one builds the inputs the other consumes)."""
    from llamafactory_vision.fusion.templates import MG_TEMPLATE

    has_tower = bool(getattr(model_args, "mg_hr_vision_tower", None))
    if has_tower != (data_args.template == MG_TEMPLATE):
        raise ValueError(
            f"MG-LLaVA needs both `mg_hr_vision_tower` and `template: {MG_TEMPLATE}`; got mg_hr_vision_tower="
            f"{getattr(model_args, 'mg_hr_vision_tower', None)!r}, template={data_args.template!r}."
        )
