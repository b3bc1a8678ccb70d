"""GPU memory of a training run, estimated from the model's shape and the run's batch settings (pure arithmetic).

What one rank holds at its peak, in GB (1e9 bytes):

- the trained model (the policy in PPO, the reward model in reward training): float32 weights, gradients and two
  Adam moments, 16 bytes a parameter;
- the frozen models (reference policy, and in PPO the reward model): under bf16 PPOTrainer keeps their blocks'
  Linear weights in bfloat16 (`fused.store_linears_in`), 2 bytes, the rest (embeddings, LayerNorms, heads) float32;
  reward training keeps its reference policy in float32;
- autocast's cache of the trained model's bf16 weight copies (bf16 only), the float32 LM-head copy of the
  embedding matrix, DDP's gradient buckets (a float32 copy of the gradients, with more than one rank);
- the larger of a training micro-batch's activations (saved for the backward) and a rollout micro-batch's (KV
  cache, one layer's transients, reference logits);
- a fixed allowance for the CUDA context and the kernels' workspaces.

The activation terms count the tensors autograd saves per layer and token (bf16: LayerNorm inputs of the float32
residual stream 2 x 4d, their bf16 outputs 2 x 2d, q/k/v 6d, attention output 2d, MLP hidden and GELU 2 x 8d = 36d
bytes; float32 twice the bf16 ones), the attention mask per layer (T^2) and the float32 logits with their gradient
over the response. Nothing here was measured on a GPU: the sums reproduce the figures of issue #15's review within
10%, and should be trusted to about +-20%; allocator fragmentation is not counted, hence `FITS_GB` below a 24 GB
card's 25.8e9 bytes.
"""
from dataclasses import dataclass
from typing import Optional

GB = 1e9
CUDA_OVERHEAD_GB = 1.0  # CUDA context, cuBLAS/attention workspaces
FITS_GB = 22.0  # an estimate at most this fits a 24 GB (24 GiB, 25.8e9 bytes) card with room for fragmentation
CONTEXT_EXTRA_TOKENS = 8  # a task's query prefix and suffix ('Article:\n\n', '\n\nTL;DR:') in BPE tokens, at most


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_embd: int
    n_head: int
    n_vocab: int = 50257
    n_ctx: int = 1024


GPT2_SHAPES = {  # OpenAI's GPT-2 releases
    "124M": ModelShape(12, 768, 12),
    "355M": ModelShape(24, 1024, 16),
    "774M": ModelShape(36, 1280, 20),
    "1558M": ModelShape(48, 1600, 25),
}


def param_counts(shape: ModelShape) -> tuple:
    """(parameters in the blocks' Linear layers, every other parameter) of GPT-2 with one scalar head."""
    d, n_layer = shape.n_embd, shape.n_layer
    linear = n_layer * (12 * d * d + 9 * d)  # c_attn 3d^2+3d, attn c_proj d^2+d, c_fc 4d^2+4d, mlp c_proj 4d^2+d
    other = (shape.n_vocab + shape.n_ctx) * d + n_layer * 4 * d + 2 * d + d + 1  # embeddings, LayerNorms, head
    return linear, other


def frozen_bytes(shape: ModelShape, linears_in_bf16: bool) -> int:
    """A frozen model's weights: Linear layers in bf16 when stored so, everything else float32."""
    linear, other = param_counts(shape)
    return linear * (2 if linears_in_bf16 else 4) + other * 4


def train_activation_bytes(shape: ModelShape, seq_len: int, logit_positions: int, precision: str) -> int:
    """What the forward saves for the backward, per row of `seq_len` tokens (`logit_positions` of them with LM
    logits: the response in PPO, none in reward training)."""
    a = 2 if precision == "bf16" else 4
    per_token_layer = 36 * shape.n_embd if precision == "bf16" else 64 * shape.n_embd
    mask = shape.n_layer * seq_len * seq_len * a  # the attention bias in the activations' dtype, per layer
    logits = 8 * logit_positions * shape.n_vocab  # float32 logits and their gradient
    return shape.n_layer * seq_len * per_token_layer + mask + logits


def rollout_activation_bytes(shape: ModelShape, seq_len: int, response_length: int, precision: str) -> int:
    """Sampling and scoring one row without gradients: the KV cache, one layer's transients (MLP hidden and
    GELU), the reference policy's float32 logits and log-softmax over the response."""
    a = 2 if precision == "bf16" else 4
    kv_cache = 2 * shape.n_layer * seq_len * shape.n_embd * a
    transients = 2 * seq_len * 4 * shape.n_embd * a
    return kv_cache + transients + 8 * response_length * shape.n_vocab


