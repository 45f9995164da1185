"""HYDRA (Chen et al., 2021), one estimator of the package: influence from hypergradients tracked along the whole training trajectory.

The second estimator of turnover-hf, beside turn-over dropout. While an ordinary ``transformers.Trainer`` trains,
:class:`HydraTracker` keeps, for every training example ``i`` and a subset of parameters ``w`` (default: the
parameters with ``requires_grad``, e.g. adapters and head), the hypergradient

    h_i = d w_T / d delta_i,

where ``delta_i`` scales example ``i``'s term in every training loss it enters: the step loss is
``sum_k a_k (1 + delta_k) loss_k(w)`` with ``a_k`` the weight the Trainer gives example ``k`` (``1 / B`` for a mean
over an effective batch of ``B``). ``delta_i = -1`` removes the example, so the first-order change of a target's
loss when ``i`` is left out is

    score(i, j) = -grad_w loss_j(w_T) . h_i  ~=  loss_j(trained without i) - loss_j(trained with i).

This is the paper's contribution ``C(i, j) = -(1/N) grad loss_j(w_T) . nabla_{T,i}`` (Eq. 8-9): with weights
``1/N + eps_i`` and mini-batches of ``B``, the paper's ``nabla_{T,i} = d w_T / d eps_i`` equals ``N h_i``, so the
``1/N`` cancels. Positive scores mean the example helped the target (lowered its loss), as in turn-over scores.

The recurrence follows the optimizer actually used, step by step (Algorithm 1, Eq. 10-12), with the Hessian term
dropped (the paper's fast approximation) unless ``hessian=True``:

* ``torch.optim.SGD`` (momentum ``mu``, dampening ``tau``, Nesterov, weight decay ``lam``), exactly:
  ``dd_i = lam h_i + c_i [+ H h_i]``, ``m_i <- mu m_i + (1 - tau) dd_i`` (first step: ``m_i = dd_i``),
  ``h_i <- h_i - lr (m_i or dd_i + mu m_i)``, where ``c_i = s a_i g_i`` is example ``i``'s share of this step's
  gradient (zero when it is not in the step) and ``s`` the gradient-clipping factor of the step.
* ``torch.optim.Adam`` / ``AdamW``: an approximation, documented here. The update is treated as preconditioned SGD
  with momentum whose preconditioner ``1 / (sqrt(v_hat_t) + eps)`` is held fixed (its dependence on ``delta_i``
  through ``g^2`` is ignored): ``m_i <- beta1 m_i + (1 - beta1)(c_i [+ H h_i] + lam_coupled h_i)``,
  ``h_i <- (1 - lr lam_decoupled) h_i - lr / (1 - beta1^t) * m_i / (sqrt(v_t / (1 - beta2^t)) + eps)``.

The clipping factor ``s`` is likewise held fixed. Both choices leave the tracked quantity linear in the
per-example gradients, which is what makes N of them affordable.

Per-example gradients are taken in eval mode (without dropout) with ``turnover_hf.per_example_loss``; the weights
``a_i`` are read off each micro-batch's actual gradient, so gradient accumulation and the Trainer's loss scaling are
followed as they are.

Cost. Per optimizer step, the per-example gradients of the step's examples (``torch.func`` ``vmap(grad)``, or a
forward and backward per example for models whose forward ``vmap`` cannot trace, which includes the Hugging Face
transformers) and an update of their rows only: examples outside the step change through one linear map shared by
all of them (momentum and weight decay), kept as a per-coordinate 2x2 matrix and applied to the whole table only
when it becomes ill-conditioned (never for plain SGD; every ~44 steps for momentum 0.9). Memory is ``N x |w|``
float32 (twice that while training with momentum or Adam), in memory or memory-mapped from disk. ``save_model``
and every Trainer checkpoint write the table to ``<folder>/hydra``, where ``InfluencePipeline(estimator="hydra")``
looks for it.

Lean mode (``hydra_mode="lean"``, SGD family only) for large N: training runs plainly; then, for one target set,
:meth:`HydraTrainingMixin.hydra_lean_scores` takes the target gradients ``G`` (Q x D) at ``w_T``, replays the same
run from the same start (weights, optimizer, scheduler, random states) and projects every per-example gradient
onto ``G`` before it enters the recurrence. The SGD map of a step is the same for all coordinates of a parameter
group, so the projections follow it exactly (:class:`ProjectedHypergradients`): memory ``N x Q`` per group (twice
with momentum) instead of ``N x |w|``, for one more training run with per-example gradients. The replayed final
weights must equal the trained ones bit for bit, or the scores are refused. Adam's per-coordinate preconditioner
does not commute with the projection and is refused.

Example:
    >>> trainer = HydraTrainer(model=model, args=args, train_dataset=add_example_ids(train), processing_class=tok)
    >>> trainer.train()
    >>> trainer.save_model("out/model")                       # weights + out/model/hydra (no pickle)
    >>> scorer = HydraScorer(model, "out/model/hydra")
    >>> scorer.scores(targets, labels, example_ids)           # (n_ids, n_targets), positive = helped
"""

from .saved import HYDRA_DIR
from .scorer import HydraScorer
from .table import Hypergradients, ProjectedHypergradients, SavedHypergradients
from .tracker import HydraTracker
from .trainer import HydraCallback, HydraTrainer, HydraTrainingMixin, HydraTurnoverTrainer

__all__ = [
    "HYDRA_DIR", "HydraCallback", "HydraScorer", "HydraTracker", "HydraTrainer", "HydraTrainingMixin",
    "HydraTurnoverTrainer", "Hypergradients", "ProjectedHypergradients", "SavedHypergradients",
]
