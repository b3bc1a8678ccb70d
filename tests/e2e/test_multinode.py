"""Two torchrun agents (`--nnodes 2`, one worker each, on 127.0.0.1) whose run directories differ, standing in for
nodes with private disks at the same save dir: rank 0 writes the whole checkpoint into its own directory, and a
rank that cannot see the run directory rank 0 wrote stops every rank with the shared-filesystem error instead of
training from update 0 or waiting forever in a collective."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lm_human_preferences import runs  # noqa: E402
from lm_human_preferences.utils import ckpt  # noqa: E402

TIMEOUT = 150  # seconds per launch of both agents; a hang (the bug this guards against) ends here


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NO_REWARD_TRAINING = ("--rewards.train_new_model", "off", "--rewards.trained_model", "test")


def kill_with_workers(pids):
    """SIGKILL to each process and every process descended from it (torchrun puts workers in sessions of their
    own, and they would keep the output pipe open)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo, found = list(pids), []
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch_two_nodes(save_dirs, *extra, reward=NO_REWARD_TRAINING):
    """Starts one torchrun agent per node (node_rank 0 and 1, static rendezvous on 127.0.0.1) running train_policy
    with that node's --save_dir; returns [(status, output)] by node once both end (both killed at TIMEOUT)."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    args = ["train_policy", "test", "run", *reward, "--virtual_ranks", "2", "--ppo.batch_size", "16",
            "--ppo.total_episodes", "32",
            "--run.save_interval", "1", *extra]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
                               str(ROOT / "launch.py"), *args, "--save_dir", str(save_dir)],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
             for node, save_dir in enumerate(save_dirs)]
    results = []
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            kill_with_workers([p.pid for p in procs])
            output, _ = proc.communicate()
            output += f"\n[killed after {TIMEOUT} s]"
        results.append((proc.returncode, output))
    return results


def snapshot(directory):
    """{relative path: sha256} of every file under `directory` but the run lock (held only while a process runs)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file() and p.name != runs.LOCK_FILE}


def worker_errors(output):
    """The `error: ...` lines launch.py printed."""
    return [line for line in output.splitlines() if line.startswith("error: ")]


def test_rank0_writes_whole_checkpoint_and_resume_needs_a_shared_filesystem(tmp_path):
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    (status0, out0), (status1, out1) = launch_two_nodes([node0, node1])
    assert status0 == status1 == 0, out0[-3000:] + out1[-3000:]
    root = node0 / "run" / "policy" / "checkpoints"
    latest = ckpt.latest_checkpoint(root)
    assert latest is not None and latest.name == "step-00000002"
    rng = [ckpt.torch_load_safe(latest / f"rng-vrank{v}.pt") for v in (0, 1)]  # every virtual rank's, by rank 0
    assert not torch.equal(rng[0]["generator"], rng[1]["generator"])  # rank 1's own stream, not a copy of rank 0's
    assert json.loads((latest / "sampler.json").read_text())["world_size"] == 2
    assert set(load_file(str(latest / "model.safetensors")))
    assert not node1.exists()  # rank 1 wrote nothing on its own disk
    written = snapshot(node0)

    # The run exists only on node 0: without --resume both ranks stop (no rank is left waiting in a collective).
    (status0, out0), (status1, out1) = launch_two_nodes([node0, node1])
    assert status0 != 0 and status1 != 0, out0[-3000:] + out1[-3000:]
    assert "[killed after" not in out0 + out1
    assert any("already holds a run" in e for e in worker_errors(out0)), out0[-3000:]
    assert worker_errors(out1) == ["error: another rank rejected the run's inputs; see its error"], out1[-3000:]

    # --resume: rank 1 cannot see step-2, so every rank stops with status 2 and names the requirement.
    (status0, out0), (status1, out1) = launch_two_nodes([node0, node1], "--ppo.total_episodes", "48", "--resume")
    assert status0 != 0 and status1 != 0, out0[-3000:] + out1[-3000:]
    assert "[killed after" not in out0 + out1
    expected = (f"error: rank 1 on host {socket.gethostname()} cannot read checkpoint step-00000002, which rank 0 "
                f"resumes from: {node1 / 'run' / 'policy' / 'checkpoints' / 'step-00000002' / 'COMPLETE'} does not "
                f"exist. run.save_dir must be on a filesystem every node sees, at the same path")
    for output in (out0, out1):
        assert any(e.startswith(expected) for e in worker_errors(output)), output[-3000:]
        assert "exitcode  : 2" in output and "resumed from" not in output and "saved checkpoint" not in output
    assert snapshot(node0) == written  # nothing trained, nothing written
    assert not node1.exists()


def test_chained_reward_model_that_rank1_cannot_see_stops_every_rank(tmp_path):
    """Rank 0 trains and saves the reward model; rank 1 must load it for PPO and cannot."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    (status0, out0), (status1, out1) = launch_two_nodes([node0, node1], reward=())
    assert "[killed after" not in out0 + out1
    reward_model = node1 / "run" / "reward_model"
    expected = (f"error: rank 1 on host {socket.gethostname()} cannot read the reward model that rank 0 saved: "
                f"{reward_model} is missing or incomplete. run.save_dir must be on a filesystem every node sees, at "
                f"the same path")
    for status, output in ((status0, out0), (status1, out1)):
        assert status != 0 and "exitcode  : 2" in output, output[-3000:]
        assert any(e.startswith(expected) for e in worker_errors(output)), output[-3000:]
    assert (node0 / "run" / "reward_model" / "model.safetensors").is_file()  # kept: --resume on shared storage
    assert not (node0 / "run" / "policy" / "checkpoints").exists() and not node1.exists()

    # --resume: rank 0 finds the finished reward model and every rank skips reward training on its word (none trains
    # alone, waiting for the others), then rank 1 cannot load it.
    (status0, out0), (status1, out1) = launch_two_nodes([node0, node1], "--resume", reward=())
    assert "[killed after" not in out0 + out1
    for status, output in ((status0, out0), (status1, out1)):
        assert status != 0 and "exitcode  : 2" in output, output[-3000:]
        assert any(e.startswith(expected) for e in worker_errors(output)), output[-3000:]
        assert "train_reward:" not in output
