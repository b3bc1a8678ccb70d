"""Curves of a run as PNG pictures, from its local metrics files: `python launch.py plot <run_dir>`.

Reads `<run_dir>/train_policy_metrics.jsonl` and `<run_dir>/train_reward_metrics.jsonl` (one JSON object per line
with "step" and the statistics, see utils/logging.py); a run still being written is fine, its torn last line is
skipped. Drawing uses matplotlib's Agg canvas directly, so no display and no pyplot global state are involved.
"""
import math
import re
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from lm_human_preferences.utils.hyperparams import HParamsError
from lm_human_preferences.utils.logging import read_metrics

POLICY_METRICS_FILE = "train_policy_metrics.jsonl"
REWARD_METRICS_FILE = "train_reward_metrics.jsonl"
# (metrics file, statistic) pairs that plot_run draws, one PNG each
RUN_CURVES: Tuple[Tuple[str, str], ...] = (
    (POLICY_METRICS_FILE, "objective/score"),
    (POLICY_METRICS_FILE, "objective/kl"),
    (POLICY_METRICS_FILE, "objective/kl_coef"),
    (POLICY_METRICS_FILE, "ppo/returns/mean"),
    (REWARD_METRICS_FILE, "train_reward/minibatch/loss"),
)
PLOTS_DIR = "plots"


class PlotError(HParamsError):
    """A run directory with nothing to plot; an HParamsError, so launch.py prints it as `error: <message>` and
    exits with status 2."""


def curve(rows: Iterable[dict], key: str) -> Tuple[List[float], List[float]]:
    """(steps, values) of the rows that hold `key`; non-finite values logged as strings ('nan', 'inf') become
    floats, rows whose value or step is not a number are left out."""
    steps, values = [], []
    for row in rows:
        if key not in row or "step" not in row:
            continue
        try:
            step, value = float(row["step"]), float(row[key])
        except (TypeError, ValueError):
            continue
        steps.append(step)
        values.append(value)
    return steps, values


def file_name(key: str) -> str:
    """A file name for statistic `key`: 'objective/kl_coef' -> 'objective_kl_coef.png'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_") + ".png"


def plot_curves(rows: Sequence[dict], keys: Sequence[str], out_path, title: str) -> Path:
    """Draws each statistic of `keys` against "step" from metrics `rows`, one panel per key stacked on a shared
    step axis, into the PNG `out_path` (parent directories are created). Returns the path.

    A key that no row holds gets an empty panel saying so; ValueError if `keys` is empty.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = list(keys)
    if not keys:
        raise ValueError("plot_curves needs at least one statistic name in keys")
    fig = Figure(figsize=(7, 2.6 * len(keys) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys):
        steps, values = curve(rows, key)
        if steps:
            ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, linewidth=1.2)
        else:
            ax.text(0.5, 0.5, f"no values of {key}", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.suptitle(title)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    return out_path


def _has_finite(rows: Sequence[dict], key: str) -> bool:
    """True if some row holds a finite number for `key`."""
    return any(math.isfinite(v) for v in curve(rows, key)[1])


def plot_run(run_dir, out: Optional[str] = None) -> List[Path]:
    """Writes one PNG per curve of RUN_CURVES (objective/score, objective/kl, objective/kl_coef, ppo/returns/mean
    and the reward-model loss train_reward/minibatch/loss) into `out` (default `<run_dir>/plots`); returns the
    paths. Statistics not logged (yet) are skipped with a note; PlotError if the run has no metrics file or
    nothing to draw.
    """
    run_dir = Path(run_dir)
    files = {name: run_dir / name for name in (POLICY_METRICS_FILE, REWARD_METRICS_FILE)}
    if not any(path.is_file() for path in files.values()):
        raise PlotError(f"{run_dir} has no metrics file ({POLICY_METRICS_FILE} or {REWARD_METRICS_FILE}); "
                        f"pass the directory of a train_policy or train_reward run (<save_dir>/<name>)")
    rows = {name: read_metrics(path) if path.is_file() else None for name, path in files.items()}
    out_dir = Path(out) if out is not None else run_dir / PLOTS_DIR
    written = []
    for name, key in RUN_CURVES:
        if rows[name] is None:
            print(f"note: {files[name]} does not exist; skipping {key}")
        elif not _has_finite(rows[name], key):
            print(f"note: {files[name]} has no finite values of {key} yet; skipping it")
        else:
            path = plot_curves(rows[name], [key], out_dir / file_name(key), f"{run_dir.name}: {key}")
            print(f"wrote {path}")
            written.append(path)
    if not written:
        raise PlotError(f"nothing to plot in {run_dir}: its metrics files hold none of "
                        f"{[key for _, key in RUN_CURVES]} yet; plot again once the run has logged a step")
    return written
