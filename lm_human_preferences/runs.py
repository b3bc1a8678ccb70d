"""The run layer: a run directory's layout, the models a task needs, and the one rollout-scoring path.

Every command builds from here. `train_reward` and `train_policy` build their models for a task and write where
`RunDir` says; `sample` loads a policy from a run directory; the demo's evaluation and the benchmark score rollouts
with `rollout`, the same function `PPOTrainer` calls.

A run directory (`<save_dir>/<run name>`, `RunDir`):

    train_reward_hparams.json    train_reward_metrics.jsonl    reward_model/{model.safetensors, hparams.json, encoding}
    train_policy_hparams.json    train_policy_metrics.jsonl    policy/{hparams.json, encoding, checkpoints/step-N/{model.safetensors, optimizer.pt, state.json,
                                                         sampler.json, rng-vrank<v>.pt}}
    training_samples.jsonl (held-out samples over training, run.sample_interval)
    samples.jsonl (written by `sample`)    plots/*.png (written by `plot`)    wandb/ (wandb's own files)
    eval.json (written by `evaluate`, its default --out)
    .lmhp_run (the marker: this project made the directory)    .lmhp_lock (locked by the process using it)

One process at a time trains in a run directory (rank 0 under torchrun holds `.lmhp_lock`), and `--overwrite`
deletes only a directory that holds a run of this project and nothing else. `sample` and `plot` take no lock: they
read only complete checkpoints and whole metrics records, and write their own files atomically, so they may run
beside a training.
"""
import atexit
import fcntl
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lm_human_preferences.hparams import TrainPolicyHParams
from lm_human_preferences.language.encodings import ENCODING_NAMES, get_encoding
from lm_human_preferences.language.model import GPT2
from lm_human_preferences.language.sample import draw_uniforms
from lm_human_preferences.language.trained_models import (check_state_dict, check_tensor_values, load_model,
                                                          read_model_config)
from lm_human_preferences.lm_tasks import penalized_scores, postprocess_responses, responses_valid
from lm_human_preferences.policy import Policy
from lm_human_preferences.rewards import RewardModel
from lm_human_preferences.utils import ckpt, dist
from lm_human_preferences.utils.ckpt import CheckpointError
from lm_human_preferences.utils.files import replace_dir, writing
from lm_human_preferences.utils.hyperparams import HParamsError, with_resolved
from lm_human_preferences.utils.training import chunks

RUN_MARKER = ".lmhp_run"  # JSON in every run directory this project made (--overwrite deletes no other directory)
LOCK_FILE = ".lmhp_lock"  # flock'ed by the one process using the run directory; holds its pid and host
_ATOMIC_TMP = re.compile(r"^\.(.+)\.\d+-[0-9a-f]{8}\.tmp$")  # files.atomic_open's temporary name of <name>
MODEL_FILE = "model.safetensors"  # weights of a model directory (reward_model/, a checkpoint step-N/)
CONFIG_FILE = "hparams.json"  # GPT-2 shape of a model directory
ENCODING_FILE = "encoding"  # 'main' or 'test', as JSON
# a policy checkpoint policy/checkpoints/step-N/ also holds:
STATE_FILE = "state.json"  # global_step, KL controller, virtual ranks, wandb id
OPTIMIZER_FILE = "optimizer.pt"  # Adam moments (torch.save, read back with weights_only=True)
SAMPLER_FILE = "sampler.json"  # the query stream's position, the same for every virtual rank


def rng_file(vrank: int) -> str:
    """The random streams of one virtual rank, in a checkpoint."""
    return f"rng-vrank{vrank}.pt"


