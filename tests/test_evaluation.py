"""Fidelity metrics against independently computed answers, cheap retraining (heads, cached top layers), peers
against autograd and Captum, and the benchmark core of both settings on tiny data."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import batch_of, tiny_bert, tiny_gpt2, token_task

import turnover_hf as th
from turnover_hf.evaluation import (
    Cleansing,
    HeadRecipe,
    KronfluenceEKFAC,
    TopModel,
    TopRecipe,
    TurnoverHead,
    cache_top_inputs,
    auc_difference,
    captum_tracin,
    explained_variance,
    gauss_newton_influence,
    gradient_dot,
    head_masks,
    lds,
    lds_per_target,
    leave_one_out,
    linear_residuals,
    loo_correlation,
    loo_effects,
    margin_factors,
    mislabel_detection,
    most_harmful,
    patched_classifier,
    random_subsets,
    rankdata,
    roc_auc,
    save_trainer_checkpoint,
    seed_agreement,
    spearman,
    spearman_columns,
    subset_losses,
    subset_target_losses,
    top_accuracy,
    top_losses,
    top_self_scores,
    top_turnover_scores,
    train_head,
    train_top,
)
from turnover_hf.evaluation.peers import load_trainer_checkpoint


# -- metrics --------------------------------------------------------------------------------------------------------
def brute_spearman(a, b) -> float:
    """Spearman for untied data from its textbook formula 1 - 6 sum d^2 / (n (n^2 - 1))."""
    n = len(a)
    ra = {v: r for r, v in enumerate(sorted(a), start=1)}
    rb = {v: r for r, v in enumerate(sorted(b), start=1)}
    d2 = sum((ra[x] - rb[y]) ** 2 for x, y in zip(a, b))
    return 1 - 6 * d2 / (n * (n * n - 1))


def brute_auc(scores, positives) -> float:
    """The probability that a random positive outscores a random negative, ties counting one half."""
    pos = [s for s, p in zip(scores, positives) if p]
    neg = [s for s, p in zip(scores, positives) if not p]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_rankdata_averages_ties():
    assert rankdata([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert rankdata([[5, 5], [1, 7]], axis=1).tolist() == [[1.5, 1.5], [1.0, 2.0]]


def test_spearman_matches_textbook_formula():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.permutation(30).tolist(), rng.permutation(30).tolist()
        assert spearman(a, b) == pytest.approx(brute_spearman(a, b), abs=1e-12)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 25]) == pytest.approx(0.8)
    assert spearman(torch.arange(5.0), -torch.arange(5.0)) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_spearman_columns_is_per_column():
    a = np.array([[1, 1], [2, 2], [3, 3]])
    b = np.array([[1, 3], [2, 2], [3, 1]])
    assert spearman_columns(a, b).tolist() == pytest.approx([1.0, -1.0])


def test_lds_perfect_reversed_and_constant_offset():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(40, 6))
    subsets = random_subsets(40, 25, seed=2)
    assert subsets.sum(1).tolist() == [20] * 25
    actual = 3.0 - subsets @ scores  # helpful examples lower the loss: the exact additive model
    assert lds(scores, subsets, actual) == pytest.approx(1.0)
    assert lds(-scores, subsets, actual) == pytest.approx(-1.0)
    # A per-target offset and a positive per-target scale change nothing.
    assert lds(scores * np.arange(1, 7), subsets, actual + np.arange(6)) == pytest.approx(1.0)
    assert lds(torch.tensor(scores), torch.tensor(subsets), torch.tensor(actual)) == pytest.approx(1.0)


def test_lds_per_target_is_spearman_of_predicted_subset_losses():
    rng = np.random.default_rng(3)
    scores, subsets = rng.normal(size=(15, 3)), random_subsets(15, 8, seed=4)
    actual = rng.normal(size=(8, 3))
    expected = [brute_spearman(list(-(subsets @ scores[:, t])), list(actual[:, t])) for t in range(3)]
    assert lds_per_target(scores, subsets, actual).tolist() == pytest.approx(expected)


def test_lds_skips_constant_targets_and_checks_shapes():
    scores = np.zeros((4, 2))
    scores[:, 0] = [1, 2, 3, 4]
    subsets = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=bool)
    actual = np.stack([-np.array([1, 2, 3, 4.0]), np.zeros(4)], axis=1)
    assert lds(scores, subsets, actual) == pytest.approx(1.0)  # target 1 is constant: NaN, skipped
    with pytest.raises(ValueError, match="subset_masks"):
        lds(scores, subsets[:, :3], actual)


def test_seed_agreement():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(50, 4))
    assert seed_agreement(a, a) == pytest.approx({"overall": 1.0, "per_target": 1.0})
    assert seed_agreement(a, -a)["per_target"] == pytest.approx(-1.0)
    b = rng.normal(size=(50, 4))
    expected = np.mean([brute_spearman(list(a[:, t]), list(b[:, t])) for t in range(4)])
    assert seed_agreement(a, b)["per_target"] == pytest.approx(expected)


def test_roc_auc_matches_pairwise_definition():
    assert roc_auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert roc_auc([1, 2, 3, 4], [1, 1, 0, 0]) == 0.0
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    rng = np.random.default_rng(6)
    scores = rng.integers(0, 5, size=40).astype(float)  # many ties
    labels = rng.random(40) < 0.3
    assert roc_auc(scores, labels) == pytest.approx(brute_auc(scores, labels))
    with pytest.raises(ValueError, match="positive"):
        roc_auc([1, 2], [False, False])


def test_mislabel_detection_direction_and_recall():
    flipped = np.zeros(100, dtype=bool)
    flipped[:10] = True
    influence = np.arange(100.0)  # the flipped rows have the lowest values
    low = mislabel_detection(influence, flipped, low_is_suspicious=True)
    assert low["auc"] == 1.0
    assert low["recall@5%"] == pytest.approx(0.5) and low["recall@10%"] == 1.0 and low["recall@20%"] == 1.0
    high = mislabel_detection(influence, flipped, low_is_suspicious=False)
    assert high["auc"] == 0.0 and high["recall@10%"] == 0.0
    assert mislabel_detection(
        torch.tensor(influence), torch.tensor(flipped), low_is_suspicious=True, fractions=(0.02,)
    ) == {"auc": 1.0, "recall@2%": 0.2}
    with pytest.raises(TypeError):
        mislabel_detection(influence, flipped)  # the direction must be chosen


def test_weighted_auc_is_the_auc_of_the_resampled_examples():
    from turnover_hf.evaluation.metrics import _weighted_auc

    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, size=50).astype(float)  # many ties
    labels = rng.random(50) < 0.3
    weights = rng.integers(0, 4, size=(5, 50)).astype(float)
    weights[:, np.flatnonzero(labels)[0]] += 1
    weights[:, np.flatnonzero(~labels)[0]] += 1
    for row, w in zip(_weighted_auc(scores, labels, weights), weights.astype(int)):
        assert row == pytest.approx(roc_auc(np.repeat(scores, w), np.repeat(labels, w)))


def test_auc_difference_is_paired():
    rng = np.random.default_rng(0)
    labels = rng.random(600) < 0.1
    signal = labels + rng.normal(size=600)
    close = signal + 0.1 * rng.normal(size=600)  # a slightly different detector of the same thing
    found = auc_difference(signal, close, labels, resamples=500)
    assert found["difference"] == pytest.approx(roc_auc(signal, labels) - roc_auc(close, labels))
    assert found["low"] <= found["difference"] <= found["high"]
    alone = auc_difference(signal, np.zeros(600), labels, resamples=500)  # a constant has AUC 0.5 in every resample
    assert alone["difference"] == pytest.approx(roc_auc(signal, labels) - 0.5)
    assert found["high"] - found["low"] < 0.5 * (alone["high"] - alone["low"])  # resampled together: far narrower
    noise = auc_difference(signal, rng.normal(size=600), labels, resamples=500)
    assert noise["low"] > 0  # a real detector against noise: the whole interval above zero
    same = auc_difference(torch.tensor(signal), signal, torch.tensor(labels), resamples=50)
    assert same["difference"] == same["low"] == same["high"] == 0.0
    assert auc_difference(signal, close, labels, resamples=200, seed=4) == auc_difference(
        signal, close, labels, resamples=200, seed=4)
    with pytest.raises(ValueError, match="differ in length"):
        auc_difference(signal, close[:-1], labels)
    with pytest.raises(ValueError, match="level"):
        auc_difference(signal, close, labels, level=1.5)


def test_linear_residuals_remove_exactly_linear_parts():
    rng = np.random.default_rng(7)
    design = (rng.random((60, 5)) < 0.5).astype(float)
    linear = 2.0 + design @ rng.normal(size=(5, 3))
    noise = rng.normal(size=(60, 3))
    assert np.abs(linear_residuals(linear, design)).max() < 1e-10
    assert explained_variance(linear, linear_residuals(linear, design)).tolist() == pytest.approx([1.0] * 3)
    residual = linear_residuals(linear + noise, design)
    noisy = linear + noise
    expected = [1 - residual[:, j].var() / noisy[:, j].var() for j in range(3)]
    assert explained_variance(noisy, residual).tolist() == pytest.approx(expected)
    # Residuals are orthogonal to the centred design and have zero mean.
    centred = design - design.mean(0)
    assert np.abs(centred.T @ residual).max() < 1e-9 and np.abs(residual.mean(0)).max() < 1e-10


# -- retraining -----------------------------------------------------------------------------------------------------
def toy_split(n: int, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] + 0.3 * torch.randn(n, generator=g) > 0).long()
    return x, y, torch.arange(1000, 1000 + n)


@pytest.mark.parametrize("channels", [1, 3])
def test_head_masks_are_the_patched_models_masks(channels):
    recipe = HeadRecipe(in_features=8, width=6, channels=channels, epochs=1, batch_size=8)
    x, y, ids = toy_split(12)
    trained = train_head(x, y, ids, recipe, init_seed=0, mask_seed=11)
    model = patched_classifier(trained.head, mask_seed=11).eval()
    assert [s.name for s in th.context.state_of(model).sites] == recipe.layer_keys
    for mode, flipped in (("train", False), ("flip", True)):
        with torch.no_grad(), th.instance_masks(model, ids, mode=mode):
            patched = model(x)
        direct = trained.head(x, head_masks(ids, recipe, 11, flipped=flipped))
        torch.testing.assert_close(patched, direct)
    # The original head stays unpatched and is the full network.
    torch.testing.assert_close(trained.head(x), model(x))


def test_training_is_deterministic_and_masks_reach_the_gradients():
    recipe = HeadRecipe(in_features=8, width=6, epochs=2, batch_size=4)
    x, y, ids = toy_split(16)
    a = train_head(x, y, ids, recipe, init_seed=3, mask_seed=3)
    b = train_head(x, y, ids, recipe, init_seed=3, mask_seed=3)
    for (name, pa), pb in zip(a.head.named_parameters(), b.head.parameters()):
        assert torch.equal(pa, pb), name
    # An example's loss under its own mask has no gradient on the hidden units its mask drops.
    head, mask = a.head, a.masks(ids[:1])
    head.zero_grad()
    F.cross_entropy(head(x[:1], mask), y[:1]).backward()
    dropped = mask[0, 0] == 0
    assert dropped.any() and torch.all(head.hidden.weight.grad[dropped] == 0)
    assert torch.all(head.out.weight.grad[:, dropped] == 0)


def test_subset_and_leave_one_out_ground_truths():
    recipe = HeadRecipe(in_features=8, width=6, epochs=2, batch_size=8)
    x, y, ids = toy_split(24)
    tx, ty, _ = toy_split(5, seed=1)
    subsets = random_subsets(24, 3, seed=0)
    losses = subset_target_losses(x, y, ids, subsets, tx, ty, recipe, seeds=[7, 8, 9])
    assert losses.shape == (3, 5) and np.isfinite(losses).all()
    rows = torch.as_tensor(np.flatnonzero(subsets[1]))
    again = train_head(x[rows], y[rows], ids[rows], recipe, init_seed=8, mask_seed=8).head.losses(tx, ty)
    np.testing.assert_allclose(losses[1], again.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="one seed per subset"):
        subset_target_losses(x, y, ids, subsets, tx, ty, recipe, seeds=[1])

    loo = leave_one_out(x, y, ids, [0, 5], tx, ty, recipe, init_seed=2, mask_seed=2)
    full = train_head(x, y, ids, recipe, init_seed=2, mask_seed=2).head.losses(tx, ty)
    without = train_head(x, y, ids, recipe, init_seed=2, mask_seed=2, exclude=torch.tensor([5])).head.losses(tx, ty)
    np.testing.assert_allclose(loo[1], (without - full).numpy(), rtol=1e-5, atol=1e-7)


# -- the benchmark's scorers and core ------------------------------------------------------------------------------
BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity.py"


@pytest.fixture(scope="module")
def fidelity():
    """The benchmark module, loaded from its file so the tests do not depend on the working directory."""
    spec = importlib.util.spec_from_file_location("fidelity_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def tiny_data(fidelity, n_train: int = 40, n_targets: int = 6, d: int = 8):
    """A learnable toy problem in the benchmark's data layout (train / flipped labels / targets / test)."""
    x, y, ids = toy_split(n_train + n_targets + 30, d=d)
    train = fidelity.Split(x[:n_train], y[:n_train], ids[:n_train])
    targets = fidelity.Split(
        x[n_train : n_train + n_targets], y[n_train : n_train + n_targets], ids[n_train : n_train + n_targets]
    )
    test = fidelity.Split(x[n_train + n_targets :], y[n_train + n_targets :], ids[n_train + n_targets :])
    noisy, flipped = fidelity.with_flipped_labels(train.labels, 0.2, seed=0)
    return fidelity.FidelityData(train, noisy, flipped, targets, test)


