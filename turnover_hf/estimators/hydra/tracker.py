"""The tracker: carries every example's hypergradient through each optimiser step (SGD/momentum exactly, Adam with
its preconditioner held fixed)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Callable, ContextManager, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vjp

from ...errors import ConfigMismatchError, ExampleIdError, TurnoverError
from ...files import PathLike, atomic_write_text
from ...losses import IGNORE_INDEX, eval_mode, logits_of, model_inputs, per_example_loss
from ..gradients import PerExampleGrads, labels_in, param_specs
from .saved import FORMAT, FORMAT_VERSION, META_NAME, NORMALISATION, ROW_CHUNK, tracked_weights_fingerprint
from .table import Hypergradients, ProjectedHypergradients

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# The tracker
# ---------------------------------------------------------------------------------------------------------------
def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    for _ in range(4):  # accelerate's AcceleratedOptimizer (and similar) keep the real one in .optimizer
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


class HydraTracker:
    """Tracks ``h_i = d w_T / d delta_i`` for every training example while a model trains (module docstring).

    Per optimizer step, call :meth:`observe` once per micro-batch (after its backward, with the gradient that
    backward added, so the example weights ``a_i`` are read off the training itself), then :meth:`before_step`
    after gradient clipping and before ``optimizer.step()``, then :meth:`after_step`. :class:`HydraTrainer` does
    all of this; a hand-written loop can too.

    Args:
        model: the model being trained.
        example_ids: the ids of all training examples (one row each).
        parameters: names of the parameters to track (default: those with ``requires_grad``).
        hessian: include the Hessian-vector term (exact hypergradients; small models only: every step touches
            every row and runs N Hessian-vector products).
        storage_dir: keep the table as ``.npy`` memory maps in this folder instead of in memory.
        mask_context: for models patched with turn-over dropout: ``ids -> context manager`` under which the
            examples with these ids were trained (each example's gradient is then taken under its own mask).
        rebase_condition: see :class:`Hypergradients`.

    Example:
        >>> tracker = HydraTracker(model, train["example_id"])
        >>> for batch in loader:                          # InstanceIdCollator batches, a mean loss
        ...     optimizer.zero_grad()
        ...     model(**{k: v for k, v in batch.items() if k != "example_ids"}).loss.backward()
        ...     tracker.observe(model, batch, batch["example_ids"], observed_grad=tracker.current_grad())
        ...     tracker.before_step(model, optimizer); optimizer.step(); tracker.after_step(optimizer)
        >>> tracker.save("out/hydra")
    """

    #: Relative mismatch between the training gradient and the weighted per-example gradients that is tolerated
    #: before warning (float32 accumulation noise is ~1e-6; dropout or a different loss give far more).
    RESIDUAL_TOLERANCE = 1e-3

    def __init__(
        self,
        model: nn.Module,
        example_ids: Union[torch.Tensor, Sequence[int]],
        *,
        parameters: Optional[Sequence[str]] = None,
        hessian: bool = False,
        storage_dir: Optional[PathLike] = None,
        id_column: str = "example_id",
        mask_context: Optional[Callable[[torch.Tensor], ContextManager]] = None,
        rebase_condition: float = 100.0,
    ) -> None:
        self.model = model
        self.specs = param_specs(model, parameters)
        self.dim = self.specs[-1].offset + self.specs[-1].numel
        self.hessian = bool(hessian)
        self.id_column = id_column
        self.mask_context = mask_context
        ids = torch.as_tensor(list(example_ids) if not isinstance(example_ids, torch.Tensor) else example_ids)
        self.table = self._make_table(ids, storage_dir, rebase_condition)
        self.grads = PerExampleGrads(model, self.specs)
        self.steps = 0
        self.optimizer_name: Optional[str] = None
        self.max_residual = 0.0
        self._warned: set[str] = set()
        self._checked_dropout = False
        self._reset_step()

    # -- helpers --------------------------------------------------------------------------------------------
    def _make_table(self, ids: torch.Tensor, storage_dir: Optional[PathLike], rebase_condition: float) -> Any:
        return Hypergradients(ids, self.dim, storage_dir=storage_dir, rebase_condition=rebase_condition)

    def _reset_step(self) -> None:
        self._rows: list[torch.Tensor] = []
        self._terms: list[torch.Tensor] = []
        self._step_batches: list[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._grad_sum: Optional[torch.Tensor] = None
        self._clip = 1.0
        self._first_momentum: dict[str, bool] = {}
        self._had_grad: dict[str, bool] = {}
        self._hv: Optional[torch.Tensor] = None

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def _params(self) -> list[nn.Parameter]:
        named = dict(self.model.named_parameters())
        return [named[s.name] for s in self.specs]

    def current_grad(self) -> torch.Tensor:
        """The tracked parameters' ``.grad`` flattened, float32 ``(D,)`` (zeros where there is none)."""
        parts = [
            (p.grad.detach().reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=p.device))
            for p in self._params()
        ]
        return torch.cat(parts)

    @property
    def example_ids(self) -> torch.Tensor:
        return self.table.example_ids

    def hypergradients(self, example_ids: Union[torch.Tensor, Sequence[int]]) -> torch.Tensor:
        """``h_i = d w_T / d delta_i`` of these ids, float32 ``(n, D)`` (columns follow :attr:`specs`)."""
        return self.table.read(self.table.rows_of(torch.as_tensor(example_ids)))

    # -- the three calls of a step ---------------------------------------------------------------------------
    def observe(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        example_ids: torch.Tensor,
        *,
        observed_grad: Optional[torch.Tensor] = None,
        accumulation_steps: int = 1,
        num_items: Optional[int] = None,
    ) -> None:
        """Record the per-example gradients of one micro-batch (at the weights before this optimizer step).

        ``observed_grad`` is what this micro-batch's backward added to the tracked parameters' ``.grad``. The loss
        is assumed to weight example ``i`` as ``a_i = f * u_i`` with ``u_i = 1`` (one value per example) or the
        number of labelled tokens (token-level labels, a mean over tokens); ``f`` is fitted to ``observed_grad`` so
        every Trainer convention (mean per micro-batch divided by the accumulation steps, or a sum over the
        accumulation group's items) is followed as it is. When the fit does not explain ``observed_grad`` (dropout
        makes the training gradient noisy; another loss) or there is no ``observed_grad``, the convention is used:
        ``f = 1 / num_items`` if given (a loss summed over the accumulation group's items), else
        ``1 / (sum(u) * accumulation_steps)`` (a mean per micro-batch, divided by the accumulation steps).
        """
        if not self._checked_dropout:
            self._checked_dropout = True
            if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
                logger.info("HYDRA: the model trains with dropout; per-example gradients are taken without it.")
        example_ids = torch.as_tensor(example_ids).reshape(-1).to(torch.int64).cpu()
        rows = self.table.rows_of(example_ids)
        device = next(model.parameters()).device
        x = model_inputs(inputs, device)
        labels = labels_in(inputs).to(device)
        if len(labels) != len(example_ids):
            raise ExampleIdError(f"a batch has {len(labels)} rows but {len(example_ids)} example ids.")
        row_context = batch_context = None
        if self.mask_context is not None:
            def row_context(k: int) -> ContextManager:
                return self.mask_context(example_ids[k : k + 1])

            batch_context = self.mask_context(example_ids)
        G = self.grads(x, labels, row_context, batch_context)  # (B, D)
        if labels.dim() == 2 and not labels.is_floating_point():  # token labels: each row weighs its counted tokens
            counted = labels[:, 1:] if self.grads.shift else labels
            u = (counted != IGNORE_INDEX).sum(-1).float()
        else:
            u = torch.ones(len(labels), device=G.device)
        Gm = u @ G
        f = 1.0 / num_items if num_items else 1.0 / (float(u.sum()) * max(1, int(accumulation_steps)))
        if observed_grad is not None:
            observed = observed_grad.to(G.device).float().reshape(-1)
            den, size = float(Gm @ Gm), float(observed.norm())
            fitted = float(observed @ Gm) / den if den > 0 else f
            residual = float((observed - fitted * Gm).norm()) / size if size > 0 else 0.0
            self.max_residual = max(self.max_residual, residual)
            if residual <= self.RESIDUAL_TOLERANCE:
                f = fitted
            else:
                self._warn_once(
                    "residual",
                    "HYDRA: the training gradient differs from the weighted per-example gradients by %.2g (relative): "
                    "the training loss is not a weighted mean of turnover_hf.per_example_loss computed without dropout "
                    "(dropout, label smoothing, class weights or mixed precision). Example weights "
                    "follow the Trainer's convention; hypergradients are approximate.",
                    residual,
                )
            self._grad_sum = observed if self._grad_sum is None else self._grad_sum + observed
        a = f * u
        self._rows.append(rows)
        self._terms.append((a[:, None] * G).cpu())
        if self.hessian:
            self._step_batches.append((x, labels, a.detach(), example_ids))

    def before_step(self, model: nn.Module, optimizer: Any) -> None:
        """After clipping, before ``optimizer.step()``: read the clip factor and the optimizer state to come."""
        optimizer = _unwrap_optimizer(optimizer)
        if self._grad_sum is not None:
            now = self.current_grad()
            den = float(self._grad_sum @ self._grad_sum)
            # Clipping scales every gradient by one factor; reading it off the gradient also catches any rescaling.
            self._clip = float(now @ self._grad_sum) / den if den > 0 else 1.0
        for spec, p in zip(self.specs, self._params()):
            state = optimizer.state.get(p, {})
            self._first_momentum[spec.name] = state.get("momentum_buffer") is None
            self._had_grad[spec.name] = p.grad is not None
        if self.hessian:
            self._hv = self._hessian_products()

    def after_step(self, optimizer: Any) -> None:
        """After ``optimizer.step()``: advance every row's hypergradient by this step's recurrence."""
        optimizer = _unwrap_optimizer(optimizer)
        if not self._had_grad:  # before_step was not called: no clipping, current .grad is what was used
            for spec, p in zip(self.specs, self._params()):
                self._first_momentum[spec.name] = self.steps == 0
                self._had_grad[spec.name] = p.grad is not None
        A, b = self._coefficients(optimizer)
        rows = torch.cat(self._rows) if self._rows else torch.zeros(0, dtype=torch.int64)
        C = torch.cat(self._terms) * self._clip if self._terms else torch.zeros(0, self.dim)
        if self.hessian:
            if self._hv is None:
                raise TurnoverError("exact HYDRA (hessian=True) needs before_step(model, optimizer) before optimizer.step().")
            C_all = self._hv.cpu().double() * self._clip
            C_all.index_add_(0, rows, C.double())
            self.table.apply_dense(A, b, C_all)
        else:
            self.table.apply(A, b, rows, C)
        np.add.at(self.table.seen, rows.numpy(), 1)
        self.steps += 1
        self._reset_step()

    # -- optimizer recurrences -------------------------------------------------------------------------------
    def _coefficients(self, optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's per-coordinate map: ``x <- A x + b c`` for the state ``x = (h, m)`` of each row."""
        where = {id(p): (spec, p) for spec, p in zip(self.specs, self._params())}
        is_adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
        if not (is_adam or isinstance(optimizer, torch.optim.SGD)):
            raise TurnoverError(
                f"HYDRA tracking supports torch.optim.SGD, Adam and AdamW; this run uses {type(optimizer).__name__}. "
                "Pass optim='sgd' or 'adamw_torch' in TrainingArguments, or optimizers=(torch.optim.SGD(...), None)."
            )
        self.optimizer_name = type(optimizer).__name__
        groups = [(g, [where[id(p)] for p in g["params"] if id(p) in where]) for g in optimizer.param_groups]
        if any(g.get("maximize", False) for g, specs in groups if specs):
            raise TurnoverError("HYDRA tracking does not support maximize=True optimizers.")
        if is_adam or any(g.get("momentum", 0) for g, specs in groups if specs):
            self.table.ensure_momentum()
        K, D = self.table.K, self.dim
        A = torch.eye(K, dtype=torch.float64)[..., None].repeat(1, 1, D)  # untouched coordinates: identity, no term
        b = torch.zeros(K, D, dtype=torch.float64)
        for group, specs in groups:
            lr, lam = _as_float(group["lr"]), float(group.get("weight_decay", 0.0))
            for spec, p in specs:
                if not self._had_grad.get(spec.name, True):
                    continue  # the optimizer skips a parameter without .grad: identity
                sl = slice(spec.offset, spec.offset + spec.numel)
                if is_adam:
                    self._adam(optimizer.state[p], optimizer, group, sl, lr, lam, A, b)
                else:
                    self._sgd(group, spec, sl, lr, lam, A, b)
        return A, b

    def _sgd(self, group, spec, sl, lr, lam, A, b) -> None:
        mu, tau, nesterov = float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0)), bool(group.get("nesterov"))
        if mu == 0:
            A[0, 0, sl], b[0, sl] = 1 - lr * lam, -lr
            return
        if self._first_momentum.get(spec.name, False):
            # First step: buffer = d_p (no dampening); the state of these coordinates is still zero, so A is moot.
            b[0, sl], b[1, sl] = -lr * (1 + mu if nesterov else 1), 1.0
            return
        step = (1 + mu * (1 - tau)) if nesterov else (1 - tau)
        A[0, 0, sl] = 1 - lr * lam * step
        A[0, 1, sl] = -lr * (mu * mu if nesterov else mu)
        A[1, 0, sl] = (1 - tau) * lam
        A[1, 1, sl] = mu
        b[0, sl], b[1, sl] = -lr * step, 1 - tau

    def _adam(self, state, optimizer, group, sl, lr, lam, A, b) -> None:
        beta1, beta2 = (float(x) for x in group["betas"])
        t = _as_float(state["step"])
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        decoupled = bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
        lam_c, lam_d = (0.0, lam) if decoupled else (lam, 0.0)
        # The preconditioner after this step's v update, held fixed (the documented approximation).
        denom = (v.detach().double().cpu().reshape(-1) / (1 - beta2**t)).sqrt() + float(group["eps"])
        k = lr / (1 - beta1**t) / denom
        A[0, 0, sl] = 1 - lr * lam_d - k * (1 - beta1) * lam_c
        A[0, 1, sl] = -k * beta1
        A[1, 0, sl] = (1 - beta1) * lam_c
        A[1, 1, sl] = beta1
        b[0, sl], b[1, sl] = -k * (1 - beta1), 1 - beta1

    # -- exact mode -----------------------------------------------------------------------------------------
    def _hessian_products(self) -> torch.Tensor:
        """``H h_i`` for every row, with ``H`` the Hessian of this step's weighted training loss (tracked block)."""
        params = self.grads.params()
        batches = self._step_batches

        def step_loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
            total = 0.0
            for x, labels, a, ids in batches:
                ctx = self.mask_context(ids) if self.mask_context is not None else contextlib.nullcontext()
                with ctx:
                    logits = logits_of(functional_call(self.model, p, args=(), kwargs=x))
                total = total + (a * per_example_loss(logits, labels, shift=self.grads.shift)).sum()
            return total

        def unflatten(vec: torch.Tensor) -> dict[str, torch.Tensor]:
            return {s.name: vec[s.offset : s.offset + s.numel].reshape(s.shape).to(params[s.name]) for s in self.specs}

        with eval_mode(self.model):
            _, hvp = vjp(grad(step_loss), params)  # the Hessian is symmetric: its vjp is the Hessian-vector product
            n = len(self.table.example_ids)
            out = torch.empty(n, self.dim)
            for start in range(0, n, ROW_CHUNK):
                H = self.table.read(torch.arange(start, min(start + ROW_CHUNK, n)))
                for r in range(len(H)):
                    out[start + r] = self.grads.flat(hvp(unflatten(H[r]))[0], 1)[0].cpu()
        return out

    # -- files ----------------------------------------------------------------------------------------------
    def save(self, folder: PathLike) -> None:
        """Write the hypergradients (safetensors in memory, ``.npy`` for a disk table) and ``hydra.json``.

        The metadata records the tracked parameters and a fingerprint of their final values, which
        :class:`HydraScorer` checks against the model it scores with. Files are written atomically, the JSON last.
        """
        table_name = self.table.save_arrays(folder)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "normalisation": NORMALISATION,
            "parameters": [{"name": s.name, "shape": list(s.shape)} for s in self.specs],
            "dim": self.dim,
            "num_examples": len(self.table.example_ids),
            "id_column": self.id_column,
            "table": table_name,
            "hessian": self.hessian,
            "optimizer": self.optimizer_name,
            "steps": self.steps,
            "max_residual": self.max_residual,
            "weights_fingerprint": tracked_weights_fingerprint(self.model, self.specs),
        }
        atomic_write_text(os.path.join(os.fspath(folder), META_NAME), json.dumps(meta, indent=2) + "\n")


