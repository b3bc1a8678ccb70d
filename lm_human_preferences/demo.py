"""`python launch.py demo`: the whole method, offline, on a CPU, with a programmatic labeler in place of humans.

Stages, in order (each is cached under --cache_dir and skipped by a later run; an interrupted run resumes):

1. corpus    Debian's `fortunes` -> prepared token files: pretraining text, training and held-out query documents.
2. pretrain  a small GPT-2 (GPT-2 BPE vocabulary) trained from scratch on the pretraining text.
3. labels    4 samples per query from the initial policy; VADER picks the most positive one (the paper's "mock"
             sentiment labeler), written in the original's best_of_4 JSON schema.
4. reward    `train_reward.train` on those labels (normalization before and after), as for OpenAI's label files.
5. policy    `train_policy.train`: PPO against the frozen reward model with an adaptive KL coefficient.
6. evaluate  held-out queries: VADER score of initial and final policy samples, KL to the initial policy.

Then it writes the plots and summary.json into --out and prints the numbers. `--fast` is the reduced version the
test runs (a smaller model, fewer steps).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from lm_human_preferences import demo_corpus, demo_eval, demo_labels
from lm_human_preferences.demo_pretrain import PretrainConfig, pretrain
from lm_human_preferences.demo_stages import StageMarkers, remove_paths
from lm_human_preferences.hparams import TrainPolicyHParams, TrainRewardHParams
from lm_human_preferences.language.datasets import QuerySampler, TokenFile
from lm_human_preferences.language.encodings import get_encoding
from lm_human_preferences.language.model import GPT2
from lm_human_preferences.language.trained_models import (CheckpointError, check_state_dict, load_model,
                                                          read_model_config)
from lm_human_preferences.policy import Policy
from lm_human_preferences.rewards import load_reward_model
from lm_human_preferences.utils import ckpt
from lm_human_preferences.utils.dist import resolve_device
from lm_human_preferences.utils.logging import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "static" / "demo"
DEFAULT_CACHE = DEFAULT_OUT / "cache"
STAGES = ("corpus", "pretrain", "labels", "reward", "policy", "evaluate")
RLHF_STAGES = ("labels", "reward", "policy", "evaluate")
PERIOD = 13  # GPT-2 id of '.'


@dataclass(frozen=True)
class DemoProfile:
    """Every setting of one demo configuration."""
    name: str
    pretrain: PretrainConfig
    seed: int = 1
    # task: a "mock sentiment" task on fortunes, shaped like the original's books task (ORIGINAL §3.2)
    query_length: int = 24
    response_length: int = 16
    # The books task's period rule (truncate after the first '.' at index >= truncate_after, score -1 without one)
    # is off by default: for a model this small the penalty would dominate the reward.
    truncate_after: Optional[int] = None
    temperature: float = 0.7
    # labels and reward model
    num_labels: int = 1536  # comparisons collected; the last num_heldout only measure the reward model's accuracy
    num_heldout: int = 256
    # train_reward reads its labels once (ORIGINAL §9.2); the demo writes the training comparisons this many times in
    # the label file, i.e. trains for that many epochs: a 3M-parameter model needs more passes than GPT-2 does
    rm_epochs: int = 3
    rm_batch_size: int = 16
    rm_lr: float = 2e-3
    normalize_samples: int = 256
    rollout_batch_size: int = 128
    # PPO
    ppo_batch_size: int = 32
    ppo_episodes: int = 1920
    ppo_lr: float = 5e-4
    noptepochs: int = 4
    kl_coef: float = 0.15  # initial beta
    kl_target: float = 4.0  # nats per response
    kl_horizon: int = 625  # episodes; batch/horizon = 0.0512 per update, as the original's 512/10000
    # evaluation
    num_eval: int = 512

    @property
    def num_train(self) -> int:
        """Label records train_reward trains on: every training comparison rm_epochs times."""
        return (self.num_labels - self.num_heldout) * self.rm_epochs


# The reward model generalizes from few comparisons only on top of a reasonably trained trunk: on the same labels a
# 4-layer, 64-wide model pretrained for 400 steps (held-out loss 6.79) reached 33-40% held-out best-of-4 accuracy,
# one pretrained for 200 steps (7.12) stayed at chance. Width is what costs (the 50,257-way output layer). The
# pretraining runs at the CPU's float32 matrix rate where bf16 is not native (0.45 s a step on a 2-core AVX2 EPYC),
# so both profiles pretrain 400 steps: 500 steps (loss 6.65) made the full run 8.4-9 min there, too close to its
# 10-minute budget with the set-up. Halving the fast run's pretraining tokens (8 x 64 windows, loss 6.96) together
# with its labels (1,024) and episodes (960) lost the learning (VADER rise -0.004, reward model 32%).
PROFILES = {
    "full": DemoProfile(name="full", pretrain=PretrainConfig(n_layer=4, n_embd=64, n_head=4, n_ctx=64, batch_size=16,
                                                              steps=400, lr=3e-3, warmup=40),
                        num_labels=3072, num_heldout=256, ppo_episodes=2048),
    "fast": DemoProfile(name="fast", pretrain=PretrainConfig(n_layer=4, n_embd=64, n_head=4, n_ctx=64, batch_size=16,
                                                              steps=400, lr=3e-3, warmup=40),
                        ppo_episodes=1280, num_eval=256),
}


@dataclass
class DemoPaths:
    """Where each stage writes: work = <cache_dir>/<profile>, out = plots and summary.json."""
    work: Path
    out: Path

    @property
    def corpus(self) -> Path:
        return self.work / "corpus"

    @property
    def query_dataset(self) -> str:
        return str(self.corpus / demo_corpus.QUERY_PREFIX)

    @property
    def pretrained(self) -> Path:
        return self.work / "pretrained"

    @property
    def labels(self) -> Path:
        return self.work / "labels" / "best_of_4.json"

    @property
    def run(self) -> Path:
        return self.work / "run"

    @property
    def evaluation(self) -> Path:
        return self.work / "eval" / "evaluation.json"

    def stage_outputs(self, stage: str) -> list[Path]:
        """The files and directories `stage` writes (hashed when it finishes, removed when it reruns)."""
        run = self.run
        return {"corpus": demo_corpus.corpus_files(self.corpus),
                "pretrain": [self.pretrained / "model.safetensors", self.pretrained / "hparams.json",
                             self.pretrained / "pretrain.json"],
                "labels": [self.labels],
                "reward": [run / "reward_model", run / "train_reward_metrics.jsonl", run / "train_reward_hparams.json"],
                "policy": [run / "policy", run / "train_policy_metrics.jsonl", run / "train_policy_hparams.json"],
                "evaluate": [self.evaluation]}[stage]


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


# ---- hyperparameters of the real training code --------------------------------------------------------------

def task_binds(profile: DemoProfile, paths: DemoPaths) -> dict:
    """The demo task as dotted TaskHParams keys: fortunes queries that start and end at a sentence boundary."""
    return {
        "query_length": profile.query_length,
        "query_dataset": paths.query_dataset,
        "response_length": profile.response_length,
        "start_text": ".",  # start the query at the beginning of a sentence
        "end_text": ".",  # end it at the end of a sentence
        "truncate_token": None if profile.truncate_after is None else PERIOD,
        "truncate_after": profile.truncate_after or 0,
        "policy.temperature": profile.temperature,
        "policy.initial_model": str(paths.pretrained),
    }


def demo_precision(device: str) -> str:
    """The RLHF stages' run.precision: fp32 on a CPU, where the demo model's time goes to the float32 LM head (bf16
    autocast would only touch the small trunk and add casts), 'auto' on a GPU."""
    return "fp32" if device == "cpu" else "auto"


def reward_hparams(profile: DemoProfile, paths: DemoPaths, device: str) -> TrainRewardHParams:
    """train_reward settings: the original's best_of_4 reward experiment, scaled to the demo."""
    hp = TrainRewardHParams()
    hp.override_from_dict({
        **{f"task.{k}": v for k, v in task_binds(profile, paths).items()},
        "labels.type": "best_of_4",
        "labels.source": str(paths.labels),
        "labels.num_train": profile.num_train,
        "batch_size": profile.rm_batch_size,
        "lr": profile.rm_lr,
        "rollout_batch_size": profile.rollout_batch_size,
        "normalize_before": True,
        "normalize_after": True,
        "normalize_samples": profile.normalize_samples,
        "run.seed": profile.seed,
        "run.log_interval": 1,
        "run.save_dir": str(paths.run),
        "run.device": device,
        "run.wandb": "disabled",
        "run.precision": demo_precision(device),
    })
    hp.validate()
    return hp