@pytest.mark.parametrize("channels", [1, 3])
def test_closed_form_scores_equal_the_patched_definition(fidelity, channels):
    data = tiny_data(fidelity)
    recipe = HeadRecipe(in_features=8, width=5, channels=channels, epochs=2, batch_size=8)
    trained = train_head(data.train.features, data.train.labels, data.train.ids, recipe, init_seed=0, mask_seed=4)
    assert fidelity.check_closed_form(trained, data.train, data.targets, n_ids=5, n_targets=4) < 1e-5
    full = fidelity.turnover_scores(trained, data.train.ids, data.targets, "full")
    mirror = fidelity.turnover_scores(trained, data.train.ids, data.targets, "mirror")
    torch.testing.assert_close(full + mirror, fidelity.turnover_scores(trained, data.train.ids, data.targets))
    # Self-influence is the diagonal of scoring the training set against itself.
    own = fidelity.Split(data.train.features, data.train.labels, data.train.ids)
    torch.testing.assert_close(
        fidelity.self_turnover(trained, data.train, data.train.labels),
        fidelity.turnover_scores(trained, data.train.ids, own).diagonal(),
        rtol=1e-5,
        atol=1e-6,
    )
    if channels == 1:
        torch.testing.assert_close(
            fidelity.channel_flip_scores(trained, data.train.ids, data.targets),
            fidelity.turnover_scores(trained, data.train.ids, data.targets),
        )


