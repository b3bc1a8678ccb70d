"""The labeling store alone (labeling/store.py): leases and their expiry (a fake clock), answers mapped back to
sample indices, skip, undo, comparisons asked of two labelers, admin statistics on a hand-built case, reopening the
file, and concurrent labelers (threads) never getting a comparison beyond its copies."""
import random
import sqlite3
import threading

import pytest

from lm_human_preferences.labeling.store import LabelStore, StoreError, UnknownAssignment

N = 4  # responses per comparison (best_of_4)
META = {"label_type": "best_of_4", "num_responses": N, "experiment": "test", "query_length": 2,
        "response_length": 3, "encoding": "test", "n_vocab": 27, "padding_token": 27}


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def comparison(i, copies=1):
    """Comparison i: query [i, i], response k = [i, k, k] with text 'c<i>r<k>'."""
    return {"query_tokens": [i, i], "query_text": f"query {i}",
            "responses": [([i, k, k], f"c{i}r{k}") for k in range(N)], "copies": copies}


def make_store(path, copies=(1, 1, 1), clock=None):
    store = LabelStore.create(path, META, clock=clock or Clock())
    round_id = store.add_round({"experiment": "test", "policy": "initial"})
    store.add_comparisons(round_id, [comparison(i, c) for i, c in enumerate(copies)])
    return store


def labelers(store, *names):
    tokens = [store.add_labeler(name) for name in names]
    return [store.labeler_for_token(t) for t in tokens]


def test_assignments_differ_between_labelers_and_a_lease_is_kept(tmp_path):
    store = make_store(tmp_path / "s.db")
    alice, bob = labelers(store, "alice", "bob")
    a, b = store.next_assignment(alice), store.next_assignment(bob)
    assert (a.comparison_uid, b.comparison_uid) == ("1-0", "1-1")
    assert store.next_assignment(alice) == a  # asking again returns the open lease, not a new comparison
    assert a.query_text == "query 0"
    assert sorted(a.display_order) == list(range(N))
    assert a.responses == tuple(f"c0r{k}" for k in a.display_order)  # texts in display order


def test_answer_maps_the_display_position_back_to_the_sample(tmp_path):
    store = make_store(tmp_path / "s.db")
    alice, = labelers(store, "alice")
    orders = set()
    for _ in range(3):
        a = store.next_assignment(alice, rng=random.Random(len(orders)))
        position = 2
        assert store.answer(alice, a.id, position) == a.display_order[position]
        orders.add(a.display_order)
    answers = store.answers()
    assert [x["choice_position"] for x in answers] == [2, 2, 2]
    assert len(orders) > 1  # a fresh random order per assignment
    assert [x["uid"] for x in store.labeled()] == ["1-0", "1-1", "1-2"]
    assert store.next_assignment(alice) is None  # everything answered


@pytest.mark.parametrize("position", [-1, N, True, "1", 1.0, None])
def test_bad_positions_are_refused_and_nothing_is_recorded(tmp_path, position):
    store = make_store(tmp_path / "s.db")
    alice, = labelers(store, "alice")
    a = store.next_assignment(alice)
    with pytest.raises(StoreError, match="is not a position"):
        store.answer(alice, a.id, position)
    assert store.answers() == []
    assert store.next_assignment(alice) == a  # still leased to alice


def test_foreign_unknown_and_closed_assignments_are_refused(tmp_path):
    store = make_store(tmp_path / "s.db")
    alice, bob = labelers(store, "alice", "bob")
    a = store.next_assignment(alice)
    with pytest.raises(UnknownAssignment):
        store.answer(bob, a.id, 0)  # not bob's
    with pytest.raises(UnknownAssignment):
        store.skip(bob, a.id)
    with pytest.raises(UnknownAssignment):
        store.answer(alice, 999, 0)
    store.answer(alice, a.id, 1)
    with pytest.raises(StoreError, match="answered, not open"):
        store.answer(alice, a.id, 0)  # answered once only
    assert len(store.answers()) == 1


