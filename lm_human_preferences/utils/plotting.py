"""Training curves as PNG pictures: the primitives `launch.py plot` and the demo's report draw with.

Metrics are the rows of a local metrics file (one JSON object per line with "step" and the statistics, see
utils/logging.py); a run still being written is fine, its torn last line is skipped, and so are damaged lines.
Values that cannot be drawn (non-finite, or beyond +-MAX_PLOTTABLE) are left out of a picture. Drawing uses
matplotlib's Agg canvas directly, so no display and no pyplot global state are involved.
"""
import math
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lm_human_preferences.utils.files import atomic_open, unwritable, writing
from lm_human_preferences.utils.hyperparams import HParamsError
from lm_human_preferences.utils.logging import load_metrics

# (metrics source, statistic) pairs that plot_run draws, one PNG each; sources: 'policy' (train_policy's
# metrics), 'reward' (train_reward's)
RUN_CURVES: Tuple[Tuple[str, str], ...] = (
    ("policy", "objective/score"),
    ("policy", "objective/kl"),
    ("policy", "objective/kl_coef"),
    ("policy", "ppo/returns/mean"),
    ("reward", "train_reward/minibatch/loss"),
)
# Larger magnitudes overflow matplotlib's axis arithmetic (measured: +-1e308 fails, +-1e307 draws); 1e300 leaves
# room for the margins and a moving average.
MAX_PLOTTABLE = 1e300


class PlotError(HParamsError):
    """A run directory with nothing to plot; an HParamsError, so launch.py prints it as `error: <message>` and
    exits with status 2."""


def curve(rows: Iterable[dict], key: str) -> Tuple[List[float], List[float]]:
    """(steps, values) of the rows that hold `key`, in step order, keeping the last row of each step (a resumed run
    logs some steps twice); non-finite values logged as strings ('nan', 'inf') become floats, rows whose value or
    step is not a number (or not finite) are left out."""
    by_step = {}
    for row in rows:
        if not isinstance(row, dict) or key not in row or "step" not in row:
            continue
        try:
            step, value = float(row["step"]), float(row[key])
        except (TypeError, ValueError, OverflowError):
            continue
        if math.isfinite(step):
            by_step[step] = value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plottable(steps: Sequence[float], values: Sequence[float]) -> Tuple[List[float], List[float]]:
    """The points of a curve that can be drawn: step and value finite and within +-MAX_PLOTTABLE."""
    kept = [(s, v) for s, v in zip(steps, values)
            if math.isfinite(s) and math.isfinite(v) and abs(s) <= MAX_PLOTTABLE and abs(v) <= MAX_PLOTTABLE]
    return [s for s, _ in kept], [v for _, v in kept]


def file_name(key: str) -> str:
    """A file name for statistic `key`: 'objective/kl_coef' -> 'objective_kl_coef.png'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_") + ".png"


def figure(size: Tuple[float, float]) -> Figure:
    """A matplotlib Figure of `size` inches on the Agg canvas, with constrained layout."""
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path, dpi: int) -> Path:
    """Writes `fig` as a PNG to `path`, atomically (a crash never leaves half a picture); a failed write raises the
    WriteError naming `path`."""
    with writing(path), atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=dpi)
    return Path(path)


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start); same length as `values`."""
    values = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.concatenate([[0.0], values]))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (sums[idx] - sums[lo]) / (idx - lo)


