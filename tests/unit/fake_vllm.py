"""A CPU stand-in for vLLM's engine and V2 model runner, for unit tests of the vLLM backend.

`FakeEngine` schedules like vLLM (running requests first, then waiting prompts within a
token budget, whole or in chunks) and hands a flat batch to `FakeRunner`, which has the
four methods ndif's runner mixin overrides. `ToyForCausalLM` is position-wise (no
attention), so a request's rows computed in any batch equal the request computed alone.
`FakeVLLM` is `ndif.VLLM` over these: everything of the backend except vLLM itself.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ndif.models.vllm.extension import NdifWorkerExtension
from ndif.models.vllm.model import VLLM
from ndif.models.vllm.runner import attach
from ndif.models.vllm.taps import add_taps


class ToyMLP(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x))


class ToyLayer(torch.nn.Module):
    """Called as vLLM calls a decoder layer: ``(positions, hidden_states, residual)``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = ToyMLP(hidden)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: Any) -> tuple:
        residual = hidden_states if residual is None else hidden_states + residual
        return self.mlp(residual), residual


class ToyModel(torch.nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(vocab, hidden)
        self.layers = torch.nn.ModuleList(ToyLayer(hidden) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(hidden)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) + 0.01 * positions[:, None].to(self.norm.weight.dtype)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        return self.norm(hidden + residual)


class ToyForCausalLM(torch.nn.Module):
    def __init__(self, vocab: int = 64, hidden: int = 16, layers: int = 3) -> None:
        super().__init__()
        self.model = ToyModel(vocab, hidden, layers)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)


class GreedySampler:
    def sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits.argmax(dim=-1), logits


#: The stand-in engine's context length (a request with ``max_tokens=None`` runs up to it).
MAX_MODEL_LEN = 24


