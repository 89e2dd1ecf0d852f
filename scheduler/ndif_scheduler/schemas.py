"""The JSON bodies of the HTTP API (pydantic models; they make the OpenAPI spec)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from .db import Job, JobEvent


class ErrorView(BaseModel):
    """Why a job failed: the exception, where in the user's code, and what kind of failure.

    ``reason`` is ``user`` (the code raised), ``limit`` (time, memory or saved bytes),
    ``cancelled`` or ``infrastructure`` (the service failed; retried before it is reported).
    """

    type: str
    message: str
    reason: str | None = None
    frames: list[dict[str, Any]] = []
    notes: list[str] = []

    @classmethod
    def of(cls, info: Any, reason: str | None) -> ErrorView:
        """From a wire-format `ErrorInfo`."""
        return cls(
            type=info.type,
            message=info.message,
            reason=reason,
            frames=[{"filename": f.filename, "line": f.line, "name": f.name, "source": f.source} for f in info.frames],
            notes=list(info.notes),
        )


class EventView(BaseModel):
    from_status: str | None
    to_status: str
    at: datetime
    detail: str | None = None


class JobView(BaseModel):
    id: str
    status: str
    model: str
    kind: str
    lane: str
    batch_id: str | None = None
    batch_index: int | None = None
    attempts: int
    cancel_requested: bool = False
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    request_bytes: int
    result_bytes: int | None = None
    result_expired: bool = False
    timings: dict[str, float] | None = None
    error: ErrorView | None = None
    events: list[EventView] | None = None

    @classmethod
    def of(cls, job: Job, events: list[JobEvent] | None = None) -> JobView:
        error = None
        if job.error_type is not None:
            detail = job.error_detail or {}
            error = ErrorView(
                type=job.error_type,
                message=job.error_message or "",
                reason=job.error_reason,
                frames=detail.get("frames", []),
                notes=detail.get("notes", []),
            )
        return cls(
            id=job.id,
            status=job.status,
            model=job.model,
            kind=job.kind,
            lane=job.lane,
            batch_id=job.batch_id,
            batch_index=job.batch_index,
            attempts=job.attempts,
            cancel_requested=job.cancel_requested,
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            request_bytes=job.request_bytes,
            result_bytes=job.result_bytes,
            result_expired=job.result_expired,
            timings=job.timings,
            error=error,
            events=None
            if events is None
            else [
                EventView(from_status=e.from_status, to_status=e.to_status, at=e.at, detail=e.detail) for e in events
            ],
        )


class JobPage(BaseModel):
    jobs: list[JobView]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null on the last.")


class ResultLink(BaseModel):
    """Where to download a job's result (a wire-format `Result`) for a short while."""

    url: str
    expires_at: datetime
    bytes: int


class BatchView(BaseModel):
    id: str
    name: str | None
    size: int
    created_at: datetime
    counts: dict[str, int]
    finished: int
    progress: float = Field(description="Share of the batch's jobs in a final state, 0 to 1.")
    jobs: list[JobView] = []
    next_cursor: str | None = None


class BatchItemResult(BaseModel):
    index: int
    job_id: str
    status: str
    url: str | None = None
    bytes: int | None = None
    error: ErrorView | None = None


class BatchResults(BaseModel):
    id: str
    items: list[BatchItemResult]
    expires_at: datetime


class ModelView(BaseModel):
    key: str
    backend: str
    aliases: list[str]
    state: str = Field(description="ready, degraded (some replicas down), down, or unknown (not yet seen).")
    replicas: int
    replicas_ready: int
    queued: int
    running: int
    updated_at: datetime | None = None


class KeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    admin: bool = False
    quota_queued: int | None = Field(None, ge=0)
    quota_running: int | None = Field(None, ge=1)
    quota_result_bytes: int | None = Field(None, ge=0)


class KeyCreated(BaseModel):
    id: str
    name: str
    key: str = Field(description="The secret. Shown once; the service keeps only its hash.")
    admin: bool


class KeyView(BaseModel):
    id: str
    name: str
    prefix: str
    admin: bool
    created_at: datetime
    revoked: bool


class Problem(BaseModel):
    """Every error body: what went wrong and what to do; ``error`` for errors in the user's code."""

    detail: str
    error: ErrorView | None = None


class ArtifactView(BaseModel):
    """A steering vector, SAE or probe a deployment offers to chat requests."""

    name: str
    kind: str = Field(description="steering_vector, sae or probe")
    layer: int | None = None
    features: int | None = Field(None, description="An SAE's number of features.")
    labels: list[str] | None = Field(None, description="A probe's class names.")


class SteeringView(BaseModel):
    """What a model offers chat requests: its shape, and artifacts by name."""

    model: str
    layers: int | None = Field(None, description="Decoder layers (from the checkpoint's config, when readable here).")
    hidden_size: int | None = None
    artifacts: list[ArtifactView]
