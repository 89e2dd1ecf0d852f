"""The service on real parts: PostgreSQL, Redis (Celery broker), SeaweedFS (S3) and a
local Ray, with the API, dispatchers, beat and model actors as real processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from chat_artifacts import write_artifacts

import ndif_sdk
from ndif_scheduler.stack import EmbeddedStack
from ndif_sdk.backend import RemoteBackend

from .services import forget_queues, free_port, postgres_database, production_env, seaweedfs


@dataclass
class Deployed:
    """A running stack and ways to talk to it as different users."""

    stack: EmbeddedStack
    model_path: Path
    clients: list = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.stack.url

    def key(self, name: str, **quotas: int) -> str:
        admin = ndif_sdk.Client(self.url, self.stack.admin_key)
        try:
            return admin.create_key(name, **quotas)["key"]
        finally:
            admin.close()

    def client(self, name: str = "researcher", **quotas: int) -> ndif_sdk.Client:
        client = ndif_sdk.Client(self.url, self.key(name, **quotas))
        self.clients.append(client)
        return client

    def remote(self, client: ndif_sdk.Client) -> RemoteBackend:
        """What ``remote=True`` would be for this client."""
        return RemoteBackend(client)

    def http(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def write_registry(folder: Path, model_path: Path, max_concurrency: int = 4) -> Path:
    registry = folder / "models.toml"
    registry.write_text(
        "[[deployments]]\n"
        'key = "tiny-llama"\n'
        f'path = "{model_path}"\n'
        "torch_threads = 1\n"
        f"max_concurrency = {max_concurrency}\n"
        "batch_concurrency = 2\n"
        f'artifacts = "{write_artifacts(folder / "artifacts")}"\n'
    )
    return registry


#: Fast recovery for the tests: short leases and heartbeats, a short job time limit.
TEST_SETTINGS = {
    "NDIF_LEASE_S": "4",
    "NDIF_HEARTBEAT_S": "0.5",
    "NDIF_JOB_TIME_S": "20",  # the tests' slow jobs take 5-12 s, with the machine's speed
    "NDIF_MAX_REQUEST_BYTES": str(8 << 20),
    "NDIF_MAX_ATTEMPTS": "3",
    "NDIF_BROKER_VISIBILITY_S": "5",
}


@pytest.fixture(scope="session")
def production_stack(tmp_path_factory: pytest.TempPathFactory, tiny_llama_path):
    """The stack against PostgreSQL, Redis and SeaweedFS: two interactive dispatchers,
    one batch dispatcher, a separate beat, one model actor."""
    root = tmp_path_factory.mktemp("production-stack")
    with seaweedfs(root / "seaweedfs") as s3, postgres_database() as database:
        env = {**production_env(database, s3), **TEST_SETTINGS}
        stack = EmbeddedStack(
            write_registry(root, Path(tiny_llama_path)),
            root / "state",
            port=free_port(),
            env=env,
            dispatchers={"interactive": 2, "batch": 1},
            separate_beat=True,
        )
        with stack:
            deployed = Deployed(stack, Path(tiny_llama_path))
            yield deployed
            for client in deployed.clients:
                client.close()
        forget_queues(env)


@pytest.fixture(scope="session")
def embedded_stack(tmp_path_factory: pytest.TempPathFactory, tiny_llama_path):
    """The embedded stack: SQLite, a local-files broker, a local object store."""
    root = tmp_path_factory.mktemp("embedded-stack")
    registry = write_registry(root, Path(tiny_llama_path))
    stack = EmbeddedStack(registry, root / "state", port=free_port(), inherit_settings=False)
    with stack:
        deployed = Deployed(stack, Path(tiny_llama_path))
        yield deployed
        for client in deployed.clients:
            client.close()
