"""Masked training binds the mask fields to the weights it produced: an edited turnover_config.json is refused at
load, and weights changed after training (trained further without masks) are named, and turn-over scores of them
refused, never computed silently."""

import json
import logging

import pytest
import torch
from transformers import TrainingArguments

import turnover_hf as th
from turnover_hf.errors import ConfigMismatchError

from conftest import tiny_bert, token_task, with_bottleneck


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bound")
    train = th.add_example_ids(token_task(16, seed=0))
    model = th.patch_model(with_bottleneck(tiny_bert()), th.TurnoverConfig(seed=5), freeze_leaking=True)
    args = TrainingArguments(str(root / "run"), per_device_train_batch_size=8, num_train_epochs=1, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, learning_rate=1e-2)
    trainer = th.TurnoverTrainer(model=model, args=args, train_dataset=train)
    trainer.train()
    trainer.save_model(str(root / "model"))
    return root / "model", train


def _edit_config(folder, **fields):
    path = folder / th.CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_a_trained_checkpoint_records_the_binding_and_loads_silently(trained, caplog):
    folder, train = trained
    bound = json.loads((folder / th.CONFIG_NAME).read_text())["trained_weights"]
    assert set(bound) == {"masks", "weights"}
    with caplog.at_level(logging.WARNING):
        model = th.load_influence_ready(folder)
        pipe = th.InfluencePipeline(model, train_dataset=train, estimator="turnover")
    assert not [r for r in caplog.records if "differ from those" in r.getMessage() or "edited" in r.getMessage()]
    assert pipe.scores(token_task(2, seed=3), example_ids=range(4)).shape == (4, 2)


@pytest.mark.parametrize("fields", [{"seed": 6}, {"p": 0.4}, {"scheme": "hashed"}])
def test_edited_mask_fields_are_refused_at_load(trained, tmp_path, fields):
    folder, _ = trained
    copy = tmp_path / "copy"
    th.load_influence_ready(folder).save_pretrained(copy)
    _edit_config(copy, **fields)
    with pytest.raises(ConfigMismatchError, match="edited after training"):
        th.load_influence_ready(copy)


def test_weights_trained_further_without_masks_are_named_and_turnover_scores_refused(trained, tmp_path, caplog):
    folder, train = trained
    model = th.load_influence_ready(folder)
    model.train()
    with torch.no_grad():  # what a plain fine-tuning step does: move the trainable weights, no masks involved
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "further")
    with caplog.at_level(logging.WARNING):
        reloaded = th.load_influence_ready(tmp_path / "further")
    assert any("differ from those turn-over training produced" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigMismatchError, match="trained further without masks"):
        th.InfluencePipeline(reloaded, train_dataset=train, estimator="turnover")
    with pytest.raises(ConfigMismatchError, match="trained further without masks"):
        th.InfluencePipeline(model, train_dataset=train, estimator="turnover")  # in memory too
    pipe = th.InfluencePipeline(reloaded, train_dataset=train, estimator="influence")  # needs no masks: fine
    assert pipe.scores(token_task(1, seed=3), example_ids=range(4)).shape == (4, 1)
