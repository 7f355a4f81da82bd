"""Mixture of experts in place of a block's SwiGLU MLP: a top-k router over SwiGLU experts.

    MoE(cfg, method, prefix, act)(x [B, T, dim]) -> [B, T, dim]        (the same contract as SwiGLU)

Routing. logits = x W_r^T, with the router `{prefix}.router` always dense and computed in at least fp32: it
is tiny and its top-k decision is discontinuous, so it stays out of the activation policy, as attention scores
do. Each token goes to its top-k experts with gates = softmax over its k largest logits. This is the same number
as a softmax over all experts renormalized over the top k (exp(l_i) / sum over the top k of exp(l_j) either
way), so Mixtral's and GShard's conventions coincide; only the load-balancing loss sees the full softmax.

Experts. `moe_experts` SwiGLU experts of hidden size `moe_ffn_dim` (default `ffn_dim`), every projection built
by `build_linear` under the logical name `{prefix}.experts.{e}.gate|up|down`. Any linear method works, and
initialization stays a function of (seed, name), so any expert layout starts from these weights.

Dispatch and combine. Token-expert assignments are sorted by expert (stable, so ties keep token order), each
expert runs once on its rows, and the results return to their (token, slot) places before the gated sum over
the k slots. Every expert takes part in every call, even with zero rows, so each expert parameter ends every
backward with a gradient (an exact zero when unused, without running it). An optimizer then steps every expert
on every step, exactly as under the sharded layouts of megaeff/distributed/expert_parallel/experts.py, where
unused experts get zero gradients.

Load balancing (Switch Transformer, eq. 4, with top-k): f_e = assignments to e / (N k), P_e = mean router
probability of e, balance = E * sum_e f_e P_e (1 under a perfectly uniform router). `aux_loss` is
moe_aux_loss_coef * balance after every forward (None when the coefficient is 0); the trainer adds
`moe_aux_loss(model)` to the loss. `last_loads` holds the tokens per expert of the last forward.

Fixed routers for tests and benchmarks: set `router_override` to a callable (x_flat [N, dim]) -> logits [N, E]
(e.g. a fixed projection, or a constant table that ignores x). Top-k and gates then apply to those logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megaeff.layers.linear import build_linear
from megaeff.layers.ops import ActivationOps, resolve

if TYPE_CHECKING:
    from megaeff.config.model import MethodConfig, ModelConfig


class Expert(nn.Module):
    """One SwiGLU expert (LLaMA's MLP with its own hidden size)."""

    def __init__(self, dim: int, hidden: int, method: MethodConfig, prefix: str, act: Optional[ActivationOps] = None):
        super().__init__()
        self.ops = resolve(act)
        self.gate = build_linear(dim, hidden, name=f"{prefix}.gate", method=method, act=act)
        self.up = build_linear(dim, hidden, name=f"{prefix}.up", method=method, act=act)
        self.down = build_linear(hidden, dim, name=f"{prefix}.down", method=method, act=act)

    def forward(self, x):
        return self.down(self.ops.swiglu(self.gate(x), self.up(x)))


class _NoRows(torch.autograd.Function):
    """The [0, dim] output of an expert that got no rows, whose backward hands its parameters exact zero
    gradients. Running the expert on an empty batch would do the same, but an FP8 activation policy cannot
    scale an empty tensor."""

    @staticmethod
    def forward(ctx, empty, *params):
        ctx.params = [(p.shape, p.dtype, p.device) for p in params]
        return empty.clone()

    @staticmethod
    def backward(ctx, dy):
        return (None, *(torch.zeros(s, dtype=d, device=v) for s, d, v in ctx.params))


def run_expert(expert: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    if rows.shape[0]:
        return expert(rows)
    empty = rows.new_zeros(0, expert.down.out_features)
    return _NoRows.apply(empty, *[p for p in expert.parameters() if p.requires_grad])


class Routing(NamedTuple):
    experts: torch.Tensor  # [N, k] int64, the chosen experts of each token, best first
    gates: torch.Tensor  # [N, k] router dtype, softmax over the chosen logits
    probs: torch.Tensor  # [N, E] router dtype, full softmax (for the balance loss)


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def route_tokens(
    flat: torch.Tensor, router_weight: torch.Tensor, top_k: int, override: Optional[Callable] = None
) -> Routing:
    dt = router_dtype(flat.dtype)
    if override is not None:
        logits = override(flat).to(dt)
    else:
        logits = F.linear(flat.to(dt), router_weight.to(dt))
    top, experts = torch.topk(logits, top_k, dim=-1)
    return Routing(experts, torch.softmax(top, dim=-1), torch.softmax(logits, dim=-1))


def sort_assignments(experts: torch.Tensor, n_experts: int):
    """Assignment slots (token * k + slot) sorted by expert, stably, and the count per expert."""
    flat = experts.reshape(-1)
    return torch.argsort(flat, stable=True), torch.bincount(flat, minlength=n_experts)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def combine(y_slots: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """y_slots [N * k, dim] in (token, slot) order -> the gated sum over the k slots, [N, dim]. Summing over
    a fixed slot axis (not scattering into tokens) keeps the result independent of dispatch order."""
    n, k = gates.shape
    return (y_slots.view(n, k, -1) * gates.to(y_slots.dtype).unsqueeze(-1)).sum(1)


def balance_loss(prob_sum: torch.Tensor, counts: torch.Tensor, n_tokens: int, top_k: int) -> torch.Tensor:
    """Switch's E * sum_e f_e P_e from the summed router probabilities and the assignment counts of `n_tokens`
    tokens. With counts of the global batch and the probabilities of one rank's tokens, this is that rank's
    share of the global value (the shares sum to it exactly, and so do their gradients)."""
    n_experts = counts.numel()
    frac = counts.to(prob_sum.dtype) / max(1, n_tokens * top_k)
    return n_experts * (frac * prob_sum).sum() / max(1, n_tokens)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, method: MethodConfig, prefix: str, act: Optional[ActivationOps] = None):
        super().__init__()
        self.n_experts, self.top_k = int(cfg.moe_experts), int(cfg.moe_top_k)
        if self.n_experts < 1:
            raise ValueError(f"a MoE layer needs moe_experts >= 1, got {self.n_experts}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"moe_top_k must be in [1, moe_experts={self.n_experts}], got {self.top_k}")
        self.dim, self.hidden = cfg.dim, int(cfg.moe_ffn_dim or cfg.ffn_dim)
        self.aux_loss_coef = float(cfg.moe_aux_loss_coef)
        self.prefix = prefix
        self.router = nn.Linear(cfg.dim, self.n_experts, bias=False)
        self.experts = nn.ModuleList(
            Expert(cfg.dim, self.hidden, method, f"{prefix}.experts.{e}", act) for e in range(self.n_experts)
        )
        self.router_override: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.aux_loss: Optional[torch.Tensor] = None
        self.last_loads: Optional[torch.Tensor] = None

    def route(self, flat: torch.Tensor) -> Routing:
        return route_tokens(flat, self.router.weight, self.top_k, self.router_override)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.dim)
        r = self.route(flat)
        order, counts = sort_assignments(r.experts, self.n_experts)
        rows = flat[order // self.top_k]
        outs = [run_expert(expert, chunk) for expert, chunk in zip(self.experts, rows.split(counts.tolist()))]
        y_slots = torch.cat(outs)[inverse_permutation(order)]
        self.last_loads = counts.detach()
        self.aux_loss = (
            self.aux_loss_coef * balance_loss(r.probs.sum(0), counts, flat.shape[0], self.top_k)
            if self.aux_loss_coef
            else None
        )
        return combine(y_slots, r.gates).view(*lead, self.dim)

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, top_k={self.top_k}, hidden={self.hidden}, aux_coef={self.aux_loss_coef:g}"


def moe_aux_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """The sum of the load-balancing losses of the last forward over every MoE layer of `model` (single process or
    sharded: the sharded layers hold this rank's share), or None when there is nothing to add."""
    terms = [m.aux_loss for m in model.modules() if getattr(m, "aux_loss", None) is not None]
    return torch.stack([t.reshape(()) for t in terms]).sum() if terms else None


def moe_loads(model: nn.Module) -> dict:
    """Tokens per expert of the last forward, by MoE layer path (rank-local for MoE, global when sharded)."""
    return {n: m.last_loads for n, m in model.named_modules() if getattr(m, "last_loads", None) is not None}
