"""Property: a training set with any one cell edited (a random row, a random column, a random new text or label) is
refused by the pipeline with the row's id and the column named, whether the model recorded its texts or its tokens
only; an edit that leaves what the model trained on unchanged is accepted.

A longer run (1,000 examples per property): HYPOTHESIS_PROFILE=long python -m pytest tests/test_training_set_properties.py
"""

import os

import pytest
from datasets import Dataset
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers import TrainingArguments

import turnover_hf as th

from conftest import VOCAB, text_task, tiny_bert, word_tokenizer
from test_training_set import _top_layer_adapter

N = 24
WORDS = st.lists(st.sampled_from([f"w{i}" for i in range(5, VOCAB)]), min_size=1, max_size=10).map(" ".join)
TEXTS = st.one_of(WORDS, st.text(max_size=40))
CELLS = settings(max_examples=1000 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 30, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One model trained on the texts beside their tokens, one on the tokens only (built once for the module)."""
    folder = tmp_path_factory.mktemp("cells")
    tokenizer = word_tokenizer(folder / "tok")
    train = text_task(N)
    out = {}
    for recorded, drop in (("texts", []), ("tokens", ["text"])):
        model = th.patch_model(_top_layer_adapter(tiny_bert()), th.TurnoverConfig(seed=4), freeze_leaking=True)
        encoded = train.map(lambda rows: tokenizer(rows["text"], truncation=True), batched=True, remove_columns=drop)
        args = TrainingArguments(str(folder / recorded), per_device_train_batch_size=8, num_train_epochs=1,
                                 report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
        th.TurnoverTrainer(model=model, args=args, train_dataset=encoded, processing_class=tokenizer).train()
        out[recorded] = model
    out["max_length"] = _pipeline(out["tokens"], tokenizer, train).max_length  # how the pipeline truncates
    return out, tokenizer, train


def _with_cell(train: Dataset, row: int, column: str, value) -> Dataset:
    data = train.to_dict()
    data[column] = list(data[column])
    data[column][row] = value
    return Dataset.from_dict(data, features=train.features)


def _pipeline(model, tokenizer, train):
    return th.InfluencePipeline(model, tokenizer, train_dataset=train, estimator="influence")


@CELLS
@given(row=st.integers(0, N - 1), text=TEXTS)
def test_any_edited_text_is_refused_when_texts_were_recorded(models, row, text):
    trained, tokenizer, train = models
    assume(text != train[row]["text"])
    with pytest.raises(th.ConfigMismatchError, match=rf"column 'text' differs in 1 rows \(e\.g\. ids \[{row}\]\)"):
        _pipeline(trained["texts"], tokenizer, _with_cell(train, row, "text", text))


@CELLS
@given(row=st.integers(0, N - 1), text=TEXTS)
def test_any_edited_text_is_refused_on_its_tokens_when_only_tokens_were_recorded(models, row, text):
    trained, tokenizer, train = models
    assume(text != train[row]["text"])
    edited = _with_cell(train, row, "text", text)
    tokens = lambda t: tokenizer(t, truncation=True, max_length=trained["max_length"])["input_ids"]
    if tokens(text) == tokens(train[row]["text"]):  # e.g. other case or spacing: the model trained on the same
        _pipeline(trained["tokens"], tokenizer, edited)
        return
    with pytest.raises(th.ConfigMismatchError, match=rf"column 'input_ids' differs in 1 rows \(e\.g\. ids \[{row}\]\)"):
        _pipeline(trained["tokens"], tokenizer, edited)


@CELLS
@given(row=st.integers(0, N - 1), label=st.integers(-2, 9), recorded=st.sampled_from(["texts", "tokens"]))
def test_any_edited_label_is_refused(models, row, label, recorded):
    trained, tokenizer, train = models
    assume(label != train[row]["label"])
    with pytest.raises(th.ConfigMismatchError, match=rf"column 'labels' differs in 1 rows \(e\.g\. ids \[{row}\]\)"):
        _pipeline(trained[recorded], tokenizer, _with_cell(train, row, "label", label))
