"""Errors a user can act on, and tracebacks that point at the user's own lines."""

from __future__ import annotations

import os
from types import FrameType, TracebackType


class NDIFError(Exception):
    """Base class of ndif's own errors."""


class TraceSyntaxError(NDIFError, SyntaxError):
    """A traced block is written in a shape ndif cannot capture or compile."""

    def __init__(self, message: str) -> None:
        # SyntaxError's own __init__ would read a (filename, lineno, ...) tuple.
        Exception.__init__(self, message)
        self.msg = message

    def __str__(self) -> str:
        return self.msg


class OutsideTraceError(NDIFError, ValueError):
    """A value that only exists during a run was asked for outside one."""


class MissedValueError(NDIFError):
    """An intervention asked for a value the run did not produce after the request."""


class OutOfOrderError(MissedValueError):
    """A module's value was requested after the model had already run that module."""


class NeverRanError(MissedValueError):
    """A module's value was requested but the module never ran in that step."""


class BarrierError(NDIFError):
    """Fewer blocks reached a barrier than it was created for."""


class InvokeError(NDIFError, ValueError):
    """Invokes were used in a way that cannot be batched."""


class StopTrace(Exception):
    """Control flow: ``tracer.stop()`` ends the model's run early. Not an error."""


class IterationEnd(Exception):
    """Control flow: a step loop asked for a generation step the run never made."""


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HIDDEN = (_PACKAGE + os.sep, os.sep + "greenlet" + os.sep)


def _internal(frame: FrameType) -> bool:
    filename = frame.f_code.co_filename
    return any(part in filename for part in _HIDDEN) or filename.startswith(_PACKAGE)


def clean_traceback(tb: TracebackType | None) -> TracebackType | None:
    """Drop ndif's own frames, keeping the user's (and the libraries they call)."""
    if os.environ.get("NDIF_DEBUG"):
        return tb
    kept = []
    while tb is not None:
        if not _internal(tb.tb_frame):
            kept.append(tb)
        tb = tb.tb_next
    result = None
    for entry in reversed(kept):
        result = TracebackType(result, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return result


def user_line(frame: FrameType | None, filename: str | None = None) -> tuple[str, int] | None:
    """The innermost (file, line) outside ndif on ``frame``'s stack; ``filename`` wins if given."""
    fallback = None
    while frame is not None:
        code = frame.f_code
        if filename is not None and code.co_filename == filename:
            return code.co_filename, frame.f_lineno
        if fallback is None and not _internal(frame):
            fallback = code.co_filename, frame.f_lineno
        frame = frame.f_back
    return fallback
