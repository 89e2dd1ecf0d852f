"""The ``ndif`` command line against a fake service (httpx.MockTransport), and ``ndif up``'s launcher."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import ndif
import ndif_sdk
from ndif.wire import codec
from ndif.wire.schema import ErrorInfo, Frame, Result
from ndif.wire.values import Encoder
from ndif_sdk import commands, launcher
from ndif_sdk import jobs as sdk_jobs
from ndif_sdk.cli import app

API = "http://ndif.test"
STORE = "http://store.test"
JOB = "3f2a9c1b7d4e5f60718293a4b5c6d7e8"
OTHER = "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b"
BATCH = "b0a1b2c3d4e5f60718293a4b5c6d7e8f"


class FakeService:
    """Answers by (method, path): a fixed response, or a list of them served in turn."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list] = {}
        self.requests: list[httpx.Request] = []

    def route(self, method: str, path: str, *answers: httpx.Response | Exception) -> None:
        self.routes[(method, path)] = list(answers)

    def json(self, method: str, path: str, body: object, status: int = 200) -> None:
        self.route(method, path, httpx.Response(status, json=body))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answers = self.routes.get((request.method, request.url.path))
        if not answers:
            return httpx.Response(404, json={"detail": f"no route {request.method} {request.url.path}"})
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def sent(self, method: str, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path == path]


def mock_client(fake: FakeService, api_url: str = API, api_key: str | None = "ndif_user") -> ndif_sdk.Client:
    client = ndif_sdk.Client(api_url, api_key)
    client.http = httpx.Client(
        transport=httpx.MockTransport(fake), base_url=client.api_url, headers=client.http.headers
    )
    client.downloads = httpx.Client(transport=httpx.MockTransport(fake))
    return client


