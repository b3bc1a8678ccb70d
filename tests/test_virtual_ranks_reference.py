"""The semantics of virtual ranks (ORIGINAL §10.2-10.3, §11), checked against a re-computation by hand: one PPO update
of PPOTrainer hosting V virtual ranks in one process equals V separate ranks doing the original's rank-local math
(their own permutations, whitening, GAE and losses) with their gradients averaged, and each virtual rank's whitening
group is its own rows in every epoch."""
import copy

import pytest
import torch

import params
from lm_human_preferences import ppo, runs, train_policy
from lm_human_preferences.language.encodings import get_encoding
from lm_human_preferences.language.model import GPT2, GPT2Config
from lm_human_preferences.rewards import RewardModel
from lm_human_preferences.utils.dist import DistInfo
from lm_human_preferences.utils.optim import TFAdam
from lm_human_preferences.utils.training import VirtualRanks

V, BATCH, NMINIBATCHES, NOPTEPOCHS = 4, 32, 2, 3  # 8 rows per virtual rank, minibatches of 4 of them
CONFIG = GPT2Config(n_vocab=27, n_ctx=16, n_embd=16, n_head=2, n_layer=2)


def make_trainer(seed=3, micro_batch=None):
    """A PPOTrainer on one process hosting V virtual ranks, on a tiny random policy (no files)."""
    hp = params.get_hparams("train_policy", "test", {
        "virtual_ranks": str(V), "ppo.batch_size": str(BATCH), "ppo.nminibatches": str(NMINIBATCHES),
        "ppo.noptepochs": str(NOPTEPOCHS), "ppo.lr": "3e-3", "ppo.whiten_rewards": "false", "run.seed": str(seed),
        "run.train_micro_batch": str(micro_batch)})
    hp.ppo.whiten_rewards = True  # whitening over 4 rows: fewer than the original allows, but the math is the same
    enc = get_encoding("test")
    torch.manual_seed(0)
    model = GPT2(CONFIG, ["value"])
    with torch.no_grad():  # a value head that is not zero, so the value loss has a gradient from the start
        model.heads["value"].w.normal_(0, 0.3)
    policy = runs.make_policy(model, hp.task, enc, [], [], frozen=False)
    ref_policy = runs.make_policy(copy.deepcopy(model), hp.task, enc, [], [], frozen=True)
    score_model = RewardModel(GPT2(CONFIG, ["reward"]), padding_token=enc.padding_token).requires_grad_(False)
    vranks = VirtualRanks(V, rank=0, world_size=1, seed=seed, device=torch.device("cpu"))
    return train_policy.PPOTrainer(hp, DistInfo(), score_model=score_model, ref_policy=ref_policy, policy=policy,
                                   sampler=None, enc=enc, precision="fp32", vranks=vranks)


def rollout_data(trainer):
    """Queries and a rollout of the trainer's own policy (sampled with its virtual ranks' streams)."""
    g = torch.Generator().manual_seed(1)
    queries = torch.randint(0, CONFIG.n_vocab, (BATCH, trainer.hp.task.query_length), generator=g)
    return queries, trainer.rollout(queries)


