"""``model.generate`` traces, checked against plain ``transformers`` generation.

Every expected value comes from the reference model (the same checkpoint loaded
plainly by transformers) driven by ``hf_model.generate`` with ordinary forward
hooks; ndif is never used to compute an expectation.

The tiny random models may emit EOS at any step, so every generation passes
``min_new_tokens == max_new_tokens``: exactly ``N`` new tokens, i.e. ``N`` forward
passes (step 0 = the prompt, steps 1..N-1 = one new token each). Tests assert that
step count on the reference before relying on it.
"""

from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager

import pytest
import torch
from transformers import AutoTokenizer

import ndif

PROMPT = "The Eiffel Tower is in"
OTHER = "One two"
STEPS = 4


def greedy(n: int = STEPS) -> dict:
    """Generation arguments that make exactly ``n`` greedy steps."""
    return {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False}


def models(request, arch: str):
    """(ndif model, reference model, the reference's decoder layers)."""
    if arch == "llama":
        reference = request.getfixturevalue("reference_llama")
        return request.getfixturevalue("llama"), reference, reference.model.layers
    reference = request.getfixturevalue("reference_gpt2")
    return request.getfixturevalue("gpt2"), reference, reference.transformer.h


def ndif_layers(model: ndif.LanguageModel, arch: str):
    return model.model.layers if arch == "llama" else model.transformer.h


def hidden_of(output):
    """A decoder layer's hidden state (transformers 5 returns a tensor; older ones a tuple)."""
    return output[0] if isinstance(output, tuple) else output


@functools.cache
def _tokenizer(path: str):
    """The checkpoint's tokenizer, loaded plainly (left padding, as ndif batches)."""
    return AutoTokenizer.from_pretrained(path, padding_side="left")


def encode(reference, prompts) -> dict:
    """Token ids (and mask) of ``prompts`` for the reference model, without ndif."""
    return dict(_tokenizer(reference.name_or_path)(prompts, return_tensors="pt", padding=True))


def reference_generate(reference, model, prompts, n: int = STEPS, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return reference.generate(
            **encode(reference, prompts),
            pad_token_id=_tokenizer(reference.name_or_path).pad_token_id,
            **greedy(n),
            **kwargs,
        )


@contextmanager
def hooked(module: torch.nn.Module, hook):
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def recorded_steps(reference, model, layer: torch.nn.Module, n: int = STEPS, prompts=PROMPT) -> list[torch.Tensor]:
    """The hidden state ``layer`` returns at every step of a plain greedy generate."""
    seen: list[torch.Tensor] = []
    with hooked(layer, lambda module, args, output: seen.append(hidden_of(output).detach().clone())):
        reference_generate(reference, model, prompts, n)
    assert len(seen) == n, f"the reference made {len(seen)} steps, expected {n}"
    return seen


def adding(vector: torch.Tensor, only_call: int | None = None):
    """A forward hook adding ``vector`` to a layer's hidden state (on every call, or one)."""
    calls = {"n": 0}

    def hook(module, args, output):
        call = calls["n"]
        calls["n"] += 1
        if only_call is not None and call != only_call:
            return None
        if isinstance(output, tuple):
            return (output[0] + vector, *output[1:])
        return output + vector

    return hook


ARCHS = ["llama", "gpt2"]


# -- tracer.result ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_result_equals_reference_generate_single_prompt(request, arch):
    model, reference, _ = models(request, arch)
    expected = reference_generate(reference, model, PROMPT)
    prompt_length = encode(reference, PROMPT)["input_ids"].shape[1]
    assert expected.shape == (1, prompt_length + STEPS)

    with model.generate(PROMPT, **greedy()) as tracer:
        tokens = tracer.result.save()

    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_result_equals_reference_generate_batched_invokes(request, arch):
    """Each invoke's ``tracer.result`` is its own rows of the left-padded batch.

    A padded batched HF generate could in principle differ slightly (in float
    rounding) from an unbatched one, so the exact comparison is with the reference
    run on the same left-padded batch; the real (unpadded) tokens of each row are
    additionally checked against the reference run on that prompt alone (they agree
    for these prompts on these models).
    """
    model, reference, _ = models(request, arch)
    batch = encode(reference, [PROMPT, OTHER])
    assert batch["attention_mask"][1, 0] == 0  # OTHER is shorter: it is left-padded
    expected_batch = reference_generate(reference, model, [PROMPT, OTHER])
    alone = [reference_generate(reference, model, prompt) for prompt in (PROMPT, OTHER)]

    with model.generate(**greedy()) as tracer:
        with tracer.invoke(PROMPT):
            first = tracer.result.save()
        with tracer.invoke(OTHER):
            second = tracer.result.save()

    assert torch.equal(first, expected_batch[0:1])
    assert torch.equal(second, expected_batch[1:2])
    pad = _tokenizer(reference.name_or_path).pad_token_id
    assert torch.equal(first, alone[0])
    real = second[0][batch["attention_mask"][1].bool().tolist() + [True] * STEPS]
    assert (second[0, : int((batch["attention_mask"][1] == 0).sum())] == pad).all()
    assert torch.equal(real, alone[1][0])


def test_result_of_a_list_of_prompts_equals_reference_batch(llama, reference_llama):
    expected = reference_generate(reference_llama, llama, [PROMPT, OTHER])
    with llama.generate([PROMPT, OTHER], **greedy()) as tracer:
        tokens = tracer.result.save()
    assert torch.equal(tokens, expected)


# -- step-by-step reads -------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_iter_all_steps_reads_layer_output_each_step(request, arch):
    model, reference, layers = models(request, arch)
    expected = recorded_steps(reference, model, layers[1])
    prompt_length = encode(reference, PROMPT)["input_ids"].shape[1]
    hidden = expected[0].shape[-1]
    assert expected[0].shape == (1, prompt_length, hidden)
    assert all(step.shape == (1, 1, hidden) for step in expected[1:])

    with model.generate(PROMPT, **greedy()) as tracer:
        outputs = [].save()
        steps = [].save()
        for step in tracer.iter[:]:
            outputs.append(hidden_of(ndif_layers(model, arch)[1].output).clone())
            steps.append(step)

    assert steps == list(range(STEPS))
    assert len(outputs) == STEPS
    for got, want in zip(outputs, expected):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)


