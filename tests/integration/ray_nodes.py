"""Stopping a `ray start --block` process that a test started, for the tests that run
their own Ray nodes (test_launch_ray.py, test_multinode_ray.py)."""

from __future__ import annotations

import os
import signal
import subprocess

import psutil


def stop_ray_start(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM the `ray start --block` process (it stops what it started), or its whole
    process group when it leads one of its own, then kill by pid whatever of its process
    tree is still alive. Only processes this test started are touched."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    try:
        if os.getpgid(proc.pid) == proc.pid:  # started with start_new_session=True
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=10)
    for child in alive:
        child.kill()
    psutil.wait_procs(alive, timeout=5)