def _flat_grad(head, x, y, mask):
    loss = F.cross_entropy(head(x[None], None if mask is None else mask[None]), y[None])
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(head.parameters()))]).double()


@pytest.mark.parametrize("channels", [1, 2])
def test_gradient_peers_equal_autograd(fidelity, channels):
    data = tiny_data(fidelity, n_train=20, n_targets=3)
    train, targets = data.train, data.targets
    recipe = HeadRecipe(in_features=8, width=4, channels=channels, epochs=2, batch_size=4)
    trained = train_head(train.features, train.labels, train.ids, recipe, init_seed=1, mask_seed=1)
    head, masks = trained.head, trained.masks(train.ids)
    g_train = torch.stack([_flat_grad(head, train.features[i], train.labels[i], masks[i]) for i in range(len(train))])
    g_target = torch.stack(
        [_flat_grad(head, targets.features[i], targets.labels[i], None) for i in range(len(targets))]
    )
    masked = fidelity.head_factors(head, train.features, train.labels, masks)
    full = fidelity.head_factors(head, train.features, train.labels, None)
    target = fidelity.head_factors(head, targets.features, targets.labels, None)
    assert masked.n_params == sum(p.numel() for p in head.parameters())
    torch.testing.assert_close(gradient_dot(masked, target).double(), g_train @ g_target.T, rtol=1e-4, atol=1e-6)
    # Self-influence: the masked training gradient against the full network's gradient on the same example.
    g_full = torch.stack([_flat_grad(head, train.features[i], train.labels[i], None) for i in range(len(train))])
    own = gradient_dot(masked, full, paired=True).double()
    torch.testing.assert_close(own, (g_train * g_full).sum(1), rtol=1e-4, atol=1e-6)

    # The Gauss-Newton matrix built from explicit margin Jacobians, inverted densely.
    rows, weights = [], []
    for i in range(len(train)):
        logits = head(train.features[i][None], masks[i][None])[0]
        margin = logits[0] - logits[1]
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(margin, list(head.parameters()))]).double())
        p = torch.softmax(logits.detach(), -1)
        weights.append(float(p[0] * p[1]))
    jac, w = torch.stack(rows), torch.tensor(weights, dtype=torch.float64)
    gauss_newton = (jac.T * w) @ jac / len(train)
    n_params = jac.shape[1]
    damping = 0.1 * torch.trace(gauss_newton) / n_params
    expected = g_train @ torch.linalg.solve(
        gauss_newton + damping * torch.eye(n_params, dtype=torch.float64), g_target.T
    )
    got = gauss_newton_influence(masked, target, 0.1).double()
    torch.testing.assert_close(got, expected / len(train), rtol=1e-4, atol=1e-7)
    inverse = torch.linalg.inv(gauss_newton + damping * torch.eye(n_params, dtype=torch.float64))
    expected_self = ((g_train @ inverse) * g_full).sum(1) / len(train)
    got_self = gauss_newton_influence(masked, full, 0.1, paired=True).double()
    torch.testing.assert_close(got_self, expected_self, rtol=1e-4, atol=1e-7)


