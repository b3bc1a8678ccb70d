"""The run directory end to end through launch.py: a run name never reaches the save directory or beyond it,
--overwrite deletes only a run directory this project wrote, one process at a time uses a run directory (a second
gets status 2 naming the holder, also under torchrun; a SIGKILL frees it), and a moved run resumes without a
spurious "hyperparameters differ" warning."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import launch  # noqa: E402
from lm_human_preferences import runs  # noqa: E402

TIMEOUT = 240
QUICK = ["--run.wandb", "disabled"]
QUICK_POLICY = [*QUICK, "--ppo.total_episodes", "8"]  # one PPO update (reward training chained, as in `test`)


def files(directory):
    """{relative path: bytes} of every file under `directory`."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def refused(capsys, args) -> str:
    """Runs launch.main(args), which must stop with status 2 and one `error:` line; returns that line."""
    capsys.readouterr()
    assert launch.main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def scratch(tmp_path):
    """A save directory holding something that is not a run, a symlink out of it and one to itself."""
    save = tmp_path / "scratch"
    (save / "other").mkdir(parents=True)
    (save / "other" / "keep.txt").write_text("not a run")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("not a run either")
    (save / "out").symlink_to(tmp_path / "elsewhere")
    (save / "self").symlink_to(save)
    return save


@pytest.mark.parametrize("command", ["train_policy", "train_reward"])
@pytest.mark.parametrize("name", [".", "./", ".//", "./.", "a/..", "a/../.", "a/../", "..", "x/../..", "", "/abs",
                                  "out", "out/", "out/x", "self", "self/.", "{abs_save}", "{abs_save}/."])
def test_a_run_name_never_names_the_save_dir_or_outside_it(scratch, capsys, command, name):
    before, outside = files(scratch), files(scratch.parent / "elsewhere")
    name = name.format(abs_save=scratch)
    for save_dir in (str(scratch), str(scratch) + "/", os.path.relpath(scratch)):
        line = refused(capsys, [command, "test", name, "--save_dir", save_dir, "--overwrite", *QUICK])
        assert "run name" in line or "run directory" in line
    assert files(scratch) == before and files(scratch.parent / "elsewhere") == outside


def test_the_default_save_dir_survives_a_run_name_of_dot(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "my_run").mkdir(parents=True)
    (tmp_path / "runs" / "my_run" / "keep.txt").write_text("x")
    assert "names the save directory runs itself" in refused(capsys, ["train_policy", "test", ".", "--overwrite"])
    assert (tmp_path / "runs" / "my_run" / "keep.txt").is_file()


