"""Exceptions raised for bad input. Each message names the file or key and what is wrong."""

from __future__ import annotations


class DednError(Exception):
    """Base class of every error dedn raises on purpose (bad input, bad files, bad configs)."""


class ConfigError(DednError):
    """A config file or a command-line override is unknown, mistyped or inconsistent."""


class DataError(DednError):
    """Features, labels, attributes, splits or semantic vectors are missing, malformed or inconsistent."""


class CheckpointError(DednError):
    """A run directory or checkpoint is missing, incomplete or corrupt."""


class TrainingError(DednError):
    """Training could not go on (for example a loss became NaN)."""
