"""Run directories, atomic file writes, safetensors reading and full-state checkpoint directories.

Every file the project writes goes through `files.atomic_open` (a temporary name in the same directory, flushed,
fsynced and renamed), so a crash or a full disk never leaves a half-written file under a real name. A checkpoint
is a directory `step-<N>` that is first assembled as `step-<N>.tmp`, marked COMPLETE once every file is there and
renamed; readers only ever look at complete ones, and `--resume` refuses to pass over incomplete ones. Under
torchrun rank 0 writes the whole run directory, and every rank resumes from the checkpoint rank 0 picks, which it
must see at the same path (`agreed_checkpoint`): run.save_dir has to be on a filesystem every node sees. Nothing
here unpickles arbitrary objects: tensors go through safetensors, small state through JSON, optimizer state
through `torch.save` read back with `weights_only=True`.

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
import socket
import uuid
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from lm_human_preferences.utils import dist
from lm_human_preferences.utils.download import DownloadError
from lm_human_preferences.utils.files import atomic_write_bytes, replace_dir

STEP_RE = re.compile(r"^step-(\d+)$")
COMPLETE_FILE = "COMPLETE"  # written last into a checkpoint directory: "ok <id>", the id unique to that checkpoint
SHARED_FILESYSTEM = ("run.save_dir must be on a filesystem every node sees, at the same path: rank 0 writes the whole "
                     "run directory and every rank reads it")


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

def step_dirs(root) -> list:
    """Every `step-N` directory under root, complete or not, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def is_complete(path) -> bool:
    """Whether checkpoint directory `path` has its COMPLETE marker (written last)."""
    return (Path(path) / COMPLETE_FILE).is_file()


def checkpoint_dirs(root) -> list:
    """Complete checkpoint directories under root, oldest first."""
    return [p for p in step_dirs(root) if is_complete(p)]


def latest_checkpoint(root):
    """The newest complete checkpoint directory under root, or None."""
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def checkpoint_step(path) -> int:
    """N of a checkpoint directory `step-N`."""
    return int(STEP_RE.match(Path(path).name).group(1))


def checkpoint_to_resume(root):
    """The newest complete checkpoint under root (None when root holds no step-N directory at all).

    InputError when step-N directories without a COMPLETE marker are newer than it: resuming would start before
    them (at update 0 when none is complete), cut the logged history back and overwrite them, so the user decides."""
    root = Path(root)
    latest = latest_checkpoint(root)
    after = -1 if latest is None else checkpoint_step(latest)
    incomplete = [p for p in step_dirs(root) if checkpoint_step(p) > after and not is_complete(p)]
    if not incomplete:
        return latest
    names = ", ".join(p.name for p in incomplete)
    paths = " ".join(str(p) for p in incomplete)
    if latest is None:
        raise InputError(f"cannot resume: {root} holds no complete checkpoint, only {names} without a "
                         f"{COMPLETE_FILE} marker (cut short, damaged, or copied or synced incompletely); resuming "
                         f"would start over at update 0 and drop the logged history. To start over, rerun with "
                         f"--overwrite instead of --resume, or delete {paths} and rerun with --resume")
    raise InputError(f"cannot resume: {root} holds {names} without a {COMPLETE_FILE} marker (cut short, damaged, or "
                     f"copied or synced incompletely), newer than the latest complete checkpoint {latest.name}; "
                     f"resuming from {latest.name} would drop the logged history after it. To resume from "
                     f"{latest.name}, delete {paths} and rerun with --resume; to start over, rerun with --overwrite")


def _marker(path) -> Optional[bytes]:
    """The COMPLETE marker of checkpoint directory `path`, None if it cannot be read."""
    try:
        return (Path(path) / COMPLETE_FILE).read_bytes()
    except OSError:
        return None


def check_every_rank_sees(what: str, problem: Optional[str]):
    """Collective: every rank passes its `problem` (None if it found `what`); InputError on every rank if any rank
    has one, naming that rank, its host and the shared-filesystem requirement."""
    reports = dist.all_gather_object(None if problem is None else (socket.gethostname(), problem))
    failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
    if failed:
        rank, (host, problem) = failed[0]
        more = f" (and {len(failed) - 1} other ranks)" if len(failed) > 1 else ""
        raise InputError(f"rank {rank} on host {host}{more} cannot read {what}: {problem}. {SHARED_FILESYSTEM}; put "
                         f"it on shared storage (or copy the run directory to every node) and rerun")


def agreed_checkpoint(root, is_main: bool):
    """Collective: the checkpoint every rank resumes from, or None (start at update 0).

    Rank 0 picks it (`checkpoint_to_resume`, whose InputError every rank raises) and sends its name and marker;
    every other rank takes that name under its own `root` and must find the same marker there, else every rank
    raises InputError naming the shared-filesystem requirement."""
    choice = None
    if is_main:
        try:
            with input_errors():  # any failure to read becomes one that every rank raises, never a lone rank
                latest = checkpoint_to_resume(root)
                choice = ("ok", None, None) if latest is None else ("ok", latest.name, _marker(latest))
        except InputError as e:
            choice = ("error", str(e), None)
    kind, name, marker = dist.broadcast_object(choice)
    if kind == "error":
        raise InputError(name)
    if name is None:
        return None
    path = Path(root) / name
    problem = None
    if not is_main:
        found = _marker(path)
        if found is None:
            problem = f"{path / COMPLETE_FILE} does not exist"
        elif found != marker:
            problem = f"{path} is another checkpoint than rank 0's (its {COMPLETE_FILE} marker differs)"
    check_every_rank_sees(f"checkpoint {name}, which rank 0 resumes from", problem)
    return path


def remove_stale_tmp(root):
    """Deletes half-assembled `*.tmp` / `*.old` directories left under root by a crash."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and (p.name.endswith(".tmp") or p.name.endswith(".old")):
                shutil.rmtree(p, ignore_errors=True)


def begin_checkpoint(root, step: int) -> Path:
    """A fresh temporary directory for checkpoint `step` (a stale one from a crash is removed)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step {step!r} must be an integer >= 0")
    tmp = Path(root) / f"step-{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(tmp: Path, keep: int, files=()) -> Path:
    """Checks that every name in `files` was written to `tmp`, marks it complete, renames it into place and deletes
    all but the newest `keep` checkpoints."""
    missing = [f for f in files if not (tmp / f).is_file()]
    if missing:
        raise OSError(errno.ENOENT, f"{', '.join(missing)} missing from {tmp}")
    atomic_write_bytes(tmp / COMPLETE_FILE, f"ok {uuid.uuid4().hex}\n".encode())
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

def truncate_metrics(path, below_step: int, key: str = "step"):
    """Rewrites a metrics JSONL file keeping only whole records with step < below_step (a resumed run appends
    after them, so a kill between logging and checkpointing leaves no duplicated or torn records); `key` names
    the records' step field ('update' in training_samples.jsonl)."""
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
            if isinstance(record, dict) and isinstance(record.get(key), int) and record[key] < below_step:
                kept.append(line)
    atomic_write_bytes(path, b"".join(kept))
