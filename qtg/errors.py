"""Exceptions a user can act on. The CLI prints them as one line, no traceback."""


class QTGError(Exception):
    """Base class for errors caused by the user's request, not by a bug."""


class ConfigError(QTGError, ValueError):
    """An invalid or unknown configuration value or tier name."""


class TierTooLargeError(QTGError, MemoryError):
    """A tier needs more memory than the target device has; nothing was allocated."""


class DataError(QTGError, ValueError):
    """Training data or a tokenizer that cannot be used: missing, empty, malformed, too short."""


class CheckpointError(QTGError):
    """A checkpoint that is missing, incomplete, corrupt, mismatched or not in a safe format."""


class GenerationError(QTGError, ValueError):
    """A generation request that cannot be served (empty prompt, bad sampling settings, too long)."""


class TrainingError(QTGError):
    """Training that cannot go on: repeated non-finite losses, or a run directory in an unusable state."""


class TopologyError(QTGError):
    """A persistence request that cannot be served: bad points or distances, or work beyond its bounds."""
