"""The hostile corpus: broken and malicious trace bodies run through the sandbox.

Every case below is one trace body run with ``remote="local"`` (encoded to the wire
format, decoded, compiled by the sandbox's policy and run under its guards, the
torch-level mode and the job's limits, exactly as a server would) on a tiny Llama
private to this file. Each case states its precise outcome: the exception type the
client sees, a fragment of its message, and the line of this file the traceback's
last frame of this file must point at (tagged ``# @name``; `line_of` finds it).

After every case the process must be as it was (`health_problems`): the model's
weights bit-identical to a snapshot and still protected, no hooks or monkey-patches
on any module, torch's global settings unchanged, no mode left on the stack, no trace
function, no thread but the one ``ndif-watchdog``, and a local trace and a
``remote="local"`` trace both still giving the reference values. A case that breaks
the process is reported as a failure, and the damage is undone so that the next case
starts clean. `test_corpus_again_in_one_go` runs the whole corpus once more without
any repair in between.
"""

# Bodies are literal code, written as a user writes them: traces nest inside `with`
# blocks, read attributes for their effect, bind names they never use, and poke at
# names ruff would rather not see.
# ruff: noqa: SIM117, SIM115, B009, B010, E701, F401, F821, UP030, UP032

from __future__ import annotations

import gc
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import _get_current_function_mode_stack

import ndif
from ndif.remote import local_backend
from ndif.sandbox import (
    JobLimits,
    MemoryLimitExceeded,
    SandboxViolation,
    SaveLimitExceeded,
    TimeLimitExceeded,
)
from ndif.sandbox.policy import SandboxSyntaxError
from ndif.wire import WireError

PROMPT = "The Eiffel Tower is in"
THIS_FILE = os.path.realpath(__file__)
SOURCE_LINES = Path(THIS_FILE).read_text().splitlines()

#: Limits of the cases that test one limit (everything else at the server's defaults).
FAST = JobLimits(time_s=0.5)
SMALL_ALLOCATIONS = JobLimits(max_allocation_bytes=1 << 20)
SMALL_SAVES = JobLimits(max_saved_bytes=1 << 20)
SMALL_GROWTH = JobLimits(max_memory_growth_bytes=256 << 20)
#: How long a job limited to FAST may take, end to end (the watchdog wakes every 50 ms).
FAST_WALL_S = 1.5


# -- locating lines -----------------------------------------------------------------------------


def line_of(tag: str) -> int:
    """The line of this file tagged ``# @tag``."""
    pattern = re.compile(rf"# @{re.escape(tag)}(\s|$)")
    hits = [number for number, text in enumerate(SOURCE_LINES, 1) if pattern.search(text)]
    assert len(hits) == 1, f"tag {tag!r} found on lines {hits}"
    return hits[0]


def describe(frames: list[traceback.FrameSummary]) -> str:
    return "\n".join(f"  {f.filename}:{f.lineno} in {f.name}: {f.line}" for f in frames)


def pointing_problem(error: BaseException, tag: str) -> str | None:
    """Why the traceback's last frame in this file is not the line tagged ``tag`` (None if it is)."""
    frames = traceback.extract_tb(error.__traceback__)
    mine = [f for f in frames if os.path.realpath(f.filename) == THIS_FILE]
    expected = line_of(tag)
    if not mine:
        return f"no frame of the test file in the traceback (expected line {expected}):\n{describe(frames)}"
    if mine[-1].lineno != expected:
        return (
            f"the traceback's last frame in the test file is line {mine[-1].lineno} "
            f"({mine[-1].line!r}), expected line {expected} (@{tag}):\n{describe(frames)}"
        )
    return None


# -- the corpus ---------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    body: Callable[[Any], Any]
    error: type[BaseException] | None  # None: the trace must complete
    fragment: str | None  # in str(error)
    tag: str | None  # the line the error must point at
    seconds: float | None = None  # the most the case may take, end to end


CASES: list[Case] = []


def hostile(
    error: type[BaseException] | None,
    fragment: str | None = None,
    *,
    tag: str | None = None,
    seconds: float | None = None,
) -> Callable:
    """Register a case; its body is the function, its tag defaults to its name without ``case_``."""

    def register(function: Callable) -> Callable:
        name = function.__name__.removeprefix("case_")
        CASES.append(Case(name, function, error, fragment, None if error is None else tag or name, seconds))
        return function

    return register


def run_case(model: ndif.LanguageModel, case: Case) -> list[str]:
    """Run one case; the ways its outcome differs from the expected one."""
    started = time.perf_counter()
    try:
        returned = case.body(model)
    except KeyboardInterrupt:
        raise
    except BaseException as caught:  # any outcome, compared below
        error: BaseException | None = caught
    else:
        error = None
    elapsed = time.perf_counter() - started
    problems = []
    if case.seconds is not None and elapsed > case.seconds:
        problems.append(f"[{case.name}] took {elapsed:.2f} s, more than {case.seconds} s")
    if case.error is None:
        if error is not None:
            problems.append(f"[{case.name}] expected no error, got {type(error).__name__}: {error}")
        return problems
    if error is None:
        problems.append(
            f"[{case.name}] expected {case.error.__name__} ({case.fragment!r}), but the body ran without "
            f"error and returned {str(returned)[:300]!r}"
        )
        return problems
    if type(error) is not case.error:
        problems.append(f"[{case.name}] expected {case.error.__name__}, got {type(error).__name__}: {error}")
    if case.fragment is not None and case.fragment not in str(error):
        problems.append(f"[{case.name}] expected {case.fragment!r} in the message, got: {error}")
    where = pointing_problem(error, case.tag)
    if where is not None:
        problems.append(f"[{case.name}] {where}")
    return problems


# Compile-time refusals: dunders ------------------------------------------------------------------


@hostile(SandboxSyntaxError, '"__subclasses__" is an invalid attribute name')
def case_subclasses(model):
    with model.trace(PROMPT, remote="local"):
        classes = object.__subclasses__()  # @subclasses


@hostile(SandboxSyntaxError, '"__class__" is an invalid attribute name')
def case_class(model):
    with model.trace(PROMPT, remote="local"):
        kind = model.lm_head.output.__class__  # @class


@hostile(SandboxSyntaxError, '"__bases__" is an invalid attribute name')
def case_bases(model):
    with model.trace(PROMPT, remote="local"):
        bases = int.__bases__  # @bases


@hostile(SandboxSyntaxError, '"__mro__" is an invalid attribute name')
def case_mro(model):
    with model.trace(PROMPT, remote="local"):
        chain = torch.Tensor.__mro__  # @mro


