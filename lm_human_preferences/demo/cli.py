"""`python launch.py demo`: the whole method, offline, on a CPU, with a programmatic labeler in place of humans.

It runs the stages of demo/stages.py in order (each is cached under --cache_dir and skipped by a later run; an
interrupted run resumes), then writes the plots and summary.json into --out and prints the numbers (demo/report.py).
`--fast` is the reduced version the test runs (a smaller model, fewer steps).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from lm_human_preferences.demo import corpus, labeler
from lm_human_preferences.demo.profiles import PROFILES, DemoPaths, policy_hparams, task_binds
from lm_human_preferences.demo.report import format_report, write_report
from lm_human_preferences.demo.stages import DemoContext, DemoInterrupted, run_stages
from lm_human_preferences.utils.dist import resolve_device
from lm_human_preferences.utils.files import unwritable

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "static" / "demo"
DEFAULT_CACHE = DEFAULT_OUT / "cache"
ONLINE_ROUNDS = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch.py demo", description="An offline RLHF experiment on the CPU: pretrain a small GPT-2 on "
        "Debian's fortunes, label best-of-4 samples with VADER sentiment, train a reward model, run PPO, and "
        "evaluate. Completed stages are cached; rerunning resumes.")
    parser.add_argument("--fast", action="store_true",
                        help="the reduced version the tests run (3 to 5 minutes on 2 cores, by CPU)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where plots and summary.json go (default: {DEFAULT_OUT.relative_to(REPO_ROOT)}, or "
                             f"<cache_dir>/fast/report with --fast)")
    parser.add_argument("--cache_dir", type=Path, default=DEFAULT_CACHE,
                        help=f"stage cache (default: {DEFAULT_CACHE.relative_to(REPO_ROOT)})")
    parser.add_argument("--corpus_dir", type=Path, default=corpus.FORTUNES_DIR,
                        help=f"fortune files (default: {corpus.FORTUNES_DIR})")
    parser.add_argument("--restart", action="store_true",
                        help="run the labels, reward, policy and evaluation stages again (the corpus and the "
                             "pretrained model stay cached)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    parser.add_argument("--seed", type=int, default=None, help="seed of the RLHF stages (default 1)")
    parser.add_argument("--online", action="store_true",
                        help="the online variant: the same training label budget and PPO episodes, but half the "
                             "comparisons labeled from the initial policy and the rest in --online_rounds rounds "
                             "sampled from the current policy during PPO, the reward model retrained each round "
                             "(its stages are cached in <cache_dir>/<profile>/online; outputs default to "
                             "<default out>/online)")
    parser.add_argument("--online_rounds", type=int, default=ONLINE_ROUNDS,
                        help=f"online rounds with --online (default {ONLINE_ROUNDS})")
    return parser


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    profile = PROFILES["fast" if args.fast else "full"]
    if args.seed is not None:
        profile = replace(profile, seed=args.seed)
    if args.online:
        profile = replace(profile, online_rounds=args.online_rounds)
    cache_dir = args.cache_dir.expanduser().resolve()
    variant = "online" if args.online else None
    default_out = cache_dir / profile.name / "report" if args.fast else DEFAULT_OUT
    out = (args.out or (default_out / variant if variant else default_out)).expanduser().resolve()
    paths = DemoPaths(work=cache_dir / profile.name, out=out,
                      rlhf=cache_dir / profile.name / variant if variant else None)
    try:  # every input, before any stage runs
        if args.online:
            if args.online_rounds < 1:
                raise ValueError(f"--online_rounds must be >= 1, got {args.online_rounds}")
            policy_hparams(profile, paths, "cpu")  # the budget splits into the rounds, the rounds fit the updates
        labeler.make_labeler()
        task = task_binds(profile, paths)
        corpus.check_corpus(args.corpus_dir, window=profile.pretrain.n_ctx + 1, query_length=profile.query_length,
                            start_text=task["start_text"], end_text=task["end_text"])
        for option, path in (("--cache_dir", cache_dir), ("--out", out)):
            problem = unwritable(path, directory=True)
            if problem is not None:
                raise ValueError(f"cannot write {option} {path}: {problem}; pass a writable directory")
        device = resolve_device(args.device)
    except (ImportError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ctx = DemoContext(profile=profile, paths=paths, corpus_dir=args.corpus_dir, device=device)
    ctx.log(f"{variant or 'offline'} RLHF demo ({profile.name}); stage cache {paths.rlhf_dir}, outputs {paths.out}")
    t0 = time.time()
    try:
        markers = run_stages(ctx, restart=args.restart)
    except DemoInterrupted as e:
        print(f"\n{e}. Completed stages are cached in {paths.work}; run the same command again to resume.",
              file=sys.stderr)
        return 130
    summary = write_report(ctx, markers)
    ctx.log(format_report(summary, paths.out))
    ctx.log(f"this run took {time.time() - t0:.0f}s")
    return 0