def peer_rows(fidelity) -> int:
    """Captum's two rows when installed (Kronfluence is tested through its bridge: its fixed costs are seconds)."""
    return 2 * fidelity.captum_available()


def test_run_fidelity_core_on_tiny_data(fidelity):
    settings = fidelity.Settings(
        n_train=40,
        n_targets=6,
        n_subsets=6,
        width=6,
        wide_widths=(12,),
        ensembles=(2,),
        channels=(2,),
        epochs=2,
        batch_size=8,
        tracin_checkpoints=2,
        damping_factors=(0.1,),
        n_loo=4,
        loo_seeds=2,
        cleansing_seeds=2,
        cleansing_fraction=0.05,
        peers=("captum",),
        projected_variants=({"projection_dim": 64}, {"projection_dim": 64, "design": "kronecker"}),
    )
    results = fidelity.run_fidelity(tiny_data(fidelity), settings, log=lambda message: None)
    methods = [row["method"] for row in results["rows"]]
    expected_rows = (12 + 1 + len(settings.influence_projections) + len(settings.projected_variants)
                     + peer_rows(fidelity))  # + the library influence-function rows
    assert (
        len(methods) == expected_rows and methods[0].startswith("(a)") and methods[-1].startswith("(g) training loss")
    )
    library = {row["method"]: row for row in results["rows"] if "library InfluenceFunctionScorer" in row["method"]}
    exact_row = library["(g) Gauss-Newton influence, library InfluenceFunctionScorer (exact)"]
    exact = exact_row["extra"]
    # The library estimator on the patched model computes what the benchmark's factorised in-house version does.
    assert exact["max_abs_difference_vs_in_house"] < 1e-4 * max(1.0, exact["max_abs_in_house"])
    for row in results["rows"]:
        assert 0.0 <= row["mislabel_auc"] <= 1.0
        if row["lds"] is not None:
            assert -1.0 <= row["lds"] <= 1.0 and -1.0 <= row["agreement"] <= 1.0
    projected = [row for row in results["rows"] if "library ProjectedInfluenceScorer" in row["method"]]
    assert len(projected) == 2 and all(-1 <= r["extra"]["pearson_vs_exact_library_per_target_mean"] <= 1
                                       for r in projected)
    for row in projected:  # the paired comparison of its mislabel AUC with the exact fit's
        versus = row["extra"]["mislabel_auc_vs_exact"]
        assert versus["difference"] == pytest.approx(row["mislabel_auc"] - exact_row["mislabel_auc"])
        assert versus["low"] <= versus["difference"] <= versus["high"]
    repetition = [row["extra"]["top10_repetition"] for row in results["rows"][:-1]]
    assert all(0.0 <= r <= 1.0 for r in repetition)
    first = results["rows"][0]
    assert first["extra"]["closed_form_gap_vs_patched_model"] < 1e-5
    for row in results["rows"][:-1]:  # every estimator row: the new columns are filled and consistent
        assert -1.0 <= row["loo_corr"] <= 1.0 and row["cleansing_gain"] is not None
        assert row["accuracy_cost"] is not None
        assert row["end_to_end_seconds"] == pytest.approx(
            row["train_seconds"] + row["self_seconds"] + row["target_seconds"] - row["setup_seconds"]
        )
    gt = results["ground_truth"]
    assert gt["loo_examples"] == 4 and gt["loo_seeds"] == 2 and gt["cleansing"]["removed"] == 2
    table = fidelity.markdown(results)
    assert table.count("\n| (") == expected_rows and "LOO corr." in table and "end-to-end s" in table
    written = fidelity.notes({**results, "environment": {}})
    assert any("Leave-one-out" in line for line in written)
    assert sum("mislabel AUC minus the exact fit's" in line for line in written) == len(projected)



def test_run_fidelity_selected_row_groups(fidelity):
    settings = fidelity.Settings(n_train=40, n_targets=6, n_subsets=6, width=6, epochs=2, batch_size=8, n_loo=4,
                                 loo_seeds=2, cleansing_seeds=2, cleansing_fraction=0.05)
    results = fidelity.run_fidelity(tiny_data(fidelity), settings, log=lambda message: None, groups=["loss"])
    assert [row["method"][:3] for row in results["rows"]] == ["(a)", "(g)"]
    assert results["rows"][-1]["method"].startswith("(g) training loss")
    with pytest.raises(ValueError, match=r"row groups \['h'\] are not in the head setting"):
        fidelity.run_fidelity(tiny_data(fidelity), settings, log=lambda message: None, groups=["loss", "h"])

