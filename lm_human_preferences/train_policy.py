"""PPO against a frozen reward model under a KL penalty (ORIGINAL §10), alone or under torchrun.

One update, in the original's order: sample -> reference logprobs -> score (truncate, reward model, penalty) ->
per-token rewards with the current beta -> noptepochs x nminibatches of PPO -> stats (all-reduced) -> KL controller
update -> log -> checkpoint. Whitening stays rank-local per minibatch as in the original; `ppo.whiten_world_size`
emulates the original's 8-rank grouping on fewer GPUs.
"""
import contextlib
import errno
import json
import math
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from lm_human_preferences import ppo
from lm_human_preferences.hparams import TrainPolicyHParams
from lm_human_preferences.language.datasets import QuerySampler
from lm_human_preferences.language.trained_models import load_model
from lm_human_preferences.lm_tasks import penalized_scores, postprocess_responses, responses_valid
from lm_human_preferences.policy import Policy
from lm_human_preferences.rewards import load_reward_model
from lm_human_preferences import train_reward
from lm_human_preferences.utils import ckpt, dist
from lm_human_preferences.utils.hyperparams import with_resolved
from lm_human_preferences.utils.logging import Logger, format_stats
from lm_human_preferences.utils.optim import TFAdam

POLICY_DIR = "policy"


class StopRequested(Exception):
    """Raised inside the loop after SIGTERM/SIGINT once a checkpoint is written."""


def nupdates(hp) -> int:
    return math.ceil(hp.ppo.total_episodes / hp.ppo.batch_size)


def whiten_groups(hp, world_size: int) -> int:
    """Groups per rank-local minibatch: the original whitened over batch/(nminibatches*W) rows at W ranks."""
    w = hp.ppo.whiten_world_size or world_size
    if w % world_size:
        raise ValueError(f"ppo.whiten_world_size={w} must be a multiple of the world size {world_size}")
    return w // world_size


def make_kl_controller(rewards_hp):
    if rewards_hp.adaptive_kl is not None:
        return ppo.AdaptiveKLController(rewards_hp.kl_coef, rewards_hp.adaptive_kl.target, rewards_hp.adaptive_kl.horizon)
    return ppo.FixedKLController(rewards_hp.kl_coef)


