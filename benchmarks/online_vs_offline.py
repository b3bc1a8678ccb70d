"""Offline vs online label collection on the demo's mock sentiment task (issue 18, item 5).

For each seed, runs `launch.py demo` (by default --fast --device cpu) twice in one stage cache: the offline demo
(every training comparison labeled by VADER from the initial policy, a reward model trained once, PPO against it) and
`--online` (the same training label budget and PPO episodes; half the comparisons from the initial policy, the rest
in --online_rounds rounds sampled from the current policy during PPO, the reward model retrained from the initial
model on all labels so far each round). The corpus and the pretrained model are shared; the RLHF stages of the two
variants have their own directories (<cache>/<profile>/ and <cache>/<profile>/online/), so a later seed reruns them.

Budget: both variants train on num_labels - num_heldout comparisons, each rm_epochs times (the demo writes a training
comparison rm_epochs times in its label file; online rounds write each answer online.epochs = rm_epochs times into
the retraining's file). The offline variant also labels num_heldout comparisons only to measure its reward model.

Prints a table: seed, variant, VADER score of the final policy on held-out queries (mean +- stderr), KL to the
initial policy (nats per response), the final reward model's accuracy on VADER-labeled best-of-4 comparisons of the
final policy's own samples, and the wall time of the RLHF stages (labels, reward, policy, evaluate). Wall times
depend on what else the machine runs.

    python benchmarks/online_vs_offline.py [--seeds 1 2 3] [--json out.json] [--plot static/online_vs_offline.png]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / "static" / "demo" / "cache"  # the demo's own stage cache (git-ignored)
RLHF_STAGES = ("labels", "reward", "policy", "evaluate")


def run_variant(seed: int, online: bool, args) -> dict:
    out = Path(args.cache_dir) / "reports" / f"{'online' if online else 'offline'}-seed{seed}"
    cmd = [sys.executable, str(REPO / "launch.py"), "demo", "--device", args.device, "--seed", str(seed),
           "--cache_dir", str(args.cache_dir), "--out", str(out)]
    if args.profile == "fast":
        cmd.append("--fast")
    if online:
        cmd += ["--online", "--online_rounds", str(args.online_rounds)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    ev = summary["evaluation"]
    rounds = summary["ppo"].get("online_rounds", [])
    return {"seed": seed, "variant": "online" if online else "offline", "command": " ".join(cmd[1:]),
            "score": ev["final"]["score"], "score_stderr": ev["final"]["score_stderr"],
            "initial_score": ev["initial"]["score"], "score_rise": ev["score_rise"],
            "kl": ev["final"]["kl"], "kl_stderr": ev["final"]["kl_stderr"],
            "rm_accuracy_final_policy": ev.get("final_policy_rm_accuracy"),
            "rm_heldout_accuracy_initial": summary["reward_model"].get("heldout_accuracy"),
            "online_rounds": rounds,
            "rlhf_seconds": sum(summary["stages"][s]["seconds"] for s in RLHF_STAGES),
            "command_seconds": wall,
            "train_comparisons": summary["settings"]["num_labels"] - summary["settings"]["num_heldout"],
            "ppo_episodes": summary["ppo"]["episodes"]}


def mean_stderr(values):
    values = [v for v in values if v is not None]
    n = len(values)
    if not n:
        return float("nan"), float("nan")
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return m, sd / math.sqrt(n)


def format_table(rows: list) -> str:
    lines = [f"{'seed':>4}  {'variant':<8}  {'VADER score':>16}  {'KL (nats)':>12}  {'RM acc. final':>13}  "
             f"{'RLHF wall s':>11}",
             "-" * 76]
    for r in rows:
        acc = "n/a" if r["rm_accuracy_final_policy"] is None else f"{r['rm_accuracy_final_policy']:.1%}"
        lines.append(f"{r['seed']:>4}  {r['variant']:<8}  {r['score']:+.3f} +- {r['score_stderr']:.3f}  "
                     f"{r['kl']:5.2f} +- {r['kl_stderr']:.2f}  {acc:>13}  {r['rlhf_seconds']:11.0f}")
    lines.append("-" * 76)
    for variant in ("offline", "online"):
        sel = [r for r in rows if r["variant"] == variant]
        if not sel:
            continue
        s, se = mean_stderr([r["score"] for r in sel])
        k, ke = mean_stderr([r["kl"] for r in sel])
        a, ae = mean_stderr([r["rm_accuracy_final_policy"] for r in sel])
        w, _ = mean_stderr([r["rlhf_seconds"] for r in sel])
        lines.append(f"{'mean':>4}  {variant:<8}  {s:+.3f} +- {se:.3f}  {k:5.2f} +- {ke:.2f}  "
                     f"{a:6.1%} +- {ae:.1%}  {w:11.0f}   (over {len(sel)} seeds, +- = stderr across seeds)")
    return "\n".join(lines)


def plot(rows: list, path: Path) -> None:
    sys.path.insert(0, str(REPO))
    from lm_human_preferences.utils import plotting
    fig = plotting.figure((11.0, 3.6))
    axes = fig.subplots(1, 3)
    metrics = (("score", "score_stderr", "VADER score of final policy\n(held-out queries)"),
               ("kl", "kl_stderr", "KL(final || initial), nats"),
               ("rm_accuracy_final_policy", None,
                "final RM accuracy on final policy's\nbest-of-4 samples (chance 25%)"))
    for ax, (key, err, title) in zip(axes, metrics):
        for i, variant in enumerate(("offline", "online")):
            sel = [r for r in rows if r["variant"] == variant and r[key] is not None]
            xs = [i + 0.08 * (j - (len(sel) - 1) / 2) for j in range(len(sel))]
            ax.errorbar(xs, [r[key] for r in sel], yerr=[r[err] for r in sel] if err else None, fmt="o",
                        color=f"C{i}", alpha=0.7, capsize=3)
            m, se = mean_stderr([r[key] for r in sel])
            ax.errorbar([i + 0.3], [m], yerr=[se], fmt="s", color="k", capsize=4)
        ax.set_xticks([0, 1], ["offline", "online"])
        ax.set_xlim(-0.5, 1.6)
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
    seeds = sorted({r["seed"] for r in rows})
    fig.suptitle(f"Demo mock sentiment task: offline vs online labels, same budget and PPO episodes "
                 f"(seeds {', '.join(map(str, seeds))}; black: mean +- stderr across seeds)", fontsize=10)
    plotting.save(fig, path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--profile", choices=("fast", "full"), default="fast")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--online_rounds", type=int, default=4)
    parser.add_argument("--cache_dir", type=Path, default=DEFAULT_CACHE,
                        help="the demo's stage cache (default: the demo's own, so pretraining is shared)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows and the table here")
    parser.add_argument("--plot", type=Path, default=None,
                        help="write the plot here (e.g. static/online_vs_offline.png)")
    args = parser.parse_args(argv)
    rows = []
    t0 = time.time()
    for seed in args.seeds:
        for online in (False, True):
            row = run_variant(seed, online, args)
            rows.append(row)
            print(f"seed {seed} {row['variant']}: score {row['score']:+.3f} +- {row['score_stderr']:.3f}, "
                  f"KL {row['kl']:.2f}, RM accuracy on final samples {row['rm_accuracy_final_policy']}, "
                  f"{row['rlhf_seconds']:.0f}s", flush=True)
    table = format_table(rows)
    print(table)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "table": table, "seconds": time.time() - t0,
                                         "loadavg_at_end": load, "argv": sys.argv[1:]}, indent=1))
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
