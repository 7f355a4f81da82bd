"""Fused block kernels for context parallelism: attention of a query block against a key block that never
materializes the block's scores and returns the log-sum-exp the merge needs (GitHub issue 21).

    kernel = select_block_kernel("auto")        # model.attention_backend: auto | sdpa | flash | math
    out, lse = kernel.forward(q, k, v, causal)  # q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] -> out, lse [B, Hq, Tq]
    dq, dk, dv = kernel.backward(q, k, v, dout, lse, None, out, causal)   # with the *final* rows' out and lse

`FusedBlockKernel` picks the kernel per call, by device and dtype:
- CPU, and meta (the dry runs of tools/bench/context_parallel.py; torch registers meta kernels for both ops):
  torch's flash attention for CPU, `aten._scaled_dot_product_flash_attention_for_cpu` and its backward
  (float64, float32, bf16, fp16; grouped-query heads natively).
- CUDA: flash-attn 2's `_flash_attn_forward` / `_flash_attn_backward` when the package imports (`auto`, `flash`;
  fp16/bf16, head dim a multiple of 8 up to 256), else torch's memory-efficient kernel
  (`aten._efficient_attention_forward` / `_backward`; fp32, fp16, bf16; key/value heads expanded to the query
  heads, as SDPA does). float64 on CUDA, and any other device, fall back to the math kernel.
`sdpa` uses torch's kernels only; `flash` needs flash-attn and CUDA (else a ConfigError naming the field).

Masks. The block plan (blocks.py) produces exactly two: none, and the bottom-right-aligned causal mask of a
block whose keys end with the query chunk itself (Tk = n * Tq; zigzag's own block on a rank has n = 2). torch's
kernels align `is_causal` top-left, so a causal block with Tk > Tq is computed as two calls: the first Tk - Tq
keys without a mask, the last Tq keys with the square causal mask (where both alignments agree), merged by
log-sum-exp in the forward, dK/dV concatenated in the backward. flash-attn (>= 2.1) aligns bottom-right and
takes the block in one call. Ring (contiguous and zigzag), LightSeq and Ulysses need no other mask, so no block
falls back to the math kernel.

Backward. The fused backward computes delta = rowsum(dO * O) itself from O, so these kernels take the final
output rows (`needs_out`) and the final lse: P = exp(S - lse_final) is each block's share of the final softmax
and every block's dQ/dK/dV is exact without rescaling, the identity MathBlockKernel uses with delta.

Precision. Block outputs come back in the input dtype and are merged in the accumulation dtype (a bf16 block
is rounded to bf16 before the fp32 merge, as in ring-flash-attention); block gradients are upcast to the
accumulation dtype before they are summed over blocks. In fp32 the results differ from the math kernel's by
fp32 round-off only (another summation order); tests/unit/test_cp_flash_blocks.py bounds it.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Tuple

import torch

from megaeff.distributed.context_parallel.blocks import MathBlockKernel, acc_dtype
from megaeff.distributed.context_parallel.sharding import ContextParallelError
from megaeff.layers.attention import flash_available

BLOCK_BACKENDS = ("auto", "sdpa", "flash", "math")
_FIELD = "model.attention_backend"


def merge_two(o1, l1, o2, l2) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of one set of rows over the union of two disjoint key sets, in the accumulation dtype."""
    lse = torch.logaddexp(l1, l2)
    out = torch.exp(l1 - lse).unsqueeze(-1) * o1 + torch.exp(l2 - lse).unsqueeze(-1) * o2
    return out, lse


