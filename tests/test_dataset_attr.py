"""Column names our dataset formats read from dataset_info.json: the shared join_columns helper and the one
DatasetAttr that carries every format, checked against hand-written expectations."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from llamafactory_vision.dataset_attr import VisionDatasetAttr
from llamafactory_vision.grounding.dataset_attr import join_columns


def test_join_columns_takes_renamed_columns_and_defaults_to_the_key() -> None:
    target = SimpleNamespace(a="stale", prompt_field="stale", untouched="kept")
    join_columns(target, {"columns": {"prompt": "question"}}, {"a": "a", "prompt_field": "prompt"})
    assert vars(target) == {"a": "a", "prompt_field": "question", "untouched": "kept"}
    join_columns(target, {}, {"prompt_field": "prompt"})  # no `columns` at all: every field gets its default
    assert target.prompt_field == "prompt"


@pytest.mark.parametrize(
    ("formatting", "columns", "expected"),
    [
        ("grounding", {"images": "pics", "prompt": "ask"},
         {"images": "pics", "image": "image", "objects": "objects", "grounding_prompt": "ask", "task": "task"}),
        ("stroke_guess", {"strokes": "lines", "answer": "label"},
         {"images": "images", "image": "image", "strokes": "lines", "answer": "label", "stroke_mask": "stroke_mask"}),
        ("edit", {"source": "before", "target": "after"},
         {"source": "before", "target": "after", "instruction": "instruction", "images": None}),
    ],
)  # fmt: skip
def test_each_format_reads_its_own_columns(formatting: str, columns: dict, expected: dict) -> None:
    attr = VisionDatasetAttr("file", dataset_name="d")
    attr.join({"file_name": "d.jsonl", "formatting": formatting, "columns": columns})
    assert {name: getattr(attr, name) for name in expected} == expected


def test_another_format_leaves_our_fields_at_their_defaults() -> None:
    attr = VisionDatasetAttr("file", dataset_name="d")
    attr.join({"file_name": "d.json", "formatting": "sharegpt", "columns": {"objects": "boxes", "source": "src"}})
    assert (attr.objects, attr.source, attr.images) == ("objects", "source", None)
