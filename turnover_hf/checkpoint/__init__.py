"""Influence-ready checkpoints: HF weights + ``turnover_config.json`` + training-set record + model card (+ the
estimators' saved states); :mod:`.save` writes them as one consistent folder, :mod:`.load` re-creates identical masks.

Example:
    >>> model.save_pretrained("out")                    # a patched model: weights, adapters, turnover_config.json
    >>> model = load_influence_ready("out")             # re-patched, bit-identical masks
    >>> model.push_to_hub("me/my-influence-ready-model")
"""

from ..patcher import register_model_mixin
from .load import load_influence_ready, model_class_of, resolve_checkpoint
from .save import (
    InfluenceReadyMixin,
    finish_interrupted_save,
    push_influence_ready,
    save_influence_ready,
    write_model_card,
)

register_model_mixin(InfluenceReadyMixin)  # every patched model saves influence-ready folders

__all__ = [
    "InfluenceReadyMixin",
    "finish_interrupted_save",
    "load_influence_ready",
    "model_class_of",
    "push_influence_ready",
    "resolve_checkpoint",
    "save_influence_ready",
    "write_model_card",
]
