"""The sandbox compiles a body once per distinct source, and each job still gets code under
its own file name (its tracebacks and error messages point at its own source)."""

from __future__ import annotations

from types import CodeType

import pytest

from ndif.sandbox.policy import SandboxSyntaxError, _compiled_once, compile_restricted_source
from ndif.tracing.errors import TraceSyntaxError

SOURCE = """total = 0
def helper(x):
    return [y * 2 for y in range(x)]
for step in range(3):
    total += sum(helper(step))
"""


def _filenames(code: CodeType) -> set[str]:
    names = {code.co_filename}
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _filenames(const)
    return names


def test_the_same_source_compiles_once_and_each_job_gets_its_own_file_name():
    _compiled_once.cache_clear()
    first = compile_restricted_source(SOURCE, "<ndif-sandbox:job-a:0>", 7)
    second = compile_restricted_source(SOURCE, "<ndif-sandbox:job-b:0>", 7)
    info = _compiled_once.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    assert _filenames(first) == {"<ndif-sandbox:job-a:0>"}  # the function and comprehension too
    assert _filenames(second) == {"<ndif-sandbox:job-b:0>"}
    assert first.co_code == second.co_code and first.co_firstlineno == second.co_firstlineno


def test_a_refused_body_names_each_jobs_own_file():
    body = "x = 1\ny = x.__class__\n"
    for job in ("job-c", "job-d"):
        with pytest.raises(SandboxSyntaxError) as caught:
            compile_restricted_source(body, f"<ndif-sandbox:{job}:0>", 1)
        assert caught.value.filename == f"<ndif-sandbox:{job}:0>"


def test_a_syntax_error_names_the_jobs_file_and_line():
    with pytest.raises(TraceSyntaxError, match=r"<ndif-sandbox:job-e:0>:12:"):
        compile_restricted_source("x = 1\ny = (\n", "<ndif-sandbox:job-e:0>", 11)
