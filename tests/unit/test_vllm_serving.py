"""The vLLM backend's engine side on CPU: `ndif.VLLM` over a fake engine and runner.

Everything but vLLM itself runs here: the runner mixin and its step planning, the
engine loop, `ServingRun` and `FlatBatcher`. The toy model is position-wise, so a
request's values computed in any mix of requests equal the request computed alone;
the same properties are checked on a real vLLM engine by tests/gpu/test_vllm_backend.py.
"""

from __future__ import annotations

import pytest
import torch
from fake_vllm import MAX_MODEL_LEN, FakeVLLM

import ndif
from ndif.remote import local_backend
from ndif.sandbox import JobLimits

PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9, 3, 2], [2, 7]]


def save_every_step(model, prompt, steps=4, steer=None, fail_at=None):
    """One job: save layer 1's output and the MLP of layer 2 at every step."""
    with model.generate(prompt, max_tokens=steps) as tracer:
        hidden = ndif.save([])
        mlp = ndif.save([])
        for step in tracer.iter[:steps]:
            if steer is not None:
                model.model.layers[1].output[0][:] += steer
            hidden.append(model.model.layers[1].output[0])
            mlp.append(model.model.layers[2].mlp.output)
            if fail_at == step:
                hidden.append(1 / 0)
        tokens = tracer.result.save()
    return hidden, mlp, tokens


