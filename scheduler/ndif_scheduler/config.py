"""Server settings: ``NDIF_*`` environment variables over an optional TOML file.

``NDIF_CONFIG=/path/to/server.toml`` names the file (keys as below, lower case);
environment variables win over it. The defaults describe the embedded stack: SQLite,
a local directory as object store and a broker that needs no server, all under
``state_dir``.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource


def _default_state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "ndif"


class Settings(BaseSettings):
    """Everything the API, the Celery workers and the model workers are configured by."""

    model_config = SettingsConfigDict(env_prefix="NDIF_", extra="ignore")

    state_dir: Path = Field(default_factory=_default_state_dir, description="Embedded stack's files.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; SQLite under state_dir if unset.")
    broker_url: str | None = Field(None, description="Celery broker; a local-files broker under state_dir if unset.")
    s3_endpoint: str | None = Field(None, description="S3 API endpoint; a local directory store if unset.")
    s3_public_endpoint: str | None = Field(
        None, description="The S3 endpoint as clients reach it, for download URLs (default: s3_endpoint)."
    )
    s3_bucket: str = "ndif"
    s3_region: str = "us-east-1"
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    ray_address: str | None = Field(None, description="Ray cluster address; 'auto' or host:port.")
    ray_namespace: str = "ndif"
    registry: Path | None = Field(None, description="Model registry file (TOML).")
    public_url: str = Field("http://127.0.0.1:8289", description="Where clients reach the API.")
    signing_secret: str | None = Field(None, description="Signs local-store download URLs.")

    result_ttl_s: float = 7 * 24 * 3600
    presign_ttl_s: float = 300
    lease_s: float = 30.0
    requeue_after_s: float = 900.0
    broker_visibility_s: float = 60.0
    heartbeat_s: float = 2.0
    max_attempts: int = 3
    actor_wait_s: float = 300.0  # how long a job waits for a (re)starting model replica
    max_request_bytes: int = 256 << 20
    max_batch_items: int = 10_000
    quota_queued: int = 1000
    quota_running: int = 8
    quota_result_bytes: int = 20 << 30
    job_time_s: float = 300.0
    job_max_saved_bytes: int = 1 << 30
    queue_prefix: str = "ndif"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config = os.environ.get("NDIF_CONFIG")
        if config:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config)))
        return tuple(sources)

    # -- derived --------------------------------------------------------------------

    @cached_property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'ndif.db'}"

    @cached_property
    def broker(self) -> str:
        return self.broker_url or "filesystem://"

    def broker_options(self) -> dict[str, Any]:
        if self.broker_url:
            # Redis gives a message that was taken but not acknowledged (its dispatcher
            # was killed) back after this long. A job still running when its message
            # comes back is not run again: the claim finds it no longer QUEUED.
            return {"visibility_timeout": self.broker_visibility_s}
        # Embedded: kombu's local-files transport. It polls every second (its default);
        # polling faster lets a reader catch a message file half written (seen at 20 ms).
        folder = self.state_dir / "broker"
        for sub in ("out", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "out"),
            "data_folder_out": str(folder / "out"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }

    @cached_property
    def secret(self) -> bytes:
        """The key that signs local download URLs (made once per state dir if not set)."""
        if self.signing_secret:
            return self.signing_secret.encode()
        path = self.state_dir / "signing.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # another process of the stack made it first
            else:
                with os.fdopen(fd, "w") as out:
                    out.write(os.urandom(32).hex())
        return path.read_text().strip().encode()


#: What a model actor needs: the object store and the job limits. Actors run users'
#: code (sandboxed), so they are not handed the database or broker credentials.
ACTOR_FIELDS = (
    "state_dir", "s3_endpoint", "s3_public_endpoint", "s3_bucket", "s3_region", "s3_access_key", "s3_secret_key",
    "public_url", "signing_secret", "max_request_bytes", "job_time_s", "job_max_saved_bytes",
)  # fmt: skip


def actor_settings(settings: Settings) -> dict[str, Any]:
    """The settings a model actor is given (JSON-safe)."""
    data = settings.model_dump(mode="json", include=set(ACTOR_FIELDS))
    data["signing_secret"] = settings.secret.decode()
    return data


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (and ``NDIF_CONFIG``), with ``overrides`` on top."""
    return Settings(**overrides)
