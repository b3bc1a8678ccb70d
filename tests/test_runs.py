"""runs.py: the run directory's layout and checks, and the one rollout-scoring path (on the tiny `test` model)."""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import params
from lm_human_preferences import runs

ROOT = Path(__file__).resolve().parents[1]


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


# ---- run names, --overwrite, the lock -----------------------------------------------------------------------

@pytest.mark.parametrize("name", [".", "./", ".//", "./.", "././", "a/..", "a/../.", "a/../", "..", "../x", "x/../..",
                                  "", " ", "/abs", "link", "link/", "link/x", "self", "self/.", "dot", "./dot/"])
def test_run_name_must_name_a_directory_strictly_under_the_save_dir(tmp_path, name):
    save = tmp_path / "runs"
    (save / "a").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (save / "link").symlink_to(tmp_path / "elsewhere")  # out of the save dir
    (save / "self").symlink_to(save)  # the save dir itself
    (save / "dot").symlink_to(".")
    with pytest.raises(runs.RunError, match="run name|run directory"):
        runs.run_dir_path(str(save), name)
    with pytest.raises(runs.RunError):  # the same through a symlinked, trailing-slashed spelling of the save dir
        (tmp_path / "alias").symlink_to(save)
        runs.run_dir_path(str(tmp_path / "alias") + "/", name)


@pytest.mark.parametrize("name, expected", [("a", "a"), ("a/", "a"), ("./a", "a"), ("a/./b/", "a/b"), ("a//b", "a/b"),
                                            ("inside", "inside")])
def test_run_names_under_the_save_dir_are_kept_normalized(tmp_path, name, expected):
    (tmp_path / "a").mkdir()
    (tmp_path / "inside").symlink_to(tmp_path / "a")  # a symlink that stays under the save dir is fine
    assert runs.run_dir_path(str(tmp_path), name) == os.path.join(str(tmp_path), expected)


def test_check_usable_refuses_paths_that_are_no_run_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(runs.RunError, match="exists but is not a directory"):
        runs.RunDir(tmp_path / "file").check_usable(overwrite=False)
    with pytest.raises(runs.RunError, match="is a file, so the run directory .* cannot be created"):
        runs.RunDir(tmp_path / "file" / "r").check_usable(overwrite=False)
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    with pytest.raises(runs.RunError, match="is a symlink to .*missing, which does not exist"):
        runs.RunDir(tmp_path / "dangling").check_usable(overwrite=False)
    outer = runs.RunDir(tmp_path / "outer")
    outer.write_marker(params.get_hparams("train_reward", "test", {}))
    with pytest.raises(runs.RunError, match="is inside the run directory .*outer"):
        runs.RunDir(tmp_path / "outer" / "a" / "b").check_usable(overwrite=False)


def test_overwrite_accepts_only_a_real_directory_holding_a_run_of_this_project_and_nothing_else(tmp_path):
    run = runs.RunDir(tmp_path / "r")
    run.check_usable(overwrite=True)  # nothing there yet
    run.path.mkdir()
    run.check_usable(overwrite=True)  # empty: nothing to delete
    (run.path / "plots").mkdir()
    with pytest.raises(runs.RunError, match=r"holds no run \(no .lmhp_run marker or hyperparameter file, only plots\)"):
        run.check_usable(overwrite=True)
    run.reward_metrics.write_text("")  # a run from before the marker: recognised by its files
    (run.path / ".train_reward_metrics.jsonl.123-0123abcd.tmp").write_text("")  # an interrupted atomic write
    run.check_usable(overwrite=True)
    run.reward_metrics.unlink()
    run.write_marker(params.get_hparams("train_reward", "test", {}))
    run.check_usable(overwrite=True)
    (run.path / "notes.txt").write_text("mine")
    (run.path / ".notes.txt.1-0123abcd.tmp").write_text("mine")
    with pytest.raises(runs.RunError, match=r"holds what it did not write \(.notes.txt.1-0123abcd.tmp, notes.txt\)"):
        run.check_usable(overwrite=True)
    run.check_usable(overwrite=False)  # training in it deletes nothing
    (tmp_path / "link").symlink_to(run.path)
    with pytest.raises(runs.RunError, match="is a symlink .*--overwrite deletes only a real run directory"):
        runs.RunDir(tmp_path / "link").check_usable(overwrite=True)
    runs.RunDir(tmp_path / "link").check_usable(overwrite=False)


def test_clear_keeps_the_lock_and_follows_no_symlink(tmp_path):
    run = runs.RunDir(tmp_path / "r")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep").write_text("x")
    lock = runs.RunLock.acquire(run)
    run.policy.symlink_to(tmp_path / "outside")
    run.reward_model.mkdir()
    (run.reward_model / "model.safetensors").write_text("")
    run.write_marker(params.get_hparams("train_reward", "test", {}))
    run.clear()
    assert [p.name for p in run.path.iterdir()] == [runs.LOCK_FILE]
    assert (tmp_path / "outside" / "keep").is_file()
    lock.release()


def test_run_lock_is_exclusive_names_its_holder_and_leaves_nothing_behind(tmp_path):
    run = runs.RunDir(tmp_path / "save" / "r")
    lock = runs.RunLock.acquire(run)
    assert run.lock.is_file()
    # flock is per open file: a second acquire conflicts even in this process
    with pytest.raises(runs.RunError, match=rf"run directory .*r is in use by pid {os.getpid()} on host "
                                            rf"{socket.gethostname()} \(since .*\); wait for that run to end"):
        runs.RunLock.acquire(run)
    lock.release()
    assert not run.lock.exists() and run.path.is_dir()
    runs.RunLock.acquire(run).release()  # free again
    (tmp_path / "save2").mkdir()
    runs.RunLock.acquire(runs.RunDir(tmp_path / "save2" / "a" / "r")).release(remove_created=True)
    assert list((tmp_path / "save2").iterdir()) == []  # a run that does not start leaves no directory behind


def test_this_process_keeps_its_lock_on_the_same_directory_and_releases_it_for_another(tmp_path):
    a, b = runs.RunDir(tmp_path / "a"), runs.RunDir(tmp_path / "b")
    try:
        lock, taken = runs.hold_run_lock(a)
        assert taken and runs.hold_run_lock(runs.RunDir(str(tmp_path / "a") + "/")) == (lock, False)
        (tmp_path / "alias").symlink_to(a.path)
        assert runs.hold_run_lock(runs.RunDir(tmp_path / "alias")) == (lock, False)
        _, taken = runs.hold_run_lock(b)
        assert taken and not a.lock.exists()
        runs.RunLock.acquire(a).release()  # free again
    finally:
        runs.release_run_lock()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run = runs.RunDir(tmp_path / "r")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lm_human_preferences import runs; "
                               "lock = runs.RunLock.acquire(runs.RunDir(sys.argv[1])); print('locked', flush=True); "
                               "time.sleep(600)", str(run.path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(runs.RunError, match=f"in use by pid {holder.pid} on host {socket.gethostname()}"):
            runs.RunLock.acquire(run)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert run.lock.exists()  # left behind by the kill, but no longer locked
    runs.RunLock.acquire(run).release()


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
