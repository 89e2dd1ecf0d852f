"""The HTTP API (FastAPI): jobs, batches, results, models, keys, health and metrics.

Serve with ``uvicorn ndif_scheduler.api:create_app --factory`` (or ``ndif-server api``).
Every route but ``/healthz``, ``/metrics`` and signed blob downloads needs an API key
(``Authorization: Bearer ndif_...``). Jobs, batches and results are visible only to
the key that made them: any other key gets 404, as for an id that does not exist.
"""

import base64
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import anyio.to_thread
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from ndif.sandbox import check_request
from ndif.wire import codec
from ndif.wire.values import WireError

from . import __version__, chat
from .auth import authenticate, create_key, revoke_key
from .db import FINAL, ApiKey, Batch, Deployment, Job, JobEvent, Lane, Status, utcnow
from .metrics import Metrics
from .quotas import QuotaExceeded, check_submission
from .schemas import (
    ArtifactView,
    BatchItemResult,
    BatchResults,
    BatchView,
    ErrorView,
    JobPage,
    JobView,
    KeyCreate,
    KeyCreated,
    KeyView,
    ModelView,
    Problem,
    ResultLink,
    SteeringView,
)
from .service import Service, get_service
from .storage import LocalStore, MissingObject, request_key
from .store import new_id, queue_depths, record_received, transition

REQUEST_MEDIA_TYPE = "application/x-ndif-request"
CHAT_PATH = "/v1/chat/completions"
BATCH_MEDIA_TYPE = "application/x-ndif-batch"
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem} for code in (400, 401, 403, 404, 409, 410, 413, 422, 429, 503)
}


