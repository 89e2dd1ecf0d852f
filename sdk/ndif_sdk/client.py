"""`Client`: the HTTP API, call by call (httpx). Most code uses `Job`, `Batch` and ``remote=True``."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx

from ndif.wire import codec

from .config import ClientConfig
from .errors import AuthenticationError, NotFound, QuotaExceeded, ServiceError

FINAL = ("COMPLETED", "ERROR", "CANCELLED")


class Client:
    """One connection to the service with one API key."""

    def __init__(self, api_url: str | None = None, api_key: str | None = None, timeout: float = 30.0) -> None:
        config = ClientConfig.load()
        self.api_url = (api_url or config.api_url).rstrip("/")
        self.api_key = api_key or config.api_key
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.http = httpx.Client(base_url=self.api_url, headers=headers, timeout=timeout)
        # Downloads go straight to the object store: no API key on them.
        self.downloads = httpx.Client(timeout=300)

    def close(self) -> None:
        self.http.close()
        self.downloads.close()

    # -- plumbing -------------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise ServiceError(
                0, f"cannot reach the ndif service at {self.api_url} ({error or type(error).__name__}); is it up?"
            ) from None
        if response.status_code >= 400:
            raise _error(response)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    # -- chat -----------------------------------------------------------------------

    def chat_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Stream a chat completion (``POST /v1/chat/completions``, OpenAI's request with
        ndif's ``ndif`` field): yields each ``chat.completion.chunk`` as it comes."""
        import json

        try:
            request = {"json": {**body, "stream": True}, "timeout": None}
            with self.http.stream("POST", "/v1/chat/completions", **request) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: ") :])
                    if "error" in chunk:
                        raise ServiceError(500, str(chunk["error"].get("message")), chunk)
                    yield chunk
        except httpx.TransportError as error:
            raise ServiceError(
                0, f"cannot reach the ndif service at {self.api_url} ({error or type(error).__name__}); is it up?"
            ) from None

    def steering(self, model: str) -> dict[str, Any]:
        """What chat requests may use on ``model``: layers, and artifacts by name."""
        return self._call("GET", f"/v1/models/{model}/steering")

    # -- jobs -----------------------------------------------------------------------

    def submit(self, data: bytes, lane: str = "interactive") -> dict[str, Any]:
        """Submit one encoded request; returns the job."""
        return self._call(
            "POST",
            "/v1/jobs",
            params={"lane": lane},
            content=data,
            headers={"Content-Type": "application/x-ndif-request"},
        )

    def job(self, job_id: str, wait: float = 0, after: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if wait:
            params["wait"] = wait
            if after:
                params["after"] = after
        return self._call("GET", f"/v1/jobs/{job_id}", params=params, timeout=wait + 30)

    def jobs(
        self, status: list[str] | None = None, batch: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if batch:
            params["batch"] = batch
        if cursor:
            params["cursor"] = cursor
        return self._call("GET", "/v1/jobs", params=params)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/jobs/{job_id}")

    def result_link(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}/result")

    def download(self, url: str) -> bytes:
        """Fetch a result straight from the object store (a presigned URL needs no key)."""
        try:
            response = self.downloads.get(url)
        except httpx.TransportError as error:
            raise ServiceError(0, f"downloading the result failed ({error or type(error).__name__})") from None
        if response.status_code >= 400:
            raise ServiceError(response.status_code, f"downloading the result failed: {response.text[:200]}")
        return response.content

    def result(self, job_id: str) -> Any:
        """The job's decoded wire-format `Result` (a trace's)."""
        link = self.result_link(job_id)
        return codec.decode_result(self.download(link["url"]))

    def delete_result(self, job_id: str) -> None:
        self._call("DELETE", f"/v1/jobs/{job_id}/result")

    # -- batches, models, keys ------------------------------------------------------

    def submit_batch(self, items: list[bytes], name: str | None = None) -> dict[str, Any]:
        return self._call(
            "POST",
            "/v1/batches",
            content=codec.encode_batch(name, items),
            headers={"Content-Type": "application/x-ndif-batch"},
            timeout=300,
        )

    def batch(self, batch_id: str, limit: int = 0, offset: int = 0) -> dict[str, Any]:
        return self._call("GET", f"/v1/batches/{batch_id}", params={"limit": limit, "offset": offset})

    def batches(self, limit: int = 50) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/batches", params={"limit": limit})

    def batch_results(self, batch_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/batches/{batch_id}/results")

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/batches/{batch_id}")

    def models(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/models")

    def create_key(self, name: str, admin: bool = False, **quotas: int | None) -> dict[str, Any]:
        body = {"name": name, "admin": admin, **{k: v for k, v in quotas.items() if v is not None}}
        return self._call("POST", "/v1/keys", json=body)


def _error(response: httpx.Response) -> ServiceError:
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text[:500] or response.reason_phrase}
    detail = body.get("detail") if isinstance(body, dict) else str(body)
    if detail is None and isinstance(body, dict) and isinstance(body.get("error"), dict):
        detail = str(body["error"].get("message"))  # the chat API answers in OpenAI's error shape
    if not isinstance(detail, str):  # FastAPI's validation errors: a list of problems
        detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
    status = response.status_code
    if status in (401, 403):
        return AuthenticationError(status, detail, body)
    if status == 404:
        return NotFound(status, detail, body)
    if status == 429:
        return QuotaExceeded(status, detail, body, _retry_after(response.headers.get("Retry-After")))
    return ServiceError(status, detail, body)


def _retry_after(value: str | None) -> float:
    """Seconds from a Retry-After header (seconds, or an HTTP date), 5 if absent or unreadable."""
    if not value:
        return 5.0
    try:
        return max(float(value), 0.0)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max((parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds(), 0.0)
        except (TypeError, ValueError):
            return 5.0
