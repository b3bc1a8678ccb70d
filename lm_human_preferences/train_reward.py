"""Reward-model training (ORIGINAL §9): labels -> normalize_before -> one epoch -> normalize_after -> save.

Runs alone or under torchrun. Every rank samples and scores its own share; the normalization sums, the gradients
and every logged statistic are reduced over all ranks, so gain, bias and all weights stay identical everywhere.
"""
import contextlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from lm_human_preferences import label_types
from lm_human_preferences.hparams import TrainRewardHParams
from lm_human_preferences.language import labels as label_files
from lm_human_preferences.language.datasets import QuerySampler
from lm_human_preferences.language.encodings import get_encoding
from lm_human_preferences.language.trained_models import load_model
from lm_human_preferences.policy import Policy
from lm_human_preferences.rewards import RewardModel
from lm_human_preferences.utils import ckpt, dist
from lm_human_preferences.utils.ckpt import atomic_save_tensors, atomic_write_json
from lm_human_preferences.utils.hyperparams import with_resolved
from lm_human_preferences.utils.logging import Logger, format_stats
from lm_human_preferences.utils.optim import TFAdam

REWARD_DIR = "reward_model"


def encoding_name(initial_model: str) -> str:
    """The `test` model uses the 27-character test encoding; every GPT-2 uses the BPE."""
    return "test" if initial_model == "test" else "main"


def task_encodings(task):
    """(encoding, prefix token ids, suffix token ids) for a task."""
    enc = get_encoding(encoding_name(task.policy.initial_model))
    return enc, enc.encode(task.query_prefix), enc.encode(task.query_suffix)


def check_fits_context(task, n_ctx: int, prefix, suffix):
    total = len(prefix) + task.query_length + len(suffix) + task.response_length
    if total > n_ctx:
        raise ValueError(f"prefix ({len(prefix)}) + query_length ({task.query_length}) + suffix ({len(suffix)}) + "
                         f"response_length ({task.response_length}) = {total} tokens exceeds the model's n_ctx={n_ctx}; "
                         f"shorten task.query_length or task.response_length")


def build_ref_policy(task, enc, prefix, suffix, device):
    model = load_model(task.policy.initial_model, ["value"], n_vocab=enc.n_vocab, device=device)
    policy = Policy(model, temperature=task.policy.temperature, padding_token=enc.padding_token,
                    prefix_tokens=prefix, suffix_tokens=suffix).to(device)
    policy.requires_grad_(False)
    return policy.eval()


def chunks(n: int, size):
    """Slices covering range(n) in pieces of `size` (None = one piece)."""
    size = n if not size else size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def reward_stats(reward_model, ref_policy, sampler, hp, info, precision, generator, n_samples):
    """Population mean/std of the reward on ceil(n_samples/rollout_batch_size) rollout batches (§9.2)."""
    n_batches = math.ceil(n_samples / hp.rollout_batch_size)
    total = torch.zeros(3, dtype=torch.float64, device=info.device)  # sum r, sum r^2, count
    for _ in range(n_batches):
        queries = torch.as_tensor(sampler.next_batch(), device=info.device)
        for sl in chunks(len(queries), hp.run.rollout_micro_batch):
            with dist.autocast(info.device, precision):
                responses = ref_policy.respond(queries[sl], hp.task.response_length, generator=generator)["responses"]
                r = reward_model(queries[sl], responses).double()
            total[0] += r.sum()
            total[1] += (r * r).sum()
            total[2] += len(r)
    total = dist.all_reduce_sum(total)
    mean = total[0] / total[2]
    std = torch.sqrt(torch.clamp(total[1] / total[2] - mean * mean, min=0.0))
    return mean.item(), std.item()


