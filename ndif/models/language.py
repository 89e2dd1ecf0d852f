"""`LanguageModel`: a transformers causal LM, traced with prompts as input."""

from __future__ import annotations

import inspect
import os
import threading
from typing import Any

import torch

from ..tracer import InvokeSpec, Trace
from .base import NNsight, Prepared
from .inputs import InputProcessor

#: Keyword arguments that describe an input rather than the call.
_INPUT_KWARGS = ("attention_mask",)


class LanguageModel(NNsight):
    """A transformers causal language model, wrapped for tracing.

    Args:
        model: A local checkpoint directory, or an already-built model.
        tokenizer: A tokenizer; loaded from ``model``'s directory when omitted.
        dispatch: Load the weights now. Otherwise the model is built on the meta
            device (structure only, for inspecting and ``scan``) and the weights
            are loaded on the first trace.
        device_map: Passed to ``from_pretrained`` (e.g. ``"cuda"``, ``"auto"``).
        dtype: Weight dtype (e.g. ``torch.bfloat16``).
        rename: Aliases for module paths, e.g. ``{"model.layers": "layers"}``.
        **load_kwargs: Passed to ``from_pretrained``.

    Example::

        model = ndif.LanguageModel("path/to/tiny-llama")
        with model.trace("The Eiffel Tower is in"):
            hidden = model.model.layers[0].output.save()
    """

    def __init__(
        self,
        model: str | os.PathLike | torch.nn.Module,
        tokenizer: Any = None,
        dispatch: bool = False,
        device_map: Any = None,
        dtype: torch.dtype | str | None = None,
        rename: dict | None = None,
        **load_kwargs: Any,
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        source: str | None = None
        if isinstance(model, torch.nn.Module):
            module = model
            if tokenizer is None and getattr(model, "name_or_path", None):
                tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
            dispatched = not any(p.is_meta for p in model.parameters())
        else:
            source = os.fspath(model)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(source)
            config = AutoConfig.from_pretrained(source)
            with torch.device("meta"):
                module = AutoModelForCausalLM.from_config(config, dtype=_dtype(dtype))
            dispatched = False
        _configure(tokenizer)
        super().__init__(module, rename=rename)
        self.tokenizer = tokenizer
        self._source = source
        self._dispatched = dispatched
        self._load_kwargs = {"device_map": device_map, "dtype": _dtype(dtype), **load_kwargs}
        self._dispatch_lock = threading.Lock()
        self._inputs = InputProcessor(tokenizer)
        if dispatch:
            self.dispatch()

    @property
    def dispatched(self) -> bool:
        """Whether real weights are loaded."""
        return self._dispatched

    def dispatch(self) -> None:
        """Load the real weights (once; safe to call from several threads)."""
        if self._dispatched:
            return
        with self._dispatch_lock:
            if self._dispatched:
                return
            from transformers import AutoModelForCausalLM

            kwargs = {key: value for key, value in self._load_kwargs.items() if value is not None}
            loaded = AutoModelForCausalLM.from_pretrained(self._source, **kwargs)
            loaded.eval()
            self._repoint(loaded)
            self._dispatched = True

    def generate(self, *inputs: Any, remote: Any = None, blocking: bool = True, **kwargs: Any) -> Trace:
        """Open a trace over ``model.generate``: each step is one forward pass.

        Use ``tracer.iter[...]``/``tracer.all()`` to reach later steps and
        ``tracer.result`` for the generated token ids.
        """
        return Trace(self, "generate", inputs, kwargs, remote=remote, blocking=blocking)

    def _model_key(self) -> str:
        return self._source or getattr(self._module, "name_or_path", "") or type(self._module).__name__

    # -- preparing a batch ---------------------------------------------------------------

    def _takes_position_ids(self) -> bool:
        accepts = self.__dict__.get("_position_ids")
        if accepts is None:
            accepts = _accepts(self._module, "position_ids")
            object.__setattr__(self, "_position_ids", accepts)
        return accepts

    def _ready(self, kind: str) -> None:
        if kind != "scan":
            self.dispatch()

    def _split_kwargs(self, kwargs: dict) -> tuple[dict, dict]:
        inputs = {key: kwargs[key] for key in _INPUT_KWARGS if key in kwargs}
        return inputs, {key: value for key, value in kwargs.items() if key not in _INPUT_KWARGS}

    def _has_input(self, inputs: tuple, kwargs: dict) -> bool:
        return bool(inputs) or "input_ids" in kwargs

    def _prepare(self, kind: str, invokes: list[InvokeSpec], call_kwargs: dict) -> Prepared:
        rows: list[list[int]] = []
        groups: list[tuple[int, int] | None] = []
        for spec in invokes:
            invoke_rows = self._inputs.rows(spec.inputs, spec.kwargs)
            groups.append((len(rows), len(invoke_rows)) if invoke_rows else None)
            rows.extend(invoke_rows)
        input_ids, attention_mask = self._inputs.batch(rows)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        module = self._module
        if kind == "generate":
            if self.tokenizer is not None and "pad_token_id" not in call_kwargs:
                kwargs["pad_token_id"] = self._inputs.pad_id()
            steps = _generation_steps(module, call_kwargs, input_ids.shape[1])
            return Prepared(module.generate, (), {**kwargs, **call_kwargs}, groups, len(rows), steps)
        padded = any(len(row) < input_ids.shape[1] for row in rows)
        if padded and "position_ids" not in call_kwargs and self._takes_position_ids():
            # Left padding must not shift positions: each row counts from its first real token.
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return Prepared(module, (), {**kwargs, **call_kwargs}, groups, len(rows))


def _generation_steps(module: torch.nn.Module, call_kwargs: dict, prompt_length: int) -> int | None:
    """How many forward passes ``generate`` makes at most (one per new token)."""
    config = call_kwargs.get("generation_config") or getattr(module, "generation_config", None)
    new = call_kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if new is None:
        longest = call_kwargs.get("max_length", getattr(config, "max_length", None))
        new = None if longest is None else longest - prompt_length
    if new is None:
        return None
    beams = call_kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    return max(int(new), 1) if beams == 1 else None


def _accepts(module: torch.nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, dtype)


def _configure(tokenizer: Any) -> None:
    if tokenizer is None:
        return
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
