"""Exceptions a user can act on. The CLI prints them as one line, no traceback."""


class QTGError(Exception):
    """Base class for errors caused by the user's request, not by a bug."""


class ConfigError(QTGError, ValueError):
    """An invalid or unknown configuration value or tier name."""


class TierTooLargeError(QTGError, MemoryError):
    """A tier needs more memory than the target device has; nothing was allocated."""