@dataclass(frozen=True)
class RunDir:
    """Where everything of one run lives; `RunDir(path).checkpoints` and so on."""
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    reward_hparams = property(lambda self: self.path / "train_reward_hparams.json")
    reward_metrics = property(lambda self: self.path / "train_reward_metrics.jsonl")
    reward_model = property(lambda self: self.path / "reward_model")
    reward_model_tmp = property(lambda self: self.path / "reward_model.tmp")  # assembled, then renamed
    policy_hparams = property(lambda self: self.path / "train_policy_hparams.json")
    policy_metrics = property(lambda self: self.path / "train_policy_metrics.jsonl")
    policy = property(lambda self: self.path / "policy")
    checkpoints = property(lambda self: self.path / "policy" / "checkpoints")
    samples = property(lambda self: self.path / "samples.jsonl")  # written by `sample`
    evaluation = property(lambda self: self.path / "eval.json")  # written by `evaluate` (its default --out)
    training_samples = property(lambda self: self.path / "training_samples.jsonl")  # by train_policy
    plots = property(lambda self: self.path / "plots")  # written by `plot`
    marker = property(lambda self: self.path / RUN_MARKER)
    lock = property(lambda self: self.path / LOCK_FILE)

    def outputs(self) -> list:
        """Everything the training commands write here; any of them present means a run exists."""
        return [self.policy, self.reward_model, self.reward_model_tmp, self.policy_metrics, self.reward_metrics,
                self.policy_hparams, self.reward_hparams, self.training_samples]

    def check_new_or(self, *, resume: bool, overwrite: bool):
        """FileExistsError if a run is already here and neither --resume nor --overwrite was given."""
        found = [p.name for p in self.outputs() if p.exists()]
        if found and not resume and not overwrite:
            raise FileExistsError(f"run directory {self.path} already holds a run ({', '.join(found)}); rerun with "
                                  f"--resume to continue it, --overwrite to delete it and start over, or choose "
                                  f"another run name")

    def reward_model_complete(self) -> bool:
        """Whether a finished reward model is here."""
        return all((self.reward_model / f).is_file() for f in (MODEL_FILE, CONFIG_FILE, ENCODING_FILE))

    def own_names(self) -> set:
        """The names this project writes at the top of a run directory."""
        return {p.name for p in (*self.outputs(), self.samples, self.evaluation, self.plots, self.marker,
                                 self.lock)} | {
            self.reward_model.name + ".old", "wandb"}

    def foreign_entries(self) -> list:
        """The entries of the directory that this project did not write (an interrupted atomic write's temporary
        file of one of its own files counts as its own), sorted."""
        own = self.own_names()
        tmp_of = (lambda name: m.group(1) if (m := _ATOMIC_TMP.match(name)) else None)
        return sorted(p.name for p in self.path.iterdir() if p.name not in own and tmp_of(p.name) not in own)

    def holds_run(self) -> bool:
        """Whether this project made the directory: its marker, or (a run from before the marker) a hyperparameter
        or metrics file of a training command."""
        return any(p.is_file() for p in (self.marker, self.policy_hparams, self.reward_hparams, self.policy_metrics,
                                         self.reward_metrics))

    def check_usable(self, *, overwrite: bool):
        """RunError unless a run can live here: the path is a directory or absent (and its parent a directory), is
        not inside another run's directory, and - for `overwrite`, which deletes it - is a real directory (no
        symlink) holding a run of this project and nothing else."""
        path = self.path
        if path.is_symlink():
            target = os.readlink(path)
            if not path.exists():
                raise RunError(f"run directory {path} is a symlink to {target}, which does not exist; remove the "
                               f"link or create its target")
            if overwrite:
                raise RunError(f"run directory {path} is a symlink (to {target}); --overwrite deletes only a real run "
                               f"directory: pass the run directory itself (--save_dir and a run name under it)")
        if path.exists() and not path.is_dir():
            raise RunError(f"run directory {path} exists but is not a directory; move it away or choose another run "
                           f"name")
        parent = path.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise RunError(f"{parent} is a file, so the run directory {path} cannot be created under it; pass a "
                           f"--save_dir that is a directory")
        for outer in Path(os.path.realpath(path)).parents:
            if (outer / RUN_MARKER).is_file():
                raise RunError(f"run directory {path} is inside the run directory {outer}; choose a run name and "
                               f"--save_dir outside every run directory")
        if overwrite and path.is_dir():
            foreign = self.foreign_entries()
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise RunError(f"--overwrite deletes only a run directory this project wrote, and {path} holds "
                               f"what it did not write ({shown}); move that away, or choose another run name")
            if not self.holds_run() and any(p.name != LOCK_FILE for p in path.iterdir()):
                found = ", ".join(sorted(p.name for p in path.iterdir()))
                raise RunError(f"--overwrite deletes only a run directory this project wrote, and {path} holds "
                               f"no run (no {RUN_MARKER} marker or hyperparameter file, only {found}); delete it "
                               f"yourself if it is no longer needed, or choose another run name")

    def clear(self):
        """Deletes everything in the directory except the lock file, which the process deleting it holds
        (--overwrite, after `check_usable(overwrite=True)` and every other input check passed)."""
        for p in self.path.iterdir():
            if p.name == LOCK_FILE:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def write_marker(self, hp):
        """The marker that says this project made the directory (kept from the run's first start)."""
        if not self.marker.is_file():
            ckpt.atomic_write_json(self.marker, {"written_by": "lm_human_preferences", "hparams": type(hp).__name__,
                                                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


class RunError(HParamsError):
    """A run directory that cannot be used (missing, not written by train_policy, without a checkpoint) or a
    command argument that cannot work; an HParamsError, so launch.py prints `error: <message>` and exits with 2."""


def train_command(run_dir: Path) -> str:
    """The command that creates a policy run at `run_dir`."""
    return f"python launch.py train_policy <experiment> {run_dir.name} --save_dir {run_dir.parent}"


def run_dir_path(save_dir: str, name: str) -> str:
    """`<save_dir>/<name>`; RunError unless `name` is relative, without '..', and names a directory strictly inside
    `save_dir` however it is spelled ('.', './', 'a/.', trailing slashes, symlinks are resolved first)."""
    rule = "a run name is a relative path without '..' naming a directory under --save_dir, such as my_run"
    if not name.strip() or "\0" in name + save_dir:
        raise RunError(f"run name {name!r} (with --save_dir {save_dir!r}) is empty or holds a NUL character; {rule}")
    if os.path.isabs(name) or ".." in name.split(os.sep):
        raise RunError(f"run name {name!r} is absolute or holds '..'; {rule} (pass the parent as --save_dir)")
    if os.path.normpath(name) == ".":
        raise RunError(f"run name {name!r} names the save directory {save_dir} itself; {rule}")
    path = os.path.join(save_dir, os.path.normpath(name))
    real_save, real_run = os.path.realpath(save_dir), os.path.realpath(path)
    if real_run == real_save or os.path.commonpath([real_save, real_run]) != real_save:
        where = "the save directory itself" if real_run == real_save else f"outside the save directory {real_save}"
        raise RunError(f"run directory {path} is {real_run} through a symlink, {where}; remove the link or "
                       f"choose another run name")
    return path


# ---- one process per run directory -------------------------------------------------------------------------

class RunLock:
    """An exclusive flock on a run directory's lock file, taken with `acquire`.

    The kernel drops it when the file is closed or the process ends (SIGKILL included), so it is never stale; a
    second process, or a second open of the file in this process, cannot take it meanwhile."""

    def __init__(self, path: Path, file, made: list):
        self.path, self.file = path, file
        self.made = made  # the directories `acquire` created, outermost first

    @classmethod
    def acquire(cls, run_dir: RunDir) -> "RunLock":
        """Creates the run directory if needed and locks it, writing this process's pid and host into the lock file;
        RunError naming the holder's pid and host if another process has it."""
        made, missing, d = [], [], run_dir.path
        while not (d.exists() or d.is_symlink()):
            missing.append(d)
            d = d.parent
        try:
            for d in reversed(missing):
                d.mkdir()
                made.append(d)
            for _ in range(10):  # the lock file may be replaced between opening and locking it: lock the new one
                file = os.fdopen(os.open(run_dir.lock, os.O_RDWR | os.O_CREAT, 0o644), "r+")
                try:
                    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    file.close()
                    _remove_empty(made)
                    raise RunError(f"run directory {run_dir.path} is in use by {_lock_holder(run_dir.lock)}; wait "
                                   f"for that run to end (or stop it) and rerun, or choose another run name") from None
                if _same_file(file, run_dir.lock):
                    break
                file.close()
            else:
                raise RunError(f"could not lock {run_dir.lock}: it keeps being replaced")
            file.seek(0)
            file.truncate()
            file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                   "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
            file.flush()
        except OSError as e:
            _remove_empty(made)
            raise RunError(f"cannot lock the run directory {run_dir.path} ({e}); it must be a writable directory on "
                           f"a filesystem with file locks") from e
        return cls(run_dir.lock, file, made)

    def holds(self, run_dir: RunDir) -> bool:
        """Whether this is the lock of `run_dir` (wherever the directory has moved, however it is spelled)."""
        return not self.file.closed and _same_file(self.file, run_dir.lock)

    def release(self, *, remove_created: bool = False):
        """Deletes the lock file (while still holding it) and unlocks; with `remove_created` also the directories
        `acquire` created, where they are still empty."""
        if self.file.closed:
            return
        if _same_file(self.file, self.path):
            self.path.unlink(missing_ok=True)
        self.file.close()
        if remove_created:
            _remove_empty(self.made)


def _same_file(file, path: Path) -> bool:
    """Whether the open `file` is what `path` names now."""
    try:
        a, b = os.fstat(file.fileno()), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _remove_empty(dirs: list):
    """Removes the directories of `dirs` (outermost first) that are empty, innermost first."""
    for d in reversed(dirs):
        try:
            d.rmdir()
        except OSError:
            pass


def _lock_holder(lock: Path) -> str:
    """'pid N on host H (since T)' from a held lock file (its holder writes it right after locking)."""
    for _ in range(20):
        try:
            holder = json.loads(lock.read_text())
            return f"pid {holder['pid']} on host {holder['host']} (since {holder['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return f"another process (its pid and host are not in {lock})"


_held: Optional[RunLock] = None  # the run lock of this process (one run at a time), held until the next or exit


def hold_run_lock(run_dir: RunDir) -> tuple:
    """(the lock of `run_dir` for this process, whether it was taken now): a lock this process already holds on
    the same directory is kept (the demo's reward and policy stages), any other it holds is released first."""
    global _held
    if _held is not None and _held.holds(run_dir):
        return _held, False
    release_run_lock()
    _held = RunLock.acquire(run_dir)
    return _held, True


@atexit.register
def release_run_lock(*, remove_created: bool = False):
    """Releases this process's run lock, if it holds one (done at exit; the kernel drops it after a kill)."""
    global _held
    if _held is not None:
        _held.release(remove_created=remove_created)
        _held = None


def open_run(hp, run_dir: Optional[RunDir], *, resume: bool, overwrite: bool, prepare):
    """The start of both training commands; returns (DistInfo, prepare's result).

    Checks the settings and the world size (before any collective, so every rank fails alike), starts the process
    group, then on every rank checks the run directory (a usable path; an existing run needs `resume` or
    `overwrite`), with rank 0 first taking the run directory's lock (another process using it is an input error),
    and calls `prepare(info)`, which loads and checks every other input and writes nothing; a collective in
    `prepare` must be one every rank reaches, so a load that may fail on one rank only (a file on one node's disk)
    is agreed on first (`ckpt.validated_inputs`, as the trainers' `build_trainer` do before they broadcast rank 0's
    weights), and no rank waits in a collective that a failed rank skipped. If any rank fails,
    rank 0 releases the lock and removes the directories it created. Only when every rank has passed does rank 0
    clear the old run for `overwrite` and write the run marker; all ranks then start together. Rank 0 keeps the
    lock until the process ends or opens another run.
    """
    hp.validate()
    with ckpt.input_errors():
        hp.check_world_size(dist.env_info(hp.run.device).world_size)
    info = dist.init_distributed(hp.run.device)
    taken = False
    try:
        with ckpt.validated_inputs(info.device):
            if run_dir is not None:
                run_dir.check_usable(overwrite=overwrite)
                if info.is_main:
                    _, taken = hold_run_lock(run_dir)
                run_dir.check_new_or(resume=resume, overwrite=overwrite)
        with ckpt.validated_inputs(info.device):  # apart: a rank that failed above must not skip prepare's collectives
            prepared = prepare(info)
    except BaseException:
        if taken:
            release_run_lock(remove_created=True)
        raise
    if info.is_main and run_dir is not None:
        if overwrite:
            run_dir.clear()  # after every input check passed, keeping the lock
        run_dir.write_marker(hp)
    dist.barrier()
    return info, prepared


# ---- the models of a task ----------------------------------------------------------------------------------

def encoding_name(initial_model: str) -> str:
    """The `test` model uses the 27-character test encoding; every GPT-2 uses the BPE."""
    return "test" if initial_model == "test" else "main"


TOKEN_ID_SETTINGS = ("truncate_token",)  # the task settings that hold a token id


def task_encodings(task):
    """(encoding, prefix token ids, suffix token ids) for a task; ValueError naming the setting for a token id
    setting outside the encoding's vocabulary."""
    enc = get_encoding(encoding_name(task.policy.initial_model))
    check_token_ids(task, enc)
    return enc, enc.encode(task.query_prefix), enc.encode(task.query_suffix)


def check_token_ids(task, enc):
    """ValueError unless every token id setting of `task` is None or an id of `enc`'s vocabulary (a sampled
    response holds only those: any other id never matches, so every score would be the penalty)."""
    for name in TOKEN_ID_SETTINGS:
        token = getattr(task, name)
        if token is None or 0 <= token < enc.n_vocab:
            continue
        what = (f"the padding token {enc.padding_token}" if token == enc.padding_token else
                f"outside the vocabulary [0, {enc.n_vocab})")
        raise ValueError(f"'task.{name}' = {token} is {what} of the {enc.name!r} encoding, so no response "
                         f"can contain it: pass a token id in [0, {enc.n_vocab})")


def check_fits_context(task, n_ctx: int, prefix, suffix):
    """ValueError unless prefix + query + suffix + response fit the model's context."""
    total = len(prefix) + task.query_length + len(suffix) + task.response_length
    if total > n_ctx:
        raise ValueError(f"prefix ({len(prefix)}) + query_length ({task.query_length}) + suffix ({len(suffix)}) + "
                         f"response_length ({task.response_length}) = {total} tokens exceeds the model's n_ctx={n_ctx}; "
                         f"shorten task.query_length or task.response_length")


def make_policy(model: GPT2, task, enc, prefix, suffix, *, temperature: Optional[float] = None,
                frozen: bool) -> Policy:
    """A Policy around `model` for `task` (in eval mode: dropout is never active); `frozen` turns gradients off."""
    check_fits_context(task, model.config.n_ctx, prefix, suffix)
    policy = Policy(model, temperature=task.policy.temperature if temperature is None else temperature,
                    padding_token=enc.padding_token, prefix_tokens=prefix, suffix_tokens=suffix)
    if frozen:
        policy.requires_grad_(False)
    return policy.eval()


def build_policy(task, enc, prefix, suffix, device, *, frozen: bool) -> Policy:
    """The task's initial policy (task.policy.initial_model with a value head): the reference policy when
    `frozen`, the policy PPO trains otherwise."""
    model = load_model(task.policy.initial_model, ["value"], n_vocab=enc.n_vocab, device=device)
    return make_policy(model, task, enc, prefix, suffix, frozen=frozen).to(device)


def build_reward_model(task, enc, device) -> RewardModel:
    """A reward model to train: the task's initial model with a fresh reward head, gain 1 and bias 0."""
    model = load_model(task.policy.initial_model, ["reward"], n_vocab=enc.n_vocab, device=device)
    return RewardModel(model, padding_token=enc.padding_token).to(device).eval()


def save_reward_model(run_dir: RunDir, reward_model: RewardModel, hp, enc_name: str,
                      device: torch.device = torch.device("cpu")):
    """Writes train_reward_hparams.json, then reward_model/{model.safetensors, hparams.json, encoding} assembled as
    reward_model.tmp/ and renamed, so a reward_model/ directory is always complete. A failed write (a full disk)
    removes reward_model.tmp/ and raises the WriteError naming the file or directory."""
    tmp = run_dir.reward_model_tmp
    sd = dict(reward_model.model.state_dict())
    sd["reward_norm.gain"] = reward_model.gain.detach()
    sd["reward_norm.bias"] = reward_model.bias.detach()
    with writing(run_dir.reward_hparams):
        write_run_hparams(run_dir.reward_hparams, hp, device)
    with writing(run_dir.reward_model):
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            ckpt.atomic_save_tensors(tmp / MODEL_FILE, sd)
            ckpt.atomic_write_json(tmp / CONFIG_FILE, reward_model.model.config.to_dict())
            ckpt.atomic_write_json(tmp / ENCODING_FILE, enc_name)
            replace_dir(tmp, run_dir.reward_model)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back
            raise


def check_space_for_reward_model(run_dir: RunDir, reward_model: RewardModel):
    """ValueError if the file system of `run_dir` has less free space than the reward model's weights take; checked
    before training, so that a full disk does not throw away a finished reward training."""
    need = sum(t.numel() * t.element_size() for t in reward_model.state_dict().values())
    where = run_dir.path
    while not where.exists():
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return  # no figure to check against; the save reports a full disk itself
    if free < need:
        size = lambda n: f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"  # noqa: E731
        raise ValueError(f"the reward model will take {size(need)}, but the file system of {where} has only "
                         f"{size(free)} free; free disk space or choose another --save_dir before training")


def load_reward_model(path: Optional[str], *, n_vocab: int, padding_token: int, device="cpu") -> RewardModel:
    """A frozen reward model from a reward run's `reward_model/` directory ('test': a random test model)."""
    if path is None:
        raise ValueError("no reward model: set rewards.trained_model to a reward run's reward_model/ directory or "
                         "turn on rewards.train_new_model")
    if path == "test":
        rm = RewardModel(load_model("test", ["reward"], n_vocab=n_vocab), padding_token=padding_token)
    else:
        d = Path(path)
        missing = [f for f in (MODEL_FILE, CONFIG_FILE) if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(f"reward model directory {d} lacks {', '.join(missing)}; point "
                                    f"rewards.trained_model at the reward_model/ directory a train_reward run wrote")
        config = read_model_config(d)
        if config.n_vocab != n_vocab:
            raise CheckpointError(f"reward model {d} has n_vocab={config.n_vocab} but the task's encoding has {n_vocab}")
        sd = ckpt.load_tensors(d / MODEL_FILE)
        for key in ("reward_norm.gain", "reward_norm.bias"):
            if key not in sd:
                raise CheckpointError(f"{d / MODEL_FILE} has no {key!r}; it was not written by train_reward")
        rm = RewardModel(GPT2(config, ["reward"]), padding_token=padding_token)
        gain, bias = sd.pop("reward_norm.gain"), sd.pop("reward_norm.bias")
        for key, t in (("reward_norm.gain", gain), ("reward_norm.bias", bias)):
            if t.dim() != 0:
                raise CheckpointError(f"checkpoint tensor {key!r} in {d / MODEL_FILE} has shape {tuple(t.shape)}, "
                                      f"expected a scalar; it was not written by train_reward")
            check_tensor_values(key, t, d / MODEL_FILE)
        check_state_dict(rm.model, sd, allow_missing_heads=False, source=d / MODEL_FILE)
        rm.model.load_state_dict(sd)
        with torch.no_grad():
            rm.gain.copy_(gain)
            rm.bias.copy_(bias)
    rm.requires_grad_(False)
    return rm.eval().to(device)


def write_run_hparams(path: Path, hp, device: torch.device):
    """A command's hyperparameters, with what `auto` settings resolved to on this machine."""
    ckpt.atomic_write_json(path, with_resolved(hp.to_nested_dict(),
                                               dist.resolved_run_settings(hp.run.precision, device)))


def write_policy_metadata(run_dir: RunDir, hp, policy: Policy, enc_name: str, device: torch.device):
    """train_policy_hparams.json and policy/{hparams.json, encoding}: what `sample` needs besides a checkpoint. A
    failed write raises the WriteError naming the file."""
    with writing(run_dir.policy_hparams):
        write_run_hparams(run_dir.policy_hparams, hp, device)
    with writing(run_dir.policy / CONFIG_FILE):
        ckpt.atomic_write_json(run_dir.policy / CONFIG_FILE, policy.model.config.to_dict())
    with writing(run_dir.policy / ENCODING_FILE):
        ckpt.atomic_write_json(run_dir.policy / ENCODING_FILE, enc_name)


def load_policy_weights(model: GPT2, checkpoint: Path):
    """Loads a checkpoint's model.safetensors into `model`, checking every name and shape first."""
    state_dict = ckpt.load_tensors(Path(checkpoint) / MODEL_FILE)
    check_state_dict(model, state_dict, allow_missing_heads=False, source=Path(checkpoint) / MODEL_FILE)
    model.load_state_dict(state_dict)


# ---- reading a policy run ----------------------------------------------------------------------------------

_JSON_TYPES = {list: "list", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def read_run_hparams(run_dir: RunDir) -> TrainPolicyHParams:
    """The hyperparameters a train_policy run wrote."""
    path = run_dir.policy_hparams
    if not path.is_file():
        raise RunError(f"{run_dir.path} is not a train_policy run: {path} is missing. Create one with "
                       f"`{train_command(run_dir.path)}`")
    try:
        nested = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deep
        raise RunError(f"{path} is not valid JSON ({e}); it was not written by train_policy") from e
    if not isinstance(nested, dict):
        raise RunError(f"{path} holds a JSON {_JSON_TYPES.get(type(nested), type(nested).__name__)}, not the object "
                       f"of hyperparameters train_policy writes; it was not written by train_policy")
    try:
        return TrainPolicyHParams.from_nested_dict(nested)
    except HParamsError as e:
        raise RunError(f"{path} does not hold train_policy hyperparameters ({e}); it was not written by "
                       f"train_policy, or by another version") from e


def latest_policy_checkpoint(run_dir: RunDir) -> Path:
    """The newest complete `policy/checkpoints/step-N` directory of a run."""
    latest = ckpt.latest_checkpoint(run_dir.checkpoints)
    if latest is None:
        raise RunError(f"{run_dir.checkpoints} holds no complete policy checkpoint (step-NNNNNNNN/ with a COMPLETE "
                       f"marker). Train one with `{train_command(run_dir.path)}`, or continue an interrupted run by "
                       f"adding --resume")
    return latest


def read_encoding_name(run_dir: RunDir) -> str:
    """The encoding name ('main' or 'test') a run stored in policy/encoding."""
    path = run_dir.policy / ENCODING_FILE
    try:
        name = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise RunError(f"{path} is missing or unreadable ({e}); the run was not written by train_policy, "
                       f"create it with `{train_command(run_dir.path)}`") from e
    if name not in ENCODING_NAMES:
        raise RunError(f"{path} names encoding {name!r}; expected one of {list(ENCODING_NAMES)}")
    return name


def load_policy(run_dir: RunDir, checkpoint: Path, hp: TrainPolicyHParams, enc, *, temperature: float,
                device) -> Policy:
    """The run's policy (GPT-2 + value head) with the weights of `checkpoint`, frozen, sampling at `temperature`."""
    model = GPT2(read_model_config(run_dir.policy), ["value"])
    load_policy_weights(model, checkpoint)
    task = hp.task
    prefix, suffix = enc.encode(task.query_prefix), enc.encode(task.query_suffix)
    return make_policy(model, task, enc, prefix, suffix, temperature=temperature, frozen=True).to(device)


def reward_model_path(run_dir: RunDir, hp: TrainPolicyHParams) -> Optional[str]:
    """The reward model a policy run trained against: its own reward_model/ when it trained one there, otherwise
    `rewards.trained_model` (None when neither exists)."""
    if (run_dir.reward_model / MODEL_FILE).is_file():
        return str(run_dir.reward_model)
    return hp.rewards.trained_model


# ---- the rollout-scoring path ------------------------------------------------------------------------------

@torch.no_grad()
def rollout(policy: Policy, queries: torch.Tensor, task, padding_token: int, *, generator, precision: str, ref_policy: Optional[Policy] = None, score_model: Optional[RewardModel] = None,
            micro_batch: Optional[int] = None) -> dict:
    """respond -> reference logprobs -> postprocess -> reward model -> penalty, in pieces of `micro_batch` queries.

    `generator`: a torch.Generator, or one per equal block of queries (the virtual ranks of this process); the
    random numbers of every draw come from them before sampling, so the responses do not depend on micro_batch.

    Returns, for queries (B, Q): responses, logprobs and values (B, T) from `policy.respond`; ref_logprobs (B, T)
    with a `ref_policy`; postprocessed (B, T) (truncated as the task says); with a `score_model`, raw_scores (B,)
    (float32) and scores (B,) with the task's penalty for responses that break the truncation rule.
    """
    device = queries.device
    uniforms = draw_uniforms(generator, len(queries), task.response_length, device)
    parts = []
    for sl in chunks(len(queries), micro_batch):
        q = queries[sl]
        with dist.autocast(device, precision):
            out = policy.respond(q, task.response_length, uniforms=uniforms[sl])
            part = dict(responses=out["responses"], logprobs=out["logprobs"], values=out["values"])
            if ref_policy is not None:
                part["ref_logprobs"] = ref_policy(q, out["responses"], with_entropy=False)["logprobs"]
            part["postprocessed"] = postprocess_responses(out["responses"], task.truncate_token,
                                                          task.truncate_after, padding_token)
            raw = score_model(q, part["postprocessed"]) if score_model is not None else None
        if raw is not None:
            valid = responses_valid(part["postprocessed"], task.truncate_token, task.truncate_after)
            part["raw_scores"] = raw.float()
            part["scores"] = penalized_scores(part["raw_scores"], valid, task.penalty_reward_value)
        parts.append(part)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
