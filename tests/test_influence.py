"""The influence-function estimator, checked against independent computations.

* a dense reference written here from scratch: the logit Jacobians of every example over the flattened trainable
  parameters (``torch.func.jacrev``), the Gauss-Newton matrix built explicitly and solved with
  ``torch.linalg.solve``;
* the benchmark's in-house factorised Gauss-Newton influence (``turnover_hf.evaluation.peers``);
* actual leave-one-out retraining of an L2-regularised softmax regression, where the Gauss-Newton matrix is the
  exact Hessian.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import batch_of, text_task, tiny_bert, tiny_gpt2_lm, token_task, word_tokenizer
from torch import nn
from torch.func import functional_call, jacrev

import turnover_hf as th
from turnover_hf.errors import ConfigMismatchError, TurnoverError
from turnover_hf.estimators.influence import CountSketch, InfluenceFunctionScorer, materialised
from turnover_hf.estimators.influence import factorised as factorised_fit
from turnover_hf.estimators.influence import scorer as scorer_module


def _logits(output):
    return output if isinstance(output, torch.Tensor) else output.logits


def dense_reference(model, train, targets, damping_factor=0.1, masked=False):
    """``g_t^T (G + lambda I)^-1 g_z / N`` from explicit Jacobians; ``train`` / ``targets``: collated batches."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach().double().clone() for n, p in model.named_parameters() if n in names}
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].reshape(-1) for n in names])
    model = model.double()

    def unflatten(vector):
        out, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = int(torch.tensor(shape).prod()) if len(shape) else 1
            out[name] = vector[offset : offset + size].view(shape)
            offset += size
        return out

    def jacobian_and_probs(batch, rows, with_masks):
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "example_ids")}
        jacobians, probs = [], []
        for k in rows:
            one = {key: (v[k : k + 1].double() if v.is_floating_point() else v[k : k + 1]) for key, v in inputs.items()}
            ctx = th.instance_masks(model, batch["example_ids"][k : k + 1], mode="train") if with_masks else contextlib.nullcontext()
            with ctx:
                logits_of = lambda vector: _logits(functional_call(model, unflatten(vector), args=(), kwargs=one))[0]
                jacobians.append(jacrev(logits_of)(flat))  # (C, D)
                probs.append(torch.softmax(logits_of(flat).detach(), -1))
        return torch.stack(jacobians), torch.stack(probs)

    n = len(train["labels"])
    j_train, p_train = jacobian_and_probs(train, range(n), masked)
    j_target, p_target = jacobian_and_probs(targets, range(len(targets["labels"])), False)
    curvature = torch.diag_embed(p_train) - p_train[:, :, None] * p_train[:, None, :]
    gauss_newton = torch.einsum("ncd,nce,nef->df", j_train, curvature, j_train) / n
    damping = damping_factor * gauss_newton.trace() / len(flat)
    g_train = torch.einsum("ncd,nc->nd", j_train, p_train - F.one_hot(train["labels"], p_train.shape[1]).double())
    g_target = torch.einsum("ncd,nc->nd", j_target, p_target - F.one_hot(targets["labels"], p_target.shape[1]).double())
    solved = torch.linalg.solve(gauss_newton + damping * torch.eye(len(flat), dtype=torch.float64), g_train.T)
    model.float()
    return (g_target @ solved).T / n  # (N, T)


def _frozen_bert(num_labels=3):
    """A tiny BERT classifier whose pooler and classifier train (everything else frozen)."""
    model = tiny_bert(num_labels=num_labels, seed=3)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("bert.pooler", "classifier")))
    return model


def _labelled(dataset, num_labels):
    g = torch.Generator().manual_seed(5)
    return dataset.map(lambda row, i: {"labels": int(torch.randint(0, num_labels, (1,), generator=g))}, with_indices=True)


