"""Convert InstructPix2Pix and MagicBrush data into ``edit`` jsonl rows.

A row is ``{"source", "instruction", "target", "target_caption"?}`` (see editing/data.py for the format).

- :func:`convert_ip2p`: InstructPix2Pix sample folders (found anywhere under the root), each holding ``prompt.json``
  (``{"input", "edit", "output"}``) and one or more seed pairs ``<seed>_0.jpg`` (source) / ``<seed>_1.jpg``
  (target) -> one row per pair; ``edit`` is the instruction and ``output`` (the caption of the edited image) the
  target caption.
- :func:`convert_magicbrush`: a JSONL with MagicBrush's columns (``img_id``, ``turn_index``, ``source_img``,
  ``mask_img``, ``instruction``, ``target_img``; image fields are paths, relative to ``images_dir``) -> one row per
  line. The mask (optional: MagicBrush's first releases had none) must be a readable image too, but the ``edit``
  format (MGIE) does not use it, so it is not written.

Every image is opened (header only). A missing or unreadable image, a seed without its partner, or a missing field is
an error naming the file, the record and the field; with ``skip_invalid`` that record is skipped instead and counted
by reason in the stats. Image paths are written relative to the output file's folder, which is how LLaMA-Factory finds
them when that folder is the ``dataset_dir`` you train with (keep the jsonl beside its dataset_info.json).

Command line (mounted as ``llamafactory-vision convert``)::

    llamafactory-vision convert ip2p --root clip-filtered-dataset --out ip2p.jsonl [--skip-invalid]
    llamafactory-vision convert magicbrush --jsonl train.jsonl [--images imgs] --out mb.jsonl [--skip-invalid]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..convert_records import Record, RecordError, load_json, open_image, relative_path, write_rows

PROMPT_FILE = "prompt.json"
IP2P_IMAGE = re.compile(r"^(?P<seed>.+)_(?P<side>[01])\.jpg$")  # <seed>_0.jpg source, <seed>_1.jpg target
MAGICBRUSH_IMAGES = ("source_img", "mask_img", "target_img")


@dataclass(frozen=True)
class EditConvertStats:
    """What an edit conversion wrote and skipped.

    Attributes:
        rows (int): rows written.
        images (int): distinct image files referenced by the rows (source and target).
        skipped (int): invalid records skipped (``skip_invalid`` only; 0 otherwise, since the first one stops).
        skipped_by_reason (dict[str, int]): ``skipped`` split by reason (``missing_image``, ``corrupt_image``,
            ``unpaired_image``, ``invalid``).
    """

    rows: int
    images: int
    skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)


class _Rows:
    """Collects rows; an invalid record raises, or with ``skip_invalid`` is counted by reason."""

    def __init__(self, out_jsonl: str | Path, skip_invalid: bool) -> None:
        self.out_jsonl, self.skip_invalid = out_jsonl, skip_invalid
        self.rows: list[dict[str, Any]] = []
        self.skipped: Counter[str] = Counter()

    def image(self, rec: Record, name: str, file: Path) -> str:
        open_image(rec, name, file)
        return relative_path(file, self.out_jsonl)

    def skip(self, err: RecordError) -> None:
        if not self.skip_invalid:
            raise err
        self.skipped[err.reason] += 1

    def write(self) -> EditConvertStats:
        write_rows(self.out_jsonl, self.rows)
        images = {row[key] for row in self.rows for key in ("source", "target")}
        return EditConvertStats(
            len(self.rows), len(images), sum(self.skipped.values()), dict(sorted(self.skipped.items()))
        )


def _text(rec: Record, name: str) -> str:
    text = rec.get(name, str).strip()
    if not text:
        raise rec.error(name, "empty text")
    return text


def _seed_pairs(folder: Path) -> list[tuple[str, Path | None, Path | None]]:
    """``(seed, source, target)`` of every ``<seed>_0.jpg``/``<seed>_1.jpg`` in ``folder``, sorted by seed; a side
    that is absent is None (the caller reports it)."""
    sides: dict[str, dict[str, Path]] = {}
    for file in folder.iterdir():
        match = IP2P_IMAGE.match(file.name)
        if match:
            sides.setdefault(match["seed"], {})[match["side"]] = file
    return [(seed, pair.get("0"), pair.get("1")) for seed, pair in sorted(sides.items())]


def convert_ip2p(root: str | Path, out_jsonl: str | Path, skip_invalid: bool = False) -> EditConvertStats:
    """InstructPix2Pix sample folders -> ``edit`` rows, one per seed pair.

    Args:
        root (str | Path): folder searched (recursively, in sorted order) for ``prompt.json`` files; each one's folder
            is a sample.
        out_jsonl (str | Path): output file (parents created, overwritten); image paths are written relative to its
            folder.
        skip_invalid (bool): skip and count an invalid pair (or a sample whose prompt.json is invalid, counted once
            per pair) instead of stopping. Default False.

    Returns:
        EditConvertStats: rows, images and skipped records by reason.

    Raises:
        ValueError: a missing root or one without any prompt.json; naming the file, the record (``pair 42``) and
            the field for a missing field or empty text, a missing or unreadable image, or a seed without its partner;
            naming the folder for a sample without any pair.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"InstructPix2Pix folder {str(root)!r} does not exist (resolved to {root.resolve()})")
    prompts = sorted(root.rglob(PROMPT_FILE))
    if not prompts:
        raise ValueError(f"{root}: no {PROMPT_FILE} found; expected sample folders with {PROMPT_FILE} and "
                         "<seed>_0.jpg / <seed>_1.jpg pairs")  # fmt: skip
    out = _Rows(out_jsonl, skip_invalid)
    for prompt_file in prompts:
        folder = prompt_file.parent
        pairs = _seed_pairs(folder)
        if not pairs:  # a sample without images would otherwise vanish without a word
            out.skip(
                RecordError(f"{folder}: no <seed>_0.jpg / <seed>_1.jpg pair beside {PROMPT_FILE}", "missing_image")
            )
            continue
        try:
            try:
                data = load_json(prompt_file)
            except ValueError as err:  # invalid JSON: an invalid record like any other
                raise RecordError(str(err)) from err
            prompt = Record(prompt_file, "prompt", data)
            instruction, caption = _text(prompt, "edit"), _text(prompt, "output")
        except RecordError as err:
            for _ in pairs:
                out.skip(err)
            continue
        for seed, source, target in pairs:
            rec = Record(folder, f"pair {seed}", {})
            try:
                if source is None or target is None:
                    have, need = (source, f"{seed}_1.jpg") if target is None else (target, f"{seed}_0.jpg")
                    raise rec.error("target" if target is None else "source",
                                    f"{have.name} has no partner {need}", "unpaired_image")  # fmt: skip
                row = {"source": out.image(rec, "source", source), "instruction": instruction,
                       "target": out.image(rec, "target", target), "target_caption": caption}  # fmt: skip
            except RecordError as err:
                out.skip(err)
                continue
            out.rows.append(row)
    return out.write()


