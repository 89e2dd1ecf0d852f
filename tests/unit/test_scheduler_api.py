"""The HTTP API through FastAPI's TestClient, on SQLite and a local object store.

Requests are made by ndif's own client code: a trace on a tiny Llama whose ``remote=``
is a `Capture` keeps the encoded bytes instead of sending them. Nothing runs a job:
the Celery ``enqueue`` is replaced by a recorder, and jobs are moved along with
``store.transition`` where a test needs them further.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

import ndif
import ndif_scheduler.service as service_module
from ndif.wire import codec
from ndif_scheduler.api import create_app
from ndif_scheduler.auth import create_key
from ndif_scheduler.config import Settings
from ndif_scheduler.db import Batch, Job, Status, migrate
from ndif_scheduler.service import Service
from ndif_scheduler.store import transition

THIS_FILE = os.path.realpath(__file__)
REQUEST = {"Content-Type": "application/x-ndif-request"}

# create_app's startup hook uses FastAPI's deprecated on_event: keep that warning out of the output.
pytestmark = pytest.mark.filterwarnings(r"ignore:\s*on_event is deprecated:DeprecationWarning")
BATCH = {"Content-Type": "application/x-ndif-batch"}


def line_of(tag: str) -> int:
    """The line of this file tagged with ``# @<tag>``."""
    marker = "# @" + tag
    lines = Path(THIS_FILE).read_text().splitlines()
    hits = [number for number, text in enumerate(lines, 1) if text.rstrip().endswith(marker)]
    assert len(hits) == 1, hits
    return hits[0]


# -- requests made by the client code -------------------------------------------------------


class Capture:
    """A ``remote=`` target that keeps the encoded request and binds nothing."""

    def __init__(self) -> None:
        self.data: list[bytes] = []

    def submit(self, data: bytes, request: Any, owner: Any) -> dict[str, Any]:
        self.data.append(data)
        return {}


def encode_trace(model: Any, prompt: str = "hello") -> bytes:
    capture = Capture()
    with model.trace(prompt, remote=capture):
        hidden = model.model.layers[0].output.save()  # noqa: F841
    assert len(capture.data) == 1
    return capture.data[0]


def encode_violation(model: Any) -> bytes:
    capture = Capture()
    with model.trace("hello", remote=capture):
        kind = ().__class__  # noqa: F841 # @violation
    return capture.data[0]


@pytest.fixture(scope="module")
def model(tiny_llama_path):
    return ndif.LanguageModel(str(tiny_llama_path))


@pytest.fixture(scope="module")
def request_bytes(model) -> bytes:
    return encode_trace(model)


# -- the app ----------------------------------------------------------------------------------


@dataclass
class Api:
    client: TestClient
    service: Service
    enqueued: list[tuple[str, str, str, float]]
    keys: dict[str, str] = field(default_factory=dict)
    key_ids: dict[str, str] = field(default_factory=dict)

    def headers(self, who: str = "alice", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}", **extra}

    def submit(self, data: bytes, who: str = "alice", **params: Any) -> Any:
        return self.client.post("/v1/jobs", content=data, headers=self.headers(who, **REQUEST), params=params)

    def get(self, url: str, who: str = "alice", **params: Any) -> Any:
        return self.client.get(url, headers=self.headers(who), params=params)

    def delete(self, url: str, who: str = "alice") -> Any:
        return self.client.delete(url, headers=self.headers(who))

    def move(self, job_id: str, *path: Status, **values: Any) -> None:
        """Walk a job along ``path`` (from its current status) with guarded transitions."""
        with self.service.sessions() as session:
            for status in path:
                current = session.get(Job, job_id).status
                assert transition(session, job_id, [Status(current)], status, **values), (current, status)
                session.commit()

    def job(self, job_id: str) -> Job:
        with self.service.sessions() as session:
            return session.get(Job, job_id)

    def count(self, table: Any) -> int:
        with self.service.sessions() as session:
            return session.execute(select(func.count()).select_from(table)).scalar_one()


