"""PPO against a frozen reward model under a KL penalty (ORIGINAL §10), alone or under torchrun.

One update, in the original's order: sample -> reference logprobs -> score (truncate, reward model, penalty) ->
per-token rewards with the current beta -> noptepochs x nminibatches of PPO -> stats (all-reduced) -> KL controller
update -> log -> checkpoint. The run is defined on `virtual_ranks` ranks (the original's MPI ranks) whatever the
number of processes: each virtual rank reads its own queries, samples with its own stream, permutes its own rows
and whitens its own minibatch; gradients and statistics are averaged over all of them. Every run.sample_interval
updates rank 0 also samples a fixed set of held-out queries with random numbers of its own (training_samples.py).
"""
import contextlib
import errno
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lm_human_preferences import online as online_rounds
from lm_human_preferences import lm_tasks, ppo, runs, train_reward, training_samples
from lm_human_preferences.hparams import TrainPolicyHParams
from lm_human_preferences.language.datasets import QuerySampler
from lm_human_preferences.language.fused import store_linears_in
from lm_human_preferences.runs import RunDir
from lm_human_preferences.utils import ckpt, dist
from lm_human_preferences.utils.files import writing
from lm_human_preferences.utils.logging import Logger, format_stats
from lm_human_preferences.utils.optim import TFAdam
from lm_human_preferences.utils.signals import SignalFlag
from lm_human_preferences.utils.training import (VirtualRanks, nonfinite_parameter, nonfinite_statistic,
                                                 optimizer_step, pieces, wrap_ddp)


class StopRequested(Exception):
    """Raised inside the loop after SIGTERM/SIGINT once a checkpoint is written."""


def make_kl_controller(rewards_hp):
    if rewards_hp.adaptive_kl is not None:
        return ppo.AdaptiveKLController(rewards_hp.kl_coef, rewards_hp.adaptive_kl.target, rewards_hp.adaptive_kl.horizon)
    return ppo.FixedKLController(rewards_hp.kl_coef)