class SplitCausalKernel:
    """A fused kernel behind the block-kernel interface (blocks.py). Subclasses provide `_forward(q, k, v,
    causal)` -> (out, lse) and `_backward(q, k, v, dout, lse, out, causal)` -> (dq, dk, dv) for their own
    `causal` alignment; a top-left-aligned kernel (`bottom_right = False`) gets causal blocks with Tk > Tq
    split into an unmasked prefix and a square causal part."""

    name = "fused"
    needs_out = True
    bottom_right = False

    def _prefix(self, q, k, causal: bool) -> int:
        Tq, Tk = q.shape[2], k.shape[2]
        if causal and Tk < Tq:
            raise ValueError(f"a causal block needs at least as many keys ({Tk}) as queries ({Tq})")
        return Tk - Tq if causal and Tk > Tq and not self.bottom_right else 0

    def forward(self, q, k, v, causal: bool = False):
        p = self._prefix(q, k, causal)
        if p == 0:
            return self._forward(q, k, v, causal)
        o1, l1 = self._forward(q, k[:, :, :p], v[:, :, :p], False)
        o2, l2 = self._forward(q, k[:, :, p:], v[:, :, p:], True)
        return merge_two(o1, l1, o2, l2)

    def backward(self, q, k, v, dout, lse, delta, out, causal: bool = False):
        """(dq, dk, dv) in the accumulation dtype; `delta` is not used (the kernel derives it from `out`)."""
        if out is None:
            raise ValueError(f"the {self.name} block kernel needs the final output rows (needs_out)")
        acc, out = acc_dtype(q.dtype), out.to(q.dtype)  # the kernels take O in the input dtype
        p = self._prefix(q, k, causal)
        if p == 0:
            return tuple(g.to(acc) for g in self._backward(q, k, v, dout, lse, out, causal))
        q1, k1, v1 = self._backward(q, k[:, :, :p], v[:, :, :p], dout, lse, out, False)
        q2, k2, v2 = self._backward(q, k[:, :, p:], v[:, :, p:], dout, lse, out, True)
        return q1.to(acc) + q2, torch.cat([k1, k2], 2).to(acc), torch.cat([v1, v2], 2).to(acc)


class CpuFlashKernel(SplitCausalKernel):
    """torch's flash attention for CPU (top-left `is_causal`); also runs on meta tensors."""

    name = "flash-cpu"

    def _forward(self, q, k, v, causal):
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return op(q, k, v, 0.0, causal, scale=q.shape[-1] ** -0.5)

    def _backward(self, q, k, v, dout, lse, out, causal):
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        return op(dout, q, k, v, out, lse, 0.0, causal, scale=q.shape[-1] ** -0.5)


def _expand_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """k or v [B, Hkv, T, D] -> [B, heads, T, D], query head h reading kv head h // (heads / Hkv)."""
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


