"""Evaluating a policy run: `launch.py evaluate RUN [--against RUN_B | --against initial]`, automatic and human.

Automatic. On `--num` held-out queries (the task's dataset in mode 'test', the first ones of its stream, the same
for every run), run A (and B) each sample one response per query at the run's training temperature, through
`runs.rollout`, the path training samples with. Per run:

- `score`: the reward of run A's reward model (`runs.reward_model_path`), with the task's truncation penalty as in
  training (mean and standard error; `raw_score` without the penalty). B's samples are scored by A's reward model
  too, so the two runs are measured on one scale.
- `kl`: KL to the run's reference policy, its initial model: per response the sum over its tokens of
  `logprob - ref_logprob` (temperature-scaled, on the un-truncated sample), as `objective/kl` measures it (mean,
  standard error). The reference is rebuilt as training built it: for the random `test` model, from the run's seed
  (`reference_policy`).
- `penalty_rate`: the fraction of responses without the truncation token (those training gives the penalty);
  null for a task without one.
- `response_length`: tokens of the post-processed (truncated) response (mean, standard error).
- `distinct_1`, `distinct_2`: distinct token unigrams / bigrams over all responses divided by their number (1: no
  repetition at all; lower: more repetition).

With B, `preference`: how often A's reward model scores A's sample above B's on the same query (penalised scores;
ties count half), with a 95% Wilson interval (on the half-counted wins: conservative when there are many ties).

Run A and run B sample with independent streams derived from `--seed` (A's samples do not depend on whether or
against what B is evaluated), and B must share A's task (the settings that define a label record, and the encoding):
its samples are post-processed and penalised with A's task. Everything goes to `--out` (default `<RUN>/eval.json`:
the metrics, and each query's samples) and a table is printed.

Human (the paper's way). With `--human-store FILE` (a new file) and B, the same A-vs-B pairs are also written into a
labeling store (`lm_human_preferences/labeling/store.py`), one best_of_2 comparison per query, A's and B's samples
in a random order per comparison: the store's meta has `label_type` best_of_2, `purpose` 'evaluation' and the task's
instructions (`--experiment` names the task whose instructions labelers get; by default it is guessed from the
run's label source); its one round's source says `what`: 'evaluation A vs B', the two runs, and `a_sample`, per
comparison (uid `<round>-<i>`, in comparison order) the sample index that is A's. `--overlap` of the comparisons
ask two labelers. People label it in the labeling app (`launch.py label add-labeler/serve --store FILE`);
`evaluate --report-human FILE` then reports the human preference rate of A over B (each answer counts once) with a
95% Wilson interval, the number of answers, and the agreement on comparisons answered twice.

Every input is checked before anything is written: a bad input is one line `error: ...`, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from lm_human_preferences import label_types, runs
from lm_human_preferences.labeling import collect
from lm_human_preferences.labeling.instructions import INSTRUCTIONS
from lm_human_preferences.labeling.store import LabelStore, StoreError
from lm_human_preferences.language.datasets import QuerySampler
from lm_human_preferences.language.encodings import get_encoding
from lm_human_preferences.lm_tasks import responses_valid
from lm_human_preferences.runs import RunDir, RunError
from lm_human_preferences.utils import ckpt, dist
from lm_human_preferences.utils.ckpt import InputError, checkpoint_step, input_errors
from lm_human_preferences.utils.files import WriteError, unwritable, writing
from lm_human_preferences.utils.hyperparams import HParamsError

INITIAL = "initial"
MODE = "test"  # held-out queries
EVAL_FILE = "eval.json"  # the default --out, in run A's directory
PURPOSE = "evaluation"  # meta['purpose'] of a store `evaluate --human-store` writes
WHAT = "evaluation A vs B"  # its round's source['what']
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


# ---- the metrics (pure) ------------------------------------------------------------------------------------------

def mean_stderr(values) -> dict:
    """{'mean', 'stderr'} of a sequence of numbers (stderr: sample standard deviation / sqrt(n); 0 for one value)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {"mean": None, "stderr": None}
    return {"mean": float(x.mean()), "stderr": float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0}


