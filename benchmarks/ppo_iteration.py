#!/usr/bin/env python
"""Times one PPO iteration phase by phase, ours against the Hugging Face-based and no-KV-cache ways of the
existing ports, on the same weights and queries, in one run.

Phases, at the sentiment task's shapes (query 64, response 24, temperature 0.7, 4 PPO epochs x 1 minibatch,
read from params.py) and a per-rank batch (default 8):

  sampling    Policy.respond: one pass over the query, then one KV-cached step per token
  ref+score   the reference policy's teacher-forced logprobs and the reward model's score
  update      ppo_train from train_policy.py: 4 epochs x 1 minibatch, TF-style Adam
  iteration   all of the above plus the per-token rewards and the step statistics (PPOTrainer.step's calls)

Baselines, built from the same random weights: `transformers.GPT2LMHeadModel.generate` (KV cache on), sampling
without a KV cache (the whole prefix recomputed for every new token, logits at every position, as the
wuwowuyi port does), and an HF-based iteration as in the accelerate port (generate, a forward to recompute
the policy's logprobs and values, ref and reward forwards, then 4 epochs of GPT2LMHeadModel + value head with
torch.optim.Adam on the same loss).

Each timing is the median of --repeats runs after --warmup runs, ours and the baselines taking turns run by
run, so that a machine shared with other work slows all of them alike. MFU is model FLOPs per second (matmuls
only, 2 per multiply-add; the same FLOP count for ours and the baselines) over the best rate of a square matmul
of --matmul-size measured here in the same precision. Our peak memory is measured per phase in a child process
that holds only our models (peak RSS, VmHWM reset per phase, on CPU; torch's max allocated bytes on CUDA). Under
bf16 the frozen reference policy and reward model keep their Linear layers in bf16 (fused.store_linears_in: the
same outputs under autocast, half their memory). On CUDA the script also times the real sentiment configuration
(per-rank batch = ppo.batch_size on one GPU, in the experiment's run.rollout_micro_batch / run.train_micro_batch
pieces) and projects the wall time of its 1M episodes. The JSON is written after each precision and before the
projection, so a projection that runs out of memory (recorded as a figure) or fails loses no earlier figure.

    python benchmarks/ppo_iteration.py                       # 124M shape, batch 8, fp32 (+ bf16 where native)
    python benchmarks/ppo_iteration.py --size test --json out.json
"""
import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a fresh clone without installing the package

import params as experiments  # noqa: E402
from lm_human_preferences import ppo, runs  # noqa: E402
from lm_human_preferences.language.encodings import get_encoding  # noqa: E402
from lm_human_preferences.language.model import GPT2, GPT2Config  # noqa: E402
from lm_human_preferences.lm_tasks import penalized_scores, postprocess_responses, responses_valid  # noqa: E402
from lm_human_preferences.rewards import RewardModel  # noqa: E402
from lm_human_preferences.train_policy import PPOTrainer  # noqa: E402
from lm_human_preferences.utils import dist  # noqa: E402
from lm_human_preferences.utils.alloc import keep_freed_memory  # noqa: E402
from lm_human_preferences.utils.core import entropy_from_logits, logprobs_from_logits  # noqa: E402
from lm_human_preferences.utils.training import VirtualRanks  # noqa: E402
from lm_human_preferences.utils.precision import choose_precision, cpu_has_native_bf16  # noqa: E402

GB = 1e9
PHASES = ("sampling", "score", "update", "iteration")
PHASE_LABELS = {"sampling": "sampling", "score": "ref+score", "update": "update (4 ep)", "iteration": "iteration"}
# model shapes; the task shapes and PPO settings always come from the sentiment experiment
MODEL_SIZES = {
    "124M": GPT2Config(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12),
    "test": GPT2Config(n_vocab=27, n_ctx=96, n_embd=32, n_head=2, n_layer=2),
}
BASELINES = {
    "sampling": ("hf_generate", "nocache"),
    "score": ("hf",),
    "update": ("hf",),
    "iteration": ("hf",),
}
BASELINE_LABELS = {"hf_generate": "HF generate (KV cache)", "nocache": "no KV cache (full prefix/token)",
                   "hf": "HF + torch Adam port"}


# ---- set-up ----------------------------------------------------------------------------------------------

@dataclass
class Setting:
    """What one PPO iteration is made of: model shape, task shapes, PPO hyperparameters, per-rank batch."""
    config: GPT2Config
    batch: int
    query_length: int
    response_length: int
    temperature: float
    truncate_token: int
    truncate_after: int
    penalty: float
    kl_coef: float
    ppo_hp: object  # PpoHParams of the sentiment experiment
    padding_token: int
    hp: object  # the whole TrainPolicyHParams of the sentiment experiment, with this batch
    enc: object  # the encoding of the model's vocabulary (its padding token; samples are never printed)

    @property
    def seq_len(self):
        return self.query_length + self.response_length


