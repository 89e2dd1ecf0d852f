"""`Job`: a handle on one job of the service, from this process or from another later.

job = ndif.jobs.get("3f2a...")    # reattach by id
job.status()                      # 'RUNNING'
saved = job.result()              # waits; the saved values by name
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from ndif.remote import apply_result, raise_remote_error
from ndif.wire.schema import ErrorInfo, Frame

from .client import FINAL, Client
from .errors import JobFailed

_client: Client | None = None


def default_client() -> Client:
    """The client made from ``NDIF_API_URL``/``NDIF_API_KEY`` (or the config file), shared."""
    global _client
    if _client is None:
        _client = Client()
    return _client


def error_info(error: dict[str, Any]) -> ErrorInfo:
    """A service's error body as a wire-format `ErrorInfo` (to raise at the user's line)."""
    frames = [Frame(**frame) for frame in error.get("frames", [])]
    return ErrorInfo(type=error["type"], message=error["message"], frames=frames, notes=error.get("notes", []))


class Job:
    """One job: ``id``, `status`, `wait`, `result`, `cancel`."""

    def __init__(self, job_id: str, client: Client | None = None, info: dict[str, Any] | None = None) -> None:
        self.id = job_id
        self.client = client or default_client()
        self.info = info or {}

    def __repr__(self) -> str:
        return f"<ndif job {self.id} {self.info.get('status', '?')}>"

    def refresh(self, wait: float = 0, after: str | None = None) -> dict[str, Any]:
        self.info = self.client.job(self.id, wait=wait, after=after)
        return self.info

    def status(self) -> str:
        """The job's status now: RECEIVED, QUEUED, DISPATCHED, RUNNING, COMPLETED, ERROR or CANCELLED."""
        return self.refresh()["status"]

    @property
    def done(self) -> bool:
        return self.info.get("status") in FINAL

    def wait(self, timeout: float | None = None, progress: bool | None = None) -> str:
        """Wait until the job ends (or ``timeout`` seconds pass); returns its status.

        ``progress`` shows a live status line (default: when stderr is a terminal).
        """
        if progress is None:
            progress = sys.stderr.isatty() and os.environ.get("NDIF_PROGRESS", "1") != "0"
        deadline = None if timeout is None else time.monotonic() + timeout
        display = _Display(self) if progress else None
        try:
            status = self.info.get("status")
            while status not in FINAL:
                remaining = 20.0 if deadline is None else min(20.0, deadline - time.monotonic())
                if remaining <= 0:
                    break
                # With a display, return at every change to show it; else only at the end.
                status = self.refresh(wait=remaining, after=status if display else None)["status"]
                if display:
                    display.update(status)
        finally:
            if display:
                display.close()
        return status

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the job and return its saved values by name.

        Prints what the job printed; raises the job's own error at the line of your code
        that failed; `JobFailed` if it ended without a result.
        """
        status = self.wait(timeout)
        if status not in FINAL:
            raise TimeoutError(f"job {self.id} is still {status} after {timeout} s")
        if self.info.get("result_bytes") is None:
            error = self.info.get("error")
            if error and error.get("reason") in ("user", "limit"):
                raise_remote_error(error_info(error))
            raise JobFailed(self.id, status, error)
        return apply_result(self.client.result(self.id))

    def cancel(self) -> str:
        """Cancel the job; returns its status (CANCELLED, or RUNNING while a running job stops)."""
        self.info = self.client.cancel(self.id)
        return self.info["status"]


def get(job_id: str, client: Client | None = None) -> Job:
    """Reattach to a job by id (from another process, days later)."""
    job = Job(job_id, client)
    job.refresh()
    return job


def list_jobs(
    status: list[str] | None = None, batch: str | None = None, limit: int = 50, client: Client | None = None
) -> list[Job]:
    """Your jobs, newest first."""
    client = client or default_client()
    page = client.jobs(status=status, batch=batch, limit=limit)
    return [Job(info["id"], client, info) for info in page["jobs"]]


class _Display:
    """A live one-line status of a job (rich), replaced by a final line when it ends."""

    def __init__(self, job: Job) -> None:
        from rich.console import Console

        self.job = job
        self.started = time.monotonic()
        self.console = Console(stderr=True)
        self.status = self.console.status(self._text(job.info.get("status", "SUBMITTED")))
        self.status.start()

    def _text(self, status: str) -> str:
        return f"ndif job {self.job.id[:8]}: {status} ({time.monotonic() - self.started:.1f} s)"

    def update(self, status: str) -> None:
        self.status.update(self._text(status))

    def close(self) -> None:
        self.status.stop()
        status = self.job.info.get("status", "?")
        color = {"COMPLETED": "green", "ERROR": "red", "CANCELLED": "yellow"}.get(status, "white")
        self.console.print(f"[{color}]{self._text(status)}")