def _relative_gap(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_exact_mode_equals_the_dense_gauss_newton_influence_on_a_plain_classifier():
    model = _frozen_bert()
    train = th.add_example_ids(_labelled(token_task(14, seed=1), 3), start=100)
    targets = batch_of(_labelled(token_task(4, seed=2), 3))
    scorer = InfluenceFunctionScorer(model, train, show_progress=False, batch_size=5)
    ids = torch.tensor(train["example_id"])
    scores = scorer.scores({k: v for k, v in targets.items() if k != "labels"}, targets["labels"], ids)
    reference = dense_reference(model, batch_of(train), targets)
    assert scorer.factors.solver == "woodbury"  # 14 x 2 rows < D
    assert scores.shape == (14, 4)
    assert _relative_gap(scores.double(), reference) < 1e-4
    # self-influence: each row's full-network gradient against its own training gradient
    train_batch = batch_of(train, range(5))
    own = scorer.self_scores(train_batch, train_batch["labels"], train_batch["example_ids"])
    paired = dense_reference(model, batch_of(train), train_batch)  # (N, 5)
    assert torch.allclose(own.double(), paired[torch.arange(5), torch.arange(5)], rtol=1e-3, atol=1e-6 * paired.abs().max())


def test_exact_mode_on_a_patched_model_uses_each_examples_training_mask(bert_bottleneck):
    model = bert_bottleneck
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    train = th.add_example_ids(token_task(10, seed=4))
    targets = batch_of(token_task(3, seed=5))
    scorer = InfluenceFunctionScorer(model, train, show_progress=False)
    scores = scorer.scores({k: v for k, v in targets.items() if k != "labels"}, targets["labels"], torch.arange(10))
    reference = dense_reference(model, batch_of(train), targets, masked=True)
    assert _relative_gap(scores.double(), reference) < 1e-4
    unmasked = dense_reference(model, batch_of(train), targets, masked=False)
    assert _relative_gap(unmasked, reference) > 1e-2  # the masks matter: the check above can tell them apart


def test_woodbury_and_direct_solvers_agree():
    model = _frozen_bert(num_labels=3)
    train = th.add_example_ids(_labelled(token_task(12, seed=6), 3))
    targets = batch_of(_labelled(token_task(3, seed=7), 3))
    inputs = {k: v for k, v in targets.items() if k != "labels"}
    results = {}
    for solver in ("woodbury", "direct"):
        scorer = InfluenceFunctionScorer(model, train, solver=solver, show_progress=False)
        results[solver] = scorer.scores(inputs, targets["labels"], torch.arange(12))
        assert scorer.factors.solver == solver
    assert _relative_gap(results["woodbury"], results["direct"]) < 1e-5


def test_kept_float64_gradients_give_the_scores_of_blocks_converted_one_by_one(monkeypatch):
    model = _frozen_bert(num_labels=3)
    train = th.add_example_ids(_labelled(token_task(12, seed=6), 3))
    batch = batch_of(_labelled(token_task(4, seed=8), 3))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    results = {}
    for budget in (materialised.ROWS_CACHE_BYTES, 0):  # float64 copy kept once / blocks converted one by one
        monkeypatch.setattr(materialised, "ROWS_CACHE_BYTES", budget)
        monkeypatch.setattr(materialised, "BLOCK_BYTES", 8 * 24 * 100)  # several column blocks
        scorer = InfluenceFunctionScorer(model, train, solver="woodbury", factorised=False, show_progress=False)
        results[budget] = (scorer.scores(inputs, batch["labels"], torch.arange(12)),
                           scorer.self_scores(inputs, batch["labels"], torch.arange(4)))
        assert (scorer.factors._gradients64 is not None) == (budget > 0)
    kept, built = results.values()
    assert _relative_gap(kept[0], built[0]) < 1e-10 and _relative_gap(kept[1], built[1]) < 1e-10


def test_agrees_with_the_in_house_gauss_newton_influence_on_a_binary_head():
    from turnover_hf.evaluation import HeadRecipe, TurnoverHead, patched_classifier
    from turnover_hf.evaluation.peers import gauss_newton_influence, margin_factors
    from turnover_hf.evaluation.retrain import head_masks

    torch.manual_seed(0)
    recipe = HeadRecipe(in_features=10, width=12)
    head = TurnoverHead(recipe)
    x, y, ids = torch.randn(40, 10), torch.randint(0, 2, (40,)), torch.arange(40) + 7
    tx, ty = torch.randn(6, 10), torch.randint(0, 2, (6,))
    masks = head_masks(ids, recipe, mask_seed=3)
    layers = [*head.hidden_linears(), head.out]
    train_factors = margin_factors(lambda rows: head(x[rows], masks[rows]), len(y), layers, y)
    target_factors = margin_factors(lambda rows: head(tx[rows]), len(ty), layers, ty)
    in_house = gauss_newton_influence(train_factors, target_factors, damping_factor=0.1)
    model = patched_classifier(head, mask_seed=3).eval()
    batches = [{"features": x[s : s + 16], "labels": y[s : s + 16], "example_ids": ids[s : s + 16]} for s in range(0, 40, 16)]
    scorer = InfluenceFunctionScorer(model, batches, show_progress=False)
    library = scorer.scores({"features": tx}, ty, ids)
    assert float((library - in_house).abs().max()) < 1e-5 * max(1.0, float(in_house.abs().max()))
    in_house_self = gauss_newton_influence(train_factors, margin_factors(lambda rows: head(x[rows]), len(y), layers, y),
                                           0.1, paired=True)
    library_self = scorer.self_scores({"features": x}, y, ids)
    assert float((library_self - in_house_self).abs().max()) < 1e-5 * max(1.0, float(in_house_self.abs().max()))


class SoftmaxRegression(nn.Module):
    def __init__(self, d_in: int, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, classes, dtype=torch.float64)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


def _fit_regression(x, y, l2, classes, init=None):
    """L2-regularised softmax regression, ``mean CE + l2 / 2 |w|^2``, to convergence with full-batch L-BFGS."""
    model = SoftmaxRegression(x.shape[1], classes)
    if init is not None:
        model.load_state_dict(init)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12,
                                  tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y) + l2 / 2 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    return model.eval()


