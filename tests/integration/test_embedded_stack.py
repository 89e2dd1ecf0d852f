"""The embedded stack (`ndif up`): SQLite, a local-files broker, a local object store, local Ray."""

from __future__ import annotations

import time

import httpx
import torch

import ndif_sdk

PROMPT = "The Eiffel Tower is in"


def test_embedded_stack_runs_traces_jobs_and_batches(embedded_stack, llama):
    stack = embedded_stack.stack
    assert stack.settings().database.startswith("sqlite")
    assert stack.settings().broker == "filesystem://"
    client = embedded_stack.client()
    remote = embedded_stack.remote(client)

    with llama.trace(PROMPT, remote=remote):
        hidden = llama.model.layers[3].output.save()
        logits = llama.lm_head.output.save()
    with llama.trace(PROMPT):
        hidden_local = llama.model.layers[3].output.save()
        logits_local = llama.lm_head.output.save()
    assert torch.equal(hidden, hidden_local) and torch.equal(logits, logits_local)

    with llama.trace(PROMPT, remote=remote, blocking=False) as tracer:
        top = llama.lm_head.output[0, -1].argmax().save()
    assert tracer.job.wait(60) == "COMPLETED"
    assert int(tracer.job.result()["top"]) == int(logits_local[0, -1].argmax())
    link = client.result_link(tracer.job.id)
    assert link["url"].startswith(f"{stack.url}/v1/blobs/results/")
    assert httpx.get(link["url"]).status_code == 200
    assert httpx.get(link["url"].replace("signature=", "signature=0")).status_code == 403

    with ndif_sdk.Batch("embedded", client=client) as batch:
        for word in ("one", "two", "three", "four", "five"):
            with llama.trace(f"{word} {word}", remote=batch):
                top = llama.lm_head.output[0, -1].argmax().save()
    assert batch.wait(timeout=120, progress=False) == {"COMPLETED": 5}
    assert all(isinstance(item["top"], torch.Tensor) for item in batch.results())

    deadline = time.monotonic() + 30
    while True:  # the periodic task reports the replica's health
        (model,) = client.models()
        if model["state"] == "ready" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert model["key"] == "tiny-llama" and model["state"] == "ready" and model["replicas_ready"] == 1