@pytest.fixture(autouse=True)
def _no_local_settings(monkeypatch, tmp_path):
    """No settings of this machine leak in: no env keys, no config file, an empty state dir."""
    for name in ("NDIF_API_URL", "NDIF_API_KEY", "NDIF_REGISTRY", "NDIF_CONFIG", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NDIF_CLIENT_CONFIG", str(tmp_path / "no-client.toml"))
    monkeypatch.setenv("NDIF_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("NDIF_PROGRESS", "0")


@pytest.fixture
def service(monkeypatch) -> FakeService:
    """A fake service behind the shared client; result downloads are served by it too."""
    fake = FakeService()
    monkeypatch.setattr(sdk_jobs, "_client", mock_client(fake))
    return fake


def ndif_cli(*args: str):
    return CliRunner().invoke(app, list(args))


def job_view(job_id: str = JOB, status: str = "COMPLETED", **extra) -> dict:
    view = {
        "id": job_id,
        "status": status,
        "model": "tiny-llama",
        "kind": "trace",
        "lane": "interactive",
        "batch_id": None,
        "batch_index": None,
        "attempts": 1,
        "cancel_requested": False,
        "created_at": "2025-03-01T12:00:00Z",
        "updated_at": "2025-03-01T12:00:02Z",
        "started_at": "2025-03-01T12:00:01Z",
        "finished_at": "2025-03-01T12:00:02Z",
        "request_bytes": 2048,
        "result_bytes": 4096,
        "result_expired": False,
        "timings": {"decode": 0.01, "run": 1.25, "encode": 0.02},
        "error": None,
        "events": None,
    }
    view.update(extra)
    return view


USER_ERROR = {
    "type": "ValueError",
    "message": "the steering vector has the wrong size",
    "reason": "user",
    "frames": [
        {"filename": "/home/ada/steer.py", "line": 12, "name": "<module>", "source": "h[:] += vector"},
        {"filename": "/home/ada/steer.py", "line": 7, "name": "scale", "source": "return v * w"},
    ],
    "notes": ["check the hidden size"],
}


def encoded_result(saved: dict, logs: list[str] | None = None, error: ErrorInfo | None = None) -> bytes:
    """A real wire-format result, as the service stores it."""
    encoder = Encoder(allow_code=False)
    trees = {name: encoder.encode(value, f"saved {name!r}") for name, value in saved.items()}
    return codec.encode_result(Result(saved=trees, logs=logs or [], error=error))


def serve_result(fake: FakeService, job_id: str, data: bytes) -> str:
    url = f"{STORE}/blobs/results/{job_id}?expires=1&signature=abc"
    fake.json(
        "GET", f"/v1/jobs/{job_id}/result", {"url": url, "expires_at": "2025-03-01T13:00:00Z", "bytes": len(data)}
    )
    fake.route("GET", f"/blobs/results/{job_id}", httpx.Response(200, content=data))
    return url


# -- jobs --------------------------------------------------------------------------------


def test_jobs_list_prints_a_table_with_short_ids_run_seconds_and_error_types(service):
    failed = job_view(OTHER, "ERROR", error=USER_ERROR, timings=None)
    service.json("GET", "/v1/jobs", {"jobs": [job_view(), failed], "next_cursor": None})

    result = ndif_cli("jobs", "list")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "MODEL", "KIND", "CREATED", "RUN", "(s)", "ERROR"]
    first, second = lines[1].split(), lines[2].split()
    assert first[:4] == [JOB[:12], "COMPLETED", "tiny-llama", "trace"]
    assert first[-1] == "1.25"
    assert second[:2] == [OTHER[:12], "ERROR"] and second[-2:] == ["-", "ValueError"]
    assert JOB not in result.stdout  # 12 characters of the id only


def test_jobs_list_filters_pages_and_prints_json_lines(service):
    service.route(
        "GET",
        "/v1/jobs",
        httpx.Response(200, json={"jobs": [job_view(JOB), job_view(OTHER)], "next_cursor": "page2"}),
        httpx.Response(200, json={"jobs": [job_view("c" * 32)], "next_cursor": "page3"}),
    )

    result = ndif_cli(
        "jobs", "list", "--status", "completed,error", "-s", "RUNNING", "--batch", BATCH, "-n", "3", "--json"
    )

    assert result.exit_code == 0, result.output
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == [JOB, OTHER, "c" * 32]
    first, second = service.sent("GET", "/v1/jobs")
    assert first.url.params.get_list("status") == ["COMPLETED", "ERROR", "RUNNING"]
    assert first.url.params["batch"] == BATCH and first.url.params["limit"] == "3"
    assert second.url.params["cursor"] == "page2" and second.url.params["limit"] == "1"


def test_jobs_list_rejects_an_unknown_status_before_calling(service):
    result = ndif_cli("jobs", "list", "--status", "DONE")
    assert result.exit_code == 2
    assert "DONE" in result.output and "COMPLETED" in result.output
    assert service.requests == []


def test_jobs_status_shows_the_error_at_the_users_frames_and_the_history(service):
    events = [
        {"from_status": None, "to_status": "RECEIVED", "at": "2025-03-01T12:00:00Z", "detail": None},
        {"from_status": "RECEIVED", "to_status": "QUEUED", "at": "2025-03-01T12:00:00Z", "detail": None},
        {"from_status": "QUEUED", "to_status": "RUNNING", "at": "2025-03-01T12:00:01Z", "detail": None},
        {"from_status": "RUNNING", "to_status": "ERROR", "at": "2025-03-01T12:00:02Z", "detail": "user code raised"},
    ]
    service.json("GET", f"/v1/jobs/{JOB}", job_view(status="ERROR", error=USER_ERROR, events=events, result_bytes=None))

    result = ndif_cli("jobs", "status", JOB)

    assert result.exit_code == 0, result.output
    out = result.stdout
    assert JOB in out and "tiny-llama" in out
    assert "ValueError: the steering vector has the wrong size  (user)" in out
    assert "/home/ada/steer.py:12 in <module>: h[:] += vector" in out
    assert out.index("steer.py:12") < out.index("steer.py:7 in scale: return v * w")  # innermost last
    assert "note: check the hidden size" in out
    assert "run 1.250 s" in out
    history = out[out.index("history") :].splitlines()[1:]
    assert [line.split()[2:] for line in history[:3]] == [
        ["RECEIVED"],
        ["RECEIVED", "→", "QUEUED"],
        ["QUEUED", "→", "RUNNING"],
    ]
    assert history[3].split()[2:] == ["RUNNING", "→", "ERROR", "user", "code", "raised"]


def test_jobs_status_wait_long_polls_until_the_job_ends_and_json_prints_it(service):
    service.route(
        "GET",
        f"/v1/jobs/{JOB}",
        httpx.Response(200, json=job_view(status="QUEUED")),
        httpx.Response(200, json=job_view(status="RUNNING")),
        httpx.Response(200, json=job_view(status="COMPLETED")),
    )

    result = ndif_cli("jobs", "status", JOB, "--wait", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "COMPLETED"
    polls = service.sent("GET", f"/v1/jobs/{JOB}")
    assert [r.url.params.get("after") for r in polls[1:]] == [None, None]  # no display: wait for the end
    assert all(float(r.url.params["wait"]) > 0 for r in polls[1:])


def test_jobs_result_prints_the_saved_values_and_writes_a_safetensors_file(service, tmp_path):
    hidden = torch.randn(1, 6, 64)
    pair = (torch.arange(4, dtype=torch.int64), torch.ones(2, 2, dtype=torch.bfloat16))
    data = encoded_result({"hidden": hidden, "pair": pair}, logs=["tokens: 6"])
    serve_result(service, JOB, data)
    out = tmp_path / "values.safetensors"

    result = ndif_cli("jobs", "result", JOB, "--out", str(out))

    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.split()}
    assert rows["hidden"][1:] == ["Tensor", "[1,", "6,", "64]", "float32"]
    assert rows["pair"][1:3] == ["tuple", "of"]
    assert "(Tensor[4] int64, Tensor[2, 2] bfloat16)" in result.stdout
    assert "tokens: 6" in result.stdout
    assert f"wrote 3 tensors to {out}" in result.stdout
    written = load_file(out)
    assert set(written) == {"hidden", "pair.0", "pair.1"}
    assert torch.equal(written["hidden"], hidden)
    assert torch.equal(written["pair.0"], pair[0]) and torch.equal(written["pair.1"], pair[1])
    assert written["pair.1"].dtype == torch.bfloat16


def test_jobs_result_writes_pt_for_other_values_and_refuses_them_in_safetensors(service, tmp_path):
    saved = {"logits": torch.randn(2, 3), "tokens": ["The", " Eiffel"], "count": 3}
    serve_result(service, JOB, encoded_result(saved))

    refused = ndif_cli("jobs", "result", JOB, "--out", str(tmp_path / "v.safetensors"))
    assert refused.exit_code == 1
    assert refused.stderr.strip() == (
        f"error: cannot write {tmp_path / 'v.safetensors'}: safetensors holds tensors only, and tokens (list), "
        "count (int) are not; write a .pt file instead"
    )
    assert not (tmp_path / "v.safetensors").exists()

    result = ndif_cli("jobs", "result", JOB, "-o", str(tmp_path / "v.pt"))
    assert result.exit_code == 0, result.output
    assert "['The', ' Eiffel']" in result.stdout and "list of 2" in result.stdout
    loaded = torch.load(tmp_path / "v.pt")
    assert loaded["tokens"] == ["The", " Eiffel"] and loaded["count"] == 3
    assert torch.equal(loaded["logits"], saved["logits"])


def test_jobs_result_refuses_an_unknown_suffix_before_downloading(service, tmp_path):
    result = ndif_cli("jobs", "result", JOB, "--out", str(tmp_path / "v.npz"))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot write {tmp_path / 'v.npz'}: choose the format")
    assert service.requests == []


def test_jobs_result_shows_the_jobs_own_error_and_fails(service, tmp_path):
    error = ErrorInfo(
        type="IndexError", message="index 9 is out of range", frames=[Frame("/x/a.py", 3, "<module>", "h[9]")]
    )
    serve_result(service, JOB, encoded_result({}, logs=["before"], error=error))
    result = ndif_cli("jobs", "result", JOB, "--out", str(tmp_path / "v.pt"))
    assert result.exit_code == 1
    assert result.stderr == f"error: job {JOB} failed: IndexError: index 9 is out of range\n"
    assert not (tmp_path / "v.pt").exists()
    assert "IndexError: index 9 is out of range" in result.stdout
    assert "/x/a.py:3 in <module>: h[9]" in result.stdout
    assert "no saved values" in result.stdout


def test_jobs_cancel_reports_what_happened(service):
    service.route(
        "DELETE",
        f"/v1/jobs/{JOB}",
        httpx.Response(200, json=job_view(status="CANCELLED")),
        httpx.Response(200, json=job_view(status="RUNNING", cancel_requested=True)),
    )
    assert ndif_cli("jobs", "cancel", JOB).stdout == f"job {JOB}: CANCELLED\n"
    running = ndif_cli("jobs", "cancel", JOB)
    assert running.stdout == f"job {JOB}: cancel requested; it is RUNNING and stops at its next check\n"
    assert len(service.sent("DELETE", f"/v1/jobs/{JOB}")) == 2


# -- batches -----------------------------------------------------------------------------


def batch_view(**extra) -> dict:
    view = {
        "id": BATCH,
        "name": "sweep",
        "size": 10,
        "created_at": "2025-03-01T12:00:00Z",
        "counts": {"COMPLETED": 4, "ERROR": 1, "QUEUED": 5},
        "finished": 5,
        "progress": 0.5,
        "jobs": [],
        "next_cursor": None,
    }
    view.update(extra)
    return view


def test_batch_status_prints_progress_and_counts(service):
    service.json("GET", f"/v1/batches/{BATCH}", batch_view())
    result = ndif_cli("batch", "status", BATCH)
    assert result.exit_code == 0, result.output
    assert f"[{'#' * 15}{'.' * 15}] 5/10 ended (50%)" in result.stdout
    assert "QUEUED 5  COMPLETED 4  ERROR 1" in result.stdout  # lifecycle order
    assert "sweep" in result.stdout


def test_batch_list_and_cancel(service):
    service.json("GET", "/v1/batches", [batch_view(), batch_view(id="f" * 32, name=None, counts={}, progress=1.0)])
    service.json("DELETE", f"/v1/batches/{BATCH}", batch_view(counts={"COMPLETED": 4, "ERROR": 1, "CANCELLED": 5}))

    listed = ndif_cli("batch", "list")
    assert listed.exit_code == 0, listed.output
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert rows[0][:4] == [BATCH[:12], "sweep", "10", "50%"]
    assert rows[1][:5] == ["f" * 12, "-", "10", "100%", "no"]

    cancelled = ndif_cli("batch", "cancel", BATCH)
    assert (
        cancelled.stdout.strip()
        == f"batch {BATCH}: cancelled its unfinished jobs; now COMPLETED 4  ERROR 1  CANCELLED 5"
    )


def test_batch_results_summarises_items_and_writes_one_file_per_finished_item(service, tmp_path):
    tensor_only = encoded_result({"logits": torch.randn(1, 5)})
    mixed = encoded_result({"top": torch.tensor([3, 1]), "word": "Paris"})
    service.route("GET", "/blobs/results/j0", httpx.Response(200, content=tensor_only))
    service.route("GET", "/blobs/results/j3", httpx.Response(200, content=mixed))
    items = [
        {"index": 0, "job_id": "j0" * 8, "status": "COMPLETED", "url": f"{STORE}/blobs/results/j0", "bytes": 300},
        {"index": 1, "job_id": "j1" * 8, "status": "ERROR", "error": USER_ERROR},
        {"index": 2, "job_id": "j2" * 8, "status": "RUNNING"},
        {"index": 3, "job_id": "j3" * 8, "status": "COMPLETED", "url": f"{STORE}/blobs/results/j3", "bytes": 200},
    ]
    service.json(
        "GET", f"/v1/batches/{BATCH}/results", {"id": BATCH, "items": items, "expires_at": "2025-03-01T13:00:00Z"}
    )

    summary = ndif_cli("batch", "results", BATCH)
    assert summary.exit_code == 0, summary.output
    rows = [line.split() for line in summary.stdout.splitlines()[1:5]]
    assert rows[0] == ["0", "j0" * 6, "COMPLETED", "300", "B"]
    assert rows[1][:3] == ["1", "j1" * 6, "ERROR"] and "ValueError: the steering vector" in summary.stdout
    assert rows[2] == ["2", "j2" * 6, "RUNNING", "-"]
    assert "2 with results, 1 ended without one, 1 not ended" in summary.stdout
    assert not service.sent("GET", "/blobs/results/j0")  # no downloads without --out

    out = tmp_path / "sweep"
    written = ndif_cli("batch", "results", BATCH, "--out", str(out))
    assert written.exit_code == 0, written.output
    assert sorted(p.name for p in out.iterdir()) == ["item-0000.safetensors", "item-0003.pt"]
    assert set(load_file(out / "item-0000.safetensors")) == {"logits"}
    assert torch.load(out / "item-0003.pt")["word"] == "Paris"
    assert "item-0003.pt: top, word" in written.stdout and "wrote 2 files" in written.stdout


# -- models, keys ------------------------------------------------------------------------


def test_models_prints_deployments(service):
    models = [
        {
            "key": "tiny-llama",
            "backend": "transformers",
            "aliases": ["llama"],
            "state": "degraded",
            "replicas": 2,
            "replicas_ready": 1,
            "queued": 3,
            "running": 1,
            "updated_at": None,
        }
    ]
    service.json("GET", "/v1/models", models)
    result = ndif_cli("models")
    assert result.exit_code == 0, result.output
    header, row = result.stdout.splitlines()
    assert header.split() == ["MODEL", "BACKEND", "STATE", "REPLICAS", "QUEUED", "RUNNING", "ALIASES"]
    assert row.split() == ["tiny-llama", "transformers", "degraded", "1/2", "3", "1", "llama"]
    assert [json.loads(line)["key"] for line in ndif_cli("models", "--json").stdout.splitlines()] == ["tiny-llama"]


def test_keys_create_posts_to_the_admin_api_and_prints_the_secret_once(service):
    created = {"id": "k1", "name": "alice", "key": "ndif_s3cret", "admin": False}
    service.json("POST", "/v1/keys", created, status=201)

    result = ndif_cli("keys", "create", "alice", "--quota-running", "2", "--quota-result-bytes", "1000")

    assert result.exit_code == 0, result.output
    assert result.stdout == "ndif_s3cret\n"
    assert "export NDIF_API_KEY=ndif_s3cret" in result.stderr
    (request,) = service.sent("POST", "/v1/keys")
    assert json.loads(request.content) == {
        "name": "alice",
        "admin": False,
        "quota_running": 2,
        "quota_result_bytes": 1000,
    }
    assert request.headers["Authorization"] == "Bearer ndif_user"


def test_options_override_the_configured_url_and_key(monkeypatch):
    fake = FakeService()
    fake.json("GET", "/v1/models", [])
    monkeypatch.setattr(commands, "Client", lambda url, key: mock_client(fake, url, key))
    monkeypatch.setenv("NDIF_API_URL", "http://elsewhere.test")

    result = ndif_cli("models", "--api-url", "http://override.test:9000", "--api-key", "ndif_admin")

    assert result.exit_code == 0, result.output
    assert "no models are deployed" in result.stdout
    (request,) = fake.requests
    assert str(request.url) == "http://override.test:9000/v1/models"
    assert request.headers["Authorization"] == "Bearer ndif_admin"


# -- errors ------------------------------------------------------------------------------


def test_a_rejected_key_is_one_red_line_and_exit_1(service):
    service.json("GET", "/v1/jobs", {"detail": "this API key is not valid (unknown or revoked)"}, status=401)
    result = ndif_cli("jobs", "list")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == "error: this API key is not valid (unknown or revoked) (HTTP 401)\n"


def test_no_key_hints_at_the_local_stacks_config(monkeypatch, tmp_path):
    fake = FakeService()
    fake.json("GET", "/v1/models", {"detail": "no API key"}, status=401)
    monkeypatch.setattr(sdk_jobs, "_client", mock_client(fake, api_key=None))
    config = tmp_path / "state" / "client.toml"
    config.parent.mkdir()
    config.write_text('api_url = "http://127.0.0.1:8289"\n')
    result = ndif_cli("models")
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: no API key (HTTP 401); the local stack's key is in {config}: export NDIF_CLIENT_CONFIG={config}\n"
    )


