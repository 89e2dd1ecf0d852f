"""Steering vectors, SAEs, probes and recipes (`ndif.interp`): hand-computed values, files,
and recipes inside traces on the transformers backend, the vLLM backend's stand-in and the
sandbox (a remote trace)."""

from __future__ import annotations

import math

import pytest
import torch
from fake_vllm import FakeVLLM

import ndif
from ndif import interp
from ndif.remote import local_backend
from ndif.sandbox import JobLimits

# -- SAE: hand-computed ---------------------------------------------------------------------


def small_sae(**options):
    """d_in 2, d_sae 3; x = [1.1, 0.7] gives pre-activations [1.0, 0.0, 0.5] (b_dec subtracted)."""
    return interp.SAE(
        W_enc=torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]),
        b_enc=torch.tensor([0.0, -0.5, 0.0]),
        W_dec=torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, -0.5]]),
        b_dec=torch.tensor([0.1, 0.2]),
        **options,
    )


X = torch.tensor([1.1, 0.7])


def test_sae_encode_and_decode_by_hand():
    sae = small_sae()
    torch.testing.assert_close(sae.encode(X), torch.tensor([1.0, 0.0, 0.5]))
    # 1 * [1, 0] + 0.5 * [0.5, -0.5] + b_dec
    torch.testing.assert_close(sae.decode(sae.encode(X)), torch.tensor([1.35, -0.05]))
    torch.testing.assert_close(sae(X), torch.tensor([1.35, -0.05]))


def test_sae_activations_jumprelu_and_topk_by_hand():
    jump = small_sae(activation="jumprelu", threshold=torch.tensor([0.8, 0.1, 0.6]))
    torch.testing.assert_close(jump.encode(X), torch.tensor([1.0, 0.0, 0.0]))  # 0.5 is under its 0.6
    top = small_sae(activation="topk", k=1)
    torch.testing.assert_close(top.encode(X), torch.tensor([1.0, 0.0, 0.0]))
    no_bias = small_sae(subtract_decoder_bias=False)  # pre = [1.1, 0.2, 0.4]
    torch.testing.assert_close(no_bias.encode(X), torch.tensor([1.1, 0.2, 0.4]))


def test_sae_edits_keep_the_reconstruction_error():
    sae = small_sae()
    unchanged, features = sae.edit(X)
    torch.testing.assert_close(unchanged, X, rtol=0, atol=0)  # no edit: x itself, not its reconstruction
    torch.testing.assert_close(features, torch.tensor([1.0, 0.0, 0.5]))
    # clamp feature 2 to 0: decode([1, 0, 0]) + (x - decode([1, 0, 0.5])) = [1.1, 0.2] + [-0.25, 0.75]
    clamped, _ = sae.edit(X, clamp={2: 0.0})
    torch.testing.assert_close(clamped, torch.tensor([0.85, 0.95]))
    added, _ = sae.edit(X, add={1: 2.0})  # + 2 * W_dec[1]
    torch.testing.assert_close(added, torch.tensor([1.1, 2.7]))
    scaled, _ = sae.edit(X, scale={0: 3.0})  # + 2 * W_dec[0]
    torch.testing.assert_close(scaled, torch.tensor([3.1, 0.7]))
    batch = torch.stack([X, 2 * X])  # per token
    assert sae.edit(batch, clamp={2: 0.0})[0].shape == (2, 2)


def test_sae_shapes_and_settings_are_checked():
    with pytest.raises(ValueError, match="shapes do not fit"):
        interp.SAE(torch.zeros(2, 3), torch.zeros(3), torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="threshold"):
        small_sae(activation="jumprelu")
    with pytest.raises(ValueError, match="k between"):
        small_sae(activation="topk", k=9)
    with pytest.raises(ValueError, match="unknown SAE activation"):
        small_sae(activation="gelu")


def test_sae_features_by_name(tmp_path):
    sae = small_sae(feature_names={2: "ocean"})
    by_name, _ = sae.edit(X, clamp={"ocean": 0.0})
    torch.testing.assert_close(by_name, torch.tensor([0.85, 0.95]))
    interp.save_sae(sae, tmp_path / "named.safetensors")
    loaded = interp.load_sae(tmp_path / "named.safetensors")
    assert loaded.feature("ocean") == 2 and loaded.feature("1") == 1
    with pytest.raises(ValueError, match="no feature named 'sky'"):
        loaded.feature("sky")
    with pytest.raises(ValueError, match="feature 7 is not one of"):
        interp.EditFeatures(loaded, layer=0, clamp={7: 1.0})
    assert interp.ReadFeatures(loaded, ["ocean", 0], layer=0).features == [2, 0]


# -- probes and vectors: hand-computed ------------------------------------------------------


