"""utils/core.py against the original's outputs (tests/reference/utils_fns.npz), the original's own test cases
(ORIGINAL §12) and numpy."""
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_human_preferences.utils import core

REF = Path(__file__).parents[1] / "reference"


@pytest.fixture(scope="module")
def fns():
    return np.load(REF / "utils_fns.npz")


def test_exact_div():
    assert core.exact_div(12, 4) == 3
    with pytest.raises(ValueError, match="12 / 5"):
        core.exact_div(12, 5)


def test_logprobs_and_entropy_match_original(fns):
    logits, labels = torch.tensor(fns["in/logits"]), torch.tensor(fns["in/labels"])
    np.testing.assert_allclose(core.logprobs_from_logits(logits, labels).numpy(), fns["out/logprobs_from_logits"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(core.entropy_from_logits(logits).numpy(), fns["out/entropy_from_logits"],
                               rtol=1e-5, atol=1e-6)


def test_logprobs_and_entropy_are_float32_for_bf16_logits(fns):
    logits = torch.tensor(fns["in/logits"]).bfloat16()
    labels = torch.tensor(fns["in/labels"])
    lp = core.logprobs_from_logits(logits, labels)
    ent = core.entropy_from_logits(logits)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    ref = torch.log_softmax(logits.float(), -1).gather(-1, labels.long()[..., None])[..., 0]
    torch.testing.assert_close(lp, ref)


def test_entropy_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 11)) * 3
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(core.entropy_from_logits(torch.tensor(logits, dtype=torch.float32)).numpy(),
                               expected, rtol=1e-5)