@hostile(SandboxSyntaxError, '"__globals__" is an invalid attribute name')
def case_globals_attribute(model):
    with model.trace(PROMPT, remote="local"):
        scope = torch.nn.functional.relu.__globals__  # @globals_attribute


@hostile(SandboxSyntaxError, '"__builtins__" is an invalid variable name')
def case_builtins_name(model):
    with model.trace(PROMPT, remote="local"):
        table = __builtins__  # @builtins_name


@hostile(SandboxSyntaxError, '"__dict__" is an invalid attribute name')
def case_dict(model):
    with model.trace(PROMPT, remote="local"):
        inside = model.lm_head.__dict__  # @dict


@hostile(SandboxSyntaxError, '"__code__" is an invalid attribute name')
def case_code(model):
    with model.trace(PROMPT, remote="local"):

        def helper():
            return 1

        code = helper.__code__  # @code


@hostile(SandboxSyntaxError, '"__del__" is an invalid variable name')
def case_finalizer_method(model):
    with model.trace(PROMPT, remote="local"):

        class Lingering:
            def __del__(self):  # @finalizer_method
                pass


@hostile(SandboxSyntaxError, '"__import__" is an invalid variable name')
def case_dunder_import(model):
    with model.trace(PROMPT, remote="local"):
        os_module = __import__("os")  # @dunder_import


@hostile(SandboxSyntaxError, '"__class__" is an invalid attribute name')
def case_fstring_dunder(model):
    with model.trace(PROMPT, remote="local"):
        text = f"{model.lm_head.output.__class__}"  # @fstring_dunder


# Compile-time refusals: frames, tracebacks, generators, coroutines ----------------------------------


@hostile(SandboxSyntaxError, '"gi_frame" is a restricted name')
def case_gi_frame(model):
    with model.trace(PROMPT, remote="local"):
        gen = (number for number in [1, 2])
        frame = gen.gi_frame  # @gi_frame


@hostile(SandboxSyntaxError, '"f_back" is a restricted name')
def case_f_back(model):
    with model.trace(PROMPT, remote="local"):
        gen = (number for number in [1, 2])
        frame = gen.gi_frame.f_back  # @f_back


@hostile(SandboxSyntaxError, '"f_globals" is a restricted name')
def case_f_globals(model):
    with model.trace(PROMPT, remote="local"):
        scope = None
        try:
            1 / 0
        except ZeroDivisionError as error:
            scope = error.with_traceback(None).f_globals  # @f_globals


@hostile(SandboxSyntaxError, '"tb_frame" is a restricted name')
def case_tb_frame(model):
    with model.trace(PROMPT, remote="local"):
        frame = None
        try:
            1 / 0
        except ZeroDivisionError as error:
            frame = error.__traceback__.tb_frame  # @tb_frame


@hostile(SandboxSyntaxError, '"cr_frame" is a restricted name')
def case_cr_frame(model):
    with model.trace(PROMPT, remote="local"):
        waiting = model.lm_head
        frame = waiting.cr_frame  # @cr_frame


@hostile(SandboxSyntaxError, "AsyncFunctionDef statements are not allowed")
def case_coroutine(model):
    with model.trace(PROMPT, remote="local"):

        async def later():  # @coroutine
            return 1


@hostile(SandboxSyntaxError, "Eval calls are not allowed")
def case_eval(model):
    with model.trace(PROMPT, remote="local"):
        value = eval("1 + 1")  # @eval


@hostile(SandboxSyntaxError, "Exec calls are not allowed")
def case_exec(model):
    with model.trace(PROMPT, remote="local"):
        exec("import os")  # @exec


@hostile(SandboxSyntaxError, '"_C" is an invalid variable name')
def case_from_torch_import_C(model):
    with model.trace(PROMPT, remote="local"):
        from torch import _C  # @from_torch_import_C


# Runtime refusals: names built at run time, format strings --------------------------------------------


@hostile(SandboxViolation, "the attribute '__class__' is not available in a remote trace")
def case_getattr_built_dunder(model):
    with model.trace(PROMPT, remote="local"):
        kind = getattr(model.lm_head.output, "__cl" + "ass__")  # @getattr_built_dunder


@hostile(SandboxViolation, "the attribute 'gi_frame' is not available in a remote trace")
def case_getattr_built_frame(model):
    with model.trace(PROMPT, remote="local"):
        gen = (number for number in [1, 2])
        frame = getattr(gen, "gi_" + "frame")  # @getattr_built_frame


@hostile(SandboxViolation, "the attribute '__subclasses__' is not available in a remote trace")
def case_getattr_name_variable(model):
    with model.trace(PROMPT, remote="local"):
        name = "".join(["__", "sub", "classes", "__"])
        found = getattr(object, name)  # @getattr_name_variable


@hostile(SandboxViolation, "the attribute '__globals__' is not available in a remote trace")
def case_setattr_built_dunder(model):
    with model.trace(PROMPT, remote="local"):

        class Holder:
            pass

        setattr(Holder(), "__glob" + "als__", {})  # @setattr_built_dunder


@hostile(SandboxViolation, "str.format is not available in a remote trace")
def case_str_format(model):
    with model.trace(PROMPT, remote="local"):
        text = "{0.__class__.__mro__}".format(model.lm_head.output)  # @str_format


@hostile(SandboxViolation, "str.format is not available in a remote trace")
def case_str_format_map(model):
    with model.trace(PROMPT, remote="local"):
        text = "{x.__class__}".format_map({"x": 1})  # @str_format_map


@hostile(SandboxViolation, "not available in a remote trace")
def case_str_format_through_the_class(model):
    with model.trace(PROMPT, remote="local"):
        text = str.format("{0.__class__.__base__.__subclasses__}", 1)  # @str_format_through_the_class
        text = ndif.save(text)
    return text


# Runtime refusals: builtins that are not there --------------------------------------------------------


@hostile(NameError, "name 'type' is not defined")
def case_type(model):
    with model.trace(PROMPT, remote="local"):
        kind = type(model.lm_head.output)  # @type


@hostile(NameError, "name 'vars' is not defined")
def case_vars(model):
    with model.trace(PROMPT, remote="local"):
        names = vars()  # @vars


@hostile(NameError, "name 'globals' is not defined")
def case_globals(model):
    with model.trace(PROMPT, remote="local"):
        names = globals()  # @globals


@hostile(NameError, "name 'locals' is not defined")
def case_locals(model):
    with model.trace(PROMPT, remote="local"):
        names = locals()  # @locals