@pytest.fixture
def queue_module(tmp_path_factory, monkeypatch):
    """``ndif_scheduler.queue`` imported with its state (a never-used filesystem broker) in a temp dir."""
    monkeypatch.setenv("NDIF_STATE_DIR", str(tmp_path_factory.mktemp("queue-state")))
    monkeypatch.setattr(service_module, "_service", None)
    import ndif_scheduler.queue as queue

    return queue


@pytest.fixture
def make_api(tmp_path, tiny_llama_path, queue_module, monkeypatch):
    registry = tmp_path / "models.toml"
    registry.write_text(
        '[[deployments]]\nkey = "tiny-llama"\n'
        f'path = "{tiny_llama_path}"\naliases = ["tl"]\n'
        '[[deployments]]\nkey = "other"\npath = "org/other-model"\nreplicas = 2\n'
    )
    made: list[Api] = []

    def make(**overrides: Any) -> Api:
        folder = tmp_path / f"state{len(made)}"
        settings = Settings(
            state_dir=folder,
            registry=registry,
            database_url=f"sqlite:///{folder / 't.db'}",
            public_url="http://ndif.test",
            **overrides,
        )
        migrate(settings.database)
        service = Service(settings)
        enqueued: list[tuple[str, str, str, float]] = []

        def record(celery: Any, service_: Service, job_id: str, deployment_key: str, lane: str, delay: float = 0):
            assert service_ is service
            enqueued.append((job_id, deployment_key, lane, delay))

        monkeypatch.setattr(queue_module, "enqueue", record)
        api = Api(TestClient(create_app(service)), service, enqueued)
        with service.sessions() as session:
            for name, quotas in (("alice", {}), ("bob", {}), ("small", {"quota_queued": 1})):
                new = create_key(session, name, **quotas)
                api.keys[name], api.key_ids[name] = new.key, new.id
            admin = create_key(session, "root", is_admin=True)
            api.keys["root"], api.key_ids["root"] = admin.key, admin.id
        made.append(api)
        return api

    yield make
    for api in made:
        api.client.close()
        api.service.engine.dispose()


@pytest.fixture
def api(make_api) -> Api:
    return make_api()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one Prometheus sample in ``text`` (None if absent)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return None


def submitted(api: Api, data: bytes, who: str = "alice", **params: Any) -> str:
    response = api.submit(data, who, **params)
    assert response.status_code == 202, response.text
    return response.json()["id"]


# -- authentication -------------------------------------------------------------------------


def test_no_key_or_a_bad_key_is_401(api):
    response = api.client.get("/v1/jobs")
    assert response.status_code == 401
    assert "no API key" in response.json()["detail"]
    for bad in ("Bearer ndif_wrong", "Bearer " + api.keys["alice"] + "x", "Bearer sk_" + api.keys["alice"][5:]):
        response = api.client.get("/v1/jobs", headers={"Authorization": bad})
        assert response.status_code == 401, bad
        assert response.json() == {"detail": "this API key is not valid (unknown or revoked)"}
    assert api.client.get("/v1/jobs", headers={"X-Api-Key": api.keys["alice"]}).status_code == 200
    assert api.client.get("/v1/jobs", headers=api.headers()).status_code == 200


def test_submit_without_a_key_is_401_and_creates_nothing(api, request_bytes):
    response = api.client.post("/v1/jobs", content=request_bytes, headers=REQUEST)
    assert response.status_code == 401
    assert api.count(Job) == 0 and api.enqueued == []


def test_admin_routes_refuse_user_keys(api):
    checks = [
        api.client.post("/v1/keys", json={"name": "x"}, headers=api.headers()),
        api.client.get("/v1/keys", headers=api.headers()),
        api.client.delete(f"/v1/keys/{api.key_ids['bob']}", headers=api.headers()),
    ]
    assert [response.status_code for response in checks] == [403, 403, 403]
    assert all(response.json()["detail"] == "this needs an admin key" for response in checks)
    # bob's key still works: the refused delete did nothing
    assert api.get("/v1/jobs", who="bob").status_code == 200