def test_a_quota_refusal_is_one_red_line_with_the_retry_time(service):
    detail = "this key has 8 jobs running (quota 8)"
    service.route(
        "DELETE", f"/v1/batches/{BATCH}", httpx.Response(429, json={"detail": detail}, headers={"Retry-After": "7"})
    )
    result = ndif_cli("batch", "cancel", BATCH)
    assert result.exit_code == 1
    assert result.stderr == f"error: {detail} (HTTP 429); try again in 7 s\n"
    assert "Traceback" not in result.output


def test_an_unknown_job_is_one_line(service):
    result = ndif_cli("jobs", "status", "nope")
    assert result.exit_code == 1
    assert result.stderr == "error: no route GET /v1/jobs/nope (HTTP 404)\n"


def test_an_unreachable_service_is_one_line(monkeypatch):
    fake = FakeService()
    fake.route("GET", "/v1/models", httpx.ConnectError("connection refused"))
    fake.route("GET", "/v1/batches", httpx.ReadTimeout("timed out"))
    monkeypatch.setattr(sdk_jobs, "_client", mock_client(fake, api_url="http://127.0.0.1:8289"))

    refused = ndif_cli("models")
    assert refused.exit_code == 1
    assert refused.stderr == (
        "error: cannot reach the ndif service at http://127.0.0.1:8289 (connection refused); is it up? "
        "(start one on this machine with: ndif up)\n"
    )
    slow = ndif_cli("batch", "list")
    assert slow.exit_code == 1
    assert slow.stderr == (
        "error: cannot reach the ndif service at http://127.0.0.1:8289 (timed out); is it up? (start one on this machine with: ndif up)\n"
    )


