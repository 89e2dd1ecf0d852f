"""Capture the body of a ``with`` block as source and keep it from running inline.

``with model.trace(x):`` must not run its body where it stands: the body has to
run later, interleaved with the model's forward pass (or on a server). This module
does the two halves of that trick:

* `capture` finds the ``with`` statement the caller is entering, from the source
  of the caller's frame (a file, an IPython/Jupyter cell, or ``python -c``), and
  compiles its body (see `ndif.tracing.rewrite`). Results are cached per call site.
* `skip_body` arms the caller's frame to raise `SkipBody` the instant the body is
  about to start (`ndif.tracing.skipping`); the tracer's ``__exit__`` catches it and
  runs the captured body instead.
"""

from __future__ import annotations

import ast
import linecache
import sys
import textwrap
import threading
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from types import CodeType, FrameType

from .errors import TraceSyntaxError
from .rewrite import compile_body
from .skipping import Armed, SkipBody, arm, disarm

__all__ = ["Armed", "Block", "SkipBody", "capture", "disarm", "skip_body"]


@dataclass(frozen=True)
class Block:
    """A captured ``with`` block.

    Attributes:
        node: The ``with`` statement's AST (line numbers are the file's own).
        code: The body, rewritten and compiled under the file's name and lines.
        filename: Where the block was written.
        lineno: Line of the ``with`` keyword.
        body_source: The body's source text, dedented (what travels to a server).
        body_lineno: Line of the body's first line in ``filename``.
        runs_inline: True for a body of only ``pass``/docstrings, which is
            harmless to run in place, so nothing needs to be skipped.
    """

    node: ast.With
    code: CodeType
    filename: str
    lineno: int
    body_source: str
    body_lineno: int
    runs_inline: bool


#: How captured bodies are compiled in this context: plainly, or by the sandbox.
COMPILER: ContextVar[Callable[[list[ast.stmt], str, str], CodeType]] = ContextVar("ndif_compiler", default=compile_body)

_lock = threading.Lock()
_SOURCES: dict[str, list[str]] = {}
_TREES: dict[str, ast.Module] = {}
_WITH_NODES: dict[str, list[ast.With]] = {}
_BLOCKS: dict[tuple, Block] = {}


def source_lines(filename: str) -> list[str]:
    """The source lines of ``filename``: a file, an IPython cell, or ``python -c``.

    Read once and cached, deliberately without re-checking the file: the code that
    is running is the code that was read first.
    """
    lines = _SOURCES.get(filename)
    if lines is None:
        lines = linecache.getlines(filename)
        if not lines and filename == "<string>" and "-c" in sys.orig_argv:
            program = sys.orig_argv[sys.orig_argv.index("-c") + 1]
            lines = program.splitlines(keepends=True)
        _SOURCES[filename] = lines
    return lines


def register_source(filename: str, source: str) -> None:
    """Make ``source`` readable under ``filename`` (for code built at run time)."""
    lines = source.splitlines(keepends=True)
    linecache.cache[filename] = (len(source), None, lines, filename)
    with _lock:
        _forget(filename)
        _SOURCES[filename] = lines


def forget_source(filename: str) -> None:
    """Drop everything cached about ``filename`` (a server's per-job sources)."""
    linecache.cache.pop(filename, None)
    with _lock:
        _forget(filename)


def _forget(filename: str) -> None:
    _SOURCES.pop(filename, None)
    _TREES.pop(filename, None)
    _WITH_NODES.pop(filename, None)
    for key in [key for key in _BLOCKS if key[0] == filename]:
        del _BLOCKS[key]


def parsed(filename: str) -> ast.Module | None:
    """The parsed source of ``filename`` (cached like its lines), or None if unreadable."""
    tree = _TREES.get(filename)
    if tree is None:
        lines = source_lines(filename)
        if not lines:
            return None
        tree = _TREES[filename] = ast.parse("".join(lines), filename)
    return tree


def _with_nodes(filename: str) -> list[ast.With]:
    nodes = _WITH_NODES.get(filename)
    if nodes is None:
        tree = parsed(filename)
        if tree is None:
            raise TraceSyntaxError(
                f"ndif cannot read the source of {filename}, so it cannot capture the body of "
                "the `with` block. A trace must be written in a file, a notebook cell or "
                "`python -c`; piped stdin and exec'd strings have no readable source "
                "(register one with ndif.tracing.capture.register_source)."
            )
        nodes = [n for n in ast.walk(tree) if isinstance(n, ast.With)]
        _WITH_NODES[filename] = nodes
    return nodes


def _find_with(filename: str, lineno: int) -> ast.With:
    candidates = [
        node
        for node in _with_nodes(filename)
        if node.lineno <= lineno < node.body[0].lineno or any(item.context_expr.lineno == lineno for item in node.items)
    ]
    if not candidates:
        raise TraceSyntaxError(
            f"ndif found no `with` statement at {filename}:{lineno}. Use the tracer as "
            "`with model.trace(...):` so its body can be captured."
        )
    # Innermost wins when headers share a line.
    return max(candidates, key=lambda node: node.lineno)


def _body_source(filename: str, node: ast.With) -> tuple[str, int]:
    lines = source_lines(filename)
    first = node.body[0].lineno
    last = node.body[-1].end_lineno or first
    return textwrap.dedent("".join(lines[first - 1 : last])), first


def capture(frame: FrameType) -> Block:
    """The block whose ``with`` statement ``frame`` is executing right now."""
    code = frame.f_code
    compiler = COMPILER.get()
    key = (code.co_filename, frame.f_lineno, code.co_firstlineno, code.co_name, compiler)
    block = _BLOCKS.get(key)
    if block is not None:
        return block
    with _lock:
        node = _find_with(code.co_filename, frame.f_lineno)
        body_source, body_lineno = _body_source(code.co_filename, node)
        compiled = compiler(node.body, code.co_filename, code.co_name)
        block = Block(
            node=node,
            code=compiled,
            filename=code.co_filename,
            lineno=node.lineno,
            body_source=body_source,
            body_lineno=body_lineno,
            runs_inline=_runs_inline(node),
        )
        _BLOCKS[key] = block
    return block


def _runs_inline(node: ast.With) -> bool:
    for statement in node.body:
        if isinstance(statement, ast.Pass):
            continue
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            continue
        return False
    return True


def skip_body(block: Block, frame: FrameType) -> Armed | None:
    """Arrange for ``frame`` to raise `SkipBody` when it reaches ``block``'s body.

    Returns what must be restored with `disarm` once the block is over (``None``
    when the body is harmless to run in place and nothing was armed).
    """
    if block.runs_inline:
        return None
    first = block.node.body[0]
    if first.lineno == block.lineno:
        raise TraceSyntaxError(
            f"{block.filename}:{block.lineno}: the body of a traced `with` must start on its "
            "own line; ndif runs the body itself and intercepts it at its first line."
        )
    if isinstance(first, ast.Try):
        raise TraceSyntaxError(
            f"{block.filename}:{first.lineno}: a traced `with` block cannot start with "
            "`try:`. Put another statement above the `try`, or move it outside the block."
        )
    return arm(frame, first.lineno)
