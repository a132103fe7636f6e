"""In-process checks of the edit trainer: where gradients flow, and that training lowers the diffusion loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import edit_config
from llamafactory_vision.editing.parts import HEAD_ATTR, UNET_ATTR, VAE_ATTR


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
