"""Shared pieces of the ``llamafactory-vision convert`` converters (grounding/convert.py, editing/convert.py).

Errors name the file, the record and the field (``instances.json: annotations[12].bbox: ...``); image files are opened
(header only) where a record names them; written paths are relative to the output file's folder, which is how
LLaMA-Factory finds them when that folder is the ``dataset_dir`` you train with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import UnidentifiedImageError

from .image_header import image_size

_REQUIRED = object()  # default of `Record.get` for a field that must be present


class RecordError(ValueError):
    """An invalid record; ``reason`` is a short key used to count skipped records."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # pickle would rebuild it from the message alone and lose the reason
        return type(self), (str(self), self.reason)


class Record:
    """Field access on one JSON record whose errors name the file, the record and the field."""

    def __init__(self, path: Path, where: str, record: Any) -> None:
        if not isinstance(record, dict):
            raise RecordError(f"{path}: {where}: expected a JSON object, got {type(record).__name__}")
        self.path, self.where, self.record = path, where, record

    def error(self, field: str, message: str, reason: str = "invalid") -> RecordError:
        return RecordError(f"{self.path}: {self.where}.{field}: {message}", reason)

    def get(self, field: str, kind: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
        if field not in self.record:
            if default is not _REQUIRED:
                return default
            raise self.error(field, "missing field")
        value = self.record[field]
        if type(value) is kind:  # the common case, decided without the isinstance and bool checks below
            return value
        if not isinstance(value, kind) or isinstance(value, bool) and bool not in _as_tuple(kind):
            raise self.error(field, f"expected {_kind_name(kind)}, got {type(value).__name__} {value!r}")
        return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kind))


def load_json(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def open_image(rec: Record, field: str, file: Path) -> tuple[int, int]:
    """Open ``file`` (header only) for the record's ``field``; returns its ``(width, height)``, as PIL's
    ``Image.open(file).size`` (:func:`~llamafactory_vision.image_header.image_size`: the header reader for
    well-formed PNG and JPEG headers, PIL for everything else).

    Raises:
        RecordError: naming the record and field, reason ``missing_image`` or ``corrupt_image``.
    """
    try:
        return image_size(file)
    except FileNotFoundError as err:
        raise rec.error(field, f"image file {str(file)!r} not found", "missing_image") from err
    except (UnidentifiedImageError, OSError) as err:
        raise rec.error(field, f"cannot read image {str(file)!r}: {err}", "corrupt_image") from err


def relative_path(file: Path, out_jsonl: str | Path) -> str:
    """``file`` as written in a row: relative to the folder of the output file."""
    return os.path.relpath(file.resolve(), Path(out_jsonl).resolve().parent)


def write_rows(out_jsonl: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    write_lines(out_jsonl, [json.dumps(row, ensure_ascii=False) + "\n" for row in rows])


def write_lines(out_jsonl: str | Path, lines: Sequence[str]) -> None:
    """Write jsonl ``lines`` (each ending in a newline) to ``out_jsonl``, creating its folder; UTF-8."""
    out = Path(out_jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        f.writelines(lines)
