"""The token sampler: inverse-CDF draws have softmax's distribution and never pick a masked token."""
import numpy as np
import pytest
import torch

from lm_human_preferences.language.sample import sample_from_logits
from lm_human_preferences.utils.core import take_top_k_logits


def test_draws_follow_the_softmax_distribution():
    torch.manual_seed(0)
    logits = torch.randn(3, 7) * 2
    logits[2] = torch.tensor([0.0, 0.0, 5.0, -30.0, 0.0, 1.0, -1.0])  # one tiny-probability token
    n = 60_000
    g = torch.Generator().manual_seed(1)
    draws = sample_from_logits(logits.repeat(n, 1), generator=g).view(n, 3)
    probs = torch.softmax(logits, dim=-1).double().numpy()
    for row in range(3):
        counts = np.bincount(draws[:, row].numpy(), minlength=7)
        expected = probs[row] * n
        # chi-square with 6 degrees of freedom: 99.99% quantile is about 27.9
        chi2 = ((counts - expected) ** 2 / np.maximum(expected, 1e-9))[expected > 5].sum()
        assert chi2 < 28, (row, counts, expected)


def test_masked_tokens_are_never_drawn():
    g = torch.Generator().manual_seed(0)
    logits = take_top_k_logits(torch.randn(4000, 50) * 3, 2)
    allowed = logits > -1e9
    draws = sample_from_logits(logits, generator=g)
    assert allowed[torch.arange(4000), draws].all()
    # a row whose mass sits on the last allowed token: u close to the total still draws an allowed token
    logits = torch.full((1000, 10), -1e10)
    logits[:, 3] = 0.0
    assert (sample_from_logits(logits, generator=g) == 3).all()


def test_generator_makes_draws_reproducible_and_greedy_is_argmax():
    logits = torch.randn(16, 100)
    a = sample_from_logits(logits, generator=torch.Generator().manual_seed(5))
    b = sample_from_logits(logits, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (16,)
    assert torch.equal(sample_from_logits(logits, greedy=True), logits.argmax(-1))


@pytest.mark.parametrize("vocab", [1024, 3000, 50257])
def test_two_level_draws_across_blocks(vocab):
    """Vocabularies spanning several blocks (and a partial last block): the draws follow softmax per block of
    tokens, masked tokens are never drawn, and the mass in the partial last block is reachable."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    logits = torch.full((vocab,), -1e10)
    chosen = torch.tensor([0, vocab // 3, vocab // 2 + 1, vocab - 1])  # first, middle blocks, the last token
    logits[chosen] = torch.tensor([0.0, 1.0, -0.5, 0.5])
    n, rows = 20_000, 2_000  # drawn `rows` at a time: a row of the full vocabulary is 200 kB
    draws = torch.cat([sample_from_logits(logits.repeat(rows, 1), generator=g) for _ in range(n // rows)])
    assert torch.isin(draws, chosen).all()
    counts = torch.stack([(draws == c).sum() for c in chosen]).double().numpy()
    expected = torch.softmax(logits[chosen], dim=0).double().numpy() * n
    assert ((counts - expected) ** 2 / expected).sum() < 16.3  # chi-square, 3 dof, 99.9%
    # top-k masking over a full-size row never draws outside the top k
    wide = take_top_k_logits(torch.randn(200, vocab) * 3, 5)
    d = sample_from_logits(wide, generator=g)
    assert (wide[torch.arange(200), d] > -1e9).all()
