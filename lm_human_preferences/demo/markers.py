"""Stage markers for the demo: which stages are complete, and whether their outputs are still intact.

A finished stage writes `<work_dir>/stages/<stage>.json` with its settings, its wall time, its CPU time, a small
dict of results and the sha256 of every output file. A later run skips a stage whose marker exists, whose settings
are the same and whose outputs still hash the same; a missing marker means the stage never finished (it runs
again, resuming where it can), and a marker whose outputs changed means the cache is corrupt (the stage and every
later one run again).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from lm_human_preferences.utils.ckpt import atomic_write_json

MARKER_DIR = "stages"


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
            outputs = marker["outputs"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            return StageStatus(done=False, reason=f"its marker {path} is unreadable ({e})")
        if marker.get("config") != _plain_json(config):
            return StageStatus(done=False, reason="it was made with other settings", marker=marker)
        for rel, expected in outputs.items():
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
        atomic_write_json(self.path(stage), marker)
        return marker

    def invalidate_from(self, stage: str) -> None:
        """Removes the markers of `stage` and of every later stage."""
        for later in self.stages[self.stages.index(stage):]:
            self.path(later).unlink(missing_ok=True)


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
