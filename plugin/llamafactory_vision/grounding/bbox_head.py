"""Bbox regression head: an MLP reading the LM's last hidden state at each box in the text.

Coordinates: the head predicts ``cxcywh`` in [0, 1] of the image *as the model sees it* (normalised coordinates are
the same for the original image, since resizing never crops). Which token it reads is ``bbox_head_source``:
``box_start`` (the token that opens a box: ``<|box_start|>`` for Qwen2-VL, the ``[`` after ``"bbox_2d":`` for
Qwen2.5/3-VL; the head predicts the box before the text does) or ``box_end`` (the token that closes it).

Saved as ``bbox_head.safetensors`` + ``bbox_head_config.json`` beside the adapter or the full model.
"""

from __future__ import annotations

import bisect
import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from llamafactory.extras.misc import count_parameters
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from llamafactory_vision.log import get_logger
from llamafactory_vision.zero3 import gathered_state_dict, require_full

logger = get_logger(__name__)

HEAD_ATTR = "bbox_head"  # the head's submodule name on the model
HEAD_WEIGHTS = "bbox_head.safetensors"
HEAD_CONFIG = "bbox_head_config.json"
SOURCES = ("box_start", "box_end")
DEFAULT_LAYERS, DEFAULT_SOURCE = 3, "box_start"  # a new head's settings when the YAML leaves them out


@dataclass(frozen=True)
class BBoxHeadConfig:
    hidden_size: int
    num_layers: int = DEFAULT_LAYERS
    source: str = DEFAULT_SOURCE

    def __post_init__(self):
        if self.num_layers < 1:
            raise ValueError(f"bbox_head_layers must be >= 1, got {self.num_layers}.")
        if self.source not in SOURCES:
            raise ValueError(f"bbox_head_source must be one of {SOURCES}, got {self.source!r}.")


class BBoxHead(nn.Module):
    """``num_layers`` linear layers (ReLU between), sigmoid output; the last layer starts at zero, so an untrained head
    predicts the centred box (0.5, 0.5, 0.5, 0.5) and adds no gradient noise to the LM at the start.

    Layers are named ``bbox_fc{i}`` so that ``lora_target: all`` (which targets linear layers by their last name) never
    picks them up.
    """

    def __init__(self, config: BBoxHeadConfig):
        super().__init__()
        self.config = config
        width = config.hidden_size
        for i in range(config.num_layers):
            self.add_module(f"bbox_fc{i}", nn.Linear(width, 4 if i == config.num_layers - 1 else width))
        last = getattr(self, f"bbox_fc{config.num_layers - 1}")
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden: ``Tensor[..., hidden_size]`` -> ``Tensor[..., 4]`` cxcywh in [0, 1] of the model-view image."""
        x = hidden.to(self.bbox_fc0.weight.dtype)
        for i in range(self.config.num_layers):
            x = getattr(self, f"bbox_fc{i}")(x)
            if i < self.config.num_layers - 1:
                x = torch.relu(x)
        return torch.sigmoid(x)


def save_head(head: BBoxHead, directory: str | Path, state: Mapping[str, Tensor] | None = None) -> None:
    """Write ``bbox_head.safetensors`` and ``bbox_head_config.json``; ``state``: weights gathered beforehand by
    :func:`~llamafactory_vision.zero3.gathered_state_dict` (required under ZeRO-3, where only some ranks write), else
    read from ``head``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = gathered_state_dict(head) if state is None else state
    require_full(state, "bbox head")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(directory / HEAD_WEIGHTS))
    (directory / HEAD_CONFIG).write_text(json.dumps(asdict(head.config), indent=2))


def load_head(directory: str | Path) -> BBoxHead:
    """Restore a head saved by :func:`save_head` (safetensors only: nothing is unpickled)."""
    directory = Path(directory)
    if not (directory / HEAD_WEIGHTS).is_file():
        # Say only what is known: a folder may lack the head because its run had none, or because it was copied or
        # exported without the head files.
        raise FileNotFoundError(
            f"`bbox_head: true` but {directory} has no {HEAD_WEIGHTS}: no bbox head was saved in this folder (its "
            f"run trained without `bbox_head: true`, or it was copied or exported without {HEAD_WEIGHTS} and "
            f"{HEAD_CONFIG}). Point `adapter_name_or_path` (or `model_name_or_path` for a full fine-tune) at a folder "
            "holding both, such as the training output_dir, or set `bbox_head: false`."
        )
    head = BBoxHead(BBoxHeadConfig(**json.loads((directory / HEAD_CONFIG).read_text())))
    head.load_state_dict(load_file(str(directory / HEAD_WEIGHTS)))
    return head


def head_dir(model_args) -> Path:
    """Where a trained head lives: beside the last adapter if one is loaded, else beside the model."""
    if model_args.adapter_name_or_path:
        return Path(model_args.adapter_name_or_path[-1])
    return Path(model_args.model_name_or_path)


