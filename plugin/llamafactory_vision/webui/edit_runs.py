"""Edit models (``llava_edit``) in LLaMA Board: Evaluate & Predict runs the edit stage, the chat shows edited images.

- :func:`edit_eval_args`: the Evaluate tab builds a stock ``stage: sft`` run (with ``predict_with_generate``); for
  the edit template it becomes the edit stage's eval/predict of the chosen edit checkpoint (``do_predict`` writes
  ``edited/``, the predictions and the L1/L2/CLIP metrics, see ``editing/predict.py``), with the inference settings
  recorded at training time (``edit_config.json``) for every key the user left at its default.
- :func:`with_img_token_args`: the host's chat loader knows nothing of the [IMG] tokens an edit checkpoint was trained
  with (its embedding rows would not fit); they go in through the host's own ``add_special_tokens``.
- :func:`chat_edit_image`: the host's chat engine writes the expressive instruction but has no edit head or UNet; our
  pipeline runs around the engine's loaded MLLM, from that answer, on the chat's input image.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamafactory_vision.editing.args import EDIT_STAGE
from llamafactory_vision.editing.parts import EDIT_CONFIG, EditRecord
from llamafactory_vision.editing.tokens import EDIT_TEMPLATE, IMG_TOKENS

# YAML key -> EditRecord field: predict uses the trained run's value unless the UI sets another
RECORDED_KEYS = {
    "diffusion_model_name_or_path": "diffusion_model_name_or_path",
    "edit_resolution": "resolution",
    "edit_num_inference_steps": "num_inference_steps",
    "edit_text_guidance": "text_guidance",
    "edit_image_guidance": "image_guidance",
    "edit_max_new_tokens": "max_new_tokens",
}
CHAT_SEED = 0

# chat engine -> its edit model (dropped with the engine when the chat unloads it)
_CHAT_EDITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def trained_dir(model_name_or_path: str, adapter_name_or_path: str | None) -> Path:
    """Where an edit run's parts live (as ``editing.parts.parts_dir``): beside the last adapter, else the model."""
    if adapter_name_or_path:
        return Path(adapter_name_or_path.split(",")[-1].strip())
    return Path(model_name_or_path)


def edit_eval_args(args: dict[str, Any]) -> dict[str, Any]:
    """The Evaluate tab's run ``args`` (the host's, plus ours) for the edit template: ``stage: edit`` and the
    recorded inference settings for keys absent from ``args``; other templates' args unchanged.

    Raises:
        ValueError: the template is ``llava_edit`` but the checkpoint is not an edit run's output (names the folder).
    """
    if args.get("template") != EDIT_TEMPLATE:
        return args
    trained = trained_dir(args["model_name_or_path"], args.get("adapter_name_or_path"))
    if not (trained / EDIT_CONFIG).is_file():
        raise ValueError(
            f"template {EDIT_TEMPLATE!r} evaluates an edit training run, but {str(trained)!r} has no {EDIT_CONFIG}: "
            "choose the checkpoint of a run trained with the `Edit (diffusion-coupled)` stage."
        )
    record = EditRecord.load(trained)
    recorded = {key: getattr(record, field) for key, field in RECORDED_KEYS.items() if key not in args}
    # the host refuses `predict_with_generate` outside `stage: sft`; the edit stage's predict edits images instead
    kept = {key: value for key, value in args.items() if key != "predict_with_generate"}
    return {**kept, **recorded, "stage": EDIT_STAGE}


def with_img_token_args(template: str, extra_args: str) -> str:
    """The Chat tab's extra-args JSON with the [IMG] tokens appended to ``add_special_tokens`` for the edit template
    (after any the user lists, as ``editing.tokens.with_img_tokens``); unchanged otherwise or when it is not a JSON
    object (the host reports that itself)."""
    if template != EDIT_TEMPLATE:
        return extra_args
    try:
        extra = json.loads(extra_args)
    except json.JSONDecodeError:
        return extra_args
    if not isinstance(extra, dict):
        return extra_args
    tokens = [t.strip() for t in str(extra.get("add_special_tokens") or "").split(",") if t.strip()]
    extra["add_special_tokens"] = ",".join(tokens + [t for t in IMG_TOKENS if t not in tokens])
    return json.dumps(extra)


@dataclass
class _ChatEdit:
    """An edit model loaded in the chat: its run's folder and record, its pipeline once built."""

    trained: Path
    record: EditRecord
    pipe: Any = None


def register_chat_engine(chat_engine: Any, template: str, trained: Path) -> bool:
    """Remember that ``chat_engine`` (the host's loaded engine) is an edit model trained in ``trained``. Returns
    whether it is one (edit template and an edit run's output).

    Raises:
        ValueError: an edit model loaded by an engine without the model in-process (vLLM, SGLang backends).
    """
    if template != EDIT_TEMPLATE or chat_engine is None or not (trained / EDIT_CONFIG).is_file():
        return False
    if not hasattr(chat_engine, "model"):
        backend = getattr(chat_engine, "name", type(chat_engine).__name__)
        raise ValueError(
            f"the edited image needs the huggingface backend (it reuses the chat's model), not {backend}; the chat "
            "shows text only."
        )
    _CHAT_EDITS[chat_engine] = _ChatEdit(trained, EditRecord.load(trained))
    return True


def chat_edit_image(chat_engine: Any, image: Any, messages: list[dict[str, str]]) -> Any | None:
    """The edited image for the chat's last turn: the user's message (less the image placeholder) is the instruction,
    the assistant's answer the expressive instruction (cut at the first [IMG] token, shown when special tokens are
    not skipped), ``image`` the source; the recorded resolution, steps and guidance; seed :data:`CHAT_SEED`. None
    when the engine is not an edit model, there is no input image or the turn has no answer."""
    edit = _CHAT_EDITS.get(chat_engine) if chat_engine is not None else None
    if edit is None or image is None or len(messages) < 2:
        return None  # before the imports below: a stock chat never loads diffusers for this
    import torch
    from llamafactory.extras.constants import IMAGE_PLACEHOLDER

    from llamafactory_vision.editing.pipeline import EditPipeline

    user, answer = messages[-2], messages[-1]
    # the host's chat engine prepends the image placeholder to the first user message in place; the pipeline adds one
    instruction = user.get("content", "").replace(IMAGE_PLACEHOLDER, "").strip()
    if user.get("role") != "user" or answer.get("role") != "assistant" or not instruction:
        return None
    expressive = answer["content"].split(IMG_TOKENS[0])[0].strip()
    if edit.pipe is None:  # the engine's first edited answer: build the pipeline once, around the engine's MLLM
        edit.pipe = EditPipeline.from_mllm(chat_engine.model, chat_engine.processor, edit.trained)
        edit.pipe.set_progress_bar_config(disable=True)
    record = edit.record
    result = edit.pipe(
        image,
        instruction,
        num_inference_steps=record.num_inference_steps,
        text_guidance_scale=record.text_guidance,
        image_guidance_scale=record.image_guidance,
        resolution=record.resolution,
        max_new_tokens=record.max_new_tokens,
        generator=torch.Generator().manual_seed(CHAT_SEED),
        expressive=expressive or None,
    )
    return result.images[0]
