"""Failures during a run: a rank that raises, a non-finite number, a full disk while checkpointing, a checkpoint
that would unpickle code, and reruns that must not overwrite a run. Each must stop loudly with a clear message,
a non-zero status and the last good checkpoint intact."""
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import launch  # noqa: E402
import params  # noqa: E402
from lm_human_preferences import train_policy, train_reward  # noqa: E402
from lm_human_preferences.utils import ckpt  # noqa: E402

N_UPDATES = 4

# LMHP_TEST_HOOK=raise_at_update:<update>:<rank>:<stamp file>: that rank raises in PPO update <update> (after
# writing the time to <stamp file>); put on PYTHONPATH as sitecustomize.py, so production code has no hook.
SITECUSTOMIZE = '''
import os, time
_hook = os.environ.get("LMHP_TEST_HOOK", "")
if _hook.startswith("raise_at_update:"):
    _, _update, _rank, _stamp = _hook.split(":", 3)
    if os.environ.get("RANK", "0") == _rank:
        from lm_human_preferences import ppo as _ppo
        _compute_rewards, _calls = _ppo.compute_rewards, [0]

        def _faulty_compute_rewards(*args, **kwargs):
            if _calls[0] == int(_update):
                with open(_stamp, "w") as f:
                    f.write(repr(time.time()))
                raise RuntimeError(f"injected fault in update {_update} on rank {_rank}")
            _calls[0] += 1
            return _compute_rewards(*args, **kwargs)

        _ppo.compute_rewards = _faulty_compute_rewards
'''


def policy_args(name, save_dir, reward_dir, nproc=1):
    """train_policy on the test experiment: N_UPDATES updates of 8 episodes per rank, a checkpoint after each."""
    batch = 8 * nproc
    return ["train_policy", "test", name, "--save_dir", str(save_dir), "--rewards.train_new_model", "off",
            "--rewards.trained_model", str(reward_dir), "--ppo.batch_size", str(batch),
            "--ppo.total_episodes", str(batch * N_UPDATES), "--run.save_interval", "1", "--virtual_ranks", str(nproc)]


def snapshot(directory):
    """{relative path: (sha256, mtime_ns)} of every file under `directory`."""
    out = {}
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            out[str(path.relative_to(directory))] = (hashlib.sha256(path.read_bytes()).hexdigest(),
                                                     path.stat().st_mtime_ns)
    return out


def weights(checkpoint):
    return load_file(str(checkpoint / "model.safetensors"))


