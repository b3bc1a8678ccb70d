"""Exact resume: a run killed with SIGKILL (or stopped by SIGTERM/SIGINT) and continued with --resume ends with the
same weights, optimizer state, KL coefficient and logged statistics as the same run done in one go - in one
process and under torchrun with 2 ranks (gloo, CPU). Plus the checkpoint/metrics file plumbing on its own.

The runs are the tiny `test` experiment against one reward model trained per module. Test-only behaviour
(pausing at a chosen point, slowing updates down) is injected with a `sitecustomize.py` put on PYTHONPATH, so the
production code has no test hooks.
"""
import hashlib
import json
import os
import shutil
import signal
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
from lm_human_preferences import runs, train_reward  # noqa: E402
from lm_human_preferences.utils import ckpt  # noqa: E402

N_UPDATES = 6
PAUSE_AT = 3  # the SIGKILL lands after update 3 was logged, before its checkpoint: step-3 is the latest
TIMEOUT = 240

# Hooks selected by LMHP_TEST_HOOK (imported by every Python process started with hook_env's PYTHONPATH):
#   pause_after_log:<step>:<marker>  after logging PPO update <step>: append a torn record (as if killed while
#                                    writing), create <marker>, then sleep until killed
#   slow_log:<seconds>               sleep after every logged update, so a signal surely lands mid-run
#   slow_reward_log:<seconds>        the same for every record of reward training
SITECUSTOMIZE = '''
import os, time
_hook = os.environ.get("LMHP_TEST_HOOK", "")
if _hook.startswith(("pause_after_log:", "slow_log:", "slow_reward_log:")):
    from lm_human_preferences.utils import logging as _logging
    _log = _logging.Logger.log

    def _hooked_log(self, stats, step):
        _log(self, stats, step)
        kind, _, arg = _hook.partition(":")
        name = None if self.metrics_path is None else self.metrics_path.name
        if kind == "slow_reward_log":
            if name == "train_reward_metrics.jsonl":
                time.sleep(float(arg))
            return
        if name != "train_policy_metrics.jsonl":
            return
        if kind == "slow_log":
            time.sleep(float(arg))
            return
        at, _, marker = arg.partition(":")
        if step == int(at):
            with open(self.metrics_path, "a") as f:
                f.write('{"step": %d, "objective/kl": 0.12' % (step + 1))
            open(marker, "w").close()
            time.sleep(600)

    _logging.Logger.log = _hooked_log
'''


# ---- helpers -----------------------------------------------------------------------------------------------

def hook_env(tmp_path, hook=None):
    """The environment of a launched run: the repo and (with `hook`) the test hooks importable."""
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hooks), str(ROOT)]), WANDB_MODE="disabled")
    env.pop("LMHP_TEST_HOOK", None)
    if hook:
        env["LMHP_TEST_HOOK"] = hook
    return env


def policy_args(name, save_dir, reward_dir, nproc=1):
    """train_policy on the test experiment: N_UPDATES updates of 8 episodes per rank (one virtual rank per process),
    a checkpoint after each."""
    batch = 8 * nproc
    return ["train_policy", "test", name, "--save_dir", str(save_dir), "--rewards.train_new_model", "off",
            "--rewards.trained_model", str(reward_dir), "--ppo.batch_size", str(batch),
            "--ppo.total_episodes", str(batch * N_UPDATES), "--run.save_interval", "1",
            "--run.keep_checkpoints", "10", "--virtual_ranks", str(nproc)]


def command(args, nproc=1):
    """The command line of launch.py (under torchrun for nproc > 1)."""
    if nproc == 1:
        return [sys.executable, str(ROOT / "launch.py"), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(ROOT / "launch.py"), *args]


def run(args, env, nproc=1):
    """Runs launch.py to the end; returns the CompletedProcess."""
    return subprocess.run(command(args, nproc), env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)


