import csv

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from transformers import TrainingArguments

import turnover_hf as th
from turnover_hf import cli
from turnover_hf.dynamics import TrainingDynamicsCallback
from turnover_hf.evaluation.metrics import roc_auc
from turnover_hf.label_issues import (
    DEFAULT_METHOD,
    METHODS,
    LabelSignals,
    cleansing_report,
    estimated_issue_count,
    label_issue_scores,
    model_signals,
    rank_label_issues,
)

from conftest import text_task, tiny_bert, word_tokenizer

N_FLIPPED = 12


def _signals(**kw) -> LabelSignals:
    # example 1 is labelled 0 but every model says 1 with confidence: the clearest label error
    full = torch.tensor([[2.0, -2.0], [-3.0, 3.0], [-1.0, 1.0], [0.5, -0.5]])
    flip = torch.tensor([[1.0, -1.0], [-2.0, 2.0], [-0.5, 0.5], [-0.2, 0.2]])
    return LabelSignals(torch.tensor([0, 0, 1, 0]), torch.tensor([10, 11, 12, 13]), full_logits=full,
                        flip_logits=flip, **kw)


@pytest.mark.parametrize("method", ["loss", "margin", "flip_loss", "flip_margin", "full_flip", "loss_classnorm",
                                    "full_flip_classnorm"])
def test_a_confidently_wrong_label_ranks_first(method):
    scores = label_issue_scores(_signals(), method)
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    assert int(scores.argmax()) == 1


def test_class_normalised_loss_is_the_loss_minus_its_class_mean():
    signals = _signals()
    loss = label_issue_scores(signals, "loss")
    normalised = label_issue_scores(signals, "loss_classnorm")
    for label in (0, 1):
        rows = signals.labels == label
        torch.testing.assert_close(normalised[rows], loss[rows] - loss[rows].mean())


def test_missing_signals_and_unknown_methods_say_what_to_do():
    signals = LabelSignals(torch.tensor([0, 1]), torch.tensor([0, 1]), full_logits=torch.zeros(2, 2))
    with pytest.raises(th.TurnoverError, match="TrainingDynamicsCallback"):
        label_issue_scores(signals, "aum")
    with pytest.raises(th.TurnoverError, match="flip_logits"):
        label_issue_scores(signals, "flip_loss")
    with pytest.raises(th.TurnoverError, match="unknown label-issue method 'nope'"):
        label_issue_scores(signals, "nope")


def test_ranking_columns_flags_and_texts():
    ranked = rank_label_issues(_signals(), "loss", texts=["a", "b", "c", "d"], label_names=["neg", "pos"],
                               num_issues=3)
    assert ranked["example_id"][0] == 11 and ranked["text"][0] == "b"
    assert ranked["example_id"][:3] == [11, 13, 12]  # the 3 highest losses, all flagged
    assert ranked["is_issue"] == [True, True, True, False]
    assert ranked["given_label_name"][0] == "neg" and ranked["suggested_label_name"][0] == "pos"
    assert ranked["score"] == sorted(ranked["score"], reverse=True)
    assert ranked["rank"] == [1, 2, 3, 4] and "'loss'" in ranked.info.description
    assert len(rank_label_issues(_signals(), "loss", top_k=1)) == 1


def test_cleanlab_methods_and_issue_count_use_cleanlab():
    pytest.importorskip("cleanlab")
    from cleanlab.rank import get_label_quality_scores

    signals = _signals()
    quality = get_label_quality_scores(signals.labels.numpy(), torch.softmax(signals.flip_logits, -1).double().numpy())
    torch.testing.assert_close(label_issue_scores(signals, "cleanlab_flip"), torch.as_tensor(1 - quality))
    assert 1 <= estimated_issue_count(signals) <= 2


def test_cleansing_report_compares_removal_and_relabelling_with_random_removal(text_data):
    ranked = rank_label_issues(_signals(), "loss", num_issues=1)
    data = text_data.select(range(4)).map(lambda row, i: {"example_id": 10 + i}, with_indices=True)
    seen = []

    def evaluate(train, seed):
        seen.append((seed, sorted(train["example_id"]), list(train["label"])))
        return float(11 not in train["example_id"] or train["label"][train["example_id"].index(11)] == 1)

    report = cleansing_report(evaluate, data, ranked, seeds=[0, 1], relabel=True)
    assert report["flagged"] == 1
    assert report["removed"]["mean"] == 1.0 and report["relabelled"]["mean"] == 1.0
    assert report["noisy"]["mean"] == 0.0
    assert report["removed_minus_random"]["mean"] == pytest.approx(1.0 - report["random"]["mean"])
    assert any(ids == [10, 12, 13] for _, ids, _ in seen)  # the flagged example removed


@pytest.fixture(scope="module")
def text_data():
    return text_task(96, seed=3)