def test_probe_scores_by_hand():
    probe = interp.LinearProbe(torch.tensor([1.0, -1.0]), 0.5)
    tokens = torch.tensor([[2.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(probe(tokens), torch.sigmoid(torch.tensor([1.5, 0.5])))
    classes = interp.LinearProbe(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0.0, 1.0]), output="softmax")
    expected = torch.softmax(torch.tensor([[2.0, 2.0], [0.0, 1.0]]), dim=-1)
    torch.testing.assert_close(classes(tokens), expected)
    raw = interp.LinearProbe(torch.tensor([1.0, -1.0]), 0.5, output="logit")
    torch.testing.assert_close(raw(tokens), torch.tensor([1.5, 0.5]))


def test_principal_direction_by_hand():
    differences = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    # The component is (1, 1)/sqrt(2); its projection of the reference [1, 0] is 1/sqrt(2).
    direction = interp.principal_direction(differences, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(direction, torch.tensor([0.5, 0.5]))
    flipped = interp.principal_direction(differences, torch.tensor([-1.0, 0.0]))
    torch.testing.assert_close(flipped, torch.tensor([-0.5, -0.5]))  # signed to agree with the reference


def test_steering_vector_is_one_direction():
    vector = interp.SteeringVector(torch.tensor([3.0, 4.0]), layer=2)
    torch.testing.assert_close(vector.unit().vector, torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(vector(torch.zeros(1, 2), scale=2.0), torch.tensor([[6.0, 8.0]]))
    with pytest.raises(ValueError, match="one direction"):
        interp.SteeringVector(torch.zeros(2, 2))


# -- files ------------------------------------------------------------------------------------


def test_files_round_trip_with_their_settings(tmp_path):
    from safetensors.torch import save_file

    vector = interp.SteeringVector(torch.tensor([1.0, 2.0]), layer=3, method="pca", name="honesty")
    interp.save_vector(vector, tmp_path / "v.safetensors")
    back = interp.load(tmp_path / "v.safetensors")
    assert isinstance(back, interp.SteeringVector) and (back.layer, back.method, back.name) == (3, "pca", "honesty")
    torch.testing.assert_close(back.vector, vector.vector)

    sae = small_sae(activation="jumprelu", threshold=torch.tensor([0.8, 0.1, 0.6]), layer=4)
    interp.save_sae(sae, tmp_path / "sae.safetensors")
    loaded = interp.load(tmp_path / "sae.safetensors")
    assert (loaded.activation, loaded.layer, loaded.subtract_decoder_bias) == ("jumprelu", 4, True)
    torch.testing.assert_close(loaded.encode(X), sae.encode(X))

    # An SAE saved as two linear layers (encoder [d_sae, d_in], decoder [d_in, d_sae]).
    linear = {
        "encoder.weight": sae.W_enc.T.contiguous(),
        "encoder.bias": sae.b_enc,
        "decoder.weight": sae.W_dec.T.contiguous(),
        "decoder.bias": sae.b_dec,
    }
    save_file(linear, tmp_path / "linear.safetensors")
    torch.testing.assert_close(
        interp.load_sae(tmp_path / "linear.safetensors").edit(X, clamp={2: 0.0})[0], torch.tensor([0.85, 0.95])
    )

    probe = interp.LinearProbe(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), output="softmax", labels=["neg", "pos"], layer=1)
    interp.save_probe(probe, tmp_path / "probe.safetensors")
    again = interp.load(tmp_path / "probe.safetensors")
    assert (again.output, again.labels, again.layer) == ("softmax", ["neg", "pos"], 1)
    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not written by ndif"):
        interp.load(tmp_path / "other.safetensors")


# -- inside traces -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = ndif.make_tiny(tmp_path_factory.mktemp("tiny"), layers=3, hidden=64)
    return ndif.LanguageModel(str(path))


def hf_stream(model, prompt, layer):
    """The residual stream after ``layer``, from transformers' own hidden states (not ndif)."""
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model._module(ids, output_hidden_states=True)
    return out.hidden_states[layer + 1][0]


def test_contrast_vectors_are_differences_of_means(llama):
    positive, negative = ["I love this film", "What a joy"], ["I hate this film", "What a bore"]
    vector = interp.contrast_vector(llama, positive, negative, layer=1)
    expected = torch.stack([hf_stream(llama, p, 1)[-1] for p in positive]).mean(0) - torch.stack(
        [hf_stream(llama, p, 1)[-1] for p in negative]
    ).mean(0)
    torch.testing.assert_close(vector.vector, expected, rtol=1e-4, atol=1e-5)
    assert (vector.layer, vector.method) == (1, "mean_diff")
    mean = interp.contrast_vector(llama, positive, negative, layer=1, position="mean")
    expected = torch.stack([hf_stream(llama, p, 1).mean(0) for p in positive]).mean(0) - torch.stack(
        [hf_stream(llama, p, 1).mean(0) for p in negative]
    ).mean(0)
    torch.testing.assert_close(mean.vector, expected, rtol=1e-4, atol=1e-5)
    pca = interp.contrast_vector(llama, positive, negative, layer=1, method="pca")
    assert torch.dot(pca.vector, vector.vector) > 0


def steered_by_hand(model, prompt, vector, scale, layer, steps):
    with model.generate(prompt, max_new_tokens=steps, do_sample=False) as tracer:
        for step in tracer.iter[:steps]:
            model.model.layers[layer].output[:] += scale * vector
        tokens = tracer.result.save()
    return tokens


def test_a_recipe_steers_as_raw_code_does_and_reads_what_it_says(llama):
    torch.manual_seed(0)
    vector = torch.randn(64)
    probe = interp.LinearProbe(torch.randn(64), 0.1, layer=2)
    sae = interp.SAE(torch.randn(64, 8), torch.zeros(8), torch.randn(8, 64), torch.zeros(64), layer=2)
    recipe = interp.Recipe(
        interp.Steer(vector, layers=1, scale=3.0),
        interp.ReadProbe(probe, name="probe"),
        interp.ReadFeatures(sae, features=[1, 5], name="features"),
        interp.ReadNorm(2),
        interp.LogitLens(2, k=3),
    )
    prompt = "The weather today is"
    with llama.generate(prompt, max_new_tokens=4, do_sample=False) as tracer:
        seen = ndif.save({name: [] for name in recipe.names})
        streams = ndif.save([])
        for step in tracer.iter[:4]:
            for name, value in recipe.step(llama, step).items():
                seen[name].append(value)
            streams.append(llama.model.layers[2].output[0].clone())  # the recipe's last layer: read in place
        tokens = tracer.result.save()
    assert torch.equal(tokens, steered_by_hand(llama, prompt, vector, 3.0, 1, 4))
    assert not torch.equal(tokens, steered_by_hand(llama, prompt, vector, 0.0, 1, 4))
    prompt_length = streams[0].shape[0]
    assert [value.shape for value in seen["probe"]] == [(prompt_length,), (1,), (1,), (1,)]
    for step, stream in enumerate(streams):
        torch.testing.assert_close(seen["probe"][step], probe(stream))
        torch.testing.assert_close(seen["features"][step], sae.encode(stream)[:, [1, 5]])
        torch.testing.assert_close(seen["norm"][step], stream.norm(dim=-1))
        logits = llama._module.lm_head(llama._module.model.norm(stream))
        top = torch.softmax(logits, -1).topk(3, -1)
        torch.testing.assert_close(seen["logit_lens"][step][..., 0], top.indices.float())
        torch.testing.assert_close(seen["logit_lens"][step][..., 1], top.values)


def test_feature_edits_in_a_recipe_equal_the_sae_edit_of_the_stream(llama):
    torch.manual_seed(1)
    sae = interp.SAE(torch.randn(64, 16), torch.zeros(16), torch.randn(16, 64) * 0.1, torch.zeros(64), layer=1)
    prompt = "Once upon a time"
    with llama.trace(prompt):
        before = llama.model.layers[1].output[0].clone().save()
        interp.Recipe(interp.EditFeatures(sae, clamp={3: 5.0}, phase="prompt")).step(llama, 0)
        after = llama.model.layers[1].output[0].save()
    torch.testing.assert_close(after, sae.edit(before, clamp={3: 5.0})[0])
    with llama.trace(prompt):
        interp.Recipe(interp.EditFeatures(sae)).step(llama, 0)  # no edit: the stream is unchanged
        same = llama.model.layers[1].output[0].save()
    torch.testing.assert_close(same, before, rtol=0, atol=1e-5)


def test_on_vllm_the_stream_is_hidden_plus_residual_and_edits_keep_that():
    model = FakeVLLM()
    vector = torch.linspace(-1, 1, 16, dtype=torch.float64)
    sae = interp.SAE(
        torch.randn(16, 8, dtype=torch.float64),
        torch.zeros(8, dtype=torch.float64),
        torch.randn(8, 16, dtype=torch.float64),
        torch.zeros(16, dtype=torch.float64),
        layer=1,
    )
    before = dict(model.step_counts)
    with model.generate([3, 1, 4], max_tokens=2) as tracer:
        seen = interp.Recipe(
            interp.Steer(vector, layers=0, scale=2.0), interp.EditFeatures(sae, clamp={2: 1.5}), interp.ReadNorm(1)
        ).run(model, tracer, steps=2)
    after = dict(model.step_counts)
    with model.generate([3, 1, 4], max_tokens=2) as tracer:
        norms = ndif.save([])
        for step in tracer.iter[:2]:
            model.model.layers[0].output[0][:] += 2.0 * vector
            out = model.model.layers[1].output
            stream = out[0] + out[1]
            edited, _ = sae.edit(stream, clamp={2: 1.5})
            out[0][:] = edited - out[1]
            norms.append((out[0] + out[1]).norm(dim=-1))
    for a, b in zip(seen["norm"], norms):
        torch.testing.assert_close(a, b.float())
    # A recipe reads and edits layer outputs only: its steps ran on the graphs' taps.
    assert after["taps"] - before["taps"] == 2 and after["eager"] == before["eager"]


def test_a_recipe_built_locally_runs_in_a_remote_trace(llama):
    torch.manual_seed(2)
    vector = interp.SteeringVector(torch.randn(64), layer=1)
    probe = interp.LinearProbe(torch.randn(64), layer=2)
    recipe = interp.Recipe(interp.Steer(vector, scale=2.0), interp.ReadProbe(probe))
    remote = local_backend(llama, JobLimits(time_s=60))
    results = []
    for backend in (None, remote):
        with llama.generate("Hello there", max_new_tokens=3, do_sample=False, remote=backend) as tracer:
            seen = recipe.run(llama, tracer, steps=3)
            tokens = tracer.result.save()
        results.append((seen, tokens))
    (local_seen, local_tokens), (remote_seen, remote_tokens) = results
    assert torch.equal(local_tokens, remote_tokens)
    for a, b in zip(local_seen["probe"], remote_seen["probe"]):
        torch.testing.assert_close(a, b)


def test_a_remote_body_cannot_reach_the_file_functions(llama):
    remote = local_backend(llama, JobLimits(time_s=60))
    with pytest.raises(Exception, match="not available in a remote trace"):
        with llama.trace("Hello", remote=remote):
            interp.load_sae("/etc/passwd")
    with llama.trace("Hello", remote=remote):  # built inside the body from allowed classes
        probe = interp.LinearProbe(torch.ones(64) / math.sqrt(64))
        score = probe(llama.model.layers[0].output[0]).save()
    assert score.shape[-1] > 0


def test_generate_with_a_recipe_on_a_tensor_parallel_engine_equals_it_in_process():
    from fake_vllm import FakeRanksVLLM

    from ndif.interp.generation import generate_with

    recipe = interp.Recipe(
        interp.Steer(torch.linspace(-1, 1, 16, dtype=torch.float64), layers=1, scale=2.0), interp.ReadNorm(2)
    )
    seen = []
    on_ranks = generate_with(FakeRanksVLLM(), [3, 1, 4], recipe, max_tokens=4, on_token=seen.append)
    here = generate_with(FakeVLLM(), [3, 1, 4], recipe, max_tokens=4)
    assert on_ranks.tokens == here.tokens and [step.token for step in seen] == here.tokens
    for a, b in zip(on_ranks.steps, here.steps):
        torch.testing.assert_close(a.observations["norm"], b.observations["norm"])  # the whole stream on both
    torch.testing.assert_close(on_ranks.prompt["norm"], here.prompt["norm"])


def test_generate_with_stops_at_a_stop_token(llama):
    from ndif.interp.generation import generate_with

    prompt = llama.tokenizer("The sea").input_ids
    first = generate_with(llama, prompt, max_tokens=6).tokens[0]
    stopped = generate_with(llama, prompt, interp.Recipe(interp.ReadNorm(1)), max_tokens=6, stop_tokens={first})
    assert stopped.tokens == [first] and len(stopped.steps) == 1


def test_the_logit_lens_at_the_last_layer_on_vllm_predicts_the_sampled_token():
    from ndif.interp.generation import generate_with

    model = FakeVLLM()
    last = len(model.model.layers) - 1
    made = generate_with(model, [3, 1, 4], interp.Recipe(interp.LogitLens(last, k=3)), max_tokens=4)
    for step in made.steps:  # greedy: the lens at the last layer is the model's own prediction
        assert int(step.observations["logit_lens"][0, 0, 0]) == step.token
    assert model.step_counts["taps"] == 4  # its norm and unembedding calls ran inside blocks, on taps


def test_probes_and_saes_follow_the_activations_device():
    """Artifacts load on the CPU; a model's activations are on its GPU: a probe or SAE moves
    to the activations' device on first use (``meta`` stands in for a GPU here)."""
    probe = interp.LinearProbe(torch.randn(8))
    assert probe(torch.randn(3, 8, device="meta")).device.type == "meta"
    assert probe.weight.device.type == "meta"
    sae = interp.SAE(torch.randn(8, 16), torch.randn(16), torch.randn(16, 8), torch.randn(8))
    edited, features = sae.edit(torch.randn(3, 8, device="meta"), clamp={1: 2.0})
    assert edited.device.type == features.device.type == sae.W_dec.device.type == "meta"