def test_an_expired_lease_goes_to_the_next_labeler(tmp_path):
    clock = Clock()
    store = make_store(tmp_path / "s.db", copies=(1, 1), clock=clock)
    alice, bob, carol = labelers(store, "alice", "bob", "carol")
    a = store.next_assignment(alice, lease_seconds=60)
    b = store.next_assignment(bob, lease_seconds=60)
    assert (a.comparison_uid, b.comparison_uid) == ("1-0", "1-1")
    assert a.expires_at == clock.now + 60
    assert store.next_assignment(carol, lease_seconds=60) is None  # both comparisons leased
    clock.advance(59.9)
    assert store.next_assignment(carol, lease_seconds=60) is None  # not yet expired
    clock.advance(0.1)
    store.answer(bob, b.id, 0)  # at the end of bob's lease, before anyone took his comparison: it counts
    c = store.next_assignment(carol, lease_seconds=60)
    assert c.comparison_uid == "1-0"  # alice's expired lease, freed
    with pytest.raises(StoreError, match="expired"):
        store.answer(alice, a.id, 0)  # alice's page was abandoned: her late answer does not count
    store.answer(carol, c.id, 3)
    assert [(x["uid"], x["name"]) for x in store.answers()] == [("1-1", "bob"), ("1-0", "carol")]
    assert store.next_assignment(alice) is None


def test_a_late_answer_is_refused_once_the_lease_expired(tmp_path):
    clock = Clock()
    store = make_store(tmp_path / "s.db", copies=(1,), clock=clock)
    alice, bob = labelers(store, "alice", "bob")
    a = store.next_assignment(alice, lease_seconds=10)
    clock.advance(11)
    store.next_assignment(bob, lease_seconds=10)  # expiry happens when someone asks
    with pytest.raises(StoreError, match="expired"):
        store.answer(alice, a.id, 0)
    assert store.answers() == []


def test_skip_gives_the_comparison_to_someone_else_only(tmp_path):
    store = make_store(tmp_path / "s.db", copies=(1, 1))
    alice, bob = labelers(store, "alice", "bob")
    a = store.next_assignment(alice)
    store.skip(alice, a.id)
    a2 = store.next_assignment(alice)
    assert a2.comparison_uid == "1-1"
    store.answer(alice, a2.id, 0)
    assert store.next_assignment(alice) is None  # the skipped one does not come back to alice
    b = store.next_assignment(bob)
    assert b.comparison_uid == "1-0"
    store.answer(bob, b.id, 0)
    assert store.progress() == {"needed": 2, "answered": 2, "comparisons": 2}


def test_undo_reopens_the_last_answer_with_its_display_order(tmp_path):
    clock = Clock()
    store = make_store(tmp_path / "s.db", clock=clock)
    alice, bob = labelers(store, "alice", "bob")
    assert store.undo(alice) is None  # nothing to undo
    a = store.next_assignment(alice)
    store.answer(alice, a.id, 1)
    clock.advance(1)
    nxt = store.next_assignment(alice)  # alice moves on to comparison 1-1
    assert nxt.comparison_uid == "1-1"
    back = store.undo(alice)
    assert (back.id, back.comparison_uid, back.display_order) == (a.id, "1-0", a.display_order)
    assert store.answers() == []
    assert store.next_assignment(alice) == back  # the undone comparison is alice's open lease again
    assert store.next_assignment(bob).comparison_uid == "1-1"  # alice's other lease was released
    assert store.answer(alice, back.id, 3) == a.display_order[3]  # the new answer replaces the old one
    assert [(x["uid"], x["choice_position"]) for x in store.answers()] == [("1-0", 3)]


def test_undo_takes_back_a_skip_and_only_the_last_action(tmp_path):
    clock = Clock()
    store = make_store(tmp_path / "s.db", clock=clock)
    alice, = labelers(store, "alice")
    first = store.next_assignment(alice)
    store.answer(alice, first.id, 0)
    clock.advance(1)
    second = store.next_assignment(alice)
    store.skip(alice, second.id)
    assert store.undo(alice).id == second.id  # the skip, not the earlier answer
    assert [x["uid"] for x in store.answers()] == ["1-0"]
    store.answer(alice, second.id, 2)
    clock.advance(1)
    assert store.undo(alice).id == second.id
    assert store.undo(alice).id == first.id  # undo again: the answer before it
    assert store.answers() == []


