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


@pytest.fixture(scope="module")
def sandbox_url():
    """A local sandbox server (any free port) for the module's tests; skips without
    bubblewrap, as tests/integration/test_sandbox.py does. A module that needs other
    server flags defines its own ``sandbox_url``."""
    import shutil

    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) not installed: apt-get install bubblewrap")
    from rlpost.sandbox.server import start_local, stop_local

    proc, url = start_local(0)
    yield url
    stop_local(proc)


@pytest.fixture()
def ray_cluster():
    """A 2-CPU Ray instance for one test, its workers at one thread. Modules that start
    theirs through rlpost's own cluster code define their own ``ray_cluster``."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()