def by_hand(trainer, queries, data):
    """The update as V separate ranks of the original compute it: per-token rewards, then for every epoch each rank
    draws its own permutation of its own rows, and for every minibatch each rank whitens, runs GAE and takes the
    loss on its own rows; the Adam step uses the average of the ranks' gradients. Returns (policy, stats)."""
    hp = trainer.hp.ppo
    policy = copy.deepcopy(trainer.policy)
    params_ = [p for p in policy.parameters() if p.requires_grad]
    optimizer = TFAdam(params_, lr=hp.lr, eps=1e-5)
    rngs = [copy.deepcopy(rng) for rng in trainer.vranks.np_rngs]  # the streams the trainer is about to draw from
    rewards, _, _ = ppo.compute_rewards(data["scores"], data["logprobs"], data["ref_logprobs"], trainer.kl_ctl.value)
    b = BATCH // V
    mb = b // NMINIBATCHES
    stats = []
    for _ in range(NOPTEPOCHS):
        perms = [torch.as_tensor(rng.permutation(b)) for rng in rngs]
        for i in range(NMINIBATCHES):
            grads = [torch.zeros_like(p) for p in params_]
            rank_stats = []
            for v in range(V):
                rows = v * b + perms[v][i * mb:(i + 1) * mb]
                adv = ppo.compute_advantages(data["values"][rows], rewards[rows], hp.gamma, hp.lam, hp.whiten_rewards)
                new = policy(queries[rows], data["responses"][rows])
                loss, st = ppo.ppo_loss(new["logprobs"], new["values"], new["entropies"], data["logprobs"][rows],
                                        data["values"][rows], adv.advantages, adv.returns, hp.cliprange,
                                        hp.cliprange_value, hp.vf_coef)
                for total, grad in zip(grads, torch.autograd.grad(loss, params_)):
                    total += grad / V
                rank_stats.append(st)
            for p, grad in zip(params_, grads):
                p.grad = grad
            optimizer.step()
            stats.append({k: torch.stack([st[k] for st in rank_stats]).mean() for k in rank_stats[0]})
    return policy, {f"ppo/{k}": torch.stack([s[k] for s in stats]).mean().item() for k in stats[0]}


@pytest.mark.parametrize("micro_batch", [None, 3])
def test_one_update_equals_virtual_ranks_computed_separately_with_averaged_gradients(micro_batch):
    trainer = make_trainer(micro_batch=micro_batch)
    queries, data = rollout_data(trainer)
    expected_policy, expected_stats = by_hand(trainer, queries, data)
    initial = copy.deepcopy(trainer.policy.state_dict())
    stats = trainer.update(queries, data)

    moved = max((p - initial[k]).abs().max().item() for k, p in trainer.policy.state_dict().items())
    assert moved > 1e-3  # the update is not a no-op, so the comparison below can fail
    for name, expected in expected_policy.state_dict().items():
        torch.testing.assert_close(trainer.policy.state_dict()[name], expected, rtol=1e-4, atol=2e-6, msg=name)
    for key in ppo.PPO_STAT_KEYS:
        assert stats[f"ppo/{key}"] == pytest.approx(expected_stats[f"ppo/{key}"], rel=1e-4, abs=1e-6), key


def test_whiten_over_the_whole_batch_would_differ():
    """The check above can tell virtual ranks apart: one rank's whitening over all rows gives other weights."""
    trainer = make_trainer()
    queries, data = rollout_data(trainer)
    expected_policy, _ = by_hand(trainer, queries, data)
    trainer.vranks = VirtualRanks(1, rank=0, world_size=1, seed=3, device=torch.device("cpu"))
    trainer.rank_batch = BATCH
    trainer.update(queries, data)
    differs = max((trainer.policy.state_dict()[k] - v).abs().max().item()
                  for k, v in expected_policy.state_dict().items())
    assert differs > 1e-3  # measured 2.9e-2, where the two ways above agree to 1.2e-7


def test_each_virtual_rank_whitens_its_own_rows_in_every_epoch(monkeypatch):
    """The minibatches PPO trains on: chunk g of every minibatch is rows of virtual rank g only, each epoch covers
    every row once, and the epochs' orders differ (each rank permutes its own rows anew)."""
    trainer = make_trainer()
    queries, data = rollout_data(trainer)
    seen = {}
    real_ppo_train = train_policy.ppo_train

    def spy(*args, **kwargs):
        seen["orders"], seen["n_groups"] = args[3], kwargs["n_groups"]
        return real_ppo_train(*args, **kwargs)

    monkeypatch.setattr(train_policy, "ppo_train", spy)
    trainer.update(queries, data)
    b, mb = BATCH // V, BATCH // V // NMINIBATCHES
    assert seen["n_groups"] == V and len(seen["orders"]) == NOPTEPOCHS
    for order in seen["orders"]:
        assert sorted(order.tolist()) == list(range(BATCH))
        chunks = order.reshape(NMINIBATCHES, V, mb)
        for g in range(V):
            assert ((chunks[:, g] >= g * b) & (chunks[:, g] < (g + 1) * b)).all()
    assert len({tuple(o.tolist()) for o in seen["orders"]}) == NOPTEPOCHS
