"""Start the trainer's default torch.distributed group without listening beyond the
host we were given.

``init_process_group("env://")`` makes the TCPStore listen on 0.0.0.0 and gloo bind
to the hostname's address. On one machine we want loopback only, so rank 0 hands the
store a socket bound to ``host`` and gloo is pointed at the loopback interface.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

LOOPBACK = ("127.0.0.1", "localhost")


def store_on(host: str, port: int, rank: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """A TCPStore whose server (rank 0) listens on ``host`` only.

    The store takes ownership of the listening socket's file descriptor and closes it
    itself, so the Python socket object is detached: closing it as well would close
    whatever file later reuses that descriptor number.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank != 0:
        return dist.TCPStore(host, port, world_size, False, timeout)
    listener = socket.create_server((host, port))
    try:
        store = dist.TCPStore(host, port, world_size, True, timeout, wait_for_workers=False,
                              master_listen_fd=listener.fileno())
    except BaseException:
        listener.close()
        raise
    listener.detach()
    return store


def init_default_group(host: str, port: int, rank: int, world_size: int, timeout_s: float = 600.0,
                       backend: str | None = None) -> None:
    """Join the default process group through a store bound to ``host``."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if host in LOOPBACK:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    store = store_on(host, port, rank, world_size, timeout_s)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def destroy_default_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
