"""The bbox regression head, on the tiny models: loss and gradients in process (through the trainer the grounding
workflow builds), the box targets and anchor tokens of each Qwen family, and the real CLIs for saving, predicting,
exporting, resuming, start-up errors, head-off parity with the host and a short run where the head learns.

CLI runs get ``OMP_NUM_THREADS=1`` and in-process code one torch thread: on the shared 2-core machine OpenMP's
spin-waiting made a tiny model's backward pass ~100x slower with two threads. Same thread count in both places also
keeps the head-off parity test bit-exact.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    GROUND_TEMPLATE,
    QWEN_FAMILIES,
    one_torch_thread,
    read_jsonl,
    run_cli,
    train_config,
    train_in_process,
    write_yaml,
)
from llamafactory_vision.grounding.bbox_head import (
    HEAD_CONFIG,
    HEAD_WEIGHTS,
    BBoxHead,
    BBoxHeadConfig,
    load_head,
    save_head,
)
from llamafactory_vision.grounding.head_data import BBOX_STAGE, GroundingBBoxCollator
from llamafactory_vision.grounding.templates import load_grounding_specs
from llamafactory_vision.synth import PRESETS, generate_grounding
from PIL import Image
from safetensors.torch import load_file
from torchvision.ops import box_convert, box_iou, generalized_box_iou_loss
from zero3_stand_in import ZeroStage3

FAMILY = "qwen2_vl"  # the family of the in-process trainer and of the CLI runs
CUT_LEN = 150  # on `multi_data`: keeps every prompt whole and cuts the answers of the rows with the most boxes
HEAD_FILES = (HEAD_WEIGHTS, HEAD_CONFIG)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def cli(args: list[str], cwd: Path, check: bool = True, **env: str):
    return run_cli(args, cwd, check=check, OMP_NUM_THREADS="1", **env)


def parse(config: dict[str, Any]) -> tuple:
    """The host's own argument parsing (with our keys and checks), as ``llamafactory-cli train`` does it."""
    from llamafactory.hparams import get_train_args

    return get_train_args({k: str(v) if isinstance(v, Path) else v for k, v in config.items()})


def lm_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k not in ("bbox_spans", "bbox_targets")}


def expected_targets(data_dir: Path, split_file: str) -> list[torch.Tensor]:
    """Per row ``Tensor[K, 4]`` float64: the dataset's pixel boxes as cxcywh normalised by the ORIGINAL image size."""
    targets = []
    for row in read_jsonl(data_dir / split_file):
        assert row["bbox_format"] == "xyxy"
        with Image.open(data_dir / row["images"][0]) as image:
            width, height = image.size
        pixels = torch.tensor([obj["bbox"] for obj in row["objects"]], dtype=torch.float64)
        targets.append(box_convert(pixels / torch.tensor([width, height, width, height]), "xyxy", "cxcywh"))
    return targets


def head_dataset(model: Path, data_dir: Path, template: str, out: Path, **extra):
    """The head's training split built by the host's ``get_dataset`` with our stage; and the tokenizer."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.model import load_tokenizer

    config = train_config(model, data_dir, out, template, bbox_head=True, overwrite_cache=True, **extra)
    model_args, data_args, training_args, _, _ = parse(config)
    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    template_obj = get_template_and_fix_tokenizer(tokenizer, data_args)
    module = get_dataset(template_obj, model_args, data_args, training_args, stage=BBOX_STAGE, **tokenizer_module)
    return module["train_dataset"], tokenizer


class _TrainerBuilt(Exception):
    """Stops ``run_grounding_sft`` right after it built its trainer."""


def workflow_trainer(config: dict[str, Any]):
    """The ``GroundingTrainer`` exactly as ``run_grounding_sft`` wires it (dataset, collator, head, loss weights)."""
    from llamafactory_vision.grounding import workflow

    built = []

    class Capturing(workflow.GroundingTrainer):
        def train(self, *args, **kwargs):
            built.append(self)
            raise _TrainerBuilt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(workflow, "GroundingTrainer", Capturing)
        with pytest.raises(_TrainerBuilt):
            workflow.run_grounding_sft(*parse(config))
    return built[0]


@contextmanager
def random_head(head: BBoxHead, seed: int = 0) -> Iterator[None]:
    """Every head weight drawn at random (the last layer no longer zero), restored on exit. Scaled by 1/sqrt(hidden_size)
    (the fan-in of every layer) so that the sigmoid outputs stay away from saturation."""
    saved = {k: v.clone() for k, v in head.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in head.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) / head.config.hidden_size**0.5)
    try:
        yield
    finally:
        head.load_state_dict(saved)


def grads_of(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def is_zero(grad: torch.Tensor | None) -> bool:
    return grad is None or not grad.any()


def head_state(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / HEAD_WEIGHTS))


def log_steps(output_dir: Path) -> list[dict[str, Any]]:
    """The per-step entries of ``trainer_state.json`` (which, unlike trainer_log.jsonl, keeps our extra keys)."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "loss" in entry]


def eval_steps(output_dir: Path) -> list[dict[str, Any]]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "eval_loss" in entry]


BOX_1000 = re.compile(r"\((\d+),(\d+)\),\((\d+),(\d+)\)")  # a Qwen2-VL label once the box tokens are stripped


def dataset_boxes_1000(data_dir: Path, split_file: str) -> list[torch.Tensor]:
    """Per row ``Tensor[K, 4]`` float64: the dataset's own float boxes (xyxy pixels) in 0-1000 of the image, the
    labels predict scores against (not the label text, rounded to integers)."""
    boxes = []
    for row in read_jsonl(data_dir / split_file):
        assert row["bbox_format"] == "xyxy"
        with Image.open(data_dir / row["images"][0]) as image:
            width, height = image.size
        pixels = torch.tensor([obj["bbox"] for obj in row["objects"]], dtype=torch.float64)
        boxes.append(pixels / torch.tensor([width, height, width, height]) * 1000)
    return boxes


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def multi_data(tmp_path_factory) -> Path:
    """Demo-like scenes with up to 4 smaller objects, so that rows carry several boxes."""
    root = tmp_path_factory.mktemp("multi")
    preset = dataclasses.replace(PRESETS["demo"], max_objects=4, object_side=(0.15, 0.3))
    generate_grounding(root, n=12, seed=5, val_frac=0.25, preset=preset)
    return root


@pytest.fixture(scope="module")
def learn_data(tmp_path_factory) -> Path:
    """Enough demo scenes (one object each) for the tiny model to learn where the object is.

    Each row names its prompt (the template's rec phrasings in turn, by row number): without one, the phrasing is
    picked by a hash of the image's resolved path, so the training text, and with it what the tiny model learns to
    generate, would change with pytest's temporary folder (`pytest-N/popen-gwM/...`) from one session to the next.
    """
    root = tmp_path_factory.mktemp("learn")
    generate_grounding(root, n=420, seed=3, val_frac=0.1, preset="demo")
    phrasings = load_grounding_specs()[GROUND_TEMPLATE[FAMILY]].prompts["rec"]
    for split in ("ground_train.jsonl", "ground_val.jsonl"):
        rows = read_jsonl(root / split)
        lines = [json.dumps({**row, "prompt": phrasings[i % len(phrasings)]}) for i, row in enumerate(rows)]
        (root / split).write_text("\n".join(lines) + "\n")
    return root


# ----------------------------------------------------------------------------------------------------------------
# 1-2. Loss and gradients, in process, on the trainer the workflow builds
# ----------------------------------------------------------------------------------------------------------------

