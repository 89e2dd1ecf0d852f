"""Rewrite a captured body before it is compiled.

A captured body is ordinary Python, with three spellings from NNsight that need
the engine's help and get it here, at the syntax level, instead of through
process-wide patches of ``object`` or ``torch.Tensor``:

* ``value.save()`` on any object becomes ``ndif__save(value)`` (an object with a
  ``save`` method of its own keeps it).
* ``with loss.backward(...):`` becomes a call that runs the real backward pass
  interleaved with the block; inside it, ``t.grad`` reads and ``t.grad = g``
  writes become requests for the gradient flowing through ``t``.
* ``for step in tracer.iter[...]:`` / ``tracer.all()`` loops are wrapped so that a
  loop asking for a generation step the run never makes ends quietly and the
  code after it still runs.

Line numbers are kept, so tracebacks point at the user's own lines.
"""

from __future__ import annotations

import ast
import copy
from types import CodeType

# No leading underscore: the sandbox's compiler (RestrictedPython) refuses such names.
PREFIX = "ndif__"
SAVE = "ndif__save"
GRAD = "ndif__grad"
SET_GRAD = "ndif__set_grad"
BACKWARD = "ndif__backward"
ITERATION_END = "ndif__IterationEnd"

#: Every name the rewritten code may reference; resolved by `ndif.tracing.scope.Scope`.
HELPER_NAMES = (SAVE, GRAD, SET_GRAD, BACKWARD, ITERATION_END)


def _name(identifier: str, node: ast.AST) -> ast.Name:
    return ast.copy_location(ast.Name(id=identifier, ctx=ast.Load()), node)


class _Saves(ast.NodeTransformer):
    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "save" and not node.args and not node.keywords:
            return ast.copy_location(ast.Call(func=_name(SAVE, node), args=[func.value], keywords=[]), node)
        return node


class _Grads(ast.NodeTransformer):
    """Inside a backward block: ``t.grad`` reads and writes go through the engine."""

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        self.generic_visit(node)
        if node.attr == "grad" and isinstance(node.ctx, ast.Load):
            return ast.copy_location(ast.Call(func=_name(GRAD, node), args=[node.value], keywords=[]), node)
        return node

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        if len(node.targets) == 1 and _is_grad_target(node.targets[0]):
            target = node.targets[0]
            value = self.visit(node.value)
            owner = self.visit(target.value)
            call = ast.Call(func=_name(SET_GRAD, node), args=[owner, value], keywords=[])
            return ast.copy_location(ast.Expr(value=call), node)
        self.generic_visit(node)
        return node

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        if _is_grad_target(node.target):
            owner = self.visit(node.target.value)
            current = ast.Call(func=_name(GRAD, node), args=[owner], keywords=[])
            combined = ast.BinOp(left=current, op=node.op, right=self.visit(node.value))
            call = ast.Call(func=_name(SET_GRAD, node), args=[copy.deepcopy(owner), combined], keywords=[])
            return ast.copy_location(ast.Expr(value=call), node)
        self.generic_visit(node)
        return node


def _is_grad_target(target: ast.AST) -> bool:
    return isinstance(target, ast.Attribute) and target.attr == "grad"


def _backward_call(node: ast.With) -> ast.Call | None:
    if len(node.items) != 1 or node.items[0].optional_vars is not None:
        return None
    expr = node.items[0].context_expr
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "backward":
        return expr
    return None


def _assigned_names(statements: list[ast.stmt]) -> list[str]:
    names: list[str] = []
    for statement in statements:
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)) and node.id not in names:
                names.append(node.id)
    return names


