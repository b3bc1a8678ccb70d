"""`launch.py demo --online`: the online variant's settings (no demo run): the same training label budget and PPO
episodes as the offline demo, the reward model retrained on VADER's answers with the same epochs, its own
directories and cache keys."""
from dataclasses import replace

import pytest
import torch

from lm_human_preferences import online
from lm_human_preferences.demo import stages
from lm_human_preferences.demo.profiles import PROFILES, DemoPaths, policy_hparams, reward_hparams, stage_config
from tests.demo.test_stages import fake_stages


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_online_variant_settings(name, tmp_path):
    offline_p = PROFILES[name]
    online_p = replace(offline_p, online_rounds=4)
    offline_paths = DemoPaths(work=tmp_path / "w", out=tmp_path / "o")
    online_paths = DemoPaths(work=tmp_path / "w", out=tmp_path / "o" / "online", rlhf=tmp_path / "w" / "online")
    off, on = policy_hparams(offline_p, offline_paths, "cpu"), policy_hparams(online_p, online_paths, "cpu")
    on.check_world_size(1)

    assert off.online is None and off.rewards.trained_model is not None
    assert on.online is not None and on.rewards.trained_model is None and on.rewards.train_new_model is not None
    assert on.online.labeler == "vader" and on.online.rounds == 4 and on.online.quota == 1.0
    # the same PPO run
    assert on.ppo.to_nested_dict() == off.ppo.to_nested_dict() and on.ppo.nupdates == off.ppo.nupdates
    assert on.rewards.kl_coef == off.rewards.kl_coef and on.task.to_nested_dict() == off.task.to_nested_dict()
    assert len(online.schedule(on.ppo.nupdates, on.online.rounds)) == 4
    # the same training label budget: half from the initial policy, the rest in 4 equal rounds
    budget = offline_p.num_labels - offline_p.num_heldout
    assert online_p.initial_comparisons == budget // 2
    assert online_p.initial_comparisons + on.online.rounds * on.online.comparisons == budget
    assert online_p.heldout_comparisons == 0 and offline_p.heldout_comparisons == offline_p.num_heldout
    # the same epochs: initial records written rm_epochs times, each store answer rm_epochs times per retraining
    rm = on.rewards.train_new_model
    assert on.online.epochs == offline_p.rm_epochs
    assert rm.labels.num_train == online_p.initial_comparisons * offline_p.rm_epochs
    assert rm.labels.num_train + on.online.rounds * on.online.comparisons * on.online.epochs == \
        reward_hparams(offline_p, offline_paths, "cpu").labels.num_train
    assert rm.labels.source == str(online_paths.labels)
    rm_off = reward_hparams(offline_p, offline_paths, "cpu").to_nested_dict()
    rm_on = rm.to_nested_dict()
    for key in ("lr", "batch_size", "normalize_before", "normalize_after", "normalize_samples", "task"):
        assert rm_on[key] == rm_off[key], key
    # own directories and cache keys
    assert online_paths.run.path != offline_paths.run.path and online_paths.labels != offline_paths.labels
    assert online_paths.evaluation != offline_paths.evaluation
    assert online_paths.final_reward_model(online_p).parent.name == "round-004"
    for stage in stages.RLHF_STAGES:
        assert stage_config(stage, online_p, tmp_path) != stage_config(stage, offline_p, tmp_path)
    for stage in ("corpus", "pretrain"):  # shared with the offline demo
        assert stage_config(stage, online_p, tmp_path) == stage_config(stage, offline_p, tmp_path)
    markers = stages.stage_markers(online_paths)
    assert markers.path("pretrain").parent.parent == tmp_path / "w"
    assert markers.path("policy").parent.parent == tmp_path / "w" / "online"


def test_offline_and_online_stages_share_the_pretraining_and_keep_their_own_results(tmp_path, monkeypatch):
    def context(variant_online):
        profile = replace(PROFILES["fast"], online_rounds=4) if variant_online else PROFILES["fast"]
        paths = DemoPaths(work=tmp_path / "w", out=tmp_path / "o",
                          rlhf=tmp_path / "w" / "online" if variant_online else None)
        return stages.DemoContext(profile=profile, paths=paths, corpus_dir=tmp_path, device=torch.device("cpu"),
                                  log=lambda _: None)

    calls = []
    fake_stages(monkeypatch, calls)
    stages.run_stages(context(False))
    assert calls == list(stages.STAGES)
    calls.clear()
    stages.run_stages(context(True))
    assert calls == list(stages.RLHF_STAGES)  # the corpus and the pretrained model are the offline demo's
    calls.clear()
    stages.run_stages(context(False))
    stages.run_stages(context(True))
    assert calls == []  # neither variant overwrote the other's results
