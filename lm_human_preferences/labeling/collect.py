"""Collecting a round of comparisons for people to label: `launch.py label collect EXPERIMENT --store FILE`.

A round samples `num` queries from the task's dataset exactly as the trainers build them (`QuerySampler`: same
dataset, mode, start/end text, truncation and right-padding) and N responses for each (N from the experiment's
`best_of_N` label type) from a policy at its training temperature, through `runs.rollout`, the path every command
samples with; the responses are post-processed (truncated) as the task says. The store keeps, per comparison, the
raw query tokens and their text (pads dropped) and, per response, the post-processed tokens (what a reward model
is trained on, and what the export writes) and their text.

The policy is the experiment's initial model (`--policy initial`) or a train_policy run directory's latest
checkpoint. A run directory's own task is used (the task it was trained and samples on, with its temperature and
initial model), and it must agree with the experiment's task on everything that defines a label record (dataset,
lengths, prefix, suffix, start/end text, truncation, encoding): labels of another shape would not train the
experiment's reward model.

A store holds comparisons of one kind: the first collect creates it with the experiment's label type, task and
instructions in its meta; a later collect into it must match them. Later rounds continue the query stream where
the earlier rounds of the same mode stopped, so no query is asked twice (until the dataset wraps around). A
fraction `overlap` of each round's comparisons (round(overlap * num), chosen with the seed) asks two labelers, to
measure their agreement as the paper did.

Every input is checked, and the whole round sampled, before the store is written: a bad input or a failure while
sampling leaves the store (or its absence) as it was.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lm_human_preferences import label_types, runs
from lm_human_preferences.labeling.instructions import instructions_for
from lm_human_preferences.labeling.store import LabelStore, StoreError
from lm_human_preferences.language.datasets import QuerySampler
from lm_human_preferences.runs import RunDir
from lm_human_preferences.utils import dist
from lm_human_preferences.utils.ckpt import InputError, checkpoint_step, input_errors
from lm_human_preferences.utils.files import unwritable

MODES = ("train", "test")
INITIAL = "initial"
# The task settings that define a label record and what its query means: a store, and a policy run, must agree on
# them with the experiment (the temperature and the initial model may differ: they only change the samples).
RECORD_TASK_KEYS = ("query_dataset", "query_length", "response_length", "query_prefix", "query_suffix",
                    "start_text", "end_text", "truncate_token", "truncate_after")
# The meta of a store that a later collect must match (and the key it is refused under).
MATCHED_META = ("label_type", "num_responses", "task", "encoding", "n_vocab", "padding_token")


def record_task(task) -> dict:
    """The settings of `task` that define its label records (RECORD_TASK_KEYS)."""
    return {key: getattr(task, key) for key in RECORD_TASK_KEYS}


def store_meta(experiment: str, label_type, task, enc) -> dict:
    """The meta of a new store for `experiment`."""
    return {"label_type": label_type.name, "num_responses": label_type.num_responses, "experiment": experiment,
            "task": record_task(task), "query_length": task.query_length, "response_length": task.response_length,
            "encoding": enc.name, "n_vocab": enc.n_vocab, "padding_token": enc.padding_token,
            "instructions": instructions_for(experiment, task.query_dataset, label_type.num_responses)}


def check_arguments(*, num, seed, overlap, mode, batch_size) -> None:
    """InputError for a count, seed, fraction or mode that cannot work (the message names the option)."""
    for name, value in (("--num", num), ("--batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63):
        raise InputError(f"--seed must be an integer that fits 64 bits, got {seed!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap <= 1:
        raise InputError(f"--overlap must be a fraction in [0, 1] (of comparisons asked of two labelers), "
                         f"got {overlap!r}")
    if mode not in MODES:
        raise InputError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")


def pick_best_type(reward_hp, experiment: str):
    """The experiment's label type; InputError unless the app can collect it (best_of_N)."""
    label_type = label_types.get_label_type(reward_hp.labels.type)
    if not isinstance(label_type, label_types.PickBest):
        raise InputError(f"experiment {experiment!r} trains on {label_type.name} labels, which the labeling app "
                         f"cannot collect: it collects best_of_N labels only (pick the best of N responses)")
    return label_type