def ppo_minibatch(ddp_policy, optimizer, mb, *, ppo_hp, lr, n_groups, micro_batch, device, precision):
    """One optimizer step of PPO on a rank-local minibatch `mb` (queries, responses, logprobs, values, rewards).

    Advantages are computed on the whole minibatch (whitening needs it); the forward/backward may then run in
    pieces of `micro_batch` rows whose weighted gradients add up to the full minibatch's.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    adv = ppo.compute_advantages(mb["values"], mb["rewards"], ppo_hp.gamma, ppo_hp.lam, ppo_hp.whiten_rewards,
                                 n_groups=n_groups)
    optimizer.zero_grad(set_to_none=True)
    n = len(adv.advantages)
    pieces = train_reward.chunks(n, micro_batch)
    totals = {}
    for i, sl in enumerate(pieces):
        weight = (sl.stop - sl.start) / n
        last = i == len(pieces) - 1
        ctx = ddp_policy.no_sync() if (not last and isinstance(ddp_policy, DDP)) else contextlib.nullcontext()
        with ctx:
            with dist.autocast(device, precision):
                new = ddp_policy(mb["queries"][sl], mb["responses"][sl])
                loss, stats = ppo.ppo_loss(new["logprobs"], new["values"], new["entropies"], mb["logprobs"][sl],
                                           mb["values"][sl], adv.advantages[sl], adv.returns[sl], ppo_hp.cliprange,
                                           ppo_hp.cliprange_value, ppo_hp.vf_coef)
            (loss * weight).backward()
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v * weight
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # the gradients' memory is free until the next step
    if len(pieces) > 1:  # population moments of the inputs over the whole minibatch, not averaged over pieces
        values = mb["values"].float()
        totals["returns/mean"], totals["returns/var"] = adv.returns.mean(), adv.returns.var(unbiased=False)
        totals["val/mean"], totals["val/var"] = values.mean(), values.var(unbiased=False)
    return totals


def ppo_train(ddp_policy, optimizer, rollouts, orders, *, ppo_hp, lr, nminibatches, n_groups, micro_batch, device,
              precision):
    """noptepochs passes (one per permutation in `orders`), each over nminibatches contiguous slices of it."""
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
    """Holds the models, optimizer, sampler and RNG of one rank and runs `step()` once per update."""

    def __init__(self, hp: TrainPolicyHParams, info, *, score_model, ref_policy, policy, sampler, enc, precision,
                 np_rng, generator):
        self.hp, self.info, self.enc, self.precision = hp, info, enc, precision
        self.score_model, self.ref_policy, self.policy, self.sampler = score_model, ref_policy, policy, sampler
        self.np_rng, self.generator = np_rng, generator
        self.ddp_policy = DDP(policy, device_ids=[info.device.index] if info.device.type == "cuda" else None) \
            if dist.is_distributed() else policy
        self.optimizer = TFAdam(policy.parameters(), lr=hp.ppo.lr, eps=1e-5)
        self.kl_ctl = make_kl_controller(hp.rewards)
        self.global_step = 0
        self.nupdates = nupdates(hp)
        self.batch = dist.exact_batch(hp.ppo.batch_size, info.world_size, "ppo.batch_size")
        self.minibatch = dist.exact_batch(self.batch, hp.ppo.nminibatches, "per-rank ppo batch")
        self.n_groups = whiten_groups(hp, info.world_size)
        self.last_time = time.time()
        self.start_time = time.time()

    # ---- rollout -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, queries):
        """Samples responses and scores them; no gradients, micro-batched by run.rollout_micro_batch."""
        task, device = self.hp.task, self.info.device
        parts = []
        for sl in train_reward.chunks(len(queries), self.hp.run.rollout_micro_batch):
            q = queries[sl]
            with dist.autocast(device, self.precision):
                out = self.policy.respond(q, task.response_length, generator=self.generator)
                ref = self.ref_policy(q, out["responses"], with_entropy=False)
                post = postprocess_responses(out["responses"], task.truncate_token, task.truncate_after,
                                             self.enc.padding_token)
                raw = self.score_model(q, post)
            valid = responses_valid(post, task.truncate_token, task.truncate_after)
            parts.append(dict(responses=out["responses"], logprobs=out["logprobs"], values=out["values"],
                              ref_logprobs=ref["logprobs"], postprocessed=post,
                              scores=penalized_scores(raw.float(), valid, task.penalty_reward_value)))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    # ---- training ------------------------------------------------------------------------------------------
    def step(self):
        """One PPO update on this rank; returns the all-reduced statistics and the rollout."""
        hp, info = self.hp, self.info
        queries = torch.as_tensor(self.sampler.next_batch(), device=info.device)
        data = self.rollout(queries)
        kl_coef = self.kl_ctl.value
        rewards, non_score_reward, kl = ppo.compute_rewards(data["scores"], data["logprobs"], data["ref_logprobs"],
                                                            kl_coef)
        rollouts = dict(queries=queries, responses=data["responses"], logprobs=data["logprobs"],
                        values=data["values"], rewards=rewards)
        lr = hp.ppo.lr * (1 - self.global_step / self.nupdates)
        orders = [torch.as_tensor(self.np_rng.permutation(self.batch), device=info.device)
                  for _ in range(hp.ppo.noptepochs)]
        train_stats = ppo_train(self.ddp_policy, self.optimizer, rollouts, orders, ppo_hp=hp.ppo, lr=lr,
                                nminibatches=hp.ppo.nminibatches, n_groups=self.n_groups,
                                micro_batch=hp.run.train_micro_batch, device=info.device, precision=self.precision)
        stats = ppo.step_stats(logprobs=data["logprobs"], ref_logprobs=data["ref_logprobs"],
                               non_score_reward=non_score_reward, scores=data["scores"], kl_coef=kl_coef,
                               train_stats=train_stats,
                               reduce_fn=lambda st: dist.all_reduce_mean_tensors(st, info.device))
        stats = {k: float(v) for k, v in stats.items()}
        stats["ppo/lr"] = lr
        for k, v in stats.items():
            if not math.isfinite(v):
                raise FloatingPointError(f"PPO update {self.global_step}: statistic {k} = {v} is not finite; the "
                                         f"run stopped and the last good checkpoint is kept. Lower ppo.lr or use "
                                         f"--run.precision fp32")
        bad = nonfinite_parameter(self.policy)
        if bad is not None:
            raise FloatingPointError(f"PPO update {self.global_step}: parameter {bad} is not finite after the "
                                     f"optimizer step; the run stopped and the last good checkpoint is kept. Lower "
                                     f"ppo.lr or use --run.precision fp32")
        self.kl_ctl.update(stats["objective/kl"], hp.ppo.batch_size)

        now = time.time()
        step = self.global_step
        stats.update({"elapsed/updates": step + 1, "elapsed/steps/serial": (step + 1) * hp.task.response_length,
                      "elapsed/steps/total": (step + 1) * hp.ppo.batch_size * hp.task.response_length,
                      "elapsed/episodes": (step + 1) * hp.ppo.batch_size,
                      "elapsed/fps": int(hp.ppo.batch_size * hp.task.response_length / max(now - self.last_time, 1e-9)),
                      "elapsed/time": now - self.start_time})
        self.last_time = now
        return stats, dict(data, queries=queries, kl=kl)

    def print_samples(self, data, n=3):
        """Three decoded samples: query, post-processed response, score, kl, and total = score - kl_coef*kl."""
        kl_coef0 = self.hp.rewards.kl_coef
        for i in range(min(n, len(data["queries"]))):
            kl_i = data["kl"][i].sum().item()
            score = data["scores"][i].item()
            print("query:    ", self.enc.decode(data["queries"][i].tolist()).replace("\n", "⏎"))
            print("response: ", self.enc.decode(data["postprocessed"][i].tolist()).replace("\n", "⏎"))
            print(f"  score = {score:+.3f}, kl = {kl_i:+.3f}, total = {score - kl_coef0 * kl_i:+.3f}")

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def state(self):
        return {"global_step": self.global_step, "kl_ctl": self.kl_ctl.state_dict()}

    def save_checkpoint(self, root: Path, wandb_id=None):
        """All ranks write their RNG and data position; rank 0 writes weights, optimizer and counters.

        The directory is assembled as step-N.tmp and renamed once every rank has written its part. If any write
        fails on any rank (a full disk), every rank raises CheckpointSaveError and the previous checkpoint stays.
        """
        info, step = self.info, self.global_step
        tmp = root / f"step-{step:08d}.tmp"

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

        def write_rank_files():
            ckpt.atomic_torch_save(tmp / f"rng-rank{info.rank}.pt", rng_state(self.np_rng, self.generator))
            ckpt.atomic_write_json(tmp / f"sampler-rank{info.rank}.json", self.sampler.state_dict())
            if info.is_main:
                ckpt.atomic_save_tensors(tmp / "model.safetensors", self.policy.model.state_dict())
                ckpt.atomic_torch_save(tmp / "optimizer.pt", self.optimizer.state_dict())
                ckpt.atomic_write_json(tmp / "state.json", dict(self.state(), world_size=info.world_size,
                                                                   wandb_id=wandb_id))

        final = root / f"step-{step:08d}"
        on_all_ranks(lambda: ckpt.begin_checkpoint(root, step) if info.is_main else None)
        on_all_ranks(write_rank_files)
        on_all_ranks(lambda: ckpt.commit_checkpoint(tmp, self.hp.run.keep_checkpoints) if info.is_main else None)
        if info.is_main:
            print(f"saved checkpoint {final}")
        return final

    def load_checkpoint(self, path: Path):
        """Restores everything `save_checkpoint` wrote; the world size must match for an exact resume.

        Raises ValueError / FileNotFoundError naming the file for a truncated, foreign or incomplete checkpoint."""
        info = self.info
        state = _read_json(path / "state.json")
        try:
            world_size, global_step, kl_state = state["world_size"], int(state["global_step"]), state["kl_ctl"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path / 'state.json'} is not a policy checkpoint state ({e!r} missing or bad)") from e
        if world_size != info.world_size:
            raise ValueError(f"checkpoint {path} was written by {world_size} ranks but this run has "
                             f"{info.world_size}; resume with the same number of processes")
        sd = ckpt.load_tensors(path / "model.safetensors")
        from lm_human_preferences.language.trained_models import check_state_dict
        check_state_dict(self.policy.model, sd, allow_missing_heads=False)
        optimizer_state = ckpt.torch_load_safe(path / "optimizer.pt")
        rng = ckpt.torch_load_safe(path / f"rng-rank{info.rank}.pt")
        sampler_state = _read_json(path / f"sampler-rank{info.rank}.json")
        self.policy.model.load_state_dict(sd)
        try:
            self.optimizer.load_state_dict(optimizer_state)
            self.kl_ctl.load_state_dict(kl_state)
            set_rng_state(rng, self.np_rng, self.generator)
        except (KeyError, TypeError, IndexError, RuntimeError) as e:
            raise ValueError(f"checkpoint {path} does not match this run ({type(e).__name__}: {e}); was it written "
                             f"by another version or configuration?") from e
        self.sampler.load_state_dict(sampler_state)
        self.global_step = global_step
        return state


def _read_json(path):
    """A JSON file; FileNotFoundError or ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint file {path} is truncated or corrupt ({e})") from e