def same(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.fixture(scope="module", params=[True, False], ids=["taps", "no-taps"])
def model(request):
    return FakeVLLM(taps=request.param)


def test_each_job_sees_only_its_own_rows_whatever_runs_beside_it(model):
    alone = [save_every_step(model, prompt) for prompt in PROMPTS]
    plain = lambda: model.generate([7, 7, 7], max_tokens=6, trace=False)  # noqa: E731
    together = model.run_together([lambda p=p: save_every_step(model, p) for p in PROMPTS] + [plain])
    assert together[-1] == model.generate([7, 7, 7], max_tokens=6, trace=False)
    for (hidden, mlp, tokens), (hidden_, mlp_, tokens_), prompt in zip(alone, together, PROMPTS):
        assert [h.shape[0] for h in hidden] == [len(prompt), 1, 1, 1]  # the prompt at step 0, then one token
        same(hidden, hidden_)
        same(mlp, mlp_)
        assert tokens == tokens_
    assert model.engine.steps > 0


def test_an_edit_changes_only_the_request_that_made_it(model):
    steer = torch.full((16,), 0.5, dtype=torch.float64)
    steered_alone = save_every_step(model, PROMPTS[0], steer=steer)
    others_alone = [save_every_step(model, prompt) for prompt in PROMPTS[1:]]
    together = model.run_together(
        [lambda: save_every_step(model, PROMPTS[0], steer=steer)]
        + [lambda p=p: save_every_step(model, p) for p in PROMPTS[1:]],
    )
    same(steered_alone[0], together[0][0])
    assert steered_alone[2] == together[0][2]
    for alone, mixed in zip(others_alone, together[1:]):
        same(alone[0], mixed[0])
        assert alone[2] == mixed[2]
    plain = save_every_step(model, PROMPTS[0])
    assert not torch.equal(plain[1][-1], steered_alone[1][-1])  # the edit did change the steered job
    same([steered_alone[0][0]], [plain[0][0] + steer])  # reading the value again shows the block's own edit


def test_a_block_that_raises_ends_its_own_job_only(model):
    others_alone = [save_every_step(model, prompt) for prompt in PROMPTS[1:]]
    together = model.run_together(
        [lambda: save_every_step(model, PROMPTS[0], fail_at=2)]
        + [lambda p=p: save_every_step(model, p) for p in PROMPTS[1:]],
    )
    assert isinstance(together[0], ZeroDivisionError)
    frames = [frame for frame in __import__("traceback").extract_tb(together[0].__traceback__)]
    assert any(frame.line == "hidden.append(1 / 0)" for frame in frames)
    for alone, mixed in zip(others_alone, together[1:]):
        same(alone[0], mixed[0])
        assert alone[2] == mixed[2]
    assert not model._hooks.run.jobs and not model._hooks.run.mediators  # nothing left behind


def test_stop_ends_the_job_early_and_keeps_what_it_saved(model):
    steps_before = model.engine.steps
    with model.generate(PROMPTS[0], max_tokens=50) as tracer:
        hidden = ndif.save([])
        for step in tracer.iter[:50]:
            hidden.append(model.model.layers[1].output[0])
            if step == 1:
                tracer.stop()
    assert len(hidden) == 2
    assert model.engine.steps - steps_before < 5  # its request was aborted, not run to 50 tokens
    assert not model._hooks.run.jobs


def test_steps_without_interventions_keep_the_graphs(model):
    before, steps = dict(model.step_counts), model.engine.steps
    with model.generate(PROMPTS[0], max_tokens=8) as tracer:
        seen = ndif.save([])
        for step in tracer.iter[[0, 4]]:
            seen.append(model.model.layers[0].output[0])
    counts = model.step_counts
    assert [item.shape[0] for item in seen] == [len(PROMPTS[0]), 1]
    # Steps 0 and 4 serve the layer's output: on the graphs' taps if it has them, else eagerly.
    served, other = ("taps", "eager") if model._hooks.run.tapped else ("eager", "taps")
    assert counts[served] - before[served] == 2 and counts[other] == before[other]
    assert counts["graph"] - before["graph"] == 3  # steps 1-3: the block waits for step 4
    assert model.engine.steps - steps == 8  # steps 5-7: the block is done, plain engine steps
    before, steps = dict(model.step_counts), model.engine.steps
    tokens = model.generate(PROMPTS[1], max_tokens=4, trace=False)  # no blocks at all
    assert len(tokens) == 4 and model.engine.steps - steps == 4
    assert model.step_counts == before


def test_logits_and_samples_are_served_and_editable_at_every_step(model):
    with model.generate(PROMPTS[2], max_tokens=3) as tracer:
        logits = ndif.save([])
        for step in tracer.iter[:3]:
            logits.append(model.logits.output)
            model.samples.output = torch.tensor([40 + step])
        tokens = tracer.result.save()
    assert tokens == [40, 41, 42]
    assert [tuple(item.shape) for item in logits] == [(1, 64)] * 3


def test_a_block_without_input_sees_every_request_of_its_job_and_no_other(model):
    def job():
        with model.trace() as tracer:
            with tracer.invoke(PROMPTS[0]):
                one = model.model.layers[0].output[0].save()
            with tracer.invoke(PROMPTS[1]):
                two = model.model.layers[0].output[0].save()
            with tracer.invoke():
                both = model.model.layers[0].output[0].save()
        return one, two, both

    (one, two, both), _ = model.run_together([job, lambda: save_every_step(model, PROMPTS[2])])
    assert both.shape[0] == len(PROMPTS[0]) + len(PROMPTS[1])
    rows = {tuple(row.tolist()) for row in both}
    assert rows == {tuple(row.tolist()) for row in torch.cat([one, two])}


def test_chunked_prefill_serves_a_request_its_own_rows_of_each_chunk():
    model = FakeVLLM(budget=6, chunked=True)
    long_prompt = list(range(1, 15))
    alone = save_every_step(model, long_prompt, steps=3)
    short_alone = save_every_step(model, PROMPTS[1], steps=3)
    chunks = model.engine.chunks
    long_, short_ = model.run_together(
        [lambda: save_every_step(model, long_prompt, steps=3), lambda: save_every_step(model, PROMPTS[1], steps=3)],
    )
    assert model.engine.chunks > chunks  # the long prompt was prefilled in several chunks
    # Step 0 is served by the first chunk that reaches the block: the prompt's first rows.
    first = long_[0][0]
    torch.testing.assert_close(first, alone[0][0][: first.shape[0]], rtol=0, atol=1e-12)
    same(long_[0][1:], alone[0][1:])  # decode steps
    assert long_[2] == alone[2]
    same(short_[0], short_alone[0])
    assert short_[2] == short_alone[2]


def test_a_sandboxed_job_over_its_time_limit_ends_alone(model):
    backend = local_backend(model, JobLimits(time_s=0.5))

    def spinning():
        with model.generate(PROMPTS[0], max_tokens=3, remote=backend):
            model.model.layers[0].output[0]
            total = 0
            while total >= 0:
                total += 1
        return total

    others_alone = [save_every_step(model, prompt) for prompt in PROMPTS[1:3]]
    together = model.run_together([spinning] + [lambda p=p: save_every_step(model, p) for p in PROMPTS[1:3]])
    assert type(together[0]).__name__ == "TimeLimitExceeded"
    for alone, mixed in zip(others_alone, together[1:]):
        same(alone[0], mixed[0])
    assert save_every_step(model, PROMPTS[3])[2] == save_every_step(model, PROMPTS[3])[2]  # still healthy


def test_remote_local_jobs_run_in_the_sandbox_and_match_local(model):
    hidden, _, tokens = save_every_step(model, PROMPTS[2])
    with model.generate(PROMPTS[2], max_tokens=4, remote="local") as tracer:
        remote = ndif.save([])
        for step in tracer.iter[:4]:
            remote.append(model.model.layers[1].output[0])
        remote_tokens = tracer.result.save()
    same(hidden, remote)
    assert tokens == remote_tokens


def test_bad_requests_get_clear_errors(model):
    with pytest.raises(ndif.InvokeError, match="sampling parameter"):
        with model.generate(PROMPTS[0], max_tokens=2, top_q=0.5):
            pass
    with pytest.raises(ndif.InvokeError, match="one sequence per invoke"):
        with model.generate(PROMPTS[0], n=2):
            pass
    with pytest.raises(ndif.InvokeError, match="no tokenizer"):
        with model.generate("a string prompt"):
            pass
    with pytest.raises(ndif.InvokeError, match="shape"):
        with model.generate(PROMPTS[0], max_tokens=1):
            model.model.layers[0].output = (torch.zeros(2, 16), torch.zeros(2, 16))
    assert save_every_step(model, PROMPTS[1])[2] == save_every_step(model, PROMPTS[1])[2]


@pytest.mark.timeout(60)
def test_an_open_step_loop_waiting_for_nothing_ends_with_its_requests(model):
    """``tracer.all()`` whose body reads nothing used to spin on the engine's thread: a
    serving run cannot say how many steps there are. Each block knows its requests' lengths."""
    with model.generate([3, 1, 4], max_tokens=5) as tracer:
        steps = ndif.save([])
        for step in tracer.all():
            steps.append(step)
    assert steps == [0, 1, 2, 3, 4]
    with model.generate(max_tokens=3) as tracer:
        with tracer.invoke([3, 1]):
            pass
        with tracer.invoke([2, 7], max_tokens=6):
            pass
        with tracer.invoke():  # a block without input: as many steps as the longest request
            every = ndif.save([])
            for step in tracer.all():
                every.append(step)
    assert every == [0, 1, 2, 3, 4, 5]
    # max_tokens=None (up to the context length): as many steps as the context leaves
    with model.generate([3, 1, 4], max_tokens=None) as tracer:
        open_ended = ndif.save([])
        for step in tracer.all():
            open_ended.append(step)
        tokens = tracer.result.save()
    assert len(tokens) == MAX_MODEL_LEN - 3 and open_ended == list(range(MAX_MODEL_LEN - 3))
    assert model.generate([3, 1, 4], max_tokens=2, trace=False) is not None  # the engine carries on