def sentiment_setting(size: str, batch: int | None, virtual_ranks: int | None = None) -> Setting:
    """The sentiment experiment's task and PPO settings on a model of `size`; batch None = ppo.batch_size, hosted
    as `virtual_ranks` virtual ranks in one process (None = the experiment's, 8)."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown --size {size!r}; use one of {', '.join(MODEL_SIZES)}")
    hp = experiments.get_hparams("train_policy", "sentiment")
    task, config = hp.task, MODEL_SIZES[size]
    enc = get_encoding("main" if config.n_vocab == get_encoding("main").n_vocab else "test")
    if task.query_length + task.response_length > config.n_ctx:
        raise ValueError(f"model size {size!r} has n_ctx={config.n_ctx} < the task's {task.query_length} + "
                         f"{task.response_length} tokens")
    batch = hp.ppo.batch_size if batch is None else batch
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    hp.ppo.batch_size = batch
    hp.virtual_ranks = hp.virtual_ranks if virtual_ranks is None else virtual_ranks
    if hp.virtual_ranks < 1 or batch % hp.virtual_ranks:
        raise ValueError(f"--batch {batch} must be a multiple of --virtual-ranks {hp.virtual_ranks}")
    return Setting(config=config, batch=batch, query_length=task.query_length, response_length=task.response_length,
                   temperature=task.policy.temperature, truncate_token=task.truncate_token,
                   truncate_after=task.truncate_after, penalty=task.penalty_reward_value, kl_coef=hp.rewards.kl_coef,
                   ppo_hp=hp.ppo, padding_token=enc.padding_token, hp=hp, enc=enc)


def random_gpt2(config: GPT2Config, heads, seed: int, device) -> GPT2:
    """A GPT2 with the original's random initialisers, seeded so that every copy has the same weights."""
    torch.manual_seed(seed)
    return GPT2(config, heads).to(device)


def build_ours(s: Setting, seed: int, device, precision: str, compiled: bool = False,
               micro_batches: bool = False) -> PPOTrainer:
    """train_policy's PPOTrainer for one rank, on random models (the baselines' weights) instead of loaded ones:
    policy and frozen reference policy with the same initial weights, and a frozen reward model. Whole batches
    at once (like the baselines) unless `micro_batches`: then in the run's rollout/train micro-batches."""
    hp = copy.deepcopy(s.hp)
    hp.run.precision, hp.run.compile, hp.run.seed = precision, compiled, seed
    if not micro_batches:
        hp.run.rollout_micro_batch = hp.run.train_micro_batch = None
    task, enc = hp.task, s.enc
    policy = runs.make_policy(random_gpt2(s.config, ["value"], seed, device), task, enc, [], [], frozen=False)
    ref_policy = runs.make_policy(random_gpt2(s.config, ["value"], seed, device), task, enc, [], [], frozen=True)
    reward_model = RewardModel(random_gpt2(s.config, ["reward"], seed + 1, device),
                               padding_token=enc.padding_token).eval().requires_grad_(False)
    vranks = VirtualRanks(hp.virtual_ranks, rank=0, world_size=1, seed=seed, device=device)
    return PPOTrainer(hp, dist.DistInfo(device=device), score_model=reward_model, ref_policy=ref_policy,
                      policy=policy, sampler=None, enc=enc, precision=precision, vranks=vranks)


def make_inputs(s: Setting, seed: int, device):
    """Queries (B, query_length) without pads and the noptepochs permutations, fixed for the whole run."""
    rng = np.random.RandomState(seed)
    queries = torch.as_tensor(rng.randint(0, s.config.n_vocab, size=(s.batch, s.query_length)), device=device)
    orders = [torch.as_tensor(rng.permutation(s.batch), device=device) for _ in range(s.ppo_hp.noptepochs)]
    return queries, orders