LOSS_SETTINGS = {
    "detr_defaults": ({}, (1.0, 5.0, 2.0)),
    # with the fused head loss (`bbox_fused_loss`): the defaults keep the unfused one
    "custom": (
        {"bbox_loss_weight": 0.7, "bbox_l1_weight": 3.0, "bbox_giou_weight": 1.5, "bbox_fused_loss": True},
        (0.7, 3.0, 1.5),
    ),
}


@pytest.fixture(scope="module")
def build_trainer(tmp_path_factory, tiny_models, multi_data) -> Callable[[str], Any]:
    """``name`` (a key of LOSS_SETTINGS) -> the workflow's LoRA GroundingTrainer with those YAML weights (cached)."""
    built = {}

    def build(name: str):
        if name not in built:
            out = tmp_path_factory.mktemp(f"trainer_{name}")
            config = train_config(
                tiny_models[FAMILY], multi_data, out, GROUND_TEMPLATE[FAMILY], bbox_head=True, cutoff_len=1024,
                eval_dataset="synth_ground_val", overwrite_cache=True, **LOSS_SETTINGS[name][0],
            )  # fmt: skip
            built[name] = workflow_trainer(config)
        return built[name]

    return build


def first_batch(trainer) -> dict[str, torch.Tensor]:
    """Train rows 0-3 (2, 2, 4 and 1 boxes) through the trainer's collator."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["bbox_spans"].shape == (4, 4, 2)
    assert (batch["bbox_spans"][..., 0] >= 0).sum(dim=1).tolist() == [2, 2, 4, 1]
    return batch


@pytest.mark.parametrize("setting", list(LOSS_SETTINGS))
def test_loss_is_lm_loss_plus_weighted_l1_and_giou(build_trainer, setting):
    trainer = build_trainer(setting)
    weight, l1_weight, giou_weight = LOSS_SETTINGS[setting][1]
    assert trainer.bbox_loss.fused == LOSS_SETTINGS[setting][0].get("bbox_fused_loss", False)  # the YAML key arrives
    model = trainer.model
    model.train()
    batch = first_batch(trainer)
    before = {k: v.clone() for k, v in batch.items()}

    with random_head(model.bbox_head):  # predictions that vary per box, so both terms are really exercised
        trainer.log({"loss": 0.0})  # flush metrics stored by earlier calls
        loss = trainer.compute_loss(model, batch)
        trainer.log({"loss": loss.item()})
        logged = trainer.state.log_history[-1]

        outputs = model(**lm_inputs(batch), output_hidden_states=True)
        rows, slots = (batch["bbox_spans"][..., 0] >= 0).nonzero(as_tuple=True)
        anchors = batch["bbox_spans"][rows, slots, 0]  # bbox_head_source: box_start
        pred = model.bbox_head(outputs.hidden_states[-1][rows, anchors])
        target = batch["bbox_targets"][rows, slots]
        l1 = (pred - target).abs().sum(dim=-1).mean()
        giou = generalized_box_iou_loss(
            box_convert(pred, "cxcywh", "xyxy"), box_convert(target, "cxcywh", "xyxy"), reduction="mean"
        )
        expected = outputs.loss + weight * (l1_weight * l1 + giou_weight * giou)

    assert len(rows) == 9
    assert pred.std(dim=0).min() > 1e-3  # the random head does not predict one box for all
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert logged["lm_loss"] == pytest.approx(outputs.loss.item(), abs=1e-4)
    assert logged["bbox_l1"] == pytest.approx(l1.item(), abs=1e-4)
    assert logged["bbox_giou"] == pytest.approx(giou.item(), abs=1e-4)

    assert batch.keys() == before.keys()  # the caller's batch is not changed
    for key, value in before.items():
        assert torch.equal(batch[key], value), key


def test_gradients_reach_head_and_lora(build_trainer):
    trainer = build_trainer("detr_defaults")
    model = trainer.model
    head = model.bbox_head
    model.train()
    batch = first_batch(trainer)

    optimized = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert all(p.requires_grad and id(p) in optimized for p in head.parameters())
    assert not any("lora" in name for name, _ in head.named_modules())  # `lora_target: all` left the head alone
    lora_b = [n for n, p in model.named_parameters() if "lora_B" in n and p.requires_grad]
    assert lora_b

    predictions = []
    hook = head.register_forward_hook(lambda module, args, output: predictions.append(output.detach()))
    try:
        total = grads_of(model, lambda: trainer.compute_loss(model, batch))
    finally:
        hook.remove()
    lm_only = grads_of(model, lambda: model(**lm_inputs(batch)).loss)

    # Zero-initialised last layer: the first prediction is the centred box, only that layer gets a gradient, and
    # the LM's gradients are exactly those of the LM loss alone.
    (first,) = predictions
    assert first.shape == (9, 4) and torch.equal(first, torch.full_like(first, 0.5))
    last = head.config.num_layers - 1
    for name, grad in total.items():
        if name.startswith("bbox_head."):
            assert is_zero(grad) != name.startswith(f"bbox_head.bbox_fc{last}."), name
    for name in lora_b:
        assert not is_zero(total[name]), name
        torch.testing.assert_close(total[name], lm_only[name])

    # Once the head is no longer zero, its loss flows back into every LoRA layer.
    with random_head(head, seed=1):
        total = grads_of(model, lambda: trainer.compute_loss(model, batch))
    assert all(not is_zero(total[f"bbox_head.bbox_fc{i}.weight"]) for i in range(head.config.num_layers))
    for name in lora_b:
        assert (total[name] - lm_only[name]).abs().max() > 1e-6 * lm_only[name].abs().max(), name


def test_fused_loss_trains_like_the_unfused_one(build_trainer):
    """``bbox_fused_loss``: the same SGD steps from the same weights, on the workflow's trainer, with the fused loss
    and with the unfused one give the same losses, logged terms and weights (head and LoRA), up to float rounding."""
    trainer = build_trainer("custom")
    model = trainer.model
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    batches = [trainer.data_collator([trainer.train_dataset[i] for i in rows]) for rows in ((0, 1), (2, 3), (4, 5))]

    def train(fused: bool) -> tuple[list[float], list[dict], dict[str, torch.Tensor]]:
        trainer.bbox_loss = dataclasses.replace(trainer.bbox_loss, fused=fused)
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(start[name])
        optimizer = torch.optim.SGD(trainable.values(), lr=0.5)
        losses, logged = [], []
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            trainer._metric_sums.clear()
            loss = trainer.compute_loss(model, batch)
            loss.backward()
            optimizer.step()
            trainer.log({"loss": loss.item()})
            losses.append(loss.item())
            logged.append(trainer.state.log_history[-1])
        return losses, logged, {n: p.detach().clone() for n, p in trainable.items()}

    fused_config = trainer.bbox_loss
    with random_head(model.bbox_head, seed=2):
        start = {n: p.detach().clone() for n, p in trainable.items()}
        try:
            fused, unfused = train(fused=True), train(fused=False)
        finally:
            trainer.bbox_loss = fused_config
            with torch.no_grad():
                for name, param in trainable.items():
                    param.copy_(start[name])

    assert len(set(fused[0])) == 3  # the steps train: three different losses
    assert fused[0] == pytest.approx(unfused[0], rel=1e-5, abs=1e-6)
    for ours, plain in zip(fused[1], unfused[1]):
        for key in ("lm_loss", "bbox_l1", "bbox_giou"):
            assert ours[key] == pytest.approx(plain[key], abs=2e-4), key
    assert not torch.equal(fused[2]["bbox_head.bbox_fc0.weight"], start["bbox_head.bbox_fc0.weight"])
    # float32 rounding differs between the two losses and grows over 3 steps at lr 0.5: tolerance relative to each
    # tensor's largest weight, as in test_accumulated_gradients_equal_one_batch (a wrong gradient is off by far more)
    for name, weight in unfused[2].items():
        scale = float(weight.abs().max())
        torch.testing.assert_close(
            fused[2][name], weight, rtol=1e-4, atol=1e-5 * scale + 1e-12, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_evaluation_during_training_reports_head_metrics(build_trainer):
    trainer = build_trainer("detr_defaults")
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0
    assert {"eval_lm_loss", "eval_bbox_l1", "eval_bbox_giou"} <= set(trainer.state.log_history[-1])


# ----------------------------------------------------------------------------------------------------------------
# 3. Targets and anchor tokens per family
# ----------------------------------------------------------------------------------------------------------------


def assert_anchors(family: str, tokenizer, ids: list[int], label_start: int, spans: list[list[int]]) -> list[str]:
    """Check each ``(open, close)`` names the tokens that open/close box k; return each box's inner text."""
    inner_texts = []
    previous_close = label_start - 1
    for k, (open_, close) in enumerate(spans):
        assert previous_close < open_ < close < len(ids), spans
        previous_close = close
        inner = tokenizer.decode(ids[open_ + 1 : close])
        if family == "qwen2_vl":
            box_start, box_end = tokenizer.convert_tokens_to_ids(["<|box_start|>", "<|box_end|>"])
            assert ids[open_] == box_start and ids[close] == box_end
            assert ids[label_start:open_].count(box_start) == k
        else:  # JSON: the token holding the `[` after "bbox_2d": and the token holding the closing `]`
            opener = re.compile(r'"bbox_2d":\s*\[')
            assert len(opener.findall(tokenizer.decode(ids[label_start:open_]))) == k
            assert len(opener.findall(tokenizer.decode(ids[label_start : open_ + 1]))) == k + 1
            assert "]" not in inner and "]" in tokenizer.decode(ids[open_ + 1 : close + 1])
        inner_texts.append(inner)
    return inner_texts


