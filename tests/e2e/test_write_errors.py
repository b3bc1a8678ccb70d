"""Failed writes outside policy checkpoints (a full disk, no permission, a read-only file system): every command
that writes stops with one `error:` line naming the path and the fix (status 1 mid-way, 2 when found before the
run starts), keeps what it wrote before, and a finished reward training is not thrown away unnoticed.

Faults are simulated (the tests run as root, which ignores permissions): the writer or the metrics file's `open`
raises the OSError a full disk or a read-only file system gives."""
import errno
import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import launch  # noqa: E402
from lm_human_preferences import runs  # noqa: E402
from lm_human_preferences.demo import stages  # noqa: E402
from lm_human_preferences.utils import ckpt, files, plotting  # noqa: E402
from lm_human_preferences.utils import logging as metrics_logging  # noqa: E402

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def policy_args(save_dir, *extra):
    """train_policy on the test experiment against the random 'test' reward model: 3 updates of 8 episodes."""
    return ["train_policy", "test", "run", "--save_dir", str(save_dir), "--rewards.train_new_model", "off",
            "--rewards.trained_model", "test", "--ppo.batch_size", "8", "--ppo.total_episodes", "24",
            "--run.wandb", "disabled", *extra]


def reward_args(save_dir, *extra):
    return ["train_reward", "test", "rm", "--save_dir", str(save_dir), "--run.wandb", "disabled", *extra]


def error_line(err: str) -> str:
    """The one `error:` line of stderr; no traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def metrics_steps(path):
    """Steps of the metrics file's records; every line must be a whole JSON record."""
    return [json.loads(line)["step"] for line in Path(path).read_text().splitlines()]


class _TornAppend:
    """A metrics file whose write stores half the record, then fails as a full disk does."""

    def __init__(self, file):
        self.file = file

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def seek(self, *args):
        return self.file.seek(*args)

    def flush(self):
        self.file.flush()

    def truncate(self, size):
        return self.file.truncate(size)

    def write(self, data):
        self.file.write(data[: len(data) // 2])
        raise ENOSPC


# ---- metrics ------------------------------------------------------------------------------------------------

def test_full_disk_while_appending_metrics_stops_with_one_line_and_resume_continues(tmp_path, monkeypatch, capsys):
    real_open, appends = open, []

    def full_at_third_append(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if mode == "ab" and Path(path).name == "train_policy_metrics.jsonl":
            appends.append(path)
            if len(appends) == 3:
                return _TornAppend(f)
        return f

    monkeypatch.setattr(metrics_logging, "open", full_at_third_append, raising=False)
    assert launch.main(policy_args(tmp_path)) == 1
    metrics = tmp_path / "run" / "train_policy_metrics.jsonl"
    assert error_line(capsys.readouterr().err) == (
        f"error: could not write {metrics} (No space left on device); free disk space on its file system, then "
        f"rerun the same command with --resume")
    assert metrics_steps(metrics) == [0, 1]  # the torn third record was cut off again

    monkeypatch.setattr(metrics_logging, "open", real_open, raising=False)
    assert launch.main(policy_args(tmp_path, "--resume")) == 0
    assert metrics_steps(metrics) == [0, 1, 2]


# ---- the reward model ---------------------------------------------------------------------------------------

def test_full_disk_when_saving_the_reward_model_says_it_is_lost_and_resume_trains_it_again(tmp_path, monkeypatch,
                                                                                          capsys):
    real = ckpt.atomic_write_bytes

    def full_in_reward_model(path, data):
        if Path(path).parent.name == "reward_model.tmp":
            raise ENOSPC
        return real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", full_in_reward_model)
    assert launch.main(reward_args(tmp_path)) == 1
    run_dir = tmp_path / "rm"
    assert error_line(capsys.readouterr().err) == (
        f"error: the reward training finished but its model could not be saved, so it is lost (--resume trains it "
        f"again): could not write {run_dir / 'reward_model'} (No space left on device); free disk space on its file "
        f"system, then rerun the same command with --resume")
    assert not (run_dir / "reward_model").exists() and not (run_dir / "reward_model.tmp").exists()

    monkeypatch.setattr(ckpt, "atomic_write_bytes", real)
    assert launch.main(reward_args(tmp_path, "--resume")) == 0
    assert runs.RunDir(run_dir).reward_model_complete()


def test_too_little_space_for_the_reward_model_is_refused_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=0, free=2 * 2**10))
    assert launch.main(reward_args(tmp_path)) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith("error: the reward model will take ") and f"B, but the file system of {tmp_path}" in line
    assert line.endswith("has only 2.0 KiB free; free disk space or choose another --save_dir before training")
    assert not (tmp_path / "rm" / "train_reward_metrics.jsonl").exists()  # no training started


# ---- run metadata -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code, fix", [
    (errno.EACCES, "make its directory writable for this user or choose another location"),
    (errno.EROFS, "its file system is read-only: choose a location on a writable one"),
])
def test_failed_policy_metadata_write_names_the_file(tmp_path, monkeypatch, capsys, code, fix):
    real = ckpt.atomic_write_bytes

    def refuse_hparams(path, data):
        if Path(path).name == "train_policy_hparams.json":
            raise OSError(code, os.strerror(code), str(path))
        return real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", refuse_hparams)
    assert launch.main(policy_args(tmp_path)) == 1
    assert error_line(capsys.readouterr().err) == (
        f"error: could not write {tmp_path / 'run' / 'train_policy_hparams.json'} ({os.strerror(code)}); {fix}, "
        f"then rerun the same command with --resume")


