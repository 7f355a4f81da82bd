"""`optim.impl=apex`: AdamW whose update is apex's multi-tensor Adam kernel (`amp_C.multi_tensor_adam`, the kernel of
`apex.optimizers.FusedAdam(adam_w_mode=True)` and of Megatron-LM's optimizer), on fp32 CUDA parameters.

Why not `apex.optimizers.FusedAdam` itself: it keeps one `step` per parameter group instead of torch's per-parameter
`state["step"]`, so its checkpoints would not load into torch's AdamW (nor the other way: a resumed run's bias
correction would restart at step 1), and megaeff's checkpoints, the FSSDP optimizer shards and resume policy all
speak torch.optim.AdamW's state dict. This class *is* a torch.optim.AdamW (same state keys, same hyperparameters,
same `load_state_dict`), with only `step` replaced by the apex kernel: a checkpoint written under `impl=apex`
resumes under `impl=fused` or on CPU, and back.

Numerics: the same AdamW (decoupled weight decay, bias correction) as torch's, in another operation order (apex
adds `decay * p` to the normalized moment before scaling by lr; torch scales p by `1 - lr * decay` first), so the
two agree within fp32 round-off per step, not bit for bit (tests/gpu/test_accelerators.py bounds it).

Why `auto` does not pick it: torch's `fused=True` AdamW is the same horizontal fusion (one multi-tensor kernel
over all parameters, torch's port of apex's multi_tensor_apply), ships with every CUDA torch, and supports
bf16 parameters and CUDA graphs; apex buys nothing measurable over it, so it stays an explicit choice.
"""

from __future__ import annotations

from typing import Iterable, List

import torch

from megaeff.errors import ConfigError
from megaeff.layers.apex_ops import apex_status


def unavailable(device: torch.device) -> str:
    """Why `optim.impl=apex` cannot run on `device` ("" when it can)."""
    if torch.device(device).type != "cuda":
        return f"apex's multi-tensor Adam updates CUDA tensors, the run's device is {torch.device(device).type}"
    status = apex_status()
    if not status.found:
        return status.reason
    if not status.has("multi_tensor_adam"):
        return status.parts.get("multi_tensor_adam", "apex has no multi-tensor Adam")
    return ""


class ApexAdamW(torch.optim.AdamW):
    """torch.optim.AdamW (state dict and all) updated by `amp_C.multi_tensor_adam`; fp32 CUDA parameters only."""

    def __init__(self, params: Iterable, lr: float, betas, eps: float, weight_decay: float = 0.0):
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=False)
        for group in self.param_groups:
            for p in group["params"]:
                if not p.is_cuda or p.dtype != torch.float32:
                    raise ConfigError(
                        "optim.impl",
                        f"apex needs fp32 CUDA parameters, got a {p.dtype} one on {p.device}; use optim.impl=fused",
                    )
        import amp_C
        from apex.multi_tensor_apply import multi_tensor_applier

        self._applier = multi_tensor_applier
        self._kernel = amp_C.multi_tensor_adam
        self._noop = torch.zeros(1, dtype=torch.int32, device=self.param_groups[0]["params"][0].device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update_group(group, params)
        return loss

    def _update_group(self, group: dict, params: List[torch.Tensor]) -> None:
        grads, m, v, steps = [], [], [], set()
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("apex's multi-tensor Adam does not take sparse gradients")
            state = self.state[p]
            if not state:  # torch.optim.AdamW's own layout, so either implementation loads the other's state
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            steps.add(int(state["step"].item()))
            grads.append(p.grad)
            m.append(state["exp_avg"])
            v.append(state["exp_avg_sq"])
        if len(steps) != 1:
            # The kernel takes one step count per launch; torch's AdamW would bias-correct each parameter alone.
            raise RuntimeError(f"parameters of one group are at different steps {sorted(steps)}; use optim.impl=fused")
        beta1, beta2 = group["betas"]
        adam_w_mode, bias_correction = 1, 1
        self._applier(
            self._kernel,
            self._noop,
            [grads, params, m, v],
            float(group["lr"]),
            beta1,
            beta2,
            group["eps"],
            steps.pop(),
            adam_w_mode,
            bias_correction,
            group["weight_decay"],
        )