def nonfinite_parameter(module):
    """The name of the first parameter of `module` holding a NaN or inf, or None (one device sync)."""
    named = [(n, p) for n, p in module.named_parameters()]
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named])
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


def rng_state(np_rng, generator):
    """Every RNG of this rank as tensors/plain values (loadable with weights_only=True)."""
    py = random.getstate()
    out = {"python": [py[0], list(py[1]), py[2]], "numpy": _np_state(np_rng.get_state()),
           "numpy_global": _np_state(np.random.get_state()),
           "torch_cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        out["torch_cuda"] = torch.cuda.get_rng_state_all()
    return out


def _np_state(np_state):
    """A NumPy RandomState state tuple as weights_only-loadable values."""
    name, keys, pos, has_gauss, gauss = np_state
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]


def _np_state_back(saved):
    """The inverse of `_np_state`."""
    name, keys, pos, has_gauss, gauss = saved
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss


def set_rng_state(state, np_rng, generator):
    """Restores every RNG `rng_state` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_rng.set_state(_np_state_back(state["numpy"]))
    np.random.set_state(_np_state_back(state["numpy_global"]))
    torch.set_rng_state(state["torch_cpu"])
    generator.set_state(state["generator"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])


class SignalFlag:
    """Records SIGTERM/SIGINT so the loop can checkpoint at the next update boundary and exit cleanly."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def write_policy_metadata(save_dir: Path, hp, policy, enc_name, device: torch.device):
    """train_policy_hparams.json and policy/{hparams.json, encoding}: what `sample` needs besides a checkpoint."""
    ckpt.atomic_write_json(save_dir / "train_policy_hparams.json",
                           with_resolved(hp.to_nested_dict(), dist.resolved_run_settings(hp.run.precision, device)))
    ckpt.atomic_write_json(save_dir / POLICY_DIR / "hparams.json", policy.model.config.to_dict())
    ckpt.atomic_write_json(save_dir / POLICY_DIR / "encoding", enc_name)


