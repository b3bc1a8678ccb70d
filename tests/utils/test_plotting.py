"""utils/plotting.py: curve, plot_curves and plot_run on synthetic metrics files (the format utils/logging.py
writes), and `launch.py plot`."""

import json
import pathlib

import matplotlib.image
import pytest

from lm_human_preferences.utils import plotting
from lm_human_preferences.utils.logging import read_metrics

POLICY_KEYS = ('objective/score', 'objective/kl', 'objective/kl_coef', 'ppo/returns/mean')
ALL_PNGS = {'objective_score.png', 'objective_kl.png', 'objective_kl_coef.png', 'ppo_returns_mean.png',
            'train_reward_minibatch_loss.png'}
LAUNCH = pathlib.Path(__file__).resolve().parents[2] / 'launch.py'


def _write_rows(path, rows, torn_tail=None):
    with open(path, 'w') as f:
        for row in rows:
            f.write(json.dumps(row) + '\n')
        if torn_tail is not None:
            f.write(torn_tail)  # a line the writer has not finished


def _policy_rows(n, keys=POLICY_KEYS):
    return [{'step': s, **{k: 0.1 * s + i for i, k in enumerate(keys)}, 'ppo/lr': 1e-5} for s in range(n)]


def _reward_rows():
    return [{'step': 0, 'train_reward/normalize_before/mean': 0.3},
            *({'step': s, 'train_reward/minibatch/loss': 1.4 - 0.1 * s} for s in range(5)),
            {'step': 5, 'train_reward/normalize_after/mean': 0.0}]


def _plot_run(run_dir, out=None):
    """plot_run on a run directory's two metrics files, into <run_dir>/plots unless `out` is given."""
    metrics = {'policy': run_dir / 'train_policy_metrics.jsonl', 'reward': run_dir / 'train_reward_metrics.jsonl'}
    return plotting.plot_run(run_dir, metrics, out if out is not None else run_dir / 'plots')


def _assert_png(path):
    assert path.is_file() and path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    return matplotlib.image.imread(path).shape  # (height, width, channels)


def test_plot_run_writes_every_curve(tmp_path, capsys):
    _write_rows(tmp_path / 'train_policy_metrics.jsonl', _policy_rows(12))
    _write_rows(tmp_path / 'train_reward_metrics.jsonl', _reward_rows())
    written = _plot_run(tmp_path)
    assert {p.name for p in written} == ALL_PNGS
    assert all(p.parent == tmp_path / 'plots' for p in written)
    out = capsys.readouterr().out
    for path in written:
        _assert_png(path)
        assert f'wrote {path}' in out
    assert 'note:' not in out


def test_out_dir_and_running_run_with_torn_last_line(tmp_path, capsys):
    path = tmp_path / 'train_policy_metrics.jsonl'
    _write_rows(path, _policy_rows(3), torn_tail='{"step": 3, "objective/sc')
    written = _plot_run(tmp_path, str(tmp_path / 'figs'))
    assert {p.name for p in written} == ALL_PNGS - {'train_reward_minibatch_loss.png'}
    assert all(p.parent == tmp_path / 'figs' for p in written)
    out = capsys.readouterr().out
    assert 'train_reward_metrics.jsonl does not exist; skipping train_reward/minibatch/loss' in out
    assert plotting.curve(read_metrics(path), 'objective/score') == ([0.0, 1.0, 2.0], [0.0, 0.1, 0.2])


def test_missing_metric_is_skipped_with_a_note(tmp_path, capsys):
    _write_rows(tmp_path / 'train_policy_metrics.jsonl', _policy_rows(4, keys=('objective/score',)))
    written = _plot_run(tmp_path)
    assert [p.name for p in written] == ['objective_score.png']
    out = capsys.readouterr().out
    for key in ('objective/kl', 'objective/kl_coef', 'ppo/returns/mean'):
        assert f'has no finite values of {key} yet; skipping it' in out


def test_reward_run_alone(tmp_path):
    _write_rows(tmp_path / 'train_reward_metrics.jsonl', _reward_rows())
    assert [p.name for p in _plot_run(tmp_path)] == ['train_reward_minibatch_loss.png']


def test_no_metrics_file_is_a_clear_error(tmp_path):
    with pytest.raises(plotting.PlotError, match='has no metrics file .*train_policy_metrics.jsonl'):
        _plot_run(tmp_path)
    assert not (tmp_path / 'plots').exists()


def test_nothing_logged_yet_is_a_clear_error(tmp_path):
    _write_rows(tmp_path / 'train_policy_metrics.jsonl', [], torn_tail='{"step": 0, "obj')
    with pytest.raises(plotting.PlotError, match='nothing to plot'):
        _plot_run(tmp_path)


