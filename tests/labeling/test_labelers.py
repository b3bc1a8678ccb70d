"""Programmatic labelers (labeling/labelers.py) answering through the labeling store as people do: VADER picks the
most positive text; labels do not depend on the display order (two stores answered from scratch with different
display-order draws), on interruption (answering stopped midway, a lease left open, then resumed) or on the order
of answering; ties follow the seed and the comparison; a tiny random reward model as the true reward agrees with
the argmax of its own scores; `uids` restricts answering to one round; spec parsing and its errors."""
import random

import numpy as np
import pytest
import torch

import params
from lm_human_preferences import runs
from lm_human_preferences.labeling.labelers import (Labeler, RewardModelLabeler, VaderLabeler, answer_open,
                                                    check_labeler_spec, parse_labeler, tie_rng)
from lm_human_preferences.labeling.store import LabelStore, StoreError
from lm_human_preferences.language.model import GPT2, GPT2Config
from lm_human_preferences.rewards import RewardModel

N = 4
PAD = 27  # the test encoding's padding token (27 ids)
META = {"label_type": "best_of_4", "num_responses": N, "experiment": "test", "query_length": 4,
        "response_length": 5, "encoding": "test", "n_vocab": 27, "padding_token": PAD}

# (texts, index of the most positive) and comparisons whose texts VADER scores alike (all neutral: a tie of 4)
POSITIVE = [
    (["the table is brown", "I hate this, it is awful", "what a wonderful, lovely, happy day!", "it is okay"], 2),
    (["great", "this is the best thing ever, I love it so much", "bad", "terrible and horrible"], 1),
    (["sad and lonely", "miserable", "a chair", "kill"], 2),
    (["good", "good good", "very good indeed, excellent", "not good"], 2),
]
NEUTRAL = [[f"the {thing} number {i}" for thing in ("table", "chair", "door", "window")] for i in range(12)]


def comparison(i, texts, copies=1):
    """A hand-made comparison: query [i, i, PAD, PAD], response k = [k, i % 27, k, PAD, PAD] with the given texts."""
    return {"query_tokens": [i % 27, i % 27, PAD, PAD], "query_text": f"query {i}",
            "responses": [([k, i % 27, k, PAD, PAD], text) for k, text in enumerate(texts)], "copies": copies}


def make_store(path, groups):
    """A store with one round per group of text lists; returns (store, uids per round)."""
    store = LabelStore.create(path, META)
    rounds = []
    for g, group in enumerate(groups):
        round_id = store.add_round({"experiment": "test", "policy": "initial", "round": g})
        rounds.append(store.add_comparisons(round_id, [comparison(100 * g + i, texts, copies=1 + (i % 3 == 0))
                                                       for i, texts in enumerate(group)]))
    return store, rounds


ALL = [t for t, _ in POSITIVE] + NEUTRAL


def labels(store):
    return {c["uid"]: c["choices"] for c in store.labeled()}


def display_orders(store):
    rows = store._connection().execute("SELECT display_order FROM assignments ORDER BY comparison_id, id")
    return [r[0] for r in rows]


@pytest.fixture(scope="module")
def vader():
    pytest.importorskip("vaderSentiment")  # the test extra has it; only the VADER tests need it
    return VaderLabeler(seed=7)


def test_vader_picks_the_most_positive_text(tmp_path, vader):
    store, _ = make_store(tmp_path / "s.db", [[t for t, _ in POSITIVE]])
    assert isinstance(vader, Labeler)
    n = answer_open(store, vader, "vader", rng=random.Random(0))
    assert n == sum(1 for _ in store.answers()) == len(POSITIVE)  # one answer each: copies ask another labeler
    assert [c["choices"] for c in store.labeled()] == [[best] for _, best in POSITIVE]
    assert store.labeler_by_name("vader") is not None and store.labeler_by_name("nobody") is None
    for a in store.answers():  # answers went through display positions mapped back by the store
        assert a["name"] == "vader"
    assert answer_open(store, vader, "vader") == 0  # nothing left for it


