"""What the ranks of tests/distributed/test_fssdp.py run: the tiny model, its data and loss, the plain-DP
and FSSDP training loops that record what the tests compare, and one function per test scenario (picklable by
reference for the rank pool)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from megaeff.config.schema import MethodConfig, ModelConfig, OptimConfig
from megaeff.distributed.comm import all_reduce_scalar
from megaeff.distributed.data_parallel.bucketed import GradReducer
from megaeff.distributed.fssdp.engine import FSSDP
from megaeff.distributed.grad_norm import clip_grad_norm_ as dp_clip
from megaeff.distributed.logical_state import LogicalState, annotate_parameters
from megaeff.distributed.parallelize import apply_tensor_parallel
from megaeff.distributed.tensor_parallel.sequence import loss_sum as parallel_loss_sum
from megaeff.models.init import materialize
from megaeff.models.llama import build_llama
from megaeff.optim.builder import build_optimizer
from megaeff.train import checkpoint as ckpt
from megaeff.train.checkpoint import optimizer_state_by_name
from megaeff.train.perf import state_memory

CFG = ModelConfig(name="fssdp-test", dim=64, ffn_dim=128, n_heads=2, n_layers=2, vocab_size=128, max_seq_len=16)
METHODS = {
    "dense": dict(name="dense"),
    "lowrank": dict(name="lowrank", rank=8),
    "sltrain": dict(name="sltrain", rank=8, density=0.1),  # 409 / 819 sparse values: uneven shards, padding
    "lost": dict(name="lost", rank=8, lost_channel_ratio=0.25),
}
OPTIMS = {
    "adamw": OptimConfig(name="adamw", lr=1e-2, eps=1e-6, impl="foreach"),
    "coat": OptimConfig(name="coat_adamw", lr=1e-2, eps=1e-6, min_fp8_numel=0, fp8_backend="torch"),
}
LAYOUT = {2: dict(tp=2, dp=2), 4: dict(dp=4)}
STEPS, ACCUM, B, T = 3, 2, 2, 16
MAX_NORM = 0.05  # below every step's norm: clipping is active
F32 = 4


# ----------------------------------------------------------------------------- on every rank
def build(method: str, dims=None):
    """The model from the seed; tensor-parallel only when `dims` is given with tp > 1."""
    model = build_llama(CFG, MethodConfig(**METHODS[method]), device="meta")
    if dims is not None and dims.tp > 1:
        apply_tensor_parallel(model, dims)
    model = materialize(model, torch.device("cpu"), 0, 0.02)
    annotate_parameters(model)
    return model


def batch(dims, step: int, micro: int):
    g = torch.Generator().manual_seed(1000 * step + 10 * dims.dp_rank + micro)
    tokens = torch.randint(0, CFG.vocab_size, (B, T + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def loss_sum(model, dims, x, y):
    if getattr(model, "tensor_parallel", 1) > 1:
        return parallel_loss_sum(model(x), y, dims)
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")


def logical_ostate(model, optimizer, fs=None):
    if fs is not None:
        return fs.logical_optimizer_state(optimizer)["state"]
    logical, saved = LogicalState(model), optimizer_state_by_name(model, optimizer)
    return (logical.gather_optimizer(saved) if logical.sharded else saved)["state"]


def micro_grads(dims, model):
    """This rank's gradient terms of the first step, one per micro-batch, unreduced (the model is unchanged)."""
    out = []
    for i in range(ACCUM):
        model.zero_grad(set_to_none=True)
        (loss_sum(model, dims, *batch(dims, 0, i)) / (dims.dp * ACCUM * B * T)).backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return out


