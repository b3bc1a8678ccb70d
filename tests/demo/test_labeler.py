"""demo/labeler.py: VADER as the labeler, best-of-4 picks and the original's label schema."""
import importlib.util
import json

import numpy as np
import pytest
import torch

from lm_human_preferences.demo import labeler
from lm_human_preferences.language.labels import records_to_arrays

HAVE_VADER = importlib.util.find_spec("vaderSentiment") is not None


def test_pick_best_takes_the_maximum_and_breaks_ties_at_random():
    rng = np.random.default_rng(0)
    scores = np.array([[0.1, 0.5, -0.2, 0.0], [0.0, 0.0, 0.0, 0.0], [0.3, 0.3, -1.0, 0.3]])
    picks = np.stack([labeler.pick_best(scores, rng) for _ in range(400)])
    assert (picks[:, 0] == 1).all()
    assert set(picks[:, 1]) == {0, 1, 2, 3}
    assert set(picks[:, 2]) == {0, 1, 3}


def test_label_records_have_the_original_best_of_4_schema():
    pad = 50259
    queries = torch.tensor([[10, 13, pad, pad], [11, 12, 13, pad]])
    samples = torch.tensor([[[1, 13, pad]] * 4, [[2, 3, 13]] * 4])
    records = labeler.label_records(queries, samples, np.array([2, 0]))
    assert records[0] == {"query": [10, 13, pad, pad], "sample0": [1, 13, pad], "sample1": [1, 13, pad],
                          "sample2": [1, 13, pad], "sample3": [1, 13, pad], "best": 2}
    assert all(type(v) is int for r in records for k, v in r.items() if k == "best")
    arrays = records_to_arrays(json.loads(json.dumps(records)), "best_of_4", query_length=4, response_length=3,
                               n_vocab=50257, padding_token=pad)
    assert arrays["best"].tolist() == [2, 0]


@pytest.mark.skipif(not HAVE_VADER, reason="vaderSentiment is not installed (pip install vaderSentiment)")
def test_labeler_scores_sentiment():
    score = labeler.make_labeler()
    happy, neutral, sad = score(["I love this wonderful day.", "The table has four legs.", "A terrible, sad loss."])
    assert happy > 0.5 and neutral == 0.0 and sad < -0.5