@hostile(NameError, "name 'compile' is not defined")
def case_compile(model):
    with model.trace(PROMPT, remote="local"):
        code = compile("import os", "<x>", "exec")  # @compile


@hostile(NameError, "name 'open' is not defined")
def case_open(model):
    with model.trace(PROMPT, remote="local"):
        secret = open("/etc/passwd").read()  # @open


# Runtime refusals: imports ------------------------------------------------------------------------------


@hostile(SandboxViolation, "import os is not allowed in a remote trace")
def case_import_os(model):
    with model.trace(PROMPT, remote="local"):
        import os  # @import_os


@hostile(SandboxViolation, "import sys is not allowed in a remote trace")
def case_import_sys(model):
    with model.trace(PROMPT, remote="local"):
        import sys  # @import_sys


@hostile(SandboxViolation, "import subprocess is not allowed in a remote trace")
def case_import_subprocess(model):
    with model.trace(PROMPT, remote="local"):
        import subprocess  # @import_subprocess


@hostile(SandboxViolation, "import pickle is not allowed in a remote trace")
def case_import_pickle(model):
    with model.trace(PROMPT, remote="local"):
        import pickle  # @import_pickle

        value = pickle.loads(b"\x80\x04\x95\x15\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06getcwd\x93)R.")


@hostile(SandboxViolation, "import io is not allowed in a remote trace")
def case_import_io(model):
    with model.trace(PROMPT, remote="local"):
        import io  # @import_io


@hostile(SandboxSyntaxError, '"builtins" is a reserved name')
def case_import_builtins(model):
    with model.trace(PROMPT, remote="local"):
        import builtins  # @import_builtins


@hostile(SandboxViolation, "import ctypes is not allowed in a remote trace")
def case_import_ctypes(model):
    with model.trace(PROMPT, remote="local"):
        from ctypes import pythonapi  # @import_ctypes


@hostile(SandboxViolation, "import importlib is not allowed in a remote trace")
def case_import_importlib(model):
    with model.trace(PROMPT, remote="local"):
        import importlib  # @import_importlib


@hostile(SandboxViolation, "import torch._C is not allowed in a remote trace")
def case_import_torch_C(model):
    with model.trace(PROMPT, remote="local"):
        import torch._C  # @import_torch_C


@hostile(SandboxViolation, "import torch.utils.cpp_extension is not allowed in a remote trace")
def case_import_cpp_extension(model):
    with model.trace(PROMPT, remote="local"):
        from torch.utils.cpp_extension import load_inline  # @import_cpp_extension


# Runtime refusals: torch's doors out --------------------------------------------------------------------


@hostile(SandboxViolation, "torch.load is not available in a remote trace (it unpickles data)")
def case_torch_load(model):
    with model.trace(PROMPT, remote="local"):
        payload = b"\x80\x04\x95\x15\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06getcwd\x93)R."
        value = torch.load(payload)  # @torch_load


@hostile(SandboxViolation, "torch.save is not available in a remote trace (it writes files)")
def case_torch_save(model):
    with model.trace(PROMPT, remote="local"):
        torch.save(model.lm_head.output, "/tmp/ndif-hostile.pt")  # @torch_save


@hostile(SandboxViolation, "torch.ops is not available in a remote trace")
def case_torch_ops(model):
    with model.trace(PROMPT, remote="local"):
        h = model.lm_head.output
        doubled = torch.ops.aten.add.Tensor(h, h)  # @torch_ops


@hostile(SandboxViolation, "torch.classes is not available in a remote trace")
def case_torch_classes(model):
    with model.trace(PROMPT, remote="local"):
        loaded = torch.classes.loaded_libraries  # @torch_classes


@hostile(SandboxViolation, "torch.utils is not available in a remote trace")
def case_torch_cpp_extension(model):
    with model.trace(PROMPT, remote="local"):
        build = torch.utils.cpp_extension.load_inline  # @torch_cpp_extension


@hostile(SandboxViolation, "torch.hub is not available in a remote trace")
def case_torch_hub(model):
    with model.trace(PROMPT, remote="local"):
        other = torch.hub.load("someone/repo", "model")  # @torch_hub


@hostile(SandboxViolation, "torch.jit is not available in a remote trace")
def case_torch_jit(model):
    with model.trace(PROMPT, remote="local"):
        scripted = torch.jit.script(torch.nn.Linear(2, 2))  # @torch_jit


@hostile(SandboxViolation, "torch.manual_seed is not available in a remote trace")
def case_torch_manual_seed(model):
    with model.trace(PROMPT, remote="local"):
        torch.manual_seed(1234)  # @torch_manual_seed


@hostile(SandboxViolation, "torch.set_default_dtype is not available in a remote trace")
def case_torch_set_default_dtype(model):
    with model.trace(PROMPT, remote="local"):
        torch.set_default_dtype(torch.float64)  # @torch_set_default_dtype


@hostile(SandboxViolation, "torch.set_grad_enabled is not available in a remote trace")
def case_torch_set_grad_enabled(model):
    with model.trace(PROMPT, remote="local"):
        torch.set_grad_enabled(False)  # @torch_set_grad_enabled


@hostile(SandboxViolation, "not available in a remote trace")
def case_default_generator_seed(model):
    with model.trace(PROMPT, remote="local"):
        torch.default_generator.manual_seed(1234)  # @default_generator_seed


@hostile(SandboxViolation, "not available in a remote trace")
def case_autocast_switch(model):
    with model.trace(PROMPT, remote="local"):
        torch.set_autocast_cpu_enabled(True)  # @autocast_switch


@hostile(SandboxViolation, "not available in a remote trace")
def case_storage_from_file(model):
    with model.trace(PROMPT, remote="local"):
        stolen = torch.Storage.from_file("/etc/passwd", False, 4)  # @storage_from_file
        text = ndif.save(str(stolen))
    return text


@hostile(SandboxViolation, "not available in a remote trace")
def case_distribution_defaults(model):
    with model.trace(PROMPT, remote="local"):
        torch.distributions.Distribution.set_default_validate_args(False)  # @distribution_defaults


@hostile(None)
def case_shared_class_dict(model):
    with model.trace(PROMPT, remote="local"):
        constraints = torch.distributions.Normal.arg_constraints
        constraints["planted"] = 1  # @shared_class_dict
    assert "planted" not in torch.distributions.Normal.arg_constraints


# Monkey-patching torch ---------------------------------------------------------------------------------


