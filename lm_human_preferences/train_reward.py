"""Reward-model training (ORIGINAL §9): labels -> normalize_before -> one epoch -> normalize_after -> save.

Runs alone or under torchrun, in the same shape as train_policy: `build_trainer` loads and checks everything,
`RewardTrainer.step()` is one optimizer step on one batch of labels, `train()` is the run. The run is defined on
`virtual_ranks` ranks whatever the number of processes: every virtual rank samples and scores its own share (its
query shard and random stream, its stride of each label batch); the normalization sums, the gradients and every
logged statistic are averaged over all of them, so gain, bias and all weights are identical everywhere.
"""
import math
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from lm_human_preferences import label_types, runs
from lm_human_preferences.hparams import TrainRewardHParams
from lm_human_preferences.language import labels as label_files
from lm_human_preferences.language.datasets import QuerySampler
from lm_human_preferences.language.sample import draw_uniforms
from lm_human_preferences.runs import RunDir
from lm_human_preferences.utils import ckpt, dist
from lm_human_preferences.utils.core import SampleBuffer
from lm_human_preferences.utils.files import WriteError, writing
from lm_human_preferences.utils.logging import Logger, format_stats
from lm_human_preferences.utils.optim import TFAdam
from lm_human_preferences.utils.signals import SignalFlag
from lm_human_preferences.utils.training import (VirtualRanks, chunks, nonfinite_parameter, nonfinite_statistic,
                                                 optimizer_step, wrap_ddp)


class RewardTrainingStopped(KeyboardInterrupt):
    """SIGTERM/SIGINT stopped reward training at a step boundary (rank 0 has said so); nothing of it is kept."""


def label_batch_loss(reward_fn, label_type, batch, device, groups=1):
    """Loss and stats of one batch of labels (a dict of arrays), the mean of its `groups` equal groups' (virtual
    ranks); the label type scores all responses in one call."""
    return label_type.loss(reward_fn, {k: torch.as_tensor(np.asarray(v), device=device) for k, v in batch.items()},
                           groups=groups)


