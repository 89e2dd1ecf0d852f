"""The chat API on the real stack (PostgreSQL, Redis, SeaweedFS, Ray), through the official
``openai`` client: plain and streamed replies, steering that equals the same intervention
through the tracing API, observations per token, clear errors, users kept apart."""

from __future__ import annotations

import json
import threading

import openai
import pytest

from ndif import interp
from ndif_workers.chat import chat_prompt

MESSAGES = [{"role": "user", "content": "Tell me about the sea"}]
STEER = {"steer": [{"vector": "joy", "scale": 4.0}]}
OBSERVE = {"probes": [{"probe": "mood"}], "norms": [2], "logit_lens": {"layer": 2, "k": 3}}


@pytest.fixture(scope="module")
def client(production_stack):
    key = production_stack.key("chatter")
    with openai.OpenAI(base_url=production_stack.url + "/v1", api_key=key, max_retries=0, timeout=120) as client:
        yield client


def ask(client, stream=False, **ndif_options):
    return client.chat.completions.create(
        model="tiny-llama",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        stream=stream,
        extra_body={"ndif": ndif_options} if ndif_options else None,
    )


def test_a_plain_reply(client):
    reply = ask(client)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens == len(reply.ndif["steps"]) <= 8
    assert reply.id.startswith("chatcmpl-")


def test_a_streamed_reply_is_the_same_reply_token_by_token(client):
    whole = ask(client, observe=OBSERVE)
    chunks = list(
        client.chat.completions.create(
            model="tiny-llama",
            messages=MESSAGES,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ndif": {"observe": OBSERVE}},
        )
    )
    tokens = [chunk for chunk in chunks if getattr(chunk, "ndif", None)]
    prompt = tokens[0].ndif["prompt"]  # the first token's chunk also says what the model read
    assert prompt["tokens"] == whole.ndif["prompt_tokens"]
    assert prompt["observations"]["mood"] == pytest.approx(whole.ndif["prompt_observations"]["mood"])
    assert "".join(chunk.choices[0].delta.content for chunk in tokens) == whole.choices[0].message.content
    assert [chunk.ndif["token"] for chunk in tokens] == [step["token"] for step in whole.ndif["steps"]]
    for chunk, step in zip(tokens, whole.ndif["steps"]):
        observed = chunk.ndif["observations"]
        assert observed["mood"] == pytest.approx(step["observations"]["mood"])
        assert 0.0 <= observed["mood"] <= 1.0 and observed["norm:2"] > 0
        assert len(observed["logit_lens"]) == 3
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(tokens)


def test_steering_changes_the_reply_as_the_same_trace_does(client, production_stack, llama):
    plain, steered = ask(client), ask(client, **STEER)
    assert steered.choices[0].message.content != plain.choices[0].message.content
    # The same intervention written with the tracing API, run remotely on the same stack.
    vector = interp.load_vector(production_stack.stack.registry.parent / "artifacts" / "joy.safetensors")
    remote = production_stack.remote(production_stack.client("tracer"))
    prompt = chat_prompt(llama.tokenizer, MESSAGES)
    with llama.generate(prompt, max_new_tokens=8, do_sample=False, remote=remote) as tracer:
        for step in tracer.iter[:8]:
            llama.model.layers[1].output[:] += 4.0 * vector.vector
        tokens = tracer.result.save()
    assert [step["token"] for step in steered.ndif["steps"]] == tokens[0, len(prompt) :].tolist()


def test_bad_requests_get_clear_errors(client, production_stack):
    with pytest.raises(openai.NotFoundError, match="not deployed here"):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="no artifact named 'gloom'"):
        ask(client, steer=[{"vector": "gloom"}])
    with pytest.raises(openai.BadRequestError, match="no artifact named 'gloom'"):
        ask(client, stream=True, steer=[{"vector": "gloom"}])
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model="tiny-llama", messages=MESSAGES, n=2)
    with pytest.raises(openai.BadRequestError, match="layer 9 is out of range"):
        ask(client, observe={"norms": [9]})
    bad = openai.OpenAI(base_url=production_stack.url + "/v1", api_key="ndif_not_a_key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny-llama", messages=MESSAGES)
    assert ask(client).choices[0].message.content  # the worker is fine


