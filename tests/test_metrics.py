"""Grounding metrics against torchvision / torchmetrics IoU, brute-force matching and hand-worked examples."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from llamafactory_vision.grounding.metrics import (
    GroundingMetricAccumulator,
    check_coordinate_space,
    grounding_scores,
    head_boxes_for_family,
    match_boxes,
    score_row,
)
from torchmetrics.functional.detection import intersection_over_union
from torchvision.ops import box_iou as tv_box_iou


def random_boxes(gen: torch.Generator, n: int, scale: float = 1000.0) -> torch.Tensor:
    """``Tensor[n, 4]`` valid xyxy boxes with positive area inside ``[0, scale]``."""
    corners = torch.rand(n, 2, 2, generator=gen, dtype=torch.float64) * scale
    lo, hi = corners.min(dim=1).values, corners.max(dim=1).values + 1.0
    return torch.cat([lo, hi], dim=1)


def int_boxes(gen: torch.Generator, n: int) -> list[tuple[int, int, int, int]]:
    """Valid integer boxes in 0-1000 (what a Qwen2-VL / Qwen3-VL answer holds)."""
    out = []
    for _ in range(n):
        x = sorted(torch.randint(0, 1001, (2,), generator=gen).tolist())
        y = sorted(torch.randint(0, 1001, (2,), generator=gen).tolist())
        out.append((x[0], y[0], x[1] + 1, y[1] + 1))
    return out


def qwen2_text(boxes, refs=None) -> str:
    """A Qwen2-VL answer as decoded with special tokens stripped: ``ref(x1,y1),(x2,y2)`` per object."""
    refs = refs or ["object"] * len(boxes)
    return " ".join(f"{r}({b[0]},{b[1]}),({b[2]},{b[3]})" for r, b in zip(refs, boxes))


def json_text(boxes) -> str:
    return json.dumps([{"bbox_2d": list(b), "label": "thing"} for b in boxes])


# ---------------------------------------------------------------------------------------------- match_boxes


def test_single_pair_iou_equals_torchvision():
    gen = torch.Generator().manual_seed(0)
    pred, label = random_boxes(gen, 300), random_boxes(gen, 300)
    expected = tv_box_iou(pred, label).diagonal()
    got = torch.tensor([match_boxes([p.tolist()], [t.tolist()])[0] for p, t in zip(pred, label)], dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def brute_force_best(iou: torch.Tensor) -> float:
    """Largest summed IoU of any one-to-one assignment, by enumerating them all."""
    n, m = iou.shape
    k = min(n, m)
    best = 0.0
    for preds in itertools.permutations(range(n), k):
        for labels in itertools.combinations(range(m), k):
            best = max(best, sum(float(iou[p, t]) for p, t in zip(preds, labels)))
    return best


def test_hungarian_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    for _ in range(150):
        n, m = torch.randint(0, 5, (2,), generator=gen).tolist()
        # a small canvas makes overlaps (and competition for the same label box) common
        pred, label = random_boxes(gen, n, scale=30.0), random_boxes(gen, m, scale=30.0)
        scores = match_boxes(pred.tolist(), label.tolist())
        assert len(scores) == m
        iou = tv_box_iou(pred, label)
        assert sum(scores) == pytest.approx(brute_force_best(iou), abs=1e-6)
        # one-to-one: each score is the IoU of a distinct predicted box (or 0)
        used = []
        for j, s in enumerate(scores):
            if s > 0:
                i = int(torch.argmin((iou[:, j] - s).abs()))
                assert iou[i, j] == pytest.approx(s, abs=1e-6)
                used.append(i)
        assert len(used) == len(set(used))
        assert sum(s > 0 for s in scores) <= min(n, m)


def test_one_to_one_beats_greedy():
    # Greedy (best IoU first) gives label 0 the box A (0.82) and leaves label 1 with B (0.15);
    # the optimal assignment is A -> label 1 (80 / 120) and B -> label 0 (50 / 100).
    label = [(0, 0, 10, 10), (3, 0, 13, 10)]
    pred = [(1, 0, 11, 10), (0, 0, 5, 10)]
    assert match_boxes(pred, label) == pytest.approx([0.5, 2 / 3])


def test_degenerate_and_empty():
    label = [(0, 0, 10, 10)]
    assert match_boxes([(0, 0, 0, 10)], label) == [0.0]  # zero width
    assert match_boxes([(10, 10, 0, 0)], label) == [0.0]  # inverted corners cover the label but are not a box
    assert match_boxes([(0, 0, math.inf, 10)], label) == [0.0]
    assert match_boxes([], label) == [0.0]
    assert match_boxes([(0, 0, 10, 10)], []) == []
    # a degenerate prediction never steals a match from a good one
    assert match_boxes([(10, 10, 0, 0), (0, 0, 10, 10)], label) == pytest.approx([1.0])


# ---------------------------------------------------------------------------------------------- grounding_scores


def tv_iou(a, b) -> float:
    """The oracle: torchvision's IoU of two xyxy boxes."""
    return float(tv_box_iou(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64))[0, 0])


