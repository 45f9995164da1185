"""Which training labels are wrong: rank a training set by how suspicious each example's given label is.

Every method turns :class:`LabelSignals` (what one training run of a turn-over model yields) into a suspicion per
example, higher = more likely mislabelled:

* ``"loss"`` / ``"margin"``: the final model's full-network training loss / negated logit margin (the baseline).
* ``"flip_loss"``: the loss under each example's flipped mask at the final weights: a sub-network that never trained
  on the example, i.e. an out-of-sample loss for the whole training set from one run.
* ``"dynamics_loss"`` / ``"aum"``: mean over epochs of the loss / negated margin under the example's own mask
  (training dynamics; ``"aum"`` is the area under the margin).
* ``"dynamics_flip_loss"`` / ``"flip_aum"``: the same under the flipped mask (out of sample at every epoch).
* ``"cleanlab_flip"``: cleanlab's label quality (``cleanlab.rank.get_label_quality_scores``) of the flipped-mask
  probabilities at the final weights; ``"cleanlab_dynamics_flip"``: of the flipped-mask probabilities averaged over
  epochs; ``"cleanlab_dynamics_flip_adjusted"``: the same with ``adjust_pred_probs=True`` (class thresholds
  subtracted: robust to class-conditional noise). Needs ``pip install turnover-hf[cleanlab]``.
* ``"full_flip"``: the loss of the mean of the full network's and the flipped sub-network's logits at the final
  weights (what the model says with and without the example's own half, in equal parts).
* ``"loss_classnorm"`` / ``"full_flip_classnorm"``: those losses minus the mean loss of the examples given the same
  label, so that a class the noise made large (class-conditional noise) does not hide its wrong members.
* ``"self_influence"``: any estimator's self-influence, passed in.

:func:`rank_label_issues` returns the ranked rows as a ``datasets.Dataset``. ``DEFAULT_METHOD`` is the one
``benchmarks/label_errors.py`` measured best (see its results).

Example:
    >>> signals = LabelSignals(labels, example_ids, flip_logits=flip, dynamics=TrainingDynamics.load("out"))
    >>> ranked = rank_label_issues(signals, texts=texts)
    >>> ranked[0]    # {'example_id': 17, 'given_label': 1, 'suggested_label': 0, 'score': 3.2, 'text': '...', ...}
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset

from .context import instance_masks, state_of
from .data import BATCH_KEY
from .dynamics import TrainingDynamics, _loss, _margin, keep_prefix_outputs
from .errors import NotPatchedError, TurnoverError
from .prefix import PrefixReplay

DEFAULT_METHOD = "loss_classnorm"


@dataclass
class LabelSignals:
    """What a label-issue method may read, row ``n`` being example ``example_ids[n]`` with label ``labels[n]``.

    ``full_logits``: ``(N, C)`` final model, full network. ``flip_logits``: ``(N, C)`` final model, each example under
    its flipped mask. ``dynamics``: recorded during training (its rows are matched to ``example_ids``).
    ``self_influence``: ``(N,)`` from any estimator.

    Example:
        >>> LabelSignals(labels, ids, full_logits=logits)        # enough for "loss" and "margin"
    """

    labels: torch.Tensor
    example_ids: torch.Tensor
    full_logits: Optional[torch.Tensor] = None
    flip_logits: Optional[torch.Tensor] = None
    dynamics: Optional[TrainingDynamics] = None
    self_influence: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.labels).long()
        self.example_ids = torch.as_tensor(self.example_ids).long()
        if self.dynamics is not None:
            self.dynamics = _aligned(self.dynamics, self.example_ids, self.labels)

    def need(self, field: str, method: str) -> torch.Tensor | TrainingDynamics:
        value = getattr(self, field)
        if value is None:
            hint = {
                "dynamics": "train with TurnoverTrainer(..., callbacks=[turnover_hf.TrainingDynamicsCallback()])",
                "self_influence": "pass an estimator's self-influence",
            }.get(field, "pass the final model's logits")
            raise TurnoverError(f"label-issue method {method!r} needs {field}; {hint}.")
        return value


def _aligned(dynamics: TrainingDynamics, example_ids: torch.Tensor, labels: torch.Tensor) -> TrainingDynamics:
    """``dynamics`` with rows in the order of ``example_ids``; every id must have been recorded with its label."""
    position = {int(i): n for n, i in enumerate(dynamics.example_ids.tolist())}
    missing = [int(i) for i in example_ids.tolist() if int(i) not in position]
    if missing:
        raise TurnoverError(
            f"{len(missing)} example ids (e.g. {missing[:5]}) have no recorded training dynamics: the dynamics come "
            "from another training set."
        )
    rows = torch.tensor([position[int(i)] for i in example_ids.tolist()], dtype=torch.int64)
    recorded = dynamics.labels[rows]
    if not torch.equal(recorded, labels):
        changed = int((recorded != labels).sum())
        raise TurnoverError(
            f"{changed} examples carry other labels than those they were trained with; pass the training labels."
        )
    return TrainingDynamics(example_ids, labels, dynamics.mask_logits[:, rows], dynamics.flip_logits[:, rows])


def _nanmean(values: torch.Tensor) -> torch.Tensor:
    return values.nanmean(0)


def _class_normalised(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``values`` minus the mean value of the rows with the same label."""
    values = values.double()
    sums = torch.zeros(int(labels.max()) + 1, dtype=torch.float64).index_add_(0, labels, values)
    counts = torch.bincount(labels, minlength=len(sums)).clamp_min(1)
    return values - (sums / counts)[labels]