@hostile(SandboxViolation, "cannot modify a ndif.sandbox.guards.Library in a remote trace")
def case_patch_torch_add(model):
    with model.trace(PROMPT, remote="local"):
        torch.add = lambda a, b: a  # @patch_torch_add


@hostile(SandboxViolation, "cannot modify a ndif.sandbox.guards.Library in a remote trace")
def case_patch_torch_setattr(model):
    with model.trace(PROMPT, remote="local"):
        setattr(torch, "add", lambda a, b: a)  # @patch_torch_setattr


@hostile(SandboxViolation, "cannot modify torch.Tensor in a remote trace")
def case_patch_tensor_method(model):
    with model.trace(PROMPT, remote="local"):
        torch.Tensor.add = lambda self, other: self  # @patch_tensor_method


@hostile(SandboxViolation, "cannot modify a ndif.sandbox.guards.Library in a remote trace")
def case_patch_functional(model):
    with model.trace(PROMPT, remote="local"):
        torch.nn.functional.relu = lambda x: x * 0  # @patch_functional


# Monkey-patching the model -----------------------------------------------------------------------------


@hostile(SandboxViolation, "cannot set .forward of model.lm_head in a remote trace")
def case_patch_module_forward(model):
    with model.trace(PROMPT, remote="local"):
        model.lm_head.forward = lambda x: x * 0  # @patch_module_forward


@hostile(SandboxViolation, "model.model.layers.0.register_forward_hook is not available in a remote trace")
def case_register_forward_hook(model):
    with model.trace(PROMPT, remote="local"):

        def spy(module, args, output):
            return output * 0

        model.model.layers[0].register_forward_hook(spy)  # @register_forward_hook


@hostile(AttributeError, "an envoy does not expose its module's private attributes")
def case_unbound_module_method_hook(model):
    with model.trace(PROMPT, remote="local"):

        def spy(module, args, output):
            return output * 0

        torch.nn.Module.register_forward_hook(model.lm_head, spy)  # @unbound_module_method_hook


@hostile(AttributeError, "an envoy does not expose its module's private attributes")
def case_unbound_module_method_half(model):
    with model.trace(PROMPT, remote="local"):
        torch.nn.Module.half(model.lm_head)  # @unbound_module_method_half


@hostile(SandboxViolation, "cannot set .foo of model in a remote trace")
def case_attach_module(model):
    with model.trace(PROMPT, remote="local"):
        model.foo = torch.nn.Linear(2, 2)  # @attach_module


@hostile(SandboxViolation, "cannot delete .lm_head of model in a remote trace")
def case_delete_module(model):
    with model.trace(PROMPT, remote="local"):
        del model.lm_head  # @delete_module


@hostile(SandboxViolation, "cannot modify a ndif.sandbox.guards.ConfigView in a remote trace")
def case_config_write(model):
    with model.trace(PROMPT, remote="local"):
        model.config.x = 1  # @config_write


@hostile(AttributeError, "has no submodule or attribute '_module'")
def case_envoy_get_module(model):
    with model.trace(PROMPT, remote="local"):
        real = model.get("lm_head._module")  # @envoy_get_module
        real.weight = torch.nn.Parameter(torch.zeros(512, 64))


@hostile(AttributeError, "has no submodule or attribute '__init__'")
def case_envoy_get_globals(model):
    with model.trace(PROMPT, remote="local"):
        scope = model.get("__init__.__globals__")  # @envoy_get_globals
        table = scope["__builtins__"]
        count = table["eval"]("len(__import__('sys').modules)", {"__builtins__": table})
        count = ndif.save(count)
    return count


@hostile(SandboxViolation, "tracer.model is not available in a remote trace")
def case_tracer_internals(model):
    with model.trace(PROMPT, remote="local") as tracer:
        inner = tracer.model  # @tracer_internals


@hostile(SandboxViolation, "the tokenizer is not available inside a remote trace")
def case_tokenizer(model):
    with model.trace(PROMPT, remote="local"):
        files = model.tokenizer.save_pretrained("/tmp/ndif-hostile")  # @tokenizer


# Writing the weights --------------------------------------------------------------------------------


@hostile(SandboxViolation, "cannot modify the model's weights in a remote trace")
def case_weight_setitem(model):
    with model.trace(PROMPT, remote="local"):
        model.lm_head.weight[:] = 0  # @weight_setitem


@hostile(SandboxViolation, "cannot modify the model's weights in a remote trace")
def case_weight_data_zero(model):
    with model.trace(PROMPT, remote="local"):
        model.lm_head.weight.data.zero_()  # @weight_data_zero


@hostile(SandboxViolation, "cannot modify the model's weights in a remote trace")
def case_weight_detach_zero(model):
    with model.trace(PROMPT, remote="local"):
        model.lm_head.weight.detach().zero_()  # @weight_detach_zero


@hostile(SandboxViolation, "cannot modify the model's weights in a remote trace")
def case_weight_init_zeros(model):
    with model.trace(PROMPT, remote="local"):
        torch.nn.init.zeros_(model.model.layers[0].mlp.up_proj.weight)  # @weight_init_zeros


@hostile(SandboxViolation, "cannot modify the model's weights in a remote trace")
def case_weight_copy(model):
    with model.trace(PROMPT, remote="local"):
        w = model.model.embed_tokens.weight
        w.copy_(torch.zeros_like(w))  # @weight_copy


@hostile(SandboxViolation, "cannot modify the model's weights in a remote trace")
def case_weight_requires_grad_method(model):
    with model.trace(PROMPT, remote="local"):
        model.lm_head.weight.requires_grad_(False)  # @weight_requires_grad_method


@hostile(SandboxViolation, "cannot set .requires_grad of the model's weights in a remote trace")
def case_weight_requires_grad_attribute(model):
    with model.trace(PROMPT, remote="local"):
        model.lm_head.weight.requires_grad = False  # @weight_requires_grad_attribute


@hostile(SandboxViolation, "cannot register hooks on the model's weights in a remote trace")
def case_weight_register_hook(model):
    with model.trace(PROMPT, remote="local"):
        model.lm_head.weight.register_hook(lambda grad: grad * 0)  # @weight_register_hook


@hostile(SandboxViolation, "torch.Tensor.register_hook is not available in a remote trace")
def case_weight_register_hook_unbound(model):
    with model.trace(PROMPT, remote="local"):
        torch.Tensor.register_hook(model.lm_head.weight, lambda grad: grad * 0)  # @weight_register_hook_unbound


@hostile(SandboxViolation, "cannot modify the model's weights in a remote trace")
def case_weight_out_argument(model):
    with model.trace(PROMPT, remote="local"):
        w = model.lm_head.weight
        torch.add(w, 1.0, out=w)  # @weight_out_argument


