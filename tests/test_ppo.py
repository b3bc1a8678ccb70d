"""ppo.py against the original's recorded PPO math (tests/reference/rl_pipeline.npz, kl_controller.npz) and a
float64 numpy transcription of ORIGINAL §10.2-10.5."""
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_human_preferences import ppo
from lm_human_preferences.utils.core import whiten

REF = Path(__file__).parent / "reference"
HP = dict(gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)  # rl_pipeline's ppo hparams


@pytest.fixture(scope="module")
def rl():
    return np.load(REF / "rl_pipeline.npz")


def _t(rl, key, rows=None):
    x = rl[key]
    return torch.tensor(x if rows is None else x[rows])


def _close(got, want, rtol=1e-4, atol=1e-6):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64),
                               rtol=rtol, atol=atol)


# ---- numpy transcription of ORIGINAL §10.3 ----

def _np_whiten(x, shift_mean=True):
    mean, var = x.mean(), x.var()
    w = (x - mean) / np.sqrt(var + 1e-8)
    return w if shift_mean else w + mean


def _np_ppo(values, rewards, old_logprob, logprob, vpred, entropies, whiten_rewards, gamma, lam, cliprange,
            cliprange_value, vf_coef):
    if whiten_rewards:
        rewards = _np_whiten(rewards, shift_mean=False)
    b, t_len = rewards.shape
    adv = np.zeros((b, t_len))
    last = np.zeros(b)
    for t in reversed(range(t_len)):
        nextv = values[:, t + 1] if t < t_len - 1 else 0.0
        last = rewards[:, t] + gamma * nextv - values[:, t] + gamma * lam * last
        adv[:, t] = last
    returns = adv + values
    advw = _np_whiten(adv)
    vclip = np.clip(vpred, values - cliprange_value, values + cliprange_value)
    vf1, vf2 = (vpred - returns) ** 2, (vclip - returns) ** 2
    ratio = np.exp(logprob - old_logprob)
    pg1, pg2 = -advw * ratio, -advw * np.clip(ratio, 1 - cliprange, 1 + cliprange)
    pg_loss, vf_loss = np.maximum(pg1, pg2).mean(), 0.5 * np.maximum(vf1, vf2).mean()
    stats = {
        "loss/policy": pg_loss, "loss/value": vf_loss, "loss/total": pg_loss + vf_coef * vf_loss,
        "policy/entropy": entropies.mean(), "policy/approxkl": 0.5 * ((logprob - old_logprob) ** 2).mean(),
        "policy/clipfrac": (pg2 > pg1).mean(),
        "returns/mean": returns.mean(), "returns/var": returns.var(),
        "val/vpred": vpred.mean(), "val/error": ((vpred - returns) ** 2).mean(), "val/clipfrac": (vf2 > vf1).mean(),
        "val/mean": values.mean(), "val/var": values.var(),
    }
    return dict(rewards=rewards, advantages_raw=adv, returns=returns, advantages=advw), stats


def _random_batch(seed, b=12, t=7):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(b, t))
    logprob = -np.abs(rng.normal(2.0, 1.0, size=(b, t)))
    return dict(values=values, rewards=rng.normal(size=(b, t)) * 0.3,
                old_logprob=logprob + rng.normal(size=(b, t)) * 0.3, logprob=logprob,
                vpred=values + rng.normal(size=(b, t)) * 0.4, entropies=rng.uniform(1, 4, size=(b, t)))