def changed_hparams(save_dir: Path, hp) -> list:
    """Dotted keys (outside run.*) whose value differs from the run's saved train_policy_hparams.json."""
    path = save_dir / "train_policy_hparams.json"
    try:
        saved = TrainPolicyHParams.from_nested_dict(json.loads(path.read_text())).to_flat_dict()
    except Exception:  # missing or from another version: nothing to compare
        return []
    now = hp.to_flat_dict()
    return sorted(k for k in set(saved) | set(now)
                  if not k.startswith("run.") and saved.get(k, "<unset>") != now.get(k, "<unset>"))


def reward_hparams(hp: TrainPolicyHParams, save_dir):
    """The chained reward training's hyperparameters (rewards.train_new_model), stored in the same run directory."""
    rm_hp = hp.rewards.train_new_model
    if rm_hp.task.to_nested_dict() != hp.task.to_nested_dict():
        raise ValueError("rewards.train_new_model.task must equal task (the reward model is trained on the "
                         "policy's task)")
    if save_dir is None:
        raise ValueError("rewards.train_new_model needs run.save_dir to store the reward model")
    rm_hp.run.save_dir = str(save_dir)
    rm_hp.run.device, rm_hp.run.precision = hp.run.device, hp.run.precision
    return rm_hp


def build_trainer(hp: TrainPolicyHParams, info, trained_model) -> PPOTrainer:
    """Seeds this rank, then loads the score model, reference policy, policy and query sampler (raising on bad
    input); writes nothing."""
    precision = dist.resolve_precision(hp.run.precision, info.device)
    seed = dist.rank_seed(hp.run.seed, info.rank)
    np_rng = dist.seed_everything(seed)
    generator = torch.Generator(device=info.device)
    generator.manual_seed(seed if seed is not None else int(np_rng.randint(2**31)))

    task = hp.task
    enc, prefix, suffix = train_reward.task_encodings(task)
    score_model = load_reward_model(trained_model, n_vocab=enc.n_vocab, padding_token=enc.padding_token,
                                    device=info.device)
    ref_policy = train_reward.build_ref_policy(task, enc, prefix, suffix, info.device)
    train_reward.check_fits_context(task, ref_policy.model.config.n_ctx, prefix, suffix)
    policy = Policy(load_model(task.policy.initial_model, ["value"], n_vocab=enc.n_vocab, device=info.device),
                    temperature=task.policy.temperature, padding_token=enc.padding_token, prefix_tokens=prefix,
                    suffix_tokens=suffix).to(info.device)
    policy.eval()  # dropout is never active; eval() changes nothing else here
    for module in (score_model, ref_policy, policy):
        dist.broadcast_module(module)
    sampler = QuerySampler(task.query_dataset, "train", enc, task.query_length, task.start_text, task.end_text,
                           dist.exact_batch(hp.ppo.batch_size, info.world_size, "ppo.batch_size"),
                           rank=info.rank, world_size=info.world_size)
    trainer = PPOTrainer(hp, info, score_model=score_model, ref_policy=ref_policy, policy=policy, sampler=sampler,
                         enc=enc, precision=precision, np_rng=np_rng, generator=generator)
    if hp.run.compile:
        policy.model.forward = torch.compile(policy.model.forward)
    return trainer


