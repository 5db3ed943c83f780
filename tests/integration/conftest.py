import socket

import pytest


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo default group on loopback for engines used in-process."""
    from rlpost.distributed import destroy_default_group, init_default_group

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_default_group("127.0.0.1", port, 0, 1, timeout_s=120, backend="gloo")
    yield
    destroy_default_group()