ANCHOR_CASES = [(family, "native") for family in QWEN_FAMILIES] + [("qwen2_5_vl", "compact")]


@pytest.mark.parametrize("family,style", ANCHOR_CASES)
def test_anchor_spans_and_targets(family, style, tiny_models, multi_data, tmp_path):
    """The head finds every box in the answer text, in the native style (Qwen2.5/3-VL: fenced JSON, one object per
    line) and the compact one."""
    template, extra = GROUND_TEMPLATE[family], {"ground_answer_style": style}
    full, tokenizer = head_dataset(tiny_models[family], multi_data, template, tmp_path / "a", cutoff_len=1024, **extra)
    cut, _ = head_dataset(tiny_models[family], multi_data, template, tmp_path / "b", cutoff_len=CUT_LEN, **extra)
    targets = expected_targets(multi_data, "ground_train.jsonl")
    assert len(full) == len(cut) == len(targets)
    assert max(len(t) for t in targets) >= 3

    for row, target in zip(full, targets):
        ids, labels = row["input_ids"], row["labels"]
        label_start = next(i for i, label in enumerate(labels) if label != -100)
        inner_texts = assert_anchors(family, tokenizer, ids, label_start, row["bbox_spans"])
        assert len(row["bbox_spans"]) == len(target) and row["bbox_cut"] == 0
        torch.testing.assert_close(torch.tensor(row["bbox_targets"], dtype=torch.float64), target, rtol=0, atol=1e-12)
        if family != "qwen2_5_vl":  # 0-1000 of the image: span k holds box k, in the row's order
            written = torch.tensor([[float(v) for v in re.findall(r"\d+", text)] for text in inner_texts])
            torch.testing.assert_close(
                written / 1000, box_convert(target, "cxcywh", "xyxy").float(), rtol=0, atol=6e-4
            )

    # A short cutoff_len keeps the prompt and cuts the answer: boxes past the cut lose their span and target.
    for whole, short in zip(full, cut):
        label_start = next(i for i, label in enumerate(short["labels"]) if label != -100)
        assert short["input_ids"][:label_start] == whole["input_ids"][:label_start]
        kept = len(short["bbox_spans"])
        assert short["bbox_spans"] == whole["bbox_spans"][:kept]
        assert short["bbox_targets"] == whole["bbox_targets"][:kept]
        assert short["bbox_cut"] == len(whole["bbox_spans"]) - kept
        assert all(close < len(short["input_ids"]) for _, close in short["bbox_spans"])
    assert any(0 < len(s["bbox_spans"]) < len(w["bbox_spans"]) for w, s in zip(full, cut))
    assert sum(cut["bbox_cut"]) > 0


def test_train_on_prompt_is_refused_with_the_head(tiny_models, varied_data, tmp_path):
    """A `reg` row's region box sits in the prompt: with train_on_prompt it would be labelled without a target."""
    config = {"train_on_prompt": True, "image_max_pixels": 56 * 56, "cutoff_len": 1024}
    with pytest.raises(ValueError, match="train_on_prompt"):
        head_dataset(tiny_models[FAMILY], varied_data, GROUND_TEMPLATE[FAMILY], tmp_path, **config)


# ----------------------------------------------------------------------------------------------------------------
# 4. Save and load
# ----------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    head = BBoxHead(BBoxHeadConfig(hidden_size=32, num_layers=2, source="box_end"))
    with random_head(head):
        save_head(head, tmp_path / "h")
        loaded = load_head(tmp_path / "h")
        hidden = torch.randn(5, 7, 32, generator=torch.Generator().manual_seed(0))
        assert loaded.config == head.config
        assert set(load_file(str(tmp_path / "h" / HEAD_WEIGHTS))) == {
            f"bbox_fc{i}.{p}" for i in (0, 1) for p in ("weight", "bias")
        }
        assert torch.equal(loaded(hidden), head(hidden))
        assert loaded(hidden).shape == (5, 7, 4)
    with pytest.raises(FileNotFoundError, match=HEAD_WEIGHTS):
        load_head(tmp_path)


def test_head_rows_pack_round_trip_and_repeats():
    from llamafactory_vision.grounding.head_rows import PredictRow, first_occurrences, pack_head_rows, unpack_head_rows

    boxes = [[{"xyxy_1000": [1, 2, 300, 400], "xyxy_model": [0.5, 1.25, 84.0, 112.5]}], [],
             [{"xyxy_1000": [0, 0, 1000, 1000], "xyxy_model": [0.0, 0.0, 56.0, 56.0]},
              {"xyxy_1000": [10, 20, 30, 40], "xyxy_model": [1.5, 2.5, 3.5, 4.5]}]]  # fmt: skip
    labels = [[(0.1015, 0.203, 0.4985, 0.796)], None, [(0.05, 0.1, 0.25, 0.5), (0.6, 0.4, 0.9, 0.9)]]
    rows = [PredictRow(7, boxes[0], (84, 112), labels[0]), PredictRow(8, boxes[1], (56, 56), labels[1]),
            PredictRow(9, boxes[2], (56, 56), labels[2]), PredictRow(10, None, (28, 56), [])]  # fmt: skip
    packed = pack_head_rows(rows)
    assert packed.shape == (4, 5 + 8 * 2 + 4 * 2) and packed.dtype == torch.float64
    padded = torch.cat([packed, torch.full((4, 8), -100.0, dtype=torch.float64)], dim=1)  # as pad_across_processes
    assert unpack_head_rows(padded) == rows  # label floats come back exactly; None (head failed / unknown) stays None
    # the gather of an uneven split: rows 3 and 4 come back as the sampler's repeats of rows 0 and 1
    seen: set[int] = set()
    assert first_occurrences([0, 1, 2, 3], seen) == [0, 1, 2, 3]
    assert first_occurrences([4, 0, 1, -1], seen) == [0, 3]