# -- leave-one-out, cleansing and accuracy-cost building blocks -----------------------------------------------------
def test_loo_correlation_and_most_harmful():
    rng = np.random.default_rng(8)
    actual = rng.normal(size=(12, 4))
    assert loo_correlation(actual * 3.0, actual) == pytest.approx(
        {"pearson": 1.0, "spearman": 1.0, "per_target_spearman": 1.0}
    )
    assert loo_correlation(-actual, actual)["pearson"] == pytest.approx(-1.0)
    noisy = actual + rng.normal(size=actual.shape)
    expected = np.corrcoef(noisy.ravel(), actual.ravel())[0, 1]
    assert loo_correlation(noisy, actual)["pearson"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="n_targets"):
        loo_correlation(actual, actual[:, :2])

    scores = np.zeros((10, 3))
    scores[[7, 2, 5], :] = [[-3.0], [-2.0], [-1.0]]  # most harmful: 7, then 2, then 5
    scores[4] = [5.0, -9.0, 5.0]  # negative on one target, positive on average
    assert most_harmful(scores, 0.2).tolist() == [7, 2]
    assert most_harmful(scores.mean(1), 0.3).tolist() == [7, 2, 5]
    with pytest.raises(ValueError, match="fraction"):
        most_harmful(scores, 1.5)


def test_cleansing_pairs_every_condition_by_seed():
    """A retraining stand-in whose accuracy is known: 0.8 minus 0.1 per kept 'bad' row, plus a seed offset."""
    bad = np.zeros(50, dtype=bool)
    bad[[3, 9]] = True
    calls = []

    def evaluate(keep, seed):
        calls.append(seed)
        return 0.8 - 0.1 * float((keep & bad).sum()) + 0.01 * (seed - 100)

    cleansing = Cleansing(evaluate, n=50, seeds=[100, 101, 102], fraction=0.04, random_seed=0)
    assert [len(r) for r in cleansing.random_removals] == [2, 2, 2]
    gain = cleansing.gain(np.array([3, 9]))
    random_bad = [int(bad[r].sum()) for r in cleansing.random_removals]
    assert gain["gain_vs_none"] == pytest.approx(0.2)
    assert gain["gain_vs_random"] == pytest.approx(np.mean([0.2 - 0.1 * k for k in random_bad]))
    assert len(calls) == 9  # baselines (none, random) and the cleansed condition, 3 seeds each
    cleansing.gain(np.array([0, 1]))
    assert len(calls) == 12  # baselines are computed once


def test_dropout_recipe_trains_with_fresh_masks():
    x, y, ids = toy_split(32)
    recipe = HeadRecipe(in_features=8, width=6, epochs=2, batch_size=8)
    heads = {
        masking: train_head(x, y, ids, recipe.replace(masking=masking), init_seed=1, mask_seed=1).head
        for masking in ("turnover", "dropout", "none")
    }
    again = train_head(x, y, ids, recipe.replace(masking="dropout"), init_seed=1, mask_seed=1).head
    assert torch.equal(again.out.weight, heads["dropout"].out.weight)  # seeded: reproducible
    other = train_head(x, y, ids, recipe.replace(masking="dropout"), init_seed=1, mask_seed=2).head
    assert not torch.equal(other.out.weight, heads["dropout"].out.weight)  # the mask seed drives the dropout
    weights = [h.out.weight for h in heads.values()]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    with pytest.raises(ValueError, match="masking"):
        HeadRecipe(masking="sometimes")


def test_generic_ground_truths_match_the_head_versions():
    recipe = HeadRecipe(in_features=8, width=6, epochs=2, batch_size=8)
    x, y, ids = toy_split(24)
    tx, ty, _ = toy_split(5, seed=1)

    def measure(row, seed):
        exclude = None if row is None else torch.tensor([row])
        return train_head(x, y, ids, recipe, init_seed=seed, mask_seed=seed, exclude=exclude).head.losses(tx, ty).numpy()

    effects = loo_effects(measure, [0, 5], seeds=[2, 3])
    assert effects.shape == (2, 2, 5)
    for s, seed in enumerate([2, 3]):
        expected = leave_one_out(x, y, ids, [0, 5], tx, ty, recipe, init_seed=seed, mask_seed=seed)
        np.testing.assert_allclose(effects[s], expected, rtol=1e-5, atol=1e-7)
    subsets = random_subsets(24, 3, seed=0)

    def on_rows(rows, seed):
        rows = torch.as_tensor(rows)
        return train_head(x[rows], y[rows], ids[rows], recipe, init_seed=seed, mask_seed=seed).head.losses(tx, ty).numpy()

    np.testing.assert_allclose(
        subset_losses(on_rows, subsets, seeds=[7, 8, 9]),
        subset_target_losses(x, y, ids, subsets, tx, ty, recipe, seeds=[7, 8, 9]),
    )


# -- cached top layer: a real adapter model, retrained cheaply ------------------------------------------------------
def top_adapter_bert(reduction_factor: int = 2, seed: int = 0, channels: int = 1):
    """A tiny BERT with a bottleneck adapter in its last layer only, patched with turn-over dropout (``channels``
    mask channels on the classifier)."""
    import adapters

    model = tiny_bert(seed=seed)
    adapters.init(model)
    leave_out = list(range(model.config.num_hidden_layers - 1))
    model.add_adapter(
        "bn", config=adapters.SeqBnConfig(reduction_factor=reduction_factor, init_weights="bert", leave_out=leave_out)
    )
    model.train_adapter("bn")
    return th.patch_model(model, th.TurnoverConfig(seed=7, channels=channels), freeze_leaking=True).eval()