class FakeRunner:
    """The four methods of vLLM's V2 runner that ndif overrides, on a flat batch."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.model_config = SimpleNamespace(max_model_len=MAX_MODEL_LEN)
        self.sampler = GreedySampler()
        self.pending: Any = None
        self.forwards = 0

    def execute_model(self, scheduler_output: Any, intermediate_tensors: Any = None, dummy_run: bool = False) -> None:
        batch = self.prepare_inputs(scheduler_output, None)
        with torch.inference_mode():
            hidden = self.model(batch.input_ids, batch.positions)
        self.forwards += 1
        self.pending = (batch, hidden)

    def prepare_inputs(self, scheduler_output: Any, batch_desc: Any) -> Any:
        counts = scheduler_output.num_scheduled_tokens
        order = sorted(counts, key=lambda key: (counts[key], key))  # vLLM: decodes first, then by size
        ids, positions, starts = [], [], [0]
        for key in order:
            tokens, start = scheduler_output.step_tokens[key]
            ids.extend(tokens)
            positions.extend(range(start, start + len(tokens)))
            starts.append(len(ids))
        starts_np = np.array(starts)
        return SimpleNamespace(
            req_ids=order,
            query_start_loc_np=starts_np,
            num_tokens_after_padding=len(ids),
            input_ids=torch.tensor(ids),
            positions=torch.tensor(positions),
            logits_indices=torch.tensor(starts_np[1:] - 1),
            cu_num_logits_np=np.arange(len(order) + 1),
        )

    def sample(self, hidden_states: torch.Tensor, input_batch: Any, grammar_output: Any) -> torch.Tensor:
        logits = self.model.compute_logits(hidden_states[input_batch.logits_indices])
        sampled, _ = self.sampler.sample(logits)
        return sampled

    def sample_tokens(self, grammar_output: Any) -> dict[str, int]:
        batch, hidden = self.pending
        with torch.inference_mode():
            sampled = self.sample(hidden, batch, None)
        return dict(zip(batch.req_ids, sampled.tolist()))


@dataclass
class FakeRequest:
    external: str
    prompt: list[int]
    max_tokens: int
    params: Any = None
    computed: int = 0
    output: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


class FakeEngine:
    """Schedules like vLLM's: running requests first, then waiting prompts in the budget."""

    def __init__(self, runner: FakeRunner, budget: int = 64, chunked: bool = False) -> None:
        self.runner = runner
        self.model_config = SimpleNamespace(max_model_len=MAX_MODEL_LEN)  # as vLLM's LLMEngine has
        self.budget = budget
        self.chunked = chunked
        self.requests: dict[str, FakeRequest] = {}
        self.waiting: list[str] = []
        self.running: list[str] = []
        self.finished: set[str] = set()
        self.workers: list[Any] = []
        self.gate = threading.Event()
        self.gate.set()
        self.steps = 0
        self.chunks = 0  # prefill chunks that were not a prompt's last

    def add_request(self, external: str, prompt: dict, params: Any) -> str:
        internal = f"{external}-{len(self.requests):04x}"
        self.requests[internal] = FakeRequest(external, list(prompt["prompt_token_ids"]), params.max_tokens, params)
        self.waiting.append(internal)
        return internal

    def abort_request(self, ids: list[str], internal: bool = False) -> None:
        for key in ids:
            for queue in (self.waiting, self.running):
                if key in queue:
                    queue.remove(key)
            self.finished.add(key)

    def has_unfinished_requests(self) -> bool:
        return self.gate.is_set() and bool(self.waiting or self.running)

    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        """As vLLM's: call ``method`` on every worker (one here: `FakeWorker`), results in rank order."""
        return [getattr(worker, method)(*args) for worker in self.workers]

    def step(self) -> list[Any]:
        budget = self.budget
        counts: dict[str, int] = {}
        tokens: dict[str, tuple[list[int], int]] = {}
        cached_ids, cached_computed, new = [], [], []
        for key in self.running:
            request = self.requests[key]
            need = max(len(request.prompt) - request.computed, 1)
            count = min(need, budget)
            if count == 0:
                break
            counts[key] = count
            budget -= count
            cached_ids.append(key)
            cached_computed.append(request.computed)
        while self.waiting and budget > 0:
            key = self.waiting[0]
            request = self.requests[key]
            if len(request.prompt) > budget and not self.chunked:
                break
            count = min(len(request.prompt), budget)
            self.waiting.pop(0)
            self.running.append(key)
            counts[key] = count
            budget -= count
            new.append(
                SimpleNamespace(
                    req_id=key,
                    prefill_token_ids=list(request.prompt),
                    num_computed_tokens=0,
                    sampling_params=request.params,
                )
            )
        for key, count in counts.items():
            request = self.requests[key]
            tokens[key] = (request.tokens[request.computed : request.computed + count], request.computed)
        output = SimpleNamespace(
            scheduled_new_reqs=new,
            scheduled_cached_reqs=SimpleNamespace(req_ids=cached_ids, num_computed_tokens=cached_computed),
            num_scheduled_tokens=counts,
            total_num_scheduled_tokens=sum(counts.values()),
            finished_req_ids=self.finished,
            preempted_req_ids=None,
            step_tokens=tokens,
        )
        self.finished = set()
        self.steps += 1
        self.runner.execute_model(output)
        sampled = self.runner.sample_tokens(None)
        outputs = []
        for key, count in counts.items():
            request = self.requests[key]
            request.computed += count
            if request.computed < len(request.prompt):
                self.chunks += 1
                continue
            request.output.append(sampled[key])
            most = request.max_tokens if request.max_tokens is not None else MAX_MODEL_LEN - len(request.prompt)
            if len(request.output) >= most:
                self.running.remove(key)
                self.finished.add(key)
                outputs.append(
                    SimpleNamespace(
                        request_id=request.external,
                        finished=True,
                        outputs=[SimpleNamespace(token_ids=list(request.output))],
                    )
                )
        return outputs


