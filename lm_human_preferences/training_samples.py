"""Samples over training (`run.sample_interval`, `run.sample_queries`; not in the original): what the policy writes
for a fixed set of held-out queries as PPO goes.

Rank 0 samples the first `run.sample_queries` queries of the task's test-mode stream every `run.sample_interval`
updates, at update 0 (the initial policy) and at the last update (the final policy); update u is the policy after
u updates. Each sampling seeds a generator of its own with the same seed (`sample_seed`), so every update draws
with the same random numbers and the text changes only where the policy does; nothing of the training's random
streams is used, so a run ends bit-identical with sampling on or off. The records go to
`<run>/training_samples.jsonl`, one JSON object per sample (COLUMNS), and to wandb as one table keyed by update; a
resumed run first drops the records of updates >= the update it resumes at. `render` and `show` print a range of
updates as a markdown table (`launch.py plot <run_dir> --samples FIRST:LAST`).
"""
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from lm_human_preferences import runs
from lm_human_preferences.language.datasets import QuerySampler
from lm_human_preferences.lm_tasks import responses_valid
from lm_human_preferences.runs import RunDir, RunError
from lm_human_preferences.utils import ckpt
from lm_human_preferences.utils.files import append_all, writing
from lm_human_preferences.utils.logging import load_metrics

# the keys of every record: the update (the policy after that many updates), the query's index among the held-out
# queries, the decoded query and post-processed response, the score PPO trains on (the reward model's, or the
# task's penalty_reward_value), the reward model's own score, sum_t (log pi - log rho) of the sampled tokens, and
# whether the penalty replaced the score (no truncate token where the task has one)
COLUMNS = ("update", "index", "query", "response", "score", "raw_score", "kl", "penalized")
SEED_OFFSET = 1_000_003  # sample_seed = run.seed (0 when None) + this: not a virtual rank's seed (seed + 100003 v)
WANDB_KEY = "training_samples"


def sample_seed(seed: Optional[int]) -> int:
    """The seed of every sampling over training: run.seed (0 when it is None) + SEED_OFFSET, modulo 2**63."""
    return ((0 if seed is None else int(seed)) + SEED_OFFSET) % 2**63


def due(update: int, interval: int, nupdates: int) -> bool:
    """Whether the policy after `update` updates is sampled: every `interval` updates (0 included) and the last;
    never for interval 0."""
    return interval > 0 and (update % interval == 0 or update == nupdates)


def held_out_queries(task, enc, n: int):
    """The first `n` queries of the task's test-mode stream, (n, query_length) int64; None, with a warning, when
    the dataset has no prepared test split (sampling over training is then off)."""
    try:
        sampler = QuerySampler(task.query_dataset, "test", enc, task.query_length, task.start_text, task.end_text, n)
    except FileNotFoundError as e:
        print(f"warning: no held-out queries for samples over training ({e}); they are off for this run "
              f"(--run.sample_interval 0 turns them off without this warning)", file=sys.stderr)
        return None
    return sampler.next_batch()


def make_records(enc, update: int, queries: torch.Tensor, batch: dict, penalized: torch.Tensor) -> List[dict]:
    """One record (COLUMNS) per row of a scored rollout `batch` of `queries` (runs.rollout with a ref_policy and a
    score_model); `penalized` (B,) bool says which rows got the penalty."""
    kl = (batch["logprobs"].float() - batch["ref_logprobs"].float()).sum(dim=1).tolist()
    scores, raw = batch["scores"].tolist(), batch["raw_scores"].tolist()
    posts, qs, pens = batch["postprocessed"].tolist(), queries.tolist(), penalized.tolist()
    return [{"update": int(update), "index": i, "query": enc.decode(qs[i]), "response": enc.decode(posts[i]),
             "score": scores[i], "raw_score": raw[i], "kl": kl[i], "penalized": bool(pens[i])}
            for i in range(len(qs))]


