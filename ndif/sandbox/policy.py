"""Compiling untrusted trace bodies: ndif's rewrites, then RestrictedPython's guards.

A body is first rewritten like any trace body (`ndif.tracing.rewrite`: ``.save()``,
backward blocks, step loops), then transformed by RestrictedPython, which refuses
names and attributes starting with ``_`` (no ``__subclasses__``, ``__globals__``,
...), frame and code attributes (``gi_frame``, ``f_back``, ...), ``exec``/``eval``
and ``nonlocal``, and routes every attribute read, item read, write, iteration,
unpacking, import and print through guard functions (`ndif.sandbox.guards`).

`SandboxTransformer` relaxes what research code needs and adds one thing:

* ``h[:, -1] += v`` and ``self.n += 1`` (augmented writes, through the write guard);
* ``super().__init__(...)`` in a class body;
* the usual dunder methods in class bodies (``__call__``, ``__len__``, ...);
* a call to ``_tick_()`` at the top of every loop body and function, so a job past
  its time limit stops even in a tight loop that catches exceptions.
"""

from __future__ import annotations

import ast
import functools
import re
from types import CodeType

from RestrictedPython.transformer import ALLOWED_FUNC_NAMES, RestrictingNodeTransformer

from ..tracing.errors import TraceSyntaxError
from ..tracing.rewrite import rewrite, strip_annotations

#: Dunder methods a user class may define (never __getattr__/__setattr__/__del__/
#: __reduce__/__get__/__set__/__init_subclass__: hooks into attribute access,
#: finalization, pickling or class creation).
METHOD_NAMES = ALLOWED_FUNC_NAMES | frozenset(
    {
        "__call__",
        "__repr__",
        "__str__",
        "__len__",
        "__getitem__",
        "__setitem__",
        "__iter__",
        "__next__",
        "__bool__",
        "__hash__",
        "__add__",
        "__radd__",
        "__sub__",
        "__rsub__",
        "__mul__",
        "__rmul__",
        "__matmul__",
        "__truediv__",
        "__neg__",
        "__enter__",
        "__exit__",
    }
)

TICK = "_tick_"


class SandboxSyntaxError(TraceSyntaxError):
    """Code the sandbox refuses to compile; ``lineno`` is the first offending line."""

    def __init__(self, filename: str, problems: list[str]) -> None:
        self.filename = filename
        self.problems = problems
        first = re.match(r"Line (\d+)", problems[0]) if problems else None
        self.lineno = int(first.group(1)) if first else None
        super().__init__(f"this code is not allowed in a remote trace: {'; '.join(problems)}")


#: The guard of ``a * b``, ``a ** b`` and ``a << b``: the operators that can build a huge
#: string, list or integer inside one C call, which no time limit can interrupt.
BINOP = "_binop_"
_GUARDED_OPERATORS = {ast.Mult: "*", ast.Pow: "**", ast.LShift: "<<"}


def _tick(node: ast.AST) -> ast.stmt:
    call = ast.Expr(value=ast.Call(func=ast.Name(id=TICK, ctx=ast.Load()), args=[], keywords=[]))
    return ast.copy_location(call, node)


