"""The shared template spec loader (template_specs.py) on hand-written YAML folders."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import pytest
from llamafactory_vision.template_specs import load_specs


@dataclasses.dataclass(frozen=True)
class ToySpec:
    name: str
    model_types: tuple[str, ...]
    prompts: Mapping[str, tuple[str, ...]]


def _write(folder: Path, file_name: str, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / file_name).write_text(text)


def test_reads_yaml_files_in_name_order_with_lists_as_tuples(tmp_path: Path) -> None:
    _write(tmp_path, "b.yaml", "name: second\nmodel_types: [m2]\nprompts: {ask: [x]}\n")
    _write(tmp_path, "a.yaml", "name: first\nmodel_types: [m1, m3]\nprompts: {ask: [p, q], tell: [r]}\n")
    _write(tmp_path, "notes.txt", "not a spec")
    _write(tmp_path / "sub", "c.yaml", "name: nested\n")  # sub-folders hold other kinds of specs
    specs = load_specs(tmp_path, ToySpec, "toy")
    assert list(specs) == ["first", "second"]
    assert specs["first"] == ToySpec("first", ("m1", "m3"), {"ask": ("p", "q"), "tell": ("r",)})


def test_unknown_key_names_the_file(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", "name: first\nmodel_types: []\nprompts: {}\ncolour: red\n")
    with pytest.raises(ValueError, match=r"toy template spec a.yaml: unknown keys \['colour'\]"):
        load_specs(tmp_path, ToySpec, "toy")


def test_duplicate_name_names_the_second_file(tmp_path: Path) -> None:
    for file_name in ("a.yaml", "b.yaml"):
        _write(tmp_path, file_name, "name: same\nmodel_types: []\nprompts: {}\n")
    with pytest.raises(ValueError, match=r"toy template 'same' is defined twice \(second in b.yaml\)"):
        load_specs(tmp_path, ToySpec, "toy")


def test_missing_key_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", "name: first\nprompts: {}\n")
    with pytest.raises(KeyError, match="model_types"):
        load_specs(tmp_path, ToySpec, "toy")


def test_derived_template_copies_its_base_with_its_own_plugin_and_refuses_a_taken_name():
    from llamafactory.data.mm_plugin import get_mm_plugin
    from llamafactory.data.template import TEMPLATES
    from llamafactory_vision.template_specs import add_derived_template

    templates = dict(TEMPLATES)
    plugin = get_mm_plugin("llava", image_token="<image>")
    add_derived_template(templates, "llava_copy", "llava", plugin)
    derived, base = templates["llava_copy"], templates["llava"]
    assert derived.mm_plugin is plugin and base.mm_plugin is not plugin
    assert derived.format_user == base.format_user and derived.default_system == base.default_system
    assert TEMPLATES["llava"] is base  # the host's entry is not modified
    with pytest.raises(ValueError, match="Template llava_copy already exists"):
        add_derived_template(templates, "llava_copy", "llava", plugin)
    with pytest.raises(ValueError, match="Template qwen2_vl already exists"):
        add_derived_template(templates, "qwen2_vl", "llava", plugin)
