"""Running a job: claim it, hand it to a model actor, keep its lease, record how it ended.

Runs inside Celery workers (one `Dispatcher` per process). Every status change is a
guarded update (`store.transition`), so at most one dispatcher runs a job's attempt
and records its end:

* claim: QUEUED → DISPATCHED (attempts + 1, a lease); anything else: the message is stale.
* start: DISPATCHED → RUNNING, then ``actor.run(job_id)`` on a replica of the deployment.
* while it runs the lease is renewed every heartbeat; a cancel request is passed on.
* end: RUNNING → COMPLETED | ERROR | CANCELLED, on the same attempt only.

A failure of the infrastructure (the actor died, Ray unreachable, the store down) puts
the job back in the queue until ``max_attempts`` is reached, then ends it in ERROR with
that reason. A failure of the user's code is final at once. If this process dies, the
job's lease runs out and `recover` (periodic) queues it again.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update

from .db import ACTIVE, FINAL, WAITING, Deployment, Job, JobChunk, Status, utcnow
from .quotas import quotas_for
from .service import Service, get_service
from .store import count_by_status, expired_leases, transition

log = logging.getLogger("ndif.dispatch")

INFRASTRUCTURE = "infrastructure"
#: A replica that answered within this many seconds is taken as ready without asking again.
READY_FOR_S = 5.0
#: How often a streaming job's new chunks are read from its actor.
STREAM_POLL_S = 0.05


class Dispatcher:
    _instance: Dispatcher | None = None
    _instance_lock = threading.Lock()

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings = service.settings
        self._ray_lock = threading.Lock()
        self._ray_ready = False
        self._actors: dict[str, Any] = {}
        self._answered: dict[str, float] = {}  # replica -> when it last answered (monotonic)
        self._turns = itertools.count()

    @classmethod
    def get(cls) -> Dispatcher:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = Dispatcher(get_service())
            return cls._instance

    # -- Ray ------------------------------------------------------------------------

    def _ray(self) -> Any:
        import ray

        with self._ray_lock:
            if not self._ray_ready:
                address = self.settings.ray_address
                if not address:
                    path = Path(self.settings.state_dir) / "ray.address"
                    address = path.read_text().strip() if path.exists() else "auto"
                if not ray.is_initialized():
                    local = {"_node_ip_address": "127.0.0.1"} if address.startswith("127.0.0.1") else {}
                    ray.init(
                        address=address,
                        namespace=self.settings.ray_namespace,
                        log_to_driver=False,
                        configure_logging=False,
                        **local,
                    )
                self._ray_ready = True
        return ray

    def _actor(self, name: str, fresh: bool = False) -> Any:
        ray = self._ray()
        if fresh or name not in self._actors:
            self._actors[name] = ray.get_actor(name, namespace=self.settings.ray_namespace)
        return self._actors[name]

    # -- one job --------------------------------------------------------------------

    def run(self, job_id: str) -> None:
        """Handle one ``run_job`` message."""
        from .queue import app, enqueue

        service = self.service
        try:
            self._ray()  # connected before the claim: connecting must not eat into the job's lease
        except Exception as error:
            log.warning("Ray is not reachable yet (%s); the job stays queued", error)
            raise
        with service.sessions() as session:
            job = session.get(Job, job_id)
            if job is None or job.status != Status.QUEUED:
                return  # stale message: the job was claimed, cancelled or finished already
            deployment = service.registry.resolve(job.model)
            if deployment is None:
                self._unknown_model(session, job, [Status.QUEUED], {})
                return
            limit = quotas_for(session, job.owner_id, self.settings).running
            if count_by_status(session, job.owner_id, ACTIVE) >= limit:
                # The owner has as many jobs running as their quota allows: wait, not an attempt.
                enqueue(app, service, job_id, deployment.key, job.lane, delay=1.0)
                return
            attempt = job.attempts + 1
            lease = utcnow() + timedelta(seconds=self.settings.lease_s)
            claimed = transition(
                session,
                job_id,
                [Status.QUEUED],
                Status.DISPATCHED,
                attempt=job.attempts,  # another dispatcher may have claimed and requeued it meanwhile
                detail=f"attempt {attempt}",
                attempts=attempt,
                lease_until=lease,
            )
            session.commit()
        if not claimed:
            return
        self._attempt(job_id, attempt, deployment, job.lane, job.kind)

    def _attempt(
        self, job_id: str, attempt: int, deployment: Any, lane: str = "interactive", kind: str = "trace"
    ) -> None:
        name = deployment.actor_name(next(self._turns) % deployment.replicas)
        try:
            actor = self._actor(name)
        except Exception as error:  # Ray unreachable, or the replica not up (yet)
            self._retry_or_fail(job_id, attempt, f"no model worker for {deployment.key!r} answered ({error})")
            return
        ready = self._await_ready(job_id, attempt, actor, name)
        if ready is None:
            return  # the job moved on meanwhile (cancelled)
        if not ready:
            self._actors.pop(name, None)
            self._retry_or_fail(job_id, attempt, f"the model worker {name} did not become ready")
            return
        with self.service.sessions() as session:
            started = transition(
                session,
                job_id,
                [Status.DISPATCHED],
                Status.RUNNING,
                attempt=attempt,
                detail=name,
                worker=name,
                started_at=utcnow(),
                lease_until=utcnow() + timedelta(seconds=self.settings.lease_s),
            )
            session.commit()
        if not started:
            return  # cancelled in the meantime
        if kind == "chat":  # an earlier attempt's tokens are not this attempt's
            with self.service.sessions() as session:
                session.execute(delete(JobChunk).where(JobChunk.job_id == job_id))
                session.commit()
        try:
            call = actor.run.options(concurrency_group=lane).remote(job_id)
            outcome = self._wait(job_id, attempt, call, actor, streams=kind == "chat")
        except Exception as error:
            log.warning("job %s attempt %d on %s failed: %s", job_id, attempt, name, error)
            self._actors.pop(name, None)
            self._answered.pop(name, None)
            self._retry_or_fail(job_id, attempt, _infrastructure_message(error, name))
            return
        if outcome is not None:
            self._record(job_id, attempt, outcome)

    def _await_ready(self, job_id: str, attempt: int, actor: Any, name: str) -> bool | None:
        """Wait while the replica (re)starts, keeping the job's lease; None if the job moved on.

        A replica that is restarting (after a crash, its model loading again) is not the
        job's failure: the job waits for it, up to ``actor_wait_s``.
        """
        ray = self._ray()
        started = time.monotonic()
        if started - self._answered.get(name, -math.inf) < READY_FOR_S:
            return True  # it answered a moment ago: no need to ask before every job
        deadline = started + self.settings.actor_wait_s
        while True:
            try:
                ray.get(actor.health.remote(), timeout=2.0)
                self._answered[name] = time.monotonic()
                return True
            except Exception as error:
                log.warning("job %s: replica not ready after %.1f s (%s)", job_id, time.monotonic() - started, error)
                if "ActorDied" in type(error).__name__ or time.monotonic() > deadline:
                    return False
            with self.service.sessions() as session:
                renewed = session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == Status.DISPATCHED, Job.attempts == attempt)
                    .values(lease_until=utcnow() + timedelta(seconds=self.settings.lease_s))
                ).rowcount
                session.commit()
            if not renewed:
                return None
            time.sleep(0.5)

    def _wait(self, job_id: str, attempt: int, ref: Any, actor: Any, streams: bool = False) -> dict[str, Any] | None:
        """Wait for the actor's answer, renewing the lease; None if the job moved on meanwhile.

        A job that ``streams`` (a chat) has its chunks copied to the job store as they come,
        every `STREAM_POLL_S`; all of them are stored before its outcome is.
        """
        ray = self._ray()
        cancel_sent = False
        stored = 0
        renewed_at = time.monotonic()
        while True:
            timeout = STREAM_POLL_S if streams else self.settings.heartbeat_s
            ready, _ = ray.wait([ref], timeout=timeout)
            if streams:
                stored = self._store_chunks(job_id, actor, stored, attempt)
            if ready:
                return ray.get(ref)
            if streams and time.monotonic() - renewed_at < self.settings.heartbeat_s:
                continue
            renewed_at = time.monotonic()
            with self.service.sessions() as session:
                renewed = session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == Status.RUNNING, Job.attempts == attempt)
                    .values(lease_until=utcnow() + timedelta(seconds=self.settings.lease_s))
                    .returning(Job.cancel_requested)
                ).scalar_one_or_none()
                session.commit()
            if renewed is None:
                actor.cancel.remote(job_id)  # the job was ended elsewhere: stop the work
                return None
            if renewed and not cancel_sent:
                actor.cancel.remote(job_id)
                cancel_sent = True

    def _store_chunks(self, job_id: str, actor: Any, stored: int, attempt: int) -> int:
        """Copy a streaming job's new chunks from its actor to the job store (each marked with
        the attempt that made it); returns how many are stored now."""
        chunks = self._ray().get(actor.chunks.remote(job_id, stored), timeout=30)
        if not chunks:
            return stored
        with self.service.sessions() as session:
            rows = [{**chunk, "attempt": attempt} for chunk in chunks]
            session.add_all(JobChunk(job_id=job_id, seq=stored + n, data=row) for n, row in enumerate(rows))
            session.commit()
        return stored + len(chunks)

    def _record(self, job_id: str, attempt: int, outcome: dict[str, Any]) -> None:
        status = {"completed": Status.COMPLETED, "error": Status.ERROR, "cancelled": Status.CANCELLED}[
            outcome["status"]
        ]
        if outcome.get("reason") == INFRASTRUCTURE:
            error = outcome.get("error") or {}
            self._retry_or_fail(job_id, attempt, f"{error.get('type')}: {error.get('message')}")
            return
        error = outcome.get("error")
        values: dict[str, Any] = {"timings": outcome.get("timings")}
        if "result_bytes" in outcome:
            values.update(result_key=f"results/{job_id}", result_bytes=outcome["result_bytes"])
        timings = outcome.get("timings") or {}
        values["run_seconds"] = timings.get("run")
        if error is not None:
            values.update(
                error_type=error.get("type"),
                error_message=error.get("message"),
                error_reason=outcome.get("reason"),
                error_detail=error,
            )
        with self.service.sessions() as session:
            transition(session, job_id, [Status.RUNNING], status, attempt=attempt, **values)
            session.commit()

    def _retry_or_fail(self, job_id: str, attempt: int, why: str, lease_expired_by: Any = None) -> None:
        """An infrastructure failure: queue the job again, or end it once out of attempts.

        ``lease_expired_by``: only if the job's lease is (still) expired then — a slow
        dispatcher that has just renewed it keeps its job.
        """
        from .queue import app, enqueue

        log.warning("job %s attempt %d failed: %s", job_id, attempt, why)
        guard = {"attempt": attempt, "lease_expired_by": lease_expired_by}
        with self.service.sessions() as session:
            job = session.get(Job, job_id)
            if job is None or job.status in FINAL or job.attempts != attempt:
                return
            deployment = self.service.registry.resolve(job.model)
            if job.cancel_requested:
                transition(session, job_id, ACTIVE, Status.CANCELLED, detail=why, **guard)
                session.commit()
                return
            if deployment is None:
                self._unknown_model(session, job, ACTIVE, guard)
                return
            if attempt < self.settings.max_attempts:
                moved = transition(
                    session,
                    job_id,
                    ACTIVE,
                    Status.QUEUED,
                    detail=f"retrying: {why}",
                    lease_until=utcnow() + timedelta(seconds=self.settings.lease_s),
                    **guard,
                )
                session.commit()
                if moved:
                    # Back off: what failed (a replica restarting, a network blip) needs a moment.
                    enqueue(app, self.service, job_id, deployment.key, job.lane, delay=min(2.0**attempt, 30.0))
                return
            transition(
                session,
                job_id,
                ACTIVE,
                Status.ERROR,
                detail=why,
                **guard,
                error_type="WorkerFailure",
                error_message=(
                    f"the job failed {attempt} times for reasons outside your code; last: {why}. "
                    "If it keeps happening, the job may be what brings the worker down (memory, a crash): "
                    "try a smaller batch or fewer saved values."
                ),
                error_reason=INFRASTRUCTURE,
            )
            session.commit()

    @staticmethod
    def _unknown_model(session: Any, job: Job, expected: Any, guard: dict[str, Any]) -> None:
        """End a job whose model was removed from the registry after it was accepted."""
        transition(
            session,
            job.id,
            expected,
            Status.ERROR,
            error_type="UnknownModel",
            error_message=f"the model {job.model!r} is no longer deployed here; submit to a deployed model",
            error_reason=INFRASTRUCTURE,
            **guard,
        )
        session.commit()

    # -- periodic -------------------------------------------------------------------

    def recover(self) -> None:
        """Requeue (or end) jobs whose lease ran out; resend messages that may have been lost."""
        from .queue import app, enqueue

        now = utcnow()
        with self.service.sessions() as session:
            stale = [(job.id, job.status, job.attempts, job.model, job.lane) for job in expired_leases(session, now)]
        for job_id, status, attempts, model, lane in stale:
            deployment = self.service.registry.resolve(model)
            if status in ACTIVE:
                why = "its dispatcher stopped answering (lease expired)"
                self._retry_or_fail(job_id, attempts, why, lease_expired_by=now)
                continue
            with self.service.sessions() as session:
                if deployment is None:
                    job = session.get(Job, job_id)
                    if job is not None:
                        self._unknown_model(session, job, WAITING, {"lease_expired_by": now})
                    continue
                moved = transition(
                    session,
                    job_id,
                    WAITING,
                    Status.QUEUED,
                    detail="message sent again",
                    lease_expired_by=now,
                    lease_until=utcnow() + timedelta(seconds=self.settings.requeue_after_s),
                )
                session.commit()
            if moved:
                enqueue(app, self.service, job_id, deployment.key, lane)

    def expire_results(self) -> None:
        """Delete results older than the TTL (the job rows stay, marked expired)."""
        cutoff = utcnow() - timedelta(seconds=self.settings.result_ttl_s)
        with self.service.sessions() as session:
            jobs = session.execute(
                select(Job.id, Job.result_key).where(
                    Job.result_key.is_not(None), Job.result_expired.is_(False), Job.finished_at < cutoff
                )
            ).all()
            for job_id, key in jobs:
                self.service.store.delete(key)
                self.service.store.delete(f"requests/{job_id}")
                session.execute(update(Job).where(Job.id == job_id).values(result_expired=True))
            # A finished chat's streamed tokens go with its result (the result holds them all).
            finished = select(Job.id).where(Job.finished_at < cutoff)
            session.execute(delete(JobChunk).where(JobChunk.job_id.in_(finished)))
            session.commit()

    def refresh_deployments(self) -> None:
        """Ask every replica how it is; store what ``GET /v1/models`` reports."""
        ray = None
        try:
            ray = self._ray()
        except Exception as error:
            log.warning("Ray is not reachable: %s", error)
        with self.service.sessions() as session:
            for deployment in self.service.registry.deployments:
                ready = in_flight = 0
                for replica in range(deployment.replicas):
                    if ray is None:
                        break
                    name = deployment.actor_name(replica)
                    try:
                        actor = self._actor(name, fresh=True)
                        health = ray.get(actor.health.remote(), timeout=2.0)
                    except Exception:
                        self._answered.pop(name, None)
                        continue
                    self._answered[name] = time.monotonic()
                    ready += 1
                    in_flight += health["in_flight"]
                state = "ready" if ready == deployment.replicas else ("degraded" if ready else "down")
                row = session.get(Deployment, deployment.key)
                if row is None:
                    row = Deployment(key=deployment.key, backend=deployment.backend, replicas=deployment.replicas)
                    session.add(row)
                row.state, row.replicas_ready, row.in_flight, row.updated_at = state, ready, in_flight, utcnow()
            session.commit()


def _infrastructure_message(error: Exception, name: str) -> str:
    kind = type(error).__name__
    if "ActorDied" in kind or "ActorUnavailable" in kind or "RayActorError" in kind:
        return f"the model worker {name} died while running the job"
    return f"{kind} from {name}: {str(error).splitlines()[0] if str(error) else ''}"
