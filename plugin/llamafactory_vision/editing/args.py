"""YAML keys of the MGIE-style editing stage (``stage: edit``), as dataclass mixins.

:class:`EditDataArguments` joins the bases of ``VisionDataArguments`` and :class:`EditFinetuningArguments` those of
``VisionFinetuningArguments`` (hparams.py), so each key is parsed, documented and validated once, here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

EDIT_STAGE = "edit"


@dataclass
class EditDataArguments:
    edit_invalid: Literal["error", "skip"] = field(
        default="error",
        metadata={
            "help": "What to do with an invalid row of an `edit` dataset (missing or corrupt source/target image, "
            "empty instruction, unreadable image size): `error` stops with the dataset, row and field; `skip` drops "
            "the row and reports a count per reason."
        },
    )
    edit_resolution: int = field(
        default=256,
        metadata={
            "help": "Side in pixels of the square source/target images the diffusion UNet is trained on (MGIE: 256). "
            "A multiple of 8 (the VAE's downsampling factor)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.edit_invalid not in ("error", "skip"):
            raise ValueError(f"`edit_invalid` must be `error` or `skip`, got {self.edit_invalid!r}.")
        if self.edit_resolution < 8 or self.edit_resolution % 8:
            raise ValueError(f"`edit_resolution` must be a positive multiple of 8, got {self.edit_resolution}.")


@dataclass
class EditFinetuningArguments:
    diffusion_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local diffusers folder with `unet/`, `vae/` and `scheduler/` (InstructPix2Pix's 8-channel UNet, "
            "or SD-1.5 whose 4-channel `conv_in` is widened to 8 with zero-initialised new weights). Required by "
            "`stage: edit`."
        },
    )
    edit_diffusion_weight: float = field(
        default=0.5, metadata={"help": "Weight of the diffusion noise MSE added to the LM loss (MGIE: 0.5)."}
    )
    edit_cfg_dropout: float = field(
        default=0.05,
        metadata={
            "help": "Classifier-free dropout as MGIE, one draw p ~ U[0, 1) per sample: the text condition is nulled "
            "for p < 2d and the source image for d <= p < 3d (d = 0.05: 10% text, 10% image, 5% both)."
        },
    )
    edit_head_width: int = field(
        default=512, metadata={"help": "d_model of the edit head's transformer (MGIE: 512)."}
    )
    edit_head_layers: int = field(
        default=4, metadata={"help": "Encoder layers and decoder layers (each) of the edit head (MGIE: 4)."}
    )
    edit_head_ffn: int = field(
        default=2048, metadata={"help": "Feed-forward width of the edit head's transformer (MGIE: 2048)."}
    )
    edit_train_unet: bool = field(
        default=True, metadata={"help": "Train the UNet (MGIE: yes). The VAE is always frozen."}
    )
    edit_num_inference_steps: int = field(
        default=100, metadata={"help": "Denoising steps when `do_predict` edits the eval images (MGIE: 100)."}
    )
    edit_text_guidance: float = field(
        default=7.5, metadata={"help": "Text (instruction) guidance scale at prediction time (MGIE: 7.5)."}
    )
    edit_image_guidance: float = field(
        default=1.5, metadata={"help": "Source-image guidance scale at prediction time (MGIE: 1.5)."}
    )
    edit_max_new_tokens: int = field(
        default=96, metadata={"help": "Longest expressive instruction generated at prediction time (MGIE: 96)."}
    )
    edit_clip_model: str | None = field(
        default=None,
        metadata={"help": "Local CLIP folder: `do_predict` then also reports clip_i and clip_t of the edited images."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.edit_diffusion_weight < 0:
            raise ValueError(f"`edit_diffusion_weight` must be >= 0, got {self.edit_diffusion_weight}.")
        if not 0 <= self.edit_cfg_dropout <= 1 / 3:
            raise ValueError(f"`edit_cfg_dropout` must be in [0, 1/3] (3 * d <= 1), got {self.edit_cfg_dropout}.")
        for name in ("edit_head_width", "edit_head_layers", "edit_head_ffn"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.edit_head_width % 4:
            raise ValueError(f"`edit_head_width` must split into the head's 4 attention heads, got {self.edit_head_width}.")
        if self.edit_num_inference_steps < 1:
            raise ValueError(f"`edit_num_inference_steps` must be >= 1, got {self.edit_num_inference_steps}.")
        if self.stage == EDIT_STAGE and not self.diffusion_model_name_or_path:
            raise ValueError("`stage: edit` needs `diffusion_model_name_or_path` (a local diffusers folder).")


def validate_edit_args(model_args, data_args, finetuning_args, model_type) -> None:
    """Cross-group checks for ``stage: edit`` (template and model family; ``model_type(model_args)`` reads the
    config), run right after the host parses the arguments."""
    from llamafactory_vision.editing.tokens import EDIT_TEMPLATE

    if finetuning_args.stage != EDIT_STAGE:
        return
    if data_args.template != EDIT_TEMPLATE:
        raise ValueError(f"`stage: edit` needs `template: {EDIT_TEMPLATE}`, got {data_args.template!r}.")
    if data_args.packing or data_args.neat_packing:
        raise ValueError("`stage: edit` does not support `packing`/`neat_packing` ([IMG] positions per row).")
    if model_args.model_name_or_path is not None and model_type(model_args) != "llava":
        raise ValueError(
            f"`stage: edit` (MGIE) needs a LLaVA v1.5 model (model_type llava), but "
            f"{model_args.model_name_or_path!r} is {model_type(model_args)!r}."
        )
