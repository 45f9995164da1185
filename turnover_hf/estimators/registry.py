"""The estimator protocol and registry (re-exported by :mod:`turnover_hf.estimators`, which registers the
built-in estimators when imported).

The registry also owns each estimator's saved state (:class:`SavedState`): the folder beside a checkpoint, how to
tell that a saved state belongs to a model's weights, and the fitted estimators a model carries until it is saved.
Checkpoints ask it which folders to clear, carry and save; no other module names an estimator's folder.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence, Union

import torch
from datasets import Dataset
from torch import nn

from ..context import patched_root
from ..errors import NotPatchedError, TurnoverError
from ..fingerprints import weights_fingerprint
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


@dataclass(frozen=True)
class SavedState:
    """Where and how a registered estimator keeps what it fitted beside a checkpoint.

    ``folder`` is the checkpoint's sub-folder; ``meta_name`` the JSON file the estimator's ``save(folder)`` writes
    last, so its presence marks a finished state; its ``weights_fingerprint`` names the weights the state belongs
    to (of all parameters, or with ``tracked_only`` of the parameters its ``"parameters"`` list names). A model
    saved into a checkpoint folder gets the states it carries (fitted since it was loaded, or loaded with it and
    still belonging to its weights); every other state folder there is removed, never left stale.

    Example:
        >>> @register_estimator("mine", description="...", definition="...",
        ...                     saved_state=SavedState("mine", "mine.json"))
        ... def build(context): return Mine.load(context.saved_folder()) if context.saved_folder() else Mine()
    """

    folder: str
    meta_name: str
    tracked_only: bool = False

    def __post_init__(self) -> None:
        for name, value in (("folder", self.folder), ("meta_name", self.meta_name)):
            if not isinstance(value, str) or not value or os.sep in value or value in (".", ".."):
                raise TurnoverError(f"SavedState.{name} must be a plain file or folder name, got {value!r}.")

    def saved_in(self, checkpoint: Optional[Union[str, os.PathLike]]) -> Optional[str]:
        """``<checkpoint>/<folder>`` when it holds a finished state (its metadata file), else None."""
        if checkpoint is None:
            return None
        folder = os.path.join(os.fspath(checkpoint), self.folder)
        return folder if os.path.isfile(os.path.join(folder, self.meta_name)) else None

    def belongs_to(self, folder: Union[str, os.PathLike], model: nn.Module) -> bool:
        """True when the state in ``folder`` was fitted on exactly ``model``'s current weights."""
        try:
            with open(os.path.join(os.fspath(folder), self.meta_name), encoding="utf-8") as handle:
                meta = json.load(handle)
            names = [p["name"] for p in meta["parameters"]] if self.tracked_only else None
            return meta["weights_fingerprint"] == weights_fingerprint(model, names)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False


FITTED_ATTRIBUTE = "turnover_fitted"  # on the model: {estimator name: a fitted estimator}, saved with the model


def _holder(model: nn.Module) -> nn.Module:
    try:
        return patched_root(model)
    except NotPatchedError:
        return model


def attach_fitted(model: nn.Module, name: str, estimator: Optional["Estimator"]) -> None:
    """Let ``model`` carry the fitted ``estimator`` (registered as ``name``) until it is saved: its
    ``save_pretrained`` then writes it into the estimator's state folder (None: drop it)."""
    holder = _holder(model)
    fitted = dict(getattr(holder, FITTED_ATTRIBUTE, None) or {})
    if estimator is None:
        fitted.pop(name, None)
    else:
        get_estimator(name).saved_state_or_refuse()
        fitted[name] = estimator
    holder.__dict__[FITTED_ATTRIBUTE] = fitted


def fitted_of(model: nn.Module) -> dict[str, "Estimator"]:
    """The fitted estimators ``model`` carries (see :func:`attach_fitted`), by registered name."""
    return dict(getattr(_holder(model), FITTED_ATTRIBUTE, None) or {})


