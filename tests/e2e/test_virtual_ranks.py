"""One run on any number of processes (issue #16): the `test` experiment on 4 virtual ranks, trained by launch.py in
one process and under torchrun with 2 and 4 (gloo, CPU), samples the same responses and ends with the same reward
model, policy weights, KL coefficient and logged statistics, up to floating-point summation order; so does a run
split into micro-batches; and a 2-process run stopped after a checkpoint continues on 1 or on 4 processes as the
same run.

Tolerances, measured on this test (2-core AMD EPYC Zen 4, torch 2.13 CPU, fp32; 1, 2, 4 processes, micro-batches,
and the resumed runs alike): the reward models differ by at most 4.8e-7, the policies after 3 updates by 1.2e-7 (the
last two updates moved them by 3.5e-3), every logged statistic by a relative 8.6e-5 or an absolute 3e-8; the
tolerances below allow about 10x that. The same seed on 2 virtual ranks instead of 4 lands 1.2e-2 away in the policy
and 0.86 in the reward model, with statistics 27x apart: a stream, permutation, query shard or whitening group keyed
by the process instead of the virtual rank shows up as different responses at the first update or far outside the
tolerances.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 300

# Test-only hooks, imported by every process through PYTHONPATH (the production code has none):
#   LMHP_VR_RECORD=<dir>  each rank writes the responses of its virtual ranks at update 0 to <dir>/rank<R>.json
#   LMHP_VR_EXIT_AFTER=<n>  every rank exits (status 17, no clean-up) once the checkpoint of update n is written;
#                           torchrun then fails with status 1
SITECUSTOMIZE = '''
import json, os
if os.environ.get("LMHP_VR_RECORD") or os.environ.get("LMHP_VR_EXIT_AFTER"):
    from lm_human_preferences import train_policy as _tp
    _step, _save = _tp.PPOTrainer.step, _tp.PPOTrainer.save_checkpoint

    def _recording_step(self):
        stats, data = _step(self)
        out = os.environ.get("LMHP_VR_RECORD")
        if out and self.global_step == 0:
            with open(os.path.join(out, "rank%d.json" % self.info.rank), "w") as f:
                json.dump({"vranks": self.vranks.ids, "responses": data["responses"].tolist()}, f)
        return stats, data

    def _save_then_exit(self, root, wandb_id=None):
        saved = _save(self, root, wandb_id)
        if self.global_step == int(os.environ.get("LMHP_VR_EXIT_AFTER", "-1")):
            os._exit(17)
        return saved

    _tp.PPOTrainer.step = _recording_step
    _tp.PPOTrainer.save_checkpoint = _save_then_exit
'''

V = 4
UPDATES = 3
ARGS = ["--virtual_ranks", str(V),  # the chained reward training's too
        "--ppo.batch_size", "64", "--ppo.nminibatches", "2", "--ppo.total_episodes", str(64 * UPDATES),
        "--ppo.lr", "1e-3", "--run.keep_checkpoints", "10", "--run.precision", "fp32"]
MICRO_BATCHES = ["--run.rollout_micro_batch", "5", "--run.train_micro_batch", "3",
                 "--rewards.train_new_model.run.rollout_micro_batch", "3",
                 "--rewards.train_new_model.run.train_micro_batch", "1"]
WEIGHTS_ATOL = 5e-6
STATS_RTOL, STATS_ATOL = 1e-3, 1e-6


def random_labels(path, n=24, seed=0):
    """best_of_4 labels over the test encoding (27 letters, pad 27) with random tokens and choices. (The `test`
    experiment's own labels are 50 identical all-zero records: their gradient is zero up to rounding, which Adam,
    dividing by the gradient's own scale, turns into steps of the size of the learning rate in a random direction.)"""
    g = torch.Generator().manual_seed(seed)
    tokens = lambda k: torch.randint(0, 27, (k,), generator=g).tolist()  # noqa: E731
    records = [dict(query=tokens(4), best=int(torch.randint(0, 4, (1,), generator=g)),
                    **{f"sample{i}": tokens(4) for i in range(4)}) for _ in range(n)]
    path.write_text(json.dumps(records))
    return path


def launch(tmp_path, name, nproc, extra=(), *, resume=False, exit_after=None):
    """launch.py train_policy test <name> under `nproc` processes, with the hooks; returns the run directory. The
    run must succeed, or with `exit_after` fail as the hook makes it."""
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    record = tmp_path / f"{name}-responses{'-resumed' if resume else ''}"
    record.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hooks), str(ROOT)]), WANDB_MODE="disabled",
               LMHP_VR_RECORD=str(record))
    if exit_after is not None:
        env["LMHP_VR_EXIT_AFTER"] = str(exit_after)
    labels = random_labels(tmp_path / "labels.json")
    args = ["train_policy", "test", name, "--save_dir", str(tmp_path), "--rewards.train_new_model.labels.source",
            str(labels), *ARGS, *extra, *(["--resume"] * resume)]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    result = subprocess.run([*launcher, str(ROOT / "launch.py"), *args], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=TIMEOUT)
    expect = 0 if exit_after is None else 17 if nproc == 1 else 1
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path / name