def check_seen(table: Any, example_ids: torch.Tensor, rows: torch.Tensor) -> None:
    unseen = example_ids[torch.from_numpy(table.seen[rows.numpy()] == 0)]
    if len(unseen):
        raise ExampleIdError(
            f"{len(unseen)} example id(s) never entered a tracked training step (e.g. {unseen[:5].tolist()}): "
            "HYDRA has nothing to say about them (did training stop before the end of the epoch?)."
        )


def check_lean_optimizer(optimizer: Any) -> None:
    """Lean HYDRA projects before the recurrence, which is exact for SGD only."""
    optimizer = _unwrap_optimizer(optimizer)
    if isinstance(optimizer, torch.optim.SGD):
        return
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise TurnoverError(
            f"lean HYDRA cannot follow {type(optimizer).__name__}: its per-coordinate preconditioner 1 / sqrt(v) does "
            "not commute with projecting onto the target gradients. Use hydra_mode='full' (Adam tracked with its "
            "documented approximation), or train with SGD / momentum: "
            "optimizer_cls_and_kwargs=(torch.optim.SGD, {'momentum': 0.9}) or optim='sgd'."
        )
    raise TurnoverError(
        f"lean HYDRA follows torch.optim.SGD (with or without momentum); this run uses {type(optimizer).__name__}. "
        "Pass optimizer_cls_and_kwargs=(torch.optim.SGD, {...}) or optim='sgd'."
    )


