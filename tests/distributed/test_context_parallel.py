"""Context parallelism (ring with zigzag and contiguous shards, LightSeq DistAttn, Ulysses) on gloo ranks.

Four spawned ranks serve both layouts (cp=2 x dp=2 and cp=4). Every rank draws the whole q, k, v of its
dp replica from a seed, keeps its sequence shard and runs context-parallel attention on it; this side computes
single-process causal attention on the whole sequence and compares the shards: output, log-sum-exp and
dq/dk/dv to 1e-10 in float64, grouped-query (Hq=4, Hkv=2) and odd (Hq=3, Hkv=1) heads, with both block kernels
(`auto`: the fused kernels of flash_blocks.py, `math`: the exact one), and the fused kernels in float32 against
a float64 reference to the round-off bound derived at FP32_REL. Also: the byte counters
against closed forms written out here, LightSeq's per-rank block counts and balance, and rematerialization-aware
checkpointing (gradients unchanged, no second attention forward). Bad inputs are checked in-process.
"""

from __future__ import annotations

import pytest
import torch

from megaeff.distributed.comm import CommGroup
from megaeff.distributed.context_parallel.attention import (
    AttentionCounter,
    ContextParallelAttention,
    ContextParallelError,
    comm_bytes,
    lightseq_block_counts,
    sequence_positions,
    shard_sequence,
    unshard_sequence,
)
from megaeff.layers.attention import MathAttention, flash_available
from megaeff.layers.rope import apply_rope, rope_tables, rope_tables_at
from tests.distributed.harness import pool_fixture

pytestmark = pytest.mark.slow

B, T, D, E = 2, 16, 4, 8  # batch, whole sequence, head dim, bytes per float64
LAYOUTS = {2: dict(cp=2, dp=2), 4: dict(cp=4)}
IMPLS = [
    ("ring", "zigzag"),
    ("ring", "contiguous"),
    ("lightseq", "contiguous"),
    ("ulysses", "contiguous"),
    ("ulysses", "zigzag"),
]
SEQ_HEADS = [(4, 2), (3, 1)]  # GQA, and an odd head count (MQA)
ULYSSES_HEADS = {2: (4, 2), 4: (8, 4)}
GROUPED_HEADS = {"ring": (4, 2), "lightseq": (4, 2), "ulysses": (16, 8)}  # 2 head groups; Ulysses: each group's
# heads divisible by cp = 4
BACKENDS = ("auto", "math")  # auto on CPU = torch's flash attention for CPU per block; math = exact fp32+ scores
TOL = dict(rtol=0, atol=1e-10)
# float32 runs of the fused kernels against the float64 reference, relative to the largest reference entry:
# every output and gradient entry is a sum of at most T = 16 products of O(1) terms (softmax weights <= 1,
# |v|, |q|, |k|, |dO| = randn), each rounded once (u = 2**-24 = 6e-8), plus the exp/log of each score and the
# log-sum-exp merge of at most 2 cp blocks per row (a few u each): |err| <= (T + D + 4 cp) u max|ref| =
# (16 + 4 + 16) * 6e-8 = 2.1e-6 max|ref| at cp = 4; 1e-5 leaves 4x margin. A block merged with a wrong lse, a
# skipped or doubled block, or the wrong causal alignment moves entries by O(0.1 max|ref|).
FP32_REL = 1e-5

pool = pool_fixture(4)


def heads_for(impl, cp):
    return [ULYSSES_HEADS[cp]] if impl == "ulysses" else SEQ_HEADS


def full_inputs(hq, hkv, replica, dtype=torch.float64):
    gen = torch.Generator().manual_seed(100 * hq + 10 * hkv + replica)
    q = torch.randn(B, hq, T, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, hkv, T, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, hkv, T, D, generator=gen, dtype=torch.float64)
    g = torch.randn(B, hq, T, D, generator=gen, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (q, k, v, g))  # float32: the float64 draws rounded, same reference


def run_attention(attn, q, k, v, g, stats):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    stats.reset()
    out, lse = attn.forward_with_lse(q, k, v)
    fwd = stats.snapshot()
    stats.reset()
    out.backward(g)
    return dict(out=out.detach(), lse=lse, dq=q.grad, dk=k.grad, dv=v.grad, fwd=fwd, bwd=stats.snapshot())