class _StubModel(torch.nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.embed = torch.nn.Embedding(10, hidden_size)
        self.device = torch.device("cpu")

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed


def test_saved_head_settings_conflicting_with_yaml_are_refused(tmp_path):
    from types import SimpleNamespace

    from llamafactory_vision.grounding.bbox_head import attach_head

    saved = BBoxHead(BBoxHeadConfig(hidden_size=32, num_layers=2, source="box_end"))
    with random_head(saved):
        save_head(saved, tmp_path)
        expected = {k: v.clone() for k, v in saved.state_dict().items()}
    model_args = SimpleNamespace(adapter_name_or_path=None, model_name_or_path=str(tmp_path))
    for layers, source, message in [
        (3, None, "bbox_head_layers: 3 in the YAML, 2 in the saved head"),
        (None, "box_start", "bbox_head_source: 'box_start' in the YAML, 'box_end' in the saved head"),
    ]:
        finetuning_args = SimpleNamespace(bbox_head_layers=layers, bbox_head_source=source)
        with pytest.raises(ValueError, match=re.escape(message)):
            attach_head(_StubModel(32), model_args, finetuning_args, is_trainable=True)
    for layers, source in [(None, None), (2, "box_end")]:  # unset, or set to the saved values: the saved head
        model = _StubModel(32)
        finetuning_args = SimpleNamespace(bbox_head_layers=layers, bbox_head_source=source)
        head = attach_head(model, model_args, finetuning_args, is_trainable=True)
        assert model.bbox_head is head and head.config == saved.config
        assert all(torch.equal(head.state_dict()[k], v) for k, v in expected.items())


def test_zero3_partitioned_head_is_saved_gathered(tmp_path, monkeypatch):
    head = BBoxHead(BBoxHeadConfig(hidden_size=32, num_layers=2))
    with random_head(head):
        expected = {k: v.clone() for k, v in head.state_dict().items()}
        stage = ZeroStage3(head)
        stage.install(monkeypatch)
        try:
            with pytest.raises(ValueError, match="are empty: gather them"):  # what saving state_dict() would write
                save_head(head, tmp_path / "raw", state=head.state_dict())
            save_head(head, tmp_path / "gathered")
            assert len(stage.gathered) == 1 and len(stage.gathered[0]) == 4  # every weight, in one gather
        finally:
            stage.restore()
    saved = load_file(str(tmp_path / "gathered" / HEAD_WEIGHTS))
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], v) for k, v in expected.items())


def test_zero3_trainer_save_model_gathers_head_on_every_rank(build_trainer, tmp_path, monkeypatch):
    """``save_model`` runs on every rank (``_save`` on the main one only): the gather happens there."""
    trainer = build_trainer("detr_defaults")
    head = trainer.model.bbox_head
    with random_head(head, seed=4):
        expected = {k: v.clone() for k, v in head.state_dict().items()}
        stage = ZeroStage3(head)
        stage.install(monkeypatch)
        try:
            trainer.save_model(str(tmp_path / "ckpt"))
        finally:
            stage.restore()
    assert len(stage.gathered) == 1
    saved = head_state(tmp_path / "ckpt")
    assert all(torch.equal(saved[k], v) for k, v in expected.items())
    assert not any("bbox" in k for k in load_file(str(tmp_path / "ckpt" / "adapter_model.safetensors")))


def test_load_best_model_restores_its_head(build_trainer, tmp_path):
    """``load_best_model_at_end``: the best checkpoint's head comes back with its adapter, not the last one's."""
    trainer = build_trainer("detr_defaults")
    head = trainer.model.bbox_head
    with random_head(head, seed=5):
        best = {k: v.clone() for k, v in head.state_dict().items()}
        trainer.save_model(str(tmp_path / "checkpoint-1"))
    with random_head(head, seed=6):  # the last step's head
        trainer.state.best_model_checkpoint = str(tmp_path / "checkpoint-1")
        trainer._load_best_model()
        restored = {k: v.clone() for k, v in head.state_dict().items()}
    assert all(torch.equal(restored[k], v) for k, v in best.items())


def test_generated_vision_tokens_do_not_break_head_predict(build_trainer):
    """A model may generate <|vision_start|><|image_pad|>: the head's forward pass must not read them as an image."""
    trainer = build_trainer("detr_defaults")
    model, tokenizer = trainer.model, trainer.processing_class
    model.eval()
    row = trainer.train_dataset[0]
    prompt_len = next(i for i, label in enumerate(row["labels"]) if label != -100)
    feature = {k: v for k, v in row.items() if k not in ("bbox_spans", "bbox_targets", "bbox_cut")}
    feature = {**feature, "input_ids": row["input_ids"][:prompt_len], "attention_mask": [1] * prompt_len,
               "labels": row["labels"][:prompt_len]}  # fmt: skip
    # as the predict collator gives them (built without the model: no precomputed M-RoPE positions)
    batch = trainer.data_collator([feature])
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "position_ids", "rope_deltas")}
    answer = "<|vision_start|><|image_pad|><|vision_end|>the green circle<|box_start|>(100,200),(300,400)<|box_end|>"
    new_tokens = torch.tensor([tokenizer.encode(answer, add_special_tokens=False)])
    assert (new_tokens == model.config.image_token_id).any()
    generated = torch.cat([inputs["input_ids"], new_tokens], dim=1)
    with random_head(model.bbox_head):
        (boxes,) = trainer._head_boxes(model, inputs, generated)
    assert len(boxes) == 1 and all(0 <= v <= 1000 for v in boxes[0]["xyxy_1000"])


@dataclass(frozen=True)
class Run:
    config: dict[str, Any]
    output_dir: Path
    log: str  # stdout + stderr


def train_run(work: Path, config: dict[str, Any]) -> Run:
    result = cli(["llamafactory-cli", "train", str(write_yaml(work / "train.yaml", config))], work)
    return Run(config, Path(config["output_dir"]), result.stdout + result.stderr)


@pytest.fixture(scope="module")
def lora_head_run(tmp_path_factory, tiny_models, multi_data) -> Run:
    """LoRA + head, 2 steps, a checkpoint per step, on multi-box rows whose cutoff_len cuts some boxes."""
    work = tmp_path_factory.mktemp("lora_head")
    config = train_config(
        tiny_models[FAMILY], multi_data, work / "out", GROUND_TEMPLATE[FAMILY], bbox_head=True, cutoff_len=CUT_LEN,
        save_strategy="steps", save_steps=1,
    )  # fmt: skip
    return train_run(work, config)


@pytest.fixture(scope="module")
def nohead_run(tmp_path_factory, tiny_models, demo_data) -> Run:
    """LoRA with a grounding template and `bbox_head: false`."""
    work = tmp_path_factory.mktemp("nohead")
    config = train_config(tiny_models[FAMILY], demo_data, work / "out", GROUND_TEMPLATE[FAMILY], bbox_head=False)
    return train_run(work, config)


def predict_config(run: Run, data_dir: Path, output_dir: Path, **model) -> dict[str, Any]:
    """A predict config for `run`'s model on `data_dir`'s val set; `model` adds or overrides keys."""
    config = train_config(
        run.config["model_name_or_path"], data_dir, output_dir, GROUND_TEMPLATE[FAMILY], do_train=False,
        do_predict=True, predict_with_generate=True, eval_dataset="synth_ground_val", bbox_head=True,
        **{"max_new_tokens": 40, "per_device_eval_batch_size": 8, **model},
    )  # fmt: skip
    del config["dataset"]
    return config


