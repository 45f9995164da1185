"""``InfluenceFunctionScorer``: damped Gauss-Newton influence of (training id, target) pairs, fitted once."""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Callable, ContextManager, Iterable, Mapping, Optional, Sequence, Union

import torch
from datasets import Dataset
from torch import nn
from transformers import default_data_collator

from ...context import instance_masks, state_of
from ...data import BATCH_KEY, InstanceIdCollator, check_id_column, check_ids_known
from ...errors import TurnoverError
from ...files import PathLike
from ...fingerprints import fingerprint
from ...losses import is_causal_lm, model_inputs
from ...patcher import is_patched
from ..fitted import FittedOnModel
from ..gradients import PerExampleGrads, param_specs, target_gradients
from ..registry import Estimator, EstimatorFallback, attach_fitted
from .budget import FitBudgetError, factorised_gb, materialised_gb, materialised_working_bytes
from .curvature import BLOCK_BYTES
from .factorised import FactorisedFit, NotFactorisable, layer_inputs, linear_layers, output_gradients
from .fitting import FitPass, TrainData
from .materialised import MaterialisedFit, materialised_self_influence, precondition
from .saved import load_fit, read_fit_meta, save_fit
from .sketch import CountSketch

logger = logging.getLogger(__name__)

SOLVERS = ("auto", "woodbury", "direct")
# Materialised self-influence reads every stored gradient once per group of rows; a group holds at most this much
# of its own gradients (float32 target and training gradients, and both side by side), and at most what the memory
# budget leaves (see budget.py).
SELF_INFLUENCE_GROUP_BYTES = 2**29
# bytes a self-influence group holds per row and stored coordinate: float32 target gradients (kept, then joined),
# float32 training gradients, both side by side, and float64 copies of column blocks of each
SELF_INFLUENCE_ROW_BYTES = 36


