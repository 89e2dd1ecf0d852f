"""The vLLM backend: `VLLM`, a vLLM engine traced with ndif's API (needs ``vllm``, a GPU).

``model.py`` the user's class; ``loop.py`` the engine's thread; ``runner.py`` the hooks in
vLLM's model runner; ``requests.py`` a trace as requests; ``tp.py``, ``rank.py`` and
``extension.py`` tensor parallelism (blocks on every worker rank, split values made whole).

The only place in ``ndif`` that imports vLLM; ``import ndif`` never loads it
(``ndif.VLLM`` resolves here on first use). See ``docs/vllm.md``.
"""

from .model import VLLM

__all__ = ["VLLM"]
