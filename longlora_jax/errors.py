"""The errors a user can cause, under one base class.

Every command turns a `UserError` into one line, `error: <message>`, and exit status 2; any
other exception is a bug and keeps its traceback. Messages name the bad value and what would
be valid. Every layer raises these (this module imports nothing of the project).
"""

from __future__ import annotations


class UserError(Exception):
    """Input the user can fix: a config value, an argument, a path, data, a checkpoint."""


class ConfigError(UserError, ValueError):
    """A configuration value or command-line argument is invalid."""


class DataError(UserError, ValueError):
    """Training or evaluation data is missing or malformed; the message names the culprit."""


class CheckpointError(UserError, ValueError):
    """Weights or a run's checkpoints are missing, incomplete or belong to another model."""


class AssetError(UserError, RuntimeError):
    """An offline asset could not be fetched; the message says why and what to do."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