def train(dims, model, optimizer, *, fs=None, reducer=None, probe=None, steps=STEPS, trace=False):
    """`steps` steps of ACCUM micro-batches in the trainer's order. Returns losses, norms, bytes per step by
    group/kind, and the first step's summed gradients (before clipping) as logical tensors; with `trace`, per
    step the clipped logical gradients and the logical optimizer state after the step."""
    tokens = dims.dp * ACCUM * B * T
    sync = reducer if reducer is not None else fs
    logical = LogicalState(model) if fs is None else fs
    losses, norms, comm, first, steps_seen = [], [], [], {}, []
    for step in range(steps):
        dims.comm_stats.reset()
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(ACCUM):
            x, y = batch(dims, step, i)
            loss = loss_sum(model, dims, x, y)
            if probe is not None:
                probe("after_forward")
            sync.prepare(final=i == ACCUM - 1)
            (loss / tokens).backward()
            if probe is not None:
                probe("after_backward")
            total += float(loss.detach())
        sync.finish()
        comm.append(dims.comm_stats.snapshot())
        if step == 0:
            grads = {n: p.grad for n, p in model.named_parameters()}
            first = {n: g.clone() for n, g in (logical.gather_model(grads) if logical.sharded else grads).items()}
        params = [p for p in model.parameters() if p.grad is not None]
        norms.append(dp_clip(params, MAX_NORM, dims, dp_sharded=fs is not None))
        if trace:
            grads = {n: p.grad for n, p in model.named_parameters()}
            steps_seen.append(
                {
                    "grads": {
                        n: g.clone() for n, g in (logical.gather_model(grads) if logical.sharded else grads).items()
                    }
                }
            )
        optimizer.step()
        if trace:
            steps_seen[-1]["ostate"] = portable(logical_ostate(model, optimizer, fs))
        losses.append(all_reduce_scalar(total, dims.group("dp"), "dp", None, dims.device) / tokens)
    return dict(losses=losses, norms=norms, comm=comm, grads=first, trace=steps_seen)


def portable(state):
    """A copy (the optimizer goes on updating its tensors in place), FP8 codes as their bytes: float8 tensors do
    not survive the pickling between processes."""

    def copy(v):
        if not torch.is_tensor(v):
            return v
        return v.view(torch.uint8).clone() if v.dtype == torch.float8_e4m3fn else v.clone()

    return {n: {k: copy(v) for k, v in st.items()} for n, st in state.items()}


def optim_tensor_bytes(optimizer) -> int:
    # The per-tensor `step` scalars are one per tensor, not state that scales with the parameter.
    return sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim() > 0
    )


def run_dp(dims, method, optim, tp_model=False):
    model = build(method, dims if tp_model else None)
    opt, _ = build_optimizer(model, OPTIMS[optim], dims.device)
    terms = [] if tp_model else micro_grads(dims, model)
    res = train(
        dims,
        model,
        opt,
        reducer=GradReducer(list(model.named_parameters()), dims, bucket_mb=0.01),
        trace=optim == "coat",
    )
    logical = LogicalState(model)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        res["eval"] = model(batch(dims, 99, 0)[0])
    res.update(
        params=logical.gather_model(state) if logical.sharded else state,
        terms=terms,
        ostate=portable(logical_ostate(model, opt)),
        mem=state_memory(model, opt) | {"optim_tensors": optim_tensor_bytes(opt)},
        sizes={n: p.numel() for n, p in model.named_parameters()},
    )
    return res


def run_fs(dims, method, optim, tp_model=False, probe_live=False, **kw):
    model = build(method, dims if tp_model else None)
    fs = FSSDP(model, dims, **kw)
    opt, _ = build_optimizer(model, OPTIMS[optim], dims.device)
    live = []
    res = train(
        dims,
        model,
        opt,
        fs=fs,
        probe=(lambda when: live.append((when, fs.live_gathered_bytes()))) if probe_live else None,
        trace=optim == "coat",
    )
    with torch.no_grad():  # evaluation: gathered, used, freed; no backward to wait for
        res["eval"] = model(batch(dims, 99, 0)[0])
    res["live_after_eval"] = fs.live_gathered_bytes()
    res.update(
        params=fs.logical_state_dict(),
        ostate=portable(fs.logical_optimizer_state(opt)["state"]),
        mem=state_memory(model, opt) | {"optim_tensors": optim_tensor_bytes(opt)},
        shards={n: tuple(p.shape) for n, p in model.named_parameters()},
        specs={n: (s.kind, s.full_numel) for n, s in fs.specs.items()},
        replicated=[n for n, _ in fs.replicated],
        padding=fs.padding_numel(),
        per_pass=fs.gather_bytes_per_pass(),
        last_step=fs.last_step,
        live=live,
        peak=fs.peak_gathered_bytes,
        sparse={r.spec.name: r.spec.bounds for r in fs.sparse_rows},
        rank=dims.dp_rank,
        dp=dims.dp,
        defer=fs.defer_accumulation,
        gathers=fs.last_gathers,
    )
    fs.remove()
    return res


