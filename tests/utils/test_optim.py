"""TFAdam against the TF1 closed form, against the original's recorded reward-model Adam steps
(tests/reference/reward_model.npz) and against torch.optim.Adam, which must differ."""
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_human_preferences.utils import optim
from lm_human_preferences.utils.optim import TFAdam

REF = Path(__file__).parents[1] / "reference"
B1, B2, EPS = 0.9, 0.999, 1e-5
# Shift-invariant under best_of_N (a common shift of all logits): their true gradient is exactly 0, and the
# recorded values are float noise from a separate gradient evaluation, so their deltas are checked for size only.
ZERO_GRAD_PARAMS = ("reward_model/model/heads/reward/b", "reward_model/model/ln_f/b", "reward_model/reward_norm/bias")


def _closed_form(p0, grads, lrs, active):
    """float64 TF1 Adam with a shared step counter; active[s][i] says whether param i has a grad at step s."""
    p = [x.astype(np.float64).copy() for x in p0]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    for t, (gs, lr) in enumerate(zip(grads, lrs), start=1):
        lr_t = lr * np.sqrt(1 - B2 ** t) / (1 - B1 ** t)
        for i, g in enumerate(gs):
            if not active[t - 1][i]:
                continue
            m[i] = B1 * m[i] + (1 - B1) * g
            v[i] = B2 * v[i] + (1 - B2) * g * g
            p[i] = p[i] - lr_t * m[i] / (np.sqrt(v[i]) + EPS)
    return p


def test_matches_closed_form_with_varying_lr_and_missing_grads():
    rng = np.random.default_rng(0)
    p0 = [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(5,)).astype(np.float32)]
    steps = 6
    grads = [[rng.normal(size=x.shape) * 10.0 ** rng.uniform(-6, 0) for x in p0] for _ in range(steps)]
    lrs = [1e-2, 5e-3, 2e-2, 1e-3, 7e-3, 0.0]
    active = [[True, s >= 2] for s in range(steps)]  # the second param first gets a grad at step 3
    params = [torch.nn.Parameter(torch.tensor(x)) for x in p0]
    opt = TFAdam(params, lr=123.0)
    for s in range(steps):
        for group in opt.param_groups:
            group["lr"] = lrs[s]
        for i, p in enumerate(params):
            p.grad = torch.tensor(grads[s][i], dtype=torch.float32) if active[s][i] else None
        opt.step()
    assert opt.step_count == steps
    for got, want, start in zip(params, _closed_form(p0, grads, lrs, active), p0):
        np.testing.assert_allclose(got.detach().numpy() - start, want - start, rtol=1e-4, atol=1e-7)


def _reward_model_replay(make_optimizer):
    """Replays train/train_batch/{0,1} of the original RM run; returns the worst excess over the tolerance
    (rtol 2e-3, atol 1e-7 on deltas, <= 0 means within) and the largest |delta| of the zero-gradient params."""
    rm = np.load(REF / "reward_model.npz")
    names = sorted(k[len("init/var/"):] for k in rm.files if k.startswith("init/var/"))
    before = {k: rm[f"init/var/{k}"] for k in names}
    gain, bias = rm["train/train_batch/0/gain_bias"]  # gain/bias after normalize_before
    before["reward_model/reward_norm/gain"] = np.asarray(gain)
    before["reward_model/reward_norm/bias"] = np.asarray(bias)
    params = {k: torch.nn.Parameter(torch.tensor(before[k])) for k in names}
    opt = make_optimizer([params[k] for k in names])
    worst, zero_delta = -np.inf, 0.0
    for s in (0, 1):
        for group in opt.param_groups:
            group["lr"] = float(rm[f"train/train_batch/{s}/lr"])
        for k in names:
            params[k].grad = torch.tensor(rm[f"train/train_batch/{s}/grads/{k}"])
        opt.step()
        for k in names:
            after = rm[f"train/train_batch/{s}/params_after/{k}"].astype(np.float64)
            want = after - before[k]
            got = params[k].detach().numpy().astype(np.float64) - before[k]
            if k in ZERO_GRAD_PARAMS:
                zero_delta = max(zero_delta, np.abs(got).max(), np.abs(want).max())
                continue
            worst = max(worst, (np.abs(got - want) - (1e-7 + 2e-3 * np.abs(want))).max())
        # continue from the original's parameters, so each step's deltas are compared on their own
        before = {k: rm[f"train/train_batch/{s}/params_after/{k}"] for k in names}
        with torch.no_grad():
            for k in names:
                params[k].copy_(torch.tensor(before[k]))
    return worst, zero_delta


