"""Grounding templates through LLaMA-Factory's real data pipeline, in process.

Every row of the ``varied`` synthetic set (tiny, very wide, very tall and larger-than-``image_max_pixels`` images;
xyxy/xywh/cxcywh boxes; rec/reg/detect tasks) is tokenized by the host's own ``get_dataset`` with our grounding
templates. The box text decoded from the tokenized labels must equal what Qwen's own converters compute from the
dataset file (tests/qwen_reference.py): ``round(v / W * 1000)`` for Qwen2-VL and Qwen3-VL, and
``round(v * W_model / W)`` clamped to ``[0, W_model - 1]`` for Qwen2.5-VL, where ``W_model`` comes from the real HF
image processor run on the image as LLaMA-Factory regularises it.
Golden strings pin the exact rendered text of a hand-made row per family and answer style.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import GROUND_TEMPLATE, QWEN_FAMILIES, STOCK_TEMPLATE, train_config
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.data.template import TEMPLATES
from llamafactory.extras.constants import IGNORE_INDEX
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer
from llamafactory_vision.grounding.formats import parse_answer
from llamafactory_vision.grounding.templates import get_grounding_spec
from PIL import Image
from qwen_reference import convert_to_qwen2vl_format, convert_to_qwen25vl_format_exact

# LLaMA-Factory 0.9.5's defaults when the YAML sets neither key (mm_plugin.py, `getattr(processor, ..., default)`).
HOST_MAX_PIXELS, HOST_MIN_PIXELS = 768 * 768, 32 * 32
RELATIVE_FAMILIES = ("qwen2_vl", "qwen3_vl")  # ints 0-1000 of the original image; qwen2_5_vl: model-view pixels

SETTINGS: dict[str, dict[str, int]] = {
    "default": {},
    "max_64x64x4": {"image_max_pixels": 64 * 64 * 4},
    "max_300x300_min_128x128": {"image_max_pixels": 300 * 300, "image_min_pixels": 128 * 128},
}
# Qwen2.5-VL is the family whose text depends on the resize: every setting. The 0-1000 families must write the same
# integers at any size: the default here, another setting in the predict-time test (keeps this file fast).
CASES = [("qwen2_5_vl", setting) for setting in SETTINGS] + [(family, "default") for family in RELATIVE_FAMILIES]

USER_TURN = re.compile(r"<\|im_start\|>user\n(.*)<\|im_end\|>\n<\|im_start\|>assistant\n$", re.DOTALL)
IMAGE_EXPANSION = re.compile(r"<\|vision_start\|>((?:<\|image_pad\|>)*)<\|vision_end\|>")
TURN_END = "<|im_end|>\n"


# ---------------------------------------------------------------------------------------------------------------
# Oracles: box arithmetic written out here, the model view from the real image processor
# ---------------------------------------------------------------------------------------------------------------


def pixel_xyxy(box: list[float], fmt: str) -> tuple[float, float, float, float]:
    """A dataset box in ``fmt`` -> ``(x1, y1, x2, y2)`` pixels of the original image."""
    a, b, c, d = box
    if fmt == "xyxy":
        return a, b, c, d
    if fmt == "xywh":
        return a, b, a + c, b + d
    if fmt == "cxcywh":
        return a - c / 2, b - d / 2, a + c / 2, b + d / 2
    raise ValueError(f"bbox_format={fmt!r}")


@dataclass(frozen=True)
class ModelView:
    """What the real processor makes of one image: ``size`` (width, height) in pixels and ``image_tokens``."""

    size: tuple[int, int]
    image_tokens: int


def real_model_view(mm_plugin, processor, image_path: str, max_pixels: int, min_pixels: int) -> ModelView:
    """Regularise the image with LLaMA-Factory's own plugin, run the HF image processor on it, read
    ``image_grid_thw = (t, h, w)`` in patches: the model sees ``(w * patch, h * patch)`` and ``t*h*w / merge**2``
    image tokens."""
    image = mm_plugin._regularize_images([image_path], image_max_pixels=max_pixels, image_min_pixels=min_pixels)
    image_processor = processor.image_processor
    t, h, w = (int(v) for v in image_processor(images=image["images"], return_tensors="pt")["image_grid_thw"][0])
    patch, merge = image_processor.patch_size, image_processor.merge_size
    return ModelView(size=(w * patch, h * patch), image_tokens=t * h * w // merge**2)


def written_boxes(family: str, row: dict, image_size: tuple[int, int], view: ModelView) -> list[tuple[float, ...]]:
    """A dataset row's boxes as Qwen's own converter writes them for ``family``, for an image of
    ``image_size = (W, H)`` that the model sees as ``view``: ints, as the floats ``parse_answer`` returns."""
    (width, height), (view_w, view_h) = image_size, view.size
    fmt = row.get("bbox_format", "xyxy")
    boxes = [pixel_xyxy(o["bbox"], fmt) for o in row["objects"]]
    if family in RELATIVE_FAMILIES:
        written = [convert_to_qwen2vl_format(box, height, width) for box in boxes]
    else:
        written = [convert_to_qwen25vl_format_exact(box, height, width, view_h, view_w) for box in boxes]
    return [tuple(float(v) for v in box) for box in written]


# ---------------------------------------------------------------------------------------------------------------
# The host pipeline
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Tokenized:
    """One tokenized row: ``prompt`` (everything the labels mask) and ``target`` (the supervised text), decoded
    with special tokens kept, and their token ids."""

    image: str
    prompt: str
    target: str
    prompt_ids: list[int]
    target_ids: list[int]

    @property
    def user_text(self) -> str:
        """The user turn after the image expansion (the prompt as the converter wrote it, markers rendered)."""
        match = USER_TURN.search(self.prompt)
        assert match is not None, self.prompt
        return IMAGE_EXPANSION.sub("", match.group(1))


def run_host_pipeline(
    model: Path, data_dir: Path, template: str, workdir: Path, dataset: str, predict: bool = False, **extra
):
    """``get_train_args`` -> ``load_tokenizer`` -> ``get_template_and_fix_tokenizer`` -> ``get_dataset``, as
    ``llamafactory-cli train`` does; returns the tokenizer module, the template and the decoded rows.

    ``predict``: tokenize ``dataset`` as the eval set of a ``do_predict`` + ``predict_with_generate`` run (the
    host's unsupervised processor: the prompt in ``input_ids``, the answer alone in ``labels``)."""
    config = train_config(model, data_dir, workdir, template, dataset=dataset, cutoff_len=8192, overwrite_cache=True)
    if predict:
        del config["dataset"]
        config.update(do_train=False, do_predict=True, predict_with_generate=True, eval_dataset=dataset)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in {**config, **extra}.items()}
    model_args, data_args, training_args, _, _ = get_train_args(config)
    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    host_template = get_template_and_fix_tokenizer(tokenizer, data_args)
    rows = get_dataset(host_template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    decoded = []
    for row in rows["eval_dataset" if predict else "train_dataset"]:
        assert len(row["images"]) == 1
        if predict:
            prompt_ids, target_ids = row["input_ids"], row["labels"]
        else:
            prompt_ids = [t for t, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX]
            target_ids = [t for t in row["labels"] if t != IGNORE_INDEX]
        decoded.append(
            Tokenized(
                image=row["images"][0],
                prompt=tokenizer.decode(prompt_ids, skip_special_tokens=False),
                target=tokenizer.decode(target_ids, skip_special_tokens=False),
                prompt_ids=prompt_ids,
                target_ids=target_ids,
            )
        )
    return tokenizer_module, host_template, decoded


def read_rows(data_dir: Path, file_name: str) -> dict[str, dict]:
    """Dataset rows keyed by their image's absolute path (one image per row, each image used once)."""
    rows = (json.loads(line) for line in (data_dir / file_name).read_text().splitlines())
    return {str(data_dir / row["images"][0]): row for row in rows}


def check_row(family: str, row: dict, sample: Tokenized, view: ModelView) -> list[str]:
    """Every way ``sample`` differs from what ``row`` must become for ``family``; empty when it is right."""
    errors = []
    with Image.open(sample.image) as image:
        size = image.size
    want = written_boxes(family, row, size, view)
    refs = [obj["ref"] for obj in row["objects"]]

    expansions = IMAGE_EXPANSION.findall(sample.prompt)
    if len(expansions) != 1 or len(expansions[0]) != view.image_tokens * len("<|image_pad|>"):
        errors.append(f"image expansion: {[len(e) // len('<|image_pad|>') for e in expansions]} pad runs, "
                      f"want one of {view.image_tokens}")  # fmt: skip
    for leftover in ("<image>", "⟦", "⟧"):
        if leftover in sample.prompt + sample.target:
            errors.append(f"{leftover!r} left in the text")
    if not sample.target.endswith(TURN_END):
        errors.append(f"target does not end the turn: {sample.target!r}")
    answer, in_prompt = sample.target.removesuffix(TURN_END), parse_answer(sample.user_text)

    if row.get("task", "rec") == "reg":
        if answer != refs[0]:
            errors.append(f"reg answer {answer!r} != ref {refs[0]!r}")
        if in_prompt.boxes != want:
            errors.append(f"reg region in prompt {in_prompt.boxes} != {want}")
    else:
        parsed = parse_answer(answer)
        if parsed.boxes != want:
            errors.append(f"boxes {parsed.boxes} != {want}")
        if parsed.refs != refs:
            errors.append(f"refs {parsed.refs} != {refs}")
        if not in_prompt.failed:
            errors.append(f"a box in a {row.get('task', 'rec')} prompt: {sample.user_text!r}")
    return errors


def check_samples(
    family: str, samples: list[Tokenized], rows: dict[str, dict], tokenizer_module, host_template, extra: dict
) -> None:
    """Every tokenized sample against its dataset row (see :func:`check_row`); all mismatches in one report."""
    assert sorted(s.image for s in samples) == sorted(rows), "rows were dropped or images changed"
    max_pixels = extra.get("image_max_pixels", HOST_MAX_PIXELS)
    min_pixels = extra.get("image_min_pixels", HOST_MIN_PIXELS)
    errors = []
    for sample in samples:
        view = real_model_view(
            host_template.mm_plugin, tokenizer_module["processor"], sample.image, max_pixels, min_pixels
        )
        errors += [f"{Path(sample.image).name}: {e}" for e in check_row(family, rows[sample.image], sample, view)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("family,setting", CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_every_box_in_the_tokenized_labels_matches_the_oracle(tmp_path, tiny_models, varied_data, family, setting):
    extra = SETTINGS[setting]
    tokenizer_module, host_template, samples = run_host_pipeline(
        tiny_models[family], varied_data, GROUND_TEMPLATE[family], tmp_path, "synth_ground_train", **extra
    )
    rows = read_rows(varied_data, "ground_train.jsonl")
    # The data must exercise what this test is about.
    assert {r.get("task", "rec") for r in rows.values()} == {"rec", "reg", "detect"}
    assert {r.get("bbox_format", "xyxy") for r in rows.values()} == {"xyxy", "xywh", "cxcywh"}
    sizes = set()
    for path in rows:
        with Image.open(path) as image:
            sizes.add(image.size)
    assert max(w / h for w, h in sizes) > 7 and max(h / w for w, h in sizes) > 7, f"no very wide/tall image: {sizes}"
    assert min(w * h for w, h in sizes) <= 64 * 48, f"no tiny image: {sizes}"
    assert max(w * h for w, h in sizes) > extra.get("image_max_pixels", HOST_MAX_PIXELS), f"none downscaled: {sizes}"
    check_samples(family, samples, rows, tokenizer_module, host_template, extra)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_predict_time_prompts_and_labels_match_the_oracle(tmp_path, tiny_models, varied_data, family):
    """The eval split of a predict run goes through the host's unsupervised processor: same boxes (the val rows
    are checked here only, the train rows in the test above)."""
    extra = SETTINGS["max_300x300_min_128x128"]
    tokenizer_module, host_template, samples = run_host_pipeline(
        tiny_models[family],
        varied_data,
        GROUND_TEMPLATE[family],
        tmp_path,
        "synth_ground_val",
        predict=True,
        **extra,
    )
    rows = read_rows(varied_data, "ground_val.jsonl")
    assert {r.get("task", "rec") for r in rows.values()} == {"rec", "reg", "detect"}
    check_samples(family, samples, rows, tokenizer_module, host_template, extra)


# ---------------------------------------------------------------------------------------------------------------
# Golden strings: one hand-made image of 200x100 pixels
# ---------------------------------------------------------------------------------------------------------------

GOLDEN_ROWS = [
    {"images": ["img.png"], "objects": [{"ref": "the red box", "bbox": [20, 10, 120, 90]}], "task": "rec",
     "prompt": "Where is {ref}?"},
    {"images": ["img2.png"], "objects": [{"ref": "circle", "bbox": [10, 20, 30, 40]},
                                         {"ref": "circle", "bbox": [150, 5, 40, 50]}],
     "bbox_format": "xywh", "task": "detect"},
    {"images": ["img3.png"], "objects": [{"ref": "the green star", "bbox": [100, 50, 60, 30]}],
     "bbox_format": "cxcywh", "task": "reg", "prompt": "What is in {region}?"},
]  # fmt: skip

# Worked by hand. Pixel xyxy: [20,10,120,90]; [10,20,40,60] and [150,5,190,55]; [70,35,130,65].
# 0-1000 of 200x100: (100,100),(600,900); (50,200),(200,600) and (750,50),(950,550); (350,350),(650,650).
# Qwen2.5-VL model view of 200x100 (host resize: none; smart_resize factor 28): 196x112, so x * 0.98, y * 1.12:
# [20,11,118,101]; [10,22,39,67] and [147,6,186,62]; [69,39,127,73]. Image tokens: (196/14) * (112/14) / 4 = 28.
# Qwen3-VL model view (factor 32): 192x96, image tokens (192/16) * (96/16) / 4 = 18.
GOLDEN = {
    "qwen2_vl": {
        "tokens": 28,
        "rec": "<|object_ref_start|>the red box<|object_ref_end|><|box_start|>(100,100),(600,900)<|box_end|>",
        "detect": "<|object_ref_start|>circle<|object_ref_end|><|box_start|>(50,200),(200,600)<|box_end|>"
        "<|object_ref_start|>circle<|object_ref_end|><|box_start|>(750,50),(950,550)<|box_end|>",
        "region": "<|box_start|>(350,350),(650,650)<|box_end|>",
    },
    "qwen2_5_vl": {
        "tokens": 28,
        "rec": '```json\n[\n\t{"bbox_2d": [20, 11, 118, 101], "label": "the red box"}\n]\n```',
        "detect": '```json\n[\n\t{"bbox_2d": [10, 22, 39, 67], "label": "circle"},\n'
        '\t{"bbox_2d": [147, 6, 186, 62], "label": "circle"}\n]\n```',
        "region": "[69, 39, 127, 73]",
    },
    "qwen3_vl": {
        "tokens": 18,
        "rec": '```json\n[\n\t{"bbox_2d": [100, 100, 600, 900], "label": "the red box"}\n]\n```',
        "detect": '```json\n[\n\t{"bbox_2d": [50, 200, 200, 600], "label": "circle"},\n'
        '\t{"bbox_2d": [750, 50, 950, 550], "label": "circle"}\n]\n```',
        "region": "[350, 350, 650, 650]",
    },
}
# ground_answer_style: compact writes the JSON families on one line (Qwen2-VL is the same in both styles).
COMPACT = {
    "qwen2_5_vl": {
        "rec": '[{"bbox_2d": [20, 11, 118, 101], "label": "the red box"}]',
        "detect": '[{"bbox_2d": [10, 22, 39, 67], "label": "circle"}, {"bbox_2d": [147, 6, 186, 62], "label": "circle"}]',
    },
    "qwen3_vl": {
        "rec": '[{"bbox_2d": [100, 100, 600, 900], "label": "the red box"}]',
        "detect": '[{"bbox_2d": [50, 200, 200, 600], "label": "circle"}, '
        '{"bbox_2d": [750, 50, 950, 550], "label": "circle"}]',
    },
}
COMPACT["qwen2_vl"] = {key: GOLDEN["qwen2_vl"][key] for key in ("rec", "detect")}
SYSTEM = {"qwen2_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", "qwen3_vl": ""}
SYSTEM["qwen2_5_vl"] = SYSTEM["qwen2_vl"]


@pytest.fixture(scope="module")
def golden_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("golden")
    for row in GOLDEN_ROWS:
        Image.new("RGB", (200, 100), (30, 60, 90)).save(root / row["images"][0])
    (root / "golden.jsonl").write_text("".join(json.dumps(row) + "\n" for row in GOLDEN_ROWS))
    info = {"synth_ground_train": {"file_name": "golden.jsonl", "formatting": "grounding"}}
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


@pytest.mark.parametrize("style", ["default", "compact"])
@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_golden_rendered_text(tmp_path, tiny_models, golden_data, family, style):
    extra = {} if style == "default" else {"ground_answer_style": style}  # default: native
    tokenizer_module, _, samples = run_host_pipeline(
        tiny_models[family], golden_data, GROUND_TEMPLATE[family], tmp_path, "synth_ground_train", **extra
    )
    token_id = tokenizer_module["tokenizer"].convert_tokens_to_ids
    rec, detect, reg = samples
    golden = GOLDEN[family] if style == "default" else {**GOLDEN[family], **COMPACT[family]}
    image = "<|vision_start|>" + "<|image_pad|>" * golden["tokens"] + "<|vision_end|>"

    # rec: the whole conversation, byte for byte.
    user, assistant = f"{SYSTEM[family]}<|im_start|>user\n{image}", "<|im_end|>\n<|im_start|>assistant\n"
    assert rec.prompt == f"{user}Where is the red box?{assistant}"
    assert rec.target == golden["rec"] + TURN_END

    # detect: several objects in one answer, the prompt phrased by the template spec.
    assert detect.target == golden["detect"] + TURN_END
    phrasings = get_grounding_spec(GROUND_TEMPLATE[family]).prompts["detect"]
    assert detect.user_text in {p.replace("{ref}", "circle") for p in phrasings}
    assert detect.prompt.count("<|vision_start|>") == 1 and image in detect.prompt

    # reg: the box goes into the prompt, the referring expression is the answer.
    assert reg.prompt == f"{user}What is in {golden['region']}?{assistant}"
    assert reg.target == "the green star" + TURN_END

    # Special tokens are single tokens, not their characters spelled out (the decoded text could not tell).
    assert rec.prompt_ids.count(token_id("<|image_pad|>")) == golden["tokens"]
    if family == "qwen2_vl":
        for token in ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"):
            assert (rec.target_ids.count(token_id(token)), detect.target_ids.count(token_id(token))) == (1, 2)
        assert reg.prompt_ids.count(token_id("<|box_start|>")) == 1


# ---------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_grounding_template_is_its_base_with_another_mm_plugin(family):
    from llamafactory.data.mm_plugin import Qwen2VLPlugin, Qwen3VLPlugin

    spec = get_grounding_spec(GROUND_TEMPLATE[family])
    assert (spec.box_family, spec.base_template) == (family, STOCK_TEMPLATE[family])
    ours, base = TEMPLATES[spec.name], TEMPLATES[spec.base_template]
    assert type(ours) is type(base)
    for f in dataclasses.fields(base):
        if f.name != "mm_plugin":
            assert getattr(ours, f.name) == getattr(base, f.name), f.name
    assert ours.stop_words == ["<|im_end|>"]
    host_plugin = Qwen3VLPlugin if family == "qwen3_vl" else Qwen2VLPlugin
    assert isinstance(ours.mm_plugin, host_plugin) and type(base.mm_plugin) is host_plugin
    assert ours.mm_plugin is not base.mm_plugin
    assert (ours.mm_plugin.image_token, ours.mm_plugin.video_token) == ("<|image_pad|>", "<|video_pad|>")
    assert (base.mm_plugin.image_token, base.mm_plugin.video_token) == ("<|image_pad|>", "<|video_pad|>")


def test_generation_does_not_stop_at_box_tokens(tiny_models):
    """The host's run_sft would stop generating at <|object_ref_start|>/<|box_start|> (extra special tokens)."""
    from llamafactory.data.template import TEMPLATES
    from llamafactory_vision.grounding.workflow import generation_stop_ids
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen2_vl"])
    stop = generation_stop_ids(tokenizer, TEMPLATES["qwen2_vl_ground"])
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop
    for token in ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"):
        assert token in tokenizer._extra_special_tokens  # what the host would turn into EOS ids
        assert tokenizer.convert_tokens_to_ids(token) not in stop


@pytest.mark.e2e
def test_qwen3_vl_moe_trains_with_the_grounding_template(tmp_path, demo_data):
    """Qwen3-VL MoE checkpoints (model type qwen3_vl_moe) write Qwen3-VL's boxes: qwen3_vl_ground accepts them, and a
    tiny MoE trains through llamafactory-cli (LoRA, with the bbox head) on the same tokenized targets as the dense."""
    from conftest import run_cli, write_yaml
    from llamafactory_vision.tiny import build_tiny

    model = build_tiny("qwen3_vl_moe", tmp_path / "moe", seed=0)
    assert json.loads((model / "config.json").read_text())["model_type"] == "qwen3_vl_moe"
    assert "qwen3_vl_moe" in get_grounding_spec("qwen3_vl_ground").model_types
    config = train_config(model, demo_data, tmp_path / "out", "qwen3_vl_ground", bbox_head=True)
    run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "train.yaml", config))], tmp_path)
    logs = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    steps = [log for log in logs if "loss" in log]
    assert len(steps) == 2 and all(0 < log["loss"] < 100 for log in steps)
    assert all("bbox_l1" in log for log in steps)  # the head trained on the MoE's hidden states
    assert (tmp_path / "out" / "bbox_head.safetensors").is_file()