def test_tracer_all_reads_layer_output_each_step(llama, reference_llama):
    expected = recorded_steps(reference_llama, llama, reference_llama.model.layers[2])

    with llama.generate(PROMPT, **greedy()) as tracer:
        outputs = [].save()
        for _ in tracer.all():
            outputs.append(llama.model.layers[2].output.save())

    assert [tuple(o.shape) for o in outputs] == [tuple(e.shape) for e in expected]
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want)


def test_iter_slice_reads_only_the_selected_steps(llama, reference_llama):
    expected = recorded_steps(reference_llama, llama, reference_llama.model.layers[1])

    with llama.generate(PROMPT, **greedy()) as tracer:
        outputs = [].save()
        steps = [].save()
        for step in tracer.iter[1:3]:
            steps.append(step)
            outputs.append(llama.model.layers[1].output.save())

    assert steps == [1, 2]
    assert len(outputs) == 2
    torch.testing.assert_close(outputs[0], expected[1])
    torch.testing.assert_close(outputs[1], expected[2])
    assert outputs[0].shape == (1, 1, expected[0].shape[-1])


def test_iter_slice_with_a_stride(llama, reference_llama):
    expected = recorded_steps(reference_llama, llama, reference_llama.model.layers[1])

    with llama.generate(PROMPT, **greedy()) as tracer:
        outputs = [].save()
        steps = [].save()
        for step in tracer.iter[0:4:2]:
            steps.append(step)
            outputs.append(llama.model.layers[1].output.save())

    assert steps == [0, 2]
    torch.testing.assert_close(outputs[0], expected[0])
    torch.testing.assert_close(outputs[1], expected[2])


def test_iter_list_reads_the_listed_steps(llama, reference_llama):
    expected = recorded_steps(reference_llama, llama, reference_llama.model.layers[1])

    with llama.generate(PROMPT, **greedy()) as tracer:
        outputs = [].save()
        for _ in tracer.iter[[0, 2]]:
            outputs.append(llama.model.layers[1].output.save())

    assert len(outputs) == 2
    assert outputs[0].shape == expected[0].shape
    torch.testing.assert_close(outputs[0], expected[0])
    torch.testing.assert_close(outputs[1], expected[2])


def test_iter_single_index_reads_that_step(llama, reference_llama):
    expected = recorded_steps(reference_llama, llama, reference_llama.model.layers[1])

    with llama.generate(PROMPT, **greedy()) as tracer:
        outputs = [].save()
        for _ in tracer.iter[2]:
            outputs.append(llama.model.layers[1].output.save())

    assert len(outputs) == 1
    torch.testing.assert_close(outputs[0], expected[2])


def test_tracer_next_and_module_next_move_to_later_steps(llama, reference_llama):
    expected = recorded_steps(reference_llama, llama, reference_llama.model.layers[1])

    with llama.generate(PROMPT, **greedy()) as tracer:
        step0 = llama.model.layers[1].output.save()
        tracer.next()
        step1 = llama.model.layers[1].output.save()
        step2 = llama.model.layers[1].next().output.save()
        tracer.next(1)
        step3 = llama.model.layers[1].output.save()

    torch.testing.assert_close(step0, expected[0])
    torch.testing.assert_close(step1, expected[1])
    torch.testing.assert_close(step2, expected[2])
    torch.testing.assert_close(step3, expected[3])


