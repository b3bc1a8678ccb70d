"""The run layer: a run directory's layout, the models a task needs, and the one rollout-scoring path.

Every command builds from here. `train_reward` and `train_policy` build their models for a task and write where
`RunDir` says; `sample` loads a policy from a run directory; the demo's evaluation and the benchmark score rollouts
with `rollout`, the same function `PPOTrainer` calls.

A run directory (`<save_dir>/<run name>`, `RunDir`):

    train_reward_hparams.json    train_reward_metrics.jsonl    reward_model/{model.safetensors, hparams.json, encoding}
    train_policy_hparams.json    train_policy_metrics.jsonl    policy/{hparams.json, encoding, checkpoints/step-N/{model.safetensors, optimizer.pt, state.json,
                                                         rng-rank<R>.pt, sampler-rank<R>.json}}
    samples.jsonl (written by `sample`)    plots/*.png (written by `plot`)
"""
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lm_human_preferences.hparams import TrainPolicyHParams
from lm_human_preferences.language.encodings import ENCODING_NAMES, get_encoding
from lm_human_preferences.language.model import GPT2
from lm_human_preferences.language.trained_models import check_state_dict, load_model, read_model_config
from lm_human_preferences.lm_tasks import penalized_scores, postprocess_responses, responses_valid
from lm_human_preferences.policy import Policy
from lm_human_preferences.rewards import RewardModel
from lm_human_preferences.utils import ckpt, dist
from lm_human_preferences.utils.ckpt import CheckpointError
from lm_human_preferences.utils.files import replace_dir
from lm_human_preferences.utils.hyperparams import HParamsError, with_resolved
from lm_human_preferences.utils.training import chunks

MODEL_FILE = "model.safetensors"  # weights of a model directory (reward_model/, a checkpoint step-N/)
CONFIG_FILE = "hparams.json"  # GPT-2 shape of a model directory
ENCODING_FILE = "encoding"  # 'main' or 'test', as JSON
# a policy checkpoint policy/checkpoints/step-N/ also holds:
STATE_FILE = "state.json"  # global_step, KL controller, world size, wandb id
OPTIMIZER_FILE = "optimizer.pt"  # Adam moments (torch.save, read back with weights_only=True)


def rng_file(rank: int) -> str:
    """Every RNG of one rank, in a checkpoint."""
    return f"rng-rank{rank}.pt"


def sampler_file(rank: int) -> str:
    """The query sampler's position of one rank, in a checkpoint."""
    return f"sampler-rank{rank}.json"


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
    plots = property(lambda self: self.path / "plots")  # written by `plot`

    def outputs(self) -> list:
        """Everything the training commands write here; any of them present means a run exists."""
        return [self.policy, self.reward_model, self.reward_model_tmp, self.policy_metrics, self.reward_metrics,
                self.policy_hparams, self.reward_hparams]

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


class RunError(HParamsError):
    """A run directory that cannot be used (missing, not written by train_policy, without a checkpoint) or a
    command argument that cannot work; an HParamsError, so launch.py prints `error: <message>` and exits with 2."""


def train_command(run_dir: Path) -> str:
    """The command that creates a policy run at `run_dir`."""
    return f"python launch.py train_policy <experiment> {run_dir.name} --save_dir {run_dir.parent}"


def open_run(hp, run_dir: Optional[RunDir], *, resume: bool, overwrite: bool, prepare):
    """The start of both training commands; returns (DistInfo, prepare's result).

    Checks the settings and the world size (before any collective, so every rank fails alike), starts the process
    group, then on every rank checks the run directory (an existing run needs `resume` or `overwrite`) and calls
    `prepare(info)`, which loads and checks every other input and writes nothing. Only when every rank has passed
    does rank 0 delete the old run for `overwrite`; all ranks then start together.
    """
    hp.validate()
    with ckpt.input_errors():
        hp.check_world_size(dist.env_info(hp.run.device).world_size)
    info = dist.init_distributed(hp.run.device)
    with ckpt.validated_inputs(info.device):
        if run_dir is not None:
            run_dir.check_new_or(resume=resume, overwrite=overwrite)
        prepared = prepare(info)
    if overwrite and info.is_main and run_dir is not None and run_dir.path.exists():
        shutil.rmtree(run_dir.path)  # --overwrite, after every input check passed
    dist.barrier()
    return info, prepared


