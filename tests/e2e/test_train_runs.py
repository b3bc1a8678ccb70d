"""End-to-end training on the tiny `test` experiment: the original's smoke tests (ORIGINAL §12) plus real checks
(outputs load, parameters change, numbers stay finite)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import params
from lm_human_preferences import train_policy, train_reward
from lm_human_preferences.runs import load_reward_model
from lm_human_preferences.utils import ckpt
from lm_human_preferences.utils.dist import DistInfo
from lm_human_preferences.utils.logging import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def reward_hp(tmp_path, **overrides):
    return params.get_hparams("train_reward", "test", {"run.save_dir": str(tmp_path / "rm"), **overrides})


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("reward")
    r = subprocess.run([sys.executable, str(ROOT / "launch.py"), "train_reward", "test", "rm", "--save_dir", str(d)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "rm" / "reward_model"


def test_train_reward_subprocess_writes_loadable_model(reward_dir):
    rm = load_reward_model(str(reward_dir), n_vocab=27, padding_token=27)
    assert rm.gain.item() != 1.0 and rm.bias.item() != 0.0  # normalize_after set them
    run_dir = reward_dir.parent
    assert json.loads((reward_dir / "encoding").read_text()) == "test"
    saved = json.loads((run_dir / "train_reward_hparams.json").read_text())
    assert saved["labels"]["num_train"] == 16
    rows = read_metrics(run_dir / "train_reward_metrics.jsonl")
    keys = set().union(*rows)
    assert {"train_reward/minibatch/loss", "train_reward/minibatch/error", "train_reward/heldout/accuracy",
            "train_reward/normalize_after/std"} <= keys


@pytest.mark.parametrize("overrides", [
    # the 'test' labels are all zeros: their target scale has no spread, so (as in the original's tests) no
    # normalize_before for the scalar types
    {"labels.type": "scalar_compare", "normalize_before": "false"},
    {"labels.type": "scalar_rating", "normalize_before": "false"},
    {"normalize_before": "false", "normalize_after": "false"},
    {"normalize_samples": "16", "debug_normalize": "16"},
    {"run.train_micro_batch": "3", "run.rollout_micro_batch": "3"},
], ids=["scalar_compare", "scalar_rating", "no_normalize", "debug_normalize", "micro_batches"])
def test_reward_variants(tmp_path, overrides):
    out = train_reward.train(reward_hp(tmp_path, **overrides))
    assert (out / "model.safetensors").is_file()


def policy_hp(tmp_path, reward_dir, **overrides):
    base = {"run.save_dir": str(tmp_path / "pol"), "rewards.train_new_model": "off",
            "rewards.trained_model": str(reward_dir)}
    return params.get_hparams("train_policy", "test", {**base, **overrides})


def first_and_last_policy(monkeypatch):
    """Records the policy weights before the first update and the trainer."""
    seen = {}
    step = train_policy.PPOTrainer.step

    def recording_step(self):
        if "before" not in seen:
            seen["before"] = {k: v.clone() for k, v in self.policy.model.state_dict().items()}
        seen["trainer"] = self
        return step(self)

    monkeypatch.setattr(train_policy.PPOTrainer, "step", recording_step)
    return seen


def test_policy_parameters_change_and_checkpoint_loads(tmp_path, reward_dir, monkeypatch):
    seen = first_and_last_policy(monkeypatch)
    train_policy.train(policy_hp(tmp_path, reward_dir))
    after = seen["trainer"].policy.model.state_dict()
    changed = [k for k in after if not torch.equal(after[k], seen["before"][k])]
    assert "heads.value.w" in changed and "h.0.attn.c_attn.weight" in changed and "wte.weight" in changed
    latest = ckpt.latest_checkpoint(tmp_path / "pol" / "policy" / "checkpoints")
    assert latest.name == "step-00000002"
    saved = ckpt.load_tensors(latest / "model.safetensors")
    assert all(torch.equal(saved[k], after[k]) for k in after)
    rows = read_metrics(tmp_path / "pol" / "train_policy_metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    for key in ("objective/kl", "objective/kl_coef", "objective/entropy", "objective/score", "objective/score_total",
                "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/policy/entropy", "ppo/policy/approxkl",
                "ppo/policy/clipfrac", "ppo/returns/mean", "ppo/returns/var", "ppo/val/vpred", "ppo/val/error",
                "ppo/val/clipfrac", "ppo/val/mean", "ppo/val/var", "ppo/val/var_explained", "elapsed/updates",
                "elapsed/episodes", "elapsed/fps", "elapsed/time"):
        assert key in rows[-1], key
    assert rows[0]["objective/kl_coef"] == pytest.approx(0.2) and rows[1]["objective/kl_coef"] != pytest.approx(0.2)  # adaptive, after step 0


@pytest.mark.parametrize("overrides", [
    {"task.truncate_token": "13", "task.truncate_after": "2"},
    {"task.query_prefix": "a", "task.query_suffix": "b", "task.query_length": "2"},  # the test model has n_ctx 8
    {"rewards.adaptive_kl": "off"},
    {"ppo.nminibatches": "2", "ppo.batch_size": "16", "ppo.total_episodes": "32", "ppo.whiten_rewards": "false"},
    {"run.train_micro_batch": "3", "run.rollout_micro_batch": "5"},
    {"virtual_ranks": "2", "ppo.batch_size": "16", "ppo.total_episodes": "32"},
], ids=["truncation", "affixing", "fixed_kl", "minibatches", "micro_batches", "virtual_ranks"])
def test_policy_variants(tmp_path, reward_dir, overrides):
    train_policy.train(policy_hp(tmp_path, reward_dir, **overrides))
    rows = read_metrics(tmp_path / "pol" / "train_policy_metrics.jsonl")
    assert len(rows) == 2 and all(isinstance(v, (int, float)) for v in rows[-1].values())


def test_fixed_kl_never_moves(tmp_path, reward_dir):
    train_policy.train(policy_hp(tmp_path, reward_dir, **{"rewards.adaptive_kl": "off", "rewards.kl_coef": "0.3",
                                                          "ppo.total_episodes": "24"}))
    rows = read_metrics(tmp_path / "pol" / "train_policy_metrics.jsonl")
    assert [r["objective/kl_coef"] for r in rows] == pytest.approx([0.3, 0.3, 0.3])


def test_chained_reward_training(tmp_path):
    hp = params.get_hparams("train_policy", "test", {"run.save_dir": str(tmp_path / "both")})
    train_policy.train(hp)
    assert (tmp_path / "both" / "reward_model" / "model.safetensors").is_file()
    assert ckpt.latest_checkpoint(tmp_path / "both" / "policy" / "checkpoints") is not None


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_bf16_training_keeps_the_frozen_models_linears_in_bf16(precision):
    """Under bf16 the reference policy and the reward model keep their block Linears in bf16 (the same outputs under
    autocast, half the memory); the trained policy keeps float32 weights for the optimizer; fp32 changes nothing."""
    hp = params.get_hparams("train_policy", "test", {"run.precision": precision, "rewards.train_new_model": "off",
                                                     "rewards.trained_model": "test"})
    trainer = train_policy.build_trainer(hp, DistInfo(), "test")
    frozen = torch.bfloat16 if precision == "bf16" else torch.float32
    for model in (trainer.ref_policy.model, trainer.score_model.model):
        assert model.h[0].attn.c_attn.weight.dtype == frozen and model.h[0].mlp.c_proj.weight.dtype == frozen
        assert model.wte.weight.dtype == torch.float32  # the tied float32 LM head
    assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())
    queries = torch.as_tensor(trainer.sampler.next_batch())
    data = trainer.rollout(queries)  # the frozen models run (under autocast) without complaint
    assert torch.isfinite(data["scores"]).all() and torch.isfinite(data["ref_logprobs"]).all()
