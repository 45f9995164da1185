"""Carries ``example_ids`` and the mask mode from a trainer or pipeline to the masked layers of one model.

A patched model owns one :class:`MaskState`; every masked layer reads it. :func:`instance_masks` sets it for the
duration of a forward (and backward) pass.

Example:
    >>> with instance_masks(model, batch_example_ids, mode="flip"):
    ...     logits = model(**inputs).logits       # each row under its example's flipped mask
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal, Optional, Union

import torch
from torch import nn

from .config import TurnoverConfig
from .errors import ExampleIdError, MissingExampleIdsError, NotPatchedError
from .masks import check_example_ids, mask_for

Mode = Literal["train", "flip", "off"]
MODES: tuple[str, ...] = ("train", "flip", "off")


class MaskState:
    """The mask state of one patched model: the config that decides the masks, the mask sites and hooks the patch
    made (to find and to remove them), and for the current forward the ids, which rows are flipped and the mode.

    What higher layers keep about a model (its training-set record, fitted estimators, the folder it came from)
    lives on the model itself (:func:`patched_root`), owned by those layers."""

    def __init__(self, config: TurnoverConfig, sites: Optional[list[Any]] = None,
                 handles: Optional[list[Any]] = None) -> None:
        self.config = config
        self.sites: list[Any] = list(sites or [])  # turnover_hf.sites.MaskSite, one per masked module
        self.handles: list[Any] = list(handles or [])  # torch hook handles (RemovableHandle)
        self.example_ids: Optional[torch.Tensor] = None
        self.flipped: Union[bool, torch.Tensor] = False
        self.mode: Optional[str] = None  # None: no context open
        self.broadcast_batch = False  # scoring may feed one target row that the first mask widens to B rows
        self._cache: dict[tuple[str, int, torch.device, torch.dtype], torch.Tensor] = {}

    def mask(self, layer_key: str, units: int, like: torch.Tensor, module_training: bool) -> Optional[torch.Tensor]:
        """The (B, units) masks for the open context, in ``like``'s device and dtype; None = full network."""
        mode = self.mode
        if mode is None:
            if module_training:
                raise MissingExampleIdsError(
                    "a batch reached a turn-over model in training mode without example_ids. Train with "
                    "TurnoverTrainer and InstanceIdCollator, or wrap the forward in "
                    "`with turnover_hf.instance_masks(model, example_ids):`; call model.eval() for full-network inference."
                )
            return None
        if mode == "off":
            return None
        key = (layer_key, units, like.device, like.dtype)
        cached = self._cache.get(key)
        if cached is None:
            ids = self.example_ids.to(like.device)
            flipped = self.flipped.to(like.device) if isinstance(self.flipped, torch.Tensor) else self.flipped
            cached = mask_for(ids, layer_key, units, flipped=flipped, dtype=like.dtype, **self.config.mask_kwargs)
            self._cache[key] = cached
        return cached


def patched_root(model: nn.Module) -> nn.Module:
    """The module of a patched model that owns its :class:`MaskState`, looking through wrappers (DDP, accelerate,
    compile); higher layers keep their per-model attributes (``turnover_*``) on it."""
    seen = model
    for _ in range(8):
        if isinstance(getattr(seen, "turnover_state", None), MaskState):
            return seen
        inner = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if inner is None:
            break
        seen = inner
    raise NotPatchedError(
        f"{type(model).__name__} carries no turn-over dropout. Patch it first: "
        "`model = turnover_hf.patch_model(model, turnover_hf.TurnoverConfig())`, or load an influence-ready "
        "checkpoint with `turnover_hf.load_influence_ready(path)`."
    )


def state_of(model: nn.Module) -> MaskState:
    """The :class:`MaskState` of a patched model, looking through wrappers (DDP, accelerate, compile)."""
    return patched_root(model).turnover_state


@contextlib.contextmanager
def instance_masks(
    model: nn.Module,
    example_ids: Optional[torch.Tensor] = None,
    mode: Mode = "train",
    *,
    flipped: Optional[torch.Tensor] = None,
    broadcast_batch: bool = False,
) -> Iterator[MaskState]:
    """Run the model under each example's own mask (``"train"``), its flipped mask (``"flip"``) or none (``"off"``).

    ``flipped`` (a bool tensor, one entry per id) overrides ``mode`` row by row, so one forward can hold both
    masks of many examples. Keep the context open across ``backward`` when gradient checkpointing recomputes
    the forward pass.

    Example:
        >>> with instance_masks(model, torch.tensor([4, 9]), mode="train"):
        ...     loss = model(**inputs, labels=labels).loss
        ...     loss.backward()
    """
    state = state_of(model)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if mode != "off":
        if example_ids is None:
            raise MissingExampleIdsError(
                f"mode={mode!r} needs example_ids (one id per row of the batch); pass them or use mode='off'."
            )
        try:
            example_ids = check_example_ids(example_ids)
        except ValueError as err:
            raise ExampleIdError(str(err)) from None
        if flipped is not None:
            flipped = torch.as_tensor(flipped, dtype=torch.bool)
            if flipped.shape != example_ids.shape:
                raise ExampleIdError(f"flipped has shape {tuple(flipped.shape)}, expected {tuple(example_ids.shape)}.")
    if state.mode is not None:
        raise RuntimeError("instance_masks contexts of one model cannot be nested.")
    state.example_ids = example_ids
    state.flipped = flipped if flipped is not None else (mode == "flip")
    state.mode = mode
    state.broadcast_batch = broadcast_batch
    state._cache = {}
    try:
        yield state
    finally:
        state.example_ids, state.flipped, state.mode, state.broadcast_batch = None, False, None, False
        state._cache = {}
