"""A data audit of a training set in one call: wrong labels, duplicates, leakage, outliers and harmful examples.

:func:`pipeline_audit` (what :meth:`turnover_hf.InfluencePipeline.audit` returns) gives one ``datasets.Dataset``
with a row per issue. Every row has ``kind``, ``example_id`` (the training example), ``score`` (higher = more of an
issue, comparable within a kind), ``reason`` (one sentence) and ``source`` (the signal that produced the row), plus
the columns its kind fills (the others are None): ``label``, ``suggested_label``, ``other_id``, ``other_split``,
``other_label``, ``other_text``, ``value`` and ``text``. The kinds:

* ``wrong_label``: the examples :meth:`~turnover_hf.InfluencePipeline.label_issues` flags (its default ranking and
  flagged count); ``suggested_label`` is the model's predicted class, ``score`` the ranking's suspicion.
* ``duplicate``: two training examples with the same text after normalisation (case, whitespace, punctuation, NFKC)
  or nearly the same (a few words changed): :func:`turnover_hf.duplicates.find_duplicates`; ``other_id`` is the
  earlier example, ``score`` the similarity (1 for exact).
* ``leakage``: the same between a training example and a row of the validation or test set (``other_split``).
* ``outlier``: far from every other training example in the model's own representation: each layer's hidden
  states averaged over the text's tokens, L2-normalised and concatenated (so the cosine is the mean of the layers'
  cosines; ``outlier_layer`` picks one layer instead). ``score`` is the mean cosine distance to the
  ``outlier_neighbours`` nearest training examples; rows above Q3 + ``outlier_fence`` x IQR of all scores are listed
  (Tukey's far-out fence). All layers together found planted non-reviews best on the whole in
  ``benchmarks/outliers.py``: every row past the fence planted, AUC 0.91; single layers ranged from 0.87 AUC with
  nothing past the fence (the input embeddings, and the last layer) to 0.94 with a third of the rows past the fence
  genuine reviews.
* ``data_value``: the training examples whose mean influence on the validation set (through the pipeline's
  estimator) is most negative: removing them should lower the validation loss. ``value`` is the mean influence and
  ``score`` its negation; the most harmful ``harmful_fraction`` of the training set are listed.

What was skipped and why (no validation set, no labels, ...) is in ``dataset.info.description``, one note a line.

Example:
    >>> issues = pipe.audit(validation=valid, test=test)
    >>> issues.filter(lambda row: row["kind"] == "leakage")["reason"][:3]
    >>> print(issues.info.description)          # counts per kind, and what was skipped
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from datasets import Dataset, Features, Value

from .data import BATCH_KEY
from .duplicates import DuplicateOptions, find_duplicates
from .errors import TurnoverError

logger = logging.getLogger(__name__)

KINDS = ("wrong_label", "duplicate", "leakage", "outlier", "data_value")
KIND_TITLES = {
    "wrong_label": "Wrong labels",
    "duplicate": "Duplicates within the training set",
    "leakage": "Leakage: training examples in the validation / test set",
    "outlier": "Outliers",
    "data_value": "Harmful for the validation set (data value)",
}
FEATURES = Features({
    "kind": Value("string"), "example_id": Value("int64"), "score": Value("float64"), "reason": Value("string"),
    "source": Value("string"), "label": Value("int64"), "suggested_label": Value("int64"),
    "other_id": Value("int64"), "other_split": Value("string"), "other_label": Value("int64"),
    "value": Value("float64"), "text": Value("string"), "other_text": Value("string"),
})
DEFAULT_NEIGHBOURS = 10
DEFAULT_FENCE = 3.0
DEFAULT_HARMFUL_FRACTION = 0.05
DEFAULT_LAYER: Optional[int] = None  # all layers


# -- outliers ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def model_embeddings(model: torch.nn.Module, rows: Dataset, collator: Any, batch_size: int = 64,
                     layer: Optional[int] = None) -> torch.Tensor:
    """The mean over each row's tokens (attention mask) of the model's hidden states (full network): of ``layer``
    (an index into ``hidden_states``: 0 = the input embeddings, -1 = the last layer), ``(N, H)``; or, for None, of
    every layer, each L2-normalised, concatenated: ``(N, (L + 1) H)``.

    Cost: one forward pass per row.

    Example:
        >>> vectors = model_embeddings(pipe.model, pipe._train_features, pipe.collator)
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for start in range(0, len(rows), batch_size):
            batch = collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
            inputs = {k: v.to(device) for k, v in batch.items()
                      if isinstance(v, torch.Tensor) and k not in ("labels", BATCH_KEY)}
            states = model(**inputs, output_hidden_states=True).hidden_states
            chosen = states if layer is None else (states[layer],)
            mask = inputs.get("attention_mask", torch.ones(chosen[0].shape[:2], device=device)).float()[..., None]
            pooled = [(h.float() * mask).sum(1) / mask.sum(1).clamp_min(1) for h in chosen]
            if layer is None:
                pooled = [torch.nn.functional.normalize(p, dim=1) for p in pooled]
            out.append(torch.cat(pooled, 1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def knn_distances(vectors: torch.Tensor, neighbours: int = DEFAULT_NEIGHBOURS, block: int = 1024) -> torch.Tensor:
    """``(N,)`` each row's mean cosine distance to its ``neighbours`` nearest other rows (fewer if N is small).

    Blockwise: O(N^2 H) time, O(block N) memory; no N x N matrix.

    Example:
        >>> knn_distances(torch.randn(100, 8), neighbours=5).shape
        torch.Size([100])
    """
    n = len(vectors)
    if n < 2:
        return torch.zeros(n, dtype=torch.float64)
    k = min(int(neighbours), n - 1)
    unit = torch.nn.functional.normalize(vectors.double(), dim=1)
    out = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, block):
        similarity = unit[start:start + block] @ unit.T
        rows = torch.arange(similarity.shape[0])
        similarity[rows, rows + start] = -math.inf  # not its own neighbour
        out[start:start + block] = 1 - similarity.topk(k, dim=1).values.mean(1)
    return out


def far_out_fence(scores: torch.Tensor, fence: float = DEFAULT_FENCE) -> float:
    """Q3 + ``fence`` x (Q3 - Q1) of ``scores`` (Tukey's far-out fence for ``fence`` = 3)."""
    q1, q3 = np.quantile(scores.numpy(), [0.25, 0.75])
    return float(q3 + fence * (q3 - q1))


# -- rows ------------------------------------------------------------------------------------------------------------
def _row(kind: str, example_id: int, score: float, reason: str, source: str, **extra: Any) -> dict[str, Any]:
    row = {name: None for name in FEATURES}
    row.update(kind=kind, example_id=int(example_id), score=float(score), reason=reason, source=source, **extra)
    return row


def _label_name(pipe: Any, label: Optional[int]) -> str:
    names = getattr(pipe.model.config, "id2label", None) or {}
    return str(names.get(label, label)) if label is not None else "?"


def _texts(data: Dataset, column: str, what: str) -> list[str]:
    if column not in data.column_names:
        raise TurnoverError(
            f"{what} has no {column!r} column (columns: {data.column_names}); pass text_column=... to the pipeline "
            f"or rename the column to {column!r}."
        )
    return list(data[column])


def _labels(data: Dataset) -> Optional[list[int]]:
    for name in ("label", "labels"):
        if name in data.column_names:
            return [None if v is None else int(v) for v in data[name]]
    return None


def _held_out(validation: Optional[Dataset], test: Optional[Dataset]) -> dict[str, Dataset]:
    held: dict[str, Dataset] = {}
    for name, data in (("validation", validation), ("test", test)):
        if data is None:
            continue
        if not isinstance(data, Dataset):
            raise TurnoverError(f"{name} must be a datasets.Dataset with a text column, got {type(data).__name__}.")
        if len(data) == 0:
            raise TurnoverError(f"the {name} set is empty; give rows, or leave {name}=None to skip it.")
        held[name] = data
    return held


def _wrong_labels(pipe: Any, method: Optional[str], notes: list[str]) -> list[dict]:
    if pipe.causal_lm:
        notes.append("wrong_label skipped: the model is a language model (wrong labels are for classifiers).")
        return []
    if "labels" not in pipe._train_features.column_names:
        notes.append("wrong_label skipped: the training set has no 'label' column.")
        return []
    ranked = pipe.label_issues(method)
    flagged = ranked.filter(lambda row: row["is_issue"])
    out = []
    for row in flagged:
        given, suggested = int(row["given_label"]), int(row["suggested_label"])
        advice = (f"the model predicts {_label_name(pipe, suggested)!r} ({row['suggested_probability']:.2f})"
                  if suggested != given else "the model agrees only weakly")
        out.append(_row(
            "wrong_label", row["example_id"], row["score"],
            f"labelled {_label_name(pipe, given)!r}, but {advice}; rank {row['rank']} of {len(ranked)} by "
            f"{row['method']!r}.", f"label_issues: {row['method']}",
            label=given, suggested_label=suggested, text=row.get("text"),
        ))
    return out


def _duplicates(pipe: Any, texts: list[str], held: Mapping[str, Dataset], options: DuplicateOptions,
                kinds: Sequence[str], notes: list[str]) -> list[dict]:
    train_ids = [int(i) for i in pipe.train_dataset[pipe.id_column]]
    train_labels = _labels(pipe.train_dataset)
    other_texts = {name: _texts(data, pipe.text_column, f"the {name} set") for name, data in held.items()}
    other_ids = {name: ([int(i) for i in data[pipe.id_column]] if pipe.id_column in data.column_names
                        else list(range(len(data)))) for name, data in held.items()}
    other_labels = {name: _labels(data) for name, data in held.items()}
    pairs = find_duplicates(texts, other_texts if "leakage" in kinds else None, options=options)
    out = []
    for pair in pairs:
        kind = "duplicate" if pair["other_split"] == "train" else "leakage"
        if kind not in kinds:
            continue
        i, j, split = pair["index"], pair["other_index"], pair["other_split"]
        label = train_labels[i] if train_labels else None
        labels_there = train_labels if split == "train" else other_labels[split]
        other_label = labels_there[j] if labels_there else None
        other_id = train_ids[j] if split == "train" else other_ids[split][j]
        how = {"identical": "the same text as", "normalised": "the same text (up to case, spacing and punctuation) as",
               "near": f"nearly the same text ({pair['similarity']:.2f} of character n-grams shared) as"}[pair["match"]]
        where = f"training example #{other_id}" if split == "train" else f"{split} row #{other_id}"
        conflict = ""
        if label is not None and other_label is not None and label != other_label:
            conflict = f"; labels differ ({_label_name(pipe, label)!r} vs {_label_name(pipe, other_label)!r})"
        other_text = texts[j] if split == "train" else other_texts[split][j]
        out.append(_row(kind, train_ids[i], pair["similarity"], f"{how} {where}{conflict}.", pair["source"],
                        label=label, other_id=other_id, other_split=split, other_label=other_label, text=texts[i],
                        other_text=other_text))
    if "leakage" in kinds and held:
        checked = ", ".join(f"{name} ({len(data)} rows)" for name, data in held.items())
        notes.append(f"leakage checked against {checked}.")
    return out


def _outliers(pipe: Any, texts: Optional[list[str]], neighbours: int, fence: float, layer: Optional[int],
              notes: list[str]) -> list[dict]:
    if len(pipe.train_dataset) < 3:
        notes.append("outlier skipped: fewer than 3 training examples.")
        return []
    vectors = model_embeddings(pipe.model, pipe._train_features, pipe.collator, pipe.batch_size, layer)
    scores = knn_distances(vectors, neighbours)
    threshold = far_out_fence(scores, fence)
    ids = pipe._train_features[pipe.id_column]
    labels = _labels(pipe._train_features)
    k = min(neighbours, len(scores) - 1)
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    where = ("hidden states of every layer" if layer is None else "input embeddings" if layer == 0
             else f"hidden states of layer {layer}")
    source = (f"mean cosine distance to the {k} nearest in the model's {where} (mean over tokens); listed above "
              f"Q3 + {fence:g} IQR = {threshold:.4f}")
    notes.append(f"outlier threshold: mean cosine distance to the {k} nearest training examples above "
                 f"{threshold:.4f} (Q3 + {fence:g} x IQR).")
    positions = pipe._positions(torch.as_tensor([ids[n] for n in order]))
    out = []
    for rank, (n, position) in enumerate(zip(order, positions), start=1):
        if scores[n] <= threshold:
            break
        out.append(_row(
            "outlier", ids[n], scores[n],
            f"far from every other training example: mean cosine distance {float(scores[n]):.3f} to its {k} "
            f"nearest (rank {rank} of {len(scores)}; the median is {float(scores.median()):.3f}).", source,
            label=labels[n] if labels else None, text=texts[position] if texts else None,
        ))
    return out


def _data_value(pipe: Any, validation: Dataset, fraction: float, texts: Optional[list[str]],
                notes: list[str]) -> list[dict]:
    influence = pipe.mean_influence(validation).sort("mean_influence")
    count = max(1, math.ceil(fraction * len(influence)))
    harmful = influence.filter(lambda row: row["mean_influence"] < 0)
    listed = harmful.select(range(min(count, len(harmful))))
    notes.append(f"data_value: mean influence of {len(influence)} training examples on {len(validation)} validation "
                 f"rows by the {pipe.estimator!r} estimator; {len(harmful)} are harmful on average, the "
                 f"{len(listed)} most harmful listed (harmful_fraction = {fraction:g}).")
    labels = _labels(listed)
    out = []
    for rank, row in enumerate(listed, start=1):
        value = float(row["mean_influence"])
        out.append(_row(
            "data_value", row[pipe.id_column], -value,
            f"raises the validation loss: mean influence {value:+.3g} on {len(validation)} validation rows "
            f"(most harmful {rank} of {len(influence)}).", f"mean influence on validation ({pipe.estimator})",
            label=labels[rank - 1] if labels else None, value=value, text=row.get(pipe.text_column),
        ))
    return out


def pipeline_audit(
    pipe: Any,
    validation: Optional[Dataset] = None,
    test: Optional[Dataset] = None,
    *,
    kinds: Optional[Sequence[str]] = None,
    label_method: Optional[str] = None,
    duplicate_options: Optional[DuplicateOptions] = None,
    outlier_neighbours: int = DEFAULT_NEIGHBOURS,
    outlier_fence: float = DEFAULT_FENCE,
    outlier_layer: Optional[int] = DEFAULT_LAYER,
    harmful_fraction: float = DEFAULT_HARMFUL_FRACTION,
) -> Dataset:
    """What :meth:`turnover_hf.InfluencePipeline.audit` returns; see the module docstring for the kinds.

    Cost: wrong labels two forward passes over the training set; duplicates and leakage
    :func:`~turnover_hf.duplicates.find_duplicates` (about linear in the rows); outliers one forward pass and an
    O(N^2 H) blockwise neighbour search; data value the estimator's mean influence over the validation set.

    Example:
        >>> issues = pipeline_audit(pipe, validation=valid, kinds=["duplicate", "outlier"])
    """
    kinds = list(KINDS if kinds is None else ([kinds] if isinstance(kinds, str) else kinds))
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise TurnoverError(f"unknown audit kinds {unknown}; choose from {list(KINDS)}.")
    if not 0 < harmful_fraction <= 1:
        raise TurnoverError(f"harmful_fraction must be in (0, 1], got {harmful_fraction!r}.")
    if isinstance(outlier_neighbours, bool) or not isinstance(outlier_neighbours, int) or outlier_neighbours < 1:
        raise TurnoverError(f"outlier_neighbours must be a positive integer, got {outlier_neighbours!r}.")
    if outlier_layer is not None and (isinstance(outlier_layer, bool) or not isinstance(outlier_layer, int)):
        raise TurnoverError(
            f"outlier_layer must be an index into the model's hidden states or None, got {outlier_layer!r}.")
    if not outlier_fence >= 0:
        raise TurnoverError(f"outlier_fence must be >= 0 (IQRs above Q3), got {outlier_fence!r}.")
    held = _held_out(validation, test)
    for name, data in held.items():  # checked before any model work
        scored = name == "validation" and "data_value" in kinds and "input_ids" not in data.column_names
        if "leakage" in kinds or scored:
            _texts(data, pipe.text_column, f"the {name} set")
    texts = (list(pipe.train_dataset[pipe.text_column]) if pipe.text_column in pipe.train_dataset.column_names
             else None)
    notes: list[str] = []
    rows: list[dict] = []
    if "wrong_label" in kinds:
        rows += _wrong_labels(pipe, label_method, notes)
    wanted = [k for k in ("duplicate", "leakage") if k in kinds]
    if "leakage" in kinds and not held:
        notes.append("leakage skipped: no validation or test set given (pass validation=... and/or test=...).")
        wanted.remove("leakage")
    if wanted and texts is None:
        notes.append(f"{' and '.join(wanted)} skipped: the training set has no {pipe.text_column!r} column.")
    elif wanted:
        rows += _duplicates(pipe, texts, held, duplicate_options or DuplicateOptions(), wanted, notes)
    if "outlier" in kinds:
        rows += _outliers(pipe, texts, outlier_neighbours, outlier_fence, outlier_layer, notes)
    if "data_value" in kinds:
        if validation is None:
            notes.append("data_value skipped: no validation set given (pass validation=...).")
        elif _labels(validation) is None:
            notes.append("data_value skipped: the validation set has no 'label' column.")
        else:
            rows += _data_value(pipe, validation, harmful_fraction, texts, notes)
    out = Dataset.from_list(rows, features=FEATURES) if rows else Dataset.from_dict(
        {name: [] for name in FEATURES}, features=FEATURES)
    counts = Counter(out["kind"])
    summary = f"audit of {len(pipe.train_dataset)} training examples: " + ", ".join(
        f"{counts.get(kind, 0)} {kind}" for kind in kinds)
    for note in notes:
        logger.info("audit: %s", note)
    out.info.description = "\n".join([summary, *notes])
    return out


def audit_counts(issues: Dataset) -> dict[str, int]:
    """How many rows of each kind an audit holds (every kind, 0 included).

    Example:
        >>> audit_counts(pipe.audit())["duplicate"]
    """
    counts = Counter(issues["kind"]) if len(issues) else Counter()
    return {kind: int(counts.get(kind, 0)) for kind in KINDS}