# ---- the models of a task ----------------------------------------------------------------------------------

def encoding_name(initial_model: str) -> str:
    """The `test` model uses the 27-character test encoding; every GPT-2 uses the BPE."""
    return "test" if initial_model == "test" else "main"


def task_encodings(task):
    """(encoding, prefix token ids, suffix token ids) for a task."""
    enc = get_encoding(encoding_name(task.policy.initial_model))
    return enc, enc.encode(task.query_prefix), enc.encode(task.query_suffix)


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
    reward_model.tmp/ and renamed, so a reward_model/ directory is always complete."""
    tmp = run_dir.reward_model_tmp
    if tmp.exists():
        shutil.rmtree(tmp)
    sd = dict(reward_model.model.state_dict())
    sd["reward_norm.gain"] = reward_model.gain.detach()
    sd["reward_norm.bias"] = reward_model.bias.detach()
    write_run_hparams(run_dir.reward_hparams, hp, device)
    ckpt.atomic_save_tensors(tmp / MODEL_FILE, sd)
    ckpt.atomic_write_json(tmp / CONFIG_FILE, reward_model.model.config.to_dict())
    ckpt.atomic_write_json(tmp / ENCODING_FILE, enc_name)
    replace_dir(tmp, run_dir.reward_model)


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
        check_state_dict(rm.model, sd, allow_missing_heads=False)
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
    """train_policy_hparams.json and policy/{hparams.json, encoding}: what `sample` needs besides a checkpoint."""
    write_run_hparams(run_dir.policy_hparams, hp, device)
    ckpt.atomic_write_json(run_dir.policy / CONFIG_FILE, policy.model.config.to_dict())
    ckpt.atomic_write_json(run_dir.policy / ENCODING_FILE, enc_name)


def load_policy_weights(model: GPT2, checkpoint: Path):
    """Loads a checkpoint's model.safetensors into `model`, checking every name and shape first."""
    state_dict = ckpt.load_tensors(Path(checkpoint) / MODEL_FILE)
    check_state_dict(model, state_dict, allow_missing_heads=False)
    model.load_state_dict(state_dict)


# ---- reading a policy run ----------------------------------------------------------------------------------

def read_run_hparams(run_dir: RunDir) -> TrainPolicyHParams:
    """The hyperparameters a train_policy run wrote."""
    path = run_dir.policy_hparams
    if not path.is_file():
        raise RunError(f"{run_dir.path} is not a train_policy run: {path} is missing. Create one with "
                       f"`{train_command(run_dir.path)}`")
    try:
        nested = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path} is not valid JSON ({e}); it was not written by train_policy") from e
    return TrainPolicyHParams.from_nested_dict(nested)


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
def rollout(policy: Policy, queries: torch.Tensor, task, padding_token: int, *, generator: torch.Generator,
            precision: str, ref_policy: Optional[Policy] = None, score_model: Optional[RewardModel] = None,
            micro_batch: Optional[int] = None) -> dict:
    """respond -> reference logprobs -> postprocess -> reward model -> penalty, in pieces of `micro_batch` queries.

    Returns, for queries (B, Q): responses, logprobs and values (B, T) from `policy.respond`; ref_logprobs (B, T)
    with a `ref_policy`; postprocessed (B, T) (truncated as the task says); with a `score_model`, raw_scores (B,)
    (float32) and scores (B,) with the task's penalty for responses that break the truncation rule.
    """
    device = queries.device
    parts = []
    for sl in chunks(len(queries), micro_batch):
        q = queries[sl]
        with dist.autocast(device, precision):
            out = policy.respond(q, task.response_length, generator=generator)
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
