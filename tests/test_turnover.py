import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

import turnover_hf as th

from conftest import VOCAB, batch_of, tiny_bert, tiny_gpt2, tiny_roberta, token_task, with_bottleneck, with_lora


def naive_influence(model, targets, example_ids):
    """The definition, one (example, target) pair at a time: loss under the flipped mask minus loss under the mask."""
    out = torch.zeros(len(example_ids), len(targets["labels"]))
    model.eval()
    for i, z in enumerate(example_ids.tolist()):
        for t in range(len(targets["labels"])):
            one = {k: targets[k][t : t + 1] for k in ("input_ids", "attention_mask", "labels")}
            losses = {}
            for mode in ("train", "flip"):
                with torch.no_grad(), th.instance_masks(model, torch.tensor([z]), mode=mode):
                    losses[mode] = model(**one).loss.item()
            out[i, t] = losses["flip"] - losses["train"]
    return out


@pytest.mark.parametrize(
    "factory",
    [lambda: with_bottleneck(tiny_bert()), lambda: with_lora(tiny_bert()), tiny_roberta, lambda: with_lora(tiny_gpt2())],
    ids=["bert-bottleneck", "bert-lora", "roberta-head", "gpt2-score-lora"],
)
@pytest.mark.parametrize("batch_size", [2, 7, 64])
def test_batched_scores_equal_the_naive_definition(factory, batch_size, train_set):
    model = th.patch_model(factory(), th.TurnoverConfig(seed=9), freeze_leaking=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    targets = batch_of(train_set, [40, 41, 42])
    targets["labels"] = targets["labels"] % model.config.num_labels
    ids = torch.tensor([3, 0, 17, 5, 11])
    batched = th.influence(model, targets, example_ids=ids, batch_size=batch_size)
    assert batched.shape == (5, 3)
    assert torch.allclose(batched, naive_influence(model, targets, ids), atol=1e-5)
    assert batched.abs().max() > 0


def test_targets_without_labels_use_the_models_prediction(train_set):
    model = th.patch_model(with_bottleneck(tiny_bert()), freeze_leaking=True).eval()
    targets = batch_of(train_set, [1, 2])
    with torch.no_grad():
        predicted = model(input_ids=targets["input_ids"], attention_mask=targets["attention_mask"]).logits.argmax(-1)
    unlabelled = {k: v for k, v in targets.items() if k != "labels"}
    relabelled = dict(targets, labels=predicted)
    ids = torch.arange(6)
    assert torch.equal(th.influence(model, unlabelled, example_ids=ids), th.influence(model, relabelled, example_ids=ids))


def test_bad_ids_and_models_get_clear_errors(train_set):
    model = th.patch_model(with_bottleneck(tiny_bert()), freeze_leaking=True)
    targets = batch_of(train_set, [0])
    with pytest.raises(th.ExampleIdError, match="duplicates"):
        th.influence(model, targets, example_ids=[1, 2, 2])
    with pytest.raises(th.ExampleIdError, match="not in the training set"):
        th.influence(model, targets, example_ids=[1, 99], known_ids=torch.arange(64))
    with pytest.raises(th.ExampleIdError, match="non-negative"):
        th.influence(model, targets, example_ids=[-1])
    with pytest.raises(th.NotPatchedError, match="patch_model"):
        th.influence(tiny_bert(), targets, example_ids=[0])


def _wide_bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


@pytest.mark.slow
def test_trained_model_finds_the_duplicate_and_self_influence_is_positive(tmp_path):
    """Paper App. E and the basic promise: an example helps itself; as a target, its own copy ranks near the top."""
    train = th.add_example_ids(token_task(16, seed=1))
    model = th.patch_model(with_bottleneck(_wide_bert(), reduction_factor=1), th.TurnoverConfig(seed=0),
                           freeze_leaking=True)
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, num_train_epochs=25, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_strategy="no",
                             seed=0)
    th.TurnoverTrainer(model=model, args=args, train_dataset=train).train()
    batch = batch_of(train)
    scores = th.influence(model, batch, example_ids=batch["example_ids"])  # targets = copies of the training rows
    self_influence = scores.diag()
    assert self_influence.mean() > 0 and (self_influence > 0).float().mean() >= 0.8
    rank_of_self = (scores > self_influence[None, :]).sum(0)  # 0 = the copy is the top proponent
    # With 16 candidates a random ranking has median 7.5; one model's single-mask scores are noisy (see README).
    assert rank_of_self.float().median() <= 3


def _top_layer_adapter(model):
    import adapters

    adapters.init(model)
    model.add_adapter("top", config=adapters.SeqBnConfig(reduction_factor=2, leave_out=[0]))
    model.train_adapter("top")
    return model


def perturbed_top_adapter(mask_seed: int, **patch_kwargs):
    """A tiny BERT with a bottleneck adapter in its top layer, patched (``patch_kwargs``) with masks of
    ``mask_seed``, every weight moved off its initialisation (a zero-initialised adapter has no gradients)."""
    model = th.patch_model(_top_layer_adapter(tiny_bert()), th.TurnoverConfig(seed=mask_seed), **patch_kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize(
    "factory, path",
    [
        (tiny_bert, "closed_form"),
        (lambda: _top_layer_adapter(tiny_bert()), "prefix"),
        (tiny_roberta, "prefix"),
        (tiny_gpt2, "prefix"),
        (lambda: with_bottleneck(tiny_bert()), "batched"),
    ],
    ids=["bert-head", "bert-top-adapter", "roberta-head", "gpt2-score", "bert-all-layers"],
)
def test_each_fast_path_equals_the_naive_definition(factory, path, train_set, caplog):
    model = th.patch_model(factory(), th.TurnoverConfig(seed=4), warn_leaking=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    targets = batch_of(train_set, [50, 51, 52, 53])
    targets["labels"] = targets["labels"] % model.config.num_labels
    ids = torch.tensor([9, 2, 30, 31, 4, 60])
    scorer = th.TurnoverScorer(model, batch_size=8)
    scores = scorer.scores(targets, targets["labels"], ids)
    assert scorer.path == path and "disagrees" not in caplog.text
    assert torch.allclose(scores, naive_influence(model, targets, ids), atol=1e-5)
    self_scores = scorer.self_scores(batch_of(train_set, ids.tolist()), batch_of(train_set, ids.tolist())["labels"] % model.config.num_labels, ids)
    rows = batch_of(train_set, ids.tolist())
    rows["labels"] = rows["labels"] % model.config.num_labels
    assert torch.allclose(self_scores, naive_influence(model, rows, ids).diag(), atol=1e-5)


def test_a_wrong_fast_path_is_caught_and_abandoned(train_set, caplog, monkeypatch):
    """The safety net: if replaying the prefix gave other numbers than the model, scores fall back to batched."""
    from turnover_hf import prefix

    model = th.patch_model(_top_layer_adapter(tiny_bert()), th.TurnoverConfig(seed=4), warn_leaking=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    select_rows = prefix._select_rows
    # A broken replay: hands every row the first target's lower layers.
    monkeypatch.setattr(prefix, "_select_rows", lambda obj, index: select_rows(obj, torch.zeros_like(index)))
    targets = batch_of(train_set, [50, 51, 52])
    scorer = th.TurnoverScorer(model, batch_size=8)
    scores = scorer.scores(targets, targets["labels"], torch.arange(5))
    assert scorer.path == "batched" and "disagrees" in caplog.text
    assert torch.allclose(scores, naive_influence(model, targets, torch.arange(5)), atol=1e-5)
