"""The estimator protocol and registry (re-exported by :mod:`turnover_hf.estimators`, which registers the
built-in estimators when imported)."""


from __future__ import annotations

import abc
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence, Union

import torch
from datasets import Dataset
from torch import nn

from ..errors import TurnoverError
from ..losses import predicted_labels

logger = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]


class Estimator(abc.ABC):
    """What the pipeline needs of an estimator: pairwise scores, self-scores, and a key for saved results.

    Shapes and costs, with N training examples scored, T targets, D tracked parameters, C classes, K members and
    P processes (the pipeline splits the training ids evenly over P processes and calls these per chunk):

    * :meth:`scores` ``(n_ids, T)`` and :meth:`member_scores` ``(K, n_ids, T)``;
    * :meth:`self_score_columns` ``(n, K)``: each training example against itself;
    * :meth:`prepare`: whatever must see the training set first (a curvature fit), called once before scoring;
    * :meth:`cache_key`: what a saved result depends on besides the weights, ids and targets (options, masks).

    Subclasses implement :meth:`scores` and :meth:`self_scores` (one batch); the rest has defaults for one model.

    Example:
        >>> class Zeros(Estimator):
        ...     def scores(self, targets, labels, example_ids): return torch.zeros(len(example_ids), len(labels))
        ...     def self_scores(self, batch, labels, example_ids): return torch.zeros(len(example_ids))
    """

    #: how many models' scores are averaged (an ensemble has several)
    num_members: int = 1
    #: True when :meth:`token_scores` gives per-token scores of causal language models
    token_level: ClassVar[bool] = False

    model: nn.Module
    device: torch.device

    @abc.abstractmethod
    def scores(self, targets: Batch, labels: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
        """``(n_ids, n_targets)`` influence of each training id on each target's loss (> 0: it helped)."""

    @abc.abstractmethod
    def self_scores(self, batch: Batch, labels: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
        """``(n,)`` influence of each training example (rows of ``batch``) on its own loss."""

    def prepare(self, train: Dataset, collator: Callable) -> bool:
        """Fit whatever must see the training set (model features with ids, and the collator that batches them)
        before scoring; True when something was fitted now (the pipeline then saves it, see :meth:`save`)."""
        return False

    def member_scores(self, targets: Batch, labels: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
        """``(K, n_ids, n_targets)``: every member's scores (K = 1 for one model)."""
        return self.scores(targets, labels, example_ids)[None]

    def self_score_columns(self, batches: Sequence[Batch]) -> torch.Tensor:
        """``(n, K)`` self-scores of the rows of several collated batches (with ``labels`` and ``example_ids``)."""
        return torch.cat([self.self_scores(b, b["labels"], b["example_ids"])[:, None] for b in batches])

    def predict(self, targets: Batch) -> torch.Tensor:
        """The labels targets without one are scored against: the full network's own predictions."""
        return predicted_labels(self.model, targets)

    def token_scores(self, targets: Batch, labels: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
        raise TurnoverError(f"{type(self).__name__} gives no per-token scores; use scores(...).")

    def cache_key(self) -> Any:
        """What a saved result depends on besides the weights, ids and targets."""
        return None

    def save(self, folder: Union[str, os.PathLike]) -> None:
        """Keep what :meth:`prepare` fitted in ``folder`` (nothing by default)."""


class EstimatorFallback(TurnoverError):
    """Raised by :meth:`Estimator.prepare` of an estimator ``auto`` chose when the training set shows it does not
    apply after all (e.g. its fit would exceed the memory budget): the pipeline builds the estimator ``name``
    instead and says why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{reason} Scoring with the {name!r} estimator instead.")
        self.name, self.reason = name, reason


@dataclass
class EstimatorContext:
    """Everything a registered builder may use to make an estimator for ``InfluencePipeline``."""

    models: list[nn.Module]
    path: Optional[str]                  # the checkpoint folder the models came from, if any
    num_train_examples: int              # rows of the training set the pipeline was given
    batch_size: int = 64
    fast: bool = True
    automatic: bool = False              # chosen by estimator="auto" (may then adapt, e.g. to a memory budget)
    options: Any = None                  # the estimator's options dataclass, or None for its defaults
    state_dirs: dict[str, str] = field(default_factory=dict)  # estimator name -> folder of its fitted state

    @property
    def model(self) -> nn.Module:
        return self.models[0]


@dataclass
class BuiltEstimator:
    """A builder's answer: the estimator, the id column its training set uses, and how many examples it expects
    (``None`` when unknown: then any training set size is accepted)."""

    estimator: Estimator
    id_column: str = "example_id"
    expected_examples: Optional[int] = None


@dataclass(frozen=True)
class EstimatorSpec:
    """One registered estimator."""

    name: str
    build: Callable[[EstimatorContext], BuiltEstimator]
    description: str                                 # one line: what it is (CLI help, logs)
    definition: str                                  # what one score means (reports)
    options_class: Optional[type] = None             # typed options dataclass (HfArgumentParser-friendly)
    auto: Optional[Callable[[EstimatorContext], Optional[str]]] = None  # a reason to pick it automatically, or None
    auto_priority: int = 100                         # lower is asked first by "auto"
    state_dir: Optional[str] = None                  # sub-folder of a checkpoint that holds its fitted state
    worth: str = ""                                  # what its scores are worth, as measured (demo, reports)
    low_self_influence: str = ""                     # what the lowest self-influence values mean
    one_model_caveat: str = ""                       # said beside scores of a single model (no ensemble)
    multi_model: bool = False                        # accepts several models (an ensemble)
    needs_masks: bool = False                        # scores only influence-ready (patched) checkpoints

    def options(self, given: Any) -> Any:
        """``given`` as this estimator's options dataclass (a mapping is checked field by field)."""
        if self.options_class is None:
            if given:
                names = set(given) if isinstance(given, Mapping) else {f.name for f in dataclasses.fields(given)}
                owners = [spec.name for spec in _REGISTRY.values() if spec.options_class is not None
                          and names & {f.name for f in dataclasses.fields(spec.options_class)}]
                raise TurnoverError(f"estimator {self.name!r} takes no options, got {given!r}"
                                    + (f" (options of {' and '.join(repr(o) for o in owners)})" if owners else "")
                                    + ". Drop them, or choose the estimator they belong to.")
            return None
        if given is None:
            return self.options_class()
        if isinstance(given, self.options_class):
            return given
        if isinstance(given, Mapping):
            names = {f.name for f in dataclasses.fields(self.options_class)}
            unknown = sorted(set(given) - names)
            if unknown:
                raise TurnoverError(
                    f"{unknown} are not options of the {self.name!r} estimator; use {sorted(names)} "
                    f"({self.options_class.__name__})."
                )
            return self.options_class(**given)
        raise TurnoverError(
            f"options of the {self.name!r} estimator are a {self.options_class.__name__} or a dict, got "
            f"{type(given).__name__}."
        )


_REGISTRY: dict[str, EstimatorSpec] = {}
AUTO = "auto"


def register_estimator(name: str, *, description: str, definition: str, options_class: Optional[type] = None,
                       auto: Optional[Callable[[EstimatorContext], Optional[str]]] = None, auto_priority: int = 100,
                       state_dir: Optional[str] = None, worth: str = "", low_self_influence: str = "",
                       one_model_caveat: str = "", multi_model: bool = False, needs_masks: bool = False) -> Callable[[Callable], Callable]:
    """Register ``build(context) -> BuiltEstimator`` (or an :class:`Estimator`) under ``name``: from then on
    ``InfluencePipeline(estimator=name)``, the CLI's ``--estimator`` and the report know it.

    ``auto(context)`` returns a reason when ``estimator="auto"`` should pick this estimator (asked in
    ``auto_priority`` order, lowest first), or None.

    Example:
        >>> @register_estimator("zeros", description="all scores 0", definition="nothing")
        ... def build(context): return Zeros(context.model)
    """
    if name == AUTO or not name:
        raise TurnoverError(f"{name!r} cannot name an estimator.")

    def decorate(build: Callable) -> Callable:
        def built(context: EstimatorContext) -> BuiltEstimator:
            result = build(context)
            return result if isinstance(result, BuiltEstimator) else BuiltEstimator(result)

        _REGISTRY[name] = EstimatorSpec(name, built, description, definition, options_class, auto, auto_priority,
                                        state_dir, worth, low_self_influence, one_model_caveat, multi_model,
                                        needs_masks)
        return build

    return decorate


def unregister_estimator(name: str) -> None:
    """Forget the estimator ``name`` (e.g. one a notebook or a test registered)."""
    _REGISTRY.pop(name, None)


def estimator_names() -> list[str]:
    """Every registered estimator's name, plus ``"auto"``."""
    return [AUTO, *_REGISTRY]


def get_estimator(name: str) -> EstimatorSpec:
    """The registered estimator called ``name``."""
    if name not in _REGISTRY:
        raise TurnoverError(f"estimator must be one of {tuple(estimator_names())}, got {name!r}.")
    return _REGISTRY[name]


def resolve_estimator(name: str, context: EstimatorContext) -> tuple[EstimatorSpec, Optional[str]]:
    """The spec ``name`` stands for; for ``"auto"`` the first whose ``auto`` rule gives a reason, and that reason."""
    if name != AUTO:
        spec = get_estimator(name)
        if len(context.models) > 1 and not spec.multi_model:
            several = " or ".join(f"estimator={s.name!r}" for s in _REGISTRY.values() if s.multi_model)
            raise TurnoverError(f"ensembles (several models) are for {several}, not {name!r}.")
        return spec, None
    for spec in sorted(_REGISTRY.values(), key=lambda s: s.auto_priority):
        reason = spec.auto(context) if spec.auto is not None else None
        if reason is not None:
            return spec, reason
    raise TurnoverError("estimator='auto' found no estimator for these models; name one with estimator=...")


def options_owner(options: Any) -> EstimatorSpec:
    """The registered estimator whose options dataclass ``options`` is an instance of."""
    for spec in _REGISTRY.values():
        if spec.options_class is not None and isinstance(options, spec.options_class):
            return spec
    raise TurnoverError(f"{type(options).__name__} are the options of no registered estimator.")


def options_classes() -> list[type]:
    """The options dataclasses of the registered estimators (the CLI makes flags of their fields)."""
    return [spec.options_class for spec in _REGISTRY.values() if spec.options_class is not None]


def describe_estimators() -> str:
    """One line per estimator (CLI help)."""
    return " ".join(f"{spec.name}: {spec.description}" for spec in _REGISTRY.values())