def train(hp: TrainPolicyHParams, *, resume=False, overwrite=False):
    """Trains the reward model first if `rewards.train_new_model` is set, then runs PPO; returns the save dir.

    Every input (settings, label file, models, dataset, the checkpoint to resume) is checked before the first
    write. An existing run directory needs `resume` (continue from its latest complete checkpoint; a finished
    reward model is kept) or `overwrite` (delete it first). SIGTERM/SIGINT stop at the next update boundary with a
    checkpoint; a non-finite statistic or parameter raises FloatingPointError, keeping the last good checkpoint.
    """
    hp.validate()
    with ckpt.input_errors():  # before any collective, so every rank fails alike
        hp.check_world_size(dist.env_info(hp.run.device).world_size)
    info = dist.init_distributed(hp.run.device)
    save_dir = Path(hp.run.save_dir) if hp.run.save_dir else None
    ckpt_root = save_dir / POLICY_DIR / "checkpoints" if save_dir else None
    chained = hp.rewards.train_new_model is not None
    trained_model = hp.rewards.trained_model
    rm_setup = trainer = latest = state = None
    with ckpt.validated_inputs(info.device):
        ckpt.check_run_dir(save_dir, resume=resume, overwrite=overwrite)
        latest = ckpt.latest_checkpoint(ckpt_root) if resume and ckpt_root is not None else None
        if chained:
            rm_hp = reward_hparams(hp, save_dir)
            trained_model = str(save_dir / train_reward.REWARD_DIR)
            if not (resume and train_reward.reward_model_complete(save_dir)):
                rm_setup = train_reward.prepare(rm_hp, info)
        else:  # everything loads now; with a chained reward model, after it is trained
            trainer = build_trainer(hp, info, trained_model)
            state = trainer.load_checkpoint(latest) if latest is not None else None
    if overwrite and info.is_main:
        ckpt.clear_run_dir(save_dir)
    dist.barrier()
    if rm_setup is not None:
        train_reward.run(rm_setup)
        rm_setup = None  # free the reward training's models before loading the policy's
    elif chained and info.is_main:
        print(f"reward model already trained in {trained_model}; skipping reward training")
    if trainer is None:
        with ckpt.validated_inputs(info.device):
            trainer = build_trainer(hp, info, trained_model)
            state = trainer.load_checkpoint(latest) if latest is not None else None

    wandb_id = state.get("wandb_id") if state else None
    if info.is_main:
        hp.dump()
        if latest is not None:
            print(f"resumed from {latest} at update {trainer.global_step} of {trainer.nupdates}")
            changed = changed_hparams(save_dir, hp)
            if changed:
                print(f"warning: resuming with hyperparameters that differ from the run's saved ones "
                      f"({', '.join(changed)}); the continuation is not the run it would have been", file=sys.stderr)
        elif resume:
            print(f"no complete checkpoint to resume in {ckpt_root}; starting at update 0")
        if save_dir is not None:
            ckpt.remove_stale_tmp(ckpt_root)
            ckpt.truncate_metrics(save_dir / "train_policy_metrics.jsonl", trainer.global_step)
            write_policy_metadata(save_dir, hp, trainer.policy,
                                  train_reward.encoding_name(hp.task.policy.initial_model), info.device)
    logger = Logger(is_main=info.is_main, save_dir=save_dir, name="train_policy", config=hp.to_nested_dict(),
                    wandb_setting=hp.run.wandb, wandb_project=hp.run.wandb_project,
                    run_name=save_dir.name if save_dir else None, wandb_id=wandb_id)
    bar = tqdm(total=trainer.nupdates, initial=trainer.global_step, desc="train_policy", disable=not info.is_main,
               dynamic_ncols=True)
    saved_at = trainer.global_step if latest is not None else None
    try:
        with SignalFlag() as signals:
            while trainer.global_step < trainer.nupdates:
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
    except StopRequested:
        pass
    finally:
        bar.close()
        logger.finish()
    if ckpt_root is not None and saved_at != trainer.global_step:
        trainer.save_checkpoint(ckpt_root, logger.wandb_id)
    return save_dir