@pytest.mark.e2e
def test_lora_run_saves_head_beside_adapter_and_checkpoints(lora_head_run, tiny_models):
    run = lora_head_run
    hidden_size = json.loads((tiny_models[FAMILY] / "config.json").read_text())["text_config"]["hidden_size"]
    for directory in (run.output_dir, run.output_dir / "checkpoint-1", run.output_dir / "checkpoint-2"):
        assert all((directory / name).is_file() for name in HEAD_FILES), directory
        assert json.loads((directory / HEAD_CONFIG).read_text()) == {
            "hidden_size": hidden_size, "num_layers": 3, "source": "box_start"
        }  # fmt: skip
        assert not any("bbox" in key for key in load_file(str(directory / "adapter_model.safetensors")))
    first, final = head_state(run.output_dir / "checkpoint-1"), head_state(run.output_dir)
    assert first["bbox_fc2.weight"].any()  # trained away from its zero start
    assert not torch.equal(first["bbox_fc2.weight"], final["bbox_fc2.weight"])
    for key, value in head_state(run.output_dir / "checkpoint-2").items():
        assert torch.equal(value, final[key])

    # One line says which head was attached, and the host's parameter count grows by the head's.
    head_params = 2 * (hidden_size * hidden_size + hidden_size) + 4 * hidden_size + 4
    attached = re.search(
        r"bbox head attached \(new \(last layer zero-initialised\)\): bbox_head_layers=3, bbox_head_source=box_start, "
        rf"hidden_size={hidden_size}, {head_params:,} params, trainable\. With the head: trainable params: ([\d,]+)",
        run.log,
    )
    host = re.search(r"trainable params: ([\d,]+) \|\| all params", run.log)  # the host's line comes first
    assert attached and host, run.log[-3000:]
    assert int(attached.group(1).replace(",", "")) == int(host.group(1).replace(",", "")) + head_params

    steps = log_steps(run.output_dir)
    assert [entry["step"] for entry in steps] == [1, 2]
    for entry in steps:  # logged beside `loss`, rounded to 4 decimals; DETR weights by default
        assert entry["loss"] == pytest.approx(
            entry["lm_loss"] + 5 * entry["bbox_l1"] + 2 * entry["bbox_giou"], abs=1e-3
        )


@pytest.mark.e2e
def test_cut_boxes_are_reported(lora_head_run, tiny_models, multi_data, tmp_path):
    dataset, _ = head_dataset(tiny_models[FAMILY], multi_data, GROUND_TEMPLATE[FAMILY], tmp_path, cutoff_len=CUT_LEN)
    cut = sum(dataset["bbox_cut"])
    assert cut > 0
    match = re.search(r"bbox head: (\d+) box\(es\) in the train_dataset split were cut off", lora_head_run.log)
    assert match, lora_head_run.log[-3000:]
    assert int(match.group(1)) == cut


@pytest.mark.e2e
def test_predict_loads_the_adapters_head(lora_head_run, multi_data, tmp_path):
    from llamafactory.model import load_model, load_tokenizer
    from llamafactory_vision.grounding.bbox_head import attach_head

    config = predict_config(
        lora_head_run, multi_data, tmp_path / "pred", adapter_name_or_path=lora_head_run.output_dir
    )
    cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "predict.yaml", config))], tmp_path)

    val_rows = read_jsonl(multi_data / "ground_val.jsonl")
    predictions = read_jsonl(tmp_path / "pred" / "generated_predictions.jsonl")
    assert len(predictions) == len(val_rows)
    for prediction in predictions:
        assert isinstance(prediction["predict_boxes_head"], list)
        for box in prediction["predict_boxes_head"]:
            assert len(box["xyxy_1000"]) == 4 and all(isinstance(v, int) and 0 <= v <= 1000 for v in box["xyxy_1000"])
            assert len(box["xyxy_model"]) == 4
    results = json.loads((tmp_path / "pred" / "predict_results.json").read_text())
    # rec rows (one label box) and detect-style rows (several: matched) together score every label box
    one_box = sum(len(row["objects"]) == 1 for row in val_rows)
    assert results["predict_head_n"] == one_box
    assert results["predict_head_detect_n"] == sum(len(row["objects"]) for row in val_rows) - one_box
    assert 0.0 <= results["predict_head_acc@0.5"] <= 1.0 and 0.0 <= results["predict_head_miou"] <= 1.0
    if not any(p["predict_boxes_head"] for p in predictions):  # a 2-step model may write no box at all
        assert results["predict_head_miou"] == results["predict_head_acc@0.5"] == 0.0

    # The head predict uses is the one saved beside the adapter, frozen.
    model_args, _, _, finetuning_args, _ = parse(config)
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    model = load_model(tokenizer, model_args, finetuning_args, is_trainable=False)
    head = attach_head(model, model_args, finetuning_args, is_trainable=False)
    assert model.bbox_head is head and not any(p.requires_grad for p in head.parameters())
    for key, value in head_state(lora_head_run.output_dir).items():
        assert torch.equal(head.state_dict()[key], value), key


@pytest.mark.e2e
def test_predict_with_head_on_adapter_without_one_fails(nohead_run, demo_data, tmp_path):
    assert not (nohead_run.output_dir / HEAD_WEIGHTS).exists()
    config = predict_config(nohead_run, demo_data, tmp_path / "pred", adapter_name_or_path=nohead_run.output_dir)
    result = cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "p.yaml", config))], tmp_path, check=False)
    assert result.returncode != 0
    assert f"{nohead_run.output_dir} has no {HEAD_WEIGHTS}" in result.stderr
    assert not (tmp_path / "pred" / "generated_predictions.jsonl").exists()


@pytest.mark.e2e
def test_export_puts_head_beside_merged_model(lora_head_run, tiny_models, tmp_path):
    config = {
        "model_name_or_path": tiny_models[FAMILY], "adapter_name_or_path": lora_head_run.output_dir,
        "template": GROUND_TEMPLATE[FAMILY], "finetuning_type": "lora", "export_dir": tmp_path / "merged",
        "bbox_head": True,
    }  # fmt: skip
    cli(["llamafactory-cli", "export", str(write_yaml(tmp_path / "export.yaml", config))], tmp_path)
    merged = tmp_path / "merged"
    for name in HEAD_FILES:
        assert (merged / name).read_bytes() == (lora_head_run.output_dir / name).read_bytes(), name
    base_keys = set(load_file(str(tiny_models[FAMILY] / "model.safetensors")))
    assert set(load_file(str(merged / "model.safetensors"))) == base_keys  # merged, and no bbox_head keys