def test_launch_plot_exit_status(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(LAUNCH.parent))
    import launch
    assert launch.main(['plot', str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f'error: {tmp_path} has no metrics file')
    _write_rows(tmp_path / 'train_policy_metrics.jsonl', _policy_rows(2))
    assert launch.main(['plot', str(tmp_path)]) == 0
    assert (tmp_path / 'plots' / 'objective_kl.png').is_file()


def test_curve_reads_non_finite_strings_and_skips_other_rows():
    rows = [{'step': 0, 'a': 1.0}, {'step': 1, 'a': 'nan'}, {'step': 2}, {'step': 3, 'a': 'inf'},
            {'step': 4, 'a': 'text'}, {'a': 5.0}]
    steps, values = plotting.curve(rows, 'a')
    assert steps == [0.0, 1.0, 3.0] and values[0] == 1.0 and values[1] != values[1] and values[2] == float('inf')


def test_curve_keeps_the_last_row_of_a_repeated_step():
    rows = [{"step": 0, "k": 1.0}, {"step": 1, "k": 2.0}, {"step": 1, "k": 5.0}, {"step": 2, "other": 1.0}]
    assert plotting.curve(rows, "k") == ([0.0, 1.0], [1.0, 5.0])


def test_plot_curves_one_panel_per_key(tmp_path):
    rows = _policy_rows(5)
    one = _assert_png(plotting.plot_curves(rows, ['objective/score'], tmp_path / 'one.png', 'one'))
    three = _assert_png(plotting.plot_curves(rows, ['objective/score', 'objective/kl', 'absent'],
                                             tmp_path / 'deep' / 'three.png', 'three'))
    assert three[0] > 2 * one[0] and three[1] == one[1]  # taller, same width
    with pytest.raises(ValueError, match='at least one'):
        plotting.plot_curves(rows, [], tmp_path / 'none.png', 'none')


def test_file_name():
    assert plotting.file_name('objective/kl_coef') == 'objective_kl_coef.png'
    assert plotting.file_name('train_reward/minibatch/loss') == 'train_reward_minibatch_loss.png'


# ---- damaged metrics files and unusable outputs -------------------------------------------------------------

DAMAGED_LINES = [
    b'\xff\xfe not UTF-8\n',  # a damaged line
    b'{"step": 7, "objective/score": 1.0, "note": "\xe9t\xe9"}\n',  # Latin-1 inside an object: not UTF-8 either
    b'[1, 2]\n', b'3\n', b'"text"\n', b'null\n', b'true\n',  # JSON, but not an object
    b'[' * 100000 + b'\n',  # nested too deep for the parser
    b'{"step": 8, "objective/score": 1' + b'0' * 5000 + b'}\n',  # an integer too long to parse
    b'{not json}\n',
]


def test_damaged_lines_are_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    path = tmp_path / 'train_policy_metrics.jsonl'
    good = [(json.dumps(row) + '\n').encode() for row in _policy_rows(4)]
    path.write_bytes(good[0] + b''.join(DAMAGED_LINES) + b''.join(good[1:]) + b'\n' + b'{"step": 9, "obj')
    assert read_metrics(path) == _policy_rows(4)
    monkeypatch.syspath_prepend(str(LAUNCH.parent))
    import launch
    assert launch.main(['plot', str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f'note: {path}: skipped {len(DAMAGED_LINES)} damaged lines (not a UTF-8 JSON object)' in out
    for name in ALL_PNGS - {'train_reward_minibatch_loss.png'}:
        _assert_png(tmp_path / 'plots' / name)


@pytest.mark.parametrize('bad', [1e308, -1e308, 1.7976931348623157e308, 1e301, 'inf', '-inf', 'nan', 1e400])
def test_values_that_cannot_be_drawn_are_left_out_with_a_note(tmp_path, capsys, bad):
    rows = [{'step': 0, 'objective/score': 1.0}, {'step': 1, 'objective/score': bad},
            {'step': 2, 'objective/score': -1.0}, {'step': 1e308, 'objective/score': 2.0},
            {'step': 'nan', 'objective/score': 2.0}, {'step': 3, 'objective/score': 10**400}]
    (tmp_path / 'train_policy_metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    assert [p.name for p in _plot_run(tmp_path)] == ['objective_score.png']
    _assert_png(tmp_path / 'plots' / 'objective_score.png')
    assert (f'left out 2 value(s) of objective/score that are not finite or beyond +-{plotting.MAX_PLOTTABLE:g}'
            in capsys.readouterr().out)  # the bad value and step 1e308 (a step 'nan' or an integer beyond float
    # range is no number to curve())


def test_only_values_that_cannot_be_drawn_is_nothing_to_plot(tmp_path):
    _write_rows(tmp_path / 'train_policy_metrics.jsonl', [{'step': 0, 'objective/score': 1e308},
                                                          {'step': 1, 'objective/score': -1e308}])
    with pytest.raises(plotting.PlotError, match='nothing to plot'):
        _plot_run(tmp_path)


def test_draw_curve_leaves_out_what_cannot_be_drawn(tmp_path):
    fig = plotting.figure((4, 3))
    plotting.draw_curve(fig.subplots(), [0, 1, 2, 3, 4], [1e308, 1.0, -1e308, float('inf'), 2.0], ylabel='x')
    plotting.save(fig, tmp_path / 'x.png', dpi=50)
    _assert_png(tmp_path / 'x.png')


def test_out_that_cannot_hold_the_figures_is_refused(tmp_path, monkeypatch, capsys):
    _write_rows(tmp_path / 'train_policy_metrics.jsonl', _policy_rows(2))
    (tmp_path / 'file').write_text('mine')
    for out, reason in ((tmp_path / 'file', f'{tmp_path / "file"} is a file, not a directory'),
                        (tmp_path / 'file' / 'plots', f'{tmp_path / "file"} is a file, not a directory')):
        with pytest.raises(plotting.PlotError, match='pass --out with a writable directory'):
            _plot_run(tmp_path, out)
        monkeypatch.syspath_prepend(str(LAUNCH.parent))
        import launch
        assert launch.main(['plot', str(tmp_path), '--out', str(out)]) == 2
        assert capsys.readouterr().err == (f'error: cannot write the figures into {out}: {reason}; pass --out with a '
                                           f'writable directory\n')
    assert (tmp_path / 'file').read_text() == 'mine'
    assert not (tmp_path / 'plots').exists()
