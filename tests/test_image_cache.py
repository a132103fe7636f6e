"""`grounding_image_cache`: collated batches with the cache equal those without it (the host's own preprocessing of
every batch is the oracle), a second epoch preprocesses nothing, a changed file or setting is read again, and the
byte limit evicts."""

from __future__ import annotations

import copy
import dataclasses
import os
from unittest import mock

import pytest
import torch
from conftest import GROUND_TEMPLATE, QWEN_FAMILIES, read_jsonl, run_cli, train_config, train_in_process, write_yaml
from llamafactory.data.mm_plugin import Qwen2VLPlugin, Qwen3VLPlugin
from PIL import Image

BATCH_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw")


def _args(model_dir, data_dir, out, template: str, **extra) -> dict:
    return {
        "model_name_or_path": str(model_dir), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "dataset": "synth_ground_train", "dataset_dir": str(data_dir), "template": template, "cutoff_len": 4096,
        "output_dir": str(out), "overwrite_output_dir": True, "overwrite_cache": True, "report_to": "none", **extra,
    }  # fmt: skip


def _features(model_dir, data_dir, out, template: str):
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, _, _ = get_train_args(_args(model_dir, data_dir, out, template))
    tokenizer_module = load_tokenizer(model_args)
    template_obj = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    dataset = get_dataset(template_obj, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    keys = ("input_ids", "attention_mask", "labels", "images", "videos", "audios")
    rows = [{k: row[k] for k in keys if k in row} for row in dataset["train_dataset"]]
    return template_obj, tokenizer_module, rows


def _collator(template, tokenizer_module):
    from llamafactory.data.collator import SFTDataCollatorWith4DAttentionMask

    return SFTDataCollatorWith4DAttentionMask(
        template=template, model=None, label_pad_token_id=-100, pad_to_multiple_of=None, **tokenizer_module
    )


class _Calls:
    """Counts the host's image preprocessing (``_get_mm_inputs``) and the images it gets, keeping its behaviour."""

    def __init__(self):
        self.images = 0

    def wrap(self, method):
        def counted(plugin, images, *args, **kwargs):
            self.images += len(images)
            return method(plugin, images, *args, **kwargs)

        return counted


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_cached_batches_equal_uncached_ones_and_the_second_epoch_hits(family, tiny_models, varied_data, tmp_path):
    from llamafactory_vision.grounding.image_cache import with_image_cache

    template, tokenizer_module, rows = _features(tiny_models[family], varied_data, tmp_path, GROUND_TEMPLATE[family])
    cached_template = with_image_cache(template, True, 2048)
    cache = cached_template.mm_plugin.image_cache
    assert template.mm_plugin.image_cache is None  # the template the dataset was tokenized with is left alone
    plain, cached = _collator(template, tokenizer_module), _collator(cached_template, tokenizer_module)
    distinct = {os.path.realpath(path) for row in rows for path in row["images"]}
    assert len(rows) >= 20 and len(distinct) >= 20

    # Epoch 2 batches other rows together (reversed, by 3) than epoch 1 (by 4): an entry made in one batch must
    # equal what the image processor gives the image in any other batch.
    epoch_1 = [rows[i : i + 4] for i in range(0, len(rows), 4)]
    reversed_rows = rows[::-1]
    epoch_2 = [reversed_rows[i : i + 3] for i in range(0, len(rows), 3)]
    host_class = Qwen3VLPlugin if family == "qwen3_vl" else Qwen2VLPlugin
    for epoch, batches in enumerate((epoch_1, epoch_2), start=1):
        calls = _Calls()
        with mock.patch.object(host_class, "_get_mm_inputs", calls.wrap(host_class._get_mm_inputs)):
            for batch in batches:
                # each collator gets its own copy: the host's pops "images" & co. off the features it gets
                expected, got = plain(copy.deepcopy(batch)), cached(copy.deepcopy(batch))
                for key in BATCH_KEYS:
                    assert torch.equal(expected[key], got[key]), f"epoch {epoch}, {key}"
        host_images_plain = sum(len(row["images"]) for row in rows)
        if epoch == 1:  # the uncached collator preprocesses every image, the cached one each distinct file once
            assert calls.images == host_images_plain + len(distinct)
            assert (cache.counts.misses, cache.counts.hits) == (len(distinct), host_images_plain - len(distinct))
        else:  # the cached collator preprocesses nothing
            assert calls.images == host_images_plain
            assert cache.counts.misses == len(distinct)
            assert cache.counts.hits == 2 * host_images_plain - len(distinct)
    assert cache.counts.evictions == 0 and cache.counts.uncached == 0 and len(cache) == len(distinct)


def _host_plugin_and_processor(model_dir):
    from llamafactory.data.template import TEMPLATES
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    processor.image_max_pixels, processor.image_min_pixels = 768 * 768, 32 * 32
    return TEMPLATES["qwen2_vl_ground"].mm_plugin, processor


def _save(path, size, color):
    Image.new("RGB", size, color).save(path)
    return str(path)


def _assert_host_equal(plugin, processor, images, got):
    """Oracle: the host plugin's own preprocessing of the same images."""
    expected = Qwen2VLPlugin._get_mm_inputs(plugin, images, [], [], processor)
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_a_changed_file_or_setting_is_read_again(tiny_models, tmp_path):
    from llamafactory_vision.grounding.image_cache import MIB, ImageTensorCache

    plugin, processor = _host_plugin_and_processor(tiny_models["qwen2_vl"])
    plugin = dataclasses.replace(plugin, image_cache=ImageTensorCache(64 * MIB))
    cache = plugin.image_cache
    path = _save(tmp_path / "a.png", (60, 40), (200, 10, 10))
    link = tmp_path / "link.png"
    link.symlink_to(path)

    _assert_host_equal(plugin, processor, [path], plugin._get_mm_inputs([path], [], [], processor))
    _assert_host_equal(plugin, processor, [path], plugin._get_mm_inputs([{"path": str(link)}], [], [], processor))
    assert (cache.counts.misses, cache.counts.hits) == (1, 1)  # a symlink and a {"path"} dict reach the same entry

    os.utime(path, ns=(1, 1))  # same bytes, another mtime: read again
    plugin._get_mm_inputs([path], [], [], processor)
    assert cache.counts.misses == 2

    _save(path, (60, 40), (10, 200, 10))  # rewritten: other pixels, a new mtime
    got = plugin._get_mm_inputs([path], [], [], processor)
    _assert_host_equal(plugin, processor, [path], got)
    assert cache.counts.misses == 3

    size = os.stat(path).st_size
    _save(path, (90, 40), (10, 200, 10))
    os.utime(path, ns=(1, 1))  # the old mtime back, but another byte size: read again
    assert os.stat(path).st_size != size
    got = plugin._get_mm_inputs([path], [], [], processor)
    _assert_host_equal(plugin, processor, [path], got)
    assert cache.counts.misses == 4

    bmp = _save(tmp_path / "b.bmp", (90, 40), (10, 200, 10))  # a BMP's byte size depends on its size alone
    plugin._get_mm_inputs([bmp], [], [], processor)
    stat = os.stat(bmp)
    _save(bmp, (90, 40), (200, 10, 10))
    os.utime(bmp, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # other pixels, same byte size, the old mtime back
    assert (os.stat(bmp).st_size, os.stat(bmp).st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    got = plugin._get_mm_inputs([bmp], [], [], processor)
    _assert_host_equal(plugin, processor, [bmp], got)  # the new pixels, not the cached ones
    assert cache.counts.misses == 6

    processor.image_max_pixels = 20 * 20  # another host pixel limit: another entry
    got = plugin._get_mm_inputs([path], [], [], processor)
    _assert_host_equal(plugin, processor, [path], got)
    assert cache.counts.misses == 7

    pil = Image.new("RGB", (50, 30), (0, 0, 255))  # not a file: preprocessed every time, never stored
    images = [pil, path, path]
    _assert_host_equal(plugin, processor, images, plugin._get_mm_inputs(images, [], [], processor))
    assert cache.counts.uncached == 1 and cache.counts.hits == 3 and cache.counts.misses == 7


def test_the_byte_limit_evicts_the_least_recently_used(tiny_models, tmp_path):
    from llamafactory_vision.grounding.image_cache import ImageTensorCache

    plugin, processor = _host_plugin_and_processor(tiny_models["qwen2_vl"])
    paths = [_save(tmp_path / f"{i}.png", (56, 56), (40 * i, 0, 0)) for i in range(3)]
    def preprocess(images):
        return Qwen2VLPlugin._get_mm_inputs(plugin, images, [], [], processor)

    one = preprocess(paths[:1])
    probe = ImageTensorCache(1 << 40)
    _assert_host_equal(plugin, processor, paths[:1], probe.mm_inputs(paths[:1], processor, preprocess))
    entry_bytes = probe.nbytes  # every image here has the same shape
    # a still image's patches hold temporal_patch_size (2) equal copies of the frame: one is kept
    assert entry_bytes == one["pixel_values"].nbytes // 2 + one["image_grid_thw"].nbytes
    cache = ImageTensorCache(2 * entry_bytes)

    def load(images):
        return cache.mm_inputs(images, processor, preprocess)

    load(paths[:2])
    load(paths[:1])  # 0 is now the most recently used
    got = load(paths[2:])  # evicts 1, the least recently used
    assert (cache.counts.evictions, len(cache), cache.nbytes) == (1, 2, 2 * entry_bytes)
    _assert_host_equal(plugin, processor, paths[2:], got)
    misses = cache.counts.misses
    load(paths[:1])
    assert cache.counts.misses == misses  # 0 stayed
    got = load(paths)
    assert cache.counts.misses == misses + 1  # 1 came back
    _assert_host_equal(plugin, processor, paths, got)
    assert cache.nbytes <= cache.max_bytes

    small = ImageTensorCache(entry_bytes - 1)  # an image larger than the whole limit is never stored
    got = small.mm_inputs(paths, processor, preprocess)
    _assert_host_equal(plugin, processor, paths, got)
    assert (len(small), small.nbytes, small.counts.misses) == (0, 0, 3)


def test_the_cache_is_refused_where_it_cannot_serve(tiny_models, varied_data, tmp_path):
    from llamafactory.hparams import get_train_args

    model = tiny_models["qwen2_vl"]
    with pytest.raises(ValueError, match="`grounding_image_cache: true` needs a grounding template"):
        get_train_args(_args(model, varied_data, tmp_path, "qwen2_vl", grounding_image_cache=True))
    with pytest.raises(ValueError, match="needs `dataloader_persistent_workers: true`"):
        get_train_args(
            _args(model, varied_data, tmp_path, "qwen2_vl_ground", grounding_image_cache=True, dataloader_num_workers=1)
        )
    with pytest.raises(ValueError, match="`grounding_image_cache_mib` must be > 0"):
        get_train_args(_args(model, varied_data, tmp_path, "qwen2_vl_ground", grounding_image_cache_mib=0))
    parsed = get_train_args(
        _args(
            model, varied_data, tmp_path, "qwen2_vl_ground", grounding_image_cache=True, dataloader_num_workers=1,
            dataloader_persistent_workers=True,
        )
    )  # fmt: skip
    assert parsed[1].grounding_image_cache


def test_training_with_the_cache_gives_the_same_losses(tiny_models, demo_data, tmp_path):
    """Two epochs of `llamafactory-cli train`: the same loss at every step with the cache on and off, the second
    epoch served from the cache (the count the workflow logs), and 2 processes with the cache (each its own) equal to
    1 on the same global batch (batch 1 x 2 accumulation steps = 2 processes x batch 1; plain SGD, so that float noise
    is not amplified as Adam's first step does). The 1-process runs take place in this process (`run_exp`, what the
    CLI calls), the 2-process one through the CLI."""
    settings = {"max_steps": -1, "num_train_epochs": 2, "disable_shuffling": True, "per_device_train_batch_size": 1,
                "optim": "sgd", "learning_rate": 1.0}  # fmt: skip
    runs = {"off": (False, "1"), "on": (True, "1"), "on_2proc": (True, "2")}
    losses, logs = {}, {}
    for name, (cache, procs) in runs.items():
        out = tmp_path / name
        config = train_config(
            tiny_models["qwen2_vl"], demo_data, out, "qwen2_vl_ground", grounding_image_cache=cache,
            gradient_accumulation_steps=1 if procs == "2" else 2, **settings,
        )  # fmt: skip
        if procs == "2":
            config["ddp_backend"] = "gloo"
            result = run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / f"{name}.yaml", config))],
                             tmp_path, FORCE_TORCHRUN="1", NPROC_PER_NODE="2")  # fmt: skip
            logs[name] = result.stdout + result.stderr
        else:
            logs[name] = "\n".join(train_in_process(config))
        losses[name] = [entry["loss"] for entry in read_jsonl(out / "trainer_log.jsonl") if "loss" in entry]
    assert len(losses["on"]) >= 4 and losses["on"] == losses["off"]
    assert losses["on_2proc"] == pytest.approx(losses["on"], rel=1e-5)
    assert "world size: 2" in logs["on_2proc"]
    assert "grounding_image_cache:" not in logs["off"]
    line = next(line for line in logs["on"].splitlines() if "grounding_image_cache:" in line)
    hits, misses = (int(line.split(f" {word}")[0].split()[-1]) for word in ("hits", "misses"))
    assert misses > 0 and hits >= misses  # every image of the first epoch is served again in the second


def test_an_entry_keeps_one_temporal_copy_only_when_the_copies_are_equal():
    from llamafactory_vision.grounding.image_cache import _Entry

    grid = torch.tensor([[1, 2, 3]])
    frame = torch.randn(6, 3, 1, 4 * 4)
    tiled = frame.expand(6, 3, 2, 16).reshape(6, 3 * 2 * 16)  # (channel, temporal, patch, patch) per row
    entry = _Entry.of(tiled, grid, temporal=2, patch=4)
    assert entry.repeat == 2 and entry.pixels.shape == (6, 3, 1, 16) and torch.equal(entry.rows(), tiled)
    video_like = torch.randn(6, 3 * 2 * 16)  # two different frames: kept whole
    entry = _Entry.of(video_like, grid, temporal=2, patch=4)
    assert entry.repeat == 1 and torch.equal(entry.rows(), video_like)
