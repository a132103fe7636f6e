"""Convert COCO detection and RefCOCO annotations into ``grounding`` jsonl rows.

- :func:`convert_coco`: COCO ``instances_*.json`` -> one ``detect`` row per (image, category) listing every
  non-crowd box of that category, ``ref`` = category name.
- :func:`convert_refcoco`: RefCOCO/RefCOCO+/RefCOCOg refs joined with their COCO instances by ``ann_id`` ->
  one ``rec`` row per sentence.

Boxes stay in COCO's ``xywh`` pixels (``bbox_format: "xywh"``). Each image that gets a row is opened (header only)
and its real size is the truth: a JSON ``width``/``height`` that differs is an error naming the image and both sizes
(boxes annotated on a larger original would land in empty background), unless ``rescale_to_file`` scales that image's
boxes to the file (counted in the stats). A box reaching past the image is clipped to it (COCO has a few), so every
written box passes the ``grounding`` format's validation; a box with no area is skipped and counted.

Image paths are written relative to the output file's folder, which is how LLaMA-Factory finds them when that folder
is the ``dataset_dir`` you train with (keep the jsonl beside its dataset_info.json).

Command line (mounted as ``llamafactory-vision convert``)::

    llamafactory-vision convert coco --instances instances_val2017.json --images val2017 --out coco_val.jsonl
    llamafactory-vision convert refcoco --refs refs.json --instances instances.json --images train2014 \\
        --out refcoco_val.jsonl --split val [--allow-pickle] [--rescale-to-file]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..boxes import to_xyxy
from ..convert_records import Record, load_json, open_image, relative_path, write_lines

PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles only lists, dicts, tuples, strings and numbers: any class, function or other global a pickle names
    (the only way a pickle runs code) is refused. The RefCOCO refs files hold nothing else."""

    def find_class(self, module: str, name: str):
        raise ValueError(
            f"the pickle names `{module}.{name}`: only plain data (lists, dicts, strings, numbers) is loaded from a "
            "refs pickle; convert the file to JSON"
        )


@dataclass(frozen=True)
class ConvertStats:
    """What a conversion wrote and skipped.

    Attributes:
        rows (int): rows written.
        images (int): distinct images referenced by the rows.
        objects (int): boxes written (summed over rows; a RefCOCO box is counted once per sentence).
        skipped_crowd (int): ``iscrowd`` annotations left out (COCO).
        skipped_degenerate (int): boxes with no area (after clipping to the image) left out.
        clipped (int): boxes clipped to the image bounds.
        skipped_empty_sentences (int): RefCOCO sentences that are empty after stripping.
        rescaled_images (int): images whose JSON size differed from the file, boxes scaled to the file
            (``rescale_to_file`` only).
    """

    rows: int
    images: int
    objects: int
    skipped_crowd: int = 0
    skipped_degenerate: int = 0
    clipped: int = 0
    skipped_empty_sentences: int = 0
    rescaled_images: int = 0


def _records(path: Path, data: Any, key: str) -> list[Record]:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):  # the file's content: a ValueError
        raise ValueError(f"{path}: expected a COCO instances object with a list under {key!r}")  # noqa: TRY004
    return [Record(path, f"{key}[{i}]", record) for i, record in enumerate(data[key])]


@dataclass(frozen=True)
class _Image:
    path: str  # as written in the rows: relative to the output file's folder
    size: tuple[float, float]  # (width, height) of the file
    scale: tuple[float, float] = (1.0, 1.0)  # file size / JSON size (rescale_to_file only)


