"""Per-key quotas: jobs waiting, jobs running, bytes of stored results.

Waiting jobs and stored bytes are checked when a job or batch is submitted (429 with
``Retry-After``). Running jobs are checked when a job is about to start: a job over
the running quota stays queued until one of its owner's jobs ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from .config import Settings
from .db import WAITING, ApiKey
from .store import count_by_status, stored_result_bytes


@dataclass(frozen=True)
class Quotas:
    queued: int
    running: int
    result_bytes: int


class QuotaExceeded(Exception):
    """A submission over a quota; ``retry_after`` seconds is a fair time to try again."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def quotas_for(session: Session, key_id: str, settings: Settings) -> Quotas:
    key = session.get(ApiKey, key_id)
    return Quotas(
        queued=key.quota_queued if key and key.quota_queued is not None else settings.quota_queued,
        running=key.quota_running if key and key.quota_running is not None else settings.quota_running,
        result_bytes=(
            key.quota_result_bytes if key and key.quota_result_bytes is not None else settings.quota_result_bytes
        ),
    )


def check_submission(session: Session, key_id: str, settings: Settings, count: int = 1) -> None:
    """Raise `QuotaExceeded` if ``count`` more jobs from this key would go over a quota."""
    quotas = quotas_for(session, key_id, settings)
    waiting = count_by_status(session, key_id, WAITING)
    if waiting + count > quotas.queued:
        raise QuotaExceeded(
            f"this key has {waiting} jobs waiting and may have at most {quotas.queued}; "
            f"{count} more would go over. Wait for some to start, or cancel some.",
            retry_after=10,
        )
    stored = stored_result_bytes(session, key_id)
    if stored >= quotas.result_bytes:
        raise QuotaExceeded(
            f"this key's stored results take {stored} bytes, at or over its quota of {quotas.result_bytes}; "
            "results expire after their time to live, or fetch and delete them "
            "(DELETE /v1/jobs/{id}/result).",
            retry_after=int(min(settings.result_ttl_s, 3600)),
        )
