"""The ``[IMG0]``..``[IMG7]`` tokens and the ``llava_edit`` template.

The tokens go through the host's own machinery: they are added to ``add_special_tokens`` (after any the user lists,
so ``new_special_tokens_config`` with ``init_special_tokens: desc_init`` still applies to them), the host resizes the
embeddings (``resize_vocab``) and, under LoRA, trains and saves ``embed_tokens``/``lm_head`` as
``modules_to_save``. The same list on the same base tokenizer gives the same ids when a checkpoint is reloaded.
"""

from __future__ import annotations

import copy

from llamafactory_vision.template_specs import add_derived_template

NUM_IMG_TOKENS = 8
IMG_TOKENS: tuple[str, ...] = tuple(f"[IMG{i}]" for i in range(NUM_IMG_TOKENS))
EDIT_TEMPLATE = "llava_edit"
BASE_TEMPLATE = "llava"
# MGIE's prompt (demo.ipynb): the MLLM is asked what the image will look like after the edit.
PROMPT = "what will this image be like if '{instruction}'"


def target_text(expressive: str) -> str:
    """The assistant's target: the expressive instruction followed by the 8 [IMG] tokens (MGIE's spacing)."""
    return f"{expressive} {' '.join(IMG_TOKENS)}"


def with_img_tokens(model_args):
    """A copy of the host's ``ModelArguments`` whose ``add_special_tokens`` ends with the [IMG] tokens."""
    model_args = copy.copy(model_args)
    tokens = list(model_args.add_special_tokens or [])
    model_args.add_special_tokens = tokens + [t for t in IMG_TOKENS if t not in tokens]
    return model_args


def img_token_ids(tokenizer) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(list(IMG_TOKENS))
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
        raise ValueError(f"the tokenizer lacks the tokens {IMG_TOKENS}; load it with `with_img_tokens`.")
    return ids


def register_edit_template(templates: dict, get_mm_plugin) -> None:
    """Register ``llava_edit``: LLaVA v1.5's conversation (the host's ``llava`` template) with its own plugin
    instance. Refuses to overwrite a template of that name."""
    add_derived_template(templates, EDIT_TEMPLATE, BASE_TEMPLATE, get_mm_plugin(name="llava", image_token="<image>"))
