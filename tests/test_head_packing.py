"""`neat_packing` with the bbox head: the packs are the host's own (same tokens, images, boundaries), each pack's box
spans are its rows' spans shifted to where the host put each row, and the head's loss terms on a packed batch equal
the sum over the rows alone; plain `packing` (rows attending to each other) is refused at start-up."""

from __future__ import annotations

import itertools

import pytest
from conftest import (
    GROUND_TEMPLATE,
    read_jsonl,
    run_cli,
    tokenized_rows,
    train_config,
    train_in_process,
    write_yaml,
)

CUTOFF = 1024
PACK_KEYS = ("input_ids", "labels", "attention_mask", "position_ids", "images", "packing_params")


def _rows(model_dir, data_dir, out, template: str, stage: str, **extra):
    return tokenized_rows(model_dir, data_dir, out, template, stage, CUTOFF, **extra)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_packed_head_rows_are_the_host_packs_with_shifted_spans(family, tiny_models, varied_data, tmp_path):
    from llamafactory_vision.grounding.head_data import BBOX_STAGE, ROWS_STAGE

    model, template = tiny_models[family], GROUND_TEMPLATE[family]
    rows, *_ = _rows(model, varied_data, tmp_path / "rows", template, BBOX_STAGE, bbox_head=True)
    host, *_ = _rows(model, varied_data, tmp_path / "host", template, ROWS_STAGE, neat_packing=True)
    packs, *_ = _rows(model, varied_data, tmp_path / "packs", template, BBOX_STAGE, bbox_head=True, neat_packing=True)
    assert max(len(r["input_ids"]) for r in rows) < CUTOFF - 1  # no row is cut, packed (cutoff - 1) or not

    assert len(packs) == len(host)
    by_tokens = {(tuple(r["input_ids"]), tuple(r["images"])): r for r in rows}
    boxes = 0
    for pack, oracle in zip(packs, host, strict=True):
        for key in PACK_KEYS:  # the host's own packing, untouched
            assert pack[key] == oracle[key], key
        spans, targets = [], []
        bounds = pack["packing_params"]["sequence_boundaries"]
        images = iter(pack["images"])
        for start, end in itertools.pairwise(bounds):
            if all(label == -100 for label in pack["labels"][start:end]):
                continue  # the right padding
            ids = tuple(pack["input_ids"][start:end])
            row_images = tuple(itertools.islice(images, _images_in(ids, rows)))
            row = by_tokens[(ids, row_images)]
            spans += [[o + start, c + start] for o, c in row["bbox_spans"]]
            targets += row["bbox_targets"]
        assert pack["bbox_spans"] == spans and pack["bbox_targets"] == targets
        assert pack["bbox_cut"] == 0
        boxes += len(spans)
    assert boxes == sum(len(r["bbox_spans"]) for r in rows) > 0
    assert any(len(p["packing_params"]["sequence_boundaries"]) > 3 for p in packs)  # some pack holds >= 2 rows


def _images_in(ids: tuple, rows: list[dict]) -> int:
    """Images of the row whose tokens are ``ids`` (every row with these tokens has as many)."""
    (count,) = {len(r["images"]) for r in rows if tuple(r["input_ids"]) == ids}
    return count


