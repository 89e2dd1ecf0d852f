"""Fixtures of the scheduler's unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def sessions(tmp_path):
    """A session factory on a fresh SQLite job store, made by the Alembic migrations."""
    from ndif_scheduler.db import create_engine, migrate, session_factory

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrate(url)
    engine = create_engine(url)
    yield session_factory(engine)
    engine.dispose()
