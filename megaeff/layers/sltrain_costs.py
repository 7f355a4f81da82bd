"""SLTrain's path costs measured on this machine at start-up (`method.sltrain_costs=measured`, the default) and kept
in the run directory, so that a resumption takes the same paths (`fixed` keeps the constants instead).

The auto rule (sltrain_ops.path_costs) prices both compute paths in dense-GEMM multiply-adds. Its one
machine-dependent number is c, what one multiply-add of the sparse kernels costs in those units; the constants
SPARSE_COST_TRAIN / SPARSE_COST_FORWARD were fitted on one CPU. Here c is measured per shape instead:
- one dense GEMM [T, n'] x [n', m'] and the layer's own sparse product (`SparseMatmul`: the CSR product, and in
  training also its transposed and sampled products through autograd) on [T, n'] random data are timed in
  alternation, ROUNDS times (only once if the first round takes BUDGET_S or more) after one warm-up of each.
  T is the run's tokens per call, clamped to [MIN_TOKENS, MAX_TOKENS] (DEFAULT_TOKENS when not given): the
  sparse kernels have a large per-call part (on the loaded 2-core CPU c came out near 300 at 64 tokens, 140 at
  256 and 50 at 1,024 for the same shape), so c is measured as it is amortized at the run's call size;
- c = the median over rounds of (sparse seconds per token and nonzero) / (GEMM seconds per multiply-add): pairing
  the two within a round cancels slow changes of the machine's load, the median drops rounds another job hit;
- shapes wider than MAX_SIDE are measured on a MAX_SIDE-wide block of the same density (the rates, not the sizes,
  are what the rule needs), so one shape costs a bounded time whatever the model size (about 0.1-0.3 s on a
  2-core CPU; seconds when the machine is heavily oversubscribed).
Results are cached per (m, n, nnz, dtype, device, training) for the process (`measured_sparse_cost`), and per run
in `<run_dir>/sltrain_costs.json` (sltrain_cost_file.py; `calibrate_paths(..., cache=path)`): at start-up global
rank 0 reads the costs the file holds instead of measuring them, measures only the shapes it lacks and rewrites it
with them. A resumption into the same run directory therefore takes the paths the run took, on any machine; a new
run directory measures afresh. A file that cannot be read stops every rank with one error naming it.

Every rank must take the same path (paths differ in round-off, and the ranks of a replica compute the same layers).
Measurements differ from rank to rank, so `calibrate_paths(model)`, called by every rank at the same point of
start-up, measures each distinct shape of the union of all ranks' layers on global rank 0 only and broadcasts the
costs (integer keys and float64 costs in tensors: nothing is pickled). A layer that was not calibrated uses the
fixed constants (the same on every rank and in every process) rather than decide from timings of its own.
`method.sltrain_costs=fixed` keeps the constants always, and `method.sltrain_path=dense|sparse` forces a path, for
runs that must be reproducible bit for bit across machines, processes or layouts (measured costs differ from run
to run and per shard shape, so two runs in different run directories, or under layouts that split the layers
differently, may take different paths and differ in round-off).

Timings enter through a `timer(what, fn) -> seconds` so the chooser's logic is tested with injected timings.
"""

from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

from megaeff.errors import MegaeffError
from megaeff.layers.sltrain_cost_file import CostFileError, file_key, load_costs, save_costs
from megaeff.layers.sltrain_ops import SparseMatmul, sample_support

MAX_SIDE = 1024
MIN_TOKENS, DEFAULT_TOKENS, MAX_TOKENS = 64, 256, 1024
ROUNDS = 3
BUDGET_S = 0.2  # per shape and mode: on a quiet 2-core CPU a llama_60m shape takes ~0.1 s in all
COSTS = ("measured", "fixed")

Timer = Callable[[str, Callable[[], object]], float]
Key = Tuple[int, int, int]  # (m, n, nnz) of one layer shape


