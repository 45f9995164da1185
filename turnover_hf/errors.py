"""Every exception turnover-hf raises on purpose, in one place.

All of them subclass :class:`TurnoverError` (itself a ``ValueError``), and each message says what is wrong and how
to fix it.
"""

from __future__ import annotations


class TurnoverError(ValueError):
    """Base class of turnover-hf's errors."""


class NoTargetMatchedError(TurnoverError):
    """No module of the model matched the configured targets."""


class NotPatchedError(TurnoverError):
    """An operation needs a model patched with turn-over dropout."""


class MissingExampleIdsError(TurnoverError):
    """A batch reached a patched model in a masked mode without ``example_ids``."""


class ExampleIdError(TurnoverError):
    """Example ids that are unknown, duplicated, negative or of the wrong shape."""


class ConfigMismatchError(TurnoverError):
    """A checkpoint, model or dataset does not match the turn-over configuration it is used with."""


class StaleFitError(ConfigMismatchError):
    """A fitted estimator (e.g. an influence function) belongs to other weights or another training set."""