# ---- measurement -----------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory since the last reset: VmHWM of this process on CPU (reset through /proc/self/clear_refs),
    max allocated bytes on CUDA. `resettable` is False where the kernel refuses the reset (then the peak is
    the process's lifetime peak)."""

    def __init__(self, device):
        self.device = device
        self.resettable = True

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.resettable = False

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matmul_rate(device, dtype, n: int, repeats: int = 7, max_run_s: float = 0.5) -> tuple[float, int]:
    """(FLOP/s, n used) of an n x n x n matmul in `dtype`: the best of `repeats` after two warm-ups (the machine's
    rate). n is halved until one run takes at most about `max_run_s` (timed first at 256), so a precision the
    processor only emulates (bf16 on a CPU without native support: about 1 GFLOP/s) never stalls the benchmark."""
    g = torch.Generator(device=device).manual_seed(0)

    def once(size):
        a = torch.randn(size, size, generator=g, device=device).to(dtype)
        b = torch.randn(size, size, generator=g, device=device).to(dtype)
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        return time.perf_counter() - t0, a, b

    small = min(n, 256)
    once(small)
    t_small = once(small)[0]
    while n > small and t_small * (n / small) ** 3 > max_run_s:
        n //= 2
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    times = []
    for i in range(repeats + 2):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times), n


def forward_flops(config: GPT2Config, tokens: int, keys: float, lm_rows: int) -> float:
    """Matmul FLOPs of a forward over `tokens` tokens attending to `keys` keys on average, with the LM head
    computed for `lm_rows` of them."""
    c = config
    per_layer = 2 * (c.n_embd * 3 * c.n_embd + c.n_embd * c.n_embd + 2 * c.n_embd * 4 * c.n_embd)  # qkv, proj, mlp
    attention = 2 * 2 * c.n_embd * keys  # q.k and a.v
    return tokens * c.n_layer * (per_layer + attention) + lm_rows * 2 * c.n_embd * c.n_vocab


def phase_flops(s: Setting) -> dict:
    """Useful model FLOPs of each phase (the same work for ours and the baselines; backward = 2 x forward)."""
    c, B, Q, T = s.config, s.batch, s.query_length, s.response_length
    L = Q + T
    sampling = forward_flops(c, B * Q, (Q + 1) / 2, B)
    sampling += sum(forward_flops(c, B, Q + t + 1, B) for t in range(1, T))
    teacher_forced = forward_flops(c, B * L, (L + 1) / 2, B * T)
    score = teacher_forced + forward_flops(c, B * L, (L + 1) / 2, 0)
    update = s.ppo_hp.noptepochs * 3 * teacher_forced
    return dict(sampling=sampling, score=score, update=update, iteration=sampling + score + update)


def phase_tokens(s: Setting) -> dict:
    """Tokens each phase processes: sampled tokens for sampling and the iteration (the log's fps), sequence
    tokens through each model for the forwards, and sequence tokens x epochs for the update."""
    B, L, T = s.batch, s.seq_len, s.response_length
    return dict(sampling=B * T, score=2 * B * L, update=s.ppo_hp.noptepochs * B * L, iteration=B * T)


def run_interleaved(contenders: dict, *, warmup: int, repeats: int, device):
    """Runs each `contenders[name](mark)` in turn, warmup + repeats rounds; `mark(phase)` ends a phase. Returns
    {name: {phase: [seconds of each timed run]}}, with 'iteration' the sum of a run's phases when it has several."""
    times = {name: {} for name in contenders}
    for i in range(warmup + repeats):
        for name, fn in contenders.items():
            gc.collect()
            run = {}
            sync(device)
            last = time.perf_counter()

            def mark(phase):
                nonlocal last
                sync(device)
                now = time.perf_counter()
                run[phase] = now - last
                last = now

            fn(mark)
            if i >= warmup:
                for phase, seconds in run.items():
                    times[name].setdefault(phase, []).append(seconds)
                if len(run) > 1:
                    times[name].setdefault("iteration", []).append(sum(run.values()))
    return times


def run_peaks(fn, *, runs: int, mem: PeakMemory) -> dict:
    """Peak memory of each phase of `fn(mark)` over `runs` runs (after one untimed run); 'iteration' the largest."""
    fn(lambda phase: None)
    peaks = {}
    for _ in range(runs):
        gc.collect()
        sync(mem.device)
        mem.reset()

        def mark(phase):
            sync(mem.device)
            peaks[phase] = max(peaks.get(phase, 0), mem.peak())
            mem.reset()

        fn(mark)
    peaks["iteration"] = max(peaks.values())
    return peaks


def summarize(times, peaks, flops, tokens, rate):
    """Median seconds, tokens/s, achieved FLOP/s, MFU and peak memory (None when not measured) of each phase."""
    out = {}
    for phase, ts in times.items():
        med = statistics.median(ts)
        out[phase] = dict(median_s=med, times_s=ts, tokens=tokens.get(phase), tokens_per_s=tokens.get(phase, 0) / med,
                          flops=flops.get(phase), flops_per_s=flops.get(phase, 0) / med,
                          mfu=flops.get(phase, 0) / med / rate, peak_bytes=(peaks or {}).get(phase))
    return out


# ---- ours ------------------------------------------------------------------------------------------------

