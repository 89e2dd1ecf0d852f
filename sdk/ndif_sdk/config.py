"""Client settings: where the service is and the API key.

Read from ``NDIF_API_URL`` and ``NDIF_API_KEY``, else from a TOML file
(``NDIF_CLIENT_CONFIG``, default ``~/.config/ndif/config.toml``) with ``api_url`` and
``api_key``, else from the file ``ndif up`` writes for its own admin key
(``<state dir>/client.toml``), so a local stack works with no setup.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8289"


def config_path() -> Path:
    explicit = os.environ.get("NDIF_CLIENT_CONFIG")
    if explicit:
        return Path(explicit)
    base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "ndif" / "config.toml"


def state_dir() -> Path:
    """The embedded stack's folder (as the server chooses it)."""
    explicit = os.environ.get("NDIF_STATE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "ndif"


@dataclass(frozen=True)
class ClientConfig:
    api_url: str = DEFAULT_URL
    api_key: str | None = None

    @classmethod
    def load(cls) -> ClientConfig:
        data: dict = {}
        path = config_path()
        if not path.exists() and "NDIF_CLIENT_CONFIG" not in os.environ:
            path = state_dir() / "client.toml"
        if path.exists():
            with path.open("rb") as handle:
                data = tomllib.load(handle)
        return cls(
            api_url=os.environ.get("NDIF_API_URL") or data.get("api_url") or DEFAULT_URL,
            api_key=os.environ.get("NDIF_API_KEY") or data.get("api_key"),
        )
