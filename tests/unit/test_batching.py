"""Several invokes in one forward pass, checked against plain runs of each prompt alone.

Every expectation comes from the same checkpoint loaded plainly by transformers
(``reference_*``), run on one prompt at a time without padding, with plain
``register_forward_hook`` / ``register_forward_pre_hook`` hooks for edits and
reads. ndif is never used to compute an expectation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import module_at as sub
from transformers import AutoTokenizer

# Batched (padded) and single-prompt runs take different kernels paths: close, not equal.
TOL = {"atol": 1e-5, "rtol": 1e-4}

SHORT = "Paris"
MID = "The Eiffel Tower is in"
LONG = "When Mary and John went to the store, John gave a drink to"


@dataclass(frozen=True)
class Arch:
    name: str
    layers: str


ARCHS = {"llama": Arch("llama", "model.layers"), "gpt2": Arch("gpt2", "transformer.h")}


@dataclass
class Case:
    arch: Arch
    model: Any
    ref: torch.nn.Module
    tokenizer: Any

    def ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def layers(self, root: Any) -> Any:
        return sub(root, self.arch.layers)

    def reference(
        self,
        ids: list[int],
        edits: dict[int, Callable[[torch.Tensor], Any]] | None = None,
        record: tuple[int, ...] = (1,),
    ) -> dict[str, torch.Tensor]:
        """Run the plain model on one unpadded row of ``ids``: layer outputs and logits.

        ``edits`` maps a layer index to a forward hook body ``output -> new output``.
        """
        recorded: dict[str, torch.Tensor] = {}
        handles = []
        layers = self.layers(self.ref)
        try:
            for index, fn in (edits or {}).items():
                handles.append(layers[index].register_forward_hook(lambda _m, _a, output, fn=fn: fn(output)))
            for index in record:

                def hook(_m: Any, _a: Any, output: torch.Tensor, index: int = index) -> None:
                    recorded[f"layer{index}"] = output.detach().clone()

                handles.append(layers[index].register_forward_hook(hook))
            with torch.no_grad():
                recorded["logits"] = self.ref(input_ids=torch.tensor([ids])).logits
        finally:
            for handle in handles:
                handle.remove()
        return recorded


@pytest.fixture(params=sorted(ARCHS))
def case(request: pytest.FixtureRequest) -> Case:
    name = request.param
    return Case(
        ARCHS[name],
        request.getfixturevalue(name),
        request.getfixturevalue(f"reference_{name}"),
        AutoTokenizer.from_pretrained(request.getfixturevalue(f"tiny_{name}_path")),
    )


def assert_real_positions(batched: torch.Tensor, row: int, expected: torch.Tensor, where: str) -> None:
    """Row ``row`` of a left-padded batch, at its real (last ``n``) positions, equals ``expected[0]``."""
    n = expected.shape[1]
    torch.testing.assert_close(batched[row, -n:], expected[0], msg=lambda m: f"{where}: {m}", **TOL)


def zero_last(output: torch.Tensor) -> torch.Tensor:
    output = output.clone()
    output[:, -1] = 0
    return output


# -- invokes vs prompts alone ---------------------------------------------------------------


def test_invokes_match_each_prompt_alone(case: Case) -> None:
    model = case.model
    with model.trace() as tracer:
        with tracer.invoke(SHORT):
            a_hidden = case.layers(model)[1].output.save()
            a_logits = model.lm_head.output.save()
        with tracer.invoke([LONG, MID]):
            b_hidden = case.layers(model)[1].output.save()
            b_logits = model.lm_head.output.save()
        with tracer.invoke():
            root_args, root_kwargs = model.inputs
            root_args.save()
            all_ids = root_kwargs["input_ids"].save()
            all_mask = root_kwargs["attention_mask"].save()
            all_hidden = case.layers(model)[1].output.save()
            all_logits = model.lm_head.output.save()

    prompts = [SHORT, LONG, MID]
    ids = [case.ids(prompt) for prompt in prompts]
    width = max(len(row) for row in ids)
    refs = [case.reference(row) for row in ids]

    assert a_hidden.shape == (1, width, 64) and b_hidden.shape == (2, width, 64)
    assert all_hidden.shape == (3, width, 64) and all_logits.shape[:2] == (3, width)
    assert_real_positions(a_hidden, 0, refs[0]["layer1"], "invoke 1 layer 1")
    assert_real_positions(a_logits, 0, refs[0]["logits"], "invoke 1 logits")
    for row in range(2):
        assert_real_positions(b_hidden, row, refs[1 + row]["layer1"], f"invoke 2 row {row} layer 1")
        assert_real_positions(b_logits, row, refs[1 + row]["logits"], f"invoke 2 row {row} logits")
    for row in range(3):
        assert_real_positions(all_hidden, row, refs[row]["layer1"], f"whole batch row {row} layer 1")
        assert_real_positions(all_logits, row, refs[row]["logits"], f"whole batch row {row} logits")
    # The empty invoke sees the same rows, in invoke order.
    torch.testing.assert_close(all_logits, torch.cat([a_logits, b_logits]))

    # Left padding: every row ends with its real tokens, so -1 is its last real token.
    for row, real in enumerate(ids):
        pad = width - len(real)
        assert all_ids[row, pad:].tolist() == real
        assert all_mask[row].tolist() == [0] * pad + [1] * len(real)
        torch.testing.assert_close(all_logits[row, -1], refs[row]["logits"][0, -1], **TOL)
    assert root_args == ()


def test_direct_list_of_prompts(case: Case) -> None:
    model = case.model
    with model.trace(["a", "bb"]):
        ids = model.input.save()
        hidden = case.layers(model)[2].output.save()
        logits = model.lm_head.output.save()
    assert ids.shape[0] == 2 and logits.shape[0] == 2
    for row, prompt in enumerate(["a", "bb"]):
        ref = case.reference(case.ids(prompt), record=(2,))
        assert ids[row, -len(case.ids(prompt)) :].tolist() == case.ids(prompt)
        assert_real_positions(hidden, row, ref["layer2"], f"row {row} layer 2")
        assert_real_positions(logits, row, ref["logits"], f"row {row} logits")


# -- token-id inputs ------------------------------------------------------------------------


def test_token_id_inputs(case: Case) -> None:
    model = case.model
    short, mid, long = case.ids(SHORT), case.ids(MID), case.ids(LONG)
    same_length = [mid, [mid[0], *reversed(mid[1:])]]
    # A right-padded encoding: the mask, not the padding side, says which tokens are real.
    width = max(len(short), len(long))
    encoding = {
        "input_ids": torch.tensor([short + [0] * (width - len(short)), long + [0] * (width - len(long))]),
        "attention_mask": torch.tensor(
            [[1] * len(short) + [0] * (width - len(short)), [1] * len(long) + [0] * (width - len(long))]
        ),
    }
    with model.trace() as tracer:
        with tracer.invoke(long):
            list_logits = model.lm_head.output.save()
        with tracer.invoke(torch.tensor(same_length)):
            tensor_logits = model.lm_head.output.save()
        with tracer.invoke(encoding):
            dict_hidden = case.layers(model)[1].output.save()
            dict_logits = model.lm_head.output.save()

    assert list_logits.shape[0] == 1 and tensor_logits.shape[0] == 2 and dict_logits.shape[0] == 2
    assert_real_positions(list_logits, 0, case.reference(long)["logits"], "list[int] logits")
    for row, ids in enumerate(same_length):
        assert_real_positions(tensor_logits, row, case.reference(ids)["logits"], f"2-D tensor row {row}")
    for row, ids in enumerate([short, long]):
        ref = case.reference(ids)
        assert_real_positions(dict_hidden, row, ref["layer1"], f"encoding row {row} layer 1")
        assert_real_positions(dict_logits, row, ref["logits"], f"encoding row {row} logits")


def test_token_id_inputs_directly(case: Case) -> None:
    model = case.model
    mid = case.ids(MID)
    rows = [mid, [mid[0], *reversed(mid[1:])]]
    with model.trace(mid):
        list_logits = model.lm_head.output.save()
    with model.trace(torch.tensor(rows)):
        tensor_logits = model.lm_head.output.save()
    with model.trace({"input_ids": torch.tensor(rows), "attention_mask": torch.ones(2, len(mid), dtype=torch.long)}):
        dict_logits = model.lm_head.output.save()

    torch.testing.assert_close(list_logits, case.reference(mid)["logits"], **TOL)
    with torch.no_grad():
        together = case.ref(input_ids=torch.tensor(rows)).logits
    torch.testing.assert_close(tensor_logits, together, **TOL)
    torch.testing.assert_close(dict_logits, together, **TOL)
    for row, ids in enumerate(rows):
        torch.testing.assert_close(tensor_logits[row], case.reference(ids)["logits"][0], **TOL)


# -- edits stay in their invoke -------------------------------------------------------------


def test_edits_stay_in_their_invoke(case: Case) -> None:
    model = case.model
    with model.trace() as tracer:
        with tracer.invoke(MID):
            case.layers(model)[1].output[:, -1] = 0
            zeroed = model.lm_head.output.save()
        with tracer.invoke([SHORT, LONG]):
            layer = case.layers(model)[2]
            layer.output = layer.output * 2
            doubled = model.lm_head.output.save()
        with tracer.invoke("One two three"):
            untouched = model.lm_head.output.save()

    mid, short, long, plain = case.ids(MID), case.ids(SHORT), case.ids(LONG), case.ids("One two three")
    assert_real_positions(zeroed, 0, case.reference(mid, {1: zero_last})["logits"], "zeroed invoke")
    for row, ids in enumerate([short, long]):
        expected = case.reference(ids, {2: lambda output: output * 2})["logits"]
        assert_real_positions(doubled, row, expected, f"doubled invoke row {row}")
    assert_real_positions(untouched, 0, case.reference(plain)["logits"], "unedited invoke")
    # The edits did something (so isolation above is not vacuous).
    assert not torch.allclose(zeroed[0, -1], case.reference(mid)["logits"][0, -1], **TOL)
    assert not torch.allclose(doubled[1, -1], case.reference(long)["logits"][0, -1], **TOL)


def test_whole_batch_invoke_edits_every_row(case: Case) -> None:
    model = case.model
    with model.trace() as tracer:
        with tracer.invoke(SHORT):
            first = model.lm_head.output.save()
        with tracer.invoke(LONG):
            second = model.lm_head.output.save()
        with tracer.invoke():
            case.layers(model)[0].output[:, -1] = 0
    for row, (prompt, logits) in enumerate([(SHORT, first), (LONG, second)]):
        expected = case.reference(case.ids(prompt), {0: zero_last})["logits"]
        assert_real_positions(logits, 0, expected, f"row {row}")


# -- activation patching across invokes ------------------------------------------------------


def test_activation_patching_with_barrier(case: Case) -> None:
    model = case.model
    source, target = "The Colosseum is in", MID
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(source):
            clean = case.layers(model)[1].output[:, -1]
            barrier()
            source_logits = model.lm_head.output.save()
        with tracer.invoke(target):
            barrier()
            case.layers(model)[1].output[:, -1] = clean
            patched_logits = model.lm_head.output.save()

    # Reference: two plain runs. Record on the source, then patch into the target.
    recorded = case.reference(case.ids(source), record=(1,))
    activation = recorded["layer1"][:, -1]

    def patch(output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, -1] = activation
        return output

    expected = case.reference(case.ids(target), {1: patch})["logits"]
    assert_real_positions(patched_logits, 0, expected, "patched target")
    assert_real_positions(source_logits, 0, recorded["logits"], "source (unpatched)")
    assert not torch.allclose(patched_logits[0, -1], case.reference(case.ids(target))["logits"][0, -1], **TOL)
