"""The non-host parts of an edit model (edit head, UNet, VAE): attach them to the host's model, save and reload them.

They become submodules ``edit_head``, ``edit_unet``, ``edit_vae`` of the model the host returns (after LoRA is
applied, so LoRA never targets them), so that DDP, the optimizer and ``.to()`` see them. A checkpoint (or the output
dir) holds, beside the adapter or model::

    edit_head/   config.json + diffusion_pytorch_model.safetensors   (what EditHead.save_pretrained writes)
    unet/        config.json + diffusion_pytorch_model.safetensors   (diffusers layout)
    edit_config.json                                                 (diffusion folder + edit settings)

The VAE and scheduler are never saved: they are read from ``diffusion_model_name_or_path``. Under DeepSpeed ZeRO-3
the parts are partitioned like the host's model: their weights are gathered before they are written (zero3.py).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from llamafactory_vision.editing.diffusion import DiffusionParts, load_diffusion
from llamafactory_vision.editing.edit_head import EditHead
from llamafactory_vision.editing.tokens import IMG_TOKENS
from llamafactory_vision.zero3 import gathered_state_dict, require_full

HEAD_ATTR, UNET_ATTR, VAE_ATTR = "edit_head", "edit_unet", "edit_vae"
PART_PREFIXES = tuple(f"{name}." for name in (HEAD_ATTR, UNET_ATTR, VAE_ATTR))
HEAD_DIR, UNET_DIR = "edit_head", "unet"
SAVED_PARTS = ((HEAD_ATTR, HEAD_DIR), (UNET_ATTR, UNET_DIR))  # (attribute, folder); the VAE is never saved
EDIT_CONFIG = "edit_config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class EditRecord:
    """What inference needs to rebuild the edit model, written at training time (``edit_config.json``)."""

    diffusion_model_name_or_path: str
    template: str
    resolution: int
    num_inference_steps: int
    text_guidance: float
    image_guidance: float
    max_new_tokens: int

    def save(self, directory: str | Path) -> None:
        (Path(directory) / EDIT_CONFIG).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> EditRecord:
        path = Path(directory) / EDIT_CONFIG
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {directory} is not the output of an edit training run.")
        return cls(**json.loads(path.read_text()))


def parts_dir(model_args) -> Path:
    """Where trained parts live: beside the last adapter if one is loaded, else beside the model."""
    if model_args.adapter_name_or_path:
        return Path(model_args.adapter_name_or_path[-1])
    return Path(model_args.model_name_or_path)


def attach_parts(
    model: nn.Module, diffusion_path: str, trained_dir: Path | None, is_trainable: bool, finetuning_args, seed: int
) -> DiffusionParts:
    """Load the diffusion parts and an edit head (trained ones from ``trained_dir`` when it has them, else a fresh
    head of the configured size seeded by ``seed`` and the folder's UNet) and attach them to ``model``. Returns the
    parts (with the scheduler, which has no weights and stays off the model)."""
    parts = load_diffusion(diffusion_path)
    llm_hidden = model.get_input_embeddings().embedding_dim
    has_trained = trained_dir is not None and (trained_dir / HEAD_DIR).is_dir()
    if has_trained:
        head = EditHead.from_pretrained(trained_dir / HEAD_DIR)
        parts.unet = UNet2DConditionModel.from_pretrained(trained_dir / UNET_DIR)
    elif not is_trainable:
        raise FileNotFoundError(
            f"{trained_dir} has no {HEAD_DIR}/: point `adapter_name_or_path` (or `model_name_or_path` after full "
            "fine-tuning) at the output of an edit training run."
        )
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = EditHead(
                llm_hidden_size=llm_hidden,
                cross_attention_dim=parts.unet.config.cross_attention_dim,
                d_model=finetuning_args.edit_head_width,
                num_encoder_layers=finetuning_args.edit_head_layers,
                num_decoder_layers=finetuning_args.edit_head_layers,
                dim_feedforward=finetuning_args.edit_head_ffn,
            )
    if head.config.llm_hidden_size != llm_hidden:
        raise ValueError(f"{trained_dir / HEAD_DIR}: the edit head was trained for hidden size "
                         f"{head.config.llm_hidden_size}, the model has {llm_hidden}.")  # fmt: skip
    head.requires_grad_(is_trainable)
    parts.unet.requires_grad_(is_trainable and finetuning_args.edit_train_unet)
    parts.vae.requires_grad_(False)
    device = next(model.parameters()).device
    model.add_module(HEAD_ATTR, head.to(device))
    model.add_module(UNET_ATTR, parts.unet.to(device))
    model.add_module(VAE_ATTR, parts.vae.to(device))
    return parts


def get_parts(model: nn.Module, scheduler: DDPMScheduler) -> tuple[EditHead, DiffusionParts]:
    return getattr(model, HEAD_ATTR), DiffusionParts(getattr(model, UNET_ATTR), getattr(model, VAE_ATTR), scheduler)


def without_parts(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The host model's own entries (the parts are saved in their own folders)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(PART_PREFIXES)}


def part_states(model: nn.Module, keep: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Full CPU weights of the saved parts (edit head, UNet), keyed by attribute, gathered first under DeepSpeed
    ZeRO-3 (a collective: every rank calls this; ``keep=False`` on ranks that save nothing, which get ``{}`` each)."""
    return {attr: gathered_state_dict(getattr(model, attr), keep=keep) for attr, _ in SAVED_PARTS}


def save_parts(
    model: nn.Module, directory: str | Path, states: dict[str, dict[str, torch.Tensor]] | None = None
) -> None:
    """Write ``edit_head/`` and ``unet/`` (config + one safetensors file each, the diffusers layout that
    ``from_pretrained`` reads) into ``directory``. ``states``: weights gathered beforehand by :func:`part_states`
    (required under ZeRO-3, where only the main rank writes), else read from the model.

    Raises:
        ValueError: a part's weights are ZeRO-3 placeholders (not gathered).
    """
    directory = Path(directory)
    states = part_states(model) if states is None else states
    for attr, sub in SAVED_PARTS:
        require_full(states[attr], f"edit part {sub}/")
    for attr, sub in SAVED_PARTS:
        (directory / sub).mkdir(parents=True, exist_ok=True)
        getattr(model, attr).save_config(directory / sub)  # what ModelMixin.save_pretrained writes as config.json
        save_file(states[attr], str(directory / sub / WEIGHTS), metadata={"format": "pt"})


def load_parts_into(model: nn.Module, directory: str | Path) -> None:
    """Restore the head and UNet weights saved by :func:`save_parts` into the attached modules, in place (so the
    optimizer keeps pointing at the same parameters). Safetensors only: nothing is unpickled."""
    directory = Path(directory)
    for attr, sub in SAVED_PARTS:
        path = directory / sub / WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {directory} was not saved by an edit training run.")
        getattr(model, attr).load_state_dict(load_file(str(path)))


def check_edit_export(parsed_infer_args) -> None:
    """Before ``llamafactory-cli export``: an edit run's checkpoint must be exported with the [IMG] tokens in
    ``add_special_tokens``, else the host writes a tokenizer without them (their trained embedding rows are kept, but
    nothing maps the tokens to them) and the export is not a usable edit model.

    Raises:
        ValueError: naming the checkpoint and the YAML line to add.
    """
    model_args = parsed_infer_args[0]
    source = parts_dir(model_args)
    missing = [t for t in IMG_TOKENS if t not in (model_args.add_special_tokens or [])]
    if (source / EDIT_CONFIG).is_file() and missing:
        raise ValueError(
            f"{source} is an edit run's checkpoint: export it with its [IMG] tokens, add to the export YAML "
            f"`add_special_tokens: {','.join(IMG_TOKENS)}` (missing: {', '.join(missing)})."
        )


def export_edit(parsed_infer_args) -> Path | None:
    """Copy ``edit_head/``, ``unet/`` and ``edit_config.json`` into ``export_dir`` after ``llamafactory-cli export``
    whenever the exported checkpoint has them (the host exports and merges only the MLLM), so that the export dir is
    a fully fine-tuned edit model: ``EditPipeline.from_training(export_dir)``.

    Returns:
        Path | None: the folder the parts were copied from, or None when the checkpoint is not an edit run's.

    Raises:
        FileNotFoundError: the checkpoint has ``edit_config.json`` but lacks a part's weights (naming the file).
    """
    model_args = parsed_infer_args[0]
    source = parts_dir(model_args)
    if not (source / EDIT_CONFIG).is_file():
        return None
    EditRecord.load(source)  # a readable record, or the error saying so
    for sub in (HEAD_DIR, UNET_DIR):
        if not (source / sub / WEIGHTS).is_file():
            raise FileNotFoundError(f"{source / sub / WEIGHTS} not found: {source} has {EDIT_CONFIG} but not the "
                                    f"trained {sub}/ it goes with.")  # fmt: skip
    target = Path(model_args.export_dir)
    if source.resolve() != target.resolve():
        for sub in (HEAD_DIR, UNET_DIR):
            shutil.copytree(source / sub, target / sub, dirs_exist_ok=True)
        shutil.copy(source / EDIT_CONFIG, target / EDIT_CONFIG)
    return source
