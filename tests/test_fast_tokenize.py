"""`grounding_fast_tokenize`: image token counts from headers give the same tokens, labels and batches as the host's
decode-and-patchify path, for every row of the varied set (tiny, wide, tall, > max_pixels images), on every Qwen
family."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from conftest import GROUND_TEMPLATE, QWEN_FAMILIES
from llamafactory.data.mm_plugin import Qwen2VLPlugin, Qwen3VLPlugin


def _tokenize(model_dir, data_dir, out, template: str, fast: bool):
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, _, _ = get_train_args(
        {
            "model_name_or_path": str(model_dir), "stage": "sft", "do_train": True, "finetuning_type": "lora",
            "dataset": "synth_ground_train", "dataset_dir": str(data_dir), "template": template, "cutoff_len": 4096,
            "output_dir": str(out), "overwrite_output_dir": True, "overwrite_cache": True, "report_to": "none",
            "grounding_fast_tokenize": fast,
        }
    )  # fmt: skip
    tokenizer_module = load_tokenizer(model_args)
    template_obj = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    dataset = get_dataset(template_obj, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    return template_obj, tokenizer_module, dataset["train_dataset"]


class _Calls:
    """Counts calls of the host's image preprocessing (``_get_mm_inputs``) while keeping its behaviour."""

    def __init__(self):
        self.count = 0

    def wrap(self, method):
        def counted(plugin, *args, **kwargs):
            self.count += 1
            return method(plugin, *args, **kwargs)

        return counted


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_fast_tokenize_gives_identical_tokens_labels_and_batches(family, tiny_models, varied_data, tmp_path):
    from llamafactory.data.collator import SFTDataCollatorWith4DAttentionMask

    template = GROUND_TEMPLATE[family]
    host_class = Qwen3VLPlugin if family == "qwen3_vl" else Qwen2VLPlugin
    calls = _Calls()
    with mock.patch.object(host_class, "_get_mm_inputs", calls.wrap(host_class._get_mm_inputs)):
        _, _, slow = _tokenize(tiny_models[family], varied_data, tmp_path / "slow", template, fast=False)
        slow_calls, calls.count = calls.count, 0
        template_obj, tokenizer_module, fast = _tokenize(
            tiny_models[family], varied_data, tmp_path / "fast", template, fast=True
        )
    assert slow_calls >= len(slow), "the slow path should preprocess every image at tokenization time"
    assert calls.count == 0, "the fast path must not preprocess images at tokenization time"

    assert len(fast) == len(slow) > 0
    for i in range(len(slow)):
        assert fast[i]["input_ids"] == slow[i]["input_ids"], f"row {i}"
        assert fast[i]["labels"] == slow[i]["labels"], f"row {i}"

    # The varied set must reach the resize branches the fast path replaces: the host's max_pixels downscale, its
    # 28-pixel minimum side, and smart_resize rounding (grids differ from a plain division of the original size).
    from PIL import Image

    processor = tokenizer_module["processor"]
    sizes = []
    for row in slow:
        with Image.open(row["images"][0]) as image:
            sizes.append(image.size)
    assert any(w * h > processor.image_max_pixels for w, h in sizes)
    assert any(min(w, h) < 28 for w, h in sizes)
    assert any(max(w, h) / min(w, h) > 4 for w, h in sizes)

    collator = SFTDataCollatorWith4DAttentionMask(
        template=template_obj, model=None, label_pad_token_id=-100, pad_to_multiple_of=None, **tokenizer_module
    )
    keys = ("input_ids", "attention_mask", "labels", "images", "videos", "audios")
    slow_features = [{k: row[k] for k in keys if k in row} for row in slow]
    fast_features = [{k: row[k] for k in keys if k in row} for row in fast]
    for start in range(0, len(slow_features), 4):
        slow_batch = collator(slow_features[start : start + 4])
        fast_batch = collator(fast_features[start : start + 4])
        for key in ("input_ids", "labels", "attention_mask", "pixel_values", "image_grid_thw"):
            assert torch.equal(slow_batch[key], fast_batch[key]), f"{key}, rows {start}..{start + 3}"


def test_fast_tokenize_leaves_the_registered_template_alone():
    from llamafactory.data.template import TEMPLATES
    from llamafactory_vision.grounding.plugin import with_fast_tokenize

    registered = TEMPLATES["qwen2_vl_ground"]
    fast = with_fast_tokenize(registered, True)
    assert fast.mm_plugin.fast_tokenize and not registered.mm_plugin.fast_tokenize
    assert with_fast_tokenize(registered, False) is registered
    assert with_fast_tokenize(TEMPLATES["qwen2_vl"], True) is TEMPLATES["qwen2_vl"]  # stock templates: untouched


def test_header_sizes_are_read_once_per_file_version(tmp_path):
    """A row's image size is asked for twice per tokenization; the header is read once, and again when the file
    changes (oracle: PIL opening the file)."""
    import os

    from llamafactory_vision.grounding import plugin
    from PIL import Image

    path = tmp_path / "a.png"
    Image.new("RGB", (30, 20)).save(path)
    with mock.patch.object(plugin.Image, "open", wraps=Image.open) as opened:
        assert plugin.original_size(str(path)) == (30, 20)
        assert plugin.original_size(path) == (30, 20)
        assert plugin.original_size({"path": str(path)}) == (30, 20)
        assert opened.call_count == 1
        Image.new("RGB", (50, 40)).save(path)  # rewritten in place: a new version
        os.utime(path, ns=(1, 1))  # even with an old timestamp, the size in bytes differs (and mtime does)
        assert plugin.original_size(str(path)) == (50, 40)
        assert opened.call_count == 2
        with path.open("rb") as f:  # file objects and bytes are read every time
            assert plugin.original_size(f) == (50, 40)
        assert plugin.original_size(path.read_bytes()) == (50, 40)
        assert opened.call_count == 4
