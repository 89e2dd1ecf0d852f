"""Batch experiments: many traces submitted as one batch, followed and fetched later.

    with ndif_sdk.Batch("sweep") as batch:
        for prompt in prompts:
            with model.trace(prompt, remote=batch):
                logits = model.lm_head.output.save()
    batch.id                        # keep it: Batch.get(id) reattaches after a restart
    batch.progress()                # {'COMPLETED': 97, 'RUNNING': 3}, 0.97
    results = batch.results()       # one dict of saved values per trace (None if not done)

Each ``with model.trace(..., remote=batch)`` block is encoded and kept (nothing runs,
no variable is bound); leaving the ``with Batch`` block submits them all at once.
"""

from __future__ import annotations

import time
from typing import Any

from ndif.remote import apply_result
from ndif.wire import codec
from ndif.wire.schema import Request

from .client import FINAL, Client
from .jobs import Job, default_client


class Batch:
    """A batch experiment: build it with ``remote=batch`` blocks, then follow it by id."""

    def __init__(self, name: str | None = None, client: Client | None = None) -> None:
        self.name = name
        self.client = client or default_client()
        self.id: str | None = None
        self.items: list[bytes] = []
        self.info: dict[str, Any] = {}

    # -- building -------------------------------------------------------------------

    def submit(self, data: bytes, request: Request, owner: Any) -> None:
        """A ``remote=batch`` block: kept for submission; ``tracer.item`` is its index."""
        if self.id is not None:
            raise RuntimeError(f"batch {self.id} was already submitted; start a new Batch")
        if owner is not None:
            owner.item = len(self.items)
        self.items.append(data)
        return None

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.items) if self.id is None else int(self.info.get("size", 0))

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, kind: Any, *rest: Any) -> None:
        if kind is None and self.id is None and self.items:
            self.send()

    def send(self) -> str:
        """Submit every kept block as one batch; returns the batch id."""
        self.info = self.client.submit_batch(self.items, self.name)
        self.id = self.info["id"]
        return self.id

    # -- following ------------------------------------------------------------------

    @classmethod
    def get(cls, batch_id: str, client: Client | None = None) -> Batch:
        """Reattach to a submitted batch (from another process, after a restart)."""
        batch = cls(client=client)
        batch.id = batch_id
        batch.refresh()
        batch.name = batch.info.get("name")
        return batch

    def _require_id(self) -> str:
        if self.id is None:
            raise RuntimeError("the batch has not been submitted yet (leave its `with` block or call send())")
        return self.id

    def refresh(self) -> dict[str, Any]:
        self.info = self.client.batch(self._require_id())
        return self.info

    def progress(self) -> tuple[dict[str, int], float]:
        """Jobs per status, and the share that has ended."""
        info = self.refresh()
        return info["counts"], info["progress"]

    def jobs(self) -> list[Job]:
        """Every item's job, in submission order."""
        batch_id = self._require_id()
        jobs: list[Job] = []
        offset = 0
        while True:
            page = self.client.batch(batch_id, limit=500, offset=offset)
            jobs.extend(Job(info["id"], self.client, info) for info in page["jobs"])
            if not page.get("next_cursor"):
                return jobs
            offset = int(page["next_cursor"])

    def wait(self, timeout: float | None = None, progress: bool = True, poll: float = 0.5) -> dict[str, int]:
        """Wait until every item has ended (or ``timeout``); shows a progress bar."""
        from rich.progress import Progress

        deadline = None if timeout is None else time.monotonic() + timeout
        with Progress(disable=not progress, transient=False) as bar:
            task = bar.add_task(f"batch {self._require_id()[:8]}", total=len(self) or None)
            while True:
                counts, share = self.progress()
                bar.update(task, completed=sum(counts.get(s, 0) for s in FINAL), total=self.info["size"])
                if share >= 1.0 or (deadline is not None and time.monotonic() > deadline):
                    return counts
                time.sleep(poll)

    def results(self, errors: str = "return") -> list[dict[str, Any] | BaseException | None]:
        """Saved values of every item, in order: a dict for a finished item, None for one
        not finished yet, and the item's exception for one that failed (``errors="raise"``
        raises the first instead)."""
        listing = self.client.batch_results(self._require_id())
        values: list[dict[str, Any] | BaseException | None] = [None] * len(listing["items"])
        for item in listing["items"]:
            index = item["index"]
            if item.get("url"):
                result = codec.decode_result(self.client.download(item["url"]))
                try:
                    values[index] = apply_result(result)
                except Exception as error:
                    if errors == "raise":
                        raise
                    values[index] = error
            elif item["status"] in FINAL:
                from .errors import JobFailed

                failure = JobFailed(item["job_id"], item["status"], item.get("error"))
                if errors == "raise":
                    raise failure
                values[index] = failure
        return values

    def cancel(self) -> dict[str, int]:
        """Cancel every item that has not ended; returns the counts after."""
        self.info = self.client.cancel_batch(self._require_id())
        return self.info["counts"]