def test_replays_original_reward_model_steps():
    worst, zero_delta = _reward_model_replay(lambda ps: TFAdam(ps, lr=0.0))
    assert worst <= 0, worst
    assert zero_delta < 3e-7


def test_torch_adam_does_not_match_original():
    worst, _ = _reward_model_replay(lambda ps: torch.optim.Adam(ps, lr=0.0, eps=1e-5))
    assert worst > 1e-5


def test_first_step_is_lr_sized_and_differs_from_torch_adam():
    # With |g| ~ eps, TF's eps (not bias-corrected) shrinks the first step; torch's does not
    g = torch.full((4,), 1e-5)
    p_tf, p_pt = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    p_tf.grad, p_pt.grad = g.clone(), g.clone()
    TFAdam([p_tf], lr=1.0).step()
    torch.optim.Adam([p_pt], lr=1.0, eps=1e-5).step()
    lr_t = np.sqrt(1 - B2) / (1 - B1)
    expected = -lr_t * (0.1 * 1e-5) / (np.sqrt(1e-3) * 1e-5 + 1e-5)
    np.testing.assert_allclose(p_tf.detach().numpy(), expected, rtol=1e-5)
    assert abs(float(p_pt.detach()[0])) > 5 * abs(expected)


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    start = [torch.randn(3, 2), torch.randn(4)]
    grads = [[torch.randn_like(x) for x in start] for _ in range(5)]

    def run(params, opt, steps):
        for s in steps:
            opt.param_groups[0]["lr"] = 1e-2 * (1 - s / 5)
            for p, g in zip(params, grads[s]):
                p.grad = g.clone()
            opt.step()

    ref_params = [torch.nn.Parameter(x.clone()) for x in start]
    ref_opt = TFAdam(ref_params)
    run(ref_params, ref_opt, range(5))

    params = [torch.nn.Parameter(x.clone()) for x in start]
    opt = TFAdam(params)
    run(params, opt, range(2))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    state = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert state["step_count"] == 2
    opt2 = TFAdam(params)
    opt2.load_state_dict(state)
    run(params, opt2, range(2, 5))
    for got, want in zip(params, ref_params):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="step_count"):
        TFAdam(params).load_state_dict(torch.optim.Adam(params).state_dict())


def test_bfloat16_params_keep_float32_state():
    torch.manual_seed(0)
    p32 = torch.nn.Parameter(torch.randn(64))
    p16 = torch.nn.Parameter(p32.detach().bfloat16())
    opt32, opt16 = TFAdam([p32], lr=1e-2), TFAdam([p16], lr=1e-2)
    for _ in range(3):
        g = torch.randn(64)
        p32.grad, p16.grad = g.clone(), g.bfloat16()
        opt32.step()
        opt16.step()
    assert p16.dtype == torch.bfloat16
    assert opt16.state[p16]["exp_avg"].dtype == torch.float32
    assert opt16.state[p16]["exp_avg_sq"].dtype == torch.float32
    torch.testing.assert_close(p16.float(), p32.detach(), rtol=1e-2, atol=2e-2)
    restored = TFAdam([p16])
    restored.load_state_dict(opt16.state_dict())
    for k in ("exp_avg", "exp_avg_sq"):
        assert restored.state[p16][k].dtype == torch.float32
        torch.testing.assert_close(restored.state[p16][k], opt16.state[p16][k], rtol=0, atol=0)


def test_rejects_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="lr"):
        TFAdam(p, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        TFAdam(p, betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="eps"):
        TFAdam(p, eps=-1e-5)


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