def test_rec_scores_the_first_box_as_published():
    # The hidden case of the issue: one referring expression answered [wrong, right] and [right, wrong]. The published
    # protocol scores the first box: 0 and 1, so Acc@0.5 = 0.5 (best-of-all matching said 1.0).
    right, wrong = (100, 100, 200, 200), (0, 0, 10, 10)
    label = qwen2_text([right])
    m = grounding_scores([(qwen2_text([wrong, right]), label), (qwen2_text([right, wrong]), label)])
    assert m["n"] == 2 and m["rows"] == 2
    assert m["acc@0.5"] == 0.5 and m["acc@0.75"] == 0.5
    assert m["miou"] == pytest.approx((tv_iou(wrong, right) + tv_iou(right, right)) / 2)
    assert m["precision@0.5"] == pytest.approx(1 / 4)  # 4 boxes written, 1 correct first box
    assert m["detect_rows"] == 0 and m["reg_rows"] == 0


def test_hand_worked_rows():
    label = (0, 0, 100, 100)
    shifted = (50, 0, 150, 100)
    rows = [
        (qwen2_text([label]), qwen2_text([label])),  # perfect
        (qwen2_text([shifted]), qwen2_text([label])),  # shifted by half a width
        (qwen2_text([label, (500, 500, 600, 600)]), qwen2_text([label])),  # an extra box after the right one
        ("I cannot find it.", qwen2_text([label])),  # unparseable: 0
    ]
    m = grounding_scores(rows)
    ious = [tv_iou(label, label), tv_iou(shifted, label), tv_iou(label, label), 0.0]
    assert ious[1] == pytest.approx(1 / 3)  # the hand value: 5000 / 15000
    assert m["rows"] == 4 and m["n"] == 4
    assert m["acc@0.5"] == pytest.approx(sum(v >= 0.5 for v in ious) / 4)
    assert m["acc@0.75"] == pytest.approx(sum(v >= 0.75 for v in ious) / 4)
    assert m["miou"] == pytest.approx(sum(ious) / 4)
    assert m["precision@0.5"] == pytest.approx(2 / 4)  # boxes written: 1 + 1 + 2 + 0; correct first boxes: 2
    assert m["parse_failures"] == 1
    assert m["label_parse_failures"] == 0
    assert m["coord_space_suspect"] == 0
    assert not any(k.startswith("head_") for k in m)