@pytest.mark.e2e
def test_resume_restores_head(lora_head_run, tmp_path):
    original = lora_head_run
    config = {**original.config, "output_dir": tmp_path / "resumed", "save_strategy": "no",
              "resume_from_checkpoint": original.output_dir / "checkpoint-1"}  # fmt: skip
    del config["save_steps"]
    resumed = train_run(tmp_path, config)

    # Step 2 from checkpoint-1 repeats the original step 2 only if the head came back with the LoRA weights.
    (original_step2,) = [e for e in log_steps(original.output_dir) if e["step"] == 2]
    (resumed_step2,) = [e for e in log_steps(resumed.output_dir) if e["step"] == 2]
    for key in ("loss", "lm_loss", "bbox_l1", "bbox_giou"):
        assert resumed_step2[key] == original_step2[key], key
    final, restored = head_state(original.output_dir), head_state(resumed.output_dir)
    assert final.keys() == restored.keys()
    for key in final:
        torch.testing.assert_close(restored[key], final[key], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# 5. Start-up errors
# ----------------------------------------------------------------------------------------------------------------

BAD_VALUES = [
    ("bbox_head_layers", 0),
    ("bbox_head_source", "foo"),
    ("bbox_loss_weight", -1.0),
    ("bbox_l1_weight", -0.5),
    ("bbox_giou_weight", -2.0),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_bad_head_values_are_rejected(key, value, tiny_models, demo_data, tmp_path):
    config = train_config(tiny_models[FAMILY], demo_data, tmp_path, GROUND_TEMPLATE[FAMILY], bbox_head=True)
    with pytest.raises(ValueError, match=f"`{key}`") as error:
        parse({**config, key: value})
    assert repr(value) in str(error.value) or str(value) in str(error.value)


STARTUP_ERRORS = {
    "stock_template": ({"template": "qwen2_vl"}, ["`bbox_head: true` needs a grounding template", "'qwen2_vl'"]),
    "packing": ({"packing": True}, ["`bbox_head: true` does not support `packing`"]),
    "head_layers": ({"bbox_head_layers": 0}, ["`bbox_head_layers` must be >= 1, got 0"]),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(STARTUP_ERRORS))
def test_cli_refuses_bad_head_settings(case, tiny_models, demo_data, tmp_path):
    extra, messages = STARTUP_ERRORS[case]
    config = {**train_config(tiny_models[FAMILY], demo_data, tmp_path / "out", GROUND_TEMPLATE[FAMILY]),
              "bbox_head": True, **extra}  # fmt: skip
    result = cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "bad.yaml", config))], tmp_path, check=False)
    assert result.returncode != 0
    for message in messages:
        assert message in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_head_with_eval_on_each_dataset(tiny_models, multi_data, tmp_path):
    from llamafactory.train.tuner import run_exp

    config = train_config(
        tiny_models[FAMILY], multi_data, tmp_path / "out", GROUND_TEMPLATE[FAMILY], bbox_head=True, max_steps=1,
        eval_dataset="synth_ground_val", eval_on_each_dataset=True, eval_strategy="steps", eval_steps=1,
    )  # fmt: skip
    run_exp({k: str(v) if isinstance(v, Path) else v for k, v in config.items()})
    assert (tmp_path / "out" / HEAD_WEIGHTS).is_file()
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    (evaluation,) = [entry for entry in history if "eval_synth_ground_val_loss" in entry]
    prefix = "eval_synth_ground_val_"  # the head's figures carry the dataset's own prefix
    assert {f"{prefix}lm_loss", f"{prefix}bbox_l1", f"{prefix}bbox_giou"} <= evaluation.keys()


def test_streaming_trains_the_head(tiny_models, demo_data, tmp_path):
    from llamafactory.train.tuner import run_exp

    # the host shards a streamed local file into `dataloader_num_workers` shards (0 shards: no rows)
    config = train_config(tiny_models[FAMILY], demo_data, tmp_path / "out", GROUND_TEMPLATE[FAMILY], bbox_head=True,
                          streaming=True, dataloader_num_workers=1, overwrite_cache=True)  # fmt: skip
    run_exp({k: str(v) if isinstance(v, Path) else v for k, v in config.items()})
    steps = log_steps(tmp_path / "out")
    assert [entry["step"] for entry in steps] == [1, 2]
    assert all({"lm_loss", "bbox_l1", "bbox_giou"} <= entry.keys() for entry in steps)
    assert head_state(tmp_path / "out")["bbox_fc2.weight"].any()


