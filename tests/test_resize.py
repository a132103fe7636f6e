"""The resize arithmetic must equal what LLaMA-Factory + transformers really do, or boxes shift.

Oracles: transformers' and qwen_vl_utils' ``smart_resize``, and the host pipeline itself
(``Qwen2VLPlugin`` / ``Qwen3VLPlugin._get_mm_inputs`` on real PIL images with real HF image processors).
"""

from __future__ import annotations

import math
import os
import random
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Plain imports, never importorskip: the stack is pinned, so a missing oracle is a broken install and must fail.
import pytest
import qwen_vl_utils
import transformers.models.qwen2_vl.image_processing_qwen2_vl as hf_qwen2_vl
from llamafactory.data import mm_plugin
from llamafactory_vision.boxes import host_preprocess_size, model_view_size, smart_resize
from PIL import Image

EXTREME_SIZES = [  # (width, height)
    (1, 1),
    (10, 10),
    (27, 27),
    (28, 28),
    (4000, 20),
    (20, 4000),
    (5000, 5000),
    (1000, 1000),
    (1920, 1080),
    (7000, 3),
    (3, 7000),
    (6000, 29),
    (29, 6000),
    (100000, 1),
]


def _random_size(rng: random.Random, min_side: int = 1) -> tuple[int, int]:
    """Log-uniform sides in [min_side, 3000] with aspect ratios up to ~300 (beyond the 200 the host corrects)."""
    while True:
        width = int(math.exp(rng.uniform(math.log(min_side), math.log(3000))))
        height = int(math.exp(rng.uniform(math.log(min_side), math.log(3000))))
        if max(width, height) / min(width, height) <= 300 and width * height <= 4_000_000:
            return width, height


# ---------------------------------------------------------------------------------------------------------------
# smart_resize against transformers and qwen_vl_utils
# ---------------------------------------------------------------------------------------------------------------


def _smart_resize_cases(n: int, seed: int, min_side: int = 1) -> list[tuple[int, int, int, int, int]]:
    rng = random.Random(seed)
    cases = []
    for width, height in EXTREME_SIZES:
        for factor in (28, 32):
            cases.append((height, width, factor, 56 * 56, 28 * 28 * 1280))
    while len(cases) < n:
        width, height = _random_size(rng, min_side)
        factor = rng.choice((28, 32))
        min_pixels = rng.choice((16 * 16, 56 * 56, 128 * 128, 256 * 256))
        max_pixels = max(min_pixels, rng.choice((64 * 64, 256 * 256, 768 * 768, 28 * 28 * 1280, 16384 * 28 * 28)))
        cases.append((height, width, factor, min_pixels, max_pixels))
    return cases


@pytest.mark.parametrize("height,width,factor,min_pixels,max_pixels", _smart_resize_cases(400, seed=0))
def test_smart_resize_matches_transformers(height, width, factor, min_pixels, max_pixels):
    if max(height, width) / min(height, width) > 200:
        with pytest.raises(ValueError):
            hf_qwen2_vl.smart_resize(height, width, factor, min_pixels, max_pixels)
        with pytest.raises(ValueError, match="aspect ratio"):
            smart_resize(height, width, factor, min_pixels, max_pixels)
        return
    expected = hf_qwen2_vl.smart_resize(height, width, factor, min_pixels, max_pixels)
    assert smart_resize(height, width, factor, min_pixels, max_pixels) == expected
    assert expected[0] % factor == 0 and expected[1] % factor == 0


