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


def init_default_group(host: str, port: int, rank: int, world_size: int, timeout_s: float = 600.0,
                       backend: str | None = None) -> socket.socket | None:
    """Join the default group; returns rank 0's listening socket (close it after
    ``destroy_process_group``), else None."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if host in LOOPBACK:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    listener = socket.create_server((host, port)) if rank == 0 else None
    store = dist.TCPStore(host, port, world_size, rank == 0, datetime.timedelta(seconds=timeout_s),
                          wait_for_workers=False, master_listen_fd=listener.fileno() if listener else None)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return listener


def destroy_default_group(listener: socket.socket | None) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    if listener is not None:
        listener.close()
