"""Offline synthetic datasets with known answers, for tests and demos: one module per capability.

- :mod:`.grounding`: coloured shapes with exact boxes (``grounding`` format).
- :mod:`.edit`: recolour/move edits of one shape with exact targets (``edit`` format).

``python -m llamafactory_vision.synth <capability> --out DIR ...`` writes one (see :func:`main`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from llamafactory_vision.synth import edit, grounding
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

# Each capability module adds its sub-command with `add_parser(commands)`; the parsed args carry `generate`.
CAPABILITIES = (grounding, edit)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m llamafactory_vision.synth <capability> --out DIR [...]``; prints the summary as JSON."""
    parser = argparse.ArgumentParser(prog="python -m llamafactory_vision.synth", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for module in CAPABILITIES:
        module.add_parser(commands)
    args = parser.parse_args(argv)
    print(json.dumps(args.generate(args), indent=2))
    return 0


__all__ = [
    "BBOX_FORMATS",
    "COLOURS",
    "PRESETS",
    "SHAPES",
    "encode_box",
    "generate_edit",
    "generate_grounding",
    "main",
    "make_scene",
]