def test_admin_creates_lists_and_revokes_keys(api):
    created = api.client.post("/v1/keys", json={"name": "carol", "quota_queued": 2}, headers=api.headers("root"))
    assert created.status_code == 201
    body = created.json()
    assert body["name"] == "carol" and body["admin"] is False and body["key"].startswith("ndif_")
    api.keys["carol"] = body["key"]
    assert api.get("/v1/jobs", who="carol").status_code == 200
    listed = api.get("/v1/keys", who="root").json()
    assert [key["name"] for key in listed] == ["alice", "bob", "small", "root", "carol"]
    assert all("key" not in key and len(key["prefix"]) == 11 for key in listed)
    assert api.delete(f"/v1/keys/{body['id']}", who="root").status_code == 204
    assert api.get("/v1/jobs", who="carol").status_code == 401
    assert api.delete(f"/v1/keys/{body['id']}", who="root").status_code == 404


# -- submitting -------------------------------------------------------------------------------


def test_submit_queues_the_job(api, request_bytes):
    response = api.submit(request_bytes)
    assert response.status_code == 202
    view = response.json()
    job_id = view["id"]
    assert (view["status"], view["model"], view["kind"], view["lane"]) == (
        "QUEUED",
        "tiny-llama",
        "trace",
        "interactive",
    )
    assert (view["attempts"], view["request_bytes"], view["batch_id"]) == (0, len(request_bytes), None)
    assert api.enqueued == [(job_id, "tiny-llama", "interactive", 0)]
    assert api.service.store.get(f"requests/{job_id}") == request_bytes
    job = api.job(job_id)
    assert job.owner_id == api.key_ids["alice"] and job.lease_until is not None
    detail = api.get(f"/v1/jobs/{job_id}").json()
    assert [(e["from_status"], e["to_status"]) for e in detail["events"]] == [
        (None, "RECEIVED"),
        ("RECEIVED", "QUEUED"),
    ]


def test_submit_in_the_batch_lane(api, request_bytes):
    job_id = submitted(api, request_bytes, lane="batch")
    assert api.job(job_id).lane == "batch"
    assert api.enqueued == [(job_id, "tiny-llama", "batch", 0)]
    assert api.submit(request_bytes, lane="urgent").status_code == 422


def test_a_model_named_by_another_path_to_the_same_folder(api, model, tiny_llama_path, tmp_path):
    link = tmp_path / "linked-model"
    link.symlink_to(tiny_llama_path)
    data = encode_trace(ndif.LanguageModel(str(link)))
    assert codec.decode_request(data).model == str(link)
    assert api.submit(data).json()["model"] == "tiny-llama"


def test_malformed_bodies_are_400(api):
    response = api.submit(b"garbage that is not a request")
    assert response.status_code == 400
    assert response.json()["detail"].startswith("malformed message: ")
    assert response.json()["detail"].endswith("not an ndif message (bad magic)")
    response = api.submit(b"NDIF" + b"\x00" * 16)
    assert response.status_code == 400
    assert response.json()["detail"].startswith("malformed message: ")
    assert api.count(Job) == 0 and api.enqueued == []


def test_a_malformed_body_is_named_once(api):
    detail = api.submit(b"garbage that is not a request").json()["detail"]
    assert detail == "malformed message: not an ndif message (bad magic)"


def test_an_unknown_model_is_404_naming_the_deployed_ones(api, tiny_llama_path, tmp_path):
    copy = tmp_path / "copied-model"
    shutil.copytree(tiny_llama_path, copy)
    data = encode_trace(ndif.LanguageModel(str(copy)))
    response = api.submit(data)
    assert response.status_code == 404
    assert response.json()["detail"] == (f"the model {str(copy)!r} is not deployed here (deployed: tiny-llama, other)")
    assert api.count(Job) == 0 and api.enqueued == []