def test_detect_rows_match_one_to_one_and_report_recall_precision():
    a, b = (0, 0, 100, 100), (200, 200, 300, 300)
    half = (0, 0, 100, 50)  # IoU with a: exactly 0.5, which counts
    rows = [
        (qwen2_text([b, a]), qwen2_text([a, b])),  # order does not matter: both found
        (qwen2_text([half]), qwen2_text([a, b])),  # one of two found, at IoU 0.5
        (qwen2_text([a, a, (600, 600, 700, 700)]), qwen2_text([a, b])),  # a once (one-to-one), b missed
    ]
    m = grounding_scores(rows)
    assert m["n"] == 0 and m["detect_rows"] == 3 and m["detect_n"] == 6
    matched = [tv_iou(a, a), tv_iou(b, b), tv_iou(half, a), 0.0, tv_iou(a, a), tv_iou(a, b)]
    assert tv_iou(half, a) == 0.5 and tv_iou(a, b) == 0.0
    assert m["detect_recall@0.5"] == pytest.approx(4 / 6)
    assert m["detect_precision@0.5"] == pytest.approx(4 / 6)  # predicted boxes: 2 + 1 + 3
    assert m["detect_miou"] == pytest.approx(sum(matched) / 6)


def test_reg_rows_are_scored_by_text_not_boxes():
    box_row = (qwen2_text([(0, 0, 100, 100)]), qwen2_text([(0, 0, 100, 100)]))
    rows = [
        box_row,
        ("red car", "red car"),  # exact
        ("The red car.", "red car"),  # normalised match only
        ("a blue bus", "red car"),  # wrong
    ]
    m = grounding_scores(rows)
    assert m["rows"] == 4 and m["n"] == 1 and m["reg_rows"] == 3
    assert m["reg_exact"] == pytest.approx(1 / 3)
    assert m["reg_match"] == pytest.approx(2 / 3)
    assert m["parse_failures"] == 0 and m["label_parse_failures"] == 0  # a phrase answer is not a failure
    assert m["acc@0.5"] == 1.0  # reg rows never enter the box metrics


def test_known_tasks_separate_reg_rows_from_broken_labels():
    acc = GroundingMetricAccumulator()
    acc.update(["red car", "(0,0),(10,10)", "x"], ["red car", "no box here", "y"], tasks=["reg", "rec", "reg"])
    m = acc.compute()
    assert m["reg_rows"] == 2 and m["reg_exact"] == 0.5
    assert m["label_parse_failures"] == 1 and m["n"] == 0 and m["parse_failures"] == 0
    with pytest.raises(ValueError, match="task='caption'"):
        acc.update(["a"], ["b"], tasks=["caption"])


def test_dataset_label_boxes_replace_the_rounded_text():
    # The label text rounds (0.1004, ...) to 100 of 1000; the dataset's float box is what the answer is scored on.
    float_label = (100.4, 100.4, 200.4, 200.4)
    row = score_row("(100,100),(200,200)", "(100,100),(200,200)", label_boxes=[float_label])
    assert row.text.ious == [pytest.approx(tv_iou((100, 100, 200, 200), float_label))]
    assert row.text.ious[0] < 1.0


def test_shifted_thresholds():
    # IoU 0.6: counts at 0.5, not at 0.75
    m = grounding_scores([("(0,0),(100,100)", "(0,0),(60,100)"), ("(0,0),(100,100)", "(0,0),(100,100)")])
    assert m["acc@0.5"] == 1.0
    assert m["acc@0.75"] == 0.5
    assert m["miou"] == pytest.approx((0.6 + 1.0) / 2)


def test_json_answers():
    pred = '```json\n[\n\t{"bbox_2d": [10, 10, 50, 50], "label": "cup"}\n]\n```'
    m = grounding_scores([(pred, json_text([(10, 10, 50, 50)]))])
    assert m["n"] == 1 and m["acc@0.5"] == 1.0


def test_empty_input():
    m = grounding_scores([])
    assert m["rows"] == 0 and m["n"] == 0 and m["detect_n"] == 0 and m["reg_rows"] == 0
    assert m["acc@0.5"] == 0.0 and m["miou"] == 0.0 and m["precision@0.5"] == 0.0