class _ImageIndex:
    """The ``images`` records of an instances file; each image's file is opened (header only) the first time a row
    needs it, and its size checked against the record's ``width``/``height``."""

    def __init__(self, path: Path, data: Any, images_dir: str, out_jsonl: str | Path, rescale_to_file: bool) -> None:
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise ValueError(f"images folder {images_dir!r} does not exist (resolved to {self.images_dir.resolve()})")
        self.records = {rec.get("id", int): rec for rec in _records(path, data, "images")}
        self.out_jsonl = out_jsonl
        # Resolved once: a plain file name in a resolved folder is its own resolved path unless it is a symlink.
        self._real_dir = self.images_dir.resolve()
        self._written_dir = relative_path(self._real_dir, out_jsonl)
        self.rescale_to_file = rescale_to_file
        self.rescaled = 0
        self._opened: dict[int, _Image] = {}

    def __contains__(self, image_id: int) -> bool:
        return image_id in self.records

    def __getitem__(self, image_id: int) -> _Image:
        if image_id not in self._opened:
            self._opened[image_id] = self._open(self.records[image_id])
        return self._opened[image_id]

    def _open(self, rec: Record) -> _Image:
        file_name = rec.get("file_name", str)
        file = self.images_dir / file_name
        file_size = open_image(rec, "file_name", file)
        width, height = rec.get("width", (int, float), None), rec.get("height", (int, float), None)
        scale = (1.0, 1.0)
        if width is not None and height is not None and (width, height) != file_size:
            if not self.rescale_to_file:
                raise rec.error(
                    "width/height",
                    f"the JSON gives {width}x{height} but image file {str(file)!r} is {file_size[0]}x{file_size[1]}; "
                    "its boxes would not fit the file. Point --images at the images the annotations were made on, "
                    "or pass --rescale-to-file (rescale_to_file=True) to scale this image's boxes to the file",
                )
            scale = (file_size[0] / width, file_size[1] / height)
            self.rescaled += 1
        return _Image(self._written_path(file_name, file), (float(file_size[0]), float(file_size[1])), scale)

    def _written_path(self, file_name: str, file: Path) -> str:
        """``relative_path(file, out_jsonl)`` for ``file = images_dir / file_name``, without resolving every path
        from the root (most of the conversion time): a plain file name that is not a symlink, inside the resolved
        folder, is its own resolved path, written as the folder's written path joined with the name."""
        plain = file_name not in ("", ".", "..") and os.sep not in file_name and (os.altsep or os.sep) not in file_name
        if not plain or os.path.islink(os.path.join(self._real_dir, file_name)):
            return relative_path(file, self.out_jsonl)
        return file_name if self._written_dir == "." else os.path.join(self._written_dir, file_name)


def _largest_below(total: float, start: float) -> float:
    """The largest ``w`` with ``start + w <= total`` in floating point (``total - start`` may overshoot by an ulp)."""
    width = total - start
    while start + width > total:
        width = math.nextafter(width, -math.inf)
    return width


def _xywh_box(rec: Record, image: _Image) -> tuple[list[float] | None, bool]:
    """Validated ``xywh`` box of an annotation, scaled by ``image.scale`` and clipped to the image file.

    Returns:
        (box or None when it has no area, whether it was clipped).
    """
    # BoxError is a ValueError naming the field passed here.
    x1, y1, x2, y2 = to_xyxy(rec.get("bbox", list), "xywh", field=f"{rec.path}: {rec.where}.bbox")
    scaled = image.scale != (1.0, 1.0)
    if scaled:
        sx, sy = image.scale
        x1, y1, x2, y2 = x1 * sx, y1 * sy, x2 * sx, y2 * sy
    width, height = image.size
    cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, width), min(y2, height)
    clipped = (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2)
    if not (cx1 < cx2 and cy1 < cy2):
        return None, clipped
    if scaled or clipped:  # w, h chosen so that x1 + w <= x2 holds in floating point, as the grounding format checks
        return [cx1, cy1, _largest_below(cx2, cx1), _largest_below(cy2, cy1)], clipped
    return list(rec.record["bbox"]), clipped  # kept exactly as written


def _json_string(text: str) -> str:
    """``text`` as a JSON string, as ``json.dumps(..., ensure_ascii=False)`` writes it inside a row."""
    return json.dumps(text, ensure_ascii=False)


