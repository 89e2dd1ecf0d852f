"""``ndif-server``: run and administer the service's processes.

``migrate`` the job store, serve the ``api``, run a Celery ``worker`` for a lane (or
``beat`` for the periodic tasks), manage ``keys``, or bring the whole embedded stack
``up`` on one machine. Settings come from ``NDIF_*`` variables or ``NDIF_CONFIG``.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from .config import load_settings
from .db import Lane

app = typer.Typer(
    help="ndif's service: API, dispatchers, keys and the embedded stack.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(keys, name="keys")


@app.command()
def migrate() -> None:
    """Create or upgrade the job store's schema (Alembic)."""
    from .db import migrate as run

    settings = load_settings()
    run(settings.database)
    typer.echo(f"job store at {settings.database.split('@')[-1]} is up to date")


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8289,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
) -> None:
    """Serve the HTTP API with uvicorn."""
    import uvicorn

    uvicorn.run(
        "ndif_scheduler.api:create_app", factory=True, host=host, port=port, workers=workers, log_level="warning"
    )


@app.command()
def worker(
    lane: Annotated[str, typer.Option(help="interactive, batch, or all.")] = "all",
    concurrency: Annotated[int, typer.Option(help="Jobs this process dispatches at once.")] = 8,
    beat: Annotated[bool, typer.Option(help="Also run the periodic tasks in this process.")] = False,
    name: Annotated[str | None, typer.Option(help="Celery node name.")] = None,
) -> None:
    """Run a Celery worker that dispatches one lane's jobs of every deployment."""
    from .queue import app as celery
    from .service import get_service

    service = get_service()
    lanes = [item.value for item in Lane] if lane == "all" else [lane]
    queues = [service.queue_name(d.key, item) for d in service.registry.deployments for item in lanes]
    queues.append(f"{service.settings.queue_prefix}.default")
    argv = [
        "worker",
        "--pool=threads",
        f"--concurrency={concurrency}",
        f"--queues={','.join(queues)}",
        f"--hostname={name or f'{lane}-{os.getpid()}@{socket.gethostname()}'}",
        "--without-gossip",
        "--without-mingle",
        "--loglevel=WARNING",
    ]
    if beat:
        schedule = Path(service.settings.state_dir) / f"beat-{os.getpid()}.schedule"
        argv += ["--beat", f"--schedule={schedule}"]
    celery.worker_main(argv)


@app.command(name="beat")
def beat_command() -> None:
    """Run the periodic tasks (lease recovery, result expiry, deployment health)."""
    from .queue import app as celery
    from .service import get_service

    schedule = Path(get_service().settings.state_dir) / "beat.schedule"
    celery.start(["beat", f"--schedule={schedule}", "--loglevel=WARNING"])


@app.command()
def openapi(
    out: Annotated[Path | None, typer.Option(help="Write the spec here (default: print it).")] = None,
) -> None:
    """Print the HTTP API's OpenAPI spec (JSON); docs/openapi.json is this output."""
    print_spec = openapi_spec()
    if out is None:
        typer.echo(print_spec)
    else:
        out.write_text(print_spec + "\n")


def openapi_spec() -> str:
    """The OpenAPI spec as stable JSON (nothing is started or connected to)."""
    import json
    import tempfile

    from .api import create_app
    from .config import Settings
    from .service import Service

    with tempfile.TemporaryDirectory() as scratch:
        app_ = create_app(Service(Settings(state_dir=Path(scratch))))
        return json.dumps(app_.openapi(), indent=2, sort_keys=True)


@keys.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="Who the key is for.")],
    admin: Annotated[bool, typer.Option(help="May create and revoke keys.")] = False,
    quota_queued: Annotated[int | None, typer.Option(help="Jobs waiting at once.")] = None,
    quota_running: Annotated[int | None, typer.Option(help="Jobs running at once.")] = None,
    quota_result_bytes: Annotated[int | None, typer.Option(help="Bytes of stored results.")] = None,
) -> None:
    """Create a key and print its secret (shown once)."""
    from .auth import create_key
    from .service import get_service

    with get_service().sessions() as session:
        new = create_key(session, name, admin, quota_queued, quota_running, quota_result_bytes)
    typer.echo(new.key)
    typer.echo(f"key id {new.id} ({'admin' if admin else 'user'}) for {name}; store the secret now", err=True)


@keys.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id.")]) -> None:
    """Revoke a key."""
    from .auth import revoke_key
    from .service import get_service

    with get_service().sessions() as session:
        if not revoke_key(session, key_id):
            typer.echo(f"no active key {key_id}", err=True)
            raise typer.Exit(1)


@app.command()
def up(
    registry: Annotated[Path | None, typer.Option(help="Model registry (default: NDIF_REGISTRY).")] = None,
    port: Annotated[int, typer.Option(help="API port.")] = 8289,
    state_dir: Annotated[Path | None, typer.Option(help="Where the stack keeps its files.")] = None,
) -> None:
    """Run the embedded stack (API, dispatchers, model actors) until interrupted."""
    from .stack import EmbeddedStack

    settings = load_settings()
    path = registry or settings.registry
    if path is None:
        raise typer.BadParameter("name a model registry with --registry or NDIF_REGISTRY", param_hint="--registry")
    stack = EmbeddedStack(Path(path), state_dir or settings.state_dir, port=port)
    with stack:
        typer.echo(f"ndif is up at {stack.url}")
        typer.echo(f"client settings: {stack.client_config} (or NDIF_API_URL / NDIF_API_KEY)")
        typer.echo("stop with Ctrl-C")
        sys.stdout.flush()
        stack.wait()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