def start(args, env, nproc=1, log=None):
    """Starts launch.py in the background (its own session), output to `log`."""
    return subprocess.Popen(command(args, nproc), env=env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for(paths, proc, timeout=TIMEOUT):
    """Polls until every path exists; fails if the process ends first."""
    deadline = time.time() + timeout
    while not all(Path(p).exists() for p in paths):
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {paths} appeared"
        assert time.time() < deadline, f"timed out waiting for {paths}"
        time.sleep(0.005)


def descendants(pid):
    """The pids of every process descended from `pid` (torchrun starts workers in sessions of their own)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_all(proc):
    """SIGKILL to a launched run and every process it started (a preempted machine); waits for it."""
    for pid in descendants(proc.pid) + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def checkpoint_root(run_dir):
    return Path(run_dir) / "policy" / "checkpoints"


def metrics(run_dir):
    """The policy metrics records without timing keys; every line must be a whole JSON record."""
    lines = (Path(run_dir) / "train_policy_metrics.jsonl").read_text().splitlines(keepends=True)
    assert all(line.endswith("\n") for line in lines), "torn record in the metrics file"
    records = [json.loads(line) for line in lines]
    return [{k: v for k, v in r.items() if not k.startswith("elapsed/")} for r in records]


def final_state(run_dir):
    """(checkpoint name, weights, optimizer state, state.json without the wandb id) of a run's latest checkpoint."""
    latest = ckpt.latest_checkpoint(checkpoint_root(run_dir))
    state = json.loads((latest / "state.json").read_text())
    state.pop("wandb_id")
    return (latest.name, load_file(str(latest / "model.safetensors")), ckpt.torch_load_safe(latest / "optimizer.pt"),
            state)


def assert_same_run(resumed_dir, straight_dir):
    """Bit-identical final weights, optimizer state, KL controller and step; identical statistics for every update."""
    name, weights, optimizer, state = final_state(resumed_dir)
    name0, weights0, optimizer0, state0 = final_state(straight_dir)
    assert name == name0 == f"step-{N_UPDATES:08d}"
    assert state == state0  # global_step, kl_ctl value (exact float), world size
    assert weights.keys() == weights0.keys()
    assert all(torch.equal(weights[k], weights0[k]) for k in weights0), \
        [k for k in weights0 if not torch.equal(weights[k], weights0[k])]
    assert optimizer["step_count"] == optimizer0["step_count"] == N_UPDATES * 2  # noptepochs 2, 1 minibatch
    for i, slots in optimizer0["state"].items():
        for slot, value in slots.items():
            assert torch.equal(optimizer["state"][i][slot], value), (i, slot)
    records, records0 = metrics(resumed_dir), metrics(straight_dir)
    assert [r["step"] for r in records] == list(range(N_UPDATES))  # no duplicated or missing update
    assert records == records0


def snapshot(directory):
    """{relative path: sha256} of every file under `directory` but the run lock."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file() and p.name != runs.LOCK_FILE}


def in_process(args):
    """launch.py's main() in this process (faster than a subprocess for the continuation runs)."""
    return launch.main(list(args))


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """One reward model for every run of this module."""
    save_dir = tmp_path_factory.mktemp("reward") / "rm"
    train_reward.train(params.get_hparams("train_reward", "test", {"run.save_dir": str(save_dir),
                                                                   "run.wandb": "disabled"}))
    return save_dir / "reward_model"


@pytest.fixture(scope="module")
def straight(tmp_path_factory, reward_dir):
    """The uninterrupted single-process run."""
    tmp = tmp_path_factory.mktemp("straight")
    assert in_process(policy_args("run", tmp, reward_dir)) == 0
    return tmp / "run"


@pytest.fixture(scope="module")
def straight_2ranks(tmp_path_factory, reward_dir):
    """The uninterrupted run under torchrun with 2 ranks."""
    tmp = tmp_path_factory.mktemp("straight2")
    result = run(policy_args("run", tmp, reward_dir, nproc=2), hook_env(tmp), nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp / "run"


# ---- SIGKILL, then --resume --------------------------------------------------------------------------------

def test_sigkill_then_resume_is_bit_identical(tmp_path, reward_dir, straight):
    marker = tmp_path / "paused"
    args = policy_args("run", tmp_path, reward_dir)
    proc = start(args, hook_env(tmp_path, f"pause_after_log:{PAUSE_AT}:{marker}"), log=tmp_path / "killed.log")
    wait_for([checkpoint_root(tmp_path / "run") / f"step-{PAUSE_AT:08d}" / "COMPLETE", marker], proc)
    kill_all(proc)
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.latest_checkpoint(checkpoint_root(tmp_path / "run")).name == f"step-{PAUSE_AT:08d}"
    raw = (tmp_path / "run" / "train_policy_metrics.jsonl").read_text()
    assert not raw.endswith("\n")  # the kill left update 3's record and a torn one behind

    assert in_process([*args, "--resume"]) == 0
    assert_same_run(tmp_path / "run", straight)


# ---- SIGTERM / SIGINT: checkpoint, clean exit, resume ------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_and_exits_cleanly(tmp_path, reward_dir, straight, sig):
    args = policy_args("run", tmp_path, reward_dir)
    proc = start(args, hook_env(tmp_path, "slow_log:0.3"), log=tmp_path / "stopped.log")
    wait_for([checkpoint_root(tmp_path / "run") / "step-00000001" / "COMPLETE"], proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=TIMEOUT) == 0
    output = (tmp_path / "stopped.log").read_text()
    latest = ckpt.latest_checkpoint(checkpoint_root(tmp_path / "run"))
    step = ckpt.checkpoint_step(latest)
    assert 1 <= step < N_UPDATES
    assert (f"stopped by {sig.name} after update {step} of {N_UPDATES}; checkpoint {latest}. Resume with the same "
            f"command plus --resume") in output
    assert "Traceback" not in output
    assert [r["step"] for r in metrics(tmp_path / "run")] == list(range(step))

    assert in_process([*args, "--resume"]) == 0
    assert_same_run(tmp_path / "run", straight)


def test_sigterm_then_sigkill_under_torchrun_resume_bit_identical(tmp_path, reward_dir, straight_2ranks):
    """2 ranks: SIGTERM to torchrun (it forwards it to both workers, which agree, checkpoint and exit 0; torchrun
    itself then exits 1 with torch's SignalException), resume, SIGKILL to every process somewhere in the next
    update, resume again: the end is the uninterrupted run's, bit for bit."""
    args = policy_args("run", tmp_path, reward_dir, nproc=2)
    root = checkpoint_root(tmp_path / "run")
    proc = start(args, hook_env(tmp_path, "slow_log:0.3"), nproc=2, log=tmp_path / "stopped.log")
    wait_for([root / "step-00000001" / "COMPLETE"], proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=TIMEOUT)
    output = (tmp_path / "stopped.log").read_text()
    stopped = ckpt.checkpoint_step(ckpt.latest_checkpoint(root))
    assert 1 <= stopped < N_UPDATES - 2
    assert f"stopped by SIGTERM after update {stopped} of {N_UPDATES}" in output
    assert "exitcode  : " not in output  # no worker failed; only the agent reports the signal

    proc = start([*args, "--resume"], hook_env(tmp_path), nproc=2, log=tmp_path / "killed.log")
    wait_for([root / f"step-{stopped + 1:08d}" / "COMPLETE"], proc)
    kill_all(proc)  # agent and both workers, wherever they are in the next update
    killed = ckpt.latest_checkpoint(root)
    assert stopped + 1 <= ckpt.checkpoint_step(killed) < N_UPDATES
    assert f"resumed from {root / f'step-{stopped:08d}'}" in (tmp_path / "killed.log").read_text()

    result = run([*args, "--resume"], hook_env(tmp_path), nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resumed from {killed}" in result.stdout
    assert_same_run(tmp_path / "run", straight_2ranks)
    for v in (0, 1):  # every virtual rank's own random streams, and the query stream's position, are in it
        assert (killed / f"rng-vrank{v}.pt").is_file() and (killed / "sampler.json").is_file()


@pytest.mark.parametrize("command", ["train_policy", "train_reward"])
def test_signal_during_reward_training_says_nothing_was_kept(tmp_path, command):
    """Reward training keeps no checkpoints: a signal stops it at the next step and says so, chained before PPO
    (status 0, as PPO's stop) or alone (status 130: interrupted, nothing to use); --resume then trains it again."""
    args = [command, "test", "run", "--save_dir", str(tmp_path)]
    proc = start(args, hook_env(tmp_path, "slow_reward_log:1.0"), log=tmp_path / "stopped.log")
    wait_for([tmp_path / "run" / "train_reward_metrics.jsonl"], proc)
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(timeout=TIMEOUT)
    output = (tmp_path / "stopped.log").read_text()
    assert ("stopped by SIGTERM at reward training step 0 of 2; a reward model is saved only when its training "
            "finishes, so none was kept. Resume with the same command plus --resume (reward training starts again "
            "from the beginning)") in output, output[-3000:]
    assert "Traceback" not in output
    assert status == (0 if command == "train_policy" else 130), output[-3000:]
    assert not (tmp_path / "run" / "reward_model").exists() and not (tmp_path / "run" / "policy").exists()
    if command == "train_policy":
        assert in_process([*args, "--resume"]) == 0
        assert runs.RunDir(tmp_path / "run").reward_model_complete()
        assert ckpt.latest_checkpoint(checkpoint_root(tmp_path / "run")).name == "step-00000002"


# ---- resume refuses what it cannot continue exactly --------------------------------------------------------

@pytest.mark.parametrize("which", ["all", "newest"])
def test_resume_over_incomplete_checkpoints_stops_and_says_what_to_delete(tmp_path, reward_dir, straight, capsys,
                                                                         which):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    root = checkpoint_root(run_dir)
    complete = ckpt.checkpoint_dirs(root)
    damaged = complete if which == "all" else complete[-2:]
    for d in damaged:
        (d / "COMPLETE").unlink()
    before = snapshot(run_dir)
    args = [*policy_args("run", tmp_path, reward_dir), "--resume"]
    assert in_process(args) == 2
    err = capsys.readouterr().err
    names, paths = ", ".join(d.name for d in damaged), " ".join(str(d) for d in damaged)
    if which == "all":
        assert (f"error: cannot resume: {root} holds no complete checkpoint, only {names} without a COMPLETE marker "
                f"(cut short, damaged, or copied or synced incompletely); resuming would start over at update 0 and "
                f"drop the logged history. To start over, rerun with --overwrite instead of --resume, or delete "
                f"{paths} and rerun with --resume\n") in err
    else:
        kept = complete[-3].name
        assert (f"error: cannot resume: {root} holds {names} without a COMPLETE marker (cut short, damaged, or "
                f"copied or synced incompletely), newer than the latest complete checkpoint {kept}; resuming from "
                f"{kept} would drop the logged history after it. To resume from {kept}, delete {paths} and rerun "
                f"with --resume; to start over, rerun with --overwrite\n") in err
    assert snapshot(run_dir) == before  # the metrics history and every checkpoint untouched
    if which == "newest":  # doing what the message says resumes exactly
        for d in damaged:
            shutil.rmtree(d)
        assert in_process(args) == 0
        assert_same_run(run_dir, straight)


@pytest.mark.parametrize("field, value", [("global_step", -3), ("global_step", "6"), ("global_step", 6.0),
                                          ("global_step", True), ("global_step", None), ("global_step", 5),
                                          ("global_step", 10**30), ("kl_ctl", {"value": float("nan")}),
                                          ("kl_ctl", {"value": -1.0}), ("virtual_ranks", "1")])
def test_resume_refuses_a_bad_checkpoint_state(tmp_path, reward_dir, straight, capsys, field, value):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    latest = ckpt.latest_checkpoint(checkpoint_root(run_dir))
    state = json.loads((latest / "state.json").read_text())
    state[field] = value
    (latest / "state.json").write_text(json.dumps(state))
    before = snapshot(run_dir)
    assert in_process([*policy_args("run", tmp_path, reward_dir), "--resume"]) == 2
    err = capsys.readouterr().err
    if field == "global_step":
        expected = f"{latest / 'state.json'} has global_step {value!r}, but it must be {N_UPDATES}, the update of its"
    elif field == "kl_ctl":
        expected = f"{latest / 'state.json'} has virtual_ranks 1 and KL coefficient {value['value']!r}; expected"
    else:
        expected = f"{latest / 'state.json'} has virtual_ranks '1' and KL coefficient"
    assert err.startswith(f"error: {expected}") and len(err.splitlines()) == 1, err
    assert snapshot(run_dir) == before
    assert [p.name for p in checkpoint_root(run_dir).iterdir() if not ckpt.STEP_RE.match(p.name)] == []


def test_resume_beyond_the_runs_updates_is_refused(tmp_path, reward_dir, straight, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    before = snapshot(run_dir)
    args = policy_args("run", tmp_path, reward_dir)
    assert in_process([*args[:-6], "--ppo.total_episodes", "32", *args[-4:], "--resume"]) == 2
    latest = ckpt.latest_checkpoint(checkpoint_root(run_dir))
    assert (f"error: {latest / 'state.json'}: the checkpoint is at update {N_UPDATES}, beyond this run's 4 updates "
            f"(ppo.total_episodes / ppo.batch_size); resume with the ppo.total_episodes the run was started with, or "
            f"a larger one\n") in capsys.readouterr().err
    assert snapshot(run_dir) == before


# ---- the plumbing ------------------------------------------------------------------------------------------

def test_truncate_metrics_drops_resumed_and_torn_records(tmp_path):
    path = tmp_path / "train_policy_metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s / 3}) + "\n" for s in range(5)) + '{"step": 5, "x": 0.')
    ckpt.truncate_metrics(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]
    assert path.read_text().endswith("\n")
    ckpt.truncate_metrics(path, 0)
    assert path.read_text() == ""


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    ckpt.atomic_write_json(path, {"a": 1})

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ckpt.atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temporary file left


def test_only_complete_checkpoints_count_and_last_k_are_kept(tmp_path):
    for step in range(1, 6):
        tmp = ckpt.begin_checkpoint(tmp_path, step)
        (tmp / "model.safetensors").write_bytes(b"x")
        ckpt.commit_checkpoint(tmp, keep=3)
    half = ckpt.begin_checkpoint(tmp_path, 6)  # a crash while assembling step 6
    (tmp_path / "step-00000007").mkdir()  # no COMPLETE marker
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step-00000003", "step-00000004", "step-00000005"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000005"
    ckpt.remove_stale_tmp(tmp_path)
    assert not half.exists()


def test_reward_model_directory_appears_complete_or_not_at_all(tmp_path, reward_dir, monkeypatch):
    """A failure while writing the reward model leaves no reward_model/ that train_policy could mistake for one."""
    rm = runs.load_reward_model(str(reward_dir), n_vocab=27, padding_token=27)
    hp = params.get_hparams("train_reward", "test", {"run.save_dir": str(tmp_path)})
    calls = []
    real = ckpt.atomic_write_bytes

    def fail_on_third(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", fail_on_third)
    with pytest.raises(OSError):
        runs.save_reward_model(runs.RunDir(tmp_path), rm, hp, "test")
    assert not (tmp_path / "reward_model").exists() and not runs.RunDir(tmp_path).reward_model_complete()
    monkeypatch.setattr(ckpt, "atomic_write_bytes", real)
    runs.save_reward_model(runs.RunDir(tmp_path), rm, hp, "test")
    assert runs.RunDir(tmp_path).reward_model_complete()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reward_model", "train_reward_hparams.json"]