def train_step(ddp_model, reward_model, optimizer, label_type, batch, info, precision, micro_batch, groups=1):
    """One optimizer step on this process's share of a label batch (the shares of its `groups` virtual ranks, one
    after the other), in pieces of `micro_batch` labels; returns the statistics averaged over its virtual ranks
    (floats)."""
    n = len(batch["query"])
    share = n // groups

    def loss_fn(rows):
        with dist.autocast(info.device, precision):
            loss, stats = label_batch_loss(ddp_model, label_type, {k: v[rows] for k, v in batch.items()},
                                           info.device, groups=max(1, (rows.stop - rows.start) // share))
        return loss, {k: float(v) for k, v in stats.items()}

    return optimizer_step(optimizer, ddp_model, n, micro_batch, loss_fn, groups=groups)


class RewardTrainer:
    """Holds the reward model, reference policy, labels, optimizer and virtual ranks (their random streams) of one
    process; `step()` once per batch."""

    def __init__(self, hp: TrainRewardHParams, info, *, reward_model, ref_policy, sampler, label_type, train_labels,
                 heldout, precision, vranks: VirtualRanks):
        self.hp, self.info, self.precision = hp, info, precision
        self.reward_model, self.ref_policy, self.sampler = reward_model, ref_policy, sampler
        self.label_type, self.heldout = label_type, heldout
        self.vranks = vranks
        # The labels live in a buffer, as in the original; online label collection adds to it between rounds.
        task = hp.task
        self.train_buffer = SampleBuffer(capacity=hp.labels.num_train, schemas=label_type.schemas(
            query_length=task.query_length, response_length=task.response_length))
        self.train_buffer.add(**train_labels)
        self.ddp_model = wrap_ddp(reward_model, info.device)
        self.optimizer = TFAdam(list(reward_model.parameters()), lr=hp.lr, eps=1e-5)  # trunk, head, gain and bias
        self.global_step = 0
        self.nsteps = hp.num_steps
        self.perm = None  # the order of the training labels, drawn when training starts

    # ---- normalization (§9.2) --------------------------------------------------------------------------------
    @torch.no_grad()
    def reward_stats(self, n_samples: int):
        """Population mean/std of the reward on ceil(n_samples/rollout_batch_size) batches of reference samples, each
        virtual rank sampling its share of the queries with its own stream."""
        hp, device = self.hp, self.info.device
        total = torch.zeros(3, dtype=torch.float64, device=device)  # sum r, sum r^2, count
        for _ in range(math.ceil(n_samples / hp.rollout_batch_size)):
            queries = torch.as_tensor(self.sampler.next_batch(), device=device)
            uniforms = draw_uniforms(self.vranks.generators, len(queries), hp.task.response_length, device)
            for sl in chunks(len(queries), hp.run.rollout_micro_batch):
                with dist.autocast(device, self.precision):
                    responses = self.ref_policy.respond(queries[sl], hp.task.response_length,
                                                        uniforms=uniforms[sl])["responses"]
                    r = self.reward_model(queries[sl], responses).double()
                total[0] += r.sum()
                total[1] += (r * r).sum()
                total[2] += len(r)
        total = dist.all_reduce_sum(total)
        mean = total[0] / total[2]
        std = torch.sqrt(torch.clamp(total[1] / total[2] - mean * mean, min=0.0))
        return mean.item(), std.item()

    def normalize(self, target, tag: str) -> dict:
        """Resets gain/bias to (1, 0), then sets them so rewards of reference samples have (target mean, target
        std); returns the statistics to log. With normalize_samples 0 it does nothing and returns {}, as in the
        original."""
        if not self.hp.normalize_samples:
            if self.info.is_main:
                print(f"{tag}: skipped (normalize_samples is 0), gain and bias unchanged")
            return {}
        rm = self.reward_model
        rm.reset_reward_scale()
        mean, std = self.reward_stats(self.hp.normalize_samples)
        rm.set_reward_norm(old_mean=mean, old_std=std, new_mean=target[0], new_std=target[1])
        stats = {f"train_reward/{tag}/mean": mean, f"train_reward/{tag}/std": std,
                 f"train_reward/{tag}/gain": rm.gain.item(), f"train_reward/{tag}/bias": rm.bias.item()}
        if self.info.is_main:
            print(f"{tag}: rewards {mean:.4f} +- {std:.4f} -> gain {rm.gain.item():.4f}, bias {rm.bias.item():.4f}")
        if self.hp.debug_normalize:
            m, s = self.reward_stats(self.hp.debug_normalize)
            if self.info.is_main:
                print(f"after normalize: {m:.4f} +- {s:.4f}")
        return stats

    # ---- training --------------------------------------------------------------------------------------------
    def step(self) -> dict:
        """One optimizer step on the next batch of labels, each virtual rank v taking the stride [v::virtual_ranks]
        of it (ORIGINAL §9.2); returns the statistics averaged over the virtual ranks."""
        hp, info, vranks = self.hp, self.info, self.vranks
        if self.perm is None:  # virtual rank 0's draw (rank 0 hosts it), as the original's rank 0
            self.perm = dist.broadcast_object(vranks.np_rngs[0].permutation(hp.labels.num_train) if info.is_main
                                              else None)
        start = self.global_step * hp.batch_size
        lr = hp.lr * (1 - start / hp.labels.num_train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        labels = self.perm[start:start + hp.batch_size]
        batch = self.train_buffer.read(np.concatenate([labels[v::vranks.count] for v in vranks.ids]))
        stats = train_step(self.ddp_model, self.reward_model, self.optimizer, self.label_type, batch, info,
                           self.precision, hp.run.train_micro_batch, groups=len(vranks))
        stats = dist.all_reduce_mean_dict(stats, info.device)
        # 'corr' is undefined (NaN) for labels without spread; everything else must stay finite
        bad = nonfinite_statistic(stats, allowed=("corr",))
        if bad is not None:
            raise FloatingPointError(f"reward training step {self.global_step}: statistic {bad} = {stats[bad]} is "
                                     f"not finite; lower --lr or check the labels")
        bad = nonfinite_parameter(self.reward_model)
        if bad is not None:
            raise FloatingPointError(f"reward training step {self.global_step}: parameter {bad} is not finite after "
                                     f"the optimizer step; lower --lr or check the labels")
        logged = {f"train_reward/minibatch/{k}": v for k, v in stats.items()}
        logged["train_reward/lr"] = lr
        return logged

    @torch.no_grad()
    def evaluate_heldout(self) -> dict:
        """Loss (and accuracy, where the label type has one) on the held-out labels (those beyond num_train), each
        rank scoring a strided share."""
        info, heldout = self.info, self.heldout
        n = len(next(iter(heldout.values()))) if heldout else 0
        if n == 0:
            return {}
        idx = np.arange(info.rank, n, info.world_size)
        sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss*count, correct, count
        for sl in chunks(len(idx), self.hp.run.rollout_micro_batch or 64):
            if len(idx[sl]) == 0:
                continue
            with dist.autocast(info.device, self.precision):
                loss, stats = label_batch_loss(self.reward_model, self.label_type,
                                               {k: v[idx[sl]] for k, v in heldout.items()}, info.device)
            count = float(len(idx[sl]))
            acc = float(stats.get("accuracy", 0.0))
            sums += torch.tensor([float(loss) * count, acc * count, count], dtype=torch.float64, device=info.device)
        sums = dist.all_reduce_sum(sums)
        out = {"train_reward/heldout/loss": (sums[0] / sums[2]).item(), "train_reward/heldout/count": sums[2].item()}
        if self.label_type.has_accuracy:
            out["train_reward/heldout/accuracy"] = (sums[1] / sums[2]).item()
            out["train_reward/heldout/chance_accuracy"] = self.label_type.chance_accuracy
        return out


def build_trainer(hp: TrainRewardHParams, info) -> RewardTrainer:
    """Seeds this process's virtual ranks, loads and checks the labels, the reference policy, the reward model and the
    query sampler (InputError on every rank if any rank failed), then gives every rank rank 0's weights; writes
    nothing."""
    with ckpt.validated_inputs(info.device):  # no collective before it: a load may fail on one rank only
        precision = dist.resolve_precision(hp.run.precision, info.device)
        vranks = VirtualRanks(hp.virtual_ranks, rank=info.rank, world_size=info.world_size, seed=hp.run.seed,
                              device=info.device)
        task = hp.task
        enc, prefix, suffix = runs.task_encodings(task)
        label_type = label_types.get_label_type(hp.labels.type)
        train_labels, heldout = label_files.load_labels(
            hp.labels.source, hp.labels.type, query_length=task.query_length, response_length=task.response_length,
            n_vocab=enc.n_vocab, padding_token=enc.padding_token, num_train=hp.labels.num_train)
        ref_policy = runs.build_policy(task, enc, prefix, suffix, info.device, frozen=True)
        reward_model = runs.build_reward_model(task, enc, info.device)
        if info.is_main and hp.run.save_dir:
            runs.check_space_for_reward_model(RunDir(hp.run.save_dir), reward_model)
        sampler = QuerySampler(task.query_dataset, "train", enc, task.query_length, task.start_text, task.end_text,
                               vranks.rows(hp.rollout_batch_size), ranks=vranks.ids, world_size=vranks.count)
    dist.broadcast_module(ref_policy)
    dist.broadcast_module(reward_model)
    return RewardTrainer(hp, info, reward_model=reward_model, ref_policy=ref_policy, sampler=sampler,
                         label_type=label_type, train_labels=train_labels, heldout=heldout, precision=precision,
                         vranks=vranks)


def train(hp: TrainRewardHParams, *, resume=False, overwrite=False):
    """Trains a reward model as the original does; returns the reward model directory (the model itself without
    run.save_dir).

    Every input is checked before anything is written. An existing run needs `resume` (a finished reward model is
    kept, an unfinished one is trained again from the start) or `overwrite` (the run directory is deleted first).
    """
    run_dir = RunDir(hp.run.save_dir) if hp.run.save_dir else None

    def prepare(info):
        done = resume and run_dir is not None and finished_reward_model(run_dir, info)
        return done, None if done else build_trainer(hp, info)

    info, (done, trainer) = runs.open_run(hp, run_dir, resume=resume, overwrite=overwrite, prepare=prepare)
    if done:
        if info.is_main:
            print(f"reward model already trained in {run_dir.reward_model}; skipping reward training")
        return run_dir.reward_model
    return run(trainer)


def finished_reward_model(run_dir: RunDir, info) -> bool:
    """Collective: whether rank 0 finds a finished reward model in the run directory (--resume keeps it); every
    rank takes rank 0's answer, so no rank trains while another skips training."""
    return dist.broadcast_object(run_dir.reward_model_complete() if info.is_main else None)


def stop_if_signalled(signals: SignalFlag, info, steps_done: int, nsteps: int):
    """Collective: once any rank received SIGTERM/SIGINT, rank 0 says what was kept and every rank raises
    RewardTrainingStopped."""
    if dist.all_ranks_agree(signals.received is not None, info.device):
        if info.is_main:
            print(f"\nstopped by {signals.received or 'a signal on another rank'} at reward training step "
                  f"{steps_done} of {nsteps}; a reward model is saved only when its training finishes, so none was "
                  f"kept. Resume with the same command plus --resume (reward training starts again from the "
                  f"beginning)", file=sys.stderr)
        raise RewardTrainingStopped()


def run(trainer: RewardTrainer, signals: SignalFlag = None):
    """Reward training on a built trainer: normalize_before, one epoch, normalize_after, held-out eval, save.

    SIGTERM/SIGINT (recorded by `signals`, or by this call's own SignalFlag) stop it after normalize_before or
    after any step but the last with RewardTrainingStopped; a signal later than that lets it finish and save."""
    if signals is None:
        with SignalFlag() as signals:
            return run(trainer, signals)
    hp, info, label_type = trainer.hp, trainer.info, trainer.label_type
    run_dir = RunDir(hp.run.save_dir) if hp.run.save_dir else None
    if info.is_main:
        hp.dump()
        if run_dir is not None:  # records of an earlier, unfinished attempt
            with writing(run_dir.reward_metrics):
                ckpt.truncate_metrics(run_dir.reward_metrics, 0)
    logger = Logger(is_main=info.is_main, metrics_path=run_dir.reward_metrics if run_dir else None,
                    config=hp.to_nested_dict(), wandb_setting=hp.run.wandb, wandb_project=hp.run.wandb_project,
                    run_name=run_dir.path.name + "/reward" if run_dir else None)
    t0 = time.time()
    try:
        if hp.normalize_before:
            target = label_type.target_mean_std(trainer.train_buffer.data())
            norm_stats = trainer.normalize(target, "normalize_before")
            if norm_stats:
                logger.log(norm_stats, 0)
        stop_if_signalled(signals, info, 0, trainer.nsteps)
        bar = tqdm(range(trainer.nsteps), desc="train_reward", disable=not info.is_main, dynamic_ncols=True)
        for step in bar:
            stats = trainer.step()
            if step % hp.run.log_interval == 0 or step == trainer.nsteps - 1:
                logger.log(stats, step)
                bar.set_postfix(loss=f"{stats['train_reward/minibatch/loss']:.4f}")
            if hp.run.eval_interval and step % hp.run.eval_interval == 0 and step > 0:
                logger.log(trainer.evaluate_heldout(), step)
            trainer.global_step += 1
            if trainer.global_step < trainer.nsteps:
                stop_if_signalled(signals, info, trainer.global_step, trainer.nsteps)

        if hp.normalize_after:
            norm_stats = trainer.normalize((0.0, 1.0), "normalize_after")
            if norm_stats:
                logger.log(norm_stats, trainer.nsteps)
        heldout_stats = trainer.evaluate_heldout()
        if heldout_stats:
            logger.log(heldout_stats, trainer.nsteps)
            if info.is_main:
                print(format_stats(heldout_stats))
        elapsed = time.time() - t0
        logger.log({"train_reward/elapsed/time": elapsed}, trainer.nsteps)
        if info.is_main and run_dir is not None:
            try:
                runs.save_reward_model(run_dir, trainer.reward_model, hp,
                                       runs.encoding_name(hp.task.policy.initial_model), info.device)
            except WriteError as e:
                raise WriteError(f"the reward training finished but its model could not be saved, so it is lost "
                                 f"(--resume trains it again): {e}", e.path, e.errno) from e
            print(f"saved reward model to {run_dir.reward_model} ({elapsed:.1f}s)")
        dist.barrier()
    finally:
        logger.finish()
    return run_dir.reward_model if run_dir else trainer.reward_model
