"""Stage markers for the demo: which stages are complete, and whether their outputs are still intact.

A finished stage writes `<work_dir>/stages/<stage>.json` with its settings, its wall time, its CPU time, a small
dict of results and the sha256 of every output file. A later run skips a stage whose marker exists, whose settings
are the same and whose outputs still hash the same; a missing marker means the stage never finished (it runs
again, resuming where it can), and a marker whose outputs changed means the cache is corrupt (the stage and every
later one run again). A marker that is unreadable or not of this structure counts as not cached, with the reason.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from lm_human_preferences.utils.ckpt import atomic_write_json
from lm_human_preferences.utils.files import writing

MARKER_DIR = "stages"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def expand_outputs(paths: Sequence[Path]) -> list[Path]:
    """The files of `paths`, directories expanded recursively, sorted."""
    files = []
    for path in map(Path, paths):
        files.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    return files


@dataclass
class StageStatus:
    done: bool  # marker present and every output intact
    reason: Optional[str] = None  # why a present marker is not valid (corrupt or missing output); None otherwise
    marker: dict = field(default_factory=dict)


class StageMarkers:
    """The markers of one work directory, for stages in their run order."""

    def __init__(self, work_dir: Path, stages: Sequence[str]):
        self.work_dir = Path(work_dir)
        self.stages = list(stages)

    def path(self, stage: str) -> Path:
        self._check_stage(stage)
        return self.work_dir / MARKER_DIR / f"{stage}.json"

    def _check_stage(self, stage: str) -> None:
        if stage not in self.stages:
            raise ValueError(f"unknown demo stage {stage!r}; the stages are {self.stages}")

    def status(self, stage: str, config: dict) -> StageStatus:
        """Whether `stage` finished with settings `config` (a JSON-able dict) and its outputs are unchanged since."""
        path = self.path(stage)
        if not path.is_file():
            return StageStatus(done=False)
        try:
            marker = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as e:  # unreadable, not UTF-8, not JSON, nested too deep
            return StageStatus(done=False, reason=f"its marker {path} is unreadable ({e})")
        problem = marker_problem(marker, stage)
        if problem is not None:
            return StageStatus(done=False, reason=f"its marker {path} is not a stage marker ({problem})")
        if marker["config"] != _plain_json(config):
            return StageStatus(done=False, reason="it was made with other settings", marker=marker)
        for rel, expected in marker["outputs"].items():
            file = self.work_dir / rel
            if not file.is_file():
                return StageStatus(done=False, reason=f"{file} is missing", marker=marker)
            if file_sha256(file) != expected:
                return StageStatus(done=False, reason=f"{file} is corrupted (its sha256 changed)", marker=marker)
        return StageStatus(done=True, marker=marker)

    def mark_done(self, stage: str, config: dict, outputs: Sequence[Path], *, seconds: float, cpu_seconds: float,
                  results: Optional[dict] = None) -> dict:
        """Records `stage` as complete with the hashes of `outputs` (files or directories under work_dir)."""
        files = expand_outputs(outputs)
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"stage {stage!r} finished without writing {missing[0]}")
        marker = {"stage": stage, "config": _plain_json(config), "seconds": seconds, "cpu_seconds": cpu_seconds, "results": results or {},
                  "outputs": {p.resolve().relative_to(self.work_dir.resolve()).as_posix(): file_sha256(p)
                              for p in files}}
        with writing(self.path(stage)):
            atomic_write_json(self.path(stage), marker)
        return marker

    def invalidate_from(self, stage: str) -> None:
        """Removes the markers of `stage` and of every later stage."""
        for later in self.stages[self.stages.index(stage):]:
            self.path(later).unlink(missing_ok=True)


def marker_problem(marker, stage: str) -> Optional[str]:
    """What makes `marker` (parsed JSON) not the marker `mark_done` writes for `stage`, or None."""
    if not isinstance(marker, dict):
        return f"{json.dumps(marker)[:40]} is not a JSON object"
    missing = [k for k in ("stage", "config", "seconds", "cpu_seconds", "results", "outputs") if k not in marker]
    if missing:
        return f"no {', '.join(missing)}"
    if marker["stage"] != stage:
        return f"it is the marker of stage {marker['stage']!r}"
    for key in ("seconds", "cpu_seconds"):
        value = marker[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            return f"{key} is {value!r}, not a number of seconds"
    if not isinstance(marker["results"], dict):
        return "results is not an object"
    outputs = marker["outputs"]
    if not isinstance(outputs, dict):
        return "outputs is not an object"
    for rel, digest in outputs.items():
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts or "\0" in rel:
            return f"output {rel!r} is not a path inside the work directory"
        if not isinstance(digest, str) or not _SHA256.match(digest):
            return f"the sha256 of output {rel!r} is {digest!r}"
    return None


def remove_paths(paths: Sequence[Path]) -> None:
    """Deletes files and directories (missing ones are fine)."""
    for path in map(Path, paths):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _plain_json(obj):
    """`obj` as it reads back from JSON (tuples become lists), so settings compare equal after a round trip."""
    return json.loads(json.dumps(obj, sort_keys=True))