def _row_line(image: str, objects: list[tuple[str, list[float]]], task: str) -> str:
    """One jsonl line: exactly ``json.dumps(row, ensure_ascii=False) + "\\n"`` of the row
    ``{"images": [path], "objects": [{"ref": ref, "bbox": box}, ...], "bbox_format": "xywh", "task": task}``,
    written without building the row (a third of the conversion time went to ``json.dumps``).

    Args:
        image (str): the image path, already a JSON string (:func:`_json_string`).
        objects (list[tuple[str, list[float]]]): ``(ref as a JSON string, box)`` per object; the box is a list of
            Python ints and finite floats (as loaded from JSON or computed), whose ``repr`` is its JSON: each number
            written as its ``repr``, separated by ``", "``.
        task (str): ``detect`` or ``rec`` (no character JSON escapes).
    """
    written = ", ".join(f'{{"ref": {ref}, "bbox": {box!r}}}' for ref, box in objects)
    return f'{{"images": [{image}], "objects": [{written}], "bbox_format": "xywh", "task": "{task}"}}\n'


def convert_coco(
    instances_json: str | Path, images_dir: str, out_jsonl: str | Path, rescale_to_file: bool = False
) -> ConvertStats:
    """COCO instances -> ``detect`` rows, one per (image, category) with every non-crowd box of that category.

    Rows follow the order of ``images`` in the file, categories in order of first annotation; images without a
    usable annotation get no row. ``iscrowd`` annotations are skipped and counted.

    Args:
        instances_json (str | Path): COCO ``instances_*.json`` (``images``, ``annotations``, ``categories``).
        images_dir (str): existing folder the ``file_name`` of each image is joined to.
        out_jsonl (str | Path): output file (parents created, overwritten); image paths are written relative to
            its folder.
        rescale_to_file (bool): scale the boxes of an image whose JSON size differs from its file, instead of
            failing. Default False.

    Returns:
        ConvertStats: counts of rows, images, boxes and of what was skipped, clipped or rescaled.

    Raises:
        ValueError: naming the file, the record (``annotations[12]``) and the field that is missing or invalid;
            a missing ``images_dir`` or image file; a JSON size that differs from the image file.
    """
    path = Path(instances_json)
    data = load_json(path)
    images = _ImageIndex(path, data, images_dir, out_jsonl, rescale_to_file)
    categories = {rec.get("id", int): rec.get("name", str) for rec in _records(path, data, "categories")}

    grouped: dict[int, dict[int, list[list[float]]]] = {}  # image id -> category id -> boxes (insertion-ordered)
    crowd = degenerate = clipped = 0
    for rec in _records(path, data, "annotations"):
        image_id, category_id = rec.get("image_id", int), rec.get("category_id", int)
        if image_id not in images:
            raise rec.error("image_id", f"{image_id} is not the id of any entry in 'images'")
        if category_id not in categories:
            raise rec.error("category_id", f"{category_id} is not the id of any entry in 'categories'")
        if rec.get("iscrowd", (int, bool), 0):
            crowd += 1
            continue
        box, was_clipped = _xywh_box(rec, images[image_id])
        clipped += was_clipped
        if box is None:
            degenerate += 1
            continue
        grouped.setdefault(image_id, {}).setdefault(category_id, []).append(box)

    refs = {category_id: _json_string(name) for category_id, name in categories.items()}
    lines, objects = [], 0
    for image_id in images.records:
        if image_id in grouped:
            image = _json_string(images[image_id].path)
            for category_id, boxes in grouped[image_id].items():
                lines.append(_row_line(image, [(refs[category_id], box) for box in boxes], "detect"))
                objects += len(boxes)
    write_lines(out_jsonl, lines)
    return ConvertStats(
        rows=len(lines),
        images=len(grouped),
        objects=objects,
        skipped_crowd=crowd,
        skipped_degenerate=degenerate,
        clipped=clipped,
        rescaled_images=images.rescaled,
    )


