"""demo/profiles.py: both profiles build valid settings for the real training code."""
import pytest

from lm_human_preferences.demo.profiles import PROFILES, DemoPaths, policy_hparams, reward_hparams


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profiles_build_valid_training_hparams(profile, tmp_path):
    paths = DemoPaths(work=tmp_path / "w", out=tmp_path / "o")
    p = PROFILES[profile]
    reward = reward_hparams(p, paths, "cpu")
    policy = policy_hparams(p, paths, "cpu")
    reward.check_world_size(1)
    policy.check_world_size(1)
    assert reward.task.to_nested_dict() == policy.task.to_nested_dict()
    assert reward.labels.num_train == (p.num_labels - p.num_heldout) * p.rm_epochs
    assert reward.labels.num_train % reward.batch_size == 0 and 0 < p.num_heldout < p.num_labels
    assert p.query_length + p.response_length <= p.pretrain.n_ctx
    assert policy.rewards.adaptive_kl is not None and reward.normalize_before and reward.normalize_after
