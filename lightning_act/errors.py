"""Errors that the CLI turns into one clear line instead of a deep traceback.

Every message names the problem and the fix, e.g.
``data directory '/x' does not exist; pass --data.data_dir with an existing folder``.
"""

from __future__ import annotations


class LightningActError(ValueError):
    """A user-facing configuration or input error (printed as one line by the CLI)."""


class ModuleSelectionError(LightningActError):
    """A module pattern or class matched no module of the model."""


class DataNotFoundError(LightningActError, FileNotFoundError):
    """A data file or directory given by the user does not exist or is unreadable."""


class DataFormatError(LightningActError):
    """A data file exists but its contents do not have the expected format or shape."""


class UnknownClassPathError(LightningActError):
    """A ``class_path`` in a YAML config cannot be imported."""


class ConfigError(LightningActError):
    """A config file or command-line option is malformed, misspelled or of the wrong type."""


class DiskFullError(LightningActError, OSError):
    """A checkpoint could not be written because the disk is full (nothing was left half-written)."""


class NotACheckpointError(LightningActError):
    """A ``--ckpt_path`` file is truncated or not a Lightning checkpoint."""


class CheckpointMismatchError(LightningActError):
    """A ``--ckpt_path`` checkpoint belongs to another LightningModule than the configured one."""


class RunExistsError(LightningActError):
    """A fit would overwrite a previous run's checkpoint or config without ``--overwrite``."""