def test_labels_do_not_depend_on_display_order_or_interruption(tmp_path, vader):
    scores = vader.scores("", NEUTRAL[0], [], [[0]] * N)
    assert len(set(scores.tolist())) == 1  # the neutral comparisons really are ties

    first, _ = make_store(tmp_path / "a.db", [ALL])
    second, _ = make_store(tmp_path / "b.db", [ALL])
    assert answer_open(first, vader, "vader", rng=random.Random(1)) == len(ALL)
    assert answer_open(second, vader, "vader", rng=random.Random(2)) == len(ALL)
    assert display_orders(first) != display_orders(second)  # the same comparisons shown in other orders
    reference = labels(first)
    assert labels(second) == reference

    # interrupted after 3 answers, then a lease taken and left open (killed between lease and answer), resumed
    third, _ = make_store(tmp_path / "c.db", [ALL])
    assert answer_open(third, vader, "vader", max_answers=3, rng=random.Random(3)) == 3
    me = third.labeler_by_name("vader")
    open_lease = third.next_assignment(me, rng=random.Random(4))
    assert answer_open(third, vader, "vader", max_answers=0) == 0
    assert answer_open(third, vader, "vader", rng=random.Random(5)) == len(ALL) - 3
    assert open_lease.comparison_uid in labels(third)
    assert labels(third) == reference

    # ties are broken at random (seeded per comparison), not by position or sample index
    ties = [reference[uid][0] for uid in reference if int(uid.split("-")[1]) >= len(POSITIVE)]
    assert len(set(ties)) > 1
    # the same seed gives the same labels in any answering order; the labeler's own calls agree with the store
    for c, uid in zip(ALL, reference):
        order = list(range(N))
        random.Random(uid).shuffle(order)
        position = vader.choose("", [c[i] for i in order], [], [[0]] * N, uid=uid, display_order=order)
        assert order[position] == reference[uid][0]
    other = VaderLabeler(seed=8)
    assert [other.choose("", t, [], [[0]] * N, uid=uid) for t, uid in zip(ALL, reference)] != \
        [reference[uid][0] for uid in reference]  # another seed breaks the ties otherwise


def test_comparisons_for_two_labelers_get_one_answer_from_each_name(tmp_path, vader):
    store, _ = make_store(tmp_path / "s.db", [ALL])
    assert answer_open(store, vader, "vader-a", rng=random.Random(0)) == len(ALL)
    doubled = sum(1 for i in range(len(ALL)) if i % 3 == 0)
    assert answer_open(store, VaderLabeler(seed=7), "vader-b", rng=random.Random(1)) == doubled  # same seed: agree
    assert store.progress()["answered"] == store.progress()["needed"]
    assert store.admin_stats()["agreement"] == {"pairs": doubled, "agree": doubled, "rate": 1.0}


def test_uids_restrict_answering_to_one_round(tmp_path, vader):
    store, (round1, round2) = make_store(tmp_path / "s.db", [NEUTRAL[:5], [t for t, _ in POSITIVE]])
    me = store.labeler_by_name("vader") or store.labeler_for_token(store.add_labeler("vader"))
    leftover = store.next_assignment(me, rng=random.Random(0))  # an open lease in round 1
    assert leftover.comparison_uid == round1[0]
    assert answer_open(store, vader, "vader", uids=round2, rng=random.Random(1)) == len(round2)
    assert sorted(labels(store)) == sorted(round2)
    assert store.next_assignment(me) == leftover  # the lease outside the round was left as it was
    assert answer_open(store, vader, "vader", uids=[], rng=random.Random(2)) == 0
    assert answer_open(store, vader, "vader", uids=round1[:2], max_answers=1) == 1
    assert sorted(labels(store)) == sorted(round2 + round1[:1])  # the open lease was answered first
    assert answer_open(store, vader, "vader", uids=set(round1)) == len(round1) - 1
    with pytest.raises(ValueError, match="not the string"):
        answer_open(store, vader, "vader", uids=round1[0])
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_answers"):
            answer_open(store, vader, "vader", max_answers=bad)
    with pytest.raises(StoreError, match="labeler name"):
        answer_open(store, vader, "bad name!")


def test_store_comparison_by_uid(tmp_path):
    store, (round1,) = make_store(tmp_path / "s.db", [NEUTRAL[:2]])
    c = store.comparison(round1[1])
    assert c == {"uid": round1[1], "query_tokens": [1, 1, PAD, PAD], "query_text": "query 1",
                 "responses": [([k, 1, k, PAD, PAD], NEUTRAL[1][k]) for k in range(N)]}
    with pytest.raises(StoreError, match="no comparison"):
        store.comparison("9-9")


