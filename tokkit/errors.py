"""One family of errors a user can act on.

The CLI prints a ``TokkitError`` as one or two lines on stderr and exits with status 2; any other exception is a
bug and keeps its traceback. Messages say what is wrong *and* what to do about it.
"""

from __future__ import annotations


class TokkitError(Exception):
    """An error caused by the user's input or environment, not by a bug in tokkit."""


class ConfigError(TokkitError, ValueError):
    """A bad argument, option, preset or config field."""


class DataError(TokkitError):
    """A dataset that is missing, empty, unreadable or has too many bad files."""


class CheckpointError(TokkitError):
    """A checkpoint folder that is missing, incomplete, corrupt or of the wrong kind."""


class WeightsError(TokkitError):
    """Pretrained metric/loss weights (InceptionV3, AlexNet, LPIPS) that are missing or fail their hash check."""


class ShardError(TokkitError):
    """A token shard set that is incomplete, corrupt or does not match the requested plan."""


class OutputError(TokkitError):
    """An output folder or file that cannot be created or written: a file in the way, read-only, no space left."""


class TrainingDiverged(TokkitError):
    """A loss became NaN or Inf; the message names the step and the last good checkpoint."""