def load_refs(refs_path: str | Path, allow_pickle: bool = False) -> list[Any]:
    """Load RefCOCO refs: a JSON list, or the original ``refs(unc).p`` pickle when ``allow_pickle`` is True (plain
    data only: a pickle naming any class or function is refused before it is built, so loading runs no code).

    Raises:
        ValueError: for a pickle without ``allow_pickle``, a pickle holding anything but plain data, invalid JSON,
            or content that is not a list.
    """
    path = Path(refs_path)
    with path.open("rb") as f:
        head = f.read(2)
    # Protocol 2+ pickles start with PROTO (0x80); the Python 2 refs files may also be protocol 0 ("(lp0").
    looks_pickled = path.suffix.lower() in PICKLE_SUFFIXES or head[:1] == b"\x80" or head == b"(l"
    if looks_pickled and not allow_pickle:
        raise ValueError(
            f"{path} is a pickle file, refused by default. Pass allow_pickle=True (command line: --allow-pickle) to "
            "load its plain data (lists, dicts, strings, numbers; nothing that runs code), or convert it to JSON."
        )
    if looks_pickled:
        with path.open("rb") as f:
            # The refs pickles were written by Python 2: latin1 decodes any Python 2 byte string.
            try:
                refs = _PlainDataUnpickler(f, encoding="latin1").load()
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from error
    else:
        refs = load_json(path)
    if not isinstance(refs, list):  # the file's content, not the caller's argument: a ValueError
        raise ValueError(f"{path}: expected a list of refs, got {type(refs).__name__}")  # noqa: TRY004
    return refs


def convert_refcoco(
    refs_path: str | Path,
    instances_json: str | Path,
    images_dir: str,
    out_jsonl: str | Path,
    split: str | None = None,
    allow_pickle: bool = False,
    rescale_to_file: bool = False,
) -> ConvertStats:
    """RefCOCO refs + COCO instances -> ``rec`` rows, one per sentence, with the referred annotation's box.

    Args:
        refs_path (str | Path): refs as a JSON list of ``{"ref_id", "ann_id", "image_id", "split",
            "sentences": [{"sent": ...}, ...]}``; the original pickle only with ``allow_pickle``.
        instances_json (str | Path): the COCO instances holding every ``ann_id`` (RefCOCO ships its own
            ``instances.json``).
        images_dir (str): existing folder the image ``file_name`` is joined to (COCO train2014 for RefCOCO).
        out_jsonl (str | Path): output file (parents created, overwritten); image paths are written relative to
            its folder.
        split (str | None): keep only refs of this split (``train``, ``val``, ``testA``, ...). Default: all.
        allow_pickle (bool): load a pickled refs file (plain data only). Default False.
        rescale_to_file (bool): scale the boxes of an image whose JSON size differs from its file, instead of
            failing. Default False.

    Returns:
        ConvertStats: counts of rows, images and boxes, and of skipped, clipped or rescaled boxes and empty sentences.

    Raises:
        ValueError: naming the file, the record (``refs[3]``) and the field that is missing or invalid; for an
            unknown ``split`` (listing the splits present); for a pickle without ``allow_pickle``; a missing
            ``images_dir`` or image file; a JSON size that differs from the image file.
    """
    refs_file, instances_file = Path(refs_path), Path(instances_json)
    refs = [Record(refs_file, f"refs[{i}]", ref) for i, ref in enumerate(load_refs(refs_file, allow_pickle))]
    data = load_json(instances_file)
    images = _ImageIndex(instances_file, data, images_dir, out_jsonl, rescale_to_file)
    annotations = {rec.get("id", int): rec for rec in _records(instances_file, data, "annotations")}

    if split is not None:
        splits = sorted({str(ref.get("split", str)) for ref in refs})
        if split not in splits:
            raise ValueError(f"split={split!r}: {refs_file} has no ref of that split; splits present: {splits}")
        refs = [ref for ref in refs if ref.get("split", str) == split]

    lines: list[str] = []
    image_paths: set[str] = set()
    degenerate = clipped = empty = 0
    for ref in refs:
        ann_id = ref.get("ann_id", int)
        if ann_id not in annotations:
            raise ref.error("ann_id", f"{ann_id} is not the id of any annotation in {instances_file}")
        ann = annotations[ann_id]
        image_id = ann.get("image_id", int)
        if ref.get("image_id", int, image_id) != image_id:
            raise ref.error("image_id", f"{ref.record['image_id']} differs from annotation {ann_id}'s {image_id}")
        if image_id not in images:
            raise ann.error("image_id", f"{image_id} is not the id of any entry in 'images'")
        box, was_clipped = _xywh_box(ann, images[image_id])
        clipped += was_clipped
        if box is None:
            degenerate += 1
            continue
        for j, sentence in enumerate(ref.get("sentences", list)):
            text = Record(ref.path, f"{ref.where}.sentences[{j}]", sentence).get("sent", str).strip()
            if not text:
                empty += 1
                continue
            lines.append(_row_line(_json_string(images[image_id].path), [(_json_string(text), box)], "rec"))
            image_paths.add(images[image_id].path)
    write_lines(out_jsonl, lines)
    return ConvertStats(
        rows=len(lines),
        images=len(image_paths),
        objects=len(lines),
        skipped_degenerate=degenerate,
        clipped=clipped,
        skipped_empty_sentences=empty,
        rescaled_images=images.rescaled,
    )


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


