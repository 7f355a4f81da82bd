"""One training step of one rank of any layout, on fake tensors (or real ones), under the memory tracker.

    cfg = compose(["model=llama_7b", "method=lost_7b", "precision=coat", "parallel.tp=2"])
    report = measure_step(cfg, rank=0)          # fake tensors: shapes only
    report = measure_step(cfg, fake=False)      # the same step on real CPU tensors (validation)

Several ranks for real: megaeff/train/memory/real_step.py (gloo processes; tools/bench/planner_validate.py).

Everything is the training code itself: the model is built on the meta device (`build_llama`), laid out and
materialized by `parallelize` (materialization onto fake CPU tensors, so nothing is allocated), the optimizer
comes from `build_optimizer`, the LR schedule from megaeff/optim/schedule.py, and the step is
`StepRunner.run` (megaeff/train/step_runner.py), the trainer's own step. Only the data is synthetic: the
micro-batches (`train.grad_accum` of them, `train.micro_batch_size` x `data.seq_len` random token ids, real
tensors, no packing positions / segment ids) are made inside the tracker.

Why fake CPU tensors (`FakeTensorMode`) and not the meta device: kernels are chosen by device. On meta, CPU
autocast (precision=bf16, COAT on bf16) would not apply and SDPA would take its math path (T x T scores)
instead of the CPU flash kernel the real step runs; fake CPU tensors take the real CPU choices, which is what
makes the fake peak equal the real one to the byte. The build needs care (`_FakeOffMeta`, `_fake_build`).

The other ranks exist only as torch's "fake" process-group backend (`torch.testing._internal.distributed.
fake_pg.FakeStore` + `init_process_group("fake")`): every collective and p2p op is accepted with its real
shapes and does nothing, so this rank runs exactly its own part of the layout (its pipeline stage, tensor /
context / FSSDP shards, gradient buckets) in one process. Reads of fake values (`int(x)`, `float(x)`) return 1
(StepMemoryTracker's `fake_reads`): token counts, the loss and the gradient norm only steer the non-finite guard
and clipping, never an allocation. Ops on real tensors stay real (megaeff/train/memory/fake_ops.py), so shapes
that depend on the token ids are exact; where they depend on other ranks' tokens (FSSDP's sparse embedding
exchange) every rank is taken to mirror this one. Shapes that depend on activation values (MoE routing) cannot
be known, so a MoE model is refused. Kernels are the CPU's: COAT's FP8 AdamW runs its torch reference per
parameter (its temporaries are that kernel's, not a fused GPU kernel's) and dominates the run time.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megaeff.config.optim import warmup_steps_for
from megaeff.config.parallel import resolve_degrees, validate_world
from megaeff.config.schema import Config
from megaeff.distributed.dims import AXES, ParallelDims
from megaeff.distributed.parallel_model import ParallelModel
from megaeff.distributed.parallelize import parallelize
from megaeff.distributed.pipeline.runner import PipelineRunner
from megaeff.errors import ConfigError, MegaeffError
from megaeff.layers.attention import select_attention
from megaeff.layers.grad_accum_fusion import grad_of
from megaeff.models.llama import build_llama
from megaeff.optim.builder import build_optimizer
from megaeff.optim.schedule import LRScheduler
from megaeff.precision.fp8_activations import activation_ops
from megaeff.train.memory.tracker import MemoryReport, StepMemoryTracker
from megaeff.train.nonfinite import NonFiniteGuard
from megaeff.train.step_runner import StepRunner

CPU = torch.device("cpu")


@dataclass
class RankStep:
    """What one rank trains with: built by `build_rank`, run by `RankStep.runner.run`."""

    cfg: Config
    dims: ParallelDims
    parallel: ParallelModel
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    runner: StepRunner


def layout_world_size(cfg: Config) -> int:
    """The world of the configured layout; a dp degree of -1 (fill the world) means dp=1."""
    degrees = {axis: int(getattr(cfg.parallel, axis)) for axis in AXES}
    size = 1
    for d in degrees.values():
        size *= max(d, 1)
    return size


@contextlib.contextmanager
def fake_world(world_size: int, rank: int) -> Iterator[None]:
    """The default process group as torch's "fake" backend for this rank (nothing for a world of one)."""
    if world_size == 1:
        yield
        return
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized in this process; the fake world needs its own")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def make_dims(cfg: Config, rank: int, device: torch.device = CPU) -> ParallelDims:
    world = layout_world_size(cfg)
    if not 0 <= rank < world:
        raise MegaeffError(f"--rank {rank} is outside the layout's {world} ranks (tp x cp x dp x pp)")
    if cfg.model.moe_experts:
        raise ConfigError("model.moe_experts", "the fake-tensor step cannot size MoE's data-dependent exchanges")
    validate_world(cfg, world)
    degrees = resolve_degrees({axis: int(getattr(cfg.parallel, axis)) for axis in AXES}, world)
    dims = ParallelDims(**degrees, world_size=world, rank=rank, device=device)
    dims.build_groups()
    return dims


