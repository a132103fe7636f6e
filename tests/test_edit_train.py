"""In-process checks of the edit trainer: where gradients flow, and that training lowers the diffusion loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import edit_config
from llamafactory_vision.editing.parts import HEAD_ATTR, UNET_ATTR, VAE_ATTR, WEIGHTS
from safetensors.torch import load_file


def _build(edit_models, edit_data, out, **extra):
    from llamafactory.hparams import get_train_args
    from llamafactory_vision.editing.workflow import build_edit_trainer

    config = edit_config(edit_models, edit_data, out, **extra)
    plain = {k: str(v) if isinstance(v, Path) else v for k, v in config.items()}  # as from a YAML file
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(plain)
    return build_edit_trainer(model_args, data_args, training_args, finetuning_args)


@pytest.fixture(scope="module")
def built(edit_models, edit_data, tmp_path_factory):
    return _build(edit_models, edit_data, tmp_path_factory.mktemp("edit_train"), per_device_train_batch_size=4)


def test_gradients_reach_trained_parts_only(built):
    trainer, _, tokenizer_module, _, _ = built
    model = trainer.model
    model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(model, batch)
    model.zero_grad()
    loss.backward()
    named = dict(model.named_parameters())

    for prefix in (HEAD_ATTR, UNET_ATTR):  # edit head and UNet: every parameter trained
        params = {n: p for n, p in named.items() if n.startswith(prefix + ".")}
        assert params and all(p.requires_grad and p.grad is not None for p in params.values()), prefix
        assert sum(p.grad.abs().sum() for p in params.values()) > 0
    for name, param in named.items():  # frozen: VAE, vision tower, projector, base LLM weights
        frozen = name.startswith(VAE_ATTR + ".") or "vision_tower" in name or "multi_modal_projector" in name
        frozen |= "base_layer" in name
        if frozen:
            assert not param.requires_grad and param.grad is None, name
    lora = [p for n, p in named.items() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)

    # the [IMG] rows of the (trainable copies of) input embeddings and lm_head get gradient
    img_ids = tokenizer_module["tokenizer"].convert_tokens_to_ids([f"[IMG{i}]" for i in range(8)])
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert embed.requires_grad and head.requires_grad
    assert (embed.grad[img_ids].abs().sum(-1) > 0).all()
    assert (head.grad[img_ids].abs().sum(-1) > 0).all()


def test_loss_is_lm_plus_weighted_diffusion(built):
    trainer = built[0]
    model = trainer.model
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer._stored_metrics.clear()
    with torch.no_grad():
        total = trainer.compute_loss(model, batch)
        lm = model(**{k: v for k, v in batch.items() if not k.startswith("edit_")}).loss  # the host model's own CE
    stored = trainer._stored_metrics["train"]
    assert stored["lm_loss"][-1] == pytest.approx(lm.item(), rel=1e-5)
    assert total.item() == pytest.approx(lm.item() + 0.5 * stored["diffusion_loss"][-1], rel=1e-5)


def test_diffusion_loss_falls_on_a_fixed_batch(edit_models, edit_data, tmp_path):
    trainer = _build(edit_models, edit_data, tmp_path, per_device_train_batch_size=4, learning_rate=2e-3)[0]
    model = trainer.model
    model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    optimizer = trainer.create_optimizer()
    losses = []
    for _ in range(12):  # global_step stays 0: the same noise, timesteps and dropout draws every time
        trainer._stored_metrics.clear()
        loss = trainer.compute_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(trainer._stored_metrics["train"]["diffusion_loss"][-1])
    assert losses[-1] < 0.7 * losses[0], losses


def test_split_batch_gives_the_same_losses(built):
    """What data parallelism relies on: the CE over a batch of 4 equals the token-weighted CE of its halves, and the
    diffusion loss (per-row seeded draws) equals the mean of the halves' means."""
    trainer = built[0]
    dataset, collator = trainer.train_dataset, trainer.data_collator
    rows = [dataset[i] for i in range(4)]

    def losses(batch_rows):
        batch = trainer._prepare_inputs(collator(batch_rows))
        items = (batch["labels"][:, 1:] != -100).sum()
        trainer._stored_metrics.clear()
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch, num_items_in_batch=items)
        stored = trainer._stored_metrics["train" if trainer.model.training else "eval"]
        return stored["lm_loss"][-1], stored["diffusion_loss"][-1], items.item()

    lm, diffusion, _ = losses(rows)
    (lm_a, diff_a, n_a), (lm_b, diff_b, n_b) = losses(rows[:2]), losses(rows[2:])
    assert lm == pytest.approx((lm_a * n_a + lm_b * n_b) / (n_a + n_b), rel=1e-6)
    assert diffusion == pytest.approx((diff_a + diff_b) / 2, rel=1e-6)


