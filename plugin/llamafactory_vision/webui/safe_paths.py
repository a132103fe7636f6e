"""Path checks for the files our web UI additions read: only inside the chosen dataset or output directory."""

from __future__ import annotations

import os
from pathlib import Path


class OutsideError(ValueError):
    """A path that leaves its allowed root (``..``, an absolute path elsewhere, or a symlink pointing out)."""


def resolve_under(root: str | os.PathLike, path: str | os.PathLike, what: str = "path") -> Path:
    """``root / path`` with every symlink resolved, refused unless it stays inside ``root``.

    An absolute ``path`` is accepted only when it lies inside ``root`` too. Raises :class:`OutsideError` naming
    ``what`` and the path otherwise.
    """
    base = Path(root).resolve()
    target = (base / path).resolve()  # an absolute `path` replaces base; resolve() follows symlinks
    if target != base and base not in target.parents:
        raise OutsideError(f"{what} {str(path)!r} is outside {str(base)!r}; refused.")
    return target
