"""`convert ip2p` / `convert magicbrush`: rows, relative paths (resolved by the host's media lookup), stats, errors
naming file/record/field, counted skips, and that the written rows pass the `edit` format converter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llamafactory_vision.cli import main as cli_main
from llamafactory_vision.editing.convert import EditConvertStats, convert_ip2p, convert_magicbrush
from PIL import Image

PROMPTS = {
    "0001": {"input": "a house", "edit": "make it snowy", "output": "a house in snow"},
    "0002": {"input": "a dog", "edit": " turn it into a cat ", "output": "a cat"},
}


def _image(path: Path, color: str, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 8), color).save(path, fmt)


@pytest.fixture
def ip2p(tmp_path: Path) -> Path:
    """Two InstructPix2Pix sample folders: 0001 with seeds 11 and 7, 0002 with seed 5."""
    root = tmp_path / "ip2p"
    for sample, seeds in (("0001", ("11", "7")), ("0002", ("5",))):
        folder = root / "shard-00" / sample
        folder.mkdir(parents=True)
        (folder / "prompt.json").write_text(json.dumps(PROMPTS[sample]))
        for seed in seeds:
            _image(folder / f"{seed}_0.jpg", "red")
            _image(folder / f"{seed}_1.jpg", "blue")
    return root


@pytest.fixture
def magicbrush(tmp_path: Path) -> Path:
    """A two-turn MagicBrush session: turn 2 edits turn 1's output."""
    root = tmp_path / "mb"
    for name, color in (("s.png", "red"), ("m1.png", "white"), ("t1.png", "green"), ("m2.png", "white"),
                        ("t2.png", "blue")):  # fmt: skip
        _image(root / "images" / name, color, "PNG")
    lines = [
        {"img_id": "327726", "turn_index": 1, "source_img": "s.png", "mask_img": "m1.png",
         "instruction": "put a hat on him", "target_img": "t1.png"},
        {"img_id": "327726", "turn_index": 2, "source_img": "t1.png", "mask_img": "m2.png",
         "instruction": "make the hat red", "target_img": "t2.png"},
    ]  # fmt: skip
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")
    return root


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ip2p_one_row_per_seed_pair(tmp_path: Path, ip2p: Path) -> None:
    out = tmp_path / "data" / "ip2p.jsonl"
    stats = convert_ip2p(ip2p, out)
    assert stats == EditConvertStats(rows=3, images=6)
    base = "../ip2p/shard-00"
    assert _rows(out) == [
        {"source": f"{base}/0001/11_0.jpg", "instruction": "make it snowy", "target": f"{base}/0001/11_1.jpg",
         "target_caption": "a house in snow"},
        {"source": f"{base}/0001/7_0.jpg", "instruction": "make it snowy", "target": f"{base}/0001/7_1.jpg",
         "target_caption": "a house in snow"},
        {"source": f"{base}/0002/5_0.jpg", "instruction": "turn it into a cat", "target": f"{base}/0002/5_1.jpg",
         "target_caption": "a cat"},
    ]  # fmt: skip


def test_magicbrush_one_row_per_turn(tmp_path: Path, magicbrush: Path) -> None:
    out = tmp_path / "data" / "mb.jsonl"
    stats = convert_magicbrush(magicbrush / "train.jsonl", out, images_dir=magicbrush / "images")
    assert stats == EditConvertStats(rows=2, images=3)
    assert _rows(out) == [
        {"source": "../mb/images/s.png", "instruction": "put a hat on him", "target": "../mb/images/t1.png"},
        {"source": "../mb/images/t1.png", "instruction": "make the hat red", "target": "../mb/images/t2.png"},
    ]
    (magicbrush / "images" / "t2.png").rename(magicbrush / "t2.png")  # default images folder: the JSONL's
    with pytest.raises(ValueError, match=r"line 1 \(img_id '327726', turn 1\)\.source_img: image file .*s\.png"):
        convert_magicbrush(magicbrush / "train.jsonl", out)


def _ip2p_error_cases():
    def unpaired(root):
        (root / "shard-00" / "0001" / "7_1.jpg").unlink()

    def corrupt(root):
        (root / "shard-00" / "0002" / "5_0.jpg").write_bytes(b"not a jpeg")

    def no_edit(root):
        (root / "shard-00" / "0002" / "prompt.json").write_text(json.dumps({"input": "a", "output": "b"}))

    def no_pairs(root):
        for file in (root / "shard-00" / "0002").glob("*.jpg"):
            file.unlink()

    return [
        (no_pairs, r"0002: no <seed>_0\.jpg / <seed>_1\.jpg pair beside prompt\.json", {"missing_image": 1}),
        (unpaired, r"0001: pair 7\.target: 7_0\.jpg has no partner 7_1\.jpg", {"unpaired_image": 1}),
        (corrupt, r"0002: pair 5\.source: cannot read image '.*5_0\.jpg'", {"corrupt_image": 1}),
        (no_edit, r"0002/prompt\.json: prompt\.edit: missing field", {"invalid": 1}),
    ]


