"""The demo's evaluation and pictures: labeler score and KL of a policy on held-out queries, training curves.

`evaluate_policy` samples one response per held-out query at the task temperature, post-processes it as PPO does
(truncation), scores it with the labeler (VADER compound, in [-1, 1]) and with the trained reward model, and
measures the KL to the reference policy the way `objective/kl` does: the sum over the response's tokens of
`logprob - ref_logprob` (temperature-scaled, un-truncated sample), averaged over episodes.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from lm_human_preferences.lm_tasks import postprocess_responses
from lm_human_preferences.utils.logging import read_metrics


@torch.no_grad()
def evaluate_policy(policy, ref_policy, reward_model, queries: torch.Tensor, task, enc, labeler,
                    generator: torch.Generator, batch_size: int = 64) -> dict:
    """Per-sample and mean labeler score, reward-model score and KL to `ref_policy` on `queries` (n, q).

    Returns {'samples': [{query, response, score, reward, kl}], 'score', 'score_std', 'score_stderr', 'reward',
    'kl', 'kl_stderr'}.
    """
    samples = []
    for start in range(0, len(queries), batch_size):
        q = queries[start:start + batch_size]
        out = policy.respond(q, task.response_length, generator=generator)
        ref_logprobs = ref_policy(q, out["responses"], with_entropy=False)["logprobs"]
        kl = (out["logprobs"] - ref_logprobs).sum(dim=1)  # (b,) nats per episode
        post = postprocess_responses(out["responses"], task.truncate_token, task.truncate_after, enc.padding_token)
        rewards = reward_model(q, post)
        texts = [enc.decode(row) for row in post.cpu().tolist()]
        scores = labeler(texts)
        for i, text in enumerate(texts):
            samples.append({"query": enc.decode(q[i].cpu().tolist()), "response": text, "score": float(scores[i]),
                            "reward": float(rewards[i]), "kl": float(kl[i])})
    scores = np.array([s["score"] for s in samples])
    kls = np.array([s["kl"] for s in samples])
    n = len(samples)
    return {"samples": samples, "score": float(scores.mean()), "score_std": float(scores.std()),
            "score_stderr": float(scores.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
            "reward": float(np.mean([s["reward"] for s in samples])), "kl": float(kls.mean()),
            "kl_stderr": float(kls.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0}


def last_per_step(rows: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key`, keeping the last row of each step (a resumed run logs some steps twice)."""
    by_step = {}
    for row in rows:
        if key in row and "step" in row:
            try:
                by_step[int(row["step"])] = float(row[key])
            except (TypeError, ValueError):
                continue
    steps = sorted(by_step)
    return [float(s) for s in steps], [by_step[s] for s in steps]


def _figure(size=(6.0, 3.6)):
    """A matplotlib Figure on the Agg canvas (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start); same length as `values`."""
    values = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.concatenate([[0.0], values]))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (sums[idx] - sums[lo]) / (idx - lo)


