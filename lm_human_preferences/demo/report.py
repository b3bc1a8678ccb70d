"""The demo's report: its training curves, the labeler-score histogram, summary.json and the printed summary.

The curves are drawn with utils/plotting.py, the primitives `launch.py plot` uses; what is the demo's own is which
curves (with their reference lines) and the histogram of VADER scores before and after PPO.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from lm_human_preferences.demo.evaluate import summarize_evaluation
from lm_human_preferences.demo.stages import DemoContext
from lm_human_preferences.utils import ckpt, plotting
from lm_human_preferences.utils.logging import read_metrics


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
              epoch_steps: Optional[int] = None, epochs: int = 1, title: Optional[str] = None) -> list[Path]:
    """Writes score.png, kl.png, kl_coef.png, reward_loss.png and overview.png (all four) into out_dir.

    epoch_steps/epochs mark the reward model's passes over its labels on the loss curve."""
    rows = {"reward": read_metrics(reward_metrics), "policy": read_metrics(policy_metrics)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    overview = plotting.figure((11.0, 7.0))
    axes = overview.subplots(2, 2).ravel()
    for spec, ax_all in zip(curve_specs(kl_target, epoch_steps, epochs), axes):
        steps, values = plotting.curve(rows[spec["source"]], spec["key"])
        if not steps:
            raise ValueError(f"no values of {spec['key']} in the {spec['source']} metrics: the training stage did "
                             f"not log anything; rerun the demo with --restart")
        kwargs = {k: spec[k] for k in ("title", "ylabel", "xlabel", "hline", "hline_label", "smooth", "vlines",
                                       "vline_label") if k in spec}
        note = plotting.curve(rows[spec["source"]], spec["note_key"])[1] if "note_key" in spec else []
        fig = plotting.figure((6.0, 3.6))
        for ax in (fig.add_subplot(), ax_all):
            plotting.draw_curve(ax, steps, values, **kwargs)
            if note:
                ax.text(0.02, 0.04, spec["note"].format(note[-1]), transform=ax.transAxes, fontsize=9,
                        bbox=dict(boxstyle="round", facecolor="white", alpha=0.8))
        plotting.save(fig, out_dir / spec["file"], dpi=110)
        paths.append(out_dir / spec["file"])
    overview.suptitle(title or "Offline RLHF demo: VADER-labelled best-of-4 comparisons -> reward model -> PPO")
    plotting.save(overview, out_dir / "overview.png", dpi=100)
    paths.append(out_dir / "overview.png")
    return paths


def plot_scores(initial: Sequence[float], final: Sequence[float], out_path: Path) -> Path:
    """Histogram of the labeler's scores of initial vs final policy samples on the held-out queries."""
    fig = plotting.figure((6.0, 3.6))
    ax = fig.add_subplot()
    bins = np.linspace(-1, 1, 21)
    ax.hist(initial, bins=bins, alpha=0.6, label=f"initial policy (mean {np.mean(initial):+.3f})")
    ax.hist(final, bins=bins, alpha=0.6, label=f"after PPO (mean {np.mean(final):+.3f})")
    ax.set_xlabel("VADER compound score of the response")
    ax.set_ylabel("held-out samples")
    ax.set_title("Labeler score on held-out queries", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, alpha=0.3)
    plotting.save(fig, out_path, dpi=110)
    return Path(out_path)


def write_report(ctx: DemoContext, markers: dict) -> dict:
    """Plots and summary.json into the output directory; returns the summary."""
    paths, profile = ctx.paths, ctx.profile
    paths.out.mkdir(parents=True, exist_ok=True)
    plots = plot_demo(paths.run.reward_metrics, paths.run.policy_metrics, paths.out, profile.kl_target,
                      epoch_steps=profile.initial_comparisons // profile.rm_batch_size,
                      epochs=profile.rm_epochs,
                      title=None if not profile.online else
                      f"Online RLHF demo: {profile.online_rounds} rounds of VADER labels on the current policy's "
                      f"samples (loss: the initial reward model)")
    evaluation = json.loads(paths.evaluation.read_text())
    plots.append(plot_scores([s["score"] for s in evaluation["initial"]["samples"]],
                             [s["score"] for s in evaluation["final"]["samples"]], paths.out / "labeler_score.png"))
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
    variant = "Online" if summary["settings"].get("online_rounds") else "Offline"
    lines = ["", "=" * 78,
             f"{variant} RLHF demo ({summary['profile']}): results on {ev['num_queries']} held-out queries",
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
    if rm.get("heldout_accuracy") is not None:
        lines.append(f"reward model held-out accuracy {rm['heldout_accuracy']:.1%} on {rm['heldout_count']:.0f} "
                     f"best-of-4 labels (chance {rm['chance_accuracy']:.0%}); loss {rm['first_loss']:.3f} -> "
                     f"{rm['final_loss']:.3f} (ln 4 = 1.386)")
    if ev.get("final_policy_rm_accuracy") is not None:
        lines.append(f"final reward model's accuracy on the final policy's own best-of-4 samples (VADER's pick): "
                     f"{ev['final_policy_rm_accuracy']:.1%} (chance 25%)")
    for r in summary["ppo"].get("online_rounds", []):
        lines.append(f"online round {r['round']:.0f}: {r['labels']:.0f} label records, accuracy on the round's "
                     f"comparisons {r.get('accuracy_before', float('nan')):.1%} before retraining, "
                     f"{r.get('accuracy_after', float('nan')):.1%} after")
    for i in range(min(n_examples, len(summary["samples"]["initial"]))):
        a, b = summary["samples"]["initial"][i], summary["samples"]["final"][i]
        lines += ["", f"query:   {a['query']}", f"initial: {a['response']!r}  [VADER {a['score']:+.2f}]",
                  f"final:   {b['response']!r}  [VADER {b['score']:+.2f}]"]
    lines += ["", f"plots: {', '.join(str(out / p) for p in summary['plots'])}", f"summary: {out / 'summary.json'}"]
    return "\n".join(lines)
