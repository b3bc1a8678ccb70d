"""Run directories, atomic file writes, safetensors reading and full-state checkpoint directories.

Every file the project writes goes through `files.atomic_open` (a temporary name in the same directory, flushed,
fsynced and renamed), so a crash or a full disk never leaves a half-written file under a real name. A checkpoint
is a directory `step-<N>` that is first assembled as `step-<N>.tmp` and renamed when complete; readers only ever
look at complete ones. Nothing here unpickles arbitrary objects: tensors go through safetensors, small state
through JSON, optimizer state through `torch.save` read back with `weights_only=True`.

A run directory is never modified by a new run unless the user asked (`--resume` continues it, `--overwrite`
deletes it first); every check of user input happens before the first write (`input_errors` marks that phase).
"""
import contextlib
import errno
import io
import json
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from lm_human_preferences.utils import dist
from lm_human_preferences.utils.download import DownloadError
from lm_human_preferences.utils.files import atomic_write_bytes, replace_dir

STEP_RE = re.compile(r"^step-(\d+)$")


class InputError(ValueError):
    """A user input (setting, file, directory) that cannot work, found before the run wrote anything."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (e.g. a full disk); the previous complete checkpoint is untouched."""


@contextlib.contextmanager
def input_errors():
    """Re-raises the errors of bad user input (bad values, missing/corrupt files, an existing run) as InputError,
    with the same message; wrap every check that runs before a run writes its first file."""
    try:
        yield
    except InputError:
        raise
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError, DownloadError) as e:
        raise InputError(str(e)) from e


@contextlib.contextmanager
def validated_inputs(device):
    """`input_errors` on every rank, then one agreement: if any rank rejected its inputs, every rank raises
    (no rank is left waiting in a collective), and no rank starts writing before all ranks have checked."""
    error = None
    try:
        with input_errors():
            yield
    except InputError as e:
        error = e
    if dist.all_ranks_agree(error is not None, device):
        raise error if error is not None else InputError("another rank rejected the run's inputs; see its error")


# ---- atomic files ------------------------------------------------------------------------------------------

def atomic_write_json(path, obj):
    """JSON (sorted keys, indented) written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_tensors(path, tensors: dict):
    """A safetensors file of `tensors` (moved to CPU, contiguous) written atomically."""
    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def atomic_torch_save(path, obj):
    """torch.save of tensors and plain containers, written atomically (read back with `torch_load_safe`)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


# ---- safe loading ------------------------------------------------------------------------------------------

def load_tensors(path) -> dict:
    """The tensors of a safetensors file; FileNotFoundError if missing, CheckpointError naming it if corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt ({e}); re-create it") from e


def torch_load_safe(path):
    """torch.load restricted to tensors and plain containers (weights_only=True: no arbitrary unpickling).

    FileNotFoundError if missing; ValueError naming the file if it is truncated or holds other objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"refusing to load {path}: it holds objects other than tensors and plain containers, "
                         f"which could run arbitrary code when unpickled ({str(e).splitlines()[0]}); delete this "
                         f"checkpoint and resume from an earlier one") from e
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path} is truncated or not a checkpoint file of this project ({e}); delete this "
                         f"checkpoint and resume from an earlier one") from e


# ---- checkpoint directories --------------------------------------------------------------------------------

def checkpoint_dirs(root) -> list:
    """Complete checkpoint directories under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "COMPLETE").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root):
    """The newest complete checkpoint directory under root, or None."""
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def checkpoint_step(path) -> int:
    """N of a checkpoint directory `step-N`."""
    return int(STEP_RE.match(Path(path).name).group(1))


def remove_stale_tmp(root):
    """Deletes half-assembled `*.tmp` / `*.old` directories left under root by a crash."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and (p.name.endswith(".tmp") or p.name.endswith(".old")):
                shutil.rmtree(p, ignore_errors=True)


def begin_checkpoint(root, step: int) -> Path:
    """A fresh temporary directory for checkpoint `step` (a stale one from a crash is removed)."""
    tmp = Path(root) / f"step-{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(tmp: Path, keep: int) -> Path:
    """Marks `tmp` complete, renames it into place and deletes all but the newest `keep` checkpoints."""
    atomic_write_bytes(tmp / "COMPLETE", b"ok\n")
    final = tmp.with_name(tmp.name[: -len(".tmp")])
    replace_dir(tmp, final)
    if keep > 0:
        for old in checkpoint_dirs(final.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_error(step: int, root, error: OSError) -> CheckpointSaveError:
    """The CheckpointSaveError for a failed save of checkpoint `step`, naming the checkpoint that is still good."""
    previous = latest_checkpoint(root)
    kept = (f"the previous checkpoint {previous} is intact" if previous is not None
            else "no earlier checkpoint exists")
    failure = CheckpointSaveError(f"could not write checkpoint step-{step:08d} under {root} ({error}); {kept}. "
                                  f"Free disk space (or fix the directory) and rerun the same command with --resume")
    failure.errno = error.errno or errno.EIO
    return failure


# ---- run directories ---------------------------------------------------------------------------------------

def truncate_metrics(path, below_step: int):
    """Rewrites a metrics JSONL file keeping only whole records with step < below_step (a resumed run appends
    after them, so a kill between logging and checkpointing leaves no duplicated or torn records)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                continue  # torn last line
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] < below_step:
                kept.append(line)
    atomic_write_bytes(path, b"".join(kept))
