"""Block kernels of context parallelism, single process: the fused kernels (flash_blocks.py) against the math
kernel and against full attention, the causal block plan against the positional mask it replaced, the kernel
selection of `model.attention_backend`, and head groups (heads.py). Multi-rank equivalence of every scheme with
both kernels is in tests/distributed/test_context_parallel.py."""

from __future__ import annotations

import pytest
import torch

from megaeff.distributed.comm import CommGroup
from megaeff.distributed.context_parallel.attention import AttentionCounter, ContextParallelAttention
from megaeff.distributed.context_parallel.blocks import MathBlockKernel, merge_, plan_blocks, row_delta
from megaeff.distributed.context_parallel.flash_blocks import (
    CpuFlashKernel,
    CudaEfficientKernel,
    FlashAttnKernel,
    FusedBlockKernel,
    select_block_kernel,
)
from megaeff.distributed.context_parallel.heads import HeadGroupEngine, group_counts
from megaeff.distributed.context_parallel.sharding import ContextParallelError, chunk_positions, rank_chunks
from megaeff.layers.attention import flash_available

B, D = 2, 8
# (Hq, Hkv, Tq, Tk, causal): square causal (a diagonal block), causal with a visible prefix of 1 and 2 query
# lengths (zigzag's own block, LightSeq/ring diagonal blocks after merging), and an unmasked block.
SHAPES = [(4, 2, 6, 6, True), (4, 2, 6, 12, True), (3, 1, 5, 15, True), (4, 4, 6, 10, False)]
# float32 against float64: each entry is a sum of <= Tk = 15 O(1) products rounded once (u = 6e-8) plus the
# exp/log of the scores and one log-sum-exp merge: |err| <= (Tk + D + 4) u max|ref| = 27 * 6e-8 = 1.6e-6 max|ref|;
# 1e-5 leaves margin. A wrong causal alignment or a missing block moves entries by O(0.1 max|ref|).
FP32_REL = 1e-5
FP64_ABS = 1e-12  # float64: the same bound with u = 1.1e-16 is 3e-15


def draw(hq, hkv, tq, tk, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hq, 3 * tq, D, generator=gen, dtype=torch.float64)[:, :, tq : 2 * tq]  # a strided slice
    k = torch.randn(B, hkv, tk, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, hkv, tk, D, generator=gen, dtype=torch.float64)
    g = torch.randn(B, hq, tq, D, generator=gen, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (q, k, v, g))


def full_attention(q, k, v, g, causal):
    """float64 autograd reference: out, lse and the gradients of <out, g>."""
    q, k, v = (t.double().requires_grad_(True) for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * D**-0.5
    if causal:
        tq, tk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.exp(s - lse.unsqueeze(-1)) @ v.repeat_interleave(rep, 1)
    out.backward(g.double())
    return dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


def close(got, want, dtype, what):
    err = (got.double() - want).abs().max().item()
    bound = FP64_ABS if dtype == torch.float64 else FP32_REL * want.abs().max().item()
    assert err <= bound, f"{what}: max abs err {err:.2e} > {bound:.2e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hq,hkv,tq,tk,causal", SHAPES)
