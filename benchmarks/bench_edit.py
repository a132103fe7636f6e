"""Edit-stage throughput: one coupled training step (LLaVA-1.5 LoRA + edit head + UNet) against its two parts alone.

Three phases on identical batches, in one process, random weights built from configs (nothing downloaded), timed
interleaved (one step of each phase per round, the order rotating; see ``interleaved_schedule`` in
bench_grounding.py):

1. ``llm``: LLaVA-1.5 LoRA step (CE on the expressive text + [IMG] tokens; embed_tokens/lm_head trained as the host
   does after resizing the vocabulary);
2. ``unet``: an InstructPix2Pix UNet step at ``--resolution`` with a random 77-token condition (as from CLIP text);
3. ``coupled``: what ``stage: edit`` runs (editing/loss.py): the LLM's [IMG] hidden states -> edit head -> UNet loss,
   total = CE + 0.5 * MSE, one optimizer step over LoRA, embeddings, edit head and UNet.

Reports samples/s and peak memory per phase, and the coupling overhead ``t_coupled / (t_llm + t_unet)`` (target
<= 1.10).

    python benchmarks/bench_edit.py --small                   # CPU, tiny shapes, ~1 minute on 2 cores
    python benchmarks/bench_edit.py --device cuda             # LLaVA-1.5-7B + SD-1.5 UNet, 256 px, bf16

Prints one JSON object; copy the figures into benchmarks/RESULTS.md with the machine, date and command.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from llamafactory_vision.editing.diffusion import DiffusionParts, sample_generators
from llamafactory_vision.editing.edit_head import EditHead
from llamafactory_vision.editing.loss import EditLossConfig, edit_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grounding import interleaved_schedule

NUM_IMG = 8
TEXT_TOKENS = 48  # prompt text + expressive instruction, around MGIE's lengths


def llava_config(small: bool):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if small:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8, projection_dim=32)  # fmt: skip
        text = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
        return LlavaConfig(vision_config=vision, text_config=text, image_token_index=500, image_seq_length=16)
    # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 + Vicuna-7B (Llama-2 shapes), vocabulary 32064
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)  # fmt: skip
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")  # fmt: skip


def diffusion_parts(small: bool, resolution: int) -> DiffusionParts:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from llamafactory_vision.tiny.diffusion import sd_scheduler, tiny_unet, tiny_vae

    if small:
        return DiffusionParts(tiny_unet(8, resolution // 8), tiny_vae(resolution), sd_scheduler())
    # SD-1.5 shapes (runwayml/stable-diffusion-v1-5 unet/ and vae/ configs), conv_in at 8 channels (InstructPix2Pix)
    unet = UNet2DConditionModel(sample_size=resolution // 8, in_channels=8, out_channels=4, cross_attention_dim=768,
                                attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)  # fmt: skip
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        sample_size=resolution, scaling_factor=0.18215)  # fmt: skip
    return DiffusionParts(unet, vae, DDPMScheduler.from_config(sd_scheduler().config))


def build(small: bool, device: str, dtype: torch.dtype, resolution: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    config = llava_config(small)
    with torch.device(device):  # built on the device, in the compute dtype: 7B never passes through float32
        llm = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    vocab = config.text_config.vocab_size
    llm.resize_token_embeddings(vocab + NUM_IMG, mean_resizing=False)  # the [IMG] tokens
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                      modules_to_save=["embed_tokens", "lm_head"])  # fmt: skip
    llm = get_peft_model(llm, lora)  # freezes the rest, vision tower included
    for param in llm.parameters():  # as the host: trainable parameters in float32, compute in bf16 (autocast)
        if param.requires_grad:
            param.data = param.data.float()
    parts = diffusion_parts(small, resolution)
    parts.unet.to(device)  # fp32 master weights, bf16 autocast (as mixed-precision training)
    parts.vae.to(device, dtype).requires_grad_(False)
    size = {"d_model": 32, "num_encoder_layers": 1, "num_decoder_layers": 1, "dim_feedforward": 64} if small else {}
    head = EditHead(llm_hidden_size=config.text_config.hidden_size,
                    cross_attention_dim=parts.unet.config.cross_attention_dim, **size).to(device)  # MGIE size on GPU
    img_ids = tuple(range(vocab, vocab + NUM_IMG))
    return llm, parts, head, img_ids, config


def make_batch(config, img_ids, batch: int, resolution: int, device: str, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(0)
    image_tokens = config.image_seq_length
    text = torch.randint(3, 400, (batch, TEXT_TOKENS), generator=gen)
    ids = torch.cat([torch.full((batch, image_tokens), config.image_token_index), text,
                     torch.tensor(img_ids).expand(batch, -1), torch.full((batch, 1), 2)], dim=1)  # fmt: skip
    labels = ids.clone()
    labels[:, : image_tokens + TEXT_TOKENS // 2] = -100  # prompt
    side = config.vision_config.image_size
    positions = torch.arange(NUM_IMG) + image_tokens + TEXT_TOKENS - 1
    return {
        "input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device),
        "pixel_values": torch.randn(batch, 3, side, side, generator=gen).to(device, dtype),
        "edit_positions": positions.expand(batch, -1).to(device),
        "edit_source_pixels": (torch.rand(batch, 3, resolution, resolution, generator=gen) * 2 - 1).to(device),
        "edit_target_pixels": (torch.rand(batch, 3, resolution, resolution, generator=gen) * 2 - 1).to(device),
    }  # fmt: skip


def timed_step(step, device: str) -> tuple[float, int]:
    """One step: wall seconds, and the peak allocated memory during it (bytes, CUDA only, else 0; all three models
    stay resident, so this is the resident weights and optimizer state plus this step's own activations)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() if cuda else 0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU check of the harness)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=None, help="UNet training side (default 256; 32 --small)")
    parser.add_argument("--steps", type=int, default=9, help="timed rounds, one step of each phase a round (--small: 3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds before them (--small: 1)")
    args = parser.parse_args(argv)
    resolution = args.resolution or (32 if args.small else 256)
    if args.small:
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    t0 = time.perf_counter()
    llm, parts, head, img_ids, config = build(args.small, args.device, dtype, resolution)
    build_seconds = time.perf_counter() - t0
    batch = make_batch(config, img_ids, args.batch_size, resolution, args.device, dtype)
    llm_inputs = {k: v for k, v in batch.items() if not k.startswith("edit_")}
    loss_config = EditLossConfig(0.5, 0.05, img_ids)
    params = [p for p in (*llm.parameters(), *head.parameters(), *parts.unet.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    condition = torch.randn(args.batch_size, 77, parts.unet.config.cross_attention_dim, device=args.device)

    def llm_step():
        with autocast:
            loss = llm(**llm_inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def unet_step():  # the same diffusion loss with a fixed condition instead of the edit head's
        from llamafactory_vision.editing.diffusion import draw, edit_diffusion_loss

        with autocast:
            draws = draw(sample_generators(0, 0, list(range(args.batch_size))), 1000)
            loss = edit_diffusion_loss(parts, condition, condition, batch["edit_source_pixels"],
                                       batch["edit_target_pixels"], draws, 0.05)  # fmt: skip
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def coupled_step():
        with autocast:
            out = llm(**llm_inputs, output_hidden_states=True)
            generators = sample_generators(0, 0, list(range(args.batch_size)))
            diffusion = edit_loss(head, parts, out.hidden_states[-1], llm.get_input_embeddings(), batch, generators,
                                  loss_config)  # fmt: skip
            loss = out.loss + loss_config.diffusion_weight * diffusion
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # Interleaved as bench_grounding.py: timing the phases one after the other charged leftover warm-up to the first.
    steps = {"llm": llm_step, "unet": unet_step, "coupled": coupled_step}
    seconds = {name: 0.0 for name in steps}
    peaks = {name: 0 for name in steps}
    for name, _, is_timed in interleaved_schedule(tuple(steps), args.warmup, args.steps):
        took, peak = timed_step(steps[name], args.device)
        if is_timed:
            seconds[name] += took
            peaks[name] = max(peaks[name], peak)
    phases = {}
    for name, total in seconds.items():
        per_step = total / args.steps
        phases[name] = {"s_per_step": round(per_step, 4), "samples_per_s": round(args.batch_size / per_step, 2),
                        "peak_gib": round(peaks[name] / 2**30, 2) if cuda else None}  # fmt: skip
    separate = phases["llm"]["s_per_step"] + phases["unet"]["s_per_step"]
    result = {
        "preset": "small" if args.small else "llava-1.5-7b + sd-1.5 unet", "device": args.device,
        "hardware": torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "batch_size": args.batch_size, "resolution": resolution,
        "image_tokens": config.image_seq_length, "steps": args.steps, "build_seconds": round(build_seconds, 1),
        **{f"{name}_{k}": v for name, phase in phases.items() for k, v in phase.items()},
        "coupling_overhead": round(phases["coupled"]["s_per_step"] / separate, 3),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
