"""Real services for the integration tests: SeaweedFS (S3), a fresh PostgreSQL database,
Redis, and the service's own processes (`EmbeddedStack`). Each is started here and
stopped by PID; nothing is faked."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

S3_ACCESS, S3_SECRET = "ndif-test", "ndif-test-secret"


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_grpc_port() -> int:
    """A free port whose +10000 (SeaweedFS's gRPC port for it) is free and valid too."""
    for _ in range(1000):
        port = random.randint(20000, 45000)
        if _is_free(port) and _is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair")


def stop_pid(process: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL (SeaweedFS ignores SIGTERM for a while)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    except ProcessLookupError:
        pass


@contextmanager
def seaweedfs(root: Path) -> Iterator[str]:
    """A SeaweedFS server with its S3 API (credentials required); yields the endpoint."""
    weed = shutil.which("weed") or str(Path(os.sys.executable).with_name("weed"))
    root.mkdir(parents=True, exist_ok=True)
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "ndif",
                        "credentials": [{"accessKey": S3_ACCESS, "secretKey": S3_SECRET}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = {name: free_grpc_port() for name in ("master", "volume", "filer", "s3")}
    log = open(root / "weed.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [
            weed, "server", f"-dir={root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", "-filer",
            f"-filer.port={ports['filer']}", "-s3", f"-s3.port={ports['s3']}", f"-s3.config={config}",
            "-master.volumeSizeLimitMB=64", "-s3.port.iceberg=0", "-s3.port.lance=0",
        ],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"SeaweedFS did not start; see {root / 'weed.log'}") from None
                time.sleep(0.3)
        yield endpoint
    finally:
        stop_pid(process)
        log.close()


@contextmanager
def postgres_database(admin_url: str = "postgresql://127.0.0.1:5432/test") -> Iterator[str]:
    """A fresh, empty database on the local PostgreSQL; dropped afterwards."""
    import psycopg

    name = f"ndif_it_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True, user=os.environ.get("PGUSER", "postgres")) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True, user=os.environ.get("PGUSER", "postgres")) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def production_env(database_url: str, s3_endpoint: str, redis_db: int = 9) -> dict[str, str]:
    """NDIF_* settings for the stack against PostgreSQL, Redis and S3."""
    return {
        "NDIF_DATABASE_URL": database_url,
        "NDIF_BROKER_URL": f"redis://127.0.0.1:6379/{redis_db}",
        "NDIF_S3_ENDPOINT": s3_endpoint,
        "NDIF_S3_BUCKET": "ndif-it",
        "NDIF_S3_ACCESS_KEY": S3_ACCESS,
        "NDIF_S3_SECRET_KEY": S3_SECRET,
        "NDIF_QUEUE_PREFIX": f"ndif-it-{uuid.uuid4().hex[:6]}",
    }


def forget_queues(env: dict[str, str]) -> None:
    """Delete the Redis keys of this run's queues (their names carry its random prefix)."""
    import redis

    client = redis.Redis.from_url(env["NDIF_BROKER_URL"])
    prefix = env["NDIF_QUEUE_PREFIX"]
    keys = [key for key in client.scan_iter(match="*") if prefix.encode() in key]
    if keys:
        client.delete(*keys)
    client.close()
