"""The offline demo (`python launch.py demo`): the whole method on a CPU, with VADER in place of human labelers.

cli.py (the command), profiles.py (settings, and the training hyperparameters they stand for), stages.py (the six
stages and their driver), markers.py (the stage cache), corpus.py (Debian's fortunes), pretrain.py (a small GPT-2
from scratch), labeler.py (VADER best-of-4 labels), evaluate.py (held-out score and KL), report.py (plots, summary).
"""
from lm_human_preferences.demo.cli import main

__all__ = ["main"]
