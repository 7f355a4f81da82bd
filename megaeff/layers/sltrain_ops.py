"""Kernels of the SLTrain layer: the fixed random support and the two compute paths.

Support: |Omega| = floor(delta * m * n) flat row-major positions of the m x n weight, uniform without replacement,
sorted, int32. Drawn from a dedicated generator of (global seed, parameter name), so every rank and every layout
regenerates the same support and it never has to be communicated or stored in a checkpoint.

Densify path (SLTrain's own, `DensifyMatmul`): W = B (sA) + scatter(S) is built inside forward, used for one
GEMM, and dropped; backward rebuilds it. Neither W nor its gradient G outlives the call that needs it:
    dx = dy W,  G = dy^T x,  dB = G (sA)^T,  dA = s B^T G,  dS = G.flatten()[Omega].

Both Functions save their activation input through the layer's `ActivationOps` (`pack`/`unpack`, x itself by
default, FP8 codes under FP8 activations) and pass the incoming gradient through `ops.grad`. The densify path's
three GEMMs with the densified W (y = x W^T, dx = dy W, G = dy^T x) run through the policy's `mm`,
`mm_input_grad` and `mm_weight_grad`: plain matmuls by default, FP8 GEMMs under COAT's `fp8_gemm`. Building W
(B sA), its scatter, and the factor gradients dB = G (sA)^T, dA = s B^T G stay high precision, as do all the
sparse products (the CSR product, its transpose and the sampled dS): FP8 GEMMs need dense tensor-core operands.

No-densify path: y = (x (sA)^T) B^T + x S^T, the sparse product by `SparseMatmul` on a CSR view of S (values,
column indices and row offsets derived from Omega on the fly):
    forward  y_s = (S x^T)^T,  backward  dx = (S^T dy^T)^T,  dS = (dy^T x)[Omega] (sampled dense-dense product).
CPU sparse kernels have no bf16 support, so the sparse product runs in fp32 when the compute dtype is 16-bit.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from megaeff.layers.ops import HIGH_PRECISION


# ---------------------------------------------------------------------------------------------------- support
def support_size(out_features: int, in_features: int, density: float) -> int:
    return int(math.floor(density * out_features * in_features))


def sample_support(numel: int, nnz: int, generator: torch.Generator) -> torch.Tensor:
    """`nnz` distinct positions of range(numel), uniform without replacement, sorted, int32.

    Dense supports use a permutation. Sparse ones (the usual case, delta a few percent) draw with replacement,
    deduplicate and top up until there are enough, then keep a uniform subset of exactly `nnz`: the law of the
    result is invariant under any permutation of the positions, so it is the uniform law on nnz-subsets, at
    O(nnz log nnz) instead of O(numel) cost. Deterministic for a given generator state (CPU generator)."""
    if not 0 <= nnz <= numel:
        raise ValueError(f"cannot choose {nnz} of {numel} positions")
    if numel >= 2**31:
        raise ValueError(f"{numel} positions do not fit int32 indices")
    if 3 * nnz > numel:
        chosen = torch.randperm(numel, generator=generator)[:nnz]
    else:
        chosen = torch.empty(0, dtype=torch.int64)
        while chosen.numel() < nnz:
            need = nnz - chosen.numel()
            draw = torch.randint(numel, (need + need // 8 + 16,), generator=generator)
            chosen = torch.unique(torch.cat([chosen, draw]))
        if chosen.numel() > nnz:
            chosen = chosen[torch.randperm(chosen.numel(), generator=generator)[:nnz]]
    return chosen.sort().values.to(torch.int32)


def index_checksum(index: torch.Tensor) -> torch.Tensor:
    """An order-sensitive int64 fingerprint of an index tensor (integer sums wrap, so it is exact everywhere)."""
    i = index.to(torch.int64).flatten()
    pos = torch.arange(1, i.numel() + 1, dtype=torch.int64, device=i.device)
    return ((i + 1) * (2 * pos + 1)).sum() + i.numel() * 1_000_003


# ---------------------------------------------------------------------------------------------------- helpers
def compute_dtype(x: torch.Tensor, param: torch.Tensor) -> torch.dtype:
    """The dtype a plain F.linear would compute in: the autocast dtype when autocast is on, else the promotion."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(x.dtype, param.dtype)