def ppo_minibatch(ddp_policy, optimizer, mb, *, ppo_hp, lr, n_groups, micro_batch, device, precision):
    """One optimizer step of PPO on a process's minibatch `mb` (queries, responses, logprobs, values, rewards): the
    minibatches of its `n_groups` virtual ranks, one after the other, each whitened on its own.

    Advantages are computed on the whole minibatch (whitening needs it); the forward/backward may then run in
    pieces of `micro_batch` rows whose weighted gradients add up to the full minibatch's. The loss is the mean over
    all rows, i.e. the mean of the virtual ranks' losses (their minibatches are equal), as the original's average
    of rank gradients; the moments of returns and values are each virtual rank's, averaged.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    adv = ppo.compute_advantages(mb["values"], mb["rewards"], ppo_hp.gamma, ppo_hp.lam, ppo_hp.whiten_rewards,
                                 n_groups=n_groups)

    def loss_fn(rows):
        with dist.autocast(device, precision):
            new = ddp_policy(mb["queries"][rows], mb["responses"][rows])
            return ppo.ppo_loss(new["logprobs"], new["values"], new["entropies"], mb["logprobs"][rows],
                                mb["values"][rows], adv.advantages[rows], adv.returns[rows], ppo_hp.cliprange,
                                ppo_hp.cliprange_value, ppo_hp.vf_coef)

    n = len(adv.advantages)
    totals = optimizer_step(optimizer, ddp_policy, n, micro_batch, loss_fn, groups=n_groups)
    if len(pieces(n, micro_batch, n_groups)) > 1 or n_groups > 1:  # each virtual rank's moments, not the pieces'
        returns, values = adv.returns.reshape(n_groups, -1), mb["values"].float().reshape(n_groups, -1)
        totals["returns/mean"], totals["returns/var"] = returns.mean(1).mean(), returns.var(1, unbiased=False).mean()
        totals["val/mean"], totals["val/var"] = values.mean(1).mean(), values.var(1, unbiased=False).mean()
    return totals


def ppo_train(ddp_policy, optimizer, rollouts, orders, *, ppo_hp, lr, nminibatches, n_groups, micro_batch, device,
              precision):
    """noptepochs passes (one row order per pass in `orders`, ppo.minibatch_orders), each over nminibatches
    contiguous slices of it."""
    stats = []
    for order in orders:
        size = len(order) // nminibatches
        for start in range(0, len(order), size):
            idx = order[start:start + size]
            stats.append(ppo_minibatch(ddp_policy, optimizer, {k: v[idx] for k, v in rollouts.items()},
                                       ppo_hp=ppo_hp, lr=lr, n_groups=n_groups, micro_batch=micro_batch,
                                       device=device, precision=precision))
    return stats


class PPOTrainer:
    """Holds the models, optimizer, sampler and virtual ranks (their random streams) of one process; `step()` once
    per update: `rollout` then `update`."""

    def __init__(self, hp: TrainPolicyHParams, info, *, score_model, ref_policy, policy, sampler, enc, precision,
                 vranks: VirtualRanks):
        self.hp, self.info, self.enc, self.precision = hp, info, enc, precision
        self.score_model, self.ref_policy, self.policy, self.sampler = score_model, ref_policy, policy, sampler
        self.vranks = vranks
        if precision == "bf16":  # the frozen models only run under autocast: the same outputs in half the memory
            for frozen in (ref_policy.model, score_model.model):
                store_linears_in(frozen, torch.bfloat16)
        self.ddp_policy = wrap_ddp(policy, info.device)
        if hp.run.compile:
            policy.model.forward = torch.compile(policy.model.forward)
        self.optimizer = TFAdam(policy.parameters(), lr=hp.ppo.lr, eps=1e-5)
        self.kl_ctl = make_kl_controller(hp.rewards)
        self.global_step = 0
        self.nupdates = hp.ppo.nupdates
        self.rank_batch = vranks.rows(hp.ppo.batch_size)  # episodes of each virtual rank
        self.batch = self.rank_batch * len(vranks)  # of this process
        self.last_time = time.time()
        self.start_time = time.time()

    def rollout(self, queries):
        """Responses to `queries` with their logprobs, values, reference logprobs and penalized scores
        (runs.rollout; no gradients, in pieces of run.rollout_micro_batch)."""
        return runs.rollout(self.policy, queries, self.hp.task, self.enc.padding_token,
                            generator=self.vranks.generators, precision=self.precision, ref_policy=self.ref_policy,
                            score_model=self.score_model, micro_batch=self.hp.run.rollout_micro_batch)

    def update(self, queries, data) -> dict:
        """Per-token rewards with the current beta, noptepochs x nminibatches of PPO, statistics (all-reduced and
        checked to be finite; with the diagnostics of the post-processed responses when `data` holds them), then
        the KL controller's update; returns the statistics."""
        hp, info = self.hp, self.info
        kl_coef = self.kl_ctl.value
        rewards, non_score_reward, _ = ppo.compute_rewards(data["scores"], data["logprobs"], data["ref_logprobs"],
                                                           kl_coef)
        rollouts = dict(queries=queries, responses=data["responses"], logprobs=data["logprobs"],
                        values=data["values"], rewards=rewards)
        lr = hp.ppo.lr * (1 - self.global_step / self.nupdates)
        orders = [ppo.minibatch_orders(torch.as_tensor(self.vranks.permutations(self.rank_batch), device=info.device),
                                       hp.ppo.nminibatches) for _ in range(hp.ppo.noptepochs)]
        train_stats = ppo_train(self.ddp_policy, self.optimizer, rollouts, orders, ppo_hp=hp.ppo, lr=lr,
                                nminibatches=hp.ppo.nminibatches, n_groups=len(self.vranks),
                                micro_batch=hp.run.train_micro_batch, device=info.device, precision=self.precision)
        diagnostics = None if "postprocessed" not in data else lm_tasks.response_diagnostics(
            data["postprocessed"], hp.task.truncate_token, hp.task.truncate_after, n_groups=len(self.vranks))
        stats = ppo.step_stats(logprobs=data["logprobs"], ref_logprobs=data["ref_logprobs"],
                               non_score_reward=non_score_reward, scores=data["scores"], kl_coef=kl_coef,
                               train_stats=train_stats,
                               reduce_fn=lambda st: dist.all_reduce_mean_tensors(st, info.device),
                               diagnostics=diagnostics)
        stats = {k: float(v) for k, v in stats.items()}
        stats["ppo/lr"] = lr
        bad = nonfinite_statistic(stats)
        if bad is not None:
            raise FloatingPointError(f"PPO update {self.global_step}: statistic {bad} = {stats[bad]} is not finite; "
                                     f"the run stopped and the last good checkpoint is kept. Lower ppo.lr or use "
                                     f"--run.precision fp32")
        bad = nonfinite_parameter(self.policy)
        if bad is not None:
            raise FloatingPointError(f"PPO update {self.global_step}: parameter {bad} is not finite after the "
                                     f"optimizer step; the run stopped and the last good checkpoint is kept. Lower "
                                     f"ppo.lr or use --run.precision fp32")
        self.kl_ctl.update(stats["objective/kl"], hp.ppo.batch_size)

        now, step = time.time(), self.global_step
        stats.update({"elapsed/updates": step + 1, "elapsed/steps/serial": (step + 1) * hp.task.response_length,
                      "elapsed/steps/total": (step + 1) * hp.ppo.batch_size * hp.task.response_length,
                      "elapsed/episodes": (step + 1) * hp.ppo.batch_size,
                      "elapsed/fps": int(hp.ppo.batch_size * hp.task.response_length / max(now - self.last_time, 1e-9)),
                      "elapsed/time": now - self.start_time})
        self.last_time = now
        return stats

    def step(self):
        """One PPO update on this rank's next batch of queries; returns the statistics and the rollout."""
        queries = torch.as_tensor(self.sampler.next_batch(), device=self.info.device)
        data = self.rollout(queries)
        return self.update(queries, data), dict(data, queries=queries)

    def print_samples(self, data, n=3):
        """Three decoded samples: query, post-processed response, score, kl, and total = score - kl_coef*kl."""
        kl_coef0 = self.hp.rewards.kl_coef
        for i in range(min(n, len(data["queries"]))):
            kl_i = (data["logprobs"][i] - data["ref_logprobs"][i]).sum().item()
            score = data["scores"][i].item()
            print("query:    ", self.enc.decode(data["queries"][i].tolist()).replace("\n", "⏎"))
            print("response: ", self.enc.decode(data["postprocessed"][i].tolist()).replace("\n", "⏎"))
            print(f"  score = {score:+.3f}, kl = {kl_i:+.3f}, total = {score - kl_coef0 * kl_i:+.3f}")

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def state(self):
        return {"global_step": self.global_step, "kl_ctl": self.kl_ctl.state_dict()}

    def save_checkpoint(self, root: Path, wandb_id=None):
        """Rank 0 writes the whole checkpoint: weights, optimizer, counters, the query stream's position and the
        random streams of every virtual rank, which it gathers first (so no file depends on another node's disk,
        and any number of processes can resume it).

        The directory is assembled as step-N.tmp and marked COMPLETE and renamed once every file is there. If a
        write fails (a full disk), every rank raises CheckpointSaveError and the previous checkpoint stays.
        """
        info, step, count = self.info, self.global_step, self.vranks.count
        tmp = root / f"step-{step:08d}.tmp"
        rng_states = {}
        for states in dist.gather_object(self.vranks.state_dict()) or []:
            rng_states.update(states)
        files = [runs.MODEL_FILE, runs.OPTIMIZER_FILE, runs.STATE_FILE, runs.SAMPLER_FILE,
                 *(runs.rng_file(v) for v in range(count))]

        def on_all_ranks(write):
            error = None
            try:
                write()
            except OSError as e:
                error = e
            if dist.all_ranks_agree(error is not None, info.device):
                if info.is_main:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise ckpt.save_error(step, root, error or OSError(errno.EIO, "a write failed on another rank"))

        def write_files():
            ckpt.begin_checkpoint(root, step)
            for v in range(count):
                ckpt.atomic_torch_save(tmp / runs.rng_file(v), rng_states[v])
            ckpt.atomic_write_json(tmp / runs.SAMPLER_FILE, self.sampler.state_dict())
            ckpt.atomic_save_tensors(tmp / runs.MODEL_FILE, self.policy.model.state_dict())
            ckpt.atomic_torch_save(tmp / runs.OPTIMIZER_FILE, self.optimizer.state_dict())
            ckpt.atomic_write_json(tmp / runs.STATE_FILE, dict(self.state(), virtual_ranks=count,
                                                               world_size=info.world_size, wandb_id=wandb_id))
            ckpt.commit_checkpoint(tmp, self.hp.run.keep_checkpoints, files)

        final = root / f"step-{step:08d}"
        on_all_ranks(write_files if info.is_main else lambda: None)
        if info.is_main:
            print(f"saved checkpoint {final}")
        return final

    def load_checkpoint(self, path: Path):
        """Restores everything `save_checkpoint` wrote, on any number of processes that can host the run's virtual
        ranks (each restores the random streams of its own).

        Raises ValueError / FileNotFoundError naming the file for a truncated, foreign or incomplete checkpoint."""
        state_file = path / runs.STATE_FILE
        state = _read_json(state_file)
        try:
            global_step, kl_state = state["global_step"], state["kl_ctl"]
            kl_value = kl_state["value"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{state_file} is not a policy checkpoint state ({e!r} missing or bad)") from e
        if "virtual_ranks" not in state:
            raise ValueError(f"checkpoint {path} holds per-process random states (written before virtual ranks); "
                             f"this version cannot continue it exactly. Start a new run (--overwrite or another "
                             f"name), or resume it with the version that wrote it")
        virtual_ranks = state["virtual_ranks"]
        step = ckpt.checkpoint_step(path)
        if not _is_int(global_step) or global_step != step:
            raise ValueError(f"{state_file} has global_step {global_step!r}, but it must be {step}, the update of its "
                             f"directory; the file is damaged: delete {path} and rerun with --resume to resume from "
                             f"the checkpoint before it")
        if global_step > self.nupdates:
            raise ValueError(f"{state_file}: the checkpoint is at update {global_step}, beyond this run's "
                             f"{self.nupdates} updates (ppo.total_episodes / ppo.batch_size); resume with the "
                             f"ppo.total_episodes the run was started with, or a larger one")
        if not _is_int(virtual_ranks) or isinstance(kl_value, bool) or not isinstance(kl_value, (int, float)) \
                or not math.isfinite(kl_value) or kl_value < 0:
            raise ValueError(f"{state_file} has virtual_ranks {virtual_ranks!r} and KL coefficient {kl_value!r}; "
                             f"expected an integer and a finite number >= 0. The file is damaged: delete {path} and "
                             f"rerun with --resume to resume from the checkpoint before it")
        if virtual_ranks != self.vranks.count:
            raise ValueError(f"checkpoint {path} is of a run on virtual_ranks {virtual_ranks} but this run has "
                             f"virtual_ranks {self.vranks.count}; resume with --virtual_ranks {virtual_ranks} (on any "
                             f"number of processes dividing it)")
        optimizer_state = ckpt.torch_load_safe(path / runs.OPTIMIZER_FILE)
        rng = {v: ckpt.torch_load_safe(path / runs.rng_file(v)) for v in self.vranks.ids}
        sampler_state = _read_json(path / runs.SAMPLER_FILE)
        runs.load_policy_weights(self.policy.model, path)
        try:
            self.optimizer.load_state_dict(optimizer_state)
            self.kl_ctl.load_state_dict(kl_state)
            self.vranks.load_state_dict(rng)
        except (KeyError, TypeError, IndexError, RuntimeError, ValueError) as e:
            raise ValueError(f"checkpoint {path} does not match this run ({type(e).__name__}: {e}); was it written "
                             f"by another version or configuration?") from e
        self.sampler.load_state_dict(sampler_state)
        self.global_step = global_step
        return state


def _is_int(value) -> bool:
    """An int of JSON (not a bool, float or string) that is >= 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_json(path):
    """A JSON file; FileNotFoundError or ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint file {path} is truncated or corrupt ({e})") from e


def changed_hparams(run_dir: RunDir, hp) -> list:
    """Dotted keys whose value differs from the run's saved train_policy_hparams.json, leaving out the run settings
    (run.* at every level: where to save, device, logging) and comparing a path inside the run directory relative
    to it, so moving a run directory changes nothing."""
    try:
        saved = TrainPolicyHParams.from_nested_dict(json.loads(run_dir.policy_hparams.read_text())).to_flat_dict()
    except Exception:  # missing or from another version: nothing to compare
        return []
    now = hp.to_flat_dict()

    def in_run(flat, key):
        value, root = flat.get(key, "<unset>"), flat.get("run.save_dir")
        if isinstance(value, str) and root and Path(value).is_relative_to(root):
            return ("<run dir>", *Path(value).relative_to(root).parts)
        return value

    return sorted(k for k in set(saved) | set(now)
                  if "run" not in k.split(".") and in_run(saved, k) != in_run(now, k))


def reward_hparams(hp: TrainPolicyHParams, run_dir):
    """The chained reward training's hyperparameters (rewards.train_new_model), stored in the same run directory."""
    rm_hp = hp.rewards.train_new_model
    if rm_hp.task.to_nested_dict() != hp.task.to_nested_dict():
        raise ValueError("rewards.train_new_model.task must equal task (the reward model is trained on the "
                         "policy's task)")
    if run_dir is None:
        raise ValueError("rewards.train_new_model needs run.save_dir to store the reward model")
    rm_hp.run.save_dir = str(run_dir.path)
    rm_hp.run.device, rm_hp.run.precision = hp.run.device, hp.run.precision
    return rm_hp


def build_trainer(hp: TrainPolicyHParams, info, trained_model) -> PPOTrainer:
    """Seeds this process's virtual ranks, loads the score model, reference policy, policy and query sampler
    (InputError on every rank if any rank failed), then gives every rank rank 0's weights; writes nothing."""
    with ckpt.validated_inputs(info.device):  # no collective before it: a load may fail on one rank only
        precision = dist.resolve_precision(hp.run.precision, info.device)
        vranks = VirtualRanks(hp.virtual_ranks, rank=info.rank, world_size=info.world_size, seed=hp.run.seed,
                              device=info.device)
        task = hp.task
        enc, prefix, suffix = runs.task_encodings(task)
        score_model = runs.load_reward_model(trained_model, n_vocab=enc.n_vocab, padding_token=enc.padding_token,
                                             device=info.device)
        ref_policy = runs.build_policy(task, enc, prefix, suffix, info.device, frozen=True)
        policy = runs.build_policy(task, enc, prefix, suffix, info.device, frozen=False)
        sampler = QuerySampler(task.query_dataset, "train", enc, task.query_length, task.start_text, task.end_text,
                               vranks.rows(hp.ppo.batch_size), ranks=vranks.ids, world_size=vranks.count)
    for module in (score_model, ref_policy, policy):
        dist.broadcast_module(module)
    return PPOTrainer(hp, info, score_model=score_model, ref_policy=ref_policy, policy=policy, sampler=sampler,
                      enc=enc, precision=precision, vranks=vranks)


def train(hp: TrainPolicyHParams, *, resume=False, overwrite=False):
    """Trains the reward model first if `rewards.train_new_model` is set, then runs PPO; returns the save dir.

    Every input (settings, label file, models, dataset, the checkpoint to resume) is checked before the first
    write. An existing run directory needs `resume` (continue from its latest complete checkpoint; a finished
    reward model is kept) or `overwrite` (delete it first). SIGTERM/SIGINT stop at the next update boundary with a
    checkpoint (at the next reward training step, keeping nothing of it, while the reward model trains); a
    non-finite statistic or parameter raises FloatingPointError, keeping the last good checkpoint. Under torchrun,
    every rank resumes from the checkpoint rank 0 picks and must see it (ckpt.agreed_checkpoint).
    """
    run_dir = RunDir(hp.run.save_dir) if hp.run.save_dir else None
    chained = hp.rewards.train_new_model is not None

    def prepare(info):
        """(latest checkpoint, reward trainer, PPO trainer, its restored state): everything loads now, except that
        with a chained reward model the PPO trainer loads after the reward model is trained."""
        latest = ckpt.agreed_checkpoint(run_dir.checkpoints, info.is_main) if resume and run_dir is not None else None
        if chained:
            rm_hp = reward_hparams(hp, run_dir)
            done = resume and train_reward.finished_reward_model(run_dir, info)
            return latest, None if done else train_reward.build_trainer(rm_hp, info), None, None
        trainer = build_trainer(hp, info, hp.rewards.trained_model)
        return latest, None, trainer, trainer.load_checkpoint(latest) if latest is not None else None

    info, (latest, reward_trainer, trainer, state) = runs.open_run(hp, run_dir, resume=resume, overwrite=overwrite,
                                                                   prepare=prepare)
    with SignalFlag() as signals:  # one flag from reward training to the end of PPO: no signal falls between them
        if reward_trainer is not None:
            try:
                train_reward.run(reward_trainer, signals)
            except train_reward.RewardTrainingStopped:
                return run_dir.path  # stopped cleanly, as PPO does; rank 0 has said that nothing was kept
            reward_trainer = None  # free the reward training's models before loading the policy's
        elif chained and info.is_main:
            print(f"reward model already trained in {run_dir.reward_model}; skipping reward training")
        if trainer is None:
            with ckpt.validated_inputs(info.device):
                unseen = None if info.is_main or run_dir.reward_model_complete() else \
                    f"{run_dir.reward_model} is missing or incomplete"
                ckpt.check_every_rank_sees("the reward model that rank 0 saved", unseen)
                trainer = build_trainer(hp, info, str(run_dir.reward_model))
                state = trainer.load_checkpoint(latest) if latest is not None else None
        return run(trainer, resumed_from=latest, state=state, resume=resume, signals=signals)


def run(trainer: PPOTrainer, *, resumed_from=None, state=None, resume=False, signals=None):
    """PPO on a built trainer (restored from checkpoint `resumed_from` with its `state`), from its global_step to
    the last update: log every update, checkpoint every run.save_interval updates and at the end, sample the
    held-out queries every run.sample_interval updates (training_samples); returns the run directory.
    SIGTERM/SIGINT (recorded by `signals`, or by this call's own SignalFlag) stop it after the current update with
    a checkpoint."""
    hp, info, latest = trainer.hp, trainer.info, resumed_from
    run_dir = RunDir(hp.run.save_dir) if hp.run.save_dir else None
    wandb_id = state.get("wandb_id") if state else None
    if info.is_main:
        hp.dump()
        if latest is not None:
            print(f"resumed from {latest} at update {trainer.global_step} of {trainer.nupdates}")
            changed = changed_hparams(run_dir, hp)
            if changed:
                print(f"warning: resuming with hyperparameters that differ from the run's saved ones "
                      f"({', '.join(changed)}); the continuation is not the run it would have been", file=sys.stderr)
        elif resume:
            print(f"no complete checkpoint to resume in {run_dir.checkpoints}; starting at update 0")
        if run_dir is not None:
            ckpt.remove_stale_tmp(run_dir.checkpoints)
            with writing(run_dir.policy_metrics):
                ckpt.truncate_metrics(run_dir.policy_metrics, trainer.global_step)
            training_samples.truncate(run_dir.training_samples, trainer.global_step)  # even with sampling off now
            runs.write_policy_metadata(run_dir, hp, trainer.policy, runs.encoding_name(hp.task.policy.initial_model),
                                       info.device)
    logger = Logger(is_main=info.is_main, metrics_path=run_dir.policy_metrics if run_dir else None,
                    config=hp.to_nested_dict(), wandb_setting=hp.run.wandb, wandb_project=hp.run.wandb_project,
                    run_name=run_dir.path.name if run_dir else None, wandb_id=wandb_id)
    ckpt_root = run_dir.checkpoints if run_dir else None
    online = online_rounds.OnlineRounds(hp, run_dir, info) if hp.online is not None else None
    if online is not None:  # a resumed run trains against the reward model of the last round before it
        latest_rm = online.reward_model_at(trainer.global_step)
        if latest_rm is not None:
            trainer.score_model = online.load_reward_model(latest_rm, trainer)
    bar = tqdm(total=trainer.nupdates, initial=trainer.global_step, desc="train_policy", disable=not info.is_main,
               dynamic_ncols=True)
    saved_at = trainer.global_step if latest is not None else None
    try:
        samples = training_samples.TrainingSamples.for_run(trainer, run_dir, logger) if info.is_main else None
        with contextlib.nullcontext(signals) if signals is not None else SignalFlag() as signals:
            while trainer.global_step < trainer.nupdates:
                k = online.due(trainer.global_step) if online is not None else None
                if k is not None:  # a checkpoint first: a stop or a kill during the round resumes at it
                    if ckpt_root is not None and saved_at != trainer.global_step:
                        trainer.save_checkpoint(ckpt_root, logger.wandb_id)
                        saved_at = trainer.global_step
                    try:
                        online.run_round(trainer, k, signals, logger)
                    except online_rounds.OnlineStop:
                        raise StopRequested()
                if samples is not None and samples.due(trainer.global_step):  # rank 0, its own random numbers
                    samples.record(trainer, logger)
                stats, data = trainer.step()
                logger.log(stats, trainer.global_step)
                if info.is_main and trainer.global_step % hp.run.log_interval == 0:
                    trainer.print_samples(data)
                    print(format_stats(stats))
                trainer.global_step += 1
                bar.update(1)
                bar.set_postfix(score=f"{stats['objective/score']:.3f}", kl=f"{stats['objective/kl']:.3f}")
                stop = dist.all_ranks_agree(signals.received is not None, info.device)
                if ckpt_root is not None and (trainer.global_step % hp.run.save_interval == 0 or stop
                                              or trainer.global_step == trainer.nupdates):
                    saved = trainer.save_checkpoint(ckpt_root, logger.wandb_id)
                    saved_at = trainer.global_step
                if stop:
                    if info.is_main:
                        where = f"checkpoint {saved}" if ckpt_root is not None else "nothing saved (no run.save_dir)"
                        print(f"\nstopped by {signals.received or 'a signal on another rank'} after update "
                              f"{trainer.global_step} of {trainer.nupdates}; {where}. Resume with the same command "
                              f"plus --resume", file=sys.stderr)
                    raise StopRequested()
            if samples is not None and samples.due(trainer.global_step):  # the final policy
                samples.record(trainer, logger)
    except StopRequested:
        pass
    finally:
        bar.close()
        logger.finish()
    if ckpt_root is not None and saved_at != trainer.global_step:
        trainer.save_checkpoint(ckpt_root, logger.wandb_id)
    return run_dir.path if run_dir else None
