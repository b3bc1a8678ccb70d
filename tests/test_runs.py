"""runs.py: the run directory's layout and checks, and the one rollout-scoring path (on the tiny `test` model)."""
import pytest
import torch

import params
from lm_human_preferences import runs


def test_run_dir_layout_and_existing_run_check(tmp_path):
    run = runs.RunDir(tmp_path / "r")
    assert run.checkpoints == tmp_path / "r" / "policy" / "checkpoints"
    assert run.reward_model == tmp_path / "r" / "reward_model"
    assert {p.name for p in run.outputs()} >= {"policy", "reward_model", "train_policy_metrics.jsonl",
                                               "train_reward_hparams.json"}
    run.check_new_or(resume=False, overwrite=False)  # nothing there yet
    run.reward_metrics.parent.mkdir(parents=True)
    run.reward_metrics.write_text("")
    with pytest.raises(FileExistsError, match=r"already holds a run \(train_reward_metrics.jsonl\); rerun with "
                                              r"--resume"):
        run.check_new_or(resume=False, overwrite=False)
    run.check_new_or(resume=True, overwrite=False)
    run.check_new_or(resume=False, overwrite=True)
    assert not run.reward_model_complete()


@pytest.mark.parametrize("micro_batch", [None, 3])
def test_rollout_scores_postprocessed_responses_with_the_penalty(micro_batch):
    hp = params.get_hparams("train_policy", "test", {"task.truncate_token": "13", "task.truncate_after": "2",
                                                     "task.penalty_reward_value": "-5"})
    task = hp.task
    enc, prefix, suffix = runs.task_encodings(task)
    torch.manual_seed(0)
    policy = runs.build_policy(task, enc, prefix, suffix, "cpu", frozen=True)
    ref_policy = runs.build_policy(task, enc, prefix, suffix, "cpu", frozen=True)
    score_model = runs.load_reward_model("test", n_vocab=enc.n_vocab, padding_token=enc.padding_token)
    queries = torch.randint(0, enc.n_vocab, (7, task.query_length))
    out = runs.rollout(policy, queries, task, enc.padding_token, generator=torch.Generator().manual_seed(1),
                       precision="fp32", ref_policy=ref_policy, score_model=score_model, micro_batch=micro_batch)
    T = task.response_length
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "responses": (7, T), "logprobs": (7, T), "values": (7, T), "ref_logprobs": (7, T), "postprocessed": (7, T),
        "raw_scores": (7,), "scores": (7,)}
    # the reference policy has other weights but scores the same responses; the policy's own logprobs match
    torch.testing.assert_close(policy(queries, out["responses"], with_entropy=False)["logprobs"], out["logprobs"],
                               rtol=1e-5, atol=1e-5)
    valid = (out["postprocessed"][:, 2:] == 13).any(dim=1)
    torch.testing.assert_close(out["scores"], torch.where(valid, out["raw_scores"], torch.tensor(-5.0)))
    torch.testing.assert_close(out["raw_scores"], score_model(queries, out["postprocessed"]))
    assert not (out["postprocessed"] == enc.padding_token).all()  # something was sampled


def test_rollout_without_models_only_samples():
    hp = params.get_hparams("train_policy", "test", {})
    enc, prefix, suffix = runs.task_encodings(hp.task)
    policy = runs.build_policy(hp.task, enc, prefix, suffix, "cpu", frozen=True)
    out = runs.rollout(policy, torch.zeros(2, hp.task.query_length, dtype=torch.long), hp.task, enc.padding_token,
                       generator=torch.Generator().manual_seed(0), precision="fp32")
    assert set(out) == {"responses", "logprobs", "values", "postprocessed"}
