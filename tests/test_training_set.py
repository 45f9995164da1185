"""The training set's identity: recorded by TurnoverTrainer, saved with the checkpoint, verified by the pipeline, and
loaded by the pipeline itself when the checkpoint names where the data lives."""

import json
import logging
import os

import pytest
import torch
from datasets import Dataset, Value, load_dataset, load_from_disk
from transformers import TrainingArguments

import turnover_hf as th
from turnover_hf.training_set import TRAINING_SET_NAME, DatasetSource, record_training_set, training_set_of

from conftest import text_task, tiny_bert, word_tokenizer


def _top_layer_adapter(model):
    """A bottleneck adapter in the top layer only (the masks then sit above everything below it)."""
    import adapters

    adapters.init(model)
    model.add_adapter("top", config=adapters.SeqBnConfig(reduction_factor=2, leave_out=[0]))
    model.train_adapter("top")
    return model


def _train(folder, train, tokenizer, **trainer_kwargs):
    """A tiny adapter model trained one epoch with TurnoverTrainer on ``train`` and saved (with its tokenizer)."""
    model = th.patch_model(_top_layer_adapter(tiny_bert()), th.TurnoverConfig(seed=6), freeze_leaking=True)
    encoded = train.map(lambda rows: tokenizer(rows["text"], truncation=True), batched=True)
    args = TrainingArguments(str(folder / "run"), per_device_train_batch_size=8, num_train_epochs=1, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, learning_rate=1e-2)
    trainer = th.TurnoverTrainer(model=model, args=args, train_dataset=encoded, processing_class=tokenizer, **trainer_kwargs)
    trainer.train()
    trainer.save_model(str(folder / "model"))
    return model, str(folder / "model")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    tokenizer = word_tokenizer(folder / "tok")
    train = text_task(40)
    model, path = _train(folder, train, tokenizer)
    return model, path, train


def _reassigned(train: Dataset, seed: int = 1) -> Dataset:
    """The same rows, shuffled, with ids given again by position: every id now names another row."""
    shuffled = train.shuffle(seed=seed).flatten_indices()
    return shuffled.remove_columns("example_id").add_column("example_id", list(range(len(train))))


def test_the_record_accepts_the_set_and_its_subsets_and_names_what_differs():
    train = text_task(30)
    record = record_training_set(train)
    record.verify(train)
    record.verify(train.select([7, 3, 20]))  # a subset, in any order
    record.verify(train.shuffle(seed=2))  # the same rows (with their ids) in another order
    record.verify(train.rename_column("label", "labels"))  # one column under the other name collators use
    record.verify(train.cast_column("label", Value("int32")))  # the same values in another integer width
    with pytest.raises(th.ConfigMismatchError, match=r"not the data the model was trained on: column 'labels' differs in 1 rows \(e\.g\. ids \[4\]\)"):
        record.verify(train.map(lambda r: {"label": 1 - r["label"] if r["example_id"] == 4 else r["label"]}))
    with pytest.raises(th.ConfigMismatchError, match="column 'text' differs"):
        record.verify(_reassigned(train))
    with pytest.raises(th.ConfigMismatchError, match="column 'text' differs in 30 rows"):
        record.verify(text_task(30, seed=5))  # another data set of the same size
    with pytest.raises(th.ConfigMismatchError, match=r"2 of 31 rows whose ids the model never trained on \(e\.g\. \[30, 31\]"):
        record.verify(text_task(32).select(range(1, 32)))
    with pytest.raises(th.ConfigMismatchError, match="trained on 30 examples but train_dataset has 3 of them"):
        record.verify(train.select(range(3)), require_all=True)
    with pytest.raises(th.ConfigMismatchError, match="shares no data column"):
        record.verify(train.remove_columns(["text", "label"]).add_column("other", [0] * 30))
    assert record.fingerprint == record_training_set(train.shuffle(seed=3)).fingerprint  # order does not matter
    assert record.fingerprint != record_training_set(_reassigned(train)).fingerprint


def test_trainer_records_the_training_set_and_the_checkpoint_carries_it(trained):
    model, path, train = trained
    config = json.loads(open(os.path.join(path, th.CONFIG_NAME)).read())
    assert config["training_set"]["num_examples"] == 40
    assert config["training_set"]["columns"] == ["input_ids", "labels", "text"]
    assert os.path.isfile(os.path.join(path, TRAINING_SET_NAME))
    loaded = th.load_influence_ready(path)
    assert training_set_of(loaded).fingerprint == training_set_of(model).fingerprint
    assert "fingerprint" in open(os.path.join(path, "README.md")).read()


