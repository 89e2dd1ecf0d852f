"""Tensor parallelism in the vLLM backend: blocks see whole tensors, vLLM gets its shards back.

`Split` and `Partial` are checked against hand-made layouts; then a toy Llama split over two
ranks exactly as vLLM splits it (fused q/k/v and gate/up projections, shared key/value heads,
row-parallel all-reduces, and an MoE-style shared expert whose partial sums its block
reduces) runs the same trace in two processes (``torch.distributed``, gloo): every
rank's saves, the edit's effect and the tokens equal those of the unsplit model.
"""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from fake_vllm import FakeTPVLLM

import ndif
from ndif.models.vllm.tp import Partial, SiteSharding, Split, sharding_for


def gather_from(locals_):
    return lambda _tensor: torch.cat(locals_, dim=-1)


@pytest.mark.parametrize("size, kv_heads", [(2, 2), (4, 2), (2, 1)])
def test_fused_qkv_is_regrouped_part_by_part(size, kv_heads):
    heads, head = 4, 3
    q = torch.arange(heads * head, dtype=torch.float64)[None]
    k = 100 + torch.arange(kv_heads * head, dtype=torch.float64)[None]
    v = 200 + torch.arange(kv_heads * head, dtype=torch.float64)[None]
    whole = torch.cat([q, k, v], dim=-1)
    replicas = max(1, size // kv_heads)
    kv_width = max(1, kv_heads // size) * head
    splits = [Split((heads // size * head, kv_width, kv_width), (1, replicas, replicas), r, size) for r in range(size)]
    locals_ = [split.local(whole) for split in splits]
    for rank, local in enumerate(locals_):  # vLLM's layout: this rank's q heads, then its k/v group's
        group = rank // replicas
        assert (
            local[0, : heads // size * head].tolist()
            == q[0, rank * heads // size * head :][: heads // size * head].tolist()
        )
        assert local[0, heads // size * head] == 100 + group * kv_width
    for split in splits:
        assert torch.equal(split.whole(locals_[split.rank], gather_from(locals_)), whole)
    naive = torch.cat(locals_, dim=-1)[:, : whole.shape[1]]
    assert not torch.equal(naive, whole)  # a plain concatenation would permute q, k and v


def test_merged_gate_up_round_trips():
    intermediate, size = 6, 3
    whole = torch.arange(2 * intermediate, dtype=torch.float64)[None]
    splits = [Split((intermediate // size, intermediate // size), (1, 1), r, size) for r in range(size)]
    locals_ = [split.local(whole) for split in splits]
    assert locals_[1].tolist() == [[2, 3, 8, 9]]  # [gate_1 | up_1]
    assert torch.equal(splits[0].whole(locals_[0], gather_from(locals_)), whole)


def test_partial_sums_are_seen_summed_and_edits_split_back():
    parts = [torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.tensor([[10.0, 20.0]], dtype=torch.float64)]
    sharding = SiteSharding(output=Partial(2))
    seen = []
    for rank, part in enumerate(parts):
        whole, memo = sharding.whole(False, (part, None), gather_from(parts))
        assert whole[0].tolist() == [[11.0, 22.0]] and whole[1] is None
        assert torch.equal(sharding.local(False, whole, memo)[0], part)  # unedited: as it was
        whole[0][:] += torch.tensor([[4.0, -2.0]], dtype=torch.float64)  # an edit in place
        seen.append(sharding.local(False, whole, memo)[0])
    assert torch.equal(seen[0] + seen[1], torch.tensor([[15.0, 20.0]], dtype=torch.float64))


class MoERunnerInterface(torch.nn.Module):
    """vLLM's fused-MoE layer (``FusedMoE(...)`` builds a ``MoERunner``), as far as ndif reads it."""

    def __init__(self, skip_final_all_reduce: bool, is_sequence_parallel: bool = False) -> None:
        super().__init__()
        self.moe_config = SimpleNamespace(
            skip_final_all_reduce=skip_final_all_reduce, is_sequence_parallel=is_sequence_parallel
        )


class MoERunner(MoERunnerInterface):
    pass


def test_a_fused_moe_layer_leaving_its_all_reduce_to_its_block_is_partial():
    assert isinstance(sharding_for(MoERunner(True), 0, 2).output, Partial)  # the block reduces: partial sums
    assert sharding_for(MoERunner(False), 0, 2) is None  # reduced inside: whole on every rank
    assert sharding_for(MoERunner(True, is_sequence_parallel=True), 0, 2) is None  # not vLLM's late path
    assert sharding_for(MoERunner(True), 0, 1) is None


def tp_trace(model):
    """Reads at every split site of the toy, and an edit to a split value, over three steps."""
    with model.generate([3, 1, 4, 1, 5], max_tokens=3) as tracer:
        seen = ndif.save([])
        for step in tracer.iter[:3]:
            attn = model.model.layers[0].self_attn
            seen.append(attn.qkv_proj.output[0])
            seen.append(attn.attn.inputs[0][1])  # the keys
            seen.append(attn.attn.output)
            seen.append(attn.o_proj.input)
            mlp = model.model.layers[1].mlp
            mlp.gate_up_proj.output[0][:, :3] += 1.0  # columns of rank 0's slice only
            seen.append(mlp.gate_up_proj.output[0])
            seen.append(mlp.act_fn.input)
            seen.append(mlp.act_fn.output)
            seen.append(mlp.down_proj.input)
            shared = mlp.shared_expert  # partial sums on each rank: seen summed, edits split back
            seen.append(shared.down_proj.output[0])
            shared.output[:, :2] += 0.5
            seen.append(shared.output)
            seen.append(model.model.layers[1].output[0])
        tokens = tracer.result.save()
    return [value.clone() for value in seen], tokens


def taps_trace(model):
    """Steering and reads of layer outputs only: on an engine with taps, its steps run on them."""
    with model.generate([3, 1, 4, 1, 5], max_tokens=3) as tracer:
        seen = ndif.save([])
        for step in tracer.iter[:3]:
            model.model.layers[0].output[0][:] += 0.5
            seen.append(model.model.layers[1].output[0])
        tokens = tracer.result.save()
    return [value.clone() for value in seen], tokens, dict(model.step_counts)


def _rank(rank, size, port, results, taps=False):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        if taps:
            values, tokens, counts = taps_trace(FakeTPVLLM(rank, size, taps=True))
        else:
            (values, tokens), counts = tp_trace(FakeTPVLLM(rank, size)), {}
        results.put((rank, ([value.tolist() for value in values], tokens, counts)))  # plain data: the child exits
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_ranks(taps=False):
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_rank, args=(rank, 2, port, results, taps)) for rank in range(2)]
    for process in processes:
        process.start()
    ranks = dict(results.get(timeout=100) for _ in processes)
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    return ranks


@pytest.mark.timeout(120)
def test_two_ranks_see_and_edit_the_same_whole_values_as_one():
    expected_values, expected_tokens = tp_trace(FakeTPVLLM(0, 1))
    ranks = _two_ranks()
    for rank in (0, 1):
        values, tokens, _ = ranks[rank]
        assert tokens == expected_tokens
        for got, want in zip(values, expected_values):
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=0, atol=1e-10)


@pytest.mark.timeout(120)
def test_two_ranks_on_taps_equal_one_rank():
    expected_values, expected_tokens, _ = taps_trace(FakeTPVLLM(0, 1, taps=True))
    for rank, (values, tokens, counts) in _two_ranks(taps=True).items():
        assert tokens == expected_tokens
        assert counts["taps"] == 3 and counts["eager"] == 0, (rank, counts)  # every rank stepped on taps
        for got, want in zip(values, expected_values):
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=0, atol=1e-10)
