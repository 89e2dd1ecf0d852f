"""`ModelActor`: one deployment replica; holds a model and runs jobs on it.

The actor is threaded (Ray ``max_concurrency``): several jobs run at once on one model,
each in its own thread with its own sandbox state, none seeing another's values (the
engine keeps all per-run state in context variables). A job is fetched from the object
store by id, decoded, run by `ndif.sandbox.run_request`, and its `Result` (saved
values, or the error at the user's line, and what it printed) written back. The actor
never touches the job store: it returns an `Outcome` to the dispatcher that called it.

Calls are idempotent per job: a second ``run`` of a job already in flight here (a
dispatcher that retried after losing its first) waits for the first instead of
running the job again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import Future
from typing import Any

import msgspec

from ndif.sandbox import CancelToken, JobCancelled, JobLimits, TimeLimitExceeded, run_request
from ndif.wire import codec
from ndif.wire.values import WireError
from ndif_scheduler.config import Settings
from ndif_scheduler.registry import Deployment
from ndif_scheduler.storage import CHAT_PREFIX, MissingObject, open_store, request_key, result_key

from .backends import load_model
from .chat import Artifacts, ChatError, decode_chat, run_chat

log = logging.getLogger(__name__)

#: How long a chat's chunks stay after it ends (for the dispatcher's last read).
CHUNKS_KEPT_S = 60.0

#: Error types that come from limits the service sets, not from the user's code failing.
LIMIT_ERRORS = {"TimeLimitExceeded", "MemoryLimitExceeded", "SaveLimitExceeded"}

#: Error types that say the engine, not the job, failed it: the dispatcher runs the job again.
#: (A vLLM engine preempts requests when its KV cache runs short; an edited one cannot resume.)
RETRY_ERRORS = {"Preempted"}


def reason_of(error_type: str) -> str:
    """Why a job ended in error: ``infrastructure`` (retried), ``limit``, or ``user``."""
    if error_type in RETRY_ERRORS:
        return "infrastructure"
    return "limit" if error_type in LIMIT_ERRORS else "user"


def outcome(status: str, reason: str | None = None, error: dict | None = None, **extra: Any) -> dict[str, Any]:
    """What a run reports back: ``status`` completed|error|cancelled, and why."""
    return {"status": status, "reason": reason, "error": error, **extra}


class ModelActor:
    """A deployment replica (created by `ndif_workers.serve` as a named Ray actor)."""

    def __init__(self, deployment: dict[str, Any], settings: dict[str, Any]) -> None:
        self.deployment = Deployment(**{**deployment, "aliases": tuple(deployment.get("aliases", ()))})
        self.settings = Settings(**settings)
        self.store = open_store(self.settings)
        self.limits = JobLimits(time_s=self.settings.job_time_s, max_saved_bytes=self.settings.job_max_saved_bytes)
        self.size_limits = codec.SizeLimits(max_compressed=self.settings.max_request_bytes)
        started = time.perf_counter()
        self.model = load_model(self.deployment)
        self.load_seconds = time.perf_counter() - started
        self._lock = threading.Lock()
        self._running: dict[str, Future] = {}
        self._tokens: dict[str, CancelToken] = {}
        self.completed = 0
        self.artifacts = Artifacts(self.deployment.artifacts or None)
        self._chunks: dict[str, list[dict[str, Any]]] = {}  # a chat's tokens so far, by job
        self._chunks_ended: dict[str, float] = {}  # when a chat ended (its chunks are kept a while)

    # -- called by dispatchers ------------------------------------------------------

    def run(self, job_id: str) -> dict[str, Any]:
        """Run a job whose request is in the object store; returns its outcome."""
        with self._lock:
            future = self._running.get(job_id)
            owner = future is None
            if owner:
                future = self._running[job_id] = Future()
                token = self._tokens[job_id] = CancelToken()
        if not owner:
            return future.result()
        try:
            result = self._run(job_id, token)
            future.set_result(result)
            return result
        except BaseException as error:
            future.set_exception(error)
            raise
        finally:
            with self._lock:
                self._running.pop(job_id, None)
                self._tokens.pop(job_id, None)
                self.completed += 1

    def cancel(self, job_id: str) -> bool:
        """Cancel a job running here; returns whether it was running."""
        with self._lock:
            token = self._tokens.get(job_id)
        if token is None:
            return False
        token.cancel()
        return True

    def chunks(self, job_id: str, since: int = 0) -> list[dict[str, Any]]:
        """A chat's chunks (one per token) from number ``since`` on; kept a minute after it ends."""
        with self._lock:
            now = time.monotonic()
            for ended in [job for job, at in self._chunks_ended.items() if now - at > CHUNKS_KEPT_S]:
                self._chunks.pop(ended, None)
                self._chunks_ended.pop(ended, None)
            return list(self._chunks.get(job_id, ())[since:])

    def health(self) -> dict[str, Any]:
        if not getattr(self.model, "healthy", True):
            raise RuntimeError(f"{self.deployment.key}: the model's engine failed")
        with self._lock:
            in_flight = len(self._running)
        return {
            "key": self.deployment.key,
            "pid": os.getpid(),
            "in_flight": in_flight,
            "completed": self.completed,
            "load_seconds": self.load_seconds,
        }

    # -- one job --------------------------------------------------------------------

    def _run(self, job_id: str, token: CancelToken) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            data = self.store.get(request_key(job_id))
        except MissingObject:
            return outcome("error", "infrastructure", {"type": "MissingRequest", "message": "the request was lost"})
        if data.startswith(CHAT_PREFIX):
            return self._run_chat(job_id, data, token, started)
        try:
            request = codec.decode_request(data, self.size_limits)
        except WireError as error:
            return outcome("error", "user", {"type": "WireError", "message": str(error)})
        if request.model not in self.deployment.names():
            message = f"this worker serves {self.deployment.key!r}, not {request.model!r}"
            return outcome("error", "infrastructure", {"type": "WrongModel", "message": message})
        decoded = time.perf_counter() - started
        if getattr(self.model, "_ranks", False):
            # A tensor-parallel engine: the request runs on its worker ranks as it came, and
            # the first rank's encoded result comes back (decoded here only to report on it).
            encoded = self.model.run_wire(data, self.limits, token)
            result = codec.decode_result(encoded)
        else:
            result = run_request(self.model, request, self.limits, job_id=job_id, cancel=token)
            result.timings.decode = decoded
            encoded = None
        if not getattr(self.model, "healthy", True):
            # The engine itself failed (a vLLM engine's thread died): no job can run here any
            # more. End the process; Ray restarts the replica and dispatchers retry its jobs.
            log.error("the model's engine failed; exiting so that the replica restarts")
            os._exit(70)
        if encoded is None:
            encoded = codec.encode_result(result)
        self.store.put(result_key(job_id), encoded)
        timings = msgspec.to_builtins(result.timings)
        extra = {"result_bytes": len(encoded), "timings": timings, "pid": os.getpid()}
        if result.error is None:
            return outcome("completed", **extra)
        error = msgspec.to_builtins(result.error)
        if result.error.type == "JobCancelled":
            return outcome("cancelled", "cancelled", error, **extra)
        reason = reason_of(result.error.type)
        return outcome("error", reason, error, **extra)

    def _run_chat(self, job_id: str, data: bytes, token: CancelToken, started: float) -> dict[str, Any]:
        """A chat completion: trusted code over the request's data (see `ndif_workers.chat`)."""
        with self._lock:
            chunks = self._chunks[job_id] = []

        def emit(chunk: dict[str, Any]) -> None:
            with self._lock:
                chunks.append(chunk)

        error = None
        try:
            payload = decode_chat(data)
            if payload.get("model") not in self.deployment.names():
                message = f"this worker serves {self.deployment.key!r}, not {payload.get('model')!r}"
                return outcome("error", "infrastructure", {"type": "WrongModel", "message": message})
            result = run_chat(self.model, payload, self.artifacts, emit, token, self.settings.job_time_s)
        except (ChatError, ValueError, KeyError) as failure:
            error = {"type": "ChatError", "message": str(failure)}
        except (JobCancelled, TimeLimitExceeded) as failure:
            error = {"type": type(failure).__name__, "message": str(failure)}
        except Exception as failure:  # noqa: BLE001 - the model raised: the chat's error, not the worker's
            error = {"type": type(failure).__name__, "message": str(failure)}
        finally:
            with self._lock:
                self._chunks_ended[job_id] = time.monotonic()
        if not getattr(self.model, "healthy", True):
            log.error("the model's engine failed; exiting so that the replica restarts")
            os._exit(70)
        timings = {"run": time.perf_counter() - started}
        if error is not None:
            status = "cancelled" if error["type"] == "JobCancelled" else "error"
            reason = "cancelled" if error["type"] == "JobCancelled" else reason_of(error["type"])
            return outcome(status, reason, error, timings=timings)
        encoded = json.dumps(result).encode()
        self.store.put(result_key(job_id), encoded)
        return outcome("completed", result_bytes=len(encoded), timings=timings, pid=os.getpid())
