"""The job store on SQLite: the migrated schema, guarded status changes and the queries on top.

Every test gets its own database in ``tmp_path``, created by ``ndif_scheduler.db.migrate``
(the Alembic migrations), never by ``Base.metadata.create_all``.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select

from ndif_scheduler.auth import create_key
from ndif_scheduler.db import (
    ACTIVE,
    FINAL,
    WAITING,
    Base,
    Job,
    JobEvent,
    Status,
    create_engine,
    migrate,
    utcnow,
)
from ndif_scheduler.store import (
    count_by_status,
    expired_leases,
    new_id,
    queue_depths,
    record_received,
    stored_result_bytes,
    transition,
)


@pytest.fixture
def owner(sessions) -> str:
    with sessions() as session:
        return create_key(session, "owner").id


def add_job(sessions, owner: str, model: str = "tiny", status: Status = Status.RECEIVED, **values) -> str:
    """Insert a job (RECEIVED, with its first event) and move it to ``status`` directly."""
    job_id = new_id()
    with sessions() as session:
        job = Job(
            id=job_id,
            owner_id=owner,
            model=model,
            kind="trace",
            request_key=f"requests/{job_id}",
            request_bytes=10,
            **values,
        )
        record_received(session, job)
        session.commit()
        if status != Status.RECEIVED:
            session.execute(Job.__table__.update().where(Job.id == job_id).values(status=status))
            session.commit()
    return job_id


def events_of(sessions, job_id: str) -> list[tuple[str | None, str, str | None]]:
    with sessions() as session:
        rows = session.execute(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).scalars()
        return [(row.from_status, row.to_status, row.detail) for row in rows]


def job_row(sessions, job_id: str) -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


# -- schema ---------------------------------------------------------------------------------


def test_migrated_schema_matches_the_models(tmp_path):
    url = f"sqlite:///{tmp_path / 'schema.db'}"
    migrate(url)
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            diff = compare_metadata(context, Base.metadata)
            tables = set(inspect(connection).get_table_names())
    finally:
        engine.dispose()
    assert diff == []
    assert {"api_keys", "batches", "jobs", "job_events", "deployments", "alembic_version"} <= tables


def test_migrate_twice_is_a_no_op(tmp_path):
    url = f"sqlite:///{tmp_path / 'twice.db'}"
    migrate(url)
    migrate(url)
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            assert MigrationContext.configure(connection).get_current_revision() == "0002"
    finally:
        engine.dispose()


def test_status_sets_partition_the_statuses():
    assert set(Status) == WAITING | ACTIVE | FINAL
    assert not (WAITING & ACTIVE) and not (ACTIVE & FINAL) and not (WAITING & FINAL)
    assert [status.final for status in Status] == [False, False, False, False, True, True, True]


# -- record_received and transition ---------------------------------------------------------


def test_record_received_writes_the_first_event(sessions, owner):
    job_id = add_job(sessions, owner)
    job = job_row(sessions, job_id)
    assert job.status == Status.RECEIVED
    assert job.attempts == 0
    assert job.created_at is not None
    assert events_of(sessions, job_id) == [(None, "RECEIVED", None)]
    with sessions() as session:
        event = session.execute(select(JobEvent).where(JobEvent.job_id == job_id)).scalar_one()
        assert event.at == job.created_at


def test_transition_moves_and_records_events_in_order(sessions, owner):
    job_id = add_job(sessions, owner)
    with sessions() as session:
        assert transition(session, job_id, [Status.RECEIVED], Status.QUEUED) is True
        assert transition(session, job_id, [Status.QUEUED], Status.DISPATCHED, detail="attempt 1", attempts=1)
        assert transition(session, job_id, [Status.DISPATCHED], Status.RUNNING, attempt=1, worker="tiny#0")
        session.commit()
    job = job_row(sessions, job_id)
    assert (job.status, job.attempts, job.worker) == ("RUNNING", 1, "tiny#0")
    assert job.finished_at is None
    assert events_of(sessions, job_id) == [
        (None, "RECEIVED", None),
        ("RECEIVED", "QUEUED", None),
        ("QUEUED", "DISPATCHED", "attempt 1"),
        ("DISPATCHED", "RUNNING", None),
    ]


def test_transition_with_the_wrong_expected_status_changes_nothing(sessions, owner):
    job_id = add_job(sessions, owner, status=Status.QUEUED)
    before = job_row(sessions, job_id)
    with sessions() as session:
        assert transition(session, job_id, [Status.RUNNING, Status.DISPATCHED], Status.COMPLETED) is False
        assert transition(session, "no-such-job", [Status.QUEUED], Status.CANCELLED) is False
        session.commit()
    after = job_row(sessions, job_id)
    assert after.status == "QUEUED"
    assert after.updated_at == before.updated_at
    assert after.finished_at is None
    assert events_of(sessions, job_id) == [(None, "RECEIVED", None)]


def test_transition_attempt_guard(sessions, owner):
    job_id = add_job(sessions, owner, status=Status.RUNNING, attempts=2)
    with sessions() as session:
        # A late reply of attempt 1 cannot end attempt 2.
        assert transition(session, job_id, [Status.RUNNING], Status.COMPLETED, attempt=1) is False
        session.commit()
    assert job_row(sessions, job_id).status == "RUNNING"
    assert events_of(sessions, job_id) == [(None, "RECEIVED", None)]
    with sessions() as session:
        assert transition(session, job_id, [Status.RUNNING], Status.COMPLETED, attempt=2) is True
        session.commit()
    assert job_row(sessions, job_id).status == "COMPLETED"
    assert events_of(sessions, job_id)[-1] == ("RUNNING", "COMPLETED", None)


def test_transition_uncommitted_is_rolled_back(sessions, owner):
    job_id = add_job(sessions, owner)
    with sessions() as session:
        assert transition(session, job_id, [Status.RECEIVED], Status.QUEUED)
        session.rollback()
    assert job_row(sessions, job_id).status == "RECEIVED"
    assert events_of(sessions, job_id) == [(None, "RECEIVED", None)]


@pytest.mark.parametrize("final", sorted(FINAL))
def test_final_statuses_set_finished_at_and_clear_the_lease(sessions, owner, final):
    lease = utcnow() + timedelta(minutes=5)
    job_id = add_job(sessions, owner, status=Status.RUNNING, lease_until=lease)
    assert job_row(sessions, job_id).lease_until is not None
    with sessions() as session:
        assert transition(session, job_id, [Status.RUNNING], final, detail="done")
        session.commit()
    job = job_row(sessions, job_id)
    assert job.status == final
    assert job.finished_at is not None
    assert job.lease_until is None
    assert events_of(sessions, job_id)[-1] == ("RUNNING", str(final), "done")


def test_non_final_status_keeps_the_lease_and_no_finished_at(sessions, owner):
    job_id = add_job(sessions, owner)
    lease = utcnow() + timedelta(minutes=5)
    with sessions() as session:
        assert transition(session, job_id, [Status.RECEIVED], Status.QUEUED, lease_until=lease)
        session.commit()
    job = job_row(sessions, job_id)
    assert job.finished_at is None
    assert job.lease_until.replace(tzinfo=None) == lease.replace(tzinfo=None)


def test_a_final_job_cannot_move_again(sessions, owner):
    job_id = add_job(sessions, owner)
    with sessions() as session:
        assert transition(session, job_id, [Status.RECEIVED], Status.CANCELLED)
        session.commit()
        assert not transition(session, job_id, WAITING | ACTIVE, Status.QUEUED)
        session.commit()
    assert job_row(sessions, job_id).status == "CANCELLED"
    assert [to for _, to, _ in events_of(sessions, job_id)] == ["RECEIVED", "CANCELLED"]


# -- queries --------------------------------------------------------------------------------


def test_count_by_status_is_per_owner(sessions, owner):
    with sessions() as session:
        other = create_key(session, "other").id
    add_job(sessions, owner, status=Status.QUEUED)
    add_job(sessions, owner, status=Status.RECEIVED)
    add_job(sessions, owner, status=Status.RUNNING)
    add_job(sessions, owner, status=Status.COMPLETED)
    add_job(sessions, other, status=Status.QUEUED)
    with sessions() as session:
        assert count_by_status(session, owner, WAITING) == 2
        assert count_by_status(session, owner, ACTIVE) == 1
        assert count_by_status(session, owner, FINAL) == 1
        assert count_by_status(session, other, WAITING) == 1
        assert count_by_status(session, "nobody", WAITING) == 0


def test_stored_result_bytes_counts_unexpired_results_only(sessions, owner):
    with sessions() as session:
        other = create_key(session, "other").id
        assert stored_result_bytes(session, owner) == 0
    add_job(sessions, owner, status=Status.COMPLETED, result_key="results/a", result_bytes=100)
    add_job(sessions, owner, status=Status.ERROR, result_key="results/b", result_bytes=20)
    add_job(sessions, owner, status=Status.COMPLETED, result_key="results/c", result_bytes=1000, result_expired=True)
    add_job(sessions, owner, status=Status.ERROR, result_bytes=5)  # no key: nothing stored
    add_job(sessions, other, status=Status.COMPLETED, result_key="results/d", result_bytes=7)
    with sessions() as session:
        assert stored_result_bytes(session, owner) == 120
        assert stored_result_bytes(session, other) == 7


def test_queue_depths_per_model(sessions, owner):
    for status in (Status.RECEIVED, Status.QUEUED, Status.QUEUED, Status.DISPATCHED, Status.RUNNING):
        add_job(sessions, owner, model="a", status=status)
    add_job(sessions, owner, model="a", status=Status.COMPLETED)
    add_job(sessions, owner, model="b", status=Status.RUNNING)
    add_job(sessions, owner, model="c", status=Status.ERROR)
    with sessions() as session:
        assert queue_depths(session) == {"a": {"queued": 3, "running": 2}, "b": {"queued": 0, "running": 1}}


def test_expired_leases_finds_waiting_and_active_jobs_only(sessions, owner):
    now = utcnow()
    past, future = now - timedelta(seconds=5), now + timedelta(seconds=60)
    expected = {
        add_job(sessions, owner, status=Status.RECEIVED, lease_until=past),
        add_job(sessions, owner, status=Status.QUEUED, lease_until=past),
        add_job(sessions, owner, status=Status.DISPATCHED, lease_until=past),
        add_job(sessions, owner, status=Status.RUNNING, lease_until=past),
    }
    add_job(sessions, owner, status=Status.QUEUED, lease_until=future)
    add_job(sessions, owner, status=Status.RUNNING, lease_until=future)
    add_job(sessions, owner, status=Status.QUEUED)  # no lease at all
    for final in FINAL:
        add_job(sessions, owner, status=final, lease_until=past)
    with sessions() as session:
        assert {job.id for job in expired_leases(session, now)} == expected
        assert len(expired_leases(session, now, limit=2)) == 2


def test_new_ids_are_unique_hex():
    ids = {new_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(value) == 32 and int(value, 16) >= 0 for value in ids)