RESCALE_HELP = (
    "where an image file's size differs from the JSON width/height, scale its boxes to the file (counted as "
    "rescaled_images) instead of stopping with an error"
)


def add_convert_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``convert {coco,refcoco,ip2p,magicbrush}`` to a parent CLI's subparsers; the parsed namespace's ``func``
    runs it (the edit sources come from editing/convert.py).

    Usage in the parent: ``args = parser.parse_args(argv); return args.func(args)``.
    """
    from ..editing.convert import add_edit_convert_parsers

    convert = subparsers.add_parser(
        "convert", help="convert COCO / RefCOCO to grounding jsonl, InstructPix2Pix / MagicBrush to edit jsonl"
    )
    sources = convert.add_subparsers(dest="source", required=True)

    coco = sources.add_parser("coco", help="COCO instances -> detect rows (one per image x category)")
    coco.add_argument("--instances", required=True, help="COCO instances_*.json")
    coco.add_argument("--images", required=True, help="folder holding the images (joined to each file_name)")
    coco.add_argument("--out", required=True, help="output .jsonl (image paths are written relative to its folder)")
    coco.add_argument("--rescale-to-file", action="store_true", help=RESCALE_HELP)
    coco.set_defaults(func=run_convert)

    refcoco = sources.add_parser("refcoco", help="RefCOCO refs + COCO instances -> rec rows (one per sentence)")
    refcoco.add_argument(
        "--refs", required=True, help="refs as JSON (or the original refs(unc).p with --allow-pickle)"
    )
    refcoco.add_argument("--instances", required=True, help="COCO instances json holding the referred annotations")
    refcoco.add_argument("--images", required=True, help="folder holding the images (joined to each file_name)")
    refcoco.add_argument("--out", required=True, help="output .jsonl (image paths are written relative to its folder)")
    refcoco.add_argument("--rescale-to-file", action="store_true", help=RESCALE_HELP)
    refcoco.add_argument("--split", default=None, help="keep one split only, e.g. val, testA, testB")
    refcoco.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load a pickled refs file (plain data only: one naming any class or function is refused)",
    )
    refcoco.set_defaults(func=run_convert)
    add_edit_convert_parsers(sources)
    return convert


def run_convert(args: argparse.Namespace) -> int:
    """Handler of ``convert``: runs the conversion and prints its :class:`ConvertStats` as JSON."""
    if args.source == "coco":
        stats = convert_coco(args.instances, args.images, args.out, args.rescale_to_file)
    else:
        stats = convert_refcoco(
            args.refs, args.instances, args.images, args.out, args.split, args.allow_pickle, args.rescale_to_file
        )
    print(json.dumps({"out": str(args.out), **asdict(stats)}, indent=2))
    return 0
