"""`Service`: the parts every scheduler process shares (settings, job store, object store, registry)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from .config import Settings, load_settings
from .db import create_engine, session_factory
from .registry import Registry, load_registry
from .storage import ObjectStore, open_store


@dataclass
class Service:
    settings: Settings

    @cached_property
    def engine(self) -> Engine:
        return create_engine(self.settings.database)

    @cached_property
    def sessions(self) -> sessionmaker:
        return session_factory(self.engine)

    @cached_property
    def store(self) -> ObjectStore:
        return open_store(self.settings)

    @cached_property
    def registry(self) -> Registry:
        if self.settings.registry is None:
            return Registry(())
        return load_registry(self.settings.registry)

    def queue_name(self, deployment_key: str, lane: str) -> str:
        """Each deployment has one queue per lane (interactive, batch)."""
        return f"{self.settings.queue_prefix}.{deployment_key}.{lane}"


_service: Service | None = None


def get_service() -> Service:
    """This process's service, from the environment (made on first use)."""
    global _service
    if _service is None:
        _service = Service(load_settings())
    return _service
