"""Gradient-based peers of turn-over influence on the same model: exact in-house estimators and optional bridges.

In-house, exact, for binary classifiers whose trainable layers are ``nn.Linear`` modules that see one row per
example (a head on frozen features; a bottleneck adapter on one token, see :mod:`.cached`):

* :func:`margin_factors`: per example and layer, the gradient of the logit margin ``z0 - z1`` with respect to the
  layer's output (``g``) and the layer's input (``x``, with a column of ones when the bias is trained). The
  margin gradients of two examples then have the inner product ``sum_l (g_a . g_b) (x_a . x_b)``, so every
  kernel below is a sum of small matrix products, never an N x P matrix of per-example gradients.
* :func:`gradient_dot` (``grad L(z) . grad L(t)``), TracIn (its sum over checkpoints, weighted by the learning
  rate) and :func:`gauss_newton_influence` (``grad L(t)^T (G + lambda I)^-1 grad L(z) / N`` with the exact
  Gauss-Newton matrix, inverted through the N x N kernel with Woodbury's identity).

Optional peers, imported only when called (``pip install turnover-hf[bench]``): :func:`captum_tracin` (Captum's
``TracInCP`` and ``TracInCPFast``) and :class:`KronfluenceEKFAC` (Kronfluence's EK-FAC influence).

Sign convention everywhere: positive = the training example lowers the target's loss (a proponent).

Example:
    >>> train = margin_factors(lambda rows: head(x[rows], masks[rows]), len(x), layers, y)
    >>> targets = margin_factors(lambda rows: head(vx[rows]), len(vx), layers, vy)
    >>> scores = gauss_newton_influence(train, targets, damping_factor=0.1)      # (N, T)
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..files import atomic_path, atomic_write_text
from ..layers import OutputMaskHook


@dataclass
class MarginFactors:
    """What the per-example margin gradients of a set of Linear layers are built from (see the module docstring)."""

    grads: list[torch.Tensor]  # per layer (B, out): d margin / d layer output
    inputs: list[torch.Tensor]  # per layer (B, in [+1]): the layer input, with ones when the bias is trained
    residual: torch.Tensor  # (B,) p0 - y0: the loss gradient is residual * margin gradient
    curvature: torch.Tensor  # (B,) p0 * p1: the Gauss-Newton weight of the margin

    def __len__(self) -> int:
        return len(self.residual)

    @property
    def n_params(self) -> int:
        """How many parameters the factors cover (weights and trained biases)."""
        return sum(g.shape[1] * x.shape[1] for g, x in zip(self.grads, self.inputs))


def _rows(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """``(B, features)`` from a layer's ``(B, features)`` or ``(B, 1, features)`` tensor."""
    if tensor.dim() == 3 and tensor.shape[1] == 1:
        return tensor[:, 0]
    if tensor.dim() != 2:
        raise ValueError(
            f"layer {name} sees a tensor of shape {tuple(tensor.shape)}: the factorised gradients need one row per "
            "example (B, features)."
        )
    return tensor


def margin_factors(
    forward: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    layers: Sequence[nn.Linear],
    labels: torch.Tensor,
    *,
    batch_size: int = 512,
) -> MarginFactors:
    """Margin-gradient factors of ``n`` examples for ``layers``, from batched forwards and one backward each.

    ``forward(rows)`` returns the ``(len(rows), 2)`` logits of the row positions ``rows`` under whatever masks the
    caller wants (their own instance masks for training examples, none for targets). Each layer's gradient is
    taken with respect to its raw output (before any output mask, which then enters through the chain rule).

    Example:
        >>> factors = margin_factors(lambda r: head(x[r], masks[r]), len(x), [head.hidden, head.out], y)
    """
    layers = list(layers)
    for layer in layers:
        if not isinstance(layer, nn.Linear) or not layer.weight.requires_grad:
            raise ValueError(f"margin_factors tracks trainable nn.Linear layers only, got {layer!r}.")
    grads: list[list[torch.Tensor]] = [[] for _ in layers]
    inputs: list[list[torch.Tensor]] = [[] for _ in layers]
    residual, curvature = [], []
    for start in range(0, n, batch_size):
        rows = torch.arange(start, min(start + batch_size, n))
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def keeper(i: int, store: dict = seen):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                store[i] = (args[0].detach(), output)

            return hook

        # prepend: run before any output-mask hook, so the gradient is taken at the raw output
        handles = [layer.register_forward_hook(keeper(i), prepend=True) for i, layer in enumerate(layers)]
        try:
            with torch.enable_grad():
                logits = forward(rows)
                if logits.dim() != 2 or logits.shape[1] != 2:
                    raise ValueError(f"margin_factors is written for binary logits (B, 2), got {tuple(logits.shape)}.")
                outputs = [seen[i][1] for i in range(len(layers))]
                margin = logits[:, 0] - logits[:, 1]
                out_grads = torch.autograd.grad(margin.sum(), outputs)
        finally:
            for handle in handles:
                handle.remove()
        for i, layer in enumerate(layers):
            x = _rows(seen[i][0], str(i)).double()
            if layer.bias is not None and layer.bias.requires_grad:
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
            inputs[i].append(x)
            grads[i].append(_rows(out_grads[i], str(i)).double())
        probs = torch.softmax(logits.detach().double(), dim=-1)
        residual.append(probs[:, 0] - (labels[rows] == 0).double())
        curvature.append(probs[:, 0] * probs[:, 1])
    return MarginFactors(
        [torch.cat(g) for g in grads], [torch.cat(x) for x in inputs], torch.cat(residual), torch.cat(curvature)
    )


