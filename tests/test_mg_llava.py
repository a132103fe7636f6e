"""MG-LLaVA modules against independent oracles: the host's plain LLaVA (zero-init fusion), a hand-built feature map
(roi_align coordinates), hand-computed box mapping, and the plugin's token counts."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from llamafactory_vision.fusion.modules import ConvGateFusion, pool_objects
from llamafactory_vision.fusion.plugin import BOXES_KEY, square_pixel_boxes
from PIL import Image


@pytest.fixture(scope="module")
def convnext(tmp_path_factory):
    from llamafactory_vision.tiny import build_tiny_convnext

    return build_tiny_convnext(tmp_path_factory.mktemp("convnext") / "convnext", seed=0)


def test_pool_objects_reads_the_known_region_of_a_hand_built_map():
    # Channel 0: x (cell column), channel 1: y (cell row), channel 2: 5 + 2x - y; bilinear sampling is exact on a
    # linear field, so the mean over a box's samples is the field at the box centre in cell coordinates.
    g, size = 4, 128
    ys, xs = torch.meshgrid(torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32), indexing="ij")
    features = torch.stack([xs, ys, 5 + 2 * xs - ys])[None]  # [1, 3, 4, 4]
    # Pixels [16, 48, 80, 112] of a 128 px input: scale 4/128 -> cells [0.5, 1.5, 2.5, 3.5]; cell i's centre is at
    # i + 0.5, so the box centre (1.5, 2.5) in edge coordinates is (1.0, 2.0) in cell-centre coordinates.
    pooled = pool_objects(features, [torch.tensor([[16.0, 48.0, 80.0, 112.0]])], size, output_size=4)
    torch.testing.assert_close(pooled, torch.tensor([[1.0, 2.0, 5 + 2 * 1.0 - 2.0]]), rtol=0, atol=1e-6)
    # A piecewise-constant map: a box lying inside cell (row 1, col 2) pools exactly that cell's value.
    cells = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    inside = pool_objects(cells, [torch.tensor([[72.0, 40.0, 88.0, 56.0]])], size, output_size=2)
    assert inside.item() == pytest.approx(6.0, abs=1e-6)
    assert pool_objects(cells, [torch.zeros((0, 4))], size, 2).shape == (0, 1)


def test_square_pixel_boxes_by_hand():
    # 200 x 100 image -> 200 x 200 square (50 px above) -> 128 px: scale 0.64.
    boxes = square_pixel_boxes([[50 / 200, 20 / 100, 150 / 200, 80 / 100]], (200, 100), 128)
    torch.testing.assert_close(boxes, torch.tensor([[32.0, 44.8, 96.0, 83.2]]))


def test_fusion_is_identity_at_init_and_learns_after():
    torch.manual_seed(0)
    fusion = ConvGateFusion(low_dim=6, high_dim=5)
    low, high = torch.randn(2, 16, 6), torch.randn(2, 5, 4, 4)
    assert torch.equal(fusion(low, high), low)
    (fusion(low, high) ** 2).sum().backward()
    assert fusion.mg_slow_proj.weight.grad.abs().sum() > 0 and fusion.mg_fast_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mg_hr_image_size"):
        fusion(low, torch.randn(2, 5, 3, 3))


def _batch(tiny_models, tmp_path, boxes):
    """A prompt with one wide image through the llava_mg plugin, as the collator builds it."""
    from llamafactory.data.template import TEMPLATES
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_models["llava"]), local_files_only=True)
    processor.mg_hr_image_size = 128  # what the patch_processor hook sets for an MG run
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 60, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    image = {"path": str(tmp_path / "i.png"), "bytes": None, BOXES_KEY: json.dumps(boxes)}
    plugin = TEMPLATES["llava_mg"].mm_plugin
    messages = plugin.process_messages([{"role": "user", "content": "<image>What is it?"}], [image], [], [], processor)
    ids = processor.tokenizer(messages[0]["content"], return_tensors="pt")["input_ids"]
    mm = plugin.get_mm_inputs([image], [], [], [1], [0], [0], [ids[0].tolist()], processor)
    return ids, mm, processor


def _models(tiny_models, convnext):
    from llamafactory_vision.fusion.model import attach_mg
    from transformers import LlavaForConditionalGeneration

    plain = LlavaForConditionalGeneration.from_pretrained(str(tiny_models["llava"])).eval()
    mg = LlavaForConditionalGeneration.from_pretrained(str(tiny_models["llava"])).eval()
    args = SimpleNamespace(mg_hr_vision_tower=str(convnext), mg_hr_image_size=128, mg_roi_size=4,
                           adapter_name_or_path=None, model_name_or_path=str(tiny_models["llava"]))  # fmt: skip
    core = attach_mg(mg, args, is_trainable=True)
    return plain, mg, core


def test_zero_init_mg_llava_equals_the_hosts_plain_llava(tiny_models, convnext, tmp_path):
    plain, mg, core = _models(tiny_models, convnext)
    ids, mm, processor = _batch(tiny_models, tmp_path, [])
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((ids == image_id).sum()) == 16  # no objects: only the 4 x 4 CLIP tokens
    with torch.no_grad():
        expected = plain(input_ids=ids, pixel_values=mm["pixel_values"]).logits
        ours = mg(input_ids=ids, **mm).logits
        assert torch.equal(ours, expected)
        mask = torch.ones_like(ids)
        generated = mg.generate(input_ids=ids, attention_mask=mask, **mm, max_new_tokens=4, do_sample=False)
        reference = plain.generate(input_ids=ids, attention_mask=mask, pixel_values=mm["pixel_values"],
                                   max_new_tokens=4, do_sample=False)  # fmt: skip
        assert torch.equal(generated, reference)
        core.mg_fusion.mg_slow_proj.weight.fill_(0.1)  # the oracle can tell: a non-zero fusion changes the logits
        assert not torch.allclose(mg(input_ids=ids, **mm).logits, expected)


def test_object_tokens_follow_the_image_and_pool_the_mapped_boxes(tiny_models, convnext, tmp_path):
    plain, mg, core = _models(tiny_models, convnext)
    boxes = [[0.1, 0.2, 0.6, 0.9], [0.5, 0.0, 1.0, 0.5], [0.0, 0.0, 1.0, 1.0]]
    ids, mm, processor = _batch(tiny_models, tmp_path, boxes)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((ids == image_id).sum()) == 16 + 3
    torch.testing.assert_close(mm[BOXES_KEY][0], square_pixel_boxes(boxes, (60, 30), 128))
    with torch.no_grad():
        core._mg_inputs = (mm["mg_pixel_values"], mm[BOXES_KEY])
        features = core.get_image_features(mm["pixel_values"]).pooler_output[0]
        core._mg_inputs = (None, None)
        high = core.mg_hr_tower(mm["mg_pixel_values"]).last_hidden_state
        expected = core.mg_object_projector(pool_objects(high, mm[BOXES_KEY], 128, 4))
        plain_tokens = plain.model.get_image_features(mm["pixel_values"]).pooler_output[0]
    assert features.shape == (19, plain_tokens.shape[-1])
    torch.testing.assert_close(features[16:], expected)
    assert torch.equal(features[:16], plain_tokens)  # zero-init fusion: the image tokens are plain LLaVA's
    with torch.no_grad():
        mg(input_ids=ids, **mm)  # the token count matches the features: the host's scatter accepts them


def _convert_mg(tmp_path, rows, max_objects=32, columns=None):
    from llamafactory_vision.dataset_attr import VisionDatasetAttr
    from llamafactory_vision.fusion.data import MGDatasetConverter
    from llamafactory_vision.hparams import VisionDataArguments

    data_args = VisionDataArguments(template="llava_mg", dataset_dir=str(tmp_path), mg_max_objects=max_objects)
    attr = VisionDatasetAttr("file", dataset_name="mg")
    columns = columns or {"messages": "conversations", "images": "images"}
    attr.join({"formatting": "mg_llava", "columns": columns})
    converter = MGDatasetConverter(attr, data_args)
    return [converter(row, index) for index, row in enumerate(rows)]


def _mg_row(**extra):
    conversation = [{"from": "human", "value": "<image>What is it?"}, {"from": "gpt", "value": "a cup"}]
    return {"conversations": conversation, "images": ["p.png"], **extra}


def test_mg_converter_carries_normalised_boxes_and_names_bad_rows(tmp_path):
    Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(tmp_path / "p.png")
    good = _mg_row(objects=[{"ref": "cup", "bbox": [10, 5, 30, 25]}, {"ref": "box", "bbox": [0, 0, 50, 25],
                                                                         }], bbox_format="xyxy")  # fmt: skip
    (out, bare) = _convert_mg(tmp_path, [good, _mg_row()])
    (image,) = out["_images"]
    assert json.loads(image[BOXES_KEY]) == [[0.1, 0.1, 0.3, 0.5], [0.0, 0.0, 0.5, 0.5]]
    assert image["path"].endswith("p.png") and out["_response"][0]["content"] == "a cup"
    assert json.loads(bare["_images"][0][BOXES_KEY]) == []
    # renamed in dataset_info.json's `columns`: the same boxes (xywh here, so the format column is read too)
    (renamed,) = _convert_mg(
        tmp_path,
        [_mg_row(dets=[{"ref": "cup", "bbox": [10, 5, 20, 20]}, {"ref": "box", "bbox": [0, 0, 50, 25]}], fmt="xywh")],
        columns={"messages": "conversations", "images": "images", "objects": "dets", "bbox_format": "fmt"},
    )
    assert json.loads(renamed["_images"][0][BOXES_KEY]) == [[0.1, 0.1, 0.3, 0.5], [0.0, 0.0, 0.5, 0.5]]
    bad = _mg_row(objects=[{"ref": "cup", "bbox": [10, 5, 130, 25]}])  # x2 beyond the 100 px wide image
    with pytest.raises(ValueError, match=r"mg_llava dataset 'mg', row 1 \(counting from 0\), field `objects\[0\]\.bbox`"):
        _convert_mg(tmp_path, [good, bad])
    with pytest.raises(ValueError, match=r"row 0 \(counting from 0\), field `objects`: 2 objects, more than mg_max_objects=1"):
        _convert_mg(tmp_path, [good], max_objects=1)
