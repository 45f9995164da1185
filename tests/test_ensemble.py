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
