"""How many broadcasts a weight-sync endpoint keeps in flight, and how many staging
buffers it keeps (pure functions; numbers by hand)."""

from __future__ import annotations

import pytest
import torch

from rlpost.sync.transport import in_flight_full, make_plan, staging_count

MiB = 2**20


@pytest.mark.parametrize("count, held, nxt, full", [
    (0, 0, 10**12, False),  # the first two always fit, whatever their size
    (1, 10**12, 10**12, False),
    (2, 60, 40, False),  # 60 + 40 = 100 bytes: exactly the window
    (2, 60, 41, True),  # 101 > 100
    (7, 70, 10, False),  # seven of 10 bytes plus one more: 80 <= 100
    (8, 10, 1, True),  # eight in flight is the depth, even with room in the window
])
def test_window_admits_two_then_up_to_depth_within_its_bytes(count, held, nxt, full):
    assert in_flight_full(count, held, nxt, window_nbytes=100) is full


def test_depth_two_is_the_old_two_deep_pipeline():
    assert in_flight_full(2, 0, 0, window_nbytes=100, depth=2) is True
    assert in_flight_full(1, 0, 0, window_nbytes=100, depth=2) is False


@pytest.mark.parametrize("packed, count", [
    (None, 0),  # no bucket needs staging: none at all
    (0, 8),  # buckets of empty tensors still need a buffer to be posted with
    (1 * MiB, 8),  # 16 fit in 16 MiB; capped at the depth
    (4 * MiB, 4),
    (9 * MiB, 2),  # one fits; never fewer than two
    (64 * MiB, 2),
])
def test_staging_buffers_fit_16_mib_between_two_and_the_depth(packed, count):
    assert staging_count(packed) == count


def test_window_is_twice_the_largest_bucket():
    # By hand: a 3 MiB fp32 tensor alone (>= 1 MiB), then two 1 KiB tensors packed
    # (1024 + 1024 bytes, 64-byte aligned): largest bucket 3 MiB, window 6 MiB.
    plan = make_plan([("a", (768, 1024), torch.float32), ("b", (256,), torch.float32), ("c", (256,), torch.float32)])
    assert [b.nbytes for b in plan.buckets] == [3 * MiB, 2048]
    assert plan.window_nbytes == 6 * MiB
    assert make_plan([]).window_nbytes == 0
