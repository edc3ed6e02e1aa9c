"""The torch.distributed rendezvous of a training run on a local Ray, on loopback.

Ray Train sets up each run's process group through torch's ``env://`` rendezvous, whose store (a TCP server in
rank 0, alive for the whole run) listens on every interface: torch gives it no address to bind, only a socket to
listen on (``master_listen_fd``). On a local Ray (no ``RAY_ADDRESS``), ``LoopbackTorchConfig`` does what Ray Train's
torch backend does, except that rank 0 serves the store from a socket bound to 127.0.0.1; gloo and NCCL keep to
the loopback interface (``preprocessing.ray_runtime``). On a cluster the ranks must reach each other, and Ray
Train's own ``TorchConfig`` is used.

Ray Train's backend hooks are its internal API (``_TorchBackend``), pinned with the Ray version in pyproject.toml;
tests/test_ray_local.py lists the sockets a run listens on.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train.torch.config import TorchConfig, _set_torch_distributed_env_vars, _TorchBackend

LOOPBACK = "127.0.0.1"
_served: list = []  # rank 0's listening socket and store, kept for the process's life (the run's)


def serve_store() -> int:
    """In rank 0: a store for the process group, listening on loopback only; returns its port."""
    server = socket.create_server((LOOPBACK, 0))
    store = dist.TCPStore(LOOPBACK, server.getsockname()[1], is_master=True, wait_for_workers=False,
                          master_listen_fd=server.fileno())
    _served[:] = [server, store]
    return server.getsockname()[1]


def join_process_group(world_rank: int, world_size: int, port: int, backend: str, timeout_s: int) -> None:
    """In every rank: the default process group, through rank 0's store."""
    timeout = timedelta(seconds=timeout_s)
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # fail on a timed-out collective, as Ray does
    store = _served[1] if world_rank == 0 else dist.TCPStore(LOOPBACK, port, world_size, False, timeout)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
        worker_group.execute(_set_torch_distributed_env_vars)  # LOCAL_RANK, RANK, WORLD_SIZE, ... as Ray sets them
        port = worker_group.execute_single(0, serve_store)
        ray.get([worker_group.execute_single_async(rank, join_process_group, world_rank=rank,
                                                   world_size=len(worker_group), port=port, backend=backend,
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """Ray Train's ``TorchConfig`` with the rendezvous on loopback (see the module docstring)."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend
