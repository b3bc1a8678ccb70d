"""The demo's six stages and the driver that runs them in order, each cached (demo/markers.py).

1. corpus    Debian's `fortunes` -> prepared token files: pretraining text, training and held-out query documents.
2. pretrain  a small GPT-2 (GPT-2 BPE vocabulary) trained from scratch on the pretraining text.
3. labels    4 samples per query from the initial policy; VADER picks the most positive one (the paper's "mock"
             sentiment labeler), written in the original's best_of_4 JSON schema.
4. reward    `train_reward.train` on those labels (normalization before and after), as for OpenAI's label files.
5. policy    `train_policy.train`: PPO against the frozen reward model with an adaptive KL coefficient.
6. evaluate  held-out queries: VADER score of initial and final policy samples, KL to the initial policy.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lm_human_preferences import label_types, runs, train_policy, train_reward
from lm_human_preferences.language import labels as label_files
from lm_human_preferences.demo import corpus, labeler
from lm_human_preferences.demo.evaluate import evaluate_policy, summarize_evaluation
from lm_human_preferences.demo.markers import StageMarkers, remove_paths
from lm_human_preferences.demo.pretrain import pretrain
from lm_human_preferences.demo.profiles import (DemoPaths, DemoProfile, policy_hparams, reward_hparams,
                                                stage_config)
from lm_human_preferences.hparams import TrainPolicyHParams
from lm_human_preferences.language.datasets import QuerySampler, TokenFile
from lm_human_preferences.language.encodings import get_encoding
from lm_human_preferences.language.trained_models import load_model
from lm_human_preferences.policy import Policy
from lm_human_preferences.utils import ckpt, plotting
from lm_human_preferences.utils.logging import read_metrics

STAGES = ("corpus", "pretrain", "labels", "reward", "policy", "evaluate")
RLHF_STAGES = ("labels", "reward", "policy", "evaluate")


@dataclass
class DemoContext:
    profile: DemoProfile
    paths: DemoPaths
    corpus_dir: Path
    device: torch.device
    log: Callable[[str], None] = print
    results: dict = field(default_factory=dict)  # stage -> its results (from this run or its marker)


class DemoInterrupted(Exception):
    """A stage stopped before finishing (Ctrl-C or SIGTERM); completed stages stay cached."""


def run_corpus(ctx: DemoContext) -> dict:
    """Stage 1: read, split and encode the fortunes."""
    stats = corpus.prepare_corpus(ctx.corpus_dir, ctx.paths.corpus)
    for name, s in stats.items():
        ctx.log(f"  {name}: {s['documents']:,} documents, {s['tokens']:,} tokens")
    return stats


def run_pretrain(ctx: DemoContext) -> dict:
    """Stage 2: pretrain the small GPT-2 and record its loss curve next to it."""
    out = ctx.paths.pretrained
    remove_paths(ctx.paths.stage_outputs("pretrain"))
    stats = pretrain(ctx.profile.pretrain, TokenFile(ctx.paths.corpus / "lm_train"),
                     TokenFile(ctx.paths.corpus / "queries_test"), out, ctx.device, log=ctx.log)
    ckpt.atomic_write_json(out / "pretrain.json", stats)
    return {k: stats[k] for k in ("heldout_loss", "tokens", "tokens_per_second")}


def check_pretrained(paths: DemoPaths) -> None:
    """Loads the cached pretrained model once; ckpt.CheckpointError if it does not load."""
    load_model(str(paths.pretrained), ["value"], n_vocab=get_encoding("main").n_vocab)


def initial_policy(task, device: torch.device) -> Policy:
    """The task's initial policy (the pretrained model with a value head), frozen: the labels' sampler and the
    evaluation's reference."""
    enc, prefix, suffix = runs.task_encodings(task)
    return runs.build_policy(task, enc, prefix, suffix, device, frozen=True)


def run_labels(ctx: DemoContext) -> dict:
    """Stage 3: best-of-4 labels from the initial policy, chosen by VADER."""
    profile, paths = ctx.profile, ctx.paths
    task = reward_hparams(profile, paths, ctx.device.type).task
    enc = get_encoding("main")
    score = labeler.make_labeler()
    policy = initial_policy(task, ctx.device)
    sampler = QuerySampler(task.query_dataset, "train", enc, task.query_length, task.start_text, task.end_text,
                           batch_size=64)
    generator = torch.Generator(device=ctx.device).manual_seed(profile.seed)
    n_train, n_heldout = profile.initial_comparisons, profile.heldout_comparisons  # online: part of the budget
    records, scores = labeler.collect_labels(policy, sampler, enc, task, n_train + n_heldout, score, generator,
                                             np.random.default_rng(profile.seed))
    labeler.write_labels(paths.labels, labeler.training_passes(records[:n_train], profile.rm_epochs)
                         + records[n_train:])
    best = scores[np.arange(len(scores)), [r["best"] for r in records]]
    results = {"comparisons": len(records), "heldout": n_heldout, "train_records": profile.num_train,
               "mean_score": float(scores.mean()), "mean_best_score": float(best.mean()),
               "all_tied": float(np.mean(scores.max(1) == scores.min(1)))}
    ctx.log(f"  {len(records)} comparisons: mean VADER score of samples {results['mean_score']:+.3f}, of the chosen "
            f"best {results['mean_best_score']:+.3f}; all four tied (random pick) in {results['all_tied']:.0%}; "
            f"{n_train} x {profile.rm_epochs} training records, {n_heldout} held out")
    return results


