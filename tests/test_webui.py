"""LLaMA Board additions without a browser: options from the dataclasses, args/YAML/load round trip, the stock UI
unchanged (component by component) and exactly stock when disabled, and the path checks of our file readers."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env

# Builds LLaMA Board's full UI in a fresh interpreter and prints every managed component's id, class and config.
DUMP_UI = r"""
import json, sys
from llamafactory.webui import manager as m
managers = []
init = m.Manager.__init__
def record(self):
    init(self)
    managers.append(self)
m.Manager.__init__ = record
from llamafactory.webui.interface import create_ui
create_ui()
def props(elem):
    config = elem.get_config()
    return {k: v for k, v in config.items() if k not in ("_selectable", "key", "proxy_url", "name", "component_class_id")}
out = {i: [type(e).__name__, props(e)] for i, e in managers[0]._id_to_elem.items()}
json.dump(out, open(sys.argv[1], "w"), default=str)
"""


def dump_ui(tmp_path: Path, name: str, **env: str) -> dict:
    out = tmp_path / f"{name}.json"
    result = subprocess.run(
        [sys.executable, "-c", DUMP_UI, str(out)],
        check=False,
        cwd=tmp_path,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def ui_trees(tmp_path_factory) -> tuple[dict, dict]:
    work = tmp_path_factory.mktemp("ui")
    return dump_ui(work, "stock", LLAMAFACTORY_VISION_DISABLE="1"), dump_ui(work, "ours")


def test_disabled_ui_is_stock_and_ours_only_adds(ui_trees):
    stock, ours = ui_trees
    from llamafactory_vision.webui.options import train_options

    # disabled: none of our ids, templates or model names
    assert not any(i.split(".")[-1] in {o.name for o in train_options()} for i in stock)
    assert "qwen2_vl_ground" not in stock["top.template"][1]["choices"].__str__()
    assert "Grounding" not in str(stock["top.model_name"][1]["choices"])
    # enabled: every stock component is there with the same class and configuration (defaults, labels, ...);
    # only the model, template and stage lists grow
    for elem_id, (cls, config) in stock.items():
        assert ours[elem_id][0] == cls, elem_id
        mine = dict(ours[elem_id][1])
        if elem_id in ("top.model_name", "top.template", "train.training_stage"):
            assert set(map(str, config.pop("choices"))) < set(map(str, mine.pop("choices")))
        assert mine == config, elem_id
    added = {i.split(".", 1)[1] for i in set(ours) - set(stock)}
    expected = {o.name for o in train_options()} | {"image_max_pixels", "image_min_pixels"}
    expected |= {"grounding_preview_btn", "grounding_preview", "prediction_gallery", "edit_gallery"}
    expected.add("grounding_answer")
    expected |= {f"vision_{g}_tab" for g in {o.group for o in train_options()}}
    assert added == expected
    assert "qwen2_vl_ground" in str(ours["top.template"][1]["choices"])
    assert "Qwen2-VL-2B-Instruct-Grounding" in str(ours["top.model_name"][1]["choices"])


def test_options_are_our_dataclass_fields_with_help():
    from llamafactory.hparams.data_args import DataArguments
    from llamafactory.hparams.finetuning_args import FinetuningArguments
    from llamafactory_vision.hparams import VisionDataArguments, VisionFinetuningArguments
    from llamafactory_vision.webui.options import train_options

    ours = {f.name: f for f in dataclasses.fields(VisionDataArguments) + dataclasses.fields(VisionFinetuningArguments)}
    host = {f.name for f in dataclasses.fields(DataArguments) + dataclasses.fields(FinetuningArguments)}
    options = {o.name: o for o in train_options()}
    assert set(options) == set(ours) - host
    for name, option in options.items():
        assert option.help == ours[name].metadata["help"]
        assert option.default == ours[name].default
    assert options["bbox_head"].kind == "checkbox"
    assert options["bbox_head_source"].kind == "dropdown"
    assert options["bbox_head_source"].choices == ("box_start", "box_end")
    assert options["bbox_head_layers"].kind == "int"
    assert options["bbox_loss_weight"].kind == "float"
    assert options["bbox_fused_loss"].kind == "checkbox" and options["bbox_fused_loss"].default is False
    assert options["grounding_invalid"].group == options["bbox_fused_loss"].group == "grounding"


def test_a_mixin_field_gets_a_control_in_its_capability_group():
    """Fields added later (a mixin in another capability's module) appear without UI changes, grouped by module."""
    from llamafactory.hparams.finetuning_args import FinetuningArguments
    from llamafactory_vision.webui.options import options_of

    @dataclasses.dataclass
    class EditingArguments:
        edit_resolution: int = dataclasses.field(default=256, metadata={"help": "Edit image side."})

    EditingArguments.__module__ = "llamafactory_vision.editing.args"

    @dataclasses.dataclass
    class Combined(FinetuningArguments, EditingArguments):
        pass

    (option,) = options_of(Combined, FinetuningArguments)
    assert (option.name, option.group, option.kind, option.default) == ("edit_resolution", "editing", "int", 256)


def test_to_args_keeps_non_defaults_and_names_bad_values():
    from llamafactory_vision.webui.options import to_args, train_options

    options = train_options()
    values = {o.name: o.to_ui(o.default) for o in options}
    assert to_args(options, values) == {}
    values.update(bbox_head=True, bbox_head_layers=2.0, bbox_loss_weight="0.5", grounding_invalid="skip")
    assert to_args(options, values) == {
        "bbox_head": True,
        "bbox_head_layers": 2,
        "bbox_loss_weight": 0.5,
        "grounding_invalid": "skip",
    }
    values["bbox_head_layers"] = 2.5
    with pytest.raises(ValueError, match="bbox_head_layers"):
        to_args(options, values)


def test_stage_registry_adds_to_the_stage_list(monkeypatch):
    from llamafactory.extras.constants import TRAINING_STAGES
    from llamafactory_vision.webui import registry

    assert TRAINING_STAGES["Edit (diffusion-coupled)"] == "edit"  # added when the host's constants were imported
    stock = {display: stage for display, stage in TRAINING_STAGES.items() if stage not in registry.STAGES}
    assert registry.training_stages(stock) == {"Edit (diffusion-coupled)": "edit"}
    assert registry.training_stages(TRAINING_STAGES) == {}  # applying the hook again adds nothing
    monkeypatch.setitem(registry.STAGES, "sft", "Mine")
    with pytest.raises(ValueError, match="clashes"):
        registry.training_stages(stock)


def test_locales_cover_every_host_language():
    from llamafactory.webui.locales import LOCALES
    from llamafactory_vision.webui.locales import HOST_LANGS
    from llamafactory_vision.webui.options import train_options

    for option in train_options():
        entry = LOCALES[option.name]
        assert set(entry) == set(HOST_LANGS)
        assert entry["en"]["info"] == option.help
    assert LOCALES["bbox_head"]["zh"]["label"] == "框回归头"
    assert LOCALES["bbox_fused_loss"]["zh"]["label"] == "融合框损失"
    assert LOCALES["vision_grounding_tab"]["zh"]["label"].startswith("视觉定位")


def test_train_args_preview_yaml_and_load_round_trip(tmp_path, monkeypatch):
    """Our controls reach the preview command, the training YAML the host writes, and come back on "load"."""
    import gradio as gr
    import yaml
    from llamafactory.webui import common, interface
    from llamafactory.webui.components import create_top
    from llamafactory.webui.engine import Engine

    monkeypatch.chdir(tmp_path)
    with gr.Blocks():
        engine = Engine()
        engine.manager.add_elems("top", create_top())
        with gr.Tab("Train"):
            engine.manager.add_elems("train", interface.create_train_tab(engine))
    manager, runner = engine.manager, engine.runner
    inputs = manager.get_base_elems() | {e for i, e in manager._id_to_elem.items() if i.startswith("train.")}
    data = {e: e.value for e in inputs if hasattr(e, "value")}
    data.update({manager.get_elem_by_id(k): v for k, v in {
        "top.lang": "en", "top.model_name": "Qwen2-VL-2B-Instruct-Grounding", "top.model_path": "m",
        "top.template": "qwen2_vl_ground", "train.dataset": ["synth_ground_train"], "train.output_dir": "run",
        "train.bbox_head": True, "train.bbox_loss_weight": 0.5, "train.config_path": "c.yaml",
        "train.training_stage": "Supervised Fine-Tuning",
    }.items()})  # fmt: skip
    args = runner._parse_train_args(data)
    assert args["bbox_head"] is True and args["bbox_loss_weight"] == 0.5
    assert "bbox_l1_weight" not in args  # defaults stay out
    assert "--bbox_head True" in common.gen_cmd(args)
    saved = yaml.safe_load(Path(common.save_cmd(args)).read_text())
    assert saved["bbox_head"] is True and saved["bbox_loss_weight"] == 0.5
    runner.save_args(data)
    loaded = runner.load_args("en", "c.yaml")
    assert loaded[manager.get_elem_by_id("train.bbox_head")] is True
    assert loaded[manager.get_elem_by_id("train.bbox_loss_weight")] == 0.5


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/hostname", "link/escape.png"])
def test_paths_outside_the_dataset_dir_are_refused(tmp_path, bad):
    from llamafactory_vision.webui.pictures import dataset_file, row_image
    from llamafactory_vision.webui.safe_paths import OutsideError, resolve_under

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (tmp_path / "outside.png").write_bytes(b"x")
    (data / "images" / "ok.png").write_bytes(b"x")
    os.symlink(tmp_path, data / "link")  # a symlink pointing out of the dataset dir
    assert resolve_under(data, "images/ok.png") == (data / "images" / "ok.png").resolve()
    assert resolve_under(data, str(data / "images" / "ok.png")).name == "ok.png"  # absolute but inside
    with pytest.raises(OutsideError, match="outside"):
        row_image({"images": [bad]}, str(data), "row 0")
    (data / "dataset_info.json").write_text(json.dumps({"d": {"file_name": bad}}))
    with pytest.raises(OutsideError, match="file_name"):
        dataset_file(str(data), "d")


def test_predictions_symlinked_out_of_the_output_dir_are_refused(tmp_path):
    from llamafactory_vision.webui.pictures import prediction_pictures
    from llamafactory_vision.webui.safe_paths import OutsideError

    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "elsewhere.jsonl").write_text("{}\n")
    os.symlink(tmp_path / "elsewhere.jsonl", out / "generated_predictions.jsonl")
    with pytest.raises(OutsideError):
        prediction_pictures(str(out), str(tmp_path), ["d"], 10, "qwen2_vl_ground", "m", 768 * 768, 32 * 32)


