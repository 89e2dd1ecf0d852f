"""The dispatcher without Ray or a broker: a fake actor and a fake ``ray`` module answer it,
and Celery's ``enqueue`` is a recorder. The job store is a migrated SQLite file."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

import ndif_scheduler.dispatch as dispatch_module
import ndif_scheduler.service as service_module
from ndif_scheduler.auth import create_key
from ndif_scheduler.config import Settings
from ndif_scheduler.db import Deployment, Job, JobChunk, JobEvent, Lane, Status, migrate, utcnow
from ndif_scheduler.dispatch import Dispatcher
from ndif_scheduler.service import Service
from ndif_scheduler.store import new_id, record_received, transition


class ActorDiedError(Exception):
    """Named like Ray's: the dispatcher recognises a dead actor by the class name."""


class Method:
    """``actor.<method>.remote(...)``: records the call and returns a reference."""

    def __init__(self, name: str, on_call: Any = None) -> None:
        self.name = name
        self.calls: list[tuple] = []
        self.on_call = on_call

    def options(self, **options: Any) -> Method:
        self.options_seen = options
        return self

    def remote(self, *args: Any) -> tuple:
        self.calls.append(args)
        if self.on_call is not None:
            self.on_call(*args)
        return (self.name, len(self.calls), *args)


class FakeActor:
    def __init__(self, name: str, on_run: Any = None) -> None:
        self.name = name
        self.run = Method("run", on_run)
        self.cancel = Method("cancel")
        self.health = Method("health")
        self.chunks = Method("chunks")