def test_cpu_flash_block_matches_full_attention(hq, hkv, tq, tk, causal, dtype):
    q, k, v, g = draw(hq, hkv, tq, tk, dtype)
    ref = full_attention(q, k, v, g, causal)
    for kernel in (CpuFlashKernel(), MathBlockKernel()):
        out, lse = kernel.forward(q, k, v, causal)
        assert lse.dtype == dtype and lse.shape == (B, hq, tq)
        close(out, ref["out"], dtype, f"{kernel.name} out")
        close(lse, ref["lse"], dtype, f"{kernel.name} lse")
        out = out.to(dtype)
        grads = kernel.backward(q, k, v, g, lse, row_delta(out, g), out, causal)
        for name, got in zip(("dq", "dk", "dv"), grads):
            assert got.dtype == dtype and got.shape == ref[name].shape
            close(got, ref[name], dtype, f"{kernel.name} {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_blocks_merged_then_backpropagated_with_the_final_stats(dtype):
    """The ring's use: a causal block and an earlier full block of the same rows, merged by log-sum-exp; each
    block's backward with the *final* out and lse; the sums equal full attention over both key blocks."""
    hq, hkv, t = 4, 2, 6
    q, k, v, g = draw(hq, hkv, t, 2 * t, dtype, seed=1)
    ref = full_attention(q, k, v, g, causal=True)  # keys [0, t) fully visible, [t, 2t) causal
    kernel = CpuFlashKernel()
    acc_out = torch.zeros(q.shape, dtype=dtype)
    acc_lse = torch.full(q.shape[:3], float("-inf"), dtype=dtype)
    parts = [(slice(t, 2 * t), True), (slice(0, t), False)]  # own block first, as the ring computes them
    for keys, causal in parts:
        merge_(acc_out, acc_lse, *kernel.forward(q, k[:, :, keys], v[:, :, keys], causal), slice(None))
    close(acc_out, ref["out"], dtype, "merged out")
    close(acc_lse, ref["lse"], dtype, "merged lse")
    dq = torch.zeros_like(acc_out)
    dk, dv = torch.zeros(k.shape, dtype=dtype), torch.zeros(v.shape, dtype=dtype)
    for keys, causal in parts:
        gq, gk, gv = kernel.backward(q, k[:, :, keys], v[:, :, keys], g, acc_lse, None, acc_out, causal)
        dq += gq
        dk[:, :, keys] += gk
        dv[:, :, keys] += gv
    for name, got in (("dq", dq), ("dk", dk), ("dv", dv)):
        close(got, ref[name], dtype, name)
    # A block backpropagated with its own lse instead of the final one is wrong: the test can tell.
    own_out, own_lse = kernel.forward(q, k[:, :, t:], v[:, :, t:], True)
    wrong = kernel.backward(q, k[:, :, t:], v[:, :, t:], g, own_lse, None, own_out.to(dtype), True)[0]
    right = kernel.backward(q, k[:, :, t:], v[:, :, t:], g, acc_lse, None, acc_out, True)[0]
    assert (wrong - right).abs().max() > 1e-2


def test_bf16_blocks_accumulate_in_fp32():
    q, k, v, g = draw(4, 2, 8, 16, torch.bfloat16, seed=2)
    out, lse = CpuFlashKernel().forward(q, k, v, True)
    ref_out, ref_lse = MathBlockKernel().forward(q, k, v, True)
    assert lse.dtype == torch.float32
    assert (out.float() - ref_out).abs().max() < 3e-2  # bf16 output rounding (8 bits) of O(1) values
    grads = CpuFlashKernel().backward(q, k, v, g, lse, None, out, True)
    assert all(t.dtype == torch.float32 for t in grads)  # summed over blocks in the accumulation dtype


def test_fused_kernel_runs_on_meta_tensors():
    """The benchmark's dry runs: torch's meta kernels give the fused CPU ops shapes and dtypes."""
    q = torch.empty(1, 4, 6, D, device="meta")
    k = torch.empty(1, 2, 12, D, device="meta")
    kernel = select_block_kernel("auto")
    assert isinstance(kernel.pick(q), CpuFlashKernel)
    out, lse = kernel.forward(q, k, k, True)
    assert out.shape == q.shape and lse.shape == (1, 4, 6) and out.is_meta
    dq, dk, dv = kernel.backward(q, k, k, out, lse, None, out, True)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape


def test_backend_selection():
    assert isinstance(select_block_kernel("math"), MathBlockKernel)
    for name in ("auto", "sdpa"):
        kernel = select_block_kernel(name)
        assert isinstance(kernel, FusedBlockKernel) and kernel.needs_out
        assert isinstance(kernel.pick(torch.zeros(1, 1, 1, D)), CpuFlashKernel)
    assert select_block_kernel("sdpa").flash_attn is None  # torch's kernels only
    if not flash_available():
        with pytest.raises(ContextParallelError, match="flash needs CUDA") as exc:
            select_block_kernel("flash")
        assert exc.value.field == "model.attention_backend"
    with pytest.raises(ContextParallelError, match="unknown backend 'flash2'"):
        select_block_kernel("flash2")
    attn = ContextParallelAttention(CommGroup("cp", None, None, 2, 0), "lightseq", backend="math")
    assert not attn.sends_out and attn.kernel.name == "math"


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("sharding", ["contiguous", "zigzag"])
def test_block_plan_causal_flag_is_the_positional_mask(cp, sharding):
    """Every block the plan marks causal has exactly the bottom-right-aligned mask that the global positions
    imply; every other block is fully visible. (The plan used to build this mask from the positions.)"""
    c = 3
    for r in range(cp):
        for src in range(cp):
            q_chunks, kv_chunks = rank_chunks(cp, r, sharding), rank_chunks(cp, src, sharding)
            qpos, kpos = chunk_positions(q_chunks, c), chunk_positions(kv_chunks, c)
            visible = kpos.unsqueeze(0) <= qpos.unsqueeze(1)
            covered = torch.zeros_like(visible)
            for blk in plan_blocks(q_chunks, kv_chunks, c):
                rows, n = blk.q_hi - blk.q_lo, blk.kv_len
                want = visible[blk.q_lo : blk.q_hi, :n]
                implied = torch.ones(rows, n, dtype=torch.bool).tril(n - rows) if blk.causal else torch.ones_like(want)
                assert torch.equal(implied, want), (r, src, blk)
                covered[blk.q_lo : blk.q_hi, :n] = True
            assert torch.equal(covered | ~visible, torch.ones_like(visible))  # nothing visible is skipped


def test_head_group_counts():
    assert group_counts(32, 8, 4, "ring") == [1, 2, 4, 8]
    assert group_counts(32, 8, 4, "ulysses") == [1, 2]  # each group's kv heads divisible by cp
    engine = HeadGroupEngine(ContextParallelAttention(CommGroup("cp", None, None, 4, 0), "ring").engine.engine)
    k_small = torch.empty(1, 8, 1024, 128, device="meta")  # 8 MiB of K and V in fp32
    k_large = torch.empty(1, 8, 65536, 128, device="meta")  # 512 MiB: 8 groups of 64 MiB
    q = torch.empty(1, 32, 1024, 128, device="meta")
    assert engine.count(q, k_small) == 1 and engine.count(q, k_large) == 8
    with pytest.raises(ValueError, match="3 head groups do not split"):
        HeadGroupEngine(engine.engine, 3).count(q, k_small)


@pytest.mark.parametrize("backend", ["math", "auto"])
def test_head_groups_give_the_same_attention(backend):
    """cp=1 (no communication): 1, 2 and 4 head groups, forward_with_lse and backward, identical results and
    counters (groups only reorder independent heads)."""
    q, k, v, g = draw(8, 4, 12, 12, torch.float64, seed=3)
    res = []
    for n in (1, 2, 4):
        counter = AttentionCounter()
        attn = ContextParallelAttention(
            CommGroup("cp", None, None, 1, 0), "ring", backend=backend, counter=counter, head_groups=n
        )
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out, lse = attn.forward_with_lse(qq, kk, vv)
        out.backward(g)
        res.append((out.detach(), lse, qq.grad, kk.grad, vv.grad, counter.as_dict()))
    for other in res[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other[:5], res[0][:5]))
        assert other[5] == res[0][5]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA block kernels: no CUDA device here")


