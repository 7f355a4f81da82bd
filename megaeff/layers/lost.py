"""`lost`: low-rank plus channel-sparse training initialized by one SVD (Li et al. 2025, arXiv 2508.02668).

    y = gamma * f(x A^T) B^T + (1 - gamma) * x[:, I] W_s^T

Initialization (once; never redone during training), for the layer's out x in weight:
1. W0 = exactly the dense layer's draw: N(0, init_std) from the layout-independent generator of `<name>.weight`.
2. SVD of W0 in float64 on the CPU with one thread (MKL's results depend on the thread count; with one thread
   they are identical in every process of the same build). Singular vector signs are made canonical (the
   largest-magnitude entry of each u_i is positive), so the factors do not depend on LAPACK's sign choice.
3. B = U_r S_r^(1/2), A = S_r^(1/2) V_r^T (the balanced split).
4. W_comp = sum of the remaining triplets r .. r+k-1 (`method.lost_complement_rank` = k; null = all of them).
5. Channel score = L2 norm of each column of W_comp (one per input channel); I = the top max(1, floor(s in))
   channels (ties to the lower index), sorted. W_s = W0[:, I] (or W_comp[:, I]: `lost_sparse_init=complement`).

`channel_index` is a non-persistent int32 buffer, regenerated with the rest of the init from (seed, name) and
identical on every rank and layout; the persistent 8-byte `index_checksum` makes a checkpoint from another seed
fail to load instead of silently pairing W_s with the wrong channels.

Defaults, and why: f = silu, gamma = 0.5, s = 0.05. The paper's reviewers quote a nonlinearity between the factors
("the use of activation functions makes it difficult to merge parameter matrices") and the author's notes describe
the low-rank branch as A, an activation, B (CoLA-style), so silu is the paper-faithful reading; `none` (the linear
branch the author's later re-implementation hard-codes) is the ablation, and with gamma = 1 it is SVD-initialized
low-rank training. gamma = 0.5 and s = 0.05 are the defaults of that re-implementation (the paper's own values per
size are not available). At init y != x W0^T by design.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch
from torch import nn

from megaeff.layers.ops import HIGH_PRECISION, resolve
from megaeff.layers.sltrain_ops import index_checksum

if TYPE_CHECKING:
    from megaeff.config.model import MethodConfig

ACTIVATIONS = ("none", "silu")
SPARSE_INITS = ("w0", "complement")


def channel_count(in_features: int, ratio: float) -> int:
    return max(1, int(math.floor(ratio * in_features)))


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class LostInit(NamedTuple):
    B: torch.Tensor  # out x r, float64
    A: torch.Tensor  # r x in, float64
    complement: torch.Tensor  # out x in, float64
    scores: torch.Tensor  # in, float64
    channels: torch.Tensor  # k, int64, sorted
    sparse: torch.Tensor  # out x k, dtype of W0


def lost_decompose(
    W0: torch.Tensor, rank: int, k: int, complement_rank: Optional[int] = None, sparse_init: str = "w0"
) -> LostInit:
    """The deterministic LOST split of one dense weight (see the module docstring)."""
    W = W0.detach().to(device="cpu", dtype=torch.float64)
    with _threads(1):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    pivot = U.abs().argmax(dim=0)
    signs = torch.sign(U[pivot, torch.arange(U.shape[1])])
    signs[signs == 0] = 1.0
    U, Vh = U * signs, Vh * signs[:, None]
    root = S[:rank].sqrt()
    B = U[:, :rank] * root
    A = root[:, None] * Vh[:rank]
    hi = S.numel() if complement_rank is None else min(S.numel(), rank + complement_rank)
    complement = (U[:, rank:hi] * S[rank:hi]) @ Vh[rank:hi]
    scores = complement.norm(dim=0)
    top = torch.sort(scores, descending=True, stable=True).indices[:k]
    channels = top.sort().values
    src = W0.detach().cpu() if sparse_init == "w0" else complement.to(W0.dtype)
    return LostInit(B, A, complement, scores, channels, src[:, channels].clone())


class LostLinear(nn.Module):
    method = "lost"
    # The SVD makes this init costly; models/init.py runs such inits in threads, one intra-op thread each.
    parallel_init = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        channel_ratio: float = 0.05,
        gamma: float = 0.5,
        act: str = "silu",
        complement_rank: Optional[int] = None,
        sparse_init: str = "w0",
        name: Optional[str] = None,
        ops=None,
    ):
        super().__init__()
        # `act` names f; `ops` is the activation policy (megaeff.layers.ops) every matmul and f go through.
        self.ops = resolve(ops)
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown LOST activation {act!r}; available: {', '.join(ACTIVATIONS)}")
        if sparse_init not in SPARSE_INITS:
            raise ValueError(f"unknown LOST sparse init {sparse_init!r}; available: {', '.join(SPARSE_INITS)}")
        if not 1 <= rank < min(in_features, out_features):
            raise ValueError(f"LOST rank {rank} must be in [1, {min(in_features, out_features)})")
        self.in_features, self.out_features, self.name = in_features, out_features, name
        self.rank, self.channel_ratio, self.gamma, self.act = rank, float(channel_ratio), float(gamma), act
        self.complement_rank, self.sparse_init = complement_rank, sparse_init
        self.k = channel_count(in_features, channel_ratio)
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        self.sparse_weight = nn.Parameter(torch.empty(out_features, self.k))
        self.register_buffer("channel_index", torch.empty(self.k, dtype=torch.int32), persistent=False)
        self.register_buffer("index_checksum", torch.zeros((), dtype=torch.int64))

    @classmethod
    def from_config(
        cls, in_features: int, out_features: int, *, name: str, method: MethodConfig, ops=None
    ) -> "LostLinear":
        return cls(
            in_features,
            out_features,
            rank=method.rank,
            channel_ratio=method.lost_channel_ratio,
            gamma=method.lost_gamma,
            act=method.lost_act,
            complement_rank=method.lost_complement_rank,
            sparse_init=method.lost_sparse_init,
            name=name,
            ops=ops,
        )

    # ------------------------------------------------------------------ init and checkpoints
    def init_weights(self, prefix: str, init) -> None:
        key = self.name or prefix
        W0 = torch.empty(self.out_features, self.in_features, dtype=torch.float32)
        init(f"{key}.weight", W0)  # the dense layer's own draw
        d = lost_decompose(W0, self.rank, self.k, self.complement_rank, self.sparse_init)
        with torch.no_grad():
            self.B.copy_(d.B)
            self.A.copy_(d.A)
            self.sparse_weight.copy_(d.sparse)
            self.channel_index.copy_(d.channels)
            self.index_checksum.copy_(index_checksum(d.channels))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        saved = state_dict.get(prefix + "index_checksum")
        if saved is not None and not self.index_checksum.is_meta and int(saved) != int(self.index_checksum):
            error_msgs.append(
                f"{prefix}channel_index: the channels selected from the regenerated W0 differ from the checkpoint's "
                "(another train.seed, model.init_std or LOST setting); build the model with the checkpoint's config"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = self.ops
        h = ops.linear(x, self.A)
        if self.act == "silu":
            h = ops.silu(h)
        # index_select saves only the index for backward, so the selected block is the one activation saved here.
        xs = x.index_select(-1, self.channel_index)
        if ops is HIGH_PRECISION:
            # Both branches as ONE GEMM over the concatenated inner dimension (r + k): [f(xA^T), x_I] [gamma B,
            # (1 - gamma) W_s]^T. The same sum in another order (round-off only); it saves a GEMM per pass and the
            # three output-sized elementwise passes of the mix (and their backward). An activation policy that
            # quantizes each GEMM operand (FP8) keeps the two GEMMs, so each operand keeps its own scales.
            w = torch.cat([self.B * self.gamma, self.sparse_weight * (1.0 - self.gamma)], dim=1)
            return ops.linear(torch.cat([h, xs.to(h.dtype)], dim=-1), w)
        low = ops.linear(h, self.B)
        sparse = ops.linear(xs, self.sparse_weight)
        return self.gamma * low + (1.0 - self.gamma) * sparse

    # ------------------------------------------------------------------ accounting and logging
    def summary(self) -> str:
        comp = "all" if self.complement_rank is None else str(self.complement_rank)
        return (
            f"lost r={self.rank} channels={self.channel_ratio:g} gamma={self.gamma:g} f={self.act} "
            f"complement={comp} sparse_init={self.sparse_init}"
        )

    def describe(self, tokens: Optional[int] = None) -> str:
        return f"{self.k} channels"

    def macs_per_token(self, tokens: Optional[int] = None) -> float:
        return float(self.rank * (self.in_features + self.out_features) + self.out_features * self.k)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, channels={self.k}, "
            f"gamma={self.gamma:g}, act={self.act}"
        )