def tiny_reward_model_dir(path, seed=0):
    """A train_reward-like run directory holding a tiny random reward model (test encoding); returns the model."""
    torch.manual_seed(seed)
    rm = RewardModel(GPT2(GPT2Config(n_vocab=27, n_ctx=16, n_embd=16, n_head=2, n_layer=2), ["reward"]),
                     padding_token=PAD)
    with torch.no_grad():
        rm.gain.fill_(1.5)
        rm.bias.fill_(-0.25)
    runs.save_reward_model(runs.RunDir(path), rm, params.get_hparams("train_reward", "test", {}), "test")
    return rm.eval()


def random_comparisons(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        query = rng.integers(0, 27, size=4).tolist()
        q_len = int(rng.integers(1, 5))
        query = query[:q_len] + [PAD] * (4 - q_len)  # right-padded, as the store keeps raw queries
        responses = []
        for k in range(N):
            r_len = int(rng.integers(1, 6))
            tokens = rng.integers(0, 27, size=r_len).tolist() + [PAD] * (5 - r_len)
            responses.append((tokens, f"response {k} of {i}"))
        out.append({"query_tokens": query, "query_text": f"query {i}", "responses": responses, "copies": 1})
    return out


def test_reward_model_labeler_agrees_with_the_argmax_of_its_scores(tmp_path):
    rm = tiny_reward_model_dir(tmp_path / "rm_run")
    comparisons = random_comparisons(12)
    store = LabelStore.create(tmp_path / "s.db", META)
    uids = store.add_comparisons(store.add_round({"experiment": "test"}), comparisons)
    labeler = parse_labeler(f"reward_model:{tmp_path / 'rm_run'}", seed=3)  # a run directory
    assert isinstance(labeler, RewardModelLabeler) and isinstance(labeler, Labeler)
    assert answer_open(store, labeler, "true-reward", rng=random.Random(0)) == len(uids)
    got = labels(store)
    expected = {}
    with torch.no_grad():
        for uid, c in zip(uids, comparisons):
            queries = torch.tensor([c["query_tokens"]] * N)
            responses = torch.tensor([tokens for tokens, _ in c["responses"]])
            scores = rm(queries, responses)
            assert len(set(scores.tolist())) == N  # no ties: the argmax is the label
            expected[uid] = [int(scores.argmax())]
    assert got == expected
    assert len({v[0] for v in got.values()}) > 1

    # the reward_model/ directory itself, another display-order draw: the same labels
    again = LabelStore.create(tmp_path / "t.db", META)
    again.add_comparisons(again.add_round({"experiment": "test"}), comparisons)
    answer_open(again, RewardModelLabeler(tmp_path / "rm_run" / "reward_model", "cpu", 3), "rm",
                rng=random.Random(1))
    assert labels(again) == expected

    other = LabelStore.create(tmp_path / "main.db", {**META, "encoding": "main", "n_vocab": 50257,
                                                     "padding_token": 50259})
    with pytest.raises(ValueError, match="label with a reward model of the store's experiment"):
        answer_open(other, labeler, "rm")
    assert other.labelers() == []  # refused before registering anything


def test_tie_rng_is_keyed_by_seed_and_uid():
    draw = lambda seed, uid: tie_rng(seed, uid).random(4).tolist()  # noqa: E731
    assert draw(0, "1-0") == draw(0, "1-0")
    assert draw(0, "1-0") != draw(0, "1-1") and draw(0, "1-0") != draw(1, "1-0")
    assert draw(-1, None) == draw(2**64 - 1, None)


def test_parse_labeler_vader(vader):
    assert isinstance(parse_labeler("vader", seed=2), VaderLabeler)


def test_parse_labeler(tmp_path):
    assert parse_labeler("people") is None
    assert check_labeler_spec(f"reward_model:{tmp_path}") == ("reward_model", str(tmp_path))
    for spec, match in (("Vader", "unknown labeler 'Vader': use 'vader', 'reward_model:<"),
                        ("", "unknown labeler ''"), ("vader:x", "unknown labeler"), (None, "is not a string"),
                        ("reward_model", "names no reward model: use 'reward_model:<dir>'"),
                        ("reward_model:", "names no directory"),
                        (f"reward_model:{tmp_path / 'missing'}", "is not a directory; pass a train_reward run"),
                        (f"reward_model:{tmp_path}", "holds no reward model")):
        with pytest.raises(ValueError, match=match) as e:
            parse_labeler(spec)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="seed must be an integer"):
        RewardModelLabeler(tmp_path, seed="1")