def convert_magicbrush(
    jsonl: str | Path, out_jsonl: str | Path, images_dir: str | Path | None = None, skip_invalid: bool = False
) -> EditConvertStats:
    """A MagicBrush-style JSONL -> ``edit`` rows, one per line (a multi-turn session gives one row per turn, each
    from that turn's source image).

    Args:
        jsonl (str | Path): one JSON object per line with ``source_img``, ``instruction``, ``target_img`` and
            optionally ``mask_img`` (``img_id`` and ``turn_index`` are optional and only name the record in errors).
        out_jsonl (str | Path): output file (parents created, overwritten); image paths are written relative to its
            folder.
        images_dir (str | Path | None): folder the image paths are relative to. Default: the JSONL's folder.
        skip_invalid (bool): skip and count an invalid line instead of stopping. Default False.

    Returns:
        EditConvertStats: rows, images and skipped records by reason.

    Raises:
        ValueError: naming the file, the line and the field for invalid JSON, a missing field or empty instruction,
            or a missing or unreadable image.
    """
    path = Path(jsonl)
    base = Path(images_dir) if images_dir is not None else path.parent
    if not base.is_dir():
        raise ValueError(f"images folder {str(base)!r} does not exist (resolved to {base.resolve()})")
    out = _Rows(out_jsonl, skip_invalid)
    with path.open(encoding="utf-8") as f:
        lines = [(i, line) for i, line in enumerate(f, start=1) if line.strip()]
    for number, line in lines:
        where = f"line {number}"
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise RecordError(f"{path}: {where}: not valid JSON ({err})") from err
            rec = Record(path, where, record)
            if "img_id" in record:  # name the sample too: MagicBrush's own key
                rec.where = f"{where} (img_id {record['img_id']!r}, turn {record.get('turn_index')!r})"
            # mask_img may be absent (MagicBrush's first releases had no masks); present, it must be readable
            names = [name for name in MAGICBRUSH_IMAGES if name != "mask_img" or name in record]
            files = {name: base / rec.get(name, str) for name in names}
            written = {name: out.image(rec, name, file) for name, file in files.items()}
            row = {"source": written["source_img"], "instruction": _text(rec, "instruction"),
                   "target": written["target_img"]}  # fmt: skip
        except RecordError as err:
            out.skip(err)
            continue
        out.rows.append(row)
    return out.write()


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

SKIP_HELP = "skip a record with a missing/unreadable image or field (counted by reason) instead of stopping"


def add_edit_convert_parsers(sources: argparse._SubParsersAction) -> None:
    """Add ``ip2p`` and ``magicbrush`` to the ``convert`` command's sources."""
    ip2p = sources.add_parser("ip2p", help="InstructPix2Pix sample folders -> edit rows (one per seed pair)")
    ip2p.add_argument("--root", required=True, help="folder holding the sample folders (prompt.json + *_0/_1.jpg)")
    ip2p.add_argument("--out", required=True, help="output .jsonl (image paths are written relative to its folder)")
    ip2p.add_argument("--skip-invalid", action="store_true", help=SKIP_HELP)
    ip2p.set_defaults(func=run_edit_convert)

    mb = sources.add_parser("magicbrush", help="MagicBrush-style JSONL -> edit rows (one per line)")
    mb.add_argument(
        "--jsonl", required=True, help="JSONL with source_img, instruction, target_img (+ mask_img, optional)"
    )
    mb.add_argument("--images", default=None, help="folder the image paths are relative to (default: the JSONL's)")
    mb.add_argument("--out", required=True, help="output .jsonl (image paths are written relative to its folder)")
    mb.add_argument("--skip-invalid", action="store_true", help=SKIP_HELP)
    mb.set_defaults(func=run_edit_convert)


def run_edit_convert(args: argparse.Namespace) -> int:
    """Handler of ``convert ip2p|magicbrush``: runs the conversion and prints its stats as JSON."""
    if args.source == "ip2p":
        stats = convert_ip2p(args.root, args.out, args.skip_invalid)
    else:
        stats = convert_magicbrush(args.jsonl, args.out, args.images, args.skip_invalid)
    print(json.dumps({"out": str(args.out), **asdict(stats)}, indent=2))
    return 0
