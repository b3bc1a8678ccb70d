"""The policy, sampler, scoring and PPO update against the ORIGINAL code's recorded outputs (rl_pipeline.npz,
sample_greedy.npz); tolerances from tests/reference/README.md."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_human_preferences import ppo
from lm_human_preferences.hparams import PpoHParams
from lm_human_preferences.language.model import GPT2, GPT2Config
from lm_human_preferences.language.trained_models import tf_to_state_dict
from lm_human_preferences.lm_tasks import penalized_scores, postprocess_responses, responses_valid
from lm_human_preferences.policy import Policy
from lm_human_preferences.rewards import RewardModel
from lm_human_preferences.train_policy import ppo_minibatch, ppo_train
from lm_human_preferences.utils.optim import TFAdam

REF = Path(__file__).parent / "reference"
PAD = 52
PREFIX, SUFFIX = [0, 1], [2]  # 'ab', 'c' under the reference's fake encoder


@pytest.fixture(scope="module")
def rl():
    return np.load(REF / "rl_pipeline.npz")


def tf_vars(npz, prefix):
    return {k[len(prefix):]: npz[k] for k in npz.files if k.startswith(prefix)}


def config(npz):
    return GPT2Config.from_dict(json.loads(str(npz["meta_json"]))["hparams"])


def make_policy(npz, var_prefix, scope, temperature=0.7):
    cfg = config(npz)
    model = GPT2(cfg, ["value"])
    model.load_state_dict(tf_to_state_dict(tf_vars(npz, var_prefix), cfg.n_layer, scope=f"{scope}/model",
                                           heads=["value"]))
    return Policy(model, temperature=temperature, padding_token=PAD, prefix_tokens=PREFIX, suffix_tokens=SUFFIX)


def make_reward_model(npz, var_prefix):
    cfg = config(npz)
    model = GPT2(cfg, ["reward"])
    v = tf_vars(npz, var_prefix)
    model.load_state_dict(tf_to_state_dict(v, cfg.n_layer, scope="reward_model/model", heads=["reward"]))
    rm = RewardModel(model, padding_token=PAD)
    with torch.no_grad():
        rm.gain.fill_(float(v["reward_model/reward_norm/gain"]))
        rm.bias.fill_(float(v["reward_model/reward_norm/bias"]))
    return rm


def t(x):
    x = np.asarray(x)
    return torch.as_tensor(x.astype(np.int64) if x.dtype.kind in "iu" else x)


@pytest.mark.parametrize("length", [1, 6, 10])
def test_greedy_sampling_matches_original(length):
    d = np.load(REF / "sample_greedy.npz")
    policy = make_policy(d, "var/", "policy")
    out = policy.respond(t(d["in/queries"]), length, greedy=True)
    np.testing.assert_array_equal(out["responses"].numpy(), d[f"out/len{length}/responses"])
    np.testing.assert_allclose(out["logprobs"].numpy(), d[f"out/len{length}/logprobs"], atol=2e-5, rtol=0)
    np.testing.assert_allclose(out["values"].numpy(), d[f"out/len{length}/values"], atol=2e-5, rtol=0)
    with torch.no_grad():
        analyzed = policy(t(d["in/queries"]), out["responses"])
    for key in ("logprobs", "entropies", "values"):
        np.testing.assert_allclose(analyzed[key].numpy(), d[f"out/len{length}/analyze/{key}"], atol=2e-5, rtol=0)


def test_sampled_logprobs_equal_teacher_forced():
    d = np.load(REF / "sample_greedy.npz")
    policy = make_policy(d, "var/", "policy", temperature=0.8)
    gen = torch.Generator().manual_seed(0)
    queries = t(d["in/queries"])  # right-padded rows included
    out = policy.respond(queries, 12, generator=gen)
    with torch.no_grad():
        analyzed = policy(queries, out["responses"])
    torch.testing.assert_close(out["logprobs"], analyzed["logprobs"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["values"], analyzed["values"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("scope", ["policy", "ref_policy"])
def test_teacher_forced_pass_matches_original(rl, scope):
    policy = make_policy(rl, "init/var/", scope)
    with torch.no_grad():
        out = policy(t(rl["step0/queries"]), t(rl["step0/respond/responses"]))
    for key in ("logprobs", "entropies", "values"):
        np.testing.assert_allclose(out[key].numpy(), rl[f"step0/init_analyze/{scope}/{key}"], atol=2e-5, rtol=0)


def test_scores_match_original(rl):
    rm = make_reward_model(rl, "init/var/")
    responses = t(rl["step0/respond/responses"])
    post = postprocess_responses(responses, 46, 2, PAD)
    np.testing.assert_array_equal(post.numpy(), rl["step0/postprocessed_responses"])
    with torch.no_grad():
        raw = rm(t(rl["step0/queries"]), post)
    np.testing.assert_allclose(raw.numpy(), rl["step0/unpenalized_scores"], atol=2e-5, rtol=1e-4)
    scores = penalized_scores(raw, responses_valid(post, 46, 2), -1)
    np.testing.assert_allclose(scores.numpy(), rl["step0/scores"], atol=2e-5, rtol=1e-4)


def ppo_hp(rl):
    h = json.loads(str(rl["meta_json"]))["rl_hparams"]["ppo"]
    hp = PpoHParams()
    for k, v in h.items():
        setattr(hp, k, v)
    return hp


@pytest.mark.parametrize("case", ["loss_base", "loss_perturbed"])
def test_ppo_loss_and_grads_match_original(rl, case):
    policy = make_policy(rl, "init/var/", "policy")
    hp = ppo_hp(rl)
    inp = {k: t(rl[f"{case}/in/{k}"]) for k in ("queries", "responses", "values", "logprobs", "rewards")}
    adv = ppo.compute_advantages(inp["values"], inp["rewards"], hp.gamma, hp.lam, hp.whiten_rewards)
    new = policy(inp["queries"], inp["responses"])
    loss, stats = ppo.ppo_loss(new["logprobs"], new["values"], new["entropies"], inp["logprobs"], inp["values"],
                               adv.advantages, adv.returns, hp.cliprange, hp.cliprange_value, hp.vf_coef)
    loss.backward()
    np.testing.assert_allclose(loss.item(), rl[f"{case}/out/loss"], rtol=1e-4, atol=1e-6)
    for key in ppo.PPO_STAT_KEYS:
        tol = 1 / 96 if "clipfrac" in key else 1e-6
        np.testing.assert_allclose(stats[key].item(), rl[f"{case}/out/stats/{key}"], rtol=1e-4, atol=tol, err_msg=key)
    for ours, theirs in [(adv.advantages, "advantages_whitened"), (adv.returns, "returns"),
                         (adv.advantages_raw, "advantages_raw"), (adv.rewards, "rewards_whitened")]:
        np.testing.assert_allclose(ours.detach().numpy(), rl[f"{case}/out/{theirs}"], rtol=1e-4, atol=1e-6)
    grads = tf_to_state_dict(tf_vars(rl, f"{case}/grad/"), 2, scope="policy/model", heads=["value"])
    named = dict(policy.model.named_parameters())
    for name, g in grads.items():
        np.testing.assert_allclose(named[name].grad.numpy(), g.numpy(), rtol=1e-3, atol=1e-6, err_msg=name)


def test_ppo_steps_replayed_match_original(rl):
    """Both recorded PPO steps, replayed with the recorded rollouts and permutations through our training code."""
    policy = make_policy(rl, "init/var/", "policy")
    hp = ppo_hp(rl)
    init = {k: v.clone() for k, v in policy.model.state_dict().items()}
    optimizer = TFAdam(policy.parameters(), lr=hp.lr, eps=1e-5)
    nupdates = hp.total_episodes // hp.batch_size
    for step in range(2):
        before = {k: v.clone() for k, v in policy.model.state_dict().items()}
        rollouts = {"queries": t(rl[f"step{step}/queries"]), "responses": t(rl[f"step{step}/respond/responses"]),
                    "logprobs": t(rl[f"step{step}/respond/logprobs"]), "values": t(rl[f"step{step}/respond/values"]),
                    "rewards": t(rl[f"step{step}/rewards"])}
        orders = [t(p) for p in rl[f"step{step}/permutations"]]
        stats = ppo_train(policy, optimizer, rollouts, orders, ppo_hp=hp, lr=hp.lr * (1 - step / nupdates),
                          nminibatches=hp.nminibatches, n_groups=1, micro_batch=None, device=torch.device("cpu"),
                          precision="fp32")
        for key in ppo.PPO_STAT_KEYS:
            ours = np.array([float(s[key]) for s in stats])
            tol = 1 / 48 if "clipfrac" in key else 1e-5
            np.testing.assert_allclose(ours, rl[f"step{step}/train_stats/{key}"], rtol=2e-3, atol=tol, err_msg=key)
        after = tf_to_state_dict(tf_vars(rl, f"step{step}/after/var/"), 2, scope="policy/model", heads=["value"])
        ref_before = init if step == 0 else tf_to_state_dict(tf_vars(rl, "step0/after/var/"), 2,
                                                              scope="policy/model", heads=["value"])
        now = policy.model.state_dict()
        for name in after:
            np.testing.assert_allclose((now[name] - before[name]).numpy(), (after[name] - ref_before[name]).numpy(),
                                       rtol=2e-3, atol=1e-7, err_msg=f"step {step}: {name}")


def test_micro_batching_leaves_the_update_unchanged(rl):
    hp = ppo_hp(rl)
    rollouts = {"queries": t(rl["step0/queries"]), "responses": t(rl["step0/respond/responses"]),
                "logprobs": t(rl["step0/respond/logprobs"]), "values": t(rl["step0/respond/values"]),
                "rewards": t(rl["step0/rewards"])}
    results = []
    for micro in (None, 3):
        policy = make_policy(rl, "init/var/", "policy")
        opt = TFAdam(policy.parameters(), lr=hp.lr, eps=1e-5)
        stats = ppo_minibatch(policy, opt, rollouts, ppo_hp=hp, lr=hp.lr, n_groups=2, micro_batch=micro,
                              device=torch.device("cpu"), precision="fp32")
        results.append((stats, policy.model.state_dict()))
    for k in results[0][0]:
        torch.testing.assert_close(results[1][0][k], results[0][0][k], atol=1e-5, rtol=1e-4)
    for k in results[0][1]:
        torch.testing.assert_close(results[1][1][k], results[0][1][k], atol=1e-6, rtol=1e-4)


def test_lr_zero_first_minibatch_has_ratio_one(rl):
    """With logprobs recomputed by the training forward itself, ratio is exactly 1, approxkl 0 and clipfrac 0."""
    policy = make_policy(rl, "init/var/", "policy")
    hp = ppo_hp(rl)
    q, r = t(rl["step0/queries"]), t(rl["step0/respond/responses"])
    with torch.no_grad():
        old = policy(q, r)
    rollouts = {"queries": q, "responses": r, "logprobs": old["logprobs"], "values": old["values"],
                "rewards": t(rl["step0/rewards"])}
    opt = TFAdam(policy.parameters(), lr=0.0, eps=1e-5)
    stats = ppo_minibatch(policy, opt, rollouts, ppo_hp=hp, lr=0.0, n_groups=1, micro_batch=None,
                          device=torch.device("cpu"), precision="fp32")
    assert stats["policy/approxkl"].item() == 0.0
    assert stats["policy/clipfrac"].item() == 0.0
    assert stats["val/clipfrac"].item() == 0.0
