"""API keys (made once, stored as a hash) and per-key quotas, on a migrated SQLite store."""

from __future__ import annotations

import hashlib

import pytest

from ndif_scheduler.auth import PREFIX, authenticate, create_key, hash_key, revoke_key
from ndif_scheduler.config import Settings
from ndif_scheduler.db import ApiKey, Job, Status
from ndif_scheduler.quotas import QuotaExceeded, Quotas, check_submission, quotas_for
from ndif_scheduler.store import new_id, record_received


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(
        state_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
        quota_queued=3,
        quota_running=2,
        quota_result_bytes=1000,
        result_ttl_s=7200,
    )


def add_jobs(sessions, owner: str, status: Status, count: int = 1, **values) -> None:
    with sessions() as session:
        for _ in range(count):
            job_id = new_id()
            job = Job(
                id=job_id,
                owner_id=owner,
                model="tiny",
                kind="trace",
                request_key=f"requests/{job_id}",
                request_bytes=1,
                status=status,
                **values,
            )
            record_received(session, job)
        session.commit()


# -- keys -------------------------------------------------------------------------------------


def test_create_key_stores_only_the_hash(sessions):
    with sessions() as session:
        new = create_key(session, "alice", is_admin=True)
    assert new.key.startswith(PREFIX) and PREFIX == "ndif_"
    assert len(new.key) > len(PREFIX) + 40  # 32 random bytes, url-safe base64
    assert (new.name, new.is_admin) == ("alice", True)
    with sessions() as session:
        row = session.get(ApiKey, new.id)
        assert row.key_hash == hashlib.sha256(new.key.encode()).hexdigest() == hash_key(new.key)
        assert row.prefix == new.key[: len(PREFIX) + 6]
        columns = [getattr(row, column.key) for column in ApiKey.__table__.columns]
    secret_body = new.key[len(PREFIX) :]
    assert not any(isinstance(value, str) and (new.key in value or secret_body in value) for value in columns)


def test_keys_are_distinct(sessions):
    with sessions() as session:
        first, second = create_key(session, "a"), create_key(session, "b")
    assert first.key != second.key and first.id != second.id


def test_authenticate_accepts_the_key_and_rejects_others(sessions):
    with sessions() as session:
        alice = create_key(session, "alice")
        bob = create_key(session, "bob")
        assert authenticate(session, alice.key).id == alice.id
        assert authenticate(session, bob.key).id == bob.id
        assert authenticate(session, alice.key + "x") is None
        assert authenticate(session, PREFIX + "not-a-key") is None
        assert authenticate(session, "") is None
        # The same secret without the prefix (or under another one) is not a key.
        body = alice.key[len(PREFIX) :]
        assert authenticate(session, body) is None
        assert authenticate(session, "sk_" + body) is None


def test_authenticate_refuses_an_other_prefix_even_if_its_hash_is_stored(sessions):
    with sessions() as session:
        session.add(ApiKey(id=new_id(), name="legacy", key_hash=hash_key("legacy_secret"), prefix="legacy"))
        session.commit()
        assert authenticate(session, "legacy_secret") is None


def test_revoked_keys_are_refused(sessions):
    with sessions() as session:
        alice = create_key(session, "alice")
        assert revoke_key(session, alice.id) is True
        assert revoke_key(session, alice.id) is False  # already revoked
        assert revoke_key(session, "no-such-key") is False
        assert authenticate(session, alice.key) is None
        assert session.get(ApiKey, alice.id).revoked_at is not None


# -- quotas -----------------------------------------------------------------------------------


def test_quotas_for_uses_settings_then_per_key_overrides(sessions, settings):
    with sessions() as session:
        plain = create_key(session, "plain").id
        custom = create_key(session, "custom", quota_queued=10, quota_result_bytes=0).id
        assert quotas_for(session, plain, settings) == Quotas(queued=3, running=2, result_bytes=1000)
        assert quotas_for(session, custom, settings) == Quotas(queued=10, running=2, result_bytes=0)
        assert quotas_for(session, "unknown", settings) == Quotas(queued=3, running=2, result_bytes=1000)


def test_check_submission_counts_waiting_jobs(sessions, settings):
    with sessions() as session:
        owner = create_key(session, "owner").id
    add_jobs(sessions, owner, Status.QUEUED, 1)
    add_jobs(sessions, owner, Status.RECEIVED, 1)
    add_jobs(sessions, owner, Status.RUNNING, 5)  # running jobs are not waiting
    add_jobs(sessions, owner, Status.COMPLETED, 5)
    with sessions() as session:
        check_submission(session, owner, settings, 1)  # 2 + 1 <= 3
        with pytest.raises(QuotaExceeded) as raised:
            check_submission(session, owner, settings, 2)  # 2 + 2 > 3
    assert raised.value.retry_after == 10
    assert "2 jobs waiting" in str(raised.value) and "at most 3" in str(raised.value)


def test_check_submission_per_key_queued_override(sessions, settings):
    with sessions() as session:
        small = create_key(session, "small", quota_queued=1).id
        large = create_key(session, "large", quota_queued=100).id
    add_jobs(sessions, small, Status.QUEUED, 1)
    add_jobs(sessions, large, Status.QUEUED, 50)
    with sessions() as session:
        with pytest.raises(QuotaExceeded):
            check_submission(session, small, settings, 1)
        check_submission(session, large, settings, 50)
        with pytest.raises(QuotaExceeded):
            check_submission(session, large, settings, 51)


def test_check_submission_counts_stored_result_bytes(sessions, settings):
    with sessions() as session:
        owner = create_key(session, "owner").id
    add_jobs(sessions, owner, Status.COMPLETED, 1, result_key="results/a", result_bytes=999)
    with sessions() as session:
        check_submission(session, owner, settings, 1)  # 999 < 1000
    add_jobs(sessions, owner, Status.COMPLETED, 1, result_key="results/b", result_bytes=1)
    with sessions() as session:
        with pytest.raises(QuotaExceeded) as raised:
            check_submission(session, owner, settings, 1)  # 1000 >= 1000
    assert raised.value.retry_after == 3600  # min(result_ttl_s, 3600)
    assert "1000 bytes" in str(raised.value)


def test_check_submission_result_bytes_override_and_expired_results(sessions, settings):
    with sessions() as session:
        owner = create_key(session, "owner", quota_result_bytes=5000).id
    add_jobs(sessions, owner, Status.COMPLETED, 1, result_key="results/a", result_bytes=4000)
    add_jobs(sessions, owner, Status.COMPLETED, 1, result_key="results/b", result_bytes=9000, result_expired=True)
    with sessions() as session:
        check_submission(session, owner, settings, 1)
    add_jobs(sessions, owner, Status.COMPLETED, 1, result_key="results/c", result_bytes=1000)
    with sessions() as session:
        with pytest.raises(QuotaExceeded):
            check_submission(session, owner, settings, 1)


def test_result_quota_retry_after_is_the_ttl_when_short(sessions, tmp_path):
    settings = Settings(state_dir=tmp_path, quota_result_bytes=0, result_ttl_s=60)
    with sessions() as session:
        owner = create_key(session, "owner").id
        with pytest.raises(QuotaExceeded) as raised:
            check_submission(session, owner, settings, 1)
    assert raised.value.retry_after == 60