def normalize(reward_model, ref_policy, sampler, hp, info, precision, generator, target, tag, logger, step):
    """Resets gain/bias to (1, 0), then sets them so rewards of reference samples have (target mean, target std)."""
    reward_model.reset_reward_scale()
    mean, std = reward_stats(reward_model, ref_policy, sampler, hp, info, precision, generator,
                             hp.normalize_samples)
    reward_model.set_reward_norm(old_mean=mean, old_std=std, new_mean=target[0], new_std=target[1])
    stats = {f"train_reward/{tag}/mean": mean, f"train_reward/{tag}/std": std,
             f"train_reward/{tag}/gain": reward_model.gain.item(), f"train_reward/{tag}/bias": reward_model.bias.item()}
    if info.is_main:
        print(f"{tag}: rewards {mean:.4f} +- {std:.4f} -> gain {stats[f'train_reward/{tag}/gain']:.4f}, "
              f"bias {stats[f'train_reward/{tag}/bias']:.4f}")
    logger.log(stats, step)
    if hp.debug_normalize:
        m, s = reward_stats(reward_model, ref_policy, sampler, hp, info, precision, generator, hp.debug_normalize)
        if info.is_main:
            print(f"after normalize: {m:.4f} +- {s:.4f}")


def label_batch_loss(reward_fn, label_type, batch, device):
    """Loss and stats of one batch of labels (a dict of arrays); the label type scores all responses in one call."""
    return label_type.loss(reward_fn, {k: torch.as_tensor(np.asarray(v), device=device) for k, v in batch.items()})


def evaluate_heldout(reward_model, label_type, heldout, info, precision, micro_batch):
    """Loss and accuracy on the held-out labels (those beyond num_train), each rank scoring a strided share."""
    n = len(next(iter(heldout.values()))) if heldout else 0
    if n == 0:
        return {}
    idx = np.arange(info.rank, n, info.world_size)
    sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss*count, correct, count
    with torch.no_grad():
        for sl in chunks(len(idx), micro_batch or 64):
            part = {k: v[idx[sl]] for k, v in heldout.items()}
            if len(idx[sl]) == 0:
                continue
            with dist.autocast(info.device, precision):
                loss, stats = label_batch_loss(reward_model, label_type, part, info.device)
            count = float(len(idx[sl]))
            acc = float(stats.get("accuracy", 0.0))
            sums += torch.tensor([float(loss) * count, acc * count, count], dtype=torch.float64, device=info.device)
    sums = dist.all_reduce_sum(sums)
    out = {"train_reward/heldout/loss": (sums[0] / sums[2]).item(), "train_reward/heldout/count": sums[2].item()}
    if hasattr(label_type, "response_keys") and label_type.name.startswith("best_of_"):
        out["train_reward/heldout/accuracy"] = (sums[1] / sums[2]).item()
        out["train_reward/heldout/chance_accuracy"] = 1.0 / label_type.num_responses
    return out


