"""Plots of influence results (matplotlib): self-influence, class-by-class influence, flip sanity, data cleansing.

Every function returns a ``matplotlib.figure.Figure`` (shown inline in notebooks) and, given ``path``, also saves
it as a PNG atomically. Without a display, matplotlib's headless ``Agg`` backend is used. Install with
``pip install "turnover-hf[plots]"``.

Example:
    >>> from turnover_hf import plots
    >>> plots.self_influence_histogram(pipe.self_influence(), path="self_influence.png")
    >>> plots.flip_sanity_curves(trainer.state.log_history, path="flip_sanity.png")
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from datasets import Dataset

from .errors import TurnoverError
from .files import PathLike, atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float]]
LabelsLike = Union[ArrayLike, Sequence[str], Dataset]

# Colours that stay apart for colour-blind readers (Okabe-Ito).
BLUE, ORANGE, GREEN, RED, GREY = "#0072B2", "#E69F00", "#009E73", "#D55E00", "#7f7f7f"
LABEL_COLUMNS = ("label", "labels")
SELF_INFLUENCE_COLUMNS = ("self_influence", "score")


def _pyplot() -> Any:
    """``matplotlib.pyplot``; switches to ``Agg`` first when nothing chose a backend and there is no display."""
    try:
        import matplotlib
    except ImportError:
        raise TurnoverError(
            "plots need matplotlib: pip install 'turnover-hf[plots]' (or pip install matplotlib)."
        ) from None
    headless = not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) and sys.platform.startswith("linux")
    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND") and headless:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _new_figure(width: float = 6.4, height: float = 4.0) -> tuple[Figure, Any]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    # Closed for pyplot's bookkeeping (no leak, no second copy shown at the end of a notebook cell); the returned
    # Figure still draws, saves, and displays when it is a cell's value.
    plt.close(fig)
    return fig, ax


def _finish(fig: Figure, path: PathLike | None, dpi: int) -> Figure:
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    return fig


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (for embedding in a report).

    Example:
        >>> png = figure_png(self_influence_histogram(scores))
        >>> png[:4]
        b'\\x89PNG'
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _vector(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    array = np.asarray(values, dtype=float)
    if array.ndim == 2 and 1 in array.shape:
        array = array.reshape(-1)
    if array.ndim != 1:
        raise TurnoverError(f"{name} must be one value per example, got an array of shape {array.shape}.")
    return array


def _column(dataset: Dataset, candidates: Sequence[str], name: str) -> list:
    for column in candidates:
        if column in dataset.column_names:
            return dataset[column]
    raise TurnoverError(
        f"{name}: the dataset has none of the columns {list(candidates)} (it has {dataset.column_names})."
    )


def _finite(values: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise TurnoverError(f"{name} holds {bad} NaN or infinite values; the scores are broken, not plottable.")
    return values


def self_influence_histogram(
    scores: Dataset | ArrayLike,
    mislabelled: ArrayLike | str | None = None,
    *,
    bins: int = 50,
    title: str | None = None,
    path: PathLike | None = None,
    dpi: int = 110,
) -> Figure:
    """Histogram of self-influence (Kobayashi et al. 2020, App. E), split by a known-mislabelled flag if given.

    ``scores`` is what :meth:`InfluencePipeline.self_influence` returns (a Dataset with a ``self_influence``
    column) or one value per example. ``mislabelled`` is a boolean per example, or the name of such a column.

    Example:
        >>> fig = self_influence_histogram(pipe.self_influence(), mislabelled=flipped, path="si.png")
    """
    if isinstance(scores, Dataset):
        if isinstance(mislabelled, str):
            mislabelled = scores[mislabelled]
        scores = _column(scores, SELF_INFLUENCE_COLUMNS, "self_influence_histogram")
    elif isinstance(mislabelled, str):
        raise TurnoverError("mislabelled names a column, so scores must be a Dataset holding it.")
    values = _finite(_vector(scores, "scores"), "scores")
    if len(values) == 0:
        raise TurnoverError("self_influence_histogram got no scores.")
    fig, ax = _new_figure()
    edges = np.histogram_bin_edges(values, bins=bins)
    if mislabelled is None:
        ax.hist(values, bins=edges, color=BLUE, alpha=0.85, label=f"training examples ({len(values)})")
    else:
        flags = _vector(mislabelled, "mislabelled").astype(bool)
        if len(flags) != len(values):
            raise TurnoverError(f"mislabelled has {len(flags)} entries for {len(values)} scores.")
        ax.hist(values[~flags], bins=edges, color=BLUE, alpha=0.7, label=f"clean ({int((~flags).sum())})")
        ax.hist(values[flags], bins=edges, color=RED, alpha=0.8, label=f"known mislabelled ({int(flags.sum())})")
    ax.axvline(0.0, color=GREY, linewidth=1, linestyle=":")
    mean = float(values.mean())
    ax.axvline(mean, color="black", linewidth=1.2, linestyle="--", label=f"mean {mean:+.3g}")
    ax.set_xlabel("self-influence  (the example's influence on its own loss)")
    ax.set_ylabel("training examples")
    ax.set_title(title or "Self-influence: high = memorised, often mislabelled")
    ax.legend(frameon=False)
    return _finish(fig, path, dpi)


def _labels(labels: LabelsLike, name: str) -> list:
    if isinstance(labels, Dataset):
        labels = _column(labels, LABEL_COLUMNS, name)
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().reshape(-1).tolist()
    return list(np.asarray(labels).reshape(-1).tolist())


def class_influence_matrix(
    scores: ArrayLike, train_labels: LabelsLike, target_labels: LabelsLike
) -> tuple[np.ndarray, list, list]:
    """Mean influence of each training class on each target class: (matrix, training classes, target classes).

    Example:
        >>> matrix, rows, cols = class_influence_matrix(pipe.scores(valid), train, valid)
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().numpy()
    matrix = _finite(np.asarray(scores, dtype=float), "scores")
    if matrix.ndim != 2:
        raise TurnoverError(f"scores must be the (n_train, n_targets) matrix of pipe.scores, got shape {matrix.shape}.")
    rows, cols = _labels(train_labels, "train_labels"), _labels(target_labels, "target_labels")
    if len(rows) != matrix.shape[0] or len(cols) != matrix.shape[1]:
        raise TurnoverError(
            f"scores has shape {tuple(matrix.shape)} but there are {len(rows)} training labels and {len(cols)} target "
            "labels; give one label per row (training example) and per column (target)."
        )
    row_classes, col_classes = sorted(set(rows)), sorted(set(cols))
    row_index = np.array([row_classes.index(r) for r in rows])
    col_index = np.array([col_classes.index(c) for c in cols])
    # Sum over each block with two one-hot products (no Python loop over examples), then divide by block sizes.
    row_onehot = np.eye(len(row_classes))[row_index]
    col_onehot = np.eye(len(col_classes))[col_index]
    sums = row_onehot.T @ matrix @ col_onehot
    counts = np.outer(row_onehot.sum(0), col_onehot.sum(0))
    return sums / counts, row_classes, col_classes