class FakeVLLM(VLLM):
    """`ndif.VLLM` over `FakeEngine`/`FakeRunner` and a toy model (float64, seeded)."""

    def __init__(
        self, budget: int = 64, chunked: bool = False, seed: int = 0, layers: int = 3, taps: bool = True
    ) -> None:
        torch.manual_seed(seed)
        module = ToyForCausalLM(layers=layers).double().eval()
        if taps:
            add_taps(module)  # as vLLM's runner does when its graphs split at ndif::tap
        runner = FakeRunner(module)
        hooks = attach(runner)
        engine = FakeEngine(runner, budget=budget, chunked=chunked)
        object.__setattr__(self, "engine", engine)
        self._connect(engine, hooks, "toy-vllm", None, None)

    @staticmethod
    def _sampling_params(options: dict) -> Any:
        unknown = set(options) - {"max_tokens", "temperature", "ignore_eos", "top_p", "seed", "stop_token_ids"}
        if unknown:
            raise TypeError(f"unexpected keyword argument {sorted(unknown)[0]!r}")
        return SimpleNamespace(max_tokens=options.get("max_tokens", 16), skip_reading_prefix_cache=None)

    def hold(self) -> None:
        """Keep the engine from stepping (requests queue up) until `release`."""
        self.engine.gate.clear()

    def release(self) -> None:
        self.engine.gate.set()
        self._loop.call(lambda: None)  # wake the loop

    def run_together(self, jobs: list[Any]) -> list[Any]:
        """Run ``jobs`` (callables) in threads, all queued before the engine takes a step;
        returns what each returned, or the exception it raised."""
        results: list[Any] = [None] * len(jobs)

        def target(number: int, job: Any) -> None:
            try:
                results[number] = job()
            except BaseException as error:  # noqa: BLE001 - reported to the test
                results[number] = error

        self.hold()
        threads = [threading.Thread(target=target, args=(number, job)) for number, job in enumerate(jobs)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(self.engine.waiting) < len(jobs) and time.monotonic() < deadline:
            time.sleep(0.005)
        queued = len(self.engine.waiting)
        self.release()
        for thread in threads:
            thread.join(60)
        assert queued >= len(jobs), f"only {queued} requests of {len(jobs)} jobs were queued: {results}"
        return results


# -- tensor parallelism: a toy Llama-shaped model split across ranks like vLLM's ----------------
#
# Class names match vLLM's parallel layers (``ndif.models.vllm.tp`` picks its rules by name);
# each rank holds vLLM's slices of one seeded full model, so every world size computes the
# same function. Position-wise like `ToyForCausalLM`. Row-parallel outputs are all-reduced.


def _all_reduce(tensor: torch.Tensor, size: int) -> torch.Tensor:
    if size > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


class QKVParallelLinear(torch.nn.Module):
    def __init__(self, wq, wk, wv, heads, kv_heads, head_size, rank, size) -> None:
        super().__init__()
        self.head_size = self.v_head_size = head_size
        self.num_heads = heads // size
        self.num_kv_head_replicas = max(1, size // kv_heads)
        self.num_kv_heads = max(1, kv_heads // size)
        group = rank // self.num_kv_head_replicas
        q = wq[rank * self.num_heads * head_size : (rank + 1) * self.num_heads * head_size]
        kv = slice(group * self.num_kv_heads * head_size, (group + 1) * self.num_kv_heads * head_size)
        self.weight = torch.nn.Parameter(torch.cat([q, wk[kv], wv[kv]]))
        self.output_sizes = [
            heads * head_size,
            self.num_kv_heads * head_size * size,
            self.num_kv_heads * head_size * size,
        ]

    def forward(self, x: torch.Tensor) -> tuple:
        return torch.nn.functional.linear(x, self.weight), None


class MergedColumnParallelLinear(torch.nn.Module):
    def __init__(self, wg, wu, rank, size) -> None:
        super().__init__()
        piece = wg.shape[0] // size
        rows = slice(rank * piece, (rank + 1) * piece)
        self.weight = torch.nn.Parameter(torch.cat([wg[rows], wu[rows]]))
        self.output_sizes = [wg.shape[0], wu.shape[0]]

    def forward(self, x: torch.Tensor) -> tuple:
        return torch.nn.functional.linear(x, self.weight), None


class RowParallelLinear(torch.nn.Module):
    def __init__(self, weight, rank, size, reduce_results: bool = True) -> None:
        super().__init__()
        piece = weight.shape[1] // size
        self.weight = torch.nn.Parameter(weight[:, rank * piece : (rank + 1) * piece].clone())
        self.input_size_per_partition = piece
        self.input_is_parallel = True
        self.reduce_results = reduce_results  # False: partial sums, reduced by the caller (MoE)
        self.size = size

    def forward(self, x: torch.Tensor) -> tuple:
        output = torch.nn.functional.linear(x, self.weight)
        return (_all_reduce(output, self.size) if self.reduce_results else output), None


class Attention(torch.nn.Module):
    """Per head and position (no mixing across tokens): ``q * sigmoid(k) + v``, k/v shared by a head group."""

    def __init__(self, num_heads, num_kv_heads, head_size) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        tokens = q.shape[0]
        group = self.num_heads // self.num_kv_heads
        q = q.view(tokens, self.num_heads, self.head_size)
        k = k.view(tokens, self.num_kv_heads, self.head_size).repeat_interleave(group, dim=1)
        v = v.view(tokens, self.num_kv_heads, self.head_size).repeat_interleave(group, dim=1)
        return (q * torch.sigmoid(k) + v).reshape(tokens, -1)


class SiluAndMul(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.nn.functional.silu(x[..., :half]) * x[..., half:]


class ToyTPAttention(torch.nn.Module):
    def __init__(self, full: dict, layer: int, config: dict, rank: int, size: int) -> None:
        super().__init__()
        prefix = f"layers.{layer}."
        heads, kv_heads, head_size = config["heads"], config["kv_heads"], config["head_size"]
        self.qkv_proj = QKVParallelLinear(
            full[prefix + "wq"], full[prefix + "wk"], full[prefix + "wv"], heads, kv_heads, head_size, rank, size
        )
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_size)
        self.o_proj = RowParallelLinear(full[prefix + "wo"], rank, size)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q_size = self.qkv_proj.num_heads * self.qkv_proj.head_size
        kv_size = self.qkv_proj.num_kv_heads * self.qkv_proj.head_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class ToyTPMLP(torch.nn.Module):
    """vLLM's MLP; with ``shared``, the shared expert of an MoE block: its down projection
    leaves the all-reduce to the block (``reduce_results=False``), so its output is a partial sum."""

    def __init__(self, full: dict, layer: int, rank: int, size: int, shared: bool = False) -> None:
        super().__init__()
        prefix = f"layers.{layer}." + ("shared." if shared else "")
        self.gate_up_proj = MergedColumnParallelLinear(full[prefix + "wg"], full[prefix + "wu"], rank, size)
        self.act_fn = SiluAndMul()
        self.down_proj = RowParallelLinear(full[prefix + "wd"], rank, size, reduce_results=not shared)
        self.shared_expert = None if shared else ToyTPMLP(full, layer, rank, size, shared=True)
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        output, _ = self.down_proj(self.act_fn(gate_up))
        if self.shared_expert is not None:  # as an MoE block adds its shared expert, then reduces
            output = output + _all_reduce(self.shared_expert(x), self.size)
        return output


class ToyTPLayer(torch.nn.Module):
    def __init__(self, full: dict, layer: int, config: dict, rank: int, size: int) -> None:
        super().__init__()
        self.self_attn = ToyTPAttention(full, layer, config, rank, size)
        self.mlp = ToyTPMLP(full, layer, rank, size)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: Any) -> tuple:
        residual = hidden_states if residual is None else hidden_states + residual
        residual = self.self_attn(positions, torch.tanh(residual)) + residual
        return self.mlp(torch.tanh(residual)), residual


class ToyTPModel(torch.nn.Module):
    def __init__(self, full: dict, config: dict, rank: int, size: int) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding.from_pretrained(full["embed"])
        self.layers = torch.nn.ModuleList(ToyTPLayer(full, i, config, rank, size) for i in range(config["layers"]))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        return torch.tanh(hidden + residual)


class ToyTPForCausalLM(torch.nn.Module):
    """A Llama-shaped toy whose attention and MLP are split over ``size`` ranks as vLLM splits them."""

    CONFIG = {"vocab": 64, "hidden": 16, "heads": 4, "kv_heads": 2, "head_size": 4, "intermediate": 24, "layers": 2}

    def __init__(self, rank: int = 0, size: int = 1, seed: int = 0) -> None:
        super().__init__()
        config = self.CONFIG
        generator = torch.Generator().manual_seed(seed)

        def weight(*shape):
            return torch.randn(*shape, generator=generator, dtype=torch.float64) * 0.3

        hidden, head_size = config["hidden"], config["head_size"]
        full = {"embed": weight(config["vocab"], hidden), "lm_head": weight(config["vocab"], hidden)}
        for layer in range(config["layers"]):
            prefix = f"layers.{layer}."
            full[prefix + "wq"] = weight(config["heads"] * head_size, hidden)
            full[prefix + "wk"] = weight(config["kv_heads"] * head_size, hidden)
            full[prefix + "wv"] = weight(config["kv_heads"] * head_size, hidden)
            full[prefix + "wo"] = weight(hidden, config["heads"] * head_size)
            full[prefix + "wg"] = weight(config["intermediate"], hidden)
            full[prefix + "wu"] = weight(config["intermediate"], hidden)
            full[prefix + "wd"] = weight(hidden, config["intermediate"])
            full[prefix + "shared.wg"] = weight(config["intermediate"], hidden)
            full[prefix + "shared.wu"] = weight(config["intermediate"], hidden)
            full[prefix + "shared.wd"] = weight(hidden, config["intermediate"])
        self.model = ToyTPModel(full, config, rank, size)
        self.lm_head = torch.nn.Linear(hidden, config["vocab"], bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.lm_head.weight.copy_(full["lm_head"])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)


class FakeTPVLLM(FakeVLLM):
    """`FakeVLLM` on one rank of a tensor-parallel toy (``torch.distributed`` initialised by the caller)."""

    def __init__(self, rank: int, size: int, budget: int = 64, taps: bool = False) -> None:
        from ndif.models.vllm.tp import model_shardings

        module = ToyTPForCausalLM(rank, size).eval()
        if taps:
            add_taps(module)
        runner = FakeRunner(module)
        hooks = attach(runner)
        engine = FakeEngine(runner, budget=budget)
        object.__setattr__(self, "engine", engine)
        shardings = model_shardings(module, rank, size)
        self._connect(engine, hooks, "toy-vllm", None, None, shardings=shardings, gather=_gather(size))


def _gather(size: int) -> Any:
    def gather(tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        pieces = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(pieces, tensor)
        return torch.cat(pieces, dim=-1)

    return gather


class FakeWorker(NdifWorkerExtension):
    """A vLLM worker with ndif's extension, in this process (one rank: no collectives)."""

    def __init__(self, runner: FakeRunner) -> None:
        self.model_runner = runner

    def _ndif_hooks(self, eager_kernels: bool) -> Any:
        return attach(self.model_runner)

    def _ndif_group(self) -> tuple[int, int, Any]:
        return 0, 1, None


class FakeRanksVLLM(FakeVLLM):
    """`ndif.VLLM` as on a tensor-parallel engine: traces go to the worker(s) as wire requests."""

    def __init__(self, budget: int = 64, seed: int = 0) -> None:
        torch.manual_seed(seed)
        module = ToyForCausalLM().double().eval()
        runner = FakeRunner(module)
        engine = FakeEngine(runner, budget=budget)
        worker = FakeWorker(runner)
        engine.workers.append(worker)
        worker.ndif_install("toy-vllm")
        width = module.model.embed_tokens.embedding_dim
        engine.model_config.hf_config = SimpleNamespace(hidden_size=width)  # as vLLM's LLMEngine has
        object.__setattr__(self, "engine", engine)
        object.__setattr__(self, "worker", worker)
        self._connect_ranks(engine, "toy-vllm", None, None)

    @staticmethod
    def _sampling_params(options: dict) -> Any:
        params = FakeVLLM._sampling_params(options)
        params.extra_args = None
        return params
