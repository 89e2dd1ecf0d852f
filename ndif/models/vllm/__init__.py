"""The vLLM backend: `VLLM`, a vLLM engine traced with ndif's API (needs ``vllm``, a GPU).

The only place in ``ndif`` that imports vLLM; ``import ndif`` never loads it
(``ndif.VLLM`` resolves here on first use). See ``docs/vllm.md``.
"""

from .model import VLLM

__all__ = ["VLLM"]