def _settings_conflicts(loaded: BBoxHeadConfig, finetuning_args) -> list[str]:
    asked = {
        "bbox_head_layers": finetuning_args.bbox_head_layers,
        "bbox_head_source": finetuning_args.bbox_head_source,
    }
    found = {"bbox_head_layers": loaded.num_layers, "bbox_head_source": loaded.source}
    return [f"{key}: {asked[key]!r} in the YAML, {found[key]!r} in the saved head"
            for key in asked if asked[key] is not None and asked[key] != found[key]]  # fmt: skip


def attach_head(model: nn.Module, model_args, finetuning_args, is_trainable: bool) -> BBoxHead:
    """Give ``model`` its head as submodule ``bbox_head`` (so DDP, the optimizer and checkpoints see it): the trained
    one from :func:`head_dir` if there is one, a fresh one when training starts from a model without a head.

    A saved head keeps its own ``bbox_head_layers``/``bbox_head_source``; a YAML asking for others is refused (the
    saved weights cannot take another shape or anchor). Logs one line saying which head is attached, and the host's
    parameter count with the head included.
    """
    source = head_dir(model_args)
    hidden_size = model.get_input_embeddings().embedding_dim
    if (source / HEAD_WEIGHTS).is_file() or not is_trainable:
        head = load_head(source)
        if head.config.hidden_size != hidden_size:
            raise ValueError(f"{source / HEAD_CONFIG}: the head was trained for another model (hidden size).")
        conflicts = _settings_conflicts(head.config, finetuning_args)
        if conflicts:
            raise ValueError(
                f"{source / HEAD_WEIGHTS} holds a trained bbox head whose settings differ from the YAML ("
                + "; ".join(conflicts)
                + "). Remove those keys to use the saved head as it is, or start from a model/"
                "adapter without a head to train a new one."
            )
        origin = f"loaded from {source / HEAD_WEIGHTS}"
    else:
        layers = finetuning_args.bbox_head_layers or DEFAULT_LAYERS
        head = BBoxHead(BBoxHeadConfig(hidden_size, layers, finetuning_args.bbox_head_source or DEFAULT_SOURCE))
        origin = "new (last layer zero-initialised)"
    head.requires_grad_(is_trainable)
    model.add_module(HEAD_ATTR, head.to(model.device))
    trainable, total = count_parameters(model)  # the host's count, as in its own log line, now with the head
    logger.info_rank0(
        f"bbox head attached ({origin}): bbox_head_layers={head.config.num_layers}, "
        f"bbox_head_source={head.config.source}, hidden_size={head.config.hidden_size}, "
        f"{sum(p.numel() for p in head.parameters()):,} params, {'trainable' if is_trainable else 'frozen'}. "
        f"With the head: trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )
    return head


def export_head(parsed_infer_args) -> Path | None:
    """Copy the head files into ``export_dir`` after ``llamafactory-cli export`` whenever the exported checkpoint has
    a head (with or without ``bbox_head: true``: an export must not drop what was trained). ``bbox_head: true`` on a
    checkpoint without a head fails, naming the folder searched.

    Returns:
        Path | None: the folder the head was copied from, or None when the checkpoint has no head.
    """
    model_args, _, finetuning_args, _ = parsed_infer_args
    source = head_dir(model_args)
    if not (source / HEAD_WEIGHTS).is_file() and not finetuning_args.bbox_head:
        return None
    load_head(source)  # a valid head (config and weights agree), or the error saying what is missing
    target = Path(model_args.export_dir)
    if source.resolve() != target.resolve():
        for name in (HEAD_WEIGHTS, HEAD_CONFIG):
            shutil.copy(source / name, target / name)
    return source


def find_box_spans(token_texts: Sequence[str], box_pattern: str) -> list[tuple[int, int]]:
    """Token indices ``(open, close)`` of every box written in a token sequence.

    ``token_texts``: each token decoded on its own (special tokens kept), so that character offsets map back to
    tokens whatever the tokenizer merged. ``open``/``close``: the tokens holding the last character of the pattern's
    ``open``/``close`` groups (see ``BoxCodec.box_pattern``).
    """
    ends = []
    total = 0
    for text in token_texts:
        total += len(text)
        ends.append(total)
    text = "".join(token_texts)
    return [
        (bisect.bisect_right(ends, m.end("open") - 1), bisect.bisect_right(ends, m.end("close") - 1))
        for m in re.finditer(box_pattern, text)
    ]


def select_anchor(spans: Tensor, source: str) -> Tensor:
    """spans: ``Tensor[..., 2]`` (open, close) token indices -> ``Tensor[...]`` of the indices ``source`` reads."""
    return spans[..., SOURCES.index(source)]
