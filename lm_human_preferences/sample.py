"""Sample (and score) responses from a trained policy run (ORIGINAL §2.4): `python launch.py sample <run_dir>`.

Queries come from the task's dataset in mode 'test', as in the original. The policy is the run's latest checkpoint;
responses are post-processed (truncated) as in training and, with scoring on, scored by the run's reward model with
the penalty applied. Every sample is printed with newlines shown as '⏎' and written to a JSONL file.

Differences from the original: the temperature defaults to the task's training temperature (the original's
default was 1.0); `nsamples` is finite and rounded up to whole batches (the original looped forever for 0); the
command runs in a single process (the original ran under MPI; here a torchrun launch is refused).
"""
import json
import math
import os
from pathlib import Path
from typing import List, Optional

import torch

from lm_human_preferences.hparams import TrainPolicyHParams
from lm_human_preferences.language.datasets import QuerySampler
from lm_human_preferences.language.encodings import ENCODING_NAMES, get_encoding
from lm_human_preferences.language.model import GPT2
from lm_human_preferences.language.trained_models import check_state_dict, read_model_config, read_state_dict
from lm_human_preferences.lm_tasks import penalized_scores, postprocess_responses, responses_valid
from lm_human_preferences.policy import Policy
from lm_human_preferences.rewards import load_reward_model
from lm_human_preferences.train_policy import POLICY_DIR
from lm_human_preferences.train_reward import REWARD_DIR, check_fits_context
from lm_human_preferences.utils import ckpt, dist
from lm_human_preferences.utils.hyperparams import HParamsError

HPARAMS_FILE = "train_policy_hparams.json"
SAMPLES_FILE = "samples.jsonl"
NEWLINE_MARK = "⏎"


class SampleError(HParamsError):
    """A sample command that cannot run (a run directory without a checkpoint, nothing to score with, a bad
    argument); an HParamsError, so launch.py prints it as `error: <message>` and exits with status 2."""


def _train_command(run_dir: Path) -> str:
    """The command that creates a policy run at `run_dir`."""
    return f"python launch.py train_policy <experiment> {run_dir.name} --save_dir {run_dir.parent}"


def show(text: str) -> str:
    """`text` on one line: newlines shown as '⏎'."""
    return text.replace("\n", NEWLINE_MARK)


def read_run_hparams(run_dir: Path) -> TrainPolicyHParams:
    """The hyperparameters a train_policy run wrote to `<run_dir>/train_policy_hparams.json`."""
    path = run_dir / HPARAMS_FILE
    if not path.is_file():
        raise SampleError(f"{run_dir} is not a train_policy run: {path} is missing. Create one with "
                          f"`{_train_command(run_dir)}`")
    try:
        nested = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SampleError(f"{path} is not valid JSON ({e}); it was not written by train_policy") from e
    return TrainPolicyHParams.from_nested_dict(nested)


def latest_policy_checkpoint(run_dir: Path) -> Path:
    """The newest complete `<run_dir>/policy/checkpoints/step-N` directory."""
    root = run_dir / POLICY_DIR / "checkpoints"
    latest = ckpt.latest_checkpoint(root)
    if latest is None:
        raise SampleError(f"{root} holds no complete policy checkpoint (step-NNNNNNNN/ with a COMPLETE marker). "
                          f"Train one with `{_train_command(run_dir)}`, or continue an interrupted run by adding "
                          f"--resume")
    return latest


def read_encoding_name(run_dir: Path) -> str:
    """The encoding name ('main' or 'test') a run stored in `<run_dir>/policy/encoding`."""
    path = run_dir / POLICY_DIR / "encoding"
    try:
        name = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise SampleError(f"{path} is missing or unreadable ({e}); the run was not written by train_policy, "
                          f"create it with `{_train_command(run_dir)}`") from e
    if name not in ENCODING_NAMES:
        raise SampleError(f"{path} names encoding {name!r}; expected one of {list(ENCODING_NAMES)}")
    return name


def load_policy(run_dir: Path, checkpoint: Path, hp: TrainPolicyHParams, enc, *, temperature: float,
                device) -> Policy:
    """The run's policy (GPT-2 + value head) with the weights of `checkpoint`, sampling at `temperature`."""
    model = GPT2(read_model_config(run_dir / POLICY_DIR), ["value"])
    state_dict = read_state_dict(checkpoint / "model.safetensors")
    check_state_dict(model, state_dict, allow_missing_heads=False)
    model.load_state_dict(state_dict)
    task = hp.task
    prefix, suffix = enc.encode(task.query_prefix), enc.encode(task.query_suffix)
    check_fits_context(task, model.config.n_ctx, prefix, suffix)
    policy = Policy(model, temperature=temperature, padding_token=enc.padding_token, prefix_tokens=prefix,
                    suffix_tokens=suffix)
    policy.requires_grad_(False)
    return policy.eval().to(device)


def reward_model_path(run_dir: Path, hp: TrainPolicyHParams) -> Optional[str]:
    """The reward model the run trained against: `<run_dir>/reward_model` when it trained one there, otherwise
    `rewards.trained_model` (None when neither exists)."""
    local = run_dir / REWARD_DIR
    if (local / "model.safetensors").is_file():
        return str(local)
    return hp.rewards.trained_model


def score_model_name(path: str) -> str:
    """How the reward model is named in messages ('test' is a fresh random test model, not the run's)."""
    return "a random 'test' reward model" if path == "test" else path