def class_influence_heatmap(
    scores: ArrayLike,
    train_labels: LabelsLike,
    target_labels: LabelsLike,
    *,
    label_names: Sequence[str] | Mapping[Any, str] | None = None,
    title: str | None = None,
    path: PathLike | None = None,
    dpi: int = 110,
) -> Figure:
    """Heatmap of mean influence by (training class, target class), HYDRA's inter-class view (Chen et al. 2021).

    ``scores`` is the (n_train, n_targets) matrix of :meth:`InfluencePipeline.scores`; labels are one per row /
    column, as arrays or Datasets with a ``label`` column. A healthy classifier has a positive diagonal: examples
    help targets of their own class.

    Example:
        >>> fig = class_influence_heatmap(pipe.scores(valid), train, valid, label_names=["neg", "pos"])
    """
    matrix, row_classes, col_classes = class_influence_matrix(scores, train_labels, target_labels)

    def name(c: Any) -> str:
        if label_names is None:
            return str(c)
        if isinstance(label_names, Mapping):
            return str(label_names.get(c, label_names.get(str(c), c)))
        return str(label_names[c]) if isinstance(c, int) and 0 <= c < len(label_names) else str(c)

    size = max(len(row_classes), len(col_classes))
    # The other plots' 6.4 x 4 inches for a few classes (they sit side by side in reports); larger for many.
    fig, ax = _new_figure(min(max(6.4, 3.2 + 0.7 * size), 14), min(max(4.0, 2.6 + 0.6 * size), 12))
    limit = float(np.abs(matrix).max()) or 1.0
    image = ax.imshow(matrix, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    fig.colorbar(image, ax=ax, label="mean influence (> 0: helps)")
    ax.set_xticks(range(len(col_classes)), [name(c) for c in col_classes], rotation=30 if size > 4 else 0)
    ax.set_yticks(range(len(row_classes)), [name(c) for c in row_classes])
    ax.set_xlabel("target class")
    ax.set_ylabel("training class")
    if size <= 12:
        # One number format for every cell, with enough decimals for the largest magnitude.
        decimals = max(0, 2 - int(np.floor(np.log10(limit))))
        for i in range(len(row_classes)):
            for j in range(len(col_classes)):
                strong = abs(matrix[i, j]) > 0.6 * limit
                ax.text(j, i, f"{matrix[i, j]:+.{decimals}f}", ha="center", va="center",
                        color="white" if strong else "black")
    ax.set_title(title or "Mean influence by class")
    return _finish(fig, path, dpi)


def _history(source: Any) -> list[dict[str, Any]]:
    """A list of log records from a Trainer, a TrainerState, a FlipSanityCallback or the list itself."""
    for attribute in ("state", "log_history", "history"):
        if not isinstance(source, (list, tuple)) and hasattr(source, attribute):
            source = getattr(source, attribute)
    if isinstance(source, Mapping) and "log_history" in source:  # trainer_state.json, loaded
        source = source["log_history"]
    if not isinstance(source, (list, tuple)):
        raise TurnoverError(
            f"flip_sanity_curves needs trainer.state.log_history (a list of dicts), got {type(source).__name__}."
        )
    return [dict(record) for record in source]


def flip_sanity_series(log_history: Any) -> dict[str, np.ndarray]:
    """Steps and losses logged by :class:`FlipSanityCallback`: ``step``, ``mask``, ``flip``, ``eval`` (NaN if absent).

    Example:
        >>> flip_sanity_series(trainer.state.log_history)["flip"]
    """
    records = _history(log_history)
    eval_loss = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r and "step" in r}
    series: dict[str, list[float]] = {"step": [], "mask": [], "flip": [], "eval": []}
    for record in records:
        prefix = "eval_" if "eval_train_sample_loss_flip" in record else ""
        if f"{prefix}train_sample_loss_flip" not in record:
            continue
        step = record.get("step", len(series["step"]))
        if step in series["step"]:  # the same evaluation seen through two records
            continue
        series["step"].append(step)
        series["mask"].append(record[f"{prefix}train_sample_loss_mask"])
        series["flip"].append(record[f"{prefix}train_sample_loss_flip"])
        series["eval"].append(record.get("eval_loss", eval_loss.get(step, float("nan"))))
    if not series["step"]:
        raise TurnoverError(
            "the log history holds no flip-sanity losses: train with turnover_hf.FlipSanityCallback(...) in "
            "callbacks and an evaluation strategy (eval_strategy='epoch' or 'steps') so it runs."
        )
    order = np.argsort(series["step"], kind="stable")
    return {key: np.asarray(values, dtype=float)[order] for key, values in series.items()}


