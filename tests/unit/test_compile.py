"""`train.compile=true` (megaeff/distributed/compile.py): compiled blocks against eager ones, and the layouts it
refuses. One compiled model (tiny, one block; training only: the no_grad graph would be a second compilation)
serves all equivalence checks: compilation is the cost (about 15 s on the 2-core CI machine, hence slow).

Tolerance. Inductor fuses the elementwise ops and reorders the reductions (RMSNorm's mean, softmax's sums) but
computes in fp32 like eager, so each value differs by a few ulps per reduction: relative 2**-23 * (reduction
length ~ dim 32) ~ 4e-6 through the block. We allow 2e-5 x each tensor's magnitude; a weight changed by 1e-3
(relative) moves loss and gradients far more (checked below), so a compiled graph that drops or reorders a
term would not pass.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from megaeff.config.model import MethodConfig, ModelConfig
from megaeff.config.train import validate_compile
from megaeff.distributed.compile import CompiledForward, apply_compile
from megaeff.errors import ConfigError
from megaeff.models.init import materialize
from megaeff.models.llama import build_llama

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("clang++") is None, reason="no C++ compiler"
)


def _loss_and_grads(model, tokens, labels):
    model.zero_grad(set_to_none=True)
    loss = model(tokens, labels=labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _close(a, b):
    return torch.allclose(a, b, rtol=2e-5, atol=2e-5 * float(b.abs().max()))


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    cfg = ModelConfig(dim=32, ffn_dim=48, n_heads=2, n_layers=1, vocab_size=61, max_seq_len=16)
    eager = materialize(build_llama(cfg, MethodConfig(), "meta"), torch.device("cpu"), seed=0, std=0.02)
    compiled = apply_compile(copy.deepcopy(eager))
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    assert all(isinstance(b.forward, CompiledForward) for b in compiled.layers)
    g = torch.Generator().manual_seed(3)
    tokens, labels = torch.randint(0, 61, (2, 12), generator=g), torch.randint(0, 61, (2, 12), generator=g)
    ref_loss, ref_grads = _loss_and_grads(eager, tokens, labels)
    for _ in range(2):  # the second call reuses the compiled graphs
        loss, grads = _loss_and_grads(compiled, tokens, labels)
        assert _close(loss, ref_loss), (float(loss), float(ref_loss))
        for n, gr in grads.items():
            assert _close(gr, ref_grads[n]), n
    # The tolerance separates: a 1e-3 relative change of one block weight is visible in loss or gradients.
    with torch.no_grad():
        eager.layers[0].mlp.up.weight.mul_(1.001)
    moved_loss, moved = _loss_and_grads(eager, tokens, labels)
    assert not (_close(moved_loss, ref_loss) and all(_close(moved[n], ref_grads[n]) for n in moved))


class _Cfg:
    def __init__(self, **kw):
        from types import SimpleNamespace as NS

        self.train = NS(compile=True)
        self.parallel = NS(dp_impl=kw.get("dp_impl", "allreduce"))
        self.model = NS(moe_experts=kw.get("moe", 0))
        self.precision = NS(fp8_activations=kw.get("fp8", False), fp8_gemm=False)


def test_compile_refuses_unsupported_layouts():
    ok = dict(tp=1, cp=1, pp=1, dp=2)
    validate_compile(_Cfg(), ok)
    for cfg, degrees, field in [
        (_Cfg(), {**ok, "tp": 2}, "parallel.tp=2"),
        (_Cfg(), {**ok, "cp": 2}, "parallel.cp=2"),
        (_Cfg(), {**ok, "pp": 2}, "parallel.pp=2"),
        (_Cfg(dp_impl="fssdp"), ok, "parallel.dp_impl=fssdp"),
        (_Cfg(moe=4), ok, "model.moe_experts"),
        (_Cfg(fp8=True), ok, "precision.fp8_activations"),
    ]:
        with pytest.raises(ConfigError, match="train.compile") as err:
            validate_compile(cfg, degrees)
        assert field in str(err.value)