@torch.no_grad()
def sample_batch(policy: Policy, score_model, queries: torch.Tensor, task, padding_token: int, *, generator,
                 precision: str) -> dict:
    """Responses (B, T) to queries (B, Q), post-processed (B, T) as in training, and scores (B,) with the penalty
    applied (None without a score model)."""
    device = queries.device
    with dist.autocast(device, precision):
        responses = policy.respond(queries, task.response_length, generator=generator)["responses"]
        post = postprocess_responses(responses, task.truncate_token, task.truncate_after, padding_token)
        raw_scores = score_model(queries, post) if score_model is not None else None
    scores = None
    if raw_scores is not None:
        valid = responses_valid(post, task.truncate_token, task.truncate_after)
        scores = penalized_scores(raw_scores.float(), valid, task.penalty_reward_value)
    return {"responses": responses, "postprocessed": post, "scores": scores}


def batch_records(enc, queries: torch.Tensor, batch: dict) -> List[dict]:
    """One JSON-able record per row: decoded query, post-processed and raw response, score, token ids."""
    records = []
    for i in range(queries.shape[0]):
        record = {"query": enc.decode(queries[i].tolist()),
                  "response": enc.decode(batch["postprocessed"][i].tolist()),
                  "raw_response": enc.decode(batch["responses"][i].tolist())}
        if batch["scores"] is not None:
            record["score"] = float(batch["scores"][i])
        record["query_tokens"] = queries[i].tolist()
        record["response_tokens"] = batch["responses"][i].tolist()
        records.append(record)
    return records


def print_record(index: int, record: dict) -> None:
    """Prints one sample: query and post-processed response on one line each ('⏎' for newlines)."""
    print(f"[{index}] query:    {show(record['query'])}")
    print(f"{'':{len(str(index)) + 2}} response: {show(record['response'])}")
    if "score" in record:
        print(f"{'':{len(str(index)) + 2}} score:    {record['score']:+.4f}")


def write_jsonl(path: Path, records: List[dict]) -> None:
    """Writes one JSON object per line (atomically: a crash never leaves a partial file)."""
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    ckpt.atomic_write_bytes(path, text.encode("utf-8"))


def _check_arguments(temperature, nsamples, batch_size) -> None:
    """SampleError unless nsamples and batch_size are positive integers and temperature is None or > 0."""
    for name, value in (("nsamples", nsamples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SampleError(f"{name} must be a positive integer, got {value!r}")
    if temperature is not None and not temperature > 0:
        raise SampleError(f"temperature must be > 0, got {temperature!r}; omit it to use the training temperature")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SampleError("sample runs in a single process; run `python launch.py sample ...` without torchrun")


def main(run_dir, temperature: Optional[float] = None, nsamples: int = 8, batch_size: int = 4,
         seed: Optional[int] = None, score: bool = True, out=None) -> List[dict]:
    """Samples `nsamples` responses (rounded up to whole batches of `batch_size`) from the latest checkpoint of the
    policy run `run_dir` for test-mode queries of its task; prints them and writes them to `out` (default
    `<run_dir>/samples.jsonl`) as JSON lines with keys query, response (post-processed), raw_response, score
    (with `score`), query_tokens and response_tokens. Returns the records.

    temperature: None = the task's training temperature (task.policy.temperature); the original defaulted to 1.0.
    seed: seeds the sampling generator; None draws a fresh seed and prints it. score: score the responses with the
    run's reward model (`<run_dir>/reward_model`, else `rewards.trained_model`), post-processed and penalised as
    in training. Single process only.
    """
    _check_arguments(temperature, nsamples, batch_size)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SampleError(f"run directory {str(run_dir)!r} does not exist; create it with "
                          f"`{_train_command(run_dir)}`")
    hp = read_run_hparams(run_dir)
    checkpoint = latest_policy_checkpoint(run_dir)
    task = hp.task
    temperature = task.policy.temperature if temperature is None else float(temperature)
    enc = get_encoding(read_encoding_name(run_dir))
    device = dist.resolve_device("auto")
    precision = dist.resolve_precision(hp.run.precision, device)
    policy = load_policy(run_dir, checkpoint, hp, enc, temperature=temperature, device=device)

    score_model, scored_by = None, ""
    if score:
        path = reward_model_path(run_dir, hp)
        if path is None:
            raise SampleError(f"{run_dir} has no {REWARD_DIR}/ and its rewards.trained_model is not set: there is "
                              f"no reward model to score with; pass --no-score")
        score_model = load_reward_model(path, n_vocab=enc.n_vocab, padding_token=enc.padding_token, device=device)
        scored_by = f", scored by {score_model_name(path)}"

    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    sampler = QuerySampler(task.query_dataset, "test", enc, task.query_length, task.start_text, task.end_text,
                           batch_size)
    nbatches = math.ceil(nsamples / batch_size)
    print(f"sampling {nbatches} batches of {batch_size} responses from {checkpoint} at temperature "
          f"{temperature:g}, seed {seed}{scored_by}")

    records: List[dict] = []
    for _ in range(nbatches):
        queries = torch.as_tensor(sampler.next_batch(), device=device)  # (B, query_length)
        batch = sample_batch(policy, score_model, queries, task, enc.padding_token, generator=generator,
                             precision=precision)
        for record in batch_records(enc, queries, batch):
            print_record(len(records), record)
            records.append(record)

    out_path = Path(out) if out is not None else run_dir / SAMPLES_FILE
    write_jsonl(out_path, records)
    print(f"wrote {len(records)} samples to {out_path}")
    return records
