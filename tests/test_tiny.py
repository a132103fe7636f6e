"""Tiny offline checkpoints reload with the Auto classes, run, are deterministic and train in stock LLaMA-Factory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli, train_config, write_yaml
from llamafactory_vision.tiny import (
    FAMILIES,
    LLAVA_LEADING_TOKENS,
    LLAVA_TRAILING_TOKENS,
    QWEN_SPECIAL_TOKENS,
    build_tiny,
    main,
    train_byte_level_bpe,
)
from PIL import Image
from qwen_vl_utils import smart_resize
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLVideoProcessor,
)

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
PROCESSOR_CLASSES = {
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor"),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen2VLImageProcessor", "Qwen3VLVideoProcessor"),
    "qwen3_vl_moe": ("Qwen3VLProcessor", "Qwen2VLImageProcessor", "Qwen3VLVideoProcessor"),
    "llava": ("LlavaProcessor", "CLIPImageProcessor", None),
}
# (patch size, min pixels, max pixels) chosen in tiny.py; smart_resize's factor is patch * merge (2).
QWEN_IMAGE_SETTINGS = {
    "qwen2_vl": (14, 28 * 28 * 4, 448 * 448),
    "qwen2_5_vl": (14, 28 * 28 * 4, 448 * 448),
    "qwen3_vl": (16, 32 * 32 * 4, 512 * 512),
    "qwen3_vl_moe": (16, 32 * 32 * 4, 512 * 512),
}
GROUNDING_TEXT = "the small red circle(120,340),(560,780)"
GROUNDING_JSON = '[{"bbox_2d": [12, 34, 56, 78], "label": "x"}]'


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    for family in FAMILIES:
        build_tiny(family, root / family)
    return root


def _grounding_messages() -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Locate the red circle."}]},
        {"role": "assistant", "content": [{"type": "text", "text": GROUNDING_TEXT}]},
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_reloads_with_auto_classes_and_forward_loss_is_finite(tiny_dir: Path, family: str) -> None:
    path = tiny_dir / family
    config = AutoConfig.from_pretrained(path)
    # LLaMA-Factory's loader picks AutoModelForImageTextToText exactly when this holds.
    assert type(config) in AutoModelForImageTextToText._model_mapping
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    processor_cls, image_cls, video_cls = PROCESSOR_CLASSES[family]
    assert type(processor).__name__ == processor_cls
    assert type(processor.image_processor).__name__ == image_cls
    assert type(getattr(processor, "video_processor", None)).__name__ == (video_cls or "NoneType")
    assert processor.tokenizer.get_vocab() == tokenizer.get_vocab()
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)

    prompt = processor.apply_chat_template(_grounding_messages(), tokenize=False)
    assert GROUNDING_TEXT in prompt
    inputs = processor(text=[prompt], images=[Image.new("RGB", (96, 64), (200, 30, 30))], return_tensors="pt")
    output = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
@pytest.mark.parametrize("size", [(96, 64), (20, 30), (1000, 700)])
def test_qwen_image_tokens_follow_smart_resize(tiny_dir: Path, family: str, size: tuple[int, int]) -> None:
    processor = AutoProcessor.from_pretrained(tiny_dir / family)
    patch, min_pixels, max_pixels = QWEN_IMAGE_SETTINGS[family]
    width, height = size
    text = processor.apply_chat_template([_grounding_messages()[0]], tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", size)], return_tensors="pt")

    resized_h, resized_w = smart_resize(height, width, factor=patch * 2, min_pixels=min_pixels, max_pixels=max_pixels)
    assert inputs["image_grid_thw"].tolist() == [[1, resized_h // patch, resized_w // patch]]
    assert min_pixels <= resized_h * resized_w <= max_pixels
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (inputs["input_ids"] == image_token_id).sum().item() == resized_h * resized_w // (patch * 2) ** 2


def test_llava_image_is_16_tokens_after_bos(tiny_dir: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_dir / "llava")
    config = AutoConfig.from_pretrained(tiny_dir / "llava")
    assert (processor.patch_size, processor.num_additional_image_tokens) == (8, 1)
    assert processor.vision_feature_select_strategy == config.vision_feature_select_strategy == "default"
    prompt = processor.apply_chat_template(_grounding_messages(), tokenize=False)
    inputs = processor(text=[prompt], images=[Image.new("RGB", (96, 64))], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    assert inputs["input_ids"][0, 0].item() == processor.tokenizer.bos_token_id
    assert (inputs["input_ids"] == config.image_token_index).sum().item() == (32 // 8) ** 2


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_qwen_video_processor_runs(tiny_dir: Path, family: str) -> None:
    path = tiny_dir / family
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    frames = [Image.new("RGB", (64, 64), (60 * i, 0, 0)) for i in range(4)]
    inputs = processor(text=[text], videos=[frames], return_tensors="pt")
    assert inputs["video_grid_thw"][0, 0].item() == 2  # 4 frames / temporal patch 2
    assert torch.isfinite(model(**inputs, labels=inputs["input_ids"]).loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_are_single_tokens_with_config_ids(tiny_dir: Path, family: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / family)
    config = AutoConfig.from_pretrained(tiny_dir / family)
    specials = QWEN_SPECIAL_TOKENS if family in QWEN_FAMILIES else LLAVA_LEADING_TOKENS + LLAVA_TRAILING_TOKENS
    ids = [tokenizer.convert_tokens_to_ids(token) for token in specials]
    assert len(set(ids)) == len(specials)
    for token, token_id in zip(specials, ids, strict=True):
        assert tokenizer.encode(f"a{token}b", add_special_tokens=False)[1:-1] == [token_id], token
    if family in QWEN_FAMILIES:
        assert ids == list(range(ids[0], ids[0] + len(ids)))  # appended in Qwen's order, like the real vocab
        assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
        assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
        assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
        assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
        assert sum(config.text_config.rope_parameters["mrope_section"]) * 2 == (
            config.text_config.hidden_size // config.text_config.num_attention_heads
        )
    else:
        assert ids[:3] == [0, 1, 2]  # <unk> <s> </s> as in Llama
        assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
        assert config.image_token_index == tokenizer.convert_tokens_to_ids("<image>")


@pytest.mark.parametrize("family", FAMILIES)
def test_grounding_text_tokenizes_sensibly(tiny_dir: Path, family: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / family)
    tokens = tokenizer.tokenize(GROUNDING_TEXT)
    assert {"the", "Ġsmall", "Ġred", "Ġcircle"} <= set(tokens)
    assert [t for t in tokens if any(c.isdigit() for c in t)] == list("120340560780")  # Qwen2: one digit each
    json_tokens = tokenizer.tokenize(GROUNDING_JSON)
    assert {"bbox", "label"} <= set(json_tokens)
    assert [t for t in json_tokens if t.isdigit()] == list("2" + "12345678")  # bbox_2d, then the box
    for text in (GROUNDING_TEXT, GROUNDING_JSON, "<|box_start|>(1,2),(3,4)<|box_end|>"):
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_reloaded_qwen_tokenizer_matches_trained_bpe(tiny_dir: Path) -> None:
    # Qwen2Tokenizer rebuilds its pre-tokenizer on load; it must split exactly like the trained BPE.
    trained = train_byte_level_bpe()
    reloaded = AutoTokenizer.from_pretrained(tiny_dir / "qwen2_vl")
    texts = (GROUNDING_TEXT, GROUNDING_JSON, "It's 3:45 pm, isn't it?\n\n  Yes!", "Ünïcödé café 12.5%")
    for text in texts:
        assert reloaded.encode(text, add_special_tokens=False) == trained.encode(text).ids


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_gives_identical_bytes(tmp_path: Path, family: str) -> None:
    rng_state = torch.get_rng_state()
    first = build_tiny(family, tmp_path / "a", seed=7)
    second = build_tiny(family, tmp_path / "b", seed=7)
    other = build_tiny(family, tmp_path / "c", seed=8)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is untouched
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    weights, other_weights = load_file(first / "model.safetensors"), load_file(other / "model.safetensors")
    assert weights.keys() == other_weights.keys()
    assert not all(torch.equal(weights[k], other_weights[k]) for k in weights)


def test_size_knobs_and_processor_defaults_untouched(tmp_path: Path) -> None:
    processor_classes = (Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3VLVideoProcessor)
    class_defaults = [dict(cls.size) for cls in processor_classes]
    build_tiny("qwen2_vl", tmp_path / "q2")
    path = build_tiny("qwen3_vl", tmp_path / "q", hidden_size=128, num_layers=3, vision_depth=3)
    config = AutoConfig.from_pretrained(path)
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, config.vision_config.depth) == (128, 3, 3)
    assert config.vision_config.out_hidden_size == 128
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    assert config.vision_config.deepstack_visual_indexes == [0, 1, 2]
    # Building must not leak our pixel bounds into transformers' (mutable) class-level defaults.
    assert [cls.size for cls in processor_classes] == class_defaults


def test_invalid_arguments_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="family='qwen9'"):
        build_tiny("qwen9", tmp_path)
    with pytest.raises(ValueError, match="num_heads=3"):
        build_tiny("qwen2_vl", tmp_path, hidden_size=64, num_heads=3)
    with pytest.raises(ValueError, match="vision_heads=3"):
        build_tiny("llava", tmp_path, vision_heads=3)


def test_cli_writes_each_family(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--out", str(tmp_path), "--families", "llava,qwen2_vl", "--seed", "1", "--hidden-size", "32"])
    printed = capsys.readouterr().out
    for family in ("llava", "qwen2_vl"):
        assert str(tmp_path / family) in printed
        assert AutoConfig.from_pretrained(tmp_path / family).text_config.hidden_size == 32
    assert not (tmp_path / "qwen3_vl").exists()


def _write_sharegpt_dataset(root: Path) -> None:
    Image.new("RGB", (96, 64), (200, 30, 30)).save(root / "red.png")
    Image.new("RGB", (64, 80), (30, 30, 200)).save(root / "blue.png")
    rows = [
        {
            "messages": [
                {"role": "user", "content": "<image>Locate the red circle."},
                {"role": "assistant", "content": GROUNDING_TEXT},
            ],
            "images": ["red.png"],
        },
        {
            "messages": [
                {"role": "user", "content": "<image>Describe the image."},
                {"role": "assistant", "content": "A blue square."},
            ],
            "images": ["blue.png"],
        },
    ]
    (root / "tiny.json").write_text(json.dumps(rows))
    dataset_info = {
        "tiny_mm": {
            "file_name": "tiny.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        }
    }
    (root / "dataset_info.json").write_text(json.dumps(dataset_info))


@pytest.mark.parametrize(
    ("family", "template"),
    [("qwen2_vl", "qwen2_vl"), ("qwen2_5_vl", "qwen2_vl"), ("qwen3_vl", "qwen3_vl_nothink"), ("llava", "llava")],
)
def test_stock_llamafactory_lora_sft_trains(tiny_dir: Path, tmp_path: Path, family: str, template: str) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _write_sharegpt_dataset(data_dir)
    output_dir = tmp_path / "out"
    config = train_config(tiny_dir / family, data_dir, output_dir, template, dataset="tiny_mm", overwrite_cache=True)
    # stock LLaMA-Factory, without our import hook
    run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "train.yaml", config))], tmp_path,
            HF_DATASETS_CACHE=str(tmp_path / "datasets_cache"), LLAMAFACTORY_VISION_DISABLE="1")  # fmt: skip
    assert (output_dir / "adapter_model.safetensors").is_file()
    logs = [json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines()]
    losses = [log["loss"] for log in logs if "loss" in log]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    # LLaMA-Factory saves the processor it patched (setattr of image_max_pixels etc.); it must reload unchanged.
    saved, original = AutoProcessor.from_pretrained(output_dir), AutoProcessor.from_pretrained(tiny_dir / family)
    assert type(saved) is type(original)
    assert saved.image_processor.to_dict() == original.image_processor.to_dict()
