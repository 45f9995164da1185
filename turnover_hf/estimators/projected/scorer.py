"""``ProjectedInfluenceScorer``: the damped Gauss-Newton influence function in a Kronecker projection of the
per-example gradients, fitted in one pass over the training set (sharded over processes), with the projected
training gradients kept on disk."""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, ContextManager, Mapping, Optional, Sequence, Union

import torch
from datasets import Dataset
from torch import nn

from ...context import instance_masks, state_of
from ...errors import TurnoverError
from ...files import PathLike
from ...fingerprints import fingerprint
from ...losses import IGNORE_INDEX, find_labels, is_causal_lm, model_inputs, per_example_loss, per_token_loss
from ...masks import keyed_hash, salted_hash
from ...patcher import is_patched
from ..fitted import FittedOnModel
from ..gradients import ParamSpec, param_specs
from ..influence.curvature import curvature_roots, kept_classes, label_coefficients
from ..influence.sketch import CountSketch
from ..registry import Estimator
from .adapters_lora import lora_matrix_sizes
from .fitting import FitPass
from .gradient_store import RowStore
from .projected_gradients import ProjectedGradients
from .projection import CoordinateSelection, LayerProjection, eigen_dim, layer_projections, layer_shapes
from .sampled_labels import AUTO_EXACT_CLASSES, CURVATURE_CLASSES, sampled_classes, samples_classes
from .saved import load_fit, save_fit

logger = logging.getLogger(__name__)

NORMALISATIONS = ("none", "relative")
DESIGNS = ("eigen", "sketch", "kronecker")
CURVATURES = ("auto", "full", "diagonal")
def linear_parameters(model: nn.Module) -> list[ParamSpec]:
    """The trainable weights and biases of ``torch.nn.Linear`` and ``Conv1D`` modules (the default tracked
    parameters); other trainable parameters are left out, with a log line naming how many."""
    names, left = split_trainable(model)
    if not names:
        raise TurnoverError(
            "the projected influence function tracks trainable torch.nn.Linear, Conv1D and adapters-LoRA layers, and "
            f"this model has none (trainable: {left[:3]}...). Name such parameters with parameters=[...], or use "
            "estimator='influence'."
        )
    if left:
        named = dict(model.named_parameters())
        share = sum(named[n].numel() for n in left) / sum(named[n].numel() for n in names + left)
        (logger.warning if share > 0.01 else logger.info)(
            "projected influence: tracking the %d trainable Linear / Conv1D / LoRA parameters; %d other trainable "
            "parameters (e.g. %s, %.0f%% of the trainable count) are left out. Name the tracked ones with "
            "parameters=[...] to silence this.", len(names), len(left), left[0], 100 * share)
    return param_specs(model, names)


