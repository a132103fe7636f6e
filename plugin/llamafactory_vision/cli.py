"""``llamafactory-vision``: our own commands beside ``llamafactory-cli`` (which runs training, export and the web UI).

    llamafactory-vision preview CONFIG.yaml --out DIR [--n 16]    draw target boxes as the model sees them
                                  [--split train|eval]            (a predict YAML: its eval set)
    llamafactory-vision convert coco|refcoco ...                  COCO / RefCOCO annotations -> grounding jsonl
    llamafactory-vision convert ip2p|magicbrush ...               InstructPix2Pix / MagicBrush -> edit jsonl
    llamafactory-vision demo [--task grounding|edit] [--out DIR]  the offline end-to-end demos
    llamafactory-vision edit --model_name_or_path M [--adapter_name_or_path A] --image in.png
        --instruction "make it snowy" --out out.png [--steps 100 --text_guidance 7.5 --image_guidance 1.5 --seed N]
                                                                  edit one image with a trained `stage: edit` model
"""

from __future__ import annotations

import argparse
import sys


def _preview(args: argparse.Namespace) -> int:
    from llamafactory_vision.grounding.preview import preview

    out = preview(args.config, args.out, n=args.n, split=args.split)
    print(f"preview written to {out}/ (PNGs and preview.jsonl)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.task == "edit":
        from llamafactory_vision.editing.demo import DEFAULT_OUT, run_edit_demo

        return run_edit_demo(args.out or DEFAULT_OUT, quick=args.quick)
    from llamafactory_vision.demo import DEFAULT_OUT, run_demo

    return run_demo(args.out or DEFAULT_OUT, quick=args.quick)


def _edit(args: argparse.Namespace) -> int:
    import torch

    from llamafactory_vision.editing.parts import EditRecord
    from llamafactory_vision.editing.pipeline import EditPipeline

    pipe = EditPipeline.from_training(args.model_name_or_path, args.adapter_name_or_path)
    record = EditRecord.load(args.adapter_name_or_path or args.model_name_or_path)  # settings recorded at training
    result = pipe(
        _open_rgb(args.image),
        args.instruction,
        num_inference_steps=args.steps or record.num_inference_steps,
        text_guidance_scale=args.text_guidance or record.text_guidance,
        image_guidance_scale=args.image_guidance or record.image_guidance,
        resolution=args.resolution,
        max_new_tokens=record.max_new_tokens,
        generator=torch.Generator().manual_seed(args.seed),
    )
    result.images[0].save(args.out)
    print(f"expressive instruction: {result.expressive[0]}")
    print(f"edited image written to {args.out}")
    return 0


def _open_rgb(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def build_parser() -> argparse.ArgumentParser:
    from llamafactory_vision.grounding.convert import add_convert_parser

    parser = argparse.ArgumentParser(prog="llamafactory-vision", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    preview = commands.add_parser("preview", help="draw the target boxes of a YAML's data, as the model sees it")
    preview.add_argument("config", help="a training or predict YAML (same file as for `llamafactory-cli train`)")
    preview.add_argument("--out", required=True, help="output folder for PNGs and preview.jsonl")
    preview.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    preview.add_argument(
        "--split", choices=("train", "eval"), default=None,
        help="`dataset` (train) or `eval_dataset` (eval); default: train when the YAML has a `dataset`, else eval",
    )  # fmt: skip
    preview.set_defaults(func=_preview)

    add_convert_parser(commands)

    demo = commands.add_parser("demo", help="offline demo on tiny models: grounding (Qwen2-VL) or edit (LLaVA + UNet)")
    demo.add_argument("--task", choices=("grounding", "edit"), default="grounding", help="which demo (default grounding)")
    demo.add_argument("--out", default=None, help="working folder (default out/demo, or out/demo_edit for edit)")
    demo.add_argument("--quick", action="store_true", help="a few steps only, to check the pipeline end to end")
    demo.set_defaults(func=_demo)

    edit = commands.add_parser("edit", help="edit one image with a model trained by `stage: edit`")
    edit.add_argument("--model_name_or_path", required=True, help="base LLaVA model, or the fully fine-tuned one")
    edit.add_argument("--adapter_name_or_path", default=None, help="the LoRA output dir of the edit training run")
    edit.add_argument("--image", required=True, help="source image")
    edit.add_argument("--instruction", required=True, help='the edit, e.g. "make it snowy"')
    edit.add_argument("--out", required=True, help="where to write the edited image (PNG)")
    edit.add_argument("--steps", type=int, default=None, help="denoising steps (default: the run's, MGIE 100)")
    edit.add_argument("--text_guidance", type=float, default=None, help="text guidance (default: the run's, 7.5)")
    edit.add_argument("--image_guidance", type=float, default=None, help="image guidance (default: the run's, 1.5)")
    edit.add_argument("--resolution", type=int, default=None, help="crop/resize to this square first (default: no)")
    edit.add_argument("--seed", type=int, default=0, help="the same seed gives the same image (default 0)")
    edit.set_defaults(func=_edit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