def test_prediction_pictures_draw_label_and_predicted_boxes(tmp_path):
    """Oracle: pixel colours at the box edges the rows define (0-1000 relative boxes on a 200x100 grey image)."""
    from llamafactory_vision.webui.pictures import prediction_pictures
    from PIL import Image

    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    out.mkdir()
    Image.new("RGB", (200, 100), (128, 128, 128)).save(data / "a.png")
    row = {"images": ["a.png"], "objects": [{"ref": "x", "bbox": [20, 10, 100, 50]}]}
    (data / "d.jsonl").write_text(json.dumps(row) + "\n")
    (data / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.jsonl", "formatting": "grounding"}}))
    pred = {"prompt": "p", "label": "x(100,100),(500,500)", "predict": "x(500,500),(900,900)"}
    (out / "generated_predictions.jsonl").write_text(json.dumps(pred) + "\n")
    ((picture, caption),) = prediction_pictures(str(out), str(data), ["d"], 10, "qwen2_vl_ground", "m", 1, 1)
    assert caption.startswith("d #0")
    assert picture.getpixel((60, 10)) == (0, 200, 0)  # label top edge: y = 100/1000 * 100
    assert picture.getpixel((140, 90)) == (230, 0, 0)  # predicted bottom edge: y = 900/1000 * 100
    assert picture.getpixel((150, 30)) == (128, 128, 128)


def test_chat_answer_boxes_drawn_on_the_input_image():
    """Oracle: a Qwen2-VL answer's 0-1000 box lands at those fractions of the input image; no box, no picture."""
    from llamafactory_vision.webui.pictures import answer_picture
    from PIL import Image

    image = Image.new("RGB", (300, 200), (128, 128, 128))
    drawn = answer_picture(image, "the red car(100,250),(500,750)", "qwen2_vl_ground", processor=None)
    assert drawn.getpixel((90, 50)) == (230, 0, 0)  # top edge y = 0.25 * 200, between x = 30 and 150
    assert drawn.getpixel((90, 100)) == (128, 128, 128)
    assert image.getpixel((90, 50)) == (128, 128, 128)  # the input is not modified
    assert answer_picture(image, "I cannot see it", "qwen2_vl_ground", processor=None) is None
    assert answer_picture(image, "(1,1),(2,2)", "qwen2_vl", processor=None) is None  # not a grounding template


# --- edit models (llava_edit): Evaluate & Predict, the edit gallery, the chat -----------------------------------


def _edit_run_files(tmp_path: Path, n: int) -> tuple[Path, Path, list[dict]]:
    """A dataset dir with n source/target pairs and an output dir as an edit predict run leaves it (predictions
    naming the images as the run read them, edited/{i:05d}.png), every image one distinct flat colour."""
    from PIL import Image

    data, out = tmp_path / "data", tmp_path / "out"
    (data / "images").mkdir(parents=True)
    (out / "edited").mkdir(parents=True)
    rows = []
    for i in range(n):
        for kind, shade in (("src", 10), ("tgt", 20), ("out", 30)):
            folder = out / "edited" if kind == "out" else data / "images"
            name = f"{i:05d}.png" if kind == "out" else f"{kind}{i}.png"
            Image.new("RGB", (16, 12), (shade + i, 0, 0)).save(folder / name)
        rows.append({"source": str(data / "images" / f"src{i}.png"), "target": str(data / "images" / f"tgt{i}.png"),
                     "instruction": f"make it red {i}", "predict": f"a redder picture {i}"})  # fmt: skip
    (out / "generated_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, out, rows


def test_edit_gallery_shows_source_output_target_per_row(tmp_path, monkeypatch):
    """Oracle: the colour each file was written with, in source / output / target order, for the first rows."""
    from llamafactory_vision.webui.pictures import edit_pictures

    data, out, rows = _edit_run_files(tmp_path, 3)
    monkeypatch.chdir(tmp_path)  # a run given a relative dataset_dir names its images relative to LLaMA Board's cwd
    rows[1]["source"] = "data/images/src1.png"
    (out / "generated_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shown = edit_pictures(str(out), "data", "llava_edit", limit=2)
    assert [picture.getpixel((0, 0))[0] for picture, _ in shown] == [10, 30, 20, 11, 31, 21]
    assert [caption for _, caption in shown][:3] == ["#0 source: make it red 0", "#0 output: a redder picture 0",
                                                     "#0 target"]  # fmt: skip
    assert len(edit_pictures(str(out), str(data), "llava_edit")) == 9
    assert edit_pictures(str(out), str(data), "qwen2_vl_ground") == []  # not an edit template
    assert edit_pictures(str(tmp_path / "empty"), str(data), "llava_edit") == []  # no predict run yet


@pytest.mark.parametrize("bad", ["dotdot", "absolute", "symlink_in_data", "edited_symlink"])
def test_edit_gallery_refuses_files_outside_the_dataset_and_output_dirs(tmp_path, bad):
    from llamafactory_vision.webui.pictures import edit_pictures
    from llamafactory_vision.webui.safe_paths import OutsideError
    from PIL import Image

    data, out, rows = _edit_run_files(tmp_path, 1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (4, 4)).save(elsewhere / "secret.png")
    if bad == "dotdot":
        rows[0]["target"] = str(data / ".." / "elsewhere" / "secret.png")
    elif bad == "absolute":
        rows[0]["source"] = str(elsewhere / "secret.png")
    elif bad == "symlink_in_data":
        os.symlink(elsewhere, data / "link")
        rows[0]["source"] = str(data / "link" / "secret.png")
    else:
        (out / "edited" / "00000.png").unlink()
        os.symlink(elsewhere / "secret.png", out / "edited" / "00000.png")
    (out / "generated_predictions.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(OutsideError, match="outside"):
        edit_pictures(str(out), str(data), "llava_edit")


def test_edit_gallery_names_a_row_without_its_images(tmp_path):
    from llamafactory_vision.webui.pictures import edit_pictures

    data, out, rows = _edit_run_files(tmp_path, 2)
    del rows[1]["target"]
    (out / "generated_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TypeError, match=r"row 1, field `target`"):
        edit_pictures(str(out), str(data), "llava_edit")


def _eval_board(tmp_path, monkeypatch):
    """LLaMA Board's top bar and Evaluate tab, built in-process (our wrappers included), with every value at its
    default; returns (engine, data)."""
    import gradio as gr
    from llamafactory.webui import interface
    from llamafactory.webui.components import create_top
    from llamafactory.webui.engine import Engine

    monkeypatch.chdir(tmp_path)
    with gr.Blocks():
        engine = Engine()
        engine.manager.add_elems("top", create_top())
        with gr.Tab("Evaluate"):
            engine.manager.add_elems("eval", interface.create_eval_tab(engine))
    manager = engine.manager
    inputs = manager.get_base_elems() | {e for i, e in manager._id_to_elem.items() if i.startswith("eval.")}
    return engine, {e: e.value for e in inputs if hasattr(e, "value")}


def test_evaluate_tab_runs_the_edit_stage_with_the_recorded_settings(tmp_path, monkeypatch):
    """An llava_edit checkpoint predicts through `stage: edit` with the settings its run recorded, unless the UI sets
    one; the CLIP model set in the tab reaches the command. Other templates keep the host's `stage: sft`."""
    import gradio as gr
    from llamafactory.webui import common
    from llamafactory_vision.editing.parts import EditRecord

    engine, data = _eval_board(tmp_path, monkeypatch)
    manager, runner = engine.manager, engine.runner
    run = tmp_path / "saves" / "LLaVA-1.5-7B-Chat-Edit" / "lora" / "edit_run"
    run.mkdir(parents=True)
    EditRecord("diff/ip2p", "llava_edit", 32, 3, 7.5, 1.5, 6).save(run)
    data.update({manager.get_elem_by_id(k): v for k, v in {
        "top.lang": "en", "top.model_name": "LLaVA-1.5-7B-Chat-Edit", "top.model_path": "m",
        "top.finetuning_type": "lora", "top.template": "llava_edit", "top.checkpoint_path": ["edit_run"],
        "eval.dataset": ["synth_edit_val"], "eval.output_dir": "pred", "eval.predict": True,
        "eval.edit_clip_model": "clip", "eval.edit_num_inference_steps": 5,
    }.items()})  # fmt: skip
    args = runner._parse_eval_args(data)
    assert args["stage"] == "edit" and args["do_predict"] is True
    assert "predict_with_generate" not in args  # the host allows it with `stage: sft` only
    assert args["adapter_name_or_path"] == str(Path("saves/LLaVA-1.5-7B-Chat-Edit/lora/edit_run"))
    assert (args["diffusion_model_name_or_path"], args["edit_resolution"]) == ("diff/ip2p", 32)  # recorded
    assert (args["edit_image_guidance"], args["edit_max_new_tokens"]) == (1.5, 6)
    assert args["edit_num_inference_steps"] == 5 and args["edit_clip_model"] == "clip"  # set in the tab
    assert "--stage edit" in common.gen_cmd(args) and "--edit_clip_model clip" in common.gen_cmd(args)

    (run / "edit_config.json").unlink()  # not an edit run: said before anything starts
    with pytest.raises(gr.Error, match="edit_config.json"):
        runner._parse_eval_args(data)
    data[manager.get_elem_by_id("top.template")] = "llava"
    assert runner._parse_eval_args(data)["stage"] == "sft"


def test_chat_loads_an_edit_template_with_its_img_tokens():
    from llamafactory_vision.editing.tokens import IMG_TOKENS
    from llamafactory_vision.webui.edit_runs import with_img_token_args

    stock = '{"vllm_enforce_eager": true}'
    assert with_img_token_args("llava", stock) == stock
    assert json.loads(with_img_token_args("llava_edit", stock)) == {
        "vllm_enforce_eager": True, "add_special_tokens": ",".join(IMG_TOKENS)
    }  # fmt: skip
    mine = json.loads(with_img_token_args("llava_edit", '{"add_special_tokens": "<a>,[IMG0]"}'))
    assert mine["add_special_tokens"].split(",") == ["<a>", *IMG_TOKENS]  # the user's first, as with_img_tokens
    assert with_img_token_args("llava_edit", "{not json") == "{not json"  # the host reports bad JSON itself


def test_chat_shows_the_image_edited_from_the_answer(edit_models, edit_data, tmp_path, monkeypatch):
    """The Chat tab loads an edit run's checkpoint through the host's loader (with its [IMG] tokens), answers, and the
    image edited from that answer joins the chat. Oracle: ``EditPipeline.from_training`` on the same run, given the
    same answer, settings and seed (the CLI's path, not the chat engine's model)."""
    import gradio as gr
    import numpy as np
    import torch
    from conftest import edit_config, read_jsonl, run_cli, write_yaml
    from llamafactory.webui import interface
    from llamafactory.webui.components import create_top
    from llamafactory.webui.engine import Engine
    from llamafactory_vision.editing.pipeline import EditPipeline
    from PIL import Image

    run = tmp_path / "run"
    config = edit_config(edit_models, edit_data, run, max_steps=1, edit_num_inference_steps=2, edit_max_new_tokens=4)
    run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "edit.yaml", config))], cwd=tmp_path)

    monkeypatch.chdir(tmp_path)
    with gr.Blocks():
        engine = Engine()
        engine.manager.add_elems("top", create_top())
        with gr.Tab("Chat"):
            engine.manager.add_elems("infer", interface.create_infer_tab(engine))
    manager, chatter = engine.manager, engine.chatter
    data = {e: e.value for e in manager.get_base_elems() | set(manager._id_to_elem.values()) if hasattr(e, "value")}
    data.update({manager.get_elem_by_id(k): v for k, v in {
        "top.lang": "en", "top.model_name": "LLaVA-1.5-7B-Chat-Edit", "top.model_path": str(edit_models["llava"]),
        "top.finetuning_type": "lora", "top.template": "llava_edit", "top.checkpoint_path": [str(run)],
        "infer.infer_dtype": "float32",
    }.items()})  # fmt: skip
    assert list(chatter.load_model(data))[-1].startswith("Model loaded")
    row = read_jsonl(edit_data / "edit_val.jsonl")[0]
    image = Image.open(edit_data / row["source"]).convert("RGB")
    chatbot, messages, _ = chatter.append([], [], "user", row["instruction"], True)
    # host inputs after messages: lang, system, tools, image, video, audio, max_new_tokens, top_p, temperature,
    # skip_special_tokens, escape_html, enable_thinking
    *_, (shown, conversation) = chatter.stream(chatbot, messages, "en", "", "", image, None, None, 4, 0.7, 0.95, True,
                                              True, True)  # fmt: skip
    assert [m["role"] for m in conversation] == ["user", "assistant"]  # the model's next turn sees text only
    assert len(shown) == 3 and isinstance(shown[-1]["content"], gr.Image)
    picture = np.asarray(Image.open(shown[-1]["content"].value["path"]).convert("RGB"), dtype=np.int16)

    oracle = EditPipeline.from_training(str(edit_models["llava"]), str(run))
    expected = oracle(
        image, row["instruction"], num_inference_steps=2, resolution=32, max_new_tokens=4,
        generator=torch.Generator().manual_seed(0), expressive=conversation[-1]["content"],
    ).images[0]  # fmt: skip
    assert picture.shape == (32, 32, 3)
    assert np.abs(picture - np.asarray(expected, dtype=np.int16)).max() <= 1


def test_chat_edit_image_only_for_an_edit_run_on_the_huggingface_backend(tmp_path):
    from llamafactory_vision.editing.parts import EditRecord
    from llamafactory_vision.webui.edit_runs import chat_edit_image, register_chat_engine

    class Engine:  # the host's vLLM/SGLang engines hold no in-process model
        name = "vllm"

    EditRecord("diff", "llava_edit", 32, 2, 7.5, 1.5, 4).save(tmp_path)
    engine = Engine()
    assert register_chat_engine(engine, "llava", tmp_path) is False  # not the edit template
    assert register_chat_engine(engine, "llava_edit", tmp_path / "elsewhere") is False  # not an edit run's output
    with pytest.raises(ValueError, match="huggingface backend"):
        register_chat_engine(engine, "llava_edit", tmp_path)
    turn = [{"role": "user", "content": "make it red"}, {"role": "assistant", "content": "a red picture"}]
    assert chat_edit_image(engine, object(), turn) is None  # never registered: the chat stays text only