# -- ndif up -----------------------------------------------------------------------------


def test_up_refuses_clearly_when_the_service_is_not_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ndif_scheduler" else real(name, *a)
    )
    monkeypatch.setattr(launcher, "run_forwarding", lambda command: pytest.fail("must not start anything"))

    result = ndif_cli("up")

    assert result.exit_code == 1
    assert result.stderr == (
        "error: the service is not installed: pip install ndif-scheduler ndif-workers (make install does)\n"
    )


@pytest.fixture
def launched(monkeypatch) -> list[list[str]]:
    """``ndif up``'s child commands, not run (exit status 3); the service counts as installed."""
    commands_run: list[list[str]] = []
    monkeypatch.setattr(launcher, "missing_service", lambda: [])
    monkeypatch.setattr(launcher, "run_forwarding", lambda command: commands_run.append(command) or 3)
    return commands_run


def test_up_with_no_registry_serves_a_tiny_llama_built_once(launched, monkeypatch, tmp_path):
    built: list[Path] = []

    def fake_make_tiny(path, arch):
        built.append(Path(path))
        path.mkdir(parents=True)
        for name in launcher.TINY_FILES:
            (path / name).write_text("{}")
        return path

    monkeypatch.setattr(ndif, "make_tiny", fake_make_tiny)
    state = tmp_path / "state"

    result = ndif_cli("up", "--port", "8300")
    again = ndif_cli("up", "--port", "8300")

    assert (result.exit_code, again.exit_code) == (3, 3), result.output
    model = state / "models" / "tiny-llama"
    assert built == [model]  # the second start reuses it
    registry = state / "registry.toml"
    command = [sys.executable, "-m", "ndif_scheduler", "up", "--port", "8300", "--state-dir", str(state)]
    assert launched == [[*command, "--registry", str(registry)]] * 2
    assert f"export NDIF_CLIENT_CONFIG={state / 'client.toml'}" in result.stderr
    scheduler_registry = pytest.importorskip("ndif_scheduler.registry")
    (deployment,) = scheduler_registry.load_registry(registry).deployments
    assert (deployment.key, deployment.backend, deployment.path) == ("tiny-llama", "transformers", str(model))


