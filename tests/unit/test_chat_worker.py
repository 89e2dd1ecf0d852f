"""A chat completion on a model worker: the real `ModelActor` (called directly, not through
Ray) with its local object store, on the transformers backend and on the vLLM backend's
stand-in. Steering through the chat request equals the same intervention written with the
tracing API; tokens stream out one chunk each; bad requests end in a clear error."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import torch
from chat_artifacts import write_artifacts
from fake_vllm import FakeRanksVLLM, FakeVLLM

import ndif
from ndif import interp
from ndif_scheduler.config import Settings
from ndif_scheduler.storage import CHAT_PREFIX, request_key, result_key
from ndif_workers import actor as actor_module
from ndif_workers.chat import chat_prompt

HIDDEN = 64


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return write_artifacts(tmp_path_factory.mktemp("artifacts"))


def make_actor(tmp_path, monkeypatch, model, artifacts):
    monkeypatch.setattr(actor_module, "load_model", lambda deployment: model)
    deployment = {"key": "tiny", "path": "tiny", "max_concurrency": 4, "artifacts": str(artifacts)}
    settings = Settings(state_dir=tmp_path, job_time_s=60.0).model_dump(mode="json")
    return actor_module.ModelActor(deployment, settings)


def chat(actor, **fields):
    payload = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 6}
    payload.update(fields)
    job_id = uuid.uuid4().hex
    actor.store.put(request_key(job_id), CHAT_PREFIX + json.dumps(payload).encode())
    outcome = actor.run(job_id)
    result = json.loads(actor.store.get(result_key(job_id))) if outcome["status"] == "completed" else None
    return outcome, result, actor.chunks(job_id)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return ndif.LanguageModel(str(ndif.make_tiny(tmp_path_factory.mktemp("tiny"), layers=3, hidden=HIDDEN)))


def test_a_steered_reply_equals_the_same_steering_in_a_trace(tmp_path, monkeypatch, llama, artifacts):
    actor = make_actor(tmp_path, monkeypatch, llama, artifacts)
    steer = {"steer": [{"vector": "joy", "scale": 2.0}], "observe": {"probes": [{"probe": "mood"}], "norms": [1]}}
    outcome, steered, chunks = chat(actor, temperature=0, ndif=steer)
    assert outcome["status"] == "completed", outcome
    _, plain, _ = chat(actor, temperature=0)
    assert steered["tokens"] != plain["tokens"]  # the vector changed the reply

    # The same intervention with the tracing API.
    vector = interp.load_vector(artifacts / "joy.safetensors")
    probe = interp.load_probe(artifacts / "mood.safetensors")
    prompt = chat_prompt(llama.tokenizer, [{"role": "user", "content": "Tell me a story"}])
    with llama.generate(prompt, max_new_tokens=6, do_sample=False) as tracer:
        scores = ndif.save([])
        for step in tracer.iter[:6]:
            llama.model.layers[1].output[:] += 2.0 * vector.vector
            scores.append(probe(llama.model.layers[2].output[0])[-1])
        tokens = tracer.result.save()
    expected = tokens[0, len(prompt) :].tolist()
    assert steered["tokens"] == expected
    assert [chunk["token"] for chunk in chunks] == expected  # one chunk per token, as sampled
    assert "".join(chunk["text"] for chunk in chunks) == steered["text"]
    for chunk, score in zip(chunks, scores):
        assert chunk["observations"]["mood"] == pytest.approx(float(score), rel=1e-5)
        assert isinstance(chunk["observations"]["norm:1"], float)
    assert len(steered["prompt_observations"]["mood"]) == len(prompt) == len(steered["prompt_tokens"])
    first = chunks[0]["prompt"]  # the stream says what the model read, with its first token
    assert first["tokens"] == steered["prompt_tokens"] and first["observations"] == steered["prompt_observations"]
    assert all("prompt" not in chunk for chunk in chunks[1:])
    assert steered["usage"]["completion_tokens"] == len(expected)


def test_feature_edits_and_the_logit_lens(tmp_path, monkeypatch, llama, artifacts):
    actor = make_actor(tmp_path, monkeypatch, llama, artifacts)
    options = {
        "features": [{"sae": "res-2", "clamp": {"3": 8.0}}],
        "observe": {"features": [{"sae": "res-2", "features": [3, 4]}], "logit_lens": {"layer": 2, "k": 3}},
    }
    outcome, edited, chunks = chat(actor, temperature=0, ndif=options)
    assert outcome["status"] == "completed", outcome
    # The same edit with the tracing API: the features are read after the edit, from the
    # edited stream (re-encoded; an SAE's decoder is not its encoder's inverse).
    sae = interp.load_sae(artifacts / "res-2.safetensors")
    prompt = chat_prompt(llama.tokenizer, [{"role": "user", "content": "Tell me a story"}])
    with llama.generate(prompt, max_new_tokens=6, do_sample=False) as tracer:
        read = ndif.save([])
        for step in tracer.iter[:6]:
            stream = llama.model.layers[2].output[0]
            stream[:] = sae.edit(stream, clamp={3: 8.0})[0]
            read.append(sae.encode(stream)[-1, [3, 4]])
        tokens = tracer.result.save()
    assert edited["tokens"] == tokens[0, len(prompt) :].tolist()
    for chunk, features in zip(chunks, read):
        assert chunk["observations"]["res-2:features"] == pytest.approx(features.tolist(), rel=1e-4, abs=1e-5)
        lens = chunk["observations"]["logit_lens"]
        assert len(lens) == 3 and lens[0]["p"] >= lens[1]["p"] >= lens[2]["p"]
        assert lens[0]["token"] == llama.tokenizer.decode([lens[0]["id"]])
    _, plain, _ = chat(actor, temperature=0)
    assert edited["tokens"] != plain["tokens"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"steer": [{"vector": "nope"}]}, "no artifact named 'nope'"),
        ({"steer": [{"vector": "mood"}]}, "is a LinearProbe, not a SteeringVector"),
        ({"steer": [{"vector": "joy", "layers": [7]}]}, "layer 7 is out of range"),
        ({"steer": [{"vector": [1.0, 2.0], "layers": [0]}]}, "has 2 dimensions; this model's residual stream has 64"),
        ({"features": [{"sae": "res-2", "clamp": {"99": 1.0}}]}, "feature 99 is not one of"),
        ({"steer": [{"vector": "../../etc/passwd"}]}, "no artifact named"),
    ],
)
def test_bad_requests_end_with_a_clear_error_and_the_worker_stays_healthy(
    tmp_path, monkeypatch, llama, artifacts, options, message
):
    actor = make_actor(tmp_path, monkeypatch, llama, artifacts)
    outcome, result, _ = chat(actor, ndif=options)
    assert outcome["status"] == "error" and result is None
    assert message in outcome["error"]["message"], outcome
    assert actor.health()["in_flight"] == 0
    assert chat(actor, temperature=0)[0]["status"] == "completed"


def test_a_cancelled_chat_ends_cancelled(tmp_path, monkeypatch, llama, artifacts):
    actor = make_actor(tmp_path, monkeypatch, llama, artifacts)
    original = actor_module.run_chat

    def cancel_then_run(model, payload, shelf, emit, token, time_s):
        token.cancel()
        return original(model, payload, shelf, emit, token, time_s)

    monkeypatch.setattr(actor_module, "run_chat", cancel_then_run)
    outcome, _, chunks = chat(actor)
    assert outcome["status"] == "cancelled" and chunks == []


class Tokens:
    """The toy engine has no tokenizer: a stand-in that spells token ids."""

    eos_token_id = None
    chat_template = None

    def __call__(self, text):
        return type("Encoded", (), {"input_ids": [ord(c) % 60 + 1 for c in text][-8:]})()

    def decode(self, ids, skip_special_tokens=False):
        return "".join(f"<{i}>" for i in ids)


def test_chat_on_the_vllm_backend_runs_on_taps(tmp_path, monkeypatch, artifacts):
    model = FakeVLLM()
    folder = tmp_path / "toy-artifacts"
    folder.mkdir()
    interp.save_vector(interp.SteeringVector(torch.linspace(-1, 1, 16), layer=1), folder / "tilt.safetensors")

    object.__setattr__(model, "tokenizer", Tokens())
    actor = make_actor(tmp_path, monkeypatch, model, folder)
    before = dict(model.step_counts)
    outcome, steered, chunks = chat(
        actor, temperature=0, ndif={"steer": [{"vector": "tilt", "scale": 3.0}], "observe": {"norms": [2]}}
    )
    assert outcome["status"] == "completed", outcome
    assert [chunk["token"] for chunk in chunks] == steered["tokens"] and len(chunks) == 6
    assert model.step_counts["taps"] - before["taps"] == 6 and model.step_counts["eager"] == before["eager"]
    _, plain, _ = chat(actor, temperature=0)
    assert plain["tokens"] != steered["tokens"]


def test_chat_on_a_tensor_parallel_engine_streams_at_the_end_and_equals_one_engine(tmp_path, monkeypatch):
    folder = tmp_path / "toy-artifacts"
    folder.mkdir()
    interp.save_vector(interp.SteeringVector(torch.linspace(-1, 1, 16), layer=1), folder / "tilt.safetensors")
    results = []
    for model in (FakeRanksVLLM(), FakeVLLM()):
        object.__setattr__(model, "tokenizer", Tokens())
        actor = make_actor(tmp_path / type(model).__name__, monkeypatch, model, folder)
        options = {"steer": [{"vector": "tilt", "scale": 3.0}], "observe": {"norms": [2]}}
        outcome, result, chunks = chat(actor, temperature=0, ndif=options)
        assert outcome["status"] == "completed", outcome
        assert [chunk["token"] for chunk in chunks] == result["tokens"]
        results.append(result)
    on_ranks, here = results
    assert on_ranks["tokens"] == here["tokens"]
    for a, b in zip(on_ranks["steps"], here["steps"]):
        assert a["observations"]["norm:2"] == pytest.approx(b["observations"]["norm:2"], rel=1e-5)


def test_a_chat_on_a_tensor_parallel_engine_is_checked_first_and_ends_on_its_ranks_when_cancelled(
    tmp_path, monkeypatch
):
    folder = tmp_path / "toy-artifacts"
    folder.mkdir()
    model = FakeRanksVLLM()
    object.__setattr__(model, "tokenizer", Tokens())
    actor = make_actor(tmp_path, monkeypatch, model, folder)
    steps = model.engine.steps
    outcome, _, _ = chat(actor, ndif={"steer": [{"vector": [1.0, 2.0], "layers": [0]}]})
    assert outcome["status"] == "error" and "this model's residual stream has 16" in outcome["error"]["message"]
    assert model.engine.steps == steps  # refused before the ranks ran anything

    original = actor_module.run_chat

    helpers = []

    def cancelled_while_running(model_, payload, shelf, emit, token, time_s):
        model.hold()  # the engine takes no step until the chat is cancelled

        def cancel_then_release():
            time.sleep(0.3)
            token.cancel()
            time.sleep(0.3)
            model.release()

        helpers.append(threading.Thread(target=cancel_then_release))
        helpers[-1].start()
        return original(model_, payload, shelf, emit, token, time_s)

    monkeypatch.setattr(actor_module, "run_chat", cancelled_while_running)
    outcome, _, chunks = chat(actor, max_tokens=40)
    helpers[0].join()
    assert outcome["status"] == "cancelled" and chunks == [], outcome
    assert model.engine.steps - steps < 40  # its requests were ended on the ranks, not run to the end
    assert not model.worker.ndif.jobs  # nothing of it is left there
    monkeypatch.setattr(actor_module, "run_chat", original)
    after = chat(actor, temperature=0)[0]
    assert after["status"] == "completed", after


class Pieces:
    """A tokenizer stand-in whose tokens are given strings."""

    def __init__(self, pieces: dict[int, str]) -> None:
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.pieces[i] for i in ids)


def test_stop_sequences_cut_the_text_and_are_never_streamed_in_part():
    from ndif_workers.chat import _Text

    text = _Text(Pieces({1: "Hel", 2: "lo", 3: "\n", 4: "\n", 5: "World", 6: "!"}), ["\n\n", "XYZ"])
    assert [text.add(token) for token in (1, 2, 3)] == ["Hel", "lo", ""]  # "\n" held: it may begin "\n\n"
    assert not text.stopped
    assert text.add(4) == "" and text.stopped and text.shown == "Hello"
    assert text.add(5) == ""  # nothing after the stop
    assert text.cut("Hello\n\nWorld") == "Hello"
    held = _Text(Pieces({1: "Hi", 2: "\n", 3: "there"}), ["\n\n"])
    assert [held.add(token) for token in (1, 2, 3)] == ["Hi", "", "\nthere"]  # released when it was not a stop
    tail = _Text(Pieces({1: "Hi", 2: "X"}), ["XYZ"])
    assert [tail.add(1), tail.add(2)] == ["Hi", ""] and tail.flush() == "X"  # released at the end


def test_a_chat_ends_at_a_stop_sequence(tmp_path, monkeypatch, llama, artifacts):
    actor = make_actor(tmp_path, monkeypatch, llama, artifacts)
    _, plain, chunks = chat(actor, temperature=0, max_tokens=8)
    pieces = [chunk["text"] for chunk in chunks]
    cut = next(k for k in range(1, len(pieces)) if pieces[k].strip() and pieces[k] not in "".join(pieces[:k]))
    outcome, stopped, streamed = chat(actor, temperature=0, max_tokens=8, stop=[pieces[cut]])
    assert outcome["status"] == "completed", outcome
    assert stopped["text"] == "".join(pieces[:cut]) and stopped["finish_reason"] == "stop"
    assert stopped["tokens"] == plain["tokens"][: cut + 1]  # generation ended at the stop's token
    assert "".join(chunk["text"] for chunk in streamed) == stopped["text"]


def test_a_chat_on_the_vllm_backend_ends_at_a_stop_sequence(tmp_path, monkeypatch):
    model = FakeVLLM()
    object.__setattr__(model, "tokenizer", Tokens())
    actor = make_actor(tmp_path, monkeypatch, model, tmp_path)
    _, plain, _ = chat(actor, temperature=0, max_tokens=6)
    tokens = plain["tokens"]
    cut = next(k for k in range(1, len(tokens)) if tokens[k] not in tokens[:k])
    outcome, stopped, chunks = chat(actor, temperature=0, max_tokens=6, stop=[f"<{tokens[cut]}>"])
    assert outcome["status"] == "completed", outcome
    assert stopped["tokens"] == tokens[: cut + 1] and stopped["finish_reason"] == "stop"
    assert stopped["text"] == "".join(f"<{token}>" for token in tokens[:cut])
    assert [chunk["token"] for chunk in chunks] == tokens[: cut + 1]
    assert not model._hooks.run.jobs  # the stopped job left the engine


def test_a_preempted_job_is_handed_back_for_a_retry(tmp_path, monkeypatch, llama, artifacts):
    from ndif.engine.serving import Preempted
    from ndif.wire.schema import ErrorInfo, Result

    actor = make_actor(tmp_path, monkeypatch, llama, artifacts)

    def preempted(*args, **kwargs):
        raise Preempted("the engine preempted this job's request to free memory")

    monkeypatch.setattr(actor_module, "run_chat", preempted)
    outcome, _, _ = chat(actor)
    assert (outcome["status"], outcome["reason"]) == ("error", "infrastructure")  # the dispatcher retries it
    failed = Result(saved={}, logs=[], error=ErrorInfo(type="Preempted", message="preempted", frames=[]))
    monkeypatch.setattr(actor_module, "run_request", lambda *args, **kwargs: failed)
    actor.store.put(request_key("trace"), _a_trace_request())
    assert actor.run("trace")["reason"] == "infrastructure"


def _a_trace_request() -> bytes:
    from ndif.wire import codec
    from ndif.wire.schema import ClientInfo, Request, Source

    client = ClientInfo(library="ndif", version="0", python="3.11.7")
    body = Source(text="pass\n", filename="<t>", first_line=1)
    return codec.encode_request(Request(client=client, model="tiny", kind="trace", body=body))


def test_an_artifacts_own_layer_must_fit_the_model(tmp_path, monkeypatch, llama):
    folder = tmp_path / "wide"
    folder.mkdir()
    interp.save_probe(interp.LinearProbe(torch.ones(HIDDEN), layer=9), folder / "deep.safetensors")
    actor = make_actor(tmp_path, monkeypatch, llama, folder)
    outcome, _, _ = chat(actor, ndif={"observe": {"probes": [{"probe": "deep"}]}})
    assert outcome["status"] == "error" and "layer 9 is out of range" in outcome["error"]["message"]


def test_concurrent_chats_share_the_vllm_engines_steps_and_each_sees_only_its_steering(tmp_path, monkeypatch):
    """The CPU counterpart of tests/gpu/test_vllm_chat.py: users' chats in one engine's batches."""
    import threading

    model = FakeVLLM()
    object.__setattr__(model, "tokenizer", Tokens())
    folder = tmp_path / "toy-artifacts"
    folder.mkdir()
    interp.save_vector(interp.SteeringVector(torch.linspace(-1, 1, 16), layer=1), folder / "tilt.safetensors")
    actor = make_actor(tmp_path, monkeypatch, model, folder)
    scales = [0.0, 2.0, -2.0, 4.0]

    def ask(scale):
        return chat(actor, temperature=0, max_tokens=6, ndif={"steer": [{"vector": "tilt", "scale": scale}]})

    alone = [ask(scale) for scale in scales]
    steps = model.engine.steps
    together: list = [None] * len(scales)
    model.hold()  # all four are queued before the engine takes a step

    def user(n):
        together[n] = ask(scales[n])

    threads = [threading.Thread(target=user, args=(n,)) for n in range(len(scales))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(model.engine.waiting) < len(scales) and time.monotonic() < deadline:
        time.sleep(0.005)
    model.release()
    for thread in threads:
        thread.join(60)
    assert model.engine.steps - steps == 6  # four users' chats, the steps of one
    for (_, mine, _), (outcome, theirs, chunks) in zip(alone, together):
        assert outcome["status"] == "completed"
        assert theirs["tokens"] == mine["tokens"] and [c["token"] for c in chunks] == mine["tokens"]
    assert len({tuple(r[1]["tokens"]) for r in alone}) > 1  # the scales did steer
