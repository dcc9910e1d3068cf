"""User-facing errors: one clear message that says what, where and what would be valid.

The CLI prints these without a traceback and exits non-zero; everything else is a bug and keeps its
traceback.
"""
from __future__ import annotations


class MfrError(Exception):
    """Base of every error a user can cause (recipe, CLI argument, data, plugin, checkpoint)."""

    def __init__(self, message: str, *, path: str | None = None):
        self.message = message
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class RecipeError(MfrError):
    """A recipe or override is invalid; ``path`` is the dotted key path (``train.lr``)."""


class PluginError(MfrError):
    """A plugin failed to load or registered something invalid."""


class DataError(MfrError):
    """Input data is missing or unreadable (shards, buckets, datasets)."""


class CheckpointError(MfrError):
    """A checkpoint is missing, corrupt or does not match the recipe."""


class TrainingError(MfrError):
    """Training stopped for a reason the user must act on (e.g. repeated non-finite losses)."""


class ContractError(PluginError):
    """A component's output breaks its kind's contract (``mfrecipes.contracts``): the message
    names the kind, the registered name, its origin, what was expected and what came."""
