"""What an experiment refuses, and how a cancelled one stops."""

from __future__ import annotations

from qtg.errors import QTGError


class ExperimentError(QTGError, ValueError):
    """An experiment that cannot run as asked (the message names the argument)."""


class ExperimentCancelled(QTGError):
    """A sweep stopped because its cancel event was set (the message says how far it got)."""