def append_records(path, records: List[dict]) -> None:
    """Appends records to the JSONL file `path` as one write (no torn record: see files.append_all); a failed
    write raises the WriteError of `path`."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    with writing(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab", buffering=0) as f:
            append_all(f, data)


def truncate(path, below_update: int) -> None:
    """Keeps the whole records of updates < below_update (a resumed run samples the rest again); nothing to do
    without the file. A failed write raises the WriteError of `path`."""
    with writing(path):
        ckpt.truncate_metrics(path, below_update, key="update")


def read_records(path) -> List[dict]:
    """The records of a samples file (damaged lines and a torn last line skipped)."""
    return [r for r in load_metrics(path)[0] if isinstance(r.get("update"), int)]


class TrainingSamples:
    """Rank 0's samples of the held-out queries over a PPO run (see the module's docstring)."""

    def __init__(self, queries: torch.Tensor, *, seed: int, interval: int, nupdates: int, path: Optional[Path]):
        self.queries, self.seed, self.interval, self.nupdates, self.path = queries, seed, interval, nupdates, path

    @classmethod
    def for_run(cls, trainer, run_dir: Optional[RunDir], logger) -> Optional["TrainingSamples"]:
        """On rank 0, once the samples file was cut back to the updates before the trainer's global_step
        (`truncate`, which `train_policy.run` calls even with sampling off, so that no records of an abandoned
        continuation stay): hands the file's records to the logger's wandb table and returns the sampler; None
        where sampling is off (run.sample_interval 0, no held-out queries, or neither a run directory nor wandb to
        write to)."""
        hp = trainer.hp
        path = run_dir.training_samples if run_dir is not None else None
        if hp.run.sample_interval == 0 or (path is None and logger.wandb_run is None):
            return None
        queries = held_out_queries(hp.task, trainer.enc, hp.run.sample_queries)
        if queries is None:
            return None
        if path is not None and path.exists():
            logger.add_sample_history(read_records(path), COLUMNS)
        return cls(torch.as_tensor(queries, device=trainer.info.device), seed=sample_seed(hp.run.seed),
                   interval=hp.run.sample_interval, nupdates=trainer.nupdates, path=path)

    def due(self, update: int) -> bool:
        return due(update, self.interval, self.nupdates)

    def sample(self, trainer, update: int) -> List[dict]:
        """The records of the trainer's current policy (after `update` updates) on the held-out queries, scored by
        its current reward model, the KL against its reference policy; at the task's temperature."""
        hp, task = trainer.hp, trainer.hp.task
        generator = torch.Generator(device=self.queries.device)
        generator.manual_seed(self.seed)
        batch = runs.rollout(trainer.policy, self.queries, task, trainer.enc.padding_token, generator=generator,
                             precision=trainer.precision, ref_policy=trainer.ref_policy,
                             score_model=trainer.score_model, micro_batch=hp.run.rollout_micro_batch)
        penalized = ~responses_valid(batch["postprocessed"], task.truncate_token, task.truncate_after)
        return make_records(trainer.enc, update, self.queries, batch, penalized)

    def record(self, trainer, logger) -> List[dict]:
        """Samples the policy at the trainer's global_step and writes the records (file, wandb)."""
        update = trainer.global_step
        records = self.sample(trainer, update)
        if self.path is not None:
            append_records(self.path, records)
        logger.log_samples(records, update, COLUMNS, key=WANDB_KEY)
        return records


# ---- reading them back -------------------------------------------------------------------------------------

def parse_range(spec: str) -> Tuple[Optional[int], Optional[int]]:
    """'FIRST:LAST' (both included; either may be left out: '50:', ':100', ':') or 'N' (that update alone) ->
    (first, last), None for an open end; RunError for anything else."""
    text = spec.strip()
    first, sep, last = text.partition(":")
    try:
        lo = int(first) if first.strip() else None
        hi = int(last) if last.strip() else None
    except ValueError:
        raise RunError(f"--samples {spec!r}: expected FIRST:LAST (updates, both included; either may be left "
                       f"out, e.g. 0:100, 50:, :100) or a single update N") from None
    if not sep:
        if lo is None:
            raise RunError(f"--samples {spec!r}: expected FIRST:LAST or a single update N")
        hi = lo
    if lo is not None and hi is not None and lo > hi:
        raise RunError(f"--samples {spec!r}: FIRST ({lo}) is after LAST ({hi})")
    return lo, hi


def _cell(value) -> str:
    """A markdown table cell: a float with 3 decimals, a bool as 'yes' or blank, text on one line."""
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:+.3f}"
    return str(value).replace("\r\n", "\n").replace("\n", "⏎").replace("|", "\\|")


def render(records: Sequence[dict], first: Optional[int] = None, last: Optional[int] = None) -> str:
    """A markdown table of the records of updates first..last (both included, None = open), by update then query
    index: update, #, query, response, score, kl, penalized (newlines shown as '⏎', '|' escaped)."""
    chosen = sorted((r for r in records if (first is None or r["update"] >= first)
                     and (last is None or r["update"] <= last)), key=lambda r: (r["update"], r.get("index", 0)))
    header = ("update", "#", "query", "response", "score", "kl", "penalized")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in chosen:
        cells = (r["update"], r.get("index", ""), r.get("query", ""), r.get("response", ""), r.get("score", ""),
                 r.get("kl", ""), r.get("penalized", False))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def show(run_dir, spec: str = ":") -> str:
    """Prints (and returns) the markdown table of a run's samples over training for the updates of `spec`
    (parse_range); RunError when the run has no samples file or none in that range."""
    first, last = parse_range(spec)
    path = RunDir(run_dir).training_samples
    if not path.is_file():
        raise RunError(f"{run_dir} has no {path.name}: it is written by train_policy every run.sample_interval "
                       f"updates (on by default; this run may be older, or ran with --run.sample_interval 0)")
    records = read_records(path)
    updates = sorted({r["update"] for r in records})
    table = render(records, first, last)
    if table.count("\n") <= 2:
        raise RunError(f"{path} holds no samples of updates {spec!r}; it holds updates "
                       f"{', '.join(map(str, updates)) or 'none yet'}")
    print(table, end="")
    return table
