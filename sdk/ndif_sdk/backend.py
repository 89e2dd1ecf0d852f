"""`RemoteBackend`: what ``remote=True`` does with a block.

It submits the encoded request to the service and, when the block is blocking (the
default), waits with a live status line and returns the saved values so they land in
the caller's variables, as a local trace would. With ``blocking=False`` it returns at
once; ``tracer.job`` is the `ndif_sdk.jobs.Job` to follow.
"""

from __future__ import annotations

from typing import Any

from ndif.remote import raise_remote_error
from ndif.wire.schema import Request

from .client import Client
from .errors import ServiceError
from .jobs import Job, default_client, error_info


def submit(client: Client, data: bytes, lane: str = "interactive") -> Job:
    """Submit one encoded request; a refusal for the user's code is raised at their line."""
    try:
        info = client.submit(data, lane=lane)
    except ServiceError as error:
        if error.body.get("error"):
            raise_remote_error(error_info(error.body["error"]))
        raise
    return Job(info["id"], client, info)


class RemoteBackend:
    """The ndif service as a ``remote=`` target."""

    def __init__(self, client: Client | None = None) -> None:
        self.client = client or default_client()

    def submit(self, data: bytes, request: Request, owner: Any) -> dict[str, Any] | None:
        job = submit(self.client, data)
        if owner is not None:
            owner.job = job
        if owner is not None and not owner.blocking:
            return None
        return job.result()