def run_reward(ctx: DemoContext) -> dict:
    """Stage 4: train_reward.train on the labels."""
    remove_paths(ctx.paths.stage_outputs("reward"))
    train_reward.train(reward_hparams(ctx.profile, ctx.paths, ctx.device.type))
    rows = read_metrics(ctx.paths.run.reward_metrics)
    last = {k: v for row in rows for k, v in row.items()}
    losses = [row["train_reward/minibatch/loss"] for row in rows if "train_reward/minibatch/loss" in row]
    return {"heldout_accuracy": last.get("train_reward/heldout/accuracy"),
            "chance_accuracy": last.get("train_reward/heldout/chance_accuracy"),
            "heldout_loss": last.get("train_reward/heldout/loss"),
            "heldout_count": last.get("train_reward/heldout/count"),
            "first_loss": losses[0] if losses else None, "final_loss": float(np.mean(losses[-5:])) if losses else None}


def run_policy(ctx: DemoContext) -> dict:
    """Stage 5: train_policy.train (resuming from its latest checkpoint if an earlier run was interrupted)."""
    hp = policy_hparams(ctx.profile, ctx.paths, ctx.device.type)
    root = ctx.paths.run.checkpoints
    if ckpt.latest_checkpoint(root) is not None:
        ctx.log(f"  resuming PPO from {ckpt.latest_checkpoint(root)}")
    train_policy.train(hp, resume=True)
    latest = ckpt.latest_checkpoint(root)
    if latest is None or ckpt.checkpoint_step(latest) < hp.ppo.nupdates:
        raise DemoInterrupted(f"PPO stopped at update {0 if latest is None else ckpt.checkpoint_step(latest)} of "
                              f"{hp.ppo.nupdates}")
    rows = read_metrics(ctx.paths.run.policy_metrics)
    keys = ("objective/score", "objective/kl", "objective/kl_coef")
    first = {k: plotting.curve(rows, k)[1][0] for k in keys}
    final = {k: float(np.mean(plotting.curve(rows, k)[1][-5:])) for k in keys}
    rounds = [{k[len("online/"):]: v for k, v in row.items() if k.startswith("online/")}
              for row in rows if "online/round" in row]
    return {"updates": hp.ppo.nupdates, "episodes": hp.ppo.total_episodes, "first": first, "final": final,
            **({"online_rounds": rounds} if rounds else {})}


def load_final_policy(ctx: DemoContext, hp: TrainPolicyHParams) -> Policy:
    """The policy of the last PPO checkpoint, frozen."""
    run = ctx.paths.run
    latest = ckpt.latest_checkpoint(run.checkpoints)
    if latest is None:
        raise FileNotFoundError(f"no PPO checkpoint under {run.path}; rerun the demo with --restart")
    return runs.load_policy(run, latest, hp, get_encoding("main"), temperature=hp.task.policy.temperature,
                            device=ctx.device)


def run_evaluate(ctx: DemoContext) -> dict:
    """Stage 6: labeler score and KL of the initial and the final policy on held-out queries."""
    profile, paths = ctx.profile, ctx.paths
    hp = policy_hparams(profile, paths, ctx.device.type)
    task = hp.task
    enc = get_encoding("main")
    score = labeler.make_labeler()
    initial, final = initial_policy(task, ctx.device), load_final_policy(ctx, hp)
    reward_model = runs.load_reward_model(str(paths.final_reward_model(profile)), n_vocab=enc.n_vocab,
                                          padding_token=enc.padding_token, device=ctx.device)
    queries = torch.as_tensor(QuerySampler(task.query_dataset, "test", enc, task.query_length, task.start_text,
                                           task.end_text, batch_size=profile.num_eval).next_batch(), device=ctx.device)

    def evaluate(policy, seed):
        generator = torch.Generator(device=ctx.device).manual_seed(seed)
        return evaluate_policy(policy, initial, reward_model, queries, task, enc, score, generator)

    seed = 1000 + profile.seed
    results = {"num_queries": len(queries), "initial": evaluate(initial, seed),
               "initial_reseeded": evaluate(initial, seed + 1), "final": evaluate(final, seed)}
    # the reward model PPO ended against, on best-of-4 comparisons of the final policy's own samples (VADER's pick)
    sampler = QuerySampler(task.query_dataset, "test", enc, task.query_length, task.start_text, task.end_text,
                           batch_size=64)
    generator = torch.Generator(device=ctx.device).manual_seed(seed + 2)
    records, _ = labeler.collect_labels(final, sampler, enc, task, profile.num_eval, score, generator,
                                        np.random.default_rng(seed + 2))
    results["final_policy_rm_accuracy"] = policy_samples_accuracy(reward_model, records, task, enc, ctx.device)
    ckpt.atomic_write_json(paths.evaluation, results)
    return summarize_evaluation(results)


