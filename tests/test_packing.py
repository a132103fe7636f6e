"""The host's `packing` / `neat_packing` with grounding templates (no bbox head): each packed row is the unpacked rows
it groups, concatenated (the host's knapsack decides the grouping), with their images in the same order, so every
image token and every box refers to its own image. With the bbox head, plain `packing` is refused at start-up
(tests/test_bbox_head.py `STARTUP_ERRORS`) and `neat_packing` is tested in tests/test_head_packing.py."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from conftest import GROUND_TEMPLATE, read_jsonl, run_cli, tokenized_rows, train_config, write_yaml

CUTOFF = 1024
CASES = [("qwen2_vl", False), ("qwen2_vl", True), ("qwen2_5_vl", True), ("qwen3_vl", True)]


def _rows(model_dir, data_dir, out, template: str, **extra) -> tuple[list[dict], int]:
    """Training rows as our grounding workflow asks the host for them (stage ROWS_STAGE), and the pad id."""
    from llamafactory_vision.grounding.head_data import ROWS_STAGE

    rows, _, tokenizer_module = tokenized_rows(model_dir, data_dir, out, template, ROWS_STAGE, CUTOFF, **extra)
    return rows, tokenizer_module["tokenizer"].pad_token_id


def _segments(row: dict, pad_id: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each packed sequence, from ``position_ids`` (each restarts at 0 and counts up by 1); the
    rest must be the host's padding (pad id, no label, position 0)."""
    positions = row["position_ids"]
    segments, i = [], 0
    while i < len(positions) - 1 and positions[i] == 0 and positions[i + 1] == 1:
        end = i + 1
        while end < len(positions) and positions[end] == end - i:
            end += 1
        segments.append((i, end))
        i = end
    assert all(row["input_ids"][j] == pad_id and row["labels"][j] == -100 for j in range(i, len(positions)))
    assert all(positions[j] == 0 for j in range(i, len(positions)))
    return segments


@pytest.mark.parametrize(("family", "neat"), CASES)
def test_packed_rows_are_the_unpacked_rows_concatenated(family, neat, tiny_models, varied_data, tmp_path):
    template = GROUND_TEMPLATE[family]
    unpacked, pad_id = _rows(tiny_models[family], varied_data, tmp_path / "rows", template)
    packing = {"neat_packing": True} if neat else {"packing": True}
    packed, _ = _rows(tiny_models[family], varied_data, tmp_path / "packed", template, **packing)

    def key(input_ids, labels, images) -> tuple:
        return tuple(input_ids), tuple(labels), tuple(images or ())

    # Packing, the host cuts cutoff_len by one (data_args.__post_init__), truncates rows to that and pads every pack
    # to it; no row here comes near it, so no row is cut either way.
    assert max(len(r["input_ids"]) for r in unpacked) < CUTOFF - 1
    expected = Counter(key(r["input_ids"], r["labels"], r["images"]) for r in unpacked)
    got: Counter = Counter()
    multi = 0
    for row in packed:
        assert len(row["input_ids"]) == CUTOFF
        segments = _segments(row, pad_id)
        multi += len(segments) > 1
        images = list(row["images"] or [])
        taken, image_rows = 0, []
        for index, (start, end) in enumerate(segments):
            ids, labels = tuple(row["input_ids"][start:end]), tuple(row["labels"][start:end])
            matches = [k[2] for k in expected if k[:2] == (ids, labels)]
            assert len(matches) == 1, "a packed sequence that is not exactly one unpacked row"
            row_images = matches[0]
            assert tuple(images[taken : taken + len(row_images)]) == row_images, "images out of order"
            taken += len(row_images)
            image_rows += [index] * len(row_images)
            got[(ids, labels, row_images)] += 1
            if neat:  # block-diagonal attention: each sequence its own id, from 1
                assert set(row["attention_mask"][start:end]) == {index + 1}
        assert taken == len(images)
        if neat:  # what the host's collator uses for M-RoPE per sequence: boundaries and each image's sequence
            params = row["packing_params"]
            assert params["sequence_boundaries"][: len(segments) + 1] == [0, *(end for _, end in segments)]
            assert params["image_subseq_ids"] == image_rows
    assert got == expected
    assert multi > 0, "no packed row holds two rows: the test would prove nothing"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_neat_packed_logits_equal_the_unpacked_rows(family, tiny_models, varied_data, tmp_path):
    """Model-level alignment: with `neat_packing` each packed sequence sees its own image (the host's collator gives
    each its own M-RoPE positions and a block-diagonal mask), so its logits equal those of the row alone."""
    import torch
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.data.collator import SFTDataCollatorWith4DAttentionMask
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer
    from transformers import AutoModelForImageTextToText

    template = GROUND_TEMPLATE[family]
    unpacked, pad_id = _rows(tiny_models[family], varied_data, tmp_path / "rows", template)
    packed, _ = _rows(tiny_models[family], varied_data, tmp_path / "packed", template, neat_packing=True)
    row = next(r for r in packed if len(_segments(r, pad_id)) > 1)
    by_ids = {tuple(r["input_ids"]): r for r in unpacked}

    model = AutoModelForImageTextToText.from_pretrained(tiny_models[family], attn_implementation="sdpa").eval()
    tokenizer_module = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_models[family])))
    template_obj = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], DataArguments(template=template))

    def collate(rows, neat):
        collator = SFTDataCollatorWith4DAttentionMask(
            template=template_obj, model=model, label_pad_token_id=-100, block_diag_attn=neat, neat_packing=neat,
            attn_implementation="sdpa", compute_dtype=torch.float32, **tokenizer_module,
        )  # fmt: skip
        return collator([dict(r) for r in rows])

    keep = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_thw")
    with torch.no_grad():
        batch = collate([row], neat=True)
        logits = model(**{k: batch[k] for k in keep}).logits[0]
        for start, end in _segments(row, pad_id):
            alone = by_ids[tuple(row["input_ids"][start:end])]
            single = collate([{k: v for k, v in alone.items() if k != "position_ids"}], neat=False)
            expected = model(**{k: single[k] for k in keep}).logits[0]
            torch.testing.assert_close(logits[start:end], expected, rtol=1e-4, atol=1e-4)


def test_neat_packing_trains_with_a_grounding_template(tiny_models, demo_data, tmp_path):
    """`neat_packing` through our grounding workflow and the host's collator (block-diagonal attention, M-RoPE per
    packed sequence) trains to finite losses."""
    out = tmp_path / "out"
    config = train_config(tiny_models["qwen2_vl"], demo_data, out, "qwen2_vl_ground", neat_packing=True, cutoff_len=1024)
    run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "packed.yaml", config))], tmp_path)
    losses = [entry["loss"] for entry in read_jsonl(out / "trainer_log.jsonl") if "loss" in entry]
    assert losses and all(math.isfinite(loss) and loss > 0 for loss in losses)