def forward_inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("labels", "example_ids")}


@pytest.fixture(scope="module")
def top_setup():
    model = top_adapter_bert()
    ds = th.add_example_ids(token_task(40))
    batches = [batch_of(ds, range(24)), batch_of(ds, range(24, 40))]
    return model, TopModel(model), cache_top_inputs(model, batches), batch_of(ds)


def test_top_model_is_the_full_model_above_the_cut(top_setup):
    model, top, cache, batch = top_setup
    assert len(cache) == 40 and torch.equal(cache.example_ids, batch["example_ids"])
    trained = train_top(top, cache, TopRecipe(epochs=2, batch_size=8), init_seed=1, mask_seed=3)
    with trained.active(top), torch.no_grad():
        torch.testing.assert_close(top(cache.hidden, cache.residual), model(**forward_inputs(batch)).logits)
        # Under masks too, and with examples on the position axis.
        with th.instance_masks(model, batch["example_ids"][:5], mode="flip"):
            full = model(**forward_inputs({k: v[:5] for k, v in batch.items()})).logits
        with th.instance_masks(top, cache.example_ids[:5], mode="flip"):
            flipped = top(cache.hidden[:5], cache.residual[:5])
            positions = top(cache.hidden[:5, None].expand(5, 3, -1), cache.residual[:5, None].expand(5, 3, -1))
        torch.testing.assert_close(flipped, full)
        torch.testing.assert_close(positions[:, 1], full)


def test_top_scores_equal_the_library_scorer(top_setup):
    model, top, cache, batch = top_setup
    trained = train_top(top, cache, TopRecipe(epochs=2, batch_size=8), init_seed=1, mask_seed=3)
    targets = cache.select(range(4))
    scores = top_turnover_scores(top, trained, cache.example_ids, targets, block=16)
    with trained.active(top):
        assert th.context.state_of(model).config.seed == 3
        reference = th.TurnoverScorer(model, fast=False).scores(
            forward_inputs({k: v[:4] for k, v in batch.items()}), batch["labels"][:4], cache.example_ids
        )
        own = th.TurnoverScorer(model, fast=False).self_scores(batch, batch["labels"], batch["example_ids"])
    assert th.context.state_of(model).config.seed == 7  # restored after the block, and so are the weights
    other = train_top(top, cache, TopRecipe(epochs=1, batch_size=8), init_seed=2, mask_seed=5)
    before = {name: p.detach().clone() for name, p in top.trainable().items()}
    with other.active(top):
        assert torch.equal(top.classifier.weight, other.state["classifier.weight"])
    assert all(torch.equal(p, before[name]) for name, p in top.trainable().items())
    torch.testing.assert_close(scores, reference, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(top_self_scores(top, trained, cache, block=16), own, rtol=1e-4, atol=1e-6)
    assert scores.abs().max() > 0


def test_train_top_recipes_and_leave_one_out(top_setup):
    _, top, cache, _ = top_setup
    recipe = TopRecipe(epochs=2, batch_size=8)
    a = train_top(top, cache, recipe, init_seed=1, mask_seed=3, checkpoint_epochs=[1, 2])
    b = train_top(top, cache, recipe, init_seed=1, mask_seed=3)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert [c.epoch for c in a.checkpoints] == [1, 2]
    assert all(torch.equal(a.checkpoints[-1].state_dict[k], a.state[k]) for k in a.state)
    names = set(a.state)
    assert names == {n for n, p in top.named_parameters() if p.requires_grad} and "classifier.bias" not in names
    other_masks = train_top(top, cache, recipe, init_seed=1, mask_seed=4)
    dropout = train_top(top, cache, replace(recipe, masking="dropout"), init_seed=1, mask_seed=3)
    plain = train_top(top, cache, replace(recipe, masking="none"), init_seed=1, mask_seed=3)
    for trained in (other_masks, dropout, plain):
        assert not torch.equal(trained.state["classifier.weight"], a.state["classifier.weight"])
    # Leaving a row out is the same as training on the others when the batch order is drawn for the others only
    # in the same way: compare with an explicit exclusion of the same row instead.
    without = train_top(top, cache, recipe, init_seed=1, mask_seed=3, exclude=[5])
    assert not torch.equal(without.state["classifier.weight"], a.state["classifier.weight"])
    assert top_accuracy(top, a, cache) == pytest.approx(
        float((top_losses(top, a, cache) < math.log(2)).float().mean())
    )


def test_cached_top_refuses_models_it_cannot_serve():
    import adapters

    model = tiny_bert()
    adapters.init(model)
    model.add_adapter("bn", config=adapters.SeqBnConfig(reduction_factor=2, init_weights="bert"))  # every layer
    model.train_adapter("bn")
    model = th.patch_model(model, th.TurnoverConfig(seed=7), freeze_leaking=True)
    with pytest.raises(th.TurnoverError, match="below the top layer"):
        TopModel(model)
    with pytest.raises(th.TurnoverError, match="BERT-style"):
        TopModel(th.patch_model(tiny_gpt2(), th.TurnoverConfig(seed=1)))


# -- peers: exact factorised gradients, Captum and Kronfluence bridges ---------------------------------------------
def test_margin_factors_on_the_adapter_equal_autograd(top_setup):
    _, top, cache, _ = top_setup
    trained = train_top(top, cache, TopRecipe(epochs=2, batch_size=8), init_seed=1, mask_seed=3)
    names = sorted({n.rpartition(".")[0] for n in top.trainable()})
    modules = dict(top.named_modules())
    layers = [modules[n] for n in names]
    targets = cache.select(range(5))
    with trained.active(top):
        train_f = margin_factors(
            lambda r: top(cache.hidden[r], cache.residual[r], cache.example_ids[r]), len(cache), layers,
            cache.labels, batch_size=16,
        )
        target_f = margin_factors(lambda r: top(targets.hidden[r], targets.residual[r]), 5, layers, targets.labels)
        params = list(top.trainable().values())
        assert train_f.n_params == sum(p.numel() for p in params)

        def grad(part, i, ids):
            loss = F.cross_entropy(top(part.hidden[i : i + 1], part.residual[i : i + 1], ids), part.labels[i : i + 1])
            return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).double()

        g_train = torch.stack([grad(cache, i, cache.example_ids[i : i + 1]) for i in range(len(cache))])
        g_target = torch.stack([grad(targets, i, None) for i in range(5)])
    torch.testing.assert_close(gradient_dot(train_f, target_f).double(), g_train @ g_target.T, rtol=1e-4, atol=1e-7)
    # The output gradient is taken before the output mask: units an example's mask drops get none.
    up = names.index(next(n for n in names if n.endswith("adapter_up")))
    site = next(s for s in th.context.state_of(top).sites if s.name.endswith("adapter_up"))
    kept = th.mask_for(cache.example_ids, site.name, site.units, p=0.5, seed=3)
    dropped = kept == 0
    assert dropped.any() and torch.all(train_f.grads[up][dropped] == 0) and train_f.grads[up][~dropped].abs().sum() > 0