def _full_flip_logits(signals: LabelSignals, method: str) -> torch.Tensor:
    full = signals.need("full_logits", method).float()
    return (full + signals.need("flip_logits", method).float()) / 2


def _cleanlab_quality(labels: torch.Tensor, probs: torch.Tensor, adjust: bool = False) -> np.ndarray:
    try:
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        raise TurnoverError(
            "the cleanlab methods need cleanlab: pip install 'turnover-hf[cleanlab]' (or pip install cleanlab)."
        ) from None
    probs = probs.double().clamp_min(1e-12)
    probs = probs / probs.sum(-1, keepdim=True)
    return get_label_quality_scores(labels.numpy(), probs.numpy(), adjust_pred_probs=adjust)


def _methods() -> dict[str, Callable[[LabelSignals, str], torch.Tensor]]:
    def full(s: LabelSignals, m: str) -> torch.Tensor:
        return s.need("full_logits", m).float()

    def flip(s: LabelSignals, m: str) -> torch.Tensor:
        return s.need("flip_logits", m).float()

    def dyn(s: LabelSignals, m: str) -> TrainingDynamics:
        return s.need("dynamics", m)

    return {
        "loss": lambda s, m: _loss(full(s, m), s.labels),
        "margin": lambda s, m: -_margin(full(s, m), s.labels),
        "flip_loss": lambda s, m: _loss(flip(s, m), s.labels),
        "flip_margin": lambda s, m: -_margin(flip(s, m), s.labels),
        "dynamics_loss": lambda s, m: _nanmean(dyn(s, m).mask_loss()),
        "aum": lambda s, m: -_nanmean(dyn(s, m).mask_margin()),
        "dynamics_flip_loss": lambda s, m: _nanmean(dyn(s, m).flip_loss()),
        "flip_aum": lambda s, m: -_nanmean(dyn(s, m).flip_margin()),
        "cleanlab_flip": lambda s, m: torch.as_tensor(1 - _cleanlab_quality(s.labels, F.softmax(flip(s, m), -1))),
        "cleanlab_dynamics_flip": lambda s, m: torch.as_tensor(
            1 - _cleanlab_quality(s.labels, dyn(s, m).flip_probabilities(slice(None)))
        ),
        "cleanlab_dynamics_flip_adjusted": lambda s, m: torch.as_tensor(
            1 - _cleanlab_quality(s.labels, dyn(s, m).flip_probabilities(slice(None)), adjust=True)
        ),
        "full_flip": lambda s, m: _loss(_full_flip_logits(s, m), s.labels),
        "loss_classnorm": lambda s, m: _class_normalised(_loss(full(s, m), s.labels), s.labels),
        "full_flip_classnorm": lambda s, m: _class_normalised(_loss(_full_flip_logits(s, m), s.labels), s.labels),
        "self_influence": lambda s, m: s.need("self_influence", m).float(),
    }


METHODS: tuple[str, ...] = tuple(_methods())


def label_issue_scores(signals: LabelSignals, method: str = DEFAULT_METHOD) -> torch.Tensor:
    """``(N,)`` suspicion of every example's label by ``method`` (higher = more likely wrong), float64.

    Example:
        >>> label_issue_scores(LabelSignals(labels, ids, full_logits=logits), "loss")
    """
    methods = _methods()
    if method not in methods:
        raise TurnoverError(f"unknown label-issue method {method!r}; choose one of {sorted(methods)}.")
    return methods[method](signals, method).double()