def test_up_passes_a_registry_and_state_dir_through_and_builds_nothing(launched, monkeypatch, tmp_path):
    monkeypatch.setattr(ndif, "make_tiny", lambda *a, **k: pytest.fail("must not build a model"))
    registry = tmp_path / "models.toml"
    registry.write_text("")

    result = ndif_cli("up", "--registry", str(registry), "--state-dir", str(tmp_path / "s"))
    monkeypatch.setenv("NDIF_REGISTRY", str(registry))
    from_env = ndif_cli("up")

    assert (result.exit_code, from_env.exit_code) == (3, 3), result.output
    assert launched[0] == [
        *[sys.executable, "-m", "ndif_scheduler", "up", "--port", "8289", "--state-dir", str(tmp_path / "s")],
        *["--registry", str(registry)],
    ]
    assert launched[1] == [
        sys.executable,
        "-m",
        "ndif_scheduler",
        "up",
        "--port",
        "8289",
        "--state-dir",
        str(tmp_path / "state"),
    ]


CHILD = """
import os, signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, lambda *_: sys.exit(3))
Path(sys.argv[1]).write_text(str(os.getpgrp()))
time.sleep(30)
sys.exit(0)
"""


def test_run_forwarding_passes_ctrl_c_to_the_child_and_returns_its_status(tmp_path):
    ready = tmp_path / "ready"

    def interrupt() -> None:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C at the terminal would, to ndif up only

    sender = threading.Thread(target=interrupt)
    sender.start()
    started = time.monotonic()
    code = launcher.run_forwarding([sys.executable, "-c", CHILD, str(ready)])
    sender.join()

    assert code == 3
    assert time.monotonic() - started < 25
    assert int(ready.read_text()) != os.getpgrp()  # its own group: a terminal's Ctrl-C reaches it once, through us
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_run_forwarding_reports_a_child_killed_by_a_signal_as_128_plus_it():
    code = launcher.run_forwarding([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"])
    assert code == 128 + signal.SIGTERM


# -- chat --------------------------------------------------------------------------------


def sse(*chunks: dict) -> httpx.Response:
    body = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
    return httpx.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})