@pytest.mark.skipif(importlib.util.find_spec("captum") is None, reason="captum is not installed")
def test_captum_bridge_equals_in_house_tracin(top_setup, tmp_path):
    _, top, cache, _ = top_setup
    trained = train_top(top, cache, TopRecipe(epochs=2, batch_size=8), init_seed=1, mask_seed=3, checkpoint_epochs=[1, 2])
    paths = [
        save_trainer_checkpoint(str(tmp_path), c.state_dict, step=5 * c.epoch, epoch=c.epoch, learning_rate=c.lr * c.epoch)
        for c in trained.checkpoints
    ]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-5"]
    names = sorted({n.rpartition(".")[0] for n in top.trainable()})
    modules = dict(top.named_modules())
    targets = cache.select(range(5))
    rows = torch.utils.data.TensorDataset(cache.hidden, cache.residual, cache.example_ids, cache.labels)
    target_rows = torch.utils.data.TensorDataset(targets.hidden, targets.residual, torch.full((5,), -1), targets.labels)

    def in_house(layer_names, part):
        total = 0
        for c in trained.checkpoints:
            with trained.active(top, c.state_dict):
                layers = [modules[n] for n in layer_names]
                tr = margin_factors(lambda r: top(cache.hidden[r], cache.residual[r], cache.example_ids[r]), 40, layers, cache.labels)
                if part is None:
                    total = total + c.lr * c.epoch * gradient_dot(tr, tr, paired=True)
                    continue
                tg = margin_factors(lambda r: top(part.hidden[r], part.residual[r]), len(part), layers, part.labels)
                total = total + c.lr * c.epoch * gradient_dot(tr, tg)
        return total

    with trained.active(top):
        for layer_names in (names, [n for n in names if n.endswith("adapter_up")]):  # the up-projection is masked
            got = captum_tracin(top, rows, paths, target_rows, layers=layer_names, batch_size=16)
            torch.testing.assert_close(got, in_house(layer_names, targets), rtol=1e-4, atol=1e-9)
        own = captum_tracin(top, rows, paths, None, layers=names, batch_size=16)
        torch.testing.assert_close(own, in_house(names, None), rtol=1e-4, atol=1e-9)
        fast = captum_tracin(top, rows, paths, target_rows, final_layer="classifier", batch_size=16)
        torch.testing.assert_close(fast, in_house(["classifier"], targets), rtol=1e-4, atol=1e-9)
    # The caller's model is untouched: the classifier bias is still a frozen parameter, masks still on the Linear.
    assert not top.classifier.bias.requires_grad and isinstance(top.classifier.bias, torch.nn.Parameter)
    with pytest.raises(ValueError, match="either"):
        captum_tracin(top, rows, paths, target_rows)


def test_trainer_checkpoint_roundtrip_and_refusals(tmp_path):
    head = TurnoverHead(HeadRecipe(in_features=4, width=3))
    path = save_trainer_checkpoint(str(tmp_path), head.state_dict(), step=7, epoch=1.0, learning_rate=0.01)
    other = TurnoverHead(HeadRecipe(in_features=4, width=3))
    assert load_trainer_checkpoint(other, path) == pytest.approx(0.01)
    assert torch.equal(other.out.weight, head.out.weight)
    with pytest.raises(KeyError, match="does not have"):
        load_trainer_checkpoint(TurnoverHead(HeadRecipe(in_features=4, width=3, channels=2)), path)


@pytest.mark.skipif(importlib.util.find_spec("kronfluence") is None, reason="kronfluence is not installed")
def test_kronfluence_bridge_scores_the_rows_it_was_given(top_setup):
    _, top, cache, _ = top_setup
    trained = train_top(top, cache, TopRecipe(epochs=2, batch_size=8), init_seed=1, mask_seed=3)
    names = sorted({n.rpartition(".")[0] for n in top.trainable()})
    rows = torch.utils.data.TensorDataset(cache.hidden, cache.residual, cache.example_ids, cache.labels)
    target_rows = torch.utils.data.TensorDataset(cache.hidden[:3], cache.residual[:3], torch.full((3,), -1), cache.labels[:3])
    with trained.active(top):
        ekfac = KronfluenceEKFAC(top, rows, tracked=names, batch_size=16)
        scores, own = ekfac.scores(target_rows), ekfac.self_scores()
        ekfac.close()
        again = KronfluenceEKFAC(top, rows, tracked=names, batch_size=16)
        torch.testing.assert_close(again.scores(target_rows), scores)  # the sampled labels are seeded
        again.close()
    assert scores.shape == (40, 3) and own.shape == (40,)
    assert bool((own > 0).all())  # g^T (G + lambda I)^-1 g of a positive-definite damped curvature
    assert torch.isfinite(scores).all() and scores.abs().max() > 0


