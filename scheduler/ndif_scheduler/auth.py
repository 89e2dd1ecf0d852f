"""API keys: made here, shown once, stored only as a SHA-256 hash.

Keys are 256-bit random tokens (``ndif_...``), so a plain hash is enough to store them
safely (no password stretching needed); lookups are by hash.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from .db import ApiKey, utcnow
from .store import new_id

PREFIX = "ndif_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class NewKey:
    id: str
    name: str
    key: str  # the secret: shown once, never stored
    is_admin: bool


def create_key(
    session: Session,
    name: str,
    is_admin: bool = False,
    quota_queued: int | None = None,
    quota_running: int | None = None,
    quota_result_bytes: int | None = None,
) -> NewKey:
    secret = PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=new_id(),
        name=name,
        key_hash=hash_key(secret),
        prefix=secret[: len(PREFIX) + 6],
        is_admin=is_admin,
        quota_queued=quota_queued,
        quota_running=quota_running,
        quota_result_bytes=quota_result_bytes,
    )
    session.add(row)
    session.commit()
    return NewKey(row.id, name, secret, is_admin)


def authenticate(session: Session, key: str) -> ApiKey | None:
    """The key's row if ``key`` is a valid, unrevoked key."""
    if not key.startswith(PREFIX):
        return None
    row = session.execute(select(ApiKey).where(ApiKey.key_hash == hash_key(key))).scalar_one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    return row


def revoke_key(session: Session, key_id: str) -> bool:
    row = session.get(ApiKey, key_id)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    session.commit()
    return True
