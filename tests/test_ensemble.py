import os

import pytest
import torch
from transformers import TrainingArguments

import turnover_hf as th
from turnover_hf.evaluation import spearman_columns

from conftest import text_task, tiny_bert, word_tokenizer
from test_turnover import _top_layer_adapter


def _member(seed: int, n_train: int, weights_seed: int = 0):
    model = th.patch_model(_top_layer_adapter(tiny_bert()), th.TurnoverConfig(seed=seed), freeze_leaking=True).eval()
    torch.manual_seed(weights_seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.turnover_config.num_train_examples = n_train
    return model


@pytest.fixture
def task(tmp_path):
    return word_tokenizer(tmp_path / "tok"), text_task(30)


def test_ensemble_scores_are_the_mean_of_its_members(task):
    tokenizer, train = task
    members = [_member(seed, len(train), weights_seed=seed) for seed in (11, 12, 13, 14)]
    singles = [th.InfluencePipeline(m, tokenizer, train_dataset=train, estimator="turnover") for m in members]
    pipe = th.InfluencePipeline(members, tokenizer, train_dataset=train)
    assert pipe.num_members == 4
    targets = train.select([2, 9, 17])
    each = torch.stack([s.scores(targets) for s in singles])  # (4, n, 3)
    assert torch.allclose(pipe.scores(targets), each.mean(0), atol=1e-6)
    own = torch.stack([torch.tensor(s.self_influence()["self_influence"]) for s in singles]).mean(0)
    assert torch.allclose(torch.tensor(pipe.self_influence()["self_influence"]), own, atol=1e-6)
    mean = torch.stack([torch.tensor(s.mean_influence(targets)["mean_influence"]) for s in singles]).mean(0)
    assert torch.allclose(torch.tensor(pipe.mean_influence(targets)["mean_influence"]), mean, atol=1e-6)

    out = pipe(targets, top_k=3)
    expected = th.split_half_agreement(each)["estimated"]
    assert [r["agreement"] for r in out] == pytest.approx(expected)
    assert all(r["members"] == 4 for r in out)
    column = each.mean(0)[:, 1]
    assert [p["example_id"] for p in out[1]["proponents"]] == column.topk(3).indices.tolist()
    assert pipe.agreement(targets) == pytest.approx(expected)


def test_single_model_reports_no_agreement_and_refuses_to_measure_it(task):
    tokenizer, train = task
    pipe = th.InfluencePipeline(_member(1, len(train)), tokenizer, train_dataset=train, estimator="turnover")
    out = pipe(train[0]["text"])
    assert out["members"] == 1 and out["agreement"] is None
    with pytest.raises(th.TurnoverError, match="train_ensemble"):
        pipe.agreement(train.select([0]))


def test_split_half_agreement_follows_signal_to_noise():
    torch.manual_seed(0)
    truth = torch.randn(1, 400, 2)
    same = truth.expand(6, -1, -1)
    assert th.split_half_agreement(same)["estimated"] == pytest.approx([1.0, 1.0])
    noise = torch.randn(6, 400, 2)
    assert max(abs(v) for v in th.split_half_agreement(noise)["estimated"]) < 0.25
    # Member noise with variance 4 around the truth: each half-mean (3 members) has reliability 1 / (1 + 4/3),
    # two halves correlate at ~0.43 and the full ensemble is estimated at 2r / (1 + r) ~0.6.
    noisy = truth + 2 * torch.randn(6, 400, 2)
    result = th.split_half_agreement(noisy)
    half_means = noisy[0::2].mean(0), noisy[1::2].mean(0)
    assert result["half"] == pytest.approx(spearman_columns(half_means[0].numpy(), half_means[1].numpy()).tolist())
    assert all(0.4 < v < 0.8 for v in result["estimated"])
    assert all(e > h for e, h in zip(result["estimated"], result["half"]))


def test_members_must_differ_in_seed_and_share_the_training_set(task):
    tokenizer, train = task
    with pytest.raises(th.ConfigMismatchError, match="share mask seed 5"):
        th.InfluencePipeline([_member(5, len(train)), _member(5, len(train))], tokenizer, train_dataset=train)
    with pytest.raises(th.ConfigMismatchError, match="same training set"):
        th.InfluencePipeline([_member(5, len(train)), _member(6, len(train) + 1)], tokenizer, train_dataset=train)
    with pytest.raises(th.TurnoverError, match="estimator='turnover'"):
        th.InfluencePipeline([_member(5, len(train)), _member(6, len(train))], tokenizer, train_dataset=train,
                             estimator="hydra")


def test_train_ensemble_writes_members_the_pipeline_loads_and_resumes(task, tmp_path):
    tokenizer, train = task
    args = TrainingArguments(str(tmp_path / "ens"), max_steps=2, per_device_train_batch_size=8, report_to=[],
                             save_strategy="no", use_cpu=True, seed=3, learning_rate=1e-2)
    make = lambda: _top_layer_adapter(tiny_bert())
    train = train.map(lambda rows: tokenizer(rows["text"]), batched=True)
    paths = th.train_ensemble(make, th.TurnoverConfig(seed=20), args, train, num_members=2, freeze_leaking=True,
                              processing_class=tokenizer)
    assert paths == [os.path.join(args.output_dir, "member-0"), os.path.join(args.output_dir, "member-1")]
    assert [th.TurnoverConfig.from_pretrained(p).seed for p in paths] == [20, 21]
    pipe = th.InfluencePipeline(args.output_dir, train_dataset=train)
    assert pipe.num_members == 2 and [m.turnover_config.seed for m in pipe.models] == [20, 21]
    by_list = th.InfluencePipeline(paths, tokenizer, train_dataset=train)
    targets = train.select([0, 1])
    assert torch.equal(pipe.scores(targets), by_list.scores(targets))

    # Members differ in their trained weights, not only in their masks (each has its own training seed).
    weights = [dict(m.named_parameters()) for m in pipe.models]
    trained = [n for n, p in weights[0].items() if p.requires_grad]
    assert any(not torch.equal(weights[0][n], weights[1][n]) for n in trained)

    stamp = {p: os.path.getmtime(os.path.join(p, "model.safetensors")) for p in paths}
    more = th.train_ensemble(make, th.TurnoverConfig(seed=20), args, train, num_members=3, freeze_leaking=True,
                             processing_class=tokenizer)
    assert {p: os.path.getmtime(os.path.join(p, "model.safetensors")) for p in paths} == stamp  # kept, not retrained
    assert th.TurnoverConfig.from_pretrained(more[2]).seed == 22
    with pytest.raises(th.ConfigMismatchError, match="another output_dir"):
        th.train_ensemble(make, th.TurnoverConfig(seed=40), args, train, num_members=1, processing_class=tokenizer)
    with pytest.raises(th.ConfigMismatchError, match="training examples: 30 vs 20"):
        th.train_ensemble(make, th.TurnoverConfig(seed=20), args, train.select(range(20)), num_members=1,
                          processing_class=tokenizer)


# -- an ensemble folder records its members (ensemble.json) and loading refuses a missing or changed one -----------
@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    """Three members trained once by train_ensemble (each test damages a copy)."""
    folder = tmp_path_factory.mktemp("ensemble")
    tokenizer = word_tokenizer(folder / "tok")
    train = text_task(30).map(lambda rows: tokenizer(rows["text"]), batched=True)
    args = TrainingArguments(str(folder / "ens"), max_steps=2, per_device_train_batch_size=8, report_to=[],
                             save_strategy="no", use_cpu=True, seed=3, learning_rate=1e-2)
    th.train_ensemble(lambda: _top_layer_adapter(tiny_bert()), th.TurnoverConfig(seed=30), args, train, num_members=3,
                      freeze_leaking=True, processing_class=tokenizer)
    return folder / "ens", train, tokenizer


def _copy(ensemble, tmp_path):
    import shutil

    shutil.copytree(ensemble[0], tmp_path / "ens")
    return tmp_path / "ens"


def _change_weights(member):
    from safetensors.torch import load_file, save_file

    path = str(member / "model.safetensors")
    tensors = load_file(path)
    name = next(n for n in tensors if "adapter_up" in n)
    tensors[name] = tensors[name] + 0.01  # as further training saved into the folder would
    save_file(tensors, path, metadata={"format": "pt"})


def _set_config(member, **fields):
    import json

    config = json.loads((member / th.CONFIG_NAME).read_text())
    (member / th.CONFIG_NAME).write_text(json.dumps({**config, **fields}))


def test_an_ensemble_folder_records_its_members_and_loads_silently(ensemble, caplog):
    import json
    import logging

    folder, train, _ = ensemble
    manifest = json.loads((folder / "ensemble.json").read_text())
    assert [m["folder"] for m in manifest["members"]] == ["member-0", "member-1", "member-2"]
    assert [m["seed"] for m in manifest["members"]] == [30, 31, 32]
    assert all("model.safetensors" in m["weights_sha256"] and m["config_sha256"] for m in manifest["members"])
    with caplog.at_level(logging.INFO, logger="turnover_hf"):
        pipe = th.InfluencePipeline(str(folder), train_dataset=train)
    assert pipe.num_members == 3 and pipe.estimator == "turnover"
    assert not [r for r in caplog.records if "member" in r.getMessage() or "training set" in r.getMessage()]


@pytest.mark.parametrize("damage, message", [
    ("member deleted", r"member 'member-1' of .* is missing .*records 3 members.*train_ensemble again"),
    ("two members deleted", r"member 'member-1' of .* is missing"),
    ("member config deleted", r"member 'member-2' of .* has no turnover_config\.json.*train_ensemble again"),
    ("member weights changed", r"member 'member-1' of .*: its weights changed.*\['model\.safetensors'\].*record_ensemble"),
    ("member seed changed", r"member 'member-0' of .* has mask seed 77 .*recorded seed 30"),
    ("member config edited", r"member 'member-2' of .*: its turnover_config\.json changed"),
    ("member added", r"holds member folders \['member-3'\] that its ensemble\.json does not record"),
    ("record damaged", r"ensemble\.json is damaged"),
])
def test_a_missing_or_changed_member_is_refused_naming_it(ensemble, tmp_path, damage, message):
    import shutil

    folder = _copy(ensemble, tmp_path)
    {
        "member deleted": lambda: shutil.rmtree(folder / "member-1"),
        "two members deleted": lambda: (shutil.rmtree(folder / "member-1"), shutil.rmtree(folder / "member-2")),
        "member config deleted": lambda: os.remove(folder / "member-2" / th.CONFIG_NAME),
        "member weights changed": lambda: _change_weights(folder / "member-1"),
        "member seed changed": lambda: _set_config(folder / "member-0", seed=77),
        "member config edited": lambda: _set_config(folder / "member-2", num_train_examples=31),
        "member added": lambda: shutil.copytree(folder / "member-2", folder / "member-3"),
        "record damaged": lambda: (folder / "ensemble.json").write_text("{\"members\": [", encoding="utf-8"),
    }[damage]()
    for estimator in ("auto", "turnover"):  # never scored with the rest, nor handed to another estimator
        with pytest.raises(th.ConfigMismatchError, match=message):
            th.InfluencePipeline(str(folder), train_dataset=ensemble[1], estimator=estimator)


def test_an_ensemble_folder_without_a_record_loads_with_a_warning_unless_damage_shows(ensemble, tmp_path, caplog):
    import logging
    import shutil

    folder = _copy(ensemble, tmp_path)
    os.remove(folder / "ensemble.json")  # as written before the record existed
    with caplog.at_level(logging.WARNING, logger="turnover_hf.estimators.ensemble"):
        assert th.InfluencePipeline(str(folder), train_dataset=ensemble[1]).num_members == 3
    assert "records no member list" in caplog.text and "record_ensemble" in caplog.text
    gap = _copy(ensemble, tmp_path / "gap")
    os.remove(gap / "ensemble.json")
    shutil.rmtree(gap / "member-1")
    with pytest.raises(th.ConfigMismatchError, match=r"missing members \['member-1'\]"):
        th.InfluencePipeline(str(gap), train_dataset=ensemble[1])
    no_config = _copy(ensemble, tmp_path / "noconfig")
    os.remove(no_config / "ensemble.json")
    os.remove(no_config / "member-1" / th.CONFIG_NAME)
    with pytest.raises(th.ConfigMismatchError, match=r"members \['member-1'\] of .* have no turnover_config\.json"):
        th.InfluencePipeline(str(no_config), train_dataset=ensemble[1])
    th.record_ensemble(folder)  # recorded as it is now: silent, and a later change is refused
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="turnover_hf.estimators.ensemble"):
        th.InfluencePipeline(str(folder), train_dataset=ensemble[1])
    assert "records no member list" not in caplog.text
    _change_weights(folder / "member-0")
    with pytest.raises(th.ConfigMismatchError, match="its weights changed"):
        th.ensemble_members(folder)


def test_resuming_train_ensemble_refuses_a_recorded_member_changed_since(ensemble, tmp_path):
    folder = _copy(ensemble, tmp_path)
    _, train, tokenizer = ensemble
    _change_weights(folder / "member-1")
    args = TrainingArguments(str(folder), max_steps=2, per_device_train_batch_size=8, report_to=[],
                             save_strategy="no", use_cpu=True, seed=3, learning_rate=1e-2)
    with pytest.raises(th.ConfigMismatchError, match="member 'member-1' .*its weights changed"):
        th.train_ensemble(lambda: _top_layer_adapter(tiny_bert()), th.TurnoverConfig(seed=30), args, train,
                          num_members=4, freeze_leaking=True, processing_class=tokenizer)
    assert not (folder / "member-3").exists()  # refused before training anything


def test_members_trained_on_different_training_sets_are_refused(task):
    tokenizer, train = task
    a, b = _member(5, len(train)), _member(6, len(train))
    th.attach_training_set(a, train)
    th.attach_training_set(b, text_task(30, seed=4))
    with pytest.raises(th.ConfigMismatchError, match="member 1 was trained on another training set than member 0"):
        th.InfluencePipeline([a, b], tokenizer, train_dataset=train, estimator="turnover")
