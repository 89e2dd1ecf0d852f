"""Guarded status changes: the only way a job's status moves.

Every change is one ``UPDATE ... WHERE id = :id AND status IN (:expected)`` and, when it
matched, one `JobEvent` row, in the same transaction. A redelivered message, a second
dispatcher or a late actor reply therefore cannot move a job that has already moved on:
its update matches no row and it learns so from the return value.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from .db import ACTIVE, FINAL, WAITING, Job, JobEvent, Status, utcnow


def new_id() -> str:
    """A server-made, unguessable identifier (jobs, batches, keys)."""
    return secrets.token_hex(16)


def transition(
    session: Session,
    job_id: str,
    expected: Iterable[Status],
    new: Status,
    detail: str | None = None,
    attempt: int | None = None,
    lease_expired_by: datetime | None = None,
    **values: Any,
) -> bool:
    """Move ``job_id`` to ``new`` if its status is one of ``expected`` (and, with
    ``attempt``, if it is still on that attempt; with ``lease_expired_by``, if its lease
    ran out before then); record the event.

    Returns whether it moved. The caller commits.
    """
    expected = list(expected)
    now = utcnow()
    if new in FINAL:
        values.setdefault("finished_at", now)
        values.setdefault("lease_until", None)
    conditions = [Job.id == job_id, Job.status.in_(expected)]
    if attempt is not None:
        conditions.append(Job.attempts == attempt)
    if lease_expired_by is not None:
        conditions.append(Job.lease_until < lease_expired_by)
    previous = session.execute(select(Job.status).where(*conditions).with_for_update()).scalar_one_or_none()
    if previous is None:
        return False
    conditions[1] = Job.status == previous
    moved = session.execute(
        update(Job)
        .where(*conditions)
        .values(status=new, updated_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    if moved.rowcount != 1:
        return False
    session.add(JobEvent(job_id=job_id, from_status=previous, to_status=new, at=now, detail=detail))
    return True


def record_received(session: Session, job: Job) -> None:
    """Insert a new job (RECEIVED) with its first event."""
    session.add(job)
    session.flush()
    session.add(JobEvent(job_id=job.id, from_status=None, to_status=Status.RECEIVED, at=job.created_at))


def count_by_status(session: Session, owner_id: str, statuses: Iterable[Status]) -> int:
    return session.execute(
        select(func.count()).select_from(Job).where(Job.owner_id == owner_id, Job.status.in_(list(statuses)))
    ).scalar_one()


def stored_result_bytes(session: Session, owner_id: str) -> int:
    return session.execute(
        select(func.coalesce(func.sum(Job.result_bytes), 0)).where(
            Job.owner_id == owner_id, Job.result_key.is_not(None), Job.result_expired.is_(False)
        )
    ).scalar_one()


def queue_depths(session: Session) -> dict[str, dict[str, int]]:
    """Per model: how many jobs wait (RECEIVED/QUEUED) and how many run (DISPATCHED/RUNNING)."""
    rows = session.execute(
        select(Job.model, Job.status, func.count())
        .where(Job.status.in_(list(WAITING | ACTIVE)))
        .group_by(Job.model, Job.status)
    )
    depths: dict[str, dict[str, int]] = {}
    for model, status, count in rows:
        entry = depths.setdefault(model, {"queued": 0, "running": 0})
        entry["queued" if status in WAITING else "running"] += count
    return depths


def expired_leases(session: Session, now: datetime, limit: int = 200) -> list[Job]:
    """Jobs whose lease ran out: claimed by a dispatcher that died or hung (DISPATCHED,
    RUNNING), or queued long ago by an API that may have died before sending the
    message (RECEIVED, QUEUED)."""
    return list(
        session.execute(
            select(Job).where(Job.status.in_(list(ACTIVE | WAITING)), Job.lease_until < now).limit(limit)
        ).scalars()
    )
