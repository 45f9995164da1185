"""What a fit on the training set belongs to (the weights, the masks, the recorded training set), shared by the
estimators that fit once and save the fit beside a model (the influence function and its projected form)."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from torch import nn

from ..config import MASK_FIELDS
from ..context import state_of
from ..errors import ConfigMismatchError, StaleFitError, TurnoverError
from ..fingerprints import weights_fingerprint
from ..training_set import training_set_of


class FittedOnModel:
    """Mixin of a scorer with ``model`` and ``patched``: the identity a fit made now carries."""

    model: nn.Module
    patched: bool

    def mask_fields(self) -> Optional[dict[str, Any]]:
        """The turn-over config fields that decide the training masks (None for a model without masks)."""
        if not self.patched:
            return None
        config = state_of(self.model).config.to_dict()
        return {name: config[name] for name in MASK_FIELDS}

    def weights_fingerprint(self) -> str:
        return weights_fingerprint(self.model)

    def identity(self) -> dict[str, Optional[str]]:
        """What a fit made now belongs to: these weights, and the training set recorded on the model (if any)."""
        record = training_set_of(self.model) if self.patched else None
        return {"weights_fingerprint": self.weights_fingerprint(),
                "training_set_fingerprint": None if record is None else record.fingerprint}


def saved_parameters(model: nn.Module, meta: Mapping[str, Any], folder: str, what: str) -> list[str]:
    """The tracked parameter names a saved fit lists (``meta["parameters"]``), refused when ``model`` lacks one or
    its shape differs."""
    named = dict(model.named_parameters())
    bad = [p["name"] for p in meta["parameters"] if p["name"] not in named or list(named[p["name"]].shape) != p["shape"]]
    if bad:
        raise ConfigMismatchError(
            f"the model lacks the parameters {bad[:5]} of the {what} in {os.fspath(folder)!r} (or their shapes "
            "differ): load it with the model it was fitted on."
        )
    return [p["name"] for p in meta["parameters"]]


def check_saved_fit(scorer: FittedOnModel, meta: Mapping[str, Any], folder: str, what: str, refit: str) -> None:
    """Refuse a saved fit (its metadata ``meta``) that belongs to other masks, weights or training set than
    ``scorer``'s model; ``what`` names the fit, ``refit`` says how to fit again."""
    folder = os.fspath(folder)
    if scorer.mask_fields() != meta.get("turnover_config"):
        raise ConfigMismatchError(
            f"the {what} in {folder!r} was fitted on a model with turn-over config {meta.get('turnover_config')}, "
            f"this one has {scorer.mask_fields()}: the training gradients depend on the masks. Fit again with this "
            "model."
        )
    if scorer.weights_fingerprint() != meta["weights_fingerprint"]:
        raise StaleFitError(
            f"the model's weights differ from those the {what} in {folder!r} was fitted on; its factors would "
            f"belong to another model. {refit}"
        )
    record = training_set_of(scorer.model) if scorer.patched else None
    fitted_on = meta.get("training_set_fingerprint")
    if record is not None and fitted_on is not None and fitted_on != record.fingerprint:
        raise StaleFitError(
            f"the {what} in {folder!r} was fitted on another training set (fingerprint {fitted_on[:12]}) than the "
            f"model was trained on ({record.fingerprint[:12]}). Fit again on the model's training set."
        )


def refuse_changed_options(folder: str, saved: Mapping[str, Any], asked: Mapping[str, Any], what: str) -> None:
    """Refuse options the user set (``asked``: those that decide the fit and differ from their defaults) that the
    saved fit in ``folder`` (its metadata ``saved``) was not fitted with: loading it would silently ignore them."""
    changed = sorted(k for k, v in asked.items() if k not in saved or saved[k] != v)
    if changed:
        raise TurnoverError(
            f"{folder!r} holds a fitted {what}; options {changed} would change it (it was fitted with "
            f"{', '.join(f'{k}={saved.get(k)!r}' for k in changed)}). Drop them, or remove that folder (or pass "
            "another state_dir) to fit again."
        )
