"""The fused head + cross-entropy (megaeff/layers/head_loss.py) against F.cross_entropy of the materialized logits.

Sizes are odd on purpose: the token count is not a multiple of the chunk, the vocab not a power of two, and some
labels are ignored (including a whole chunk's worth), so a chunk-boundary or masking mistake shows.

Tolerances. In float64 both paths compute the same sums in a different order: each token's loss is a logsumexp
over V terms and a difference, error ~ V * 2**-52 * |z| relative, so 1e-10 on the O(1)-per-token loss sum and on
the gradients (entries ~1/N) is wide enough for round-off and far below the error of any wrong variant (a
missed mask changes the loss by O(1) per ignored token; a chunk dropped by O(1) per token of the chunk). In fp32
the same argument with 2**-23 and V = 97 gives ~1e-5 relative; we allow 2e-5 x the magnitude.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megaeff.layers.head_loss import LMHead, linear_cross_entropy_sum

IGNORE = -100


def _problem(dtype, n=37, d=11, v=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(v, d, generator=g, dtype=dtype) * 0.5
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 5, 6, 7, 8, 9, 20]] = IGNORE  # rows 5..9: a whole chunk at chunk=5
    return h, w, labels


def _reference(h, w, labels, scale=0.25):
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), labels, ignore_index=IGNORE, reduction="sum")
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


def _fused(h, w, labels, chunk, scale=0.25):
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    loss = linear_cross_entropy_sum(h, w, labels, IGNORE, chunk=chunk)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
def test_fused_matches_cross_entropy_float64(chunk):
    h, w, labels = _problem(torch.float64)
    ref = _reference(h, w, labels)
    got = _fused(h, w, labels, chunk)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g.to(r.dtype), r, rtol=1e-10, atol=1e-10)
    assert got[1][labels == IGNORE].abs().max() == 0  # ignored tokens get no gradient


def test_fused_matches_cross_entropy_float32():
    h, w, labels = _problem(torch.float32, n=53, d=24, v=97)
    ref = _reference(h, w, labels)
    got = _fused(h, w, labels, chunk=7)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=2e-5, atol=2e-5 * float(r.abs().max()))


def test_wrong_variants_would_fail():
    """The tolerance above separates the right answer from plausible mistakes."""
    h, w, labels = _problem(torch.float64)
    loss = _reference(h, w, labels)[0]
    unmasked = F.cross_entropy(h @ w.t(), labels.clamp(min=0), reduction="sum")
    assert abs(float(unmasked - loss)) > 1e-3
    first_chunks_only = F.cross_entropy(h[:35] @ w.t(), labels[:35], ignore_index=IGNORE, reduction="sum")
    assert abs(float(first_chunks_only - loss)) > 1e-3


def test_no_grad_and_head_module():
    h, w, labels = _problem(torch.float64)
    head = LMHead(h.shape[1], w.shape[0], dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
        got = head(h, labels, IGNORE)
        torch.testing.assert_close(head(h), h @ w.t())
    ref = F.cross_entropy(h @ w.t(), labels, ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert [n for n, _ in head.named_parameters()] == ["weight"]


def test_llama_fused_loss_matches_logits_path():
    from megaeff.config.model import MethodConfig, ModelConfig
    from megaeff.models.init import materialize
    from megaeff.models.llama import build_llama

    cfg = ModelConfig(dim=16, ffn_dim=24, n_heads=2, n_layers=1, vocab_size=53, max_seq_len=16)
    # fp32 (Llama.head returns fp32 logits): tolerance as in test_fused_matches_cross_entropy_float32.
    model = materialize(build_llama(cfg, MethodConfig(), "meta"), torch.device("cpu"), seed=0, std=0.02)
    tokens = torch.randint(0, 53, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 53, (2, 9), generator=torch.Generator().manual_seed(2))
    labels[1, :4] = IGNORE
    ref = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    got = model(tokens, labels=labels, ignore_index=IGNORE)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=0.0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=2e-5, atol=2e-5 * float(ref_grads[n].abs().max()), msg=n)


def test_second_backward_is_refused():
    h, w, labels = _problem(torch.float64)
    h.requires_grad_()
    loss = linear_cross_entropy_sum(h, w, labels, IGNORE, chunk=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()
