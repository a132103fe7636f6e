"""``llamafactory-vision``: our own commands beside ``llamafactory-cli`` (which runs training, export and the web UI).

    llamafactory-vision preview CONFIG.yaml --out DIR [--n 16]    draw target boxes as the model sees them
                                  [--split train|eval]            (a predict YAML: its eval set)
    llamafactory-vision convert coco|refcoco ...                  COCO / RefCOCO annotations -> grounding jsonl
    llamafactory-vision demo [--out out/demo]                     the offline end-to-end grounding demo
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
    from llamafactory_vision.demo import run_demo

    return run_demo(args.out, quick=args.quick)


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

    demo = commands.add_parser("demo", help="offline demo: tiny Qwen2-VL, synthetic data, train, evaluate")
    demo.add_argument("--out", default="out/demo", help="working folder (default out/demo)")
    demo.add_argument("--quick", action="store_true", help="a few steps only, to check the pipeline end to end")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