def suggested_probabilities(signals: LabelSignals) -> torch.Tensor:
    """``(N, C)`` class probabilities behind the suggested labels: the softmax of the mean of the full network's and
    the flipped sub-network's final logits (the better predictor in ``benchmarks/label_errors.py``), else of
    whichever of the two is given, else of the flipped sub-networks' last recorded epoch."""
    if signals.full_logits is not None and signals.flip_logits is not None:
        return F.softmax(_full_flip_logits(signals, "suggested labels"), -1)
    for logits in (signals.full_logits, signals.flip_logits):
        if logits is not None:
            return F.softmax(logits.float(), -1)
    return signals.need("dynamics", "suggested labels").flip_probabilities()


def estimated_issue_count(signals: LabelSignals) -> int:
    """How many labels look wrong: cleanlab's confident-learning estimate
    (``cleanlab.filter.find_label_issues`` on :func:`suggested_probabilities`) when cleanlab is installed, else
    the number of examples whose suggested label differs from the given one."""
    probs = suggested_probabilities(signals).double().clamp_min(1e-12)
    probs = probs / probs.sum(-1, keepdim=True)
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        return int((probs.argmax(-1) != signals.labels).sum())
    return int(np.asarray(find_label_issues(signals.labels.numpy(), probs.numpy())).sum())


def rank_label_issues(
    signals: LabelSignals,
    method: str = DEFAULT_METHOD,
    *,
    texts: Optional[Sequence[str]] = None,
    label_names: Optional[Sequence[str]] = None,
    top_k: Optional[int] = None,
    num_issues: Optional[int] = None,
) -> Dataset:
    """The training examples ranked from most to least suspicious label, as a ``datasets.Dataset``.

    Columns: ``rank``, ``example_id``, ``given_label``, ``suggested_label`` (see :func:`suggested_probabilities`),
    ``suggested_probability``, ``score`` (the method's suspicion), ``is_issue`` (True for the
    :func:`estimated_issue_count` highest scores, or the ``num_issues`` highest; relabelling changes those whose
    suggested label differs from the given one), plus ``text`` and label names when given. ``method`` is stored in ``dataset.info.description``.

    Example:
        >>> ranked = rank_label_issues(signals, texts=train["text"], label_names=["neg", "pos"], top_k=20)
        >>> ranked.filter(lambda r: r["is_issue"])
    """
    scores = label_issue_scores(signals, method)
    probs = suggested_probabilities(signals)
    suggested = probs.argmax(-1)
    order = torch.as_tensor(np.argsort(-scores.numpy(), kind="stable"))
    count = estimated_issue_count(signals) if num_issues is None else int(num_issues)
    if top_k is not None:
        order = order[:top_k]
    columns: dict[str, list] = {
        "rank": list(range(1, len(order) + 1)),
        "example_id": signals.example_ids[order].tolist(),
        "given_label": signals.labels[order].tolist(),
        "suggested_label": suggested[order].tolist(),
        "suggested_probability": probs.max(-1).values[order].tolist(),
        "score": scores[order].tolist(),
        # the `count` most suspicious; requiring a different suggested label as well flagged fewer and cleansed
        # worse on Rotten Tomatoes (benchmarks/label_errors.py, recovered share 29-30 % instead of 68 %)
        "is_issue": [rank <= count for rank in range(1, len(order) + 1)],
    }
    if label_names is not None:
        names = list(label_names)
        columns["given_label_name"] = [names[i] for i in columns["given_label"]]
        columns["suggested_label_name"] = [names[i] for i in columns["suggested_label"]]
    if texts is not None:
        if len(texts) != len(signals.labels):
            raise TurnoverError(f"got {len(texts)} texts for {len(signals.labels)} examples.")
        columns["text"] = [texts[i] for i in order.tolist()]
    out = Dataset.from_dict(columns)
    out.info.description = f"label issues ranked by {method!r}"
    return out


