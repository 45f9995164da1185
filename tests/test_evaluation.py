"""Fidelity metrics against independently computed answers, head retraining, and the benchmark core on tiny data."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import turnover_hf as th
from turnover_hf.evaluation import (
    HeadRecipe,
    explained_variance,
    head_masks,
    lds,
    lds_per_target,
    leave_one_out,
    linear_residuals,
    mislabel_detection,
    patched_classifier,
    random_subsets,
    rankdata,
    roc_auc,
    seed_agreement,
    spearman,
    spearman_columns,
    subset_target_losses,
    train_head,
)


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
    dots = fidelity.gradient_dot_scores(head, trained, train, train.labels, targets).double()
    torch.testing.assert_close(dots, g_train @ g_target.T, rtol=1e-4, atol=1e-6)
    # Self-influence: the masked training gradient against the full network's gradient on the same example.
    g_full = torch.stack([_flat_grad(head, train.features[i], train.labels[i], None) for i in range(len(train))])
    own = fidelity.gradient_dot_self(head, trained, train, train.labels).double()
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
    got = fidelity.influence_function_scores(head, trained, train, train.labels, targets, 0.1).double()
    torch.testing.assert_close(got, expected / len(train), rtol=1e-4, atol=1e-7)
    inverse = torch.linalg.inv(gauss_newton + damping * torch.eye(n_params, dtype=torch.float64))
    expected_self = ((g_train @ inverse) * g_full).sum(1) / len(train)
    got_self = fidelity.influence_function_scores(head, trained, train, train.labels, None, 0.1).double()
    torch.testing.assert_close(got_self, expected_self, rtol=1e-4, atol=1e-7)


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
    )
    started = time.perf_counter()
    results = fidelity.run_fidelity(tiny_data(fidelity), settings, log=lambda message: None)
    assert time.perf_counter() - started < 60
    methods = [row["method"] for row in results["rows"]]
    expected_rows = 12 + fidelity.kronfluence_available()
    assert (
        len(methods) == expected_rows and methods[0].startswith("(a)") and methods[-1].startswith("(g) training loss")
    )
    for row in results["rows"]:
        assert 0.0 <= row["mislabel_auc"] <= 1.0
        if row["lds"] is not None:
            assert -1.0 <= row["lds"] <= 1.0 and -1.0 <= row["agreement"] <= 1.0
    first = results["rows"][0]
    assert first["extra"]["closed_form_gap_vs_patched_model"] < 1e-5
    table = fidelity.markdown(results)
    assert table.count("\n| (") == expected_rows and "LDS" in table
