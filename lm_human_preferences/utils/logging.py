"""One logging path: a local JSONL metrics file always, wandb when available, tqdm progress, all on rank 0 only."""
import json
import math
import os
import sys
from pathlib import Path
from typing import List, Sequence, Tuple

from lm_human_preferences.utils.files import append_all, writing


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
        self._sample_rows = []  # every row of the samples table so far (log_samples)
        if not is_main:
            return
        if metrics_path is not None:
            self.metrics_path = Path(metrics_path)
            with writing(self.metrics_path):
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
        """Appends one record; a failed append (a full disk) leaves no partial record and raises the WriteError of
        the metrics file."""
        if not self.is_main:
            return
        record = {"step": step, **{k: _plain(v) for k, v in stats.items()}}
        if self.metrics_path is not None:
            with writing(self.metrics_path), open(self.metrics_path, "ab", buffering=0) as f:
                append_all(f, (json.dumps(record) + "\n").encode())
        if self.wandb_run is not None:
            self.wandb_run.log(stats, step=step)

    def log_samples(self, records: List[dict], step: int, columns: Sequence[str], key: str = "training_samples"):
        """Logs sample records (dicts with the keys `columns`) to wandb as one table under `key`, holding every
        record logged so far (and those of `add_sample_history`), so that one table shows them all keyed by their
        update column; a no-op without wandb (and on ranks other than 0)."""
        if self.wandb_run is None:
            return
        import wandb
        self._sample_rows.extend([record.get(c) for c in columns] for record in records)
        self.wandb_run.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in self._sample_rows])},
                           step=step)

    def add_sample_history(self, records: List[dict], columns: Sequence[str]):
        """Records logged before a resume: the next `log_samples` table starts with them; a no-op without wandb."""
        if self.wandb_run is not None:
            self._sample_rows.extend([record.get(c) for c in columns] for record in records)

    def finish(self):
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _plain(v):
    v = float(v) if hasattr(v, "__float__") else v
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def load_metrics(path) -> Tuple[List[dict], int]:
    """(the records of a metrics JSONL file, the number of damaged lines skipped). A line is a record if it is a
    UTF-8 JSON object; blank lines and a torn last line (no newline: a run still being written) are skipped without
    being counted."""
    rows, damaged = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line.decode("utf-8"))
            except (ValueError, RecursionError):  # not UTF-8, not JSON, a number too long, nested too deep
                record = None
            if isinstance(record, dict):
                rows.append(record)
            elif line.strip() and line.endswith(b"\n"):
                damaged += 1
    return rows, damaged


def read_metrics(path) -> List[dict]:
    """The records of a metrics JSONL file (`load_metrics` without the count of damaged lines)."""
    return load_metrics(path)[0]


def format_stats(stats: dict) -> str:
    return "\n".join(f"{k} = {v:.6g}" if isinstance(v, float) else f"{k} = {v}" for k, v in sorted(stats.items()))
