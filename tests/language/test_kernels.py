"""The LM head's float32 product on the fastest CPU kernel: the same numbers as x @ W^T, gradients where needed."""
import pytest
import torch

from lm_human_preferences.language import kernels


@pytest.mark.parametrize("n, c, v", [(1, 7, 27), (8, 64, 50257), (33, 24, 1000), (5, 96, 300)])
def test_linear_nt_equals_the_plain_product(n, c, v):
    g = torch.Generator().manual_seed(n)
    x, w = torch.randn(n, c, generator=g), torch.randn(v, c, generator=g)
    out = kernels.linear_nt(x, w)
    assert out.shape == (n, v) and out.is_contiguous() and out.dtype == torch.float32
    torch.testing.assert_close(out, x @ w.t(), rtol=1e-5, atol=1e-5)


def test_linear_nt_stays_differentiable_when_inputs_need_gradients():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    kernels.linear_nt(x, w).square().sum().backward()
    assert x.grad is not None and w.grad is not None
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    (x2 @ w2.t()).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_the_onednn_path_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("LMHP_HEAD_GEMM", "aten")
    kernels.onednn_linear.cache_clear()
    try:
        assert kernels.onednn_linear() is None
        x, w = torch.randn(3, 5), torch.randn(7, 5)
        torch.testing.assert_close(kernels.linear_nt(x, w), x @ w.t())
    finally:
        monkeypatch.delenv("LMHP_HEAD_GEMM")
        kernels.onednn_linear.cache_clear()


def test_large_linears_run_on_onednn_without_grad_and_on_the_layer_with_it(monkeypatch):
    if kernels.onednn_linear() is None:
        pytest.skip("this torch build has no oneDNN linear")
    calls = []
    real = kernels.onednn_linear()

    def counting(*args):
        calls.append(args[1].shape)
        return real(*args)

    monkeypatch.setattr(kernels, "onednn_linear", lambda: counting)
    torch.manual_seed(0)
    layer = torch.nn.Linear(512, kernels.ONEDNN_MIN_WEIGHT // 512)  # exactly the threshold
    x = torch.randn(2, 3, 512)
    with torch.no_grad():
        out = kernels.linear(x, layer)
        expected = layer(x)
    assert calls == [layer.weight.shape] and out.shape == (2, 3, layer.out_features)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    small = torch.nn.Linear(64, 256)
    with torch.no_grad():
        kernels.linear(torch.randn(4, 64), small)
    assert len(calls) == 1  # small weights stay on the layer
    out = kernels.linear(x, layer)  # grad enabled, the weight requires grad: the layer itself
    assert len(calls) == 1 and out.requires_grad
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        kernels.linear(x, layer)
    assert len(calls) == 1  # autocast keeps its own casts