class _Backwards(ast.NodeTransformer):
    """``with t.backward(**kw): body`` -> ``def f(): body`` + ``ndif__backward(t, f, **kw)``."""

    def __init__(self) -> None:
        self.function_depth = 0

    def _nested(self, node: ast.AST) -> ast.AST:
        self.function_depth += 1
        self.generic_visit(node)
        self.function_depth -= 1
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef = _nested

    def visit_With(self, node: ast.With) -> ast.AST | list[ast.stmt]:
        call = _backward_call(node)
        if call is None:
            self.generic_visit(node)
            return node
        if self.function_depth:
            raise SyntaxError(
                "`with tensor.backward():` must be written directly in the trace body, "
                f"not inside a function (line {node.lineno})"
            )
        body = [_Grads().visit(statement) for statement in node.body]
        body = [self.visit(statement) for statement in body]
        names = _assigned_names(body)
        function_name = f"{PREFIX}backward_body_{node.lineno}"
        prologue: list[ast.stmt] = [ast.Global(names=names)] if names else []
        function = ast.FunctionDef(
            name=function_name,
            args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]),
            body=prologue + body,
            decorator_list=[],
            returns=None,
        )
        if "type_params" in ast.FunctionDef._fields:
            function.type_params = []
        invoke = ast.Call(
            func=_name(BACKWARD, node),
            args=[call.func.value, _name(function_name, node), *call.args],
            keywords=call.keywords,
        )
        ast.copy_location(function, node)
        return [function, ast.copy_location(ast.Expr(value=invoke), node)]


def _is_step_loop(node: ast.For) -> bool:
    target = node.iter
    if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Attribute):
        return target.value.attr == "iter"
    if isinstance(target, ast.Call) and isinstance(target.func, ast.Attribute):
        return target.func.attr == "all" and not target.args
    return False


class _StepLoops(ast.NodeTransformer):
    def visit_For(self, node: ast.For) -> ast.AST:
        self.generic_visit(node)
        if not _is_step_loop(node):
            return node
        handler = ast.ExceptHandler(type=_name(ITERATION_END, node), name=None, body=[ast.Pass()])
        return ast.copy_location(ast.Try(body=[node], handlers=[handler], orelse=[], finalbody=[]), node)


class _Annotations(ast.NodeTransformer):
    """Drops type annotations: a server compiles code without the modules they name."""

    def _arguments(self, node: ast.arguments) -> None:
        for arg in (*node.posonlyargs, *node.args, *node.kwonlyargs, node.vararg, node.kwarg):
            if arg is not None:
                arg.annotation = None

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        self._arguments(node.args)
        node.returns = None
        self.generic_visit(node)
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> ast.AST:
        self.generic_visit(node)
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST | None:
        if node.value is None:
            return None
        assign = ast.Assign(targets=[node.target], value=self.visit(node.value))
        return ast.copy_location(assign, node)


def strip_annotations(tree: ast.AST) -> ast.AST:
    """``tree`` without type annotations (its bodies keep their line numbers)."""
    return _Annotations().visit(tree)


def rewrite(statements: list[ast.stmt]) -> ast.Module:
    """Apply every rewrite to a copy of ``statements``; returns a compilable module."""
    module = ast.Module(body=copy.deepcopy(statements), type_ignores=[])
    module = _Backwards().visit(module)
    module = _Saves().visit(module)
    module = _StepLoops().visit(module)
    return ast.fix_missing_locations(module)


def compile_body(statements: list[ast.stmt], filename: str, name: str = "<trace>") -> CodeType:
    """Rewrite and compile a block body under its own file name and line numbers."""
    try:
        module = rewrite(statements)
    except SyntaxError as error:
        from .errors import TraceSyntaxError

        raise TraceSyntaxError(f"{filename}: {error}") from None
    code = compile(module, filename, "exec", dont_inherit=True)
    return code.replace(co_name=name)


def compile_source(source: str, filename: str, first_line: int = 1, name: str = "<trace>") -> CodeType:
    """Compile body source text (as shipped to a server) with its original line numbers."""
    tree = ast.parse(source, filename)
    ast.increment_lineno(tree, first_line - 1)
    return compile_body(tree.body, filename, name)
