"""The influence-function estimator: damped Gauss-Newton influence of every training example, for classifiers.

The third estimator of turnover-hf, beside turn-over dropout and HYDRA. For the trained weights ``w``, the tracked
parameters (default: those with ``requires_grad``; ``D`` of them) and ``N`` training examples:

    score(z, t) = g_t^T (G + lambda I)^-1 g_z / N       (> 0: z lowers the target's loss, a proponent)

* ``g_z``: the gradient of example ``z``'s loss under the loss it was trained with: on a model patched with
  turn-over dropout, under its own instance mask (``turnover_hf.instance_masks(model, ids, mode="train")``); on
  an unpatched model, the plain forward. Eval mode (no dropout) in both cases.
* ``g_t``: the gradient of the target's loss in eval mode on the full network.
* ``G = (1/N) sum_z J_z^T (diag(p_z) - p_z p_z^T) J_z``: the Gauss-Newton matrix of softmax cross-entropy, with
  ``J_z`` the Jacobian of ``z``'s logits (under its mask) and ``p_z`` its predicted probabilities. Equivalently
  ``G = (1/N) sum_z sum_c p_{z,c} g_{z,c} g_{z,c}^T`` with ``g_{z,c}`` the gradient of ``z``'s cross-entropy
  against class ``c`` (a per-example gradient with a pseudo-label).
* ``lambda = damping_factor x trace(G) / D``: a multiple of the mean eigenvalue of ``G`` (default 0.1, the value
  ``benchmarks/fidelity.py`` fixed in advance; the same definition as
  :func:`turnover_hf.evaluation.peers.gauss_newton_influence`, so the two agree).

``-score(z, t)`` is the first-order change of the target's loss when ``z`` is removed from the training set and
the model is re-fitted, for a loss whose curvature is ``G + lambda I`` (Koh and Liang, 2017, with the Gauss-Newton
matrix in place of the Hessian, as in Kronfluence).

How it is computed. The ``C`` class gradients of an example satisfy ``sum_c p_{z,c} g_{z,c} = 0`` (the gradient of
the expected cross-entropy under the model's own prediction vanishes), so ``C - 1`` of them carry ``G``: the
predicted class is left out and the others are recombined into ``C - 1`` rows ``u_{z,k}`` with
``G = sum_{z,k} u_{z,k} u_{z,k}^T`` (one row per example for a binary classifier); ``g_z`` itself is a combination
of the same class gradients. In the materialised fit (``method == "materialised"``) they are the package's
per-example gradients (:class:`~turnover_hf.estimators.gradients.PerExampleGrads`) with pseudo-labels, so fitting costs
``N (C - 1)`` per-example gradients of ``D`` floats each. The damped system is
solved once, in float64, in the smaller of two spaces: Woodbury's identity in the ``N (C - 1)``-space
(``solver="woodbury"``, a Cholesky factor of ``lambda I + U U^T``) or directly in parameter space
(``solver="direct"``, a Cholesky factor of ``G + lambda I``). Scoring a target set costs one gradient per target
and one solve, then a matrix product per chunk of training ids.

Factorised fit (``method == "factorised"``). When every tracked parameter is the weight or bias of a module of type
exactly ``torch.nn.Linear`` that sees one row per example (``(B, in)`` or ``(B, 1, in)``: a head on pooled
features), a per-example gradient is, per layer, the outer product ``delta a^T``: ``delta`` the loss gradient at the
layer's raw output (taken by a forward hook that runs before any output-mask hook, so the mask enters through the
chain rule), ``a`` its input as the layer saw it (after any input mask), with a 1 appended when the bias is
tracked. Two gradients then have the inner product ``sum_layers (delta_1 . delta_2) (a_1 . a_2)``. The fit keeps
``delta`` of the ``C - 1`` kept classes and ``a`` of every example and builds ``S = lambda I + U U^T`` from
the lower triangle of ``N x N`` kernels (``N^2 sum(in + out) / 2`` operations instead of ``N^2 sum(in x out)``),
factorised on first use (in float32 with float64 iterative refinement for a small target set, in float64
otherwise; both to float64 accuracy). Each training gradient is a combination of its own rows of
``U``, ``g_z = U^T c_z``, so by Woodbury ``(G + lambda I)^-1 g_z = U^T S^-1 c_z`` and

    score(z, t) = c_z^T (S^-1 U g_t)_z / N

(``(.)_z``: the ``C - 1`` entries of ``z``'s rows). A target set costs one forward and backward per target batch,
its kernel with the training factors (``U g_t``) and one Cholesky solve (``O(N^2)`` per target: a one-target
explanation never pays an ``O(N^3)`` step beyond the factorisation); self-influence reads the rows of ``S^-1``,
formed once from the factor on the first self-influence call (a third of the cost of solving for all N), and
reuses the fit's input Gram matrices of the layers whose inputs no mask changes.

The numbers are those of the materialised fit (to float32 rounding; on a 384 -> 128 -> 2 head with N = 2,000, one
thread: fit, one 64-target set and self-influence of all N in 2.6 s instead of 112 s, scores within 2e-7 of the
largest, ``benchmarks/results/influence_scoring.md``). The choice is made at fit time: forward hooks
check every batch, and the first batch's summed parameter gradient is compared with the factorised one. A tracked
Linear that sees several rows per example (token sequences) or runs twice, a weight also used outside its Linear,
any other tracked parameter (LayerNorm, embeddings, Conv1D, Linear subclasses), a projection or ``solver="direct"``
mean per-example gradients (``method == "materialised"``), as does ``solver="auto"`` with ``N (C - 1) > D`` when
``N`` is known (parameter space is then smaller). ``factorised=True`` raises instead of falling back;
``factorised=False`` never factorises.

Scale. The materialised fit keeps ``N x (C - 1) x D`` float32 gradients; the factorised one keeps
``N x (sum(in') + (C - 1) sum(out))`` float32 factors (and a float64 copy), float64 ``N (C - 1)``-square
matrices (``S``, its factors as they are needed, ``S^-1`` once self-influence is asked for) and, when they take at
most :data:`INPUT_GRAMS_BYTES` together, the layers' ``N x N`` input Gram matrices. A materialised fit's budget
counts its peak, not only what it keeps: the fit, self-influence of every example and a target set stay within
``max_memory_gb`` beyond the model and one batch (a target set of T targets adds ``T x D'`` float64), the float64
copy of the stored gradients and self-influence's groups of rows taking only what the budget leaves
(:mod:`.budget`; ``tests/test_influence.py`` measures the process's peak). The exact fit takes one backward pass
per class but one for every example; sampled labels, which keep that cost flat in ``C``, are the projected
estimator's (``curvature_classes``): here the training gradient is a combination of the stored class gradients, so
sampling would store the label's gradient beside the draws (``1 + label_samples`` rows per example instead of
``C - 1``: no saving up to ``C = label_samples + 2``), and beyond that the exact fit's ``N (C - 1) D`` gradients
outgrow the budget, where ``estimator="auto"`` takes the projected fit. When the fit's size exceeds
``max_memory_gb`` the scorer refuses and asks for ``sketch_dim=d`` (or, factorised, ``factorised=False``); with
a projection every gradient is sketched with a fixed, seeded CountSketch (each parameter coordinate hashed to one
of ``d`` buckets with a random sign, from the package's integer hash of ``(sketch_seed, parameter name,
index)``: ``O(D)`` memory, identical on every device). The sketch preserves inner products in expectation (variance ``~ |a|^2 |b|^2 / d``), so scores approach the exact ones
as ``d`` grows past the rank of the gradients; it is an approximation (``benchmarks/results/fidelity*.md`` measures
how close it stays). ``lambda`` is computed from the exact gradients in both modes.

Scope: classifiers (logits ``(B, C)``, integer labels ``(B,)``). Causal language models are refused: use turn-over
ensembles or HYDRA there.

Example:
    >>> scorer = InfluenceFunctionScorer(model, train_dataset, data_collator=DataCollatorWithPadding(tokenizer))
    >>> scorer.scores(targets, targets["labels"], example_ids=torch.arange(100))   # fits once, then (100, T)
    >>> scorer.save("out/influence"); InfluenceFunctionScorer.load(model, "out/influence")
"""

from .estimator import InfluenceOptions
from .saved import FACTORS_NAME, INFLUENCE_DIR, META_NAME
from .scorer import InfluenceFunctionScorer
from .sketch import CountSketch

__all__ = [
    "FACTORS_NAME", "INFLUENCE_DIR", "META_NAME", "CountSketch", "InfluenceFunctionScorer",
    "InfluenceOptions",
]
