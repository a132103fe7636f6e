"""The helpers every synth generator shares (synth/common.py), checked against hand-written expectations."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from llamafactory_vision.synth.common import add_common_arguments, check_size, val_count, val_indices, write_split


def _entry(file_name: str) -> dict:
    return {"file_name": file_name, "formatting": "toy"}


def test_write_split_writes_registers_and_summarises(tmp_path: Path) -> None:
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}))
    train, val = [{"a": 1}, {"a": "é"}], [{"a": 3}]
    summary = write_split(tmp_path, train, val, ("t.jsonl", "v.jsonl"), ("toy_train", "toy_val"), _entry)

    assert (tmp_path / "t.jsonl").read_text(encoding="utf-8") == '{"a": 1}\n{"a": "é"}\n'
    assert (tmp_path / "v.jsonl").read_text(encoding="utf-8") == '{"a": 3}\n'
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info == {"mine": {"file_name": "mine.json"}, "toy_train": _entry("t.jsonl"), "toy_val": _entry("v.jsonl")}
    assert summary == {
        "out_dir": str(tmp_path),
        "train_file": str(tmp_path / "t.jsonl"),
        "val_file": str(tmp_path / "v.jsonl"),
        "dataset_info": str(tmp_path / "dataset_info.json"),
        "datasets": ["toy_train", "toy_val"],
        "n_train": 2,
        "n_val": 1,
    }


def test_write_split_neither_writes_nor_registers_an_empty_split(tmp_path: Path) -> None:
    summary = write_split(tmp_path, [{"a": 1}], [], ("t.jsonl", "v.jsonl"), ("toy_train", "toy_val"), _entry)
    assert not (tmp_path / "v.jsonl").exists()
    assert list(json.loads((tmp_path / "dataset_info.json").read_text())) == ["toy_train"]
    assert (summary["val_file"], summary["datasets"], summary["n_val"]) == (None, ["toy_train"], 0)


@pytest.mark.parametrize(
    ("n", "val_frac", "expected"),
    [(10, 0.2, 2), (10, 0.0, 0), (1, 0.5, 0), (2, 0.01, 1), (2, 0.99, 1), (5, 0.34, 2)],
)
def test_val_count_keeps_one_row_on_each_side(n: int, val_frac: float, expected: int) -> None:
    assert val_count(n, val_frac) == expected


def test_val_indices_are_a_seeded_subset() -> None:
    picked = val_indices(20, 0.25, seed=3)
    assert len(picked) == 5 and picked <= set(range(20))
    assert picked == val_indices(20, 0.25, seed=3) and picked != val_indices(20, 0.25, seed=4)


@pytest.mark.parametrize(("n", "val_frac", "name"), [(0, 0.2, "n"), (5, 1.0, "val_frac"), (5, -0.1, "val_frac")])
def test_check_size_names_the_argument(n: int, val_frac: float, name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} must"):
        check_size(n, val_frac)


def test_common_arguments_parse_with_their_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_common_arguments(parser, "widgets")
    args = parser.parse_args(["--out", "d", "--n", "7"])
    assert (args.out, args.n, args.seed, args.val_frac) == ("d", 7, 0, 0.2)
    assert "fraction of widgets for validation" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "d"])  # --n is required