@torch.no_grad()
def policy_samples_accuracy(reward_model, records: list, task, enc, device: torch.device) -> float:
    """How often `reward_model` ranks VADER's pick first among best-of-4 `records` (float32)."""
    label_type = label_types.get_label_type("best_of_4")
    arrays = label_files.records_to_arrays(records, label_type.name, query_length=task.query_length,
                                           response_length=task.response_length, n_vocab=enc.n_vocab,
                                           padding_token=enc.padding_token)
    n, correct = len(records), 0.0
    for start in range(0, n, 64):
        batch = {k: v[start:start + 64] for k, v in arrays.items()}
        _, stats = train_reward.label_batch_loss(reward_model, label_type, batch, device)
        correct += float(stats["accuracy"]) * len(batch["best"])
    return correct / n


STAGE_FUNCTIONS = {"corpus": run_corpus, "pretrain": run_pretrain, "labels": run_labels, "reward": run_reward,
                   "policy": run_policy, "evaluate": run_evaluate}
STAGE_TITLES = {"corpus": "prepare the fortunes corpus", "pretrain": "pretrain a small GPT-2",
                "labels": "sample 4 responses per query, label the best with VADER",
                "reward": "train the reward model", "policy": "PPO against the reward model, adaptive KL",
                "evaluate": "evaluate initial and final policy on held-out queries"}


class SplitMarkers:
    """The markers of the shared stages (corpus, pretrain) in the work directory and of the RLHF stages in their own
    directory (the online variant's), used as one StageMarkers over all stages."""

    def __init__(self, paths: DemoPaths):
        self.parts = [StageMarkers(paths.work, STAGES[:len(STAGES) - len(RLHF_STAGES)]),
                      StageMarkers(paths.rlhf_dir, RLHF_STAGES)]

    def _of(self, stage: str) -> StageMarkers:
        return next((m for m in self.parts if stage in m.stages), self.parts[0])

    def path(self, stage: str) -> Path:
        return self._of(stage).path(stage)

    def status(self, stage, config):
        return self._of(stage).status(stage, config)

    def mark_done(self, stage, config, outputs, **kwargs):
        return self._of(stage).mark_done(stage, config, outputs, **kwargs)

    def invalidate_from(self, stage: str) -> None:
        for later in STAGES[STAGES.index(stage):]:
            self.path(later).unlink(missing_ok=True)


def stage_markers(paths: DemoPaths):
    """One StageMarkers over the work directory, or SplitMarkers when the RLHF stages have their own directory."""
    if paths.rlhf_dir.resolve() == Path(paths.work).resolve():
        return StageMarkers(paths.work, STAGES)
    return SplitMarkers(paths)


def run_stages(ctx: DemoContext, *, restart: bool = False) -> dict:
    """Runs every stage that is not cached, in order; returns {stage: marker} for all stages."""
    markers = stage_markers(ctx.paths)
    if restart:
        markers.invalidate_from(RLHF_STAGES[0])
    markers_by_stage = {}
    rerun_from_here = False
    for i, stage in enumerate(STAGES, 1):
        config = stage_config(stage, ctx.profile, ctx.corpus_dir)
        status = markers.status(stage, config)
        if status.done and not rerun_from_here and stage == "pretrain":
            try:
                check_pretrained(ctx.paths)
            except (ckpt.CheckpointError, OSError, ValueError) as e:
                status.done, status.reason = False, f"it does not load ({e})"
        if status.done and not rerun_from_here:
            ctx.log(f"[{i}/{len(STAGES)}] {stage}: cached ({status.marker['seconds']:.0f}s when it ran)")
            markers_by_stage[stage] = status.marker
            ctx.results[stage] = status.marker["results"]
            continue
        if status.reason:
            ctx.log(f"[{i}/{len(STAGES)}] {stage}: the cached result is not usable ({status.reason}); rebuilding it")
        markers.invalidate_from(stage)
        fresh = rerun_from_here or status.reason is not None or restart and stage in RLHF_STAGES
        if fresh:
            remove_paths(ctx.paths.stage_outputs(stage))
        for later in STAGES[STAGES.index(stage) + 1:]:
            remove_paths(ctx.paths.stage_outputs(later))
        ctx.log(f"[{i}/{len(STAGES)}] {stage}: {STAGE_TITLES[stage]}")
        t0, c0 = time.time(), time.process_time()
        try:
            results = STAGE_FUNCTIONS[stage](ctx)
        except KeyboardInterrupt:
            raise DemoInterrupted(f"interrupted in stage {stage!r}") from None
        seconds, cpu = time.time() - t0, time.process_time() - c0
        markers_by_stage[stage] = markers.mark_done(stage, config, ctx.paths.stage_outputs(stage), seconds=seconds,
                                                    cpu_seconds=cpu, results=results)
        ctx.results[stage] = results
        ctx.log(f"  {stage} done in {seconds:.0f}s (CPU time {cpu:.0f}s)")
        rerun_from_here = True
    return markers_by_stage
