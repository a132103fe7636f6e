"""`grounding_fast_tokenize`: image token counts from headers give the same tokens, labels and batches as the host's
decode-and-patchify path, for every row of the varied set (tiny, wide, tall, > max_pixels images), on every Qwen
family."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import GROUND_TEMPLATE, QWEN_FAMILIES
from llamafactory.data.mm_plugin import Qwen2VLPlugin, Qwen3VLPlugin
from llamafactory_vision.grounding.head_data import BBOX_STAGE, ROWS_STAGE


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
    import dataclasses

    from llamafactory.data.template import TEMPLATES
    from llamafactory_vision.grounding.image_runs import ImageRunEncoding
    from llamafactory_vision.grounding.plugin import with_fast_tokenize

    registered = TEMPLATES["qwen2_vl_ground"]
    fast = with_fast_tokenize(registered, True)
    assert fast.mm_plugin.fast_tokenize and not registered.mm_plugin.fast_tokenize
    # the copy's class adds the image-run encoding; the registered template and its host class keep theirs
    assert isinstance(fast, type(registered)) and isinstance(fast, ImageRunEncoding)
    assert not isinstance(registered, ImageRunEncoding)
    assert dataclasses.asdict(fast) == dataclasses.asdict(dataclasses.replace(registered, mm_plugin=fast.mm_plugin))
    assert with_fast_tokenize(registered, False) is registered
    assert with_fast_tokenize(TEMPLATES["qwen2_vl"], True) is TEMPLATES["qwen2_vl"]  # stock templates: untouched


class _Reads:
    """Counts the size reads of :func:`~llamafactory_vision.image_header.image_size`'s two ways, header reader and
    PIL's open (anyone's: the converter's verifying open too), keeping their behaviour."""

    def __init__(self, stack: ExitStack):
        from llamafactory_vision import image_header
        from PIL import Image

        header = mock.patch.object(image_header, "header_size", wraps=image_header.header_size)
        self.header = stack.enter_context(header)
        self.pil = stack.enter_context(mock.patch.object(Image, "open", wraps=Image.open))

    def counts(self) -> tuple[int, int]:
        """(header reads, PIL opens) so far."""
        return self.header.call_count, self.pil.call_count