class InfluenceFunctionScorer(FitPass, FittedOnModel, Estimator):
    """Damped Gauss-Newton influence of (training id, target) pairs, with ``TurnoverScorer``'s interface.

    ``scores[i, j] = g_j^T (G + lambda I)^-1 g_i / N`` (see the module docstring): positive = training example ``i``
    lowers target ``j``'s loss. The fit (one pass over the training set, then one factorisation) runs once, on the
    first call or in :meth:`fit`, with a progress bar; it belongs to the weights the model has then. When every
    tracked parameter belongs to a ``torch.nn.Linear`` that sees one row per example (a head on pooled features),
    the fit is factorised (``method == "factorised"``: layer inputs and output gradients, ``N x N`` kernels, the
    same scores); otherwise it keeps ``N (C - 1)`` per-example gradients (``"materialised"``). :meth:`save` /
    :meth:`load` keep it (safetensors + JSON; loading refuses other weights).

    Args:
        model: a trained classifier (patched with turn-over dropout or not).
        train_data: the training set it was trained on: a ``datasets.Dataset`` with model inputs, labels and the
            id column (collated with ``data_collator``), or an iterable of collated batches with ``example_ids``.
        data_collator: collates dataset rows (wrapped in :class:`~turnover_hf.data.InstanceIdCollator`).
        parameters: names of the parameters to differentiate (default: those with ``requires_grad``).
        damping_factor: ``lambda = damping_factor x trace(G) / D``.
        sketch_dim: sketch every gradient to this many coordinates with a CountSketch (None: exact).
        sketch_seed: seed of the sketch. (``projection_dim`` / ``projection_seed``: deprecated names of both.)
        max_memory_gb: the memory budget (beyond the model and one batch) of a fit without a projection (a
            factorised fit counts its own, smaller size); beyond it the scorer asks for ``sketch_dim``. A
            materialised fit's peak, self-influence and scoring included, stays within it (see
            :mod:`~turnover_hf.estimators.influence.budget`; a target set of T targets adds ``T x D'`` float64):
            scoring keeps a float64 copy of the stored gradients (which halves the time of every target set after
            the first, ``benchmarks/influence_scoring.py``) only when it takes at most ``ROWS_CACHE_BYTES`` (1 GiB)
            and what the budget leaves, and self-influence takes its rows in groups that fit what is left.
        solver: ``"auto"`` (the smaller space), ``"woodbury"`` (``N (C-1)``-space) or ``"direct"`` (parameters;
            materialised only).
        factorised: ``None`` (automatic: factorised when the model allows it, no projection, ``solver`` is not
            ``"direct"``, and, for ``solver="auto"`` with a known N, ``N (C - 1) <= D`` and its size fits
            ``max_memory_gb``), ``True`` (required: an ineligible model raises) or ``False`` (per-example
            gradients).
        batch_size: examples per gradient batch.
        id_column: the dataset's id column (default: the turn-over config's, else ``"example_id"``).
        show_progress: a tqdm bar while fitting.

    Example:
        >>> scorer = InfluenceFunctionScorer(model, train, data_collator=collator, sketch_dim=4096)
        >>> scorer.fit().save("out/influence")
        >>> scorer.scores(targets, targets["labels"], example_ids=torch.arange(100))   # (100, n_targets)
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Optional[TrainData] = None,
        *,
        data_collator: Optional[Callable] = None,
        parameters: Optional[Sequence[str]] = None,
        damping_factor: float = 0.1,
        sketch_dim: Optional[int] = None,
        sketch_seed: int = 0,
        max_memory_gb: float = 4.0,
        solver: str = "auto",
        factorised: Optional[bool] = None,
        batch_size: int = 64,
        id_column: Optional[str] = None,
        show_progress: bool = True,
        projection_dim: Optional[int] = None,
        projection_seed: Optional[int] = None,
    ) -> None:
        if projection_dim is not None or projection_seed is not None:
            warnings.warn("InfluenceFunctionScorer(projection_dim=..., projection_seed=...) are deprecated; pass "
                          "sketch_dim=..., sketch_seed=...", DeprecationWarning, stacklevel=2)
            sketch_dim = projection_dim if projection_dim is not None else sketch_dim
            sketch_seed = projection_seed if projection_seed is not None else sketch_seed
        if is_causal_lm(model):
            raise TurnoverError(
                f"the influence estimator covers classifiers, and {type(model).__name__} is a causal language model. "
                "Use the projected influence function (estimator='projected', what estimator='auto' picks for a "
                "causal LM: per-token Gauss-Newton curvature) for language models."
            )
        if solver not in SOLVERS:
            raise TurnoverError(f"solver must be one of {SOLVERS}, got {solver!r}.")
        if not float(damping_factor) > 0:
            raise TurnoverError(f"damping_factor must be positive (0.1 is the default), got {damping_factor!r}.")
        if factorised not in (None, True, False):
            raise TurnoverError(f"factorised must be None (automatic), True or False, got {factorised!r}.")
        self.model = model
        self.specs = param_specs(model, parameters)
        self.num_parameters = self.specs[-1].offset + self.specs[-1].numel
        self.grads = PerExampleGrads(model, self.specs)
        self.device = next(model.parameters()).device
        self.patched = is_patched(model)
        self.id_column = id_column or (state_of(model).config.id_column if self.patched else "example_id")
        self.damping_factor = float(damping_factor)
        self.sketch = CountSketch(self.specs, sketch_dim, sketch_seed) if sketch_dim is not None else None
        self.sketch_seed = int(sketch_seed)
        self.max_memory_gb = float(max_memory_gb)
        self.solver = solver
        self.factorised = factorised
        self._layers, self._ineligible = linear_layers(model, self.specs)
        if factorised:
            reason = self._ineligible or ("it sketches gradients (sketch_dim)" if self.sketch is not None else None)
            reason = reason or ("solver='direct' works in parameter space" if solver == "direct" else None)
            if reason:
                raise TurnoverError(
                    "factorised=True needs every tracked parameter to be the weight or bias of a torch.nn.Linear "
                    f"that sees one row per example, no projection and solver 'auto' or 'woodbury'; here {reason}. "
                    "Pass factorised=None (automatic) or False (per-example gradients)."
                )
        self.batch_size = max(1, int(batch_size))
        self.train_data = train_data
        self.data_collator = data_collator
        self.show_progress = show_progress
        self.factors: Optional[Union[MaterialisedFit, FactorisedFit]] = None
        # the last target set's (G + lambda I)^-1 g_t (materialised) or its kernels with the training factors
        self._preconditioned: Optional[tuple[str, Any]] = None
        # set by estimator="auto": the estimator to score with when an exact fit turns out too large to keep
        self.fallback: Optional[str] = None

    # -- as an estimator of InfluencePipeline -----------------------------------------------------------------
    def prepare(self, train: Dataset, collator: Callable) -> bool:
        """Fit on ``train`` (once; not sharded) unless a fit was loaded."""
        if self.factors is not None:
            return False
        self.train_data, self.data_collator = train, collator
        try:
            self.fit()
        except FitBudgetError as err:
            if self.fallback is None:
                raise
            # The size of an exact fit is known for sure only once the first batch shows which fit applies.
            raise EstimatorFallback(self.fallback, err.need) from None
        return True

    def self_score_columns(self, batches: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        # the fit's stored gradients are read once for many batches
        return self.self_scores_many([(b, b["labels"], b["example_ids"]) for b in batches])[:, None]

    def cache_key(self) -> dict[str, Any]:
        key = {"parameters": [s.name for s in self.specs], "damping_factor": self.damping_factor,
               "sketch_dim": self.sketch_dim, "sketch_seed": self.sketch_seed, "solver": self.solver}
        if self.fallback is not None:  # the fit may yet hand over to another estimator: its budget decides
            key |= {"fallback": self.fallback, "max_memory_gb": self.max_memory_gb}
        return key

    # -- fitting ----------------------------------------------------------------------------------------------
    @property
    def sketch_dim(self) -> Optional[int]:
        """The sketch's width (None: exact gradients)."""
        return self.sketch.dim if self.sketch is not None else None

    @property
    def width(self) -> int:
        """Coordinates of every stored gradient: ``D``, or the sketch's dimension."""
        return self.sketch.dim if self.sketch is not None else self.num_parameters

    @property
    def method(self) -> Optional[str]:
        """How the fit is kept: ``"factorised"`` (layer inputs and output gradients) or ``"materialised"``
        (per-example gradients); None before fitting."""
        return None if self.factors is None else self.factors.method

    def _batches(self, data: TrainData) -> tuple[Iterable[Mapping[str, Any]], Optional[int], Optional[int]]:
        """Collated training batches, the number of examples (if known) and the number of batches (if known)."""
        if isinstance(data, Dataset):
            check_id_column(data, self.id_column)
            collate = InstanceIdCollator(self.data_collator or default_data_collator, self.id_column)
            starts = range(0, len(data), self.batch_size)
            rows = (collate([data[i] for i in range(s, min(s + self.batch_size, len(data)))]) for s in starts)
            return rows, len(data), len(starts)
        if isinstance(data, Sequence):
            return data, sum(len(torch.as_tensor(b[BATCH_KEY])) for b in data if b.get(BATCH_KEY) is not None), len(data)
        return data, None, None

    def _training_masks(self, example_ids: torch.Tensor) -> ContextManager:
        """The context each training example was trained under: its own mask, or nothing for a plain model."""
        return instance_masks(self.model, example_ids, mode="train") if self.patched else contextlib.nullcontext()

    def fit_memory_gb(self, num_examples: int, num_classes: int) -> float:
        """About how many GB fitting on ``num_examples`` examples of a ``num_classes``-way task keeps (the
        factorised size when the model qualifies for it and it is smaller); compare with ``max_memory_gb``.

        Example:
            >>> scorer = InfluenceFunctionScorer(model)
            >>> scorer.fit_memory_gb(len(train), model.config.num_labels) <= scorer.max_memory_gb
            True
        """
        kept = max(1, int(num_classes) - 1)
        needed = materialised_gb(num_examples, kept, self.width, self.solver)
        if self._factorisable() and (self.solver != "auto" or num_examples * kept <= self.num_parameters):
            modules = dict(self.model.named_modules())
            per_example = sum(modules[layer.name].in_features * layer.weight + layer.bias
                              + kept * modules[layer.name].out_features for layer in self._layers)
            needed = min(needed, factorised_gb(num_examples, kept, per_example))
        return needed

    def fit(self, train_data: Optional[TrainData] = None) -> "InfluenceFunctionScorer":
        """One pass over the training set (gradients under the training masks), then the factor.

        Factorised when the model allows it (see the class docstring); a batch that breaks the factorisation
        (a tracked Linear that sees several rows per example, or runs twice) sends an automatic fit back to
        per-example gradients (re-reading the data) or, with ``factorised=True`` or one-pass data, raises.

        Example:
            >>> scorer = InfluenceFunctionScorer(model, projection_dim=4096).fit(train_batches)
        """
        data = train_data if train_data is not None else self.train_data
        if data is None:
            raise TurnoverError(
                "the influence function is fitted on the training set: pass train_data=... (a datasets.Dataset with "
                f"model inputs, labels and the {self.id_column!r} column, or collated batches with example_ids)."
            )
        factors: Optional[Union[MaterialisedFit, FactorisedFit]] = None
        if self._factorisable():
            try:
                factors = self._fit_factorised(data)
            except NotFactorisable as err:
                if self.factorised or not isinstance(data, (Dataset, Sequence)):
                    raise TurnoverError(
                        f"the factorised influence fit does not apply to this model: {err}. Fit with "
                        "factorised=False (per-example gradients)."
                    ) from None
                logger.info("influence function: %s; fitting with per-example gradients instead.", err)
        if factors is None:
            factors = self._fit_materialised(data)
        self.factors = factors
        self._preconditioned = None
        self.fit_identity = self.identity()
        return self.attached()

    def attached(self) -> "InfluenceFunctionScorer":
        """This fitted scorer, recorded on the patched model so that its save_pretrained / push_to_hub carry it."""
        if self.patched:
            attach_fitted(self.model, "influence", self)
        return self

    def _factorisable(self) -> bool:
        return (self.factorised is not False and self._ineligible is None and self.sketch is None
                and self.solver != "direct")

    def _fitted(self) -> Union[MaterialisedFit, FactorisedFit]:
        if self.factors is None:
            self.fit()
        elif self.factors.method == "materialised":  # a loaded fit, or a changed budget
            self.factors.room = self._working_bytes(self.factors)
        return self.factors

    def _working_bytes(self, factors: MaterialisedFit) -> int:
        """What ``max_memory_gb`` leaves beyond a materialised fit's own peak (see budget.py)."""
        n, c, width = factors.class_gradients.shape
        return materialised_working_bytes(n, c, width, factors.solver, self.max_memory_gb)

    # -- scoring ----------------------------------------------------------------------------------------------
    @property
    def known_ids(self) -> torch.Tensor:
        """The ids of the training examples the influence function was fitted on."""
        return self._fitted().example_ids

    def target_grads(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Gradient of each target's loss (eval mode, full network), sketched if projecting, float32 ``(T, D')``."""
        labels = _target_labels(labels)
        g = target_gradients(self.grads, targets, labels, self.batch_size)
        return (self.sketch(g) if self.sketch is not None else g).cpu()

    def _target_factors(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer, the targets' output gradients ``(T, 1, out)`` and inputs ``(T, in')`` (eval, full network)."""
        labels = _target_labels(labels)
        inputs = model_inputs(targets, self.device)
        deltas: list[list[torch.Tensor]] = [[] for _ in self._layers]
        rows: list[list[torch.Tensor]] = [[] for _ in self._layers]
        for start in range(0, len(labels), self.batch_size):
            part = slice(start, start + self.batch_size)
            try:
                logits, outputs, x = self._linear_forward({k: v[part] for k, v in inputs.items()}, contextlib.nullcontext())
            except NotFactorisable as err:
                raise TurnoverError(
                    f"these targets cannot be scored with the factorised fit: {err}. Fit with factorised=False."
                ) from None
            d = output_gradients(self.model, self._layers, logits, outputs, x, labels[part, None], check=False)
            for i, (dl, al) in enumerate(zip(d, layer_inputs(self._layers, x))):
                deltas[i].append(dl)
                rows[i].append(al)
        return [torch.cat(x) for x in deltas], [torch.cat(x) for x in rows]

    def _projected(self, factors: FactorisedFit, targets: Mapping[str, torch.Tensor], labels: torch.Tensor,
                   rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``U g_t`` of the targets, float64 ``(m, T)``; ``rows``: the training rows the targets are (self-influence),
        whose kept input Gram matrices serve the layers no mask changes."""
        deltas, inputs = self._target_factors(targets, labels)
        grams = factors.input_grams(rows, inputs) if rows is not None else None
        return factors.curvature_products(deltas, inputs, grams)

    def preconditioned(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """``(G + lambda I)^-1 g_t`` of every target, float64 ``(D', T)``; the last target set's is kept
        (materialised fits only)."""
        factors = self._fitted()
        if factors.method == "factorised":
            raise TurnoverError("a factorised fit never forms parameter-space vectors; use scores(...), or fit with "
                                "factorised=False for preconditioned(...).")
        return self._per_target_set(targets, labels, lambda: precondition(factors, self.target_grads(targets, labels)))

    def _per_target_set(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor, build: Callable[[], Any]) -> Any:
        """``build()`` for this target set, kept until another set comes (chunks of ids share one target set)."""
        key = fingerprint({k: v for k, v in targets.items() if isinstance(v, torch.Tensor)}, torch.as_tensor(labels))
        if self._preconditioned is None or self._preconditioned[0] != key:
            self._preconditioned = (key, build())
        return self._preconditioned[1]

    def _rows(self, example_ids: torch.Tensor) -> torch.Tensor:
        factors = self._fitted()
        return factors.rows_of(check_ids_known(torch.as_tensor(example_ids).cpu(), factors.example_ids))

    def scores(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
        """Influence of each id on each target, float32 ``(n_ids, n_targets)`` on the CPU (positive = helped)."""
        rows = self._rows(example_ids)
        factors = self._fitted()
        if factors.method == "factorised":
            solved = self._per_target_set(targets, labels,
                                          lambda: factors.solve(self._projected(factors, targets, labels)))
            return factors.influence(solved, rows).float()
        v = self.preconditioned(targets, labels)
        step = max(1, BLOCK_BYTES // (16 * factors.class_gradients.shape[1] * factors.width))  # float64 rows, blocks
        return torch.cat([factors.train_gradients(rows[s : s + step]) @ v / factors.num_examples
                          for s in range(0, len(rows), step)]).float()

    def self_scores(self, batch: Mapping[str, torch.Tensor], labels: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
        """Self-influence ``g_z(full network)^T (G + lambda I)^-1 g_z / N`` of each training row, float32 ``(n,)``."""
        rows = self._rows(example_ids)
        factors = self._fitted()
        if factors.method == "factorised":
            return factors.self_influence(self._projected(factors, batch, labels, rows), rows).float()
        return materialised_self_influence(factors, self.target_grads(batch, labels), rows).float()

    def self_scores_many(self, batches: Sequence[tuple[Mapping[str, torch.Tensor], torch.Tensor, torch.Tensor]]
                         ) -> torch.Tensor:
        """:meth:`self_scores` of several ``(batch, labels, example_ids)`` at once, float32 ``(sum n,)``: gradients
        are taken batch by batch and a materialised fit's stored gradients are read once for all of them (that
        pass, not the rows, is what a call costs there).

        Example:
            >>> scorer.self_scores_many([(b, b["labels"], b["example_ids"]) for b in batches])
        """
        factors = self._fitted()
        if factors.method == "factorised" or not batches:
            return torch.cat([self.self_scores(*item) for item in batches]) if batches else torch.zeros(0)
        n, c, width = factors.class_gradients.shape
        group = min(SELF_INFLUENCE_GROUP_BYTES, self._working_bytes(factors) - factors.cached_bytes())
        out, grads, rows, held = [], [], [], 0
        for k, (batch, labels, ids) in enumerate(batches):
            grads.append(self.target_grads(batch, labels))
            rows.append(self._rows(ids))
            held += len(rows[-1])
            following = len(batches[k + 1][2]) if k + 1 < len(batches) else 0  # the group must hold it too
            per_row = SELF_INFLUENCE_ROW_BYTES * width + 24 * n * c  # and float64 (N (C-1), rows) products, solved
            if k == len(batches) - 1 or per_row * (held + following) > group:
                out.append(materialised_self_influence(factors, torch.cat(grads), torch.cat(rows)).float())
                grads, rows, held = [], [], 0
        return torch.cat(out)

    # -- files ------------------------------------------------------------------------------------------------
    def save(self, folder: PathLike) -> None:
        """Write the fit to ``folder`` (``influence_factors.safetensors`` + ``influence.json``, atomically, the JSON
        last); fits first if needed.

        Example:
            >>> scorer.save("out/model/influence")     # InfluencePipeline("out/model", ..., estimator="influence")
        """
        save_fit(self, folder)

    @staticmethod
    def read_meta(folder: PathLike) -> dict[str, Any]:
        """The metadata of a saved fit (``influence.json``), checked to be this format (version 3; 2: a factorised
        fit saved with its Cholesky factor; 1: a materialised fit written before ``method`` existed)."""
        return read_fit_meta(folder)

    @classmethod
    def load(cls, model: nn.Module, folder: PathLike, **kwargs: Any) -> "InfluenceFunctionScorer":
        """A scorer with the fit saved in ``folder``; refuses a model whose weights (or masks) differ from the fit's.

        ``kwargs`` are runtime options (``batch_size``, ``show_progress``, ``train_data``, ``data_collator``); a
        ``factorised`` that contradicts the saved fit's method is refused.

        Example:
            >>> scorer = InfluenceFunctionScorer.load(model, "out/influence")
        """
        return load_fit(cls, model, folder, **kwargs)


def _target_labels(labels: torch.Tensor) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.is_floating_point():
        raise TurnoverError(f"targets need one integer class label each, got labels of shape {tuple(labels.shape)}.")
    return labels