class SandboxTransformer(RestrictingNodeTransformer):
    """RestrictedPython's policy, adjusted for trace bodies (see the module docstring)."""

    def check_name(self, node: ast.AST, name: str | None, allow_magic_methods: bool = False) -> None:
        if allow_magic_methods and name in METHOD_NAMES:
            return
        super().check_name(node, name, allow_magic_methods)

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        # `super().__init__(...)`: the one dunder attribute a class body needs.
        if (
            node.attr == "__init__"
            and isinstance(node.ctx, ast.Load)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)
            and node.value.func.id == "super"
            and not node.value.args
        ):
            return node
        return super().visit_Attribute(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        if isinstance(node.target, (ast.Subscript, ast.Attribute)):
            node = self.node_contents_visit(node)
            target = node.target
            # The target was visited as a store: its object is already `_write_(...)`.
            target.ctx = ast.Store()
            return node
        return super().visit_AugAssign(node)

    def _ticked(self, node: ast.AST, at_body: bool = False) -> ast.AST:
        position = 0
        while position < len(node.body) and isinstance(node.body[position], (ast.Global, ast.Nonlocal)):
            position += 1
        # A loop's check points at the loop; a function's at its first statement, so a
        # RecursionError the check raises points at the body rather than at the `def`.
        anchor = node.body[position] if at_body and position < len(node.body) else node
        node.body.insert(position, _tick(anchor))
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        node = self.node_contents_visit(node)
        symbol = _GUARDED_OPERATORS.get(type(node.op))
        if symbol is None:
            return node
        call = ast.Call(
            func=ast.Name(id=BINOP, ctx=ast.Load()), args=[ast.Constant(symbol), node.left, node.right], keywords=[]
        )
        return ast.copy_location(call, node)

    def visit_Yield(self, node: ast.Yield) -> ast.AST:
        # A generator's `finally` could run after its job, when its guards are gone.
        self.error(node, "yield (generator functions) is not allowed in a remote trace")
        return node

    visit_YieldFrom = visit_Yield

    def visit_For(self, node: ast.For) -> ast.AST:
        return self._ticked(super().visit_For(node))

    def visit_While(self, node: ast.While) -> ast.AST:
        return self._ticked(super().visit_While(node))

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        return self._ticked(super().visit_FunctionDef(node), at_body=True)


def compile_restricted_body(statements: list[ast.stmt], filename: str, name: str = "<trace>") -> CodeType:
    """Rewrite, guard and compile a body; raises `TraceSyntaxError` listing every violation."""
    try:
        module = strip_annotations(rewrite(statements))
    except SyntaxError as error:
        raise TraceSyntaxError(f"{filename}: {error}") from None
    errors: list[str] = []
    transformer = SandboxTransformer(errors=errors, warnings=[], used_names={})
    guarded = transformer.visit(module)
    if errors:
        raise SandboxSyntaxError(filename, errors)
    ast.fix_missing_locations(guarded)
    return compile(guarded, filename, "exec", dont_inherit=True).replace(co_name=name)


def compile_restricted_source(source: str, filename: str, first_line: int = 1, name: str = "<trace>") -> CodeType:
    """`compile_restricted_body` for source text whose first line is ``first_line`` of ``filename``.

    Compiled once per distinct source (`_compiled_once`): a batch of jobs running the same
    code, each under a file name of its own, costs one compile (milliseconds each) rather
    than one per job, on the thread the worker shares with its engine."""
    try:
        code = _compiled_once(source, first_line, name)
    except TraceSyntaxError:  # compile again under the job's own file name, for the message
        return _compile_source(source, filename, first_line, name)
    return _renamed(code, filename)


_TEMPLATE_FILENAME = "<ndif-sandbox-template>"


@functools.lru_cache(maxsize=256)
def _compiled_once(source: str, first_line: int, name: str) -> CodeType:
    # A pure function of its arguments: the same source compiles to the same code for every job.
    return _compile_source(source, _TEMPLATE_FILENAME, first_line, name)


def _renamed(code: CodeType, filename: str) -> CodeType:
    """``code``, and the code nested in it (functions, lambdas, comprehensions), under ``filename``."""
    consts = tuple(_renamed(const, filename) if isinstance(const, CodeType) else const for const in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


def _compile_source(source: str, filename: str, first_line: int, name: str) -> CodeType:
    try:
        tree = ast.parse(source, filename)
    except SyntaxError as error:
        raise TraceSyntaxError(f"{filename}:{(error.lineno or 1) + first_line - 1}: {error.msg}") from None
    ast.increment_lineno(tree, first_line - 1)
    return compile_restricted_body(tree.body, filename, name)