def build_rank(cfg: Config, dims: ParallelDims) -> RankStep:
    """This rank's model, optimizer, scheduler and step runner on `dims.device`, built as the trainer builds
    them (megaeff/train/trainer.py: `_build_model`, `_build_pipeline`, the optimizer and scheduler)."""
    t = cfg.train
    model = build_llama(cfg.model, cfg.method, device="meta", act=activation_ops(cfg.precision))
    model.attention_backend = select_attention(cfg.model.attention_backend, dims.device)
    parallel = parallelize(model, dims, cfg)
    optimizer, _ = build_optimizer(parallel.module, cfg.optim, dims.device, cfg.precision)
    scheduler = LRScheduler(
        optimizer, t.steps, warmup_steps_for(cfg.optim, t.steps), cfg.optim.min_lr_ratio, cfg.optim.schedule
    )
    pipeline = None
    if dims.pp > 1:
        pc = cfg.parallel
        pipeline = PipelineRunner(
            parallel.module,
            dims,
            parallel.chunks,
            schedule=pc.pp_schedule,
            virtual=pc.pp_virtual,
            sequence_parallel=pc.sequence_parallel and dims.tp > 1,
        )
    guard = NonFiniteGuard(t.nonfinite, t.nonfinite_max_consecutive)
    runner = StepRunner(cfg, dims, parallel, optimizer, scheduler, pipeline, guard)
    return RankStep(cfg, dims, parallel, optimizer, scheduler, runner)


def make_batches(cfg: Config, device: torch.device = CPU, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    """`train.grad_accum` micro-batches of `micro_batch_size` x `seq_len` token ids (labels: the inputs), random
    (fake under a FakeTensorMode)."""
    t, n = cfg.train, cfg.data.seq_len
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(t.grad_accum):
        ids = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, n), generator=gen, device=device)
        out.append({"inputs": ids, "labels": ids.clone()})
    return out


_INDEX_DRAWS = (torch.ops.aten.randint, torch.ops.aten.randperm)


def _real_in_build(func, args, kwargs) -> bool:
    """Whether an op of the build runs on real tensors (`_FakeOffMeta`)."""
    if func.overloadpacket in _INDEX_DRAWS or kwargs.get("generator") is not None:
        return not any(isinstance(t, FakeTensor) for t in tree_leaves((args, kwargs)))
    tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    device = kwargs.get("device")
    if device is not None and torch.device(device).type == "meta":
        return True
    if device is None and any(t.is_meta and not isinstance(t, FakeTensor) for t in tensors):
        return True
    if any(isinstance(t, FakeTensor) for t in tensors):
        return False
    dtype = kwargs.get("dtype") or (tensors[0].dtype if tensors else None)
    if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
        return True  # integer: sparse supports, channel sets, shard bounds
    return bool(tensors) and not any(t.is_meta for t in tensors)


class _FakeOffMeta(TorchDispatchMode):
    """How the rank is built on fake tensors: an op whose result is on the meta device stays a real meta op; an
    integer op and an op on real CPU tensors only stay real (the indices a layer derives from the seed, SLTrain's
    supports and their tensor-parallel shards, FSSDP's row bounds: shapes depend on their values, and the step
    computes with them on the real batch); every other op, the floating-point tensors from materialization on,
    runs under `fake_mode`.

    Why meta stays real: the logical model and the modules the layout adds before materialization must be real
    meta tensors, because `Module.to_empty` swaps a fake parameter for its materialized one with
    `torch.utils.swap_tensors`, which refuses tensors the fake mode's converter holds weak references to (every
    fake `nn.Parameter`)."""

    def __init__(self, fake_mode: FakeTensorMode):
        super().__init__()
        self.fake_mode = fake_mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _real_in_build(func, args, kwargs):
            return func(*args, **kwargs)
        with self.fake_mode:
            return func(*args, **kwargs)