@pytest.mark.parametrize("whiten_rewards", [True, False])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5)])
def test_matches_numpy_transcription(whiten_rewards, gamma, lam):
    d = _random_batch(0)
    hp = dict(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    want, want_stats = _np_ppo(**d, whiten_rewards=whiten_rewards, gamma=gamma, lam=lam, **hp)
    td = {k: torch.tensor(v) for k, v in d.items()}  # float64 end to end
    adv = ppo.compute_advantages(td["values"], td["rewards"], gamma, lam, whiten_rewards)
    for k in ("rewards", "advantages_raw", "returns", "advantages"):
        np.testing.assert_allclose(getattr(adv, k).numpy(), want[k], rtol=1e-10, atol=1e-12)
    loss, stats = ppo.ppo_loss(td["logprob"], td["vpred"], td["entropies"], td["old_logprob"], td["values"],
                               adv.advantages, adv.returns, **hp)
    assert tuple(stats) == ppo.PPO_STAT_KEYS
    for k in ppo.PPO_STAT_KEYS:
        np.testing.assert_allclose(float(stats[k]), want_stats[k], rtol=1e-10, atol=1e-12, err_msg=k)
    assert float(loss) == float(stats["loss/total"])
    # both clip paths were exercised, and the variance is the population one
    assert 0 < want_stats["policy/clipfrac"] < 1 and 0 < want_stats["val/clipfrac"] < 1
    assert float(stats["returns/var"]) != pytest.approx(float(adv.returns.var(unbiased=True)), rel=1e-3)


def test_gradients_flow_only_through_new_outputs():
    d = {k: torch.tensor(v, dtype=torch.float32) for k, v in _random_batch(1).items()}
    adv = ppo.compute_advantages(d["values"], d["rewards"], 1.0, 0.95, True)
    logprob = d["logprob"].clone().requires_grad_()
    vpred = d["vpred"].clone().requires_grad_()
    old_logprob = d["old_logprob"].clone().requires_grad_()
    loss, _ = ppo.ppo_loss(logprob, vpred, d["entropies"], old_logprob, d["values"], adv.advantages,
                           adv.returns, 0.2, 0.2, 0.1)
    loss.backward()
    assert old_logprob.grad is None
    # clipped policy terms contribute no gradient; unclipped ones give -A * ratio / N
    ratio = torch.exp(d["logprob"] - d["old_logprob"])
    a = adv.advantages
    clipped = (-a * ratio.clamp(0.8, 1.2)) > (-a * ratio)
    expected = torch.where(clipped, torch.zeros_like(a), -a * ratio / a.numel())
    torch.testing.assert_close(logprob.grad, expected, rtol=1e-5, atol=1e-8)
    assert vpred.grad.abs().sum() > 0


def test_identical_logprobs_give_ratio_one():
    d = {k: torch.tensor(v, dtype=torch.float32) for k, v in _random_batch(2).items()}
    adv = ppo.compute_advantages(d["values"], d["rewards"], 1.0, 0.95, True)
    loss, stats = ppo.ppo_loss(d["logprob"], d["vpred"], d["entropies"], d["logprob"].clone(), d["values"],
                               adv.advantages, adv.returns, 0.2, 0.2, 0.1)
    assert float(stats["policy/approxkl"]) == 0.0
    assert float(stats["policy/clipfrac"]) == 0.0
    # ratio == 1 exactly, so the policy loss is -mean(whitened advantages)
    assert float(stats["loss/policy"]) == float(-adv.advantages.mean())


def test_whiten_in_groups():
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1
    torch.testing.assert_close(ppo.whiten_in_groups(x, 1), whiten(x))
    for shift_mean in (True, False):
        got = ppo.whiten_in_groups(x, 4, shift_mean=shift_mean)
        want = torch.cat([whiten(c, shift_mean=shift_mean) for c in x.chunk(4)])
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="8 / 3"):
        ppo.whiten_in_groups(x, 3)


def test_compute_advantages_in_groups_equals_per_group_runs():
    d = {k: torch.tensor(v, dtype=torch.float32) for k, v in _random_batch(3).items()}
    got = ppo.compute_advantages(d["values"], d["rewards"], 1.0, 0.95, True, n_groups=3)
    for g, rows in enumerate(torch.arange(12).chunk(3)):
        want = ppo.compute_advantages(d["values"][rows], d["rewards"][rows], 1.0, 0.95, True)
        for k in ("rewards", "advantages_raw", "returns", "advantages"):
            torch.testing.assert_close(getattr(got, k)[rows], getattr(want, k))