def margin_kernel(a: MarginFactors, b: MarginFactors) -> torch.Tensor:
    """``(len(a), len(b))`` inner products of margin gradients, float64."""
    return sum((ga @ gb.T) * (xa @ xb.T) for ga, xa, gb, xb in zip(a.grads, a.inputs, b.grads, b.inputs))


def paired_margin_kernel(a: MarginFactors, b: MarginFactors) -> torch.Tensor:
    """The diagonal of :func:`margin_kernel` for row-aligned ``a`` and ``b``, ``(B,)``."""
    return sum((ga * gb).sum(1) * (xa * xb).sum(1) for ga, xa, gb, xb in zip(a.grads, a.inputs, b.grads, b.inputs))


def gradient_dot(train: MarginFactors, targets: MarginFactors, *, paired: bool = False) -> torch.Tensor:
    """``grad L(z) . grad L(t)``: ``(N, T)``, or ``(N,)`` for row-aligned pairs (self-influence), float32."""
    if paired:
        return (train.residual * targets.residual * paired_margin_kernel(train, targets)).float()
    return (train.residual[:, None] * margin_kernel(train, targets) * targets.residual[None, :]).float()


def gauss_newton_influence(
    train: MarginFactors, targets: MarginFactors, damping_factor: float, *, paired: bool = False
) -> torch.Tensor:
    """Exact damped Gauss-Newton influence ``grad L(t)^T (G + lambda I)^-1 grad L(z) / N``, ``(N, T)`` or ``(N,)``.

    ``G = (1/N) sum_z p0 p1 j_z j_z^T`` over the training examples, ``lambda = damping_factor x trace(G) / P``
    (a multiple of its mean eigenvalue). With the rows ``u_z = sqrt(p0 p1 / N) j_z``, Woodbury gives
    ``(G + lambda I)^-1 = (I - U^T (lambda I + U U^T)^-1 U) / lambda``: everything comes from N x N kernels.
    ``paired=True`` scores each training row against the row-aligned target (self-influence).

    Example:
        >>> self_influence = gauss_newton_influence(train, train_full_network, 0.1, paired=True)
    """
    n = len(train)
    k_train = margin_kernel(train, train)
    weight = (train.curvature / n).sqrt()
    damping = float(damping_factor * (train.curvature * k_train.diagonal()).mean() / train.n_params)
    system = damping * torch.eye(n, dtype=torch.float64) + weight[:, None] * k_train * weight[None, :]
    cross = margin_kernel(train, targets)  # (N, T): training gradients against target gradients
    solved = torch.linalg.solve(system, weight[:, None] * cross)
    inner = (cross - k_train @ (weight[:, None] * solved)) / damping
    scores = train.residual[:, None] * inner * targets.residual[None, :] / n
    return (scores.diagonal() if paired else scores).float()


