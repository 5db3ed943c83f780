"""The sync group's transport is chosen from every rank's device type (pure function)."""

from __future__ import annotations

import pytest

from rlpost.sync.transport import choose_backend


@pytest.mark.parametrize("types, backend", [
    (["cuda", "cuda"], "nccl"),
    (["cuda", "cuda", "cuda"], "nccl"),
    (["cpu", "cpu"], "gloo"),
    (["cuda", "cpu"], "gloo"),  # a CPU replica: the CUDA sender stages through host memory
    (["cpu", "cuda", "cuda"], "gloo"),  # a CPU trainer rank 0 with CUDA replicas
])
def test_nccl_only_when_every_rank_is_on_cuda(types, backend):
    assert choose_backend(types) == backend


def test_no_ranks_is_an_error():
    with pytest.raises(ValueError, match="at least one rank"):
        choose_backend([])
