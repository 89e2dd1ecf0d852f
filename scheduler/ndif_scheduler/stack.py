"""The service's processes on one machine: model workers (Ray), dispatchers, beat, API.

`EmbeddedStack` starts them as child processes with the same ``NDIF_*`` settings and
stops them by PID (SIGTERM, then SIGKILL). With no database, broker or S3 settings it
is the embedded stack (SQLite, a local-files broker, a local object store); with them
it is the same processes against real services, which is how the integration tests
and benchmarks run the production configuration natively.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from .auth import create_key
from .config import Settings
from .db import migrate
from .service import Service


class StackError(RuntimeError):
    """A process of the stack did not start."""


def _stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(10)


class EmbeddedStack:
    """Start with ``with EmbeddedStack(registry, state_dir) as stack:``; ``stack.url``, ``stack.admin_key``.

    ``env`` overrides settings; ``inherit_settings=False`` ignores this process's own
    ``NDIF_*`` variables (the stack is then exactly what ``env`` says).
    """

    def __init__(
        self,
        registry: Path,
        state_dir: Path,
        port: int = 8289,
        env: dict[str, str] | None = None,
        dispatchers: dict[str, int] | None = None,
        separate_beat: bool = False,
        inherit_settings: bool = True,
    ) -> None:
        self.registry = Path(registry).resolve()
        self.state_dir = Path(state_dir).resolve()
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        inherited = {key: value for key, value in os.environ.items() if inherit_settings or not key.startswith("NDIF_")}
        self.env = {
            **inherited,
            **(env or {}),
            "NDIF_STATE_DIR": str(self.state_dir),
            "NDIF_REGISTRY": str(self.registry),
            "NDIF_PUBLIC_URL": self.url,
        }
        self.env.setdefault("NDIF_LEASE_S", "15")
        # Ray's token authentication, with this stack's own token.
        self.env.setdefault("RAY_AUTH_MODE", "token")
        self.env.setdefault("RAY_AUTH_TOKEN_PATH", str(self.state_dir / "ray.token"))
        # lane -> number of dispatcher processes
        self.dispatchers = dispatchers or {"interactive": 1, "batch": 1}
        self.separate_beat = separate_beat
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs = self.state_dir / "logs"
        self.client_config = self.state_dir / "client.toml"
        self.admin_key = ""
        self._stopped = threading.Event()

    def settings(self) -> Settings:
        keys = {key[5:].lower(): value for key, value in self.env.items() if key.startswith("NDIF_")}
        return Settings(**keys)

    # -- processes ------------------------------------------------------------------

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (the child owns it)
        process = subprocess.Popen(
            [sys.executable, "-m", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped with its children
        )
        log.close()
        self.processes[name] = process
        return process

    def stop_process(self, name: str, kill: bool = False) -> None:
        process = self.processes[name]
        if kill:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        else:
            _stop(process)

    def start_dispatcher(self, name: str, lane: str, beat: bool = False) -> subprocess.Popen:
        args = ["ndif_scheduler.cli", "worker", f"--lane={lane}", "--concurrency=16", f"--name={name}@ndif"]
        if beat:
            args.append("--beat")
        return self.spawn(name, *args)

    def _wait_for(self, what: str, ready: callable, timeout: float, process: subprocess.Popen) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if process.poll() is not None:
                raise StackError(f"{what} exited with {process.returncode}; see {self.logs}")
            time.sleep(0.1)
        raise StackError(f"{what} did not become ready in {timeout:.0f} s; see {self.logs}")

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        settings = self.settings()
        settings.secret  # noqa: B018 (made once here, before the children read it)
        migrate(settings.database)
        self._bootstrap_key(settings)
        token = Path(self.env["RAY_AUTH_TOKEN_PATH"])
        if self.env.get("RAY_AUTH_MODE") == "token" and not token.exists():
            token.write_text(secrets.token_hex(32))
            token.chmod(0o600)
        address = self.state_dir / "ray.address"
        address.unlink(missing_ok=True)
        ready = self.state_dir / "model-workers.ready"
        ready.unlink(missing_ok=True)
        workers = self.spawn("model-workers", "ndif_workers", "serve", f"--ready-file={ready}")
        self._wait_for("the model workers", ready.exists, 300, workers)
        if self.separate_beat:
            self.spawn("beat", "ndif_scheduler.cli", "beat")
        first = not self.separate_beat
        for lane, count in self.dispatchers.items():
            for index in range(count):
                self.start_dispatcher(f"dispatch-{lane}-{index}", lane, beat=first)
                first = False
        api = self.spawn("api", "ndif_scheduler.cli", "api", f"--port={self.port}")
        self._wait_for("the API", self._healthy, 60, api)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def _bootstrap_key(self, settings: Settings) -> None:
        path = self.state_dir / "admin.key"
        if path.exists():
            self.admin_key = path.read_text().strip()
        else:
            with Service(settings).sessions() as session:
                self.admin_key = create_key(session, "admin (embedded stack)", is_admin=True).key
            path.write_text(self.admin_key)
            path.chmod(0o600)
        self.client_config.write_text(f'api_url = "{self.url}"\napi_key = "{self.admin_key}"\n')
        self.client_config.chmod(0o600)

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            _stop(self.processes[name])
        self._stopped.set()

    def wait(self) -> None:
        """Block until interrupted (SIGINT/SIGTERM) or a process of the stack exits."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self._stopped.set())
        while not self._stopped.wait(1.0):
            for name, process in self.processes.items():
                if process.poll() is not None:
                    print(f"ndif: {name} exited with {process.returncode}; stopping (logs in {self.logs})")
                    return

    def __enter__(self) -> EmbeddedStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
