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

from llamafactory_vision.editing.args import EditDataArguments, EditFinetuningArguments, validate_edit_args
from llamafactory_vision.fusion.args import MGDataArguments, MGModelArguments
from llamafactory_vision.strokes.args import StrokeDataArguments


@dataclass
class VisionDataArguments(EditDataArguments, MGDataArguments, StrokeDataArguments, DataArguments):
    grounding_invalid: Literal["error", "skip"] = field(
        default="error",
        metadata={
            "help": "What to do with an invalid row of a `grounding`, `stroke_guess` or `mg_llava` dataset (box outside "
            "the image, x2 <= x1, "
            "NaN, missing or corrupt image, no objects, ...): `error` stops with the dataset, row and field; "
            "`skip` drops the row and reports a count per reason."
        },
    )
    grounding_fast_tokenize: bool = field(
        default=True,
        metadata={
            "help": "Grounding templates: count each image's tokens from its header and the processor's resize "
            "arithmetic instead of decoding and patchifying it at tokenization time (the host's way), and insert "
            "each image's run of image tokens as ids instead of tokenizing it as text, text through the Rust "
            "tokenizer directly (remembering repeated texts), and check PNG images' CRCs at conversion without PIL. "
            "Token ids and labels are identical; images are still decoded when batched, so an image whose header "
            "reads but whose pixels do not fails there instead. `false` restores the host's path."
        },
    )

    grounding_image_cache: bool = field(
        default=False,
        metadata={
            "help": "Grounding templates: keep each image file's preprocessed tensors (`pixel_values`, "
            "`image_grid_thw`, as the image processor returns them under this run's settings) in memory and reuse "
            "them when the collator batches the same file again (next epoch, evaluation), instead of decoding and "
            "patchifying it again. Batches are identical; a file that was written, replaced or touched since "
            "(size, mtime, ctime or inode changed) is read again. The cache lives in each process: every dataloader "
            "worker holds its own (up to "
            "`grounding_image_cache_mib` each), so workers need `dataloader_persistent_workers: true` to keep it "
            "across epochs. Off by default because it costs memory (float32 patches, one frame kept: ~7 MiB for a "
            "768x768 image)."
        },
    )
    grounding_image_cache_mib: float = field(
        default=2048.0,
        metadata={
            "help": "Most memory, in MiB, that `grounding_image_cache` may hold per process (the least recently "
            "used images are dropped beyond it)."
        },
    )

    ground_answer_style: Literal["native", "compact"] = field(
        default="native",
        metadata={
            "help": "How grounding answers are written. `native`: the model's own zero-shot style, so fine-tuning "
            "does not first unlearn its output format (Qwen2.5-VL and Qwen3-VL: a ```json fenced list, one "
            "{\"bbox_2d\": [...], \"label\": ...} object per line); `compact`: one line "
            "([{\"bbox_2d\": [...], \"label\": ...}, ...]). Qwen2-VL writes its box tokens either way."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.grounding_invalid not in ("error", "skip"):
            raise ValueError(f"`grounding_invalid` must be `error` or `skip`, got {self.grounding_invalid!r}.")
        if self.grounding_image_cache_mib <= 0:
            raise ValueError(f"`grounding_image_cache_mib` must be > 0, got {self.grounding_image_cache_mib}.")
        if self.ground_answer_style not in ("native", "compact"):
            raise ValueError(
                f"`ground_answer_style` must be `native` or `compact`, got {self.ground_answer_style!r}."
            )


@dataclass
class VisionModelArguments(MGModelArguments, ModelArguments):
    pass


@dataclass
class VisionFinetuningArguments(EditFinetuningArguments, FinetuningArguments):
    bbox_head: bool = field(
        default=False,
        metadata={
            "help": "Train a bbox regression head jointly with the LM loss (grounding templates only). It reads the "
            "last hidden state at each box in the target text and predicts cxcywh in [0, 1] of the image."
        },
    )
    bbox_loss_weight: float = field(
        default=1.0, metadata={"help": "Weight of the bbox head loss added to the LM loss."}
    )
    bbox_l1_weight: float = field(
        default=5.0, metadata={"help": "Weight of the L1 term inside the bbox head loss (DETR: 5)."}
    )
    bbox_giou_weight: float = field(
        default=2.0, metadata={"help": "Weight of the GIoU term inside the bbox head loss (DETR: 2)."}
    )
    bbox_fused_loss: bool = field(
        default=False,
        metadata={
            "help": "Compute the bbox head's loss (L1 + GIoU) as one autograd node with a hand-derived backward "
            "instead of ~40 small ops: fewer kernel launches, same values and gradients up to float rounding. Off "
            "by default because rounding may differ from the unfused loss. Needs `bbox_head: true`."
        },
    )
    bbox_head_layers: int | None = field(
        default=None,
        metadata={
            "help": "Number of linear layers of a new bbox head MLP (the last one starts at zero); default 3. A head "
            "saved beside the model/adapter keeps its own; setting another value then is an error."
        },
    )
    bbox_head_source: Literal["box_start", "box_end"] | None = field(
        default=None,
        metadata={
            "help": "Hidden state a new head reads: `box_start` (default; the token opening a box: <|box_start|> for "
            'Qwen2-VL, the `[` after "bbox_2d": for Qwen2.5/3-VL) or `box_end` (the token closing it). A head '
            "saved beside the model/adapter keeps its own; setting another value then is an error."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.bbox_head_source not in (None, "box_start", "box_end"):
            raise ValueError(f"`bbox_head_source` must be box_start or box_end, got {self.bbox_head_source!r}.")
        if self.bbox_head_layers is not None and self.bbox_head_layers < 1:
            raise ValueError(f"`bbox_head_layers` must be >= 1, got {self.bbox_head_layers}.")
        if self.bbox_fused_loss and not self.bbox_head:
            raise ValueError(
                "`bbox_fused_loss: true` fuses the bbox head's loss and needs `bbox_head: true`; without the head "
                "there is no box loss to fuse. Set `bbox_head: true` or remove `bbox_fused_loss`."
            )
        for name in ("bbox_loss_weight", "bbox_l1_weight", "bbox_giou_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")


def _model_type(model_args: ModelArguments) -> str:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        trust_remote_code=model_args.trust_remote_code,
        cache_dir=model_args.cache_dir,
        token=model_args.hf_hub_token,
    )
    return config.model_type


def _training_args(parsed: tuple[Any, ...]):
    from transformers import Seq2SeqTrainingArguments

    return next((a for a in parsed if isinstance(a, Seq2SeqTrainingArguments)), None)


def validate_parsed_args(parsed: tuple[Any, ...]) -> None:
    """Reject settings that contradict each other across argument groups, before any model or data is loaded."""
    from llamafactory_vision.fusion.args import validate_mg_args
    from llamafactory_vision.grounding.host_paths import validate_host_path
    from llamafactory_vision.grounding.image_cache import validate_image_cache
    from llamafactory_vision.grounding.liger import validate_liger
    from llamafactory_vision.grounding.templates import get_grounding_spec
    from llamafactory_vision.strokes.templates import get_stroke_spec

    model_args = next(a for a in parsed if isinstance(a, ModelArguments))
    data_args = next(a for a in parsed if isinstance(a, DataArguments))
    finetuning_args = next(a for a in parsed if isinstance(a, FinetuningArguments))
    spec = get_grounding_spec(data_args.template)
    validate_host_path(parsed, data_args, finetuning_args, spec is not None)
    validate_image_cache(data_args, _training_args(parsed), spec is not None)
    validate_mg_args(model_args, data_args)
    if finetuning_args.bbox_head:
        if spec is None:
            raise ValueError(
                f"`bbox_head: true` needs a grounding template (qwen2_vl_ground, qwen2_5_vl_ground, qwen3_vl_ground), "
                f"got template {data_args.template!r}."
            )
        if finetuning_args.stage != "sft":
            raise ValueError(f"`bbox_head: true` trains with `stage: sft`, got stage {finetuning_args.stage!r}.")
        if data_args.train_on_prompt:
            raise ValueError("`bbox_head: true` does not support `train_on_prompt` (boxes in prompts are not targets).")
        if data_args.packing and not data_args.neat_packing:
            raise ValueError(
                "`bbox_head: true` does not support `packing` without `neat_packing: true`: plain packing lets each "
                "row attend to the rows packed before it (and continues their positions), so a box's hidden state "
                "would depend on other rows' images. Use `neat_packing: true` (each row attends to itself only), or "
                "`packing: false`."
            )
        if finetuning_args.use_asft_loss:
            raise ValueError(
                "`bbox_head: true` does not support `use_asft_loss: true` (the host's ASFT loss returns no hidden "
                "states for the head). Use `use_dft_loss` or `use_eaft_loss`, or the plain LM loss."
            )
    validate_edit_args(model_args, data_args, finetuning_args, _model_type)
    if spec is not None and model_args.model_name_or_path is not None:
        model_type = _model_type(model_args)
        if model_type not in spec.model_types:
            raise ValueError(
                f"template {spec.name!r} writes {spec.box_family} boxes and needs a model of type "
                f"{' or '.join(spec.model_types)}, but {model_args.model_name_or_path!r} is {model_type!r}. "
                f"Use the grounding template of that model family instead."
            )
        validate_liger(model_args, finetuning_args, model_type)
    stroke_spec = get_stroke_spec(data_args.template)
    if stroke_spec is not None and model_args.model_name_or_path is not None:
        model_type = _model_type(model_args)
        if model_type not in stroke_spec.model_types:
            raise ValueError(
                f"template {stroke_spec.name!r} pads images the LLaVA-1.5 way and needs a model of type "
                f"{' or '.join(stroke_spec.model_types)}, but {model_args.model_name_or_path!r} is {model_type!r}."
            )
