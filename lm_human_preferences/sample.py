"""Sample (and score) responses from a trained policy run (ORIGINAL §2.4): `python launch.py sample <run_dir>`.

Queries come from the task's dataset in mode 'test', as in the original. The policy is the run's latest checkpoint;
responses are post-processed (truncated) as in training and, with scoring on, scored by the run's reward model with
the penalty applied. Every sample is printed with newlines shown as '⏎' and written to a JSONL file as it is
produced (see `SampleFile`), so a failure part-way keeps what was sampled; the output path is checked first.

Differences from the original: the temperature defaults to the task's training temperature (the original's
default was 1.0); `nsamples` is finite and rounded up to whole batches (the original looped forever for 0); the
command runs in a single process (the original ran under MPI; here a torchrun launch is refused).
"""
import json
import math
import os
import sys
from pathlib import Path
from typing import List, Optional

import torch

from lm_human_preferences import runs
from lm_human_preferences.language.datasets import QuerySampler
from lm_human_preferences.language.encodings import get_encoding
from lm_human_preferences.runs import RunDir, RunError
from lm_human_preferences.utils import dist
from lm_human_preferences.utils.files import append_all, fsync_dir, unwritable, writing

NEWLINE_MARK = "⏎"


def show(text: str) -> str:
    """`text` on one line: newlines shown as '⏎'."""
    return text.replace("\n", NEWLINE_MARK)


def score_model_name(path: str) -> str:
    """How the reward model is named in messages ('test' is a fresh random test model, not the run's)."""
    return "a random 'test' reward model" if path == "test" else path


def batch_records(enc, queries: torch.Tensor, batch: dict) -> List[dict]:
    """One JSON-able record per row: decoded query, post-processed and raw response, score, token ids."""
    records = []
    for i in range(queries.shape[0]):
        record = {"query": enc.decode(queries[i].tolist()),
                  "response": enc.decode(batch["postprocessed"][i].tolist()),
                  "raw_response": enc.decode(batch["responses"][i].tolist())}
        if batch.get("scores") is not None:
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


class SampleFile:
    """The JSONL file of samples (one JSON object per line), written as they are produced.

    Records are appended to `<path>.partial` and reach the disk batch by batch; when the block ends without an
    error the file is fsynced and renamed to `path`, so `path` is never half-written. After a failure (a full disk,
    Ctrl-C, an error in sampling) `<path>.partial` keeps every complete record written before it, and a note on
    stderr says so. A failed write raises the WriteError naming the file.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.count = 0  # records written
        self.file = None

    def __enter__(self):
        with writing(self.partial):
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.partial, "wb", buffering=0)
        return self

    def write(self, records: List[dict]) -> None:
        with writing(self.partial):
            append_all(self.file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
        self.count += len(records)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            with writing(self.path):
                os.fsync(self.file.fileno())
                self.file.close()
                os.replace(self.partial, self.path)
            fsync_dir(self.path.parent)
            return False
        self.file.close()
        if self.count:
            print(f"note: the {self.count} samples written before the failure are in {self.partial}", file=sys.stderr)
        else:
            self.partial.unlink(missing_ok=True)
        return False


def _check_arguments(temperature, nsamples, batch_size) -> None:
    """RunError unless nsamples and batch_size are positive integers and temperature is None or > 0."""
    for name, value in (("nsamples", nsamples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RunError(f"{name} must be a positive integer, got {value!r}")
    if temperature is not None and not temperature > 0:
        raise RunError(f"temperature must be > 0, got {temperature!r}; omit it to use the training temperature")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RunError("sample runs in a single process; run `python launch.py sample ...` without torchrun")


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
    if not Path(run_dir).is_dir():
        raise RunError(f"run directory {str(run_dir)!r} does not exist; create it with "
                       f"`{runs.train_command(Path(run_dir))}`")
    run_dir = RunDir(run_dir)
    out_path = Path(out) if out is not None else run_dir.samples
    problem = unwritable(out_path, directory=False)
    if problem is not None:
        raise RunError(f"cannot write the samples to {out_path}: {problem}; pass --out with a file path in a "
                       f"writable directory")
    hp = runs.read_run_hparams(run_dir)
    checkpoint = runs.latest_policy_checkpoint(run_dir)
    task = hp.task
    temperature = task.policy.temperature if temperature is None else float(temperature)
    enc = get_encoding(runs.read_encoding_name(run_dir))
    device = dist.resolve_device("auto")
    precision = dist.resolve_precision(hp.run.precision, device)
    policy = runs.load_policy(run_dir, checkpoint, hp, enc, temperature=temperature, device=device)

    score_model, scored_by = None, ""
    if score:
        path = runs.reward_model_path(run_dir, hp)
        if path is None:
            raise RunError(f"{run_dir.path} has no {run_dir.reward_model.name}/ and its rewards.trained_model is not "
                           f"set: there is no reward model to score with; pass --no-score")
        score_model = runs.load_reward_model(path, n_vocab=enc.n_vocab, padding_token=enc.padding_token,
                                             device=device)
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
    with SampleFile(out_path) as sink:
        for _ in range(nbatches):
            queries = torch.as_tensor(sampler.next_batch(), device=device)  # (B, query_length)
            batch = runs.rollout(policy, queries, task, enc.padding_token, generator=generator, precision=precision,
                                 score_model=score_model)
            new = batch_records(enc, queries, batch)
            for i, record in enumerate(new):
                print_record(len(records) + i, record)
            sink.write(new)
            records.extend(new)
    print(f"wrote {len(records)} samples to {out_path}")
    return records
