"""`FlatBatcher`: one request's rows of a flat batch, private copies, edits written back."""

from __future__ import annotations

import pytest
import torch

from ndif.engine.serving import FlatBatcher, JobRows
from ndif.tracing.errors import InvokeError


def batcher(spans, total):
    flat = FlatBatcher()
    flat.layout(spans, total)
    return flat


def test_a_read_is_a_private_copy_of_the_requests_rows():
    value = torch.arange(12.0).reshape(6, 2)
    flat = batcher({"a": (0, 2), "b": (2, 5)}, 6)
    flat.prepare(["b"])
    rows = flat.narrow(value, "b")
    assert torch.equal(rows, value[2:5])
    value.zero_()  # the engine reuses its buffer
    assert rows.sum() > 0
    assert rows.untyped_storage().data_ptr() != value.untyped_storage().data_ptr()
    assert not rows.is_inference()


def test_an_in_place_edit_is_written_back_and_an_untouched_copy_is_not():
    value = torch.zeros(5, 3)
    flat = batcher({"a": (0, 2), "b": (2, 5)}, 5)
    flat.prepare(["a"])
    flat.narrow(value, "a")[:] += 1
    flat.narrow(value, "a")  # read again: the same copy, with the edit
    assert flat.narrow(value, "a").sum() == 6
    flat.commit(value)
    assert value[:2].eq(1).all() and value[2:].eq(0).all()


def test_one_shared_copy_when_the_blocks_hold_most_rows():
    value = torch.arange(10.0).reshape(5, 2)
    flat = batcher({"a": (0, 2), "b": (2, 5)}, 5)
    flat.prepare(["a", "b"])
    a, b = flat.narrow(value, "a"), flat.narrow(value, "b")
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # one copy
    assert a.shape == (2, 2) and b.shape == (3, 2)
    b[0] = -1
    flat.commit(value)
    assert value[2].eq(-1).all() and value[0, 1] == 1


def test_a_job_wide_block_gathers_and_scatters_its_requests():
    value = torch.arange(6.0).reshape(6, 1)
    flat = batcher({"a": (0, 2), "x": (2, 4), "b": (4, 6)}, 6)
    group = JobRows("job", ("a", "b"))
    flat.prepare([group])
    rows = flat.narrow(value, group)
    assert rows.flatten().tolist() == [0, 1, 4, 5]
    widened = flat.widen(value, group, torch.full((4, 1), 9.0))
    assert widened.flatten().tolist() == [9, 9, 2, 3, 9, 9]
    assert value.flatten().tolist() == [0, 1, 2, 3, 4, 5]  # replaced, not edited in place


def test_assignments_check_the_requests_row_count():
    value = (torch.zeros(5, 3), torch.zeros(5, 3))
    flat = batcher({"a": (0, 2)}, 5)
    with pytest.raises(InvokeError, match="2 row"):
        flat.widen(value, "a", (torch.ones(3, 3), torch.ones(2, 3)))
    merged = flat.widen(value, "a", (torch.ones(2, 3), value[1][:2]))
    assert merged[0][:2].eq(1).all() and merged[0][2:].eq(0).all()


def test_tensors_that_are_not_batched_pass_through():
    flat = batcher({"a": (0, 2)}, 5)
    scale = torch.ones(3)
    assert flat.narrow((torch.zeros(5, 3), scale), "a")[1] is scale