def processes_mentioning(text):
    """Pids of live processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("reward") / "rm"
    train_reward.train(params.get_hparams("train_reward", "test", {"run.save_dir": str(save_dir),
                                                                   "run.wandb": "disabled"}))
    return save_dir / "reward_model"


@pytest.fixture(scope="module")
def straight(tmp_path_factory, reward_dir):
    tmp = tmp_path_factory.mktemp("straight")
    assert launch.main(policy_args("run", tmp, reward_dir)) == 0
    return tmp / "run"


# ---- a rank raises -----------------------------------------------------------------------------------------

def test_a_rank_that_raises_stops_every_rank(tmp_path, reward_dir):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    stamp = tmp_path / "raised_at"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hooks), str(ROOT)]), WANDB_MODE="disabled",
               LMHP_TEST_HOOK=f"raise_at_update:1:1:{stamp}")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "launch.py"), *policy_args("run", tmp_path, reward_dir, 2)],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    ended = time.time()
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "RuntimeError: injected fault in update 1 on rank 1" in output
    assert ended - float(stamp.read_text()) < 60, "the other rank was not stopped within a bounded time"
    assert processes_mentioning(str(tmp_path)) == []  # no rank left behind
    root = tmp_path / "run" / "policy" / "checkpoints"
    assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step-00000001"]  # update 0's, still loadable
    assert set(weights(root / "step-00000001")) and not list(root.glob("*.tmp"))


# ---- non-finite numbers ------------------------------------------------------------------------------------

def test_nonfinite_statistic_names_update_and_statistic_and_keeps_checkpoint(tmp_path, reward_dir, monkeypatch,
                                                                             capsys):
    real = train_policy.PPOTrainer.rollout

    def nan_scores_in_update_2(self, queries):
        data = real(self, queries)
        if self.global_step == 2:
            data["scores"] = data["scores"] * float("nan")
        return data

    monkeypatch.setattr(train_policy.PPOTrainer, "rollout", nan_scores_in_update_2)
    assert launch.main(policy_args("run", tmp_path, reward_dir)) == 1
    err = capsys.readouterr().err
    match = re.search(r"^error: PPO update 2: statistic (\S+) = nan is not finite; the run stopped and the last "
                      r"good checkpoint is kept", err, re.M)
    assert match, err[-2000:]
    assert match.group(1).startswith(("objective/", "ppo/")) and "Traceback" not in err
    root = tmp_path / "run" / "policy" / "checkpoints"
    assert ckpt.latest_checkpoint(root).name == "step-00000002"
    assert all(torch.isfinite(t).all() for t in weights(root / "step-00000002").values())
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_policy_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]  # the bad update is not logged either


def test_nonfinite_parameter_is_named(tmp_path, reward_dir, monkeypatch, capsys):
    """Statistics computed before the last optimizer step can be finite while the step itself blew up."""
    real, calls = train_policy.ppo_train, []

    def blow_up_in_update_1(ddp_policy, *args, **kwargs):
        stats = real(ddp_policy, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                ddp_policy.model.heads["value"].b.fill_(float("inf"))
        return stats

    monkeypatch.setattr(train_policy, "ppo_train", blow_up_in_update_1)
    assert launch.main(policy_args("run", tmp_path, reward_dir)) == 1
    err = capsys.readouterr().err
    assert ("error: PPO update 1: parameter model.heads.value.b is not finite after the optimizer step; the run "
            "stopped and the last good checkpoint is kept") in err
    assert ckpt.latest_checkpoint(tmp_path / "run" / "policy" / "checkpoints").name == "step-00000001"


# ---- a full disk -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["file", "commit"])
def test_failed_save_keeps_previous_checkpoint_and_resume_is_exact(tmp_path, reward_dir, straight, monkeypatch,
                                                                   capsys, where):
    real = os.replace

    def disk_full_at_step_3(src, dst, *args, **kwargs):
        hit = (Path(src).parent.name == "step-00000003.tmp") if where == "file" else Path(dst).name == "step-00000003"
        if hit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", disk_full_at_step_3)
    args = policy_args("run", tmp_path, reward_dir)
    assert launch.main(args) == 1
    err = capsys.readouterr().err
    root = tmp_path / "run" / "policy" / "checkpoints"
    assert (f"error: could not write checkpoint step-00000003 under {root} ([Errno 28] No space left on device); the "
            f"previous checkpoint {root / 'step-00000002'} is intact. Free disk space (or fix the directory) and "
            f"rerun the same command with --resume") in err
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001", "step-00000002"]  # no half checkpoint

    monkeypatch.setattr(os, "replace", real)
    assert launch.main([*args, "--resume"]) == 0
    final = ckpt.latest_checkpoint(root)
    expected = weights(ckpt.latest_checkpoint(straight / "policy" / "checkpoints"))
    assert final.name == f"step-{N_UPDATES:08d}"
    assert all(torch.equal(weights(final)[k], v) for k, v in expected.items())


# ---- safety ------------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_optimizer_pickle_is_refused(tmp_path, reward_dir, straight, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    latest = ckpt.latest_checkpoint(run_dir / "policy" / "checkpoints")
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "step_count": _Payload(marker)}, latest / "optimizer.pt")
    before = snapshot(run_dir)
    status = launch.main([*policy_args("run", tmp_path, reward_dir), "--resume"])
    err = capsys.readouterr().err
    assert status == 2
    assert f"error: refusing to load {latest / 'optimizer.pt'}: it holds objects other than tensors" in err
    assert not marker.exists()
    assert snapshot(run_dir) == before


def test_torch_load_safe_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save(_Payload(marker), tmp_path / "x.pt")
    with pytest.raises(ValueError, match="refusing to load"):
        ckpt.torch_load_safe(tmp_path / "x.pt")
    assert not marker.exists()


def test_train_reward_does_not_overwrite_without_resume_or_overwrite(tmp_path, capsys):
    args = ["train_reward", "test", "rm", "--save_dir", str(tmp_path), "--run.wandb", "disabled"]
    assert launch.main(args) == 0
    before = snapshot(tmp_path / "rm")
    n_records = len((tmp_path / "rm" / "train_reward_metrics.jsonl").read_text().splitlines())
    capsys.readouterr()
    assert launch.main(args) == 2
    assert (f"error: run directory {tmp_path / 'rm'} already holds a run (reward_model, train_reward_metrics.jsonl, "
            f"train_reward_hparams.json); rerun with --resume to continue it, --overwrite to delete it and start "
            f"over") in capsys.readouterr().err
    assert snapshot(tmp_path / "rm") == before
    assert launch.main([*args, "--resume"]) == 0
    assert "reward model already trained" in capsys.readouterr().out
    assert snapshot(tmp_path / "rm") == before

    (tmp_path / "rm" / "notes.txt").write_text("mine")
    assert launch.main([*args, "--overwrite"]) == 2  # --overwrite deletes only what this project wrote
    assert "(notes.txt)" in capsys.readouterr().err
    (tmp_path / "rm" / "notes.txt").unlink()
    assert launch.main([*args, "--overwrite"]) == 0
    after = snapshot(tmp_path / "rm")
    assert sorted(after) == sorted(before)  # the directory was deleted and written again
    assert after["reward_model/model.safetensors"][1] != before["reward_model/model.safetensors"][1]
    assert len((tmp_path / "rm" / "train_reward_metrics.jsonl").read_text().splitlines()) == n_records


def test_train_policy_does_not_overwrite_without_resume_or_overwrite(tmp_path, reward_dir, straight, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    before = snapshot(run_dir)
    assert launch.main(policy_args("run", tmp_path, reward_dir)) == 2
    err = capsys.readouterr().err
    assert f"error: run directory {run_dir} already holds a run (policy, train_policy_metrics.jsonl" in err
    assert "rerun with --resume to continue it, --overwrite to delete it and start over" in err
    assert snapshot(run_dir) == before
    assert launch.main([*policy_args("run", tmp_path, reward_dir), "--resume"]) == 0  # finished: nothing to do
    assert snapshot(run_dir).keys() == before.keys()
    assert all(snapshot(run_dir)[k] == v for k, v in before.items() if "checkpoints" in k)


def test_resume_with_other_hyperparameters_warns(tmp_path, reward_dir, straight, capsys):
    shutil.copytree(straight, tmp_path / "run")
    assert launch.main([*policy_args("run", tmp_path, reward_dir), "--resume", "--ppo.lr", "1e-5",
                        "--run.log_interval", "3"]) == 0
    err = capsys.readouterr().err
    assert ("warning: resuming with hyperparameters that differ from the run's saved ones (ppo.lr); the "
            "continuation is not the run it would have been") in err  # run.* settings do not count
