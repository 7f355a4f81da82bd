"""COAT's FP8 AdamW: both moments in FP8 with per-group Dynamic Range Expansion, FP32 master weights.

State per parameter with FP8 moments (`state[p]`):

    step            int64 scalar (CPU)
    exp_avg         FP8 codes of m, shaped like p (E4M3)
    exp_avg_meta    [n_groups, 3] FP32: scale, k, centre of each 1x128 group (megaeff/precision/group_quant.py)
    exp_avg_sq      FP8 codes of v, shaped like p (E4M3, or E5M2 with second_moment="e5m2")
    exp_avg_sq_meta [n_groups, 3] FP32

That is 2 bytes per element plus 24 bytes per 128 elements: 2.1875 bytes per parameter (a little more for rows
whose length is not a multiple of 128). The initial state, codes 0 with (scale, k, centre) = (0, 1, 1),
dequantizes to exact zeros, so step 1 equals AdamW's.

Small tensors. A parameter whose *logical* tensor has fewer than `min_fp8_numel` elements (default 4096: the
norm gains, biases) keeps FP32 moments (`exp_avg`, `exp_avg_sq` FP32) updated by the same FP32 formula: their
memory is negligible and FP8 buys nothing there. The decision uses the global shape (the `logical_shape` of
`param_meta(p)`, megaeff/layers/param_meta.py: what a parallel wrapper records, else `p.shape`), never a shard's,
so the layout cannot change the numerics.
"""

from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from megaeff.kernels.fp8_adamw import Backend, select_backend
from megaeff.kernels.fp8_adamw_ref import Fp8Entry, StepScalars, adamw_math
from megaeff.layers.param_meta import param_meta
from megaeff.precision.fp8 import get_format
from megaeff.precision.group_quant import META_FIELDS, GroupLayout

FP8_KEYS = ("exp_avg", "exp_avg_meta", "exp_avg_sq", "exp_avg_sq_meta")


def logical_shape(p: torch.Tensor) -> Tuple[int, ...]:
    return param_meta(p).logical_shape


def initial_meta(n_groups: int, device) -> torch.Tensor:
    meta = torch.zeros(n_groups, META_FIELDS, dtype=torch.float32, device=device)
    meta[:, 1:] = 1.0
    return meta


class CoatAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        first_moment: str = "e4m3",
        second_moment: str = "e4m3",
        expand: bool = True,
        min_fp8_numel: int = 4096,
        backend: str = "auto",
        device: Optional[torch.device] = None,
    ):
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas must be in [0, 1), got {tuple(betas)}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.m_fmt = get_format(first_moment)
        self.v_fmt = get_format(second_moment)
        self.expand = bool(expand)
        self.min_fp8_numel = int(min_fp8_numel)
        first = next((p for g in self.param_groups for p in g["params"]), None)
        dev = (
            torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
        )
        self.backend: Backend = select_backend(backend, dev)

    # ------------------------------------------------------------------ state
    def uses_fp8(self, p: torch.Tensor) -> bool:
        return math.prod(logical_shape(p)) >= self.min_fp8_numel

    def layout(self, p: torch.Tensor) -> GroupLayout:
        # Local tensor's own shape: equal to the logical one until a parallel wrapper shards along dim 0 at group
        # boundaries, which keeps the per-row tiling identical.
        return GroupLayout.for_shape(p.shape)

    def _init_state(self, p: torch.Tensor) -> dict:
        st = {"step": torch.zeros((), dtype=torch.int64)}
        if self.uses_fp8(p):
            n = self.layout(p).n_groups
            st["exp_avg"] = torch.zeros(p.shape, dtype=self.m_fmt.dtype, device=p.device)
            st["exp_avg_meta"] = initial_meta(n, p.device)
            st["exp_avg_sq"] = torch.zeros(p.shape, dtype=self.v_fmt.dtype, device=p.device)
            st["exp_avg_sq_meta"] = initial_meta(n, p.device)
        else:
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        return st

    def check_state(self, name: str, p: torch.Tensor, st: dict) -> Optional[str]:
        """Why a loaded state cannot belong to `p` under this optimizer's settings (None when it fits)."""
        if "step" not in st:
            return f"{name}: no 'step'"
        if self.uses_fp8(p):
            n = self.layout(p).n_groups
            want = {
                "exp_avg": (tuple(p.shape), self.m_fmt.dtype),
                "exp_avg_sq": (tuple(p.shape), self.v_fmt.dtype),
                "exp_avg_meta": ((n, META_FIELDS), torch.float32),
                "exp_avg_sq_meta": ((n, META_FIELDS), torch.float32),
            }
        else:
            want = {k: (tuple(p.shape), torch.float32) for k in ("exp_avg", "exp_avg_sq")}
        for key in want:
            if not torch.is_tensor(st.get(key)):
                return f"{name}: missing {key!r} (saved by a different optimizer or settings?)"
        for key, (shape, dtype) in want.items():
            t = st[key]
            if tuple(t.shape) != shape or t.dtype != dtype:
                return f"{name}: {key} is {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}"
        return None

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts floating state to the parameter's dtype, which would turn FP8 codes into FP32;
        restore the saved tensors as they are (device moves only) and check that they fit."""
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        super().load_state_dict(state_dict)
        for i, p in zip(ids, params):
            if i not in saved:
                continue
            restored = {
                k: (v.to(p.device, copy=True) if torch.is_tensor(v) and k != "step" else v) for k, v in saved[i].items()
            }
            problem = self.check_state(f"parameter {i}", p, restored)
            if problem is not None:
                raise ValueError(f"CoatAdamW state does not fit: {problem}")
            self.state[p] = restored

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries: List[Fp8Entry] = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("CoatAdamW does not support sparse gradients")
                if p.dtype != torch.float32:
                    raise RuntimeError(f"CoatAdamW keeps FP32 master weights; got a {p.dtype} parameter")
                st = self.state[p]
                if not st:
                    st.update(self._init_state(p))
                st["step"] += 1
                s = StepScalars.compute(group["lr"], beta1, beta2, group["eps"], group["weight_decay"], int(st["step"]))
                grad = p.grad.float().contiguous()
                if st["exp_avg"].dtype == torch.float32:
                    new_p, m, v = adamw_math(p, st["exp_avg"], st["exp_avg_sq"], grad, s)
                    p.copy_(new_p)
                    st["exp_avg"].copy_(m)
                    st["exp_avg_sq"].copy_(v)
                    continue
                entries.append(
                    Fp8Entry(
                        param=p.data,
                        grad=grad,
                        m_codes=st["exp_avg"],
                        m_meta=st["exp_avg_meta"],
                        v_codes=st["exp_avg_sq"],
                        v_meta=st["exp_avg_sq_meta"],
                        layout=self.layout(p),
                        scalars=s,
                        m_fmt=self.m_fmt,
                        v_fmt=self.v_fmt,
                        expand=self.expand,
                    )
                )
        if entries:
            self.backend.update(entries)
        return loss