# ----------------------------------------------------------------------------- rank functions
def _attention(dims):
    cg = dims.comm("cp")
    res = {}
    runs = [(backend, torch.float64) for backend in BACKENDS] + [("auto", torch.float32)]
    for impl, sharding in IMPLS:
        for hq, hkv in heads_for(impl, dims.cp):
            for backend, dtype in runs:
                counter = AttentionCounter()
                attn = ContextParallelAttention(cg, impl, sharding, backend=backend, counter=counter)
                q, k, v, g = (attn.shard(t, dim=2) for t in full_inputs(hq, hkv, dims.dp_rank, dtype))
                r = run_attention(attn, q, k, v, g, dims.comm_stats)
                r["counter"] = counter.as_dict()
                r["gathered"] = attn.gather(q, dim=2)
                r["kernel"], r["sends_out"] = attn.kernel.name, attn.sends_out
                res[(impl, sharding, hq, hkv, backend, str(dtype))] = r
        hq, hkv = GROUPED_HEADS[impl]  # the same attention run as 2 head groups, one after the other
        counter = AttentionCounter()
        attn = ContextParallelAttention(cg, impl, sharding, counter=counter, head_groups=2)
        q, k, v, g = (attn.shard(t, dim=2) for t in full_inputs(hq, hkv, dims.dp_rank))
        r = run_attention(attn, q, k, v, g, dims.comm_stats)
        r["counter"], r["sends_out"] = counter.as_dict(), attn.sends_out
        res[(impl, sharding, hq, hkv, "groups")] = r
    return dict(res=res, cp_rank=dims.cp_rank, dp_rank=dims.dp_rank)


class Layer(torch.nn.Module):
    """Projections around context-parallel attention: the segment a trainer checkpoints."""

    def __init__(self, attn, dim=8, hq=4, hkv=2):
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.attn, self.hq, self.hkv = attn, hq, hkv
        self.wq = torch.nn.Parameter(torch.randn(dim, hq * D, generator=gen, dtype=torch.float64) / 3)
        self.wkv = torch.nn.Parameter(torch.randn(dim, 2 * hkv * D, generator=gen, dtype=torch.float64) / 3)
        self.wo = torch.nn.Parameter(torch.randn(hq * D, dim, generator=gen, dtype=torch.float64) / 3)

    def forward(self, x):
        b, t, _ = x.shape
        q = (x @ self.wq).view(b, t, self.hq, D).transpose(1, 2)
        k, v = (x @ self.wkv).view(b, t, 2, self.hkv, D).permute(2, 0, 3, 1, 4)
        return torch.tanh(self.attn(q, k, v).transpose(1, 2).reshape(b, t, -1) @ self.wo)