def test_read_only_save_dir_is_refused_before_the_run_starts(tmp_path, monkeypatch, capsys):
    """A save directory on a read-only file system: the run directory cannot be created."""
    save_dir = tmp_path / "ro"
    save_dir.mkdir()
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if Path(path).parent == save_dir:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    assert launch.main(reward_args(save_dir)) == 2
    assert str(save_dir / "rm") in error_line(capsys.readouterr().err)
    assert list(save_dir.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions (simulated in the test above)")
def test_unwritable_save_dir_is_refused_before_the_run_starts(tmp_path, capsys):
    save_dir = tmp_path / "ro"
    save_dir.mkdir(mode=0o555)
    assert launch.main(reward_args(save_dir)) == 2
    assert str(save_dir / "rm") in error_line(capsys.readouterr().err)


# ---- the one error path -------------------------------------------------------------------------------------

def test_any_os_error_reaching_launch_is_one_line_with_status_1(monkeypatch, capsys, tmp_path):
    """An OSError from outside the project's writers still gives one line naming the file and the fix."""
    def fail(**kwargs):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp_path / "x"))

    monkeypatch.setattr(launch.sample, "main", fail)
    (tmp_path / "run").mkdir()
    assert launch.main(["sample", str(tmp_path / "run")]) == 1
    assert error_line(capsys.readouterr().err) == (
        f"error: {tmp_path / 'x'}: {os.strerror(errno.EDQUOT)}; free space within your disk quota, then run the "
        f"command again")


def test_write_error_names_path_cause_and_fix(tmp_path):
    with pytest.raises(files.WriteError) as info:
        with files.writing(tmp_path / "a.json"):
            raise ENOSPC
    assert str(info.value) == (f"could not write {tmp_path / 'a.json'} (No space left on device); free disk space on "
                               f"its file system")
    assert info.value.errno == errno.ENOSPC and info.value.path == tmp_path / "a.json"


def test_plot_that_cannot_write_a_figure_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "train_reward_metrics.jsonl").write_text('{"step": 0, "train_reward/minibatch/loss": 1.0}\n')
    real = plotting.atomic_open

    def full(path):
        raise ENOSPC

    monkeypatch.setattr(plotting, "atomic_open", full)
    assert launch.main(["plot", str(tmp_path)]) == 1
    png = tmp_path / "plots" / "train_reward_minibatch_loss.png"
    assert error_line(capsys.readouterr().err) == (
        f"error: could not write {png} (No space left on device); free disk space on its file system, then run the "
        f"command again")
    monkeypatch.setattr(plotting, "atomic_open", real)
    assert launch.main(["plot", str(tmp_path)]) == 0 and png.is_file()


def test_demo_stage_that_cannot_write_is_one_line(tmp_path, monkeypatch, capsys):
    corpus_dir = tmp_path / "fortunes"
    corpus_dir.mkdir()
    (corpus_dir / "f").write_text("The cat sat on the mat. It was happy there, as cats are when it is warm.\n%\n" * 40)

    def full_disk_corpus(ctx):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(ctx.paths.corpus / "lm_train.bin"))

    monkeypatch.setitem(stages.STAGE_FUNCTIONS, "corpus", full_disk_corpus)
    cache = tmp_path / "cache"
    assert launch.main(["demo", "--fast", "--corpus_dir", str(corpus_dir), "--cache_dir", str(cache)]) == 1
    assert error_line(capsys.readouterr().err) == (
        f"error: {cache / 'fast' / 'corpus' / 'lm_train.bin'}: No space left on device; free disk space on its file "
        f"system, then run the same command again (finished stages are cached)")