def matrix_runs(dims, method):
    return {o: (run_dp(dims, method, o), run_fs(dims, method, o, defer_accumulation=True)) for o in OPTIMS}


def reshard_runs(dims, method):
    return (
        run_dp(dims, method, "adamw"),
        run_fs(dims, method, "adamw", probe_live=True, reshard_after_forward=True),
        run_fs(dims, method, "adamw", probe_live=True, reshard_after_forward=False),
    )


def dtype_runs(dims, method):
    return (
        run_dp(dims, method, "adamw"),
        *(
            run_fs(dims, method, "adamw", gather_dtype=g, reduce_dtype=r)
            for g, r in (("fp32", "fp32"), ("bf16", "fp32"), ("fp8", "fp32"), ("fp32", "bf16"))
        ),
    )


def heterogeneous_runs(dims, method, kw):
    return (
        run_dp(dims, method, "adamw"),
        run_fs(dims, method, "adamw", defer_accumulation=True, **kw),
        run_fs(dims, method, "adamw", **kw),
    )


def tensor_parallel_runs(dims, method):
    return run_dp(dims, method, "adamw", tp_model=True), run_fs(
        dims, method, "adamw", tp_model=True, defer_accumulation=True
    )


def checkpoint_round_trip(dims, method, ckpt_root):
    """With COAT state: FSSDP -> the trainer's checkpoint files (`logical=fs`) -> a single-process model, and
    back -> FSSDP both from the files and from the single-process model's state dicts; then one more step from
    the original and from a reloaded copy."""
    model = build(method)
    fs = FSSDP(model, dims)
    opt, _ = build_optimizer(model, OPTIMS["coat"], dims.device)
    train(dims, model, opt, fs=fs)
    # Copies: like state_dict(), the logical dicts alias whatever is not sharded (the norm gains, scalars).
    sd = {k: v.clone() for k, v in fs.logical_state_dict().items()}
    osd = fs.logical_optimizer_state(opt)
    osd["state"] = {
        n: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for n, st in osd["state"].items()
    }
    path = ckpt.save_checkpoint(
        Path(ckpt_root),
        3,
        model=model,
        optimizer=opt,
        trainer_state={"step": 3},
        config_yaml="",
        rank=dims.rank,
        world_size=dims.world_size,
        keep_last=1,
        logical=fs,
    )
    single = build(method)
    single_opt, _ = build_optimizer(single, OPTIMS["coat"], dims.device)
    ckpt.load_checkpoint(path, model=single, optimizer=single_opt, rank=dims.rank)  # the files hold logical tensors
    single_sd = {k: v.detach().clone() for k, v in single.state_dict().items()}
    single_osd = optimizer_state_by_name(single, single_opt)
    model2 = build(method)
    fs2 = FSSDP(model2, dims)
    opt2, _ = build_optimizer(model2, OPTIMS["coat"], dims.device)
    fs2.load_logical_state_dict(single_sd)
    fs2.load_logical_optimizer_state(opt2, single_osd)
    model3 = build(method)
    fs3 = FSSDP(model3, dims)
    opt3, _ = build_optimizer(model3, OPTIMS["coat"], dims.device)
    ckpt.load_checkpoint(path, model=model3, optimizer=opt3, rank=dims.rank, logical=fs3)
    out = dict(
        sd=sd,
        osd=portable(osd["state"]),
        single_sd=single_sd,
        single_osd=portable(single_osd["state"]),
        shards1={n: p.detach().clone() for n, p in model.named_parameters()},
        shards2={n: p.detach().clone() for n, p in model2.named_parameters()},
        shards3={n: p.detach().clone() for n, p in model3.named_parameters()},
        st1=portable(optimizer_state_by_name(model, opt)["state"]),
        st2=portable(optimizer_state_by_name(model2, opt2)["state"]),
        st3=portable(optimizer_state_by_name(model3, opt3)["state"]),
    )
    out.update(
        l1=train(dims, model, opt, fs=fs, steps=1)["losses"],
        l2=train(dims, model2, opt2, fs=fs2, steps=1)["losses"],
        after1=fs.logical_state_dict(),
        after2=fs2.logical_state_dict(),
    )
    return out


# ----------------------------------------------------------------------------- comparisons (test side)
