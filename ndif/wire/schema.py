"""Wire format v1: the messages between a client and an ndif server.

A `Request` carries a trace as data: its body as source text (with the file
name and line numbers it was written at), the inputs of each invoke, keyword
arguments, and the values the body captures from the user's scope. A `Result`
carries what the body saved, what it printed, timings and, on failure, a
structured error pointing at the user's own line. Values inside both are trees
built by `ndif.wire.values`. The whole message is MessagePack, zstd-compressed
(`ndif.wire.codec`). The schema is documented in ``docs/wire-format.md``.
"""

from __future__ import annotations

from typing import Any

import msgspec

PROTOCOL_VERSION = 1

#: What a request asks the server to run.
KINDS = ("trace", "generate", "scan", "session")


class ClientInfo(msgspec.Struct, frozen=True):
    """Who sent the request: the client library, its version and its Python."""

    library: str
    version: str
    python: str


class Source(msgspec.Struct, frozen=True):
    """A block of user code: its text and where it was written."""

    text: str
    filename: str
    first_line: int


class Request(msgspec.Struct, kw_only=True):
    """A trace (or generate/scan/session) to run on a model.

    ``inputs``/``kwargs`` are what was passed to ``model.trace(...)`` (invokes
    inside the body bring their own, from the body's source). ``captured`` maps
    each name the body reads from the user's scope to its value.
    """

    protocol: int = PROTOCOL_VERSION
    client: ClientInfo
    model: str
    kind: str
    body: Source
    inputs: list[Any] = []
    kwargs: dict[str, Any] = {}
    captured: dict[str, Any] = {}
    tracer_name: str | None = None  # the `as` name of the trace, if any


class Frame(msgspec.Struct, frozen=True):
    """One frame of a traceback, in the user's own code."""

    filename: str
    line: int
    name: str
    source: str = ""


class ErrorInfo(msgspec.Struct, frozen=True):
    """Why a request failed: the exception, and where in the user's code."""

    type: str
    message: str
    frames: list[Frame] = []
    notes: list[str] = []

    @property
    def line(self) -> Frame | None:
        """The innermost frame of the user's code (the line that failed)."""
        return self.frames[-1] if self.frames else None


class Timings(msgspec.Struct):
    """Seconds spent on each phase of running a request."""

    decode: float = 0.0
    run: float = 0.0
    encode: float = 0.0


class Result(msgspec.Struct, kw_only=True):
    """What running a request produced."""

    protocol: int = PROTOCOL_VERSION
    saved: dict[str, Any] = {}
    logs: list[str] = []
    timings: Timings = msgspec.field(default_factory=Timings)
    error: ErrorInfo | None = None


class BatchRequest(msgspec.Struct, kw_only=True):
    """Many requests submitted as one batch experiment; each item is an encoded `Request`."""

    protocol: int = PROTOCOL_VERSION
    name: str | None = None
    items: list[bytes] = []