def estimate(shape: ModelShape, *, seq_len: int, response_length: int, train_rows: int, rollout_rows: int,
             world_size: int = 1, precision: str = "bf16", phase: str = "policy") -> dict:
    """GB per GPU of one training phase, by part, and 'total'. phase 'policy' (PPO: trained policy, frozen
    reference policy and reward model, logits in training) or 'reward' (trained reward model, float32 reference
    policy); `train_rows` sequences per training micro-batch, `rollout_rows` per rollout micro-batch."""
    if phase not in ("policy", "reward") or precision not in ("bf16", "fp32"):
        raise ValueError(f"phase must be 'policy' or 'reward' and precision 'bf16' or 'fp32', got {phase!r}, "
                         f"{precision!r}")
    linear, other = param_counts(shape)
    params = linear + other
    bf16 = precision == "bf16"
    frozen = [frozen_bytes(shape, bf16)] * 2 if phase == "policy" else [frozen_bytes(shape, False)]
    logit_positions = response_length if phase == "policy" else 0
    parts = {
        "trained model, gradients and Adam": 16 * params,
        "frozen models": sum(frozen),
        "autocast weight cache": 2 * linear if bf16 else 0,
        "LM head copy": 4 * shape.n_vocab * shape.n_embd,
        "DDP buckets": 4 * params if world_size > 1 else 0,
        "activations": max(train_rows * train_activation_bytes(shape, seq_len, logit_positions, precision),
                           rollout_rows * rollout_activation_bytes(shape, seq_len, response_length, precision)),
    }
    out = {k: v / GB for k, v in parts.items()}
    out["CUDA context and workspaces"] = CUDA_OVERHEAD_GB
    out["total"] = sum(out.values())
    return out


def run_estimate(flat: dict, shape: ModelShape, world_size: int, precision: str = "bf16") -> dict:
    """{'policy': GB, 'reward': GB (when the run trains a reward model)} per GPU for a train_policy run's flat
    hyperparameters (`HParams.to_flat_dict()`); None micro-batches mean the whole per-rank batch."""
    seq_len = flat["task.query_length"] + flat["task.response_length"] + CONTEXT_EXTRA_TOKENS
    response = flat["task.response_length"]
    batch = flat["ppo.batch_size"] // world_size
    minibatch = batch // flat["ppo.nminibatches"]
    out = {"policy": estimate(shape, seq_len=seq_len, response_length=response, world_size=world_size,
                              precision=precision, train_rows=_rows(flat["run.train_micro_batch"], minibatch),
                              rollout_rows=_rows(flat["run.rollout_micro_batch"], batch))["total"]}
    rm = "rewards.train_new_model."
    if flat.get(rm + "batch_size") is not None:
        rollout = flat[rm + "rollout_batch_size"] // world_size
        labels = flat[rm + "batch_size"] // world_size
        out["reward"] = estimate(shape, seq_len=seq_len, response_length=response, world_size=world_size,
                                 precision=precision, phase="reward",
                                 train_rows=4 * _rows(flat[rm + "run.train_micro_batch"], labels),  # best_of_4
                                 rollout_rows=_rows(flat[rm + "run.rollout_micro_batch"], rollout))["total"]
    return out


def _rows(micro_batch: Optional[int], batch: int) -> int:
    """Rows in one micro-batch of a per-rank batch (None: the whole batch)."""
    return min(micro_batch or batch, batch)


def render_table(rows) -> str:
    """The README's markdown table from rows of (experiment, model, GPUs, flat hyperparameters, {phase: GB})."""
    lines = ["| experiment | model | GPUs | per-rank batch (PPO / labels) | micro-batches rollout, train "
             "(PPO; reward) | GB per GPU, bf16 (PPO / reward) |",
             "|---|---|---|---|---|---|"]
    rm = "rewards.train_new_model."
    for experiment, model, world_size, flat, gb in rows:
        fits = "" if max(gb.values()) <= FITS_GB else " (needs a 32 GB card)"
        lines.append(
            f"| {experiment} | {model} | {world_size} | {flat['ppo.batch_size'] // world_size} / "
            f"{flat[rm + 'batch_size'] // world_size} | {_mb(flat['run.rollout_micro_batch'])}, "
            f"{_mb(flat['run.train_micro_batch'])}; {_mb(flat[rm + 'run.rollout_micro_batch'])}, "
            f"{_mb(flat[rm + 'run.train_micro_batch'])} | {gb['policy']:.1f} / {gb['reward']:.1f}{fits} |")
    return "\n".join(lines)


def _mb(value: Optional[int]) -> str:
    return "all" if value is None else str(value)