@needs_cuda
@pytest.mark.parametrize("kernel_cls,dtype", [(CudaEfficientKernel, torch.float32), (FlashAttnKernel, torch.bfloat16)])
@pytest.mark.parametrize("hq,hkv,tq,tk,causal", SHAPES)
def test_cuda_block_kernels_match_full_attention(kernel_cls, dtype, hq, hkv, tq, tk, causal):
    if kernel_cls is FlashAttnKernel and not flash_available():
        pytest.skip("flash-attn is not installed")
    q, k, v, g = (t.cuda() for t in draw(hq, hkv, tq, tk, dtype))
    ref = {n: t.cuda() for n, t in full_attention(q, k, v, g, causal).items()}
    kernel = kernel_cls()
    out, lse = kernel.forward(q, k, v, causal)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # fp32 round-off (as above); bf16: 8-bit mantissa of O(1)
    scale = {n: max(1.0, t.abs().max().item()) for n, t in ref.items()}
    assert (out.double() - ref["out"]).abs().max() <= tol * scale["out"]
    assert (lse.double() - ref["lse"]).abs().max() <= tol * scale["lse"]
    grads = kernel.backward(q, k, v, g, lse, None, out.to(dtype), causal)
    for name, got in zip(("dq", "dk", "dv"), grads):
        assert got.dtype == torch.float32
        assert (got.double() - ref[name]).abs().max() <= tol * scale[name], name


def test_head_groups_with_rematerialization_aware_checkpointing():
    """The checkpoint path replays the kept output and per-group tails of a grouped call (cp=1, 2 groups)."""
    q, k, v, g = draw(8, 4, 12, 12, torch.float64, seed=4)
    grads = []
    for remat in (False, True):
        counter = AttentionCounter()
        attn = ContextParallelAttention(CommGroup("cp", None, None, 1, 0), "ring", counter=counter, head_groups=2)
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))

        def layer(a, b, c, attn=attn):
            return torch.tanh(attn(a * 1.5, b, c))

        out = attn.checkpoint(layer, qq, kk, vv) if remat else layer(qq, kk, vv)
        out.backward(g)
        grads.append((qq.grad, kk.grad, vv.grad))
        assert counter.forward_calls == 1 and counter.replays == int(remat)
    assert all(torch.equal(a, b) for a, b in zip(*grads))