@hostile(SandboxViolation, "cannot set .data of a tensor in a remote trace")
def case_weight_data_assign(model):
    with model.trace(PROMPT, remote="local"):
        model.lm_head.weight.data = torch.zeros(512, 64)  # @weight_data_assign


@hostile(SandboxViolation, "cannot set .grad of a tensor in a remote trace")
def case_weight_grad_assign(model):
    with model.trace(PROMPT, remote="local"):
        model.lm_head.weight.grad = torch.ones(512, 64)  # @weight_grad_assign


@hostile(SandboxViolation, "cannot modify the model's weights in a remote trace")
def case_weight_inplace_functional(model):
    with model.trace(PROMPT, remote="local"):
        torch.nn.functional.relu(model.lm_head.weight.detach(), inplace=True)  # @weight_inplace_functional


@hostile(None)
def case_weight_through_numpy(model):
    with model.trace(PROMPT, remote="local"):
        view = model.lm_head.weight.detach().numpy()  # @weight_through_numpy
        view[0] = 5.0


@hostile(SandboxViolation, "torch.from_dlpack is not available in a remote trace")
def case_weight_through_dlpack(model):
    with model.trace(PROMPT, remote="local"):
        alias = torch.from_dlpack(model.lm_head.weight.detach()[1:])  # @weight_through_dlpack
        alias.zero_()


@hostile(SandboxViolation, "cannot modify the model's weights in a remote trace")
def case_weight_adopted_by_own_module(model):
    with model.trace(PROMPT, remote="local"):
        mine = torch.nn.Linear(64, 512, bias=False)
        mine.weight = model.lm_head.weight
        mine.half()  # @weight_adopted_by_own_module


@hostile(SandboxSyntaxError, "yield (generator functions) is not allowed in a remote trace")
def case_generator_finalizer(model):
    # The generator outlives the job (a reference cycle through the body's globals);
    # its `finally` must not get to run unguarded once the job is over.
    with model.trace(PROMPT, remote="local"):

        def later():
            try:
                yield 1  # @generator_finalizer
            finally:
                model.lm_head.weight.detach().zero_()

        pending = later()
        next(pending)
        keep = [pending]
        keep.append(keep)


# Storage, graph and uninitialized memory ------------------------------------------------------------------


@hostile(SandboxViolation, "tensor.as_strided is not available in a remote trace")
def case_as_strided(model):
    with model.trace(PROMPT, remote="local"):
        h = model.lm_head.output
        beyond = h.as_strided((10**6,), (1,))  # @as_strided


@hostile(SandboxViolation, "torch.Tensor.as_strided is not available in a remote trace")
def case_as_strided_unbound(model):
    with model.trace(PROMPT, remote="local"):
        h = model.lm_head.output
        beyond = torch.Tensor.as_strided(h, (10**6,), (1,))  # @as_strided_unbound


@hostile(SandboxViolation, "tensor.untyped_storage is not available in a remote trace")
def case_untyped_storage(model):
    with model.trace(PROMPT, remote="local"):
        raw = model.lm_head.output.untyped_storage()  # @untyped_storage


@hostile(SandboxViolation, "tensor.set_ is not available in a remote trace")
def case_set_(model):
    with model.trace(PROMPT, remote="local"):
        h = model.lm_head.output.clone()
        h.set_(torch.zeros(3))  # @set_


@hostile(SandboxViolation, "tensor.grad_fn is not available in a remote trace")
def case_grad_fn(model):
    with model.trace(PROMPT, remote="local"):
        node = model.lm_head.output.grad_fn  # @grad_fn


@hostile(SandboxViolation, "not available in a remote trace")
def case_data_ptr_unbound(model):
    with model.trace(PROMPT, remote="local"):
        address = torch.Tensor.data_ptr(model.lm_head.weight)  # @data_ptr_unbound
        address = ndif.save(address)
    return address


@hostile(SandboxViolation, "torch.empty is not available in a remote trace (uninitialized memory")
def case_torch_empty(model):
    with model.trace(PROMPT, remote="local"):
        leftovers = torch.empty(1 << 16)  # @torch_empty


@hostile(SandboxViolation, "not available in a remote trace")
def case_legacy_constructor(model):
    with model.trace(PROMPT, remote="local"):
        leftovers = torch.Tensor(1 << 16)  # @legacy_constructor
        leftovers = leftovers.save()
    return leftovers


@hostile(SandboxViolation, "not available in a remote trace")
def case_tensor_new(model):
    with model.trace(PROMPT, remote="local"):
        leftovers = model.lm_head.output.new(1 << 16)  # @tensor_new
        leftovers = leftovers.save()
    return leftovers


@hostile(SandboxViolation, "not available in a remote trace")
def case_new_empty_unbound(model):
    with model.trace(PROMPT, remote="local"):
        leftovers = torch.Tensor.new_empty(model.lm_head.output, (1 << 16,))  # @new_empty_unbound
        leftovers = leftovers.save()
    return leftovers


@hostile(SandboxViolation, "not available in a remote trace")
def case_numpy_uninitialized(model):
    with model.trace(PROMPT, remote="local"):
        leftovers = np.ndarray((1 << 16,))  # @numpy_uninitialized
        leftovers = ndif.save(leftovers)
    return leftovers


# Reaching sys.modules and the real modules ----------------------------------------------------------------


@hostile(SandboxViolation, "torch.sys is not available in a remote trace")
def case_torch_sys(model):
    with model.trace(PROMPT, remote="local"):
        modules = torch.sys.modules  # @torch_sys


@hostile(SandboxViolation, "torch.serialization is not available in a remote trace")
def case_torch_submodule(model):
    with model.trace(PROMPT, remote="local"):
        loader = torch.serialization.pickle  # @torch_submodule


@hostile(WireError, "cannot send variable 'sys'")
def case_captured_sys(model):
    with model.trace(PROMPT, remote="local"):  # @captured_sys
        modules = sys.modules


@hostile(SandboxViolation, "exception.obj is not available in a remote trace")
def case_attribute_error_object(model):
    with model.trace(PROMPT, remote="local"):
        real = None
        try:
            torch.no_such_function
        except AttributeError as error:
            real = error.obj  # @attribute_error_object
        loader = real.load


# Time ---------------------------------------------------------------------------------------------


@hostile(TimeLimitExceeded, "the job ran longer than its limit of 0.5 s", seconds=FAST_WALL_S)
def case_while_true(model):
    with model.trace(PROMPT, remote=local_backend(model, FAST)):
        while True: pass  # @while_true  # fmt: skip