def test_tokenized_path_without_box_columns_is_refused(tiny_models, demo_data, tmp_path):
    """A dataset tokenized by stock SFT (head off) and reloaded from tokenized_path has no box targets."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.model import load_tokenizer
    from llamafactory_vision.grounding import workflow

    tokenized = tmp_path / "tokenized"
    config = train_config(tiny_models[FAMILY], demo_data, tmp_path / "out", GROUND_TEMPLATE[FAMILY],
                          tokenized_path=tokenized, overwrite_cache=True)  # fmt: skip
    model_args, data_args, training_args, _, _ = parse(config)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    assert (tokenized / "dataset_dict.json").is_file()

    with pytest.raises(ValueError, match="has no bbox_spans, bbox_targets, bbox_cut column") as error:
        workflow.run_grounding_sft(*parse({**config, "bbox_head": True}))
    assert f"tokenized_path: {tokenized}" in str(error.value) and "bbox_head: true" in str(error.value)


# ----------------------------------------------------------------------------------------------------------------
# 6. Head off: exactly the host's training
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_head_off_trains_exactly_like_host(nohead_run, tmp_path):
    from llamafactory.train.callbacks import LogCallback
    from llamafactory.train.sft.workflow import run_sft  # the host's own, untouched by our dispatch

    host_dir = tmp_path / "host"
    run_sft(*parse({**nohead_run.config, "output_dir": host_dir}), callbacks=[LogCallback()])

    ours = [entry["loss"] for entry in read_jsonl(nohead_run.output_dir / "trainer_log.jsonl") if "loss" in entry]
    host = [entry["loss"] for entry in read_jsonl(host_dir / "trainer_log.jsonl") if "loss" in entry]
    assert len(ours) == nohead_run.config["max_steps"]
    assert ours == host  # bit-identical
    ours_adapter = load_file(str(nohead_run.output_dir / "adapter_model.safetensors"))
    host_adapter = load_file(str(host_dir / "adapter_model.safetensors"))
    assert ours_adapter.keys() == host_adapter.keys()
    assert all(torch.equal(ours_adapter[k], host_adapter[k]) for k in ours_adapter)
    assert not any((nohead_run.output_dir / name).exists() for name in HEAD_FILES)


# ----------------------------------------------------------------------------------------------------------------
# 7. The head learns (full fine-tuning)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def learn_run(tmp_path_factory, tiny_models, learn_data) -> Run:
    """Full fine-tuning, 400 steps of 8 rows, the bbox loss dominant (~25 s on CPU)."""
    work = tmp_path_factory.mktemp("learn_run")
    config = train_config(
        tiny_models[FAMILY], learn_data, work / "out", GROUND_TEMPLATE[FAMILY], finetuning_type="full",
        per_device_train_batch_size=8, max_steps=400, learning_rate=2.0e-3, lr_scheduler_type="constant",
        logging_steps=20, bbox_head=True, bbox_loss_weight=5.0,
    )  # fmt: skip
    del config["lora_target"]
    return train_run(work, config)


# Greedy predict settings for the `learn_run` model. A right answer takes 25 tokens, but the tiny model writes ~40
# digits and commas between <|box_start|> and <|box_end|>: with 40 new tokens, whether <|box_end|> fits (and so whether
# a row gets a head box) flipped with the training trajectory (2 or 3 rows of 42 in some runs, 37-40 in others).
LEARN_PREDICT = {"finetuning_type": "full", "do_sample": False, "max_new_tokens": 96}
MIN_HEAD_ROWS = 35  # of the 42 val rows; 42 measured on models trained from either mode above


def teacher_forced_head_boxes(run: Run, data_dir: Path, out: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward the val rows with their labels through the trained model; returns xyxy ``Tensor[N, 4]`` of the trained
    head and of a fresh (zero-initialised) head at the box_start anchors, and the targets."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.extras.constants import IGNORE_INDEX
    from llamafactory.model import load_model, load_tokenizer
    from llamafactory_vision.grounding.bbox_head import attach_head

    config = train_config(run.output_dir, data_dir, out, GROUND_TEMPLATE[FAMILY], finetuning_type="full",
                          dataset="synth_ground_val", bbox_head=True, overwrite_cache=True)  # fmt: skip
    model_args, data_args, training_args, finetuning_args, _ = parse(config)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    dataset = get_dataset(template, model_args, data_args, training_args, stage=BBOX_STAGE, **tokenizer_module)
    model = load_model(tokenizer_module["tokenizer"], model_args, finetuning_args, is_trainable=False)
    head = attach_head(model, model_args, finetuning_args, is_trainable=False)  # the trained one, from output_dir
    collator = GroundingBBoxCollator(template=template, model=model, label_pad_token_id=IGNORE_INDEX,
                                     compute_dtype=model_args.compute_dtype, **tokenizer_module)  # fmt: skip
    val = dataset["train_dataset"]
    batch = collator([val[i] for i in range(len(val))])
    fresh = BBoxHead(BBoxHeadConfig(head.config.hidden_size, head.config.num_layers, head.config.source))
    with torch.no_grad():
        hidden = model(**lm_inputs(batch), output_hidden_states=True).hidden_states[-1]
        rows, slots = (batch["bbox_spans"][..., 0] >= 0).nonzero(as_tuple=True)
        at_anchors = hidden[rows, batch["bbox_spans"][rows, slots, 0]]
        trained_boxes, fresh_boxes = (box_convert(h(at_anchors), "cxcywh", "xyxy") for h in (head, fresh))
    return trained_boxes, fresh_boxes, box_convert(batch["bbox_targets"][rows, slots], "cxcywh", "xyxy")


@pytest.mark.e2e
def test_head_learns(learn_run, learn_data, tmp_path):
    steps = log_steps(learn_run.output_dir)
    assert len(steps) == 20
    assert steps[-1]["bbox_l1"] < 0.8 * steps[0]["bbox_l1"]
    assert steps[-1]["lm_loss"] < steps[0]["lm_loss"]

    trained, fresh, target = teacher_forced_head_boxes(learn_run, learn_data, tmp_path / "tf")
    assert len(target) == len(read_jsonl(learn_data / "ground_val.jsonl"))
    trained_miou = box_iou(trained, target).diagonal().mean().item()
    fresh_miou = box_iou(fresh, target).diagonal().mean().item()
    assert trained_miou > fresh_miou + 0.1, (trained_miou, fresh_miou)
    assert (trained - target).abs().sum(-1).mean() < (fresh - target).abs().sum(-1).mean()


@pytest.mark.e2e
def test_full_finetuning_keeps_head_out_of_model_file(learn_run, tiny_models):
    out = learn_run.output_dir
    assert all((out / name).is_file() for name in HEAD_FILES)
    assert set(load_file(str(out / "model.safetensors"))) == set(
        load_file(str(tiny_models[FAMILY] / "model.safetensors"))
    )
    assert head_state(out)["bbox_fc2.weight"].any()


def learn_predict_config(out: Path, learn_run: Run, learn_data: Path) -> dict[str, Any]:
    """Greedy predict (with the head) of the full `learn_run` model on `learn_data`'s 42 val rows, 6 per batch per
    process: 7 batches, so 2 processes get a repeated batch."""
    config = predict_config(learn_run, learn_data, out, per_device_eval_batch_size=6, ddp_timeout=120, **LEARN_PREDICT)
    config["model_name_or_path"] = learn_run.output_dir
    del config["lora_target"]
    return config


@dataclass(frozen=True)
class Predicted:
    rows: list[dict[str, Any]]  # generated_predictions.jsonl
    results: dict[str, Any]  # predict_results.json


def predict_run(work: Path, config: dict[str, Any], processes: int) -> Predicted:
    """Predict with 1 process (in this one: `run_exp`, what the CLI calls) or 2 (`llamafactory-cli`, gloo)."""
    if processes == 1:
        train_in_process(config)
    else:
        cli(["llamafactory-cli", "train", str(write_yaml(work / "predict.yaml", config))], work, FORCE_TORCHRUN="1",
            NPROC_PER_NODE=str(processes))  # fmt: skip
    out = Path(config["output_dir"])
    results = json.loads((out / "predict_results.json").read_text())
    return Predicted(read_jsonl(out / "generated_predictions.jsonl"), results)


@pytest.fixture(scope="module")
def learn_predicted(tmp_path_factory, learn_run, learn_data) -> Predicted:
    """The 1-process predict of `learn_run`: checked on its own and the oracle of the 2-process predict."""
    work = tmp_path_factory.mktemp("learn_predict")
    return predict_run(work, learn_predict_config(work / "pred", learn_run, learn_data), processes=1)


@pytest.mark.e2e
def test_predict_with_full_model_head(learn_predicted, learn_data):
    """Predict reads the head beside the full model and runs it at the boxes the model generates; its metrics are
    recomputed here against the dataset's float boxes, and on the rows with a box it beats the zero-initialised head
    (always the centred box)."""
    predictions, results = learn_predicted.rows, learn_predicted.results
    labels = dataset_boxes_1000(learn_data, "ground_val.jsonl")
    ious, trained, centred = [], [], []
    for prediction in predictions:
        label = labels[prediction["row"]]
        assert label.shape == (1, 4)
        # the label text holds the same box rounded to integers
        assert BOX_1000.search(prediction["label"]).groups() == tuple(str(round(v)) for v in label[0].tolist())
        boxes = [box["xyxy_1000"] for box in prediction["predict_boxes_head"]]
        if not boxes:
            ious.append(0.0)
            continue
        first = box_iou(torch.tensor(boxes[:1], dtype=torch.float64), label).item()  # rec: the first box counts
        ious.append(first)
        trained.append(first)
        centred.append(box_iou(torch.tensor([[250.0, 250.0, 750.0, 750.0]], dtype=torch.float64), label).item())
    assert results["predict_head_n"] == len(predictions)
    assert results["predict_head_miou"] == pytest.approx(sum(ious) / len(ious), abs=1e-9)
    assert results["predict_head_acc@0.5"] == pytest.approx(sum(v >= 0.5 for v in ious) / len(ious), abs=1e-9)
    assert len(trained) >= MIN_HEAD_ROWS, "the trained model wrote (almost) no box"
    assert sum(trained) / len(trained) > sum(centred) / len(centred) + 0.05


# ----------------------------------------------------------------------------------------------------------------
# 8. Gradient accumulation, world size and the host's loss paths
# ----------------------------------------------------------------------------------------------------------------

# Train tasks in row order: with 2 processes and batch 1 (no shuffling), step 1 gives rank 0 a rec row (one box) and
# rank 1 a reg row (no box target: the box is in the prompt); step 2 the other way round.
MIXED_TASKS = ("rec", "reg", "reg", "rec", "rec", "reg")
LOSS_PATHS = {"mean": {}, "dft": {"use_dft_loss": True}, "eaft": {"use_eaft_loss": True}}


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory) -> Path:
    """Demo scenes (one object each), train rows alternating rec and reg as in MIXED_TASKS."""
    root = tmp_path_factory.mktemp("mixed")
    generate_grounding(root, n=8, seed=7, val_frac=0.25, preset="demo")
    rows = read_jsonl(root / "ground_train.jsonl")
    assert len(rows) == len(MIXED_TASKS)
    lines = [json.dumps({**row, "task": task}) for row, task in zip(rows, MIXED_TASKS)]
    (root / "ground_train.jsonl").write_text("\n".join(lines) + "\n")
    return root


def step_grads(trainer, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict]:
    """One optimizer step's gradients as the host's training loop takes them (``get_batch_samples``, then
    ``training_step`` per micro-batch), and what ``log`` then adds."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    trainer._metric_sums.clear()
    trainer.current_gradient_accumulation_steps = len(micro_batches)
    samples, num_items = trainer.get_batch_samples(iter(micro_batches), len(micro_batches), trainer.args.device)
    for batch in samples:
        trainer.training_step(model, batch, num_items)
    trainer.log({"loss": 0.0})
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return grads, trainer.state.log_history[-1]


