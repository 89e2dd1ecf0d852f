"""Keep a ``with`` block's body from running where it stands: raise `SkipBody` at its first line.

A tracer's ``__enter__`` arms the caller's frame (`arm`); when the frame is about to run
the body's first line, `SkipBody` is raised there, and the tracer's ``__exit__`` catches
it, disarms (`disarm`) and runs the captured body itself.

Two ways to see the frame reach that line:

* Python 3.12 and later: a ``sys.monitoring`` tool with LINE events on the caller's code
  object only. Nothing else in the process is instrumented, so other threads (a serving
  engine's, other users' traces) run at full speed.
* Otherwise (3.11, or every monitoring tool id taken): a line-trace function on the frame,
  with ``sys.settrace`` on for the thread. On 3.12 and later that would instrument every
  function of every thread while any frame is armed (about 2.4 times slower Python), and
  each arm and disarm would re-instrument them: hundreds of concurrent traces starving a
  serving engine's thread. Hence the first way wherever it exists.

This module uses only the standard library.
"""

from __future__ import annotations

import sys
import threading
from types import CodeType, FrameType
from typing import Any


class SkipBody(Exception):
    """Control flow: the body of a captured block was reached and must not run inline."""


class Armed:
    """One armed frame: what `disarm` must undo."""

    __slots__ = ("frame", "frame_trace", "thread_trace", "monitored")

    def __init__(self, frame: FrameType, frame_trace: Any = None, thread_trace: Any = None, monitored: bool = False):
        self.frame = frame
        self.frame_trace = frame_trace
        self.thread_trace = thread_trace
        self.monitored = monitored


#: Tool ids ndif may take, in order of preference (3 and 4 are unassigned by convention;
#: 0-2 and 5 are the debugger's, coverage's, the profiler's and the optimizer's).
_TOOL_IDS = (4, 3)

_lock = threading.Lock()
_tool: list[int] = []  # the monitoring tool id ndif holds, once taken ([] on 3.11 or if none was free)
_tool_tried = False
_body_lines: dict[FrameType, int] = {}  # armed frames (monitoring) -> their body's first line
_code_users: dict[CodeType, int] = {}  # code objects with LINE events on -> armed frames running them


def arm(frame: FrameType, body_line: int) -> Armed:
    """Make ``frame`` raise `SkipBody` when it reaches ``body_line`` (its next lines before
    that run normally)."""
    tool = _monitoring_tool()
    if tool is not None:
        return _arm_monitored(tool, frame, body_line)
    armed = Armed(frame, frame.f_trace, sys.gettrace())
    sys.settrace(_no_trace)
    frame.f_trace = _line_tracer(body_line)
    return armed


def disarm(armed: Armed | None) -> None:
    """Undo `arm` (the body was skipped, or the ``with`` ended another way)."""
    if armed is None or armed.frame is None:
        return
    frame, armed.frame = armed.frame, None  # type: ignore[assignment]
    if armed.monitored:
        _disarm_monitored(frame)
        return
    frame.f_trace = armed.frame_trace
    sys.settrace(armed.thread_trace)


# -- sys.monitoring (3.12+) ---------------------------------------------------------------


def _monitoring_tool() -> int | None:
    global _tool_tried
    if _tool_tried:
        return _tool[0] if _tool else None
    with _lock:
        if not _tool_tried:
            monitoring = getattr(sys, "monitoring", None)
            if monitoring is not None:
                for tool in _TOOL_IDS:
                    try:
                        monitoring.use_tool_id(tool, "ndif")
                    except ValueError:  # another tool holds it
                        continue
                    monitoring.register_callback(tool, monitoring.events.LINE, _on_line)
                    _tool.append(tool)
                    break
            _tool_tried = True
    return _tool[0] if _tool else None


def _arm_monitored(tool: int, frame: FrameType, body_line: int) -> Armed:
    code = frame.f_code
    with _lock:
        _body_lines[frame] = body_line
        users = _code_users.get(code, 0)
        _code_users[code] = users + 1
        if users == 0:
            sys.monitoring.set_local_events(tool, code, sys.monitoring.events.LINE)
    return Armed(frame, monitored=True)


def _disarm_monitored(frame: FrameType) -> None:
    code = frame.f_code
    with _lock:
        _body_lines.pop(frame, None)
        users = _code_users.pop(code, 1) - 1
        if users > 0:
            _code_users[code] = users
        elif _tool:
            sys.monitoring.set_local_events(_tool[0], code, 0)


def _on_line(code: CodeType, line: int) -> None:
    # Every frame running an armed code object reports its lines here, armed or not (other
    # threads' calls of the same function): only an armed frame at its body raises.
    frame = sys._getframe(1)
    body_line = _body_lines.get(frame)
    if body_line is not None and line >= body_line:
        raise SkipBody()


# -- sys.settrace (3.11, or no free tool id) ------------------------------------------------


def _no_trace(*_: Any) -> None:
    return None


_LINE_TRACERS: dict[int, Any] = {}


def _line_tracer(body_line: int) -> Any:
    """A frame trace function that raises `SkipBody` once the frame reaches ``body_line``."""
    tracer = _LINE_TRACERS.get(body_line)
    if tracer is None:

        def tracer(current: FrameType, event: str, arg: Any) -> Any:
            if current.f_lineno < body_line:
                return tracer
            raise SkipBody()

        _LINE_TRACERS[body_line] = tracer
    return tracer
