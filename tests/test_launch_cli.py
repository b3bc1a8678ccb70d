"""The command line (launch.py) as a user runs it: a subprocess, from an unrelated working directory."""

import os
import pathlib
import subprocess
import sys

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / 'launch.py'


def _launch(*args, cwd):
    return subprocess.run([sys.executable, str(LAUNCH), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_dry_run_prints_resolved_hparams(tmp_path):
    result = _launch('train_policy', 'cnndm', 'my_run', '--save_dir', str(tmp_path / 'runs'), '--dry_run',
                     '--ppo.lr', '3e-6', '--task.penalty_reward_value', '-2', '--rewards.adaptive_kl.target=18',
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert 'ppo.lr: 3e-06' in lines
    assert 'task.penalty_reward_value: -2' in lines
    assert 'rewards.adaptive_kl.target: 18.0' in lines
    assert "task.query_prefix: 'Article:\\n\\n'" in lines
    assert 'ppo.whiten_rewards: False' in lines
    assert f"run.save_dir: {str(tmp_path / 'runs' / 'my_run')!r}" in lines
    assert os.listdir(tmp_path) == []  # a dry run writes nothing


def test_dry_run_reward_default_save_dir(tmp_path):
    result = _launch('train_reward', 'test', 'rm', '--dry_run', cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"run.save_dir: {os.path.join('runs', 'rm')!r}" in result.stdout.splitlines()
    assert os.listdir(tmp_path) == []


def test_deprecated_alias_warns_on_the_command_line(tmp_path):
    result = _launch('train_policy', 'tldr', 'x', '--dry_run', '--rewards.whiten', 'false', cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'DeprecationWarning' in result.stderr and "'ppo.whiten_rewards'" in result.stderr


@pytest.mark.parametrize('args, message', [
    (['train_policy', 'sentimnet', 'x'], "unknown train_policy experiment 'sentimnet'; valid experiments "
                                         "(closest first): sentiment"),
    (['train_policy', 'sentiment', 'x', '--ppo.lrr', '1e-5'], "unknown hyperparameter 'ppo.lrr'; did you mean "
                                                              "'ppo.lr'"),
    (['train_reward', 'sentiment', 'x', '--batch_size', 'big'], "invalid value 'big' for 'batch_size': expected "
                                                                "an integer"),
    (['train_reward', 'sentiment', 'x', '--labels.num_train', '5000'], "'labels.num_train' (5000) must be "
                                                                       "divisible by 'batch_size' (32)"),
    (['train_policy', 'cnndm', 'x', '--rewards.adaptive_kl', 'on'], "'rewards.adaptive_kl.target' is required"),
    (['train_policy', 'test', 'x', '--ppo.lr'], '--ppo.lr needs a value'),
    (['train_policy', 'test', 'x', '--resume', '--overwrite'], '--resume and --overwrite exclude each other'),
    (['train_policy', 'test', 'x', '--run.save_dir', 'elsewhere'], 'pass --save_dir DIR'),
])
@pytest.mark.parametrize('dry_run', [False, True])
def test_bad_command_line_exits_2_without_traceback_or_files(tmp_path, args, message, dry_run):
    result = _launch(*args, *(['--dry_run'] if dry_run else []), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith('error: ') and message in result.stderr
    assert 'Traceback' not in result.stderr and result.stdout == ''
    assert os.listdir(tmp_path) == []  # no run directory


def test_missing_run_dir_for_sample_and_plot(tmp_path):
    for command in ('sample', 'plot'):
        result = _launch(command, str(tmp_path / 'nope'), cwd=tmp_path)
        assert result.returncode == 2 and 'does not exist' in result.stderr and 'Traceback' not in result.stderr


def test_help_and_missing_command(tmp_path):
    result = _launch('--help', cwd=tmp_path)
    assert result.returncode == 0
    for command in ('train_reward', 'train_policy', 'sample', 'demo', 'plot'):
        assert command in result.stdout
    assert _launch(cwd=tmp_path).returncode == 2
