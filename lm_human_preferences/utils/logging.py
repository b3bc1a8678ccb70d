"""One logging path: a local JSONL metrics file always, wandb when available, tqdm progress, all on rank 0 only."""
import json
import math
import os
import sys
from pathlib import Path


def wandb_mode(setting: str) -> str:
    """'auto' is online when an API key is configured and offline otherwise (nothing depends on a wandb account)."""
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class Logger:
    """Appends metrics to the JSONL file `metrics_path` (one object per step) and logs them to wandb (its files
    under the metrics file's directory); a no-op on ranks other than 0."""

    def __init__(self, *, is_main: bool, metrics_path, config: dict, wandb_setting="auto",
                 wandb_project="lm-human-preferences", run_name=None, wandb_id=None):
        self.is_main = is_main
        self.wandb_run = None
        self.metrics_path = None
        self.wandb_id = wandb_id
        if not is_main:
            return
        if metrics_path is not None:
            self.metrics_path = Path(metrics_path)
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        mode = wandb_mode(wandb_setting)
        if mode != "disabled":
            try:
                import wandb
            except ImportError:
                print("wandb is not installed; logging only to the local metrics file", file=sys.stderr)
            else:
                wandb_dir = self.metrics_path.parent if self.metrics_path else None
                self.wandb_run = wandb.init(project=wandb_project, name=run_name, config=config, mode=mode,
                                            dir=str(wandb_dir) if wandb_dir else None, id=wandb_id,
                                            resume="allow" if wandb_id else None, reinit="create_new")
                self.wandb_id = self.wandb_run.id

    def log(self, stats: dict, step: int):
        if not self.is_main:
            return
        record = {"step": step, **{k: _plain(v) for k, v in stats.items()}}
        if self.metrics_path is not None:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(stats, step=step)

    def finish(self):
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _plain(v):
    v = float(v) if hasattr(v, "__float__") else v
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path) -> list:
    """Reads a metrics JSONL file, skipping a torn last line of a run still being written."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def format_stats(stats: dict) -> str:
    return "\n".join(f"{k} = {v:.6g}" if isinstance(v, float) else f"{k} = {v}" for k, v in sorted(stats.items()))