def test_a_sandbox_violation_is_422_at_the_users_line(api, model):
    response = api.submit(encode_violation(model))
    assert response.status_code == 422
    body = response.json()
    assert body["detail"].startswith("SandboxSyntaxError: ")
    assert "__class__" in body["detail"]
    error = body["error"]
    assert (error["type"], error["reason"]) == ("SandboxSyntaxError", "user")
    (frame,) = error["frames"]
    assert os.path.realpath(frame["filename"]) == THIS_FILE
    assert frame["line"] == line_of("violation")
    assert "().__class__" in frame["source"]
    assert api.count(Job) == 0 and api.enqueued == []


def test_an_oversized_body_is_413(make_api, request_bytes):
    api = make_api(max_request_bytes=64)
    response = api.submit(request_bytes)
    assert response.status_code == 413
    assert response.json()["detail"] == f"the request is {len(request_bytes)} bytes; the limit is 64"
    assert api.count(Job) == 0 and api.enqueued == []
    assert api.submit(request_bytes[:60]).status_code == 400  # under the limit: read and refused as malformed
    # Without a Content-Length (chunked), the body is cut off while it is read.
    response = api.client.post("/v1/jobs", content=iter([request_bytes]), headers=api.headers(**REQUEST))
    assert response.status_code == 413
    assert response.json()["detail"] == "the request is over the limit of 64 bytes"
    assert api.count(Job) == 0 and api.enqueued == []


def test_over_the_waiting_quota_is_429_with_retry_after(api, request_bytes):
    first = submitted(api, request_bytes, who="small")
    response = api.submit(request_bytes, who="small")
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "10"
    assert "1 jobs waiting" in response.json()["detail"]
    assert [job for job, *_ in api.enqueued] == [first]
    assert api.count(Job) == 1
    # Other keys are not affected, and a cancelled job frees the place.
    submitted(api, request_bytes, who="alice")
    assert api.delete(f"/v1/jobs/{first}", who="small").json()["status"] == "CANCELLED"
    submitted(api, request_bytes, who="small")
    assert sample(api.client.get("/metrics").text, "ndif_submissions_refused_total", reason="quota") == 1.0


def test_over_the_result_bytes_quota_is_429(make_api, request_bytes):
    api = make_api(quota_result_bytes=100)
    job_id = submitted(api, request_bytes)
    api.move(job_id, Status.DISPATCHED, Status.RUNNING, Status.COMPLETED, result_key=f"results/{job_id}")
    with api.service.sessions() as session:
        session.execute(Job.__table__.update().where(Job.id == job_id).values(result_bytes=100))
        session.commit()
    response = api.submit(request_bytes)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "3600"
    assert "100 bytes" in response.json()["detail"]
    # Deleting the result frees the quota.
    api.service.store.put(f"results/{job_id}", b"x" * 100)
    assert api.delete(f"/v1/jobs/{job_id}/result").status_code == 204
    submitted(api, request_bytes)


def test_a_broker_failure_ends_the_job_and_is_503(api, request_bytes, queue_module, monkeypatch):
    def down(*args: Any, **kwargs: Any) -> None:
        raise ConnectionRefusedError("no broker")

    monkeypatch.setattr(queue_module, "enqueue", down)
    response = api.submit(request_bytes)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "10"
    (job,) = api.get("/v1/jobs").json()["jobs"]
    assert job["status"] == "ERROR"
    assert job["error"]["type"] == "QueueUnavailable" and job["error"]["reason"] == "infrastructure"
    assert "ConnectionRefusedError" in job["error"]["message"]


# -- ownership --------------------------------------------------------------------------------


