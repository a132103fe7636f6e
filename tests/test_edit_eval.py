"""Edit metrics against independent oracles: torchmetrics' CLIPScore, CLIP's own projection layers, hand values."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, run_cli
from llamafactory_vision.editing.metrics import ClipScorer, DinoScorer, edit_metrics, pixel_errors
from PIL import Image


class _TorchmetricsClip:
    """torchmetrics 1.9 expects ``get_*_features`` to return tensors; transformers 5.x returns an output object with
    the projected embedding in ``pooler_output`` (DESIGN.md)."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def to(self, device):
        self.model.to(device)
        return self

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def _images(n: int, seed: int, size=(40, 48)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


CAPTIONS = ["a blue circle", "a red square on the left", "a green square", "a purple circle on the right",
            "a yellow circle", "an orange square"]  # fmt: skip


def test_clip_t_matches_torchmetrics_clipscore(edit_models):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    path = edit_models["clip"]
    metric = CLIPScore(model_name_or_path=lambda: (_TorchmetricsClip(CLIPModel.from_pretrained(path)),
                                                   CLIPProcessor.from_pretrained(path)))  # fmt: skip
    scorer = ClipScorer(path)
    images = _images(len(CAPTIONS), seed=0)
    positive = 0
    for image, caption in zip(images, CAPTIONS):
        ours = edit_metrics([image], [image], [caption], clip=scorer)["clip_t"]
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        theirs = metric(tensor, caption).item()  # CLIPScore clamps at 0; ours does not
        assert theirs == pytest.approx(max(ours, 0.0), abs=1e-3)
        metric.reset()
        positive += ours > 0
    assert positive > 0, "no positive row: the comparison would only test the clamp"


def test_clip_i_matches_projection_by_hand(edit_models):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(edit_models["clip"]), CLIPProcessor.from_pretrained(edit_models["clip"])
    outputs, targets = _images(3, seed=1), _images(3, seed=2, size=(64, 64))

    def embed(images):  # CLIP by its layers: vision pooler -> visual projection -> unit norm
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            pooled = model.vision_model(pixel_values=pixels).pooler_output
            feats = model.visual_projection(pooled)
        return feats / feats.norm(dim=-1, keepdim=True)

    expected = (embed(outputs) * embed(targets)).sum(-1).mean().item()
    got = edit_metrics(outputs, targets, [None] * 3, clip=ClipScorer(edit_models["clip"]))
    assert got["clip_i"] == pytest.approx(expected, abs=1e-5)
    assert got["clip_t_n"] == 0 and "clip_t" not in got


def test_pixel_errors_by_hand():
    white, black = Image.new("RGB", (8, 6), (255, 255, 255)), Image.new("RGB", (8, 6), (0, 0, 0))
    assert pixel_errors(white, black) == pytest.approx((1.0, 1.0))
    grey = Image.new("RGB", (16, 12), (128, 64, 0))  # twice the target's size: resized, still constant
    l1, l2 = pixel_errors(grey, black)
    values = np.array([128, 64, 0]) / 255
    assert l1 == pytest.approx(values.mean()) and l2 == pytest.approx((values**2).mean())
    metrics = edit_metrics([white, grey], [black, black], ["a", None])
    assert metrics["n"] == 2 and metrics["l1"] == pytest.approx((1 + values.mean()) / 2)


def test_dino_identical_images_score_one(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                       patch_size=8)  # fmt: skip
    ViTModel(config).save_pretrained(tmp_path / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "dino")
    images = _images(2, seed=3)
    scores = edit_metrics(images, images, [None, None], dino=DinoScorer(tmp_path / "dino"))
    assert scores["dino"] == pytest.approx(1.0, abs=1e-5)
    other = edit_metrics(images, _images(2, seed=4), [None, None], dino=DinoScorer(tmp_path / "dino"))
    assert other["dino"] < 1.0


def test_edit_eval_cli_reports_misaligned_rows(tmp_path):
    (tmp_path / "out").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "t.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "out" / "00000.png")
    rows = [{"source": "t.png", "instruction": "x", "target": "t.png"}] * 2
    (tmp_path / "edit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [sys.executable, str(REPO / "eval" / "edit_eval.py"), "--outputs", str(tmp_path / "out"),
            "--dataset", str(tmp_path / "edit.jsonl")]  # fmt: skip
    result = run_cli(args, cwd=tmp_path, check=False)
    assert result.returncode != 0 and "row 1: no edited image" in result.stderr