def strip_padding(tokens: torch.Tensor, padding_token: int) -> List[List[int]]:
    """The rows of (B, T) post-processed responses without their padding tokens."""
    return [[t for t in row if t != padding_token] for row in tokens.cpu().tolist()]


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> Optional[float]:
    """Distinct n-grams over all `sequences` divided by the number of n-grams in them (corpus-level distinct-n);
    None when no sequence has n tokens."""
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def penalty_rate(postprocessed: torch.Tensor, truncate_token: Optional[int], truncate_after: int) -> Optional[float]:
    """The fraction of (B, T) post-processed responses without the truncate token at index >= truncate_after (the
    responses training gives the penalty); None for a task without a truncate token."""
    if truncate_token is None:
        return None
    return float((~responses_valid(postprocessed, truncate_token, truncate_after)).float().mean())


def wilson_interval(successes: float, n: int, z: float = Z95) -> Optional[list]:
    """The Wilson score interval [low, high] of a proportion `successes / n` (None for n = 0)."""
    if n <= 0:
        return None
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes <= 0 else max(0.0, center - half)  # exact at the ends, not 1 - 1e-16
    return [low, 1.0 if successes >= n else min(1.0, center + half)]


def preference(scores_a, scores_b) -> dict:
    """How often A's score beats B's on the same query: wins, ties, losses, n, rate ((wins + ties / 2) / n) and its
    95% Wilson interval."""
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"scores of A {a.shape} and of B {b.shape} must be two vectors of one length")
    wins, ties = int((a > b).sum()), int((a == b).sum())
    n = int(a.size)
    won = wins + ties / 2
    return {"wins": wins, "ties": ties, "losses": n - wins - ties, "n": n, "rate": won / n if n else None,
            "ci95": wilson_interval(won, n)}


def side_metrics(out: dict, kl: torch.Tensor, task, padding_token: int) -> dict:
    """A run's metrics from its rollout `out` (with raw_scores and scores) and per-response KL (B,)."""
    responses = strip_padding(out["postprocessed"], padding_token)
    return {"num": len(responses), "score": mean_stderr(out["scores"].cpu().tolist()),
            "raw_score": mean_stderr(out["raw_scores"].cpu().tolist()),
            "kl": mean_stderr(kl.cpu().tolist()),
            "penalty_rate": penalty_rate(out["postprocessed"], task.truncate_token, task.truncate_after),
            "response_length": mean_stderr([len(r) for r in responses]),
            "distinct_1": distinct_n(responses, 1), "distinct_2": distinct_n(responses, 2)}


# ---- the runs ----------------------------------------------------------------------------------------------------

def open_run(path) -> tuple:
    """(RunDir, hparams, latest checkpoint, encoding) of a finished train_policy run; RunError naming the fix."""
    if not Path(path).is_dir():
        raise RunError(f"run directory {str(path)!r} does not exist; pass a train_policy run directory (create one "
                       f"with `{runs.train_command(Path(path))}`)")
    run_dir = RunDir(path)
    hp = runs.read_run_hparams(run_dir)
    checkpoint = runs.latest_policy_checkpoint(run_dir)
    enc = get_encoding(runs.read_encoding_name(run_dir))
    return run_dir, hp, checkpoint, enc


def check_same_task(path_a, hp_a, enc_a, path_b, hp_b, enc_b) -> None:
    """RunError unless run B's task defines the same records as run A's (and uses the same encoding)."""
    ours, theirs = collect.record_task(hp_a.task), collect.record_task(hp_b.task)
    for key in collect.RECORD_TASK_KEYS:
        if ours[key] != theirs[key]:
            raise RunError(f"run {path_b} has task.{key} = {theirs[key]!r} but run {path_a} has {ours[key]!r}: "
                           f"the runs answer different queries and cannot be compared; evaluate runs of one task")
    if enc_a.name != enc_b.name:
        raise RunError(f"run {path_b} uses the {enc_b.name!r} encoding but run {path_a} uses {enc_a.name!r}; "
                       f"evaluate runs of one task")


