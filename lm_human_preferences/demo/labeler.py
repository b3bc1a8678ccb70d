"""The demo's programmatic labeler: VADER sentiment stands in for the human (the paper's "mock" sentiment task).

For each query the initial policy samples 4 responses; the labeler scores each post-processed response with VADER's
compound polarity (in [-1, 1]) and marks the most positive one as `best` (ties broken at random, seeded). The
records are written in exactly the original's `best_of_4` schema (ORIGINAL §8.1): `query` is the raw right-padded
query (pad id 50259), `sample0..3` the post-processed responses, `best` an int in 0..3, so `train_reward` reads
them as it reads OpenAI's label files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from lm_human_preferences import runs
from lm_human_preferences.utils.ckpt import atomic_write_bytes

NUM_SAMPLES = 4  # best_of_4
VADER_INSTALL_COMMAND = "pip install vaderSentiment"


def make_labeler() -> Callable[[Sequence[str]], np.ndarray]:
    """A function texts -> VADER compound scores (float64 [n]); ImportError with the install command if missing."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # optional: the `demo` extra
    except ImportError as e:
        raise ImportError(f"the demo's labeler needs the vaderSentiment package: run `{VADER_INSTALL_COMMAND}` "
                          f"(or `pip install -e '.[demo]'`)") from e
    analyzer = SentimentIntensityAnalyzer()

    def score(texts: Sequence[str]) -> np.ndarray:
        return np.array([analyzer.polarity_scores(text)["compound"] for text in texts], dtype=np.float64)

    return score


def pick_best(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Index of the highest score per row of (n, k) scores, ties broken uniformly at random; int64 [n]."""
    scores = np.asarray(scores, dtype=np.float64)
    top = scores == scores.max(axis=1, keepdims=True)  # (n, k) the tied maxima
    noise = rng.random(scores.shape)
    return np.where(top, noise, -1.0).argmax(axis=1).astype(np.int64)


def label_records(queries: torch.Tensor, samples: torch.Tensor, best: np.ndarray) -> list[dict]:
    """best_of_4 records from queries (n, q), post-processed samples (n, 4, T) and best (n,)."""
    queries, samples = queries.cpu().tolist(), samples.cpu().tolist()
    records = []
    for i, query in enumerate(queries):
        record = {"query": query}
        record.update({f"sample{j}": samples[i][j] for j in range(len(samples[i]))})
        record["best"] = int(best[i])
        records.append(record)
    return records


def collect_labels(policy, sampler, enc, task, n_queries: int, labeler, generator: torch.Generator,
                   rng: np.random.Generator) -> tuple[list[dict], np.ndarray]:
    """Samples 4 responses for each of `n_queries` queries and labels them; returns (records, scores (n, 4)).

    Sampling and post-processing go through `runs.rollout` (float32, no reward model), a sampler batch at a time."""
    device = policy.prefix_tokens.device
    records, all_scores = [], []
    while len(records) < n_queries:
        queries = torch.as_tensor(sampler.next_batch(), device=device)[:n_queries - len(records)]  # (b, q)
        repeated = queries.repeat_interleave(NUM_SAMPLES, dim=0)  # (b*4, q)
        post = runs.rollout(policy, repeated, task, enc.padding_token, generator=generator,
                            precision="fp32")["postprocessed"]  # (b*4, T)
        scores = labeler([enc.decode(row) for row in post.cpu().tolist()]).reshape(-1, NUM_SAMPLES)  # (b, 4)
        best = pick_best(scores, rng)
        records.extend(label_records(queries, post.reshape(len(queries), NUM_SAMPLES, -1), best))
        all_scores.append(scores)
    return records, np.concatenate(all_scores)


def training_passes(records: list[dict], passes: int) -> list[dict]:
    """The records repeated `passes` times (train_reward reads a label file once, so this trains for that many
    epochs); the order does not matter because train_reward shuffles the training records."""
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    return [record for _ in range(passes) for record in records]


def write_labels(path: Path, records: list[dict]) -> None:
    """Writes label records as the original's JSON list (atomically)."""
    atomic_write_bytes(Path(path), json.dumps(records).encode("utf-8"))
