"""Errors raised by the DNO core.

``DNOError`` subclasses ``ValueError`` so callers that validate input with
``except ValueError`` keep working. When an optimisation run has produced a
result before failing, the best result so far travels on the exception as
``error.result`` so nothing is lost.
"""
from __future__ import annotations

from typing import Any, Optional


class DNOError(ValueError):
    """Bad input or an unrecoverable failure in a DNO run."""

    def __init__(self, message: str, result: Optional[Any] = None):
        super().__init__(message)
        self.result = result


class StopOptimization(Exception):
    """Raise from a step callback to end the run early and keep the best result.

    Any *other* exception raised by a callback also ends the run; it is
    re-raised with the best result attached as ``error.dno_result``.
    """
