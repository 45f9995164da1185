import logging
import os

import pytest
import torch

import turnover_hf as th

from conftest import text_task, tiny_bert, torchrun, word_tokenizer
from test_turnover import _top_layer_adapter, naive_influence, perturbed_top_adapter


@pytest.fixture
def setup(tmp_path):
    tokenizer = word_tokenizer(tmp_path / "tok")
    train = text_task(40)
    model = perturbed_top_adapter(6, freeze_leaking=True)
    model.turnover_config.num_train_examples = len(train)
    return model, tokenizer, train


def _encoded(tokenizer, texts, labels):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    batch["labels"] = torch.tensor(labels)
    return batch


def test_matrix_self_and_mean_influence_match_the_definition(setup):
    model, tokenizer, train = setup
    pipe = th.InfluencePipeline(model, tokenizer, train_dataset=train, batch_size=16, chunk_size=16,
                                estimator="turnover")
    targets = [{"text": train[i]["text"], "label": train[i]["label"]} for i in (0, 5, 7)]
    ids = torch.tensor(train["example_id"])
    encoded = _encoded(tokenizer, [t["text"] for t in targets], [t["label"] for t in targets])
    reference = naive_influence(model, encoded, ids)
    assert torch.allclose(pipe.scores(targets), reference, atol=1e-5)
    mean = pipe.mean_influence(targets)
    assert mean["example_id"] == train["example_id"] and mean["text"] == train["text"]
    assert torch.allclose(torch.tensor(mean["mean_influence"]), reference.mean(1), atol=1e-5)
    own = pipe.self_influence(example_ids=[0, 5, 7])
    assert own["example_id"] == [0, 5, 7]
    assert torch.allclose(torch.tensor(own["self_influence"]), reference[[0, 5, 7], [0, 1, 2]], atol=1e-5)


def test_call_returns_proponents_and_opponents_with_rows(setup, caplog):
    model, tokenizer, train = setup
    with caplog.at_level(logging.WARNING, logger="turnover_hf.pipeline"):
        pipe = th.InfluencePipeline(model, tokenizer, train_dataset=train, top_k=3, estimator="turnover")
    # one model: its rankings are mostly mask noise, and the warning names both remedies
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "single turn-over model" in warned and "train_ensemble" in warned and "estimator='influence'" in warned
    text = train[3]["text"]
    out = pipe(text)
    assert out["label_source"] == "predicted"
    scores = pipe.scores([{"text": text, "label": out["label"]}])[:, 0]
    assert [p["example_id"] for p in out["proponents"]] == scores.topk(3).indices.tolist()
    assert [p["example_id"] for p in out["opponents"]] == (-scores).topk(3).indices.tolist()
    first = out["proponents"][0]
    assert first["text"] == train[first["example_id"]]["text"] and first["label"] == train[first["example_id"]]["label"]
    assert first["score"] == pytest.approx(scores.max().item(), abs=1e-6)
    many = pipe([{"text": text, "label": 1}, {"text": train[4]["text"], "label": 0}], top_k=2)
    assert len(many) == 2 and all(r["label_source"] == "given" for r in many) and len(many[0]["opponents"]) == 2
    as_dataset = pipe(train.select([3, 4]), top_k=2)
    assert [r["label"] for r in as_dataset] == [train[3]["label"], train[4]["label"]]
    as_inputs = pipe(tokenizer(text), top_k=2)
    assert as_inputs["proponents"] == pipe(text, top_k=2)["proponents"]