class LeanTracker(HydraTracker):
    """A :class:`HydraTracker` whose table is a :class:`ProjectedHypergradients` onto fixed target gradients."""

    def __init__(self, model: nn.Module, example_ids: torch.Tensor, targets: torch.Tensor, **kwargs: Any) -> None:
        self._targets = targets
        super().__init__(model, example_ids, **kwargs)
        if targets.shape[1] != self.dim:
            raise ConfigMismatchError(f"target gradients have {targets.shape[1]} columns, the tracked parameters {self.dim}.")

    def _make_table(self, ids: torch.Tensor, storage_dir: Optional[PathLike], rebase_condition: float) -> Any:
        return ProjectedHypergradients(ids, self._targets, rebase_condition=rebase_condition)

    def _coefficients(self, optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, torch.Tensor]:
        check_lean_optimizer(optimizer)
        table: ProjectedHypergradients = self.table
        if table.groups is None:
            where = {id(p): spec for spec, p in zip(self.specs, self._params())}
            columns = []
            for group in optimizer.param_groups:
                specs = [where[id(p)] for p in group["params"] if id(p) in where]
                if specs:
                    columns.append(torch.cat([torch.arange(s.offset, s.offset + s.numel) for s in specs]))
            table.set_groups(columns)
        active = torch.zeros(self.dim, dtype=torch.bool)
        for spec in self.specs:
            if self._had_grad.get(spec.name, True):
                active[spec.offset : spec.offset + spec.numel] = True
        table.active = active
        return super()._coefficients(optimizer)

    def save(self, folder: PathLike) -> None:
        raise TurnoverError("lean HYDRA keeps projections onto one target set, not hypergradients: nothing to save.")
