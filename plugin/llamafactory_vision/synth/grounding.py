"""Offline synthetic grounding data: coloured shapes with known, tight boxes on textured backgrounds.

Every scene is drawn with numpy + PIL from its own random stream ``np.random.default_rng([seed, index])``, so the
same ``seed`` always writes byte-identical files and growing ``n`` leaves earlier samples unchanged.

Boxes are ``xyxy`` in pixel *edges* of the original image: a shape whose drawn pixels span columns ``c0..c1`` and
rows ``r0..r1`` has the box ``(c0, r0, c1 + 1, r1 + 1)``, so ``0 <= x1 < x2 <= W`` and ``0 <= y1 < y2 <= H``.
Shapes are drawn without anti-aliasing and never overlap, so each box is exactly the bounds of its shape's pixels.

Command line::

    python -m llamafactory_vision.synth grounding --out DIR --n 200 --seed 0 [--val-frac 0.2]
        [--preset varied|demo] [--max-objects K]

writes ``DIR/images/*.png``, ``DIR/ground_train.jsonl``, ``DIR/ground_val.jsonl`` and merges the entries
``synth_ground_train`` / ``synth_ground_val`` into ``DIR/dataset_info.json``. Image paths in the rows are relative
to ``DIR``: LLaMA-Factory joins them with ``media_dir``, which defaults to ``dataset_dir`` (use ``dataset_dir: DIR``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from llamafactory_vision.boxes import BOX_FORMATS, from_xyxy
from llamafactory_vision.synth.common import add_common_arguments, check_size, val_indices, write_split

# Saturated colours: each has a channel outside 60..210, the range of every plain/gradient/stripes/checker
# background pixel (see `_muted_colour`), so on those backgrounds a pixel of an exact shape colour belongs to a
# shape. The `ramp` background keeps green at 40, so there the demo's high-green colours never occur either.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 215, 20),
    "purple": (140, 40, 190),
    "orange": (250, 135, 15),
    "pink": (250, 100, 180),
    "cyan": (0, 200, 215),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
BACKGROUNDS = ("plain", "gradient", "stripes", "checker", "noise", "ramp")
SIZE_CLASSES = ("normal", "tiny", "wide", "tall", "big", "demo")
TASKS = ("rec", "reg", "detect")
BBOX_FORMATS = BOX_FORMATS  # values of a row's `bbox_format`
REF_ATTRIBUTES = ("colour", "size", "position")

TRAIN_FILE = "ground_train.jsonl"
VAL_FILE = "ground_val.jsonl"
TRAIN_DATASET = "synth_ground_train"
VAL_DATASET = "synth_ground_val"

_MIN_OBJECT_SIDE = 8  # px: below this a star or hexagon is an unrecognisable blob
_OBJECT_GAP = 2  # px kept free between object footprints so shapes never touch
_PLACEMENT_TRIES = 40
# A size word is used only when it is plainly true: the largest object at least twice the next one's box area.
_SIZE_RATIO = 2.0


@dataclass(frozen=True)
class ScenePreset:
    """How scenes are sampled.

    Attributes:
        size_classes (tuple[str, ...]): image size classes from ``SIZE_CLASSES``, cycled by sample index so that a
            dataset of ``n >= len(size_classes)`` samples contains every class.
        shapes (tuple[str, ...]): shape names from ``SHAPES``.
        colours (tuple[str, ...]): colour names from ``COLOURS``.
        backgrounds (tuple[str, ...]): background kinds from ``BACKGROUNDS``.
        max_objects (int): objects per scene are drawn uniformly from ``1..max_objects`` (fewer when they do not fit).
        object_side (tuple[float, float]): side of an object's square footprint as a fraction of the image's shorter
            side, ``(low, high)``.
        task_weights (tuple[float, ...]): probability of each of ``TASKS``.
        format_weights (tuple[float, ...]): probability of each of ``BBOX_FORMATS``.
        ref_required (tuple[str, ...]): attributes from ``REF_ATTRIBUTES`` every referring expression names.
        ref_optional (tuple[str, ...]): attributes that may be added; the expression is drawn uniformly among the
            combinations that are true of the object and match no other object in the scene.
    """

    size_classes: tuple[str, ...]
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    backgrounds: tuple[str, ...]
    max_objects: int
    object_side: tuple[float, float]
    task_weights: tuple[float, ...]
    format_weights: tuple[float, ...]
    ref_required: tuple[str, ...] = ()
    ref_optional: tuple[str, ...] = REF_ATTRIBUTES

    def __post_init__(self) -> None:
        for name, values, allowed in (
            ("size_classes", self.size_classes, SIZE_CLASSES),
            ("shapes", self.shapes, SHAPES),
            ("colours", self.colours, tuple(COLOURS)),
            ("backgrounds", self.backgrounds, BACKGROUNDS),
            ("ref_required", self.ref_required, REF_ATTRIBUTES),
            ("ref_optional", self.ref_optional, REF_ATTRIBUTES),
        ):
            unknown = [v for v in values if v not in allowed]
            if unknown or (not values and name not in ("ref_required", "ref_optional")):
                raise ValueError(f"ScenePreset.{name}={values!r}: expected a non-empty subset of {allowed}")
        if self.max_objects < 1:
            raise ValueError(f"ScenePreset.max_objects must be >= 1, got {self.max_objects}")
        low, high = self.object_side
        if not 0 < low <= high <= 1:
            raise ValueError(f"ScenePreset.object_side must satisfy 0 < low <= high <= 1, got {self.object_side}")
        for name, weights, names in (
            ("task_weights", self.task_weights, TASKS),
            ("format_weights", self.format_weights, BBOX_FORMATS),
        ):
            if len(weights) != len(names) or min(weights) < 0 or not math.isclose(sum(weights), 1.0):
                raise ValueError(
                    f"ScenePreset.{name}={weights!r}: expected {len(names)} weights for {names} summing to 1"
                )
        # Shapes may repeat in a scene but (colour, shape) pairs never do, so "the <colour> <shape>" always
        # singles an object out: colour must be available to the referring expressions.
        if "colour" not in self.ref_required + self.ref_optional:
            raise ValueError("ScenePreset: 'colour' must be in ref_required or ref_optional to keep refs unambiguous")


PRESETS: dict[str, ScenePreset] = {
    # Stress test of the data path: extreme sizes and aspect ratios, several objects, every task and box format.
    "varied": ScenePreset(
        size_classes=("normal", "tiny", "wide", "tall", "big"),
        shapes=SHAPES,
        colours=tuple(COLOURS),
        backgrounds=("plain", "gradient", "stripes", "checker", "noise"),
        max_objects=4,
        object_side=(0.12, 0.6),
        task_weights=(0.5, 0.25, 0.25),
        format_weights=(0.6, 0.2, 0.2),
    ),
    # What a tiny random VLM can learn on CPU in minutes: one large object, few classes, a position-coding
    # background, object colours (high green) that never occur in it.
    "demo": ScenePreset(
        size_classes=("demo",),
        shapes=("circle", "square", "triangle"),
        colours=("green", "yellow", "cyan"),
        backgrounds=("ramp",),
        max_objects=1,
        object_side=(0.3, 0.75),
        task_weights=(1.0, 0.0, 0.0),
        format_weights=(1.0, 0.0, 0.0),
        ref_required=("colour",),
        ref_optional=(),
    ),
}


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape.

    Attributes:
        shape (str): one of ``SHAPES``.
        colour (str): one of ``COLOURS``; its RGB fills every pixel of the shape.
        box (tuple[int, int, int, int]): tight ``xyxy`` in pixel edges of the image.
        ref (str): referring expression, unambiguous within the scene (empty until described).
    """

    shape: str
    colour: str
    box: tuple[int, int, int, int]
    ref: str = ""