@hostile(TimeLimitExceeded, "the job ran longer than its limit of 0.5 s", seconds=FAST_WALL_S)
def case_loop_catching_everything(model):
    with model.trace(PROMPT, remote=local_backend(model, FAST)):
        while True:  # @loop_catching_everything
            try:
                while True:
                    pass
            except BaseException:
                pass


@hostile(TimeLimitExceeded, "the job ran longer than its limit of 0.5 s", seconds=FAST_WALL_S)
def case_function_catching_everything(model):
    with model.trace(PROMPT, remote=local_backend(model, FAST)):

        def spin():
            try:  # @function_catching_everything
                while True:
                    pass
            except BaseException:
                return spin()

        spin()


@hostile(SandboxViolation, "range of 1000000000000000 items is over the limit", seconds=FAST_WALL_S)
def case_generator_expression(model):
    with model.trace(PROMPT, remote=local_backend(model, FAST)):
        found = any(n < 0 for n in range(10**15))  # @generator_expression


@hostile(SandboxViolation, "range of 200000000 items is over the limit", seconds=FAST_WALL_S)
def case_one_long_builtin_call(model):
    with model.trace(PROMPT, remote=local_backend(model, FAST)):
        total = sum(range(2 * 10**8))  # @one_long_builtin_call


@hostile(RecursionError, "maximum recursion depth exceeded")
def case_recursion(model):
    with model.trace(PROMPT, remote="local"):

        def dive(depth):
            return dive(depth + 1)  # @recursion

        dive(0)


# Memory -------------------------------------------------------------------------------------------


@hostile(MemoryLimitExceeded, "zeros would allocate")
def case_zeros_huge(model):
    with model.trace(PROMPT, remote=local_backend(model, SMALL_ALLOCATIONS)):
        big = torch.zeros(10**12)  # @zeros_huge


@hostile(MemoryLimitExceeded, "would allocate")
def case_outer_product_matmul(model):
    with model.trace(PROMPT, remote=local_backend(model, SMALL_ALLOCATIONS)):
        big = torch.ones(100000, 1) @ torch.ones(1, 100000)  # @outer_product_matmul


@hostile(MemoryLimitExceeded, "repeat would allocate")
def case_repeat_huge(model):
    with model.trace(PROMPT, remote=local_backend(model, SMALL_ALLOCATIONS)):
        h = model.lm_head.output
        big = h.repeat(10**6, 1, 1)  # @repeat_huge


@hostile(MemoryLimitExceeded, "would allocate")
def case_broadcast_huge(model):
    with model.trace(PROMPT, remote=local_backend(model, SMALL_ALLOCATIONS)):
        a = torch.ones(100000)
        b = torch.ones(100000)
        big = a[:, None] * b[None, :]  # @broadcast_huge


@hostile(MemoryLimitExceeded, "would allocate")
def case_expanded_view(model):
    with model.trace(PROMPT, remote=local_backend(model, SMALL_ALLOCATIONS)):
        big = torch.ones(1).expand(4000, 4000)  # @expanded_view


@hostile(MemoryLimitExceeded, "would allocate")
def case_broadcast_view_plus_scalar(model):
    with model.trace(PROMPT, remote=local_backend(model, SMALL_ALLOCATIONS)):
        view = torch.ones(1).broadcast_to((4000, 4000))
        big = view + 1  # @broadcast_view_plus_scalar
        size = ndif.save(big.numel() * big.element_size())
    return size


@hostile(MemoryLimitExceeded, "would allocate")
def case_broadcast_view_unary(model):
    with model.trace(PROMPT, remote=local_backend(model, SMALL_ALLOCATIONS)):
        view = torch.ones(1).broadcast_to((4000, 4000))
        big = view.exp()  # @broadcast_view_unary
        size = ndif.save(big.numel() * big.element_size())
    return size


@hostile(SandboxViolation, "repeating a bytes 1073741824 times is over the limit")
def case_python_heap_growth(model):
    with model.trace(PROMPT, remote=local_backend(model, SMALL_GROWTH)):
        junk = b"x" * (1 << 30)  # @python_heap_growth
        h = model.lm_head.output


# Saving -------------------------------------------------------------------------------------------


@hostile(SaveLimitExceeded, "over the limit of 1048576")
def case_save_huge_tensor(model):
    with model.trace(PROMPT, remote=local_backend(model, SMALL_SAVES)):
        big = torch.zeros(1 << 20).save()  # @save_huge_tensor


@hostile(SaveLimitExceeded, "over the limit of 1048576")
def case_save_many_activations(model):
    with model.trace(PROMPT, remote=local_backend(model, SMALL_SAVES)):
        h = model.lm_head.output
        copies = [h.clone() for _ in range(100)].save()  # @save_many_activations


@hostile(SaveLimitExceeded, "over the limit of 1048576")
def case_save_as_python_floats(model):
    with model.trace(PROMPT, remote=local_backend(model, SMALL_SAVES)):
        values = torch.zeros(1 << 18).tolist().save()  # @save_as_python_floats
    return len(values)


@hostile(SaveLimitExceeded, "over the limit of 1048576")
def case_save_in_dict_keys(model):
    with model.trace(PROMPT, remote=local_backend(model, SMALL_SAVES)):
        hidden = {"k" * (4 << 20): 0}.save()  # @save_in_dict_keys
    return len(next(iter(hidden)))


# Another job's values -------------------------------------------------------------------------------


def _victim_job(model):
    """Another user's job, run just before the attacker's (its names are not in the attacker's scope)."""
    with model.trace(PROMPT, remote="local"):
        victim_secret = (model.lm_head.output[0, -1, :3] * 0 + 31337).save()
    return victim_secret


@hostile(NameError, "name 'victim_secret' is not defined")
def case_other_job_by_name(model):
    _victim_job(model)
    with model.trace(PROMPT, remote="local"):
        stolen = victim_secret  # @other_job_by_name
        stolen = ndif.save(stolen)


@hostile(AttributeError, "has no submodule or attribute '__init__'")
def case_other_job_through_the_heap(model):
    running = _victim_job(model)  # stands for a job still running beside the attacker's
    with model.trace(PROMPT, remote="local"):
        scope = model.get("__init__.__globals__")  # @other_job_through_the_heap
        table = scope["__builtins__"]
        search = "[o.tolist() for o in __import__('gc').get_objects() if type(o).__name__ == 'Tensor' and o.shape == (3,) and o[0] == 31337]"
        stolen = table["eval"](search, {"__builtins__": table})
        stolen = ndif.save(stolen)
    return stolen