def test_whiten_matches_original_population_variance(fns):
    x = torch.tensor(fns["in/x"])
    np.testing.assert_allclose(core.whiten(x).numpy(), fns["out/whiten"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(core.whiten(x, shift_mean=False).numpy(), fns["out/whiten_noshift"],
                               rtol=1e-5, atol=1e-6)
    xn = fns["in/x"].astype(np.float64)
    np.testing.assert_allclose(core.whiten(x).numpy(), (xn - xn.mean()) / np.sqrt(xn.var() + 1e-8), rtol=1e-5)
    unbiased = (x - x.mean()) / torch.sqrt(x.var(unbiased=True) + 1e-8)
    assert not torch.allclose(core.whiten(x), unbiased, rtol=1e-3)


def test_top_k_matches_original(fns):
    out = core.take_top_k_logits(torch.tensor(fns["in/logits"]), 5)
    np.testing.assert_array_equal(out.numpy(), fns["out/take_top_k_logits_k5"])


def test_top_k_keeps_ties():
    logits = torch.tensor([[[1, 1.01, 1.001, 0, 0, 0, 2]]])
    n = -1e10
    expected = {
        1: [n, n, n, n, n, n, 2],
        2: [n, 1.01, n, n, n, n, 2],
        3: [n, 1.01, 1.001, n, n, n, 2],
        4: [1, 1.01, 1.001, n, n, n, 2],
        5: [1, 1.01, 1.001, 0, 0, 0, 2],
    }
    for k, want in expected.items():
        np.testing.assert_array_equal(core.take_top_k_logits(logits, k)[0, 0].numpy(),
                                      np.array(want, dtype=np.float32))
    with pytest.raises(ValueError, match="k=0"):
        core.take_top_k_logits(logits, 0)


def test_top_p_matches_original_b1s1(fns):
    out = core.take_top_p_logits(torch.tensor(fns["in/logits"][:1, :1]), 0.8)
    np.testing.assert_array_equal(out.numpy(), fns["out/take_top_p_logits_p0.8_b1s1"])


def test_top_p_original_cases():
    logits = torch.tensor([[[1, 1.01, 1.001, 0, 0, 0, 2]]])
    kept = {1.0: {1, 1.01, 1.001, 0, 2}, 0.0: {2}, 0.7: {2, 1.01, 1.001}, 0.6: {2, 1.01}, 0.5: {2}}
    for p, want in kept.items():
        out = core.take_top_p_logits(logits, p)[0, 0]
        got = {round(v, 4) for v in out.tolist() if v > -1e9}
        assert got == {round(v, 4) for v in want}, p
        assert (out[logits[0, 0] == 0] > -1e9).all() == (0 in want)


def _top_p_numpy(row, p):
    """Per-row transcription of the original's take_top_p_logits."""
    s = np.sort(row)[::-1]
    e = np.exp(s - s.max())
    cum = np.cumsum(e / e.sum())
    min_value = s[max(int((cum <= p).sum()) - 1, 0)]
    return np.where(row < min_value, np.float32(-1e10), row)


def test_top_p_generalises_to_any_batch_shape(fns):
    logits = fns["in/logits"]  # (4, 5, 50)
    for p in (0.3, 0.8, 0.95):
        out = core.take_top_p_logits(torch.tensor(logits), p).numpy()
        for b in range(4):
            for s in range(5):
                np.testing.assert_array_equal(out[b, s], _top_p_numpy(logits[b, s], p))
        flat = core.take_top_p_logits(torch.tensor(logits[:, 0]), p).numpy()  # (B, V)
        np.testing.assert_array_equal(flat, out[:, 0])


def test_cumulative_max_and_index_each_match_original(fns):
    np.testing.assert_array_equal(core.cumulative_max(torch.tensor(fns["in/ints"])).numpy(),
                                  fns["out/cumulative_max"])
    np.testing.assert_array_equal(core.index_each(torch.tensor(fns["in/seq"]), torch.tensor(fns["in/ix"])).numpy(),
                                  fns["out/index_each"])


def test_index_each_2d_index():
    a = torch.arange(2 * 4).reshape(2, 4) * 10
    ix = torch.tensor([[0, 3, 3], [1, 0, 2]])
    np.testing.assert_array_equal(core.index_each(a, ix).numpy(), [[0, 30, 30], [50, 40, 60]])
    with pytest.raises(ValueError, match="batch"):
        core.index_each(a, torch.tensor([0, 1, 2]))


def test_cumulative_max_float():
    x = torch.tensor([[3.0, 1.0, 4.0, 1.0, 5.0], [-1.0, -2.0, 0.0, -3.0, -0.5]])
    np.testing.assert_array_equal(core.cumulative_max(x).numpy(),
                                  np.maximum.accumulate(x.numpy(), axis=-1))


def test_gelu_matches_original(fns):
    np.testing.assert_allclose(core.gelu(torch.tensor(fns["in/gelu_x"])).numpy(), fns["out/gelu"],
                               rtol=1e-5, atol=1e-6)
    x = fns["in/gelu_x"].astype(np.float64)
    tanh_form = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(core.gelu(torch.tensor(fns["in/gelu_x"])).numpy(), tanh_form, rtol=1e-5, atol=1e-6)


def test_pearson_r():
    rng = np.random.default_rng(1)
    x = rng.normal(size=20)
    y = 0.5 * x + rng.normal(size=20)
    r = core.pearson_r(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    assert float(r) == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-5)
    with pytest.raises(ValueError, match="1-D"):
        core.pearson_r(torch.zeros(2, 2), torch.zeros(2, 2))


def test_sample_buffer_as_original():
    capacity, batch, lots = 100, 17, 100
    buffer = core.SampleBuffer(capacity=capacity, schemas=dict(x=core.Schema(np.int32, ())))
    rng = np.random.default_rng(7)
    for i in range(20):
        buffer.add(x=np.arange(i * batch, (i + 1) * batch))
        samples = buffer.sample(lots, rng)["x"]
        hi = batch * (i + 1)
        lo = max(0, hi - capacity)
        assert lo <= samples.min() <= lo + 3
        assert hi - 5 <= samples.max() < hi
        np.testing.assert_equal(buffer.data(), buffer.read(np.arange(buffer.size())))
        assert buffer.size() == min(hi, capacity) and buffer.total() == hi


def test_sample_buffer_wraps_and_validates():
    buffer = core.SampleBuffer(capacity=5, schemas=dict(q=core.Schema(np.int32, (2,)), s=core.Schema(np.float32, ())))
    buffer.add(q=np.arange(8).reshape(4, 2), s=np.arange(4, dtype=np.float32))
    buffer.add(q=np.arange(100, 106).reshape(3, 2), s=np.array([10, 11, 12], dtype=np.float32))
    # slots 0..3 held records 0..3; records 4,5,6 went to slots 4,0,1
    np.testing.assert_array_equal(buffer.data()["s"], [11, 12, 2, 3, 10])
    np.testing.assert_array_equal(buffer.read([0, 4])["q"], [[102, 103], [100, 101]])
    np.testing.assert_array_equal(buffer.sample(3, np.random.RandomState(0))["q"].shape, (3, 2))
    with pytest.raises(ValueError, match="keys"):
        buffer.add(q=np.zeros((1, 2)))
    with pytest.raises(ValueError, match="shape"):
        buffer.add(q=np.zeros((1, 3)), s=np.zeros(1))
    with pytest.raises(ValueError, match="capacity"):
        buffer.add(q=np.zeros((6, 2)), s=np.zeros(6))
    with pytest.raises(ValueError, match="indices"):
        buffer.read([5])
    with pytest.raises(ValueError, match="empty"):
        core.SampleBuffer(capacity=2, schemas=dict(x=core.Schema(np.int32, ()))).sample(1)
