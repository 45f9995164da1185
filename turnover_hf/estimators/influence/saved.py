"""The influence function's file format: a fit saved as safetensors + JSON beside a model, and read back only for
the model (weights and masks) it was fitted on."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...errors import ConfigMismatchError, StaleFitError
from ...files import PathLike, atomic_path, atomic_write_text, read_format_meta
from ..fitted import check_saved_fit, saved_parameters
from .factorised import FactorisedFit, TrackedLayer
from .materialised import MaterialisedFit

logger = logging.getLogger(__name__)

FORMAT = "turnover-hf/influence-function"
FORMAT_VERSION = 3  # 2: adds "method" (and the factorised layout); 3: a factorised fit keeps S ("system"), not
# its Cholesky factor. Version-2 folders (factorised: the factor) and version-1 folders (materialised) still load.
META_NAME = "influence.json"
FACTORS_NAME = "influence_factors.safetensors"
INFLUENCE_DIR = "influence"  # beside a saved model: where InfluencePipeline looks for fitted factors
METHODS = ("factorised", "materialised")


def save_fit(scorer: Any, folder: PathLike) -> None:
    """Write ``scorer``'s fit to ``folder``: safetensors, then the JSON metadata last, each atomically."""
    factors = scorer._fitted()
    identity = getattr(scorer, "fit_identity", None) or scorer.identity()
    if identity["weights_fingerprint"] != scorer.weights_fingerprint():
        raise StaleFitError(
            "the model's weights changed since this influence function was fitted (further training?); saving it "
            "would label an old fit with the new weights. Fit again: scorer.fit(train_data), then save."
        )
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    with atomic_path(os.path.join(folder, FACTORS_NAME)) as tmp:
        save_file({k: v.contiguous() for k, v in factors.tensors().items()}, tmp)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "score": "g_t^T (G + lambda I)^-1 g_z / N, G the Gauss-Newton matrix of the training loss",
        "method": factors.method,
        "parameters": [{"name": s.name, "shape": list(s.shape)} for s in scorer.specs],
        "num_parameters": scorer.num_parameters,
        "sketch_dim": scorer.sketch_dim,
        "sketch_seed": scorer.sketch_seed,
        "damping_factor": scorer.damping_factor,
        "damping": factors.damping,
        "trace": factors.trace,
        "solver": factors.solver,
        "num_examples": factors.num_examples,
        "num_classes": int(factors.probabilities.shape[1]),
        "id_column": scorer.id_column,
        "turnover_config": scorer.mask_fields(),
        **identity,
    }
    if factors.method == "factorised":
        meta["layers"] = [layer.as_dict() for layer in factors.layers]
    atomic_write_text(os.path.join(folder, META_NAME), json.dumps(meta, indent=2) + "\n")


def read_fit_meta(folder: PathLike) -> dict[str, Any]:
    """The checked metadata of a saved fit (format versions 3, 2 and 1; the sketch's width and seed under the names
    ``sketch_dim`` / ``sketch_seed``, also where older files wrote ``projection_dim`` / ``projection_seed``)."""
    meta = _read_any_version(folder)
    for old, new in (("projection_dim", "sketch_dim"), ("projection_seed", "sketch_seed")):
        if old in meta:
            meta.setdefault(new, meta.pop(old))
    return meta


def _read_any_version(folder: PathLike) -> dict[str, Any]:
    try:
        return read_format_meta(folder, META_NAME, FORMAT, FORMAT_VERSION, "fitted influence function")
    except ConfigMismatchError as err:
        for version in (2, 1):
            try:
                meta = read_format_meta(folder, META_NAME, FORMAT, version, "fitted influence function")
            except ConfigMismatchError:
                continue
            return meta if version == 2 else {**meta, "method": "materialised"}
        raise err from None


def load_fit(scorer_class: Any, model: nn.Module, folder: PathLike, **kwargs: Any) -> Any:
    """A ``scorer_class`` scorer holding the fit in ``folder``, for the model it was fitted on only."""
    meta = read_fit_meta(folder)
    method = meta["method"]
    if method not in METHODS:
        raise ConfigMismatchError(f"{os.fspath(folder)!r} holds an influence fit of unknown method {method!r}.")
    factorised = method == "factorised"
    wanted = kwargs.pop("factorised", None)
    if wanted is not None and bool(wanted) != factorised:
        raise ConfigMismatchError(
            f"{os.fspath(folder)!r} holds a {method} influence fit, and factorised={wanted} asks for the other "
            "method. Drop factorised=..., or fit again in another folder."
        )
    names = saved_parameters(model, meta, folder, "saved influence function")
    scorer = scorer_class(model, parameters=names, damping_factor=meta["damping_factor"], sketch_dim=meta["sketch_dim"],
                 sketch_seed=meta["sketch_seed"], solver=meta["solver"], id_column=meta["id_column"],
                 max_memory_gb=math.inf, **kwargs)
    check_saved_fit(scorer, meta, folder, "influence function",
                    "Fit again: InfluenceFunctionScorer(model, train_data).fit().save(folder) (in another folder).")
    fitted_on = meta.get("training_set_fingerprint")
    scorer.fit_identity = {"weights_fingerprint": meta["weights_fingerprint"], "training_set_fingerprint": fitted_on}
    tensors = load_file(os.path.join(os.fspath(folder), FACTORS_NAME))
    if factorised:
        scorer.factors = _loaded_factorised(scorer, meta, tensors)
        return scorer.attached()
    scorer.factors = MaterialisedFit(
        tensors["example_ids"], tensors["labels"], tensors["probabilities"], tensors["classes"],
        tensors["class_gradients"], tensors["factor"], meta["solver"], float(meta["damping"]), float(meta["trace"]),
    )
    if scorer.factors.width != scorer.width:
        raise ConfigMismatchError(
            f"{FACTORS_NAME} holds gradients of {scorer.factors.width} coordinates, the metadata says {scorer.width}."
        )
    return scorer.attached()


def _loaded_factorised(scorer: Any, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> FactorisedFit:
    """The factorised fit of a saved folder, checked against this model's tracked Linear layers."""
    layers = [TrackedLayer(**layer) for layer in meta.get("layers", [])]
    if layers != scorer._layers:
        here = scorer._ineligible or f"it tracks {[x.as_dict() for x in scorer._layers]}"
        raise ConfigMismatchError(
            f"the saved factorised influence fit covers the Linear layers {[x.as_dict() for x in layers]}; in this "
            f"model {here}. Fit again with this model."
        )
    modules = dict(scorer.model.named_modules())
    deltas = [tensors[f"deltas.{i}"] for i in range(len(layers))]
    inputs = [tensors[f"inputs.{i}"] for i in range(len(layers))]
    n = len(tensors["example_ids"])
    for layer, delta, x in zip(layers, deltas, inputs):
        module = modules[layer.name]
        width = (module.in_features if layer.weight else 0) + int(layer.bias)
        if delta.shape[0] != n or x.shape != (n, width) or delta.shape[2] != module.out_features:
            raise ConfigMismatchError(
                f"{FACTORS_NAME} holds factors of shapes {tuple(delta.shape)} and {tuple(x.shape)} for "
                f"{layer.name!r}, which does not match the layer or the {n} examples."
            )
    # version 3 keeps S; a version-2 folder holds its factor instead
    return FactorisedFit(tensors["example_ids"], tensors["labels"], tensors["probabilities"], tensors["classes"],
                          layers, deltas, inputs, tensors.get("factor", torch.empty(0)), float(meta["damping"]),
                          float(meta["trace"]), system=tensors.get("system"))