def flip_sanity_curves(
    log_history: Any,
    *,
    title: str | None = None,
    path: PathLike | None = None,
    dpi: int = 110,
) -> Figure:
    """Training-time sanity curves of turn-over dropout (Kobayashi et al. 2020, Fig. 2).

    The loss of a fixed sample of training examples under their own masks (seen, falls like a training loss) and
    under their flipped masks (unseen: should track the held-out loss), with the held-out loss, at each
    evaluation. Pass ``trainer.state.log_history`` (or the Trainer, or the callback).

    Example:
        >>> trainer = TurnoverTrainer(..., callbacks=[FlipSanityCallback(train.select(range(256)), collator)])
        >>> trainer.train(); flip_sanity_curves(trainer.state.log_history, path="fig2.png")
    """
    series = flip_sanity_series(log_history)
    fig, ax = _new_figure()
    marker = "o" if len(series["step"]) <= 30 else None
    ax.plot(series["step"], series["mask"], color=BLUE, marker=marker, label="train, own mask (seen)")
    ax.plot(series["step"], series["flip"], color=RED, marker=marker, label="train, flipped mask (unseen)")
    if not np.isnan(series["eval"]).all():
        ax.plot(series["step"], series["eval"], color="black", linestyle="--", marker=marker,
                label="held-out, full network")
    ax.set_xlabel("training step")
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    ax.set_ylabel("mean cross-entropy loss")
    if len(series["step"]) == 1:  # one evaluation: a point, not a curve; keep the axis readable
        step = series["step"][0]
        ax.set_xlim(step - max(1.0, 0.5 * step), step + max(1.0, 0.5 * step))
    ax.set_title(title or "Flip sanity: the flipped loss should track the held-out loss")
    fig.legend(frameon=False, loc="outside lower center", ncols=3, fontsize="small")
    return _finish(fig, path, dpi)


