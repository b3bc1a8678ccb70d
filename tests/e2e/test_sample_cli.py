"""`python launch.py sample <run_dir>` on a real (tiny) policy run: records, printing, scoring, errors."""

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from lm_human_preferences import runs, sample
from lm_human_preferences.language.encodings import get_encoding
from lm_human_preferences.lm_tasks import postprocess_responses
from lm_human_preferences.runs import load_reward_model
from lm_human_preferences.utils.ckpt import latest_checkpoint, load_tensors

LAUNCH = pathlib.Path(__file__).resolve().parents[2] / 'launch.py'
RECORD_KEYS = {'query', 'response', 'raw_response', 'score', 'query_tokens', 'response_tokens'}


def _launch(*args, cwd):
    return subprocess.run([sys.executable, str(LAUNCH), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A finished `test` policy run (reward model trained in the same run)."""
    root = tmp_path_factory.mktemp('runs')
    result = _launch('train_policy', 'test', 'tiny', '--save_dir', str(root), '--run.wandb', 'disabled', cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / 'tiny'


def _copy_run(run_dir, dest):
    """A copy of the run, without outputs of other tests, that a test may modify."""
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns('samples.jsonl'))
    return dest


def _edit_hparams(run, **task_fields):
    """Sets task fields in the copy's train_policy_hparams.json."""
    path = run / 'train_policy_hparams.json'
    nested = json.loads(path.read_text())
    nested['task'].update(task_fields)
    path.write_text(json.dumps(nested))


def test_sample_writes_scored_records_and_prints_them(run_dir, tmp_path):
    result = _launch('sample', str(run_dir), '--nsamples', '6', '--batch_size', '4', '--seed', '3', cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = _read_jsonl(run_dir / 'samples.jsonl')
    assert len(records) == 8  # 6 rounded up to two batches of 4
    enc = get_encoding('test')
    for i, r in enumerate(records):
        assert set(r) == RECORD_KEYS
        assert len(r['query_tokens']) == 4 and len(r['response_tokens']) == 4
        assert r['query'] == enc.decode(r['query_tokens']) and r['raw_response'] == enc.decode(r['response_tokens'])
        assert r['response'] == r['raw_response']  # the test task has no truncate token
        assert f'[{i}] query:    {r["query"]}' in result.stdout
        assert f'response: {r["response"]}' in result.stdout
        assert f'score:    {r["score"]:+.4f}' in result.stdout
    assert 'temperature 1,' in result.stdout  # the task's training temperature
    assert len({r['raw_response'] for r in records}) > 1

    # the scores are the run's own reward model on (query, post-processed response)
    rm = load_reward_model(str(run_dir / 'reward_model'), n_vocab=enc.n_vocab, padding_token=enc.padding_token)
    queries = torch.tensor([r['query_tokens'] for r in records])
    responses = torch.tensor([r['response_tokens'] for r in records])
    with torch.no_grad():
        expected = rm(queries, responses)
    torch.testing.assert_close(torch.tensor([r['score'] for r in records]), expected, atol=1e-5, rtol=1e-5)


def test_no_score_and_out_path(run_dir, tmp_path):
    out = tmp_path / 'sub' / 'mine.jsonl'
    result = _launch('sample', str(run_dir), '--no-score', '--nsamples', '3', '--batch_size', '3',
                     '--temperature', '0.5', '--out', str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = _read_jsonl(out)
    assert len(records) == 3 and all(set(r) == RECORD_KEYS - {'score'} for r in records)
    assert 'score:' not in result.stdout and 'scored by' not in result.stdout
    assert 'temperature 0.5,' in result.stdout


def test_run_without_checkpoint_exits_2_naming_dir_and_command(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path / 'copy')
    shutil.rmtree(run / 'policy' / 'checkpoints')
    result = _launch('sample', str(run), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith('error: ') and 'Traceback' not in result.stderr
    assert str(run / 'policy' / 'checkpoints') in result.stderr
    assert 'python launch.py train_policy' in result.stderr
    assert not (run / 'samples.jsonl').exists()


# ---- in-process -------------------------------------------------------------------------------------------

@pytest.fixture
def launch_module(monkeypatch):
    monkeypatch.syspath_prepend(str(LAUNCH.parent))
    import launch
    return launch


@pytest.mark.parametrize('make_dir, message', [
    (False, 'does not exist'),
    (True, 'train_policy_hparams.json is missing'),
])
def test_missing_or_foreign_run_dir_exits_2(launch_module, tmp_path, capsys, make_dir, message):
    path = tmp_path / 'somewhere'
    if make_dir:
        path.mkdir()
    assert launch_module.main(['sample', str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and message in err and str(path) in err


def test_same_seed_same_samples_other_seed_differs(run_dir, tmp_path, capsys):
    kwargs = dict(run_dir=run_dir, temperature=None, nsamples=8, batch_size=8, score=False)
    first = sample.main(seed=11, out=tmp_path / 'a.jsonl', **kwargs)
    again = sample.main(seed=11, out=tmp_path / 'b.jsonl', **kwargs)
    other = sample.main(seed=12, out=tmp_path / 'c.jsonl', **kwargs)
    assert first == again == _read_jsonl(tmp_path / 'a.jsonl')
    assert [r['query'] for r in first] == [r['query'] for r in other]  # test-mode queries are a fixed stream
    assert [r['raw_response'] for r in first] != [r['raw_response'] for r in other]
    assert 'seed 11' in capsys.readouterr().out


def test_policy_is_the_latest_checkpoint(run_dir):
    hp = runs.read_run_hparams(runs.RunDir(run_dir))
    checkpoint = runs.latest_policy_checkpoint(runs.RunDir(run_dir))
    assert checkpoint == latest_checkpoint(run_dir / 'policy' / 'checkpoints')
    enc = get_encoding('test')
    policy = runs.load_policy(runs.RunDir(run_dir), checkpoint, hp, enc, temperature=0.7, device=torch.device('cpu'))
    assert policy.temperature == 0.7
    saved = load_tensors(checkpoint / 'model.safetensors')
    loaded = policy.model.state_dict()
    assert set(saved) == set(loaded)
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name


def test_training_temperature_is_the_default(run_dir, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path / 'copy')
    path = run / 'train_policy_hparams.json'
    nested = json.loads(path.read_text())
    nested['task']['policy']['temperature'] = 0.25
    path.write_text(json.dumps(nested))
    sample.main(run_dir=run, nsamples=1, batch_size=1, seed=0, score=False)
    assert 'temperature 0.25,' in capsys.readouterr().out


def test_truncation_and_penalty_as_in_training(run_dir, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path / 'copy')
    enc = get_encoding('test')
    dot = enc.encode('.')[0]
    _edit_hparams(run, truncate_token=dot, truncate_after=1, penalty_reward_value=-7)
    records = sample.main(run_dir=run, nsamples=64, batch_size=32, seed=5, score=True)
    capsys.readouterr()
    responses = torch.tensor([r['response_tokens'] for r in records])
    post = postprocess_responses(responses, dot, 1, enc.padding_token)
    valid = [('.' in r['raw_response'][1:]) for r in records]
    assert any(valid) and not all(valid)  # both cases occur with this seed
    for r, p, ok in zip(records, post, valid):
        assert r['response'] == enc.decode(p)
        if ok:
            cut = r['raw_response'].index('.', 1) + 1
            assert r['response'] == r['raw_response'][:cut] and r['score'] != -7
        else:
            assert r['response'] == r['raw_response'] and r['score'] == -7


def test_newlines_shown_as_mark_and_pads_as_nothing(capsys):
    sample.print_record(0, {'query': 'line one\nline two', 'response': 'a\n\nb', 'score': 0.5})
    out = capsys.readouterr().out
    assert '[0] query:    line one⏎line two' in out and 'response: a⏎⏎b' in out and 'score:    +0.5000' in out
    enc = get_encoding('test')
    queries = torch.tensor([[0, 1, enc.padding_token]])
    batch = {'responses': torch.tensor([[2, 26, 3]]), 'postprocessed': torch.tensor([[2, 26, enc.padding_token]]),
             'scores': None}
    record, = sample.batch_records(enc, queries, batch)
    assert record['query'] == 'ab' and record['response'] == 'c.' and record['raw_response'] == 'c.d'
    assert 'score' not in record and record['query_tokens'] == [0, 1, enc.padding_token]


@pytest.mark.parametrize('kwargs, message', [
    (dict(nsamples=0), 'nsamples must be a positive integer'),
    (dict(batch_size=-1), 'batch_size must be a positive integer'),
    (dict(temperature=0.0), 'temperature must be > 0'),
])
def test_bad_arguments(run_dir, kwargs, message):
    with pytest.raises(runs.RunError, match=message):
        sample.main(run_dir=run_dir, **kwargs)


def test_no_reward_model_to_score_with(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path / 'copy')
    shutil.rmtree(run / 'reward_model')
    with pytest.raises(runs.RunError, match='--no-score'):
        sample.main(run_dir=run, nsamples=1, batch_size=1, score=True)


# ---- outputs and failures -----------------------------------------------------------------------------------

def _error_line(err):
    """The one `error:` line of stderr; no traceback."""
    assert 'Traceback' not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _unusable_out(tmp_path, monkeypatch, kind):
    """An --out that cannot be written, and the reason the error gives."""
    if kind == 'directory':
        return tmp_path, f'{tmp_path} is a directory, not a file'
    if kind == 'under a file':
        (tmp_path / 'file').write_text('x')
        return tmp_path / 'file' / 'samples.jsonl', f'{tmp_path / "file"} is a file, not a directory'
    target = tmp_path / 'locked'
    target.mkdir()
    if kind == 'no permission':  # simulated: the tests run as root, which ignores permissions
        real_access = os.access
        monkeypatch.setattr(os, 'access', lambda p, mode, **kw: pathlib.Path(p) != target and real_access(p, mode))
        return target / 'new' / 'samples.jsonl', f'{target} is not writable for this user'
    real_statvfs = os.statvfs

    def read_only(p):
        result = real_statvfs(p)
        return SimpleNamespace(f_flag=result.f_flag | os.ST_RDONLY) if pathlib.Path(p) == target else result

    monkeypatch.setattr(os, 'statvfs', read_only)
    return target / 'samples.jsonl', f'{target} is on a read-only file system'


@pytest.mark.parametrize('kind', ['directory', 'under a file', 'no permission', 'read-only'])
def test_unusable_out_is_refused_before_sampling(launch_module, run_dir, tmp_path, monkeypatch, capsys, kind):
    out, reason = _unusable_out(tmp_path, monkeypatch, kind)
    assert launch_module.main(['sample', str(run_dir), '--nsamples', '2', '--out', str(out)]) == 2
    captured = capsys.readouterr()
    assert _error_line(captured.err) == (f'error: cannot write the samples to {out}: {reason}; pass --out with a '
                                         f'file path in a writable directory')
    assert 'sampling' not in captured.out  # refused before any work


def test_interrupted_sampling_keeps_the_finished_batches(launch_module, run_dir, tmp_path, monkeypatch, capsys):
    real, calls = runs.rollout, []

    def interrupted_in_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runs, 'rollout', interrupted_in_third_batch)
    out = tmp_path / 'samples.jsonl'
    assert launch_module.main(['sample', str(run_dir), '--nsamples', '12', '--batch_size', '4', '--seed', '1',
                               '--no-score', '--out', str(out)]) == 130
    partial = tmp_path / 'samples.jsonl.partial'
    assert f'note: the 8 samples written before the failure are in {partial}' in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setattr(runs, 'rollout', real)
    full = sample.main(run_dir=run_dir, nsamples=12, batch_size=4, seed=1, score=False, out=tmp_path / 'full.jsonl')
    assert _read_jsonl(partial) == full[:8]  # whole records, as sampled


class _FullDiskAfter:
    """A file that takes `n` writes, then fails as a full disk does (after storing part of the data)."""

    def __init__(self, file, n):
        self.file, self.n = file, n

    def __getattr__(self, name):
        return getattr(self.file, name)

    def write(self, data):
        self.n -= 1
        if self.n < 0:
            self.file.write(bytes(data[:5]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)


def test_full_disk_while_sampling_keeps_whole_records(launch_module, run_dir, tmp_path, monkeypatch, capsys):
    real_open = open
    monkeypatch.setattr(sample, 'open', lambda *a, **kw: _FullDiskAfter(real_open(*a, **kw), 1), raising=False)
    out = tmp_path / 'samples.jsonl'
    assert launch_module.main(['sample', str(run_dir), '--nsamples', '8', '--batch_size', '4', '--no-score',
                               '--out', str(out)]) == 1
    err = capsys.readouterr().err
    partial = tmp_path / 'samples.jsonl.partial'
    assert _error_line(err) == (f'error: could not write {partial} (No space left on device); free disk space on its '
                                f'file system, then run the command again')
    assert f'note: the 4 samples written before the failure are in {partial}' in err
    assert len(_read_jsonl(partial)) == 4 and not out.exists()  # the torn fifth record was cut off


@pytest.mark.parametrize('content, problem', [
    (b'[]', 'holds a JSON list, not the object of hyperparameters train_policy writes'),
    (b'["task", "ppo"]', 'holds a JSON list'),
    (b'"text"', 'holds a JSON string'),
    (b'3', 'holds a JSON number'),
    (b'null', 'holds a JSON null'),
    (b'{"ppo": {"lr": "fast"}}', "does not hold train_policy hyperparameters (invalid value 'fast' for 'ppo.lr'"),
    (b'{"ppo": 3}', 'does not hold train_policy hyperparameters'),
    (b'\xff\xfe{}', 'is not valid JSON'),
    (b'[' * 100000, 'is not valid JSON'),
])
def test_hparams_that_are_not_an_object_of_hyperparameters(launch_module, run_dir, tmp_path, capsys, content,
                                                           problem):
    run = _copy_run(run_dir, tmp_path / 'copy')
    (run / 'train_policy_hparams.json').write_bytes(content)
    assert launch_module.main(['sample', str(run), '--out', str(tmp_path / 's.jsonl')]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f'error: {run / "train_policy_hparams.json"} {problem}')