def test_minibatch_orders_hand_case():
    """2 virtual ranks of 4 rows, 2 minibatches: each minibatch takes 2 rows of rank 0 (rows 0-3) in its permutation's
    order, then 2 of rank 1 (rows 4-7)."""
    perms = torch.tensor([[2, 0, 3, 1], [1, 3, 0, 2]])
    assert ppo.minibatch_orders(perms, 2).tolist() == [2, 0, 5, 7, 3, 1, 4, 6]
    assert ppo.minibatch_orders(perms[:1], 1).tolist() == [2, 0, 3, 1]  # one rank: its permutation


@pytest.mark.parametrize("G, b, nminibatches", [(1, 6, 3), (3, 4, 2), (4, 6, 3), (2, 8, 8), (3, 5, 1)])
def test_minibatch_orders_give_every_rank_its_own_rows_in_every_minibatch(G, b, nminibatches):
    rng = np.random.RandomState(G * 100 + b)
    perms = torch.tensor(np.stack([rng.permutation(b) for _ in range(G)]))
    order = ppo.minibatch_orders(perms, nminibatches)
    assert sorted(order.tolist()) == list(range(G * b))  # every row once
    per_rank = b // nminibatches
    for i, minibatch in enumerate(order.split(G * per_rank)):
        for g, chunk in enumerate(minibatch.split(per_rank)):  # chunk g: rank g's i-th minibatch, a whitening group
            assert chunk.tolist() == (g * b + perms[g, i * per_rank:(i + 1) * per_rank]).tolist()


def test_minibatch_orders_refuse_ranks_rows_that_do_not_split():
    with pytest.raises(ValueError, match="6 rows per rank do not split into 4 minibatches"):
        ppo.minibatch_orders(torch.arange(6).repeat(2, 1), 4)


# ---- the original's recorded values ----

@pytest.mark.parametrize("name", ["loss_base", "loss_perturbed"])
def test_loss_matches_original(rl, name):
    """PPOTrainer.loss at the initial policy: its new forward is step0/init_analyze/policy (same params, data)."""
    np.testing.assert_array_equal(rl[f"{name}/in/queries"], rl["step0/queries"])
    np.testing.assert_array_equal(rl[f"{name}/in/responses"], rl["step0/respond/responses"])
    adv = ppo.compute_advantages(_t(rl, f"{name}/in/values"), _t(rl, f"{name}/in/rewards"),
                                 HP["gamma"], HP["lam"], whiten_rewards=True)
    _close(adv.rewards, rl[f"{name}/out/rewards_whitened"])
    _close(adv.advantages_raw, rl[f"{name}/out/advantages_raw"])
    _close(adv.advantages, rl[f"{name}/out/advantages_whitened"])
    _close(adv.returns, rl[f"{name}/out/returns"])
    loss, stats = ppo.ppo_loss(
        _t(rl, "step0/init_analyze/policy/logprobs"), _t(rl, "step0/init_analyze/policy/values"),
        _t(rl, "step0/init_analyze/policy/entropies"), _t(rl, f"{name}/in/logprobs"), _t(rl, f"{name}/in/values"),
        adv.advantages, adv.returns, HP["cliprange"], HP["cliprange_value"], HP["vf_coef"])
    ref_keys = sorted(k[len(f"{name}/out/stats/"):] for k in rl.files if k.startswith(f"{name}/out/stats/"))
    assert sorted(stats) == ref_keys
    _close(float(loss), rl[f"{name}/out/loss"])
    for k in stats:
        atol = 1 / 96 / 2 if k.endswith("clipfrac") else 1e-6  # 96 = 16 x 6 elements
        _close(float(stats[k]), rl[f"{name}/out/stats/{k}"], atol=atol)
    if name == "loss_perturbed":
        assert float(stats["policy/clipfrac"]) > 0 and float(stats["val/clipfrac"]) > 0


