"""Check that a bbox head saved by a (multi-process / ZeRO) training run reloads the way predict loads it.

    python benchmarks/check_head.py --model MODEL_DIR --adapter RUN_OUTPUT_DIR --template qwen2_vl_ground

Loads the base model with the run's LoRA adapter through LLaMA-Factory (``get_infer_args`` + ``load_model``), attaches
the head as predict does, and checks: full shapes (no empty ZeRO-3 shard was written), finite values, the trained last
layer no longer at its zero initialisation, and the attached head equal to the file. Prints one JSON object; exits 1
when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", required=True, help="output_dir of the training run")
    parser.add_argument("--template", default="qwen2_vl_ground")
    args = parser.parse_args(argv)

    from llamafactory_vision import _bootstrap

    _bootstrap.install()  # the .pth does this where the package is pip-installed; idempotent
    from llamafactory.hparams import get_infer_args
    from llamafactory.model import load_model, load_tokenizer
    from llamafactory_vision.grounding.bbox_head import attach_head, load_head

    saved = load_head(args.adapter)
    model_args, _, finetuning_args, _ = get_infer_args({
        "model_name_or_path": args.model, "adapter_name_or_path": args.adapter, "template": args.template,
        "finetuning_type": "lora", "bbox_head": True,
    })  # fmt: skip
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    model = load_model(tokenizer, model_args, finetuning_args, is_trainable=False)
    attached = attach_head(model, model_args, finetuning_args, is_trainable=False)
    hidden_size = model.get_input_embeddings().embedding_dim

    state = saved.state_dict()
    last_weight = [name for name in state if name.endswith("weight")][-1]
    checks = {
        "hidden_size_matches": saved.config.hidden_size == hidden_size,
        "no_empty_tensor": all(t.numel() > 0 for t in state.values()),
        "finite": all(bool(torch.isfinite(t.float()).all()) for t in state.values()),
        "last_layer_trained": bool(state[last_weight].abs().sum() > 0),
        "attached_equals_file": all(
            torch.equal(t.cpu(), attached.state_dict()[name].cpu().to(t.dtype)) for name, t in state.items()
        ),
    }
    result = {
        "ok": all(checks.values()),
        **checks,
        "shapes": {k: list(v.shape) for k, v in state.items()},
    }
    print(json.dumps(result, indent=2))
    if not result["ok"]:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