def test_interrupted_run_resumes_and_never_overwrites(setup, tmp_path, monkeypatch):
    model, tokenizer, train = setup
    pipe = th.InfluencePipeline(model, tokenizer, train_dataset=train, chunk_size=8)
    targets = train.select([1, 2])
    full = pipe.scores(targets)
    out = tmp_path / "scores"
    calls = []
    original = pipe.scorer.scores

    def flaky(batch, labels, ids):
        calls.append(ids.tolist())
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(batch, labels, ids)

    monkeypatch.setattr(pipe.scorer, "scores", flaky)
    with pytest.raises(KeyboardInterrupt):
        pipe.scores(targets, output_dir=str(out))
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-000000.safetensors", "shard-000001.safetensors"]
    resumed = pipe.scores(targets, output_dir=str(out))
    assert len(calls) == 3 + 3  # chunks 2, 3, 4 computed now; 0 and 1 came from disk
    assert torch.allclose(resumed, full, atol=1e-6)
    again = pipe.scores(targets, output_dir=str(out))  # finished: read back, nothing recomputed
    assert len(calls) == 6 and torch.equal(again, resumed)
    with pytest.raises(th.TurnoverError, match="already holds another result"):
        pipe.scores(train.select([3]), output_dir=str(out))
    assert torch.equal(pipe.scores(targets, output_dir=str(out)), resumed)  # still intact


def test_pipeline_loads_a_checkpoint_folder(setup, tmp_path):
    model, tokenizer, train = setup
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    pipe = th.InfluencePipeline(str(tmp_path / "ckpt"), train_dataset=train)
    direct = th.InfluencePipeline(model, tokenizer, train_dataset=train)
    assert pipe.estimator == direct.estimator == "influence"  # the default for a classifier
    assert torch.allclose(pipe.scores(train.select([0, 1])), direct.scores(train.select([0, 1])), atol=1e-6)
    turnover = th.InfluencePipeline(str(tmp_path / "ckpt"), train_dataset=train, estimator="turnover")
    direct = th.InfluencePipeline(model, tokenizer, train_dataset=train, estimator="turnover")
    assert torch.equal(turnover.scores(train.select([0, 1])), direct.scores(train.select([0, 1])))


def test_bad_input_gets_clear_errors(setup):
    model, tokenizer, train = setup
    with pytest.raises(th.ConfigMismatchError, match="trained on 40 examples but train_dataset has 39"):
        th.InfluencePipeline(model, tokenizer, train_dataset=train.select(range(39)))
    no_tok = th.InfluencePipeline(model, None, train_dataset=train.map(lambda r: tokenizer(r["text"])))
    with pytest.raises(th.TurnoverError, match="needs a tokenizer"):
        no_tok("w5 w6")
    pipe = th.InfluencePipeline(model, tokenizer, train_dataset=train)
    with pytest.raises(th.ExampleIdError, match="not in the training set"):
        pipe.scores("w5 w6", example_ids=[0, 1000])
    with pytest.raises(th.TurnoverError, match="targets: a list holding items of type int"):
        pipe([3])
    with pytest.raises(th.NotPatchedError):
        th.InfluencePipeline(tiny_bert(), tokenizer, train_dataset=train, estimator="turnover")
    with pytest.raises(th.MissingExampleIdsError):
        th.InfluencePipeline(model, tokenizer, train_dataset=train.remove_columns("example_id"))


def test_resuming_with_another_chunk_size_gives_the_full_result(setup, tmp_path, monkeypatch):
    model, tokenizer, train = setup
    targets = train.select([1, 2])
    full = th.InfluencePipeline(model, tokenizer, train_dataset=train, estimator="turnover").scores(targets)
    pipe = th.InfluencePipeline(model, tokenizer, train_dataset=train, chunk_size=8, estimator="turnover")
    original, calls = pipe.scorer.scores, []

    def interrupted(batch, labels, ids):
        calls.append(len(ids))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(batch, labels, ids)

    monkeypatch.setattr(pipe.scorer, "scores", interrupted)
    out = str(tmp_path / "scores")
    with pytest.raises(KeyboardInterrupt):
        pipe.scores(targets, output_dir=out)
    other = th.InfluencePipeline(model, tokenizer, train_dataset=train, chunk_size=5, estimator="turnover")
    resumed = other.scores(targets, output_dir=out)
    assert resumed.shape == (40, 2) and torch.allclose(resumed, full, atol=1e-6)
    assert sorted(os.listdir(out)) == ["manifest.json", "scores.safetensors"]
    assert torch.equal(th.InfluencePipeline(model, tokenizer, train_dataset=train, chunk_size=3,
                                            estimator="turnover").scores(targets, output_dir=out), resumed)


