"""Pretraining the demo's small GPT-2 from scratch (plain language modelling, not RLHF).

The model is the project's own `GPT2` (GPT-2 BPE vocabulary of 50,257 tokens, tied input/output embeddings) with
the original's initialisers. Training draws random windows of `n_ctx + 1` tokens from the pretraining documents
joined by the end-of-text token and minimises next-token cross-entropy with AdamW, a linear warmup and a cosine
decay. With a 50,257-way softmax and a model this small the output layer dominates the cost, so the logits are
computed under bf16 autocast where the processor runs bfloat16 natively (2-4x faster there, measured), in float32
elsewhere (`precision` 'auto', resolved by utils/precision.py; about 100x faster than emulated bfloat16).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from lm_human_preferences.language.datasets import TokenFile
from lm_human_preferences.language.encodings import MAIN_EOT_TOKEN, MAIN_N_VOCAB
from lm_human_preferences.language.model import GPT2, GPT2Config
from lm_human_preferences.language.trained_models import save_model_dir
from lm_human_preferences.utils.precision import choose_precision


@dataclass
class PretrainConfig:
    n_layer: int = 4  # transformer blocks
    n_embd: int = 128  # width
    n_head: int = 4  # attention heads
    n_ctx: int = 64  # context (and training window) length
    batch_size: int = 16  # windows per step
    steps: int = 300  # optimizer steps
    lr: float = 3e-3  # peak AdamW learning rate
    warmup: int = 30  # linear warmup steps
    weight_decay: float = 0.01  # AdamW weight decay (matrices only)
    seed: int = 0
    precision: str = "auto"  # 'auto' (bf16 only where the CPU/GPU runs it natively and faster), 'bf16' or 'fp32'

    def model_config(self) -> GPT2Config:
        return GPT2Config(n_vocab=MAIN_N_VOCAB, n_ctx=self.n_ctx, n_embd=self.n_embd, n_head=self.n_head,
                          n_layer=self.n_layer)


def token_stream(token_file: TokenFile, eot_token: int = MAIN_EOT_TOKEN) -> np.ndarray:
    """All documents concatenated, each followed by the end-of-text token; int64 [n_tokens + n_docs]."""
    pieces = []
    eot = np.array([eot_token], dtype=np.int64)
    for doc in token_file:
        pieces.append(np.asarray(doc, dtype=np.int64))
        pieces.append(eot)
    if not pieces:
        raise ValueError(f"{token_file.bin_path} holds no documents to pretrain on")
    return np.concatenate(pieces)


def sample_windows(stream: np.ndarray, batch_size: int, length: int, rng: np.random.Generator) -> torch.Tensor:
    """`batch_size` random windows of `length` consecutive tokens of `stream`; int64 (batch_size, length)."""
    if stream.size < length:
        raise ValueError(f"the pretraining text has {stream.size} tokens, fewer than one window of {length}")
    starts = rng.integers(0, stream.size - length + 1, size=batch_size)
    return torch.from_numpy(np.stack([stream[s:s + length] for s in starts]))


def lm_loss(model: GPT2, windows: torch.Tensor, precision: str) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of windows (B, n+1): inputs [:, :-1], targets [:, 1:].

    bf16: the logits come from a bf16 matmul under autocast (the fast setting where the CPU has native bfloat16);
    fp32: from the model's own float32 LM head (its forward on the fastest kernel, language/fused.py)."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    if precision == "bf16":
        with torch.autocast(device_type=windows.device.type, dtype=torch.bfloat16):
            h = model(inputs)["h"]  # (B, n, C)
            logits = F.linear(h, model.wte.weight)  # (B, n, V), tied embeddings
    else:
        logits = model(inputs, lm_positions="all")["lm_logits"]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def learning_rate(step: int, config: PretrainConfig) -> float:
    """Linear warmup to config.lr, then cosine decay to a tenth of it at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: GPT2, config: PretrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, layer norms or position embeddings)."""
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and n != "wpe.weight"]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() == 2 and n != "wpe.weight")]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))


@torch.no_grad()
def evaluate_loss(model: GPT2, stream: np.ndarray, config: PretrainConfig, device, precision: str,
                  n_windows: int = 64) -> float:
    """Mean cross-entropy on `n_windows` fixed windows of a held-out stream."""
    rng = np.random.default_rng(config.seed + 1)
    windows = sample_windows(stream, n_windows, config.n_ctx + 1, rng).to(device)
    return float(sum(lm_loss(model, windows[i:i + config.batch_size], precision) *
                     len(windows[i:i + config.batch_size]) for i in range(0, n_windows, config.batch_size)) / n_windows)


def pretrain(config: PretrainConfig, train_file: TokenFile, heldout_file: TokenFile, out_dir: Path, device,
             log: Callable[[str], None] = print, log_every: int = 50) -> dict:
    """Trains a GPT-2 from scratch and writes it as a model directory (model.safetensors + hparams.json).

    Returns {'losses': [(step, train loss)], 'heldout_loss', 'tokens', 'tokens_per_second'}.
    """
    choice = choose_precision(config.precision, torch.device(device))
    precision = choice.precision
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = GPT2(config.model_config()).to(device)
    model.train()
    optimizer = make_optimizer(model, config)
    stream = token_stream(train_file)
    log(f"pretraining a {config.n_layer}-layer, {config.n_embd}-wide GPT-2 ({model.num_params() / 1e6:.1f}M "
        f"parameters) for {config.steps} steps of {config.batch_size} x {config.n_ctx} tokens on "
        f"{stream.size:,} tokens ({precision}: {choice.reason})")
    losses = []
    start = time.time()
    smoothed: Optional[float] = None
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        loss = lm_loss(model, sample_windows(stream, config.batch_size, config.n_ctx + 1, rng).to(device),
                       precision)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss is {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = loss.item()
        smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
        losses.append((step, value))
        if (step + 1) % log_every == 0 or step + 1 == config.steps:
            elapsed = time.time() - start
            log(f"  step {step + 1}/{config.steps}: loss {smoothed:.3f} "
                f"({(step + 1) * config.batch_size * config.n_ctx / elapsed:,.0f} tokens/s)")
    elapsed = time.time() - start
    model.eval()
    heldout = evaluate_loss(model, token_stream(heldout_file), config, device, precision)
    log(f"  held-out loss {heldout:.3f} nats/token (uniform over the vocabulary: {math.log(MAIN_N_VOCAB):.2f})")
    save_model_dir(out_dir, model.config, model.state_dict())
    tokens = config.steps * config.batch_size * config.n_ctx
    return {"config": asdict(config), "precision": precision, "precision_reason": choice.reason, "losses": losses,
            "heldout_loss": heldout, "tokens": tokens, "tokens_per_second": tokens / elapsed, "seconds": elapsed}
