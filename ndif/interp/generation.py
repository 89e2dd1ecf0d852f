"""Generate with a recipe, token by token: what a steering chat runs for each reply.

`generate_with` runs one trace over generation with a `Recipe` applied at every step and
calls ``on_token`` as each token is sampled, with the observations of the position that
produced it. It runs on the transformers backend (tokens come from ``generate``'s streamer)
and on the vLLM backend (from ``model.samples``), in this process: it is trusted code (a
worker runs it for the chat API; a researcher may call it directly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .recipes import Recipe


@dataclass
class Step:
    """One generated token and what the recipe observed at the position that chose it."""

    index: int
    token: int
    observations: dict[str, torch.Tensor]  # per name: that position's values
    prompt: dict[str, torch.Tensor] | None = None  # the first step's: per name, a row per prompt token


@dataclass
class Generation:
    """A finished generation: its tokens, each step's observations, and the prompt's."""

    tokens: list[int]
    steps: list[Step]
    prompt: dict[str, torch.Tensor] = field(default_factory=dict)  # per name: one row per prompt token


class _Asked(StoppingCriteria):
    """transformers' stopping criterion that asks a function (after the streamer has the token)."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


class _Streamer:
    """``generate(streamer=...)``: transformers calls ``put`` with each step's new token."""

    def __init__(self, on_token: Callable[[int], None]) -> None:
        self.on_token = on_token
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.on_token(int(token))

    def end(self) -> None:
        pass


def generate_with(
    model: Any,
    prompt: list[int],
    recipe: Recipe | None = None,
    max_tokens: int = 64,
    on_token: Callable[[Step], None] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_tokens: set[int] | None = None,
    should_stop: Callable[[], bool] | None = None,
    remote: Any = None,
) -> Generation:
    """Generate up to ``max_tokens`` tokens after ``prompt`` (token ids) with ``recipe``
    applied at every step; ``on_token`` is called with each `Step` as it is sampled.

    ``should_stop``, asked after each token, ends the generation early when it says so (a
    stop sequence in the text). On a tensor-parallel engine, whose steps arrive at the end,
    it cannot: the caller truncates. ``remote`` goes to the trace (``model.generate``): on
    a tensor-parallel engine, the backend that runs it on the ranks, with its limits.
    """
    stopping = should_stop or (lambda: False)
    recipe = recipe or Recipe()
    steps: list[Step] = []
    prompt_observations: dict[str, torch.Tensor] = {}
    pending: list[dict[str, torch.Tensor]] = []  # each step's observations, until its token comes

    def observed(step: int, values: dict[str, torch.Tensor]) -> None:
        if step == 0:
            prompt_observations.update(values)
            values = {name: value[-1:] for name, value in values.items()}  # the last prompt token's row
        pending.append(values)

    def sampled(token: int) -> None:
        index = len(steps)
        observations = pending[index] if index < len(pending) else {}
        step = Step(index, token, observations, prompt_observations if index == 0 else None)
        steps.append(step)
        if on_token is not None:
            on_token(step)

    if getattr(model, "_ranks", False):
        # A tensor-parallel vLLM engine runs traces on its ranks, in other processes: the
        # steps come back with the result, and ``on_token`` sees them all at the end.
        options = _vllm_options(max_tokens, temperature, top_p, seed, stop_tokens)
        with model.generate(prompt, remote=remote, **options) as tracer:
            seen = recipe.run(model, tracer)
            tokens = tracer.result.save()
        for step in range(len(tokens)):
            observed(step, {name: values[step] for name, values in seen.items() if step < len(values)})
        for token in tokens:
            sampled(int(token))
    elif getattr(model, "splits_residual", False):  # vLLM: the sampled token is served at every step
        options = _vllm_options(max_tokens, temperature, top_p, seed, stop_tokens)
        with model.generate(prompt, remote=remote, **options) as tracer:
            for step in tracer.all():  # every step, however many the reply takes
                observed(step, recipe.step(model, step))
                sampled(int(model.samples.output.reshape(-1)[0]))
                if stopping():
                    tracer.stop()
        tokens = [step.token for step in steps]
    else:
        options = {"max_new_tokens": max_tokens, "streamer": _Streamer(sampled)}
        if should_stop is not None:
            options["stopping_criteria"] = StoppingCriteriaList([_Asked(should_stop)])
        options.update(
            {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        )
        if stop_tokens:
            options["eos_token_id"] = sorted(stop_tokens)
        with model.generate(prompt, remote=remote, **options) as tracer:
            for step in tracer.all():
                observed(step, recipe.step(model, step))
            output = tracer.result.save()
        tokens = output[0, len(prompt) :].tolist()
    return Generation([int(token) for token in tokens], steps, prompt_observations)


def _vllm_options(
    max_tokens: int, temperature: float, top_p: float, seed: int | None, stop_tokens: set[int] | None
) -> dict[str, Any]:
    options: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
    if seed is not None:
        options["seed"] = seed
    if stop_tokens:
        options["stop_token_ids"] = sorted(stop_tokens)
    return options