def test_header_sizes_are_read_once_per_file_version(tmp_path):
    """A row's image size is asked for twice per tokenization; the header is read once, and again when the file
    changes; a format the header reader leaves to PIL is opened by PIL once (oracle: PIL opening the file)."""
    import os

    from llamafactory_vision.grounding import plugin
    from PIL import Image

    path = tmp_path / "a.png"
    Image.new("RGB", (30, 20)).save(path)
    with ExitStack() as stack:
        reads = _Reads(stack)
        assert plugin.original_size(str(path)) == (30, 20)
        assert plugin.original_size(path) == (30, 20)
        assert plugin.original_size({"path": str(path)}) == (30, 20)
        assert reads.counts() == (1, 0)  # one header read, no PIL open
        Image.new("RGB", (50, 40)).save(path)  # rewritten in place: a new version
        os.utime(path, ns=(1, 1))  # even with an old timestamp, the size in bytes differs (and mtime does)
        assert plugin.original_size(str(path)) == (50, 40)
        assert reads.counts() == (2, 0)
        with path.open("rb") as f:  # file objects and bytes are read (by PIL) every time
            assert plugin.original_size(f) == (50, 40)
        assert plugin.original_size(path.read_bytes()) == (50, 40)
        assert reads.counts() == (2, 2)

        gif = tmp_path / "a.gif"  # not PNG or JPEG: the header reader declines, PIL opens it, once per version
        Image.new("P", (13, 7)).save(gif)
        with Image.open(gif) as image:
            expected = image.size
        assert reads.counts() == (2, 3)
        assert plugin.original_size(str(gif)) == plugin.original_size(str(gif)) == expected == (13, 7)
        assert reads.counts() == (3, 4)

        bmp = tmp_path / "a.bmp"  # 8x16 and 16x8 BMPs have the same byte size (rows padded to 4 bytes: 384 pixel bytes)
        Image.new("RGB", (8, 16)).save(bmp)
        assert plugin.original_size(str(bmp)) == (8, 16)
        stat = os.stat(bmp)
        Image.new("RGB", (16, 8)).save(bmp)
        os.utime(bmp, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same byte size, the old mtime set back
        assert (os.stat(bmp).st_size, os.stat(bmp).st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
        assert plugin.original_size(str(bmp)) == (16, 8)  # still a new version (ctime), read afresh


# --- image-token runs written as ids (ImageRunEncoding) ---------------------------------------------------------------

_VISION = {"start": "<|vision_start|>", "end": "<|vision_end|>", "pad": "<|image_pad|>"}


@pytest.fixture(scope="module")
def mixed_data(varied_data, tmp_path_factory) -> Path:
    """The varied grounding set plus sharegpt rows with several images, several turns and image placeholders glued to
    text (``multi``), the same rows as preference pairs (``multi_rank``), a row whose text holds literal image
    tokens, a repeated row and a row of long non-ASCII text; images are the varied set's."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "images").symlink_to(varied_data / "images")
    for name in ("ground_train.jsonl", "ground_val.jsonl"):
        (root / name).symlink_to(varied_data / name)
    images = sorted(f"images/{p.name}" for p in (varied_data / "images").iterdir())
    rows = []
    for i in range(8):
        picked = [images[(5 * i + k) % len(images)] for k in range(3)]
        messages = [
            {"role": "user", "content": f"Compare<image>and<image>: which is {'larger' if i % 2 else 'brighter'}?"},
            {"role": "assistant", "content": f"The first one, by {i} shades."},
            {"role": "user", "content": "<image>\nAnd this one?" if i % 3 else "And this one? <image>"},
            {"role": "assistant", "content": "It is smaller than both." * (1 + i % 3)},
        ]
        rows.append({"messages": messages, "images": picked})
    literal = f"text with {_VISION['pad']}{_VISION['pad']} literal tokens {_VISION['pad']}<image>end"
    rows.append({"messages": [{"role": "user", "content": literal}, {"role": "assistant", "content": "ok"}],
                 "images": images[:1]})  # fmt: skip
    rows.append(rows[0])  # a repeated row: every text of it comes from the fast encoder's memo the second time
    long_text = " ".join(f"détail n°{k} ✓" for k in range(120))  # longer than any cutoff_len below
    rows.append({"messages": [{"role": "user", "content": f"<image>{long_text}"},
                              {"role": "assistant", "content": long_text}], "images": images[1:2]})  # fmt: skip
    (root / "multi.json").write_text(json.dumps(rows))
    ranked = [
        {"messages": row["messages"][:-1], "chosen": row["messages"][-1],
         "rejected": {"role": "assistant", "content": "I cannot tell."}, "images": row["images"]}
        for row in rows
    ]  # fmt: skip
    (root / "multi_rank.json").write_text(json.dumps(ranked))
    info = json.loads((varied_data / "dataset_info.json").read_text())
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    info["multi"] = {"file_name": "multi.json", "formatting": "sharegpt", "tags": tags,
                     "columns": {"messages": "messages", "images": "images"}}  # fmt: skip
    info["multi_rank"] = {"file_name": "multi_rank.json", "formatting": "sharegpt", "ranking": True, "tags": tags,
                          "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected",
                                      "images": "images"}}  # fmt: skip
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


def _prepared(model_dir, data_dir, out, template: str, fast: bool, stage: str, **args):
    """The host's ``get_dataset`` for ``stage`` (train split, or the eval split where ``do_predict``)."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    config = {
        "model_name_or_path": str(model_dir), "stage": "rm" if stage == "rm" else "sft", "finetuning_type": "lora",
        "dataset_dir": str(data_dir), "template": template, "output_dir": str(out), "overwrite_output_dir": True,
        "overwrite_cache": True, "report_to": "none", "grounding_fast_tokenize": fast, **args,
    }  # fmt: skip
    model_args, data_args, training_args, _, _ = get_train_args(config)
    tokenizer_module = load_tokenizer(model_args)
    template_obj = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    module = get_dataset(template_obj, model_args, data_args, training_args, stage=stage, **tokenizer_module)
    return tokenizer_module["tokenizer"], module["eval_dataset" if args.get("do_predict") else "train_dataset"]


def _cut_rows(tokenizer, dataset, cutoff_len: int) -> tuple[int, int]:
    """(rows cut inside an image's tokens, rows cut after a whole image) among rows of exactly ``cutoff_len`` ids."""
    start, end = (tokenizer.convert_tokens_to_ids(_VISION[k]) for k in ("start", "end"))
    inside = after = 0
    for row in dataset:
        ids = row["input_ids"]
        if len(ids) != cutoff_len or start not in ids:
            continue
        last_start = len(ids) - 1 - ids[::-1].index(start)
        if end not in ids[last_start:]:
            inside += 1
        else:
            after += 1
    return inside, after


# (stage, dataset arguments): the host's SFT processor (as our workflow asks for it without the head), ours for the
# head, ours and the host's for generation (prompts only), the host's pairwise processor.
_STAGES = {
    "sft rows": (ROWS_STAGE, {"do_train": True, "dataset": "synth_ground_train,multi", "cutoff_len": 96}),
    "sft bbox head": (BBOX_STAGE, {"do_train": True, "dataset": "synth_ground_train", "cutoff_len": 96,
                                   "bbox_head": True}),
    "predict rows": (ROWS_STAGE, {"do_predict": True, "predict_with_generate": True,
                                  "eval_dataset": "synth_ground_val,multi", "cutoff_len": 96}),
    "predict host": ("sft", {"do_predict": True, "predict_with_generate": True, "eval_dataset": "multi",
                             "cutoff_len": 96}),
    "pairwise": ("rm", {"do_train": True, "dataset": "multi_rank", "cutoff_len": 96}),
    "sft no cut, multi-turn history masked": (ROWS_STAGE, {"do_train": True, "dataset": "synth_ground_train,multi",
                                                           "cutoff_len": 4096, "mask_history": True}),
}  # fmt: skip


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_image_runs_as_ids_give_identical_datasets(family, tiny_models, mixed_data, tmp_path):
    """Every column of every row (input_ids, labels, attention_mask, images, our box / label-box columns, pairwise
    chosen/rejected) equals the host's path (``grounding_fast_tokenize: false``, which tokenizes the expanded image
    tokens as text), for each processor a grounding template reaches, with ``cutoff_len`` cutting rows inside and
    after an image, multi-image and multi-turn rows."""
    cut_inside = cut_after = 0
    for name, (stage, args) in _STAGES.items():
        tokenizer, slow = _prepared(tiny_models[family], mixed_data, tmp_path / "s", GROUND_TEMPLATE[family], False,
                                    stage, **args)  # fmt: skip
        _, fast = _prepared(tiny_models[family], mixed_data, tmp_path / "f", GROUND_TEMPLATE[family], True, stage, **args)
        assert fast.column_names == slow.column_names, name
        assert len(fast) == len(slow) > 0, name
        for i in range(len(slow)):
            assert fast[i] == slow[i], f"{name}, row {i}"
        if "cutoff_len" in args and args["cutoff_len"] < 4096 and stage != "rm":
            inside, after = _cut_rows(tokenizer, slow, args["cutoff_len"])
            cut_inside, cut_after = cut_inside + inside, cut_after + after
    # The cutoff must reach both cases the expansion has to get right: a cut through an image's run, and a cut after.
    assert cut_inside > 0 and cut_after > 0, (cut_inside, cut_after)


def test_image_runs_fall_back_where_the_image_token_is_not_atomic(tiny_models):
    """With ``split_special_tokens`` the tokenizer spells ``<|image_pad|>`` out as text: the fast template must then
    encode exactly as the host's template does (oracle), not insert one id per image token."""
    from llamafactory.data.template import TEMPLATES
    from llamafactory_vision.grounding.plugin import with_fast_tokenize
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen2_vl"], split_special_tokens=True)
    host = TEMPLATES["qwen2_vl_ground"]
    fast = with_fast_tokenize(host, True)
    pad = _VISION["pad"]
    messages = [
        {"role": "user", "content": f"{_VISION['start']}{pad * 7}{_VISION['end']}where?{pad * 3}"},
        {"role": "assistant", "content": "there"},
    ]
    expected = host.encode_multiturn(tokenizer, messages)
    assert fast.encode_multiturn(tokenizer, messages) == expected
    assert tokenizer.convert_tokens_to_ids(pad) not in expected[0][0]  # spelt out, so the fallback was needed


def test_the_converter_hands_its_header_read_to_tokenization(tmp_path):
    """The converter reads every image to verify it; the plugin's size look-ups then read no header again, unless the
    file changed since (oracle: PIL opening the file)."""
    import os

    from llamafactory_vision.grounding import plugin
    from llamafactory_vision.grounding.data import GroundingDatasetConverter
    from llamafactory_vision.grounding.dataset_attr import GroundingDatasetAttr
    from llamafactory_vision.hparams import VisionDataArguments
    from PIL import Image

    path = tmp_path / "scene.png"
    Image.new("RGB", (64, 48)).save(path)
    attr = GroundingDatasetAttr("file", dataset_name="rows.jsonl")
    attr.join({"file_name": "rows.jsonl", "formatting": "grounding", "columns": {}})
    converter = GroundingDatasetConverter(attr, VisionDataArguments(template="qwen2_vl_ground", dataset_dir=str(tmp_path)))
    row = {"images": ["scene.png"], "objects": [{"ref": "a thing", "bbox": [1, 2, 30, 40]}]}
    with ExitStack() as stack:
        reads = _Reads(stack)
        (image,) = converter(row, 0)["_images"]
        assert reads.counts() == (0, 0)  # the converter's own check read the PNG without PIL (verified_size)
        assert plugin.original_size(image) == (64, 48)
        assert reads.counts() == (0, 0)  # no second read
        Image.new("RGB", (20, 10)).save(path)
        os.utime(path, ns=(1, 1))
        assert plugin.original_size(image) == (20, 10)  # another version of the file: read afresh
        assert reads.counts() == (1, 0)


# --- text elements encoded by the Rust tokenizer directly (DirectTextEncoder) ----------------------------------------


def test_direct_text_encoder_equals_the_tokenizer_in_every_state(tiny_models):
    """``DirectTextEncoder.encode`` gives ``tokenizer.encode(text, add_special_tokens=False)`` (oracle: the wrapper
    itself, called on a fresh copy of the tokenizer) for repeated texts (memo hits), added tokens, non-ASCII and long
    texts, after padding/truncation was set on the backend, after ``split_special_tokens`` flips, and for a tokenizer
    class whose ``encode`` is its own (the wrapper then always runs)."""
    from llamafactory_vision.grounding.text_ids import DirectTextEncoder
    from transformers import AutoTokenizer

    texts = [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        f"<|im_start|>user\n{_VISION['start']}{_VISION['pad']}{_VISION['end']}Where is the dog?<|im_end|>\n",
        "<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|><|im_end|>\n",
        "  leading spaces, tabs\t and\nnewlines  ",
        "größer als 日本語 ✓ " * 200,
    ]
    for family in QWEN_FAMILIES:
        tokenizer = AutoTokenizer.from_pretrained(tiny_models[family])
        oracle = AutoTokenizer.from_pretrained(tiny_models[family])
        encoder = DirectTextEncoder(tokenizer)
        assert encoder.backend is not None, "the tiny tokenizers are stock TokenizersBackend ones: the direct path"
        with mock.patch.object(encoder.backend, "encode_batch_fast", wraps=encoder.backend.encode_batch_fast) as rust:
            for text in texts * 2:
                assert encoder.encode(text, add_special_tokens=False) == oracle.encode(text, add_special_tokens=False)
            assert rust.call_count == len(texts), "the direct path, and repeated texts come from the memo"
        # state the wrapper resets: truncation and padding set on the backend (the wrapper runs and removes them)
        tokenizer.backend_tokenizer.enable_truncation(max_length=3)
        tokenizer.backend_tokenizer.enable_padding(length=500)
        assert encoder.encode(texts[1], add_special_tokens=False) == oracle.encode(texts[1], add_special_tokens=False)
        assert tokenizer.backend_tokenizer.truncation is None and tokenizer.backend_tokenizer.padding is None
        # split_special_tokens flipped: the special tokens are spelt out, so the texts remembered before are stale
        unsplit = oracle.encode(texts[0], add_special_tokens=False)
        tokenizer.split_special_tokens = oracle.split_special_tokens = True
        assert oracle.encode(texts[0], add_special_tokens=False) != unsplit
        for text in texts[:3] * 2:
            assert encoder.encode(text, add_special_tokens=False) == oracle.encode(text, add_special_tokens=False)
        # other calls are the wrapper's
        assert encoder.encode(texts[0]) == oracle.encode(texts[0])
        assert encoder.convert_tokens_to_ids(_VISION["pad"]) == oracle.convert_tokens_to_ids(_VISION["pad"])

    class OwnEncode(type(tokenizer)):
        def encode(self, text, *args, **kwargs):
            return [7, *super().encode(text, *args, **kwargs)]

    # pickled (datasets fingerprints and ships the template copy that holds it): the same tokenizer, an empty memo
    import pickle

    copy = pickle.loads(pickle.dumps(encoder))
    assert copy.memo == {} and encoder.memo
    assert copy.encode(texts[1], add_special_tokens=False) == encoder.encode(texts[1], add_special_tokens=False)

    own = OwnEncode.from_pretrained(tiny_models["qwen2_vl"])
    encoder = DirectTextEncoder(own)
    assert encoder.backend is None
    assert encoder.encode(texts[0], add_special_tokens=False)[0] == 7
