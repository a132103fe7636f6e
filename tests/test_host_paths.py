"""Host paths that bypass the grounding workflow either work or stop at start-up naming the setting: stages pt, rm,
dpo, kto and ppo with grounding data, `use_hyper_parallel` and `USE_MCA=1` (Megatron-Core) with our keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_env, train_config
from llamafactory_vision.grounding.formats import parse_answer
from llamafactory_vision.grounding.markers import has_markers


def parse(config: dict[str, Any]) -> tuple:
    """The host's own argument parsing (with our keys and checks), as ``llamafactory-cli train`` does it."""
    from llamafactory.hparams import get_train_args

    return get_train_args({k: str(v) if isinstance(v, Path) else v for k, v in config.items()})


@pytest.mark.parametrize(
    ("stage", "why"),
    [
        ("pt", "trains on the prompt text alone and drops the images"),
        ("rm", "needs a chosen and a rejected answer per row"),
        ("dpo", "needs a chosen and a rejected answer per row"),
        ("kto", "needs a desirable/undesirable tag per row"),
    ],
)
def test_stages_that_cannot_use_grounding_rows_refuse_them(stage, why, tiny_models, demo_data, tmp_path):
    config = train_config(tiny_models["qwen2_vl"], demo_data, tmp_path, "qwen2_vl_ground", stage=stage)
    with pytest.raises(ValueError, match=f"synth_ground_train have `formatting: grounding`, which `stage: {stage}`"
                                         ) as error:  # fmt: skip
        parse(config)
    assert why in str(error.value)


def _host_dataset(stage: str, model: Path, data: Path, tmp_path: Path):
    """The host's ``get_dataset`` for ``stage`` on the train split of ``data`` (no start-up checks involved)."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import ModelArguments
    from llamafactory.model import load_tokenizer
    from llamafactory_vision.hparams import VisionDataArguments
    from transformers import Seq2SeqTrainingArguments

    model_args = ModelArguments(model_name_or_path=str(model))
    data_args = VisionDataArguments(dataset="synth_ground_train", dataset_dir=str(data), template="qwen2_vl_ground",
                                    cutoff_len=8192)  # fmt: skip
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    training_args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), do_train=True)
    dataset = get_dataset(template, model_args, data_args, training_args, stage=stage, **tokenizer_module)
    return tokenizer_module["tokenizer"], dataset["train_dataset"]


def test_stage_pt_would_train_on_raw_markers(tiny_models, varied_data, tmp_path):
    """Why pt is refused: the host's pretrain processor never calls the plugin that renders the markers (and it
    drops the answer and the image), so a `reg` row's region stays a raw marker."""
    tokenizer, dataset = _host_dataset("pt", tiny_models["qwen2_vl"], varied_data, tmp_path)
    texts = [tokenizer.decode(sample["input_ids"]) for sample in dataset]
    assert any("⟦lfv:region" in text for text in texts)  # what `stage: pt` would train on; refused at start-up


def test_ppo_renders_the_boxes_of_grounding_rows(tiny_models, varied_data, tmp_path):
    """PPO's processor calls the plugin: prompts and answers carry the family's box text, never a marker."""
    tokenizer, dataset = _host_dataset("ppo", tiny_models["qwen2_vl"], varied_data, tmp_path)
    rows = [json.loads(line) for line in (varied_data / "ground_train.jsonl").read_text().splitlines()]
    assert len(rows) == len(dataset) and {row.get("task", "rec") for row in rows} == {"rec", "reg", "detect"}
    for row, sample in zip(rows, dataset):
        prompt = tokenizer.decode(sample["input_ids"], skip_special_tokens=False)
        answer = tokenizer.decode(sample["labels"], skip_special_tokens=False)
        assert not has_markers(prompt) and not has_markers(answer)
        if row.get("task", "rec") == "reg":
            assert "<|box_start|>" in prompt
        else:
            assert len(parse_answer(answer).boxes) == len(row["objects"])


def test_hyper_parallel_refuses_the_head_and_grounding_predict(tiny_models, demo_data, tmp_path):
    config = train_config(tiny_models["qwen2_vl"], demo_data, tmp_path, "qwen2_vl_ground", use_hyper_parallel=True)
    with pytest.raises(ValueError, match="`bbox_head: true` is not supported with `use_hyper_parallel: true`"):
        parse({**config, "bbox_head": True})
    predict = {**config, "do_train": False, "do_predict": True, "predict_with_generate": True}
    predict["eval_dataset"] = predict.pop("dataset")
    with pytest.raises(ValueError, match="with `use_hyper_parallel: true`: its workflow computes no IoU"):
        parse(predict)
    parse(config)  # training through it renders boxes like any SFT run: allowed