def test_zero3_partitioned_parts_are_saved_gathered(built, tmp_path, monkeypatch):
    """Under DeepSpeed ZeRO-3 (the CPU stand-in) the edit head and UNet hold empty placeholders: ``save_model``, run
    on every rank, gathers them once per part, the saving rank writes full weights that ``from_pretrained`` loads,
    a rank that saves nothing still enters the gathers, and ``load_best_model_at_end`` leaves the parts to the
    DeepSpeed engine."""
    from diffusers import UNet2DConditionModel
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
    from llamafactory_vision.editing.edit_head import EditHead
    from llamafactory_vision.editing.parts import HEAD_DIR, UNET_DIR, save_parts
    from zero3_stand_in import ZeroStage3

    trainer = built[0]
    model = trainer.model
    parts = torch.nn.ModuleList([getattr(model, HEAD_ATTR), getattr(model, UNET_ATTR)])
    expected = {attr: {k: v.clone() for k, v in getattr(model, attr).state_dict().items()}
                for attr in (HEAD_ATTR, UNET_ATTR)}  # fmt: skip
    stage = ZeroStage3(parts)
    stage.install(monkeypatch)
    try:
        # what diffusers' own save_pretrained writes from the placeholders: a head that loads nothing
        getattr(model, HEAD_ATTR).save_pretrained(tmp_path / "plain")
        assert all(v.numel() == 0 for v in load_file(str(tmp_path / "plain" / WEIGHTS)).values())
        raw = {attr: getattr(model, attr).state_dict() for attr in (HEAD_ATTR, UNET_ATTR)}
        with pytest.raises(ValueError, match="edit part edit_head/ weights .* are empty: gather them"):
            save_parts(model, tmp_path / "raw", states=raw)

        trainer.save_model(str(tmp_path / "ckpt"))
        assert [len(params) for params in stage.gathered] == [
            len(list(getattr(model, attr).parameters())) for attr in (HEAD_ATTR, UNET_ATTR)
        ]  # one gather per part, of all its weights

        with monkeypatch.context() as m:  # another rank: enters the same gathers, writes nothing
            m.setattr(type(trainer.args), "should_save", property(lambda self: False))
            trainer.save_model(str(tmp_path / "other_rank"))
        assert len(stage.gathered) == 4 and not (tmp_path / "other_rank" / UNET_DIR).exists()

        with monkeypatch.context() as m:  # the host's DeepSpeed branch restores the engine (stubbed here)
            m.setattr(trainer, "is_deepspeed_enabled", True)
            m.setattr(CustomSeq2SeqTrainer, "_load_best_model", lambda self: None)
            m.setattr(trainer.state, "best_model_checkpoint", str(tmp_path / "ckpt"))
            trainer._load_best_model()  # loading files into the placeholders would raise a size mismatch
    finally:
        stage.restore()
    loaded = {HEAD_ATTR: EditHead.from_pretrained(tmp_path / "ckpt" / HEAD_DIR).state_dict(),
              UNET_ATTR: UNet2DConditionModel.from_pretrained(tmp_path / "ckpt" / UNET_DIR).state_dict()}  # fmt: skip
    for attr, state in expected.items():
        assert loaded[attr].keys() == state.keys(), attr
        assert all(torch.equal(loaded[attr][k], v) for k, v in state.items()), attr


def test_predict_under_zero3_is_refused_at_start_up(edit_models, edit_data, tmp_path, monkeypatch):
    """Edit prediction cannot keep ZeRO-3's per-forward collectives in step: refused before anything loads."""
    from llamafactory.hparams import get_train_args
    from llamafactory_vision.editing import workflow

    config = edit_config(edit_models, edit_data, tmp_path / "out", do_train=False, do_predict=True,
                         eval_dataset="synth_edit_val")  # fmt: skip
    config.pop("dataset")
    args = get_train_args({k: str(v) if isinstance(v, Path) else v for k, v in config.items()})
    monkeypatch.setattr(workflow, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    monkeypatch.setattr(workflow, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ValueError, match=r"cannot `do_predict` under DeepSpeed ZeRO-3.*`deepspeed: null`"):
        workflow.run_edit(*args)
    monkeypatch.setattr(workflow, "is_deepspeed_zero3_enabled", lambda: False)
    workflow.check_edit_predict(args[2])  # without ZeRO-3: allowed