def draw_curve(ax, steps, values, *, ylabel: str, xlabel: Optional[str] = None, title: Optional[str] = None,
               smooth: int = 0, hline: Optional[float] = None, hline_label: Optional[str] = None,
               vlines: Sequence[float] = (), vline_label: Optional[str] = None):
    """One curve on `ax`: the values (markers when there are at most 30), with a trailing moving average of
    `smooth` values when smooth > 1, optional horizontal and vertical reference lines; a note when there are no
    values. Points that cannot be drawn (see `plottable`) are left out."""
    steps, values = plottable(steps, values)
    if not steps:
        ax.text(0.5, 0.5, f"no values of {ylabel}", ha="center", va="center", transform=ax.transAxes)
    elif smooth > 1:
        ax.plot(steps, values, linewidth=0.8, color="tab:blue", alpha=0.35)
        ax.plot(steps, moving_average(values, smooth), linewidth=1.6, color="tab:blue",
                label=f"moving average of {smooth}")
    else:
        ax.plot(steps, values, linewidth=1.4, color="tab:blue", marker="o" if len(steps) <= 30 else None,
                markersize=3)
    for i, x in enumerate(vlines):
        ax.axvline(x, color="0.5", linestyle=":", linewidth=1.0, label=vline_label if i == 0 else None)
    if hline is not None:
        ax.axhline(hline, color="tab:red", linestyle="--", linewidth=1.0, label=hline_label)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    if title is not None:
        ax.set_title(title, fontsize=10)
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def plot_curves(rows: Sequence[dict], keys: Sequence[str], out_path, title: str) -> Path:
    """Draws each statistic of `keys` against "step" from metrics `rows`, one panel per key stacked on a shared
    step axis, into the PNG `out_path` (parent directories are created). Returns the path.

    A key that no row holds gets an empty panel saying so; ValueError if `keys` is empty.
    """
    keys = list(keys)
    if not keys:
        raise ValueError("plot_curves needs at least one statistic name in keys")
    fig = figure((7, 2.6 * len(keys) + 0.6))
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys):
        steps, values = curve(rows, key)
        draw_curve(ax, steps, values, ylabel=key)
    axes[-1].set_xlabel("step")
    fig.suptitle(title)
    return save(fig, out_path, dpi=100)


def plot_run(run_dir, metrics: Dict[str, Path], out_dir) -> List[Path]:
    """Writes one PNG per curve of RUN_CURVES (objective/score, objective/kl, objective/kl_coef, ppo/returns/mean
    and the reward-model loss train_reward/minibatch/loss) into `out_dir`; returns the paths.

    `metrics` maps each source of RUN_CURVES ('policy', 'reward') to its metrics file in `run_dir` (named in titles
    and messages). Statistics not logged (yet) are skipped with a note; PlotError if the run has no metrics file or
    nothing to draw, or if `out_dir` cannot be written. Damaged lines and values that cannot be drawn are left out,
    each with a note.
    """
    run_dir, files = Path(run_dir), {source: Path(path) for source, path in metrics.items()}
    if not any(path.is_file() for path in files.values()):
        raise PlotError(f"{run_dir} has no metrics file ({' or '.join(p.name for p in files.values())}); "
                        f"pass the directory of a train_policy or train_reward run (<save_dir>/<name>)")
    out_dir = Path(out_dir)
    problem = unwritable(out_dir, directory=True)
    if problem is not None:
        raise PlotError(f"cannot write the figures into {out_dir}: {problem}; pass --out with a writable directory")
    rows = {}
    for source, path in files.items():
        rows[source], damaged = load_metrics(path) if path.is_file() else (None, 0)
        if damaged:
            print(f"note: {path}: skipped {damaged} damaged line{'s' * (damaged > 1)} (not a UTF-8 JSON object)")
    written = []
    for source, key in RUN_CURVES:
        if rows[source] is None:
            print(f"note: {files[source]} does not exist; skipping {key}")
            continue
        steps, values = curve(rows[source], key)
        drawable = len(plottable(steps, values)[0])
        if not drawable:
            print(f"note: {files[source]} has no finite values of {key} yet; skipping it")
        else:
            if drawable < len(steps):
                print(f"note: {files[source]}: left out {len(steps) - drawable} value(s) of {key} that are not "
                      f"finite or beyond +-{MAX_PLOTTABLE:g}")
            path = plot_curves(rows[source], [key], out_dir / file_name(key), f"{run_dir.name}: {key}")
            print(f"wrote {path}")
            written.append(path)
    if not written:
        raise PlotError(f"nothing to plot in {run_dir}: its metrics files hold none of "
                        f"{[key for _, key in RUN_CURVES]} yet; plot again once the run has logged a step")
    return written
