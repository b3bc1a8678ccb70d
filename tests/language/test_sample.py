"""The token sampler: inverse-CDF draws from pre-drawn uniforms have softmax's distribution and never pick a masked
token; draw_uniforms gives each generator its own block of rows; sample_sequence does not depend on how the rows
are split."""
import numpy as np
import pytest
import torch

from lm_human_preferences.language.model import GPT2, GPT2Config
from lm_human_preferences.language.sample import draw_uniforms, sample_from_logits, sample_sequence
from lm_human_preferences.utils.core import take_top_k_logits


def _uniform(rows, seed=None, generator=None):
    """One float64 uniform number per row, as draw_uniforms makes them."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    return torch.rand(rows, dtype=torch.float64, generator=g)


def test_draws_follow_the_softmax_distribution():
    torch.manual_seed(0)
    logits = torch.randn(3, 7) * 2
    logits[2] = torch.tensor([0.0, 0.0, 5.0, -30.0, 0.0, 1.0, -1.0])  # one tiny-probability token
    n = 60_000
    draws = sample_from_logits(logits.repeat(n, 1), uniform=_uniform(3 * n, seed=1)).view(n, 3)
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
    draws = sample_from_logits(logits, uniform=_uniform(4000, generator=g))
    assert allowed[torch.arange(4000), draws].all()
    # a row whose mass sits on the last allowed token: u close to the total still draws an allowed token
    logits = torch.full((1000, 10), -1e10)
    logits[:, 3] = 0.0
    assert (sample_from_logits(logits, uniform=_uniform(1000, generator=g)) == 3).all()
    extremes = torch.tensor([0.0, 1.0 - 2.0 ** -53], dtype=torch.float64)  # the ends of [0, 1)
    assert (sample_from_logits(logits[:2], uniform=extremes) == 3).all()


def test_the_uniform_number_is_the_inverse_cdf_position():
    """Token i is drawn for u in [cdf[i-1], cdf[i]): a hand-computed distribution (1/4, 1/2, 1/4)."""
    logits = torch.log(torch.tensor([[0.25, 0.5, 0.25]])).repeat(6, 1)
    u = torch.tensor([0.0, 0.2, 0.3, 0.7, 0.8, 0.99], dtype=torch.float64)
    assert sample_from_logits(logits, uniform=u).tolist() == [0, 0, 1, 1, 2, 2]


def test_same_uniforms_make_the_same_draws_and_greedy_is_argmax():
    logits = torch.randn(16, 100)
    a = sample_from_logits(logits, uniform=_uniform(16, seed=5))
    b = sample_from_logits(logits, uniform=_uniform(16, seed=5))
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (16,)
    # row b's token depends on row b's number only: the rows drawn in two halves are the same
    halves = torch.cat([sample_from_logits(logits[:8], uniform=_uniform(16, seed=5)[:8]),
                        sample_from_logits(logits[8:], uniform=_uniform(16, seed=5)[8:])])
    assert torch.equal(halves, a)
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
    draws = torch.cat([sample_from_logits(logits.repeat(rows, 1), uniform=_uniform(rows, generator=g))
                       for _ in range(n // rows)])
    assert torch.isin(draws, chosen).all()
    counts = torch.stack([(draws == c).sum() for c in chosen]).double().numpy()
    expected = torch.softmax(logits[chosen], dim=0).double().numpy() * n
    assert ((counts - expected) ** 2 / expected).sum() < 16.3  # chi-square, 3 dof, 99.9%
    # top-k masking over a full-size row never draws outside the top k
    wide = take_top_k_logits(torch.randn(200, vocab) * 3, 5)
    d = sample_from_logits(wide, uniform=_uniform(200, generator=g))
    assert (wide[torch.arange(200), d] > -1e9).all()


# --- draw_uniforms ---------------------------------------------------------------------------------------------

def test_draw_uniforms_from_one_generator_is_its_rand():
    got = draw_uniforms(torch.Generator().manual_seed(3), 4, 5, "cpu")
    want = torch.rand(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert got.dtype == torch.float64 and got.shape == (4, 5)
    assert torch.equal(got, want)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_draw_uniforms_gives_each_generator_its_own_block_of_rows(k):
    """With k generators (the virtual ranks a process hosts), rows/k rows each, one block after the other: each
    block is what that generator alone draws, so a rank's numbers do not depend on which process hosts it."""
    rows, length = 6, 4
    got = draw_uniforms([torch.Generator().manual_seed(10 + i) for i in range(k)], rows, length, "cpu")
    want = torch.cat([torch.rand(rows // k, length, dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(10 + i)) for i in range(k)])
    assert torch.equal(got, want)
    assert ((got >= 0) & (got < 1)).all()


def test_draw_uniforms_refuses_rows_that_do_not_split_into_equal_blocks():
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    with pytest.raises(ValueError, match="6 rows do not split into 4 equal blocks"):
        draw_uniforms(generators, 6, 3, "cpu")


# --- sample_sequence -------------------------------------------------------------------------------------------

def _tiny_model():
    torch.manual_seed(0)
    return GPT2(GPT2Config(n_vocab=11, n_ctx=12, n_embd=8, n_head=2, n_layer=1), ["value"]).eval()


def test_sample_sequence_rows_do_not_depend_on_the_micro_batch():
    """Rows sampled together or in two pieces, each with its own rows of the same uniforms, are the same."""
    model = _tiny_model()
    context = torch.randint(0, 11, (6, 3), generator=torch.Generator().manual_seed(1))
    uniforms = draw_uniforms([torch.Generator().manual_seed(2), torch.Generator().manual_seed(3)], 6, 5, "cpu")
    whole = sample_sequence(model, context, 5, padding_token=11, uniforms=uniforms)
    parts = [sample_sequence(model, context[rows], 5, padding_token=11, uniforms=uniforms[rows])
             for rows in (slice(0, 2), slice(2, 6))]
    for key in ("tokens", "logprobs", "values"):
        torch.testing.assert_close(torch.cat([p[key] for p in parts]), whole[key], rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.cat([p["tokens"] for p in parts]), whole["tokens"])


def test_sample_sequence_needs_uniforms_of_its_shape_unless_greedy():
    model = _tiny_model()
    context = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"sampling 2 rows x 4 tokens needs uniforms .* got None"):
        sample_sequence(model, context, 4, padding_token=11)
    with pytest.raises(ValueError, match=r"got \(2, 3\)"):
        sample_sequence(model, context, 4, padding_token=11, uniforms=torch.rand(2, 3, dtype=torch.float64))
    assert sample_sequence(model, context, 4, padding_token=11, greedy=True)["tokens"].shape == (2, 4)
