"""Atomic file writes and full-state checkpoint directories.

Every file is written to a temporary name, flushed, fsynced and renamed, so a crash or a full disk never leaves a
half-written file under a real name. A checkpoint is a directory `step-<N>` that is first assembled as
`step-<N>.tmp` and renamed when complete; readers only ever look at complete ones. Nothing here unpickles
arbitrary objects: tensors go through safetensors, small state through JSON, optimizer state through
`torch.save` read back with `weights_only=True`.
"""
import io
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_tensors(path, tensors: dict):
    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def atomic_torch_save(path, obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_tensors(path) -> dict:
    from lm_human_preferences.language.trained_models import read_state_dict
    return read_state_dict(path)


def torch_load_safe(path):
    """torch.load restricted to tensors and plain containers (no arbitrary unpickling)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path} is truncated or not a checkpoint file of this project ({e})") from e


STEP_RE = re.compile(r"^step-(\d+)$")


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
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


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
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if keep > 0:
        for old in checkpoint_dirs(final.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint_tensors(path) -> dict:
    return load_file(str(path))
