"""``ndif up``: the service's embedded stack on this machine, run by the service's own CLI.

The client never imports the service (it may not be installed): ``ndif up`` runs
``python -m ndif_scheduler up`` as a child process, forwards Ctrl-C (and SIGTERM) to
it and exits with its status. With no registry configured it serves a tiny
random-weight Llama built in the state directory, so a fresh machine needs no
arguments.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

SERVICE_PACKAGES = ("ndif_scheduler", "ndif_workers")
NOT_INSTALLED = "the service is not installed: pip install ndif-scheduler ndif-workers (make install does)"
TINY_KEY = "tiny-llama"
TINY_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
#: Signals passed on to the service (SIGHUP, a closed terminal, as SIGTERM: a clean stop).
FORWARDED = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}


def _server_config() -> dict:
    """The server's TOML settings file (``NDIF_CONFIG``), if any; unreadable counts as empty."""
    path = os.environ.get("NDIF_CONFIG")
    if not path:
        return {}
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError):
        return {}  # the service reports it when it starts


def default_state_dir() -> Path:
    """Where the embedded stack keeps its files, as the service would choose it."""
    explicit = os.environ.get("NDIF_STATE_DIR") or _server_config().get("state_dir")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "ndif"


def missing_service() -> list[str]:
    """The service's packages that are not installed (found without importing them)."""
    return [name for name in SERVICE_PACKAGES if importlib.util.find_spec(name) is None]


def registry_configured() -> bool:
    return bool(os.environ.get("NDIF_REGISTRY") or _server_config().get("registry"))


def tiny_registry(state_dir: Path) -> Path:
    """A registry serving one tiny random Llama, key ``tiny-llama``, built once in ``state_dir``."""
    import ndif

    model = (state_dir / "models" / TINY_KEY).resolve()
    if not all((model / name).exists() for name in TINY_FILES):
        print(f"ndif: building a tiny random-weight Llama in {model}", file=sys.stderr)
        ndif.make_tiny(model, arch="llama")
    registry = state_dir / "registry.toml"
    registry.write_text(
        "# Written by `ndif up` when no registry is configured; rewritten at each such start.\n"
        "# Serve your own models with `ndif up --registry FILE` (or NDIF_REGISTRY).\n\n"
        "[[deployments]]\n"
        f'key = "{TINY_KEY}"\n'
        'backend = "transformers"\n'
        f"path = {json.dumps(str(model))}\n"
        'dtype = "float32"\n'
        'device = "cpu"\n'
        "replicas = 1\n"
    )
    return registry


def server_command(registry: Path | None, port: int, state_dir: Path) -> list[str]:
    command = [sys.executable, "-m", "ndif_scheduler", "up", "--port", str(port), "--state-dir", str(state_dir)]
    if registry is not None:
        command += ["--registry", str(registry)]
    return command


def run_forwarding(command: list[str]) -> int:
    """Run ``command`` until it exits, passing Ctrl-C and SIGTERM on; returns its exit status.

    The child has its own process group, so a Ctrl-C at the terminal reaches it once,
    from here (a second Ctrl-C is passed on too), never twice at once.
    """
    process: subprocess.Popen | None = None
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if process is None:
            pending.append(signum)
        elif process.poll() is None:
            process.send_signal(FORWARDED[signum])

    main = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED} if main else {}
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, process_group=0)
        for signum in pending:
            process.send_signal(FORWARDED[signum])
        code = process.wait()
    finally:
        if process is not None and process.poll() is None:  # interrupted by something not forwarded
            process.terminate()
            process.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - code if code < 0 else code


def up(registry: Path | None, port: int, state_dir: Path | None) -> int:
    """What ``ndif up`` does; returns the exit status."""
    import typer

    if missing_service():
        typer.secho(f"error: {NOT_INSTALLED}", fg="red", err=True)
        return 1
    state = (state_dir or default_state_dir()).expanduser().resolve()
    state.mkdir(parents=True, exist_ok=True)
    if registry is None and not registry_configured():
        registry = tiny_registry(state)
        typer.echo(f"ndif: no --registry given: serving {TINY_KEY}, a tiny random-weight Llama", err=True)
    typer.echo(f"ndif: starting the service at http://127.0.0.1:{port} with its files in {state}", err=True)
    typer.echo(f"ndif: clients on this machine: export NDIF_CLIENT_CONFIG={state / 'client.toml'}", err=True)
    return run_forwarding(server_command(registry.resolve() if registry else None, port, state))


@contextlib.contextmanager
def background_stack(state_dir: Path, registry: Path, port: int, timeout: float = 300) -> Iterator[tuple[str, str]]:
    """Run the embedded stack in the background for the ``with`` block; yields (API URL, admin key).

    Stopped on exit (SIGTERM to its process group, SIGKILL if it lingers). Its logs
    are in ``state_dir/logs``.
    """
    import httpx

    if missing_service():
        raise RuntimeError(NOT_INSTALLED)
    state_dir.mkdir(parents=True, exist_ok=True)
    output = open(state_dir / "up.log", "wb")  # noqa: SIM115 (the child writes it)
    process = subprocess.Popen(
        server_command(registry, port, state_dir), stdin=subprocess.DEVNULL, stdout=output,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the stack exited with {process.returncode}; see {state_dir / 'up.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the stack did not start in {timeout:.0f} s; see {state_dir / 'logs'}")
            try:
                if b"ndif is up" in (state_dir / "up.log").read_bytes() and httpx.get(f"{url}/healthz").is_success:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        config = tomllib.loads((state_dir / "client.toml").read_text())
        yield url, config["api_key"]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        output.close()
