"""A chat completion on a model worker: the prompt from the messages, a `Recipe` from the
request's interventions and observations, and `ndif.interp.generate_with`, token by token.

This is trusted code with data in: steering vectors come by value or by name, SAEs and
probes by name, from the deployment's artifacts folder (`Artifacts`). Each step's token and
observations go to ``emit`` as they are sampled (the actor buffers them for the dispatcher,
which stores them for the API's stream).
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ndif import interp
from ndif.interp.generation import Generation, Step, generate_with
from ndif.sandbox import CancelToken, JobCancelled, JobLimits, TimeLimitExceeded


class ChatError(ValueError):
    """The request cannot run as asked (an unknown artifact, a layer out of range...)."""


def decode_chat(data: bytes) -> dict[str, Any]:
    """A chat job's request (the API writes it: ``ChatCompletionRequest.payload``)."""
    from ndif_scheduler.storage import CHAT_PREFIX  # here, so that running a chat needs only ndif

    return json.loads(data[len(CHAT_PREFIX) :])


class Artifacts:
    """A deployment's steering vectors, SAEs and probes: ``<folder>/<name>.safetensors``,
    loaded on first use and kept (shared by every chat on the replica)."""

    def __init__(self, folder: str | None) -> None:
        self.folder = Path(folder) if folder else None
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, name: str, kind: type) -> Any:
        with self._lock:
            if name not in self._loaded:
                if self.folder is None:
                    raise ChatError(f"this deployment has no artifacts; {name!r} cannot be found")
                path = self.folder / f"{name}.safetensors"
                if not name.replace("-", "").replace("_", "").isalnum() or not path.is_file():
                    known = ", ".join(sorted(p.stem for p in self.folder.glob("*.safetensors"))) or "none"
                    raise ChatError(f"no artifact named {name!r} (this deployment has: {known})")
                self._loaded[name] = interp.load(path)
            value = self._loaded[name]
        if not isinstance(value, kind):
            raise ChatError(f"{name!r} is a {type(value).__name__}, not a {kind.__name__}")
        return value