def seconds(what: str, fn: Callable[[], object]) -> float:
    """The default timer: the wall time of one run of `fn`."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measured_shape(m: int, n: int, nnz: int) -> Key:
    """The block actually timed: at most MAX_SIDE per side, the same density, at least one nonzero."""
    m2, n2 = min(m, MAX_SIDE), min(n, MAX_SIDE)
    return m2, n2, max(1, min(m2 * n2, round(nnz * m2 * n2 / (m * n))))


def measure_tokens(tokens: Optional[int]) -> int:
    return DEFAULT_TOKENS if tokens is None else max(MIN_TOKENS, min(MAX_TOKENS, int(tokens)))


def measure_sparse_cost(
    m: int,
    n: int,
    nnz: int,
    dtype: torch.dtype,
    device,
    training: bool,
    timer: Timer = seconds,
    tokens: Optional[int] = None,
) -> float:
    """c: one sparse multiply-add (forward, or forward + backward when `training`) in dense-GEMM multiply-adds,
    at `tokens` per call (module docstring)."""
    m2, n2, nnz2 = measured_shape(m, n, nnz)
    T = measure_tokens(tokens)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(m2, n2, generator=gen).to(device, dtype)
    x = torch.randn(T, n2, generator=gen).to(device, dtype)
    dy = torch.randn(T, m2, generator=gen).to(device, dtype)
    index = sample_support(m2 * n2, nnz2, gen).to(device)
    values = torch.randn(nnz2, generator=gen).to(device, dtype)

    def sparse():
        if not training:
            with torch.no_grad():
                return SparseMatmul.apply(x, values, index, m2, n2)
        xs, vs = x.detach().requires_grad_(True), values.detach().requires_grad_(True)
        SparseMatmul.apply(xs, vs, index, m2, n2).backward(dy)

    kind = torch.device(device).type

    def synced(fn):  # a CUDA kernel's time is that of its completion, not of its launch
        return (lambda: (fn(), torch.cuda.synchronize())) if kind == "cuda" else fn

    gemm, sparse = synced(lambda: x @ w.t()), synced(sparse)
    what = "sparse_train" if training else "sparse_forward"
    ratios = []
    with torch.autocast(kind, enabled=False), torch.enable_grad():
        gemm(), sparse()  # warm-up: allocations, kernel selection, lazy initialization
        for _ in range(ROUNDS):
            gemm_s, sparse_s = timer("gemm", gemm), timer(what, sparse)
            per_mac = max(gemm_s, 1e-12) / (T * m2 * n2)
            ratios.append((sparse_s / (T * nnz2)) / per_mac)
            if len(ratios) == 1 and gemm_s + sparse_s >= BUDGET_S:  # the first round took the budget: it is the result
                break
    return statistics.median(ratios)


@functools.lru_cache(maxsize=None)
def measured_sparse_cost(
    m: int, n: int, nnz: int, dtype: torch.dtype, device: str, training: bool, tokens: int = DEFAULT_TOKENS
) -> float:
    """`measure_sparse_cost` with the real timer, once per process and key."""
    return measure_sparse_cost(m, n, nnz, dtype, device, training, tokens=tokens)


def distributed_world() -> int:
    """Ranks that must agree on the paths (1 without an initialized process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _union_of_keys(keys: List[Key]) -> List[Key]:
    """Every rank's keys, sorted, identical on every rank (an all-gather of int64 rows padded to the longest)."""
    dev = _collective_device()
    count = torch.tensor([len(keys)], dtype=torch.int64, device=dev)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    rows = torch.full((int(count), 3), -1, dtype=torch.int64, device=dev)
    if keys:
        rows[: len(keys)] = torch.tensor(keys, dtype=torch.int64)
    gathered = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, rows)
    return sorted({tuple(int(v) for v in r) for g in gathered for r in g.cpu() if int(r[0]) >= 0})


def _broadcast_error(error: Optional[str]) -> Optional[str]:
    """Rank 0's error message (None: none) on every rank, as int64 length + uint8 bytes: nothing is pickled."""
    dev = _collective_device()
    data = (error or "").encode()
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    dist.broadcast(size, src=0)
    if int(size) == 0:
        return None
    buf = torch.tensor(list(data), dtype=torch.uint8) if data else torch.empty(int(size), dtype=torch.uint8)
    buf = buf.to(dev)  # rank 0 sends its bytes, the others receive into as many
    dist.broadcast(buf, src=0)
    return bytes(buf.cpu().tolist()).decode()


