import copy
import logging

import pytest
import torch

import turnover_hf as th
from turnover_hf.masks import keep_bits

from conftest import batch_of, tiny_bert, tiny_distilbert, tiny_gpt2, tiny_roberta, with_bottleneck, with_lora


def _flip_logits(model, batch, example_ids):
    with torch.no_grad(), th.instance_masks(model, example_ids, mode="flip"):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _sgd_step_on_one_example(model, batch, z, lr=1.0):
    """One plain SGD step (no momentum, no weight decay) on example z alone, under its own mask."""
    model.train()
    model.zero_grad()
    with th.instance_masks(model, batch["example_ids"][z : z + 1], mode="train"):
        out = model(input_ids=batch["input_ids"][z : z + 1], attention_mask=batch["attention_mask"][z : z + 1],
                    labels=batch["labels"][z : z + 1])
        out.loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                p -= lr * p.grad
    model.eval()


KINDS = {
    "head": lambda: tiny_bert(),
    "bottleneck": lambda: with_bottleneck(tiny_bert()),
    "lora": lambda: with_lora(tiny_bert()),
    "roberta_head": lambda: tiny_roberta(),
    "gpt2_score": lambda: tiny_gpt2(),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_flipped_network_is_unchanged_by_a_step_on_z(kind, train_set):
    model = KINDS[kind]()
    if kind in ("head", "roberta_head", "gpt2_score"):
        for name, p in model.named_parameters():  # head-only training: freeze the backbone
            p.requires_grad_(name.split(".")[0] not in ("bert", "roberta", "transformer"))
    model = th.patch_model(model, th.TurnoverConfig(seed=1), freeze_leaking=True)
    assert th.leakage_report(model) == []
    batch = batch_of(train_set, range(16))
    if kind == "roberta_head":
        batch["labels"] = batch["labels"] % 3
    z = 3
    z_ids = batch["example_ids"][z].repeat(16)  # judge the flipped network of z on 16 different inputs
    flip_before = _flip_logits(model, batch, z_ids)
    with torch.no_grad(), th.instance_masks(model, z_ids, mode="train"):
        mask_before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    _sgd_step_on_one_example(model, batch, z)
    with torch.no_grad(), th.instance_masks(model, z_ids, mode="train"):
        mask_after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(_flip_logits(model, batch, z_ids), flip_before)  # bit for bit: z never touched it
    assert not torch.allclose(mask_after, mask_before)  # the step did change the network that saw z
    other = batch["example_ids"][z + 1].repeat(16)
    assert not torch.equal(_flip_logits(model, batch, other), flip_before)  # another example's flip did change


def _grad_of_loss(model, batch, z, mode="train"):
    model.zero_grad()
    with th.instance_masks(model, batch["example_ids"][z : z + 1], mode=mode):
        model(input_ids=batch["input_ids"][z : z + 1], attention_mask=batch["attention_mask"][z : z + 1],
              labels=batch["labels"][z : z + 1]).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_on_dropped_units_are_exactly_zero(train_set):
    model = th.patch_model(with_lora(with_bottleneck(tiny_bert())), th.TurnoverConfig(seed=2))
    model.train_adapter(["bn", "lo"])
    model.set_active_adapters(None)
    from adapters.composition import Stack

    model.set_active_adapters(Stack("bn", "lo"))
    batch = batch_of(train_set, range(4))
    grads = _grad_of_loss(model, batch, 0)
    z = batch["example_ids"][:1]
    kinds_checked = set()
    for site_name, site in model.turnover_config.mask_sites.items():
        dropped = ~keep_bits(z, site_name, site["units"], **model.turnover_config.mask_kwargs)[0]
        assert dropped.any() and (~dropped).any()
        if site["side"] == "rank":
            a, b = grads[f"{site_name}.lora_A"], grads[f"{site_name}.lora_B"]
            assert torch.count_nonzero(a[dropped]) == 0 and torch.count_nonzero(b[:, dropped]) == 0
            assert torch.count_nonzero(a[~dropped]) > 0
            kinds_checked.add("lora")
        elif site["side"] == "output":
            key = f"{site_name}.0.weight" if site_name.endswith("adapter_down") else f"{site_name}.weight"
            w, bias = grads[key], grads[key.replace("weight", "bias")]
            assert torch.count_nonzero(w[dropped]) == 0 and torch.count_nonzero(bias[dropped]) == 0
            assert torch.count_nonzero(w[~dropped]) > 0
            kinds_checked.add("bottleneck")
        else:
            w = grads[f"{site_name}.weight"]
            assert torch.count_nonzero(w[:, dropped]) == 0 and torch.count_nonzero(w[:, ~dropped]) > 0
            kinds_checked.add("head")
    assert kinds_checked == {"lora", "bottleneck", "head"}


@pytest.mark.parametrize(
    "factory, expected",
    [
        (tiny_bert, {"classifier": ("input", 32)}),
        (tiny_roberta, {"classifier.dense": ("output", 32)}),
        (tiny_distilbert, {"pre_classifier": ("output", 32)}),
        (tiny_gpt2, {"score": ("input", 32)}),
    ],
)
def test_default_head_targets_per_architecture(factory, expected):
    model = th.patch_model(factory(), warn_leaking=False)
    sites = {k: (v["side"], v["units"]) for k, v in model.turnover_config.mask_sites.items()}
    assert sites == expected


def test_adapter_defaults_cover_every_trainable_parameter_but_the_head_bias():
    model = th.patch_model(with_bottleneck(tiny_bert()), warn_leaking=False)
    sites = model.turnover_config.mask_sites
    assert sum(n.endswith("adapter_down") for n in sites) == 2 and sum(n.endswith("adapter_up") for n in sites) == 2
    assert th.leakage_report(model) == ["classifier.bias"]
    assert th.freeze_leaking_parameters(model) == ["classifier.bias"]
    assert not model.classifier.bias.requires_grad and th.leakage_report(model) == []


def test_leak_warning_names_parameters(caplog):
    with caplog.at_level(logging.WARNING, logger="turnover_hf.patcher"):
        th.patch_model(tiny_bert())
    assert "bert.embeddings.word_embeddings.weight" in caplog.text and "freeze_leaking=True" in caplog.text


def test_target_modules_by_name_regex_and_type():
    by_name = th.patch_model(tiny_bert(), th.TurnoverConfig(target_modules=["intermediate.dense"]), warn_leaking=False)
    assert sorted(by_name.turnover_config.mask_sites) == [f"bert.encoder.layer.{i}.intermediate.dense" for i in (0, 1)]
    by_regex = th.patch_model(
        tiny_bert(), th.TurnoverConfig(target_modules=r"bert\.encoder\.layer\.1\..*dense", exclude_modules=["output.dense"]),
        warn_leaking=False,
    )
    # ".output.dense" as a suffix excludes both the attention output and the feed-forward output projections.
    assert sorted(by_regex.turnover_config.mask_sites) == ["bert.encoder.layer.1.intermediate.dense"]
    by_type = th.patch_model(tiny_gpt2(), th.TurnoverConfig(target_module_types=["Conv1D"], mask_inputs_of=["c_proj"]),
                             warn_leaking=False)
    sites = by_type.turnover_config.mask_sites
    assert sites["transformer.h.0.mlp.c_fc"] == {"side": "output", "units": 128}
    assert sites["transformer.h.0.mlp.c_proj"] == {"side": "input", "units": 128}


def test_eval_outside_a_context_is_the_full_network_and_unpatch_restores(train_set):
    plain = with_lora(tiny_bert()).eval()  # train_adapter leaves the model in training mode
    batch = batch_of(train_set, range(4))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        reference = plain(**inputs).logits
    patched = th.patch_model(copy.deepcopy(plain), warn_leaking=False)
    with torch.no_grad():
        assert torch.equal(patched(**inputs).logits, reference)
        with th.instance_masks(patched, batch["example_ids"], mode="off"):
            assert torch.equal(patched(**inputs).logits, reference)
        with th.instance_masks(patched, batch["example_ids"]):
            assert not torch.allclose(patched(**inputs).logits, reference)
    th.unpatch_model(patched)
    assert not th.is_patched(patched)
    assert type(patched.bert.encoder.layer[0].attention.self.query.loras["lo"]).__name__ == "LoRA"
    assert list(patched.state_dict()) == list(plain.state_dict())
    patched.train()
    with torch.no_grad():
        patched.eval()
        assert torch.equal(patched(**inputs).logits, reference)


def test_bad_inputs_get_clear_errors(train_set):
    with pytest.raises(th.NoTargetMatchedError, match="no module matched"):
        th.patch_model(tiny_bert(), th.TurnoverConfig(target_modules=["nothing_like_this"]))
    with pytest.raises(th.NoTargetMatchedError, match="cannot mask"):
        th.patch_model(tiny_bert(), th.TurnoverConfig(target_modules=["LayerNorm"]))
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        th.TurnoverConfig(p=1.0)
    with pytest.raises(ValueError, match="scheme"):
        th.TurnoverConfig(scheme="random")
    model = th.patch_model(tiny_bert(), warn_leaking=False)
    with pytest.raises(th.TurnoverError, match="patched already"):
        th.patch_model(model)
    batch = batch_of(train_set, range(4))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model.train()
    with pytest.raises(th.MissingExampleIdsError, match="without example_ids"):
        model(**inputs)
    with pytest.raises(th.MissingExampleIdsError, match="needs example_ids"):
        with th.instance_masks(model, None, mode="train"):
            pass
    with pytest.raises(th.ExampleIdError, match="4 rows but 3 example_ids"):
        with th.instance_masks(model, torch.tensor([0, 1, 2])):
            model(**inputs)
    with pytest.raises(th.ExampleIdError, match="non-negative"):
        with th.instance_masks(model, torch.tensor([0, 1, 2, -1])):
            pass
    with pytest.raises(th.NotPatchedError, match="patch_model"):
        with th.instance_masks(tiny_bert(), torch.tensor([0])):
            pass