class OurIteration:
    """One PPO iteration of train_policy's own PPOTrainer on fixed queries: `trainer.rollout` (sampling, then the
    reference policy, postprocessing and the reward model) and `trainer.update` (per-token rewards, 4 epochs of
    PPO, statistics, the KL controller). The end of sampling is marked from inside the rollout by timing the
    policy's `respond`."""

    def __init__(self, s: Setting, precision, device, seed: int, compiled=False, micro_batches=False):
        self.trainer = build_ours(s, seed, device, precision, compiled, micro_batches)
        self.queries, _ = make_inputs(s, seed, device)
        self.mark = None
        respond = self.trainer.policy.respond

        def respond_then_mark(*args, **kwargs):
            out = respond(*args, **kwargs)
            self.mark("sampling")
            return out

        self.trainer.policy.respond = respond_then_mark

    def __call__(self, mark):
        self.mark = mark
        data = self.trainer.rollout(self.queries)
        mark("score")
        self.trainer.update(self.queries, data)  # ends with the statistics' device sync, as in training
        mark("update")


# ---- baselines -------------------------------------------------------------------------------------------

def hf_config(config: GPT2Config):
    import transformers
    hf = transformers.GPT2Config(vocab_size=config.n_vocab, n_positions=config.n_ctx, n_embd=config.n_embd,
                                 n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_new",
                                 layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                 bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=True)
    hf._attn_implementation = "sdpa"
    return hf


def to_hf_state_dict(model: GPT2) -> dict:
    """Our state dict in GPT2LMHeadModel's names and layout (Conv1D weights are [nx, nf])."""
    conv = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith("heads."):
            continue
        out["transformer." + name] = t.t().contiguous() if name.endswith(conv) else t
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


class HFScalarHeadModel(torch.nn.Module):
    """The accelerate port's policy/reward model: a GPT2LMHeadModel (or GPT2Model) plus a scalar head on the
    last hidden state."""

    def __init__(self, lm, head: torch.nn.Linear):
        super().__init__()
        self.lm = lm
        self.head = head

    def forward(self, input_ids, attention_mask):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        return getattr(out, "logits", None), self.head(out.hidden_states[-1]).squeeze(-1)


def build_hf(s: Setting, seed: int, device, check=True):
    """HF policy (+ value head), ref policy and reward model holding exactly our initial weights."""
    import transformers
    cfg = hf_config(s.config)
    models = {}
    for name, heads, model_seed, lm_class in (("policy", ["value"], seed, transformers.GPT2LMHeadModel),
                                              ("ref_policy", ["value"], seed, transformers.GPT2LMHeadModel),
                                              ("reward_model", ["reward"], seed + 1, transformers.GPT2Model)):
        ours = random_gpt2(s.config, heads, model_seed, "cpu")
        lm = lm_class(cfg)
        sd = to_hf_state_dict(ours)
        if lm_class is transformers.GPT2Model:
            sd = {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}
        missing, unexpected = lm.load_state_dict(sd, strict=False)
        if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
            raise RuntimeError(f"HF GPT-2 does not take our weights: missing {missing}, unexpected {unexpected}")
        head = torch.nn.Linear(s.config.n_embd, 1)
        with torch.no_grad():
            h = ours.heads[heads[0]]
            head.weight.copy_(h.w[None])
            head.bias.copy_(h.b)
        if check and name == "policy":
            check_same_function(ours, lm)
        models[name] = HFScalarHeadModel(lm, head).to(device).eval()
        del ours
    for name in ("ref_policy", "reward_model"):
        models[name].requires_grad_(False)
    models["optimizer"] = torch.optim.Adam(models["policy"].parameters(), lr=s.ppo_hp.lr, eps=1e-5)
    gc.collect()
    return models


def check_same_function(ours: GPT2, hf_lm):
    """Raises unless the HF copy computes our logits (float32, a few tokens): the baselines run our weights."""
    x = torch.arange(12).remainder(ours.config.n_vocab)[None]
    with torch.no_grad():
        a = ours(x, lm_positions="all")["lm_logits"]
        b = hf_lm(input_ids=x, use_cache=False).logits.float()
    err = (a - b).abs().max().item()
    if not err < 1e-3:
        raise RuntimeError(f"the HF copy's logits differ from ours by {err:.2e}; the baselines would not run the "
                           f"same weights")


def hf_generate(lm, queries, length, temperature):
    """GPT2LMHeadModel.generate with the KV cache, pure sampling, exactly `length` new tokens (no EOS)."""
    out = lm.generate(input_ids=queries, attention_mask=torch.ones_like(queries), max_new_tokens=length,
                      min_new_tokens=length, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                      use_cache=True, eos_token_id=None, pad_token_id=0)
    responses = out[:, queries.shape[1]:]
    if responses.shape[1] != length:
        raise RuntimeError(f"generate returned {responses.shape[1]} tokens instead of {length}")
    return responses