@pytest.mark.parametrize("height,width,factor,min_pixels,max_pixels", _smart_resize_cases(400, seed=1, min_side=17))
def test_smart_resize_matches_qwen_vl_utils(height, width, factor, min_pixels, max_pixels):
    """Equal to qwen_vl_utils wherever both are defined; the documented corners differ as stated."""
    if max(height, width) / min(height, width) > 200:
        with pytest.raises(ValueError):  # both refuse aspect ratios above 200
            qwen_vl_utils.smart_resize(height, width, factor, min_pixels, max_pixels)
        return
    ours = smart_resize(height, width, factor, min_pixels, max_pixels)
    theirs = qwen_vl_utils.smart_resize(height, width, factor, min_pixels, max_pixels)
    if round(height / factor) == 0 or round(width / factor) == 0:
        # qwen_vl_utils lifts a side <= factor/2 to `factor` first; transformers rounds it to 0 and scales up.
        return
    if min(theirs) == 0:
        # qwen_vl_utils floors a very thin side to 0 when scaling down; transformers keeps `factor`.
        assert min(ours) == factor
        return
    assert ours == theirs


def test_smart_resize_corners_differ_from_qwen_vl_utils_as_documented():
    # A side of exactly factor/2 rounds (half to even) to 0 in transformers.
    assert smart_resize(14, 1092, 28, 56 * 56, 28 * 28 * 1280) == (28, 504)
    assert qwen_vl_utils.smart_resize(14, 1092, 28, 56 * 56, 28 * 28 * 1280) == (28, 1092)
    # A thin image shrunk under a small max_pixels: qwen_vl_utils floors the thin side to 0.
    assert smart_resize(28, 5040, 28, 16 * 16, 50_000) == (28, 2996)
    assert qwen_vl_utils.smart_resize(28, 5040, 28, 16 * 16, 50_000)[0] == 0


# ---------------------------------------------------------------------------------------------------------------
# model_view_size against the real host pipeline
# ---------------------------------------------------------------------------------------------------------------

FAMILIES = {  # family -> (the host's own plugin class name, patch_size)
    "qwen2_vl": ("Qwen2VLPlugin", 14),
    "qwen3_vl": ("Qwen3VLPlugin", 16),
}
PROCESSOR_PIXELS = [  # (size["shortest_edge"], size["longest_edge"]) of the HF image processor
    (56 * 56, 28 * 28 * 1280),  # Qwen2-VL default
    (65536, 16777216),  # Qwen3-VL default
    (16 * 16, 128 * 128),
    (128 * 128, 320 * 320),
    (3136, 200_000),
]
HOST_MAX_PIXELS = [None, 128 * 128, 256 * 256, 300 * 200, 512 * 512, 10_000]  # None: attribute absent (768*768)
HOST_MIN_PIXELS = [None, 1, 64 * 64, 100 * 100, 5_000]  # None: attribute absent (32*32)

_IMAGE_PROCESSORS: dict[tuple[int, int, int], object] = {}


def _image_processor(patch_size: int, min_pixels: int, max_pixels: int):
    key = (patch_size, min_pixels, max_pixels)
    if key not in _IMAGE_PROCESSORS:
        # A fresh `size` dict: Qwen2VLImageProcessor writes min/max pixels into a class-level dict otherwise.
        _IMAGE_PROCESSORS[key] = hf_qwen2_vl.Qwen2VLImageProcessor(
            size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=patch_size, merge_size=2
        )
    return _IMAGE_PROCESSORS[key]


def _processor(patch_size: int, pixels: tuple[int, int], host_max: int | None, host_min: int | None):
    attributes = {"image_processor": _image_processor(patch_size, *pixels)}
    if host_max is not None:
        attributes["image_max_pixels"] = host_max
    if host_min is not None:
        attributes["image_min_pixels"] = host_min
    return SimpleNamespace(**attributes)


def _host_plugin(class_name: str):
    # The host's classes themselves, not the registry: a registered subclass of ours must not be its own oracle.
    return getattr(mm_plugin, class_name)(image_token="<|image_pad|>", video_token=None, audio_token=None)


def _host_model_view(plugin_class: str, patch_size: int, width: int, height: int, processor) -> tuple[int, int]:
    plugin = _host_plugin(plugin_class)
    image = Image.new("RGB", (width, height), (120, 60, 30))
    mm_inputs = plugin._get_mm_inputs([image], [], [], processor)
    grid_t, grid_h, grid_w = mm_inputs["image_grid_thw"][0].tolist()
    assert grid_t == 1
    return grid_w * patch_size, grid_h * patch_size


