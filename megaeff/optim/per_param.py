"""One optimizer per parameter behind one optimizer's interface: what per-parameter updates need.

Two features update parameters one at a time instead of in one `step()` over all of them:

- optimizer in backward (`optim.in_backward`): each parameter is stepped from a hook as soon as its gradient
  is final, and its gradient is freed at once (`step_param`);
- bf16 weights without an fp32 master (`precision.param_dtype=bf16`): the update is computed on an fp32
  working copy of *one* parameter, then written back to bf16 with stochastic rounding, so the fp32 copy costs
  the largest parameter, not the model.

`PerParamOptimizer` holds an inner optimizer (torch AdamW or COAT's CoatAdamW, built by the same factory as the
ordinary path) for every parameter. All inner optimizers share the facade's `state` dict and read their
hyperparameters from the facade's `param_groups`, so the LR scheduler, the checkpoints
(megaeff/distributed/optimizer_state.py: `state` by parameter, `param_groups`, `defaults`, `check_state`) and
the run metrics see one ordinary optimizer: a checkpoint moves between per-parameter and ordinary runs.
Why not torchtune's `optimizer_in_bwd` wrapper: its state dict is a dict of per-parameter state dicts, which
megaeff's logical-name checkpoints (and a resume into the ordinary optimizer) could not read.

Stochastic rounding (`stochastic_round_bf16`): add 16 uniform random bits below bf16's last mantissa bit of the
fp32 value, then truncate, so E[round(x)] = x and updates smaller than half a bf16 step still move the weight
on average (round-to-nearest would drop them: the reason bf16 weights need an fp32 master otherwise).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional

import torch

from megaeff.layers.grad_accum_fusion import grad_of, is_fused, zero_main_grads

HPARAM_KEYS_SKIPPED = ("params",)


# Elements rounded per pass: the noise and bit-twiddling temporaries (about 12 bytes per element) stay a few MB
# instead of several times the largest parameter (LLaMA-7B's embedding: 0.5 GB each).
ROUND_CHUNK = 1 << 20


def stochastic_round_bf16_(
    out: torch.Tensor, x: torch.Tensor, generator: Optional[torch.Generator] = None, chunk: int = ROUND_CHUNK
) -> torch.Tensor:
    """Write fp32 `x` into bf16 `out` with stochastic rounding (unbiased); non-finite values round to nearest."""
    flat_out, flat_x = out.view(-1), x.reshape(-1)
    for lo in range(0, flat_x.numel(), chunk):
        piece = flat_x[lo : lo + chunk].float().contiguous()
        bits = piece.view(torch.int32)
        noise = torch.randint(0, 1 << 16, piece.shape, dtype=torch.int32, device=piece.device, generator=generator)
        # Adding to the low 16 bits carries into the mantissa (and exponent) exactly as incrementing the
        # magnitude; truncation then leaves a value bf16 holds exactly, so the final cast does not round again.
        rounded = ((bits + noise) & -65536).view(torch.float32)
        flat_out[lo : lo + chunk] = torch.where(torch.isfinite(piece), rounded, piece)
    return out


def stochastic_round_bf16(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """fp32 -> a new bf16 tensor with stochastic rounding (`stochastic_round_bf16_`)."""
    return stochastic_round_bf16_(torch.empty(x.shape, dtype=torch.bfloat16, device=x.device), x, generator)


class PerParamOptimizer(torch.optim.Optimizer):
    """`make(groups)` builds the inner optimizer of one parameter from a one-parameter group list; `defaults`
    are the hyperparameters of the ordinary optimizer (lr, betas, eps, ...). Every bf16 parameter is updated
    through an fp32 working copy (its optimizer state is fp32 or COAT's FP8), written back with
    `stochastic_round_bf16` when `stochastic_rounding`, else rounded to nearest."""

    def __init__(
        self,
        groups: List[Dict],
        make: Callable[[List[Dict]], torch.optim.Optimizer],
        defaults: Dict,
        *,
        stochastic_rounding: bool = False,
        seed: int = 0,
    ):
        super().__init__(groups, defaults)
        self.inner: Dict[torch.Tensor, torch.optim.Optimizer] = {}
        self.group_of: Dict[torch.Tensor, Dict] = {}
        self.index: Dict[torch.Tensor, int] = {}
        for group in self.param_groups:
            hparams = {k: v for k, v in group.items() if k not in HPARAM_KEYS_SKIPPED}
            for p in group["params"]:
                opt = make([{**hparams, "params": [p]}])
                opt.state = self.state  # one state dict: checkpoints and metrics see every parameter's state
                self.inner[p], self.group_of[p], self.index[p] = opt, group, len(self.index)
        first = next(iter(self.inner.values()), None)
        if first is not None:
            self.defaults = {**first.defaults, **self.defaults}
        self.stochastic_rounding = bool(stochastic_rounding)
        self._generators: Dict[torch.device, torch.Generator] = {}
        self._seed = int(seed)

    # ------------------------------------------------------------------ what the ordinary optimizer offers
    def check_state(self, name: str, p: torch.Tensor, st: Dict) -> Optional[str]:
        check = getattr(self.inner[p], "check_state", None)
        return check(name, p, st) if check is not None else None

    def uses_fp8(self, p: torch.Tensor) -> bool:
        probe = getattr(self.inner[p], "uses_fp8", None)
        return bool(probe(p)) if probe is not None else False

    @property
    def backend(self):
        """COAT's kernel backend (all inner optimizers share the setting)."""
        return next(iter(self.inner.values())).backend

    # ------------------------------------------------------------------ updates
    def _rounding_generator(self, p: torch.Tensor) -> torch.Generator:
        """Rounding noise drawn from (seed, parameter index, its update count): a resumed run rounds exactly as
        the uninterrupted one, with no generator state in the checkpoint."""
        if p.device not in self._generators:
            self._generators[p.device] = torch.Generator(device=p.device)
        step = self.state[p].get("step", 0)
        step = int(step.item() if torch.is_tensor(step) else step)
        key = ((self._seed * 1_000_003 + self.index[p]) * 1_000_033 + step) % (1 << 63)
        return self._generators[p.device].manual_seed(key)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        zero_main_grads(self.params(), set_to_none)  # the fp32 main_grad of fused weights (grad_accum_fusion)

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, *, free_grad: bool = False) -> None:
        """Update one parameter from its current gradient (nothing without one); `free_grad` drops it after. A
        fused weight's gradient is its fp32 `main_grad` (megaeff/layers/grad_accum_fusion.py): the fp32 working
        copy then steps from it directly, never from a bf16-rounded sum."""
        main = grad_of(p) if is_fused(p) else None
        if p.grad is None and main is None:
            return
        opt = self.inner[p]
        # The facade's group holds the live hyperparameters (the LR scheduler writes them there).
        inner_group = opt.param_groups[0]
        for k, v in self.group_of[p].items():
            if k not in HPARAM_KEYS_SKIPPED:
                inner_group[k] = v
        if p.dtype == torch.bfloat16:
            low, grad = p.data, p.grad
            # One parameter's fp32 working copy (fp32 moments too); AdamW and COAT read the gradient, never write it.
            p.data, p.grad = low.float(), (main if main is not None else grad.float())
            opt.step()
            if self.stochastic_rounding:
                stochastic_round_bf16_(low, p.data, self._rounding_generator(p))
            else:  # round to nearest: the control that shows what stochastic rounding buys
                low.copy_(p.data)
            p.data, p.grad = low, grad
        else:
            if main is not None:
                raise ValueError("a fused weight (fp32 main_grad) must be stored in bf16")
            opt.step()
        if free_grad:
            p.grad = None
            zero_main_grads([p])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p in self.params():
            self.step_param(p)
        return loss

    def params(self) -> Iterable[torch.Tensor]:
        return (p for g in self.param_groups for p in g["params"])
