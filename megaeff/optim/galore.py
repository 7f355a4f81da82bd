"""GaLore (Zhao et al., arXiv 2403.03507): full-rank weights, Adam moments of the gradient projected to rank r.

For a projected weight with gradient G (m x n) and basis B (megaeff/optim/galore_projector.py):

    every update_proj_gap steps (at the parameter's update count t with t % T == 0, the first update included):
        B <- top-r singular basis of the current G (SVD, or randomized subspace iteration; cross-head optional)
    R = project(G, B)                                  r x n (left) or m x r (right)
    m, v <- Adam moments of R                          kept in the projected space: the memory GaLore saves
    N = (m / bc1) / (sqrt(v / bc2) + eps)              torch AdamW's formula
    W <- W (1 - lr wd) - lr * scale * project_back(N, B)

The moments are not reset or rotated when B changes (GaLore's code keeps them too). Everything else (norms,
embedding, output head, MoE experts and router) gets the same AdamW formula on the full tensor: GaLore's code
projects only the attention and MLP projections (`target_modules_list = ["attn", "mlp"]`), here the dense q, k,
v, o, gate, up, down weights.

Differences from jiaweizzhao/GaLore's `galore_torch.AdamW`, each stated: eps is added after the bias correction
(torch AdamW's placement; GaLore's HF-derived code folds sqrt(bc2) into the step size), and weight decay is
decoupled before the update as in torch AdamW (GaLore's code applies it after, to the updated weight); both
differ by O(eps) and O(lr^2 wd). With a basis that is a signed permutation (r = min(m, n)) the update is exactly
AdamW's, which tests/unit/test_galore.py checks; with any other full-rank basis it is not, because Adam's
element-wise normalization is not rotation invariant.

State per projected parameter: `step` (int64 scalar, CPU), `exp_avg` and `exp_avg_sq` (projected shape),
`projector` (the basis B, m x r or n x r); all fp32 (fp64 for fp64 parameters). Per other parameter: `step`,
`exp_avg`, `exp_avg_sq` in the parameter's shape. All of it is ordinary optimizer state: the checkpoints save
and load it by logical name (`state_shape` tells a load the projected shapes), and `state_memory` counts it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from megaeff.optim.galore_projector import (
    basis_shape,
    compute_basis,
    project,
    project_back,
    projected_shape,
    refresh_seed,
    resolve_side,
)

if TYPE_CHECKING:
    from megaeff.config.optim import OptimConfig

# Leaf module names of the projections GaLore projects, by the name of the module holding them.
TARGETS = {"attention": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
GALORE_DEFAULTS = dict(
    galore=False,
    rank=128,
    update_proj_gap=200,
    scale=0.25,
    side="auto",
    projector="svd",
    power_iters=2,
    oversample=8,
    heads_axis=None,
    head_dim=0,
)


def state_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose param groups with `galore=True` keep their moments in GaLore's projected space.

    `seed` and `names` ({id(parameter): logical name}) seed each refresh's random draws (randomized sketch,
    cross-head choice) from (seed, step, name); a parameter without a name uses its position."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        seed: int = 0,
        names: Optional[Mapping[int, str]] = None,
        **galore,
    ):
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas must be in [0, 1), got {tuple(betas)}")
        unknown = set(galore) - set(GALORE_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown GaLore settings {sorted(unknown)}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **GALORE_DEFAULTS)
        defaults.update(galore)
        super().__init__(params, defaults)
        self.seed = int(seed)
        names = names or {}
        flat = [p for g in self.param_groups for p in g["params"]]
        self.names: Dict[int, str] = {id(p): names.get(id(p), f"param{i}") for i, p in enumerate(flat)}

    # ------------------------------------------------------------------ shapes of the state
    def group_of(self, p: torch.Tensor) -> Dict:
        # Looked up, not cached: a load may replace the group dicts.
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    @staticmethod
    def side(p: torch.Tensor, g: Dict) -> str:
        return resolve_side(p.shape, g["side"], g["heads_axis"])

    @staticmethod
    def projected(p: torch.Tensor, g: Dict) -> bool:
        return bool(g["galore"]) and p.dim() == 2

    def state_shape(self, p: torch.Tensor, key: str) -> Optional[Tuple[int, ...]]:
        """The shape of state `key` of `p` (what a checkpoint load allocates before reading); None: unknown key."""
        if key == "step":
            return ()
        if key not in (*MOMENT_KEYS, "projector"):
            return None
        g = self.group_of(p)
        if not self.projected(p, g):
            return tuple(p.shape) if key != "projector" else None
        shape = basis_shape if key == "projector" else projected_shape
        return tuple(shape(p.shape, g["rank"], self.side(p, g)))

    def _init_state(self, p: torch.Tensor) -> Dict[str, torch.Tensor]:
        keys = (*MOMENT_KEYS, "projector") if self.projected(p, self.group_of(p)) else MOMENT_KEYS
        st = {"step": torch.zeros((), dtype=torch.int64)}
        for key in keys:
            st[key] = torch.zeros(self.state_shape(p, key), dtype=state_dtype(p), device=p.device)
        return st

    def check_state(self, name: str, p: torch.Tensor, st: Dict) -> Optional[str]:
        """Why a loaded state cannot belong to `p` under these settings (None when it fits)."""
        keys = ("step", *MOMENT_KEYS) + (("projector",) if self.projected(p, self.group_of(p)) else ())
        for key in keys:
            if not torch.is_tensor(st.get(key)):
                return f"{name}: missing {key!r} (saved by a different optimizer or settings?)"
            want = self.state_shape(p, key)
            if tuple(st[key].shape) != want:
                return f"{name}: {key} is {tuple(st[key].shape)}, expected {want} (another galore_rank or side?)"
        return None

    # ------------------------------------------------------------------ step
    def _refresh(self, p: torch.Tensor, g: Dict, grad: torch.Tensor, st: Dict, step: int) -> None:
        basis = compute_basis(
            grad,
            rank=g["rank"],
            side=self.side(p, g),
            projector=g["projector"],
            power_iters=g["power_iters"],
            oversample=g["oversample"],
            seed=refresh_seed(self.seed, step, self.names[id(p)]),
            heads_axis=g["heads_axis"],
            head_dim=g["head_dim"],
        )
        st["projector"].copy_(basis)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                st = self.state[p]
                if not st:
                    st.update(self._init_state(p))
                grad = p.grad.to(state_dtype(p))
                projected = self.projected(p, group)
                if projected:
                    if int(st["step"]) % int(group["update_proj_gap"]) == 0:
                        self._refresh(p, group, grad, st, int(st["step"]))
                    grad = project(grad, st["projector"], self.side(p, group))
                st["step"] += 1
                t = int(st["step"])
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr / (1 - beta1**t)
                denom = (v.sqrt() / (1 - beta2**t) ** 0.5).add_(eps)
                if wd:
                    p.mul_(1 - lr * wd)
                if projected:
                    full = project_back(m / denom, st["projector"], self.side(p, group))
                    p.add_(full.to(p.dtype), alpha=-step_size * group["scale"])
                else:
                    p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-step_size)
        return loss


# ---------------------------------------------------------------------------------------------- building it
def galore_targets(model: nn.Module) -> Dict[str, Tuple[Optional[int], int]]:
    """The parameters GaLore projects, by name -> (heads axis or None, head_dim): the 2-D weights of the dense
    attention and MLP projections. q/k/v hold heads along rows (axis 0), o along columns (axis 1)."""
    modules = dict(model.named_modules())
    out = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if p.dim() != 2 or len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in TARGETS.get(parts[-3], ()):
            continue
        owner = modules.get(".".join(parts[:-2]))
        attention = parts[-3] == "attention"
        head_dim = int(getattr(owner, "head_dim", 0)) if attention else 0
        out[name] = ((1 if parts[-2] == "o" else 0) if attention and head_dim else None, head_dim)
    return out


def galore_param_groups(model: nn.Module, weight_decay: float, settings: Dict, cross_head: bool) -> List[Dict]:
    """GaLore's groups (one per heads layout when `cross_head`), then AdamW's matrices (decayed) and vectors."""
    targets = galore_targets(model)
    projected: Dict[Tuple, List] = {}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in targets:
            axis, head_dim = targets[name] if cross_head else (None, 0)
            projected.setdefault((axis, head_dim), []).append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": ps, "weight_decay": weight_decay, **settings, "galore": True, "heads_axis": a, "head_dim": d}
        for (a, d), ps in projected.items()
    ]
    groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def galore_state_numel(model: nn.Module, rank: int, side: str = "auto", cross_head: bool = False) -> Dict[str, int]:
    """Elements of GaLore's state from shapes only (meta models too): `moments` (both, every trainable
    parameter), `projector` (the bases), `tensors` (trainable parameter tensors: one int64 step each)."""
    targets = galore_targets(model)
    moments = projector = tensors = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tensors += 1
        if name not in targets:
            moments += 2 * p.numel()
            continue
        axis = targets[name][0] if cross_head else None
        s = resolve_side(p.shape, side, axis)
        a, b = projected_shape(p.shape, rank, s)
        c, d = basis_shape(p.shape, rank, s)
        moments += 2 * a * b
        projector += c * d
    return {"moments": moments, "projector": projector, "tensors": tensors}


def build_galore(model: nn.Module, ocfg: OptimConfig, seed: int = 0) -> Tuple[GaLoreAdamW, str]:
    """The optimizer `optim=galore` runs (`ocfg`: OptimConfig), and its description for the run log."""
    settings = dict(
        rank=int(ocfg.galore_rank),
        update_proj_gap=int(ocfg.galore_update_proj_gap),
        scale=float(ocfg.galore_scale),
        side=str(ocfg.galore_side),
        projector=str(ocfg.galore_projector),
        power_iters=int(ocfg.galore_power_iters),
        oversample=int(ocfg.galore_oversample),
    )
    groups = galore_param_groups(model, ocfg.weight_decay, settings, bool(ocfg.galore_cross_head))
    names = {id(p): n for n, p in model.named_parameters()}
    opt = GaLoreAdamW(groups, lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps, seed=seed, names=names, **settings)
    n_proj = sum(len(g["params"]) for g in groups if g.get("galore"))
    how = settings["projector"]
    if how == "randomized":
        how += f" ({settings['power_iters']} power iterations, oversampling {settings['oversample']})"
    description = (
        f"GaLore AdamW: rank {settings['rank']}, refresh every {settings['update_proj_gap']} steps by {how}, "
        f"scale {settings['scale']}, side {settings['side']}{', cross-head attention' * ocfg.galore_cross_head}; "
        f"{n_proj} projected weights, the other {len(names) - n_proj} tensors plain AdamW"
    )
    return opt, description
