"""The chat API: OpenAI's ``POST /v1/chat/completions``, with interventions.

A chat completion is a job like any trace: the same key, quotas, queue, dispatcher and
worker. Its request is data, not code (``ndif_workers.chat`` runs it); its tokens stream
back through the job store (`JobChunk`), one row per token with the observations asked
for. The extension field ``ndif`` says what to steer and what to observe:

    {"ndif": {"steer": [{"vector": "joy", "scale": 4}],
              "features": [{"sae": "res-6", "clamp": {"1234": 0}}],
              "observe": {"probes": [{"probe": "sentiment"}], "norms": [6], "logit_lens": {"layer": 6}}}}

With the official ``openai`` client: ``client.chat.completions.create(..., extra_body={"ndif": ...})``;
each streamed chunk carries its token's observations in ``chunk.ndif``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import select

from .db import FINAL, Job, JobChunk, Status
from .storage import CHAT_PREFIX

POLL_S = 0.05


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class SteerSpec(BaseModel):
    """Add ``scale`` times a steering vector to the residual stream."""

    vector: str | list[float] = Field(description="An artifact's name, or the vector's values.")
    layers: list[int] | None = Field(None, description="Decoder layers (default: the vector's own).")
    scale: float = 1.0
    phase: Literal["all", "prompt", "generation"] = "all"


class FeatureEdit(BaseModel):
    """Edit an SAE's features at its layer; the SAE's reconstruction error is kept."""

    sae: str
    layer: int | None = None
    clamp: dict[str, float] = Field(default_factory=dict, description="feature (index or name) -> value it is set to")
    add: dict[str, float] = Field(default_factory=dict, description="feature (index or name) -> amount added")
    scale: dict[str, float] = Field(default_factory=dict, description="feature (index or name) -> factor")
    phase: Literal["all", "prompt", "generation"] = "all"


class ProbeRead(BaseModel):
    probe: str
    layer: int | None = None
    name: str | None = Field(None, description="The observation's name (default: the probe's).")


class FeatureRead(BaseModel):
    sae: str
    features: list[int | str] = Field(min_length=1, max_length=64, description="Indices or names.")
    layer: int | None = None
    name: str | None = None


class LogitLensRead(BaseModel):
    layer: int
    k: int = Field(5, ge=1, le=20)


class Observe(BaseModel):
    """What to report per token."""

    probes: list[ProbeRead] = Field(default_factory=list)
    features: list[FeatureRead] = Field(default_factory=list)
    norms: list[int] = Field(default_factory=list, description="Layers whose residual-stream norm to report.")
    logit_lens: LogitLensRead | None = None


class NdifOptions(BaseModel):
    """ndif's extension of a chat request: interventions, and observations per token."""

    steer: list[SteerSpec] = Field(default_factory=list, max_length=16)
    features: list[FeatureEdit] = Field(default_factory=list, max_length=16)
    observe: Observe = Field(default_factory=Observe)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request (the fields ndif honours; others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = Field(None, description="Up to 4 sequences that end the reply (not included).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ndif: NdifOptions | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.n != 1:
            raise ValueError("n must be 1: one reply per request")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4 or any(len(sequence) > 200 for sequence in stops):
            raise ValueError("stop takes up to 4 sequences of up to 200 characters")
        return self

    def payload(self, deployment_key: str) -> bytes:
        """The job's request: what the worker's `ndif_workers.chat.run_chat` reads."""
        body = {
            "model": deployment_key,
            "messages": [message.model_dump() for message in self.messages],
            "max_tokens": self.max_completion_tokens or self.max_tokens or 256,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": [self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            "ndif": self.ndif.model_dump() if self.ndif else None,
        }
        return CHAT_PREFIX + json.dumps(body).encode()


class ChatKind:
    """What `submit_jobs` needs of a request: its kind."""

    kind = "chat"


def openai_error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "code": code, "param": None}}, status_code=status)


