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
* ``"self_influence"``: any estimator's self-influence, passed in.

:func:`rank_label_issues` returns the ranked rows as a ``datasets.Dataset``. ``DEFAULT_METHOD`` is the one
``benchmarks/label_errors.py`` measured best (see its results).

Example:
    >>> signals = LabelSignals(labels, example_ids, flip_logits=flip, dynamics=TrainingDynamics.load("out"))
    >>> ranked = rank_label_issues(signals, texts=texts)
    >>> ranked[0]    # {'example_id': 17, 'given_label': 1, 'suggested_label': 0, 'score': 3.2, 'text': '...', ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset

from .dynamics import TrainingDynamics, _loss, _margin
from .errors import TurnoverError

DEFAULT_METHOD = "dynamics_flip_loss"


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


def out_of_sample_probabilities(signals: LabelSignals) -> torch.Tensor:
    """``(N, C)`` class probabilities of models that never trained on each example: the flipped sub-networks
    averaged over the recorded epochs, else at the final weights, else (not out of sample) the full network."""
    if signals.dynamics is not None:
        return signals.dynamics.flip_probabilities(slice(None))
    if signals.flip_logits is not None:
        return F.softmax(signals.flip_logits.float(), -1)
    return F.softmax(signals.need("full_logits", "suggested labels").float(), -1)


def cleanlab_issues(signals: LabelSignals) -> np.ndarray:
    """Boolean ``(N,)``: cleanlab's confident learning (``cleanlab.filter.find_label_issues``) on the
    out-of-sample probabilities; its count is cleanlab's estimate of how many labels are wrong.

    Example:
        >>> int(cleanlab_issues(signals).sum())     # about the number of wrong labels
    """
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        raise TurnoverError("cleanlab_issues needs cleanlab: pip install 'turnover-hf[cleanlab]'.") from None
    probs = out_of_sample_probabilities(signals).double().clamp_min(1e-12)
    probs = probs / probs.sum(-1, keepdim=True)
    return np.asarray(find_label_issues(signals.labels.numpy(), probs.numpy()), dtype=bool)


def rank_label_issues(
    signals: LabelSignals,
    method: str = DEFAULT_METHOD,
    *,
    texts: Optional[Sequence[str]] = None,
    label_names: Optional[Sequence[str]] = None,
    top_k: Optional[int] = None,
) -> Dataset:
    """The training examples ranked from most to least suspicious label, as a ``datasets.Dataset``.

    Columns: ``rank``, ``example_id``, ``given_label``, ``suggested_label`` (the out-of-sample prediction, see
    :func:`out_of_sample_probabilities`), ``suggested_probability``, ``score`` (the method's suspicion),
    ``is_issue`` (the suggested label differs from the given one and the out-of-sample model gives the given label
    less than half its probability), plus ``text`` and label names when given. ``method`` is stored in
    ``dataset.info.description``.

    Example:
        >>> ranked = rank_label_issues(signals, texts=train["text"], label_names=["neg", "pos"], top_k=20)
        >>> ranked.filter(lambda r: r["is_issue"])
    """
    scores = label_issue_scores(signals, method)
    probs = out_of_sample_probabilities(signals)
    suggested = probs.argmax(-1)
    given_prob = probs.gather(1, signals.labels[:, None]).squeeze(1)
    order = torch.as_tensor(np.argsort(-scores.numpy(), kind="stable"))
    if top_k is not None:
        order = order[:top_k]
    columns: dict[str, list] = {
        "rank": list(range(1, len(order) + 1)),
        "example_id": signals.example_ids[order].tolist(),
        "given_label": signals.labels[order].tolist(),
        "suggested_label": suggested[order].tolist(),
        "suggested_probability": probs.max(-1).values[order].tolist(),
        "score": scores[order].tolist(),
        "is_issue": ((suggested != signals.labels) & (given_prob < 0.5))[order].tolist(),
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