def reference_policy(run_dir: RunDir, hp, enc, device):
    """The run's reference policy (its initial model at its training temperature), as train_policy built it.

    A prepared GPT-2 loads from its files. The random `test` model is drawn from the global RNG, which the trainer
    seeds with run.seed (virtual rank 0's seed, whose weights every rank gets) before it builds the score model
    (whose initialisation draws from the same stream) and then the reference policy: that sequence is replayed."""
    task = hp.task
    enc_task, prefix, suffix = runs.task_encodings(task)
    if task.policy.initial_model == "test":
        if hp.run.seed is None:
            raise RunError(f"run {run_dir.path} trained the random 'test' model unseeded (run.seed None): its "
                           f"initial policy cannot be rebuilt to measure the KL against")
        dist.seed_everything(dist.rank_seed(hp.run.seed, 0))
        trained = str(run_dir.reward_model) if hp.rewards.train_new_model is not None else hp.rewards.trained_model
        if trained is not None:  # the trainer loads it first: its initialisation draws from the stream
            runs.load_reward_model(trained, n_vocab=enc.n_vocab, padding_token=enc.padding_token)
    return runs.build_policy(task, enc_task, prefix, suffix, device, frozen=True)


def derived_seed(seed: int, role: int) -> int:
    """An independent seed for stream `role` (0: run A, 1: run B) from the command's --seed."""
    words = np.random.SeedSequence([int(seed) % 2**64, role]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def held_out_queries(task, enc, num: int, batch_size: int) -> torch.Tensor:
    """The first `num` queries of the task's test-mode stream, (num, query_length)."""
    sampler = QuerySampler(task.query_dataset, MODE, enc, task.query_length, task.start_text, task.end_text,
                           batch_size)
    batches = [torch.as_tensor(sampler.next_batch()) for _ in range(math.ceil(num / batch_size))]
    return torch.cat(batches)[:num]


def describe(path, hp, checkpoint) -> dict:
    if checkpoint is None:
        return {"run": INITIAL, "initial_model": hp.task.policy.initial_model,
                "temperature": hp.task.policy.temperature}
    return {"run": str(Path(path).resolve()), "checkpoint_step": checkpoint_step(checkpoint),
            "initial_model": hp.task.policy.initial_model, "temperature": hp.task.policy.temperature}


# ---- the evaluation ----------------------------------------------------------------------------------------------

def check_arguments(args) -> None:
    """InputError for arguments that cannot work together."""
    if args.report_human is not None:
        given = [name for name, value in (("RUN", args.run), ("--against", args.against),
                                          ("--human-store", args.human_store)) if value is not None]
        if given:
            raise InputError(f"--report-human reads a labeling store and takes no {', '.join(given)}: run "
                             f"`evaluate --report-human FILE` alone")
        return
    if args.run is None:
        raise InputError("pass a train_policy run directory to evaluate (RUN), or --report-human FILE")
    for name, value in (("--num", args.num), ("--batch_size", args.batch_size)):
        if value < 1:
            raise InputError(f"{name} must be a positive integer, got {value}")
    if not 0 <= args.overlap <= 1:
        raise InputError(f"--overlap must be a fraction in [0, 1], got {args.overlap}")
    if args.human_store is not None and args.against is None:
        raise InputError("--human-store writes A-vs-B comparisons: pass --against RUN_B or --against initial")
    if args.human_store is None and (args.experiment is not None or args.overlap_given):
        raise InputError("--experiment and --overlap are for --human-store FILE")


def evaluate(run, against=None, *, num: int = 256, seed: int = 0, batch_size: int = 32, out=None,
             human_store=None, overlap: float = 0.1, experiment: Optional[str] = None) -> dict:
    """Evaluates run A (`run`) alone or against run B (`against`: a run directory or 'initial'); writes `out`
    (default <run>/eval.json) and, with `human_store`, the comparisons into a new labeling store. Returns the
    result written (see the module docstring). InputError (a RunError) before anything is written for bad input."""
    with input_errors():
        run_a, hp_a, ckpt_a, enc = open_run(run)
        task = hp_a.task
        if against is None or against == INITIAL:
            side_b = None if against is None else (None, hp_a, None, enc)
        else:
            side_b = open_run(against)  # (RunDir, hparams, checkpoint, encoding)
            check_same_task(run, hp_a, enc, against, side_b[1], side_b[3])
        out_path = Path(out) if out is not None else run_a.evaluation
        problem = unwritable(out_path, directory=False)
        if problem is not None:
            raise RunError(f"cannot write the evaluation to {out_path}: {problem}; pass --out with a file path in a "
                           f"writable directory")
        rm_path = runs.reward_model_path(run_a, hp_a)
        if rm_path is None:
            raise RunError(f"{run_a.path} has no {run_a.reward_model.name}/ and its rewards.trained_model is not "
                           f"set: there is no reward model to score with")
        store_plan = None
        if human_store is not None:
            store_plan = plan_store(Path(human_store), hp_a, run_a, enc, experiment, out_path)
        device = dist.resolve_device("auto")
        precision = dist.resolve_precision(hp_a.run.precision, device)
        ref_a = reference_policy(run_a, hp_a, enc, device)
        policy_a = runs.load_policy(run_a, ckpt_a, hp_a, enc, temperature=task.policy.temperature, device=device)
        if side_b is not None:
            run_b, hp_b, ckpt_b, _ = side_b
            if ckpt_b is None:  # the initial policy: A's reference, sampled at A's temperature
                policy_b = ref_b = ref_a
            else:
                same_ref = (hp_b.task.policy.initial_model == task.policy.initial_model != "test"
                            and hp_b.task.policy.temperature == task.policy.temperature)
                ref_b = ref_a if same_ref else reference_policy(run_b, hp_b, enc, device)
                policy_b = runs.load_policy(run_b, ckpt_b, hp_b, enc,
                                            temperature=hp_b.task.policy.temperature, device=device)
        score_model = runs.load_reward_model(rm_path, n_vocab=enc.n_vocab, padding_token=enc.padding_token,
                                             device=device)
        queries = held_out_queries(task, enc, num, batch_size).to(device)

    who = f" against {against}" if against is not None else ""
    print(f"evaluating {ckpt_a}{who} on {num} {MODE} queries, seed {seed}, scored by {rm_path}")
    sides = [("a", policy_a, ref_a)] + ([("b", policy_b, ref_b)] if side_b is not None else [])
    outs, result = {}, {"num_queries": num, "seed": seed, "mode": MODE, "reward_model": str(rm_path),
                        "a": {**describe(run, hp_a, ckpt_a)}, "b": None, "preference": None}
    if side_b is not None:
        result["b"] = describe(against, side_b[1], side_b[2])
    for role, (name, policy, ref) in enumerate(sides):
        generator = torch.Generator(device=device).manual_seed(derived_seed(seed, role))
        o = runs.rollout(policy, queries, task, enc.padding_token, generator=generator, precision=precision,
                         ref_policy=ref, score_model=score_model, micro_batch=batch_size)
        o["kl"] = (o["logprobs"] - o["ref_logprobs"]).float().sum(dim=1)
        outs[name] = o
        result[name].update(side_metrics(o, o["kl"], task, enc.padding_token))
    if side_b is not None:
        result["preference"] = preference(outs["a"]["scores"].cpu().tolist(), outs["b"]["scores"].cpu().tolist())
    result["samples"] = sample_records(queries, outs, enc)

    if store_plan is not None:
        result["human_store"] = write_store(store_plan, result, queries, outs, enc, seed=seed, overlap=overlap)
    with writing(out_path):
        out_path.parent.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_json(out_path, result)
    print(format_table(result))
    print(f"wrote {out_path}")
    return result


def sample_records(queries, outs: dict, enc) -> list:
    """Per query: its text, and per run the post-processed response, its score, raw score and KL."""
    records = []
    for i, query in enumerate(queries.cpu().tolist()):
        record = {"query": enc.decode(query)}
        for name, o in outs.items():
            record[name] = {"response": enc.decode(o["postprocessed"][i].cpu().tolist()),
                            "score": float(o["scores"][i]), "raw_score": float(o["raw_scores"][i]),
                            "kl": float(o["kl"][i])}
        records.append(record)
    return records


def _pm(m: dict, digits: int = 3) -> str:
    return "n/a" if m["mean"] is None else f"{m['mean']:.{digits}f} ± {m['stderr']:.{digits}f}"


def _maybe(x, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _pct_ci(rate, ci) -> str:
    return "n/a" if rate is None else f"{100 * rate:.1f}% [{100 * ci[0]:.1f}%, {100 * ci[1]:.1f}%]"


def format_table(result: dict) -> str:
    """The printed table: one row per metric, one column per run."""
    cols = [result["a"]] + ([result["b"]] if result["b"] is not None else [])

    def head(side):
        return side["run"] if side["run"] == INITIAL else f"{Path(side['run']).name} (step {side['checkpoint_step']})"

    rows = [("", *(f"{name}: {head(s)}" for name, s in zip("AB", cols))),
            ("reward model score", *(_pm(s["score"]) for s in cols)),
            ("  raw (no penalty)", *(_pm(s["raw_score"]) for s in cols)),
            ("KL to reference", *(_pm(s["kl"]) for s in cols)),
            ("penalty rate", *(_maybe(s["penalty_rate"], ".1%") for s in cols)),
            ("response length", *(_pm(s["response_length"], 2) for s in cols)),
            ("distinct-1", *(_maybe(s["distinct_1"], ".3f") for s in cols)),
            ("distinct-2", *(_maybe(s["distinct_2"], ".3f") for s in cols))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    p = result.get("preference")
    if p is not None:
        lines.append(f"A preferred over B by the reward model: {_pct_ci(p['rate'], p['ci95'])} (95% CI; "
                     f"{p['wins']} wins, {p['ties']} ties counted half, {p['losses']} losses of {p['n']})")
    return "\n".join(lines)


# ---- the human round ---------------------------------------------------------------------------------------------

def guess_experiment(run_dir: RunDir, hp) -> str:
    """The experiment whose labeler instructions fit the run: the first instructions key (sentiment,
    descriptiveness, cnndm, tldr, test) named in the run's label source, else its query dataset."""
    sources = []
    if hp.rewards.train_new_model is not None:
        sources.append(str(hp.rewards.train_new_model.labels.source or ""))
    elif hp.rewards.trained_model not in (None, "test"):
        reward_hparams = RunDir(Path(hp.rewards.trained_model).parent).reward_hparams
        try:
            sources.append(str(json.loads(reward_hparams.read_text())["labels"]["source"] or ""))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    for source in sources:
        if source == "test":
            return "test"
        parts = source.replace("\\", "/").lower().split("/")
        for key in INSTRUCTIONS:
            if key != "generic" and key in parts:
                return key
    return hp.task.query_dataset


def plan_store(path: Path, hp, run_a: RunDir, enc, experiment: Optional[str], out_path: Path) -> dict:
    """The meta of the new evaluation store at `path`; RunError if it exists or cannot be created."""
    if path.exists() or path.is_symlink():
        raise RunError(f"--human-store {path} already exists; pass a new file (an evaluation store holds one "
                       f"evaluation)")
    if path.resolve() == out_path.resolve():
        raise RunError(f"--human-store {path} is the --out file; pass another file")
    problem = unwritable(path, directory=False)
    if problem is not None:
        raise RunError(f"cannot create the labeling store {path}: {problem}; pass --human-store with a file path "
                       f"in a writable directory")
    experiment = experiment or guess_experiment(run_a, hp)
    meta = collect.store_meta(experiment, label_types.get_label_type("best_of_2"), hp.task, enc)
    meta["purpose"] = PURPOSE
    meta["instructions"]["paragraphs"].insert(0, "This round compares two systems: judge each pair on its own.")
    return {"path": path, "meta": meta}


def write_store(plan: dict, result: dict, queries, outs: dict, enc, *, seed: int, overlap: float) -> dict:
    """Writes one best_of_2 comparison per query (A's and B's samples in a random order) into a new store."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**64, 2]))
    num = len(queries)
    a_sample = rng.integers(0, 2, size=num).tolist()  # per comparison: the sample index of A's response
    doubled = set(rng.choice(num, size=int(round(overlap * num)), replace=False).tolist())
    comparisons = []
    for i, query in enumerate(queries.cpu().tolist()):
        pair = [outs["a"]["postprocessed"][i].cpu().tolist(), outs["b"]["postprocessed"][i].cpu().tolist()]
        if a_sample[i] == 1:
            pair.reverse()
        comparisons.append({"query_tokens": query, "query_text": enc.decode(query),
                            "responses": [(tokens, enc.decode(tokens)) for tokens in pair],
                            "copies": 2 if i in doubled else 1})
    keys = ("run", "checkpoint_step", "initial_model", "temperature")
    a, b = ({k: result[side][k] for k in keys if k in result[side]} for side in ("a", "b"))
    source = {"purpose": PURPOSE, "what": WHAT, "a": a, "b": b,
              # what `label status` shows of a round
              "policy": f"{WHAT}: A = {_name(a)}, B = {_name(b)}",
              "temperature": a["temperature"] if a["temperature"] == b["temperature"] else
              f"{a['temperature']} (A), {b['temperature']} (B)",
              "reward_model": result["reward_model"], "seed": seed, "mode": MODE, "query_offset": 0,
              "num_queries": num, "overlap": overlap, "a_sample": a_sample,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = plan["path"]
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        store = LabelStore.create(path, plan["meta"])
    try:
        round_id = store.add_round(source)
        uids = store.add_comparisons(round_id, comparisons)
    finally:
        store.close()
    print(f"wrote {len(uids)} A-vs-B comparisons ({len(doubled)} for two labelers) into {path}; label them with "
          f"`launch.py label add-labeler --store {path} NAME` and `launch.py label serve --store {path}`, then "
          f"run `launch.py evaluate --report-human {path}`")
    return {"path": str(path), "round": round_id, "comparisons": len(uids), "for_two_labelers": len(doubled)}


def a_sample_by_uid(store: LabelStore) -> dict:
    """{comparison uid: the sample index of A's response} over the store's evaluation rounds."""
    mapping = {}
    for r in store.rounds():
        src = r["source"]
        if src.get("purpose") != PURPOSE or not isinstance(src.get("a_sample"), list):
            continue
        if len(src["a_sample"]) != r["comparisons"]:
            raise InputError(f"round {r['id']} of {store.path} has {r['comparisons']} comparisons but "
                             f"{len(src['a_sample'])} entries in a_sample; the store was changed by hand")
        for i, a in enumerate(src["a_sample"]):
            mapping[f"{r['id']}-{i}"] = int(a)
    return mapping


def human_report(store_path) -> dict:
    """The human preference rate of A over B in an evaluation store: answers, A chosen, rate and 95% Wilson interval
    (each answer counts once), and the agreement on comparisons answered by two or more labelers."""
    store = LabelStore(store_path)
    try:
        meta = store.meta()
        if meta.get("purpose") != PURPOSE:
            raise InputError(f"labeling store {store_path} was not written by `evaluate --human-store` (its meta "
                             f"has no purpose {PURPOSE!r}); pass the store the evaluation wrote")
        mapping = a_sample_by_uid(store)
        rounds = [r["source"] for r in store.rounds() if r["source"].get("purpose") == PURPOSE]
        labeled, progress = store.labeled(), store.progress()
    finally:
        store.close()
    answers = chose_a = 0
    pairs = agree = twice = 0
    for c in labeled:
        if c["uid"] not in mapping:
            continue
        a = mapping[c["uid"]]
        answers += len(c["choices"])
        chose_a += sum(choice == a for choice in c["choices"])
        if len(c["choices"]) >= 2:
            twice += 1
            for i in range(len(c["choices"])):
                for j in range(i + 1, len(c["choices"])):
                    pairs += 1
                    agree += c["choices"][i] == c["choices"][j]
    return {"store": str(store_path), "a": rounds[0]["a"] if rounds else None,
            "b": rounds[0]["b"] if rounds else None, "comparisons": len(mapping),
            "answers": answers, "needed": progress["needed"], "a_chosen": chose_a,
            "rate": chose_a / answers if answers else None, "ci95": wilson_interval(chose_a, answers),
            "agreement": {"comparisons": twice, "pairs": pairs, "agree": agree,
                          "rate": agree / pairs if pairs else None}}


def _name(side: Optional[dict]) -> str:
    if side is None:
        return "?"
    return side["run"] if side["run"] == INITIAL else f"{side['run']} (step {side.get('checkpoint_step')})"


def format_human(report: dict) -> str:
    name = _name
    g = report["agreement"]
    agreement = (f"{100 * g['rate']:.1f}% of {g['pairs']} pairs of answers on {g['comparisons']} comparisons "
                 f"labeled twice" if g["pairs"] else "n/a (no comparison labeled twice yet)")
    return "\n".join([
        f"human evaluation in {report['store']}: A = {name(report['a'])}, B = {name(report['b'])}",
        f"A preferred over B by labelers: {_pct_ci(report['rate'], report['ci95'])} (95% Wilson CI; "
        f"{report['a_chosen']} of {report['answers']} answers; {report['needed']} answers asked for)",
        f"agreement: {agreement}"])


# ---- the command -------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """A bad argument is one InputError line (status 2), not usage text."""

    def error(self, message):
        raise InputError(f"{self.prog}: {message} (see: {self.prog} --help)")


def _overlap(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="launch.py evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help="directory of the train_policy run to evaluate (A)")
    p.add_argument("--against", metavar="RUN_B", help="another train_policy run of the same task, or 'initial' "
                   "(A's initial model) to compare A with")
    p.add_argument("--num", type=int, default=256, help="held-out (test-mode) queries (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--batch_size", type=int, default=32, help="queries per forward pass (default: 32)")
    p.add_argument("--out", default=None, help=f"the JSON file to write (default: <RUN>/{EVAL_FILE}; with "
                   f"--report-human: none)")
    p.add_argument("--human-store", dest="human_store", metavar="FILE",
                   help="also write the A-vs-B comparisons into this new labeling store, for people to label")
    p.add_argument("--overlap", type=_overlap, default=None,
                   help="with --human-store: the fraction of comparisons asked of two labelers (default: 0.1)")
    p.add_argument("--experiment", default=None, help="with --human-store: the experiment whose labeler "
                   "instructions to use (default: guessed from the run's label source)")
    p.add_argument("--report-human", dest="report_human", metavar="FILE",
                   help="report the human preference rate of A over B from a labeled evaluation store")
    return p


def main(argv=None) -> int:
    """`launch.py evaluate ...`; returns the exit status (2 with `error: ...` for bad input, 1 for a failed write)."""
    try:
        args = build_parser().parse_args(argv)
        args.overlap_given = args.overlap is not None
        args.overlap = 0.1 if args.overlap is None else args.overlap
        check_arguments(args)
        if args.report_human is not None:
            with input_errors():
                out = None if args.out is None else Path(args.out)
                if out is not None and (problem := unwritable(out, directory=False)) is not None:
                    raise InputError(f"cannot write the report to {out}: {problem}; pass --out with a file path in "
                                     f"a writable directory")
                try:
                    report = human_report(args.report_human)
                except StoreError as e:
                    raise InputError(str(e)) from e
            print(format_human(report))
            if out is not None:
                with writing(out):
                    ckpt.atomic_write_json(out, report)
                print(f"wrote {out}")
            return 0
        evaluate(args.run, args.against, num=args.num, seed=args.seed, batch_size=args.batch_size, out=args.out,
                 human_store=args.human_store, overlap=args.overlap, experiment=args.experiment)
        return 0
    except (InputError, HParamsError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (WriteError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