def hidden_size(model: Any) -> int | None:
    """The width of ``model``'s residual stream, if it says."""
    module = getattr(model, "_module", model)
    config = getattr(module, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(getattr(config, "text_config", None), "hidden_size", None)
    if size:
        return int(size)
    for sub in module.modules():
        if getattr(sub, "embedding_dim", None):
            return int(sub.embedding_dim)
    return None


def build_recipe(options: dict[str, Any], artifacts: Artifacts, layers: int, width: int | None = None) -> interp.Recipe:
    """The `Recipe` a request's ``ndif`` field asks for (see the API's ``NdifOptions``);
    ``width`` (the model's hidden size) checks that vectors, SAEs and probes fit it."""
    items: list[Any] = []

    def fits(size: int, what: str) -> None:
        if width is not None and size != width:
            raise ChatError(f"{what} has {size} dimensions; this model's residual stream has {width}")

    def layer_ok(layer: int | None) -> int | None:
        if layer is not None and not 0 <= layer < layers:
            raise ChatError(f"layer {layer} is out of range: the model has {layers} layers (0..{layers - 1})")
        return layer

    try:
        for steer in options.get("steer") or ():
            vector = steer["vector"]
            if isinstance(vector, str):
                vector = artifacts.get(vector, interp.SteeringVector)
            else:
                vector = interp.SteeringVector(torch.tensor(vector, dtype=torch.float32))
            named = steer["vector"]
            fits(
                vector.vector.shape[0],
                f"steering vector {named!r}" if isinstance(named, str) else "the steering vector",
            )
            chosen = [layer_ok(layer) for layer in steer.get("layers") or ()] or None
            items.append(interp.Steer(vector, chosen, steer.get("scale", 1.0), steer.get("phase", "all")))
        for edit in options.get("features") or ():
            sae = artifacts.get(edit["sae"], interp.SAE)
            fits(sae.d_in, f"SAE {edit['sae']!r}")
            numbers = {key: dict(edit.get(key) or {}) for key in ("clamp", "add", "scale")}
            items.append(
                interp.EditFeatures(sae, layer_ok(edit.get("layer")), phase=edit.get("phase", "all"), **numbers)
            )
        observe = options.get("observe") or {}
        for probe in observe.get("probes") or ():
            loaded = artifacts.get(probe["probe"], interp.LinearProbe)
            fits(loaded.weight.shape[-1], f"probe {probe['probe']!r}")
            items.append(interp.ReadProbe(loaded, layer_ok(probe.get("layer")), probe.get("name") or probe["probe"]))
        for features in observe.get("features") or ():
            sae = artifacts.get(features["sae"], interp.SAE)
            fits(sae.d_in, f"SAE {features['sae']!r}")
            name = features.get("name") or f"{features['sae']}:features"
            items.append(interp.ReadFeatures(sae, features["features"], layer_ok(features.get("layer")), name))
        for layer in observe.get("norms") or ():
            items.append(interp.ReadNorm(layer_ok(layer), f"norm:{layer}"))
        lens = observe.get("logit_lens")
        if lens:
            items.append(interp.LogitLens(layer_ok(lens["layer"]), lens.get("k", 5), "logit_lens"))
        for item in items:  # the layers artifacts bring with them must fit this model too
            for layer in item.at():
                layer_ok(layer)
        return interp.Recipe(*items)
    except (ValueError, TypeError, IndexError) as error:
        if isinstance(error, ChatError):
            raise
        raise ChatError(str(error)) from None


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt's token ids: the tokenizer's chat template, or a plain transcript."""
    if tokenizer is None:
        raise ChatError("this deployment has no tokenizer, so it cannot chat (its engine runs on token ids)")
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    return list(tokenizer(text).input_ids)


def run_chat(
    model: Any,
    payload: dict[str, Any],
    artifacts: Artifacts,
    emit: Callable[[dict[str, Any]], None],
    cancel: CancelToken | None = None,
    time_s: float = 300.0,
) -> dict[str, Any]:
    """Run one chat completion; returns its result (the whole reply and every step's
    observations); ``emit`` gets each step's chunk as it is sampled."""
    tokenizer = getattr(model, "tokenizer", None)
    prompt = chat_prompt(tokenizer, payload["messages"])
    recipe = build_recipe(payload.get("ndif") or {}, artifacts, len(interp.decoder_layers(model)), hidden_size(model))
    deadline = time.monotonic() + time_s
    text = _Text(tokenizer, payload.get("stop") or [])
    stops = {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()

    def on_token(step: Step) -> None:
        if cancel is not None and cancel.cancelled:
            raise JobCancelled("the chat was cancelled")
        if time.monotonic() > deadline:
            raise TimeLimitExceeded(f"the reply took longer than its limit of {time_s:g} s")
        if text.stopped:  # a token sampled before the engine saw the stop: not part of the reply
            return
        chunk = {
            "index": step.index,
            "token": step.token,
            "text": text.add(step.token),
            "observations": _lists(step.observations, tokenizer),
        }
        if step.prompt is not None:  # with the first token: what the model read, token by token
            chunk["prompt"] = {
                "tokens": [tokenizer.decode([token]) for token in prompt],
                "observations": _lists(step.prompt, tokenizer),
            }
        emit(chunk)

    max_tokens = int(payload.get("max_tokens") or 64)
    remote = None
    if getattr(model, "_ranks", False):  # its ranks run the whole reply: they end it on a cancel or the deadline
        remote = functools.partial(model.run_wire, limits=JobLimits(time_s=time_s), cancel=cancel)
    generation = generate_with(
        model,
        prompt,
        recipe,
        max_tokens=max_tokens,
        on_token=on_token,
        temperature=float(payload.get("temperature") or 0.0),
        top_p=float(payload.get("top_p") or 1.0),
        seed=payload.get("seed"),
        stop_tokens=stops,
        should_stop=(lambda: text.stopped) if text.stop else None,
        remote=remote,
    )
    if not text.stopped:
        rest = text.flush()  # text held back in case it began a stop sequence
        if rest:
            emit({"index": None, "token": None, "text": rest, "observations": {}})
    return result_of(generation, prompt, tokenizer, stops, max_tokens, text)


def result_of(
    generation: Generation, prompt: list[int], tokenizer: Any, stops: set[int], max_tokens: int, text: _Text
) -> dict[str, Any]:
    if text.stopped:  # the reply ends with the token that completed the stop sequence
        generation.tokens = generation.tokens[: len(text.tokens)]
        generation.steps = generation.steps[: len(text.tokens)]
    tokens = generation.tokens
    ended = text.stopped or (tokens and tokens[-1] in stops)
    finished = "stop" if ended or len(tokens) < max_tokens else "length"
    whole = tokenizer.decode([token for token in tokens if token not in stops], skip_special_tokens=True)
    return {
        "text": text.cut(whole),
        "tokens": tokens,
        "finish_reason": finished,
        "usage": {
            "prompt_tokens": len(prompt),
            "completion_tokens": len(tokens),
            "total_tokens": len(prompt) + len(tokens),
        },
        "steps": [
            {
                "index": s.index,
                "token": s.token,
                "text": tokenizer.decode([s.token]),
                "observations": _lists(s.observations, tokenizer),
            }
            for s in generation.steps
        ],
        "prompt_tokens": [tokenizer.decode([token]) for token in prompt],
        "prompt_observations": _lists(generation.prompt, tokenizer),
    }


def _lists(values: dict[str, torch.Tensor], tokenizer: Any) -> dict[str, Any]:
    """Observations as JSON: one row's values (a number, or a list) per name. The logit lens's
    ``[k, 2]`` (id, probability) rows become ``{"token", "id", "p"}`` entries."""
    out = {}
    for name, value in values.items():
        value = value.detach().float().cpu()
        if value.dim() > 0 and value.shape[0] == 1:
            value = value[0]
        out[name] = _lens(value, tokenizer) if name == "logit_lens" else value.tolist()
    return out


def _lens(value: torch.Tensor, tokenizer: Any) -> list[Any]:
    if value.dim() == 3:  # one entry per prompt token
        return [_lens(row, tokenizer) for row in value]
    return [{"token": tokenizer.decode([int(i)]), "id": int(i), "p": float(p)} for i, p in value.tolist()]


class _Text:
    """Each token's text, decoded in context (a character may span tokens), cut at the first
    stop sequence. Text that may be the start of a stop sequence is held back until it is
    not (or until `flush`), so a streamed reply never shows part of one."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [sequence for sequence in stop if sequence]
        self.tokens: list[int] = []
        self.full = ""
        self.shown = ""
        self.stopped = False

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        self.full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        end = len(self.full)
        at = self._first_stop(self.full)
        if at is not None:
            end, self.stopped = at, True
        elif self.stop:
            end -= self._held(self.full)
        piece, self.shown = self.full[len(self.shown) : end], self.full[:end]
        return piece

    def flush(self) -> str:
        piece, self.shown = self.full[len(self.shown) :], self.full
        return piece

    def cut(self, text: str) -> str:
        """``text`` up to its first stop sequence."""
        at = self._first_stop(text)
        return text if at is None else text[:at]

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(sequence) for sequence in self.stop) if i >= 0]
        return min(found) if found else None

    def _held(self, text: str) -> int:
        """How many characters at the end of ``text`` could begin a stop sequence."""
        longest = 0
        for sequence in self.stop:
            for size in range(min(len(sequence) - 1, len(text)), longest, -1):
                if text.endswith(sequence[:size]):
                    longest = size
                    break
        return longest