def _oracle_cases(n: int, seed: int):
    rng = random.Random(seed)
    cases = []
    for i, (width, height) in enumerate(EXTREME_SIZES):
        for family in FAMILIES:
            # Default host settings (no attributes) and the family's default processor pixels.
            pixels = PROCESSOR_PIXELS[0] if family == "qwen2_vl" else PROCESSOR_PIXELS[1]
            cases.append((family, width, height, pixels, None, None))
            cases.append((family, width, height, PROCESSOR_PIXELS[2 + i % 3], 256 * 256, 64 * 64))
    while len(cases) < n:
        width, height = _random_size(rng)
        cases.append(
            (
                rng.choice(list(FAMILIES)),
                width,
                height,
                rng.choice(PROCESSOR_PIXELS[2:]),
                rng.choice(HOST_MAX_PIXELS),
                rng.choice(HOST_MIN_PIXELS),
            )
        )
    # Large images under the host's default image_max_pixels (768 * 768) with both families' default processors.
    for width, height in ((1024, 1024), (2000, 1500), (900, 700), (3000, 1200)):
        cases.append(("qwen2_vl", width, height, PROCESSOR_PIXELS[0], None, None))
        cases.append(("qwen3_vl", width, height, PROCESSOR_PIXELS[1], None, None))
    return cases


def _host_fails(width: int, height: int, host_max: int | None) -> bool:
    try:
        host_preprocess_size(width, height, host_max if host_max is not None else 768 * 768)
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("family,width,height,pixels,host_max,host_min", _oracle_cases(260, seed=2024))
def test_model_view_size_equals_host_pipeline(family, width, height, pixels, host_max, host_min):
    plugin_class, patch_size = FAMILIES[family]
    processor = _processor(patch_size, pixels, host_max, host_min)
    if _host_fails(width, height, host_max):
        with pytest.raises(ValueError):
            _host_model_view(plugin_class, patch_size, width, height, processor)
        with pytest.raises(ValueError, match="empty image"):
            model_view_size(width, height, processor)
        return
    assert model_view_size(width, height, processor) == _host_model_view(
        plugin_class, patch_size, width, height, processor
    )


def test_host_preprocess_size_matches_host_image():
    """The ints are the real PIL sizes after the host's `_preprocess_image` (no rounding inside PIL)."""
    plugin = _host_plugin("Qwen2VLPlugin")
    rng = random.Random(7)
    sizes = EXTREME_SIZES[:-1] + [_random_size(rng) for _ in range(40)]
    for width, height in sizes:
        for host_max, host_min in ((768 * 768, 32 * 32), (20_000, 50 * 50), (4_000, 1)):
            image = plugin._preprocess_image(
                Image.new("L", (width, height)), image_max_pixels=host_max, image_min_pixels=host_min
            )
            assert host_preprocess_size(width, height, host_max, host_min) == image.size, (width, height)


def test_host_zero_side_raises_like_host():
    # 20000 x 1 under image_max_pixels=10000 truncates the height to 0: PIL (and so the host) refuses it.
    plugin = _host_plugin("Qwen2VLPlugin")
    with pytest.raises(ValueError):
        plugin._preprocess_image(Image.new("L", (20000, 1)), image_max_pixels=10_000, image_min_pixels=1)
    with pytest.raises(ValueError, match="image_max_pixels=10000"):
        host_preprocess_size(20000, 1, 10_000, 1)


def test_model_view_size_reads_processor_settings():
    processor = _processor(14, (56 * 56, 28 * 28 * 1280), None, None)
    # 1000x1000 -> host 768x768 (default image_max_pixels) -> 756x756 (nearest multiples of 28).
    assert model_view_size(1000, 1000, processor) == (756, 756)
    processor = _processor(16, (65536, 16777216), 1000 * 1000, None)
    assert model_view_size(1000, 1000, processor) == (992, 992)
    with pytest.raises(ValueError, match="no image_processor"):
        model_view_size(100, 100, SimpleNamespace())