def test_first_minibatch_train_stats_match_original(rl):
    """step 0, epoch 0, minibatch 0 runs at the initial params, so its new forward is init_analyze's rows."""
    rows = rl["step0/permutations"][0][:8]
    adv = ppo.compute_advantages(_t(rl, "step0/respond/values", rows), _t(rl, "step0/rewards", rows),
                                 HP["gamma"], HP["lam"], whiten_rewards=True)
    _, stats = ppo.ppo_loss(
        _t(rl, "step0/init_analyze/policy/logprobs", rows), _t(rl, "step0/init_analyze/policy/values", rows),
        _t(rl, "step0/init_analyze/policy/entropies", rows), _t(rl, "step0/respond/logprobs", rows),
        _t(rl, "step0/respond/values", rows), adv.advantages, adv.returns,
        HP["cliprange"], HP["cliprange_value"], HP["vf_coef"])
    for k in ppo.PPO_STAT_KEYS:
        atol = 1 / 48 / 2 if k.endswith("clipfrac") else 1e-6
        _close(float(stats[k]), rl[f"step0/train_stats/{k}"][0], atol=atol)


@pytest.mark.parametrize("step", [0, 1])
def test_compute_rewards_matches_original(rl, step):
    s = f"step{step}"
    rewards, non_score_reward, kl = ppo.compute_rewards(
        _t(rl, f"{s}/scores"), _t(rl, f"{s}/respond/logprobs"), _t(rl, f"{s}/ref_analyze/logprobs"),
        float(rl[f"{s}/compute_rewards_kl_coef"]))
    _close(rewards, rl[f"{s}/rewards"], rtol=1e-5, atol=1e-7)
    _close(non_score_reward, rl[f"{s}/non_score_reward"], rtol=1e-5, atol=1e-7)
    _close(kl, rl[f"{s}/respond/logprobs"] - rl[f"{s}/ref_analyze/logprobs"], rtol=1e-6, atol=1e-7)
    # the score sits at the last index only
    np.testing.assert_array_equal((rewards - non_score_reward)[:, :-1].numpy(), 0)


def test_compute_rewards_hand_case():
    rewards, nsr, kl = ppo.compute_rewards(torch.tensor([2.0, -1.0]), torch.tensor([[-1.0, -2.0], [-0.5, -0.5]]),
                                           torch.tensor([[-1.5, -1.0], [-0.5, -1.5]]), 0.5)
    assert kl.tolist() == [[0.5, -1.0], [0.0, 1.0]]
    assert nsr.tolist() == [[-0.25, 0.5], [0.0, -0.5]]
    assert rewards.tolist() == [[-0.25, 2.5], [0.0, -1.5]]
    with pytest.raises(ValueError, match="scores"):
        ppo.compute_rewards(torch.zeros(3), torch.zeros(2, 4), torch.zeros(2, 4), 0.1)


@pytest.mark.parametrize("step", [0, 1])
def test_step_stats_match_original(rl, step):
    s = f"step{step}"
    keys = ppo.PPO_STAT_KEYS
    n_minibatches = rl[f"{s}/train_stats/{keys[0]}"].shape[0]
    train_stats = [{k: torch.tensor(rl[f"{s}/train_stats/{k}"][i]) for k in keys} for i in range(n_minibatches)]
    stats = ppo.step_stats(
        logprobs=_t(rl, f"{s}/respond/logprobs"), ref_logprobs=_t(rl, f"{s}/ref_analyze/logprobs"),
        non_score_reward=_t(rl, f"{s}/non_score_reward"), scores=_t(rl, f"{s}/scores"),
        kl_coef=float(rl[f"{s}/compute_rewards_kl_coef"]), train_stats=train_stats)
    ref_keys = sorted(k[len(f"{s}/step_stats/"):] for k in rl.files
                      if k.startswith(f"{s}/step_stats/") and not k.startswith(f"{s}/step_stats/elapsed/"))
    assert sorted(stats) == ref_keys
    for k in ref_keys:
        _close(float(stats[k]), rl[f"{s}/step_stats/{k}"], rtol=1e-5, atol=1e-6)
    # the KL controller is fed objective/kl
    np.testing.assert_allclose(float(stats["objective/kl"]), rl[f"{s}/kl_update/current"], rtol=1e-5)


