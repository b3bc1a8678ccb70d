"""`launch.py demo`: the command's checks, and the reduced end-to-end run that must learn.

The end-to-end test (test_fast_demo_raises_the_labelers_score_with_bounded_kl) runs `launch.py demo --fast` in a
subprocess (3-6 minutes on 2 CPU cores; leave it out with `-k "not fast_demo"`) and checks that the labeler's score
of policy samples on held-out queries rises by more than four standard errors and by more than twice what
re-sampling the initial policy with a second seed moves it, while the KL to the initial policy stays bounded.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lm_human_preferences import demo
from lm_human_preferences.demo import corpus, stages

REPO = Path(__file__).resolve().parents[2]
HAVE_CORPUS = bool(corpus.FORTUNES_DIR.is_dir() and any(corpus.FORTUNES_DIR.iterdir()))
HAVE_VADER = importlib.util.find_spec("vaderSentiment") is not None


def test_main_fails_fast_without_corpus(tmp_path, capsys):
    code = demo.main(["--fast", "--corpus_dir", str(tmp_path / "none"), "--cache_dir", str(tmp_path / "c"),
                      "--out", str(tmp_path / "o")])
    assert code == 2
    assert "apt-get install fortunes" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.skipif(not HAVE_CORPUS, reason="Debian's fortunes corpus is not installed (make corpus, or "
                                            "apt-get install fortunes)")
@pytest.mark.skipif(not HAVE_VADER, reason="vaderSentiment is not installed (pip install vaderSentiment)")
def test_fast_demo_raises_the_labelers_score_with_bounded_kl(tmp_path):
    """`launch.py demo --fast` end to end in a subprocess: the labeler's mean score of policy samples on held-out
    queries rises by far more than the seed noise the run measures itself, with the KL to the initial policy
    bounded.

    The noise: the standard error of the rise, and the initial policy re-sampled with a second seed. That second
    sample's difference is itself one draw of the noise (its standard error about 0.02 on 256 queries), so it is
    checked against its standard error and the rise against twice it: on one 2-core Zen 4 machine the same run
    rose 0.126 with a seed difference of +0.003 and, with other sampling draws, 0.134 with -0.038 (1.8 standard
    errors), which a rule of four times the seed difference would have called noise."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    cmd = [sys.executable, str(REPO / "launch.py"), "demo", "--fast", "--cache_dir", str(cache), "--out", str(out),
           "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    ev = summary["evaluation"]
    assert ev["score_rise"] > 0.05 and ev["score_rise"] > 4 * ev["score_rise_stderr"], ev
    assert abs(ev["seed_difference"]) < 4 * ev["seed_difference_stderr"], ev  # the standard errors hold
    assert ev["score_rise"] > 2 * abs(ev["seed_difference"]), ev
    assert 0 < ev["final"]["kl"] < 3 * summary["settings"]["kl_target"], ev
    assert summary["reward_model"]["heldout_accuracy"] > summary["reward_model"]["chance_accuracy"]
    for name in ("score.png", "kl.png", "kl_coef.png", "reward_loss.png"):
        assert (out / name).stat().st_size > 1000
    assert len(summary["samples"]["initial"]) == len(summary["samples"]["final"]) == ev["num_queries"]
    # a second run reuses every stage
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0 and again.stdout.count(": cached (") == len(stages.STAGES), again.stdout[-2000:]
