"""Shared by the benchmark scripts: compose a typed megaeff config from Hydra overrides, as the CLI does."""

from __future__ import annotations

from megaeff.config import compose  # noqa: F401  (typed and validated, as the CLI composes)


def run_gloo_ranks(worker, args, world: int, timeout_s: float = 3600.0) -> list:
    """Spawn `world` processes running `worker(rank, args, port, results)` (a module-level function that puts
    `(rank, result)` on `results`); returns the results in rank order. The port is a free local one."""
    import multiprocessing as mp
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args, port, results)) for r in range(world)]
    for p in procs:
        p.start()
    per_rank = [None] * world
    for _ in range(world):
        rank, out = results.get(timeout=timeout_s)
        per_rank[rank] = out
    for p in procs:
        p.join(timeout=60)
    return per_rank


def init_gloo_rank(rank: int, world: int, port: int, timeout_s: float = 900.0):
    """In a spawned worker: one thread, the gloo process group, and the ParallelDims of pure data parallelism."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from megaeff.distributed.dims import ParallelDims

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=timedelta(seconds=timeout_s))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    dims = ParallelDims(1, 1, world, 1, world_size=world, rank=rank)
    dims.build_groups()
    return dims