def test_predicts_leave_one_out_retraining_on_a_convex_problem():
    g = torch.Generator().manual_seed(0)
    n, d, classes, l2 = 60, 4, 3, 0.03
    centres = torch.randn(classes, d, generator=g, dtype=torch.float64) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, d, generator=g, dtype=torch.float64)
    y[:4] = (y[:4] + 1) % classes  # a few mislabelled examples: clear opponents of their neighbours
    tx_labels = torch.arange(classes).repeat(2)
    tx = centres[tx_labels] + 0.5 * torch.randn(len(tx_labels), d, generator=g, dtype=torch.float64)
    model = _fit_regression(x, y, l2, classes)
    # The regulariser is curvature the Gauss-Newton matrix of the data term lacks: add it as the damping,
    # lambda = l2, i.e. damping_factor = l2 x D / trace(G), with G written out for a linear model.
    p = torch.softmax(model(x).detach(), -1)
    trace = float(((x**2).sum(1) + 1) @ (p * (1 - p)).sum(1)) / n
    dims = (d + 1) * classes
    batches = [{"features": x, "labels": y, "example_ids": torch.arange(n)}]
    scorer = InfluenceFunctionScorer(model, batches, damping_factor=l2 * dims / trace, show_progress=False).fit()
    assert scorer.factors.damping == pytest.approx(l2, rel=1e-6)
    removed = torch.tensor([0, 1, 2, 3, 10, 20, 30, 40, 50])
    predicted = scorer.scores({"features": tx}, tx_labels, removed).double()
    with torch.no_grad():
        before = F.cross_entropy(model(tx), tx_labels, reduction="none")
    actual = torch.empty_like(predicted)
    keep_all = torch.ones(n, dtype=torch.bool)
    for row, z in enumerate(removed.tolist()):
        keep = keep_all.clone()
        keep[z] = False
        # the IF is the first-order effect of removing weight 1/N: retrain on the rest with the same objective
        retrained = _fit_regression(x[keep], y[keep], l2 * (n - 1) / n, classes, init=model.state_dict())
        with torch.no_grad():
            actual[row] = F.cross_entropy(retrained(tx), tx_labels, reduction="none") - before
    pearson = torch.corrcoef(torch.stack([predicted.flatten(), actual.flatten()]))[0, 1]
    assert pearson > 0.9
    clear = actual.abs() > 0.2 * actual.abs().max()
    assert bool(clear.any()) and bool((torch.sign(predicted[clear]) == torch.sign(actual[clear])).all())


class TanhNet(nn.Module):
    """Features -> tanh hidden layer -> logits: gradients that differ from example to example."""

    def __init__(self, d_in: int = 12, hidden: int = 48, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.out = nn.Linear(d_in, hidden), nn.Linear(hidden, classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(features)))


def _correlations(a, b):
    return torch.stack([torch.corrcoef(torch.stack([a[:, t], b[:, t]]))[0, 1] for t in range(a.shape[1])])


def test_count_sketch_is_deterministic_and_close_to_exact_when_wide():
    g = torch.Generator().manual_seed(1)
    model = TanhNet()
    x, y = torch.randn(30, 12, generator=g), torch.randint(0, 3, (30,), generator=g)
    tx, ty = torch.randn(5, 12, generator=g), torch.randint(0, 3, (5,), generator=g)
    batches = [{"features": x, "labels": y, "example_ids": torch.arange(30)}]
    ids = torch.arange(30)
    exact = InfluenceFunctionScorer(model, batches, factorised=False, show_progress=False)  # float32 gradients, as sketched
    first, second = CountSketch(exact.specs, 512, seed=4), CountSketch(exact.specs, 512, seed=4)
    assert torch.equal(first.buckets, second.buckets) and torch.equal(first.signs, second.signs)
    assert not torch.equal(first.buckets, CountSketch(exact.specs, 512, seed=5).buckets)
    # unbiased inner products: E <S a, S b> = <a, b>
    a, b = torch.randn(2, exact.num_parameters, dtype=torch.float64, generator=g)
    sketched = torch.stack([CountSketch(exact.specs, 64, seed=s)(torch.stack([a, b])).prod(0).sum() for s in range(200)])
    assert abs(float(sketched.mean()) - float(a @ b)) < 4 * float(sketched.std()) / 200**0.5
    # The gradients span rank N (C-1) + T = 65. A CountSketch to d coordinates perturbs each inner product by about
    # |a| |b| / sqrt(d): at d = 2048 (30 x the rank) ~2%, and the scores correlate > 0.95 with exact ones; at d = 16,
    # below the rank, the sketch loses most of the structure.
    exact_scores = exact.scores({"features": tx}, ty, ids)
    wide = InfluenceFunctionScorer(model, batches, sketch_dim=2048, show_progress=False)
    wide_scores = wide.scores({"features": tx}, ty, ids)
    again = InfluenceFunctionScorer(model, batches, sketch_dim=2048, show_progress=False)
    assert torch.equal(wide_scores, again.scores({"features": tx}, ty, ids))
    assert wide.factors.damping == pytest.approx(exact.factors.damping, rel=1e-9)  # lambda from exact gradients
    assert bool((_correlations(wide_scores, exact_scores) > 0.95).all())
    narrow = InfluenceFunctionScorer(model, batches, sketch_dim=16, show_progress=False)
    assert float(_correlations(narrow.scores({"features": tx}, ty, ids), exact_scores).mean()) < 0.9


def test_save_load_gives_identical_scores_and_refuses_changed_weights(tmp_path):
    model = _frozen_bert(num_labels=2)
    train = th.add_example_ids(_labelled(token_task(10, seed=10), 2))
    targets = batch_of(_labelled(token_task(3, seed=11), 2))
    inputs = {k: v for k, v in targets.items() if k != "labels"}
    for projection in (None, 300):
        folder = tmp_path / f"fit-{projection}"
        scorer = InfluenceFunctionScorer(model, train, sketch_dim=projection, show_progress=False)
        scores = scorer.scores(inputs, targets["labels"], torch.arange(10))
        scorer.save(folder)
        loaded = InfluenceFunctionScorer.load(model, folder)
        assert loaded.factors.solver == scorer.factors.solver and loaded.sketch_dim == projection
        assert torch.equal(loaded.scores(inputs, targets["labels"], torch.arange(10)), scores)
    with torch.no_grad():
        model.classifier.weight[0, 0] += 0.01
    with pytest.raises(ConfigMismatchError, match="weights differ"):
        InfluenceFunctionScorer.load(model, tmp_path / "fit-None")


def test_unknown_ids_and_too_large_fits_are_refused():
    model = _frozen_bert(num_labels=2)
    train = th.add_example_ids(_labelled(token_task(6, seed=12), 2))
    scorer = InfluenceFunctionScorer(model, train, show_progress=False, max_memory_gb=1e-6)
    with pytest.raises(TurnoverError, match="sketch_dim"):
        scorer.fit()
    scorer = InfluenceFunctionScorer(model, train, show_progress=False)
    targets = batch_of(train, [0])
    with pytest.raises(th.ExampleIdError):
        scorer.scores({"input_ids": targets["input_ids"]}, targets["labels"], torch.tensor([99]))


def test_missing_ids_and_bad_pipeline_options_are_refused(tmp_path):
    model = _frozen_bert(num_labels=2)
    train = _labelled(token_task(6, seed=12), 2)
    batches = [{k: v for k, v in batch_of(train).items() if k != "example_ids"}]
    with pytest.raises(th.MissingExampleIdsError, match="add_example_ids"):
        InfluenceFunctionScorer(model, batches, show_progress=False).fit()
    train = th.add_example_ids(train)
    with pytest.raises(TurnoverError, match="not options of the 'influence' estimator"):
        th.InfluencePipeline(model, train_dataset=train, estimator="influence", influence_options={"dampng": 1.0})
    InfluenceFunctionScorer(model, train, show_progress=False).fit().save(tmp_path / "fit")
    with pytest.raises(TurnoverError, match="holds a fitted influence function"):
        th.InfluencePipeline(model, train_dataset=train, estimator="influence", influence_dir=tmp_path / "fit",
                             influence_options={"sketch_dim": 64})


def test_causal_language_models_are_refused():
    with pytest.raises(TurnoverError, match="classifiers.*estimator=.projected."):
        InfluenceFunctionScorer(tiny_gpt2_lm())


@pytest.mark.parametrize("patched", [True, False], ids=["patched", "plain"])
def test_pipeline_influence_estimator_end_to_end(tmp_path, patched):
    tokenizer = word_tokenizer(tmp_path / "tok")
    train = text_task(24)
    model = tiny_bert(seed=2)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("bert.pooler", "classifier")))
    if patched:
        model = th.patch_model(model, th.TurnoverConfig(seed=1), warn_leaking=False).eval()
    pipe = th.InfluencePipeline(model, tokenizer, train_dataset=train, estimator="influence", chunk_size=10,
                                influence_dir=tmp_path / "fit", influence_options={"show_progress": False})
    targets = [{"text": train[i]["text"], "label": train[i]["label"]} for i in (1, 2, 3)]
    matrix = pipe.scores(targets)
    assert matrix.shape == (24, 3)
    reference = InfluenceFunctionScorer(model, pipe._train_features, data_collator=pipe.collator, show_progress=False)
    batch, labels, _ = pipe.prepare_targets(targets)
    assert torch.allclose(matrix, reference.scores(batch, labels, pipe.train_ids), rtol=1e-5, atol=1e-7)
    out = pipe(targets, top_k=4)
    assert len(out) == 3 and len(out[0]["proponents"]) == 4 and len(out[0]["opponents"]) == 4
    assert [p["example_id"] for p in out[0]["proponents"]] == matrix[:, 0].topk(4).indices.tolist()
    own = pipe.self_influence(example_ids=[1, 2, 3])
    assert own["example_id"] == [1, 2, 3] and len(own["self_influence"]) == 3
    mean = pipe.mean_influence(targets)
    assert torch.allclose(torch.tensor(mean["mean_influence"]), matrix.mean(1), atol=1e-6)
    # the fit was saved to influence_dir: a second pipeline loads it instead of fitting again
    again = th.InfluencePipeline(model, tokenizer, train_dataset=train, estimator="influence",
                                 influence_dir=tmp_path / "fit")
    assert again.scorer.factors is not None
    assert torch.equal(again.scores(targets), matrix)


def test_pipeline_refuses_causal_language_models_for_the_influence_estimator():
    lm = tiny_gpt2_lm()
    train = th.add_example_ids(token_task(8).remove_columns(["labels"]))
    with pytest.raises(TurnoverError, match="classifiers"):
        th.InfluencePipeline(lm, train_dataset=train, estimator="influence")