def token_chunk(index: int, text: str, mood: float) -> dict:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        "ndif": {"index": index, "token": 100 + index, "observations": {"mood": mood}},
    }


def test_chat_streams_a_steered_reply_with_the_probe_per_token(service):
    role = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}
    done = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
    service.route(
        "POST", "/v1/chat/completions", sse(role, token_chunk(0, "Sunny", 0.9), token_chunk(1, " day", 0.25), done)
    )
    result = ndif_cli("chat", "tiny-llama", "How was your day?", "--steer", "joy=6", "-s", "calm", "--probe", "mood")
    assert result.exit_code == 0, result.output
    assert "Sunny day" in result.output and "mood: 0.90 0.25" in result.output
    body = json.loads(service.sent("POST", "/v1/chat/completions")[0].content)
    assert body["stream"] is True and body["messages"] == [{"role": "user", "content": "How was your day?"}]
    assert body["ndif"]["steer"] == [{"vector": "joy", "scale": 6.0}, {"vector": "calm", "scale": 1.0}]
    assert body["ndif"]["observe"] == {"probes": [{"probe": "mood"}]}
    lines = ndif_cli("chat", "tiny-llama", "Hi", "--json").output.splitlines()
    assert [json.loads(line)["token"] for line in lines] == [100, 101]


def test_chat_errors_are_one_line(service):
    error = {"error": {"message": "ChatError: no artifact named 'gloom'", "type": "invalid_request_error"}}
    service.json("POST", "/v1/chat/completions", error, status=400)
    result = ndif_cli("chat", "tiny-llama", "Hi", "--steer", "gloom")
    assert result.exit_code == 1 and "no artifact named 'gloom'" in result.output
    result = ndif_cli("chat", "tiny-llama", "Hi", "--steer", "joy=lots")
    assert result.exit_code == 1 and "NAME=SCALE" in result.output