def cleansing_curve(
    fractions: ArrayLike,
    accuracy: ArrayLike,
    random_accuracy: ArrayLike | None = None,
    *,
    metric: str = "accuracy",
    title: str | None = None,
    path: PathLike | None = None,
    dpi: int = 110,
) -> Figure:
    """Data-cleansing curve (Kobayashi et al. 2020, Table 2): metric after removing the most harmful fraction.

    ``accuracy[i]`` is the retrained model's metric after removing ``fractions[i]`` of the training set ranked by
    influence; ``random_accuracy`` the same for random removal, one row per repeat (the mean and the spread are
    drawn) or a single row.

    Example:
        >>> cleansing_curve([0, .01, .05, .1], [.81, .83, .84, .82], random_accuracy=[[.81, .81, .80, .79]])
    """
    x = _vector(fractions, "fractions")
    y = _vector(accuracy, "accuracy")
    if len(x) != len(y) or len(x) == 0:
        raise TurnoverError(f"fractions ({len(x)}) and accuracy ({len(y)}) need the same, non-zero length.")
    fig, ax = _new_figure()
    ax.plot(100 * x, y, color=GREEN, marker="o", label="remove most harmful first (influence)")
    if random_accuracy is not None:
        rand = random_accuracy.detach().cpu().numpy() if isinstance(random_accuracy, torch.Tensor) else random_accuracy
        rand = np.atleast_2d(np.asarray(rand, dtype=float))
        if rand.shape[1] != len(x):
            raise TurnoverError(
                f"random_accuracy has {rand.shape[1]} columns for {len(x)} fractions (one row per random repeat)."
            )
        mean = rand.mean(0)
        ax.plot(100 * x, mean, color=GREY, marker="s", linestyle="--",
                label="remove at random" + (f" (mean of {len(rand)})" if len(rand) > 1 else ""))
        if len(rand) > 1:
            std = rand.std(0, ddof=1)
            ax.fill_between(100 * x, mean - std, mean + std, color=GREY, alpha=0.2, linewidth=0)
    ax.set_xlabel("training data removed (%)")
    ax.set_ylabel(metric)
    ax.set_title(title or "Data cleansing: remove harmful examples, retrain")
    fig.legend(frameon=False, loc="outside lower center", ncols=3, fontsize="small")
    return _finish(fig, path, dpi)
