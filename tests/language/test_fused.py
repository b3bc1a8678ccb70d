"""The speed code (language/fused.py) computes the numbers of the plain ops it stands for: oneDNN products, CPU bf16
attention, the tied LM head's in-place gradient, the fused logprobs/entropies, bf16-stored frozen Linear layers."""
import copy

import pytest
import torch
import torch.nn.functional as F

from lm_human_preferences.language import fused
from lm_human_preferences.language.model import GPT2, GPT2Config
from lm_human_preferences.policy import Policy
from lm_human_preferences.utils.core import entropy_from_logits, logprobs_from_logits

PAD = 303


def small_model(heads=("value",), seed=0):
    torch.manual_seed(seed)
    model = GPT2(GPT2Config(n_vocab=301, n_ctx=40, n_embd=48, n_head=4, n_layer=2), list(heads))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def padded_tokens(seed=1):
    torch.manual_seed(seed)
    tokens = torch.randint(0, 30, (4, 30))  # few distinct ids: the embedding gradient sums repeated rows
    tokens[0, 5:9] = PAD
    tokens[2, 3] = PAD
    return tokens


def test_tied_lm_head_and_embedding_keep_autograds_bits():
    """A float32 training pass through TiedLMHead/TiedEmbedding gives the gradients of plain autograd, bit for bit."""
    tokens = padded_tokens()
    grads = []
    for tied in (True, False):
        model = small_model()
        if tied:
            out = model(tokens, padding_token=PAD, lm_positions=slice(19, 29))
            logits = out["lm_logits"]
        else:  # no LM head inside the model: F.linear and F.embedding, differentiated by autograd
            out = model(tokens, padding_token=PAD)
            logits = F.linear(out["h"][:, 19:29], model.wte.weight)
        loss = logprobs_from_logits(logits / 0.7, tokens[:, 20:30]).mean() + out["value"].square().mean()
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_fused_logprobs_entropy_match_the_plain_ops():
    torch.manual_seed(0)
    logits = (3 * torch.randn(70, 500, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, 500, (70,))
    w_lp, w_ent = torch.randn(70, dtype=torch.float64), torch.randn(70, dtype=torch.float64)
    lp, ent = fused.LogprobsEntropy.apply(logits, labels, 0.7)
    (lp * w_lp + ent * w_ent).sum().backward()
    fused_grad, logits.grad = logits.grad, None
    scaled = logits / 0.7
    lp2, ent2 = logprobs_from_logits(scaled, labels), entropy_from_logits(scaled)
    (lp2 * w_lp + ent2 * w_ent).sum().backward()
    torch.testing.assert_close(lp, lp2, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, ent2, rtol=0, atol=1e-12)
    torch.testing.assert_close(fused_grad, logits.grad, rtol=0, atol=1e-12)


def test_bf16_policy_pass_stays_close_to_float32():
    """Under bf16 autocast the policy pass (fp32 attention on CPU, fused logprobs) stays near the float32 one."""
    policy = Policy(small_model(), temperature=0.7, padding_token=PAD)
    tokens = padded_tokens()
    queries, responses = tokens[:, :20], tokens[:, 20:]
    ref = policy(queries, responses)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = policy(queries, responses)
    for key in ("logprobs", "entropies", "values"):
        assert out[key].dtype == torch.float32
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=0.05, msg=key)
    (out["logprobs"].mean() + out["entropies"].mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)


def test_cpu_bf16_attention_is_float32_attention_of_the_rounded_inputs():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8).bfloat16() for _ in range(3))
    bias = torch.zeros(2, 1, 5, 5).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), -1e10)
    bias[1, :, :, 0] = -1e10  # a masked key
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias)
    got = fused.attention(q, k, v, bias)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0, atol=1e-2)