def test_a_loaded_checkpoint_differentiates_what_the_turn_over_model_trained(tmp_path, bert_bottleneck):
    model = bert_bottleneck  # patched with freeze_leaking: only the masked adapter and head train
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert 0 < len(trained) < len(list(model.parameters()))
    train = th.add_example_ids(token_task(10, seed=4))
    targets = batch_of(token_task(2, seed=9))
    inputs = {k: v for k, v in targets.items() if k != "labels"}
    in_memory = InfluenceFunctionScorer(model, train, show_progress=False)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = th.load_influence_ready(tmp_path / "ckpt")
    # from_pretrained marks every parameter trainable; the checkpoint's record restores what training updated
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == trained
    scorer = InfluenceFunctionScorer(loaded, train, show_progress=False)
    assert [s.name for s in scorer.specs] == trained == [s.name for s in in_memory.specs]
    ids = torch.tensor(train["example_id"])
    assert torch.allclose(scorer.scores(inputs, targets["labels"], ids), in_memory.scores(inputs, targets["labels"], ids),
                          rtol=1e-4, atol=1e-7)
    in_memory.fit().save(tmp_path / "fit")  # a fit of the in-memory model serves the loaded one (same weights, masks)
    reloaded = InfluenceFunctionScorer.load(loaded, tmp_path / "fit")
    assert torch.allclose(reloaded.scores(inputs, targets["labels"], ids), in_memory.scores(inputs, targets["labels"], ids),
                          rtol=1e-5, atol=1e-8)


# -- the factorised fit (tracked nn.Linear layers that see one row per example) -----------------------------------
class MaskedHead(nn.Module):
    """Frozen features -> hidden (output-masked, weight and bias tracked) -> mid (only the bias tracked) -> out
    (input-masked, only the weight tracked): every case of the factorised gradients, under both kinds of mask."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.frozen, self.hidden = nn.Linear(6, 10), nn.Linear(10, 16)
        self.mid, self.out = nn.Linear(16, 12), nn.Linear(12, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(2.0)
        for p in (*self.frozen.parameters(), self.mid.weight, self.out.bias):
            p.requires_grad_(False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(torch.tanh(self.frozen(features))))
        return self.out(torch.tanh(self.mid(h)))


class SequenceHead(nn.Module):
    """A tracked Linear over every token (B, T, in), mean-pooled, then a tracked Linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.token, self.out = nn.Linear(6, 8), nn.Linear(8, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.token(features)).mean(1))


class NormedHead(nn.Module):
    """A tracked LayerNorm before a Linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.norm, self.out = nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(features))


class ReusedWeightHead(nn.Module):
    """A Linear whose weight is also used outside the module (a second, functional product)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.hidden, self.out = nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(features))
        return self.out(torch.tanh(F.linear(h, self.hidden.weight)))