def densify(A, B, values, index, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """W = B (s A) + scatter(values at index), in `dtype`."""
    W = B.to(dtype) @ (A * scale).to(dtype)
    # Indices are unique, so the sum is exact; index_put_ has a deterministic CUDA path (index_add_ uses atomics).
    W.view(-1).index_put_((index,), values.to(dtype), accumulate=True)
    return W


def _sparse_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def csr(index: torch.Tensor, values: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """CSR view (m x n) of a sorted flat row-major support; offsets and columns are derived per call (O(nnz))."""
    rows = torch.div(index, n, rounding_mode="floor")
    cols = index - rows * n
    # Row offsets by binary search in the sorted rows (deterministic everywhere, unlike bincount on CUDA).
    crow = torch.searchsorted(rows, torch.arange(m + 1, dtype=rows.dtype, device=index.device), out_int32=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta", "invariant checks disabled"
        return torch.sparse_csr_tensor(crow, cols.to(torch.int32), values, (m, n))


# ---------------------------------------------------------------------------------------------------- autograd
class DensifyMatmul(torch.autograd.Function):
    """y = x W^T with W = B (sA) + S built transiently (x is 2-D [tokens, in])."""

    @staticmethod
    def forward(ctx, x, A, B, values, index, scale: float, ops=HIGH_PRECISION):
        cdt = compute_dtype(x, A)
        with torch.autocast(x.device.type, enabled=False):
            W = densify(A, B, values, index, scale, cdt)
            y = ops.mm(x.to(cdt), W)
        del W
        packed = ops.pack(x)  # the activation as the policy saves it (x itself by default)
        ctx.save_for_backward(*packed.tensors, A, B, values, index)
        ctx.scale, ctx.cdt, ctx.ops, ctx.x_dtype, ctx.n_x = scale, cdt, ops, packed.dtype, len(packed.tensors)
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        x = ctx.ops.unpack(saved[: ctx.n_x], ctx.x_dtype)
        A, B, values, index = saved[ctx.n_x :]
        s, cdt = ctx.scale, ctx.cdt
        need_x, need_A, need_B, need_v = ctx.needs_input_grad[:4]
        dx = dA = dB = dv = None
        with torch.autocast(dy.device.type, enabled=False):
            dy = ctx.ops.grad(dy).to(cdt)
            if need_x:
                W = densify(A, B, values, index, s, cdt)
                dx = ctx.ops.mm_input_grad(dy, W).to(x.dtype)
                del W
            if need_A or need_B or need_v:
                G = ctx.ops.mm_weight_grad(dy, x.to(cdt))  # the full m x n weight gradient, only in this block
                if need_B:
                    dB = (G @ (A * s).to(cdt).t()).to(B.dtype)
                if need_A:
                    dA = ((B.to(cdt).t() @ G) * s).to(A.dtype)
                if need_v:
                    dv = G.view(-1).index_select(0, index).to(values.dtype)
                del G
        return dx, dA, dB, dv, None, None, None


class SparseMatmul(torch.autograd.Function):
    """y = x S^T for the m x n sparse S given by (values, sorted flat index); x is 2-D [tokens, n]."""

    @staticmethod
    def forward(ctx, x, values, index, m: int, n: int, ops=HIGH_PRECISION):
        cdt = compute_dtype(x, values)
        sdt = _sparse_dtype(cdt)
        with torch.autocast(x.device.type, enabled=False):
            S = csr(index, values.to(sdt), m, n)
            y = (S @ x.to(sdt).t().contiguous()).t().to(cdt)
        packed = ops.pack(x)
        ctx.save_for_backward(*packed.tensors, values, index)
        ctx.m, ctx.n, ctx.sdt, ctx.ops, ctx.x_dtype, ctx.n_x = m, n, sdt, ops, packed.dtype, len(packed.tensors)
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        x = ctx.ops.unpack(saved[: ctx.n_x], ctx.x_dtype)
        values, index = saved[ctx.n_x :]
        m, n, sdt = ctx.m, ctx.n, ctx.sdt
        dx = dv = None
        with torch.autocast(dy.device.type, enabled=False):
            dyt = ctx.ops.grad(dy).to(sdt).t().contiguous()  # m x T
            S = csr(index, values.detach().to(sdt), m, n)
            if ctx.needs_input_grad[0]:
                dx = (S.t() @ dyt).t().to(x.dtype)
            if ctx.needs_input_grad[1]:
                sampled = torch.sparse.sampled_addmm(S, dyt, x.to(sdt).contiguous(), beta=0.0)
                dv = sampled.values().to(values.dtype)
        return dx, dv, None, None, None, None


# ---------------------------------------------------------------------------------------------------- path rule
# Cost of one multiply-add of the sparse product, in units of one dense-GEMM multiply-add, fitted to whole-layer
# timings on CPU (torch 2.13 + MKL, fp32, 1 thread, delta = 0.03). Training (forward + backward: CSR product,
# transposed product, sampled product for dS) implied 50-100 at 512x512 and 1376x512 with r = 128 (more, 100-200,
# at the tiny 128-wide shapes, where fixed overheads dominate); the forward alone about 50-65. The kernels run
# near memory bandwidth and GEMMs near peak, hence the large ratio; GPU sparse kernels are not better placed
# against cuBLAS. With 70 the rule reproduces the measured crossovers (densify faster above): 512x512 ~1000
# tokens per call (rule: 854), 1376x512 between 2048 and 4096 (rule: 3.9k). These constants are the rule of
# method.sltrain_costs=fixed and of layers not calibrated; with `measured` (the default) the trainer measures c per
# shape on the machine at start-up, or reads it from the run dir (sltrain_costs.py), and passes it as `sparse_cost`.
SPARSE_COST_FORWARD = 50.0
SPARSE_COST_TRAIN = 70.0


def path_costs(
    m: int, n: int, rank: int, nnz: int, tokens: int, training: bool = True, sparse_cost: Optional[float] = None
):
    """(densify, sparse) cost of one call in dense-GEMM multiply-adds.

    densify: W rebuilt (m n r) and one GEMM in forward; in backward W again, dx and G (2 T m n), dB and dA (2 m n r).
    sparse:  the two thin GEMMs T r (m + n) per pass (3 passes in training) plus the sparse kernels at their cost
    `sparse_cost` per token and nonzero (None: the fitted SPARSE_COST_TRAIN / SPARSE_COST_FORWARD)."""
    if sparse_cost is None:
        sparse_cost = SPARSE_COST_TRAIN if training else SPARSE_COST_FORWARD
    if training:
        dense = 4.0 * m * n * rank + 3.0 * tokens * m * n
        sparse = 3.0 * tokens * rank * (m + n) + sparse_cost * tokens * nnz
    else:
        dense = 1.0 * m * n * rank + 1.0 * tokens * m * n
        sparse = 1.0 * tokens * rank * (m + n) + sparse_cost * tokens * nnz
    return dense, sparse


def sparse_token_limit(
    m: int, n: int, rank: int, nnz: int, training: bool = True, sparse_cost: Optional[float] = None
) -> float:
    """Calls with fewer tokens than this take the sparse path (inf: always; 0: never). Both costs are linear in
    the token count and only the densify path has a per-call term (rebuilding W), so there is one crossover."""
    d0, s0 = path_costs(m, n, rank, nnz, 0, training, sparse_cost)
    d1, s1 = path_costs(m, n, rank, nnz, 1, training, sparse_cost)
    per_token_gap = (s1 - s0) - (d1 - d0)
    if per_token_gap <= 0:
        return math.inf
    return (d0 - s0) / per_token_gap
