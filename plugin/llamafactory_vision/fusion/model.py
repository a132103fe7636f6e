"""MG-LLaVA composed onto the host's loaded LLaVA-1.5: class swap of the llava-hf modules plus three submodules.

The high-resolution branch is transformers' ``ConvNextModel``: it is in the pinned stack (no new dependency, loads
and saves safetensors with ``from_pretrained``), returns the last stage's map ``[B, C, H/32, W/32]`` (24 x 24 at
768 px, the CLIP grid) and has the same trunk as the timm ConvNeXt inside open_clip's CLIP-ConvNeXt that MG-LLaVA
uses (``convnext_large_d_320``), so those weights load after a key rename; timm and open_clip are not in the stack.

Added submodules of the ``LlavaModel``: ``mg_hr_tower`` (frozen, loaded from ``mg_hr_vision_tower``), ``mg_fusion``
(Conv-Gate) and ``mg_object_projector``. The last two are trained and saved as ``mg_llava.safetensors`` +
``mg_llava_config.json`` beside the adapter or model (the tower is not copied: it stays in its own folder).
They are attached after the host's ``init_adapter``, so LoRA (``lora_target: all``) never wraps them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import ConvNextModel, LlavaForConditionalGeneration, TrainerCallback
from transformers.models.llava.modeling_llava import LlavaModel

from llamafactory_vision.fusion.modules import ConvGateFusion, ObjectProjector, pool_objects

WEIGHTS = "mg_llava.safetensors"
CONFIG = "mg_llava_config.json"
TRAINED = ("mg_fusion", "mg_object_projector")
MG_MODULES = ("mg_hr_tower", *TRAINED)


@dataclass(frozen=True)
class MGConfig:
    low_dim: int
    high_dim: int
    text_dim: int
    hr_image_size: int
    roi_size: int


class MGLlavaModel(LlavaModel):
    """``LlavaModel`` whose image features are the Conv-Gate fused CLIP tokens followed by the image's object tokens.

    The high-res inputs arrive as keyword arguments of ``forward`` and are held for the one ``get_image_features``
    call that ``LlavaModel.forward`` makes (cleared in ``finally``), so the host's forward runs unchanged.
    """

    mg_config: MGConfig
    _mg_inputs: tuple[Tensor | None, list[Tensor] | None] = (None, None)

    def forward(self, *args, mg_pixel_values: Tensor | None = None, mg_boxes: list[Tensor] | None = None, **kwargs):
        self._mg_inputs = (mg_pixel_values, mg_boxes)
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._mg_inputs = (None, None)

    def _clip_tokens(self, pixel_values: Tensor, layer, strategy: str) -> tuple[object, Tensor]:
        """The host's feature selection (``LlavaModel.get_image_features``) before the projector."""
        outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = [layer] if isinstance(layer, int) else list(layer)
        pool = [outputs.hidden_states[i][:, 1:] if strategy == "default" else outputs.hidden_states[i] for i in layers]
        return outputs, torch.cat(pool, dim=-1)

    def get_image_features(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None,
                           **kwargs):  # fmt: skip
        """Returns the host's output object whose ``pooler_output`` is one ``Tensor[N + K_i, text_dim]`` per image."""
        mg_pixel_values, mg_boxes = self._mg_inputs
        if mg_pixel_values is None:
            raise ValueError("MG-LLaVA needs `mg_pixel_values` beside `pixel_values`: use template `llava_mg`.")
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        outputs, low = self._clip_tokens(pixel_values, layer, strategy)
        high = self.mg_hr_tower(mg_pixel_values.to(self.mg_hr_tower.dtype)).last_hidden_state
        image_features = self.multi_modal_projector(self.mg_fusion(low, high))
        boxes = list(mg_boxes) if mg_boxes is not None else [high.new_zeros((0, 4))] * len(image_features)
        pooled = pool_objects(high, boxes, self.mg_config.hr_image_size, self.mg_config.roi_size)
        if pooled.shape[0] == 0:  # a graph-connected zero keeps the projector in DDP's graph on object-free batches
            pooled = pooled.new_zeros((1, pooled.shape[1]))
            anchor = 0.0 * self.mg_object_projector(pooled).sum()
            per_image = [image_features[0] + anchor.to(image_features.dtype), *image_features[1:]]
        else:
            objects = self.mg_object_projector(pooled).to(image_features.dtype)
            per_image = [torch.cat([f, o]) for f, o in zip(image_features, objects.split([len(b) for b in boxes]))]
        outputs.pooler_output = per_image
        return outputs


class MGLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """Declares the MG inputs in ``forward``'s signature (``generate`` keeps only the keyword arguments it finds
    there, and reads ``logits_to_keep`` from it), with every host parameter kept by name."""

    def forward(
        self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, past_key_values=None,
        inputs_embeds=None, vision_feature_layer=None, vision_feature_select_strategy=None, labels=None,
        logits_to_keep=0, image_sizes=None, mg_pixel_values: Tensor | None = None,
        mg_boxes: list[Tensor] | None = None, **kwargs,
    ):  # fmt: skip
        return super().forward(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy, labels=labels,
            logits_to_keep=logits_to_keep, image_sizes=image_sizes, mg_pixel_values=mg_pixel_values,
            mg_boxes=mg_boxes, **kwargs,
        )  # fmt: skip

    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
        """The model file stays a plain LLaVA-1.5 checkpoint (full fine-tuning, export): the MG modules live in
        ``mg_llava.safetensors`` (see :class:`MGCheckpointCallback`, :func:`export_mg`) and the ConvNeXt in its own
        folder, so they are left out here."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        state_dict = {k: v for k, v in state_dict.items() if not any(f".{n}." in f".{k}" for n in MG_MODULES)}
        super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)


def find_mg_core(model: nn.Module) -> MGLlavaModel | None:
    """The MG ``LlavaModel`` inside ``model`` (plain, PEFT-wrapped or DDP-wrapped), or None."""
    return next((m for m in model.modules() if isinstance(m, MGLlavaModel)), None)


def mg_dir(model_args) -> Path:
    """Where trained MG modules live: beside the last adapter if one is loaded, else beside the model."""
    if model_args.adapter_name_or_path:
        return Path(model_args.adapter_name_or_path[-1])
    return Path(model_args.model_name_or_path)


def save_mg(model: nn.Module, directory: str | Path) -> None:
    core = find_mg_core(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {f"{name}.{k}": v.detach().cpu().contiguous() for name in TRAINED
             for k, v in getattr(core, name).state_dict().items()}  # fmt: skip
    save_file(state, str(directory / WEIGHTS))
    (directory / CONFIG).write_text(json.dumps(asdict(core.mg_config), indent=2))


def load_mg_weights(core: MGLlavaModel, directory: Path) -> None:
    """Load ``mg_llava.safetensors`` (safetensors only: nothing is unpickled) after checking its config fits."""
    saved = MGConfig(**json.loads((directory / CONFIG).read_text()))
    if saved != core.mg_config:
        raise ValueError(f"{directory / CONFIG}: saved for {saved}, but this run builds {core.mg_config}.")
    state = load_file(str(directory / WEIGHTS))
    for name in TRAINED:
        prefix = f"{name}."
        getattr(core, name).load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def compose_mg(model: nn.Module, tower: nn.Module, hr_image_size: int, roi_size: int,
               is_trainable: bool) -> MGLlavaModel:  # fmt: skip
    """Turn a LLaVA-1.5 (plain or PEFT-wrapped) into MG-LLaVA in place around the high-res ``tower`` (a
    ``ConvNextModel``, frozen) with fresh zero-initialised fusion and object projector; returns the core."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, LlavaForConditionalGeneration):
        raise TypeError(f"`mg_hr_vision_tower` needs a LLaVA-1.5 (llava-hf) model, got {type(base).__name__}.")
    core = base.model
    dtype = next(core.multi_modal_projector.parameters()).dtype
    device = next(core.multi_modal_projector.parameters()).device
    tower = tower.to(device, dtype)
    tower.requires_grad_(False)
    layer = base.config.vision_feature_layer
    low_dim = base.config.vision_config.hidden_size * (1 if isinstance(layer, int) else len(layer))
    config = MGConfig(low_dim=low_dim, high_dim=tower.config.hidden_sizes[-1],
                      text_dim=base.config.text_config.hidden_size, hr_image_size=hr_image_size,
                      roi_size=roi_size)  # fmt: skip
    trained_dtype = torch.float32 if is_trainable else dtype  # trainable parameters in float32, as the host does
    base.__class__ = MGLlavaForConditionalGeneration
    core.__class__ = MGLlavaModel
    core.mg_config = config
    core.add_module("mg_hr_tower", tower)
    core.add_module("mg_fusion", ConvGateFusion(config.low_dim, config.high_dim).to(device, trained_dtype))
    core.add_module("mg_object_projector", ObjectProjector(config.high_dim, config.text_dim).to(device, trained_dtype))
    for name in TRAINED:
        getattr(core, name).requires_grad_(is_trainable)
    return core


def attach_mg(model: nn.Module, model_args, is_trainable: bool) -> MGLlavaModel:
    """:func:`compose_mg` with the tower from ``mg_hr_vision_tower`` and the trained modules from :func:`mg_dir` when
    it holds them; a training run without them starts from the zero-initialised fusion (plain LLaVA at step 0);
    inference without them is refused."""
    tower = ConvNextModel.from_pretrained(model_args.mg_hr_vision_tower)
    core = compose_mg(model, tower, model_args.mg_hr_image_size, model_args.mg_roi_size, is_trainable)
    source = mg_dir(model_args)
    if (source / WEIGHTS).is_file():
        load_mg_weights(core, source)
    elif not is_trainable:
        raise FileNotFoundError(f"`mg_hr_vision_tower` is set but {source} has no {WEIGHTS}: nothing trained to use.")
    return core


class MGCheckpointCallback(TrainerCallback):
    """Writes the MG modules beside every checkpoint and the final model, and restores them on resume (the host's
    resume restores the adapter or model file, which does not hold them under LoRA)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        checkpoint = args.resume_from_checkpoint
        if checkpoint and (Path(checkpoint) / WEIGHTS).is_file():
            load_mg_weights(find_mg_core(model), Path(checkpoint))

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            save_mg(model, Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            save_mg(model, args.output_dir)


def export_mg(parsed_infer_args) -> None:
    """Copy the MG files into ``export_dir`` after ``llamafactory-cli export`` (``mg_hr_vision_tower`` runs only)."""
    model_args = parsed_infer_args[0]
    if not getattr(model_args, "mg_hr_vision_tower", None):
        return
    source = mg_dir(model_args)
    for name in (WEIGHTS, CONFIG):
        shutil.copy(source / name, Path(model_args.export_dir) / name)
