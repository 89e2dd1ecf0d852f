"""A trace's invokes as vLLM requests: prompts, sampling options and each request's blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...engine.mediator import Mediator
from ...tracer import InvokeSpec, Trace
from ...tracing.errors import InvokeError

#: Sampling keywords NNsight/transformers users write, and vLLM's name for them.
ALIASES = {"max_new_tokens": "max_tokens"}


@dataclass
class JobParts:
    """One job: a prompt, sampling options and blocks per request, and its job-wide blocks."""

    prompts: list[dict]
    options: list[dict]
    blocks: list[list[Mediator]]
    wide: list[Mediator]

    @property
    def intervenes(self) -> bool:
        return bool(self.wide) or any(self.blocks)

    @property
    def every_block(self) -> list[Mediator]:
        """The job-wide blocks, then each request's (`ServingJob.mediators`' order)."""
        return [*self.wide, *(block for blocks in self.blocks for block in blocks)]


def job_parts(
    edits: list,
    trace: Trace,
    invokes: list[InvokeSpec],
    call_kwargs: dict,
    tokenizer: Any,
    max_model_len: int | None = None,
) -> JobParts:
    """Split a trace into requests (one per invoke with an input) and blocks.

    ``max_model_len`` (the engine's context length) bounds the steps of a request whose
    ``max_tokens`` is None (vLLM's "up to the context length")."""
    if trace.kind == "scan":
        raise InvokeError("ndif.VLLM cannot scan; trace with a short max_tokens instead")
    defaults = {"max_tokens": 1} if trace.kind == "trace" else {}
    parts = JobParts([], [], [], [Mediator(edit.body(), None, "an edit") for edit in edits])
    for spec in invokes:
        if not spec.inputs:
            if spec.body is not None:
                parts.wide.append(Mediator(spec.body, None, spec.label))
            continue
        parts.prompts.append(prompt_of(spec.inputs, tokenizer))
        parts.options.append(sampling_options({**defaults, **call_kwargs, **spec.kwargs}))
        parts.blocks.append([Mediator(spec.body, None, spec.label)] if spec.body is not None else [])
    _bound_open_loops(parts, max_model_len)
    return parts


#: vLLM's ``SamplingParams.max_tokens`` when a request does not say.
DEFAULT_MAX_TOKENS = 16


def _bound_open_loops(parts: JobParts, max_model_len: int | None) -> None:
    """Tell each block how many steps its request(s) can make, so that an open step loop
    (``tracer.all()``) whose body waits for nothing ends there instead of spinning: a serving
    run cannot say, its requests having lengths of their own."""
    lengths = [
        _most_tokens(options.get("max_tokens", DEFAULT_MAX_TOKENS), prompt, max_model_len)
        for options, prompt in zip(parts.options, parts.prompts)
    ]
    for blocks, length in zip(parts.blocks, lengths):
        for block in blocks:
            block.max_steps = length
    if lengths and all(length is not None for length in lengths):
        for block in parts.wide:
            block.max_steps = max(lengths)


def context_length(owner: Any) -> int | None:
    """The ``max_model_len`` of an engine or a model runner (its model config's), if it has one."""
    return getattr(getattr(owner, "model_config", None), "max_model_len", None)


def _most_tokens(max_tokens: int | None, prompt: dict, max_model_len: int | None) -> int | None:
    """A request's most steps: its ``max_tokens``, or what its context leaves (None if unknown)."""
    if max_tokens is not None or max_model_len is None:
        return max_tokens
    return max(1, max_model_len - len(prompt.get("prompt_token_ids", ())))


def prompt_of(inputs: tuple, tokenizer: Any) -> dict:
    """An invoke's input as a vLLM prompt: token ids, or text for the engine to tokenize."""
    if len(inputs) != 1:
        raise InvokeError(f"ndif.VLLM takes one prompt per invoke, got {len(inputs)} inputs")
    prompt = inputs[0]
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        return {"prompt_token_ids": [int(t) for t in prompt["prompt_token_ids"]]}
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.flatten().tolist()
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return {"prompt_token_ids": list(prompt)}
    if isinstance(prompt, str):
        if tokenizer is False:  # a rank: the driver's engine tokenizes
            return {"prompt": prompt}
        if tokenizer is None:
            raise InvokeError("this engine has no tokenizer: pass token ids ([int, ...]) as the prompt")
        return {"prompt_token_ids": tokenizer.encode(prompt)}
    raise InvokeError(
        f"ndif.VLLM takes a prompt as a string or a list of token ids, got {type(prompt).__name__}; "
        "several prompts go in several invokes"
    )


def sampling_options(kwargs: dict) -> dict:
    """Sampling keywords under vLLM's names; one sequence per request."""
    options = {ALIASES.get(key, key): value for key, value in kwargs.items()}
    if options.get("n", 1) != 1:
        raise InvokeError("ndif.VLLM runs one sequence per invoke (n=1); use several invokes instead")
    return options