def _costs_of(
    pairs: List[Tuple[Key, bool]], dtype: torch.dtype, device, timer: Optional[Timer], tokens, cache
) -> List[float]:
    """Rank 0's costs of `pairs`: read from the `cache` file where it has them, else measured (and the file
    rewritten with them)."""

    def measure(key: Key, training: bool) -> float:
        if timer is not None:
            return measure_sparse_cost(*key, dtype, device, training, timer, tokens)
        return measured_sparse_cost(*key, dtype, str(device), training, measure_tokens(tokens))

    keys = {p: file_key(*p, measure_tokens(tokens), dtype, device) for p in pairs}
    stored = load_costs(cache) if cache is not None else {}
    new = {keys[p]: measure(*p) for p in pairs if keys[p] not in stored}
    if cache is not None and new:
        save_costs(cache, {**stored, **new}, device)
    known = {**stored, **new}
    return [known[keys[p]] for p in pairs]


def agreed_costs(
    keys: Iterable[Key],
    dtype: torch.dtype,
    device,
    timer: Optional[Timer] = None,
    tokens: Optional[int] = None,
    cache: Optional[Path] = None,
) -> Dict[Tuple[Key, bool], float]:
    """{(key, training): c} for every key of every rank, the same on every rank: global rank 0 reads them from the
    `cache` file (sltrain_cost_file.py) or measures them. A bad cache file raises on every rank."""
    keys = sorted(set(keys))
    world = distributed_world()
    if world > 1:
        keys = _union_of_keys(keys)
    pairs = [(key, training) for key in keys for training in (True, False)]
    if world == 1:
        return dict(zip(pairs, _costs_of(pairs, dtype, device, timer, tokens, cache)))
    costs, error = torch.zeros(len(pairs), dtype=torch.float64), None
    if dist.get_rank() == 0:
        try:
            costs = torch.tensor(_costs_of(pairs, dtype, device, timer, tokens, cache), dtype=torch.float64)
        except CostFileError as exc:  # the others would wait for the costs forever
            error = str(exc)
    error = _broadcast_error(error)
    if error is not None:
        raise MegaeffError(error if dist.get_rank() == 0 else f"{error} (reported by rank 0)")
    costs = costs.to(_collective_device())
    dist.broadcast(costs, src=0)
    return dict(zip(pairs, costs.cpu().tolist()))


def calibrate_paths(
    model: torch.nn.Module,
    tokens: Optional[int] = None,
    dtype=None,
    device=None,
    timer: Optional[Timer] = None,
    cache: Optional[Path] = None,
) -> int:
    """Measure and store the sparse cost of every SLTrain layer of `model` that chooses its path from measured
    costs (`path=auto`, `costs=measured`). Every rank calls it at the same point of start-up (it runs collectives
    when a process group is initialized, also on ranks without such layers). `tokens`: the run's tokens per call
    (micro-batch x sequence length; rank 0's value is used). `dtype`/`device`: what the layers compute in
    (default: the first such layer's parameters; the sparse kernels run in fp32 or fp64 on CPU).
    `cache`: the run's cost file (`<run_dir>/sltrain_costs.json`): costs it holds are used, not measured; costs
    measured are added to it. Returns the number of layers calibrated.

    The trainer calls it once the model is parallelized: `calibrate_paths(model, tokens_per_call, cache=...)`."""
    layers = [mod for mod in model.modules() if getattr(mod, "wants_measured_costs", False)]
    if not layers and distributed_world() == 1:
        return 0
    param = layers[0].A if layers else None
    dtype = dtype or (param.dtype if param is not None else torch.float32)
    device = device or (param.device if param is not None and param.device.type != "meta" else "cpu")
    costs = agreed_costs([layer.cost_key() for layer in layers], dtype, device, timer, tokens, cache)
    for layer in layers:
        layer.sparse_costs = {training: costs[(layer.cost_key(), training)] for training in (True, False)}
    return len(layers)
