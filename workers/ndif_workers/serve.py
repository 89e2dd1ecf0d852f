"""``ndif-workers serve``: start one Ray actor per deployment replica and keep them up.

Locally (no ``NDIF_RAY_ADDRESS``) this process starts a Ray instance of its own; its
address is written to ``<state_dir>/ray.address`` for the dispatchers, and the actors
live as long as this process. Against a cluster (``NDIF_RAY_ADDRESS=host:port``) the
actors are detached and outlive it. Either way Ray restarts an actor that dies (its
model is loaded again), and this process recreates one that is gone for good.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import ray
import typer

from ndif_scheduler.config import Settings, actor_settings, load_settings
from ndif_scheduler.registry import Deployment, Registry, load_registry

from .actor import ModelActor

log = logging.getLogger("ndif.workers")
cli = typer.Typer(help="ndif's model workers.", no_args_is_help=True, pretty_exceptions_enable=False)


@cli.callback()
def _commands() -> None:
    """ndif's model workers."""


def actor_options(deployment: Deployment, replica: int, namespace: str, detached: bool) -> dict[str, Any]:
    options: dict[str, Any] = {
        "name": deployment.actor_name(replica),
        "namespace": namespace,
        "max_concurrency": 4,  # the default group: health and cancel calls, never behind jobs
        "max_restarts": -1,  # a dead replica comes back (its calls in flight fail; dispatchers retry)
        "max_task_retries": 0,
        "num_cpus": deployment.num_cpus,
        "num_gpus": deployment.num_gpus,
        "get_if_exists": True,
    }
    if detached:
        options["lifetime"] = "detached"
    return options


def start_actors(registry: Registry, settings: Settings, detached: bool) -> dict[str, Any]:
    """Create (or find) every replica's actor and wait until each has loaded its model."""
    settings_data = actor_settings(settings)
    actors = {}
    for deployment in registry.deployments:
        # One concurrency group per lane: a batch experiment filling its slots never
        # makes an interactive trace wait behind it.
        remote_class = ray.remote(concurrency_groups=deployment.lanes())(ModelActor)
        for replica in range(deployment.replicas):
            options = actor_options(deployment, replica, settings.ray_namespace, detached)
            actors[options["name"]] = remote_class.options(**options).remote(deployment.to_dict(), settings_data)
    for name, actor in actors.items():
        health = ray.get(actor.health.remote())
        log.info("%s ready (pid %s, loaded in %.1f s)", name, health["pid"], health["load_seconds"])
    return actors


def init_ray(settings: Settings) -> bool:
    """Connect to (or start) Ray; returns whether this process started it."""
    if settings.ray_address:
        ray.init(address=settings.ray_address, namespace=settings.ray_namespace, log_to_driver=False)
        return False
    context = ray.init(
        namespace=settings.ray_namespace,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _node_ip_address="127.0.0.1",  # one machine: stay on loopback
    )
    address = context.address_info["gcs_address"]
    path = Path(settings.state_dir) / "ray.address"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(address)
    return True


@cli.command()
def serve(
    registry: Annotated[Path | None, typer.Option(help="Model registry file (default: NDIF_REGISTRY).")] = None,
    ready_file: Annotated[Path | None, typer.Option(help="Written once every actor has loaded its model.")] = None,
) -> None:
    """Start the registry's actors and keep them up until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = load_settings()
    path = registry or settings.registry
    if path is None:
        raise typer.BadParameter("name a model registry with --registry or NDIF_REGISTRY")
    models = load_registry(path)
    started_ray = init_ray(settings)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    # Handles are kept for the process's life: a non-detached actor ends with its last handle.
    actors = start_actors(models, settings, detached=not started_ray)
    log.info("every replica is ready")
    if ready_file is not None:
        ready_file.write_text(str(os.getpid()))
    while not stop.wait(5.0):
        for deployment in models.deployments:
            for replica in range(deployment.replicas):
                name = deployment.actor_name(replica)
                try:
                    ray.get_actor(name, namespace=settings.ray_namespace)
                except ValueError:
                    log.warning("%s is gone; starting it again", name)
                    actors.update(start_actors(Registry((deployment,)), settings, detached=not started_ray))
    if started_ray:
        ray.shutdown()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