@pytest.mark.parametrize("path", list(LOSS_PATHS))
def test_accumulated_gradients_equal_one_batch(path, tiny_models, mixed_data, tmp_path):
    """Rows 0 (rec, one box), 1 (reg, no box) and 3 (rec, one box) as 3 accumulated micro-batches vs. one batch.

    With use_dft_loss/use_eaft_loss the host normalises the LM loss over the step's tokens (``num_items_in_batch``):
    the head's must be normalised over the step's boxes, so both runs give the same gradients and logged figures.
    On the host's default path for VLMs each micro-batch's LM loss is its own mean, divided by the accumulation
    steps: the head's must be too, so the step's gradients are the mean of each micro-batch's single-batch ones.
    """
    config = train_config(
        tiny_models[FAMILY], mixed_data, tmp_path, GROUND_TEMPLATE[FAMILY], bbox_head=True, overwrite_cache=True,
        per_device_train_batch_size=1, gradient_accumulation_steps=3, **LOSS_PATHS[path],
    )  # fmt: skip
    trainer = workflow_trainer(config)
    trainer.model.train()
    rows = [trainer.train_dataset[i] for i in (0, 1, 3)]
    assert [len(row["bbox_spans"]) for row in rows] == [1, 0, 1]
    collate = trainer.data_collator
    with random_head(trainer.model.bbox_head):
        accumulated, logged = step_grads(trainer, [collate([row]) for row in rows])
        if path == "mean":
            singles = [step_grads(trainer, [collate([row])]) for row in rows]
            expected = {name: sum(grads[name] for grads, _ in singles) / 3 for name in singles[0][0]}
            expected_log = {"lm_loss": sum(log["lm_loss"] for _, log in singles) / 3}
            for key in ("bbox_l1", "bbox_giou"):  # means over the boxes: rows 0 and 3 have one each
                expected_log[key] = (singles[0][1][key] + singles[2][1][key]) / 2
        else:
            expected, expected_log = step_grads(trainer, [collate(rows)])
    assert expected.keys() == accumulated.keys()
    assert any(name.startswith("bbox_head.bbox_fc0") for name in expected)  # the random head gets gradients
    for name, grad in expected.items():
        # Summation order differs between the runs, so float32 rounding differs by CPU and BLAS: the tolerance is
        # relative to the tensor's largest gradient. A wrong normalisation is off by a factor (1/2 vs 1/3, ...).
        scale = float(grad.abs().max())
        torch.testing.assert_close(
            accumulated[name], grad, rtol=1e-4, atol=1e-5 * scale + 1e-12, msg=lambda m, name=name: f"{name}: {m}"
        )
    for key in ("lm_loss", "bbox_l1", "bbox_giou"):
        assert logged[key] == pytest.approx(expected_log[key], abs=2e-4), key


def test_fused_loss_without_the_head_is_refused(tiny_models, demo_data, tmp_path):
    """`bbox_fused_loss` only changes how the head's loss is computed: asked for without the head, it would silently do
    nothing, so start-up refuses it (the other bbox_* keys have defaults that cannot tell "asked for" from unset)."""
    config = train_config(tiny_models[FAMILY], demo_data, tmp_path, GROUND_TEMPLATE[FAMILY], bbox_fused_loss=True)
    with pytest.raises(ValueError, match=r"`bbox_fused_loss: true` .* needs `bbox_head: true`"):
        parse(config)
    parse({**config, "bbox_head": True})  # accepted with the head


def test_asft_loss_is_refused_with_the_head(tiny_models, demo_data, tmp_path):
    config = train_config(tiny_models[FAMILY], demo_data, tmp_path, GROUND_TEMPLATE[FAMILY], bbox_head=True,
                          use_asft_loss=True)  # fmt: skip
    with pytest.raises(ValueError, match="does not support `use_asft_loss: true`"):
        parse(config)


# ----------------------------------------------------------------------------------------------------------------
# 9. Two processes (gloo) against one, on the same global batches
# ----------------------------------------------------------------------------------------------------------------


def parallel_config(model: Path, data_dir: Path, out: Path, **extra) -> dict[str, Any]:
    """2 SGD steps with use_dft_loss (the LM loss normalised over the step's tokens, so one process with the whole
    global batch is the oracle), logged and evaluated (one row per process and batch) every step, a short gloo
    timeout so a hang fails fast."""
    return train_config(
        model, data_dir, out, GROUND_TEMPLATE[FAMILY], bbox_head=True, use_dft_loss=True, disable_shuffling=True,
        optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", ddp_timeout=120, overwrite_cache=True,
        eval_dataset="synth_ground_val", eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=1, **extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_models, mixed_data) -> Run:
    """The oracle of the 2-process run, in this process (`run_exp`, what the CLI calls)."""
    work = tmp_path_factory.mktemp("one_process")
    config = parallel_config(tiny_models[FAMILY], mixed_data, work / "out", per_device_train_batch_size=2)
    config["per_device_eval_batch_size"] = 2  # the global eval batch too
    return Run(config, Path(config["output_dir"]), "\n".join(train_in_process(config)))


@pytest.mark.e2e
def test_two_processes_train_like_one(one_process_run, tiny_models, mixed_data, tmp_path):
    """Mixed rec/reg rows, batch 1 per process: at each step one rank has no box target. Both processes must log
    (this hung in the per-key gather) and give the figures and weights of one process on the same global batch."""
    config = parallel_config(tiny_models[FAMILY], mixed_data, tmp_path / "out", per_device_train_batch_size=1)
    result = run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "ddp.yaml", config))], tmp_path,
                     FORCE_TORCHRUN="1", NPROC_PER_NODE="2")  # fmt: skip
    assert "world size: 2" in result.stdout + result.stderr
    two, one = log_steps(tmp_path / "out"), log_steps(one_process_run.output_dir)
    assert [e["step"] for e in two] == [e["step"] for e in one] == [1, 2]
    for ours, oracle in zip(two, one):
        for key in ("loss", "lm_loss", "bbox_l1", "bbox_giou", "grad_norm"):
            assert ours[key] == pytest.approx(oracle[key], rel=1e-3, abs=2e-4), (key, ours, oracle)
    two, one = eval_steps(tmp_path / "out"), eval_steps(one_process_run.output_dir)
    assert [e["step"] for e in two] == [e["step"] for e in one] == [1, 2]
    for ours, oracle in zip(two, one):  # evaluation during training, its rows split over both processes
        for key in ("eval_loss", "eval_lm_loss", "eval_bbox_l1", "eval_bbox_giou"):
            assert ours[key] == pytest.approx(oracle[key], rel=1e-3, abs=2e-4), (key, ours, oracle)
    for name in ("adapter_model.safetensors", HEAD_WEIGHTS):
        ours, oracle = load_file(str(tmp_path / "out" / name)), load_file(str(one_process_run.output_dir / name))
        assert ours.keys() == oracle.keys()
        for key in oracle:
            torch.testing.assert_close(ours[key], oracle[key], rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
    assert head_state(tmp_path / "out")["bbox_fc2.weight"].any()


@pytest.mark.e2e
def test_two_process_predict_equals_one(learn_predicted, learn_run, learn_data, tmp_path):
    """42 val rows, 6 per batch: 7 batches, so the sampler gives the second process a repeated batch, which the
    gather keeps: the row index carried with each row drops it. Every row (text, head boxes, row index, image) and
    every metric equals the 1-process run's."""
    two = predict_run(tmp_path, learn_predict_config(tmp_path / "2", learn_run, learn_data), processes=2)
    (rows1, results1), (rows2, results2) = (learn_predicted.rows, learn_predicted.results), (two.rows, two.results)
    val_rows = read_jsonl(learn_data / "ground_val.jsonl")
    assert len(val_rows) == 42
    assert [row["row"] for row in rows1] == list(range(42))
    assert [Path(row["image"]).name for row in rows1] == [Path(v["images"][0]).name for v in val_rows]
    assert sum(bool(row["predict_boxes_head"]) for row in rows1) >= MIN_HEAD_ROWS  # the head really wrote boxes
    assert rows2 == rows1
    for key, value in results1.items():
        if not any(timing in key for timing in ("runtime", "per_second", "preparation_time")):
            assert results2[key] == value, key