# -- the adapter setting of the benchmark on a tiny model ----------------------------------------------------------
def tiny_adapter_data(fidelity, n_train: int = 40, n_targets: int = 5, n_test: int = 24):
    ds = th.add_example_ids(token_task(n_train + n_targets + n_test, seed=3))
    models = {}

    def build(reduction_factor, channels=1):
        if (reduction_factor, channels) not in models:
            models[(reduction_factor, channels)] = top_adapter_bert(reduction_factor, channels=channels)
        return models[(reduction_factor, channels)]

    model = build(2)
    cache = cache_top_inputs(model, [batch_of(ds, range(40)), batch_of(ds, range(40, len(ds)))])
    train, targets = cache.select(range(n_train)), cache.select(range(n_train, n_train + n_targets))
    test = cache.select(range(n_train + n_targets, len(ds)))
    noisy, flipped = fidelity.with_flipped_labels(train.labels, 0.2, seed=0)
    train_batches = [batch_of(ds, range(20)), batch_of(ds, range(20, 40))]
    return fidelity.AdapterData(
        train, noisy, flipped, targets, test, build, train_batches, batch_of(ds, range(n_train, n_train + 2))
    )


def test_run_adapter_fidelity_core_on_tiny_model(fidelity):
    settings = fidelity.AdapterSettings(
        n_train=40, n_targets=5, n_subsets=5, reduction_factor=2, wide_reduction_factors=(1,), ensembles=(2,), channels=(3,),
        epochs=2, batch_size=8, tracin_checkpoints=2, n_loo=3, loo_seeds=2, cleansing_seeds=2, cleansing_fraction=0.05,
        peers=("captum",), projected_variants=({"projection_dim": 128},),
    )
    results = fidelity.run_adapter_fidelity(tiny_adapter_data(fidelity), settings, log=lambda message: None)
    methods = [row["method"] for row in results["rows"]]
    # the library InfluenceFunctionScorer (exact and sketched) and ProjectedInfluenceScorer rows
    library_rows = 1 + len(settings.influence_projections) + len(settings.projected_variants)
    assert len(methods) == 8 + library_rows + peer_rows(fidelity)
    assert methods[0].startswith("(a)") and methods[2].startswith("(c)")
    channel_row = next(r for r in results["rows"] if r["method"].startswith("(f)"))
    assert "3 mask channels on the classifier" in channel_row["method"]
    assert channel_row["extra"]["cached_top_gap_vs_turnover_scorer"] < 1e-5  # the library's channels, cached top exact
    exact = next(r for r in results["rows"] if r["method"].endswith("library InfluenceFunctionScorer (exact)"))["extra"]
    assert exact["max_abs_difference_vs_in_house"] < 1e-4 * max(1.0, exact["max_abs_in_house"])
    first = results["rows"][0]
    assert first["extra"]["cached_top_gap_vs_turnover_scorer"] < 1e-5
    assert first["extra"]["library_turnover_scorer"]["path"] == "prefix"
    for row in results["rows"][:-1]:
        assert -1.0 <= row["lds"] <= 1.0 and -1.0 <= row["loo_corr"] <= 1.0 and 0.0 <= row["mislabel_auc"] <= 1.0
        assert row["cleansing_gain"] is not None and row["accuracy_cost"] is not None
    assert results["model"]["adapter_units"] == 16
    table = fidelity.markdown(results)
    assert "bottleneck adapter (16 units)" in table and table.count("\n| (") == len(methods)


def test_lm_setting_quick_run_writes_its_table(fidelity, tmp_path):
    """``--setting lm --quick``: the causal-LM setting end to end at a tiny size, through the command line."""
    pytest.importorskip("peft")
    stem, threads = tmp_path / "fidelity_lm_quick", torch.get_num_threads()
    try:
        results = fidelity.main(["--setting", "lm", "--quick", "--subsets", "5", "--output", str(stem)])
    finally:
        torch.set_num_threads(threads)  # main() runs on one thread
    methods = [row["method"] for row in results["rows"]]
    kronfluence = len(results["settings"]["kronfluence_masks"]) if results["kronfluence"] is not None else 0
    projected = len(results["settings"]["projected_variants"])
    assert len(methods) == 2 + projected + kronfluence
    assert methods[0].startswith("(a) turn-over") and methods[1].startswith("(b) turn-over, seed ensemble")
    assert sum("projected influence" in m for m in methods) == projected
    assert sum("Kronfluence" in m for m in methods) == kronfluence
    for row in results["rows"]:
        assert np.isfinite(row["lds"]) and -1.0 <= row["lds"] <= 1.0
        assert np.isfinite(row["agreement"]) and 0.0 <= row["top10_repetition"] <= 1.0
        assert row["score_seconds"] > 0.0 and row["end_to_end_seconds"] >= row["train_seconds"]
    assert results["ground_truth"]["subsets"] == 5 and results["ground_truth"]["replicates"] == 2
    page = (tmp_path / "fidelity_lm_quick.md").read_text(encoding="utf-8")
    assert page.count("\n| (") == len(methods) and "split-half reliability" in page
    assert json.loads((tmp_path / "fidelity_lm_quick.json").read_text(encoding="utf-8"))["rows"] == results["rows"]