def test_without_iter_requests_bind_to_step_zero(llama, reference_llama):
    expected = recorded_steps(reference_llama, llama, reference_llama.model.layers[1])
    logits_seen: list[torch.Tensor] = []
    with hooked(reference_llama.lm_head, lambda m, a, o: logits_seen.append(o.detach().clone())):
        reference_generate(reference_llama, llama, PROMPT)

    with llama.generate(PROMPT, **greedy()) as tracer:
        hidden = llama.model.layers[1].output.save()
        logits = llama.lm_head.output.save()

    assert hidden.shape == expected[0].shape  # the prompt: [1, L, H]
    torch.testing.assert_close(hidden, expected[0])
    torch.testing.assert_close(logits, logits_seen[0])


# -- per-step edits ------------------------------------------------------------------------


def steering_vector(hidden: int) -> torch.Tensor:
    return torch.randn(hidden, generator=torch.Generator().manual_seed(1)) * 4


@pytest.mark.parametrize("arch", ARCHS)
def test_adding_a_vector_at_every_step_matches_a_hooked_generate(request, arch):
    model, reference, layers = models(request, arch)
    vector = steering_vector(model.config.hidden_size if arch == "llama" else model.config.n_embd)
    plain = reference_generate(reference, model, PROMPT)
    with hooked(layers[1], adding(vector)):
        expected = reference_generate(reference, model, PROMPT)
    assert not torch.equal(plain, expected), "the vector should change the generated tokens"

    with model.generate(PROMPT, **greedy()) as tracer:
        for _ in tracer.all():
            ndif_layers(model, arch)[1].output = ndif_layers(model, arch)[1].output + vector
        tokens = tracer.result.save()

    assert torch.equal(tokens, expected)


def test_in_place_add_at_every_step_matches_a_hooked_generate(llama, reference_llama):
    vector = steering_vector(llama.config.hidden_size)
    with hooked(reference_llama.model.layers[2], adding(vector)):
        expected = reference_generate(reference_llama, llama, PROMPT)

    with llama.generate(PROMPT, **greedy()) as tracer:
        for _ in tracer.iter[:]:
            llama.model.layers[2].output[:] += vector
        tokens = tracer.result.save()

    assert torch.equal(tokens, expected)


def test_editing_only_step_one_matches_a_hook_on_the_second_call(llama, reference_llama):
    vector = steering_vector(llama.config.hidden_size)
    plain = reference_generate(reference_llama, llama, PROMPT)
    with hooked(reference_llama.model.layers[1], adding(vector, only_call=1)):
        expected = reference_generate(reference_llama, llama, PROMPT)
    everywhere = None
    with hooked(reference_llama.model.layers[1], adding(vector)):
        everywhere = reference_generate(reference_llama, llama, PROMPT)
    prompt_length = encode(reference_llama, PROMPT)["input_ids"].shape[1]
    # step 1 produces token prompt_length + 1: the first new token is untouched
    assert torch.equal(expected[:, : prompt_length + 1], plain[:, : prompt_length + 1])
    assert not torch.equal(expected, plain)
    assert not torch.equal(expected, everywhere)

    with llama.generate(PROMPT, **greedy()) as tracer:
        for _ in tracer.iter[1]:
            llama.model.layers[1].output = llama.model.layers[1].output + vector
        tokens = tracer.result.save()
    assert torch.equal(tokens, expected)

    with llama.generate(PROMPT, **greedy()) as tracer:
        tracer.next()
        llama.model.layers[1].output = llama.model.layers[1].output + vector
        tokens_via_next = tracer.result.save()
    assert torch.equal(tokens_via_next, expected)


def test_per_step_edits_in_one_invoke_leave_the_other_alone(llama, reference_llama):
    vector = steering_vector(llama.config.hidden_size)
    plain = reference_generate(reference_llama, llama, [PROMPT, OTHER])
    rows_hook_calls = {"n": 0}

    def first_row_only(module, args, output):
        rows_hook_calls["n"] += 1
        edited = output.clone()
        edited[0] += vector
        return edited

    with hooked(reference_llama.model.layers[1], first_row_only):
        expected = reference_generate(reference_llama, llama, [PROMPT, OTHER])
    assert rows_hook_calls["n"] == STEPS
    assert not torch.equal(expected[0], plain[0])

    with llama.generate(**greedy()) as tracer:
        with tracer.invoke(PROMPT):
            for _ in tracer.all():
                llama.model.layers[1].output = llama.model.layers[1].output + vector
            first = tracer.result.save()
        with tracer.invoke(OTHER):
            second = tracer.result.save()

    assert torch.equal(first, expected[0:1])
    assert torch.equal(second, expected[1:2])


# -- loops that outrun the generation ------------------------------------------------------