@torch.no_grad()
def nocache_sample(lm, queries, length, temperature):
    """The no-KV-cache sampler of the PyTorch 2 port: a full forward over the growing context for every new
    token, logits at every position; logprobs of the temperature-scaled distribution."""
    tokens = queries
    logprobs = []
    for _ in range(length):
        logits = lm(input_ids=tokens, attention_mask=torch.ones_like(tokens), use_cache=False).logits
        logits = logits[:, -1].float() / temperature
        token = torch.multinomial(torch.softmax(logits, dim=-1), 1)
        logprobs.append(logprobs_from_logits(logits, token[:, 0]))
        tokens = torch.cat([tokens, token], dim=1)
    return tokens[:, queries.shape[1]:], torch.stack(logprobs, dim=1)


def hf_teacher_forced(model: HFScalarHeadModel, queries, responses, temperature, with_entropy):
    """The port's forward: logits over all positions, sliced to the response, divided by the temperature."""
    tokens = torch.cat([queries, responses], dim=1)
    logits, values = model(tokens, torch.ones_like(tokens))
    ctx, T = queries.shape[1], responses.shape[1]
    logits = logits[:, ctx - 1:ctx - 1 + T].float() / temperature
    out = dict(logprobs=logprobs_from_logits(logits, responses), values=values[:, ctx - 1:ctx - 1 + T])
    if with_entropy:
        out["entropies"] = entropy_from_logits(logits)
    return out


def hf_iteration(models, s: Setting, queries, orders, *, precision, device, mark):
    """One iteration the way the accelerate port runs it, on the same loss and statistics as ours."""
    policy, ref_policy, reward_model, optimizer = (models["policy"], models["ref_policy"], models["reward_model"],
                                                   models["optimizer"])
    with torch.no_grad(), dist.autocast(device, precision):
        responses = hf_generate(policy.lm, queries, s.response_length, s.temperature)
    mark("sampling")
    with torch.no_grad(), dist.autocast(device, precision):
        old = hf_teacher_forced(policy, queries, responses, s.temperature, with_entropy=False)
        ref = hf_teacher_forced(ref_policy, queries, responses, s.temperature, with_entropy=False)
        post = postprocess_responses(responses, s.truncate_token, s.truncate_after, 0)
        tokens = torch.cat([queries, post], dim=1)
        _, reward = reward_model(tokens, torch.ones_like(tokens))
    valid = responses_valid(post, s.truncate_token, s.truncate_after)
    scores = penalized_scores(reward[:, -1].float(), valid, s.penalty)
    rewards, non_score_reward, _ = ppo.compute_rewards(scores, old["logprobs"], ref["logprobs"], s.kl_coef)
    mark("score")
    hp = s.ppo_hp
    train_stats = []
    for order in orders:
        size = len(order) // hp.nminibatches
        for start in range(0, len(order), size):
            idx = order[start:start + size]
            adv = ppo.compute_advantages(old["values"][idx], rewards[idx], hp.gamma, hp.lam, hp.whiten_rewards)
            optimizer.zero_grad(set_to_none=True)
            with dist.autocast(device, precision):
                new = hf_teacher_forced(policy, queries[idx], responses[idx], s.temperature, with_entropy=True)
                loss, st = ppo.ppo_loss(new["logprobs"], new["values"], new["entropies"], old["logprobs"][idx],
                                        old["values"][idx], adv.advantages, adv.returns, hp.cliprange,
                                        hp.cliprange_value, hp.vf_coef)
            loss.backward()
            optimizer.step()
            train_stats.append(st)
    stats = ppo.step_stats(logprobs=old["logprobs"], ref_logprobs=ref["logprobs"], non_score_reward=non_score_reward,
                           scores=scores, kl_coef=s.kl_coef, train_stats=train_stats,
                           reduce_fn=lambda st: dist.all_reduce_mean_tensors(st, device))
    stats = {k: float(v) for k, v in stats.items()}  # the same device sync as ours
    mark("update")


def baseline_contenders(s: Setting, precision, device, seed: int) -> dict:
    """fn(mark) for the HF-based iteration (its phases are the HF baselines) and for the no-cache sampler."""
    models = build_hf(s, seed, device)
    queries, orders = make_inputs(s, seed, device)
    torch.manual_seed(seed)  # generate draws from the global generator

    def iteration(mark):
        hf_iteration(models, s, queries, orders, precision=precision, device=device, mark=mark)

    def nocache(mark):
        with dist.autocast(device, precision):
            nocache_sample(models["policy"].lm, queries, s.response_length, s.temperature)
        mark("sampling")

    return {"hf": iteration, "nocache": nocache}