def _draw_curve(ax, steps, values, *, title, ylabel, xlabel, hline: Optional[float] = None, hline_label=None,
                smooth: int = 0, vlines: Sequence[float] = (), vline_label=None):
    """One training curve (with a trailing moving average when smooth > 1), optional reference lines."""
    if smooth > 1:
        ax.plot(steps, values, linewidth=0.8, color="tab:blue", alpha=0.35)
        ax.plot(steps, moving_average(values, smooth), linewidth=1.6, color="tab:blue",
                label=f"moving average of {smooth}")
    else:
        ax.plot(steps, values, linewidth=1.4, color="tab:blue")
    for i, x in enumerate(vlines):
        ax.axvline(x, color="0.5", linestyle=":", linewidth=1.0, label=vline_label if i == 0 else None)
    if hline is not None:
        ax.axhline(hline, color="tab:red", linestyle="--", linewidth=1.0, label=hline_label)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def curve_specs(kl_target: Optional[float], epoch_steps: Optional[int] = None, epochs: int = 1) -> list[dict]:
    """The four demo curves: file, metrics source, key, titles, reference lines, smoothing."""
    return [
        dict(file="score.png", source="policy", key="objective/score", ylabel="reward-model score",
             title="PPO: reward-model score of policy samples", xlabel="PPO update", smooth=5),
        dict(file="kl.png", source="policy", key="objective/kl", ylabel="KL(policy || initial), nats",
             title="PPO: KL to the initial policy", xlabel="PPO update", hline=kl_target, smooth=5,
             hline_label=None if kl_target is None else f"adaptive-KL target {kl_target:g}"),
        dict(file="kl_coef.png", source="policy", key="objective/kl_coef", ylabel="beta",
             title="PPO: adaptive KL coefficient", xlabel="PPO update"),
        dict(file="reward_loss.png", source="reward", key="train_reward/minibatch/loss", ylabel="cross-entropy",
             title="Reward model: best-of-4 loss", xlabel="optimizer step", hline=math.log(4),
             hline_label="chance (ln 4)", smooth=20,
             vlines=[epoch_steps * i for i in range(1, epochs)] if epoch_steps else [],
             vline_label="next pass over the labels", note_key="train_reward/heldout/accuracy",
             note="held-out accuracy {:.0%} (chance 25%)"),
    ]


def plot_demo(reward_metrics: Path, policy_metrics: Path, out_dir: Path, kl_target: Optional[float],
              epoch_steps: Optional[int] = None, epochs: int = 1) -> list[Path]:
    """Writes score.png, kl.png, kl_coef.png, reward_loss.png and overview.png (all four) into out_dir.

    epoch_steps/epochs mark the reward model's passes over its labels on the loss curve."""
    rows = {"reward": read_metrics(reward_metrics), "policy": read_metrics(policy_metrics)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    overview = _figure((11.0, 7.0))
    axes = overview.subplots(2, 2).ravel()
    for spec, ax_all in zip(curve_specs(kl_target, epoch_steps, epochs), axes):
        steps, values = last_per_step(rows[spec["source"]], spec["key"])
        if not steps:
            raise ValueError(f"no values of {spec['key']} in the {spec['source']} metrics: the training stage did "
                             f"not log anything; rerun the demo with --restart")
        kwargs = {k: spec[k] for k in ("title", "ylabel", "xlabel", "hline", "hline_label", "smooth", "vlines",
                                       "vline_label") if k in spec}
        note = last_per_step(rows[spec["source"]], spec["note_key"])[1] if "note_key" in spec else []
        fig = _figure()
        for ax in (fig.add_subplot(), ax_all):
            _draw_curve(ax, steps, values, **kwargs)
            if note:
                ax.text(0.02, 0.04, spec["note"].format(note[-1]), transform=ax.transAxes, fontsize=9,
                        bbox=dict(boxstyle="round", facecolor="white", alpha=0.8))
        fig.savefig(out_dir / spec["file"], dpi=110)
        paths.append(out_dir / spec["file"])
    overview.suptitle("Offline RLHF demo: VADER-labelled best-of-4 comparisons -> reward model -> PPO")
    overview.savefig(out_dir / "overview.png", dpi=100)
    paths.append(out_dir / "overview.png")
    return paths


def plot_scores(initial: Sequence[float], final: Sequence[float], out_path: Path) -> Path:
    """Histogram of the labeler's scores of initial vs final policy samples on the held-out queries."""
    fig = _figure()
    ax = fig.add_subplot()
    bins = np.linspace(-1, 1, 21)
    ax.hist(initial, bins=bins, alpha=0.6, label=f"initial policy (mean {np.mean(initial):+.3f})")
    ax.hist(final, bins=bins, alpha=0.6, label=f"after PPO (mean {np.mean(final):+.3f})")
    ax.set_xlabel("VADER compound score of the response")
    ax.set_ylabel("held-out samples")
    ax.set_title("Labeler score on held-out queries", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.savefig(out_path, dpi=110)
    return Path(out_path)