def test_other_keys_see_nothing_of_a_job(api, request_bytes):
    job_id = submitted(api, request_bytes)
    api.move(job_id, Status.DISPATCHED, Status.RUNNING, Status.COMPLETED, result_key=f"results/{job_id}")
    api.service.store.put(f"results/{job_id}", b"result")
    for response in (
        api.get(f"/v1/jobs/{job_id}", who="bob"),
        api.get(f"/v1/jobs/{job_id}/result", who="bob"),
        api.delete(f"/v1/jobs/{job_id}", who="bob"),
        api.delete(f"/v1/jobs/{job_id}/result", who="bob"),
    ):
        assert response.status_code == 404
        assert response.json()["detail"] == f"no job {job_id!r} for this key"
    assert api.get("/v1/jobs", who="bob").json() == {"jobs": [], "next_cursor": None}
    assert api.service.store.get(f"results/{job_id}") == b"result"
    assert api.get(f"/v1/jobs/{job_id}/result").status_code == 200
    # the same 404 as for an id that does not exist
    assert api.get("/v1/jobs/nope", who="bob").json()["detail"] == "no job 'nope' for this key"


def test_other_keys_see_nothing_of_a_batch(api, request_bytes):
    response = api.client.post(
        "/v1/batches", content=codec.encode_batch("mine", [request_bytes]), headers=api.headers(**BATCH)
    )
    batch_id = response.json()["id"]
    for response in (
        api.get(f"/v1/batches/{batch_id}", who="bob"),
        api.get(f"/v1/batches/{batch_id}/results", who="bob"),
        api.delete(f"/v1/batches/{batch_id}", who="bob"),
    ):
        assert response.status_code == 404
        assert response.json()["detail"] == f"no batch {batch_id!r} for this key"
    assert api.get("/v1/batches", who="bob").json() == []
    assert api.get("/v1/jobs", who="bob", batch=batch_id).json()["jobs"] == []
    assert api.get(f"/v1/batches/{batch_id}").json()["counts"] == {"QUEUED": 1}


# -- cancelling -------------------------------------------------------------------------------


def test_cancel_a_queued_job(api, request_bytes):
    job_id = submitted(api, request_bytes)
    response = api.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 200
    view = response.json()
    assert view["status"] == "CANCELLED" and view["finished_at"] is not None
    events = api.get(f"/v1/jobs/{job_id}").json()["events"]
    assert (events[-1]["from_status"], events[-1]["to_status"], events[-1]["detail"]) == (
        "QUEUED",
        "CANCELLED",
        "cancelled by its owner",
    )
    # Cancelling again changes nothing.
    assert api.delete(f"/v1/jobs/{job_id}").json()["status"] == "CANCELLED"
    assert len(api.get(f"/v1/jobs/{job_id}").json()["events"]) == 3


def test_cancel_a_running_job_asks_it_to_stop(api, request_bytes):
    job_id = submitted(api, request_bytes)
    api.move(job_id, Status.DISPATCHED, Status.RUNNING)
    view = api.delete(f"/v1/jobs/{job_id}").json()
    assert view["status"] == "RUNNING" and view["cancel_requested"] is True
    assert api.job(job_id).cancel_requested is True
    assert [e["to_status"] for e in api.get(f"/v1/jobs/{job_id}").json()["events"]][-1] == "RUNNING"


# -- listing ----------------------------------------------------------------------------------


def test_list_jobs_pages_newest_first_and_filters(api, request_bytes):
    ids = [submitted(api, request_bytes) for _ in range(5)]
    submitted(api, request_bytes, who="bob")
    for job_id in ids[1:3]:
        api.delete(f"/v1/jobs/{job_id}")
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.get("/v1/jobs", **params).json()
        pages += 1
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert pages == 3
    cancelled = api.get("/v1/jobs", status="CANCELLED").json()["jobs"]
    assert [job["id"] for job in cancelled] == [ids[2], ids[1]]
    both = api.client.get("/v1/jobs?status=CANCELLED&status=QUEUED", headers=api.headers()).json()["jobs"]
    assert len(both) == 5
    assert api.get("/v1/jobs", model="tiny-llama", limit=500).json()["jobs"][0]["id"] == ids[-1]
    assert api.get("/v1/jobs", model="other").json()["jobs"] == []
    assert api.get("/v1/jobs", cursor="not-a-cursor").status_code == 400
    assert api.get("/v1/jobs", status="NOPE").status_code == 422


# -- batches ----------------------------------------------------------------------------------


