"""``TurnoverConfig``: how a model carries turn-over dropout, saved as ``turnover_config.json`` next to its weights."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from transformers.utils import PushToHubMixin

from .errors import ConfigMismatchError
from .files import atomic_write_text
from .fingerprints import fingerprint
from .masks import SCHEMES, validate_drop_ratio, validate_seed
from .version import __version__

CONFIG_NAME = "turnover_config.json"
MASK_SIDES = ("output", "input", "rank")

# Fields that decide which mask bits every (example, unit) gets. Two configs that differ in any of them give
# different influence scores for the same weights.
MASK_FIELDS = ("p", "seed", "scheme", "codebook_size", "codebook_picks", "mask_sites")
# Fields a saved config must spell out: a missing one would silently take the dataclass default and change the masks
# (or which column holds the ids). Every turnover_config.json ever written has them.
REQUIRED_FIELDS = ("p", "seed", "scheme", "codebook_size", "codebook_picks", "mask_sites", "id_column")
# Version of the turnover_config.json format; a file from a newer format is refused (configs before the field: 1).
FORMAT_VERSION = 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _has_type(value: Any, kind: Any) -> bool:
    """``value`` is of the declared field type ``kind`` (Optional, Union, list[...] and dict[...] followed)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return True
    if origin is Union:
        return any(_has_type(value, a) for a in args)
    if kind is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_has_type(k, args[0]) and _has_type(v, args[1]) for k, v in value.items())
    if kind is int:
        return _is_int(value)
    return isinstance(value, kind) and not isinstance(value, bool) or (kind is bool and isinstance(value, bool))


def _type_name(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Union:
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, dict):
        return f"a {origin.__name__} of {' -> '.join(_type_name(a) for a in args)}"
    return "None" if kind is type(None) else "anything" if kind is Any else getattr(kind, "__name__", str(kind))


# Fields checked with their own words in __post_init__.
_OWN_CHECKS = ("p", "seed", "channels", "target_modules", "exclude_modules", "mask_inputs_of")
# Fields that must be at least 1 when given.
_POSITIVE = ("codebook_size", "codebook_picks", "num_train_examples", "format_version")