def _remat(dims, impl, hq, hkv):
    from torch.utils.checkpoint import checkpoint

    cg = dims.comm("cp")
    x_full = torch.randn(B, T, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = {}
    for mode in ("plain", "checkpoint", "remat"):
        counter = AttentionCounter()
        attn = ContextParallelAttention(cg, impl, counter=counter)
        layer = Layer(attn, hq=hq, hkv=hkv)
        x = attn.shard(x_full).requires_grad_(True)
        dims.comm_stats.reset()
        if mode == "plain":
            y = layer(x)
        elif mode == "checkpoint":
            y = checkpoint(layer, x, use_reentrant=False)
        else:
            y = attn.checkpoint(layer, x)
        fwd = counter.as_dict()
        (y * y).sum().backward()
        out[mode] = dict(
            fwd=fwd,
            total=counter.as_dict(),
            bytes=dims.comm_stats.snapshot(),
            dx=x.grad,
            grads={n: p.grad for n, p in layer.named_parameters()},
        )
    return out


# ----------------------------------------------------------------------------- reference and fixtures
@pytest.fixture(scope="module")
def results(pool):
    cache = {}

    def get(key, fn, *args):
        if key not in cache:
            cache[key] = pool.run(fn, *args, layout=LAYOUTS[key[0]])
        return cache[key]

    return get


def reference(hq, hkv, replica, dtype=torch.float64):
    """Single-process attention in float64 of the inputs drawn (and rounded to `dtype`) as on the ranks."""
    q, k, v, g = (t.double().requires_grad_(True) for t in full_inputs(hq, hkv, replica, dtype))
    out, lse = MathAttention().forward_with_lse(q, k, v, causal=True)
    out.backward(g.detach())
    return dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


def assert_close(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.allclose(a, b, **TOL), f"{what}: max abs diff {(a - b).abs().max().item():.3e}"


def expected_bytes(impl, cp, cp_rank, hq, hkv, sends_out):
    """(forward, backward) "cp/*" counters of one forward_with_lse + backward, float64 (e = a = 8), written
    out from the schedules: Tl local tokens, kv = one K/V pair of this rank's size. `sends_out`: the fused
    kernels take the final output O instead of delta, so LightSeq's helpers receive O (D numbers a row)."""
    Tl = T // cp
    kv = 2 * B * hkv * Tl * D * E
    rows = B * hq * Tl
    if impl == "ring":  # P-1 K/V hops forward; P-1 again and P partial dK/dV hops backward
        return {"cp/p2p_send": (cp - 1) * kv}, {"cp/p2p_send": (cp - 1) * kv + cp * kv}
    if impl == "ulysses":  # payloads: q,k,v + out (+ the lse of forward_with_lse); dO + dq,dk,dv
        a2a = B * Tl * D * E * (2 * hq + 2 * hkv)
        return {"cp/all_to_all": a2a + rows * E}, {"cp/all_to_all": a2a}
    # LightSeq, by hand from the schedule: K/V blocks sent, query chunks sent to helpers, blocks computed
    # for others, remote K/V blocks used (cp=2: rank 0 sends its K/V to rank 1 and that is all).
    n_kv, n_q, n_help, n_loc = {
        2: ([1, 0], [0, 0], [0, 0], [0, 1]),
        4: ([2, 2, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 2, 2]),
    }[cp]
    i = cp_rank
    fwd = n_kv[i] * kv + n_q[i] * rows * D * E + n_help[i] * rows * (D + 1) * E
    bundle = (3 * D + 1) if sends_out else (2 * D + 2)  # q, dO, lse + O or delta
    bwd = n_kv[i] * kv + n_q[i] * rows * bundle * E + n_help[i] * rows * D * E + n_loc[i] * kv
    return {"cp/p2p_send": fwd} if fwd else {}, {"cp/p2p_send": bwd} if bwd else {}


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("impl,sharding", IMPLS, ids=[f"{i}-{s}" for i, s in IMPLS])
def test_matches_full_causal_attention(results, impl, sharding, cp, backend):
    ranks = results((cp, "attn"), _attention)
    refs = {}
    for rank, res in enumerate(ranks):
        i, rep = res["cp_rank"], res["dp_rank"]
        for hq, hkv in heads_for(impl, cp):
            r = res["res"][(impl, sharding, hq, hkv, backend, str(torch.float64))]
            assert r["kernel"] == ("math" if backend == "math" else "fused (auto)")
            ref = refs.setdefault((hq, hkv, rep), reference(hq, hkv, rep))
            where = f"{impl}/{sharding} cp={cp} rank {rank} Hq={hq} Hkv={hkv}"
            for name in ("out", "dq", "dk", "dv"):
                assert_close(r[name], shard_sequence(ref[name], cp, i, sharding, dim=2), f"{where} {name}")
            assert_close(r["lse"], shard_sequence(ref["lse"], cp, i, sharding, dim=2), f"{where} lse")
            assert torch.equal(r["gathered"], full_inputs(hq, hkv, rep)[0]), f"{where} gather of the shards"
            fwd, bwd = expected_bytes(impl, cp, i, hq, hkv, r["sends_out"])
            assert (r["fwd"], r["bwd"]) == (fwd, bwd), f"{where} bytes"
            cf, cb = comm_bytes(impl, B=B, T=T, cp=cp, Hq=hq, Hkv=hkv, D=D, elem=E, rank=i, sends_out=r["sends_out"])
            lse_a2a = B * hq * (T // cp) * E if impl == "ulysses" else 0
            assert (sum(fwd.values()) - lse_a2a, sum(bwd.values())) == (cf, cb), f"{where} comm_bytes"


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("impl,sharding", IMPLS, ids=[f"{i}-{s}" for i, s in IMPLS])
def test_fused_blocks_in_float32_match_full_attention(results, impl, sharding, cp):
    """The fused CPU kernel per block in float32 against float64 full attention of the same (rounded) inputs,
    to the bound derived at FP32_REL; the float64 runs above already pin the algorithm to 1e-10."""
    worst = 0.0
    for rank, res in enumerate(results((cp, "attn"), _attention)):
        i, rep = res["cp_rank"], res["dp_rank"]
        for hq, hkv in heads_for(impl, cp):
            r = res["res"][(impl, sharding, hq, hkv, "auto", str(torch.float32))]
            ref = reference(hq, hkv, rep, torch.float32)
            for name in ("out", "lse", "dq", "dk", "dv"):
                want = shard_sequence(ref[name], cp, i, sharding, dim=2)
                assert r[name].dtype == torch.float32, f"{name} came back in {r[name].dtype}"
                err = (r[name].double() - want).abs().max().item() / ref[name].abs().max().item()
                assert err <= FP32_REL, f"{impl}/{sharding} cp={cp} rank {rank} Hq={hq} {name}: rel err {err:.2e}"
                worst = max(worst, err)
    assert worst > 0  # float32 really ran (a float64 run would match to 1e-16)


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("impl,sharding", IMPLS, ids=[f"{i}-{s}" for i, s in IMPLS])
def test_head_groups_match_full_attention_and_send_the_same_bytes(results, impl, sharding, cp):
    """Two head groups run one after the other: the same attention, the same bytes in total (two transfers of
    half the size), blocks counted once per call and work over all heads."""
    hq, hkv = GROUPED_HEADS[impl]
    for rank, res in enumerate(results((cp, "attn"), _attention)):
        i, rep = res["cp_rank"], res["dp_rank"]
        r = res["res"][(impl, sharding, hq, hkv, "groups")]
        ref = reference(hq, hkv, rep)
        where = f"{impl}/{sharding} cp={cp} rank {rank} 2 head groups"
        for name in ("out", "lse", "dq", "dk", "dv"):
            assert_close(r[name], shard_sequence(ref[name], cp, i, sharding, dim=2), f"{where} {name}")
        lse_a2a = B * hq * (T // cp) * E if impl == "ulysses" else 0
        want = comm_bytes(impl, B=B, T=T, cp=cp, Hq=hq, Hkv=hkv, D=D, elem=E, rank=i, sends_out=r["sends_out"])
        assert (sum(r["fwd"].values()) - lse_a2a, sum(r["bwd"].values())) == want, f"{where} bytes"
        c = r["counter"]
        assert c["forward_calls"] == 1 and c["forward_blocks"] == c["backward_blocks"]
        if impl == "ring":
            assert c["forward_blocks"] == (2 * cp + 1 if sharding == "zigzag" else i + 1)  # as with one group
        if impl == "ulysses":
            assert c["forward_work"] == B * hq // cp * T * (T + 1) // 2  # this rank's heads, all tokens


@pytest.mark.parametrize("cp", [2, 4])
def test_block_counts_and_balance(results, cp):
    ranks = sorted(
        (res for res in results((cp, "attn"), _attention) if res["dp_rank"] == 0), key=lambda res: res["cp_rank"]
    )
    counters = {
        (impl, sharding): [
            res["res"][(impl, sharding, *SEQ_HEADS[0], "math", str(torch.float64))]["counter"] for res in ranks
        ]
        for impl, sharding in IMPLS[:3]
    }
    ls = counters[("lightseq", "contiguous")]
    blocks = [c["forward_blocks"] for c in ls]
    assert blocks == lightseq_block_counts(cp) == [cp // 2] * (cp // 2) + [cp // 2 + 1] * (cp // 2)
    assert max(blocks) - min(blocks) <= 1
    assert sum(blocks) == cp * (cp + 1) // 2  # every causal block of the grid exactly once
    assert [c["backward_blocks"] for c in ls] == blocks
    ring = [c["forward_blocks"] for c in counters[("ring", "contiguous")]]
    assert ring == [r + 1 for r in range(cp)]  # the plain ring's imbalance LightSeq removes
    zig = counters[("ring", "zigzag")]
    assert len({c["forward_work"] for c in zig}) == 1 and all(c["forward_blocks"] == 2 * cp + 1 for c in zig)
    total = B * SEQ_HEADS[0][0] * T * (T + 1) // 2  # visible score entries of the whole causal attention
    for scheme in counters.values():
        assert sum(c["forward_work"] for c in scheme) == total


@pytest.mark.parametrize("impl", ["lightseq", "ring", "ulysses"])
def test_rematerialization_aware_checkpointing(pool, impl):
    hq, hkv = (8, 4) if impl == "ulysses" else (4, 2)
    for rank, res in enumerate(pool.run(_remat, impl, hq, hkv, layout=LAYOUTS[4])):
        plain, ckpt, remat = res["plain"], res["checkpoint"], res["remat"]
        for other in (ckpt, remat):
            assert_close(other["dx"], plain["dx"], f"rank {rank} input grad")
            for name, g in plain["grads"].items():
                assert_close(other["grads"][name], g, f"rank {rank} grad of {name}")
        blocks = plain["total"]["forward_blocks"]
        assert plain["total"]["forward_calls"] == 1 and blocks > 0
        # Standard checkpointing recomputes the attention forward in backward; the remat-aware one does not.
        assert (ckpt["total"]["forward_calls"], ckpt["total"]["forward_blocks"]) == (2, 2 * blocks)
        assert remat["fwd"]["forward_calls"] == 1
        assert remat["total"] == dict(plain["total"], replays=1)
        if impl == "ulysses":  # the replay repeats the q, k, v all-to-all (not the attention)
            qkv = B * (T // 4) * D * E * (hq + 2 * hkv)
            assert remat["bytes"] == {"cp/all_to_all": plain["bytes"]["cp/all_to_all"] + qkv}
        else:
            assert remat["bytes"] == plain["bytes"]  # nothing is sent twice either


def test_positions_rope_and_unshard():
    cos, sin = rope_tables(D, T, 10000.0)
    x = torch.randn(B, T, 3, D, dtype=torch.float64)
    for cp in (1, 2, 4):
        for sharding in ("contiguous", "zigzag"):
            shards = [shard_sequence(x, cp, r, sharding) for r in range(cp)]
            assert torch.equal(unshard_sequence(shards, sharding), x)
            rotated = apply_rope(x.transpose(1, 2), cos, sin).transpose(1, 2)
            for r in range(cp):
                pos = sequence_positions(T, cp, r, sharding, batch=B)
                assert pos.shape == (B, T // cp)
                local = apply_rope(shards[r].transpose(1, 2), cos, sin, pos).transpose(1, 2)
                assert torch.equal(local, shard_sequence(rotated, cp, r, sharding))
                # Tables of the local positions only (what a rank needs): the same rotation and gradient, bit
                # for bit, as rows of the whole sequence's tables.
                lc, ls = rope_tables_at(pos[0], D, 10000.0)
                assert torch.equal(lc, cos[pos[0]]) and torch.equal(ls, sin[pos[0]])
                xs = shards[r].transpose(1, 2).clone().requires_grad_(True)
                xg = xs.detach().clone().requires_grad_(True)
                g = torch.randn(xs.shape, generator=torch.Generator().manual_seed(r), dtype=torch.float64)
                apply_rope(xs, lc, ls).backward(g)
                apply_rope(xg, cos, sin, pos).backward(g)
                assert torch.equal(apply_rope(xs, lc, ls).transpose(1, 2), local)
                assert torch.equal(xs.grad, xg.grad)
                if cp > 1 and r > 0:  # tables of positions 0..T/cp-1 (no global offset) rotate wrongly
                    naive = apply_rope(shards[r].transpose(1, 2), *rope_tables(D, T // cp, 10000.0))
                    assert not torch.allclose(naive.transpose(1, 2), local, atol=1e-3)
    assert sequence_positions(16, 4, 1, "zigzag").tolist() == [2, 3, 12, 13]
    assert sequence_positions(16, 4, 1, "contiguous").tolist() == [4, 5, 6, 7]


def _cg(size, rank=0):
    return CommGroup("cp", None, None, size, rank)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"sequence length 12 is not divisible by 8 \(zigzag sharding over cp=4"):
        shard_sequence(torch.zeros(1, 12), 4, 0, "zigzag")
    with pytest.raises(ContextParallelError) as exc:
        sequence_positions(10, 4, 0, "contiguous")
    assert exc.value.field == "data.seq_len"
    z = torch.zeros(1, 3, 4, D)
    with pytest.raises(ContextParallelError, match=r"query heads \(Hq=3\) must be divisible by cp=2") as exc:
        ContextParallelAttention(_cg(2), "ulysses")(z, z[:, :1], z[:, :1])
    assert exc.value.field == "model.n_heads"
    z = torch.zeros(1, 4, 4, D)
    with pytest.raises(ContextParallelError, match=r"key/value heads \(Hkv=2\) must be divisible by cp=4"):
        ContextParallelAttention(_cg(4), "ulysses")(z, z[:, :2], z[:, :2])
    with pytest.raises(ValueError, match="not divisible by 4 .zigzag"):  # T = 3 local x cp 2 = 6
        ContextParallelAttention(_cg(2), "ring")(z[:, :, :3], z[:, :2, :3], z[:, :2, :3])
    with pytest.raises(ContextParallelError, match="per-document attention masks are not supported") as exc:
        ContextParallelAttention(_cg(2), "ring")(z, z, z, segment_ids=torch.zeros(1, 4))
    assert exc.value.field == "data.reset_attention_mask"
    with pytest.raises(ContextParallelError, match="lightseq balances contiguous shards"):
        ContextParallelAttention(_cg(2), "lightseq", "zigzag")
    with pytest.raises(ContextParallelError, match="even cp degree, got cp=3"):
        ContextParallelAttention(_cg(3), "lightseq")
    with pytest.raises(ContextParallelError, match="unknown context-parallel impl 'star'"):
        ContextParallelAttention(_cg(2), "star")
    if not flash_available():
        with pytest.raises(ContextParallelError, match="flash needs CUDA and the flash-attn package") as exc:
            ContextParallelAttention(_cg(2), "ring", backend="flash")
        assert exc.value.field == "model.attention_backend"
    with pytest.raises(ContextParallelError, match="unknown backend 'flash3'; available: auto, sdpa, flash, math"):
        ContextParallelAttention(_cg(2), "ring", backend="flash3")
    assert ContextParallelAttention(_cg(4), "ring").name == "ring/zigzag over cp=4"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("impl,cp", [("ring", 8), ("lightseq", 8), ("ulysses", 4)])
def test_meta_dry_run_records_the_closed_form(impl, cp, backend):
    """On meta tensors (the benchmark's dry runs) nothing is sent, every byte is still recorded, per rank, and
    the bf16 element sizes with fp32 partial sums follow the same closed forms."""
    from megaeff.distributed.comm import CommStats

    hq, hkv, seq = 8, 4, 64
    for rank in range(cp):
        stats = CommStats()
        attn = ContextParallelAttention(CommGroup("cp", None, stats, cp, rank), impl, backend=backend)
        q, k, v = (
            torch.empty(B, h, seq // cp, D, device="meta", dtype=torch.bfloat16).requires_grad_(True)
            for h in (hq, hkv, hkv)
        )
        attn(q, k, v).backward(torch.empty(B, hq, seq // cp, D, device="meta", dtype=torch.bfloat16))
        want = comm_bytes(impl, B=B, T=seq, cp=cp, Hq=hq, Hkv=hkv, D=D, elem=2, rank=rank, sends_out=attn.sends_out)
        assert stats.total() == sum(want)
        assert stats.total() > 0


def test_head_groups_save_the_full_output_only_when_an_engine_needs_it():
    """Ring and LightSeq save views of the output, so the head-group engine keeps the full output to re-slice
    them; Ulysses saves its own head-layout output, and keeping the sequence-layout one as well would hold a
    second output-sized tensor until the backward (the longest-sequence benchmark measures it)."""
    hq, hkv, cp = 16, 8, 4  # 2 groups of 8 + 4 heads: divisible by cp, as Ulysses needs
    for impl in ("ring", "ulysses"):
        attn = ContextParallelAttention(_cg(cp), impl, head_groups=2)
        q, k, v = (torch.empty(B, h, T // cp, D, device="meta").requires_grad_(True) for h in (hq, hkv, hkv))
        out = attn(q, k, v)
        saved = out.grad_fn.saved_tensors
        shares = [t is not None and t.untyped_storage()._cdata == out.untyped_storage()._cdata for t in saved]
        assert any(shares) == (impl == "ring"), impl


# ----------------------------------------------------------------------------- SLTrain's measured path costs
def _sltrain_calibration(dims):
    """Every rank calibrates its SLTrain layers with timings of its own (rank 0's sparse kernels look 100x cheaper
    than the others'); rank 1 also holds a shape no other rank has."""
    from megaeff.layers.sltrain import SLTrainLinear
    from megaeff.layers.sltrain_costs import calibrate_paths, measure_sparse_cost

    shapes = [(32, 24), (40, 16)] + ([(48, 8)] if dims.rank == 1 else [])
    model = torch.nn.Sequential(*(SLTrainLinear(i, o, rank=4, alpha=8.0, density=0.1) for i, o in shapes))
    slow = 1.0 if dims.rank == 0 else 100.0

    def timer(what, fn):  # rank 0: c = 5 m n / nnz = 50, a crossover between 1 and 16 tokens at these shapes
        return 1e-3 if what == "gemm" else 5e-3 * slow

    own = {lay.cost_key(): measure_sparse_cost(*lay.cost_key(), torch.float32, "cpu", True, timer) for lay in model}
    calibrate_paths(model, timer=timer)
    tokens = (1, 16, 64, 256, 1024, 4096)
    return dict(
        costs={lay.cost_key(): lay.sparse_costs[True] for lay in model},
        own=own,
        paths={lay.cost_key(): [lay.select_path(t) for t in tokens] for lay in model},
    )


def test_sltrain_costs_are_the_same_on_every_rank(pool):
    """Measured on global rank 0 only and broadcast: every rank gets rank 0's costs and so takes the same path,
    although each rank's own timings differ (and would decide differently); a shape only rank 1 holds is
    measured by rank 0 too (the union of all ranks' shapes)."""
    res = pool.run(_sltrain_calibration, layout=LAYOUTS[4])
    rank0 = res[0]
    assert rank0["costs"] == rank0["own"]
    for r, got in enumerate(res):
        for key, cost in got["costs"].items():
            want = rank0["costs"].get(key, res[1]["own"][key] / 100.0)  # rank 0's timer: 100x cheaper sparse
            assert cost == pytest.approx(want, rel=1e-12), (r, key)
            if key in rank0["paths"]:
                assert got["paths"][key] == rank0["paths"][key], (r, key)
        if r > 0:
            assert all(got["own"][k] != got["costs"][k] for k in got["costs"])  # its own timings were not used
    assert any(len(set(p)) > 1 for p in rank0["paths"].values())  # the choice really depends on the tokens


def _sltrain_cost_file(dims, path):
    """Calibrate with the cost file at `path` (timings of each rank's own, as above), again with the file present,
    then once more after rank 0 finds the file corrupt."""
    import torch.distributed as dist

    from megaeff.errors import MegaeffError
    from megaeff.layers.sltrain import SLTrainLinear
    from megaeff.layers.sltrain_costs import calibrate_paths

    calls = []

    def timer(what, fn):
        calls.append(what)
        return 1e-3 if what == "gemm" else 5e-3 * (1.0 if dims.rank == 0 else 100.0)

    def model():
        shapes = [(32, 24)] + ([(48, 8)] if dims.rank == 1 else [])
        return torch.nn.Sequential(*(SLTrainLinear(i, o, rank=4, alpha=8.0, density=0.1) for i, o in shapes))

    first, again = model(), model()
    calibrate_paths(first, timer=timer, cache=path)
    measured = len(calls)
    calibrate_paths(again, timer=timer, cache=path)
    if dims.rank == 0:
        with open(path, "w") as f:
            f.write("{")
    dist.barrier()
    try:
        calibrate_paths(model(), timer=timer, cache=path)
        error = None
    except MegaeffError as exc:
        error = str(exc)
    return dict(
        first={lay.cost_key(): lay.sparse_costs for lay in first},
        again={lay.cost_key(): lay.sparse_costs for lay in again},
        measured=measured,
        calls_with_file=len(calls) - measured,
        error=error,
    )


def test_the_cost_file_on_every_rank(pool, tmp_path):
    """Rank 0 alone writes `<run_dir>/sltrain_costs.json` (2 shapes, one only rank 1 holds); a second calibration
    reads it and measures nothing on any rank; a corrupt file stops every rank with rank 0's error naming it
    (instead of leaving the others waiting for costs)."""
    path = tmp_path / "sltrain_costs.json"
    res = pool.run(_sltrain_cost_file, str(path), layout=LAYOUTS[4])
    assert res[0]["measured"] == 2 * 2 * 2 * 3  # 2 shapes x (training, forward) x (GEMM, sparse) x 3 rounds
    assert all(r["measured"] == 0 for r in res[1:]) and all(r["calls_with_file"] == 0 for r in res)
    shared = next(iter(res[0]["first"]))  # the shape every rank holds: rank 0's costs everywhere
    assert all(r["again"] == r["first"] and r["first"][shared] == res[0]["first"][shared] for r in res)
    assert res[0]["error"].startswith(f"SLTrain cost file '{path}': unreadable")
    assert all(r["error"] == res[0]["error"] + " (reported by rank 0)" for r in res[1:])
