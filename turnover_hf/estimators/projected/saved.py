"""The projected influence function's file format: JSON metadata, the curvature and the projections as
safetensors, and the stored gradients as plain ``.npy`` arrays, read back only for the model it was fitted on."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...errors import ConfigMismatchError, StaleFitError
from ...files import PathLike, atomic_path, atomic_write_text, read_format_meta
from ..fitted import check_saved_fit, saved_parameters
from .gradient_store import RowStore, ids_name
from .projection import CoordinateSelection, LayerProjection, layer_shapes

FORMAT = "turnover-hf/projected-influence"
FORMAT_VERSION = 1
META_NAME = "projected.json"
TENSORS_NAME = "projected_curvature.safetensors"
PROJECTED_DIR = "projected"  # beside a saved model: where InfluencePipeline looks for a fit
# options that decide the fit (a saved fit is refused when one differs); the rest only change how it is used
FIT_OPTIONS = ("projection_dim", "projection_seed", "design", "side_dim", "basis_examples", "damping_factor",
               "curvature", "training_masks", "parameters", "label_samples", "curvature_classes")


def save_fit(scorer: Any, folder: PathLike) -> None:
    """Write ``scorer``'s fit to ``folder``: the gradient store (copied unless it is already there), the curvature
    and projections, then the JSON metadata last; each file atomically."""
    store = scorer._fitted()
    if scorer.fit_identity["weights_fingerprint"] != scorer.weights_fingerprint():
        raise StaleFitError(
            "the model's weights changed since this influence function was fitted (further training?); saving it "
            "would label an old fit with the new weights. Fit again, then save."
        )
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    if os.path.realpath(store.folder) != os.path.realpath(folder):
        for name in store.files:
            for each in (name, ids_name(name)):
                with atomic_path(os.path.join(folder, each)) as tmp:
                    shutil.copyfile(os.path.join(store.folder, each), tmp)
    tensors = {"curvature": scorer.curvature}
    for i, layer in enumerate(scorer.layers):
        if layer.inputs is not None:
            tensors[f"inputs.{i}"] = layer.inputs
        if layer.outputs is not None:
            tensors[f"outputs.{i}"] = layer.outputs
    if isinstance(scorer.grads.reducer, CoordinateSelection):
        tensors["selection"] = scorer.grads.reducer.index
    with atomic_path(os.path.join(folder, TENSORS_NAME)) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "score": "(P g_t)^T (P G P^T + lambda I)^-1 (P g_z) / N, G the Gauss-Newton matrix of the training loss "
                 "(curvature 'diagonal': the diagonal of P G P^T)",
        "parameters": [{"name": s.name, "shape": list(s.shape)} for s in scorer.specs],
        "layers": [{"name": layer.name, "weight": layer.weight, "bias": layer.bias, "in_dim": layer.in_dim,
                    "out_dim": layer.out_dim} for layer in scorer.layers],
        "dim": scorer.dim,
        "projection_dim": scorer.projection_dim,
        "projection_seed": scorer.projection_seed,
        "design": scorer.design,
        "side_dim": scorer.side_dim,
        "basis_examples": scorer.basis_examples,
        "damping_factor": scorer.damping_factor,
        "curvature": scorer.curvature_form,
        "training_masks": scorer.training_masks,
        "damping": scorer.damping,
        "label_samples": scorer.label_samples,
        "curvature_classes": scorer.curvature_classes,
        "num_examples": len(store),
        "gradient_files": store.files,
        "id_column": scorer.id_column,
        "turnover_config": scorer.mask_fields(),
        **scorer.fit_identity,
    }
    atomic_write_text(os.path.join(folder, META_NAME), json.dumps(meta, indent=2) + "\n")


def read_fit_meta(folder: PathLike) -> dict[str, Any]:
    """The checked metadata of a saved projected fit."""
    return read_format_meta(folder, META_NAME, FORMAT, FORMAT_VERSION, "fitted projected influence function")


def load_fit(scorer_class: Any, model: nn.Module, folder: PathLike, **kwargs: Any) -> Any:
    """A ``scorer_class`` scorer holding the fit in ``folder``, for the model (weights, masks, training set) it was
    fitted on only. ``kwargs``: options that do not change the fit (``batch_size``, ``normalise``, ...)."""
    folder = os.fspath(folder)
    meta = read_fit_meta(folder)
    scorer = scorer_class(model, parameters=saved_parameters(model, meta, folder, "projected influence function"),
                          projection_dim=meta["projection_dim"], projection_seed=meta["projection_seed"],
                          design=meta["design"], side_dim=meta["side_dim"],
                          basis_examples=meta.get("basis_examples", 2048),
                          damping_factor=meta["damping_factor"], curvature=meta.get("curvature", "full"),
                          training_masks=meta.get("training_masks", True),
                          label_samples=meta["label_samples"],
                          curvature_classes=meta.get("curvature_classes", "exact"),  # fits before it: exact
                          id_column=meta["id_column"], **kwargs)
    check_saved_fit(scorer, meta, folder, "projected influence function",
                    "Fit again (remove that folder, or pass another one).")
    fitted_on = meta.get("training_set_fingerprint")
    tensors = load_file(os.path.join(folder, TENSORS_NAME))
    if scorer.design == "eigen":  # the sides were found from the training data: take the saved ones
        scorer._use_layers(*saved_eigen_layers(scorer, tensors, folder))
    for i, layer in enumerate(scorer.layers):  # the projections the fit used (regenerated ones must agree)
        for side in ("inputs", "outputs"):
            saved, here = tensors.get(f"{side}.{i}"), getattr(layer, side)
            if (saved is None) != (here is None) or (saved is not None and not torch.equal(saved, here)):
                raise ConfigMismatchError(
                    f"the {side} projection of {layer.name!r} in {folder!r} differs from this version's; fit again."
                )
    curvature = tensors["curvature"]
    expected = (scorer.dim,) if scorer.curvature_form == "diagonal" else (scorer.dim, scorer.dim)
    if curvature.shape != expected:
        raise ConfigMismatchError(f"{TENSORS_NAME} holds a curvature of shape {tuple(curvature.shape)}, expected "
                                  f"{expected} ({scorer.curvature_form} curvature); fit again.")
    store = RowStore(folder, meta["gradient_files"], scorer.dim)
    if len(store) != meta["num_examples"]:
        raise ConfigMismatchError(f"{folder!r} stores {len(store)} gradients; its metadata says {meta['num_examples']}.")
    scorer._set_fit(store, curvature)
    scorer.fit_identity = {"weights_fingerprint": meta["weights_fingerprint"], "training_set_fingerprint": fitted_on}
    return scorer


def saved_eigen_layers(scorer: Any, tensors: dict[str, torch.Tensor], folder: str
                       ) -> tuple[list[LayerProjection], CoordinateSelection]:
    """The eigen design's saved sides and selection, checked against the model's tracked layers."""
    layers = []
    for i, (name, weight, bias, transposed, in_features, out_features) in enumerate(layer_shapes(scorer.model,
                                                                                               scorer.specs)):
        inputs, outputs = tensors.get(f"inputs.{i}"), tensors.get(f"outputs.{i}")
        if (inputs is None or outputs is None or inputs.shape[1] != in_features or outputs.shape[1] != out_features
                or inputs.shape[0] > scorer.side_dim or outputs.shape[0] > scorer.side_dim):
            raise ConfigMismatchError(
                f"{folder!r} holds no eigen projection of {name!r} for this model's layer ({out_features} x "
                f"{in_features}); it was fitted on another model. Fit again."
            )
        layers.append(LayerProjection(name, None if weight is None else weight.name, None if bias is None else bias.name,
                                      in_features, out_features, inputs, outputs, transposed))
    selection = tensors.get("selection")
    total = sum(layer.dim for layer in layers)
    if selection is None or selection.dim() != 1 or len(selection) != scorer.dim or (
            len(selection) and (int(selection.min()) < 0 or int(selection.max()) >= total)):
        raise ConfigMismatchError(f"{folder!r} holds no valid coordinate selection for {scorer.dim} coordinates; fit again.")
    return layers, CoordinateSelection(selection)