@torch.no_grad()
def model_signals(
    models: Sequence[torch.nn.Module],
    rows: Dataset,
    collator: Callable,
    *,
    batch_size: int = 64,
    dynamics: Optional[TrainingDynamics] = None,
    flipped: bool = True,
) -> LabelSignals:
    """:class:`LabelSignals` of a trained model (or the mean logits of an ensemble's members) on its training rows.

    ``rows`` hold the model inputs, ``labels`` and the id column; ``collator`` is an
    :class:`~turnover_hf.InstanceIdCollator`. Cost: one forward per row and model for the full network, plus one
    under each row's flipped mask if ``flipped`` and the model is patched (from the lowest masked layer up: the
    lower layers' outputs of the full forward are replayed).

    Example:
        >>> signals = model_signals([model], train_features, InstanceIdCollator(DataCollatorWithPadding(tok)))
    """
    full, flip, ids, labels = [], [], [], []
    patched = flipped
    # length-sorted batches pad less; the rows are put back in their order at the end
    order = list(range(len(rows)))
    if "input_ids" in rows.column_names:
        lengths = [len(x) for x in rows["input_ids"]]
        order = sorted(order, key=lengths.__getitem__)
    for model in models:
        try:
            state_of(model)
        except NotPatchedError:
            patched = False
    for start in range(0, len(rows), batch_size):
        batch = collator([rows[i] for i in order[start : start + batch_size]])
        example_ids = batch[BATCH_KEY]
        ids.append(example_ids)
        labels.append(batch["labels"])
        parts: dict[str, list[torch.Tensor]] = {"full": [], "flip": []}
        for model in models:
            device = next(model.parameters()).device
            inputs = {k: v.to(device) for k, v in batch.items()
                      if isinstance(v, torch.Tensor) and k not in ("labels", BATCH_KEY)}
            was_training = model.training
            model.eval()
            # the flipped forward replays the full forward's outputs of the mask-free lower layers
            replay = PrefixReplay.for_model(model) if patched else None
            handles = keep_prefix_outputs(replay) if replay is not None else []
            try:
                parts["full"].append(model(**inputs).logits.float().cpu())
                for handle in handles:
                    handle.remove()
                if patched:
                    rows_now = torch.arange(len(example_ids), device=device)
                    with (replay.replaying(rows_now) if replay is not None else contextlib.nullcontext()), \
                            instance_masks(model, example_ids.to(device), mode="flip"):
                        parts["flip"].append(model(**inputs).logits.float().cpu())
            finally:
                for handle in handles:
                    handle.remove()
                if replay is not None:
                    replay._outputs = {}
                model.train(was_training)
        if parts["full"][0].dim() != 2:
            raise TurnoverError("label issues are for sequence classifiers ((B, C) logits), not token-level models.")
        full.append(torch.stack(parts["full"]).mean(0))
        if patched:
            flip.append(torch.stack(parts["flip"]).mean(0))
    back = torch.argsort(torch.as_tensor(order))
    return LabelSignals(
        torch.cat(labels)[back], torch.cat(ids)[back], full_logits=torch.cat(full)[back],
        flip_logits=torch.cat(flip)[back] if patched else None, dynamics=dynamics,
    )


DYNAMICS_METHODS = frozenset(m for m in METHODS if "dynamics" in m or m in ("aum", "flip_aum"))
FINAL_FLIP_METHODS = frozenset({"flip_loss", "flip_margin", "full_flip", "full_flip_classnorm", "cleanlab_flip"})


def pipeline_label_issues(pipe: Any, method: Optional[str] = None, *, top_k: Optional[int] = None,
                          num_issues: Optional[int] = None) -> Dataset:
    """What :meth:`turnover_hf.InfluencePipeline.label_issues` returns (the pipeline's models and training set).

    Cost: two forward passes over the training set (the full network, and each example under its flipped mask;
    one for an unpatched model), plus loading the recorded dynamics for the methods that read them."""
    method = method or DEFAULT_METHOD
    if method not in METHODS or method == "self_influence":
        raise TurnoverError(
            f"unknown label-issue method {method!r}; choose one of {sorted(set(METHODS) - {'self_influence'})} "
            "(for self-influence use pipe.self_influence())."
        )
    dynamics = None
    if method in DYNAMICS_METHODS:
        folder = pipe.checkpoint_path
        if folder is None or not TrainingDynamics.exists(folder):
            raise TurnoverError(
                f"method {method!r} reads training dynamics, and {folder or 'an in-memory model'} has none: train with "
                "TurnoverTrainer(..., callbacks=[turnover_hf.TrainingDynamicsCallback()]) and load the saved folder."
            )
        dynamics = TrainingDynamics.load(folder)
    if "labels" not in pipe._train_features.column_names:
        raise TurnoverError("label issues need the training set's labels (a 'label' or 'labels' column).")
    # the flipped masks' logits also serve the suggested labels and the flagged count: with them, cleansing
    # recovered 68 % instead of 29-30 % of the lost accuracy on Rotten Tomatoes (benchmarks/label_errors.py)
    signals = model_signals(pipe.models, pipe._train_features, pipe.collator, batch_size=pipe.batch_size,
                            dynamics=dynamics)
    ranked = rank_label_issues(signals, method, top_k=top_k, num_issues=num_issues)
    names = getattr(pipe.model.config, "id2label", None) or {}
    positions = pipe._positions(torch.as_tensor(ranked["example_id"]))
    extra: dict[str, list] = {"method": [method] * len(ranked)}
    if names:
        extra["given_label_name"] = [str(names.get(i, i)) for i in ranked["given_label"]]
        extra["suggested_label_name"] = [str(names.get(i, i)) for i in ranked["suggested_label"]]
    if pipe.text_column in pipe.train_dataset.column_names:
        extra["text"] = pipe.train_dataset.select(positions)[pipe.text_column]
    for name, values in extra.items():
        ranked = ranked.add_column(name, values)
    ranked.info.description = f"label issues ranked by {method!r}"
    return ranked


