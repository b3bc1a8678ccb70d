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
    for command in ('train_reward', 'train_policy', 'sample', 'demo', 'plot', 'label'):
        assert command in result.stdout
    assert _launch(cwd=tmp_path).returncode == 2


def test_label_help_and_a_bad_label_command(tmp_path):
    result = _launch('label', '--help', cwd=tmp_path)
    assert result.returncode == 0
    for command in ('collect', 'add-labeler', 'admin-token', 'serve', 'status', 'export'):
        assert command in result.stdout
    result = _launch('label', 'collect', 'test', '--store', 'labels.db', '--num', '0', cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, '')
    assert result.stderr == 'error: --num must be a positive integer, got 0\n'
    result = _launch('label', 'status', '--store', 'labels.db', cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith('error: labeling store labels.db does not exist')
    assert os.listdir(tmp_path) == []


# ---- dispatch to the commands (in-process, with stand-ins for the command modules) -------------------------

class _Recorder:
    """Stands in for a command module: records the calls of one function."""

    def __init__(self, function_name, result=None, error=None):
        self.calls = []
        self.result, self.error = result, error
        setattr(self, function_name, self._call)

    def _call(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.error is not None:
            raise self.error
        return self.result


def _install(monkeypatch, dotted, module):
    import importlib
    parent_name, _, name = dotted.rpartition('.')
    monkeypatch.setitem(sys.modules, dotted, module)
    monkeypatch.setattr(importlib.import_module(parent_name), name, module, raising=False)
    launch = sys.modules.get('launch')
    if launch is not None:  # launch.py imports the command modules at its top
        monkeypatch.setattr(launch, name, module, raising=False)


@pytest.fixture
def launch_module(monkeypatch):
    monkeypatch.syspath_prepend(str(LAUNCH.parent))
    import launch
    return launch


@pytest.mark.parametrize('command', ['train_reward', 'train_policy'])
def test_training_commands_call_train(launch_module, monkeypatch, tmp_path, command):
    trainer = _Recorder('train')
    _install(monkeypatch, f'lm_human_preferences.{command}', trainer)
    status = launch_module.main([command, 'test', 'run1', '--save_dir', str(tmp_path), '--resume',
                                 '--run.seed', '5'])
    assert status == 0
    (args, kwargs), = trainer.calls
    hparams, = args
    assert kwargs == {'resume': True, 'overwrite': False}
    assert hparams.run.save_dir == str(tmp_path / 'run1') and hparams.run.seed == 5
    assert type(hparams).__name__ == {'train_reward': 'TrainRewardHParams',
                                      'train_policy': 'TrainPolicyHParams'}[command]


def test_hparams_error_from_trainer_exits_2(launch_module, monkeypatch, tmp_path, capsys):
    from lm_human_preferences.utils.hyperparams import HParamsError
    trainer = _Recorder('train', error=HParamsError("'ppo.batch_size' (8) must be divisible by the world size (3)"))
    _install(monkeypatch, 'lm_human_preferences.train_policy', trainer)
    assert launch_module.main(['train_policy', 'test', 'r', '--save_dir', str(tmp_path), '--overwrite']) == 2
    assert capsys.readouterr().err == "error: 'ppo.batch_size' (8) must be divisible by the world size (3)\n"
    assert trainer.calls[0][1] == {'resume': False, 'overwrite': True}


def test_sample_plot_and_demo_dispatch(launch_module, monkeypatch, tmp_path):
    sample, plotting, demo = _Recorder('main'), _Recorder('plot_run'), _Recorder('main', result=3)
    _install(monkeypatch, 'lm_human_preferences.sample', sample)
    _install(monkeypatch, 'lm_human_preferences.utils.plotting', plotting)
    _install(monkeypatch, 'lm_human_preferences.demo', demo)

    assert launch_module.main(['sample', str(tmp_path), '--temperature', '0.7', '--nsamples', '6', '--no-score',
                               '--out', 'samples.json']) == 0
    assert sample.calls == [((), dict(run_dir=str(tmp_path), temperature=0.7, nsamples=6, batch_size=4, seed=None,
                                      score=False, out='samples.json'))]
    assert launch_module.main(['plot', str(tmp_path), '--out', 'figs']) == 0
    metrics = {'policy': tmp_path / 'train_policy_metrics.jsonl', 'reward': tmp_path / 'train_reward_metrics.jsonl'}
    assert plotting.calls == [((str(tmp_path), metrics, 'figs'), {})]
    assert launch_module.main(['demo', '--fast', '--out', 'static/demo']) == 3
    assert demo.calls == [((['--fast', '--out', 'static/demo'],), {})]


def test_split_overrides(launch_module):
    launcher, overrides = launch_module.split_overrides(
        ['exp', '--dry_run', '--a.b', '-1', 'name', '--save_dir', 'd', '--c=--x', '--d', ''])
    assert launcher == ['exp', '--dry_run', 'name', '--save_dir', 'd']
    assert overrides == {'a.b': '-1', 'c': '--x', 'd': ''}
