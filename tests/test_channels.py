"""Mask channels: K masked copies of an input-masked head Linear in one model (TurnoverConfig(channels=K))."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import turnover_hf as th
from turnover_hf.masks import keep_bits, mask_for

from conftest import batch_of, tiny_bert, tiny_gpt2, tiny_roberta, with_bottleneck

K = 4


def _inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _head_only(model):
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("bert."))
    return model


def _channel_model(channels=K, seed=3, **config):
    return th.patch_model(_head_only(tiny_bert()), th.TurnoverConfig(seed=seed, channels=channels, **config),
                          warn_leaking=False)


def test_channels_are_recorded_and_keep_the_full_network(train_set):
    batch = batch_of(train_set, range(8))
    plain = tiny_bert()
    with torch.no_grad():
        expected = plain(**_inputs(batch)).logits
    model = _channel_model()
    assert model.turnover_config.mask_sites == {"classifier": {"side": "input", "units": 32, "channels": K}}
    extra = model.classifier.turnover_channel_weight
    assert extra.shape == (K - 1, 2, 32) and model.classifier.turnover_channel_bias.shape == (K - 1, 2)
    with torch.no_grad():
        assert torch.allclose(model(**_inputs(batch)).logits, expected, atol=1e-6)
    # one channel is the old layout: no "channels" entry, no extra parameters
    single = th.patch_model(tiny_bert(), th.TurnoverConfig(seed=3), warn_leaking=False)
    assert single.turnover_config.mask_sites == {"classifier": {"side": "input", "units": 32}}
    assert not hasattr(single.classifier, "turnover_channel_weight")


def test_each_channel_reads_its_own_slice_of_one_wide_mask(train_set):
    model = _channel_model()
    with torch.no_grad():  # make the copies differ, so a wrong channel-to-mask pairing shows
        model.classifier.turnover_channel_weight.normal_()
        model.classifier.turnover_channel_bias.normal_()
    batch = batch_of(train_set, range(6))
    ids = batch["example_ids"]
    pooled = {}
    handle = model.classifier.register_forward_pre_hook(lambda m, args: pooled.__setitem__("x", args[0]))
    with torch.no_grad(), th.instance_masks(model, ids, mode="train"):
        logits = model(**_inputs(batch)).logits
    handle.remove()
    config = model.turnover_config
    wide = mask_for(ids, "classifier", K * 32, **config.mask_kwargs).view(len(ids), K, 32)
    # channel 0 carries exactly the single-channel mask of the same layer key
    assert torch.equal(wide[:, 0], mask_for(ids, "classifier", 32, **config.mask_kwargs))
    weights = [model.classifier.weight] + list(model.classifier.turnover_channel_weight)
    biases = [model.classifier.bias] + list(model.classifier.turnover_channel_bias)
    manual = sum((pooled["x"] * wide[:, c]) @ weights[c].T + biases[c] for c in range(K)) / K
    assert torch.allclose(logits, manual, atol=1e-5)


def test_gradients_reach_only_the_kept_columns_of_every_copy(train_set):
    model = _channel_model()
    batch = batch_of(train_set, range(2))
    model.train()
    with th.instance_masks(model, batch["example_ids"][:1], mode="train"):
        model(**{k: v[:1] for k, v in _inputs(batch).items()}, labels=batch["labels"][:1]).loss.backward()
    kept = keep_bits(batch["example_ids"][:1], "classifier", K * 32, **model.turnover_config.mask_kwargs)[0].view(K, 32)
    grads = torch.cat([model.classifier.weight.grad[None], model.classifier.turnover_channel_weight.grad])
    for c in range(K):
        assert torch.count_nonzero(grads[c][:, ~kept[c]]) == 0
        assert torch.count_nonzero(grads[c][:, kept[c]]) > 0
    assert not torch.equal(kept[0], kept[1])  # channels have different masks


def test_flipped_network_is_unchanged_by_a_step_on_z(train_set):
    model = th.patch_model(_head_only(tiny_bert()), th.TurnoverConfig(seed=5, channels=K), freeze_leaking=True)
    assert th.leakage_report(model) == []
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad and n.startswith("classifier"))
    assert frozen == ["classifier.bias", "classifier.turnover_channel_bias"]
    batch = batch_of(train_set, range(16))
    z_ids = batch["example_ids"][3].repeat(16)

    def logits(mode):
        with torch.no_grad(), th.instance_masks(model, z_ids, mode=mode):
            return model(**_inputs(batch)).logits

    flip_before, mask_before = logits("flip"), logits("train")
    model.train()
    with th.instance_masks(model, batch["example_ids"][3:4], mode="train"):
        model(**{k: v[3:4] for k, v in _inputs(batch).items()}, labels=batch["labels"][3:4]).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1.0 * p.grad
    model.eval()
    assert torch.equal(logits("flip"), flip_before)
    assert not torch.allclose(logits("train"), mask_before)


def test_channels_shrink_the_half_network_noise(train_set):
    """At fixed weights, turn-over scores of an untrained head are pure half-network noise: K channels average K
    independent half-networks, so the spread of the scores falls about like 1 / K in variance."""
    batch = batch_of(train_set, range(8))
    ids = torch.arange(400)

    def spread(channels):
        model = th.patch_model(tiny_bert(seed=11), th.TurnoverConfig(seed=0, channels=channels), warn_leaking=False)
        scores = th.influence(model, {**_inputs(batch), "labels": batch["labels"]}, ids)
        return float(scores.var(0).mean())

    one, sixteen = spread(1), spread(16)
    assert sixteen < one / 6, (one, sixteen)


def test_closed_form_scores_equal_the_batched_definition(train_set):
    model = _channel_model(seed=8)
    with torch.no_grad():
        model.classifier.turnover_channel_weight.normal_(std=0.3)
    batch = batch_of(train_set, range(5))
    targets = {**_inputs(batch), "labels": batch["labels"]}
    ids = torch.arange(0, 60, 3)
    fast = th.TurnoverScorer(model, fast=True)
    fast_scores = fast.scores(targets, batch["labels"], ids)
    assert fast.path == "closed_form"
    slow_scores = th.TurnoverScorer(model, fast=False).scores(targets, batch["labels"], ids)
    assert torch.allclose(fast_scores, slow_scores, atol=1e-5)
    assert fast_scores.abs().max() > 1e-3
    own = {k: v[:4] for k, v in targets.items()}
    self_fast = fast.self_scores(own, batch["labels"][:4], batch["example_ids"][:4])
    self_slow = th.TurnoverScorer(model, fast=False).self_scores(own, batch["labels"][:4], batch["example_ids"][:4])
    assert torch.allclose(self_fast, self_slow, atol=1e-5)


def test_save_and_load_restore_the_same_channels(train_set, tmp_path):
    model = _channel_model(seed=9)
    with torch.no_grad():
        model.classifier.turnover_channel_weight.normal_()
    model.save_pretrained(tmp_path / "ckpt")
    saved = load_file(os.fspath(tmp_path / "ckpt" / "model.safetensors"))
    assert "classifier.turnover_channel_weight" in saved
    loaded = th.load_influence_ready(tmp_path / "ckpt")
    assert torch.equal(loaded.classifier.turnover_channel_weight, model.classifier.turnover_channel_weight)
    batch = batch_of(train_set, range(4))
    targets = {**_inputs(batch), "labels": batch["labels"]}
    ids = torch.arange(20)
    assert torch.equal(th.influence(loaded, targets, ids), th.influence(model, targets, ids))
    assert loaded.classifier.turnover_channel_weight.requires_grad

    # weights without the channel copies: refused, the folder untouched
    del saved["classifier.turnover_channel_weight"]
    save_file(saved, os.fspath(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(th.ConfigMismatchError, match="mask channels"):
        th.load_influence_ready(tmp_path / "ckpt")


def test_unpatch_folds_the_channels_into_the_layer(train_set):
    model = _channel_model()
    with torch.no_grad():
        model.classifier.turnover_channel_weight.normal_()
    batch = batch_of(train_set, range(6))
    with torch.no_grad():
        full = model(**_inputs(batch)).logits
    plain = th.unpatch_model(model)
    assert not hasattr(plain.classifier, "turnover_channel_weight")
    assert type(plain.classifier) is torch.nn.Linear
    with torch.no_grad():
        assert torch.allclose(plain(**_inputs(batch)).logits, full, atol=1e-5)


def test_channels_are_refused_where_they_cannot_apply():
    with pytest.raises(ValueError, match="channels must be an integer"):
        th.TurnoverConfig(channels=0)
    with pytest.raises(th.NoTargetMatchedError, match="inputs are masked"):
        th.patch_model(tiny_roberta(), th.TurnoverConfig(channels=K))  # head masks on its hidden layer's outputs
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    with pytest.raises(th.NoTargetMatchedError, match="not supported on PEFT models"):
        th.patch_model(peft.get_peft_model(tiny_bert(), lora), th.TurnoverConfig(channels=K))
    with pytest.raises(th.NoTargetMatchedError, match="Conv1D|nn.Linear"):
        th.patch_model(tiny_gpt2(), th.TurnoverConfig(channels=K, target_module_types=["Conv1D"],
                                                      target_modules="score", mask_inputs_of=".*"))


def test_channels_with_adapters_train_and_score(train_set):
    model = th.patch_model(with_bottleneck(tiny_bert()), th.TurnoverConfig(seed=1, channels=K), warn_leaking=False)
    sites = model.turnover_config.mask_sites
    assert sites["classifier"]["channels"] == K
    assert all("channels" not in spec for name, spec in sites.items() if name != "classifier")
    batch = batch_of(train_set, range(4))
    scores = th.influence(model, {**_inputs(batch), "labels": batch["labels"]}, torch.arange(10))
    assert scores.shape == (10, 4) and torch.isfinite(scores).all()


def test_the_influence_estimator_differentiates_every_channel(train_set):
    from test_influence import _relative_gap, dense_reference

    model = _channel_model(seed=4)
    with torch.no_grad():
        model.classifier.turnover_channel_weight.normal_(std=0.5)
    train = train_set.select(range(10))
    targets = batch_of(train_set.select(range(40, 43)))
    scorer = th.InfluenceFunctionScorer(model, train, show_progress=False)
    assert scorer.width == sum(p.numel() for p in model.parameters() if p.requires_grad) == K * (2 * 32 + 2)
    scores = scorer.scores(_inputs(targets), targets["labels"], torch.arange(10))
    reference = dense_reference(model, batch_of(train), targets, masked=True)
    assert _relative_gap(scores.double(), reference) < 1e-4


def test_trainer_and_hydra_train_the_channels(train_set, tmp_path):
    from transformers import TrainingArguments

    model = _channel_model(seed=6)
    before = model.classifier.turnover_channel_weight.detach().clone()
    args = TrainingArguments(tmp_path, per_device_train_batch_size=4, num_train_epochs=1, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = th.HydraTurnoverTrainer(model=model, args=args, train_dataset=train_set.select(range(12)))
    trainer.train()
    assert not torch.equal(model.classifier.turnover_channel_weight, before)  # the optimizer saw the copies
    assert trainer.hydra.max_residual < 1e-3  # per-example gradients under each row's masks add up
    assert any(spec.name.endswith("turnover_channel_weight") for spec in trainer.hydra.specs)