@pytest.mark.parametrize("kind", ["other set of the same size", "ids reassigned after a shuffle", "ids never trained on"])
def test_the_pipeline_refuses_a_training_set_it_was_not_trained_on(trained, kind):
    _, path, train = trained
    bad = {
        "other set of the same size": lambda: text_task(40, seed=9),
        "ids reassigned after a shuffle": lambda: _reassigned(train),
        "ids never trained on": lambda: train.map(lambda r: {"example_id": r["example_id"] + 1000}),
    }[kind]()
    with pytest.raises(th.ConfigMismatchError, match="never trained on|not the data the model was trained on"):
        th.InfluencePipeline(path, train_dataset=bad, estimator="turnover")


def test_the_pipeline_scores_subsets_of_the_training_set(trained):
    _, path, train = trained
    full = th.InfluencePipeline(path, train_dataset=train, estimator="turnover")
    part = th.InfluencePipeline(path, train_dataset=train.select([9, 2, 30]), estimator="turnover")
    target = {"text": train[0]["text"], "label": train[0]["label"]}
    assert torch.allclose(part.scores([target]), full.scores([target], example_ids=[9, 2, 30]), atol=1e-6)
    assert full.scores([target], example_ids=[5]).shape == (1, 1)


def test_checkpoints_without_a_record_still_load_with_a_warning(trained, tmp_path, caplog):
    _, path, train = trained
    old = tmp_path / "old"
    import shutil

    shutil.copytree(path, old)
    config = json.loads((old / th.CONFIG_NAME).read_text())
    for field in ("training_set", "format_version"):  # as written before these fields existed
        del config[field]
    (old / th.CONFIG_NAME).write_text(json.dumps(config))
    os.remove(old / TRAINING_SET_NAME)
    with caplog.at_level(logging.WARNING, logger="turnover_hf.checkpoint.load"):
        model = th.load_influence_ready(old)
    assert training_set_of(model) is None and "records no training-set fingerprint" in caplog.text
    th.InfluencePipeline(str(old), train_dataset=train, estimator="turnover")  # the size check alone, as before


def test_a_record_that_does_not_match_its_config_is_refused(trained, tmp_path):
    _, path, _ = trained
    import shutil

    shutil.copytree(path, tmp_path / "ckpt")
    record = record_training_set(text_task(40, seed=4))
    record.save(tmp_path / "ckpt")  # another training set's hashes beside this model's config
    with pytest.raises(th.ConfigMismatchError, match="does not match the training-set fingerprint"):
        th.load_influence_ready(tmp_path / "ckpt")
    os.remove(tmp_path / "ckpt" / TRAINING_SET_NAME)
    with pytest.raises(th.ConfigMismatchError, match=f"has no {TRAINING_SET_NAME}"):
        th.load_influence_ready(tmp_path / "ckpt")


def test_a_checkpoint_names_its_load_from_disk_data_and_the_pipeline_loads_it(tmp_path):
    tokenizer = word_tokenizer(tmp_path / "tok")
    text_task(24).save_to_disk(str(tmp_path / "data"))
    train = load_from_disk(str(tmp_path / "data"))
    model, path = _train(tmp_path, train, tokenizer)  # tokenized by map: the source is still the folder read
    source = json.loads(open(os.path.join(path, th.CONFIG_NAME)).read())["training_set"]["source"]
    assert source["path"] == str(tmp_path / "data") and source["from_disk"]
    pipe = th.InfluencePipeline(path, estimator="turnover")  # no train_dataset: loaded and verified
    out = pipe(train[3]["text"], top_k=2)
    assert out["proponents"][0]["text"] == train[out["proponents"][0]["example_id"]]["text"]
    train.map(lambda r: {"label": 1 - r["label"]}).save_to_disk(str(tmp_path / "data2"))
    import shutil

    shutil.rmtree(tmp_path / "data")
    shutil.move(str(tmp_path / "data2"), str(tmp_path / "data"))  # the data changed since training
    with pytest.raises(th.ConfigMismatchError, match="column 'labels' differs in 24 rows"):
        th.InfluencePipeline(path, estimator="turnover")