class OneTokenHead(TanhNet):
    """The same head on inputs of shape (B, 1, in): every Linear sees one row per example."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features).squeeze(1)


def _head_batches(n, d_in, classes, seed, *, sequence=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, sequence, d_in, generator=g) if sequence else torch.randn(n, d_in, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    ids = torch.arange(n) + 100
    return x, y, ids, [{"features": x[s : s + 16], "labels": y[s : s + 16], "example_ids": ids[s : s + 16]}
                       for s in range(0, n, 16)]


def _both_paths(model, batches, x, y, ids, tx, ty):
    out = {}
    for factorised in (None, False):
        scorer = InfluenceFunctionScorer(model, batches, factorised=factorised, show_progress=False).fit()
        out[scorer.method] = (scorer.scores({"features": tx}, ty, ids), scorer.self_scores({"features": x}, y, ids))
    return out


def _max_gap(a, b):
    return float((a - b).abs().max()) / float(b.abs().max())


def test_factorised_scores_equal_the_materialised_ones_on_a_patched_three_class_model():
    model = th.patch_model(MaskedHead(), th.TurnoverConfig(seed=1, target_modules=["hidden", "out"],
                                                           mask_inputs_of=["out"]), warn_leaking=False).eval()
    assert {k: v["side"] for k, v in model.turnover_config.mask_sites.items()} == {"hidden": "output", "out": "input"}
    x, y, ids, batches = _head_batches(40, 6, 3, seed=1)
    tx, ty = torch.randn(7, 6), torch.randint(0, 3, (7,))
    out = _both_paths(model, batches, x, y, ids, tx, ty)
    assert set(out) == {"factorised", "materialised"}
    (fact_scores, fact_self), (mat_scores, mat_self) = out["factorised"], out["materialised"]
    assert fact_scores.shape == (40, 7) and fact_self.shape == (40,)
    assert _max_gap(fact_scores, mat_scores) <= 1e-6 and _max_gap(fact_self, mat_self) <= 1e-6
    # the masks matter: the same model scored without them gives other numbers
    plain = MaskedHead()
    unmasked = InfluenceFunctionScorer(plain, batches, show_progress=False).scores({"features": tx}, ty, ids)
    assert _max_gap(unmasked, mat_scores) > 1e-2


def test_factorised_scores_equal_the_materialised_ones_on_a_plain_binary_head():
    model = TanhNet(d_in=12, hidden=48, classes=2).eval()
    x, y, ids, batches = _head_batches(40, 12, 2, seed=2)
    tx, ty = torch.randn(5, 12), torch.randint(0, 2, (5,))
    out = _both_paths(model, batches, x, y, ids, tx, ty)
    (fact_scores, fact_self), (mat_scores, mat_self) = out["factorised"], out["materialised"]
    assert _max_gap(fact_scores, mat_scores) <= 1e-6 and _max_gap(fact_self, mat_self) <= 1e-6
    # the same on inputs of shape (B, 1, in)
    x1, _, _, one_token = _head_batches(40, 12, 2, seed=2, sequence=1)
    out = _both_paths(OneTokenHead(d_in=12, hidden=48, classes=2).eval(), one_token, x1, y, ids, tx[:, None], ty)
    assert _max_gap(out["factorised"][0], out["materialised"][0]) <= 1e-6
    assert _max_gap(out["factorised"][1], out["materialised"][1]) <= 1e-6
    # scores of a subset of ids are the rows of the full matrix, in the order asked
    scorer = InfluenceFunctionScorer(model, batches, show_progress=False)
    assert torch.equal(scorer.scores({"features": tx}, ty, ids[[7, 3]]), scorer.scores({"features": tx}, ty, ids)[[7, 3]])


def test_the_factorised_path_is_chosen_only_where_it_is_exact(bert_bottleneck):
    x, y, ids, batches = _head_batches(24, 12, 3, seed=3)
    assert InfluenceFunctionScorer(TanhNet(), batches, show_progress=False).fit().method == "factorised"
    # pooler and classifier of a frozen BERT see one row per example: factorised
    train = th.add_example_ids(_labelled(token_task(8, seed=1), 3))
    assert InfluenceFunctionScorer(_frozen_bert(), train, show_progress=False).fit().method == "factorised"
    # not factorised: a sketch, the direct solver, or N (C - 1) > D (parameter space is smaller)
    assert InfluenceFunctionScorer(TanhNet(), batches, sketch_dim=64, show_progress=False).fit().method == "materialised"
    assert InfluenceFunctionScorer(TanhNet(), batches, solver="direct", show_progress=False).fit().method == "materialised"
    tiny = SoftmaxRegression(12, 3).float()  # D = 39 < 24 x 2 rows
    assert InfluenceFunctionScorer(tiny, batches, show_progress=False).fit().method == "materialised"
    assert InfluenceFunctionScorer(tiny, batches, solver="woodbury", show_progress=False).fit().method == "factorised"
    # a Linear over token sequences, a tracked LayerNorm, a weight used outside its module, bottleneck adapters
    sx, sy, sids, sequences = _head_batches(20, 6, 2, seed=4, sequence=5)
    assert InfluenceFunctionScorer(SequenceHead(), sequences, show_progress=False).fit().method == "materialised"
    nx, ny, nids, normed = _head_batches(20, 6, 3, seed=5)
    assert InfluenceFunctionScorer(NormedHead(), normed, show_progress=False).fit().method == "materialised"
    rx, ry, rids, reused = _head_batches(20, 6, 2, seed=6)
    assert InfluenceFunctionScorer(ReusedWeightHead(), reused, show_progress=False).fit().method == "materialised"
    adapters = InfluenceFunctionScorer(bert_bottleneck, th.add_example_ids(token_task(6, seed=4)), show_progress=False)
    assert adapters.fit().method == "materialised"


def test_forcing_the_factorised_path_on_an_ineligible_model_raises():
    _, _, _, normed = _head_batches(20, 6, 3, seed=5)
    with pytest.raises(TurnoverError, match="factorised=True.*'norm.weight'.*LayerNorm"):
        InfluenceFunctionScorer(NormedHead(), normed, factorised=True)
    with pytest.raises(TurnoverError, match="factorised=True.*sketch_dim"):
        InfluenceFunctionScorer(TanhNet(), normed, factorised=True, sketch_dim=64)
    _, _, _, sequences = _head_batches(20, 6, 2, seed=4, sequence=5)
    with pytest.raises(TurnoverError, match="'token' sees an input of shape \\(16, 5, 6\\).*factorised=False"):
        InfluenceFunctionScorer(SequenceHead(), sequences, factorised=True, show_progress=False).fit()
    _, _, _, reused = _head_batches(20, 6, 2, seed=6)
    with pytest.raises(TurnoverError, match="'hidden.weight' is not the product"):
        InfluenceFunctionScorer(ReusedWeightHead(), reused, factorised=True, show_progress=False).fit()
    # one-pass data cannot be read again for per-example gradients: an automatic fit raises instead of guessing
    with pytest.raises(TurnoverError, match="factorised=False"):
        InfluenceFunctionScorer(SequenceHead(), iter(sequences), show_progress=False).fit()


def test_the_memory_budget_counts_the_factorised_size():
    # N = 30, C = 3, D = 771: per-example gradients need ~2.0e-4 GB, the factorised fit ~1.1e-4 GB
    x, y, ids, batches = _head_batches(30, 12, 3, seed=7)
    scorer = InfluenceFunctionScorer(TanhNet(), batches, max_memory_gb=1.5e-4, show_progress=False).fit()
    assert scorer.method == "factorised"
    with pytest.raises(TurnoverError, match="sketch_dim"):
        InfluenceFunctionScorer(TanhNet(), batches, max_memory_gb=1.5e-4, factorised=False, show_progress=False).fit()
    with pytest.raises(TurnoverError, match="factorised.*factorised=False"):
        InfluenceFunctionScorer(TanhNet(), batches, max_memory_gb=5e-5, factorised=True, show_progress=False).fit()


def test_a_factorised_fit_saves_and_loads_with_identical_scores(tmp_path):
    import json

    model = th.patch_model(MaskedHead(), th.TurnoverConfig(seed=1, target_modules=["hidden", "out"],
                                                           mask_inputs_of=["out"]), warn_leaking=False).eval()
    x, y, ids, batches = _head_batches(40, 6, 3, seed=8)
    tx, ty = torch.randn(4, 6), torch.randint(0, 3, (4,))
    scorer = InfluenceFunctionScorer(model, batches, show_progress=False)
    scores, own = scorer.scores({"features": tx}, ty, ids), scorer.self_scores({"features": x}, y, ids)
    scorer.save(tmp_path / "fit")
    meta = InfluenceFunctionScorer.read_meta(tmp_path / "fit")
    assert meta["method"] == "factorised" and [layer["name"] for layer in meta["layers"]] == ["hidden", "mid", "out"]
    loaded = InfluenceFunctionScorer.load(model, tmp_path / "fit", show_progress=False)
    assert loaded.method == "factorised"
    assert torch.equal(loaded.scores({"features": tx}, ty, ids), scores)
    assert torch.equal(loaded.self_scores({"features": x}, y, ids), own)
    one = {"features": tx[:1]}  # a set this small is solved with the refined float32 factor: the same in both
    assert torch.equal(loaded.scores(one, ty[:1], ids), scorer.scores(one, ty[:1], ids))
    with pytest.raises(ConfigMismatchError, match="factorised"):
        InfluenceFunctionScorer.load(model, tmp_path / "fit", factorised=False)
    # a version-2 folder (the float64 Cholesky factor instead of S) still loads, with the same scores
    from safetensors.torch import load_file, save_file

    (tmp_path / "v2").mkdir()
    tensors = load_file(tmp_path / "fit" / "influence_factors.safetensors")
    tensors["factor"] = torch.linalg.cholesky(tensors.pop("system")).contiguous()
    save_file(tensors, tmp_path / "v2" / "influence_factors.safetensors")
    written = json.loads((tmp_path / "fit" / "influence.json").read_text())
    (tmp_path / "v2" / "influence.json").write_text(json.dumps({**written, "version": 2}))
    v2 = InfluenceFunctionScorer.load(model, tmp_path / "v2", show_progress=False)
    assert _max_gap(v2.scores({"features": tx}, ty, ids), scores) <= 1e-6
    assert _max_gap(v2.self_scores({"features": x}, y, ids), own) <= 1e-6
    # a version-1 folder (materialised, written before "method" existed) still loads
    old = InfluenceFunctionScorer(model, batches, factorised=False, show_progress=False)
    old.save(tmp_path / "v1")
    written = json.loads((tmp_path / "v1" / "influence.json").read_text())
    del written["method"]
    (tmp_path / "v1" / "influence.json").write_text(json.dumps({**written, "version": 1}))
    assert InfluenceFunctionScorer.load(model, tmp_path / "v1").method == "materialised"


def test_the_pipeline_passes_the_factorised_choice_through(tmp_path):
    model = th.patch_model(_frozen_bert(num_labels=2), th.TurnoverConfig(seed=3), freeze_leaking=True)
    train = th.add_example_ids(token_task(12, seed=1))
    options = {"show_progress": False, "factorised": True}
    pipe = th.InfluencePipeline(model, train_dataset=train, estimator="influence", influence_dir=tmp_path / "fit",
                                influence_options=options)
    pipe.scores(train.select(range(2)))
    assert pipe.scorer.method == "factorised"
    with pytest.raises(th.TurnoverError, match="factorised"):  # the kept fit is factorised: forcing the other path
        th.InfluencePipeline(model, train_dataset=train, estimator="influence", influence_dir=tmp_path / "fit",
                             influence_options={"factorised": False})


# -- the factorised fit's solves: float32 factor with float64 refinement, kept input Gram matrices -----------------
def _masked_head_fit(n=60, **options):
    model = th.patch_model(MaskedHead(), th.TurnoverConfig(seed=1, target_modules=["hidden", "out"],
                                                           mask_inputs_of=["out"]), warn_leaking=False).eval()
    x, y, ids, batches = _head_batches(n, 6, 3, seed=9)
    return InfluenceFunctionScorer(model, batches, show_progress=False, **options).fit(), x, y, ids


def test_a_small_target_set_is_solved_with_a_refined_float32_factor_to_float64_accuracy():
    scorer, x, y, ids = _masked_head_fit()
    fit = scorer.factors
    tx, ty = torch.randn(2, 6), torch.randint(0, 3, (2,))  # 2 x REFINED_SOLVE_RATIO <= m = 120: the refined path
    projected = scorer._projected(fit, {"features": tx}, ty)
    refined = fit.solve(projected)
    assert fit._factor32 is not None and fit.factor.numel() == 0  # no float64 factor was needed
    exact = torch.cholesky_solve(projected, fit.float64_factor())
    float32_only = torch.cholesky_solve(projected.float(), fit._factor32).double()
    assert _max_gap(refined, exact) < 1e-11 < _max_gap(float32_only, exact)
    # a large target set takes the float64 factor; scores agree either way
    many = torch.randn(5 * 120, 6), torch.randint(0, 3, (5 * 120,))
    assert _max_gap(scorer.scores({"features": many[0][:2]}, many[1][:2], ids),
                    scorer.scores({"features": many[0]}, many[1], ids)[:, :2]) <= 1e-6


def test_an_ill_conditioned_system_falls_back_to_the_float64_factor():
    # N (C - 1) = 300 curvature rows for D = 224 parameters: S has eigenvalues lambda and up to ~1e12 lambda
    scorer, x, y, ids = _masked_head_fit(150, damping_factor=1e-12, solver="woodbury", factorised=True)
    fit = scorer.factors
    tx, ty = torch.randn(1, 6), torch.randint(0, 3, (1,))
    projected = scorer._projected(fit, {"features": tx}, ty)
    assert fit._refined_solve(projected) is None  # float32 cannot reach float64 accuracy here
    assert torch.equal(fit.solve(projected), torch.cholesky_solve(projected, fit.float64_factor()))


def test_self_influence_reuses_the_input_grams_of_layers_no_mask_changes(monkeypatch):
    (scorer, x, y, ids), (fresh, _, _, _) = _masked_head_fit(), _masked_head_fit()
    monkeypatch.setattr(factorised_fit, "INPUT_GRAMS_BYTES", 0)  # the same fit without kept Gram matrices
    computed, _, _, _ = _masked_head_fit()
    assert all(g is None for g in computed.factors._input_grams)
    assert all(g is not None for g in scorer.factors._input_grams)
    # inputs other than the training ones (same ids): nothing is reused, and the Gram matrices of the layers whose
    # inputs differ are dropped
    shifted = x + 0.5
    assert _max_gap(scorer.self_scores({"features": shifted}, y, ids),
                    computed.self_scores({"features": shifted}, y, ids)) <= 1e-6
    hidden, mid, out = scorer.factors._input_grams  # mid tracks only its bias: its inputs are ones
    assert hidden is None and mid is not None and out is None
    own = fresh.self_scores({"features": x[7:30]}, y[7:30], ids[7:30])
    hidden, mid, out = fresh.factors._input_grams  # hidden sees unmasked features; out's inputs are masked
    assert hidden is not None and mid is not None and out is None
    assert _max_gap(own, computed.self_scores({"features": x[7:30]}, y[7:30], ids[7:30])) <= 1e-6


@pytest.mark.parametrize("factorised", [False, True])
def test_self_influence_of_many_batches_at_once_equals_batch_by_batch(monkeypatch, factorised):
    """``self_scores_many`` (what the pipeline calls) reads a materialised fit once per group of rows; the values
    are those of ``self_scores`` on each batch, whatever the grouping."""
    model = _frozen_bert(num_labels=3)
    train = th.add_example_ids(_labelled(token_task(12, seed=6), 3))
    batches = []
    for start in (0, 5, 9):
        part = _labelled(token_task(12, seed=6), 3).select(range(start, {0: 5, 5: 9, 9: 12}[start]))
        batch = batch_of(part)
        batches.append(({k: v for k, v in batch.items() if k != "labels"}, batch["labels"], torch.arange(start, start + len(part))))
    scorer = InfluenceFunctionScorer(model, train, factorised=factorised, show_progress=False)
    one_by_one = torch.cat([scorer.self_scores(*item) for item in batches])
    for group_bytes in (scorer_module.SELF_INFLUENCE_GROUP_BYTES, 1):  # one group / a group per batch
        monkeypatch.setattr(scorer_module, "SELF_INFLUENCE_GROUP_BYTES", group_bytes)
        assert _relative_gap(scorer.self_scores_many(batches), one_by_one) < 1e-6
    assert (one_by_one > 0).all()  # g^T (G + lambda I)^-1 g of an example under its own gradient


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
def test_no_step_of_a_materialised_fit_exceeds_the_memory_budget():
    """The process's peak resident memory above what it held before the fit stays within max_memory_gb plus the
    model and one batch, for the fit, self-influence of every example and a target set: the float64 copy of the
    stored gradients and self-influence's groups take only what the budget leaves."""
    import json
    import subprocess
    import sys

    n, budget = 1200, 0.45
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(repo, "benchmarks", "influence_peak.py"), "--examples", str(n),
                           "--max_memory_gb", str(budget)], capture_output=True, text=True, cwd=repo, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["estimate_gb"] <= budget  # the fit is allowed, and its every step stays within the bound
    model = tiny_bert()  # the benchmark's model: its weights, and one batch of 64 per-example gradients (and copies)
    slack = (2 * sum(p.numel() for p in model.parameters()) + 3 * 64 * measured["parameters"]) * 4 / 2**30
    for phase, peak in measured["peak_gb"].items():
        assert peak <= budget + 0.02 + slack, (phase, measured)  # 0.02: allocator and interpreter noise
    assert max(measured["peak_gb"].values()) > 0.5 * measured["estimate_gb"]  # the measurement sees the fit at all