def resolve_policy(policy: str, reward_hp, experiment: str):
    """(task, run or None, checkpoint or None) for `--policy`: 'initial' or a train_policy run directory."""
    if policy == INITIAL:
        return reward_hp.task, None, None
    path = Path(policy)
    if not path.is_dir():
        raise InputError(f"--policy {policy!r} is neither '{INITIAL}' nor a directory: pass '{INITIAL}' for the "
                         f"experiment's initial model, or a train_policy run directory")
    run_dir = RunDir(path)
    hp = runs.read_run_hparams(run_dir)
    checkpoint = runs.latest_policy_checkpoint(run_dir)
    ours, theirs = record_task(reward_hp.task), record_task(hp.task)
    for key in RECORD_TASK_KEYS:
        if ours[key] != theirs[key]:
            raise InputError(f"run {path} was trained on a task with task.{key} = {theirs[key]!r}, but experiment "
                             f"{experiment!r} has {ours[key]!r}: its labels would not fit the experiment's reward "
                             f"model; collect for the experiment the run was trained for")
    theirs_enc, ours_enc = runs.read_encoding_name(run_dir), runs.encoding_name(reward_hp.task.policy.initial_model)
    if theirs_enc != ours_enc:
        raise InputError(f"run {path} uses the {theirs_enc!r} encoding, but experiment {experiment!r} uses "
                         f"{ours_enc!r}; collect for the experiment the run was trained for")
    return hp.task, (run_dir, hp), checkpoint


def check_store(path: Path, meta: dict, mode: str) -> tuple:
    """(exists, query offset) of the store at `path`: whether it exists yet, and where this round's `mode` queries
    start in the dataset's stream (after every earlier round's of that mode). InputError for a store of another
    kind of comparison, or a path where no store can be."""
    if not path.exists():
        problem = unwritable(path, directory=False)
        if problem is not None:
            raise InputError(f"cannot create the labeling store {path}: {problem}; pass --store with a file path in "
                             f"a writable directory")
        return False, 0
    if not path.is_file():
        raise InputError(f"--store {path} is not a file; pass the labeling store file (a new path creates one)")
    store = LabelStore(path)
    try:
        have, rounds = store.meta(), store.rounds()
    finally:
        store.close()  # reopened to write, after sampling
    for key in MATCHED_META:
        if have.get(key) != meta[key]:
            raise InputError(f"labeling store {path} holds {have.get('label_type')} comparisons of experiment "
                             f"{have.get('experiment')!r} with {key} {have.get(key)!r}, not {meta[key]!r} as "
                             f"experiment {meta['experiment']!r} needs: collect into another store")
    told = have.get("instructions") if isinstance(have.get("instructions"), dict) else {}
    if told.get("key") != meta["instructions"]["key"]:
        raise InputError(f"labeling store {path} was collected for experiment {have.get('experiment')!r}, whose "
                         f"labelers are told {told.get('title')!r}; experiment "
                         f"{meta['experiment']!r} needs other instructions: collect into another store")
    offset = max((r["source"].get("query_offset", 0) + r["source"].get("num_queries", r["comparisons"])
                  for r in rounds if r["source"].get("mode") == mode), default=0)
    return True, offset


def make_sampler(task, enc, mode: str, batch_size: int, offset: int) -> QuerySampler:
    """The task's query sampler for `mode`, past the first `offset` queries of its stream."""
    def sampler(rows):
        return QuerySampler(task.query_dataset, mode, enc, task.query_length, task.start_text, task.end_text, rows)
    out = sampler(batch_size)
    if offset:
        skip = sampler(1)
        for _ in range(offset):
            skip.next_batch()
        out.load_state_dict(skip.state_dict())
    return out