def save_reward_model(save_dir: Path, reward_model: RewardModel, hp, enc_name: str,
                      device: torch.device = torch.device("cpu")):
    """Writes train_reward_hparams.json, then <save_dir>/reward_model/{model.safetensors, hparams.json, encoding}
    assembled as reward_model.tmp/ and renamed, so a reward_model/ directory is always complete."""
    out = save_dir / REWARD_DIR
    tmp = save_dir / (REWARD_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    sd = dict(reward_model.model.state_dict())
    sd["reward_norm.gain"] = reward_model.gain.detach()
    sd["reward_norm.bias"] = reward_model.bias.detach()
    atomic_write_json(save_dir / "train_reward_hparams.json",
                      with_resolved(hp.to_nested_dict(), dist.resolved_run_settings(hp.run.precision, device)))
    atomic_save_tensors(tmp / "model.safetensors", sd)
    atomic_write_json(tmp / "hparams.json", reward_model.model.config.to_dict())
    atomic_write_json(tmp / "encoding", enc_name)
    ckpt.replace_dir(tmp, out)


def reward_model_complete(save_dir) -> bool:
    """Whether `save_dir` holds a finished reward model."""
    d = Path(save_dir) / REWARD_DIR
    return all((d / f).is_file() for f in ("model.safetensors", "hparams.json", "encoding"))


@dataclass
class RewardSetup:
    """Everything reward training needs, loaded and checked by `prepare` before any file is written."""
    hp: TrainRewardHParams
    info: dist.DistInfo
    precision: str
    np_rng: np.random.RandomState
    generator: torch.Generator
    label_type: object
    train_labels: dict
    heldout: dict
    ref_policy: Policy
    reward_model: RewardModel
    sampler: QuerySampler


def prepare(hp: TrainRewardHParams, info) -> RewardSetup:
    """Seeds, then loads and validates labels, models and the query dataset (raising on bad input); writes nothing."""
    precision = dist.resolve_precision(hp.run.precision, info.device)
    seed = dist.rank_seed(hp.run.seed, info.rank)
    np_rng = dist.seed_everything(seed)
    generator = torch.Generator(device=info.device)
    generator.manual_seed(seed if seed is not None else int(np_rng.randint(2**31)))

    task = hp.task
    enc, prefix, suffix = task_encodings(task)
    label_type = label_types.get_label_type(hp.labels.type)
    train_labels, heldout = label_files.load_labels(
        hp.labels.source, hp.labels.type, query_length=task.query_length, response_length=task.response_length,
        n_vocab=enc.n_vocab, padding_token=enc.padding_token, num_train=hp.labels.num_train)

    ref_policy = build_ref_policy(task, enc, prefix, suffix, info.device)
    check_fits_context(task, ref_policy.model.config.n_ctx, prefix, suffix)
    reward_model = RewardModel(load_model(task.policy.initial_model, ["reward"], n_vocab=enc.n_vocab,
                                          device=info.device), padding_token=enc.padding_token).to(info.device)
    reward_model.eval()  # dropout is never active
    dist.broadcast_module(ref_policy)
    dist.broadcast_module(reward_model)
    sampler = QuerySampler(task.query_dataset, "train", enc, task.query_length, task.start_text, task.end_text,
                           dist.exact_batch(hp.rollout_batch_size, info.world_size, "rollout_batch_size"),
                           rank=info.rank, world_size=info.world_size)
    return RewardSetup(hp=hp, info=info, precision=precision, np_rng=np_rng, generator=generator,
                       label_type=label_type, train_labels=train_labels, heldout=heldout, ref_policy=ref_policy,
                       reward_model=reward_model, sampler=sampler)


def train(hp: TrainRewardHParams, *, resume=False, overwrite=False, info=None):
    """Trains a reward model as the original does; returns the reward model directory.

    Every input is checked before anything is written. An existing run needs `resume` (a finished reward model is
    kept, an unfinished one is trained again from the start) or `overwrite` (the run directory is deleted first).
    `info` is passed by train_policy, which has done these checks itself.
    """
    hp.validate()
    if info is None:
        with ckpt.input_errors():
            hp.check_world_size(dist.env_info(hp.run.device).world_size)
        info = dist.init_distributed(hp.run.device)
    hp.check_world_size(info.world_size)
    save_dir = Path(hp.run.save_dir) if hp.run.save_dir else None
    with ckpt.validated_inputs(info.device):
        ckpt.check_run_dir(save_dir, resume=resume, overwrite=overwrite)
        done = resume and save_dir is not None and reward_model_complete(save_dir)
        setup = None if done else prepare(hp, info)
    if done:
        if info.is_main:
            print(f"reward model already trained in {save_dir / REWARD_DIR}; skipping reward training")
        return save_dir / REWARD_DIR
    if overwrite and info.is_main:
        ckpt.clear_run_dir(save_dir)
    dist.barrier()
    return run(setup)


def run(setup: RewardSetup):
    """Reward training on a prepared setup: normalize_before, one epoch, normalize_after, held-out eval, save."""
    hp, info, precision, generator = setup.hp, setup.info, setup.precision, setup.generator
    reward_model, ref_policy, sampler, label_type = setup.reward_model, setup.ref_policy, setup.sampler, setup.label_type
    train_labels, heldout, np_rng, task = setup.train_labels, setup.heldout, setup.np_rng, hp.task
    save_dir = Path(hp.run.save_dir) if hp.run.save_dir else None
    if info.is_main:
        hp.dump()
        if save_dir is not None:  # records of an earlier, unfinished attempt
            ckpt.truncate_metrics(save_dir / "train_reward_metrics.jsonl", 0)

    logger = Logger(is_main=info.is_main, save_dir=save_dir, name="train_reward", config=hp.to_nested_dict(),
                    wandb_setting=hp.run.wandb, wandb_project=hp.run.wandb_project,
                    run_name=save_dir.name + "/reward" if save_dir else None)
    t0 = time.time()
    try:
        if hp.normalize_before:
            target = label_type.target_mean_std(train_labels)
            normalize(reward_model, ref_policy, sampler, hp, info, precision, generator, target,
                      "normalize_before", logger, 0)

        ddp_model = DDP(reward_model, device_ids=[info.device.index] if info.device.type == "cuda" else None) \
            if dist.is_distributed() else reward_model
        params = list(reward_model.parameters())  # trunk, head, gain and bias
        optimizer = TFAdam(params, lr=hp.lr, eps=1e-5)
        num_train = hp.labels.num_train
        perm = dist.broadcast_object(np_rng.permutation(num_train) if info.is_main else None)
        steps = range(0, num_train, hp.batch_size)
        bar = tqdm(steps, desc="train_reward", disable=not info.is_main, dynamic_ncols=True)
        for step, start in enumerate(bar):
            lr = hp.lr * (1 - start / num_train)
            for group in optimizer.param_groups:
                group["lr"] = lr
            local = perm[start:start + hp.batch_size][info.rank::info.world_size]
            stats = train_step(ddp_model, reward_model, optimizer, label_type,
                               {k: v[local] for k, v in train_labels.items()}, info, precision,
                               hp.run.train_micro_batch)
            stats = dist.all_reduce_mean_dict(stats, info.device)
            logged = {f"train_reward/minibatch/{k}": v for k, v in stats.items()}
            logged["train_reward/lr"] = lr
            for k, v in stats.items():
                # 'corr' is undefined (NaN) for labels without spread; everything else must stay finite
                if not math.isfinite(v) and k != "corr":
                    raise FloatingPointError(f"reward training step {step}: statistic {k} = {v} is not finite; "
                                             f"lower --lr or check the labels")
            if step % hp.run.log_interval == 0 or step == len(steps) - 1:
                logger.log(logged, step)
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
            if hp.run.eval_interval and step % hp.run.eval_interval == 0 and step > 0:
                logger.log(evaluate_heldout(reward_model, label_type, heldout, info, precision,
                                            hp.run.rollout_micro_batch), step)

        if hp.normalize_after:
            normalize(reward_model, ref_policy, sampler, hp, info, precision, generator, (0.0, 1.0),
                      "normalize_after", logger, len(steps))
        heldout_stats = evaluate_heldout(reward_model, label_type, heldout, info, precision,
                                         hp.run.rollout_micro_batch)
        if heldout_stats:
            logger.log(heldout_stats, len(steps))
            if info.is_main:
                print(format_stats(heldout_stats))
        elapsed = time.time() - t0
        logger.log({"train_reward/elapsed/time": elapsed}, len(steps))
        if info.is_main and save_dir is not None:
            save_reward_model(save_dir, reward_model, hp, encoding_name(task.policy.initial_model), info.device)
            print(f"saved reward model to {save_dir / REWARD_DIR} ({elapsed:.1f}s)")
        dist.barrier()
    finally:
        logger.finish()
    return save_dir / REWARD_DIR if save_dir else reward_model


def train_step(ddp_model, reward_model, optimizer, label_type, batch, info, precision, micro_batch):
    """One optimizer step on this rank's share of a label batch, with optional gradient accumulation."""
    n = len(batch[next(iter(batch))])
    optimizer.zero_grad(set_to_none=True)
    pieces = chunks(n, micro_batch)
    totals = {}
    for i, sl in enumerate(pieces):
        part = {k: v[sl] for k, v in batch.items()}
        weight = (sl.stop - sl.start) / n
        last = i == len(pieces) - 1
        ctx = ddp_model.no_sync() if (not last and isinstance(ddp_model, DDP)) else contextlib.nullcontext()
        with ctx:
            with dist.autocast(info.device, precision):
                loss, stats = label_batch_loss(ddp_model, label_type, part, info.device)
            (loss * weight).backward()
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + float(v) * weight
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # the gradients' memory is free until the next step
    return totals