def test_bad_arguments_and_targets_get_messages_not_tracebacks(setup):
    model, tokenizer, train = setup
    for name, value in [("chunk_size", 0), ("top_k", 0), ("top_k", -2), ("batch_size", 0), ("max_length", 0)]:
        with pytest.raises(th.TurnoverError, match=f"{name} must be a positive integer"):
            th.InfluencePipeline(model, tokenizer, train_dataset=train, estimator="turnover", **{name: value})
    pipe = th.InfluencePipeline(model, tokenizer, train_dataset=train, estimator="turnover", max_length=10_000)
    assert pipe.max_length == 32  # the tiny BERT's position table, not the asked 10000
    out = pipe(" ".join(["w7"] * 500), top_k=1)  # a target longer than the model accepts is truncated
    assert len(out["proponents"]) == 1
    with pytest.raises(th.TurnoverError, match="top_k must be a positive integer, got 0"):
        pipe("w5 w6", top_k=0)  # was: silently 5
    with pytest.raises(th.TurnoverError, match="targets is None"):
        pipe(None)
    with pytest.raises(th.TurnoverError, match="example_ids is empty"):
        pipe.scores("w5 w6", example_ids=[])
    for ids in (["a", "b"], [0, None]):
        with pytest.raises(th.ExampleIdError, match="example_ids must be non-negative integers"):
            pipe.scores("w5 w6", example_ids=ids)
    with pytest.raises(th.ExampleIdError, match="example_ids must be a list .* got str"):
        pipe.scores("w5 w6", example_ids="7")
    with pytest.raises(th.TurnoverError, match=r"target labels \[2\] are outside the model's 2 classes"):
        pipe({"text": "w5 w6", "label": 2})
    with pytest.raises(th.TurnoverError, match=r"target labels \[-3\] are outside"):
        pipe.scores([{"text": "w5 w6", "label": -3}])
    with pytest.raises(th.TurnoverError, match="targets have 40 tokens but the model accepts at most 32"):
        pipe({"input_ids": [2] + [7] * 39, "attention_mask": [1] * 40})
    with pytest.raises(th.ExampleIdError, match="holds 'x'"):
        th.InfluencePipeline(model, tokenizer, train_dataset=train.remove_columns("example_id").add_column(
            "example_id", ["x"] * 40), estimator="turnover")
    with pytest.raises(th.ConfigMismatchError, match="does not exist"):
        th.InfluencePipeline("./no/such/folder", train_dataset=train)
    with pytest.raises(th.ConfigMismatchError, match="neither a local folder nor a Hub repository"):
        th.InfluencePipeline("no-such-user/no-such-model", train_dataset=train)


def test_auto_scores_with_the_most_faithful_estimator_the_model_allows(setup, tmp_path, caplog):
    model, tokenizer, train = setup
    targets = train.select([1, 2, 3])
    auto = th.InfluencePipeline(model, tokenizer, train_dataset=train)
    chosen = th.InfluencePipeline(model, tokenizer, train_dataset=train, estimator="influence")
    assert auto.estimator == "influence" and isinstance(auto.scorer, th.InfluenceFunctionScorer)
    assert auto.scorer.sketch_dim is None
    assert torch.equal(auto.scores(targets), chosen.scores(targets))
    # a plain (unpatched) classifier: the influence function needs no masks
    plain = tiny_bert()
    plain_pipe = th.InfluencePipeline(plain, tokenizer, train_dataset=train)
    assert plain_pipe.estimator == "influence" and plain_pipe.scores(targets).shape == (40, 3)
    # several models: their turn-over scores are averaged
    other = th.patch_model(_top_layer_adapter(tiny_bert()), th.TurnoverConfig(seed=7), freeze_leaking=True).eval()
    other.turnover_config.num_train_examples = len(train)
    members = th.InfluencePipeline([model, other], tokenizer, train_dataset=train)
    assert members.estimator == "turnover" and members.num_members == 2
    with pytest.raises(th.TurnoverError, match="scores with 'turnover'.*Drop them"):
        th.InfluencePipeline([model, other], tokenizer, train_dataset=train, influence_options={"damping_factor": 1.0})


