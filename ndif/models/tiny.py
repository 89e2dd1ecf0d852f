"""Tiny random-weight causal LMs, built locally: no hub access, deterministic.

`make_tiny` writes a transformers checkpoint (``config.json``,
``model.safetensors``, ``generation_config.json``) and a byte-level BPE tokenizer
trained with ``tokenizers`` on a small embedded corpus. The same arguments give
the same files, bit for bit, on the same torch version. Tests, the demo and the
benchmarks use it; ``ndif.LanguageModel(path)`` loads it offline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

Architecture = Literal["llama", "gpt2"]
ARCHITECTURES: tuple[str, ...] = ("llama", "gpt2")

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

CORPUS = """\
The Eiffel Tower is in Paris. The Colosseum is in Rome. Madison Square Garden is in New York.
The capital of France is Paris, and the capital of Italy is Rome.
Researchers read the internals of language models: attention heads, residual streams, MLP neurons.
A steering vector is added to the residual stream to change what the model says.
A sparse autoencoder decomposes activations into features; a linear probe reads one direction.
Activation patching copies an activation from one prompt into the run on another prompt.
The logit lens decodes an intermediate hidden state with the model's own unembedding.
One two three four five six seven eight nine ten. Monday Tuesday Wednesday Thursday Friday.
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.
When Mary and John went to the store, John gave a drink to Mary.
def add(a, b): return a + b  # numbers 0 1 2 3 4 5 6 7 8 9 and symbols ( ) [ ] { } = + - * /
"""


def train_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `CORPUS`, with BOS prepended to every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def tiny_config(arch: Architecture, vocab_size: int, layers: int, hidden: int, ids: dict[str, int]):
    """The transformers config of a tiny model of ``arch``."""
    from transformers import GPT2Config, LlamaConfig

    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            initializer_range=0.1,
            tie_word_embeddings=False,
            **ids,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=512,
            initializer_range=0.1,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def make_tiny(
    path: str | os.PathLike,
    arch: Architecture = "llama",
    layers: int = 4,
    hidden: int = 64,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Write a tiny random-weight causal LM and its tokenizer to ``path``; returns it."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = tiny_config(arch, len(tokenizer), layers, hidden, ids)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config = GenerationConfig(**ids)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(target)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(target)
    return target
