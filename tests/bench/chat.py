"""The chat API's throughput: tokens/s per user and overall, against the same replies
generated in this process.

One embedded stack (SQLite, local broker and store; `EmbeddedStack`) serves the tiny random
Llama of ``ndif.make_tiny`` with a steering vector and a probe as artifacts. Every reply is
``MAX_TOKENS`` tokens (greedy; the tiny model rarely ends early), steered, with the probe
read per token, streamed over server-sent events:

* **baseline**, same run: the same reply by ``ndif.interp.generate_with`` in this process
  (the worker's own code path, without the service);
* **1 user**: replies one after the other;
* **N users**: ``USERS`` client threads at once, each with its own key and steering scale.

Per reply: time to first token and tokens/s, both on the client's clock. Overall tokens/s
is all users' tokens over the wall time of the concurrent run. The ratios compare with the
in-process baseline (the service's share: queue, dispatcher, chunk relay, HTTP).

On this machine the client, API, dispatchers and the model worker share its cores: the
concurrent numbers measure CPU contention as much as the service. The GPU counterpart,
concurrent users on one vLLM engine, is ``tests/gpu/test_vllm_chat.py``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MAX_TOKENS = 32
REPLIES = 6
USERS = 4
MESSAGES = [{"role": "user", "content": "Tell me about the sea"}]


def run(args: Any = None) -> list[dict[str, Any]]:
    """Both stacks, one after the other; prints a table per stack; returns the numbers."""
    from tests.bench.service import production_missing

    reports = [measure("embedded")]
    missing = production_missing()
    if missing is None:
        reports.append(measure("production"))
    else:
        print(f"\nchat on the production stack skipped: {missing}")
    return reports


def _stack(kind: str, registry: Path, root: Path) -> Any:
    """The embedded stack, or the same processes on PostgreSQL, Redis and SeaweedFS."""
    from contextlib import ExitStack, contextmanager

    from ndif_scheduler.stack import EmbeddedStack
    from tests.integration.services import free_port, postgres_database, production_env, seaweedfs

    @contextmanager
    def running() -> Any:
        with ExitStack() as stack:
            env: dict[str, str] = {}
            if kind == "production":
                env = production_env(
                    stack.enter_context(postgres_database()), stack.enter_context(seaweedfs(root / "s3"))
                )
            yield stack.enter_context(
                EmbeddedStack(registry, root / kind, port=free_port(), env=env, inherit_settings=False)
            )

    return running()


def measure(kind: str) -> dict[str, Any]:
    """Start a stack of ``kind``, measure, print the table; returns the numbers."""
    import httpx
    import torch

    import ndif
    from ndif import interp
    from ndif.interp.generation import generate_with
    from ndif_workers.chat import Artifacts, build_recipe, chat_prompt
    from tests.chat_artifacts import write_artifacts

    root = Path(tempfile.mkdtemp(prefix=f"ndif-chat-bench-{kind}-"))
    model_path = ndif.make_tiny(root / "model", arch="llama")
    artifacts = write_artifacts(root / "artifacts")
    registry = root / "models.toml"
    registry.write_text(
        "[[deployments]]\n"
        f'key = "tiny-llama"\npath = "{model_path}"\ntorch_threads = 1\nmax_concurrency = {USERS}\n'
        f'artifacts = "{artifacts}"\n'
    )
    options = lambda scale: {"steer": [{"vector": "joy", "scale": scale}], "observe": {"probes": [{"probe": "mood"}]}}  # noqa: E731

    # Baseline: the worker's code path in this process.
    model = ndif.LanguageModel(str(model_path), dtype=torch.float32)
    torch.set_num_threads(1)
    prompt = chat_prompt(model.tokenizer, MESSAGES)
    recipe = build_recipe(options(2.0), Artifacts(str(artifacts)), len(interp.decoder_layers(model)))
    generate_with(model, prompt, recipe, max_tokens=MAX_TOKENS)  # warm-up
    local = []
    for _ in range(REPLIES):
        started = time.perf_counter()
        made = generate_with(model, prompt, recipe, max_tokens=MAX_TOKENS)
        local.append(len(made.tokens) / (time.perf_counter() - started))

    with _stack(kind, registry, root) as stack:
        keys = [_key(stack, f"user{n}") for n in range(USERS)]

        def reply(key: str, scale: float) -> tuple[float, float, int]:
            body = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0}
            body.update(stream=True, ndif=options(scale))
            started = time.perf_counter()
            first, tokens = None, 0
            headers = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=stack.url, timeout=120) as http:
                with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                    response.raise_for_status()
                    for line in response.iter_lines():
                        if line.startswith("data: {") and '"ndif"' in line:
                            tokens += 1
                            first = first or time.perf_counter() - started
            elapsed = time.perf_counter() - started
            return first or elapsed, tokens / elapsed, tokens

        reply(keys[0], 2.0)  # warm-up: the worker loads the artifacts
        alone = [reply(keys[0], 2.0) for _ in range(REPLIES)]
        results: list[Any] = [None] * USERS

        def user(n: int) -> None:
            results[n] = [reply(keys[n], 2.0 * (n + 1)) for _ in range(REPLIES)]

        threads = [threading.Thread(target=user, args=(n,)) for n in range(USERS)]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - began

    baseline = statistics.median(local)
    single = statistics.median(rate for _, rate, _ in alone)
    per_user = [statistics.median(rate for _, rate, _ in replies) for replies in results]
    overall = sum(tokens for replies in results for _, _, tokens in replies) / wall
    report = {
        "stack": kind,
        "max_tokens": MAX_TOKENS,
        "users": USERS,
        "in_process_tok_s": baseline,
        "one_user_tok_s": single,
        "one_user_first_token_s": statistics.median(first for first, _, _ in alone),
        "per_user_tok_s": per_user,
        "overall_tok_s": overall,
        "concurrent_first_token_s": statistics.median(first for replies in results for first, _, _ in replies),
    }
    print()
    print(
        f"Chat API ({kind} stack, tiny Llama, steered, a probe per token, {MAX_TOKENS} tokens per reply, "
        f"streamed): tokens/s on the client's clock, medians of {REPLIES} replies"
    )
    print(f"{'':<30}{'tok/s':>10}{'/in-process':>13}{'first token':>14}")
    print(f"{'in process (generate_with)':<30}{baseline:>10.1f}{1.0:>13.2f}{'':>14}")
    print(f"{'1 user':<30}{single:>10.1f}{single / baseline:>13.2f}{report['one_user_first_token_s']:>13.3f}s")
    for n, rate in enumerate(per_user):
        print(f"{f'{USERS} users: user {n}':<30}{rate:>10.1f}{rate / baseline:>13.2f}")
    print(
        f"{f'{USERS} users: overall':<30}{overall:>10.1f}{overall / baseline:>13.2f}"
        f"{report['concurrent_first_token_s']:>13.3f}s"
    )
    print(json.dumps(report))
    return report


def _key(stack: Any, name: str) -> str:
    import httpx

    response = httpx.post(
        f"{stack.url}/v1/keys", json={"name": name}, headers={"Authorization": f"Bearer {stack.admin_key}"}, timeout=30
    )
    response.raise_for_status()
    return response.json()["key"]


if __name__ == "__main__":
    run()
