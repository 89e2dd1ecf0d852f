"""Whole tensors for intervention code under tensor parallelism, and shards back for vLLM.

With tensor parallelism each rank holds a slice of some activations: the output of a
column-parallel linear (the fused q/k/v projection, the fused gate/up projection), the
attention heads of the rank, the activation between the MLP's projections, and the input
of a row-parallel linear. Every rank runs the same intervention blocks on the same values
(see ``docs/vllm.md``), so at such a site each rank gathers the whole tensor (one
all-gather), the blocks see and edit it as on one GPU, and each rank takes its own slice of
the result back. An unedited value round-trips exactly (gathering and slicing copy bits).

A fused output is gathered part by part: the q, k and v of every rank, in that order, not
rank 0's [q|k|v] then rank 1's (which is what a plain concatenation would give). When there
are fewer key/value heads than ranks, ranks share (replicate) a k/v slice: one copy per group.

Rules are chosen by vLLM's layer classes (by name, so this module imports nothing of vLLM
and is tested on CPU with `torch.distributed`'s gloo backend).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

#: All-gathers a rank's tensor along its last dimension: the ranks' pieces concatenated in rank order.
AllGather = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Split:
    """How one tensor is split along its last dimension across ``size`` ranks.

    Each rank holds ``widths[i]`` columns of part ``i``, its parts side by side. Part ``i``
    of the whole tensor is its pieces from ranks ``0, replicas[i], 2 * replicas[i], ...``
    concatenated (ranks in one replica group hold the same piece).
    """

    widths: tuple[int, ...]
    replicas: tuple[int, ...]
    rank: int
    size: int

    @classmethod
    def even(cls, width: int, rank: int, size: int) -> Split:
        return cls((width,), (1,), rank, size)

    def whole(self, local: torch.Tensor, gather: AllGather) -> torch.Tensor:
        """The whole tensor, from this rank's piece (a collective: every rank must call it)."""
        everyone = gather(local.contiguous()).chunk(self.size, dim=-1)
        parts = []
        offset = 0
        for width, replicas in zip(self.widths, self.replicas):
            parts.extend(piece[..., offset : offset + width] for piece in everyone[::replicas])
            offset += width
        return torch.cat(parts, dim=-1)

    def local(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's piece of ``whole``."""
        pieces = []
        offset = 0
        for width, replicas in zip(self.widths, self.replicas):
            group = self.rank // replicas
            start = offset + group * width
            pieces.append(whole[..., start : start + width])
            offset += width * (self.size // replicas)
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0].contiguous()


@dataclass(frozen=True)
class Partial:
    """A tensor each of ``size`` ranks holds a partial sum of: the output of a row-parallel
    layer built with ``reduce_results=False``, which leaves the all-reduce to a later module
    (an MoE block adds its experts' and shared expert's partial sums, then reduces once).

    The whole tensor is the ranks' sum (the same on every rank: the sum runs over the
    gathered pieces in rank order). An edit's change is split evenly over the ranks, so that
    their partial sums add up to the edited tensor; an unedited tensor comes back as it was.
    """

    size: int

    def whole(self, local: torch.Tensor, gather: AllGather) -> torch.Tensor:
        return torch.stack(gather(local.contiguous()).chunk(self.size, dim=-1)).sum(0)

    def local(self, whole: torch.Tensor, before: torch.Tensor, whole_before: torch.Tensor) -> torch.Tensor:
        return before + (whole - whole_before) / self.size


@dataclass
class SiteSharding:
    """Which of a module's inputs and outputs are split across ranks.

    ``output``: the module's output (the first item when it returns a tuple, as vLLM's
    linear layers return ``(output, bias)``). ``inputs``: by position in the call.
    """

    output: Split | Partial | None = None
    inputs: dict[int, Split] = field(default_factory=dict)

    def whole(self, is_input: bool, value: Any, gather: AllGather) -> tuple[Any, Any]:
        """The whole value, and what `local` needs besides the (edited) whole value."""
        if is_input:
            args, kwargs = value
            args = list(args)
            for position, split in self.inputs.items():
                if position < len(args) and isinstance(args[position], torch.Tensor):
                    args[position] = split.whole(args[position], gather)
            return (tuple(args), kwargs), None
        if isinstance(self.output, Partial):
            partial, memo = self.output, []

            def summed(tensor: torch.Tensor) -> torch.Tensor:
                whole = partial.whole(tensor, gather)
                memo.append((tensor, whole.clone()))  # a copy: blocks may edit the whole in place
                return whole

            value = _first(value, summed)
            return value, (memo[0] if memo else None)
        return (_first(value, lambda tensor: self.output.whole(tensor, gather)) if self.output else value), None

    def local(self, is_input: bool, value: Any, memo: Any = None) -> Any:
        if is_input:
            args, kwargs = value
            args = list(args)
            for position, split in self.inputs.items():
                if position < len(args) and isinstance(args[position], torch.Tensor):
                    args[position] = split.local(args[position])
            return tuple(args), kwargs
        if isinstance(self.output, Partial):
            if memo is None:
                return value
            output = self.output
            return _first(value, lambda tensor: output.local(tensor, *memo))
        return _first(value, self.output.local) if self.output else value


def _first(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
        return (fn(value[0]), *value[1:])
    return value


def _classes(module: torch.nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def sharding_for(module: torch.nn.Module, rank: int, size: int) -> SiteSharding | None:
    """The sharding of a vLLM module's values, or None when they are whole on every rank.

    A row-parallel layer built with ``reduce_results=False`` gives partial sums, which
    blocks see summed (`Partial`), and so does a fused-MoE layer (vLLM's ``MoERunner``)
    whose final all-reduce is left to the block around it.
    """
    if size == 1:
        return None
    names = _classes(module)
    if "MoERunnerInterface" in names or "MoERunner" in names:
        config = getattr(module, "moe_config", None)
        sequence_parallel = getattr(config, "is_sequence_parallel", False)
        deferred = getattr(config, "skip_final_all_reduce", False) and not sequence_parallel
        return SiteSharding(output=Partial(size)) if deferred else None
    if "QKVParallelLinear" in names:
        replicas = module.num_kv_head_replicas
        widths = (
            module.num_heads * module.head_size,
            module.num_kv_heads * module.head_size,
            module.num_kv_heads * module.v_head_size,
        )
        return SiteSharding(output=Split(widths, (1, replicas, replicas), rank, size))
    if "MergedColumnParallelLinear" in names:
        widths = tuple(part // size for part in module.output_sizes)
        return SiteSharding(output=Split(widths, (1,) * len(widths), rank, size))
    if "ColumnParallelLinear" in names:
        if getattr(module, "gather_output", False):
            return None
        return SiteSharding(output=Split.even(module.output_size_per_partition, rank, size))
    if "RowParallelLinear" in names:
        output = None if getattr(module, "reduce_results", True) else Partial(size)
        inputs = {}
        if getattr(module, "input_is_parallel", True):
            inputs = {0: Split.even(module.input_size_per_partition, rank, size)}
        return SiteSharding(output=output, inputs=inputs) if output or inputs else None
    return None


def attention_sharding(qkv: torch.nn.Module, rank: int, size: int) -> SiteSharding:
    """The attention op after a fused q/k/v projection: called ``(q, k, v)`` with this rank's
    heads; returns this rank's heads."""
    heads = qkv.num_heads * qkv.head_size
    kv = Split((qkv.num_kv_heads * qkv.head_size,), (qkv.num_kv_head_replicas,), rank, size)
    values = Split((qkv.num_kv_heads * qkv.v_head_size,), (qkv.num_kv_head_replicas,), rank, size)
    return SiteSharding(
        output=Split.even(qkv.num_heads * qkv.v_head_size, rank, size),
        inputs={0: Split.even(heads, rank, size), 1: kv, 2: values},
    )


def activation_sharding(intermediate: int, rank: int, size: int) -> SiteSharding:
    """``act_fn`` between a fused gate/up projection and the down projection: its input is
    ``[gate | up]`` of this rank, its output this rank's slice of the intermediate."""
    piece = intermediate // size
    return SiteSharding(output=Split.even(piece, rank, size), inputs={0: Split((piece, piece), (1, 1), rank, size)})


def model_shardings(root: torch.nn.Module, rank: int, size: int) -> dict[torch.nn.Module, SiteSharding]:
    """Every module of ``root`` whose values are split across ranks, with how."""
    found: dict[torch.nn.Module, SiteSharding] = {}
    if size == 1:
        return found
    for module in root.modules():
        sharding = sharding_for(module, rank, size)
        if sharding is not None:
            found[module] = sharding
        gate_up = getattr(module, "gate_up_proj", None)
        act_fn = getattr(module, "act_fn", None)
        if gate_up is not None and act_fn is not None and "MergedColumnParallelLinear" in _classes(gate_up):
            found[act_fn] = activation_sharding(gate_up.output_sizes[0], rank, size)
        down = getattr(module, "down_proj", None)
        if (
            module not in found
            and down is not None
            and "RowParallelLinear" in _classes(down)
            and not getattr(down, "reduce_results", True)
        ):
            # An MLP ending in a partial-sum projection (an MoE block's shared expert): its
            # output is the projection's, partial too (scaled by a whole gate at most).
            found[module] = SiteSharding(output=Partial(size))
        qkv = getattr(module, "qkv_proj", None)
        attn = getattr(module, "attn", None)
        if qkv is not None and attn is not None and "QKVParallelLinear" in _classes(qkv):
            found[attn] = attention_sharding(qkv, rank, size)
    return found