def test_submit_a_batch(api, model, request_bytes):
    items = [request_bytes, encode_trace(model, "one"), encode_trace(model, "two")]
    response = api.client.post("/v1/batches", content=codec.encode_batch("sweep", items), headers=api.headers(**BATCH))
    assert response.status_code == 202
    view = response.json()
    assert (view["name"], view["size"], view["counts"], view["finished"], view["progress"]) == (
        "sweep",
        3,
        {"QUEUED": 3},
        0,
        0.0,
    )
    batch_id = view["id"]
    detail = api.get(f"/v1/batches/{batch_id}").json()
    jobs = detail["jobs"]
    assert [job["batch_index"] for job in jobs] == [0, 1, 2]
    assert {(job["batch_id"], job["lane"], job["status"]) for job in jobs} == {(batch_id, "batch", "QUEUED")}
    assert [job["request_bytes"] for job in jobs] == [len(item) for item in items]
    assert api.enqueued == [(job["id"], "tiny-llama", "batch", 0) for job in jobs]
    for job, item in zip(jobs, items, strict=True):
        assert api.service.store.get(f"requests/{job['id']}") == item
    page = api.get(f"/v1/batches/{batch_id}", limit=2, offset=0).json()
    assert len(page["jobs"]) == 2 and page["next_cursor"] == "2"
    assert [b["id"] for b in api.get("/v1/batches").json()] == [batch_id]
    assert len(api.get("/v1/jobs", batch=batch_id).json()["jobs"]) == 3
    # Cancel the whole batch.
    cancelled = api.delete(f"/v1/batches/{batch_id}").json()
    assert (cancelled["counts"], cancelled["finished"], cancelled["progress"]) == ({"CANCELLED": 3}, 3, 1.0)


def test_a_batch_with_one_bad_item_creates_nothing(api, model, request_bytes):
    bad = codec.encode_batch("bad", [request_bytes, b"garbage", request_bytes])
    response = api.client.post("/v1/batches", content=bad, headers=api.headers(**BATCH))
    assert response.status_code == 400
    assert response.json()["detail"].startswith("batch item 1: malformed message: ")
    assert response.json()["detail"].endswith("not an ndif message (bad magic)")
    hostile = codec.encode_batch("bad", [request_bytes, request_bytes, encode_violation(model)])
    response = api.client.post("/v1/batches", content=hostile, headers=api.headers(**BATCH))
    assert response.status_code == 422
    assert response.json()["detail"].startswith("batch item 2: SandboxSyntaxError")
    assert api.count(Job) == 0 and api.count(Batch) == 0 and api.enqueued == []
    assert not (api.service.settings.state_dir / "objects" / "requests").exists()


def test_a_batch_name_longer_than_its_column_is_refused(api, request_bytes):
    data = codec.encode_batch("x" * 201, [request_bytes])
    response = api.client.post("/v1/batches", content=data, headers=api.headers(**BATCH))
    assert response.status_code == 400
    assert "name" in response.json()["detail"]


def test_a_malformed_or_empty_batch_is_400(api):
    response = api.client.post("/v1/batches", content=b"\xc1", headers=api.headers(**BATCH))
    assert response.status_code == 400 and response.json()["detail"].startswith("malformed batch")
    response = api.client.post("/v1/batches", content=codec.encode_batch(None, []), headers=api.headers(**BATCH))
    assert (response.status_code, response.json()["detail"]) == (400, "the batch has no items")


def test_a_batch_over_the_quota_creates_nothing(api, request_bytes):
    data = codec.encode_batch("big", [request_bytes, request_bytes])
    response = api.client.post("/v1/batches", content=data, headers=api.headers("small", **BATCH))
    assert response.status_code == 429 and response.headers["Retry-After"] == "10"
    assert api.count(Job) == 0 and api.count(Batch) == 0


# -- results ----------------------------------------------------------------------------------