def cleansing_report(
    train_and_evaluate: Callable[[Dataset, int], float],
    train_dataset: Dataset,
    ranked: Dataset,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    relabel: bool = True,
    label_column: str = "label",
    id_column: str = "example_id",
    random_seed: int = 0,
) -> dict[str, Any]:
    """Does fixing the flagged labels pay? Retrain and compare with removing as many random examples.

    ``train_and_evaluate(dataset, seed)`` trains a model on ``dataset`` with ``seed`` and returns its held-out
    accuracy (or any score, higher is better). For every seed it is called on the training set as it is
    (``noisy``), without the rows ``ranked`` flags as issues (``removed``), with them relabelled to the suggested
    label (``relabelled``, if ``relabel``), and without as many random rows (``random``, a new draw per seed). Each
    condition comes back as ``{"mean", "sem", "values"}``, and so do the paired differences
    ``removed_minus_random``, ``relabelled_minus_random`` and ``*_minus_noisy`` (the same seeds serve all).

    Example:
        >>> ranked = pipe.label_issues()
        >>> report = cleansing_report(lambda data, seed: my_train_and_test(data, seed), train, ranked, seeds=range(5))
        >>> report["removed_minus_random"]["mean"], report["removed_minus_random"]["sem"]
    """
    flagged = dict(zip(
        [i for i, issue in zip(ranked["example_id"], ranked["is_issue"]) if issue],
        [s for s, issue in zip(ranked["suggested_label"], ranked["is_issue"]) if issue],
    ))
    ids = train_dataset[id_column]
    unknown = set(flagged) - set(ids)
    if unknown:
        raise TurnoverError(f"{len(unknown)} flagged ids (e.g. {sorted(unknown)[:5]}) are not in the training set.")
    keep = [n for n, i in enumerate(ids) if i not in flagged]
    rng = np.random.default_rng(random_seed)
    conditions: dict[str, list[float]] = {"noisy": [], "removed": [], "random": []}
    if relabel:
        conditions["relabelled"] = []
        fixed = train_dataset.map(lambda row: {label_column: flagged.get(row[id_column], row[label_column])})
    for seed in seeds:
        conditions["noisy"].append(float(train_and_evaluate(train_dataset, seed)))
        conditions["removed"].append(float(train_and_evaluate(train_dataset.select(keep), seed)))
        random_keep = np.sort(rng.permutation(len(ids))[: len(keep)])
        conditions["random"].append(float(train_and_evaluate(train_dataset.select(random_keep), seed)))
        if relabel:
            conditions["relabelled"].append(float(train_and_evaluate(fixed, seed)))

    def summary(values: Sequence[float]) -> dict[str, Any]:
        a = np.asarray(values, dtype=np.float64)
        sem = float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan")
        return {"mean": float(a.mean()), "sem": sem, "values": a.tolist()}

    out: dict[str, Any] = {"flagged": len(flagged), "seeds": list(seeds)}
    out.update({name: summary(values) for name, values in conditions.items()})
    for name in ("removed", "relabelled"):
        if name in conditions:
            out[f"{name}_minus_random"] = summary(np.subtract(conditions[name], conditions["random"]))
            out[f"{name}_minus_noisy"] = summary(np.subtract(conditions[name], conditions["noisy"]))
    return out