def _iter_warnings(caught) -> list:
    return [w for w in caught if "tracer.iter" in str(w.message)]


def test_open_loop_ends_quietly_and_code_after_it_runs(llama, reference_llama):
    n = 3
    expected_tokens = reference_generate(reference_llama, llama, PROMPT, n)
    expected = recorded_steps(reference_llama, llama, reference_llama.model.layers[1], n)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with llama.generate(PROMPT, **greedy(n)) as tracer:
            outputs = [].save()
            for _ in tracer.iter[:]:
                outputs.append(llama.model.layers[1].output.save())
            after = [].save()
            after.append("ran")
            tokens = tracer.result.save()

    assert _iter_warnings(caught) == []
    assert after == ["ran"]
    assert torch.equal(tokens, expected_tokens)
    assert len(outputs) == n
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want)


def test_all_loop_without_module_requests_runs_once_per_step(llama, reference_llama):
    """``tracer.all()`` binds the body to every step the run makes: with 3 steps it runs
    3 times even when the body reads no module, then the code after it runs. (The
    ``break`` only keeps a runaway loop from hanging the test suite.)"""
    n = 3
    expected_tokens = reference_generate(reference_llama, llama, PROMPT, n)
    with llama.generate(PROMPT, **greedy(n)) as tracer:
        count = [].save()
        for step in tracer.all():
            count.append(step)
            if len(count) > 20:
                break
        tokens = tracer.result.save()
    assert count == [0, 1, 2]
    assert torch.equal(tokens, expected_tokens)


def test_bounded_loop_longer_than_generation_warns_and_keeps_reached_steps(llama, reference_llama):
    n = 3
    expected_tokens = reference_generate(reference_llama, llama, PROMPT, n)
    expected = recorded_steps(reference_llama, llama, reference_llama.model.layers[1], n)

    with pytest.warns(UserWarning, match="tracer.iter"):  # noqa: SIM117 (a trace is its own `with` statement)
        with llama.generate(PROMPT, **greedy(n)) as tracer:
            outputs = [].save()
            for _ in tracer.iter[:10]:
                outputs.append(llama.model.layers[1].output.save())
            tokens = tracer.result.save()

    assert len(outputs) == n
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want)
    assert torch.equal(tokens, expected_tokens)


def test_step_beyond_generation_without_loop_raises_never_ran(llama):
    with pytest.raises(ndif.NeverRanError):  # noqa: SIM117 (a trace is its own `with` statement)
        with llama.generate(PROMPT, **greedy(2)) as tracer:
            tracer.next(5)
            late = llama.model.layers[1].output.save()


def test_open_loops_in_two_invokes_each_see_their_rows_and_both_finish(llama, reference_llama):
    n = 3
    expected_tokens = reference_generate(reference_llama, llama, [PROMPT, OTHER], n)
    expected = recorded_steps(reference_llama, llama, reference_llama.model.layers[1], n, prompts=[PROMPT, OTHER])

    with llama.generate(**greedy(n)) as tracer:
        with tracer.invoke(PROMPT):
            first = [].save()
            for _ in tracer.iter[:]:
                first.append(llama.model.layers[1].output.save())
            first_tokens = tracer.result.save()
        with tracer.invoke(OTHER):
            second = [].save()
            for _ in tracer.all():
                second.append(llama.model.layers[1].output.save())
            second_tokens = tracer.result.save()

    assert len(first) == len(second) == n
    for step in range(n):
        torch.testing.assert_close(first[step], expected[step][0:1])
        torch.testing.assert_close(second[step], expected[step][1:2])
    assert torch.equal(first_tokens, expected_tokens[0:1])
    assert torch.equal(second_tokens, expected_tokens[1:2])


def test_bounded_loop_in_one_invoke_warns_and_the_other_invoke_is_unaffected(llama, reference_llama):
    n = 2
    expected_tokens = reference_generate(reference_llama, llama, [PROMPT, OTHER], n)
    expected = recorded_steps(reference_llama, llama, reference_llama.model.layers[2], n, prompts=[PROMPT, OTHER])

    with pytest.warns(UserWarning, match="tracer.iter"):  # noqa: SIM117 (a trace is its own `with` statement)
        with llama.generate(**greedy(n)) as tracer:
            with tracer.invoke(PROMPT):
                first = [].save()
                for _ in tracer.iter[0:5]:
                    first.append(llama.model.layers[2].output.save())
            with tracer.invoke(OTHER):
                second = llama.model.layers[2].output.save()
                tokens = tracer.result.save()

    assert len(first) == n
    torch.testing.assert_close(first[0], expected[0][0:1])
    torch.testing.assert_close(first[1], expected[1][0:1])
    torch.testing.assert_close(second, expected[0][1:2])
    assert torch.equal(tokens, expected_tokens[1:2])
