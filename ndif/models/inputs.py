"""Turning what researchers pass as a language model's input into batch rows.

An invoke's input may be a string, a list of strings, token ids (a list, a list
of lists, a 1-D or 2-D tensor), or a tokenizer encoding (a dict with
``input_ids`` and optionally ``attention_mask``). Every form becomes a list of
rows of token ids; rows from all invokes are then left-padded into one batch, so
position ``-1`` is every row's real last token.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch

Row = list[int]


def _rows_from_ids(ids: Any, mask: Any = None) -> list[Row]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
            mask = None if mask is None else torch.as_tensor(mask).reshape(1, -1)
        if ids.dim() != 2:
            raise ValueError(f"token ids must be a 1-D or 2-D tensor, got shape {tuple(ids.shape)}")
        if mask is not None:
            mask = torch.as_tensor(mask)
            return [[int(t) for t, m in zip(row, row_mask) if m] for row, row_mask in zip(ids.tolist(), mask.tolist())]
        return [list(map(int, row)) for row in ids.tolist()]
    if isinstance(ids, (list, tuple)) and ids and all(isinstance(t, int) for t in ids):
        return [list(ids)]
    if isinstance(ids, (list, tuple)) and ids and all(isinstance(r, (list, tuple)) for r in ids):
        if mask is not None:
            return [[int(t) for t, m in zip(row, row_mask) if m] for row, row_mask in zip(ids, mask)]
        return [list(map(int, row)) for row in ids]
    raise TypeError(f"cannot read token ids from {type(ids).__name__}")


class InputProcessor:
    """Tokenizes invoke inputs and pads them into one batch for one model."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # A fast tokenizer is not safe to call from two threads at once.
        self._lock = threading.Lock()

    def rows(self, inputs: tuple, kwargs: dict) -> list[Row]:
        """The token-id rows of one invoke's input."""
        if not inputs:
            if "input_ids" in kwargs:
                return _rows_from_ids(kwargs["input_ids"], kwargs.get("attention_mask"))
            return []
        if len(inputs) > 1:
            raise TypeError(f"an invoke takes one input (a prompt, a list of prompts or token ids), got {len(inputs)}")
        value = inputs[0]
        if isinstance(value, str):
            return [self._encode(value)]
        if isinstance(value, (list, tuple)) and value and all(isinstance(item, str) for item in value):
            return [self._encode(item) for item in value]
        if isinstance(value, Mapping):
            if "input_ids" not in value:
                raise TypeError("an encoding passed as input must have 'input_ids'")
            return _rows_from_ids(value["input_ids"], value.get("attention_mask"))
        if isinstance(value, (list, tuple)) and not value:
            raise ValueError("an empty list is not an input")
        return _rows_from_ids(value, kwargs.get("attention_mask"))

    def _encode(self, text: str) -> Row:
        if self.tokenizer is None:
            raise TypeError("this model has no tokenizer: pass token ids, or give LanguageModel a tokenizer")
        with self._lock:
            ids = self.tokenizer(text)["input_ids"]
        if not ids:
            raise ValueError(f"the prompt {text!r} tokenizes to no tokens")
        return list(ids)

    def pad_id(self) -> int:
        tokenizer = self.tokenizer
        if tokenizer is not None:
            for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
                if candidate is not None:
                    return int(candidate)
        return 0

    def batch(self, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad ``rows`` into ``(input_ids, attention_mask)``."""
        width = max(len(row) for row in rows)
        pad = self.pad_id()
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            if row:
                ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
                mask[index, width - len(row) :] = 1
        return ids, mask
