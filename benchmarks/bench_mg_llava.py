"""MG-LLaVA training throughput against plain LLaVA-1.5 on the same model, batch and step, in one process.

Builds the architecture from configs with random weights (nothing is downloaded): LLaVA-1.5-7B (CLIP ViT-L/14-336
+ Vicuna-7B shapes) with LoRA r8 on the LLM's linear layers, then times training steps (forward + backward + AdamW)
of the plain model, composes MG-LLaVA onto the same model in place (ConvNeXt-L at 768 px, Conv-Gate fusion, object
projector over ``--objects`` boxes per image) and times the same steps again with the object tokens added.
Reports samples/s, seconds/step (median) and peak memory of both, and the step-time ratio (target <= 1.5).

    python benchmarks/bench_mg_llava.py --small                 # CPU, tiny shapes, seconds
    python benchmarks/bench_mg_llava.py --device cuda           # GPU, 7B shapes, about 2 minutes on an H200

Prints one JSON object; copy the figures into benchmarks/RESULTS.md with the machine, date and command.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    ConvNextConfig,
    ConvNextModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

SHAPES = {
    # LLaVA-1.5-7B: CLIP ViT-L/14 at 336 (24 x 24 tokens), Vicuna-7B; MG-LLaVA's CLIP-ConvNeXt-L at 768 (24 x 24).
    "7b": {
        "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                   "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768},
        "text": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064},
        "convnext": {"hidden_sizes": [192, 384, 768, 1536], "depths": [3, 3, 27, 3]},
        "hr_image_size": 768,
    },
    # CPU smoke shapes: 4 x 4 CLIP tokens (64 px / 16) and a stride-32 ConvNeXt at 128 px.
    "small": {
        "vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "image_size": 64, "patch_size": 16, "projection_dim": 64},
        "text": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 4, "vocab_size": 1024},
        "convnext": {"hidden_sizes": [16, 32, 48, 64], "depths": [1, 1, 1, 1]},
        "hr_image_size": 128,
    },
}  # fmt: skip
IMAGE_TOKEN = 3  # any id below the vocabulary; the batch marks image positions with it


def build(shapes: dict, dtype: torch.dtype, device: str) -> LlavaForConditionalGeneration:
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**shapes["vision"], hidden_act="quick_gelu"),
        text_config=LlamaConfig(**shapes["text"], max_position_embeddings=4096),
        image_token_index=IMAGE_TOKEN, projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )  # fmt: skip
    with torch.device(device):  # initialised in place, in the training dtype
        return AutoModelForImageTextToText.from_config(config, dtype=dtype)


def add_lora(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))


def make_batch(shapes: dict, batch: int, text_len: int, objects: int, device: str, dtype: torch.dtype, mg: bool):
    grid = (shapes["vision"]["image_size"] // shapes["vision"]["patch_size"]) ** 2
    image_tokens = grid + (objects if mg else 0)
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(10, shapes["text"]["vocab_size"], (batch, text_len), generator=gen)
    ids = torch.cat([torch.full((batch, image_tokens), IMAGE_TOKEN), text], dim=1)
    labels = ids.clone()
    labels[:, :image_tokens] = -100
    side = shapes["vision"]["image_size"]
    inputs = {"input_ids": ids.to(device), "labels": labels.to(device),
              "pixel_values": torch.randn(batch, 3, side, side, generator=gen).to(device, dtype)}  # fmt: skip
    if mg:
        hr = shapes["hr_image_size"]
        inputs["mg_pixel_values"] = torch.randn(batch, 3, hr, hr, generator=gen).to(device, dtype)
        # xyxy in pixels of the high-res square: two sorted random corners per axis, at least 1 px apart.
        xs = torch.rand(batch, objects, 2, generator=gen).sort(dim=-1).values * (hr - 1)
        ys = torch.rand(batch, objects, 2, generator=gen).sort(dim=-1).values * (hr - 1)
        boxes = torch.stack([xs[..., 0], ys[..., 0], xs[..., 1] + 1, ys[..., 1] + 1], dim=-1)
        inputs["mg_boxes"] = [b.to(device) for b in boxes]
    return inputs


def time_steps(model, inputs, steps: int, warmup: int, device: str) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    batch = inputs["input_ids"].shape[0]
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    del optimizer
    return {"s_per_step": round(step_s, 4), "samples_per_s": round(batch / step_s, 2),
            "peak_gib": round(peak, 2) if peak is not None else None,
            "trainable_params": sum(p.numel() for p in params)}  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes on CPU (a smoke run of the harness)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda for 7B, cpu for --small)")
    parser.add_argument("--batch", type=int, default=None, help="default 4 (7B), 2 (--small)")
    parser.add_argument("--text-len", type=int, default=128, help="text tokens per sample after the image tokens")
    parser.add_argument("--objects", type=int, default=8, help="object boxes (tokens) per image for MG-LLaVA")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default 10 / 5)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=8)
    args = parser.parse_args(argv)
    from llamafactory_vision.fusion.model import compose_mg

    shapes = SHAPES["small" if args.small else "7b"]
    device = args.device or ("cpu" if args.small else "cuda")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batch = args.batch or (2 if args.small else 4)
    steps = args.steps or (5 if args.small else 10)
    torch.manual_seed(0)

    start = time.perf_counter()
    model = add_lora(build(shapes, dtype, device), args.lora_rank)
    model.train()
    plain = time_steps(model, make_batch(shapes, batch, args.text_len, args.objects, device, dtype, mg=False),
                       steps, args.warmup, device)  # fmt: skip
    tower = ConvNextModel(ConvNextConfig(num_channels=3, patch_size=4, image_size=shapes["hr_image_size"],
                                         **shapes["convnext"]))  # fmt: skip
    compose_mg(model, tower, shapes["hr_image_size"], roi_size=4, is_trainable=True)
    mg = time_steps(model, make_batch(shapes, batch, args.text_len, args.objects, device, dtype, mg=True),
                    steps, args.warmup, device)  # fmt: skip
    result = {
        "shapes": "small" if args.small else "llava-1.5-7b + convnext-l@768",
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "dtype": str(dtype), "batch": batch, "text_len": args.text_len,
        "objects_per_image": args.objects, "steps": steps, "lora_rank": args.lora_rank,
        "plain_llava": plain, "mg_llava": mg,
        "step_time_ratio": round(mg["s_per_step"] / plain["s_per_step"], 3), "target_ratio": 1.5,
        "wall_s": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