class FakeRay:
    """``ray.wait``/``ray.get`` over scripted answers: ``answers[ref kind]`` is a value to
    return or an exception to raise; ``pending`` heartbeats pass before a ref is ready."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {"health": {"in_flight": 0, "pid": 1}}
        self.pending = 0
        self.waits = 0
        self.on_wait: Any = None

    def wait(self, refs: list, timeout: float) -> tuple[list, list]:
        self.waits += 1
        if self.pending:
            self.pending -= 1
            if self.on_wait is not None:
                self.on_wait()
            return [], refs
        return refs, []

    def get(self, ref: tuple, timeout: float | None = None) -> Any:
        answer = self.answers[ref[0]]
        if callable(answer) and not isinstance(answer, type):
            answer = answer(ref)
        if isinstance(answer, BaseException):
            raise answer
        return answer


class Harness:
    def __init__(self, service: Service, enqueued: list, monkeypatch: pytest.MonkeyPatch) -> None:
        self.service = service
        self.enqueued = enqueued
        self.dispatcher = Dispatcher(service)
        self.ray = FakeRay()
        self.actors: dict[str, FakeActor] = {}
        self.looked_up: list[str] = []
        self.unreachable: set[str] = set()
        self.run_saw: list[tuple[str, str, int]] = []
        monkeypatch.setattr(self.dispatcher, "_ray", lambda: self.ray)
        monkeypatch.setattr(self.dispatcher, "_actor", self._actor)
        with service.sessions() as session:
            self.owner = create_key(session, "owner").id
            self.limited = create_key(session, "limited", quota_running=1).id

    def _actor(self, name: str, fresh: bool = False) -> FakeActor:
        self.looked_up.append(name)
        if name in self.unreachable:
            raise ValueError(f"Failed to look up actor with name '{name}'")
        if name not in self.actors:
            self.actors[name] = FakeActor(name, on_run=lambda job_id: self._saw(name, job_id))
        return self.actors[name]

    def _saw(self, name: str, job_id: str) -> None:
        job = self.job(job_id)
        self.run_saw.append((name, job.status, job.attempts))

    def add_job(self, status: Status = Status.QUEUED, owner: str | None = None, model: str = "tiny", **values) -> str:
        job_id = new_id()
        with self.service.sessions() as session:
            job = Job(
                id=job_id,
                owner_id=owner or self.owner,
                model=model,
                kind="trace",
                lane=values.pop("lane", Lane.INTERACTIVE),
                request_key=f"requests/{job_id}",
                request_bytes=10,
                **values,
            )
            record_received(session, job)
            session.commit()
            path = {
                Status.RECEIVED: [],
                Status.QUEUED: [Status.QUEUED],
                Status.DISPATCHED: [Status.QUEUED, Status.DISPATCHED],
                Status.RUNNING: [Status.QUEUED, Status.DISPATCHED, Status.RUNNING],
            }[status]
            previous = Status.RECEIVED
            for step in path:
                extra = {"attempts": 1} if step == Status.DISPATCHED else {}
                assert transition(session, job_id, [previous], step, **extra)
                previous = step
            session.commit()
            if "lease_until" in values:  # transitions keep it, but be explicit
                session.execute(
                    Job.__table__.update().where(Job.id == job_id).values(lease_until=values["lease_until"])
                )
                session.commit()
        return job_id

    def job(self, job_id: str) -> Job:
        with self.service.sessions() as session:
            return session.get(Job, job_id)

    def events(self, job_id: str) -> list[tuple[str | None, str]]:
        with self.service.sessions() as session:
            rows = session.execute(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).scalars()
            return [(row.from_status, row.to_status) for row in rows]

    def details(self, job_id: str) -> list[str | None]:
        with self.service.sessions() as session:
            rows = session.execute(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).scalars()
            return [row.detail for row in rows]


@pytest.fixture
def queue_module(tmp_path_factory, monkeypatch):
    """``ndif_scheduler.queue`` imported with its state (a never-used filesystem broker) in a temp dir."""
    monkeypatch.setenv("NDIF_STATE_DIR", str(tmp_path_factory.mktemp("queue-state")))
    monkeypatch.setattr(service_module, "_service", None)
    import ndif_scheduler.queue as queue

    return queue


@pytest.fixture
def harness(tmp_path, queue_module, monkeypatch) -> Harness:
    registry = tmp_path / "models.toml"
    registry.write_text('[[deployments]]\nkey = "tiny"\npath = "org/tiny"\nreplicas = 2\n')
    settings = Settings(
        state_dir=tmp_path,
        registry=registry,
        database_url=f"sqlite:///{tmp_path / 'd.db'}",
        signing_secret="secret",
        max_attempts=3,
        lease_s=30,
        requeue_after_s=900,
        result_ttl_s=3600,
    )
    migrate(settings.database)
    service = Service(settings)
    enqueued: list[tuple[str, str, str, float]] = []

    def record(celery: Any, service_: Service, job_id: str, deployment_key: str, lane: str, delay: float = 0):
        assert service_ is service
        enqueued.append((job_id, deployment_key, lane, delay))

    monkeypatch.setattr(queue_module, "enqueue", record)
    harness = Harness(service, enqueued, monkeypatch)
    yield harness
    service.engine.dispose()


COMPLETED = {"status": "completed", "result_bytes": 1234, "timings": {"queue": 0.5, "run": 0.25, "save": 0.01}}


# -- one job ----------------------------------------------------------------------------------


def test_a_queued_job_completes(harness):
    harness.ray.answers["run"] = COMPLETED
    job_id = harness.add_job()
    harness.dispatcher.run(job_id)
    job = harness.job(job_id)
    assert job.status == "COMPLETED"
    assert (job.result_key, job.result_bytes, job.run_seconds) == (f"results/{job_id}", 1234, 0.25)
    assert job.timings == {"queue": 0.5, "run": 0.25, "save": 0.01}
    assert (job.attempts, job.worker, job.error_type) == (1, "tiny#0", None)
    assert job.started_at is not None and job.finished_at is not None and job.lease_until is None
    assert harness.events(job_id) == [
        (None, "RECEIVED"),
        ("RECEIVED", "QUEUED"),
        ("QUEUED", "DISPATCHED"),
        ("DISPATCHED", "RUNNING"),
        ("RUNNING", "COMPLETED"),
    ]
    assert harness.details(job_id)[2:4] == ["attempt 1", "tiny#0"]
    assert harness.run_saw == [("tiny#0", "RUNNING", 1)]  # the actor is called once the job is RUNNING
    assert harness.actors["tiny#0"].run.calls == [(job_id,)]
    assert harness.enqueued == []


def test_replicas_take_turns(harness):
    harness.ray.answers["run"] = COMPLETED
    jobs = [harness.add_job() for _ in range(3)]
    for job_id in jobs:
        harness.dispatcher.run(job_id)
    assert [harness.job(job_id).worker for job_id in jobs] == ["tiny#0", "tiny#1", "tiny#0"]


def test_a_user_error_is_final_at_once(harness):
    error = {"type": "IndexError", "message": "list index out of range", "frames": [{"line": 3}], "notes": []}
    harness.ray.answers["run"] = {"status": "error", "reason": "user", "error": error, "timings": {"run": 0.1}}
    job_id = harness.add_job()
    harness.dispatcher.run(job_id)
    job = harness.job(job_id)
    assert (job.status, job.error_reason, job.error_type) == ("ERROR", "user", "IndexError")
    assert job.error_message == "list index out of range"
    assert job.error_detail == error
    assert (job.attempts, job.result_key) == (1, None)
    assert harness.events(job_id)[-1] == ("RUNNING", "ERROR")
    assert harness.enqueued == []


def test_a_cancelled_outcome(harness):
    harness.ray.answers["run"] = {"status": "cancelled", "reason": "cancelled", "timings": {}}
    job_id = harness.add_job()
    harness.dispatcher.run(job_id)
    assert harness.job(job_id).status == "CANCELLED"
    assert harness.enqueued == []


def test_a_dead_actor_requeues_then_fails_with_an_actionable_error(harness):
    harness.ray.answers["run"] = ActorDiedError("The actor died unexpectedly before finishing this task.")
    job_id = harness.add_job(lane=Lane.BATCH)

    harness.dispatcher.run(job_id)
    job = harness.job(job_id)
    assert (job.status, job.attempts, job.error_type) == ("QUEUED", 1, None)
    assert job.lease_until is not None and job.finished_at is None
    assert harness.enqueued == [(job_id, "tiny", "batch", 2.0)]
    assert harness.details(job_id)[-1] == "retrying: the model worker tiny#0 died while running the job"

    harness.dispatcher.run(job_id)  # the second attempt goes to the other replica, and dies too
    assert (harness.job(job_id).status, harness.job(job_id).attempts) == ("QUEUED", 2)
    harness.dispatcher.run(job_id)
    job = harness.job(job_id)
    assert (job.status, job.attempts, job.error_reason, job.error_type) == (
        "ERROR",
        3,
        "infrastructure",
        "WorkerFailure",
    )
    assert job.error_message.startswith(
        "the job failed 3 times for reasons outside your code; last: the model worker tiny#0 died while running the job."
    )
    assert "try a smaller batch or fewer saved values" in job.error_message
    assert len(harness.enqueued) == 2
    assert [worker for worker, _, _ in harness.run_saw] == ["tiny#0", "tiny#1", "tiny#0"]
    assert [to for _, to in harness.events(job_id)] == [
        "RECEIVED",
        "QUEUED",
        *(["DISPATCHED", "RUNNING", "QUEUED"] * 2),
        "DISPATCHED",
        "RUNNING",
        "ERROR",
    ]


def test_an_infrastructure_outcome_is_retried(harness):
    outcome = {"status": "error", "reason": "infrastructure", "error": {"type": "OutOfMemoryError", "message": "CUDA"}}
    harness.ray.answers["run"] = outcome
    job_id = harness.add_job()
    harness.dispatcher.run(job_id)
    job = harness.job(job_id)
    assert (job.status, job.attempts, job.error_type) == ("QUEUED", 1, None)
    assert harness.details(job_id)[-1] == "retrying: OutOfMemoryError: CUDA"
    assert harness.enqueued == [(job_id, "tiny", "interactive", 2.0)]


def test_an_unreachable_actor_is_an_infrastructure_failure(harness):
    harness.unreachable = {"tiny#0", "tiny#1"}
    job_id = harness.add_job()
    harness.dispatcher.run(job_id)
    job = harness.job(job_id)
    assert (job.status, job.attempts) == ("QUEUED", 1)
    assert harness.events(job_id)[-2:] == [("QUEUED", "DISPATCHED"), ("DISPATCHED", "QUEUED")]
    assert harness.details(job_id)[-1].startswith("retrying: no model worker for 'tiny' answered (Failed to look up")
    assert harness.enqueued == [(job_id, "tiny", "interactive", 2.0)]


def test_a_cancel_request_is_passed_on_while_it_runs(harness):
    job_id = harness.add_job()
    harness.ray.pending = 3

    def ask_to_cancel() -> None:
        with harness.service.sessions() as session:
            session.execute(Job.__table__.update().where(Job.id == job_id).values(cancel_requested=True))
            session.commit()

    harness.ray.on_wait = ask_to_cancel
    harness.ray.answers["run"] = {"status": "cancelled", "reason": "cancelled"}
    harness.dispatcher.run(job_id)
    assert harness.ray.waits == 4
    assert harness.actors["tiny#0"].cancel.calls == [(job_id,)]  # sent once, not at every heartbeat
    assert harness.job(job_id).status == "CANCELLED"


def test_the_lease_is_renewed_while_it_runs(harness):
    job_id = harness.add_job()
    leases = []
    harness.ray.pending = 2
    harness.ray.on_wait = lambda: leases.append(harness.job(job_id).lease_until)
    harness.ray.answers["run"] = COMPLETED
    harness.dispatcher.run(job_id)
    assert len(leases) == 2 and leases[0] <= leases[1]
    assert leases[0].replace(tzinfo=None) > (utcnow() + timedelta(seconds=20)).replace(tzinfo=None)
    assert harness.actors["tiny#0"].cancel.calls == []
    assert harness.job(job_id).status == "COMPLETED"


def test_a_job_ended_elsewhere_is_stopped_and_not_recorded(harness):
    job_id = harness.add_job()
    harness.ray.pending = 1

    def end_it() -> None:
        with harness.service.sessions() as session:
            assert transition(session, job_id, [Status.RUNNING], Status.ERROR, error_type="Elsewhere")
            session.commit()

    harness.ray.on_wait = end_it
    harness.ray.answers["run"] = COMPLETED
    harness.dispatcher.run(job_id)
    assert harness.actors["tiny#0"].cancel.calls == [(job_id,)]
    job = harness.job(job_id)
    assert (job.status, job.error_type, job.result_key) == ("ERROR", "Elsewhere", None)


@pytest.mark.parametrize("status", [Status.RECEIVED, Status.DISPATCHED, Status.RUNNING])
def test_a_stale_message_does_nothing(harness, status):
    harness.ray.answers["run"] = COMPLETED
    job_id = harness.add_job(status)
    before = harness.events(job_id)
    harness.dispatcher.run(job_id)
    harness.dispatcher.run("no-such-job")
    assert harness.job(job_id).status == status
    assert harness.events(job_id) == before
    assert harness.looked_up == [] and harness.enqueued == []


def test_a_final_job_is_not_run_again(harness):
    harness.ray.answers["run"] = COMPLETED
    job_id = harness.add_job()
    harness.dispatcher.run(job_id)
    harness.dispatcher.run(job_id)  # the message, delivered again
    assert len(harness.actors["tiny#0"].run.calls) == 1
    assert harness.job(job_id).attempts == 1


def test_a_model_no_longer_deployed_ends_the_job(harness):
    job_id = harness.add_job(model="gone")
    harness.dispatcher.run(job_id)
    job = harness.job(job_id)
    assert (job.status, job.error_type, job.error_reason) == ("ERROR", "UnknownModel", "infrastructure")
    assert job.error_message == "the model 'gone' is no longer deployed here; submit to a deployed model"
    assert harness.looked_up == []


def test_the_running_quota_keeps_a_job_queued(harness):
    harness.add_job(Status.RUNNING, owner=harness.limited)
    job_id = harness.add_job(owner=harness.limited, lane=Lane.BATCH)
    harness.dispatcher.run(job_id)
    job = harness.job(job_id)
    assert (job.status, job.attempts) == ("QUEUED", 0)
    assert harness.events(job_id) == [(None, "RECEIVED"), ("RECEIVED", "QUEUED")]
    assert harness.enqueued == [(job_id, "tiny", "batch", 1.0)]
    assert harness.looked_up == []
    # Another owner's job is not held back.
    harness.ray.answers["run"] = COMPLETED
    free = harness.add_job()
    harness.dispatcher.run(free)
    assert harness.job(free).status == "COMPLETED"


def test_a_claim_after_a_concurrent_retry_counts_a_new_attempt(harness, monkeypatch):
    """Dispatcher B reads the job (QUEUED, attempt 0); meanwhile dispatcher A claims it,
    its actor dies and the job is queued again (attempt 1). B's claim must not run
    attempt 1 a second time: it should fail (stale) or count attempt 2."""
    harness.ray.answers["run"] = COMPLETED
    job_id = harness.add_job()
    real_quotas_for = dispatch_module.quotas_for

    def meanwhile(session, key_id, settings):
        with harness.service.sessions() as other:
            assert transition(other, job_id, [Status.QUEUED], Status.DISPATCHED, attempts=1)
            assert transition(other, job_id, [Status.DISPATCHED], Status.RUNNING, attempt=1)
            assert transition(other, job_id, [Status.RUNNING], Status.QUEUED, attempt=1, detail="retrying")
            other.commit()
        return real_quotas_for(session, key_id, settings)

    monkeypatch.setattr(dispatch_module, "quotas_for", meanwhile)
    harness.dispatcher.run(job_id)
    assert harness.job(job_id).attempts in (1, 2)  # sanity: the job did move
    claims = [detail for detail in harness.details(job_id) if detail and detail.startswith("attempt ")]
    assert claims == ["attempt 2"] or harness.job(job_id).status == "QUEUED"


# -- periodic ---------------------------------------------------------------------------------


def test_recover_requeues_an_active_job_whose_lease_ran_out(harness):
    past = utcnow() - timedelta(seconds=1)
    job_id = harness.add_job(Status.RUNNING, lease_until=past)
    alive = harness.add_job(Status.RUNNING, lease_until=utcnow() + timedelta(seconds=60))
    harness.dispatcher.recover()
    job = harness.job(job_id)
    assert (job.status, job.attempts) == ("QUEUED", 1)
    assert job.lease_until.replace(tzinfo=None) > utcnow().replace(tzinfo=None)
    assert harness.details(job_id)[-1] == "retrying: its dispatcher stopped answering (lease expired)"
    assert harness.enqueued == [(job_id, "tiny", "interactive", 2.0)]
    assert harness.job(alive).status == "RUNNING"


def test_recover_ends_an_active_job_out_of_attempts(harness):
    job_id = harness.add_job(Status.DISPATCHED, lease_until=utcnow() - timedelta(seconds=1))
    with harness.service.sessions() as session:
        session.execute(Job.__table__.update().where(Job.id == job_id).values(attempts=3))
        session.commit()
    harness.dispatcher.recover()
    job = harness.job(job_id)
    assert (job.status, job.error_reason, job.error_type) == ("ERROR", "infrastructure", "WorkerFailure")
    assert "lease expired" in job.error_message
    assert harness.enqueued == []


def test_recover_cancels_an_active_job_that_was_asked_to_stop(harness):
    job_id = harness.add_job(Status.RUNNING, lease_until=utcnow() - timedelta(seconds=1), cancel_requested=True)
    harness.dispatcher.recover()
    assert harness.job(job_id).status == "CANCELLED"
    assert harness.enqueued == []


@pytest.mark.parametrize("status", [Status.QUEUED, Status.RECEIVED])
def test_recover_resends_a_waiting_job_whose_lease_ran_out(harness, status):
    job_id = harness.add_job(status, lease_until=utcnow() - timedelta(seconds=1))
    fresh = harness.add_job(Status.QUEUED, lease_until=utcnow() + timedelta(seconds=60))
    harness.dispatcher.recover()
    job = harness.job(job_id)
    assert (job.status, job.attempts) == ("QUEUED", 0)
    assert harness.events(job_id)[-1] == (str(status), "QUEUED")
    assert harness.details(job_id)[-1] == "message sent again"
    lease = job.lease_until.replace(tzinfo=None)
    assert lease > (utcnow() + timedelta(seconds=800)).replace(tzinfo=None)  # requeue_after_s, not lease_s
    assert harness.enqueued == [(job_id, "tiny", "interactive", 0)]
    assert harness.job(fresh).status == "QUEUED"
    harness.dispatcher.recover()  # its lease is fresh now: nothing more to do
    assert len(harness.enqueued) == 1


def test_recover_ends_a_waiting_job_whose_model_is_gone(harness):
    job_id = harness.add_job(Status.QUEUED, model="gone", lease_until=utcnow() - timedelta(seconds=1))
    harness.dispatcher.recover()
    job = harness.job(job_id)
    assert (job.status, job.error_type) == ("ERROR", "UnknownModel")


def test_expire_results_deletes_old_results(harness):
    store = harness.service.store
    old = harness.add_job(Status.RUNNING)
    new = harness.add_job(Status.RUNNING)
    with harness.service.sessions() as session:
        for job_id, finished in ((old, utcnow() - timedelta(hours=2)), (new, utcnow())):
            assert transition(
                session,
                job_id,
                [Status.RUNNING],
                Status.COMPLETED,
                result_key=f"results/{job_id}",
                finished_at=finished,
            )
            store.put(f"results/{job_id}", b"r")
            store.put(f"requests/{job_id}", b"q")
        session.commit()
    harness.dispatcher.expire_results()
    assert harness.job(old).result_expired is True and harness.job(new).result_expired is False
    with pytest.raises(KeyError):
        store.get(f"results/{old}")
    with pytest.raises(KeyError):
        store.get(f"requests/{old}")
    assert store.get(f"results/{new}") == b"r" and store.get(f"requests/{new}") == b"q"


def test_a_chats_tokens_are_stored_as_they_come_and_before_its_end(harness):
    job_id = harness.add_job(Status.QUEUED)
    with harness.service.sessions() as session:
        session.execute(Job.__table__.update().where(Job.id == job_id).values(kind="chat"))
        session.add(JobChunk(job_id=job_id, seq=0, data={"token": 99, "attempt": 0}))  # an earlier attempt's
        session.commit()
    produced = [{"token": n} for n in range(5)]
    made = {"count": 0}

    def chunks(ref):  # the actor's buffer grows by two tokens per look
        since = ref[3]
        made["count"] = min(made["count"] + 2, len(produced))
        return produced[since : made["count"]]

    harness.ray.answers["chunks"] = chunks
    harness.ray.answers["run"] = {"status": "completed", "reason": None, "error": None, "result_bytes": 3}
    harness.ray.pending = 2  # two looks while it runs, one after
    harness.dispatcher.run(job_id)
    assert harness.job(job_id).status == "COMPLETED"
    with harness.service.sessions() as session:
        rows = session.execute(select(JobChunk).where(JobChunk.job_id == job_id).order_by(JobChunk.seq)).scalars()
        stored = [(row.seq, row.data) for row in rows]
    assert stored == [(n, {"token": n, "attempt": 1}) for n in range(5)]  # all of them, this attempt's only
    with harness.service.sessions() as session:
        session.execute(
            Job.__table__.update().where(Job.id == job_id).values(finished_at=utcnow() - timedelta(hours=2))
        )
        session.commit()
    harness.dispatcher.expire_results()
    with harness.service.sessions() as session:
        assert session.execute(select(JobChunk).where(JobChunk.job_id == job_id)).first() is None


def test_refresh_deployments_records_replica_health(harness):
    harness.unreachable = {"tiny#1"}
    harness.ray.answers["health"] = {"in_flight": 3}
    harness.dispatcher.refresh_deployments()
    with harness.service.sessions() as session:
        row = session.get(Deployment, "tiny")
        assert (row.state, row.replicas, row.replicas_ready, row.in_flight) == ("degraded", 2, 1, 3)
    harness.unreachable = set()
    harness.dispatcher.refresh_deployments()
    with harness.service.sessions() as session:
        row = session.get(Deployment, "tiny")
        assert (row.state, row.replicas_ready, row.in_flight) == ("ready", 2, 6)