def first_responses(tmp_path, name, virtual_ranks=V):
    """The responses of update 0, virtual rank after virtual rank, gathered from every process's record."""
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / f"{name}-responses").glob("rank*.json"))]
    records.sort(key=lambda r: r["vranks"][0])
    assert [v for r in records for v in r["vranks"]] == list(range(virtual_ranks))
    return torch.tensor([row for r in records for row in r["responses"]])


def result(run_dir):
    """(policy weights, KL coefficient, logged statistics by update, reward model weights) of a finished run."""
    last = run_dir / "policy" / "checkpoints" / f"step-{UPDATES:08d}"
    state = json.loads((last / "state.json").read_text())
    metrics = {}
    for line in (run_dir / "train_policy_metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        metrics[record["step"]] = {k: v for k, v in record.items()
                                   if k not in ("step", "elapsed/time", "elapsed/fps", "time")}
    return (load_file(str(last / "model.safetensors")), state["kl_ctl"]["value"], metrics,
            load_file(str(run_dir / "reward_model" / "model.safetensors")))


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_run(got, expected):
    weights, kl, metrics, reward = got
    assert max_difference(reward, expected[3]) < WEIGHTS_ATOL
    assert max_difference(weights, expected[0]) < WEIGHTS_ATOL
    assert kl == pytest.approx(expected[1], rel=STATS_RTOL)
    assert metrics.keys() == expected[2].keys() == set(range(UPDATES))
    for step, stats in expected[2].items():
        assert metrics[step].keys() == stats.keys()
        for key, value in stats.items():
            assert metrics[step][key] == pytest.approx(value, rel=STATS_RTOL, abs=STATS_ATOL), (step, key)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("w1")
    return tmp, launch(tmp, "run", 1)


def test_one_two_and_four_processes_and_micro_batches_give_the_same_run(tmp_path, one_process):
    tmp1, run1 = one_process
    expected = result(run1)
    responses = first_responses(tmp1, "run")
    assert responses.shape == (64, 4)
    moved = max_difference(expected[0], load_file(str(run1 / "policy" / "checkpoints" / f"step-{1:08d}" /
                                                      "model.safetensors")))
    assert moved > 1e-3  # the last two updates moved the weights 100x beyond the tolerance
    for nproc, extra in [(2, ()), (4, ()), (1, MICRO_BATCHES)]:
        name = f"w{nproc}{'-micro' if extra else ''}"
        run_dir = launch(tmp_path, name, nproc, extra)
        assert torch.equal(first_responses(tmp_path, name), responses), name
        assert_same_run(result(run_dir), expected)


def test_another_number_of_virtual_ranks_is_another_run(tmp_path, one_process):
    """What the tolerances above guard against: the same seed on 2 virtual ranks samples other responses and
    ends elsewhere."""
    tmp1, run1 = one_process
    run_dir = launch(tmp_path, "v2", 1, ["--virtual_ranks", "2"])
    assert not torch.equal(first_responses(tmp_path, "v2", 2)[32:], first_responses(tmp1, "run")[32:])
    assert max_difference(result(run_dir)[0], result(run1)[0]) > 1e-3


@pytest.fixture(scope="module")
def stopped_on_two(tmp_path_factory):
    """A 2-process run that stops (status 17, as if killed) right after the checkpoint of its first update."""
    tmp = tmp_path_factory.mktemp("stopped")
    run_dir = launch(tmp, "run", 2, exit_after=1)
    assert sorted(p.name for p in (run_dir / "policy" / "checkpoints").iterdir()) == ["step-00000001"]
    state = json.loads((run_dir / "policy" / "checkpoints" / "step-00000001" / "state.json").read_text())
    assert (state["virtual_ranks"], state["world_size"]) == (V, 2)
    return run_dir


@pytest.mark.parametrize("resume_nproc", [1, 4])
def test_a_two_process_run_resumes_on_one_or_four_processes(tmp_path, one_process, stopped_on_two, resume_nproc):
    shutil.copytree(stopped_on_two, tmp_path / "run")
    run_dir = launch(tmp_path, "run", resume_nproc, resume=True)
    assert_same_run(result(run_dir), result(one_process[1]))
