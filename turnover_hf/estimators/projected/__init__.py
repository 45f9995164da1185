"""The projected influence function: the damped Gauss-Newton influence function of ``estimator="influence"`` in a
``k``-dimensional projection of the gradients, for any training-set size and for causal language models.

For N training examples, tracked Linear layers (default: every trainable ``torch.nn.Linear`` / ``Conv1D``, and the
``adapters`` library's LoRA matrices as Linears without bias: :mod:`.adapters_lora`) and ``k = projection_dim``
(4096):

    score(z, t) = (P g_t)^T (P G P^T + lambda I)^-1 (P g_z) / N      (> 0: z lowers the target's loss)

* ``P``: per tracked Linear (or GPT-2's ``Conv1D``) of ``out x in'`` parameters, a Kronecker projection
  ``P_out (x) P_in``: the layer's per-example gradient ``sum_t dy_t x_t^T`` becomes ``sum_t (P_out dy_t)(P_in
  x_t)^T`` (LoGra, Choe et al. 2024), so the whole gradient is never formed.

  ``design="eigen"`` (the default): ``P_in`` and ``P_out`` are the leading ``side_dim`` (256) eigenvectors of the
  layer's input second moment ``E[x x^T]`` and of its Gauss-Newton output-gradient moment ``E[dy dy^T]`` (the
  Kronecker-factored curvature's eigenbasis, as in K-FAC / EK-FAC), estimated on ``basis_examples`` (2,048)
  training examples spread over the set, before the fit's pass; of the resulting Kronecker pairs of all layers
  the ``k`` with the largest eigenvalue products (the curvature along them) are kept. ``P`` has orthonormal rows,
  so it neither stretches nor mixes directions: it leaves out the flattest ones. Sides longer than 4 x
  ``side_dim`` are first cut by random signs (the moments' memory). Measured in ``benchmarks/fidelity.py``
  (N = 2,000, k = 4,096) its scores follow the exact fit's closely where random projections do not (see the
  table in docs/method/quality.md).

  ``design="sketch"``: random-sign sides cut to ``side_dim``, then one CountSketch of all layers to ``k``;
  ``design="kronecker"``: random-sign sides cut until the layers fit ``k`` (LoGra's design). Both are
  data-independent (no basis pass) and both distort the geometry the inverse depends on: a random ``k x D`` map
  has singular values spread far from 1 on the gradients' span, so they follow the exact fit less closely.
  With every side whole and ``k`` at least the layers' size, every design gives the exact fit's scores.
* ``G``: the Gauss-Newton matrix of the training loss, each example under the loss it was trained with (its
  turn-over mask when the model is patched). Classifiers (``curvature_classes``): ``"exact"`` over the classes
  (``C - 1`` backward passes per batch, as in the exact fit), or ``"sampled"``: the gradients of the loss against
  ``label_samples`` classes drawn from the model's own prediction (each draw fixed by the seed, the example's id
  and the draw; class ``c`` drawn in proportion to its share ``p_c ||p - e_c||^2`` of the curvature and weighted
  by ``p_c`` over that, so the confident prediction's near-zero gradient is rarely drawn), whose weighted outer
  products are, in expectation, the same matrix (with two classes, exactly), for ``1 + label_samples`` backward
  passes whatever ``C`` (``label_samples`` in the basis pass); ``"auto"`` (default) keeps the exact fit up to 5
  classes (where one draw per example was measured to follow it less closely) and up to ``label_samples + 2``
  (where it is no dearer), and samples beyond (``benchmarks/class_count.py``, docs/method/class-count.md).
  Causal LMs: the gradient of the loss against labels sampled from the model's own
  next-token distribution has, in expectation, the per-token Gauss-Newton matrix as its outer product (no
  vocabulary-square matrix); ``label_samples`` draws per sequence, each fixed by the example's id and position.
* ``curvature``: ``"full"`` inverts the whole ``k x k`` matrix ``P G P^T``; ``"diagonal"`` (eigen design) keeps
  its diagonal, the curvature along each kept Kronecker eigenvector (EK-FAC's eigenvalue correction, Grosse et al.
  2023): ``k`` numbers to keep and invert instead of ``k^2``. ``"auto"`` (default) takes the diagonal for causal
  LMs, where the full matrix is estimated from few sampled sequences and its inverse follows the noise (measured
  in ``benchmarks/fidelity.py --setting lm``), and the full matrix for classifiers, whose exact curvature it
  follows closely.
* ``lambda = damping_factor x trace(P G P^T) / k``: the same multiple of the mean eigenvalue as the exact fit, taken
  in the projected space (with nothing projected, ``k = D`` and it is the exact fit's).

Cost: one pass over the training set (sharded over processes), plus (eigen) one over at most ``basis_examples``;
``k^2`` float64 of memory (diagonal: ``k``) plus one batch (and the side moments, at most ``(4 side_dim)^2`` per
side), ``N k`` float32 on disk. Self-influence reads the store (``O(N k^2)``, diagonal ``O(N k)``; a turn-over
checkpoint also recomputes each example's gradient on the full network, as the exact fit does: one more pass), a
target set costs its own gradients and one read of the store (``O(N k T)``). ``benchmarks/scale.py`` measures the growth; ``benchmarks/fidelity.py`` the fidelity
against retraining beside the exact fit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Optional

from ...losses import is_causal_lm
from ..fitted import refuse_changed_options
from ..registry import BuiltEstimator, EstimatorContext, SavedState, register_estimator
from .saved import FIT_OPTIONS, META_NAME, PROJECTED_DIR, read_fit_meta
from .scorer import ProjectedInfluenceScorer, split_trainable
from ..influence import InfluenceFunctionScorer

__all__ = ["ProjectedInfluenceScorer", "ProjectedOptions", "PROJECTED_DIR"]


@dataclass
class ProjectedOptions:
    """Options of the projected influence function (``InfluencePipeline(..., options=ProjectedOptions(...))``).

    Example:
        >>> InfluencePipeline(model, train_dataset=train, estimator="projected",
        ...                   options=ProjectedOptions(projection_dim=8192))
    """

    projection_dim: int = field(default=4096, metadata={"help": "Coordinates of a projected gradient (k): memory k^2, "
                                                                  "disk N k. Larger is closer to the exact fit."})
    projection_seed: int = field(default=0, metadata={"help": "Seed of the random projections."})
    design: str = field(default="eigen", metadata={"help": "eigen: each layer's sides rotated into their leading "
                                                           "side_dim curvature eigenvectors, then the projection_dim "
                                                           "Kronecker pairs of largest curvature kept; sketch: random "
                                                           "sides, then one CountSketch; kronecker: random sides cut "
                                                           "until the layers fit projection_dim (LoGra)."})
    side_dim: int = field(default=256, metadata={"help": "design=eigen/sketch: longest side of a layer's gradient "
                                                         "(longer sides are projected)."})
    basis_examples: int = field(default=2048, metadata={"help": "design=eigen: training examples (spread over the "
                                                                "set) whose curvature decides the eigenvectors."})
    damping_factor: float = field(default=0.1, metadata={"help": "Damping as a multiple of the mean eigenvalue of G."})
    curvature: str = field(default="auto", metadata={"help": "full: the k x k Gauss-Newton matrix in the projection; "
                                                             "diagonal (design=eigen): its diagonal, the curvature "
                                                             "along each kept eigenvector (EK-FAC); auto: diagonal "
                                                             "for causal LMs, full for classifiers."})
    training_masks: bool = field(default=True, metadata={"help": "Turn-over models: each training example's "
                                                                 "gradient under its own mask (as it was trained); "
                                                                 "false: on the full network."})
    parameters: Optional[list[str]] = field(
        default=None, metadata={"help": "Tracked parameter names (default: every trainable torch.nn.Linear)."})
    label_samples: int = field(default=1, metadata={"help": "Sampled labels per training example for the "
                                                            "Gauss-Newton matrix: causal LMs (label sequences), "
                                                            "classifiers whose curvature_classes samples."})
    curvature_classes: str = field(default="auto", metadata={"help": "Classifiers: exact (a backward pass per class "
                                                                     "but one), sampled (label_samples classes drawn "
                                                                     "from the model's predictions: a cost that does "
                                                                     "not grow with the classes), auto (exact up to 5 "
                                                                     "classes and label_samples + 2, sampled beyond)."})
    normalise: str = field(default="none", metadata={"help": "none, or relative: each training example's scores "
                                                             "divided by the square root of its self-influence."})
    store_dir: Optional[str] = field(default=None, metadata={"help": "Folder for the projected training gradients "
                                                                     "(N x k float32; default: a temporary folder); "
                                                                     "new or empty: a folder already holding a store "
                                                                     "is refused, never overwritten."})
    show_progress: bool = field(default=True, metadata={"help": "Show a progress bar while fitting."})


def _exact_fit_too_large(context: EstimatorContext) -> Optional[str]:
    """Why ``auto`` projects: a causal LM, or an exact fit of this training set above its memory budget."""
    if len(context.models) > 1:
        return None
    model = context.model
    covered, left = split_trainable(model)
    named = dict(model.named_parameters())
    if not covered or sum(named[n].numel() for n in left) > 0.01 * sum(named[n].numel() for n in covered + left):
        return None  # the projection would leave trainable parameters out: another estimator decides
    if is_causal_lm(model):
        return ("a causal language model: the projected influence function covers it with per-token Gauss-Newton "
                "curvature")

    options = context.options
    budget = (options.get("max_memory_gb") if isinstance(options, Mapping) else getattr(options, "max_memory_gb", None))
    try:
        exact = InfluenceFunctionScorer(model, show_progress=False,
                                        **({} if budget is None else {"max_memory_gb": budget}))
    except Exception:  # noqa: BLE001  the exact fit does not apply: its own rule decides
        return None
    num_classes = int(getattr(getattr(model, "config", None), "num_labels", 2))
    needed = exact.fit_memory_gb(context.num_train_examples, num_classes)
    if needed <= exact.max_memory_gb:
        return None
    return (f"an exact influence fit of {context.num_train_examples} examples would take about {needed:.1f} GB "
            f"(above max_memory_gb={exact.max_memory_gb:g}); the 4096 directions of largest curvature instead")


@register_estimator(
    "projected",
    description="damped Gauss-Newton influence function in the k directions of largest curvature of a Kronecker "
                "eigenbasis of the gradients "
                "(any training-set size, classifiers and causal LMs; one pass over the training set, sharded "
                f"over processes; kept in <model>/{PROJECTED_DIR}/).",
    definition="the first-order change of the target's loss if the example were removed and the model re-fitted "
               "(damped Gauss-Newton influence function, in a projection of the gradients).",
    options_class=ProjectedOptions,
    auto=_exact_fit_too_large,
    auto_priority=15,
    saved_state=SavedState(PROJECTED_DIR, META_NAME),
    worth="Scored by the damped Gauss-Newton influence function in the k (default 4096) directions of largest curvature "
          "(Kronecker eigenbasis) of the gradients (benchmarks/fidelity.py compares it with the exact fit).",
    low_self_influence="Lowest: examples the rest of the data already predicts.",
)
def build(context: EstimatorContext) -> BuiltEstimator:
    """Load the fit kept in the state folder when there is one (options that would change it are refused), else a
    scorer that fits on the training set when first used."""

    options = context.options or ProjectedOptions()
    given = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    folder = context.saved_folder()
    if folder is not None:
        defaults = ProjectedOptions()
        asked = {k: given[k] for k in FIT_OPTIONS if k != "parameters" and given[k] != getattr(defaults, k)}
        refuse_changed_options(folder, read_fit_meta(folder), asked, "projected influence function")
        scorer = ProjectedInfluenceScorer.load(context.model, folder, batch_size=context.batch_size,
                                               normalise=given["normalise"], show_progress=given["show_progress"])
    else:
        scorer = ProjectedInfluenceScorer(context.model, batch_size=context.batch_size, **given)
    return BuiltEstimator(scorer, scorer.id_column, None)