def test_a_checkpoint_names_a_datasets_repository_and_the_pipeline_loads_it(tmp_path):
    """A local folder of JSON lines stands in for a Hub dataset repository (datasets.load_dataset reads both)."""
    tokenizer = word_tokenizer(tmp_path / "tok")
    repo = tmp_path / "data-repo"
    repo.mkdir()
    text_task(24).remove_columns("example_id").to_json(str(repo / "train.jsonl"))
    train = th.add_example_ids(load_dataset(str(repo), split="train"))
    source = DatasetSource(str(repo), split="train", add_ids=True)
    _, path = _train(tmp_path, train, tokenizer, train_dataset_source=source)
    pipe = th.InfluencePipeline(path, estimator="turnover")
    assert pipe.train_dataset["text"] == train["text"]
    with pytest.raises(th.TurnoverError, match="needs train_dataset"):
        th.InfluencePipeline(th.patch_model(tiny_bert(), warn_leaking=False), estimator="turnover")


# -- the check compares what the model trained on: tokens (as the pipeline tokenizes) and, where recorded, texts --
@pytest.fixture(scope="module")
def trained_on_tokens(tmp_path_factory):
    """A model whose trainer saw the tokens only (the texts removed first): its record holds no texts."""
    folder = tmp_path_factory.mktemp("tokens")
    tokenizer = word_tokenizer(folder / "tok")
    train = text_task(40)
    model = th.patch_model(_top_layer_adapter(tiny_bert()), th.TurnoverConfig(seed=6), freeze_leaking=True)
    encoded = train.map(lambda rows: tokenizer(rows["text"], truncation=True), batched=True, remove_columns=["text"])
    args = TrainingArguments(str(folder / "run"), per_device_train_batch_size=8, num_train_epochs=1, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, learning_rate=1e-2)
    th.TurnoverTrainer(model=model, args=args, train_dataset=encoded, processing_class=tokenizer).train()
    model.save_pretrained(str(folder / "model"))
    tokenizer.save_pretrained(str(folder / "model"))
    return model, str(folder / "model"), train, tokenizer


def _edit_text(train: Dataset, ids, words=("w9", "w9", "w9")) -> Dataset:
    chosen = set(ids)
    return train.map(lambda r: {"text": " ".join(words) if r["example_id"] in chosen else r["text"]})