def sample_comparisons(policy, sampler, enc, task, *, num: int, num_responses: int, generator, precision: str,
                       device) -> list:
    """`num` comparisons: each query with `num_responses` post-processed responses, as store dicts."""
    comparisons = []
    while len(comparisons) < num:
        queries = torch.as_tensor(sampler.next_batch(), device=device)[:num - len(comparisons)]  # (b, Q)
        repeated = queries.repeat_interleave(num_responses, dim=0)  # (b*N, Q)
        post = runs.rollout(policy, repeated, task, enc.padding_token, generator=generator,
                            precision=precision)["postprocessed"]  # (b*N, T)
        post = post.reshape(len(queries), num_responses, -1).cpu().tolist()  # (b, N, T)
        for query, responses in zip(queries.cpu().tolist(), post):
            comparisons.append({"query_tokens": query, "query_text": enc.decode(query),
                                "responses": [(tokens, enc.decode(tokens)) for tokens in responses], "copies": 1})
    return comparisons


def collect(store_path, reward_hp, experiment: str, *, policy: str = INITIAL, num: int = 64,
            seed: Optional[int] = None, overlap: float = 0.1, mode: str = "train", batch_size: int = 16) -> dict:
    """Samples one round of `num` comparisons for `experiment` (its train_reward hyperparameters `reward_hp`) from
    `policy` into the store at `store_path` (created on first use). Returns the round's source and uids.

    InputError (nothing written) for bad arguments, an experiment whose labels the app cannot collect, a policy
    run that is missing, unfinished or of another task, and a store of another kind of comparison."""
    check_arguments(num=num, seed=seed, overlap=overlap, mode=mode, batch_size=batch_size)
    store_path = Path(store_path)
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    with input_errors():  # every check before sampling: a missing model, dataset, checkpoint or a foreign store
        label_type = pick_best_type(reward_hp, experiment)
        task, run, checkpoint = resolve_policy(policy, reward_hp, experiment)
        enc, prefix, suffix = runs.task_encodings(task)
        meta = store_meta(experiment, label_type, task, enc)
        exists, offset = check_store(store_path, meta, mode)
        sampler = make_sampler(task, enc, mode, batch_size, offset)
        device = dist.resolve_device("auto")
        dist.seed_everything(seed)  # the `test` model's random weights are drawn from the global stream
        if run is None:
            model = runs.build_policy(task, enc, prefix, suffix, device, frozen=True)
            precision = dist.resolve_precision(reward_hp.run.precision, device)
        else:
            model = runs.load_policy(run[0], checkpoint, run[1], enc, temperature=task.policy.temperature,
                                     device=device)
            precision = dist.resolve_precision(run[1].run.precision, device)
    source = {"experiment": experiment, "policy": INITIAL if run is None else str(Path(policy).resolve()),
              "initial_model": task.policy.initial_model,
              "checkpoint_step": None if checkpoint is None else checkpoint_step(checkpoint), "seed": seed,
              "temperature": task.policy.temperature, "mode": mode, "query_offset": offset, "num_queries": num,
              "overlap": overlap, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    where = "the initial model" if run is None else f"{checkpoint}"
    print(f"collecting {num} comparisons of {label_type.num_responses} responses for {experiment} from {where} at "
          f"temperature {task.policy.temperature:g}, seed {seed}, {mode} queries from #{offset}")
    generator = torch.Generator(device=device).manual_seed(seed)
    comparisons = sample_comparisons(model, sampler, enc, task, num=num, num_responses=label_type.num_responses,
                                     generator=generator, precision=precision, device=device)
    doubled = np.random.default_rng(seed % 2**64).choice(num, size=int(round(overlap * num)), replace=False)
    for i in doubled:
        comparisons[int(i)]["copies"] = 2
    try:
        if exists:
            store = LabelStore(store_path)
        else:
            store_path.parent.mkdir(parents=True, exist_ok=True)
            store = LabelStore.create(store_path, meta)
    except StoreError as e:  # another process created or removed it meanwhile
        raise InputError(str(e)) from e
    try:
        round_id = store.add_round(source)
        uids = store.add_comparisons(round_id, comparisons)
        progress = store.progress()
    finally:
        store.close()
    print(f"round {round_id}: {len(uids)} comparisons ({len(doubled)} for two labelers) in {store_path}; the store "
          f"now needs {progress['needed'] - progress['answered']} more answers")
    return {"round": round_id, "source": source, "uids": uids}