@dataclass
class Scene:
    """A rendered image (RGB, ``size = (width, height)``) and its objects."""

    image: Image.Image
    objects: list[SceneObject]


# ----------------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------------


def sample_image_size(rng: np.random.Generator, size_class: str) -> tuple[int, int]:
    """Draw an image size ``(width, height)`` in pixels for one of ``SIZE_CLASSES``.

    ``tiny``: at most 64x48; ``wide``: width 900-1800, height 60-120 (aspect >= 7.5); ``tall``: its transpose;
    ``big``: 1100-1600 x 850-1300, always above LLaMA-Factory's default ``image_max_pixels`` of 768*768;
    ``normal``: 160-640 per side; ``demo``: side ~112-224 with aspect 0.6-1.6.
    """
    if size_class == "tiny":
        return int(rng.integers(24, 65)), int(rng.integers(20, 49))
    if size_class == "wide":
        return int(rng.integers(900, 1801)), int(rng.integers(60, 121))
    if size_class == "tall":
        return int(rng.integers(60, 121)), int(rng.integers(900, 1801))
    if size_class == "big":
        return int(rng.integers(1100, 1601)), int(rng.integers(850, 1301))
    if size_class == "normal":
        return int(rng.integers(160, 641)), int(rng.integers(160, 641))
    if size_class == "demo":
        side = rng.uniform(80, 136)  # a handful of visual tokens: fast enough to train on 2 CPU cores
        aspect = math.exp(rng.uniform(math.log(0.75), math.log(1.33)))
        return round(side * math.sqrt(aspect)), round(side / math.sqrt(aspect))
    raise ValueError(f"size_class={size_class!r}: expected one of {SIZE_CLASSES}")


