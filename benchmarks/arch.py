"""Real-size benchmark checkpoints with random weights, built from the published ``config.json`` values (no download).

Values read from the model repositories' ``config.json`` (Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2.5-VL-3B-Instruct,
Qwen/Qwen3-VL-2B-Instruct) and their ``preprocessor_config.json`` pixel bounds. The tokenizer is our tiny offline one
(its ids are all below the real ``vocab_size``), so the embedding and LM head keep their real 151,936 rows and every
matmul has its real shape; only the text of the tokens differs. ``small=True`` keeps each family's structure (vision
patch, merger, window/DeepStack layout) at a size a CPU trains in seconds: the ``--small`` proof of the code path.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

# family, text_config, vision_config, processor pixel bounds (shortest_edge, longest_edge)
ARCHS: dict[str, dict] = {
    "qwen2vl-2b": {
        "family": "qwen2_vl",
        "text": {
            "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
            "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        },
        "vision": {
            "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "hidden_size": 1536,
            "hidden_act": "quick_gelu", "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
        "pixels": (56 * 56, 28 * 28 * 1280),
    },
    "qwen2.5vl-3b": {
        "family": "qwen2_5_vl",
        "text": {
            "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
            "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        },
        "vision": {
            "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048,
            "hidden_act": "silu", "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        },
        "pixels": (56 * 56, 28 * 28 * 1280),
    },
    "qwen3vl-2b": {
        "family": "qwen3_vl",
        "text": {
            "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
            "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20], "mrope_interleaved": True,
            },
        },
        "vision": {
            "depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "out_hidden_size": 2048,
            "hidden_act": "gelu_pytorch_tanh", "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17],
        },
        "pixels": (65536, 16777216),
    },
}  # fmt: skip

# --small: 2 text layers of width 128 (head_dim 32, M-RoPE 4+6+6), 4 vision blocks of width 64.
_SMALL_TEXT = {
    "vocab_size": 4096, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2,
}  # fmt: skip
_SMALL_VISION = {
    "qwen2_vl": {"depth": 4, "embed_dim": 64, "num_heads": 2, "hidden_size": 128},
    "qwen2_5_vl": {"depth": 4, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 128,
                   "fullatt_block_indexes": [1, 3]},
    "qwen3_vl": {"depth": 4, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 128,
                 "num_position_embeddings": 256, "deepstack_visual_indexes": [0, 1]},
}  # fmt: skip


def arch_config(arch: str, small: bool) -> dict:
    """``{"family", "text", "vision", "pixels"}`` for ``arch``, scaled down when ``small``."""
    spec = copy.deepcopy(ARCHS[arch])
    if small:
        spec["text"].update(_SMALL_TEXT)
        spec["text"].pop("head_dim", None)
        spec["text"]["rope_parameters"]["mrope_section"] = [4, 6, 6]  # head_dim 32: 16 frequencies
        spec["vision"].update(_SMALL_VISION[spec["family"]])
    return spec


def model_config(arch: str, small: bool, tokenizer):
    """The transformers config of ``arch`` with the special-token ids of ``tokenizer`` (our tiny Qwen tokenizer)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    spec = arch_config(arch, small)
    config_class = {"qwen2_vl": Qwen2VLConfig, "qwen2_5_vl": Qwen2_5_VLConfig, "qwen3_vl": Qwen3VLConfig}
    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    text = {**spec["text"], "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return config_class[spec["family"]](
        text_config=text, vision_config=spec["vision"], tie_word_embeddings=text["tie_word_embeddings"], **ids
    )


def write_model(arch: str, out: Path, small: bool, device: str, dtype: torch.dtype, seed: int = 0) -> Path:
    """Write a random-weight checkpoint of ``arch`` with our tiny tokenizer and the real processor bounds.

    Returns ``out``, loadable as LLaMA-Factory's ``model_name_or_path``.
    """
    from llamafactory_vision.tiny import build_tiny
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    spec = arch_config(arch, small)
    build_tiny(spec["family"], out, seed=seed)  # tokenizer, processor, generation config; weights replaced below
    config = model_config(arch, small, AutoTokenizer.from_pretrained(out))
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    for stale in out.glob("model*.safetensors*"):  # the tiny weights; the real size may be sharded differently
        stale.unlink()
    model.save_pretrained(out)
    del model

    processor = AutoProcessor.from_pretrained(out)
    shortest, longest = spec["pixels"]
    processor.image_processor.size = {"shortest_edge": shortest, "longest_edge": longest}
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write a random-weight checkpoint of a real-size architecture.")
    parser.add_argument("--arch", choices=sorted(ARCHS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--small", action="store_true", help="the scaled-down variant (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    print(write_model(args.arch, args.out, args.small, args.device, dtype))


if __name__ == "__main__":
    main()