def policy_hparams(profile: DemoProfile, paths: DemoPaths, device: str) -> TrainPolicyHParams:
    """train_policy settings: the original's sentiment experiment (adaptive KL), scaled to the demo."""
    nupdates = math.ceil(profile.ppo_episodes / profile.ppo_batch_size)
    hp = TrainPolicyHParams()
    hp.override_from_dict({
        **{f"task.{k}": v for k, v in task_binds(profile, paths).items()},
        "rewards.trained_model": str(paths.run / "reward_model"),
        "rewards.kl_coef": profile.kl_coef,
        "rewards.adaptive_kl": "on",
        "rewards.adaptive_kl.target": profile.kl_target,
        "rewards.adaptive_kl.horizon": profile.kl_horizon,
        "ppo.total_episodes": profile.ppo_episodes,
        "ppo.batch_size": profile.ppo_batch_size,
        "ppo.lr": profile.ppo_lr,
        "ppo.noptepochs": profile.noptepochs,
        "run.seed": profile.seed,
        "run.log_interval": max(1, nupdates // 4),
        "run.save_interval": max(1, nupdates // 4),
        "run.keep_checkpoints": 1,
        "run.save_dir": str(paths.run),
        "run.device": device,
        "run.wandb": "disabled",
        "run.precision": demo_precision(device),
    })
    hp.validate()
    return hp


def stage_config(stage: str, profile: DemoProfile, corpus_dir: Path) -> dict:
    """The settings a stage's cached result depends on (a change reruns it and every later stage)."""
    p = asdict(profile)
    task = {k: p[k] for k in ("query_length", "response_length", "truncate_after", "temperature")}
    return {"corpus": {"corpus_dir": str(Path(corpus_dir).resolve()), "fractions": demo_corpus.SPLIT_FRACTIONS,
                       "seed": demo_corpus.SPLIT_SEED},
            "pretrain": p["pretrain"],
            "labels": {**task, **{k: p[k] for k in ("num_labels", "num_heldout", "rm_epochs", "seed")}},
            "reward": {k: p[k] for k in ("rm_batch_size", "rm_lr", "normalize_samples", "rollout_batch_size", "seed")},
            "policy": {k: p[k] for k in ("ppo_batch_size", "ppo_episodes", "ppo_lr", "noptepochs", "kl_coef",
                                         "kl_target", "kl_horizon", "seed")},
            "evaluate": {"num_eval": profile.num_eval, "seed": profile.seed}}[stage]


# ---- stages -------------------------------------------------------------------------------------------------

def run_corpus(ctx: DemoContext) -> dict:
    """Stage 1: read, split and encode the fortunes."""
    stats = demo_corpus.prepare_corpus(ctx.corpus_dir, ctx.paths.corpus)
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
    """Loads the cached pretrained model once; CheckpointError if it does not load."""
    load_model(str(paths.pretrained), ["value"], n_vocab=get_encoding("main").n_vocab)


def _reference_policy(ctx: DemoContext, task) -> Policy:
    enc = get_encoding("main")
    model = load_model(task.policy.initial_model, ["value"], n_vocab=enc.n_vocab, device=ctx.device)
    return Policy(model, temperature=task.policy.temperature, padding_token=enc.padding_token).to(ctx.device).eval()


def run_labels(ctx: DemoContext) -> dict:
    """Stage 3: best-of-4 labels from the initial policy, chosen by VADER."""
    profile, paths = ctx.profile, ctx.paths
    task = reward_hparams(profile, paths, ctx.device.type).task
    enc = get_encoding("main")
    labeler = demo_labels.make_labeler()
    policy = _reference_policy(ctx, task)
    sampler = QuerySampler(task.query_dataset, "train", enc, task.query_length, task.start_text, task.end_text,
                           batch_size=64)
    generator = torch.Generator(device=ctx.device).manual_seed(profile.seed)
    records, scores = demo_labels.collect_labels(policy, sampler, enc, task, profile.num_labels, labeler, generator,
                                                 np.random.default_rng(profile.seed))
    n_train = profile.num_labels - profile.num_heldout
    demo_labels.write_labels(paths.labels, demo_labels.training_passes(records[:n_train], profile.rm_epochs)
                             + records[n_train:])
    best = scores[np.arange(len(scores)), [r["best"] for r in records]]
    results = {"comparisons": len(records), "heldout": profile.num_heldout, "train_records": profile.num_train,
               "mean_score": float(scores.mean()), "mean_best_score": float(best.mean()),
               "all_tied": float(np.mean(scores.max(1) == scores.min(1)))}
    ctx.log(f"  {len(records)} comparisons: mean VADER score of samples {results['mean_score']:+.3f}, of the chosen "
            f"best {results['mean_best_score']:+.3f}; all four tied (random pick) in {results['all_tied']:.0%}; "
            f"{n_train} x {profile.rm_epochs} training records, {profile.num_heldout} held out")
    return results


def run_reward(ctx: DemoContext) -> dict:
    """Stage 4: train_reward.train on the labels."""
    from lm_human_preferences import train_reward

    remove_paths(ctx.paths.stage_outputs("reward"))
    train_reward.train(reward_hparams(ctx.profile, ctx.paths, ctx.device.type))
    rows = read_metrics(ctx.paths.run / "train_reward_metrics.jsonl")
    last = {k: v for row in rows for k, v in row.items()}
    losses = [row["train_reward/minibatch/loss"] for row in rows if "train_reward/minibatch/loss" in row]
    return {"heldout_accuracy": last.get("train_reward/heldout/accuracy"),
            "chance_accuracy": last.get("train_reward/heldout/chance_accuracy"),
            "heldout_loss": last.get("train_reward/heldout/loss"),
            "heldout_count": last.get("train_reward/heldout/count"),
            "first_loss": losses[0] if losses else None, "final_loss": float(np.mean(losses[-5:])) if losses else None}


def run_policy(ctx: DemoContext) -> dict:
    """Stage 5: train_policy.train (resuming from its latest checkpoint if an earlier run was interrupted)."""
    from lm_human_preferences import train_policy

    hp = policy_hparams(ctx.profile, ctx.paths, ctx.device.type)
    root = ctx.paths.run / train_policy.POLICY_DIR / "checkpoints"
    if ckpt.latest_checkpoint(root) is not None:
        ctx.log(f"  resuming PPO from {ckpt.latest_checkpoint(root)}")
    train_policy.train(hp, resume=True)
    latest = ckpt.latest_checkpoint(root)
    if latest is None or ckpt.checkpoint_step(latest) < hp.ppo.nupdates:
        raise DemoInterrupted(f"PPO stopped at update {0 if latest is None else ckpt.checkpoint_step(latest)} of "
                              f"{hp.ppo.nupdates}")
    rows = read_metrics(ctx.paths.run / "train_policy_metrics.jsonl")
    keys = ("objective/score", "objective/kl", "objective/kl_coef")
    first = {k: demo_eval.last_per_step(rows, k)[1][0] for k in keys}
    final = {k: float(np.mean(demo_eval.last_per_step(rows, k)[1][-5:])) for k in keys}
    return {"updates": hp.ppo.nupdates, "episodes": hp.ppo.total_episodes, "first": first, "final": final}


def load_final_policy(ctx: DemoContext, task) -> Policy:
    """The policy of the last PPO checkpoint."""
    from lm_human_preferences import train_policy

    enc = get_encoding("main")
    latest = ckpt.latest_checkpoint(ctx.paths.run / train_policy.POLICY_DIR / "checkpoints")
    if latest is None:
        raise FileNotFoundError(f"no PPO checkpoint under {ctx.paths.run}; rerun the demo with --restart")
    model = GPT2(read_model_config(ctx.paths.pretrained), ["value"])
    state = ckpt.load_tensors(latest / "model.safetensors")
    check_state_dict(model, state, allow_missing_heads=False)
    model.load_state_dict(state)
    return Policy(model.to(ctx.device), temperature=task.policy.temperature,
                  padding_token=enc.padding_token).to(ctx.device).eval()


def run_evaluate(ctx: DemoContext) -> dict:
    """Stage 6: labeler score and KL of the initial and the final policy on held-out queries."""
    profile, paths = ctx.profile, ctx.paths
    task = reward_hparams(profile, paths, ctx.device.type).task
    enc = get_encoding("main")
    labeler = demo_labels.make_labeler()
    initial, final = _reference_policy(ctx, task), load_final_policy(ctx, task)
    reward_model = load_reward_model(str(paths.run / "reward_model"), n_vocab=enc.n_vocab,
                                     padding_token=enc.padding_token, device=ctx.device)
    queries = torch.as_tensor(QuerySampler(task.query_dataset, "test", enc, task.query_length, task.start_text,
                                           task.end_text, batch_size=profile.num_eval).next_batch(), device=ctx.device)

    def evaluate(policy, seed):
        generator = torch.Generator(device=ctx.device).manual_seed(seed)
        return demo_eval.evaluate_policy(policy, initial, reward_model, queries, task, enc, labeler, generator)

    seed = 1000 + profile.seed
    results = {"num_queries": len(queries), "initial": evaluate(initial, seed),
               "initial_reseeded": evaluate(initial, seed + 1), "final": evaluate(final, seed)}
    ckpt.atomic_write_json(paths.evaluation, results)
    return summarize_evaluation(results)


def summarize_evaluation(results: dict) -> dict:
    """The headline numbers of an evaluation (without the samples)."""
    def strip(r):
        return {k: v for k, v in r.items() if k != "samples"}

    initial, reseeded, final = results["initial"], results["initial_reseeded"], results["final"]
    return {"num_queries": results["num_queries"], "initial": strip(initial), "initial_reseeded": strip(reseeded),
            "final": strip(final), "score_rise": final["score"] - initial["score"],
            "score_rise_stderr": math.hypot(final["score_stderr"], initial["score_stderr"]),
            "seed_difference": reseeded["score"] - initial["score"]}


STAGE_FUNCTIONS = {"corpus": run_corpus, "pretrain": run_pretrain, "labels": run_labels, "reward": run_reward,
                   "policy": run_policy, "evaluate": run_evaluate}
STAGE_TITLES = {"corpus": "prepare the fortunes corpus", "pretrain": "pretrain a small GPT-2",
                "labels": "sample 4 responses per query, label the best with VADER",
                "reward": "train the reward model", "policy": "PPO against the reward model, adaptive KL",
                "evaluate": "evaluate initial and final policy on held-out queries"}


# ---- driver -------------------------------------------------------------------------------------------------

def run_stages(ctx: DemoContext, *, restart: bool = False) -> dict:
    """Runs every stage that is not cached, in order; returns {stage: marker} for all stages."""
    markers = StageMarkers(ctx.paths.work, STAGES)
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
            except (CheckpointError, OSError, ValueError) as e:
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


def write_report(ctx: DemoContext, markers: dict) -> dict:
    """Plots and summary.json into the output directory; returns the summary."""
    paths, profile = ctx.paths, ctx.profile
    paths.out.mkdir(parents=True, exist_ok=True)
    plots = demo_eval.plot_demo(paths.run / "train_reward_metrics.jsonl", paths.run / "train_policy_metrics.jsonl",
                                paths.out, profile.kl_target,
                                epoch_steps=(profile.num_labels - profile.num_heldout) // profile.rm_batch_size,
                                epochs=profile.rm_epochs)
    evaluation = json.loads(paths.evaluation.read_text())
    plots.append(demo_eval.plot_scores([s["score"] for s in evaluation["initial"]["samples"]],
                                       [s["score"] for s in evaluation["final"]["samples"]],
                                       paths.out / "labeler_score.png"))
    summary = {
        "profile": profile.name,
        "settings": asdict(profile),
        "stages": {s: {"seconds": m["seconds"], "cpu_seconds": m["cpu_seconds"]} for s, m in markers.items()},
        "total_seconds": sum(m["seconds"] for m in markers.values()),
        "corpus": ctx.results["corpus"],
        "pretrain": ctx.results["pretrain"],
        "labels": ctx.results["labels"],
        "reward_model": ctx.results["reward"],
        "ppo": ctx.results["policy"],
        "evaluation": summarize_evaluation(evaluation),
        "plots": [p.name for p in plots],
        "samples": {"initial": evaluation["initial"]["samples"], "final": evaluation["final"]["samples"]},
    }
    ckpt.atomic_write_json(paths.out / "summary.json", summary)
    return summary


def format_report(summary: dict, out: Path, n_examples: int = 3) -> str:
    """The printed summary: stage times, the before/after numbers, a few samples and where the plots are."""
    ev, rm = summary["evaluation"], summary["reward_model"]
    lines = ["", "=" * 78, f"Offline RLHF demo ({summary['profile']}): results on {ev['num_queries']} held-out queries",
             "=" * 78, "wall time per stage (s): " + ", ".join(f"{s} {v['seconds']:.0f}"
                                                            for s, v in summary["stages"].items())
             + f"; total {summary['total_seconds']:.0f}"]
    lines.append(f"labeler (VADER) score   initial {ev['initial']['score']:+.3f} +- {ev['initial']['score_stderr']:.3f}"
                 f"  ->  final {ev['final']['score']:+.3f} +- {ev['final']['score_stderr']:.3f}"
                 f"  (rise {ev['score_rise']:+.3f}; initial policy re-sampled with another seed: "
                 f"{ev['initial_reseeded']['score']:+.3f})")
    lines.append(f"reward-model score      initial {ev['initial']['reward']:+.3f}  ->  final {ev['final']['reward']:+.3f}")
    lines.append(f"KL(final || initial)    {ev['final']['kl']:.2f} +- {ev['final']['kl_stderr']:.2f} nats per response "
                 f"(target {summary['settings']['kl_target']:g}; final beta "
                 f"{summary['ppo']['final']['objective/kl_coef']:.3f})")
    lines.append(f"reward model held-out accuracy {rm['heldout_accuracy']:.1%} on {rm['heldout_count']:.0f} "
                 f"best-of-4 labels (chance {rm['chance_accuracy']:.0%}); loss {rm['first_loss']:.3f} -> "
                 f"{rm['final_loss']:.3f} (ln 4 = 1.386)")
    for i in range(min(n_examples, len(summary["samples"]["initial"]))):
        a, b = summary["samples"]["initial"][i], summary["samples"]["final"][i]
        lines += ["", f"query:   {a['query']}", f"initial: {a['response']!r}  [VADER {a['score']:+.2f}]",
                  f"final:   {b['response']!r}  [VADER {b['score']:+.2f}]"]
    lines += ["", f"plots: {', '.join(str(out / p) for p in summary['plots'])}", f"summary: {out / 'summary.json'}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch.py demo", description="An offline RLHF experiment on the CPU: pretrain a small GPT-2 on "
        "Debian's fortunes, label best-of-4 samples with VADER sentiment, train a reward model, run PPO, and "
        "evaluate. Completed stages are cached; rerunning resumes.")
    parser.add_argument("--fast", action="store_true",
                        help="the reduced version the tests run (3 to 5 minutes on 2 cores, by CPU)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where plots and summary.json go (default: {DEFAULT_OUT.relative_to(REPO_ROOT)}, or "
                             f"<cache_dir>/fast/report with --fast)")
    parser.add_argument("--cache_dir", type=Path, default=DEFAULT_CACHE,
                        help=f"stage cache (default: {DEFAULT_CACHE.relative_to(REPO_ROOT)})")
    parser.add_argument("--corpus_dir", type=Path, default=demo_corpus.FORTUNES_DIR,
                        help=f"fortune files (default: {demo_corpus.FORTUNES_DIR})")
    parser.add_argument("--restart", action="store_true",
                        help="run the labels, reward, policy and evaluation stages again (the corpus and the "
                             "pretrained model stay cached)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    parser.add_argument("--seed", type=int, default=None, help="seed of the RLHF stages (default 1)")
    return parser


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    profile = PROFILES["fast" if args.fast else "full"]
    if args.seed is not None:
        profile = replace(profile, seed=args.seed)
    cache_dir = args.cache_dir.expanduser().resolve()
    out = (args.out or (cache_dir / profile.name / "report" if args.fast else DEFAULT_OUT)).expanduser().resolve()
    paths = DemoPaths(work=cache_dir / profile.name, out=out)
    try:
        demo_labels.make_labeler()
        demo_corpus.fortune_files(args.corpus_dir)
        device = resolve_device(args.device)
    except (ImportError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ctx = DemoContext(profile=profile, paths=paths, corpus_dir=args.corpus_dir, device=device)
    ctx.log(f"offline RLHF demo ({profile.name}); stage cache {paths.work}, outputs {paths.out}")
    t0 = time.time()
    try:
        markers = run_stages(ctx, restart=args.restart)
    except DemoInterrupted as e:
        print(f"\n{e}. Completed stages are cached in {paths.work}; run the same command again to resume.",
              file=sys.stderr)
        return 130
    summary = write_report(ctx, markers)
    ctx.log(format_report(summary, paths.out))
    ctx.log(f"this run took {time.time() - t0:.0f}s")
    return 0