@pytest.mark.parametrize(
    ("mutate", "pattern", "skipped"), _ip2p_error_cases(), ids=["no_pairs", "unpaired", "corrupt", "field"]
)
def test_ip2p_bad_record_is_an_error_or_a_counted_skip(tmp_path, ip2p, mutate, pattern, skipped) -> None:
    mutate(ip2p)
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match=pattern):
        convert_ip2p(ip2p, out)
    stats = convert_ip2p(ip2p, out, skip_invalid=True)
    assert (stats.rows, stats.skipped, stats.skipped_by_reason) == (2, 1, skipped)
    assert len(_rows(out)) == 2


def test_magicbrush_bad_line_is_an_error_or_a_counted_skip(tmp_path: Path, magicbrush: Path) -> None:
    (magicbrush / "images" / "m2.png").unlink()
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match=r"train\.jsonl: line 2 \(img_id '327726', turn 2\)\.mask_img: image file"):
        convert_magicbrush(magicbrush / "train.jsonl", out, magicbrush / "images")
    stats = convert_magicbrush(magicbrush / "train.jsonl", out, magicbrush / "images", skip_invalid=True)
    assert stats == EditConvertStats(rows=1, images=2, skipped=1, skipped_by_reason={"missing_image": 1})
    with (magicbrush / "train.jsonl").open("a") as f:
        f.write('{"source_img": "s.png", "mask_img": "m1.png", "target_img": "t1.png"}\n{oops\n')
    with pytest.raises(ValueError, match=r"line 2 .*mask_img"):  # the first bad line stops
        convert_magicbrush(magicbrush / "train.jsonl", out, magicbrush / "images")
    stats = convert_magicbrush(magicbrush / "train.jsonl", out, magicbrush / "images", skip_invalid=True)
    assert stats.skipped_by_reason == {"invalid": 2, "missing_image": 1}
    _image(magicbrush / "images" / "m2.png", "white", "PNG")  # line 2 is good again (3 is blank): line 4 stops now
    with pytest.raises(ValueError, match=r"train\.jsonl: line 4\.instruction: missing field"):
        convert_magicbrush(magicbrush / "train.jsonl", out, magicbrush / "images")
    no_mask = {"source_img": "s.png", "instruction": "add a cat", "target_img": "t1.png"}  # first releases: no masks
    (magicbrush / "no_mask.jsonl").write_text(json.dumps(no_mask) + "\n")
    assert convert_magicbrush(magicbrush / "no_mask.jsonl", out, magicbrush / "images").rows == 1
    (magicbrush / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 1: not valid JSON"):
        convert_magicbrush(magicbrush / "bad.jsonl", out, magicbrush / "images")


def test_cli_prints_the_stats(tmp_path: Path, ip2p: Path, magicbrush: Path, capsys) -> None:
    (ip2p / "shard-00" / "0001" / "7_1.jpg").unlink()
    out = tmp_path / "ip2p.jsonl"
    assert cli_main(["convert", "ip2p", "--root", str(ip2p), "--out", str(out), "--skip-invalid"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"out": str(out), "rows": 2, "images": 4, "skipped": 1,
                       "skipped_by_reason": {"unpaired_image": 1}}  # fmt: skip
    args = ["convert", "magicbrush", "--jsonl", str(magicbrush / "train.jsonl"), "--images",
            str(magicbrush / "images"), "--out", str(tmp_path / "mb.jsonl")]  # fmt: skip
    assert cli_main(args) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 2


def test_written_rows_pass_the_edit_format_from_the_output_folder(tmp_path, ip2p, magicbrush, monkeypatch) -> None:
    """Oracle: LLaMA-Factory's media lookup (through the edit format's converter) with dataset_dir = the output
    folder, run from another working directory; every row converts into a training conversation."""
    from llamafactory_vision.editing.data import EditDatasetConverter
    from llamafactory_vision.editing.dataset_attr import EditDatasetAttr
    from llamafactory_vision.hparams import VisionDataArguments

    monkeypatch.chdir(tmp_path)
    convert_ip2p("ip2p", Path("data/edit/ip2p.jsonl"))  # relative arguments, as typed in a shell
    convert_magicbrush("mb/train.jsonl", Path("data/edit/mb.jsonl"), "mb/images")
    data_dir = tmp_path / "data" / "edit"
    attr = EditDatasetAttr("file", dataset_name="ip2p")
    attr.join({"file_name": "ip2p.jsonl", "formatting": "edit"})
    data_args = VisionDataArguments(template="llava_edit", dataset_dir=str(data_dir))
    converter = EditDatasetConverter(attr, data_args)
    monkeypatch.chdir(ip2p / "shard-00")  # somewhere else: only dataset_dir may make the paths resolve
    rows = _rows(data_dir / "ip2p.jsonl") + _rows(data_dir / "mb.jsonl")
    assert len(rows) == 5
    for i, row in enumerate(rows):
        converted = converter(row, i)
        assert Path(converted["_images"][0]).resolve() == (data_dir / row["source"]).resolve()
        assert Path(converted["_edit_target"]).resolve() == (data_dir / row["target"]).resolve()
        assert Path(converted["_edit_target"]).is_file()
        assert converted["_edit_instruction"] == row["instruction"]
        assert converted["_edit_caption"] == row.get("target_caption", "")
        assert row["instruction"] in converted["_prompt"][0]["content"]