SHARDED = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from accelerate import PartialState
import turnover_hf as th
from conftest import text_task, word_tokenizer
from test_turnover import perturbed_top_adapter
state = PartialState(cpu=True)
model = perturbed_top_adapter(6, warn_leaking=False)
train = text_task(40)
pipe = th.InfluencePipeline(model, word_tokenizer({tok!r}), train_dataset=train, chunk_size=7)
scores = pipe.scores(train.select([1, 2, 3]))
own = pipe.self_influence(output_dir={out!r})
if state.is_main_process:
    from safetensors.torch import save_file
    save_file({{"scores": scores.contiguous(), "self": torch.tensor(own["self_influence"]),
               "ids": torch.tensor(own["example_id"]), "procs": torch.tensor(state.num_processes)}}, {result!r})
"""


@pytest.mark.multiprocess
def test_two_processes_give_the_single_process_result(tmp_path):
    from safetensors.torch import load_file

    tests = os.path.dirname(__file__)
    results = {}
    for procs in (1, 2):
        script = tmp_path / f"sharded{procs}.py"
        result = tmp_path / f"result{procs}.safetensors"
        script.write_text(SHARDED.format(tests=tests, tok=str(tmp_path / "tok"), out=str(tmp_path / f"own{procs}"),
                                         result=str(result)))
        torchrun(script, procs)
        results[procs] = load_file(result)
    assert int(results[2]["procs"]) == 2
    assert torch.equal(results[1]["ids"], results[2]["ids"]) and torch.equal(results[1]["ids"], torch.arange(40))
    assert torch.allclose(results[1]["scores"], results[2]["scores"], atol=1e-6)
    assert torch.allclose(results[1]["self"], results[2]["self"], atol=1e-6)


def test_both_estimators_behind_one_pipeline(tmp_path):
    """One training run (turn-over masks + HYDRA tracking), one checkpoint folder, both estimators by name."""
    from transformers import TrainingArguments

    tokenizer = word_tokenizer(tmp_path / "tok")
    train = text_task(24)
    tokenized = train.map(lambda r: tokenizer(r["text"]), remove_columns=["text"])
    model = th.patch_model(_top_layer_adapter(tiny_bert()), th.TurnoverConfig(seed=2), freeze_leaking=True)
    args = TrainingArguments(str(tmp_path / "run"), per_device_train_batch_size=8, num_train_epochs=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = th.HydraTurnoverTrainer(model=model, args=args, train_dataset=tokenized, processing_class=tokenizer)
    trainer.train()
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    trainer.hydra.save(folder / "hydra")
    targets = train.select([0, 1, 2])
    turnover = th.InfluencePipeline(str(folder), train_dataset=train, estimator="turnover")
    hydra = th.InfluencePipeline(str(folder), train_dataset=train, estimator="hydra")
    assert hydra.estimator == "hydra" and turnover.scorer.path == "prefix"
    auto = th.InfluencePipeline(str(folder), train_dataset=train, hydra_dir=folder / "hydra")
    assert auto.estimator == "hydra"  # hypergradients the user points to are used
    batch, labels, _ = hydra.prepare_targets(targets)
    direct = th.HydraScorer(hydra.model, str(folder / "hydra")).scores(batch, labels, torch.tensor(train["example_id"]))
    assert torch.allclose(hydra.scores(targets), direct, atol=1e-6)
    assert hydra.scores(targets).shape == turnover.scores(targets).shape == (24, 3)
    assert len(hydra.self_influence()) == 24 and hydra(train[0]["text"], top_k=2)["proponents"][0]["text"]
    with pytest.raises(th.TurnoverError, match="estimator must be one of"):
        th.InfluencePipeline(str(folder), train_dataset=train, estimator="tracin")