def test_concurrent_users_each_see_only_their_own_steering(production_stack):
    scales = [0.0, 4.0, -4.0, 2.0]
    clients = [
        openai.OpenAI(base_url=production_stack.url + "/v1", api_key=production_stack.key(f"user{n}"), max_retries=0)
        for n in range(len(scales))
    ]
    alone = [ask(c, steer=[{"vector": "joy", "scale": s}]).ndif["steps"] for c, s in zip(clients, scales)]
    together: list = [None] * len(scales)

    def run(n):
        together[n] = ask(clients[n], steer=[{"vector": "joy", "scale": scales[n]}]).ndif["steps"]

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(scales))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for mine, theirs in zip(alone, together):
        assert [s["token"] for s in mine] == [s["token"] for s in theirs]
    assert len({tuple(s["token"] for s in steps) for steps in alone}) > 1  # the scales did differ


def test_a_chat_is_a_job_of_its_owner(production_stack, client):
    reply = ask(client)
    job_id = reply.ndif["job_id"]
    owner = production_stack.http(client.api_key)
    assert owner.get(f"/v1/jobs/{job_id}").json()["status"] == "COMPLETED"
    stranger = production_stack.http(production_stack.key("stranger"))
    assert stranger.get(f"/v1/jobs/{job_id}").status_code == 404


def test_the_steering_options_of_a_model(production_stack, client):
    http = production_stack.http(client.api_key)
    info = http.get("/v1/models/tiny-llama/steering").json()
    assert info["layers"] == 4 and info["hidden_size"] == 64
    kinds = {entry["name"]: entry["kind"] for entry in info["artifacts"]}
    assert kinds == {"joy": "steering_vector", "mood": "probe", "res-2": "sae"}
    assert http.get("/playground").text.startswith("<!doctype html>")


def test_the_command_line_chats_with_steering(production_stack, client):
    from typer.testing import CliRunner

    from ndif_sdk.cli import app

    url, key = production_stack.url, client.api_key
    args = ["chat", "tiny-llama", "Tell me about the sea", "--max-tokens", "8", "--api-url", url, "--api-key", key]
    plain = CliRunner().invoke(app, [*args, "--json"])
    steered = CliRunner().invoke(app, [*args, "--json", "--steer", "joy=4", "--probe", "mood"])
    assert plain.exit_code == 0 and steered.exit_code == 0, (plain.output, steered.output)
    tokens = [json.loads(line)["token"] for line in steered.output.splitlines()]
    assert tokens == [step["token"] for step in ask(client, **STEER).ndif["steps"]]
    assert tokens != [json.loads(line)["token"] for line in plain.output.splitlines()]
    assert all("mood" in json.loads(line)["observations"] for line in steered.output.splitlines())
    shown = CliRunner().invoke(app, [*args, "--steer", "joy=4", "--probe", "mood"])
    assert shown.exit_code == 0 and "mood:" in shown.output
    reply = ask(client, **STEER)
    result = CliRunner().invoke(app, ["jobs", "result", reply.ndif["job_id"], "--api-url", url, "--api-key", key])
    assert result.exit_code == 0 and result.output.strip() == reply.choices[0].message.content.strip()


def test_a_stop_sequence_ends_the_reply_without_showing_it(client):
    plain = ask(client)
    pieces = [step["text"] for step in plain.ndif["steps"]]
    cut = next(k for k in range(1, len(pieces)) if pieces[k].strip() and pieces[k] not in "".join(pieces[:k]))
    stop = pieces[cut]
    whole = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=8, temperature=0, stop=stop
    )
    assert whole.choices[0].finish_reason == "stop"
    assert stop not in whole.choices[0].message.content
    assert plain.choices[0].message.content.startswith(whole.choices[0].message.content)
    streamed = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=8, temperature=0, stop=[stop], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == whole.choices[0].message.content
