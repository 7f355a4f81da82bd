"""Validation perplexity is token-weighted over the whole split."""

from __future__ import annotations

import math

import pytest

from megaeff.train.trainer import perplexity


def test_perplexity_is_token_weighted():
    batches = [(10.0, 5), (1.0, 5)]  # (sum of token nll, tokens)
    nll = sum(b[0] for b in batches)
    tokens = sum(b[1] for b in batches)
    ppl = perplexity(nll, tokens)
    assert ppl == pytest.approx(math.exp(11 / 10))
    # With equal token counts the per-batch means average to the same 1.1; the next test separates the two.


def test_perplexity_unequal_batches_differs_from_mean_of_means():
    batches = [(10.0, 5), (1.0, 1)]
    ppl = perplexity(sum(b[0] for b in batches), sum(b[1] for b in batches))
    assert ppl == pytest.approx(math.exp(11 / 6))
    mean_of_means = math.exp(sum(s / n for s, n in batches) / 2)  # exp(1.5)
    assert ppl != pytest.approx(mean_of_means)


def test_perplexity_values():
    assert perplexity(0.0, 7) == 1.0
    assert perplexity(5 * math.log(257), 5) == pytest.approx(257)


@pytest.mark.parametrize("tokens", [0, -3])
def test_perplexity_of_no_tokens_raises(tokens):
    with pytest.raises(ValueError):
        perplexity(1.0, tokens)