def completion(job: Job, model: str, result: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI ``chat.completion`` object of a finished chat job."""
    return {
        "id": f"chatcmpl-{job.id}",
        "object": "chat.completion",
        "created": int(job.created_at.timestamp()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result["text"]},
                "finish_reason": result["finish_reason"],
                "logprobs": None,
            }
        ],
        "usage": result["usage"],
        "ndif": {
            "job_id": job.id,
            "steps": result["steps"],
            "prompt_tokens": result["prompt_tokens"],
            "prompt_observations": result["prompt_observations"],
        },
    }


def chunk(job: Job, model: str, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
    """One server-sent event of a ``chat.completion.chunk``."""
    return _event(job, model, [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra)


def _event(job: Job, model: str, choices: list[dict[str, Any]], **extra: Any) -> str:
    body = {
        "id": f"chatcmpl-{job.id}",
        "object": "chat.completion.chunk",
        "created": int(job.created_at.timestamp()),
        "model": model,
        "choices": choices,
        **extra,
    }
    return f"data: {json.dumps(body)}\n\n"


def wait_for(service: Any, job_id: str, timeout: float, first_token: bool = False) -> Job:
    """Wait until a chat job has ended (or, with ``first_token``, has its first token), at
    most ``timeout`` seconds; returns the job row."""
    deadline = time.monotonic() + timeout
    while True:
        with service.sessions() as session:
            job = session.get(Job, job_id)
            started = (
                first_token
                and session.execute(select(JobChunk.seq).where(JobChunk.job_id == job_id).limit(1)).first() is not None
            )
        if job.status in FINAL or started or time.monotonic() > deadline:
            return job
        time.sleep(POLL_S)


def read_chunks(service: Any, job_id: str, after: int) -> tuple[list[dict[str, Any]], Job]:
    """The job's chunks numbered above ``after``, and the job row read after them (so a job
    seen final has no chunk left unread)."""
    with service.sessions() as session:
        rows = session.execute(
            select(JobChunk.seq, JobChunk.data)
            .where(JobChunk.job_id == job_id, JobChunk.seq > after)
            .order_by(JobChunk.seq)
        ).all()
        job = session.get(Job, job_id)
    return [{"seq": seq, **data} for seq, data in rows], job


def stream_events(service: Any, job: Job, model: str, include_usage: bool, timeout: float) -> Iterator[str]:
    """The server-sent events of a chat job: a role chunk, one chunk per token (with its
    ``ndif`` observations), the finish, usage if asked, ``[DONE]``."""
    yield chunk(job, model, {"role": "assistant", "content": ""})
    after = -1
    deadline = time.monotonic() + timeout
    attempt = None
    while True:
        rows, current = read_chunks(service, job.id, after)
        for row in rows:
            if row.get("token") is None:  # held-back text released at the end (no token of its own)
                if row["text"]:
                    yield chunk(job, model, {"content": row["text"]})
                after = row["seq"]
                continue
            if attempt is not None and row.get("attempt") != attempt:
                # The worker failed mid-reply and the job is running again from its start.
                yield _error_event("the model worker failed during the reply; ask again", "worker_restarted")
                return
            attempt = row.get("attempt")
            after = row["seq"]
            ndif = {"index": row["index"], "token": row["token"], "observations": row["observations"]}
            if "prompt" in row:  # the first token's chunk also says what the model read
                ndif["prompt"] = row["prompt"]
            yield chunk(job, model, {"content": row["text"]}, ndif=ndif)
        if current.status in FINAL:
            break
        if time.monotonic() > deadline:
            yield _error_event("the reply took too long; it was cancelled", "timeout")
            return
        if not rows:
            time.sleep(POLL_S)
    if current.status != Status.COMPLETED:
        yield _error_event(f"{current.error_type}: {current.error_message}", current.error_type or "error")
        return
    result = json.loads(service.store.get(current.result_key))
    yield chunk(job, model, {}, result["finish_reason"])
    if include_usage:
        yield _event(job, model, [], usage=result["usage"])
    yield "data: [DONE]\n\n"


def _error_event(message: str, code: str) -> str:
    return f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'code': code}})}\n\n"


def artifacts_of(folder: str) -> list[dict[str, Any]]:
    """The artifacts a deployment offers (from the files' headers, without loading tensors)."""
    from pathlib import Path

    from safetensors import safe_open

    found = []
    if not folder:
        return found
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
        except Exception:  # noqa: BLE001 - an unreadable file is left out of the list
            continue
        kind = metadata.get("ndif_kind", "unknown")
        entry: dict[str, Any] = {"name": path.stem, "kind": kind, "layer": _int(metadata.get("layer"))}
        if kind == "sae":
            entry["features"] = shapes.get("W_enc", [0, 0])[1]
        if kind == "probe" and metadata.get("labels"):
            entry["labels"] = metadata["labels"].split(",")
        found.append(entry)
    return found


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def model_shape(path: str) -> tuple[int | None, int | None]:
    """A checkpoint's number of layers and hidden size, from its ``config.json`` if this
    machine can read it."""
    from pathlib import Path

    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None, None
    config = config.get("text_config", config)
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    hidden = config.get("hidden_size") or config.get("n_embd")
    return layers, hidden


def playground_page() -> str:
    from importlib.resources import files

    return files("ndif_scheduler").joinpath("static/playground.html").read_text()
