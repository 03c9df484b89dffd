"""The engine's errors: one base class, one subclass per thing the learner can act on.

Every message is a full sentence that says what went wrong and, where there is one,
what to do about it; callers show ``str(error)`` as is.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class for every error the model engine raises on purpose."""


class ModelNotFoundError(EngineError):
    """The model file, folder or hub id could not be found (or downloaded)."""


class ModelLoadError(EngineError):
    """The model was found but could not be read: a corrupt or unsupported file."""


class UnsupportedPrecisionError(EngineError, ValueError):
    """A precision name the engine does not know, or cannot run on this device."""


class DeviceError(EngineError):
    """The requested device is not available (e.g. ``cuda`` without a GPU)."""


class EngineBusyError(EngineError):
    """A reply is being generated; the operation was refused instead of waiting."""


class SwitchError(EngineError):
    """A precision switch failed; the engine keeps running at its previous precision."""

    def __init__(self, message: str, *, precision: str, kept: str) -> None:
        super().__init__(message)
        self.precision = precision
        self.kept = kept


class PromptTooLongError(EngineError, ValueError):
    """The prompt does not fit in the model's context window."""


def reason(exc: BaseException) -> str:
    """``TypeName: first line of the message`` without a trailing full stop, for embedding in a sentence."""
    text = str(exc).strip().splitlines()[0].strip().rstrip(".") if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