def test_matches_torchmetrics_on_one_box_rows():
    gen = torch.Generator().manual_seed(2)
    pred, label = int_boxes(gen, 64), int_boxes(gen, 64)
    # pull half the predictions onto their label so both sides of the thresholds are exercised
    pred = [t if i % 2 else p for i, (p, t) in enumerate(zip(pred, label))]
    pred = [(p[0], p[1], p[2] + 7, p[3]) for p in pred]
    m = grounding_scores((qwen2_text([p]), qwen2_text([t])) for p, t in zip(pred, label))

    pred_t = torch.tensor(pred, dtype=torch.float32)
    label_t = torch.tensor(label, dtype=torch.float32)
    assert m["miou"] == pytest.approx(float(intersection_over_union(pred_t, label_t)), abs=1e-5)
    diag = intersection_over_union(pred_t, label_t, aggregate=False).diagonal()
    for t in (0.5, 0.75):
        assert m[f"acc@{t}"] == pytest.approx(float((diag >= t).float().mean()))
    assert m["precision@0.5"] == m["acc@0.5"]  # one prediction per row


def test_json_and_qwen2_spaces_agree():
    # IoU is scale-invariant: the same boxes written as 0-1000 text or as pixels (x 0.64) score the same.
    gen = torch.Generator().manual_seed(3)
    pred, label = int_boxes(gen, 20), int_boxes(gen, 20)
    m1 = grounding_scores((qwen2_text([p]), qwen2_text([t])) for p, t in zip(pred, label))

    def px(b):
        return [round(v * 0.64, 2) for v in b]

    m2 = grounding_scores((json_text([px(p)]), json_text([px(t)])) for p, t in zip(pred, label))
    assert m2["miou"] == pytest.approx(m1["miou"], abs=1e-9)
    assert m2["acc@0.5"] == m1["acc@0.5"]


# ---------------------------------------------------------------------------------------------- accumulator


def test_accumulator_batches_then_resets():
    gen = torch.Generator().manual_seed(4)
    rows = []
    for _ in range(12):
        n_label, n_pred = torch.randint(1, 4, (2,), generator=gen).tolist()
        rows.append((qwen2_text(int_boxes(gen, n_pred)), qwen2_text(int_boxes(gen, n_label))))
    rows.append(("garbage", rows[0][1]))
    acc = GroundingMetricAccumulator()
    for start in range(0, len(rows), 5):
        batch = rows[start : start + 5]
        acc.update([p for p, _ in batch], [t for _, t in batch])
    assert acc.compute() == grounding_scores(rows)
    assert acc.compute()["rows"] == 0  # compute started a fresh split


def test_accumulator_rejects_mismatched_batches():
    acc = GroundingMetricAccumulator()
    with pytest.raises(ValueError, match="labels"):
        acc.update(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="head_boxes"):
        acc.update(["a"], ["a"], head_boxes=[None, None])


# ---------------------------------------------------------------------------------------------- head boxes


def test_head_boxes_scored_against_labels():
    detect_label = qwen2_text([(0, 0, 100, 100), (200, 200, 300, 300)])
    rows = [
        ("a(0,0),(100,100)", detect_label),
        ("nothing", qwen2_text([(0, 0, 50, 50)])),
        ("a(0,0),(100,100)", qwen2_text([(0, 0, 100, 100)])),
        ("red car", "red car"),  # reg: the head has nothing to score
    ]
    heads = [[(0, 0, 100, 100), (200, 200, 300, 250)], [], [(0, 0, 50, 100), (0, 0, 100, 100)], [(0, 0, 9, 9)]]
    m = grounding_scores(rows, head_boxes=heads)
    assert m["head_detect_n"] == 2 and m["head_detect_recall@0.5"] == 1.0  # IoUs 1 and 0.5 (exactly: counts)
    assert m["head_detect_miou"] == pytest.approx((1 + tv_iou((200, 200, 300, 250), (200, 200, 300, 300))) / 2)
    assert m["head_n"] == 2  # rec rows with head boxes; the first head box is scored, as for the text
    assert m["head_acc@0.5"] == pytest.approx(1 / 2)  # row 2: no head box; row 3: first box IoU 0.5
    assert m["head_acc@0.75"] == 0.0
    assert m["head_miou"] == pytest.approx(0.25)
    # the text metrics are unaffected by the head
    assert m == {**grounding_scores(rows), **{k: v for k, v in m.items() if k.startswith("head_")}}


