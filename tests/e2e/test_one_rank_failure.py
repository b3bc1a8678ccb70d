"""A load that fails on one rank only, under torchrun (gloo, CPU): every rank exits promptly with status 2.

A driver script makes one function of the input-check phase raise on one rank only (a label file, a reward model or
a dataset that only that node cannot read; a check only rank 0 makes), then runs `launch.main`. Before the trainers
agreed on their loads before broadcasting rank 0's weights, the failed rank waited in the agreement's all_reduce
while the others waited in `broadcast_module`, until the 30-minute collective timeout.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMPT_S = 60  # seconds a failing run may take beyond its start; a hang lasts LMHP_DIST_TIMEOUT (set far above it)

DRIVER = textwrap.dedent("""
    import importlib, os, sys
    sys.path.insert(0, {root!r})
    import launch

    module_name, attr = os.environ["FAIL_AT"].split(":")
    rank, fail_rank = int(os.environ["RANK"]), int(os.environ["FAIL_RANK"])
    module = importlib.import_module(module_name)
    original = getattr(module, attr)

    def fails_on_one_rank(*args, **kwargs):
        if rank == fail_rank:
            raise FileNotFoundError(f"injected: rank {{rank}} cannot read the input of {{attr}}")
        return original(*args, **kwargs)

    setattr(module, attr, fails_on_one_rank)
    status = launch.main(sys.argv[1:])
    with open(os.path.join(os.environ["STATUS_DIR"], f"rank{{rank}}"), "w") as f:
        f.write(str(status))
    sys.exit(status)
""")

COMMON = ["--run.wandb", "disabled", "--run.seed", "3", "--virtual_ranks", "2"]
PPO = ["--ppo.batch_size", "16", "--ppo.total_episodes", "32"]  # 8 rows per rank: whitening needs them
CASES = {
    # reward training: the label file, the dataset, and the free-space check only rank 0 makes
    "labels": ("train_reward", "lm_human_preferences.language.labels:load_labels", 1, []),
    "dataset": ("train_reward", "lm_human_preferences.train_reward:QuerySampler", 1, []),
    "rank0_check": ("train_reward", "lm_human_preferences.runs:check_space_for_reward_model", 0, []),
    # PPO against a given reward model, and after a chained reward training (the PPO trainer loads then)
    "reward_model": ("train_policy", "lm_human_preferences.runs:load_reward_model", 1,
                     [*PPO, "--rewards.train_new_model", "off", "--rewards.trained_model", "test"]),
    "after_reward_training": ("train_policy", "lm_human_preferences.runs:load_reward_model", 1, PPO),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_load_failing_on_one_rank_stops_every_rank_promptly(tmp_path, case):
    command, target, fail_rank, extra = CASES[case]
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT)))
    status_dir = tmp_path / "status"
    status_dir.mkdir()
    env = dict(os.environ, FAIL_AT=target, FAIL_RANK=str(fail_rank), STATUS_DIR=str(status_dir),
               LMHP_DIST_TIMEOUT="900", OMP_NUM_THREADS="1")
    argv = [command, "test", "run", "--save_dir", str(tmp_path / "runs"), *COMMON, *extra]
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(driver), *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=PROMPT_S + 30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # torchrun stops its ranks (each in its own session) before it exits
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output = ""
        pytest.fail(f"{case}: the ranks hung after rank {fail_rank} failed to load ({target}): {output[-2000:]}")
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, output[-3000:]
    statuses = {p.name: p.read_text() for p in status_dir.iterdir()}
    assert statuses == {"rank0": "2", "rank1": "2"}, output[-3000:]  # both ranks: an input error, from launch.main
    assert f"error: injected: rank {fail_rank} cannot read the input of {target.split(':')[1]}" in output
    assert "error: another rank rejected the run's inputs" in output  # the other rank says where to look
    assert elapsed < PROMPT_S, f"{case}: took {elapsed:.0f}s"
    if case != "after_reward_training":  # nothing was written
        assert not (tmp_path / "runs" / "run" / "reward_model").exists()