def test_store_linears_in_bf16_keeps_autocast_outputs_bit_for_bit():
    model = small_model(("reward",)).requires_grad_(False)
    frozen = fused.store_linears_in(copy.deepcopy(model), torch.bfloat16)
    tokens = padded_tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = model(tokens, padding_token=PAD, lm_positions=slice(19, 29))
        b = frozen(tokens, padding_token=PAD, lm_positions=slice(19, 29))
    for key in ("h", "reward", "lm_logits"):
        assert torch.equal(a[key], b[key]), key
    with pytest.raises(RuntimeError, match="autocast"):
        frozen(tokens, padding_token=PAD)
    with pytest.raises(ValueError, match="requires_grad_"):
        fused.store_linears_in(small_model(), torch.bfloat16)


# ---- float32 products on oneDNN ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, c, v", [(1, 7, 27), (8, 64, 50257), (33, 24, 1000), (5, 96, 300)])
def test_linear_nt_equals_the_plain_product(n, c, v):
    g = torch.Generator().manual_seed(n)
    x, w = torch.randn(n, c, generator=g), torch.randn(v, c, generator=g)
    out = fused.linear_nt(x, w)
    assert out.shape == (n, v) and out.is_contiguous() and out.dtype == torch.float32
    torch.testing.assert_close(out, x @ w.t(), rtol=1e-5, atol=1e-5)


def test_linear_nt_stays_differentiable_when_inputs_need_gradients():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    fused.linear_nt(x, w).square().sum().backward()
    assert x.grad is not None and w.grad is not None
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    (x2 @ w2.t()).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_the_onednn_path_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("LMHP_HEAD_GEMM", "aten")
    fused.onednn_linear.cache_clear()
    try:
        assert fused.onednn_linear() is None
        x, w = torch.randn(3, 5), torch.randn(7, 5)
        torch.testing.assert_close(fused.linear_nt(x, w), x @ w.t())
    finally:
        monkeypatch.delenv("LMHP_HEAD_GEMM")
        fused.onednn_linear.cache_clear()


def test_large_linears_run_on_onednn_without_grad_and_on_the_layer_with_it(monkeypatch):
    if fused.onednn_linear() is None:
        pytest.skip("this torch build has no oneDNN linear")
    calls = []
    real = fused.onednn_linear()

    def counting(*args):
        calls.append(args[1].shape)
        return real(*args)

    monkeypatch.setattr(fused, "onednn_linear", lambda: counting)
    torch.manual_seed(0)
    layer = torch.nn.Linear(512, fused.ONEDNN_MIN_WEIGHT // 512)  # exactly the threshold
    x = torch.randn(2, 3, 512)
    with torch.no_grad():
        out = fused.linear(x, layer)
        expected = layer(x)
    assert calls == [layer.weight.shape] and out.shape == (2, 3, layer.out_features)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    small = torch.nn.Linear(64, 256)
    with torch.no_grad():
        fused.linear(torch.randn(4, 64), small)
    assert len(calls) == 1  # small weights stay on the layer
    out = fused.linear(x, layer)  # grad enabled, the weight requires grad: the layer itself
    assert len(calls) == 1 and out.requires_grad
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused.linear(x, layer)
    assert len(calls) == 1  # autocast keeps its own casts


@pytest.fixture
def tf32_flag():
    """Restores CUDA's TF32 matmul flag (a process-wide setting; it can be set without a GPU)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("value, allowed", [("1", True), ("0", False), ("", False), (None, False)])
def test_lmhp_tf32_opts_in_to_tf32_matmuls_on_cuda(monkeypatch, tf32_flag, value, allowed):
    if value is None:
        monkeypatch.delenv("LMHP_TF32", raising=False)
    else:
        monkeypatch.setenv("LMHP_TF32", value)
    small_model()  # building a model applies it
    assert torch.backends.cuda.matmul.allow_tf32 is allowed


def test_a_bad_lmhp_tf32_is_a_one_line_error(monkeypatch, tf32_flag):
    monkeypatch.setenv("LMHP_TF32", "yes")
    with pytest.raises(ValueError, match=r"^environment variable LMHP_TF32='yes' must be 1 \(TF32 matmuls on CUDA\) "
                                         r"or 0; set it to 1 or 0, or unset it$"):
        small_model()
    assert torch.backends.cuda.matmul.allow_tf32 is False
