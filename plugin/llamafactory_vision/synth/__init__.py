"""Offline synthetic datasets with known answers, for tests and demos: one module per capability.

- :mod:`.grounding`: coloured shapes with exact boxes (``grounding`` format).
- :mod:`.mg_llava`: shape scenes as conversations with object boxes (``mg_llava`` format, MG-LLaVA).
- :mod:`.stroke_guess`: objects sketched as strokes over shapes (``stroke_guess`` format, MagicQuill Draw&Guess).
- :mod:`.edit`: recolour/move edits of one shape with exact targets (``edit`` format).

They share :mod:`.common`: argument checks, the train/val split files, ``dataset_info.json`` and ``--out/--n/...``.

``python -m llamafactory_vision.synth <capability> --out DIR ...`` writes one (see :func:`main`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from llamafactory_vision.synth import edit, grounding, mg_llava, stroke_guess
from llamafactory_vision.synth.edit import generate_edit
from llamafactory_vision.synth.grounding import (
    BBOX_FORMATS,
    COLOURS,
    PRESETS,
    SHAPES,
    encode_box,
    generate_grounding,
    make_scene,
)
from llamafactory_vision.synth.mg_llava import generate_mg_llava
from llamafactory_vision.synth.stroke_guess import generate_stroke_guess

# Each capability module adds its sub-command with `add_parser(commands)`; the parsed args carry `generate`.
CAPABILITIES = (grounding, edit, stroke_guess, mg_llava)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m llamafactory_vision.synth``: one sub-command per capability."""
    parser = argparse.ArgumentParser(prog="python -m llamafactory_vision.synth", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for module in CAPABILITIES:
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m llamafactory_vision.synth <capability> --out DIR [...]``; prints the summary as JSON."""
    args = build_parser().parse_args(argv)
    print(json.dumps(args.generate(args), indent=2))
    return 0


__all__ = [
    "BBOX_FORMATS", "COLOURS", "PRESETS", "SHAPES", "build_parser", "encode_box", "generate_edit",
    "generate_grounding", "generate_mg_llava", "generate_stroke_guess", "main", "make_scene",
]  # fmt: skip