def test_result_lifecycle(api, request_bytes):
    job_id = submitted(api, request_bytes)
    response = api.get(f"/v1/jobs/{job_id}/result")
    assert response.status_code == 409
    assert response.json()["detail"] == f"job {job_id} is QUEUED; its result is ready once it has ended"
    assert api.delete(f"/v1/jobs/{job_id}/result").status_code == 409

    api.service.store.put(f"results/{job_id}", b"the result")
    api.move(job_id, Status.DISPATCHED, Status.RUNNING)
    api.move(job_id, Status.COMPLETED, result_key=f"results/{job_id}", result_bytes=10)
    link = api.get(f"/v1/jobs/{job_id}/result").json()
    assert link["bytes"] == 10
    url = urlsplit(link["url"])
    assert (url.scheme, url.netloc, url.path) == ("http", "ndif.test", f"/v1/blobs/results/{job_id}")
    download = api.client.get(f"{url.path}?{url.query}")  # no API key: the signature is enough
    assert download.status_code == 200 and download.content == b"the result"

    tampered = re.sub(r"signature=([0-9a-f])", lambda m: "signature=" + ("1" if m[1] == "0" else "0"), url.query)
    assert tampered != url.query
    response = api.client.get(f"{url.path}?{tampered}")
    assert response.status_code == 403
    assert "not valid or has expired" in response.json()["detail"]
    assert api.client.get(f"/v1/blobs/requests/{job_id}?{url.query}").status_code == 403  # another key

    assert api.delete(f"/v1/jobs/{job_id}/result").status_code == 204
    with pytest.raises(KeyError):
        api.service.store.get(f"results/{job_id}")
    response = api.get(f"/v1/jobs/{job_id}/result")
    assert response.status_code == 410
    assert response.json()["detail"] == f"the result of job {job_id} expired and was deleted"
    assert api.client.get(f"{url.path}?{url.query}").status_code == 404  # still signed, but gone


def test_a_job_that_ended_without_a_result_is_404(api, request_bytes):
    job_id = submitted(api, request_bytes)
    api.move(job_id, Status.ERROR, error_type="UnknownModel", error_message="gone")
    response = api.get(f"/v1/jobs/{job_id}/result")
    assert response.status_code == 404
    assert response.json()["detail"] == f"job {job_id} ended ERROR without a result: UnknownModel: gone"
    cancelled = submitted(api, request_bytes)
    api.delete(f"/v1/jobs/{cancelled}")
    assert (
        api.get(f"/v1/jobs/{cancelled}/result").json()["detail"] == f"job {cancelled} ended CANCELLED without a result"
    )


def test_batch_results_link_finished_items(api, request_bytes):
    data = codec.encode_batch("r", [request_bytes, request_bytes])
    batch_id = api.client.post("/v1/batches", content=data, headers=api.headers(**BATCH)).json()["id"]
    first, second = (job["id"] for job in api.get(f"/v1/batches/{batch_id}").json()["jobs"])
    api.service.store.put(f"results/{first}", b"r0")
    api.move(first, Status.DISPATCHED, Status.RUNNING)
    api.move(first, Status.COMPLETED, result_key=f"results/{first}", result_bytes=2)
    items = api.get(f"/v1/batches/{batch_id}/results").json()["items"]
    assert [(item["index"], item["job_id"], item["status"]) for item in items] == [
        (0, first, "COMPLETED"),
        (1, second, "QUEUED"),
    ]
    assert items[0]["bytes"] == 2 and items[1]["url"] is None
    url = urlsplit(items[0]["url"])
    assert api.client.get(f"{url.path}?{url.query}").content == b"r0"


# -- models, health, metrics, OpenAPI ---------------------------------------------------------


def test_models_lists_the_registry_with_queue_depths(api, request_bytes):
    submitted(api, request_bytes)
    running = submitted(api, request_bytes, who="bob")
    api.move(running, Status.DISPATCHED)
    models = api.get("/v1/models").json()
    assert [(m["key"], m["backend"], m["aliases"], m["replicas"]) for m in models] == [
        ("tiny-llama", "transformers", ["tl"], 1),
        ("other", "transformers", [], 2),
    ]
    assert [(m["queued"], m["running"], m["state"], m["replicas_ready"]) for m in models] == [
        (1, 1, "unknown", 0),
        (0, 0, "unknown", 0),
    ]
    assert api.client.get("/v1/models").status_code == 401


