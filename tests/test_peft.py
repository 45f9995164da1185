"""PEFT LoRA: masks on the rank units of lora_A (and modules_to_save heads), exactness, prefix reuse, training with
TurnoverTrainer, save -> load with identical scores, and clear refusals."""

import json
import os

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, TrainingArguments

import turnover_hf as th
from turnover_hf.masks import keep_bits

from conftest import VOCAB, batch_of, lm_targets, tiny_gpt2_lm, tiny_llama_lm, with_lora

peft = pytest.importorskip("peft", reason="install the extra: pip install 'turnover-hf[peft]'")


def gpt2_lora(model=None, **kwargs):
    config = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=False)
    return peft.get_peft_model(model if model is not None else tiny_gpt2_lm(), peft.LoraConfig(**(config | kwargs)))


def llama_lora(model=None, **kwargs):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return peft.get_peft_model(model if model is not None else tiny_llama_lm(), peft.LoraConfig(**(config | kwargs)))


def gpt2_classifier_lora(r=4):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, num_labels=2, pad_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    lora = peft.LoraConfig(r=r, target_modules=["c_attn"], fan_in_fan_out=True, task_type="SEQ_CLS", init_lora_weights=False)
    return peft.get_peft_model(GPT2ForSequenceClassification(cfg), lora)


def test_default_sites_are_lora_rank_units_and_modules_to_save_heads():
    lm = th.patch_model(gpt2_lora())
    sites = lm.turnover_config.mask_sites
    assert sorted(sites) == sorted(
        f"transformer.h.{i}.{m}.lora_A.default" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")
    )
    assert all(s == {"side": "rank", "units": 4} for s in sites.values())
    assert th.leakage_report(lm) == []  # PEFT trains LoRA factors only, and the masks cover all of them
    classifier = th.patch_model(gpt2_classifier_lora(), warn_leaking=False)
    sites = classifier.turnover_config.mask_sites
    assert sites["score.modules_to_save.default"] == {"side": "input", "units": 32}  # the trainable copy, not the original
    assert "score.original_module" not in sites and sum(s["side"] == "rank" for s in sites.values()) == 2
    assert th.leakage_report(classifier) == []  # GPT-2's score head has no bias
    by_name = th.patch_model(llama_lora(), th.TurnoverConfig(target_modules=["v_proj"]))
    assert sorted(by_name.turnover_config.mask_sites) == [f"model.layers.{i}.self_attn.v_proj.lora_A.default" for i in (0, 1)]
    leaking = [f"model.layers.{i}.{m}.lora_{f}.default.weight"
               for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj") for f in "AB"]
    assert sorted(th.leakage_report(by_name)) == sorted(leaking)  # the unmasked LoRA layers leak, and it says so


@pytest.mark.parametrize("factory", [gpt2_lora, llama_lora, gpt2_classifier_lora], ids=["gpt2-lm", "llama-lm", "gpt2-cls"])
def test_masked_off_rank_units_get_exactly_zero_gradient(factory, train_set):
    model = th.patch_model(factory(r=16), th.TurnoverConfig(seed=2), warn_leaking=False)  # 16 units: some dropped
    z = torch.tensor([7])
    if factory is gpt2_classifier_lora:
        batch = {k: v[:1] for k, v in batch_of(train_set, range(1)).items() if k != "example_ids"}
    else:
        batch = lm_targets(n=1)
    model.train()
    with th.instance_masks(model, z, mode="train"):
        model(**batch).loss.backward()
    params = dict(model.get_base_model().named_parameters())
    checked = 0
    for name, site in model.turnover_config.mask_sites.items():
        dropped = ~keep_bits(z, name, site["units"], **model.turnover_config.mask_kwargs)[0]
        assert dropped.any() and (~dropped).any()
        if site["side"] == "rank":
            a, b = params[f"{name}.weight"].grad, params[name.replace(".lora_A.", ".lora_B.") + ".weight"].grad
            assert torch.count_nonzero(a[dropped]) == 0 and torch.count_nonzero(b[:, dropped]) == 0
            assert torch.count_nonzero(a[~dropped]) > 0 and torch.count_nonzero(b[:, ~dropped]) > 0
        else:
            w = params[f"{name}.weight"].grad
            assert torch.count_nonzero(w[:, dropped]) == 0 and torch.count_nonzero(w[:, ~dropped]) > 0
        checked += 1
    assert checked == len(model.turnover_config.mask_sites) >= 2


@pytest.mark.parametrize("factory", [gpt2_lora, llama_lora], ids=["gpt2-lm", "llama-lm"])
def test_flipped_peft_network_is_unchanged_by_a_step_on_z(factory):
    model = th.patch_model(factory(), th.TurnoverConfig(seed=5), freeze_leaking=True)
    batch = lm_targets(n=4)
    z_rows = torch.tensor([3]).repeat(4)

    def logits(mode, rows):
        with torch.no_grad(), th.instance_masks(model, rows, mode=mode):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    flip_before, mask_before = logits("flip", z_rows), logits("train", z_rows)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    with th.instance_masks(model, torch.tensor([3]), mode="train"):
        model(**{k: v[:1] for k, v in batch.items()}).loss.backward()
    optimizer.step()
    model.eval()
    assert torch.equal(logits("flip", z_rows), flip_before)
    assert not torch.allclose(logits("train", z_rows), mask_before)


def test_lora_in_top_layers_reuses_the_lower_layers(caplog):
    model = th.patch_model(gpt2_lora(tiny_gpt2_lm(n_layer=3), layers_to_transform=[2]), th.TurnoverConfig(seed=1))
    targets = lm_targets(n=3)
    ids = torch.arange(6)
    fast = th.TurnoverScorer(model, batch_size=8)
    scores = fast.scores(targets, targets["labels"], ids)
    assert fast.path == "prefix" and "disagrees" not in caplog.text
    assert fast._replay.names == ["transformer.h.0", "transformer.h.1"]
    assert torch.allclose(scores, th.TurnoverScorer(model, fast=False).scores(targets, targets["labels"], ids), atol=1e-5)
    assert scores.abs().max() > 0


def test_save_load_restores_identical_masks_and_scores(tmp_path):
    base_dir = tmp_path / "base"
    tiny_gpt2_lm().save_pretrained(base_dir)
    model = th.patch_model(gpt2_lora(GPT2LMHeadModel.from_pretrained(base_dir)), th.TurnoverConfig(seed=11, p=0.4))
    targets = lm_targets(n=3)
    ids = torch.arange(10)
    before = th.influence(model, targets, ids, reduction="none")
    model.save_pretrained(tmp_path / "adapter")
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors", th.CONFIG_NAME, "README.md"} <= files
    assert "model.safetensors" not in files  # PEFT's own files: the adapter only
    assert json.loads((tmp_path / "adapter" / th.CONFIG_NAME).read_text())["seed"] == 11
    loaded = th.load_influence_ready(tmp_path / "adapter")  # the base model named in adapter_config.json
    assert isinstance(loaded, peft.PeftModel)
    assert loaded.turnover_config.mask_sites == model.turnover_config.mask_sites
    assert torch.equal(th.influence(loaded, targets, ids, reduction="none"), before)
    given = th.load_influence_ready(tmp_path / "adapter", base_model=GPT2LMHeadModel.from_pretrained(base_dir))
    assert torch.equal(th.influence(given, targets, ids, reduction="none"), before)


def test_trainer_trains_a_peft_lm_and_checkpoints_are_influence_ready(tmp_path):
    g = torch.Generator().manual_seed(0)
    train = th.add_example_ids(Dataset.from_dict({"input_ids": torch.randint(1, VOCAB, (8, 9), generator=g).tolist()}))
    model = th.patch_model(gpt2_lora(), th.TurnoverConfig(seed=0), freeze_leaking=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="steps", save_steps=2, disable_tqdm=True,
                             logging_strategy="no")
    th.TurnoverTrainer(model=model, args=args, train_dataset=train).train()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / th.CONFIG_NAME).is_file()
    assert json.loads((checkpoint / th.CONFIG_NAME).read_text())["num_train_examples"] == 8


def test_peft_refusals_are_clear(tmp_path):
    merged = gpt2_lora()
    merged.merge_adapter()
    with pytest.raises(th.NoTargetMatchedError, match="merged"):
        th.patch_model(merged)
    with pytest.raises(th.NoTargetMatchedError, match="DoRA"):
        th.patch_model(llama_lora(use_dora=True))
    model = th.patch_model(gpt2_lora())
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(th.ConfigMismatchError, match="never unpickles"):
        th.load_influence_ready(tmp_path / "pickled", base_model=tiny_gpt2_lm())
    model.save_pretrained(tmp_path / "nobase")  # a model built from a config records no base path
    with pytest.raises(th.ConfigMismatchError, match="base_model="):
        th.load_influence_ready(tmp_path / "nobase")
    plain = th.patch_model(tiny_gpt2_lm(), th.TurnoverConfig(target_module_types=["Conv1D"]), warn_leaking=False)
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(th.ConfigMismatchError, match="PEFT adapters"):
        th.load_influence_ready(tmp_path / "plain", base_model=tiny_gpt2_lm())
    th.unpatch_model(model)
    assert not th.is_patched(model) and "save_pretrained" not in model.__dict__


def test_adapters_library_lora_still_works_beside_peft(train_set):
    model = th.patch_model(with_lora(tiny_gpt2_lm()), th.TurnoverConfig(seed=2), warn_leaking=False)
    sites = model.turnover_config.mask_sites
    rank = {n: s for n, s in sites.items() if s["side"] == "rank"}
    assert sorted(rank) == [f"transformer.h.{i}.attn.c_attn.loras.lo" for i in (0, 1)]  # the adapters' own LoRA module
    assert all(s["units"] == 8 for s in rank.values())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    targets = lm_targets(n=2)
    scores = th.influence(model, targets, torch.arange(4))
    assert scores.abs().min() > 0
    assert torch.allclose(scores, th.influence(model, targets, torch.arange(4), fast=False), atol=1e-6)


def test_a_whole_model_saved_over_a_peft_adapter_and_back_leaves_one_checkpoint(tmp_path):
    """Adapter files left beside a whole model would make loading take the PEFT path (and the reverse, a stale
    model.safetensors beside an adapter): each save removes the other kind's files."""
    base_dir = tmp_path / "base"
    tiny_gpt2_lm().save_pretrained(base_dir)
    adapter = th.patch_model(gpt2_lora(GPT2LMHeadModel.from_pretrained(base_dir)), th.TurnoverConfig(seed=11))
    whole = th.patch_model(tiny_gpt2_lm(seed=3), th.TurnoverConfig(seed=12, target_modules=["lm_head"]), warn_leaking=False)
    out = tmp_path / "out"
    adapter.save_pretrained(out)
    whole.save_pretrained(out)
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    loaded = th.load_influence_ready(out)
    assert not isinstance(loaded, peft.PeftModel) and loaded.turnover_config.seed == 12
    adapter.save_pretrained(out)
    assert not (out / "model.safetensors").exists()
    loaded = th.load_influence_ready(out)
    assert isinstance(loaded, peft.PeftModel) and loaded.turnover_config.seed == 11