def split_trainable(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters the projection covers (Linear / Conv1D weights and biases, the ``adapters``
    library's LoRA matrices), and the rest."""
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    names, left = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            owner, _, leaf = name.rpartition(".")
            covered = ((type(modules.get(owner)) in (nn.Linear, Conv1D) and leaf in ("weight", "bias"))
                       or lora_matrix_sizes(modules, name) is not None)
            (names if covered else left).append(name)
    return names, left


class ProjectedInfluenceScorer(FitPass, FittedOnModel, Estimator):
    """Damped Gauss-Newton influence in a ``k``-dimensional projection of the gradients, at any training-set size.

    ``score(z, t) = (P g_t)^T (P G P^T + lambda I)^-1 (P g_z) / N`` with ``P`` a Kronecker projection per tracked
    Linear layer, ``projection_dim`` coordinates in all (``design="eigen"``: the Kronecker pairs of largest curvature
    in the eigenbases of each layer's input and output-gradient moments, found on ``basis_examples`` training
    examples before the fit's pass; ``"sketch"`` / ``"kronecker"``: random signs), ``g_z`` the gradient of the
    loss training weighs (a causal LM's summed token cross-entropy; targets: their mean), ``G`` the
    Gauss-Newton matrix of the training loss (classifiers: exact over the classes, or with ``curvature_classes=
    "sampled"`` (``"auto"``: beyond 5 classes and ``label_samples + 2``) from ``label_samples`` classes drawn from the
    model's own prediction per example; causal LMs: from labels sampled
    from the model's own predictions, per token, without a vocabulary-square matrix; each draw fixed by the
    example's id) and ``lambda = damping_factor x trace(P G P^T) / k``. ``curvature="full"`` keeps the whole
    ``k x k`` matrix ``P G P^T``; ``"diagonal"`` (eigen design only) keeps its diagonal, the curvature along each
    kept Kronecker eigenvector (EK-FAC's eigenvalue correction, Grosse et al. 2023); ``"auto"``: diagonal for a
    causal LM, full for a classifier (the better of the two in ``benchmarks/fidelity.py``). One pass over the
    training set (each example under its training mask when the model is patched, unless ``training_masks=False``:
    then on the full network, the mean over masks) accumulates ``P G P^T`` and writes each example's projected loss
    gradient to disk; with several processes each takes its share of the batches and the curvature is summed
    (accelerate). Self-influence reads the stored gradients; a target set costs one
    projected gradient per target, one solve and one read of the store.

    Memory: ``k^2`` float64 (diagonal: ``k``) plus one batch, whatever N; disk: ``N k`` float32. Time: one
    gradient pass (with a backward per kept class: ``C - 1``; ``1 + label_samples`` when the classes are sampled
    and for a causal LM), one more over at most
    ``basis_examples`` (eigen), plus ``O(N k^2)`` (diagonal: ``O(N k)``) for self-influence and ``O(N k T)`` for
    ``T`` targets.

    Example:
        >>> scorer = ProjectedInfluenceScorer(model, projection_dim=4096)
        >>> scorer.prepare(train, collator)                     # the fit: one pass over the training set
        >>> scorer.scores(targets, targets["labels"], torch.arange(100))   # (100, n_targets)
    """

    token_level = True

    def __init__(
        self,
        model: nn.Module,
        *,
        projection_dim: int = 4096,
        projection_seed: int = 0,
        design: str = "eigen",
        side_dim: int = 256,
        basis_examples: int = 2048,
        damping_factor: float = 0.1,
        curvature: str = "auto",
        training_masks: bool = True,
        parameters: Optional[Sequence[str]] = None,
        label_samples: int = 1,
        curvature_classes: str = "auto",
        normalise: str = "none",
        batch_size: int = 64,
        id_column: Optional[str] = None,
        store_dir: Optional[PathLike] = None,
        show_progress: bool = True,
    ) -> None:
        if isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim < 1:
            raise TurnoverError(f"projection_dim must be a positive integer (4096 is the default), got {projection_dim!r}.")
        if not float(damping_factor) > 0:
            raise TurnoverError(f"damping_factor must be positive (0.1 is the default), got {damping_factor!r}.")
        if isinstance(label_samples, bool) or not isinstance(label_samples, int) or label_samples < 1:
            raise TurnoverError(f"label_samples must be a positive integer, got {label_samples!r}.")
        if normalise not in NORMALISATIONS:
            raise TurnoverError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}.")
        if curvature_classes not in CURVATURE_CLASSES:
            raise TurnoverError(
                f"curvature_classes must be one of {CURVATURE_CLASSES} (exact: a backward per class but one; sampled: "
                f"label_samples labels drawn from the model's predictions; auto: exact up to {AUTO_EXACT_CLASSES} classes), "
                f"got {curvature_classes!r}.")
        self.model = model
        self.device = next(model.parameters()).device
        self.specs = linear_parameters(model) if parameters is None else param_specs(model, parameters)
        self.projection_dim, self.projection_seed = projection_dim, int(projection_seed)
        if design not in DESIGNS:
            raise TurnoverError(f"design must be one of {DESIGNS}, got {design!r}.")
        if isinstance(side_dim, bool) or not isinstance(side_dim, int) or side_dim < 1:
            raise TurnoverError(f"side_dim must be a positive integer (256 is the default), got {side_dim!r}.")
        if isinstance(basis_examples, bool) or not isinstance(basis_examples, int) or basis_examples < 1:
            raise TurnoverError(f"basis_examples must be a positive integer (2048 is the default), got {basis_examples!r}.")
        self.design, self.side_dim, self.basis_examples = design, side_dim, basis_examples
        self.layers: Optional[list[LayerProjection]] = None
        self.grads: Optional[ProjectedGradients] = None
        if design == "eigen":  # the sides come from the training data: fit() finds them
            self._dim = eigen_dim([(i, o) for *_, i, o in layer_shapes(model, self.specs)], projection_dim, side_dim)
        else:
            layers = layer_projections(model, self.specs, projection_dim, self.projection_seed,
                                       side_dim if design == "sketch" else None)
            sketch = None
            widths = [layer.dim for layer in layers]
            if design == "sketch" and sum(widths) > projection_dim:
                blocks = [ParamSpec(f"{layer.name}:projected", (layer.dim,), sum(widths[:i]))
                          for i, layer in enumerate(layers)]
                sketch = CountSketch(blocks, projection_dim, self.projection_seed)
            self._use_layers(layers, sketch)
        self.damping_factor = float(damping_factor)
        self.causal_lm = is_causal_lm(model)
        self.curvature_form = self._curvature_form(curvature, design, self.causal_lm)
        self.label_samples = label_samples
        self.curvature_classes = curvature_classes
        self.normalise = normalise
        self.batch_size = max(1, int(batch_size))
        self.patched = is_patched(model)
        if not isinstance(training_masks, bool):
            raise TurnoverError(f"training_masks must be True or False, got {training_masks!r}.")
        self.training_masks = training_masks
        self.masked = self.patched and training_masks  # training gradients under each example's own mask
        self.id_column = id_column or (state_of(model).config.id_column if self.patched else "example_id")
        self.store_dir = None if store_dir is None else os.fspath(store_dir)
        self.show_progress = show_progress
        # the fit
        self.store: Optional[RowStore] = None
        self.curvature: Optional[torch.Tensor] = None  # P G P^T, float64 (k, k), or its diagonal (k,)
        self.damping: Optional[float] = None
        self.fit_identity: Optional[dict[str, Optional[str]]] = None
        self._factor: Optional[torch.Tensor] = None  # Cholesky factor (k, k), or the inverse diagonal (k,)
        self._targets: Optional[tuple[str, torch.Tensor]] = None

    @staticmethod
    def _curvature_form(curvature: str, design: str, causal_lm: bool) -> str:
        if curvature not in CURVATURES:
            raise TurnoverError(f"curvature must be one of {CURVATURES}, got {curvature!r}.")
        if curvature == "diagonal" and design != "eigen":
            raise TurnoverError(
                f"curvature='diagonal' is the curvature along each kept eigenvector, so it needs design='eigen' "
                f"(got design={design!r}); with random projections use curvature='full'."
            )
        if curvature == "auto":
            return "diagonal" if causal_lm and design == "eigen" else "full"
        return curvature

    @property
    def num_parameters(self) -> int:
        """Tracked parameters (``D``)."""
        return self.specs[-1].offset + self.specs[-1].numel

    @property
    def dim(self) -> int:
        """Coordinates of a projected gradient (``k``)."""
        return self._dim

    def _use_layers(self, layers: list[LayerProjection], reducer: Optional[Union[CountSketch, CoordinateSelection]]
                    ) -> None:
        self.layers = layers
        self.grads = ProjectedGradients(self.model, self.specs, layers, reducer)
        self._dim = self.grads.dim

    # -- as an estimator of InfluencePipeline -----------------------------------------------------------------
    def prepare(self, train: Dataset, collator: Callable) -> bool:
        """Fit on ``train`` unless a fit was loaded (sharded over the processes of ``accelerate launch``)."""
        if self.store is not None:
            return False
        self.fit(train, collator)
        return True

    def cache_key(self) -> dict[str, Any]:
        return {"parameters": [s.name for s in self.specs], "projection_dim": self.projection_dim,
                "projection_seed": self.projection_seed, "design": self.design, "side_dim": self.side_dim,
                "basis_examples": self.basis_examples, "damping_factor": self.damping_factor,
                "curvature": self.curvature_form, "training_masks": self.training_masks,
                "label_samples": self.label_samples, "curvature_classes": self.curvature_classes,
                "normalise": self.normalise}

    def _set_fit(self, store: RowStore, curvature: torch.Tensor) -> None:
        diagonal = curvature.dim() == 1
        trace = float(curvature.sum() if diagonal else torch.diagonal(curvature).sum())
        if not trace > 0:
            raise TurnoverError(
                "the Gauss-Newton matrix is zero (every training gradient vanished): nothing to invert. Check that "
                "the tracked parameters are the ones training changed."
            )
        self.store, self.curvature = store, curvature
        self.damping = self.damping_factor * trace / self.dim
        if diagonal:
            self._factor = (curvature + self.damping).reciprocal()
        else:
            self._factor = torch.linalg.cholesky(curvature + self.damping * torch.eye(self.dim, dtype=torch.float64))
        self._targets = None

    def _training_context(self, ids: torch.Tensor) -> tuple[Optional[ContextManager], Optional[Callable[[int], ContextManager]]]:
        if not self.masked:
            return None, None
        return instance_masks(self.model, ids, mode="train"), lambda k: instance_masks(self.model, ids[k : k + 1], mode="train")

    def _training_rows(self, batch: Mapping[str, Any], ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each example's projected loss gradient ``(B, k)`` and rows ``U`` with ``P G_batch P^T = U^T U``."""
        inputs, labels = self._inputs_and_labels(batch)
        context, row_context = self._training_context(ids)
        if self.causal_lm:
            def with_samples(logits: torch.Tensor) -> torch.Tensor:
                return torch.stack([labels] + [self._sampled(logits, labels, ids, draw)
                                               for draw in range(self.label_samples)], 1)

            _, g = self.grads(inputs, with_samples, self._training_loss, context, row_context)
            return g[:, 0], g[:, 1:].reshape(-1, self.dim) / math.sqrt(self.label_samples)
        seen: dict[str, torch.Tensor] = {}  # the probabilities and kept classes of the forward that serves the grads
        _, g = self.grads(inputs, self._class_columns(seen, ids, labels), self._training_loss, context, row_context)
        if "classes" not in seen:  # the label's own column, then the sampled ones (weighted)
            scale = (seen["weights"] / self.label_samples).sqrt().to(g.device, g.dtype)
            return g[:, 0], (g[:, 1:] * scale[:, :, None]).reshape(-1, self.dim)
        probs, classes = seen["probs"], seen["classes"]
        roots = curvature_roots(probs, classes).to(g.device, g.dtype)  # R R^T = A
        rows = torch.einsum("nce,ncd->ned", roots, g).reshape(-1, self.dim)
        coefficients = label_coefficients(probs, classes, labels.cpu()).to(g.device, g.dtype)
        return torch.einsum("nc,ncd->nd", coefficients, g), rows

    def _inputs_and_labels(self, batch: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        labels = find_labels(batch)
        if labels is None:
            raise TurnoverError("every training batch needs its labels (a 'labels' or 'label' entry) to fit influence.")
        if not self.causal_lm and (labels.dim() != 1 or labels.is_floating_point()):
            raise TurnoverError(f"the projected influence function needs one class label per example (classifiers) or "
                                f"token labels (causal LMs), got labels of shape {tuple(labels.shape)}.")
        return model_inputs(batch, self.device), labels.to(self.device)

    def _class_columns(self, seen: dict[str, torch.Tensor], ids: torch.Tensor, labels: Optional[torch.Tensor]
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
        """``labels_of`` for a classifier, recording the probabilities in ``seen``: every class but the predicted one
        (``seen["classes"]``, the exact curvature), or, when :func:`samples_classes` says so, ``labels`` (if given)
        then ``label_samples`` classes drawn from the model's own predictions (:func:`sampled_classes`; their
        importance weights in ``seen["weights"]`` ``(B, label_samples)``), whose weighted loss gradients' outer
        product is, in expectation, the Gauss-Newton matrix over the classes."""
        def columns_of(logits: torch.Tensor) -> torch.Tensor:
            if logits.dim() != 2 or logits.shape[1] < 2:
                raise TurnoverError(f"the projected influence function covers classifiers (logits (batch, classes >= 2)) "
                                    f"and causal LMs; this model gave logits of shape {tuple(logits.shape)}.")
            seen["probs"] = torch.softmax(logits.double(), -1).cpu()
            if samples_classes(self.curvature_classes, logits.shape[1], self.label_samples):
                drawn = [sampled_classes(seen["probs"], ids.cpu(), self.projection_seed, draw, self.label_samples)
                         for draw in range(self.label_samples)]
                seen["weights"] = torch.stack([weights for _, weights in drawn], 1)
                own = [] if labels is None else [labels.cpu()]
                return torch.stack(own + [classes for classes, _ in drawn], 1).to(logits.device)
            seen["classes"] = kept_classes(seen["probs"])
            return seen["classes"].to(logits.device)

        return columns_of

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A target's loss: a causal LM's mean token cross-entropy (``scores``' unit), a classifier's cross-entropy."""
        return per_example_loss(logits, labels, shift=self.causal_lm)

    def _training_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A training example's loss as training weighs it: a causal LM's summed token cross-entropy (the causal-LM
        loss of ``transformers`` weighs every token of a batch alike, so a sequence counts by its tokens)."""
        return per_example_loss(logits, labels, shift=self.causal_lm, reduction="sum")

    def _sampled(self, logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, draw: int) -> torch.Tensor:
        """Labels drawn from the model's own next-token distribution at every counted position (the rest -100):
        their loss gradient's outer product is, in expectation, the per-token Gauss-Newton matrix. Draw ``draw`` of
        example ``id`` at position ``t`` inverts the distribution's CDF at a uniform hashed from ``(projection_seed,
        draw, id, t)``: the same labels in every batch composition and process count, and on every device where
        the model's probabilities agree."""
        sampled = torch.full_like(labels, IGNORE_INDEX)
        cumulative = torch.softmax(logits[:, :-1].float(), -1).cumsum_(-1)
        rows = keyed_hash(self.projection_seed, f"sampled labels {draw}", ids.to(logits.device))
        positions = keyed_hash(self.projection_seed, "sampled label positions",
                               torch.arange(cumulative.shape[1], device=logits.device))
        uniform = (salted_hash(rows[:, None], positions[None, :]).double() + 0.5) / 2.0 ** 32
        draws = torch.searchsorted(cumulative, (uniform * cumulative[..., -1].double()).float()[..., None])
        draws = draws.squeeze(-1).clamp_max_(cumulative.shape[-1] - 1)
        counted = labels[:, 1:] != IGNORE_INDEX
        sampled[:, 1:] = torch.where(counted, draws, sampled[:, 1:])
        return sampled

    def _fitted(self) -> RowStore:
        if self.store is None:
            raise TurnoverError(
                "the projected influence function is not fitted: call prepare(train, collator) or fit(train, "
                "collator) first (InfluencePipeline does it on first use)."
            )
        return self.store

    # -- scoring ----------------------------------------------------------------------------------------------
    def target_gradients(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor,
                         loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """Projected gradients of the targets' losses (eval mode, full network; ``loss`` defaults to the targets'),
        float32 ``(T, k)``."""
        self._fitted()
        loss = loss or self._loss
        inputs = model_inputs(targets, self.device)
        labels = torch.as_tensor(labels).to(self.device)
        out = []
        for start in range(0, len(labels), self.batch_size):
            part = slice(start, start + self.batch_size)
            _, g = self.grads({k: v[part] for k, v in inputs.items()}, lambda _: labels[part, None], loss)
            out.append(g[:, 0].cpu())
        return torch.cat(out)

    def _solve(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(P G P^T + lambda I)^-1 vectors^T``, float64 ``(k, T)``."""
        if self._factor.dim() == 1:
            return vectors.double().T * self._factor[:, None]
        return torch.cholesky_solve(vectors.double().T, self._factor)

    def _preconditioned(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        key = fingerprint({k: v for k, v in targets.items() if isinstance(v, torch.Tensor)}, torch.as_tensor(labels))
        if self._targets is None or self._targets[0] != key:
            self._targets = (key, self._solve(self.target_gradients(targets, labels)))
        return self._targets[1]

    def _normalised(self, rows: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Relative influence: each training example's scores divided by the square root of its self-influence."""
        if self.normalise == "none":
            return scores
        return scores / self._self_influence(rows).clamp_min(1e-30).sqrt()[:, None]

    def scores(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
        """Influence of each id on each target, float32 ``(n_ids, n_targets)`` (positive = helped)."""
        rows = self._fitted().read(example_ids).double()
        scores = rows @ self._preconditioned(targets, labels) / len(self.store)
        return self._normalised(rows, scores).float()

    def _self_influence(self, rows: torch.Tensor) -> torch.Tensor:
        if self._factor.dim() == 1:
            return (rows.double().square() * self._factor).sum(1) / len(self.store)
        whitened = torch.linalg.solve_triangular(self._factor, rows.double().T, upper=False)
        return (whitened ** 2).sum(0) / len(self.store)

    def self_scores(self, batch: Mapping[str, torch.Tensor], labels: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
        """Self-influence ``(P g_z)^T (P G P^T + lambda I)^-1 (P g_z(train)) / N`` of each row, float32 ``(n,)``: as
        the exact fit, the full network's gradient against the one the example was trained with (its mask). A
        model without masks (or a fit with ``training_masks=False``) has one gradient: the stored one serves both
        sides (no gradient is recomputed)."""
        rows = self._fitted().read(example_ids)
        if not self.masked:
            return self._self_influence(rows).float()
        full = self.target_gradients(batch, labels, self._training_loss)
        return ((full.double().T * self._solve(rows)).sum(0) / len(self.store)).float()

    def self_score_columns(self, batches: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        if not batches:
            return torch.zeros(0, 1)
        if self.masked:
            return torch.cat([self.self_scores(b, b["labels"], b["example_ids"]) for b in batches])[:, None]
        ids = torch.cat([torch.as_tensor(b["example_ids"]) for b in batches])
        return self._self_influence(self._fitted().read(ids)).float()[:, None]

    def token_scores(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
        """Per-token influence on causal-LM targets, float32 ``(n_ids, n_targets, T)``: each training example against
        the cross-entropy of every counted target token (0 elsewhere); summed over tokens, the influence on the
        summed loss."""
        if not self.causal_lm:
            raise TurnoverError("token_scores is for causal language models; use scores(...).")
        self._fitted()
        labels = torch.as_tensor(labels).to(self.device)
        inputs = model_inputs(targets, self.device)
        n, width = labels.shape
        positions = [t for t in range(1, width) if bool((labels[:, t] != IGNORE_INDEX).any())]
        per_token = torch.zeros(n, width, self.dim, dtype=torch.float64)
        for start in range(0, n, self.batch_size):
            part = slice(start, start + self.batch_size)

            def one_token_each(_: torch.Tensor, part: slice = part) -> torch.Tensor:
                only = torch.full((labels[part].shape[0], len(positions), width), IGNORE_INDEX, device=labels.device)
                for j, t in enumerate(positions):
                    only[:, j, t] = labels[part, t]
                return only

            def token_loss(logits: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
                return per_token_loss(logits, column, shift=True).sum(-1)

            if positions:
                _, g = self.grads({k: v[part] for k, v in inputs.items()}, one_token_each, token_loss)
                per_token[part, positions] = g.double().cpu()
        solved = self._solve(per_token.reshape(n * width, self.dim))  # (k, n T)
        rows = self._fitted().read(example_ids).double()
        return (rows @ solved / len(self.store)).view(len(rows), n, width).float()

    # -- identity and files -----------------------------------------------------------------------------------
    def save(self, folder: PathLike) -> None:
        """Write the fit to ``folder`` (JSON metadata, the curvature and projections as safetensors, the stored
        gradients as plain ``.npy`` arrays; each file atomically, the JSON last).

        Example:
            >>> scorer.save("out/model/projected")     # InfluencePipeline("out/model", estimator="projected")
        """

        save_fit(self, folder)

    @classmethod
    def load(cls, model: nn.Module, folder: PathLike, **kwargs: Any) -> "ProjectedInfluenceScorer":
        """A scorer with the fit saved in ``folder``; refuses a model whose weights, masks or training set differ.

        Example:
            >>> scorer = ProjectedInfluenceScorer.load(model, "out/model/projected")
        """

        return load_fit(cls, model, folder, **kwargs)