def shape_mask(shape: str, side: int) -> np.ndarray:
    """Rasterise ``shape`` centred in a ``side x side`` square, without anti-aliasing.

    Returns:
        np.ndarray[bool] of shape ``(side, side)``, True on the shape's pixels.
    """
    if side < 1:
        raise ValueError(f"side must be >= 1, got {side}")
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    last = side - 1  # PIL coordinates address pixel centres: the last pixel is side - 1
    c, r = last / 2, last / 2
    if shape == "circle":
        draw.ellipse((0, 0, last, last), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, last, last), fill=255)
    else:
        if shape == "triangle":
            points = [(c, 0), (last, last), (0, last)]
        elif shape == "diamond":
            points = [(c, 0), (last, c), (c, last), (0, c)]
        elif shape == "hexagon":
            points = [(c + r * math.cos(k * math.pi / 3), c + r * math.sin(k * math.pi / 3)) for k in range(6)]
        elif shape == "star":
            # Five outer points from the top, inner radius 0.45 of the outer one.
            points = [
                (c + rad * math.sin(k * math.pi / 5), c - rad * math.cos(k * math.pi / 5))
                for k, rad in zip(range(10), itertools.cycle((r, 0.45 * r)))
            ]
        else:
            raise ValueError(f"shape={shape!r}: expected one of {SHAPES}")
        draw.polygon(points, fill=255)
    return np.asarray(canvas) > 0


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight ``xyxy`` box in pixel edges of the True pixels of a 2-D mask ``(H, W)``; ValueError if it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("mask has no True pixel")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def encode_box(box_xyxy: Sequence[float], fmt: str) -> list[float]:
    """Write a pixel ``xyxy`` box in ``fmt`` (one of ``BBOX_FORMATS``) with ``boxes.from_xyxy``.

    Integral values come back as ``int`` so JSON rows stay short; our boxes have integer corners, so ``cxcywh``
    centres are exact halves and every format decodes back to the same ``xyxy`` exactly.
    """
    return [int(v) if v.is_integer() else v for v in from_xyxy(box_xyxy, fmt)]


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    grey = rng.uniform(80, 190)
    return np.clip(grey + rng.uniform(-20, 20, size=3), 0, 255)