@contextlib.contextmanager
def _fake_build(fake_mode: FakeTensorMode) -> Iterator[None]:
    """`_FakeOffMeta` during materialization (which then runs LOST's SVDs in this thread: megaeff/models/init.py
    sees the dispatch mode and does not start its thread pool, whose threads would not inherit it)."""
    with _FakeOffMeta(fake_mode):
        yield


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages of `tensors` (views share theirs)."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def measure_step(
    cfg: Config,
    rank: int = 0,
    *,
    fake: bool = True,
    step: int = 0,
    tracker_cls=StepMemoryTracker,
    seed: int = 0,
    warm_steps: int = 0,
) -> MemoryReport:
    """Peak live bytes of one training step of `rank` (module docstring), with the breakdown at the peak.
    `tracker_cls`: StepMemoryTracker or a variant (tests check that wrong variants disagree); `seed`: the
    token ids' (`make_batches`), for a rank whose batch differs (tools/bench/planner_validate.py);
    `warm_steps`: steps run untracked first, so that the tracked one is a later step (its optimizer state exists
    from the start: a first step's forward and backward do not hold it yet)."""
    dims_world = layout_world_size(cfg)
    if not fake and dims_world > 1:
        raise ConfigError("parallel", "a real-tensor step runs a single-rank layout only (its collectives are real)")
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")  # SavedBytes on fakes
    with fake_world(dims_world, rank):
        dims = make_dims(cfg, rank)
        with _fake_build(fake_mode) if fake else contextlib.nullcontext():
            rs = build_rank(cfg, dims)
        tracker = tracker_cls(rs.parallel.module, rs.optimizer, fake_reads=fake)
        with fake_mode or contextlib.nullcontext():
            for s in range(warm_steps):  # under a tracker of their own: it answers the fake value reads
                with StepMemoryTracker(rs.parallel.module, rs.optimizer, fake_reads=fake):
                    with unset_fake_temporarily():
                        batches = make_batches(cfg, seed=seed)
                    rs.runner.run(batches, step + s)
                    del batches
            dims.comm_stats.reset()  # the build's and the warm steps' collectives are not the step's
            with tracker:
                with unset_fake_temporarily():  # real token ids: routing by token (FSSDP's embedding) is exact
                    batches = make_batches(cfg, seed=seed)
                metrics = rs.runner.run(batches, step + warm_steps)
                del batches
        report = tracker.report()
        state = [t for st in rs.optimizer.state.values() for t in tree_leaves(st) if isinstance(t, torch.Tensor)]
        # Counted apart from the tracker, for checks: what the rank's parameters, gradients and optimizer hold.
        report.extra.update(
            param_bytes=storage_bytes(rs.parallel.module.parameters()),
            grad_bytes=storage_bytes(g for g in map(grad_of, rs.parallel.module.parameters()) if g is not None),
            optimizer_state_bytes=storage_bytes(state),
            act_saved_bytes=int(metrics["act_saved_bytes"]),
        )
        # The payload bytes of every collective of the step, keyed "<axis>/<kind>" (megaeff/distributed/comm.py):
        # the fake process group accepts each call with its real shapes, so these are the real step's counts.
        report.extra["comm_bytes"] = dims.comm_stats.snapshot()
    report.extra.update(
        layout={axis: dims.size(axis) for axis in AXES},
        rank=rank,
        fake=fake,
        optimizer_stepped=tracker.optimizer_steps > 0,
        loss=None if fake else metrics["loss"],
    )
    return report


def reference_peak(cfg: Config, step: int = 0) -> Optional[Dict[str, int]]:
    """The same step on real CPU tensors (single-rank layouts) under torch's own tracker,
    `torch.distributed._tools.mem_tracker.MemTracker`, which shares no code with StepMemoryTracker: its peak
    (`"Total"`) and its categories at the peak (its own: activations = everything a forward made). None where
    MemTracker cannot follow the step: it reads `untyped_storage()` of every op output, which a sparse CSR
    tensor (SLTrain's sparse path) does not have. One micro-batch per step (`train.grad_accum=1`): MemTracker refuses
    a second forward of the same module in one tracking context."""
    from torch.distributed._tools.mem_tracker import MemTracker

    if layout_world_size(cfg) > 1:
        raise ConfigError("parallel", "the real-tensor reference runs a single-rank layout only")
    dims = make_dims(cfg, 0)
    rs = build_rank(cfg, dims)
    mt = MemTracker()
    mt.track_external(rs.parallel.module, rs.optimizer)
    try:
        with mt:
            batches = make_batches(cfg)
            rs.runner.run(batches, step)
            del batches
    except NotImplementedError as exc:
        if "SparseCsr" not in str(exc):
            raise
        return None
    snap = mt.get_tracker_snapshot("peak")[CPU]
    return {str(getattr(k, "value", k)): int(v) for k, v in snap.items()}