def test_head_boxes_for_family_picks_the_answer_space():
    objects = [{"xyxy_1000": [100, 200, 300, 400], "xyxy_model": [56.0, 112.0, 168.0, 224.0]}]
    assert head_boxes_for_family(objects, "qwen2_vl") == [(100.0, 200.0, 300.0, 400.0)]
    assert head_boxes_for_family(objects, "qwen3_vl") == [(100.0, 200.0, 300.0, 400.0)]
    assert head_boxes_for_family(objects, "qwen2_5_vl") == [(56.0, 112.0, 168.0, 224.0)]
    with pytest.raises(ValueError, match="family='llava'"):
        head_boxes_for_family(objects, "llava")
    with pytest.raises(ValueError, match=r"predict_boxes_head\[0\].*'xyxy_model'"):
        head_boxes_for_family([{"xyxy_1000": [1, 2, 3, 4]}], "qwen2_5_vl")


# ---------------------------------------------------------------------------------------------- coordinate space


def _rows(pairs):
    return [score_row(p, t) for p, t in pairs]


def test_qwen2_5_vl_answers_in_0_1000_are_flagged():
    # Labels: model-view pixels of a 644 x 476 view. Answers: the same boxes written in 0-1000 (as Qwen2-VL would).
    gen = torch.Generator().manual_seed(5)
    pairs = []
    for box in int_boxes(gen, 12):
        pixels = [box[0] * 644 / 1000, box[1] * 476 / 1000, box[2] * 644 / 1000, box[3] * 476 / 1000]
        pairs.append((json_text([box]), json_text([[round(v) for v in pixels]])))
    check = check_coordinate_space(_rows(pairs), "qwen2_5_vl")
    assert check.metrics["coord_space_suspect"] == 1
    assert "0-1000" in check.warning and "12 of 12 rows" in check.warning
    acc = GroundingMetricAccumulator("qwen2_5_vl")
    acc.update([p for p, _ in pairs], [t for _, t in pairs])
    assert acc.compute()["coord_space_suspect"] == 1 and "scaled up" in acc.warning
    # the same labels answered in their own space: nothing to say
    same = [(t, t) for _, t in pairs]
    assert check_coordinate_space(_rows(same), "qwen2_5_vl") == check_coordinate_space(_rows(same), "qwen2_5_vl")
    assert check_coordinate_space(_rows(same), "qwen2_5_vl").warning is None


def test_relative_family_answers_out_of_range_are_flagged():
    pixels = [(json_text([(1100, 900, 1900, 1400)]), json_text([(550, 600, 950, 930)]))] * 6
    check = check_coordinate_space(_rows(pixels), "qwen3_vl")
    assert check.metrics == {"pred_out_of_range": 1.0, "coord_space_suspect": 1}
    assert "outside the coordinate range 0-1000" in check.warning
    unit = [(json_text([(0.1, 0.2, 0.3, 0.4)]), json_text([(100, 200, 300, 400)]))] * 6
    assert "normalised" in check_coordinate_space(_rows(unit), "qwen3_vl").warning


def test_a_poor_but_honest_model_is_not_flagged():
    # Random answers in the right space: low IoU, but no sign of another coordinate space.
    gen = torch.Generator().manual_seed(6)
    pairs = [(qwen2_text([p]), qwen2_text([t])) for p, t in zip(int_boxes(gen, 200), int_boxes(gen, 200))]
    m = grounding_scores(pairs, family="qwen2_vl")
    assert m["coord_space_suspect"] == 0 and m["pred_out_of_range"] < 0.05  # int_boxes may reach 1001
    assert m["acc@0.5"] < 0.2
    # too few boxes to speak
    few = [(json_text([(1100, 900, 1900, 1400)]), json_text([(550, 600, 950, 930)]))] * (4)
    assert check_coordinate_space(_rows(few), "qwen3_vl").metrics["coord_space_suspect"] == 0
