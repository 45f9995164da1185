"""Turn-over influence scores: loss(target | flipped m(z)) - loss(target | m(z)), batched over (id, target) pairs.

Positive scores mean training example z helped the target (the sub-network that never saw z does worse).

For causal language models a target is a token sequence whose ``labels`` are its input ids with -100 on the
tokens that do not count (a prompt, padding); the loss is the shifted next-token cross-entropy, averaged
(``reduction="mean"``) or summed (``"sum"``) over the counted tokens, or kept per token (``"none"``: which target
tokens an example helped or hurt; they sum to the ``"sum"`` score).

Example:
    >>> targets = tokenizer(["a gripping film"], return_tensors="pt")
    >>> targets["labels"] = torch.tensor([1])
    >>> scores = influence(model, targets, example_ids=torch.arange(100))   # (100, 1)
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..context import instance_masks, state_of
from ..data import check_ids_known
from ..errors import TurnoverError
from ..layers import channel_logits
from ..losses import (
    IGNORE_INDEX,
    REDUCTIONS,
    eval_mode,
    find_labels,
    is_causal_lm,
    model_inputs,
    per_example_loss,
    per_token_loss,
    predicted_labels,
)
from ..masks import mask_for, scale_of
from ..prefix import PrefixReplay, closed_form_head, head_features, head_logits
from ..sites import inner_model
from .registry import Estimator

logger = logging.getLogger(__name__)


def _labels_of(model: nn.Module, targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
    labels = find_labels(targets)
    if labels is not None:
        return labels
    if is_causal_lm(model):  # a language model's target is its own text: every real token counts
        labels = torch.as_tensor(targets["input_ids"]).clone()
        if "attention_mask" in targets:
            labels[torch.as_tensor(targets["attention_mask"]) == 0] = IGNORE_INDEX
        return labels
    logger.info("targets carry no labels: scoring against the model's own predictions.")
    return predicted_labels(model, targets)


class TurnoverScorer(Estimator):
    """Scores (training id, target) pairs of a patched model, with the fastest exact path the model allows.

    Paths: ``"closed_form"`` (only the head's Linear is masked, on its inputs: all pairs from one matrix product),
    ``"prefix"`` (the layers below the lowest mask run once per target and are replayed for every mask; see
    :mod:`turnover_hf.prefix`), ``"batched"`` (every (id, target, mask-or-flip) row a full forward). A fast path
    is checked against the batched path on its first use and abandoned, with a warning, if they disagree.

    Causal LMs (PEFT-wrapped or not) score the shifted next-token loss of the counted tokens of each target; the
    logits are computed only from the first counted position on (``logits_to_keep``), which spares most of the
    vocabulary projection for a short completion after a long prompt.

    Example:
        >>> scorer = TurnoverScorer(model, batch_size=128)
        >>> scorer.path
        'prefix'
        >>> scores = scorer.scores(targets, labels, example_ids)     # (n_ids, n_targets)
    """

    def __init__(self, model: nn.Module, *, batch_size: int = 64, fast: bool = True) -> None:

        self.model = model
        self.state = state_of(model)
        self.batch_size = max(2, int(batch_size))
        self.device = next(model.parameters()).device
        self.causal_lm = is_causal_lm(model)
        self._inner = inner_model(model)
        # The head of a language model reads per-token features: no closed form.
        self._head = closed_form_head(model) if fast and not self.causal_lm else None
        self._replay = PrefixReplay.for_model(model) if fast and self._head is None else None
        self.path = "closed_form" if self._head else "prefix" if self._replay else "batched"
        self._verified = self.path == "batched"
        accepted = inspect.signature(self._inner.forward).parameters
        self._lm_trim = self.causal_lm and "logits_to_keep" in accepted
        self._forward_kwargs = {"use_cache": False} if "use_cache" in accepted else {}  # no cache: one pass only

    token_level = True

    def cache_key(self) -> dict[str, Any]:
        return masks_key(self.state.config)

    # -- public -------------------------------------------------------------------------------------------------
    def scores(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor, example_ids: torch.Tensor, *,
               reduction: str = "mean") -> torch.Tensor:
        """Influence of each id on each target, float32 ``(n_ids, n_targets)`` on the CPU.

        For token-level targets (language models) ``reduction`` says how the loss of a target's counted tokens is
        combined: ``"mean"``, ``"sum"``, or ``"none"`` for per-token scores ``(n_ids, n_targets, T)`` aligned with
        the target's tokens (0 on tokens that do not count).
        """
        if reduction not in REDUCTIONS:
            raise TurnoverError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
        inputs = model_inputs(targets, self.device)
        labels = labels.to(self.device)
        if reduction == "none" and labels.dim() != 2:
            raise TurnoverError(
                "reduction='none' gives per-token scores and needs token-level targets (labels of shape (n, T), as "
                f"for language models); these labels have shape {tuple(labels.shape)}."
            )
        example_ids = example_ids.to(self.device)
        if not self._verified:
            self._verify(inputs, labels, example_ids)
        with eval_mode(self.model), torch.no_grad():
            if self.path == "closed_form":
                out = self._closed_form_scores(inputs, labels, example_ids)
            else:
                out = self._row_scores(inputs, labels, example_ids, reduction=reduction)
        return out.float().cpu()

    def token_scores(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
        """Per-token influence ``(n_ids, n_targets, T)``: how each id changed the loss of each counted target token.

        Summed over tokens they give ``scores(..., reduction="sum")``.

        Example:
            >>> per_token = scorer.token_scores(targets, targets["labels"], ids)
            >>> per_token[0, 0, 5]     # > 0: training example ids[0] helped target 0 predict its token 5
        """
        return self.scores(targets, labels, example_ids, reduction="none")

    def self_scores(self, batch: Mapping[str, torch.Tensor], labels: torch.Tensor, example_ids: torch.Tensor, *,
                    reduction: str = "mean") -> torch.Tensor:
        """Self-influence: each training row (with its id) scored as its own target, float32 ``(n,)`` on the CPU."""
        inputs = model_inputs(batch, self.device)
        labels, example_ids = labels.to(self.device), example_ids.to(self.device)
        n = len(example_ids)
        with eval_mode(self.model), torch.no_grad():
            if self.path == "closed_form":
                features, _ = self._features(inputs)
                masks = self._masks(example_ids, features.dtype)
                return self._closed_form_losses(features, masks, labels).float().cpu()
            rows = torch.arange(2 * n, device=self.device)
            losses = self._losses(inputs, labels, rows // 2, example_ids[rows // 2], (rows % 2).bool(),
                                  reduction=reduction)
        return (losses[1::2] - losses[0::2]).float().cpu()

    # -- batched and prefix paths --------------------------------------------------------------------------------
    def _extra_kwargs(self, labels: torch.Tensor) -> dict:
        """Forward keywords: no KV cache; for causal LMs, logits only from just before the first counted token."""
        extra = dict(self._forward_kwargs)
        if self._lm_trim and labels.dim() == 2:
            counted = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
            first = int(counted[0]) if len(counted) else labels.shape[1] - 2  # position of the first predicting logit
            extra["logits_to_keep"] = max(2, labels.shape[1] - first)
        return extra

    def _row_loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
        if reduction == "none":
            return per_token_loss(logits, labels, shift=self.causal_lm)
        return per_example_loss(logits, labels, shift=self.causal_lm, reduction=reduction)

    def _losses(self, inputs, labels, row_target, row_ids, row_flip, replay=None, reduction="mean") -> torch.Tensor:
        """Loss of each row: target ``row_target[r]`` under example ``row_ids[r]``'s mask (flipped if ``row_flip``);
        ``(rows,)``, or ``(rows, T)`` per token with ``reduction="none"``."""
        extra = self._extra_kwargs(labels)
        shape = (len(row_target), labels.shape[1]) if reduction == "none" else (len(row_target),)
        out = torch.empty(shape, dtype=torch.float32, device=self.device)
        for start in range(0, len(row_target), self.batch_size):
            sl = slice(start, start + self.batch_size)
            rows = row_target[sl]
            batch = {k: v.index_select(0, rows) for k, v in inputs.items()}
            with contextlib.ExitStack() as stack:
                if replay is not None:
                    stack.enter_context(replay.replaying(rows))
                stack.enter_context(instance_masks(self.model, row_ids[sl], flipped=row_flip[sl]))
                logits = self.model(**batch, **extra).logits
            out[sl] = self._row_loss(logits, labels.index_select(0, rows), reduction)
        return out

    def _row_scores(self, inputs, labels, example_ids, replay_enabled: bool = True, reduction: str = "mean") -> torch.Tensor:
        n_ids, n_targets = len(example_ids), len(labels)
        replay = self._replay if replay_enabled else None
        # Targets go in chunks so that one chunk's recorded prefix and its rows stay modest in memory.
        chunk = max(1, min(n_targets, self.batch_size // 2)) if replay is not None else n_targets
        per_token = labels.shape[1:] if reduction == "none" else ()
        scores = torch.empty(n_ids, n_targets, *per_token, dtype=torch.float32, device=self.device)
        for t0 in range(0, n_targets, chunk):
            t1 = min(t0 + chunk, n_targets)
            part = {k: v[t0:t1] for k, v in inputs.items()}
            rows = torch.arange((t1 - t0) * n_ids * 2, device=self.device)
            row_target, rest = rows // (2 * n_ids), rows % (2 * n_ids)
            row_ids, row_flip = example_ids[rest // 2], (rest % 2).bool()
            with contextlib.ExitStack() as stack:
                if replay is not None:
                    stack.enter_context(replay.recorded(self.model, {**part, **self._extra_kwargs(labels[t0:t1])}))
                losses = self._losses(part, labels[t0:t1], row_target, row_ids, row_flip, replay, reduction)
            losses = losses.view(t1 - t0, n_ids, 2, *per_token)
            scores[:, t0:t1] = (losses[:, :, 1] - losses[:, :, 0]).transpose(0, 1)
        return scores

    # -- closed-form head path -----------------------------------------------------------------------------------
    def _features(self, inputs):

        return head_features(self.model, self._head, inputs)

    def _masks(self, example_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        site = self.state.sites[0]
        return mask_for(example_ids, site.name, site.channels * site.units, dtype=dtype, **self.state.config.mask_kwargs)

    def _closed_form_losses(self, features, masks, labels) -> torch.Tensor:
        """Per-row self-influence on the closed-form path: rows pair features[r] with masks[r]."""
        head = dict(self._inner.named_modules())[self._head]
        scale = scale_of(self.state.config.p)
        mask_logits, flip_logits = channel_logits(head, features, masks), channel_logits(head, features, scale - masks)
        return per_example_loss(flip_logits, labels) - per_example_loss(mask_logits, labels)

    def _closed_form_scores(self, inputs, labels, example_ids) -> torch.Tensor:

        head = dict(self._inner.named_modules())[self._head]
        features, _ = self._features(inputs)  # (T, d)
        scale = scale_of(self.state.config.p)
        n_targets = len(labels)
        scores = torch.empty(len(example_ids), n_targets, dtype=torch.float32, device=self.device)
        block = max(1, 2**22 // max(1, n_targets * head.out_features))  # ids per GEMM: bounded logits memory
        for start in range(0, len(example_ids), block):
            masks = self._masks(example_ids[start : start + block], features.dtype)
            both = head_logits(head, features, torch.cat([masks, scale - masks]))  # (2n, T, C)
            n = len(masks)
            flat_labels = labels.repeat(2 * n)
            losses = per_example_loss(both.reshape(2 * n * n_targets, -1), flat_labels).view(2, n, n_targets)
            scores[start : start + n] = losses[1] - losses[0]
        return scores

    # -- safety net ----------------------------------------------------------------------------------------------
    def _verify(self, inputs, labels, example_ids) -> None:
        """Compare the fast path with the batched definition on a few pairs; fall back to batched if they differ."""

        self._verified = True
        ids = example_ids[:3]
        part = {k: v[:2] for k, v in inputs.items()}
        with eval_mode(self.model), torch.no_grad():
            if self.path == "closed_form" and self._features(part)[0].dim() != 2:
                # The head reads per-token features (e.g. a decoder's `score`): replay the base model instead.
                self._head, self._replay = None, PrefixReplay.for_model(self.model)
                self.path = "prefix" if self._replay else "batched"
                if self._replay is None:
                    return
            reference = self._row_scores(part, labels[:2], ids, replay_enabled=False)
            try:
                fast = (self._closed_form_scores if self.path == "closed_form" else self._row_scores)(part, labels[:2], ids)
            except (RuntimeError, TurnoverError) as err:  # a module that cannot be replayed
                fast, problem = None, f"fails ({err})"
        if fast is not None:
            exact = next(self.model.parameters()).dtype == torch.float32
            # Scores are differences of losses of order 1: float32 reordering noise stays far below 1e-5.
            close = torch.allclose(fast, reference, atol=1e-5 if exact else 2e-2, rtol=1e-3 if exact else 5e-2)
            problem = None if close else f"disagrees with it (max diff {float((fast - reference).abs().max()):.3g})"
        if problem is not None:
            logger.warning(
                "the %s scoring path %s, checked against the plain batched definition on this model; "
                "falling back to the batched path.", self.path, problem,
            )
            self.path, self._head, self._replay = "batched", None, None


def influence(
    model: nn.Module,
    targets: Mapping[str, torch.Tensor],
    example_ids: Union[torch.Tensor, Sequence[int]],
    *,
    batch_size: int = 64,
    known_ids: Optional[torch.Tensor] = None,
    fast: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Turn-over influence of each training id on each target, a float32 tensor of shape ``(n_ids, n_targets)``.

    ``targets`` is a collated batch (``input_ids``, ``attention_mask``, ... and ``labels``; without labels the
    model's own predictions are used, and a causal LM's own input ids). Forwards hold up to ``batch_size`` (id,
    target, mask-or-flip) rows; with ``fast=True`` the lower layers below the masks are computed once per target
    (see :class:`TurnoverScorer`). For language-model targets ``reduction`` is ``"mean"`` or ``"sum"`` over the
    counted tokens, or ``"none"`` for per-token scores ``(n_ids, n_targets, T)``.

    Example:
        >>> scores = influence(model, collator([valid[0], valid[1]]), example_ids=train["example_id"])
        >>> scores[:, 0].topk(5).indices                    # rows of the 5 strongest proponents of target 0
    """
    state_of(model)
    example_ids = check_ids_known(torch.as_tensor(example_ids), known_ids)
    labels = _labels_of(model, targets)
    scorer = TurnoverScorer(model, batch_size=batch_size, fast=fast)
    return scorer.scores(targets, labels, example_ids, reduction=reduction)


def masks_key(config: Any) -> dict[str, Any]:
    """What of a turn-over config decides the scores (for resumable results): all but the recorded trainable set."""
    return {k: v for k, v in config.to_dict().items() if k != "trainable_parameters"}