def test_head_terms_on_a_packed_batch_equal_the_rows_alone(tiny_models, varied_data, tmp_path):
    """The head reads each box's hidden state in the pack: with a random (non-zero) head, its L1 and GIoU sums on a
    packed batch equal those of the rows run one by one."""
    import torch
    from llamafactory_vision.grounding.bbox_head import BBoxHead, BBoxHeadConfig
    from llamafactory_vision.grounding.head_data import BBOX_STAGE, GroundingBBoxCollator
    from llamafactory_vision.grounding.trainer import BBoxLossConfig, bbox_head_loss
    from transformers import AutoModelForImageTextToText

    family, template = "qwen2_vl", GROUND_TEMPLATE["qwen2_vl"]
    rows, _, _ = _rows(tiny_models[family], varied_data, tmp_path / "rows", template, BBOX_STAGE, bbox_head=True)
    packs, template_obj, tokenizer_module = _rows(
        tiny_models[family], varied_data, tmp_path / "packs", template, BBOX_STAGE, bbox_head=True, neat_packing=True
    )
    pack = next(p for p in packs if len(p["packing_params"]["sequence_boundaries"]) > 3)
    model = AutoModelForImageTextToText.from_pretrained(tiny_models[family], attn_implementation="sdpa").eval()
    torch.manual_seed(0)
    head = BBoxHead(BBoxHeadConfig(model.config.text_config.hidden_size, 2, "box_start"))
    torch.nn.init.normal_(head.bbox_fc1.weight, std=0.5)  # the last layer starts at zero: make it see the input
    config = BBoxLossConfig(1.0, 5.0, 2.0, "box_start")

    def terms(features, neat):
        collator = GroundingBBoxCollator(
            template=template_obj, model=model, label_pad_token_id=-100, block_diag_attn=neat, neat_packing=neat,
            attn_implementation="sdpa", compute_dtype=torch.float32, **tokenizer_module,
        )  # fmt: skip
        batch = collator([dict(f) for f in features])
        keep = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_thw")
        with torch.no_grad():
            hidden = model(**{k: batch[k] for k in keep}, output_hidden_states=True).hidden_states[-1]
            return bbox_head_loss(head, hidden, batch["bbox_spans"], batch["bbox_targets"], config)

    packed = terms([pack], neat=True)
    bounds = pack["packing_params"]["sequence_boundaries"]
    members = [r for r in rows for s, e in itertools.pairwise(bounds) if r["input_ids"] == pack["input_ids"][s:e]]
    alone = [terms([{k: v for k, v in r.items() if k != "position_ids"}], neat=False) for r in members]
    assert packed["boxes"].item() == sum(t["boxes"].item() for t in alone) > 1
    for key in ("l1", "giou"):
        torch.testing.assert_close(packed[key], sum(t[key] for t in alone), rtol=1e-4, atol=1e-5)


def test_neat_packing_trains_the_head_and_two_processes_equal_one(tiny_models, varied_data, tmp_path):
    """`llamafactory-cli train` with the head on packed rows, 1 process (batch 1 x 2 accumulation steps, in this
    process: `run_exp`, what the CLI calls) and 2 processes (batch 1 each) on the same global batch: the same losses
    and the same trained head (plain SGD, so that float noise is not amplified as Adam's first step does)."""
    import torch
    from safetensors.torch import load_file

    settings = {"bbox_head": True, "neat_packing": True, "cutoff_len": CUTOFF, "max_steps": -1, "num_train_epochs": 1,
                "disable_shuffling": True, "per_device_train_batch_size": 1, "optim": "sgd", "learning_rate": 1.0,
                "logging_steps": 1}  # fmt: skip
    losses, heads = {}, {}
    for procs in ("1", "2"):
        out = tmp_path / procs
        config = train_config(tiny_models["qwen2_vl"], varied_data, out, "qwen2_vl_ground", **settings,
                              gradient_accumulation_steps=2 if procs == "1" else 1)  # fmt: skip
        if procs == "2":
            config["ddp_backend"] = "gloo"
            run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / f"{procs}.yaml", config))], tmp_path,
                    FORCE_TORCHRUN="1", NPROC_PER_NODE="2")  # fmt: skip
        else:
            train_in_process(config)
        losses[procs] = [entry["loss"] for entry in read_jsonl(out / "trainer_log.jsonl") if "loss" in entry]
        heads[procs] = load_file(str(out / "bbox_head.safetensors"))
    assert len(losses["1"]) >= 2
    assert losses["2"] == pytest.approx(losses["1"], rel=1e-5)
    assert heads["1"]["bbox_fc2.weight"].abs().sum() > 0  # the head trained (its last layer starts at zero)
    for key in heads["1"]:
        torch.testing.assert_close(heads["2"][key], heads["1"][key], rtol=1e-4, atol=1e-6)


def test_plain_packing_is_refused_with_the_head(tiny_models, demo_data, tmp_path):
    from llamafactory.hparams import get_train_args

    config = train_config(tiny_models["qwen2_vl"], demo_data, tmp_path, "qwen2_vl_ground", bbox_head=True,
                          packing=True)  # fmt: skip
    with pytest.raises(ValueError, match="does not support `packing` without `neat_packing: true`"):
        get_train_args({k: str(v) if hasattr(v, "is_dir") else v for k, v in config.items()})