@hostile(AttributeError, "has no submodule or attribute 'victim_secret'")
def case_other_job_through_the_model(model):
    _victim_job(model)
    with model.trace(PROMPT, remote="local"):
        stolen = getattr(model, "victim_secret")  # @other_job_through_the_model


# Ordinary mistakes come back as themselves ------------------------------------------------------------


@hostile(RuntimeError, "shapes cannot be multiplied")
def case_shape_error(model):
    with model.trace(PROMPT, remote="local"):
        h = model.model.layers[0].output
        bad = h @ torch.ones(3, 3)  # @shape_error


@hostile(AttributeError, "has no submodule or attribute 'layer'")
def case_typo_module_path(model):
    with model.trace(PROMPT, remote="local"):
        h = model.model.layer[0].output  # @typo_module_path


@hostile(IndexError, "index 10 is out of range")
def case_index_past_the_layers(model):
    with model.trace(PROMPT, remote="local"):
        h = model.model.layers[10].output  # @index_past_the_layers


@hostile(NameError, "name 'hiden' is not defined")
def case_name_error(model):
    with model.trace(PROMPT, remote="local"):
        hidden = model.model.layers[0].output
        total = hiden.sum()  # @name_error


@hostile(ZeroDivisionError, "division by zero")
def case_zero_division(model):
    with model.trace(PROMPT, remote="local"):
        width = model.lm_head.output.shape[-1]
        ratio = width / 0  # @zero_division


@hostile(ZeroDivisionError, "integer division or modulo by zero")
def case_error_inside_no_grad(model):
    with model.trace(PROMPT, remote="local"):
        with torch.no_grad():
            width = model.lm_head.output.shape[-1]
            ratio = width // 0  # @error_inside_no_grad


@hostile(ndif.OutOfOrderError, "model.model.layers.0")
def case_out_of_order(model):
    with model.trace(PROMPT, remote="local"):
        logits = model.lm_head.output
        early = model.model.layers[0].output  # @out_of_order


# -- health -------------------------------------------------------------------------------------


@dataclass
class Baseline:
    """What the process looked like before the corpus ran, and the model's reference values."""

    tensors: dict[str, tuple[torch.nn.Module, str, str, torch.Tensor, torch.Tensor, int, bool]]
    modules: dict[str, tuple[torch.nn.Module, type, Any, frozenset[str], dict]]
    hooks: dict[str, tuple[frozenset, ...]]
    hook_count: int
    global_hooks: tuple[int, ...]
    dtype: torch.dtype
    threads: int
    trace: Any
    thread_ids: frozenset[int]
    seed: int
    validate_args: bool
    normal_constraints: dict
    final_norm: torch.Tensor
    logits: torch.Tensor


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _module_hooks(module: torch.nn.Module) -> tuple[frozenset, ...]:
    return tuple(frozenset(getattr(module, name)) for name in _HOOK_DICTS)


def _global_hooks() -> tuple[int, ...]:
    from torch.nn.modules import module as module_module

    names = (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
    return tuple(len(getattr(module_module, name)) for name in names)


def hook_count(model: ndif.LanguageModel) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model._module.modules()
    )


def reference_values(model: ndif.LanguageModel, remote: Any) -> tuple[torch.Tensor, torch.Tensor]:
    with model.trace(PROMPT, remote=remote):
        final_norm = model.model.norm.output.save()
        logits = model.lm_head.output.save()
    return final_norm, logits


def _snapshot_tensors(module: torch.nn.Module) -> dict:
    found = {}
    for prefix, owner in module.named_modules():
        for kind, table in (("parameter", owner._parameters), ("buffer", owner._buffers)):
            for leaf, tensor in table.items():
                if tensor is None:
                    continue
                name = f"{prefix}.{leaf}" if prefix else leaf
                found[name] = (
                    owner,
                    leaf,
                    kind,
                    tensor,
                    tensor.detach().clone(),
                    tensor.untyped_storage().data_ptr(),
                    tensor.requires_grad,
                )
    return found


def take_baseline(model: ndif.LanguageModel) -> Baseline:
    local = reference_values(model, None)
    remote = reference_values(model, "local")  # also starts the watchdog thread
    assert torch.equal(local[0], remote[0]) and torch.equal(local[1], remote[1])
    gc.collect()
    return Baseline(
        tensors=_snapshot_tensors(model._module),
        modules={
            name: (m, type(m), m.__dict__.get("forward"), frozenset(m.__dict__), dict(m._modules))
            for name, m in model._module.named_modules()
        },
        hooks={name: _module_hooks(m) for name, m in model._module.named_modules()},
        hook_count=hook_count(model),
        global_hooks=_global_hooks(),
        dtype=torch.get_default_dtype(),
        threads=torch.get_num_threads(),
        trace=sys.gettrace(),
        thread_ids=frozenset(t.ident for t in threading.enumerate()),
        seed=torch.initial_seed(),
        validate_args=torch.distributions.Distribution._validate_args,
        normal_constraints=dict(torch.distributions.Normal.arg_constraints),
        final_norm=local[0],
        logits=local[1],
    )


