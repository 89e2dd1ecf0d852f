"""The remote execution service end to end, on PostgreSQL, Redis, SeaweedFS and Ray."""

from __future__ import annotations

import time
from datetime import datetime

import httpx
import pytest
import torch

import ndif
import ndif_sdk
from ndif_sdk.errors import QuotaExceeded

PROMPT = "The Eiffel Tower is in"


def wait_status(job: ndif_sdk.Job, statuses: set[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job.status()
        if status in statuses:
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job.id} stayed {job.info['status']}, expected one of {statuses}")


def spin(model, remote):
    """Submit a job that runs until it is cancelled or hits the time limit."""
    with model.trace("spin", remote=remote, blocking=False) as tracer:
        hidden = model.model.layers[0].output
        total = 0
        while True:
            total = total + 1
    return tracer.job


def test_remote_trace_equals_local_bitwise(production_stack, llama):
    client = production_stack.client()
    remote = production_stack.remote(client)
    with llama.trace(PROMPT, remote=remote):
        llama.model.layers[1].mlp.output[:, -1] = 0
        hidden = llama.model.layers[2].output.save()
        logits = llama.lm_head.output.save()
    with llama.trace(PROMPT):
        llama.model.layers[1].mlp.output[:, -1] = 0
        hidden_local = llama.model.layers[2].output.save()
        logits_local = llama.lm_head.output.save()
    assert torch.equal(hidden, hidden_local)
    assert torch.equal(logits, logits_local)


def test_remote_generate_and_session_equal_local(production_stack, llama):
    remote = production_stack.remote(production_stack.client())
    steer = torch.randn(llama.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with llama.generate(PROMPT, max_new_tokens=4, do_sample=False, remote=remote) as tracer:
        for _ in tracer.all():
            llama.model.layers[1].output[:] += steer
        tokens = tracer.result.save()
    with llama.generate(PROMPT, max_new_tokens=4, do_sample=False) as tracer:
        for _ in tracer.all():
            llama.model.layers[1].output[:] += steer
        tokens_local = tracer.result.save()
    assert torch.equal(tokens, tokens_local)

    with llama.session(remote=remote):
        with llama.trace("The Colosseum is in"):
            source = llama.model.layers[1].output[:, -1]
        with llama.trace(PROMPT):
            llama.model.layers[1].output[:, -1] = source
            patched = llama.lm_head.output[:, -1].save()
    with llama.session():
        with llama.trace("The Colosseum is in"):
            source = llama.model.layers[1].output[:, -1]
        with llama.trace(PROMPT):
            llama.model.layers[1].output[:, -1] = source
            patched_local = llama.lm_head.output[:, -1].save()
    assert torch.equal(patched, patched_local)


def test_remote_true_uses_the_configured_service(production_stack, llama, monkeypatch):
    key = production_stack.key("env-user")
    monkeypatch.setenv("NDIF_API_URL", production_stack.url)
    monkeypatch.setenv("NDIF_API_KEY", key)
    monkeypatch.setattr(ndif_sdk.jobs, "_client", None)
    with llama.trace(PROMPT, remote=True) as tracer:
        logits = llama.lm_head.output.save()
    with llama.trace(PROMPT):
        local = llama.lm_head.output.save()
    assert torch.equal(logits, local)
    assert tracer.job.info["status"] == "COMPLETED"
    # Reattach from "another process": a fresh handle by id.
    again = ndif.jobs.get(tracer.job.id)
    assert again.status() == "COMPLETED"
    assert torch.equal(again.result()["logits"], local)
    monkeypatch.setattr(ndif_sdk.jobs, "_client", None)


def test_non_blocking_submit_then_poll(production_stack, llama):
    client = production_stack.client()
    with llama.trace(PROMPT, remote=production_stack.remote(client), blocking=False) as tracer:
        logits = llama.lm_head.output.save()
    assert "logits" not in locals() or logits is not None  # nothing bound yet: the block was only submitted
    job = tracer.job
    assert len(job.id) == 32 and job.info["status"] in ("QUEUED", "DISPATCHED", "RUNNING", "COMPLETED")
    assert job.wait(timeout=60) == "COMPLETED"
    saved = job.result()
    with llama.trace(PROMPT):
        local = llama.lm_head.output.save()
    assert torch.equal(saved["logits"], local)
    info = client.job(job.id)
    assert [e["to_status"] for e in info["events"]] == [
        "RECEIVED", "QUEUED", "DISPATCHED", "RUNNING", "COMPLETED",
    ]  # fmt: skip
    assert info["attempts"] == 1 and info["result_bytes"] > 0 and info["timings"]["run"] > 0


def test_cancel_while_queued_and_while_running(production_stack, llama):
    client = production_stack.client("canceller", quota_running=1)
    remote = production_stack.remote(client)
    running = spin(llama, remote)
    assert wait_status(running, {"RUNNING"}) == "RUNNING"
    with llama.trace(PROMPT, remote=remote, blocking=False) as tracer:
        out = llama.lm_head.output.save()
    queued = tracer.job
    time.sleep(1.0)  # the quota keeps it waiting behind the running job
    assert queued.status() == "QUEUED"
    assert queued.cancel() == "CANCELLED"
    assert running.cancel() == "RUNNING"  # a running job stops at its next check
    assert wait_status(running, {"CANCELLED", "COMPLETED", "ERROR"}) == "CANCELLED"
    with pytest.raises(ndif.NDIFError, match="cancelled"):
        running.result()
    events = [e["to_status"] for e in client.job(queued.id)["events"]]
    assert events == ["RECEIVED", "QUEUED", "CANCELLED"]


def test_results_come_from_s3_through_a_presigned_url(production_stack, llama):
    client = production_stack.client()
    with llama.trace(PROMPT, remote=production_stack.remote(client), blocking=False) as tracer:
        logits = llama.lm_head.output.save()
    tracer.job.wait(60)
    link = client.result_link(tracer.job.id)
    s3 = production_stack.stack.env["NDIF_S3_ENDPOINT"]
    assert link["url"].startswith(s3) and "X-Amz-Signature=" in link["url"]
    assert httpx.get(link["url"]).status_code == 200
    unsigned = link["url"].split("?")[0]
    assert httpx.get(unsigned).status_code == 403  # the bucket is not public


def test_ownership_isolation_between_two_keys(production_stack, llama):
    alice, bob = production_stack.client("alice"), production_stack.client("bob")
    with llama.trace(PROMPT, remote=production_stack.remote(alice), blocking=False) as tracer:
        logits = llama.lm_head.output.save()
    job_id = tracer.job.id
    tracer.job.wait(60)
    with ndif_sdk.Batch("alice's", client=alice) as batch:
        with llama.trace(PROMPT, remote=batch):
            logits = llama.lm_head.output.save()
    for call in (
        lambda: bob.job(job_id),
        lambda: bob.result_link(job_id),
        lambda: bob.cancel(job_id),
        lambda: bob.batch(batch.id),
        lambda: bob.batch_results(batch.id),
        lambda: bob.cancel_batch(batch.id),
    ):
        with pytest.raises(ndif_sdk.NotFound):
            call()
    assert job_id not in {job["id"] for job in bob.jobs(limit=500)["jobs"]}
    assert job_id in {job["id"] for job in alice.jobs(limit=500)["jobs"]}
    assert alice.job(job_id)["status"] == "COMPLETED"


def test_quota_refusals(production_stack, llama):
    client = production_stack.client("quota", quota_running=1, quota_queued=1)
    remote = production_stack.remote(client)
    running = spin(llama, remote)
    wait_status(running, {"RUNNING"})
    with llama.trace(PROMPT, remote=remote, blocking=False) as tracer:
        out = llama.lm_head.output.save()
    with pytest.raises(QuotaExceeded, match="waiting") as refused:
        with llama.trace(PROMPT, remote=remote, blocking=False):
            out = llama.lm_head.output.save()
    assert refused.value.status == 429 and refused.value.retry_after > 0
    raw = production_stack.http(client.api_key).post("/v1/jobs", content=b"x")
    assert raw.status_code in (400, 429)
    tracer.job.cancel()
    running.cancel()
    wait_status(running, {"CANCELLED"})


def test_batch_of_100_traces_with_per_item_status(production_stack, llama):
    client = production_stack.client("batcher")
    prompts = [f"prompt number {i} is" for i in range(100)]
    with ndif_sdk.Batch("sweep", client=client) as batch:
        for prompt in prompts:
            with llama.trace(prompt, remote=batch) as tracer:
                token = llama.lm_head.output[0, -1].argmax().save()
    assert batch.id and len(batch) == 100
    again = ndif_sdk.Batch.get(batch.id, client=client)  # as after a client restart
    counts = again.wait(timeout=240, progress=False)
    assert counts == {"COMPLETED": 100}
    jobs = again.jobs()
    assert [job.info["batch_index"] for job in jobs] == list(range(100))
    assert {job.info["lane"] for job in jobs} == {"batch"}
    results = again.results()
    expected = []
    for prompt in prompts:
        with llama.trace(prompt):
            token = llama.lm_head.output[0, -1].argmax().save()
        expected.append(int(token))
    assert [int(result["token"]) for result in results] == expected
    listed = client.jobs(batch=batch.id, limit=500)["jobs"]
    assert len(listed) == 100


def test_batch_partial_results_and_cancel_the_rest(production_stack, llama):
    client = production_stack.client("partial", quota_running=1)
    with ndif_sdk.Batch("slow", client=client) as batch:
        for index in range(12):
            with llama.trace("slow", remote=batch):
                total = 0
                for i in range(1_500_000):
                    total = total + 1
                out = ndif.save(total + index)
    deadline = time.monotonic() + 60
    while batch.progress()[0].get("COMPLETED", 0) < 1:
        assert time.monotonic() < deadline, batch.info
        time.sleep(0.2)
    partial = batch.results()
    done = [i for i, value in enumerate(partial) if isinstance(value, dict)]
    assert done and all(partial[i]["out"] == 1_500_000 + i for i in done)
    assert any(value is None for value in partial)
    counts = batch.cancel()
    deadline = time.monotonic() + 60
    while batch.progress()[1] < 1.0:
        assert time.monotonic() < deadline, batch.info
        time.sleep(0.2)
    counts, _ = batch.progress()
    assert counts.get("CANCELLED", 0) >= 1 and sum(counts.values()) == 12
    assert set(counts) <= {"COMPLETED", "CANCELLED"}


def test_malformed_oversized_and_hostile_requests(production_stack, llama):
    client = production_stack.client("hostile")
    remote = production_stack.remote(client)
    http = production_stack.http(client.api_key)
    garbage = http.post(
        "/v1/jobs", content=b"\x00not a request", headers={"Content-Type": "application/x-ndif-request"}
    )
    assert garbage.status_code == 400 and "malformed message" in garbage.json()["detail"]

    big = torch.randn(3 << 20)  # 12 MiB of noise captured (zstd cannot shrink it): over the 8 MiB limit
    with pytest.raises(ndif_sdk.ServiceError) as oversized:
        with llama.trace(PROMPT, remote=remote):
            out = (llama.lm_head.output[0, -1, :1] + big[:1]).save()
    assert oversized.value.status == 413

    with pytest.raises(ndif.NDIFError, match="import") as refused:
        with llama.trace(PROMPT, remote=remote):
            import os

            out = os.getcwd()
    assert refused.value.ndif_error.line.filename == __file__

    with pytest.raises(ndif.sandbox.MemoryLimitExceeded):
        with llama.trace(PROMPT, remote=remote):
            bomb = torch.zeros(10**12)

    with pytest.raises(ndif.sandbox.TimeLimitExceeded):
        with llama.trace(PROMPT, remote=remote):
            while True:
                pass

    with pytest.raises(ZeroDivisionError):
        with llama.trace(PROMPT, remote=remote):
            value = 1 / 0
    failed = client.jobs(status=["ERROR"], limit=10)["jobs"]
    assert {job["error"]["reason"] for job in failed} == {"user", "limit"}

    with llama.trace(PROMPT, remote=remote):  # the worker is healthy after all of that
        logits = llama.lm_head.output.save()
    with llama.trace(PROMPT):
        local = llama.lm_head.output.save()
    assert torch.equal(logits, local)


def test_interactive_traces_are_not_starved_by_a_batch(production_stack, llama):
    client = production_stack.client("busy-researcher", quota_running=50)
    remote = production_stack.remote(client)
    with ndif_sdk.Batch("long sweep", client=client) as batch:
        for index in range(8):
            with llama.trace("slow", remote=batch):
                total = 0
                for i in range(4_000_000):
                    total = total + 1
                out = ndif.save(total + index)
    deadline = time.monotonic() + 60
    while batch.progress()[0].get("RUNNING", 0) < 2:  # the batch lane's slots are full
        assert time.monotonic() < deadline, batch.info
        time.sleep(0.1)
    started = time.monotonic()
    with llama.trace(PROMPT, remote=remote) as tracer:
        logits = llama.lm_head.output.save()
    waited = time.monotonic() - started
    trail = [(e["to_status"], e["at"]) for e in client.job(tracer.job.id)["events"]]
    counts, share = batch.progress()
    assert share < 1.0, f"the interactive trace waited {waited:.1f} s, until the batch had finished: {counts}"
    assert batch.wait(timeout=180, progress=False) == {"COMPLETED": 8}
    shortest = min(job.info["timings"]["run"] for job in batch.jobs())
    # It did not wait for even one batch item to make room: it was running sooner than any
    # batch item could end. (Its own run shares the CPU with the batch, so it is not counted.)
    at = {status: datetime.fromisoformat(when.replace("Z", "+00:00")) for status, when in trail}
    queued = (at["RUNNING"] - at["RECEIVED"]).total_seconds()
    assert queued < shortest, (
        f"queued {queued:.2f} s (all {waited:.2f} s); the shortest batch item ran {shortest:.2f} s; {trail}"
    )