# ---- report ----------------------------------------------------------------------------------------------

def format_table(report) -> str:
    """The human-readable table: per precision, each phase of ours and its baselines with the speed-up."""
    lines = table_header(report)
    for prec, r in report["results"].items():
        lines += table_rows(prec, r)
    lines += table_footer(report)
    if report.get("sentiment"):
        lines.append(format_sentiment(report["sentiment"]))
    return "\n".join(lines)


def table_header(report) -> list:
    lines = []
    m = report["machine"]
    lines.append(f"PPO iteration benchmark: size {report['size']}, per-rank batch {report['batch']}, query "
                 f"{report['query_length']}, response {report['response_length']}, {report['noptepochs']} epochs x "
                 f"{report['nminibatches']} minibatch, device {report['device']} ({m['device_name']}, "
                 f"{m['threads']} threads), median of {report['repeats']} after {report['warmup']} warm-up")
    if "cpu_capability" in m:
        lines.append(f"CPU capability {m['cpu_capability']}, native bf16: {'yes' if m['native_bf16'] else 'no'}; "
                     f"run.precision auto -> {m['auto_precision']} ({m['auto_precision_reason']})")
    rates = report["matmul_flops_per_s"]
    lines.append("matmul rate (best of 7): " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s at {report['matmul_sizes'][k]}^3"
                                                        for k, v in rates.items()))
    header = (f"{'prec':<5} {'phase':<25} {'ours s':>8} {'tok/s':>9} {'MFU':>6} {'peak GB':>8}   "
              f"{'baseline':<31} {'base s':>8} {'base MFU':>8} {'speed-up':>9}")
    lines.append(header)
    lines.append("-" * len(header))
    return lines


def table_rows(prec: str, r: dict) -> list:
    """The table's lines of one precision's results."""
    lines = []
    for variant in ("ours", "ours_compiled"):
        if variant not in r:
            continue
        for phase in PHASES:
            o = r[variant][phase]
            label = PHASE_LABELS[phase] + (" (compiled)" if variant == "ours_compiled" else "")
            peak = f"{o['peak_bytes'] / GB:8.2f}" if o["peak_bytes"] else f"{'-':>8}"
            left = (f"{prec:<5} {label:<25} {o['median_s']:8.3f} {o['tokens_per_s']:9.1f} "
                    f"{100 * o['mfu']:5.1f}% {peak}   ")
            bases = [b for b in BASELINES[phase] if b in r.get("baselines", {})] if variant == "ours" else []
            if not bases:
                lines.append(left.rstrip())
            for i, b in enumerate(bases):
                bo = r["baselines"][b][phase]
                sp = bo["median_s"] / o["median_s"]
                prefix = left if i == 0 else " " * len(left)
                lines.append(f"{prefix}{BASELINE_LABELS[b]:<31} {bo['median_s']:8.3f} {100 * bo['mfu']:7.1f}% "
                             f"{sp:8.2f}x")
    return lines


def table_footer(report) -> list:
    m = report["machine"]
    lines = ["tok/s: sampled tokens/s (sampling, iteration), sequence tokens through each model/s (ref+score), "
             "sequence tokens x epochs/s (update). speed-up = baseline s / ours s. peak: "
             + ("torch's max allocated bytes" if report["device"] == "cuda" else
                "peak RSS of a process holding only our models") + " (1 GB = 1e9 bytes)"]
    load = m.get("loadavg_start"), m.get("loadavg_end")
    if all(load):
        # the end figure includes this run's own threads; only load present before it started is other work
        lines.append(f"load average (1 min) at start {load[0][0]:.2f} (at end, including this run, {load[1][0]:.2f})"
                     + ("  -- other work shared this machine: timings are slower and noisier than on an idle one"
                        if load[0][0] > 0.5 else ""))
    return lines


def format_sentiment(p: dict) -> str:
    """The projection's line: its timing and projected hours, or why it has none (out of memory)."""
    head = (f"sentiment configuration on this device ({p['precision']}): per-rank batch {p['batch']}, "
            f"micro-batches {p['micro_batches']} (rollout/train)")
    if p.get("error"):
        return f"{head}: {p['error']} ({p['detail']})"
    peak = f", peak {p['peak_bytes'] / GB:.2f} GB" if p.get("peak_bytes") else ""
    return (f"{head}, {p['seconds_per_iteration']:.3f} s/iteration{peak} (phases: "
            + ", ".join(f"{k} {v:.3f} s" for k, v in p["phase_s"].items()) + f"); {p['nupdates']} updates "
            f"for {p['total_episodes']} episodes -> projected {p['projected_hours']:.2f} h "
            f"({p['projected_hours'] * 60:.1f} min)")


