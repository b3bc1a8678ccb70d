"""The PPO-iteration benchmark runs at the `test` size and reports every phase, baseline and figure it promises."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "ppo_iteration.py"
PHASES = ("sampling", "score", "update", "iteration")
FIGURES = ("median_s", "times_s", "tokens_per_s", "flops", "flops_per_s", "mfu", "peak_bytes")


def run(tmp_path, *args):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--size", "test", "--threads", "1", "--repeats", "1", "--warmup", "0",
           "--json", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_benchmark_reports_every_phase_and_baseline(tmp_path):
    pytest.importorskip("transformers")
    stdout, report = run(tmp_path, "--precision", "bf16", "--sentiment")
    assert (report["size"], report["batch"], report["query_length"], report["response_length"]) == ("test", 8, 64, 24)
    assert (report["noptepochs"], report["nminibatches"]) == (4, 1)
    assert set(report["matmul_flops_per_s"]) == {"bf16"} and report["matmul_flops_per_s"]["bf16"] > 0
    assert report["machine"]["threads"] == 1 and len(report["machine"]["loadavg_start"]) == 3
    r = report["results"]["bf16"]
    for phase in PHASES:
        fig = r["ours"][phase]
        assert set(FIGURES) <= set(fig)
        assert fig["median_s"] > 0 and fig["tokens_per_s"] > 0 and fig["mfu"] > 0
        assert 2 ** 20 < fig["peak_bytes"] < 2 ** 34  # measured in the child process, a plausible RSS
    parts = sum(r["ours"][p]["median_s"] for p in ("sampling", "score", "update"))
    assert r["ours"]["iteration"]["median_s"] == pytest.approx(parts)
    assert r["ours"]["iteration"]["peak_bytes"] == max(r["ours"][p]["peak_bytes"] for p in PHASES)
    assert set(r["baselines"]) == {"hf", "hf_generate", "nocache"}
    assert set(r["baselines"]["hf"]) == set(PHASES)
    assert set(r["baselines"]["nocache"]) == set(r["baselines"]["hf_generate"]) == {"sampling"}
    assert set(r["speedup"]["sampling"]) == {"hf_generate", "nocache"}
    for phase in PHASES:
        for base, ratio in r["speedup"][phase].items():
            assert ratio == pytest.approx(r["baselines"][base][phase]["median_s"] / r["ours"][phase]["median_s"])
    s = report["sentiment"]
    assert s["batch"] == 512 and s["total_episodes"] == 1_000_000 and s["nupdates"] == 1954
    assert s["projected_hours"] == pytest.approx(s["seconds_per_iteration"] * s["nupdates"] / 3600)
    assert "targets" not in report  # the targets are for the 124M shape
    # the table names every phase and baseline, with its speed-up, and the projection
    for label in ("sampling", "ref+score", "update (4 ep)", "iteration", "HF generate", "no KV cache",
                  "HF + torch Adam", "x", "projected", "load average"):
        assert label in stdout


def test_benchmark_rejects_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--size", "7B"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--size" in proc.stderr and "124M" in proc.stderr
    proc = subprocess.run([sys.executable, str(SCRIPT), "--repeats", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--repeats" in proc.stderr


# ---- the performance paths the benchmark measures compute the same numbers --------------------------------

import copy  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lm_human_preferences.language.model import GPT2, GPT2Config, attention  # noqa: E402
from lm_human_preferences.policy import LogprobsEntropy  # noqa: E402
from lm_human_preferences.utils import optim  # noqa: E402
from lm_human_preferences.utils.core import entropy_from_logits, logprobs_from_logits  # noqa: E402

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
    lp, ent = LogprobsEntropy.apply(logits, labels, 0.7)
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
    from lm_human_preferences.policy import Policy
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
    got = attention(q, k, v, bias)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0, atol=1e-2)


def test_store_linears_in_bf16_keeps_autocast_outputs_bit_for_bit():
    model = small_model(("reward",)).requires_grad_(False)
    frozen = copy.deepcopy(model).store_linears_in(torch.bfloat16)
    tokens = padded_tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = model(tokens, padding_token=PAD, lm_positions=slice(19, 29))
        b = frozen(tokens, padding_token=PAD, lm_positions=slice(19, 29))
    for key in ("h", "reward", "lm_logits"):
        assert torch.equal(a[key], b[key]), key
    with pytest.raises(RuntimeError, match="autocast"):
        frozen(tokens, padding_token=PAD)
    with pytest.raises(ValueError, match="requires_grad_"):
        small_model().store_linears_in(torch.bfloat16)


def test_chunked_tf_adam_is_bit_for_bit_the_unchunked_update(monkeypatch):
    torch.manual_seed(0)
    shapes = [(300, 7), (7,), (5, 4, 3), (1000,)]
    start = [torch.randn(s) for s in shapes] + [torch.randn(6, 4).t()]  # a non-contiguous param stays whole
    grads = [[torch.randn(x.shape) * 10.0 ** -k for x in start] for k in range(3)]
    results = []
    for chunk in (1 << 40, 64):
        monkeypatch.setattr(optim, "CPU_CHUNK", chunk)
        params = [torch.nn.Parameter(x.clone()) for x in start[:-1]] + [torch.nn.Parameter(start[-1].clone().t().t())]
        assert not params[-1].is_contiguous()
        opt = optim.TFAdam(params, lr=1e-2)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)