def saved_states() -> dict[str, SavedState]:
    """Every registered estimator's saved state, by estimator name (the checkpoint clears and carries these)."""
    return {spec.name: spec.saved_state for spec in _REGISTRY.values() if spec.saved_state is not None}


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
    state_dirs: dict[str, str] = field(default_factory=dict)  # estimator name -> folder the user named for its state
    name: Optional[str] = None           # the estimator being built (set by the pipeline before building)

    @property
    def model(self) -> nn.Module:
        return self.models[0]

    def state_dir(self) -> Optional[str]:
        """Where the estimator being built keeps its state: the folder the user named, else the checkpoint's
        sub-folder (whether or not it holds a state yet); None when neither exists."""
        spec = get_estimator(self.name)
        if self.name in self.state_dirs:
            return self.state_dirs[self.name]
        if spec.saved_state is not None and self.path is not None:
            return os.path.join(self.path, spec.saved_state.folder)
        return None

    def saved_folder(self) -> Optional[str]:
        """The folder holding a finished saved state of the estimator being built (see :class:`SavedState`), or
        None: the user's folder when it holds one, else the checkpoint's."""
        spec = get_estimator(self.name)
        if spec.saved_state is None:
            return None
        folder = self.state_dirs.get(self.name)
        if folder is not None:
            return folder if os.path.isfile(os.path.join(folder, spec.saved_state.meta_name)) else None
        return spec.saved_state.saved_in(self.path)


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
    saved_state: Optional[SavedState] = None         # what it keeps beside a checkpoint (folder, metadata)
    worth: str = ""                                  # what its scores are worth, as measured (demo, reports)
    low_self_influence: str = ""                     # what the lowest self-influence values mean
    one_model_caveat: str = ""                       # said beside scores of a single model (no ensemble)
    multi_model: bool = False                        # accepts several models (an ensemble)
    needs_masks: bool = False                        # scores only influence-ready (patched) checkpoints

    @property
    def state_dir(self) -> Optional[str]:
        """The checkpoint sub-folder of its saved state (None: it keeps none)."""
        return None if self.saved_state is None else self.saved_state.folder

    def saved_state_or_refuse(self) -> SavedState:
        if self.saved_state is None:
            raise TurnoverError(f"estimator {self.name!r} keeps no saved state (register it with saved_state=...).")
        return self.saved_state

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
                       saved_state: Optional[SavedState] = None, worth: str = "", low_self_influence: str = "",
                       one_model_caveat: str = "", multi_model: bool = False, needs_masks: bool = False,
                       state_dir: Optional[str] = None) -> Callable[[Callable], Callable]:
    """Register ``build(context) -> BuiltEstimator`` (or an :class:`Estimator`) under ``name``: from then on
    ``InfluencePipeline(estimator=name)``, the CLI's ``--estimator`` and the report know it.

    ``auto(context)`` returns a reason when ``estimator="auto"`` should pick this estimator (asked in
    ``auto_priority`` order, lowest first), or None. ``saved_state`` says where it keeps what it fits beside a
    checkpoint (:class:`SavedState`). A name already registered is refused: :func:`unregister_estimator` it first.

    Example:
        >>> @register_estimator("zeros", description="all scores 0", definition="nothing")
        ... def build(context): return Zeros(context.model)
    """
    if not isinstance(name, str) or name == AUTO or not name:
        raise TurnoverError(f"{name!r} cannot name an estimator.")
    if name in _REGISTRY:
        raise TurnoverError(f"an estimator called {name!r} is registered already; unregister_estimator({name!r}) "
                            "first to replace it, or choose another name.")
    if state_dir is not None:
        warnings.warn("register_estimator(state_dir=...) is deprecated; pass saved_state=SavedState(folder, "
                      "meta_name).", DeprecationWarning, stacklevel=2)
        saved_state = saved_state or SavedState(state_dir, f"{state_dir}.json")
    taken = {s.saved_state.folder: s.name for s in _REGISTRY.values() if s.saved_state is not None}
    if saved_state is not None and saved_state.folder in taken:
        raise TurnoverError(f"the state folder {saved_state.folder!r} belongs to the estimator "
                            f"{taken[saved_state.folder]!r}; give {name!r} a folder of its own.")

    def decorate(build: Callable) -> Callable:
        def built(context: EstimatorContext) -> BuiltEstimator:
            result = build(context)
            return result if isinstance(result, BuiltEstimator) else BuiltEstimator(result)

        if name in _REGISTRY:
            raise TurnoverError(f"an estimator called {name!r} is registered already; unregister_estimator({name!r}) "
                                "first to replace it, or choose another name.")
        _REGISTRY[name] = EstimatorSpec(name, built, description, definition, options_class, auto, auto_priority,
                                        saved_state, worth, low_self_influence, one_model_caveat, multi_model,
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




def carried_options(spec: EstimatorSpec, options: Any) -> Optional[dict[str, Any]]:
    """The fields of another estimator's ``options`` that ``spec``'s options share and that differ from their
    defaults (``auto`` chose ``spec``; e.g. ``damping_factor`` carries over from the influence function to its
    projected form), or None when ``spec`` takes no options."""
    if spec.options_class is None:
        return None
    if options is None:
        return {}
    values = dict(options) if isinstance(options, Mapping) else {f.name: getattr(options, f.name)
                                                                   for f in dataclasses.fields(options)}
    defaults = {} if isinstance(options, Mapping) else {f.name: getattr(type(options)(), f.name)
                                                         for f in dataclasses.fields(options)}
    shared = {f.name for f in dataclasses.fields(spec.options_class)}
    return {k: v for k, v in values.items() if k in shared and (k not in defaults or v != defaults[k])
            and v is not None}


def choose_estimator(name: str, context: EstimatorContext, options: Any = None,
                     named_options: Optional[Mapping[str, Any]] = None) -> tuple[EstimatorSpec, Any]:
    """The estimator ``name`` stands for (``"auto"`` resolved, its reason logged) and its typed options.

    ``options`` is the chosen estimator's options (its dataclass, which names its estimator, or a dict);
    ``named_options`` maps an estimator's name to options given for it alone. Options of an estimator that was not
    chosen are refused, unless ``auto`` chose another one that shares their fields (they carry over).

    Example:
        >>> spec, typed = choose_estimator("auto", context, {"damping_factor": 1.0})
    """
    named = {k: v for k, v in (named_options or {}).items() if v}
    if options is not None and not isinstance(options, Mapping):  # an options dataclass names its estimator
        named[options_owner(options).name], options = options, None
    context.options = next(iter(named.values()), options)  # as given, they inform "auto" (e.g. a memory budget)
    spec, reason = resolve_estimator(name, context)
    if reason is not None:
        logger.info("estimator='auto' scores with %r: %s.", spec.name, reason)
    for owner in list(named):
        if owner != spec.name:
            carried = carried_options(spec, named[owner]) if name == AUTO else None
            if carried is None:
                raise TurnoverError(
                    f"options of the {owner!r} estimator were given, but estimator={name!r} scores with "
                    f"{spec.name!r}" + (f" ({reason})" if reason else "") + f". Drop them, or pass "
                    f"estimator={owner!r}."
                )
            named[spec.name] = carried
    if name == AUTO and isinstance(options, Mapping):  # options for whichever auto picks: its own fields
        known = {f.name for kind in options_classes() for f in dataclasses.fields(kind)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TurnoverError(f"{unknown} are options of no registered estimator; they are {sorted(known)}.")
        options = carried_options(spec, options)
    return spec, spec.options(named.get(spec.name, options))