def health_problems(model: ndif.LanguageModel, base: Baseline) -> list[str]:
    """Everything about the process that differs from ``base``; each difference is undone."""
    gc.collect()  # finalizers of objects a job left in reference cycles run now
    problems: list[str] = []
    unprotect = False
    # The modules: no patched forward, attribute, class or child.
    for name, (module, kind, forward, keys, children) in base.modules.items():
        label = name or "<root>"
        if type(module) is not kind:
            problems.append(f"module {label}: class changed to {type(module).__qualname__}")
            module.__class__ = kind
        if module.__dict__.get("forward") is not forward:
            problems.append(f"module {label}: forward replaced by {module.__dict__.get('forward')!r}")
            module.__dict__["forward"] = forward
        extra = set(module.__dict__) - keys
        if extra:
            problems.append(f"module {label}: attributes added: {sorted(extra)}")
            for key in extra:
                del module.__dict__[key]
        if dict(module._modules) != children:
            problems.append(f"module {label}: children changed")
            module._modules.clear()
            module._modules.update(children)
    # Weights and buffers: the same objects, storage, dtype, values and requires_grad.
    for name, (owner, leaf, kind, tensor, saved, pointer, requires_grad) in base.tensors.items():
        table = owner._parameters if kind == "parameter" else owner._buffers
        if table.get(leaf) is not tensor:
            problems.append(f"{kind} {name}: replaced by another tensor")
            table[leaf] = tensor
        with torch.no_grad():
            swapped = tensor.untyped_storage().data_ptr() != pointer
            if tensor.dtype != saved.dtype or tensor.shape != saved.shape or tensor.device != saved.device or swapped:
                what = f"now {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}"
                problems.append(f"{kind} {name}: its storage was swapped ({what})")
                tensor.data = saved.clone()
                base.tensors[name] = (
                    owner,
                    leaf,
                    kind,
                    tensor,
                    saved,
                    tensor.untyped_storage().data_ptr(),
                    requires_grad,
                )
                unprotect = True
            elif not torch.equal(tensor, saved):
                changed = (tensor != saved).sum().item()
                problems.append(f"{kind} {name}: {changed} values changed")
                tensor.copy_(saved)
        if tensor.requires_grad != requires_grad:
            problems.append(f"{kind} {name}: requires_grad is now {tensor.requires_grad}")
            tensor.requires_grad_(requires_grad)
        if kind == "parameter" and tensor.grad is not None:
            problems.append(f"{kind} {name}: a gradient was left on it")
            tensor.grad = None
    # (The sandbox recomputes the protected storages for every job: nothing to refresh here.)
    del unprotect
    # Hooks: none added to any module (and any that were are removed).
    count = hook_count(model)
    if count != base.hook_count:
        problems.append(f"hooks on the model's modules: {count} (was {base.hook_count})")
    for name, module in model._module.named_modules():
        for attribute, keys in zip(_HOOK_DICTS, base.hooks.get(name, ()), strict=True):
            table = getattr(module, attribute)
            for key in set(table) - keys:
                del table[key]
    if _global_hooks() != base.global_hooks:
        problems.append(f"global module hooks: {_global_hooks()} (was {base.global_hooks})")
    # torch's global and thread-wide state.
    if torch.get_default_dtype() != base.dtype:
        problems.append(f"default dtype is {torch.get_default_dtype()}")
        torch.set_default_dtype(base.dtype)
    if not torch.is_grad_enabled():
        problems.append("grad mode is disabled")
        torch.set_grad_enabled(True)
    if torch.get_num_threads() != base.threads:
        problems.append(f"torch uses {torch.get_num_threads()} threads (was {base.threads})")
        torch.set_num_threads(base.threads)
    if torch.is_autocast_enabled("cpu"):
        problems.append("CPU autocast is enabled")
        torch.set_autocast_enabled("cpu", False)
    if torch.initial_seed() != base.seed:
        problems.append(f"the default generator was reseeded ({torch.initial_seed()})")
        torch.manual_seed(base.seed)
    if torch.distributions.Distribution._validate_args != base.validate_args:
        problems.append("torch.distributions' default argument validation was switched")
        torch.distributions.Distribution.set_default_validate_args(base.validate_args)
    if dict(torch.distributions.Normal.arg_constraints) != base.normal_constraints:
        problems.append("torch.distributions.Normal.arg_constraints was modified")
        torch.distributions.Normal.arg_constraints.clear()
        torch.distributions.Normal.arg_constraints.update(base.normal_constraints)
    stack = _get_current_function_mode_stack()
    if stack:
        problems.append(f"torch function modes left on the stack: {stack}")
        while _get_current_function_mode_stack():
            torch._C._pop_torch_function_stack()
    if sys.gettrace() is not base.trace:
        problems.append(f"a trace function is set: {sys.gettrace()!r}")
        sys.settrace(base.trace)
    # Threads: none new, and one watchdog.
    alive = threading.enumerate()
    new = [t.name for t in alive if t.ident not in base.thread_ids]
    if new:
        problems.append(f"new threads: {new}")
    watchdogs = [t for t in alive if t.name == "ndif-watchdog"]
    if len(watchdogs) != 1 or not watchdogs[0].daemon:
        problems.append(f"expected one daemon 'ndif-watchdog' thread, found {watchdogs}")
    # The model still serves: locally and through the sandbox, the reference values.
    for remote in (None, "local"):
        try:
            final_norm, logits = reference_values(model, remote)
        except Exception as error:  # reported as a problem
            problems.append(f"a trace with remote={remote!r} failed: {type(error).__name__}: {error}")
            continue
        if not (torch.equal(final_norm, base.final_norm) and torch.equal(logits, base.logits)):
            problems.append(f"a trace with remote={remote!r} no longer gives the reference values")
    return problems


# -- fixtures and tests -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_llama_path) -> ndif.LanguageModel:
    """The tiny Llama, private to this file (whatever a case does stays here)."""
    return ndif.LanguageModel(tiny_llama_path, dispatch=True)


@pytest.fixture(scope="module")
def baseline(model) -> Iterator[Baseline]:
    base = take_baseline(model)
    # What exists now lives for the whole module: keep it out of the collections that
    # `health_problems` runs after every case (cycles a job leaves are still collected).
    gc.freeze()
    yield base
    gc.unfreeze()


def test_corpus_size_and_tags():
    assert len(CASES) >= 45
    assert len({case.name for case in CASES}) == len(CASES)
    for case in CASES:
        if case.tag is not None:
            line_of(case.tag)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_body(model, baseline, case):
    """The case ends as it should, and the process is left as it was."""
    problems = run_case(model, case)
    problems += [f"[{case.name}] left the process unhealthy: {p}" for p in health_problems(model, baseline)]
    assert not problems, "\n".join(problems)


def test_memory_growth_limit_holds_for_the_next_job(model, baseline):
    """The growth limit is per job: the same oversized job is refused the second time too."""
    case = next(case for case in CASES if case.name == "python_heap_growth")
    first = run_case(model, case)
    gc.collect()
    second = run_case(model, case)
    problems = [f"first run: {p}" for p in first] + [f"second run: {p}" for p in second]
    problems += health_problems(model, baseline)
    assert not problems, "\n".join(problems)


def test_corpus_again_in_one_go(model, baseline):
    """Every case once more, back to back with no repair in between, then one health check."""
    problems = []
    for case in CASES:
        problems += run_case(model, case)
    problems += [f"after the corpus: {p}" for p in health_problems(model, baseline)]
    assert not problems, "\n".join(problems)


def test_printed_output_is_cut_at_its_limit(model, capsys):
    with model.trace(PROMPT, remote="local"):
        for _ in range(5):
            print("x" * (1 << 19))
    lines = capsys.readouterr().out.splitlines()
    assert sum(len(line) for line in lines) < (1 << 20) + 200
    assert lines[-1] == "[ndif: the job's output was cut here, at its size limit]"
