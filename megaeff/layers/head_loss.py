"""The output head fused with the token cross-entropy: the loss never materializes the logits of the whole batch.

    loss_sum = sum over tokens t with labels[t] != ignore_index of  logsumexp(h_t W^T) - (h_t W^T)[labels[t]]

which is `F.cross_entropy(h @ W.T, labels, ignore_index=..., reduction="sum")`, the trainer's per-micro-batch
objective before it divides by the global token count (megaeff/train/step.py). With a 32,000-row head and 2,048
tokens the unfused form writes and rereads a 262 MB fp32 logit tensor four times (GEMM, log-softmax, its
backward, the NLL gradient's zero-fill); this one walks the tokens in chunks of `chunk` rows:

    forward, per chunk:  z = h_c W^T (fp32), lse = logsumexp(z), loss += sum(lse - z[label])
                         with grad: p = exp(z - lse) - onehot(label) (0 on ignored rows),
                         dh_c = p W, dW += p^T h_c       (the head's two backward GEMMs, done now)
    backward:            dh = g dh, dW = g dW            (g: the scalar gradient of loss_sum)

so a chunk's logits die before the next chunk's are made (Liger-Kernel's fused linear cross-entropy does the
same on GPU). The GEMMs are the three the unfused head runs, the elementwise work is one pass instead of four.

Precision: the logits and the softmax are fp32 whatever the compute dtype (as `Llama.head`'s `.float()`);
under autocast the GEMMs run in the autocast dtype, as F.linear would, and dW accumulates in the weight's dtype.
Mathematically identical to the unfused path; the float results differ by round-off only (the sums run in
another order), which tests/unit/test_head_loss.py bounds.

Only the gradient of the *scalar* loss is available: the head's gradients are computed in forward and saved for
backward (dW is the size of the head weight, dh of the hidden states; the activation-bytes metric counts them),
so a second backward through the same graph (retain_graph) is refused by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Logit elements per chunk: 32 Mi fp32 elements = 128 MiB (1,048 tokens at a 32,000-row head). Each chunk rereads
# and rewrites dW (addmm_), so thin chunks cost more than the logits they save: at llama_60m's head (2,048 tokens,
# 2 threads) 256-row chunks took 1.15x the unfused head's CPU time, 1,024-row chunks 0.97x (docs/benchmarks.md).
CHUNK_ELEMENTS = 1 << 25


def chunk_rows(vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, elements // max(1, vocab))


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, weight.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """loss_sum of (h [N, d], weight [V, d], labels [N]); see the module docstring."""

    @staticmethod
    def forward(ctx, h, weight, labels, ignore_index: int, chunk: int):
        cdt = _compute_dtype(h, weight)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grads = need_h or need_w
        acc = torch.promote_types(cdt, torch.float32)  # the logits' dtype: fp32, or fp64 for fp64 inputs
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(cdt)
            dh = torch.empty_like(h) if need_h else None
            dw = torch.zeros_like(weight) if need_w else None
            total = torch.zeros((), dtype=acc, device=h.device)
            for start in range(0, h.shape[0], chunk):
                hc = h[start : start + chunk].to(cdt)
                lab = labels[start : start + chunk]
                valid = lab != ignore_index
                z = (hc @ w.t()).to(acc)
                lse = torch.logsumexp(z, dim=-1)
                target = z.gather(1, torch.where(valid, lab, 0).unsqueeze(1)).squeeze(1)
                total += torch.where(valid, lse - target, 0.0).sum()
                if not grads:
                    continue
                p = z.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
                p[torch.arange(p.shape[0], device=p.device), torch.where(valid, lab, 0)] -= 1.0
                pc = p.to(cdt)
                # An ignored row's gradient is zero: masked on the d-wide side (dh rows, h rows for dW), not on the
                # V-wide softmax, and without a data-dependent branch (the memory tracker runs on fake tensors).
                keep = valid.unsqueeze(1).to(cdt)
                if need_h:
                    dh[start : start + chunk] = ((pc @ w) * keep).to(h.dtype)
                if need_w:
                    if dw.dtype == cdt:
                        dw.addmm_(pc.t(), hc * keep)
                    else:
                        dw += (pc.t() @ (hc * keep)).to(dw.dtype)
        # Saved as tensors (not ctx attributes) so that autograd's saved-tensor hooks see them: SavedBytes and the
        # memory tracker count them as what this forward keeps for backward (the logits they replace were).
        ctx.has = (dh is not None, dw is not None)
        ctx.save_for_backward(*[t for t in (dh, dw) if t is not None])
        return total

    @staticmethod
    def backward(ctx, g):
        saved = iter(ctx.saved_tensors)
        dh, dw = (next(saved) if has else None for has in ctx.has)
        # dh and dw are this Function's own buffers, so they are scaled in place (no second copy); a second
        # backward through the same graph (retain_graph) would see it modified and autograd refuses it.
        dh = dh.mul_(g.to(dh.dtype)) if dh is not None else None
        dw = dw.mul_(g.to(dw.dtype)) if dw is not None else None
        return dh, dw, None, None, None


def linear_cross_entropy_sum(
    h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, chunk: int | None = None
) -> torch.Tensor:
    """Sum over non-ignored tokens of cross_entropy(h W^T, labels); h [..., d], labels [...]. fp32 scalar."""
    h2 = h.reshape(-1, h.shape[-1])
    rows = chunk if chunk is not None else chunk_rows(weight.shape[0])
    if rows < 1:
        raise ValueError(f"chunk must be >= 1, got {rows}")
    return LinearCrossEntropy.apply(h2, weight, labels.reshape(-1), ignore_index, rows)


class LMHead(nn.Linear):
    """The output head (an nn.Linear, so its parameter stays `output.weight`): `head(x)` gives the logits,
    `head(x, labels)` the fused token-loss sum. Called as a module either way, so forward hooks (FSSDP's
    gathers) run around both."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
        if labels is None:
            return F.linear(x, self.weight)
        return linear_cross_entropy_sum(x, self.weight, labels, ignore_index)