class CudaEfficientKernel(SplitCausalKernel):
    """torch's memory-efficient CUDA kernel (xformers' cutlass kernel), called in its [B, T, H, D] layout.
    Its lse rows are padded to a multiple of 32; grouped-query K/V are expanded (it needs equal heads)."""

    name = "efficient-cuda"

    @staticmethod
    def supports(q) -> bool:
        return q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16, torch.float32)

    def _forward(self, q, k, v, causal):
        H, Tq = q.shape[1], q.shape[2]
        k, v = _expand_heads(k, H), _expand_heads(v, H)
        res = torch.ops.aten._efficient_attention_forward(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            None,  # bias
            None,  # cu_seqlens_q
            None,  # cu_seqlens_k
            None,  # max_seqlen_q
            None,  # max_seqlen_k
            0.0,  # dropout_p
            int(causal),  # custom_mask_type: 0 none, 1 causal from top-left
            True,  # compute_log_sumexp
            scale=q.shape[-1] ** -0.5,
        )
        return res[0].transpose(1, 2), res[1][:, :, :Tq]

    def _backward(self, q, k, v, dout, lse, out, causal):
        B, H, Tq, _ = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        ke, ve = _expand_heads(k, H), _expand_heads(v, H)
        # The forward's layout: rows padded to a multiple of 32 (padding +inf: exp(s - lse) = 0 there).
        padded = torch.full((B, H, -(-Tq // 32) * 32), float("inf"), dtype=torch.float32, device=q.device)
        padded[:, :, :Tq] = lse
        no_rng = torch.empty((), dtype=torch.int64)  # philox seed/offset, read only with dropout
        dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(
            dout.transpose(1, 2),
            q.transpose(1, 2),
            ke.transpose(1, 2),
            ve.transpose(1, 2),
            None,  # bias
            out.transpose(1, 2).contiguous(),  # the kernel assumes the forward's dense [B, T, H, D] output
            None,  # cu_seqlens_q
            None,  # cu_seqlens_k
            Tq,
            Tk,
            padded,
            0.0,  # dropout_p
            no_rng,
            no_rng,
            int(causal),
            False,  # bias_requires_grad
            scale=q.shape[-1] ** -0.5,
        )
        dq, dk, dv = (t.transpose(1, 2) for t in (dq, dk, dv))
        if Hkv != H:  # the expanded heads' gradients summed back onto their key/value head
            dk, dv = (t.unflatten(1, (Hkv, H // Hkv)).sum(2) for t in (dk, dv))
        return dq, dk, dv


def _parameter_names(fn) -> frozenset:
    # flash-attn >= 2.7 wraps these in torch.library.custom_op, whose signature is (*args, **kwargs); the
    # decorated function is kept on the op object.
    return frozenset(inspect.signature(getattr(fn, "_init_fn", fn)).parameters)


class FlashAttnKernel(SplitCausalKernel):
    """flash-attn 2's block functions, in its [B, T, H, D] layout; grouped-query heads natively; causal masks
    aligned bottom-right (since 2.1), so a causal block is one call. Works with the 2.5-2.6 signatures
    (`window_size` pair, 8 results) and >= 2.7 (`window_size_left/right`, `softcap`, 4 results)."""

    name = "flash-attn"
    bottom_right = True

    def __init__(self) -> None:
        self._fa = importlib.import_module("flash_attn.flash_attn_interface")
        self._fwd_names = _parameter_names(self._fa._flash_attn_forward)
        self._bwd_names = _parameter_names(self._fa._flash_attn_backward)

    @staticmethod
    def supports(q) -> bool:
        D = q.shape[-1]
        return q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and D <= 256

    @staticmethod
    def _options(names, causal: bool, D: int, **extra):
        kw = dict(dropout_p=0.0, softmax_scale=D**-0.5, causal=causal, alibi_slopes=None, softcap=0.0, **extra)
        if "window_size_left" in names:
            kw.update(window_size_left=-1, window_size_right=-1)
        else:
            kw["window_size"] = (-1, -1)
        return {n: x for n, x in kw.items() if n in names}

    def _forward(self, q, k, v, causal):
        kw = self._options(self._fwd_names, causal, q.shape[-1], return_softmax=False)
        res = self._fa._flash_attn_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)
        out, lse = (res[0], res[1]) if len(res) == 4 else (res[0], res[5])
        return out.transpose(1, 2), lse

    def _backward(self, q, k, v, dout, lse, out, causal):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (qt, kt, vt)]  # written in place
        kw = self._options(self._bwd_names, causal, q.shape[-1], deterministic=False, rng_state=None)
        self._fa._flash_attn_backward(
            dout.transpose(1, 2), qt, kt, vt, out.transpose(1, 2), lse.float().contiguous(), *grads, **kw
        )
        return tuple(g.transpose(1, 2) for g in grads)


class FusedBlockKernel:
    """The block kernel of `auto`, `sdpa` and `flash`: one of the fused kernels above per call, by device and
    dtype (module docstring); the math kernel where none applies."""

    needs_out = True

    def __init__(self, backend: str, flash_attn: bool):
        self.name = f"fused ({backend})"
        self.cpu, self.cuda, self.math = CpuFlashKernel(), CudaEfficientKernel(), MathBlockKernel()
        self.flash_attn = FlashAttnKernel() if flash_attn else None

    def pick(self, q):
        if q.device.type in ("cpu", "meta"):
            return self.cpu
        if self.flash_attn is not None and self.flash_attn.supports(q):
            return self.flash_attn
        return self.cuda if self.cuda.supports(q) else self.math

    def forward(self, q, k, v, causal: bool = False):
        return self.pick(q).forward(q, k, v, causal)

    def backward(self, q, k, v, dout, lse, delta, out, causal: bool = False):
        return self.pick(q).backward(q, k, v, dout, lse, delta, out, causal)


def select_block_kernel(backend: str):
    """The block kernel for `model.attention_backend` (module docstring): math -> MathBlockKernel (exact,
    materializes each block's scores); auto / sdpa / flash -> FusedBlockKernel."""
    backend = str(backend)
    if backend == "math":
        return MathBlockKernel()
    if backend == "sdpa":
        return FusedBlockKernel("sdpa", flash_attn=False)
    if backend == "auto":
        try:  # flash-attn when it imports on a CUDA machine; a broken install falls back to torch's kernels
            return FusedBlockKernel("auto", flash_attn=flash_available())
        except ImportError:
            return FusedBlockKernel("auto", flash_attn=False)
    if backend == "flash":
        if not flash_available():
            raise ContextParallelError(
                _FIELD,
                "flash needs CUDA and the flash-attn package (pip install 'megaeff[gpu]'); for context "
                "parallelism auto and sdpa use torch's fused block kernels, math the exact one",
            )
        try:
            return FusedBlockKernel("flash", flash_attn=True)
        except ImportError as e:
            raise ContextParallelError(_FIELD, f"flash-attn is installed but does not import: {e}") from e
    raise ContextParallelError(_FIELD, f"unknown backend {backend!r}; available: {', '.join(BLOCK_BACKENDS)}")