def _check_field_types(config: "TurnoverConfig") -> None:
    """Refuse a field whose value is not of its declared type, naming the field (a wrong type would be kept and
    saved, and fail or mislead far from here)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in _OWN_CHECKS:
            continue
        if not _has_type(value, hints[f.name]):
            raise ValueError(f"TurnoverConfig: {f.name} must be {_type_name(hints[f.name])}, got {value!r}.")
        if f.name in _POSITIVE and value is not None and value < 1:
            raise ValueError(f"TurnoverConfig: {f.name} must be at least 1, got {value!r}.")


@dataclass
class TurnoverConfig(PushToHubMixin):
    """Turn-over dropout settings of a model: drop ratio, mask seed, mask scheme and which modules carry masks.

    ``target_modules`` follows PEFT's semantics: a string is matched with ``re.fullmatch`` against each module's
    qualified name; a list matches a name exactly or as a ``.suffix``. ``None`` picks the defaults: the
    classification head and every bottleneck adapter and LoRA module of the ``adapters`` library.

    Example:
        >>> config = TurnoverConfig(p=0.5, seed=13)
        >>> model = patch_model(model, config)          # masks now ride on the head and adapters
        >>> config.save_pretrained("out")               # writes out/turnover_config.json
    """

    p: float = field(default=0.5, metadata={"help": "Drop ratio of each instance mask (torch convention); kept units are scaled by 1/(1-p)."})
    seed: int = field(default=0, metadata={"help": "Mask seed: with an example id and a layer key it fixes every mask bit."})
    scheme: str = field(default="independent", metadata={"help": "'independent' per-example bits, or 'hashed' codebook composition (paper App. D)."})
    codebook_size: int = field(default=64, metadata={"help": "Rows of the virtual codebook (scheme='hashed')."})
    codebook_picks: int = field(default=4, metadata={"help": "Rows ANDed per example (scheme='hashed')."})
    channels: int = field(
        default=1,
        metadata={"help": "Parallel masked copies of every input-masked Linear (the default for one-layer heads), "
                          "outputs averaged: K mask samples per example in one model, for less noisy scores."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (exact or .suffix), or one regex (fullmatch). None = head + adapters defaults."},
    )
    target_module_types: Optional[list[str]] = field(
        default=None, metadata={"help": "Module class names to target as well, e.g. ['Conv1D']."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules never to mask; wins over target_modules."}
    )
    mask_inputs_of: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Targeted modules whose input features (not output units) are masked; None = the last Linear of a head."},
    )
    mask_sites: Optional[dict[str, dict[str, Any]]] = field(
        default=None,
        metadata={"help": "Filled by patch_model: every masked module -> {'side', 'units'[, 'channels']}. Loading checks it exactly."},
    )
    active_adapters: Optional[list[str]] = field(
        default=None, metadata={"help": "Filled by patch_model: the adapters (library `adapters`) active when patched."}
    )
    id_column: str = field(default="example_id", metadata={"help": "Dataset column holding each training example's id."})
    num_train_examples: Optional[int] = field(
        default=None, metadata={"help": "Filled by TurnoverTrainer: size of the training set the masks were trained on."}
    )
    trainable_parameters: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Filled by save_pretrained: the parameters that required grad (named as in the transformers "
                          "model), i.e. what training updated; load_influence_ready restores them, and gradient-based "
                          "estimators differentiate them."},
    )
    training_set: Optional[dict[str, Any]] = field(
        default=None,
        metadata={"help": "Filled by TurnoverTrainer: the training set's size, fingerprint, hashed columns and, when "
                          "known, where it can be loaded from (see turnover_hf.training_set); per-row hashes are in "
                          "training_set.safetensors beside the config."},
    )
    trained_weights: Optional[dict[str, str]] = field(
        default=None,
        metadata={"help": "Filled by TurnoverTrainer at the end of training and at each save it makes: fingerprints "
                          "of the mask fields ('masks') and of the trainable weights masked training produced "
                          "('weights'). A load refuses mask fields edited since, and names weights changed since "
                          "(trained further without masks)."},
    )
    library_version: str = field(default=__version__, metadata={"help": "turnover-hf version that wrote this config."})
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "Version of this file's format."})

    def __post_init__(self) -> None:
        try:
            self.p = validate_drop_ratio(self.p)
            self.seed = validate_seed(self.seed)
        except ValueError as err:
            raise ValueError(f"TurnoverConfig: {err}") from None
        if isinstance(self.target_module_types, str):
            self.target_module_types = [self.target_module_types]
        for name in ("target_modules", "exclude_modules", "mask_inputs_of", "target_module_types"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        _check_field_types(self)
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"TurnoverConfig: format_version {self.format_version} is newer than this turnover-hf reads "
                f"({FORMAT_VERSION}); upgrade turnover-hf (pip install -U turnover-hf)."
            )
        if self.scheme not in SCHEMES:
            raise ValueError(f"TurnoverConfig: scheme must be one of {SCHEMES}, got {self.scheme!r}.")
        if self.scheme == "hashed" and not (1 <= self.codebook_picks <= self.codebook_size):
            raise ValueError(
                f"TurnoverConfig: need 1 <= codebook_picks <= codebook_size, got {self.codebook_picks} and {self.codebook_size}."
            )
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 1:
            raise ValueError(f"TurnoverConfig: channels must be an integer >= 1 (e.g. 16), got {self.channels!r}.")
        for name in ("target_modules", "exclude_modules", "mask_inputs_of"):
            pattern = getattr(self, name)
            if isinstance(pattern, str):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(
                        f"TurnoverConfig: {name}={pattern!r} is not a valid regular expression ({err}); a string is "
                        "matched with re.fullmatch, so escape special characters, or give a list of module names."
                    ) from None
            elif pattern is not None and not (
                isinstance(pattern, (list, tuple)) and all(isinstance(x, str) for x in pattern)
            ):
                raise ValueError(f"TurnoverConfig: {name} must be a regex string or a list of module names, got {pattern!r}.")
        for name, site in (self.mask_sites or {}).items():
            channels, units = site.get("channels", 1), site.get("units", 0)
            if site.get("side") not in MASK_SIDES or not _is_int(units) or units < 1 or not _is_int(channels) or not (
                isinstance(channels, int) and channels >= 1 and (channels == 1 or site["side"] == "input")
            ):
                raise ValueError(
                    f"TurnoverConfig: mask_sites[{name!r}] is malformed: {site!r}; each site is {{'side': one of "
                    f"{MASK_SIDES}, 'units': an integer >= 1[, 'channels': an integer >= 1, input side only]}}."
                )

    @property
    def mask_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`turnover_hf.masks.mask_for`."""
        return {
            "p": self.p, "seed": self.seed, "scheme": self.scheme,
            "codebook_size": self.codebook_size, "codebook_picks": self.codebook_picks,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: Union[str, os.PathLike], push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write ``turnover_config.json`` into ``save_directory`` (atomically); optionally push it."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; give a folder.")
        os.makedirs(save_directory, exist_ok=True)
        if push_to_hub:
            commit_message = kwargs.pop("commit_message", None)
            repo_id = kwargs.pop("repo_id", str(save_directory).split(os.path.sep)[-1])
            repo_id = self._create_repo(repo_id, **kwargs)
            files_timestamps = self._get_files_timestamps(save_directory)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), self.to_json_string())
        if push_to_hub:
            self._upload_modified_files(
                save_directory, repo_id, files_timestamps, commit_message=commit_message, token=kwargs.get("token")
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = CONFIG_NAME) -> "TurnoverConfig":
        """A config from the fields of a saved ``turnover_config.json``: the fields that decide the masks must all
        be there, and a file of a newer format (or with fields this version does not know) is refused."""
        if not isinstance(data, dict):
            raise ConfigMismatchError(f"{source} holds a JSON {type(data).__name__}, not an object of config fields; "
                                      "it is not a turnover config. Save the model again with model.save_pretrained.")
        version = data.get("format_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
            raise ConfigMismatchError(
                f"{source} has format version {version!r} (written by turnover-hf {data.get('library_version', '?')}); "
                f"this turnover-hf ({__version__}) reads versions up to {FORMAT_VERSION}. Upgrade turnover-hf: "
                "pip install -U turnover-hf."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigMismatchError(
                f"{source} has fields this turnover-hf version does not know: {unknown}; "
                "upgrade turnover-hf (pip install -U turnover-hf) to load this checkpoint with the same masks."
            )
        missing = [name for name in REQUIRED_FIELDS if name not in data]
        if missing:
            raise ConfigMismatchError(
                f"{source} lacks {missing}, which decide the masks (a default would silently give other masks than "
                "training used). Restore the file from the checkpoint as it was saved, or save the model again with "
                "model.save_pretrained."
            )
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ConfigMismatchError(f"{source} is not a valid turnover config: {err}") from None

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **hub_kwargs: Any) -> "TurnoverConfig":
        """Read ``turnover_config.json`` from a local folder or a Hub repo id."""
        if os.path.isdir(path):
            file = os.path.join(path, CONFIG_NAME)
            if not os.path.isfile(file):
                raise ConfigMismatchError(
                    f"{path!r} has no {CONFIG_NAME}: it is not an influence-ready checkpoint. "
                    "Patch a model with turnover_hf.patch_model and save it with model.save_pretrained."
                )
        else:
            from huggingface_hub import hf_hub_download

            file = hf_hub_download(str(path), CONFIG_NAME, **hub_kwargs)
        try:
            with open(file, encoding="utf-8") as handle:
                data = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigMismatchError(
                f"{file} is not readable JSON ({err}); the checkpoint's turn-over config is damaged. Restore it, or "
                "save the model again with model.save_pretrained."
            ) from None
        return cls.from_dict(data, source=os.fspath(file))

    def masks_fingerprint(self) -> str:
        """A fingerprint of the fields that decide the masks (see ``trained_weights``)."""
        values = self.to_dict()
        return fingerprint({name: values[name] for name in MASK_FIELDS})

    def check_same_masks(self, other: "TurnoverConfig") -> None:
        """Raise :class:`ConfigMismatchError` unless ``other`` gives exactly the same masks."""
        diffs = {
            name: (getattr(self, name), getattr(other, name))
            for name in MASK_FIELDS
            if getattr(self, name) != getattr(other, name)
        }
        if diffs:
            detail = "; ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diffs.items())
            raise ConfigMismatchError(
                f"turn-over configs disagree on what decides the masks ({detail}). Scores would use other masks than "
                "training did; load the checkpoint's own turnover_config.json instead of passing another config."
            )