def machine_info(device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
        except OSError:
            pass
    auto = choose_precision("auto", device)
    info = dict(device_name=name, threads=torch.get_num_threads(), cpus=os.cpu_count(), torch=torch.__version__,
                python=platform.python_version(), auto_precision=auto.precision, auto_precision_reason=auto.reason)
    if device.type == "cpu":
        info.update(cpu_capability=torch.backends.cpu.get_cpu_capability(), native_bf16=cpu_has_native_bf16())
    return info


def is_out_of_memory(err: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or a RuntimeError saying "out of memory" (CPU allocator, older CUDA paths)."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def sentiment_projection(device, precision, args, batch: int | None = None,
                         micro_batches: tuple | None = None) -> dict:
    """Seconds per iteration at the sentiment experiment's real per-rank batch on one device, in its
    run.rollout_micro_batch / run.train_micro_batch pieces, and the wall time of its total episodes at that rate
    (sampling, scoring and PPO only; no logging or checkpoints). `batch` and `micro_batches` (rollout, train)
    override the experiment's (tiny shapes for smoke tests). Out of memory is a result: 'error' says at which
    batch and micro-batches, and nothing is timed."""
    s = sentiment_setting(args.size, batch, args.virtual_ranks)
    if micro_batches is not None:
        s.hp.run.rollout_micro_batch, s.hp.run.train_micro_batch = micro_batches
    run = s.hp.run
    micro = "/".join("whole batch" if m is None else str(m) for m in (run.rollout_micro_batch, run.train_micro_batch))
    out = dict(precision=precision, batch=s.batch, rollout_micro_batch=run.rollout_micro_batch,
               train_micro_batch=run.train_micro_batch, micro_batches=micro, nupdates=s.ppo_hp.nupdates,
               total_episodes=s.ppo_hp.total_episodes)
    mem = PeakMemory(device)
    oom = None
    try:
        mem.reset()
        times = run_interleaved({"ours": OurIteration(s, precision, device, args.seed, micro_batches=True)},
                                warmup=args.warmup, repeats=args.repeats, device=device)["ours"]
    except (RuntimeError, MemoryError) as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if not (is_out_of_memory(err) or isinstance(err, MemoryError)):
            raise
        oom = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    gc.collect()  # outside the except block: the traceback's frames (and their tensors) are gone by now
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if oom is not None:
        return dict(out, error=f"out of memory at batch {s.batch} with micro-batches {micro}", detail=oom)
    per_iter = statistics.median(times["iteration"])
    # CUDA: max allocated bytes of this process's run; the CPU's VmHWM would include the earlier contenders
    peak = mem.peak() if device.type == "cuda" else None
    return dict(out, seconds_per_iteration=per_iter, projected_hours=per_iter * s.ppo_hp.nupdates / 3600,
                peak_bytes=peak, phase_s={k: statistics.median(v) for k, v in times.items() if k != "iteration"})


def probe_memory(args, precision) -> dict:
    """Our per-phase peak memory, measured in a child process that holds nothing else (the timing process also
    holds the baselines' models, and freed memory the allocator keeps would blur a second measurement)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", precision, "--size", args.size,
           "--batch", str(args.batch), "--device", args.device, "--seed", str(args.seed)]
    if args.virtual_ranks:
        cmd += ["--virtual-ranks", str(args.virtual_ranks)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the memory probe failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_probe_main(args):
    """The child of probe_memory: prints {'peaks': {phase: bytes}, 'resettable': bool} as one JSON line."""
    device = dist.resolve_device(args.device)
    mem = PeakMemory(device)
    s = sentiment_setting(args.size, args.batch, args.virtual_ranks)
    peaks = run_peaks(OurIteration(s, args.memory_probe, device, args.seed), runs=1, mem=mem)
    print(json.dumps({"peaks": peaks, "resettable": mem.resettable}))


def benchmark_precisions(choice: str, device) -> list:
    """The precisions to time: 'auto' = fp32, plus bf16 where the hardware runs it natively and faster (what
    run.precision auto would pick); 'both', 'fp32' or 'bf16' as asked."""
    if choice == "auto":
        return ["fp32"] + (["bf16"] if choose_precision("auto", device).precision == "bf16" else [])
    return ["fp32", "bf16"] if choice == "both" else [choice]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="124M", choices=list(MODEL_SIZES), help="model shape (random weights)")
    p.add_argument("--batch", type=int, default=8, help="per-rank batch (queries per iteration)")
    p.add_argument("--virtual-ranks", type=int, default=None,
                   help="virtual ranks the batch is split into (whitening groups, sampling streams); default the "
                        "sentiment experiment's 8")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "both", "fp32", "bf16"],
                   help="auto (default): fp32, plus bf16 where the CPU/GPU runs it natively and faster; both: fp32 "
                        "and bf16 whatever the hardware (bf16 on a CPU without native support is ~100x slower)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-baselines", action="store_true", help="time only ours")
    p.add_argument("--compile", action="store_true", help="also time ours with torch.compile on the model forwards")
    p.add_argument("--sentiment", action="store_true",
                   help="also time the real sentiment batch and project a full run (default on CUDA)")
    p.add_argument("--matmul-size", type=int, default=None, help="n of the n^3 matmul rate (default 2048 CPU, "
                                                                 "8192 CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--memory-probe", choices=["fp32", "bf16"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    return args


def main(argv=None):
    args = parse_args(argv)
    # what launch.py does (every contender in this process and the memory probe share it; LMHP_MALLOC=default
    # measures without it)
    malloc_kept = keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        return memory_probe_main(args)
    device = dist.resolve_device(args.device)
    load_start = os.getloadavg()
    precisions = benchmark_precisions(args.precision, device)
    s = sentiment_setting(args.size, args.batch, args.virtual_ranks)
    n = args.matmul_size or (8192 if device.type == "cuda" else 2048 if args.size == "124M" else 512)
    measured = {p: matmul_rate(device, torch.float32 if p == "fp32" else torch.bfloat16, n) for p in precisions}
    rates = {p: r for p, (r, _) in measured.items()}
    sizes = {p: size for p, (_, size) in measured.items()}
    flops, tokens = phase_flops(s), phase_tokens(s)

    results = {}
    report = dict(size=args.size, batch=s.batch, virtual_ranks=s.hp.virtual_ranks, query_length=s.query_length, response_length=s.response_length,
                  noptepochs=s.ppo_hp.noptepochs, nminibatches=s.ppo_hp.nminibatches, device=device.type,
                  repeats=args.repeats, warmup=args.warmup, matmul_sizes=sizes, matmul_flops_per_s=rates,
                  machine=machine_info(device), memory_reset=True, results=results,
                  command=" ".join(["python", "benchmarks/ppo_iteration.py"] +
                                   (sys.argv[1:] if argv is None else list(argv))))
    report["machine"].update(loadavg_start=load_start, malloc_keeps_freed=malloc_kept)

    def save():  # every figure so far, before the next step that may fail (the projection may run out of memory)
        report["machine"]["loadavg_end"] = os.getloadavg()
        if args.json:
            tmp = Path(f"{args.json}.tmp")
            tmp.write_text(json.dumps(report, indent=1))
            os.replace(tmp, args.json)

    for i, prec in enumerate(precisions):
        probe = probe_memory(args, prec)
        report["memory_reset"] &= probe["resettable"]
        contenders = {"ours": OurIteration(s, prec, device, args.seed)}
        if args.compile:
            contenders["ours_compiled"] = OurIteration(s, prec, device, args.seed, compiled=True)
        if not args.no_baselines:
            contenders.update(baseline_contenders(s, prec, device, args.seed))
        times = run_interleaved(contenders, warmup=args.warmup, repeats=args.repeats, device=device)
        del contenders
        gc.collect()
        r = results[prec] = {"ours": summarize(times["ours"], probe["peaks"], flops, tokens, rates[prec])}
        if args.compile:
            r["ours_compiled"] = summarize(times["ours_compiled"], None, flops, tokens, rates[prec])
        if not args.no_baselines:
            r["baselines"] = {"hf": summarize(times["hf"], None, flops, tokens, rates[prec]),
                              "hf_generate": summarize({"sampling": times["hf"]["sampling"]}, None, flops, tokens,
                                                       rates[prec]),
                              "nocache": summarize(times["nocache"], None, flops, tokens, rates[prec])}
            r["speedup"] = {phase: {b: r["baselines"][b][phase]["median_s"] / r["ours"][phase]["median_s"]
                                    for b in BASELINES[phase]} for phase in PHASES}
        save()
        print("\n".join((table_header(report) if i == 0 else []) + table_rows(prec, r)), flush=True)
    print("\n".join(table_footer(report)), flush=True)
    if args.sentiment or device.type == "cuda":
        report["sentiment"] = sentiment_projection(device, "bf16" if "bf16" in precisions else precisions[0], args)
        save()
        print(format_sentiment(report["sentiment"]), flush=True)
    return report


if __name__ == "__main__":
    main()
