"""YAML keys of the ``stroke_guess`` format (a mixin of ``VisionDataArguments``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llamafactory_vision")


@dataclass
class StrokeDataArguments:
    stroke_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder for the rendered images of `stroke_guess` datasets (sketch painted or contour drawn), "
            "named by a hash of the row's inputs so each is rendered once. Default: "
            "$XDG_CACHE_HOME/llamafactory_vision/strokes (~/.cache/...)."
        },
    )

    def resolved_stroke_cache_dir(self) -> str:
        return self.stroke_cache_dir or os.path.join(default_cache_dir(), "strokes")
