"""Tiny, random, fully offline checkpoints that stock LLaMA-Factory loads as ``model_name_or_path``.

Each checkpoint is a real Hugging Face layout: ``config.json``, ``model.safetensors``, a fast tokenizer
(byte-level BPE trained here with ``tokenizers`` on a built-in corpus), the family's special tokens, a chat
template and the family's processor (image *and* video processor for the Qwen families). Only the sizes
are tiny; every setting LLaMA-Factory reads is a real one.

Families and their vision settings:

============  ==========================  =====  =====  ============================  ======================
family        processor                   patch  merge  image min..max pixels         video min..max pixels
============  ==========================  =====  =====  ============================  ======================
qwen2_vl      Qwen2VLProcessor            14     2      28*28*4 .. 448*448            28*28*4 .. 224*224
qwen2_5_vl    Qwen2_5_VLProcessor         14     2      28*28*4 .. 448*448            28*28*4 .. 224*224
qwen3_vl      Qwen3VLProcessor            16     2      32*32*4 .. 512*512            32*32*4 .. 256*256
qwen3_vl_moe  Qwen3VLProcessor            16     2      32*32*4 .. 512*512            32*32*4 .. 256*256
llava         LlavaProcessor (CLIP 32px)  8      -      resize 32 + centre crop 32    -
============  ==========================  =====  =====  ============================  ======================

The Qwen pixel bounds cap an image at 256 merged vision tokens (16 x 16 after merging) and a video frame
pair at 64, so CPU training stays fast; the lower bound is the real Qwen2-VL minimum (4 merged tokens).
A LLaVA image is always 16 tokens: (32 / 8)**2 patches, the CLS token dropped by the "default" strategy.

Usage::

    python -m llamafactory_vision.tiny --out DIR [--families qwen2_vl,llava] [--seed 0] [--hidden-size 64]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLMoeConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
    TokenizersBackend,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN_PRETOKENIZE_REGEX
from transformers.video_processing_utils import BaseVideoProcessor

FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava")

# Qwen's special tokens in the order (and so the relative ids) of the real Qwen2-VL vocabulary.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# LLaVA v1.5 (llava-hf): <unk> <s> </s> take ids 0..2 like Llama's; <image> and <pad> come after the vocab.
LLAVA_LEADING_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>")
LLAVA_TRAILING_TOKENS: tuple[str, ...] = ("<image>", "<pad>")


_LLAVA_IMAGE_SIZE = 32
_LLAVA_PATCH_SIZE = 8
_LLAVA_IMAGE_TOKENS = (_LLAVA_IMAGE_SIZE // _LLAVA_PATCH_SIZE) ** 2  # CLS dropped by the "default" strategy

# BPE training target; the built-in corpus runs out of frequent pairs earlier (~770 tokens).
BPE_VOCAB_SIZE = 2048

QWEN2_DEFAULT_SYSTEM = "You are a helpful assistant."
LLAVA_DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# ChatML with Qwen's vision placeholders; the processor expands each <|image_pad|> to the image's tokens.
_QWEN_CHAT_TEMPLATE = r"""{%- set default_system = DEFAULT_SYSTEM -%}
{%- macro render(content) -%}
{%- if content is string -%}{{- content -}}
{%- else -%}{%- for item in content -%}
{%- if item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
{%- elif item['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
{%- elif item['type'] == 'text' -%}{{- item['text'] -}}
{%- endif -%}{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- if default_system and messages[0]['role'] != 'system' -%}
{{- '<|im_start|>system\n' + default_system + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\n' + render(message['content']) + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"""

# Vicuna v1 layout of llava-hf/llava-1.5: "<system> USER: <image>\n<text> ASSISTANT: <answer></s>".
_LLAVA_CHAT_TEMPLATE = r"""{%- set default_system = DEFAULT_SYSTEM -%}
{%- macro render(content) -%}
{%- if content is string -%}{{- content -}}
{%- else -%}
{%- for item in content if item['type'] == 'image' -%}{{- '<image>\n' -}}{%- endfor -%}
{%- for item in content if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if messages[0]['role'] != 'system' -%}{{- default_system + ' ' -}}{%- endif -%}
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}{{- render(message['content']) + ' ' -}}
{%- elif message['role'] == 'user' -%}{{- 'USER: ' + render(message['content']) + ' ' -}}
{%- else -%}{{- 'ASSISTANT: ' + render(message['content']) + eos_token -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"""


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny checkpoint. The defaults give 0.2-0.35 M parameters per family.

    Args:
        hidden_size (int, default 64): LLM hidden size; also the vision merger/projector output size.
        num_layers (int, default 2): LLM decoder layers.
        num_heads (int, default 4): LLM attention heads; head_dim = hidden_size / num_heads must be even
            and at least 6 so each of the three M-RoPE sections (t, h, w) gets a frequency.
        num_kv_heads (int, default 2): LLM key/value heads (grouped-query attention); divides num_heads.
        vision_hidden_size (int, default 32): vision encoder width.
        vision_depth (int, default 2): vision encoder blocks.
        vision_heads (int, default 2): vision attention heads; vision head_dim must be a multiple of 4
            (the Qwen vision rotary embedding splits it into two halves of sine/cosine pairs).
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_hidden_size: int = 32
    vision_depth: int = 2
    vision_heads: int = 2

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 1:
                raise ValueError(f"TinySpec.{name} must be >= 1, got {value}.")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"TinySpec.hidden_size={self.hidden_size} must split into num_heads={self.num_heads} "
                "heads of even size."
            )
        if self.head_dim < 6:
            raise ValueError(f"TinySpec head_dim={self.head_dim} must be >= 6 for the three M-RoPE sections.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"TinySpec.num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}.")
        if self.vision_hidden_size % self.vision_heads or (self.vision_hidden_size // self.vision_heads) % 4:
            raise ValueError(
                f"TinySpec.vision_hidden_size={self.vision_hidden_size} must split into "
                f"vision_heads={self.vision_heads} heads whose size is a multiple of 4."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        return 2 * self.hidden_size

    @property
    def vision_intermediate_size(self) -> int:
        return 2 * self.vision_hidden_size


# --------------------------------------------------------------------------------------------------
# Tokenizer


def _corpus() -> list[str]:
    """Built-in English + digits + punctuation training text, in a fixed order (BPE output depends on it)."""
    colors = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "gray", "brown", "pink")
    sizes = ("small", "large", "big", "tiny", "little")
    objects = [
        "circle",
        "square",
        "triangle",
        "rectangle",
        "star",
        "ellipse",
        "car",
        "dog",
        "cat",
        "person",
        "man",
        "woman",
        "tree",
        "house",
        "cup",
        "ball",
        "box",
        "bird",
        "chair",
        "table",
        "sky",
        "hat",
        "shape",
    ]
    places = ("left", "right", "top", "bottom", "center", "middle", "corner", "edge", "background")
    prompts = (
        "Locate the {d} in the image.",
        "Find the {d} and output its bounding box.",
        "Detect every {o} in the picture and report the boxes as JSON.",
        "Where is the {d}? Answer with coordinates.",
        "Outline the position of the {d} and output all the coordinates in JSON format.",
        "What does the user draw here? It looks like a {o}.",
        "Make the {o} {c}.",
        "Replace the {d} with a {c} {o}.",
        "Remove the {d} from the photo.",
        "Add a {c} hat to the {o}.",
        "There is a {d} at the {p} of the image, next to a {c} {o}.",
    )
    general = (
        (
            "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
            "helpful, detailed, and polite answers to the user's questions."
        ),
        "You are a helpful assistant. The user asks a question about an image and the assistant answers.",
        "system user assistant image video picture photo frame region object label answer question",
        "The quick brown fox jumps over the lazy dog. It is a sunny day, and the children play in the park.",
        "Describe the image in detail. The image shows a street with cars, people and a few trees.",
        "This is a drawing of a house with a red roof, two windows and a door; the sun is in the sky.",
        "Yes, no, maybe: there are 3 apples, 12 oranges and 150 grapes on the table (about 0.5 kg).",
        "Turn the photo into a painting, make it look like winter, and let it be night time!",
        "I don't know what it is, but it's round, it's blue and it'll roll if you push it.",
    )
    lines = list(general) * 2  # twice, so that every word reaches min_frequency=2 and can merge
    n = 0
    for i, obj in enumerate(objects):
        for j, color in enumerate(colors):
            size = sizes[(i + j) % len(sizes)]
            place = places[(i * 3 + j) % len(places)]
            desc = f"{size} {color} {obj}"
            # Deterministic, varied 0-1000 coordinates: digits are split one by one anyway.
            x1, y1 = (37 * n) % 500, (91 * n) % 500
            x2, y2 = x1 + 50 + (13 * n) % 450, y1 + 50 + (29 * n) % 450
            n += 1
            lines.append(prompts[n % len(prompts)].format(d=desc, o=obj, c=color, p=place))
            lines.append(f"the {desc}({x1},{y1}),({x2},{y2})")
            lines.append(json.dumps([{"bbox_2d": [x1, y1, x2, y2], "label": f"{color} {obj}"}]))
            lines.append(f"```json\n{json.dumps([{'bbox_2d': [x2, y2, x1, y1], 'label': obj}], indent=2)}\n```")
            lines.append(f"The {desc} is at [{x1 / 1000:.3f}, {y1 / 1000:.3f}, {x2 / 1000:.3f}, {y2 / 1000:.3f}].")
    return lines


def train_byte_level_bpe(vocab_size: int = BPE_VOCAB_SIZE, leading_special_tokens: Sequence[str] = ()) -> Tokenizer:
    """Train a Qwen2-style byte-level BPE on the built-in corpus.

    The normalizer, pre-tokenizer (Qwen2's regex: every digit is its own pre-token, then byte-level) and
    decoder are exactly the ones ``transformers.Qwen2Tokenizer`` rebuilds on load, so a reloaded tokenizer
    splits text the same way as the trained one.
    ``leading_special_tokens`` get ids 0.. before the byte alphabet (Llama-style <unk>/<s>/</s>).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(token, special=True) for token in leading_special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


def _bpe_vocab_and_merges(tokenizer: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


def build_qwen_tokenizer(chat_template: str) -> Qwen2Tokenizer:
    """A ``Qwen2Tokenizer`` over a freshly trained BPE with Qwen's 14 special tokens appended in Qwen's order.

    Like Qwen2-VL-Instruct: eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos, no unk.
    """
    vocab, merges = _bpe_vocab_and_merges(train_byte_level_bpe())
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token=QWEN_SPECIAL_TOKENS[0],
        pad_token=QWEN_SPECIAL_TOKENS[0],
        chat_template=chat_template,
    )
    # eos starts as <|endoftext|> so that it takes the first special id; the rest follow in order.
    tokenizer.add_special_tokens({"extra_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    tokenizer.eos_token = "<|im_end|>"
    return tokenizer


def build_llava_tokenizer(chat_template: str) -> TokenizersBackend:
    """A fast tokenizer over a freshly trained BPE laid out like llava-hf/llava-1.5's Llama tokenizer.

    ``<unk>`` ``<s>`` ``</s>`` are ids 0, 1, 2; ``<image>`` and ``<pad>`` follow the BPE vocabulary; a
    bos token is prepended on encode (``add_bos_token``), as Llama does.
    """
    backend = train_byte_level_bpe(leading_special_tokens=LLAVA_LEADING_TOKENS)
    tokenizer = TokenizersBackend(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,
        add_eos_token=False,
        chat_template=chat_template,
    )
    image_token, pad_token = LLAVA_TRAILING_TOKENS
    # Two calls so that <image> gets the lower id, as in llava-hf (<image> 32000, <pad> 32001).
    tokenizer.add_special_tokens({"extra_special_tokens": [image_token]})
    tokenizer.add_special_tokens({"pad_token": pad_token})
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Configs


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim / 2 rotary frequencies into (temporal, height, width) like Qwen2-VL's [16, 24, 24]."""
    half = head_dim // 2
    temporal = max(1, half // 4)
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def _padded_vocab_size(num_tokens: int, multiple: int = 64) -> int:
    """Embedding rows: the tokenizer length rounded up, as real checkpoints pad (151643+ -> 152064)."""
    return math.ceil(num_tokens / multiple) * multiple


def _qwen_token_ids(tokenizer: Qwen2Tokenizer) -> dict[str, int]:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def _qwen_text_config(spec: TinySpec, tokenizer: Qwen2Tokenizer, rope_theta: float, **extra: object) -> dict:
    return {
        "vocab_size": _padded_vocab_size(len(tokenizer)),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": 32768,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": rope_theta,
            "mrope_section": _mrope_section(spec.head_dim),
        },
        # No bos_token_id: the tokenizer has no bos token.
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **extra,
    }


def qwen2_vl_config(spec: TinySpec, tokenizer: Qwen2Tokenizer) -> Qwen2VLConfig:
    """Qwen2-VL: ViT with patch 14, 2x2 merger into the LLM width, M-RoPE text model."""
    text = _qwen_text_config(spec, tokenizer, 1e6)
    vision = {
        "depth": spec.vision_depth,
        "embed_dim": spec.vision_hidden_size,
        "hidden_size": spec.hidden_size,
        "num_heads": spec.vision_heads,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return Qwen2VLConfig(text_config=text, vision_config=vision, **_qwen_token_ids(tokenizer))


def qwen2_5_vl_config(spec: TinySpec, tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL: windowed-attention ViT (patch 14, window 112 px) with full attention every 4th block."""
    text = _qwen_text_config(spec, tokenizer, 1e6)
    vision = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden_size,
        "intermediate_size": spec.vision_intermediate_size,
        "num_heads": spec.vision_heads,
        "out_hidden_size": spec.hidden_size,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "tokens_per_second": 2,
        # The real model (32 blocks) uses full attention in blocks 7, 15, 23, 31; always include the last.
        "fullatt_block_indexes": list(range(spec.vision_depth - 1, -1, -4))[::-1],
    }
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_qwen_token_ids(tokenizer))


def _qwen3_vl_parts(spec: TinySpec, tokenizer: Qwen2Tokenizer) -> tuple[dict, dict]:
    """Qwen3-VL's text and vision settings, shared by the dense and the MoE checkpoints."""
    text = _qwen_text_config(spec, tokenizer, 5e6, head_dim=spec.head_dim)
    text["rope_parameters"]["mrope_interleaved"] = True
    vision = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden_size,
        "intermediate_size": spec.vision_intermediate_size,
        "num_heads": spec.vision_heads,
        "out_hidden_size": spec.hidden_size,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        # A 16 x 16 position table, bilinearly interpolated to each image's grid (real: 48 x 48).
        "num_position_embeddings": 256,
        # Real: blocks 8, 16, 24 of 27 feed LLM layers 0, 1, 2. Tiny: the first blocks, one per LLM layer.
        "deepstack_visual_indexes": list(range(min(3, spec.vision_depth, spec.num_layers))),
    }
    return text, vision


def qwen3_vl_config(spec: TinySpec, tokenizer: Qwen2Tokenizer) -> Qwen3VLConfig:
    """Qwen3-VL: ViT with patch 16 and learned 2-D position table, DeepStack features, interleaved M-RoPE."""
    text, vision = _qwen3_vl_parts(spec, tokenizer)
    return Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_token_ids(tokenizer))


def qwen3_vl_moe_config(spec: TinySpec, tokenizer: Qwen2Tokenizer) -> Qwen3VLMoeConfig:
    """Qwen3-VL MoE (model type ``qwen3_vl_moe``, e.g. Qwen3-VL-30B-A3B): Qwen3-VL with a sparse MoE block in every
    decoder layer; tiny: 4 experts, 2 per token (real: 128, 8)."""
    text, vision = _qwen3_vl_parts(spec, tokenizer)
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=spec.hidden_size, decoder_sparse_step=1)
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, **_qwen_token_ids(tokenizer))


def llava_config(spec: TinySpec, tokenizer: TokenizersBackend) -> LlavaConfig:
    """LLaVA v1.5: CLIP ViT (image 32, patch 8), 2-layer GELU projector, Llama LLM, features of layer -2."""
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_hidden_layers=spec.vision_depth,
        num_attention_heads=spec.vision_heads,
        image_size=32,
        patch_size=8,
        projection_dim=spec.vision_hidden_size,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=_padded_vocab_size(len(tokenizer)),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=_LLAVA_IMAGE_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        # Top-level copies: the Trainer compares the tokenizer's special ids with these, not text_config's.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# --------------------------------------------------------------------------------------------------
# Processors


def _pixel_bounds(factor: int, max_side: int) -> dict[str, int]:
    """smart_resize bounds as a fresh ``size`` dict: at least 2x2 merged tokens, at most max_side**2 pixels.

    A fresh dict matters: the Qwen processors write ``min_pixels``/``max_pixels`` into their class-level
    default ``size`` dict, which would leak into every later instance in the process.
    """
    return {"shortest_edge": factor * factor * 4, "longest_edge": max_side * max_side}


def _qwen_vision_processors(
    patch_size: int,
    image_max_side: int,
    video_max_side: int,
    video_processor_cls: type[BaseVideoProcessor],
    **normalization: list[float],
) -> tuple[Qwen2VLImageProcessor, BaseVideoProcessor]:
    factor = patch_size * 2  # one merged token covers 2 x 2 patches
    common = {"patch_size": patch_size, "temporal_patch_size": 2, "merge_size": 2, **normalization}
    image_processor = Qwen2VLImageProcessor(size=_pixel_bounds(factor, image_max_side), **common)
    video_processor = video_processor_cls(size=_pixel_bounds(factor, video_max_side), **common)
    return image_processor, video_processor


def qwen2_vl_processor(tokenizer: Qwen2Tokenizer) -> Qwen2VLProcessor:
    image, video = _qwen_vision_processors(14, 448, 224, Qwen2VLVideoProcessor)
    return Qwen2VLProcessor(image, tokenizer, video, chat_template=tokenizer.chat_template)


def qwen2_5_vl_processor(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLProcessor:
    image, video = _qwen_vision_processors(14, 448, 224, Qwen2VLVideoProcessor)
    return Qwen2_5_VLProcessor(image, tokenizer, video, chat_template=tokenizer.chat_template)


def qwen3_vl_processor(tokenizer: Qwen2Tokenizer) -> Qwen3VLProcessor:
    # Qwen3-VL normalises to [-1, 1] (mean = std = 0.5) instead of with CLIP statistics.
    image, video = _qwen_vision_processors(
        16, 512, 256, Qwen3VLVideoProcessor, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    )
    return Qwen3VLProcessor(image, tokenizer, video, chat_template=tokenizer.chat_template)


def llava_processor(tokenizer: TokenizersBackend) -> LlavaProcessor:
    image = CLIPImageProcessor(
        size={"shortest_edge": _LLAVA_IMAGE_SIZE},
        crop_size={"height": _LLAVA_IMAGE_SIZE, "width": _LLAVA_IMAGE_SIZE},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image,
        tokenizer=tokenizer,
        patch_size=_LLAVA_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=tokenizer.chat_template,
    )


# --------------------------------------------------------------------------------------------------
# Families


def _qwen_generation_ids(tokenizer: Qwen2Tokenizer) -> dict[str, int | list[int] | None]:
    """Qwen instruct models stop on <|im_end|> or <|endoftext|> and pad with <|endoftext|>."""
    return {
        "bos_token_id": None,
        "eos_token_id": [tokenizer.eos_token_id, tokenizer.pad_token_id],
        "pad_token_id": tokenizer.pad_token_id,
    }


def _llava_generation_ids(tokenizer: TokenizersBackend) -> dict[str, int | list[int] | None]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


@dataclass(frozen=True)
class FamilyRecipe:
    """How one family's tokenizer, config, processor and generation ids are made."""

    tokenizer: Callable[[], PreTrainedTokenizerBase]
    config: Callable[[TinySpec, PreTrainedTokenizerBase], PretrainedConfig]
    processor: Callable[[PreTrainedTokenizerBase], ProcessorMixin]
    generation_ids: Callable[[PreTrainedTokenizerBase], dict[str, int | list[int] | None]]


def chat_template(template: str, default_system: str) -> str:
    """Fill a template's default system prompt (a JSON string literal is also a valid Jinja literal)."""
    return template.replace("DEFAULT_SYSTEM", json.dumps(default_system), 1)


RECIPES: dict[str, FamilyRecipe] = {
    # Qwen2-VL/2.5-VL-Instruct add a default system prompt; Qwen3-VL-Instruct does not.
    "qwen2_vl": FamilyRecipe(
        partial(build_qwen_tokenizer, chat_template(_QWEN_CHAT_TEMPLATE, QWEN2_DEFAULT_SYSTEM)),
        qwen2_vl_config,
        qwen2_vl_processor,
        _qwen_generation_ids,
    ),
    "qwen2_5_vl": FamilyRecipe(
        partial(build_qwen_tokenizer, chat_template(_QWEN_CHAT_TEMPLATE, QWEN2_DEFAULT_SYSTEM)),
        qwen2_5_vl_config,
        qwen2_5_vl_processor,
        _qwen_generation_ids,
    ),
    "qwen3_vl": FamilyRecipe(
        partial(build_qwen_tokenizer, chat_template(_QWEN_CHAT_TEMPLATE, "")),
        qwen3_vl_config,
        qwen3_vl_processor,
        _qwen_generation_ids,
    ),
    "qwen3_vl_moe": FamilyRecipe(  # same tokenizer, template and processor as Qwen3-VL; MoE text model
        partial(build_qwen_tokenizer, chat_template(_QWEN_CHAT_TEMPLATE, "")),
        qwen3_vl_moe_config,
        qwen3_vl_processor,
        _qwen_generation_ids,
    ),
    "llava": FamilyRecipe(
        partial(build_llava_tokenizer, chat_template(_LLAVA_CHAT_TEMPLATE, LLAVA_DEFAULT_SYSTEM)),
        llava_config,
        llava_processor,
        _llava_generation_ids,
    ),
}


def build_tiny(
    family: str,
    out_dir: str | Path,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
) -> Path:
    """Write a tiny random checkpoint of ``family`` into ``out_dir`` and return that path.

    Args:
        family (str): one of ``FAMILIES``.
        out_dir (str | Path): directory to write (created; existing files of the same name are replaced).
        seed (int, default 0): weight-initialisation seed; the same arguments give byte-identical
            ``model.safetensors``. The caller's torch RNG state is left untouched.
        hidden_size, num_layers, num_heads, num_kv_heads, vision_hidden_size, vision_depth, vision_heads:
            see ``TinySpec``.

    Returns:
        Path: ``out_dir``, loadable with ``AutoConfig``/``AutoTokenizer``/``AutoProcessor``/
        ``AutoModelForImageTextToText`` and as LLaMA-Factory's ``model_name_or_path``.
    """
    if family not in RECIPES:
        raise ValueError(f"family={family!r} is not one of {FAMILIES}.")
    spec = TinySpec(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        vision_hidden_size=vision_hidden_size,
        vision_depth=vision_depth,
        vision_heads=vision_heads,
    )
    recipe = RECIPES[family]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = recipe.tokenizer()
    config = recipe.config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    for key, value in recipe.generation_ids(tokenizer).items():
        setattr(model.generation_config, key, value)
    model.save_pretrained(out)
    recipe.processor(tokenizer).save_pretrained(out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llamafactory_vision.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="parent directory; writes OUT/<family>")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=TinySpec.hidden_size)
    parser.add_argument("--num-layers", type=int, default=TinySpec.num_layers)
    parser.add_argument("--vision-hidden-size", type=int, default=TinySpec.vision_hidden_size)
    parser.add_argument("--vision-depth", type=int, default=TinySpec.vision_depth)
    args = parser.parse_args(argv)

    families = [name.strip() for name in args.families.split(",") if name.strip()]
    unknown = [name for name in families if name not in RECIPES]
    if unknown:
        parser.error(f"--families: unknown {unknown}; choose from {', '.join(FAMILIES)}")
    for family in families:
        start = time.perf_counter()
        path = build_tiny(
            family,
            args.out / family,
            seed=args.seed,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            vision_hidden_size=args.vision_hidden_size,
            vision_depth=args.vision_depth,
        )
        print(f"{family}: {path} ({time.perf_counter() - start:.1f} s)")
