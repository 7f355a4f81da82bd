"""Tensor and sequence parallelism of every linear method, the vocab-parallel embedding and loss, on gloo ranks.

Four spawned ranks serve both layouts (tp=2 x dp=2 and tp=4). Each rank builds the single-process layer from the
seed, runs it as the reference, runs its TP shard on the matching input shard, and returns both; the tests
compare on this side: outputs, input gradients and every compact parameter's gradient gathered to its logical
shape equal the single-process ones to 1e-10 (float64), and the byte counters equal the closed forms of
megaeff/distributed/tensor_parallel/layers.py. Bad layouts are checked in-process (they fail before any collective).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megaeff.config.schema import MethodConfig, ModelConfig, ParallelConfig
from megaeff.distributed.dims import AXES, ParallelDims
from megaeff.distributed.tensor_parallel.layers import (
    TP_CLASSES,
    VocabParallelEmbedding,
    check_tp_layout,
    parallel_linear,
    vocab_parallel_cross_entropy,
)
from megaeff.errors import ConfigError
from megaeff.layers.linear import build_linear
from megaeff.layers.ops import ActivationOps
from megaeff.layers.param_meta import param_meta
from megaeff.models.init import Initializer
from tests.distributed.harness import pool_fixture

pytestmark = pytest.mark.slow

B, S, R, E = 2, 8, 8, 8  # batch, sequence, rank, bytes per float64
T = B * S
WIDTHS = {"column": (32, 64), "row": (64, 32)}  # (in, out): an MLP's up and down projections
VOCAB, HIDDEN = 64, 32
METHODS = {
    "dense": dict(name="dense"),
    "lowrank": dict(name="lowrank", rank=R),
    "sltrain-sparse": dict(name="sltrain", rank=R, density=0.1, sltrain_path="sparse"),
    "sltrain-dense": dict(name="sltrain", rank=R, density=0.1, sltrain_path="dense"),
    "lost": dict(name="lost", rank=R, lost_channel_ratio=0.25),
}
LAYOUTS = {2: dict(tp=2, dp=2), 4: dict(tp=4)}
TOL = dict(rtol=0, atol=1e-10)

pool = pool_fixture(4)


class CountingOps(ActivationOps):
    """High precision, counting the calls that go through the policy (the FP8 seam)."""

    name = "counting"

    def __init__(self):
        self.calls = 0

    def linear(self, x, weight):
        self.calls += 1
        return super().linear(x, weight)

    def pack(self, x):  # SLTrain's densify path saves its input through the policy instead
        self.calls += 1
        return super().pack(x)


# ----------------------------------------------------------------------------- building blocks (both sides)
def logical_layer(method: str, n: int, m: int, name: str, seed: int = 3, perturb: bool = True, ops=None):
    layer = build_linear(n, m, name=name, method=MethodConfig(**METHODS[method]), act=ops)
    layer.init_weights(name, Initializer(seed, 0.02))
    if perturb:  # SLTrain's B starts at zero; make every factor matter
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return layer.double()


def data(n: int, m: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, n, generator=gen, dtype=torch.float64), torch.randn(
        B, S, m, generator=gen, dtype=torch.float64
    )


def part(t, dim, i, p):
    return t.chunk(p, dim)[i]


def local_input(x, style, sp, i, p):
    if style == "row":
        return part(x, -1, i, p)
    return part(x, 1, i, p) if sp else x


def local_output(y, style, sp, i, p):
    if style == "column":
        return part(y, -1, i, p)
    return part(y, 1, i, p) if sp else y


def run_layer(layer, x, g, stats):
    x = x.clone().requires_grad_(True)
    stats.reset()
    y = layer(x)
    fwd = stats.snapshot()
    stats.reset()
    y.backward(g)
    return y.detach(), x.grad, fwd, stats.snapshot()


# ----------------------------------------------------------------------------- rank functions
def _single_layers(dims):
    """Each method x style x SP: reference and TP results of this rank."""
    i, p = dims.tp_rank, dims.tp
    out = {}
    for method in METHODS:
        for style, (n, m) in WIDTHS.items():
            ref = logical_layer(method, n, m, f"layers.0.{style}")
            x, g = data(n, m, seed=11)
            y_ref, dx_ref, _, _ = run_layer(ref, x, g, dims.comm_stats)
            grads_ref = {k: v.grad for k, v in ref.named_parameters()}
            for sp in (False, True):
                tp = parallel_linear(ref, dims, style, sequence_parallel=sp)
                y, dx, fwd, bwd = run_layer(
                    tp, local_input(x, style, sp, i, p), local_output(g, style, sp, i, p), dims.comm_stats
                )
                out[(method, style, sp)] = dict(
                    y=y,
                    dx=dx,
                    fwd=fwd,
                    bwd=bwd,
                    grads=tp.logical_grads(),
                    params=tp.logical_params(),
                    y_ref=local_output(y_ref, style, sp, i, p),
                    dx_ref=local_input(dx_ref, style, sp, i, p),
                    grads_ref=grads_ref,
                    params_ref={k: v.detach() for k, v in ref.named_parameters()},
                    splits={k: param_meta(getattr(tp, k)).tp_split for k in tp.SPLITS},
                )
    return out


def _pairs(dims):
    """Column (h -> f) then row (f -> h), with a counting ops policy: output, input grad, bytes."""
    i, p = dims.tp_rank, dims.tp
    out = {}
    for method in METHODS:
        ops = CountingOps()
        up = logical_layer(method, 32, 64, "layers.0.mlp.up", seed=5, ops=ops)
        down = logical_layer(method, 64, 32, "layers.0.mlp.down", seed=6, ops=ops)
        x, g = data(32, 32, seed=12)
        y_ref, dx_ref, _, _ = run_layer(lambda t: down(up(t)), x, g, dims.comm_stats)  # noqa: B023 (called here)
        for sp in (False, True):
            col = parallel_linear(up, dims, "column", sequence_parallel=sp)
            row = parallel_linear(down, dims, "row", sequence_parallel=sp)
            before = ops.calls
            y, dx, fwd, bwd = run_layer(
                lambda t: row(col(t)),  # noqa: B023 (called inside run_layer, in this iteration)
                part(x, 1, i, p) if sp else x,
                part(g, 1, i, p) if sp else g,
                dims.comm_stats,
            )
            out[(method, sp)] = dict(
                y=y,
                dx=dx,
                fwd=fwd,
                bwd=bwd,
                ops_calls=ops.calls - before,
                y_ref=part(y_ref, 1, i, p) if sp else y_ref,
                dx_ref=part(dx_ref, 1, i, p) if sp else dx_ref,
            )
    return out


def _init_from_seed(dims):
    """Built on the meta device, materialized, initialized from the seed: shards of the single-process init."""
    out = {}
    for method in METHODS:
        for style, (n, m) in WIDTHS.items():
            name = f"layers.1.{style}"
            ref = logical_layer(method, n, m, name, seed=9, perturb=False)
            with torch.device("meta"):
                meta = build_linear(n, m, name=name, method=MethodConfig(**METHODS[method]))
            tp = parallel_linear(meta, dims, style).to_empty(device="cpu")
            tp.init_weights(name, Initializer(9, 0.02))
            out[(method, style)] = (tp.double().logical_params(), {k: v.detach() for k, v in ref.named_parameters()})
    return out


def _vocab(dims):
    i, p = dims.tp_rank, dims.tp
    init = Initializer(4, 0.02)
    emb = torch.nn.Embedding(VOCAB, HIDDEN)
    init("tok_embeddings.weight", emb.weight)
    emb = emb.double()
    gen = torch.Generator().manual_seed(21)
    ids = torch.randint(VOCAB, (B, S), generator=gen)
    g = torch.randn(B, S, HIDDEN, generator=gen, dtype=torch.float64)
    y_ref = emb(ids)
    y_ref.backward(g)
    out = {}
    for sp in (False, True):
        vp = VocabParallelEmbedding.from_logical(emb, dims, sequence_parallel=sp)
        dims.comm_stats.reset()
        y = vp(ids)
        fwd = dims.comm_stats.snapshot()
        y.backward(part(g, 1, i, p) if sp else g)
        fresh = VocabParallelEmbedding(VOCAB, HIDDEN, dims)
        fresh.init_weights("tok_embeddings", init)
        out[("emb", sp)] = dict(
            y=y.detach(),
            y_ref=part(y_ref, 1, i, p) if sp else y_ref,
            fwd=fwd,
            dw=vp.weight.grad,
            dw_ref=part(emb.weight.grad, 0, i, p),
            init=fresh.weight.detach(),
            init_ref=part(emb.weight.detach().float(), 0, i, p),
        )
    logits = torch.randn(B, S, VOCAB, generator=gen, dtype=torch.float64) * 3
    target = torch.randint(VOCAB, (B, S), generator=gen)
    target[0, :3] = -100
    w = torch.rand(B, S, generator=gen, dtype=torch.float64)
    full = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(full.view(-1, VOCAB), target.view(-1), reduction="none", ignore_index=-100).view(B, S)
    (ref * w).sum().backward()
    mine = part(logits, -1, i, p).clone().requires_grad_(True)
    dims.comm_stats.reset()
    loss = vocab_parallel_cross_entropy(mine, target, dims)
    fwd = dims.comm_stats.snapshot()
    dims.comm_stats.reset()
    (loss * w).sum().backward()
    out["ce"] = dict(
        loss=loss.detach(),
        loss_ref=ref.detach(),
        grad=mine.grad,
        grad_ref=part(full.grad, -1, i, p),
        fwd=fwd,
        bwd=dims.comm_stats.snapshot(),
    )
    return out


# ----------------------------------------------------------------------------- closed forms
def closed_form(method: str, style: str, sp: bool, tp: int):
    """(forward, backward) byte counters of one call, from the table in tensor_parallel.py."""
    n, m = WIDTHS[style]
    base = method.split("-")[0]
    k = int(0.25 * n)
    act = {"dense": None, "lowrank": R, "lost": R + k}.get(base)  # the width of the communicated activation
    fwd, bwd = {}, {}

    def add(d, kind, elems):
        if elems:
            d[f"tp/{kind}"] = d.get(f"tp/{kind}", 0) + elems * E

    if base == "sltrain" or base == "dense":
        act = n if style == "column" else m
    if style == "column":
        if sp:
            add(fwd, "all_gather", T * act)
            add(bwd, "reduce_scatter", T * act)
        else:
            add(bwd, "all_reduce", T * act)
        if base == "sltrain" or (sp and base in ("lowrank", "lost")):
            add(bwd, "all_reduce", R * n)  # the replicated A's gradient
    else:
        if sp:
            add(fwd, "reduce_scatter", T * act)
            add(bwd, "all_gather", T * act)
        else:
            add(fwd, "all_reduce", T * act)
        if base == "sltrain" or (sp and base == "lowrank"):
            add(bwd, "all_reduce", m * R)  # the replicated B's gradient
        if sp and base == "lost":
            add(bwd, "all_reduce", m * (R + k))  # B's and W_s's
    return fwd, bwd


def merge(a, b):
    out = dict(a)
    for key, v in b.items():
        out[key] = out.get(key, 0) + v
    return out


# ----------------------------------------------------------------------------- results, one run per layout
@pytest.fixture(scope="module")
def results(pool):
    cache = {}

    def get(tp, fn):
        if (tp, fn) not in cache:
            cache[(tp, fn)] = pool.run(fn, layout=LAYOUTS[tp])
        return cache[(tp, fn)]

    return get


def assert_close(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.allclose(a, b, **TOL), f"{what}: max abs diff {(a - b).abs().max().item():.3e}"


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["nosp", "sp"])
@pytest.mark.parametrize("style", ["column", "row"])
@pytest.mark.parametrize("method", list(METHODS))
def test_layer_matches_single_process(results, method, style, sp, tp):
    for rank, res in enumerate(results(tp, _single_layers)):
        r = res[(method, style, sp)]
        where = f"rank {rank}"
        assert_close(r["y"], r["y_ref"], f"{where} output")
        assert_close(r["dx"], r["dx_ref"], f"{where} input grad")
        assert set(r["grads"]) == set(r["grads_ref"])
        for name, ref in r["grads_ref"].items():
            assert_close(r["params"][name], r["params_ref"][name], f"{where} {name}")
            assert_close(r["grads"][name], ref, f"{where} grad of {name}")
        fwd, bwd = closed_form(method, style, sp, tp)
        assert r["fwd"] == fwd, f"{where} forward bytes"
        assert r["bwd"] == bwd, f"{where} backward bytes"
        assert "replicated" in r["splits"].values() or method == "dense"


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["nosp", "sp"])
@pytest.mark.parametrize("method", list(METHODS))
def test_column_row_pair(results, method, sp, tp):
    """A column layer feeding a row layer, as in an MLP: the single-process result, and the closed-form bytes
    (dense: one all-reduce of T x h each way without SP; all-gather + reduce-scatter each way with SP)."""
    for rank, res in enumerate(results(tp, _pairs)):
        r = res[(method, sp)]
        assert_close(r["y"], r["y_ref"], f"rank {rank} output")
        assert_close(r["dx"], r["dx_ref"], f"rank {rank} input grad")
        assert r["ops_calls"] > 0  # the activation policy is in the path
        cf, cb = closed_form(method, "column", sp, tp)
        rf, rb = closed_form(method, "row", sp, tp)
        assert r["fwd"] == merge(cf, rf) and r["bwd"] == merge(cb, rb)
        if method == "dense":
            h = 32 * T * E
            want = ({"tp/all_gather": h, "tp/reduce_scatter": h},) * 2 if sp else ({"tp/all_reduce": h},) * 2
            assert (r["fwd"], r["bwd"]) == want


@pytest.mark.parametrize("tp", [2, 4])
def test_init_from_seed_on_meta(results, tp):
    for rank, res in enumerate(results(tp, _init_from_seed)):
        for (method, style), (got, ref) in res.items():
            for name in ref:
                assert_close(got[name], ref[name], f"rank {rank} {method} {style} {name}")


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_embedding_and_loss(results, tp):
    for rank, res in enumerate(results(tp, _vocab)):
        for sp in (False, True):
            r = res[("emb", sp)]
            assert_close(r["y"], r["y_ref"], f"rank {rank} embedding sp={sp}")
            assert_close(r["dw"], r["dw_ref"], f"rank {rank} embedding grad sp={sp}")
            assert torch.equal(r["init"], r["init_ref"])
            assert r["fwd"] == {f"tp/{'reduce_scatter' if sp else 'all_reduce'}": T * HIDDEN * E}
        r = res["ce"]
        assert_close(r["loss"], r["loss_ref"], f"rank {rank} loss")
        assert_close(r["grad"], r["grad_ref"], f"rank {rank} logits grad")
        assert r["fwd"] == {"tp/all_reduce": 3 * T * E} and r["bwd"] == {}  # max, then [target logit, sum exp]


# ----------------------------------------------------------------------------- bad layouts (no processes needed)
def _dims(tp):
    return ParallelDims(tp=tp, cp=1, dp=1, pp=1, world_size=tp, rank=1)


@pytest.mark.parametrize("method", list(METHODS))
def test_indivisible_layer_widths_raise(method):
    layer = logical_layer(method, 36, 48, "layers.0.odd", perturb=False)
    with pytest.raises(ValueError, match=r"layers\.0\.odd .*row-parallel.*in_features=36 divisible by tp=8"):
        parallel_linear(layer, _dims(8), "row")
    with pytest.raises(ValueError, match=r"column-parallel.*out_features=48 divisible by tp=32"):
        parallel_linear(layer, _dims(32), "column")


def test_indivisible_vocab_and_sequence_raise():
    with pytest.raises(ValueError, match="vocab_size=66 must be divisible by tp=4"):
        VocabParallelEmbedding(66, 8, _dims(4))
    row = parallel_linear(
        logical_layer("dense", 32, 16, "layers.0.o", perturb=False), _dims(4), "row", sequence_parallel=True
    )
    with pytest.raises(ValueError, match="sequence .* of size 6 is not divisible by the tp degree 4"):
        row(torch.zeros(2, 6, 8, dtype=torch.float64))


@pytest.mark.parametrize(
    "field,overrides",
    [
        ("model.n_heads", dict(n_heads=6)),
        ("model.n_kv_heads", dict(n_kv_heads=2)),
        ("model.dim", dict(dim=126, n_heads=4)),
        ("model.ffn_dim", dict(ffn_dim=350)),
        ("model.vocab_size", dict(vocab_size=32001)),
    ],
)
def test_check_tp_layout_names_the_field(field, overrides):
    cfg = ModelConfig(**{**dict(dim=128, n_heads=4, ffn_dim=352, vocab_size=32000), **overrides})
    with pytest.raises(ConfigError) as exc:
        check_tp_layout(cfg, 4)
    assert exc.value.field == field


def test_check_tp_layout_sequence():
    cfg = ModelConfig(dim=128, n_heads=4, ffn_dim=352, vocab_size=32000)
    check_tp_layout(cfg, 4, seq_len=6)  # no SP: any sequence
    check_tp_layout(cfg, 4, seq_len=8, sequence_parallel=True)
    with pytest.raises(ConfigError) as exc:
        check_tp_layout(cfg, 4, seq_len=6, sequence_parallel=True)
    assert exc.value.field == "data.seq_len"


def test_trainer_gate_and_layer_layouts():
    dims = ParallelDims.from_config(ParallelConfig(tp=2, cp=1, dp=-1, pp=1), 4, rank=3, implemented=AXES)
    assert (dims.tp, dims.dp, dims.tp_rank, dims.dp_rank) == (2, 2, 1, 1)
    assert set(TP_CLASSES) == {"dense", "lowrank", "sltrain", "lost"}
