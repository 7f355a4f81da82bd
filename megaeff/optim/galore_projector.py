"""GaLore's projectors: which side of a gradient is projected, and the orthonormal basis of that side.

A 2-D gradient G (m x n) is projected on one side by a basis B with r orthonormal columns:

    left  (B = P, m x r):  R = P^T G   (r x n),  back: P N
    right (B = Q, n x r):  R = G Q     (m x r),  back: N Q^T

`side="auto"` is GaLore's `proj_type="std"` (jiaweizzhao/GaLore, galore_projector.py): right when m >= n, else
left: the basis spans the smaller dimension and the moments are r x the larger one. The rank is clamped to
min(m, n), as GaLore's slicing of the SVD factors does.

Bases (`basis`):
- `svd`: the top-r singular vectors of the gradient (GaLore), from `torch.linalg.svd`;
- `randomized`: randomized subspace iteration (Halko, Martinsson, Tropp 2011, Alg. 4.4; GaLore+'s fast SVD):
  a Gaussian sketch of r + oversample columns, `power_iters` rounds of re-orthonormalized multiplication by A A^T,
  then the top r of the small SVD of Q^T A (Rayleigh-Ritz). With a gap, tan of the largest principal angle to
  the true subspace is at most (s_{r+1}/s_r)^(2q+1) ||O_2 O_1^+|| for the sketch's parts O_1, O_2 on the top-r and
  the remaining right singular vectors (Saibaba 2019, "Randomized subspace iteration: analysis of canonical
  angles", Thm. 1, for the sketch's range; tests/unit/test_galore.py checks the extracted basis against it).

Cross-head (GaLore+, arXiv 2412.19820 §4.1.1): for an attention projection whose rows (q, k, v) or columns (o)
are heads of `head_dim`, the basis is computed from the gradient slice of one head only (drawn at random at each
refresh) on the model-dimension side, the side that every head shares, and applied to the whole gradient. What
megaeff states precisely (the paper leaves it open): a rank above head_dim takes ceil(r / head_dim) consecutive
heads starting at the drawn one (wrapping), and the side is forced: right for q/k/v (rows are heads), left for o.

The sketch and the head are drawn from a generator seeded by (seed, step, parameter name) (`refresh_seed`), never
the global RNG: data-parallel replicas hold identical gradients after the all-reduce, so every rank computes the
same basis, and any layout (pipeline stages hold other parameter lists) draws the same numbers as one process.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch

SIDES = ("auto", "left", "right")
PROJECTORS = ("svd", "randomized")


def resolve_side(shape, side: str = "auto", heads_axis: Optional[int] = None) -> str:
    """left | right for a gradient of `shape` (m, n). Cross-head (`heads_axis` set) projects the shared side."""
    if heads_axis is not None:
        return "right" if heads_axis == 0 else "left"
    if side != "auto":
        return side
    m, n = int(shape[0]), int(shape[1])
    return "right" if m >= n else "left"


def effective_rank(shape, rank: int) -> int:
    return max(1, min(int(rank), int(shape[0]), int(shape[1])))


def basis_shape(shape, rank: int, side: str):
    """(rows, r) of the basis of a `shape` gradient: P is m x r (left), Q is n x r (right)."""
    return (int(shape[0] if side == "left" else shape[1]), effective_rank(shape, rank))


def projected_shape(shape, rank: int, side: str):
    """Shape of R (and of the moments): r x n (left) or m x r (right)."""
    r = effective_rank(shape, rank)
    return (r, int(shape[1])) if side == "left" else (int(shape[0]), r)


def project(grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    return basis.T @ grad if side == "left" else grad @ basis


def project_back(update: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    return basis @ update if side == "left" else update @ basis.T


def refresh_seed(seed: int, step: int, name: str) -> int:
    """A 63-bit seed from (seed, step, parameter name): identical on every rank and under every layout."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(step)}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sketch(n: int, k: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The n x k Gaussian test matrix, drawn on the CPU so that every device type draws the same numbers."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(n, k, generator=gen, dtype=torch.float64).to(dtype)


def svd_basis(a: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    r = effective_rank(a.shape, rank)
    return u[:, :r].contiguous() if side == "left" else vh[:r].T.contiguous()


def randomized_left_basis(a: torch.Tensor, rank: int, power_iters: int, oversample: int, seed: int) -> torch.Tensor:
    """Top-r left singular subspace of `a` (m x n) by randomized subspace iteration (module docstring)."""
    m, n = a.shape
    r = min(int(rank), m, n)
    k = min(r + int(oversample), m, n)
    omega = sketch(n, k, seed, a.dtype).to(a.device)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(int(power_iters)):
        # Re-orthonormalize after each product: without it the columns collapse onto the top singular vector.
        z, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ z)
    ub, _, _ = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ ub[:, :r]).contiguous()


def randomized_basis(a: torch.Tensor, rank: int, side: str, power_iters: int, oversample: int, seed: int):
    src = a if side == "left" else a.T
    return randomized_left_basis(src, rank, power_iters, oversample, seed)


def head_slice(grad: torch.Tensor, heads_axis: int, head_dim: int, count: int, first: int) -> torch.Tensor:
    """The gradient of `count` consecutive heads starting at `first` (wrapping), heads along `heads_axis`."""
    n_heads = grad.shape[heads_axis] // head_dim
    idx = [(first + j) % n_heads for j in range(min(count, n_heads))]
    if heads_axis == 0:
        return grad.reshape(n_heads, head_dim, grad.shape[1])[idx].reshape(-1, grad.shape[1])
    return grad.reshape(grad.shape[0], n_heads, head_dim)[:, idx].reshape(grad.shape[0], -1)


def compute_basis(
    grad: torch.Tensor,
    *,
    rank: int,
    side: str,
    projector: str,
    power_iters: int,
    oversample: int,
    seed: int,
    heads_axis: Optional[int] = None,
    head_dim: int = 0,
) -> torch.Tensor:
    """The basis GaLore refreshes from `grad` (float32 or float64): SVD or randomized, whole or cross-head."""
    a, rank = grad, effective_rank(grad.shape, rank)
    if heads_axis is not None:
        n_heads = grad.shape[heads_axis] // head_dim
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        first = int(torch.randint(0, n_heads, (), generator=gen))
        count = -(-rank // head_dim)
        a = head_slice(grad, heads_axis, head_dim, count, first)
        seed = refresh_seed(seed, 0, "sketch")  # the sketch must not reuse the head draw's stream
    if projector == "svd":
        return svd_basis(a, rank, side)
    return randomized_basis(a, rank, side, power_iters, oversample, seed)
