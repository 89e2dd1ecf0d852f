"""Errors the service answers with, as exceptions."""

from __future__ import annotations

from typing import Any

from ndif.tracing.errors import NDIFError


class ServiceError(NDIFError):
    """The service refused or failed a call; ``status`` is the HTTP status."""

    def __init__(self, status: int, detail: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{detail} (HTTP {status})")
        self.status = status
        self.detail = detail
        self.body = body or {}


class AuthenticationError(ServiceError):
    """No API key, or one the service does not accept (401/403)."""


class NotFound(ServiceError):
    """No such job or batch for this key (404)."""


class QuotaExceeded(ServiceError):
    """Over a quota of this key (429); try again after ``retry_after`` seconds."""

    def __init__(self, status: int, detail: str, body: dict[str, Any] | None, retry_after: float) -> None:
        super().__init__(status, detail, body)
        self.retry_after = retry_after


class JobFailed(NDIFError):
    """A job ended without a result to return (cancelled, or failed outside the user's code)."""

    def __init__(self, job_id: str, status: str, error: dict[str, Any] | None) -> None:
        reason = f"{error.get('type')}: {error.get('message')}" if error else status.lower()
        super().__init__(f"job {job_id} ended {status}: {reason}")
        self.job_id = job_id
        self.status = status
        self.error = error