def test_healthz(api):
    response = api.client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "object_store": "ok"}


def test_healthz_reports_a_failed_object_store(api):
    api.service.store.ping()  # made on first use
    shutil.rmtree(api.service.settings.state_dir / "objects")
    response = api.client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"status": "unhealthy", "database": "ok", "object_store": "failed: OSError"}


def test_metrics(api, request_bytes):
    submitted(api, request_bytes)
    submitted(api, request_bytes, lane="batch")
    response = api.client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "ndif_jobs_submitted_total{" in text and "\nndif_jobs{" in text
    assert sample(text, "ndif_jobs_submitted_total", model="tiny-llama", lane="interactive") == 1.0
    assert sample(text, "ndif_jobs_submitted_total", model="tiny-llama", lane="batch") == 1.0
    assert sample(text, "ndif_jobs", model="tiny-llama", status="QUEUED") == 2.0
    assert sample(text, "ndif_http_requests_total", method="POST", route="/v1/jobs", code="202") == 2.0


def test_openapi_describes_the_api(api):
    spec = api.client.get("/openapi.json").json()
    expected = {
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/result",
        "/v1/batches",
        "/v1/batches/{batch_id}",
        "/v1/models",
        "/healthz",
        "/metrics",
    }
    assert expected <= set(spec["paths"])
    assert not any(path.startswith("/v1/blobs") for path in spec["paths"])
    post = spec["paths"]["/v1/jobs"]["post"]
    assert list(post["requestBody"]["content"]) == ["application/x-ndif-request"]
    assert post["requestBody"]["required"] is True
    assert "202" in post["responses"] and "429" in post["responses"]
    assert list(spec["paths"]["/v1/batches"]["post"]["requestBody"]["content"]) == ["application/x-ndif-batch"]


# -- chat ---------------------------------------------------------------------------------------


CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        ({"n": 2}, 400, "n must be 1"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop takes up to 4 sequences"),
        ({"temperature": 3}, 400, "temperature: Input should be less than or equal to 2"),
        ({"messages": []}, 400, "messages: List should have at least 1 item"),
        ({"ndif": {"observe": {"logit_lens": {"layer": 1, "k": 99}}}}, 400, "k: Input should be less than"),
        ({"model": "nope"}, 404, "the model 'nope' is not deployed here"),
    ],
)
def test_chat_requests_are_checked_before_a_job_is_made(api, change, status, message):
    response = api.client.post("/v1/chat/completions", json={**CHAT, **change}, headers=api.headers())
    assert response.status_code == status, response.text
    error = response.json()["error"]  # OpenAI's error shape, which its clients read
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert api.enqueued == []


def test_a_chat_request_is_queued_as_a_job_of_its_caller(api):
    done = threading.Event()
    answers = []

    def ask():  # no worker runs here: the request waits until the job is cancelled below
        answers.append(api.client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3}, headers=api.headers()))
        done.set()

    threading.Thread(target=ask, daemon=True).start()
    deadline = time.monotonic() + 10
    while not api.enqueued and time.monotonic() < deadline:
        time.sleep(0.02)
    job_id = api.enqueued[0][0]
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["kind"] == "chat" and job["status"] == "QUEUED"
    assert api.get(f"/v1/jobs/{job_id}", who="bob").status_code == 404
    payload = api.service.store.get(f"requests/{job_id}")
    assert payload.startswith(b"ndif-chat/1\n") and b'"max_tokens": 3' in payload
    api.delete(f"/v1/jobs/{job_id}")
    assert done.wait(10)
    assert answers[0].status_code == 409 and answers[0].json()["error"]["message"].startswith("the reply was cancelled")


def test_the_playground_page_is_served(api):
    page = api.client.get("/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page.text and 'id="send"' in page.text