# A stand-in for mcore_adapter with the two names LLaMA-Factory imports when USE_MCA=1 (the real one needs
# Megatron-Core and a GPU); the host then parses with its `_TRAIN_MCA_ARGS` list and `_parse_train_mca_args`.
FAKE_MCORE_ADAPTER = """
from transformers import Seq2SeqTrainingArguments
TrainingArguments = Seq2SeqTrainingArguments
"""

PARSE_WITH_MCA = """
import json, sys
from llamafactory.hparams import parser
config = json.loads(sys.argv[1])
try:
    parsed = parser._parse_train_mca_args(config)
    print(json.dumps({"ok": type(parsed[1]).__name__, "use_mca": parsed[3].use_mca}))
except ValueError as err:
    print(json.dumps({"error": str(err)}))
"""


@pytest.mark.parametrize("bbox_head", [False, True])
def test_use_mca_accepts_our_keys_and_refuses_the_head(bbox_head, tiny_models, demo_data, tmp_path):
    (tmp_path / "mcore_adapter").mkdir()
    (tmp_path / "mcore_adapter" / "__init__.py").write_text(FAKE_MCORE_ADAPTER)
    config = {
        "model_name_or_path": str(tiny_models["qwen2_vl"]), "stage": "sft", "do_train": True,
        "finetuning_type": "full", "dataset": "synth_ground_train", "dataset_dir": str(demo_data),
        "template": "qwen2_vl_ground", "output_dir": str(tmp_path / "out"), "grounding_invalid": "skip",
        "bbox_head": bbox_head,
    }  # fmt: skip
    env = cli_env(USE_MCA="1", PYTHONPATH=os.pathsep.join(filter(None, (str(tmp_path), os.environ.get("PYTHONPATH")))))
    result = subprocess.run([sys.executable, "-c", PARSE_WITH_MCA, json.dumps(config)], env=env,
                            capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    if bbox_head:
        assert "`bbox_head: true` is not supported with `USE_MCA=1`" in outcome["error"]
    else:
        assert outcome == {"ok": "VisionDataArguments", "use_mca": True}


def test_pairwise_stages_tokenize_stock_ranked_data_as_the_host(tiny_models, demo_data, tmp_path):
    """rm/dpo with a grounding template on a stock ranked dataset (no markers): the same tokens as the host's own
    `qwen2_vl` template, so those stages work with our templates."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import ModelArguments
    from llamafactory.model import load_tokenizer
    from llamafactory_vision.hparams import VisionDataArguments
    from transformers import Seq2SeqTrainingArguments

    rows = [json.loads(line) for line in (demo_data / "ground_train.jsonl").open()][:3]
    ranked = [
        {"conversations": [{"from": "human", "value": "<image>Where is the shape? (x1,y1),(x2,y2)"}],
         "chosen": {"from": "gpt", "value": "(100,120),(400,480)"}, "rejected": {"from": "gpt", "value": "nowhere"},
         "images": [str(demo_data / row["images"][0])]}
        for row in rows
    ]  # fmt: skip
    (tmp_path / "ranked.json").write_text(json.dumps(ranked))
    info = {"ranked": {"file_name": "ranked.json", "formatting": "sharegpt", "ranking": True,
                       "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                                   "images": "images"}}}  # fmt: skip
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    model_args = ModelArguments(model_name_or_path=str(tiny_models["qwen2_vl"]))
    tokenized = {}
    for template_name in ("qwen2_vl", "qwen2_vl_ground"):
        data_args = VisionDataArguments(dataset="ranked", dataset_dir=str(tmp_path), template=template_name)
        tokenizer_module = load_tokenizer(model_args)
        template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
        training_args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / template_name), do_train=True)
        dataset = get_dataset(template, model_args, data_args, training_args, stage="rm", **tokenizer_module)
        tokenized[template_name] = dataset["train_dataset"].to_dict()
    assert len(tokenized["qwen2_vl"]["chosen_input_ids"]) == 3
    assert tokenized["qwen2_vl_ground"] == tokenized["qwen2_vl"]