def _identity_notes(caplog) -> list[str]:
    """Log lines (INFO and above) about the training set's identity."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO
            and any(word in r.getMessage() for word in ("training set", "train_dataset", "labels only"))]


@pytest.mark.parametrize("recorded", ["texts and tokens", "tokens only"])
@pytest.mark.parametrize("edit", ["one text edited", "rows replaced, labels kept"])
def test_an_edited_training_text_is_refused_naming_the_row_and_column(trained, trained_on_tokens, recorded, edit):
    path, train = (trained[1], trained[2]) if recorded == "texts and tokens" else (trained_on_tokens[1], trained_on_tokens[2])
    if edit == "one text edited":
        edited, first = _edit_text(train, [17]), 17
    else:  # other texts under the same ids and labels
        other = text_task(40, seed=9)
        edited = train.map(lambda r: {"text": other[r["example_id"]]["text"]} if r["example_id"] >= 10 else {"text": r["text"]})
        first = 10
    column = "text" if recorded == "texts and tokens" else "input_ids"
    with pytest.raises(th.ConfigMismatchError, match=rf"column '{column}' differs in \d+ rows \(e\.g\. ids \[{first}[,\]].*"
                                                        r"edited or replaced since training.*Pass the training set exactly as it was"):
        th.InfluencePipeline(path, train_dataset=edited, estimator="turnover")


@pytest.mark.parametrize("recorded", ["texts and tokens", "tokens only"])
def test_the_right_training_set_passes_silently(trained, trained_on_tokens, recorded, caplog):
    path, train = (trained[1], trained[2]) if recorded == "texts and tokens" else (trained_on_tokens[1], trained_on_tokens[2])
    with caplog.at_level(logging.INFO):
        th.InfluencePipeline(path, train_dataset=train, estimator="influence")  # texts: tokenized, then compared
        th.InfluencePipeline(path, train_dataset=train.select([3, 8]), estimator="turnover")  # a subset
    assert _identity_notes(caplog) == []


def test_a_tokenized_training_set_is_checked_on_its_tokens(trained_on_tokens, caplog):
    _, path, train, tokenizer = trained_on_tokens
    tokens = train.map(lambda rows: tokenizer(rows["text"], truncation=True), batched=True)
    with caplog.at_level(logging.INFO):
        th.InfluencePipeline(path, train_dataset=tokens, estimator="turnover")
        th.InfluencePipeline(path, train_dataset=tokens.remove_columns("text"), estimator="turnover")
    assert _identity_notes(caplog) == []
    changed = tokens.map(lambda r: {"input_ids": r["input_ids"][:-2] + r["input_ids"][-1:]} if r["example_id"] == 5 else {})
    with pytest.raises(th.ConfigMismatchError, match=r"column 'input_ids' differs in 1 rows \(e\.g\. ids \[5\]\)"):
        th.InfluencePipeline(path, train_dataset=changed, estimator="turnover")


def test_texts_tokenized_otherwise_than_in_training_are_named(trained):
    _, path, train = trained
    with pytest.raises(th.ConfigMismatchError, match=r"column 'input_ids' differs in 40 rows.*\['text'\] match the "
                                                        r"training rows.*not tokenized as in training.*max_length"):
        th.InfluencePipeline(path, train_dataset=train, estimator="turnover", max_length=5)


def test_ids_reassigned_after_a_shuffle_are_named_as_such(trained):
    _, path, train = trained
    with pytest.raises(th.ConfigMismatchError, match="training rows under other ids.*add_example_ids"):
        th.InfluencePipeline(path, train_dataset=_reassigned(train), estimator="turnover")


def test_an_in_memory_model_without_a_record_says_so_once_and_can_be_given_one(tmp_path, caplog):
    tokenizer = word_tokenizer(tmp_path / "tok")
    train = text_task(24)
    model = th.patch_model(_top_layer_adapter(tiny_bert()), th.TurnoverConfig(seed=3), freeze_leaking=True)
    model.turnover_config.num_train_examples = len(train)
    with caplog.at_level(logging.WARNING, logger="turnover_hf.pipeline"):
        th.InfluencePipeline(model, tokenizer, train_dataset=train, estimator="influence")
    notes = [r.getMessage() for r in caplog.records if "records no training set" in r.getMessage()]
    assert len(notes) == 1 and "TurnoverTrainer" in notes[0] and "attach_training_set" in notes[0]
    caplog.clear()
    th.attach_training_set(model, train.map(lambda rows: tokenizer(rows["text"], truncation=True), batched=True))
    with caplog.at_level(logging.INFO):
        th.InfluencePipeline(model, tokenizer, train_dataset=train, estimator="influence")
    assert _identity_notes(caplog) == []
    with pytest.raises(th.ConfigMismatchError, match=r"column 'text' differs in 1 rows \(e\.g\. ids \[2\]\)"):
        th.InfluencePipeline(model, tokenizer, train_dataset=_edit_text(train, [2]), estimator="influence")


def test_texts_are_tokenized_as_long_as_in_training_by_default(tmp_path):
    """A model trained on inputs truncated to 6 tokens: the pipeline, given the texts and no max_length, tokenizes
    them as training did (the record keeps the longest training input) and accepts them; at another length the
    rows differ and are named."""
    tokenizer = word_tokenizer(tmp_path / "tok")
    train = text_task(24)
    model = th.patch_model(_top_layer_adapter(tiny_bert()), th.TurnoverConfig(seed=6), freeze_leaking=True)
    encoded = train.map(lambda rows: tokenizer(rows["text"], truncation=True, max_length=6), batched=True)
    assert max(map(len, encoded["input_ids"])) == 6 < max(len(tokenizer(t)["input_ids"]) for t in train["text"])
    args = TrainingArguments(str(tmp_path / "run"), per_device_train_batch_size=8, num_train_epochs=1, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    th.TurnoverTrainer(model=model, args=args, train_dataset=encoded, processing_class=tokenizer).train()
    model.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / th.CONFIG_NAME).read_text())["training_set"]["longest_input"] == 6
    pipe = th.InfluencePipeline(str(tmp_path / "model"), tokenizer, train_dataset=train, estimator="turnover")
    assert pipe.max_length == 6
    with pytest.raises(th.ConfigMismatchError, match="column 'input_ids' differs"):
        th.InfluencePipeline(str(tmp_path / "model"), tokenizer, train_dataset=train, estimator="turnover",
                             max_length=64)