@pytest.fixture(scope="module")
def noisy_model(tmp_path_factory, text_data):
    """A tiny BERT trained by TurnoverTrainer on the text task with 12 labels flipped, with the
    training dynamics recorded; saved with its tokenizer and training set."""
    root = tmp_path_factory.mktemp("labels")
    tokenizer = word_tokenizer(root / "tok")
    flipped = np.zeros(len(text_data), dtype=bool)
    flipped[np.random.default_rng(0).permutation(len(text_data))[:N_FLIPPED]] = True
    noisy = text_data.map(lambda row, i: {"label": 1 - row["label"] if flipped[i] else row["label"]},
                          with_indices=True)
    tokenized = noisy.map(lambda rows: tokenizer(rows["text"]), batched=True).rename_column("label", "labels")
    # the whole tiny BERT trains (a frozen random encoder cannot learn the task); masks on the classifier's inputs
    model = th.patch_model(tiny_bert(), th.TurnoverConfig(seed=5), warn_leaking=False)
    args = TrainingArguments(str(root / "run"), per_device_train_batch_size=8, num_train_epochs=8, learning_rate=3e-3,
                             report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True)
    trainer = th.TurnoverTrainer(model=model, args=args, train_dataset=tokenized, processing_class=tokenizer,
                                 callbacks=[TrainingDynamicsCallback()])
    trainer.train()
    trainer.save_model(str(root / "model"))
    tokenizer.save_pretrained(root / "model")
    noisy.save_to_disk(root / "train")
    return root, noisy, flipped


def test_pipeline_ranks_flipped_labels_first_with_every_method(noisy_model):
    root, noisy, flipped = noisy_model
    pipe = th.InfluencePipeline(str(root / "model"), train_dataset=noisy, estimator="turnover")
    is_flipped = dict(zip(noisy["example_id"], flipped))
    aucs = {}
    for method in [m for m in METHODS if m != "self_influence"]:
        ranked = pipe.label_issues(method)
        assert len(ranked) == len(noisy) and set(ranked["method"]) == {method}
        assert ranked["text"][0] == noisy[noisy["example_id"].index(ranked["example_id"][0])]["text"]
        n = len(ranked)
        aucs[method] = roc_auc(-np.arange(n, dtype=float), [is_flipped[i] for i in ranked["example_id"]])
    assert aucs[DEFAULT_METHOD] > 0.7, aucs
    assert aucs["dynamics_flip_loss"] > 0.6, aucs


def test_model_signals_keep_the_rows_order_and_equal_plain_forwards(noisy_model):
    root, noisy, _ = noisy_model
    pipe = th.InfluencePipeline(str(root / "model"), train_dataset=noisy, estimator="turnover")
    rows = pipe._train_features.select([5, 1, 7, 0, 3]).map(  # unsorted ids, then lengths 9, 7, 8, 9, 7
        lambda row, i: {k: row[k][: len(row[k]) - (2 * i) % 3] for k in ("input_ids", "attention_mask", "token_type_ids")},
        with_indices=True)
    assert len({len(x) for x in rows["input_ids"]}) == 3
    signals = model_signals(pipe.models, rows, pipe.collator, batch_size=2)
    assert signals.example_ids.tolist() == rows["example_id"] and signals.labels.tolist() == rows["labels"]
    for n in range(len(rows)):
        batch = pipe.collator([rows[n]])
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "example_ids")}
        with torch.no_grad():
            full = pipe.model(**inputs).logits[0]
            with th.instance_masks(pipe.model, batch["example_ids"], mode="flip"):
                flip = pipe.model(**inputs).logits[0]
        torch.testing.assert_close(signals.full_logits[n], full, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(signals.flip_logits[n], flip, atol=1e-5, rtol=1e-4)


def test_methods_that_need_dynamics_refuse_a_model_without_them(noisy_model):
    root, noisy, _ = noisy_model
    model = th.load_influence_ready(str(root / "model"))
    pipe = th.InfluencePipeline(model, train_dataset=noisy, tokenizer=word_tokenizer(root / "tok2"),
                                estimator="turnover")
    assert len(pipe.label_issues()) == len(noisy)  # the default needs no dynamics
    with pytest.raises(th.TurnoverError, match="TrainingDynamicsCallback"):
        pipe.label_issues("dynamics_flip_loss")


def test_cli_writes_the_ranking_and_the_fixed_training_sets(noisy_model, capsys):
    root, noisy, _ = noisy_model
    code = cli.main(["label-issues", "--model", str(root / "model"), "--train", str(root / "train"), "--output",
                     str(root / "issues.csv"), "--num_issues", "5", "--estimator", "turnover", "--kept_dataset",
                     str(root / "kept"), "--relabelled_dataset", str(root / "relabelled"), "--top", "3"])
    assert code == 0
    out = capsys.readouterr().out
    with open(root / "issues.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(noisy) and [r["is_issue"] for r in rows[:6]] == ["True"] * 5 + ["False"]
    flagged = {int(r["example_id"]): int(r["suggested_label"]) for r in rows[:5]}
    assert f"ranked by {DEFAULT_METHOD!r}; 5 flagged" in out
    kept = load_from_disk(root / "kept")
    assert sorted(kept["example_id"]) == sorted(set(noisy["example_id"]) - set(flagged))
    relabelled = load_from_disk(root / "relabelled")
    for example_id, label in zip(relabelled["example_id"], relabelled["label"]):
        if example_id in flagged:
            assert label == flagged[example_id]