def test_two_copies_go_to_two_different_labelers_never_twice_to_one(tmp_path):
    store = make_store(tmp_path / "s.db", copies=(2,))
    alice, bob, carol = labelers(store, "alice", "bob", "carol")
    a = store.next_assignment(alice)
    b = store.next_assignment(bob)  # the second copy, while alice still holds hers
    assert a.comparison_uid == b.comparison_uid == "1-0" and a.id != b.id
    assert store.next_assignment(carol) is None  # both copies taken
    store.answer(alice, a.id, 0)
    assert store.next_assignment(alice) is None  # never the same comparison twice to one labeler
    store.answer(bob, b.id, 0)
    assert store.next_assignment(carol) is None
    assert [c["choices"] for c in store.labeled()] == [[a.display_order[0], b.display_order[0]]]


def test_a_labeler_who_skipped_a_double_comparison_does_not_take_its_second_copy(tmp_path):
    store = make_store(tmp_path / "s.db", copies=(2,))
    alice, bob, carol = labelers(store, "alice", "bob", "carol")
    a = store.next_assignment(alice)
    store.skip(alice, a.id)
    assert store.next_assignment(alice) is None
    for labeler in (bob, carol):
        store.answer(labeler, store.next_assignment(labeler).id, 0)
    assert sorted(x["name"] for x in store.answers()) == ["bob", "carol"]


def test_admin_stats_on_a_hand_built_case(tmp_path):
    clock = Clock()
    store = make_store(tmp_path / "s.db", copies=(2, 2, 1))
    store._clock = clock
    alice, bob = labelers(store, "alice", "bob")
    plan = [  # (labeler, seconds to answer, position chosen, sample wanted from the second labeler)
        (alice, 4.0, 0), (alice, 6.0, 1), (alice, 20.0, 0),  # comparisons 1-0, 1-1, 1-2
        (bob, 3.0, None), (bob, 5.0, None),  # 1-0 (bob picks alice's sample: agree), 1-1 (another: disagree)
    ]
    chosen = {}
    for labeler, seconds, position in plan:
        a = store.next_assignment(labeler)
        clock.advance(seconds)
        if position is None:  # bob: agree on 1-0, disagree on 1-1
            want = chosen[a.comparison_uid]
            if a.comparison_uid == "1-1":
                want = (want + 1) % N
            position = a.display_order.index(want)
        sample = store.answer(labeler, a.id, position)
        chosen.setdefault(a.comparison_uid, sample)
    stats = store.admin_stats()
    assert stats["progress"] == {"needed": 5, "answered": 5, "comparisons": 3}
    assert stats["labelers"] == {"alice": {"answers": 3, "median_seconds": 6.0},
                                 "bob": {"answers": 2, "median_seconds": 4.0}}
    positions = [x["choice_position"] for x in store.answers()]
    wins = [positions.count(p) for p in range(N)]
    assert stats["position_wins"] == wins and sum(wins) == 5
    assert stats["position_win_rate"] == [w / 5 for w in wins]
    assert stats["agreement"] == {"pairs": 2, "agree": 1, "rate": 0.5}


def test_admin_stats_of_an_empty_store(tmp_path):
    stats = make_store(tmp_path / "s.db").admin_stats()
    assert stats["position_wins"] == [0] * N and stats["position_win_rate"] == [None] * N
    assert stats["agreement"] == {"pairs": 0, "agree": 0, "rate": None} and stats["labelers"] == {}


def test_progress_per_labeler_counts_and_rate(tmp_path):
    clock = Clock()
    store = make_store(tmp_path / "s.db", clock=clock)
    alice, = labelers(store, "alice")
    for _ in range(3):
        a = store.next_assignment(alice)
        clock.advance(30)
        store.answer(alice, a.id, 0)
    p = store.progress(alice)
    assert (p["mine"], p["answered"], p["needed"]) == (3, 3, 3)
    assert p["per_hour"] == pytest.approx(2 / 60 * 3600)  # 3 answers 60 s apart end to end: 2 intervals