def draw_background(rng: np.random.Generator, kind: str, width: int, height: int) -> np.ndarray:
    """Draw a muted background of ``kind`` (one of ``BACKGROUNDS``).

    Returns:
        np.ndarray[uint8] of shape ``(height, width, 3)``.
    """
    c1, c2 = _muted_colour(rng), _muted_colour(rng)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "plain":
        image = np.broadcast_to(c1, (height, width, 3))
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        image = c1 * (1 - t[..., None]) + c2 * t[..., None]
    elif kind == "stripes":
        angle = rng.choice([0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4])
        period = rng.uniform(4, max(5.0, min(width, height) / 3))
        band = np.floor((xs * math.cos(angle) + ys * math.sin(angle)) / (period / 2)) % 2
        image = np.where(band[..., None] > 0, c1, c2)
    elif kind == "checker":
        cell = int(rng.integers(3, max(4, min(width, height) // 4) + 1))
        parity = ((xs // cell) + (ys // cell)) % 2
        image = np.where(parity[..., None] > 0, c1, c2)
    elif kind == "ramp":
        # Red grows left to right, blue top to bottom, green stays low: every background pixel tells where it is.
        # Qwen-VL models see positions only through rotary attention, never in the features, so a tiny random model
        # learns to localise far faster when the picture itself carries the coordinates.
        red = 40 + 175 * xs / max(width - 1, 1)
        blue = 40 + 175 * ys / max(height - 1, 1)
        image = np.stack([red, np.full_like(xs, 40.0), blue], axis=-1)
    elif kind == "noise":
        # Smooth blobs (bilinear upsampling of a coarse grid) plus fine grain.
        coarse = rng.uniform(-40, 40, size=(height // 16 + 2, width // 16 + 2)).astype(np.float32)
        blobs = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
        grain = rng.normal(0, 8, size=(height, width, 1))
        image = c1 + blobs[..., None] + grain
    else:
        raise ValueError(f"background={kind!r}: expected one of {BACKGROUNDS}")
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _footprints_clash(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    (ax, ay, aside), (bx, by, bside) = a, b
    return not (
        ax + aside + _OBJECT_GAP <= bx
        or bx + bside + _OBJECT_GAP <= ax
        or ay + aside + _OBJECT_GAP <= by
        or by + bside + _OBJECT_GAP <= ay
    )


def _place_footprints(
    rng: np.random.Generator, width: int, height: int, count: int, side_range: tuple[float, float]
) -> list[tuple[int, int, int]]:
    """Non-overlapping square footprints ``(x, y, side)`` inside the image; fewer than ``count`` if they do not fit."""
    short = min(width, height)
    high = max(1, min(round(side_range[1] * short), short))
    low = min(high, max(_MIN_OBJECT_SIDE, round(side_range[0] * short)))
    placed: list[tuple[int, int, int]] = []
    for _ in range(count):
        for _ in range(_PLACEMENT_TRIES):
            side = int(rng.integers(low, high + 1))
            candidate = (int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1)), side)
            if not any(_footprints_clash(candidate, other) for other in placed):
                placed.append(candidate)
                break
    return placed


def _pick_identities(rng: np.random.Generator, preset: ScenePreset, count: int, detect: bool) -> list[tuple[str, str]]:
    """Distinct ``(colour, shape)`` pairs; a detect scene draws from two shapes so that categories repeat."""
    shapes = list(preset.shapes)
    if detect and len(shapes) > 2:
        shapes = [str(s) for s in rng.choice(shapes, size=2, replace=False)]
    pairs = [(colour, shape) for colour in preset.colours for shape in shapes]
    picks = rng.choice(len(pairs), size=min(count, len(pairs)), replace=False)
    return [pairs[int(i)] for i in picks]


def make_scene(rng: np.random.Generator, preset: ScenePreset, size_class: str, detect: bool = False) -> Scene:
    """Render one scene and describe its objects.

    Args:
        rng (np.random.Generator): the scene's random stream.
        preset (ScenePreset): sampling settings.
        size_class (str): one of ``SIZE_CLASSES``, see :func:`sample_image_size`.
        detect (bool): draw shapes from two categories so that a category has several instances. Default False.

    Returns:
        Scene: at least one object; each ``box`` is the tight ``xyxy`` of exactly the pixels filled with its colour.
    """
    width, height = sample_image_size(rng, size_class)
    pixels = draw_background(rng, str(rng.choice(preset.backgrounds)), width, height).copy()
    count = int(rng.integers(1, preset.max_objects + 1))
    footprints = _place_footprints(rng, width, height, count, preset.object_side)
    objects = []
    for (x, y, side), (colour, shape) in zip(footprints, _pick_identities(rng, preset, len(footprints), detect)):
        mask = shape_mask(shape, side)
        pixels[y : y + side, x : x + side][mask] = COLOURS[colour]
        bx1, by1, bx2, by2 = tight_box(mask)
        objects.append(SceneObject(shape, colour, (x + bx1, y + by1, x + bx2, y + by2)))
    refs = describe_objects(objects, (width, height), rng, preset.ref_required, preset.ref_optional)
    objects = [dataclasses.replace(obj, ref=ref) for obj, ref in zip(objects, refs)]
    return Scene(Image.fromarray(pixels), objects)


# ----------------------------------------------------------------------------------------------------------------
# Referring expressions
# ----------------------------------------------------------------------------------------------------------------


def object_position(box: Sequence[float], image_size: tuple[int, int]) -> tuple[str | None, str | None]:
    """``(vertical, horizontal)`` third of the image holding the box centre: ``"top"``/``"bottom"``/None and
    ``"left"``/``"right"``/None (None = middle third). ``box`` is pixel ``xyxy``, ``image_size`` is ``(W, H)``."""
    width, height = image_size
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    horizontal = "left" if cx < width / 3 else "right" if cx > 2 * width / 3 else None
    vertical = "top" if cy < height / 3 else "bottom" if cy > 2 * height / 3 else None
    return vertical, horizontal


def object_sizes(boxes: Sequence[Sequence[float]]) -> list[str | None]:
    """``"large"`` for the object whose box area is at least twice every other one's, ``"small"`` for one at most
    half of every other one's, None otherwise (and always None for a single object: size words are relative)."""
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    sizes: list[str | None] = []
    for i, area in enumerate(areas):
        others = areas[:i] + areas[i + 1 :]
        if others and area >= _SIZE_RATIO * max(others):
            sizes.append("large")
        elif others and area * _SIZE_RATIO <= min(others):
            sizes.append("small")
        else:
            sizes.append(None)
    return sizes


def _position_phrase(position: tuple[str | None, str | None]) -> str:
    vertical, horizontal = position
    if vertical and horizontal:
        return f"at the {vertical} {horizontal}"
    if vertical:
        return f"at the {vertical}"
    if horizontal:
        return f"on the {horizontal}"
    return "in the middle"


def describe_objects(
    objects: Sequence[SceneObject],
    image_size: tuple[int, int],
    rng: np.random.Generator,
    required: Sequence[str] = (),
    optional: Sequence[str] = REF_ATTRIBUTES,
) -> list[str]:
    """One referring expression per object that matches it and no other object of the scene.

    The shape is always named; each expression adds ``required`` attributes and a subset of ``optional`` ones
    (``colour``, ``size`` from :func:`object_sizes`, ``position`` from :func:`object_position`), drawn uniformly
    among the subsets that are defined for the object and leave exactly one matching object.
    E.g. ``"the small red circle on the left"``, ``"the blue square"``, ``"the large triangle at the top"``.

    Raises:
        ValueError: if no candidate is unambiguous (only possible when two objects share colour and shape).
    """
    attributes = [
        {
            "shape": obj.shape,
            "colour": obj.colour,
            "size": size,
            "position": object_position(obj.box, image_size),
        }
        for obj, size in zip(objects, object_sizes([obj.box for obj in objects]))
    ]
    subsets = [
        ("shape", *required, *extra)
        for k in range(len(optional) + 1)
        for extra in itertools.combinations([a for a in optional if a not in required], k)
    ]
    refs = []
    for i, target in enumerate(attributes):
        unambiguous = [
            keys
            for keys in subsets
            if all(target[key] is not None for key in keys)
            and sum(all(other[key] == target[key] for key in keys) for other in attributes) == 1
        ]
        if not unambiguous:
            raise ValueError(f"objects[{i}] ({target}) cannot be told apart from another object with {subsets}")
        keys = unambiguous[int(rng.integers(len(unambiguous)))]
        words = ["the"]
        words += [target["size"]] if "size" in keys else []
        words += [target["colour"]] if "colour" in keys else []
        words += [target["shape"]]
        words += [_position_phrase(target["position"])] if "position" in keys else []
        refs.append(" ".join(words))
    return refs


# ----------------------------------------------------------------------------------------------------------------
# Rows and files
# ----------------------------------------------------------------------------------------------------------------


def make_row(scene: Scene, image_path: str, task: str, bbox_format: str, rng: np.random.Generator) -> dict[str, Any]:
    """A ``grounding`` row for ``scene``.

    ``rec`` rows list a random non-empty subset of the objects with their referring expressions, ``reg`` rows one
    object (the region to describe); a ``detect`` row picks one shape category present and lists every instance of it, ``ref`` = the shape name.
    Boxes are written in ``bbox_format``.
    """
    if task in ("rec", "reg"):
        count = int(rng.integers(1, len(scene.objects) + 1)) if task == "rec" else 1
        chosen = [scene.objects[int(i)] for i in rng.permutation(len(scene.objects))[:count]]
        objects = [{"ref": obj.ref, "bbox": encode_box(obj.box, bbox_format)} for obj in chosen]
    elif task == "detect":
        category = scene.objects[int(rng.integers(len(scene.objects)))].shape
        objects = [
            {"ref": category, "bbox": encode_box(obj.box, bbox_format)}
            for obj in scene.objects
            if obj.shape == category
        ]
    else:
        raise ValueError(f"task={task!r}: expected one of {TASKS}")
    return {"images": [image_path], "objects": objects, "bbox_format": bbox_format, "task": task}


def dataset_entry(file_name: str) -> dict[str, Any]:
    """The ``dataset_info.json`` entry for a ``grounding`` jsonl file."""
    return {"file_name": file_name, "formatting": "grounding", "columns": {"images": "images", "objects": "objects"}}


def generate_grounding(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    val_frac: float = 0.2,
    preset: str | ScenePreset = "varied",
    max_objects: int | None = None,
) -> dict[str, Any]:
    """Write a synthetic ``grounding`` dataset.

    Args:
        out_dir (str | Path): created if missing; receives ``images/``, the jsonl files and ``dataset_info.json``.
        n (int): number of scenes (rows), >= 1.
        seed (int): same seed, same bytes. Default 0.
        val_frac (float): fraction of rows in ``ground_val.jsonl``, in ``[0, 1)``. With 0 (or ``n == 1``) no
            validation file is written or registered. Default 0.2.
        preset (str | ScenePreset): ``"varied"``, ``"demo"`` or a custom ``ScenePreset``. Default ``"varied"``.
        max_objects (int | None): overrides the preset's ``max_objects``. Default None.

    Returns:
        dict: ``out_dir``, ``train_file``, ``val_file`` (None when empty), ``dataset_info``, ``datasets`` (names
        registered), ``n_train``, ``n_val``, ``n_objects`` and counts per ``tasks``, ``bbox_formats`` and
        ``size_classes``.
    """
    check_size(n, val_frac)
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r}: expected one of {tuple(PRESETS)}")
        preset = PRESETS[preset]
    if max_objects is not None:
        preset = dataclasses.replace(preset, max_objects=max_objects)

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    validation = val_indices(n, val_frac, seed)
    train_rows, val_rows = [], []
    tasks, formats, size_classes = Counter(), Counter(), Counter()
    n_objects = 0
    for index in range(n):
        rng = np.random.default_rng([seed, index])
        size_class = preset.size_classes[index % len(preset.size_classes)]
        task = TASKS[int(rng.choice(len(TASKS), p=preset.task_weights))]
        bbox_format = BBOX_FORMATS[int(rng.choice(len(BBOX_FORMATS), p=preset.format_weights))]
        scene = make_scene(rng, preset, size_class, detect=task == "detect")
        image_path = f"images/{index:06d}.png"
        scene.image.save(out / image_path)
        row = make_row(scene, image_path, task, bbox_format, rng)
        (val_rows if index in validation else train_rows).append(row)
        tasks[task] += 1
        formats[bbox_format] += 1
        size_classes[size_class] += 1
        n_objects += len(row["objects"])

    files, datasets = (TRAIN_FILE, VAL_FILE), (TRAIN_DATASET, VAL_DATASET)
    return {
        **write_split(out, train_rows, val_rows, files, datasets, dataset_entry),
        "n_objects": n_objects,
        "tasks": dict(tasks),
        "bbox_formats": dict(formats),
        "size_classes": dict(size_classes),
    }


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The ``grounding`` sub-command of ``python -m llamafactory_vision.synth``."""
    parser = commands.add_parser("grounding", help="shapes with known boxes -> grounding jsonl + dataset_info")
    add_common_arguments(parser, "scenes")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="varied")
    parser.add_argument("--max-objects", type=int, default=None, help="override the preset's objects per scene")
    parser.set_defaults(
        generate=lambda args: generate_grounding(
            args.out, args.n, args.seed, args.val_frac, args.preset, args.max_objects
        )
    )