# -- optional peers -------------------------------------------------------------------------------------------------
def masks_outside_linears(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Move output-mask hooks off the tracked Linears (into a wrapping Sequential); map old to new module names.

    Captum and Kronfluence take a layer's output gradient from hooks on the layer itself, i.e. after a mask that
    a forward hook applied to its output: that misses the mask factor, so dropped units would get gradients. With
    the mask on a wrapper the Linear's own output is the raw one and the chain rule is right.
    """
    modules = dict(model.named_modules())
    renamed: dict[str, str] = {}
    for name in names:
        layer = modules[name]
        hooks = {k: h for k, h in layer._forward_hooks.items() if isinstance(h, OutputMaskHook)}
        if not hooks:
            renamed[name] = name
            continue
        for key in hooks:
            del layer._forward_hooks[key]
        wrapper = nn.Sequential(layer)
        for hook in hooks.values():
            wrapper.register_forward_hook(hook)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, wrapper)
        renamed[name] = f"{name}.0"
    return renamed


def _frozen_biases_as_buffers(model: nn.Module, names: Sequence[str]) -> None:
    """Turn the frozen biases of the tracked Linears into buffers, so Captum does not make them trainable.

    Captum switches ``requires_grad`` on for every parameter of a tracked layer; a bias the model keeps frozen
    (e.g. one ``freeze_leaking`` froze) would then enter every gradient.
    """
    modules = dict(model.named_modules())
    for name in names:
        layer = modules[name]
        bias = getattr(layer, "bias", None)
        if isinstance(bias, nn.Parameter) and not bias.requires_grad:
            del layer.bias
            layer.register_buffer("bias", bias.detach().clone())


TRAINER_STATE = "trainer_state.json"
WEIGHTS = "model.safetensors"


def save_trainer_checkpoint(
    folder: str, state: Mapping[str, torch.Tensor], *, step: int, epoch: float, learning_rate: float
) -> str:
    """Write ``state`` as a Trainer-style checkpoint ``folder/checkpoint-{step}`` (weights + trainer_state.json).

    Returns the checkpoint's path. :func:`captum_tracin` reads these, and the checkpoints ``transformers.Trainer``
    writes (``model.safetensors`` and the learning rate logged in ``trainer_state.json``).

    Example:
        >>> path = save_trainer_checkpoint("runs/x", model.state_dict(), step=320, epoch=5, learning_rate=1e-3)
    """
    from safetensors.torch import save_file

    path = os.path.join(folder, f"checkpoint-{step}")
    os.makedirs(path, exist_ok=True)
    with atomic_path(os.path.join(path, WEIGHTS)) as tmp:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, tmp)
    trainer_state = {
        "global_step": step, "epoch": epoch, "log_history": [{"step": step, "epoch": epoch, "learning_rate": learning_rate}],
    }
    atomic_write_text(os.path.join(path, TRAINER_STATE), json.dumps(trainer_state, indent=2) + "\n")
    return path


def load_trainer_checkpoint(model: nn.Module, path: str, renamed: Mapping[str, str] | None = None) -> float:
    """Load a Trainer-style checkpoint's weights into ``model``; return the learning rate it last logged.

    Weights are read with safetensors (never ``torch.load``); missing keys keep their values (frozen parts),
    unknown keys are an error. ``renamed`` maps module names of the checkpoint to those of ``model``.
    """
    from safetensors.torch import load_file

    state = load_file(os.path.join(path, WEIGHTS))
    if renamed:
        moved = {}
        for key, value in state.items():
            module, _, param = key.rpartition(".")
            moved[f"{renamed.get(module, module)}.{param}"] = value
        state = moved
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise KeyError(f"checkpoint {path!r} holds weights the model does not have: {unexpected[:3]}.")
    with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as handle:
        history = json.load(handle).get("log_history", [])
    rates = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    if not rates:
        raise ValueError(f"{path!r}/{TRAINER_STATE} logs no learning_rate; TracIn weights checkpoints by it.")
    return float(rates[-1])


def captum_tracin(
    model: nn.Module,
    train_rows: torch.utils.data.Dataset,
    checkpoints: Sequence[str],
    target_rows: torch.utils.data.Dataset | None,
    *,
    layers: Sequence[str] | None = None,
    final_layer: str | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Captum's TracInCP (``layers``) or TracInCPFast (``final_layer``): ``(N, T)`` scores or ``(N,)`` self-influence.

    Rows are tuples ``(*model_inputs, label)``: ``model(*inputs)`` gives the logits. ``checkpoints`` are
    Trainer-style folders (see :func:`save_trainer_checkpoint`), weighted by the learning rate they logged. The
    loss is the summed cross-entropy (Captum's per-sample gradients need a reduced loss). Runs on a deep copy
    (Captum switches ``requires_grad`` on for every parameter of the tracked layers). ``target_rows=None`` returns
    Captum's self-influence (each training row's gradient against itself).

    Example:
        >>> scores = captum_tracin(model, train_rows, paths, target_rows, layers=["hidden", "out"])
    """
    if (layers is None) == (final_layer is None):
        raise ValueError("pass either layers (TracInCP) or final_layer (TracInCPFast).")
    with warnings.catch_warnings():
        # Captum announces that it turns gradients on for the tracked layers and the float inputs (and not the ids).
        for message in ("Setting required grads", "Input Tensor", "Gradients cannot be activated"):
            warnings.filterwarnings("ignore", message=message)
        return _captum_tracin(model, train_rows, checkpoints, target_rows, layers, final_layer, batch_size)


def _captum_tracin(model, train_rows, checkpoints, target_rows, layers, final_layer, batch_size) -> torch.Tensor:
    from captum.influence import TracInCP, TracInCPFast

    model = copy.deepcopy(model).eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    if layers is not None:
        renamed = masks_outside_linears(model, list(layers))
        _frozen_biases_as_buffers(model, list(renamed.values()))
        tracin = TracInCP(
            model, train_rows, list(checkpoints), lambda m, path: load_trainer_checkpoint(m, path, renamed),
            layers=list(renamed.values()), loss_fn=loss_fn, batch_size=batch_size, sample_wise_grads_per_batch=True,
        )
    else:
        _frozen_biases_as_buffers(model, [final_layer])
        tracin = TracInCPFast(
            model, dict(model.named_modules())[final_layer], train_rows, list(checkpoints), load_trainer_checkpoint,
            loss_fn=loss_fn, batch_size=batch_size,
        )
    if target_rows is None:
        return tracin.self_influence(show_progress=False).detach().float()
    loader = torch.utils.data.DataLoader(target_rows, batch_size=len(target_rows))
    batch = tuple(next(iter(loader)))
    return tracin.influence(batch, show_progress=False).detach().T.float()


class KronfluenceEKFAC:
    """Kronfluence's EK-FAC influence on a model's tracked Linear layers: fit factors once, then score.

    Rows are tuples ``(*model_inputs, label)`` as for :func:`captum_tracin`. Factors are fitted on the training
    loss with labels sampled from the model (Kronfluence's true Fisher; ``seed`` fixes them); damping is
    Kronfluence's heuristic (0.1 x the mean eigenvalue). Scores follow this package's sign (positive = the example
    lowers the target loss). The model is deep-copied; output masks move off the tracked Linears (see
    :func:`captum_tracin`). A tracked Linear's bias is part of the influence even if the model keeps it frozen.

    Example:
        >>> ekfac = KronfluenceEKFAC(model, train_rows, tracked=["hidden", "out"])
        >>> ekfac.scores(target_rows).shape, ekfac.self_scores().shape
        (torch.Size([2000, 200]), torch.Size([2000]))
    """

    def __init__(
        self,
        model: nn.Module,
        train_rows: torch.utils.data.Dataset,
        *,
        tracked: Sequence[str] | None = None,
        batch_size: int = 256,
        output_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments
        from kronfluence.task import Task

        model = copy.deepcopy(model).eval()
        names = list(masks_outside_linears(model, list(tracked)).values()) if tracked is not None else None

        class RowsTask(Task):
            def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
                *inputs, labels = batch
                logits = model(*inputs)
                if sample:
                    with torch.no_grad():
                        labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
                return F.cross_entropy(logits, labels, reduction="sum")

            def compute_measurement(self, batch, model) -> torch.Tensor:
                *inputs, labels = batch
                return F.cross_entropy(model(*inputs), labels, reduction="sum")

            def get_influence_tracked_modules(self):
                return names

        # Kronfluence warns about torch's deprecated GradScaler spelling on every call; nothing to act on here.
        warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")
        self.train_rows, self.batch_size = train_rows, batch_size
        self._folder = None if output_dir is not None else tempfile.TemporaryDirectory()
        folder = output_dir if output_dir is not None else self._folder.name
        self.analyzer = Analyzer(
            "turnover_peer", prepare_model(model, RowsTask()), RowsTask(), cpu=True, disable_tqdm=True,
            output_dir=folder, log_level=logging.WARNING,
        )
        with torch.random.fork_rng(devices=[]):  # the sampled labels of the Fisher: reproducible, RNG left as it was
            torch.manual_seed(seed)
            self.analyzer.fit_all_factors(
                "ekfac", dataset=train_rows, per_device_batch_size=batch_size,
                factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True,
            )

    def self_scores(self) -> torch.Tensor:
        """EK-FAC self-influence of every training row, ``(N,)``."""
        from kronfluence.arguments import ScoreArguments

        self.analyzer.compute_self_scores(
            "self", "ekfac", train_dataset=self.train_rows, per_device_train_batch_size=self.batch_size,
            score_args=ScoreArguments(damping_factor=None), overwrite_output_dir=True,
        )
        return self.analyzer.load_self_scores("self")["all_modules"].float()

    def scores(self, target_rows: torch.utils.data.Dataset) -> torch.Tensor:
        """EK-FAC influence of every training row on every target row, ``(N, T)``."""
        from kronfluence.arguments import ScoreArguments

        self.analyzer.compute_pairwise_scores(
            "pairs", "ekfac", query_dataset=target_rows, train_dataset=self.train_rows,
            per_device_query_batch_size=64, per_device_train_batch_size=self.batch_size,
            score_args=ScoreArguments(damping_factor=None), overwrite_output_dir=True,
        )
        return self.analyzer.load_pairwise_scores("pairs")["all_modules"].T.float()

    def close(self) -> None:
        """Delete the factor files if they went to a temporary folder."""
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


def kronfluence_version() -> str | None:
    """Kronfluence's version, or None if it does not import."""
    try:
        from kronfluence.version import __version__
    except ImportError:
        return None
    return str(__version__)


def captum_version() -> str | None:
    """Captum's version, or None if it does not import."""
    try:
        import captum
    except ImportError:
        return None
    return str(captum.__version__)