def _binary_body(media_type: str, description: str) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads raw bytes of ``media_type``."""
    schema = {"type": "string", "format": "binary"}
    return {"requestBody": {"required": True, "description": description, "content": {media_type: {"schema": schema}}}}


def _first_error(error: Exception) -> str:
    """A pydantic validation error as one line a person can act on."""
    errors = getattr(error, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    return str(error)


class ApiError(HTTPException):
    """An error response with a `Problem` body (and an `ErrorView` for errors in user code)."""

    def __init__(self, status: int, detail: str, error: ErrorView | None = None, headers: dict | None = None) -> None:
        super().__init__(status, detail, headers)
        self.error = error


def create_app(service: Service | None = None) -> FastAPI:
    """The API application for ``service`` (default: from ``NDIF_*`` settings)."""
    service = service or get_service()
    settings = service.settings
    metrics = Metrics(service)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Long polls hold a worker thread each: allow many at once.
        anyio.to_thread.current_default_thread_limiter().total_tokens = 256
        yield

    app = FastAPI(
        lifespan=lifespan,
        title="ndif",
        version=__version__,
        summary="Run interpretability traces on shared, production model deployments.",
        description=(
            "Submit traces written with `ndif` (wire format v1), follow their jobs, run batch "
            "experiments and download results. Authenticate with `Authorization: Bearer <key>`."
        ),
    )
    app.state.service = service

    @app.exception_handler(ApiError)
    def _api_error(_request: Request, error: ApiError) -> JSONResponse:
        body = Problem(detail=error.detail, error=error.error).model_dump(exclude_none=True)
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    @app.middleware("http")
    async def _count(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.http(request.method, getattr(route, "path", "unmatched"), response.status_code)
        return response

    def db() -> Iterator[Session]:
        with service.sessions() as session:
            yield session

    def caller(
        authorization: Annotated[str | None, Header()] = None,
        x_api_key: Annotated[str | None, Header()] = None,
    ) -> ApiKey:
        key = x_api_key
        if authorization and authorization.lower().startswith("bearer "):
            key = authorization[7:].strip()
        if not key:
            raise ApiError(401, "no API key: send 'Authorization: Bearer <key>' (set NDIF_API_KEY for the client)")
        # Its own short session: a request never holds a connection just for having authenticated.
        with service.sessions() as session:
            row = authenticate(session, key)
        if row is None:
            raise ApiError(401, "this API key is not valid (unknown or revoked)")
        return row

    def admin(key: Annotated[ApiKey, Depends(caller)]) -> ApiKey:
        if not key.is_admin:
            raise ApiError(403, "this needs an admin key")
        return key

    Db = Annotated[Session, Depends(db)]
    Caller = Annotated[ApiKey, Depends(caller)]

    def own_job(session: Session, key: ApiKey, job_id: str) -> Job:
        job = session.get(Job, job_id)
        if job is None or job.owner_id != key.id:
            raise ApiError(404, f"no job {job_id!r} for this key")
        return job

    def own_batch(session: Session, key: ApiKey, batch_id: str) -> Batch:
        batch = session.get(Batch, batch_id)
        if batch is None or batch.owner_id != key.id:
            raise ApiError(404, f"no batch {batch_id!r} for this key")
        return batch

    async def read_body(request: Request) -> bytes:
        limit = settings.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request is {int(declared)} bytes; the limit is {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def validate(data: bytes, where: str = "") -> tuple[Any, str]:
        """Decode and check one request; returns it and its deployment's key."""
        try:
            request = codec.decode_request(data, codec.SizeLimits(max_compressed=settings.max_request_bytes))
        except WireError as error:
            raise ApiError(400, f"{where}{error}") from None
        if request.kind not in ("trace", "generate", "scan", "session"):
            raise ApiError(400, f"{where}unknown request kind {request.kind!r}")
        deployment = service.registry.resolve(request.model)
        if deployment is None:
            known = ", ".join(service.registry.keys) or "none"
            raise ApiError(404, f"{where}the model {request.model!r} is not deployed here (deployed: {known})")
        problem = check_request(request)
        if problem is not None:
            raise ApiError(422, f"{where}{problem.type}: {problem.message}", error=ErrorView.of(problem, "user"))
        return request, deployment.key

    def submit_jobs(
        session: Session, key: ApiKey, items: list[tuple[bytes, Any, str]], lane: str, batch: Batch | None = None
    ) -> list[Job]:
        try:
            check_submission(session, key.id, settings, len(items))
        except QuotaExceeded as error:
            metrics.refused("quota")
            raise ApiError(429, str(error), headers={"Retry-After": str(error.retry_after)}) from None
        jobs = []
        lease = utcnow() + timedelta(seconds=settings.requeue_after_s)
        for index, (data, request, deployment_key) in enumerate(items):
            job_id = new_id()
            service.store.put(request_key(job_id), data)
            job = Job(
                id=job_id,
                owner_id=key.id,
                batch_id=batch.id if batch else None,
                batch_index=index if batch else None,
                model=deployment_key,
                kind=request.kind,
                lane=lane,
                status=Status.RECEIVED,
                request_key=request_key(job_id),
                request_bytes=len(data),
                lease_until=lease,
            )
            record_received(session, job)
            jobs.append(job)
        session.commit()
        from .queue import app as celery
        from .queue import enqueue

        for job in jobs:
            transition(session, job.id, [Status.RECEIVED], Status.QUEUED, lease_until=lease)
        session.commit()
        for job in jobs:
            try:
                enqueue(celery, service, job.id, job.model, lane)
            except Exception as error:  # the broker is down: the recovery task sends it later
                metrics.refused("broker")
                if len(jobs) == 1:
                    transition(
                        session,
                        job.id,
                        [Status.QUEUED],
                        Status.ERROR,
                        error_type="QueueUnavailable",
                        error_message=f"the queue is unavailable ({type(error).__name__}); submit again later",
                        error_reason="infrastructure",
                    )
                    session.commit()
                    raise ApiError(
                        503, "the job queue is unavailable; submit again later", headers={"Retry-After": "10"}
                    ) from None
            metrics.submitted(job.model, lane)
        for job in jobs:
            session.refresh(job)
        return jobs

    # -- jobs -------------------------------------------------------------------------

    @app.post(
        "/v1/jobs",
        status_code=202,
        response_model=JobView,
        responses=ERRORS,
        tags=["jobs"],
        openapi_extra=_binary_body(
            REQUEST_MEDIA_TYPE, "One encoded request (wire format v1: zstd-compressed MessagePack)."
        ),
    )
    async def submit_job(
        request: Request,
        key: Caller,
        lane: Annotated[Lane, Query(description="interactive (default) or batch")] = Lane.INTERACTIVE,
    ) -> JobView:
        """Submit a trace. Returns the new job (QUEUED); poll it, or wait on it with ``?wait=``."""
        data = await read_body(request)

        def work() -> JobView:
            decoded, deployment_key = validate(data)
            with service.sessions() as session:
                (job,) = submit_jobs(session, session.merge(key), [(data, decoded, deployment_key)], lane)
                return JobView.of(job)

        return await anyio.to_thread.run_sync(work)

    @app.get("/v1/jobs", response_model=JobPage, responses=ERRORS, tags=["jobs"])
    def list_jobs(
        session: Db,
        key: Caller,
        status: Annotated[list[Status] | None, Query()] = None,
        batch: str | None = None,
        model: str | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: str | None = None,
    ) -> JobPage:
        """The caller's jobs, newest first, filtered by status, batch or model."""
        query = select(Job).where(Job.owner_id == key.id)
        if status:
            query = query.where(Job.status.in_([s.value for s in status]))
        if batch:
            query = query.where(Job.batch_id == batch)
        if model:
            query = query.where(Job.model == model)
        if cursor:
            created, job_id = _decode_cursor(cursor)
            query = query.where((Job.created_at < created) | ((Job.created_at == created) & (Job.id < job_id)))
        rows = session.execute(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).scalars().all()
        page = rows[:limit]
        next_cursor = _encode_cursor(page[-1].created_at, page[-1].id) if len(rows) > limit else None
        return JobPage(jobs=[JobView.of(job) for job in page], next_cursor=next_cursor)

    @app.get("/v1/jobs/{job_id}", response_model=JobView, responses=ERRORS, tags=["jobs"])
    def get_job(
        key: Caller,
        job_id: str,
        wait: Annotated[float, Query(ge=0, le=60, description="Wait up to this many seconds for a change.")] = 0,
        after: Annotated[Status | None, Query(description="With wait: return once the status is not this.")] = None,
    ) -> JobView:
        """A job's status, timings, attempts, error and history of status changes."""
        with service.sessions() as session:
            status = own_job(session, key, job_id).status
        deadline = time.monotonic() + wait
        # A long poll holds no connection while it waits: each look is its own short query.
        while wait and status not in FINAL and (after is None or status == after):
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
            with service.sessions() as session:
                status = session.execute(select(Job.status).where(Job.id == job_id)).scalar_one()
        with service.sessions() as session:
            job = own_job(session, key, job_id)
            events = session.execute(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
            return JobView.of(job, list(events.scalars()))

    @app.get("/v1/jobs/{job_id}/result", response_model=ResultLink, responses=ERRORS, tags=["jobs"])
    def get_result(session: Db, key: Caller, job_id: str) -> ResultLink:
        """A short-lived URL to download the job's result (saved values, logs, error) from the store."""
        job = own_job(session, key, job_id)
        return _link(job)

    def _link(job: Job) -> ResultLink:
        if job.status not in FINAL:
            raise ApiError(409, f"job {job.id} is {job.status}; its result is ready once it has ended")
        if job.result_expired:
            raise ApiError(410, f"the result of job {job.id} expired and was deleted")
        if job.result_key is None:
            why = f": {job.error_type}: {job.error_message}" if job.error_type else ""
            raise ApiError(404, f"job {job.id} ended {job.status} without a result{why}")
        ttl = settings.presign_ttl_s
        return ResultLink(
            url=service.store.download_url(job.result_key, ttl),
            expires_at=datetime.now(UTC) + timedelta(seconds=ttl),
            bytes=job.result_bytes or 0,
        )

    @app.delete("/v1/jobs/{job_id}/result", status_code=204, responses=ERRORS, tags=["jobs"])
    def delete_result(session: Db, key: Caller, job_id: str) -> Response:
        """Delete a fetched result now (it no longer counts against the result-bytes quota)."""
        job = own_job(session, key, job_id)
        if job.status not in FINAL:
            raise ApiError(409, f"job {job.id} is {job.status}; cancel it first")
        if job.result_key and not job.result_expired:
            service.store.delete(job.result_key)
            job.result_expired = True
            session.commit()
        return Response(status_code=204)

    @app.delete("/v1/jobs/{job_id}", response_model=JobView, responses=ERRORS, tags=["jobs"])
    def cancel_job(session: Db, key: Caller, job_id: str) -> JobView:
        """Cancel a job: at once if it has not started; a running one stops at its next check."""
        job = own_job(session, key, job_id)
        _cancel(session, job)
        session.commit()
        session.refresh(job)
        return JobView.of(job)

    def _cancel(session: Session, job: Job) -> None:
        if job.status in FINAL:
            return
        if transition(
            session,
            job.id,
            [Status.RECEIVED, Status.QUEUED, Status.DISPATCHED],
            Status.CANCELLED,
            detail="cancelled by its owner",
        ):
            return
        session.execute(
            Job.__table__.update()
            .where(Job.id == job.id, Job.status == Status.RUNNING)
            .values(cancel_requested=True, updated_at=utcnow())
        )

    # -- batches ----------------------------------------------------------------------

    @app.post(
        "/v1/batches",
        status_code=202,
        response_model=BatchView,
        responses=ERRORS,
        tags=["batches"],
        openapi_extra=_binary_body(
            BATCH_MEDIA_TYPE, "A batch: MessagePack {protocol, name, items: [encoded request, ...]}."
        ),
    )
    async def submit_batch(request: Request, key: Caller) -> BatchView:
        """Submit many traces as one batch experiment (all accepted, or none)."""
        data = await read_body(request)

        def work() -> BatchView:
            try:
                envelope = codec.decode_batch(data, settings.max_batch_items)
            except WireError as error:
                raise ApiError(400, str(error)) from None
            if envelope.name is not None and len(envelope.name) > 200:
                raise ApiError(400, f"the batch name is {len(envelope.name)} characters; at most 200 are kept")
            items = []
            for index, item in enumerate(envelope.items):
                decoded, deployment_key = validate(item, where=f"batch item {index}: ")
                items.append((item, decoded, deployment_key))
            with service.sessions() as session:
                owner = session.merge(key)
                batch = Batch(id=new_id(), owner_id=owner.id, name=envelope.name, size=len(items))
                session.add(batch)
                session.flush()
                submit_jobs(session, owner, items, Lane.BATCH, batch)
                return _batch_view(session, batch, 0, 0)

        return await anyio.to_thread.run_sync(work)

    @app.get("/v1/batches", response_model=list[BatchView], responses=ERRORS, tags=["batches"])
    def list_batches(session: Db, key: Caller, limit: Annotated[int, Query(ge=1, le=200)] = 50) -> list[BatchView]:
        """The caller's batches, newest first (counts only)."""
        batches = session.execute(
            select(Batch).where(Batch.owner_id == key.id).order_by(Batch.created_at.desc()).limit(limit)
        ).scalars()
        return [_batch_view(session, batch, 0, 0) for batch in batches]

    @app.get("/v1/batches/{batch_id}", response_model=BatchView, responses=ERRORS, tags=["batches"])
    def get_batch(
        session: Db,
        key: Caller,
        batch_id: str,
        limit: Annotated[int, Query(ge=0, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> BatchView:
        """A batch's counts per status, progress, and a page of its jobs in submission order."""
        return _batch_view(session, own_batch(session, key, batch_id), limit, offset)

    @app.get("/v1/batches/{batch_id}/results", response_model=BatchResults, responses=ERRORS, tags=["batches"])
    def batch_results(session: Db, key: Caller, batch_id: str) -> BatchResults:
        """Download links for every finished item of a batch (partial while it runs)."""
        batch = own_batch(session, key, batch_id)
        jobs = session.execute(select(Job).where(Job.batch_id == batch.id).order_by(Job.batch_index)).scalars()
        items = []
        for job in jobs:
            item = BatchItemResult(index=job.batch_index or 0, job_id=job.id, status=job.status)
            if job.status in FINAL and job.result_key and not job.result_expired:
                link = _link(job)
                item.url, item.bytes = link.url, link.bytes
            elif job.error_type:
                item.error = JobView.of(job).error
            items.append(item)
        expires = datetime.now(UTC) + timedelta(seconds=settings.presign_ttl_s)
        return BatchResults(id=batch.id, items=items, expires_at=expires)

    @app.delete("/v1/batches/{batch_id}", response_model=BatchView, responses=ERRORS, tags=["batches"])
    def cancel_batch(session: Db, key: Caller, batch_id: str) -> BatchView:
        """Cancel every job of the batch that has not ended."""
        batch = own_batch(session, key, batch_id)
        pending = (
            session.execute(select(Job).where(Job.batch_id == batch.id, Job.status.not_in(list(FINAL)))).scalars().all()
        )
        for job in pending:
            _cancel(session, job)
        session.commit()
        return _batch_view(session, batch, 0, 0)

    def _batch_view(session: Session, batch: Batch, limit: int, offset: int) -> BatchView:
        counts = dict(
            session.execute(select(Job.status, func.count()).where(Job.batch_id == batch.id).group_by(Job.status)).all()
        )
        finished = sum(counts.get(status, 0) for status in FINAL)
        jobs = []
        if limit:
            jobs = (
                session.execute(
                    select(Job).where(Job.batch_id == batch.id).order_by(Job.batch_index).offset(offset).limit(limit)
                )
                .scalars()
                .all()
            )
        more = offset + limit < batch.size and limit > 0
        return BatchView(
            id=batch.id,
            name=batch.name,
            size=batch.size,
            created_at=batch.created_at,
            counts=counts,
            finished=finished,
            progress=finished / batch.size if batch.size else 1.0,
            jobs=[JobView.of(job) for job in jobs],
            next_cursor=str(offset + limit) if more else None,
        )

    # -- models, keys, health, metrics, blobs ------------------------------------------

    @app.get("/v1/models", response_model=list[ModelView], responses=ERRORS, tags=["models"])
    def list_models(session: Db, _key: Caller) -> list[ModelView]:
        """The deployments, their state and their queues."""
        depths = queue_depths(session)
        views = []
        for deployment in service.registry.deployments:
            row = session.get(Deployment, deployment.key)
            depth = depths.get(deployment.key, {"queued": 0, "running": 0})
            views.append(
                ModelView(
                    key=deployment.key,
                    backend=deployment.backend,
                    aliases=list(deployment.aliases),
                    state=row.state if row else "unknown",
                    replicas=deployment.replicas,
                    replicas_ready=row.replicas_ready if row else 0,
                    queued=depth["queued"],
                    running=depth["running"],
                    updated_at=row.updated_at if row else None,
                )
            )
        return views

    @app.get("/v1/models/{model}/steering", response_model=SteeringView, responses=ERRORS, tags=["chat"])
    def steering_options(_key: Caller, model: str) -> SteeringView:
        """What chat requests may use on this model: its layers, and the steering vectors,
        SAEs and probes it offers by name."""
        deployment = service.registry.resolve(model)
        if deployment is None:
            raise ApiError(404, f"the model {model!r} is not deployed here")
        layers, hidden = chat.model_shape(deployment.path)
        artifacts = [ArtifactView(**entry) for entry in chat.artifacts_of(deployment.artifacts)]
        return SteeringView(model=deployment.key, layers=layers, hidden_size=hidden, artifacts=artifacts)

    @app.get("/playground", tags=["chat"], response_class=HTMLResponse)
    def playground() -> HTMLResponse:
        """A web page to chat with a model, steer it with sliders and watch probes per token.
        Give it a key in the address: ``/playground#key=ndif_...``."""
        return HTMLResponse(chat.playground_page())

    # -- chat ---------------------------------------------------------------------------

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> Any:
        if request.url.path == CHAT_PATH:  # OpenAI's clients read OpenAI's error shape
            return chat.openai_error(400, _first_error(error))
        return await request_validation_exception_handler(request, error)

    def small_enough(request: Request) -> None:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_request_bytes:
            raise ApiError(413, f"the request is {int(declared)} bytes; the limit is {settings.max_request_bytes}")

    @app.post(CHAT_PATH, tags=["chat"], responses=ERRORS, dependencies=[Depends(small_enough)])
    async def chat_completions(body: chat.ChatCompletionRequest, key: Caller) -> Any:
        """OpenAI's chat completion (``stream`` too), with ndif's ``ndif`` field: steering
        vectors, SAE feature edits, and probes, features, norms and the logit lens per token.
        Streamed chunks carry each token's observations in ``ndif``."""
        deployment = service.registry.resolve(body.model)
        if deployment is None:
            known = ", ".join(service.registry.keys) or "none"
            return chat.openai_error(
                404, f"the model {body.model!r} is not deployed here (deployed: {known})", code="model_not_found"
            )

        def submit() -> Job:
            with service.sessions() as session:
                (job,) = submit_jobs(
                    session,
                    session.merge(key),
                    [(body.payload(deployment.key), chat.ChatKind(), deployment.key)],
                    Lane.INTERACTIVE,
                )
                return job

        try:
            job = await anyio.to_thread.run_sync(submit)
        except ApiError as error:
            return chat.openai_error(
                error.status_code, str(error.detail), "rate_limit_error" if error.status_code == 429 else "server_error"
            )
        timeout = settings.job_time_s + settings.actor_wait_s + 60
        if body.stream:
            started = await anyio.to_thread.run_sync(chat.wait_for, service, job.id, timeout, True)
            if started.status in FINAL and started.status != Status.COMPLETED:
                return _chat_failure(started)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = chat.stream_events(service, started, body.model, include_usage, timeout)

            async def relay() -> AsyncIterator[str]:
                try:
                    while True:
                        event = await anyio.to_thread.run_sync(next, events, None)
                        if event is None:
                            return
                        yield event
                finally:  # the client went away before the end: stop the reply
                    await anyio.to_thread.run_sync(_cancel_chat, job.id)

            return StreamingResponse(relay(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        finished = await anyio.to_thread.run_sync(chat.wait_for, service, job.id, timeout)
        if finished.status != Status.COMPLETED:
            if finished.status not in FINAL:
                await anyio.to_thread.run_sync(_cancel_chat, job.id)
            return _chat_failure(finished)
        result = json.loads(await anyio.to_thread.run_sync(service.store.get, finished.result_key))
        return JSONResponse(chat.completion(finished, body.model, result))

    def _cancel_chat(job_id: str) -> None:
        with service.sessions() as session:
            job = session.get(Job, job_id)
            if job is not None:
                _cancel(session, job)
                session.commit()

    def _chat_failure(job: Job) -> Any:
        if job.status not in FINAL:
            return chat.openai_error(504, "the reply did not start in time; try again", "server_error", "timeout")
        if job.status == Status.CANCELLED:
            return chat.openai_error(409, f"the reply was cancelled ({job.id})", "cancelled", "cancelled")
        if job.error_reason == "user" or job.error_type == "ChatError":
            return chat.openai_error(400, f"{job.error_type}: {job.error_message}", code=job.error_type)
        return chat.openai_error(500, f"{job.error_type}: {job.error_message}", "server_error", job.error_type)

    @app.post("/v1/keys", status_code=201, response_model=KeyCreated, responses=ERRORS, tags=["admin"])
    def make_key(session: Db, _admin: Annotated[ApiKey, Depends(admin)], body: KeyCreate) -> KeyCreated:
        """Create an API key (admin). The secret is in this response only."""
        new = create_key(session, body.name, body.admin, body.quota_queued, body.quota_running, body.quota_result_bytes)
        return KeyCreated(id=new.id, name=new.name, key=new.key, admin=new.is_admin)

    @app.get("/v1/keys", response_model=list[KeyView], responses=ERRORS, tags=["admin"])
    def list_keys(session: Db, _admin: Annotated[ApiKey, Depends(admin)]) -> list[KeyView]:
        """Every key (admin): names and prefixes, never secrets."""
        rows = session.execute(select(ApiKey).order_by(ApiKey.created_at)).scalars()
        return [
            KeyView(
                id=r.id,
                name=r.name,
                prefix=r.prefix,
                admin=r.is_admin,
                created_at=r.created_at,
                revoked=r.revoked_at is not None,
            )
            for r in rows
        ]

    @app.delete("/v1/keys/{key_id}", status_code=204, responses=ERRORS, tags=["admin"])
    def delete_key(session: Db, _admin: Annotated[ApiKey, Depends(admin)], key_id: str) -> Response:
        """Revoke a key (admin); its jobs stay."""
        if not revoke_key(session, key_id):
            raise ApiError(404, f"no active key {key_id!r}")
        return Response(status_code=204)

    @app.get("/healthz", tags=["service"])
    def healthz(session: Db) -> JSONResponse:
        """200 when the job store and the object store answer, else 503 naming what failed."""
        checks: dict[str, str] = {}
        try:
            session.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as error:
            checks["database"] = f"failed: {type(error).__name__}"
        try:
            service.store.ping()
            checks["object_store"] = "ok"
        except Exception as error:
            checks["object_store"] = f"failed: {type(error).__name__}"
        healthy = all(value == "ok" for value in checks.values())
        return JSONResponse({"status": "ok" if healthy else "unhealthy", **checks}, status_code=200 if healthy else 503)

    @app.get("/metrics", tags=["service"], response_class=Response)
    def prometheus() -> Response:
        """Prometheus metrics: HTTP traffic, submissions, refusals, jobs per model and status."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/blobs/{key:path}", tags=["service"], responses=ERRORS, include_in_schema=False)
    def blob(key: str, expires: int, signature: str) -> Response:
        store = service.store
        if not isinstance(store, LocalStore) or not store.verify(key, expires, signature):
            raise ApiError(403, "this download link is not valid or has expired; ask for a new one")
        try:
            return Response(store.get(key), media_type="application/octet-stream")
        except MissingObject:
            raise ApiError(404, "the object is gone (expired)") from None

    return app


def _encode_cursor(created: datetime, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created.isoformat()}|{job_id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return datetime.fromisoformat(created), job_id
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "this cursor is not valid; use the next_cursor of a previous page") from None