def test_everything_survives_closing_and_reopening(tmp_path):
    path, clock = tmp_path / "s.db", Clock()
    store = make_store(path, clock=clock)
    token = store.add_labeler("alice")
    admin = store.add_admin_token()
    alice = store.labeler_for_token(token)
    a = store.next_assignment(alice)
    store.answer(alice, a.id, 2)
    held = store.next_assignment(alice)
    store.close()

    again = LabelStore(path, clock=clock)
    assert again.meta()["label_type"] == "best_of_4" and again.meta()["schema_version"] == 1
    assert again.labeler_for_token(token) == alice
    assert again.is_admin_token(admin) and not again.is_admin_token(token)
    assert again.next_assignment(alice) == held  # the open lease is still alice's
    assert [(x["uid"], x["choice_sample"]) for x in again.answers()] == [("1-0", a.display_order[2])]
    assert again.rounds()[0]["source"] == {"experiment": "test", "policy": "initial"}
    assert again.rounds()[0]["comparisons"] == 3
    assert again.labeled()[0]["responses"] == [[0, k, k] for k in range(N)]
    assert again.labeled()[0]["query"] == [0, 0]


def test_tokens_names_and_files(tmp_path):
    store = make_store(tmp_path / "s.db")
    token = store.add_labeler("a-b_c.1")
    assert store.labeler_for_token(token).name == "a-b_c.1"
    for bad in ("", "a b", "x" * 65, "a/b", "<script>"):
        with pytest.raises(StoreError, match="labeler name"):
            store.add_labeler(bad)
    with pytest.raises(StoreError, match="already exists"):
        store.add_labeler("a-b_c.1")
    assert store.labeler_for_token(token + "x") is None and store.labeler_for_token("") is None
    assert store.labeler_for_token("x" * 1000) is None
    assert token not in (tmp_path / "s.db").read_bytes().decode("latin-1")  # only its hash is stored
    with pytest.raises(StoreError, match="already exists"):
        LabelStore.create(tmp_path / "s.db", META)
    with pytest.raises(StoreError, match="does not exist"):
        LabelStore(tmp_path / "missing.db")
    (tmp_path / "notes.txt").write_text("not a database " * 100)
    with pytest.raises(StoreError, match="is not a labeling store"):
        LabelStore(tmp_path / "notes.txt")
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(StoreError, match="is not a labeling store"):
        LabelStore(tmp_path / "other.db")
    with pytest.raises(StoreError, match="needs 4 responses"):
        store.add_comparisons(1, [{**comparison(9), "responses": comparison(9)["responses"][:3]}])
    assert store.progress()["comparisons"] == 3  # the refused batch added nothing


def test_concurrent_labelers_never_exceed_a_comparisons_copies(tmp_path):
    copies = [2 if i % 3 == 0 else 1 for i in range(40)]
    store = make_store(tmp_path / "s.db", copies=copies)
    people = labelers(store, *[f"l{i}" for i in range(8)])
    errors = []
    start = threading.Barrier(len(people))

    def work(labeler):
        try:
            start.wait()
            while True:
                a = store.next_assignment(labeler, rng=random.Random(labeler.id))
                if a is None:
                    return
                store.answer(labeler, a.id, a.id % N)
        except Exception as e:  # reported below: a thread's exception would otherwise be lost
            errors.append(e)
        finally:
            store.close()

    threads = [threading.Thread(target=work, args=(p,)) for p in people]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and errors == []
    answers = store.answers()
    per_comparison = {}
    for x in answers:
        per_comparison.setdefault(x["uid"], []).append(x["name"])
    assert len(answers) == sum(copies)
    for i, n in enumerate(copies):
        names = per_comparison[f"1-{i}"]
        assert len(names) == n and len(set(names)) == n  # its copies, each by another labeler
    assert len({x["name"] for x in answers}) > 1  # the work was shared