def test_overwrite_refuses_a_directory_holding_other_things(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.csv").write_text("a,b\n")
    (src / "lib").mkdir()
    line = refused(capsys, ["train_reward", "test", "src", "--save_dir", str(tmp_path), "--overwrite", *QUICK])
    assert "--overwrite deletes only a run directory this project wrote" in line and "data.csv, lib" in line
    assert files(src) == {"data.csv": b"a,b\n"} and (src / "lib").is_dir()

    # a real run plus a file of the user's: not deleted either
    assert launch.main(["train_reward", "test", "run", "--save_dir", str(tmp_path), *QUICK]) == 0
    (tmp_path / "run" / "notes.txt").write_text("mine")
    before = files(tmp_path / "run")
    assert "(notes.txt)" in refused(capsys, ["train_reward", "test", "run", "--save_dir", str(tmp_path),
                                             "--overwrite", *QUICK])
    assert files(tmp_path / "run") == before


def test_overwrite_of_a_symlink_or_a_file_is_one_line(tmp_path, capsys):
    assert launch.main(["train_reward", "test", "real", "--save_dir", str(tmp_path), *QUICK]) == 0
    capsys.readouterr()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file").write_text("x")
    before = files(tmp_path)
    for name, message in (("link", "is a symlink"), ("link/", "is a symlink"), ("file", "is not a directory"),
                          ("file/", "is not a directory"), ("file/r", "is a file, so the run directory")):
        assert message in refused(capsys, ["train_reward", "test", name, "--save_dir", str(tmp_path), "--overwrite",
                                           *QUICK])
    assert files(tmp_path) == before


def test_overwrite_replaces_a_run_of_this_project_and_one_from_before_the_marker(tmp_path, capsys):
    args = ["train_reward", "test", "run", "--save_dir", str(tmp_path), *QUICK]
    assert launch.main(args) == 0
    run = runs.RunDir(tmp_path / "run")
    assert run.marker.is_file() and not run.lock.exists()  # the lock lives only while a process holds it
    run.marker.unlink()  # a run written before the marker existed
    (run.path / "plots").mkdir()  # `plot` and `sample` outputs are the run's own
    run.samples.write_text("")
    assert launch.main([*args, "--overwrite"]) == 0
    assert run.marker.is_file() and run.reward_model_complete()
    assert not (run.path / "plots").exists() and not run.samples.exists()


def test_a_failed_check_leaves_no_directory_and_no_lock(tmp_path, capsys):
    args = ["train_reward", "test", "a/b/run", "--save_dir", str(tmp_path / "save"), "--labels.source",
            str(tmp_path / "missing.json"), *QUICK]
    refused(capsys, args)
    assert not (tmp_path / "save").exists()


@pytest.fixture
def holder(tmp_path):
    """Starts a process that holds the lock of <tmp_path>/save/run until it is killed; yields it."""
    run = tmp_path / "save" / "run"
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; from lm_human_preferences import runs; "
                             "lock = runs.RunLock.acquire(runs.RunDir(sys.argv[1])); print('locked', flush=True); "
                             "time.sleep(600)", str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    yield proc
    proc.kill()
    proc.wait(timeout=60)


def test_a_second_process_on_a_run_dir_is_refused_until_the_first_dies(tmp_path, holder, capsys):
    save = tmp_path / "save"
    for extra in ([], ["--resume"], ["--overwrite"]):
        for spelling in ("run", "run/", "./run"):
            line = refused(capsys, ["train_reward", "test", spelling, "--save_dir", str(save), *extra, *QUICK])
            assert (f"run directory {save / 'run'} is in use by pid {holder.pid} on host {socket.gethostname()}"
                    in line)
    assert [p.name for p in (save / "run").iterdir()] == [runs.LOCK_FILE]  # nothing written
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert launch.main(["train_reward", "test", "run", "--save_dir", str(save), *QUICK]) == 0


def test_a_resume_while_the_run_still_trains_is_refused(tmp_path, capsys):
    """A requeued job's --resume while the old job runs: status 2 naming the old job; after its SIGKILL the
    directory is free."""
    base = ["train_policy", "test", "run", "--save_dir", str(tmp_path), "--rewards.train_new_model", "off",
            "--rewards.trained_model", "test", *QUICK]
    args = [*base, "--ppo.total_episodes", "800000", "--run.save_interval", "1", "--run.log_interval", "100000"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        done = tmp_path / "run" / "policy" / "checkpoints" / "step-00000001" / "COMPLETE"
        deadline = time.time() + TIMEOUT
        while not done.exists():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        for extra in (["--resume"], ["--overwrite"], []):  # a short run each, should it start at all
            line = refused(capsys, [*base, "--ppo.total_episodes", "16", *extra])
            assert f"is in use by pid {proc.pid} on host {socket.gethostname()}" in line
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert launch.main([*base, "--ppo.total_episodes", "8", "--overwrite"]) == 0


def test_under_torchrun_every_rank_stops_when_the_run_dir_is_in_use(tmp_path, holder):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*torchrun, str(ROOT / "launch.py"), "train_reward", "test", "run", "--save_dir",
                             str(tmp_path / "save"), "--rollout_batch_size", "8", "--virtual_ranks", "2", *QUICK],
                            cwd=ROOT,
                            capture_output=True, text=True, timeout=TIMEOUT,
                            env=dict(os.environ, WANDB_MODE="disabled"))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"error: run directory {tmp_path / 'save' / 'run'} is in use by pid {holder.pid}" in output
    assert "error: another rank rejected the run's inputs" in output or "exitcode  : -15" in output
    assert [p.name for p in (tmp_path / "save" / "run").iterdir()] == [runs.LOCK_FILE]


def test_a_moved_run_resumes_without_a_differ_warning(tmp_path, capsys):
    # chained reward training: rewards.train_new_model.run.save_dir is the run directory
    assert launch.main(["train_policy", "test", "a", "--save_dir", str(tmp_path), *QUICK_POLICY]) == 0
    shutil.move(tmp_path / "a", tmp_path / "moved" / "b")
    capsys.readouterr()
    assert launch.main(["train_policy", "test", "b", "--save_dir", str(tmp_path / "moved"), "--resume",
                        *QUICK_POLICY]) == 0
    assert "differ" not in capsys.readouterr().err

    # a reward model inside the run directory, named by rewards.trained_model (as the demo does)
    assert launch.main(["train_reward", "test", "c", "--save_dir", str(tmp_path), *QUICK]) == 0
    policy = ["--rewards.train_new_model", "off", *QUICK_POLICY]
    assert launch.main(["train_policy", "test", "c", "--save_dir", str(tmp_path), "--resume",
                        "--rewards.trained_model", str(tmp_path / "c" / "reward_model"), *policy]) == 0
    shutil.move(tmp_path / "c", tmp_path / "d")
    capsys.readouterr()
    assert launch.main(["train_policy", "test", "d", "--save_dir", str(tmp_path), "--resume",
                        "--rewards.trained_model", str(tmp_path / "d" / "reward_model"), *policy]) == 0
    assert "differ" not in capsys.readouterr().err
    # a real change is still named
    assert launch.main(["train_policy", "test", "d", "--save_dir", str(tmp_path), "--resume", "--ppo.lr", "1e-5",
                        "--rewards.trained_model", str(tmp_path / "d" / "reward_model"), *policy]) == 0
    assert "hyperparameters that differ from the run's saved ones (ppo.lr)" in capsys.readouterr().err