def test_step_stats_reduce_fn_runs_before_var_explained():
    stats_in = {k: torch.tensor(1.0) for k in ppo.PPO_STAT_KEYS}
    z = torch.zeros(2, 3)

    def halve_error(stats):
        return {k: v / 2 if k == "ppo/val/error" else v for k, v in stats.items()}

    stats = ppo.step_stats(logprobs=z, ref_logprobs=z, non_score_reward=z, scores=torch.zeros(2), kl_coef=0.1,
                           train_stats=[stats_in], reduce_fn=halve_error)
    assert float(stats["ppo/val/var_explained"]) == 0.5
    assert float(ppo.var_explained(torch.tensor(1.0), torch.tensor(4.0))) == 0.75
    with pytest.raises(ValueError, match="at least one"):
        ppo.step_stats(logprobs=z, ref_logprobs=z, non_score_reward=z, scores=torch.zeros(2), kl_coef=0.1,
                       train_stats=[])


# ---- KL controllers ----

def test_adaptive_kl_controller_matches_original():
    ref = np.load(REF / "kl_controller.npz")
    ctl = ppo.AdaptiveKLController(float(ref["in/init_kl_coef"]), float(ref["in/target"]), int(ref["in/horizon"]))
    values = [ctl.value]
    for current, n_steps in zip(ref["in/current"], ref["in/n_steps"]):
        ctl.update(float(current), int(n_steps))
        values.append(ctl.value)
    np.testing.assert_allclose(values, ref["out/values"], rtol=1e-6)
    fixed = ppo.FixedKLController(float(ref["in/init_kl_coef"]))
    for current, n_steps in zip(ref["in/current"], ref["in/n_steps"]):
        fixed.update(float(current), int(n_steps))
    assert fixed.value == float(ref["out/fixed_value_after_update"])


def test_adaptive_kl_controller_matches_rl_pipeline_updates(rl):
    ctl = ppo.AdaptiveKLController(float(rl["step0/kl_coef_before_update"]), 6.0, 10000)
    for s in ("step0", "step1"):
        ctl.update(torch.tensor(rl[f"{s}/kl_update/current"]), int(rl[f"{s}/kl_update/n_steps"]))
        np.testing.assert_allclose(ctl.value, rl[f"{s}/kl_coef_after_update"], rtol=1e-6)


def test_adaptive_kl_controller_clips_and_round_trips():
    ctl = ppo.AdaptiveKLController(0.2, target=6.0, horizon=100)
    ctl.update(600.0, 10)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.2 * 1.02)
    ctl.update(0.0, 10)  # error clipped to -0.2
    assert ctl.value == pytest.approx(0.2 * 1.02 * 0.98)
    ctl.update(6.0, 10)  # on target: unchanged
    assert ctl.value == pytest.approx(0.2 * 1.02 * 0.98)
    other = ppo.AdaptiveKLController(0.2, target=6.0, horizon=100)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value
    fixed = ppo.FixedKLController(0.05)
    restored = ppo.FixedKLController(1.0)
    restored.load_state_dict(fixed.state_dict())
    assert restored.value == 0.05
    with pytest.raises(ValueError, match="horizon"):
        ppo.AdaptiveKLController(0.1, target=6.0, horizon=0)
    with pytest.raises(ValueError, match="target"):
        ppo.AdaptiveKLController(0.1, target=0.0, horizon=10)
