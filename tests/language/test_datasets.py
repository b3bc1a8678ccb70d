"""Query construction, order, sharding and resume of QuerySampler; prepared token files (ORIGINAL §7.1, §11, §12)."""

import json
import random

import numpy as np
import pytest

from lm_human_preferences.language import datasets
from lm_human_preferences.language.datasets import QuerySampler, make_query, write_token_file
from lm_human_preferences.language.encodings import get_encoding

ENC = get_encoding("test")  # 'a'..'z' = 0..25, '.' = 26, pad = 27
PAD = ENC.padding_token
DOT = 26


def ids(text):
    return ENC.encode(text)


def prepare(tmp_path, texts, name="corpus", mode="train"):
    """Write texts as prepared token files (test encoding); returns the dataset path prefix."""
    prefix = tmp_path / name
    write_token_file(f"{prefix}_{mode}", (ids(t) for t in texts))
    return str(prefix)


def stream(sampler, n_batches):
    """The rows of the next n_batches batches, as decoded strings."""
    return [ENC.decode(row) for _ in range(n_batches) for row in sampler.next_batch()]


# --- make_query (§7.1 steps 2-5) ---------------------------------------------------------------------------

def test_start_token_absent_skips_the_document():
    assert make_query(ids("abcdef"), 4, start_token=DOT, end_token=None, padding_token=PAD) is None


def test_start_token_drops_through_its_first_occurrence():
    query = make_query(ids("ab.cd.ef"), 8, start_token=DOT, end_token=None, padding_token=PAD)
    assert query.tolist() == ids("cd.ef") + [PAD] * 3


def test_start_token_last_keeps_the_whole_document():
    query = make_query(ids("abc."), 6, start_token=DOT, end_token=None, padding_token=PAD)
    assert query.tolist() == ids("abc.") + [PAD, PAD]


def test_end_token_cuts_after_its_last_occurrence_within_the_window():
    # window after the start: "ab.c.de" (7 tokens); the '.' at "f." lies outside it
    query = make_query(ids("x.ab.c.def."), 7, start_token=DOT, end_token=DOT, padding_token=PAD)
    assert query.tolist() == ids("ab.c.") + [PAD, PAD]


def test_end_token_absent_in_window_skips_the_document():
    assert make_query(ids("abcde."), 3, start_token=None, end_token=DOT, padding_token=PAD) is None


def test_query_is_cut_and_right_padded_without_start_or_end():
    assert make_query(ids("abcdef"), 4, start_token=None, end_token=None, padding_token=PAD).tolist() == ids("abcd")
    query = make_query(ids("ab"), 4, start_token=None, end_token=None, padding_token=PAD)
    assert query.dtype == np.int64 and query.tolist() == ids("ab") + [PAD, PAD]


# --- prepared token files ------------------------------------------------------------------------------------

def test_token_file_round_trip_and_format(tmp_path):
    docs = [[1, 2, 3], [], [50256, 50259], [7]]
    n_docs, n_tokens = write_token_file(tmp_path / "x_train", docs)
    assert (n_docs, n_tokens) == (4, 6)
    assert np.fromfile(tmp_path / "x_train.idx", dtype="<i8").tolist() == [0, 3, 3, 5, 6]
    assert np.fromfile(tmp_path / "x_train.bin", dtype="<u2").tolist() == [1, 2, 3, 50256, 50259, 7]
    token_file = datasets.TokenFile(tmp_path / "x_train")
    assert [doc.tolist() for doc in token_file] == docs
    assert isinstance(token_file.tokens, np.memmap)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_train.bin", "x_train.idx"]  # no temp files left


def test_write_token_file_rejects_ids_beyond_uint16_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"document 1: token id 70000"):
        write_token_file(tmp_path / "x_train", [[1], [70000]])
    assert list(tmp_path.iterdir()) == []


def test_token_file_rejects_mismatched_pair(tmp_path):
    write_token_file(tmp_path / "x_train", [[1, 2, 3]])
    np.asarray([0, 2], dtype="<i8").tofile(tmp_path / "x_train.idx")
    with pytest.raises(ValueError, match="does not match"):
        datasets.TokenFile(tmp_path / "x_train")


def test_encode_texts_in_a_process_pool_matches_serial():
    texts = [f"Passage number {i}. It ends here." for i in range(9)]
    assert list(datasets.encode_texts(texts, workers=2, window=4)) == list(datasets.encode_texts(texts))


# --- QuerySampler: order, determinism, repeat -----------------------------------------------------------------

def test_order_is_python_random_shuffle_with_seed_0_and_repeats(tmp_path):
    texts = [c * 3 for c in "abcdefghijklm"]  # 13 distinct documents
    dataset = prepare(tmp_path, texts)
    sampler = QuerySampler(dataset, "train", ENC, 3, None, None, batch_size=13)
    perm = list(range(13))
    random.Random(0).shuffle(perm)
    expected = [texts[i] for i in perm]
    assert stream(sampler, 1) == expected
    assert stream(sampler, 1) == expected  # the second pass replays the same order
    assert datasets.shuffled_order(13).tolist() == perm


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_shuffled_order_equals_random_shuffle(n):
    perm = list(range(n))
    random.Random(0).shuffle(perm)
    assert datasets.shuffled_order(n).tolist() == perm


def test_sampler_is_deterministic_and_skips_invalid_documents(tmp_path):
    texts = ["ab.cd.ef", "nodot", "x.yy.z", "q.", "a.b"]
    dataset = prepare(tmp_path, texts)
    first = QuerySampler(dataset, "train", ENC, 4, ".", ".", batch_size=3)
    second = QuerySampler(dataset, "train", ENC, 4, ".", ".", batch_size=3)
    batches = [first.next_batch() for _ in range(3)]
    assert all(np.array_equal(a, second.next_batch()) for a in batches)
    assert batches[0].shape == (3, 4) and batches[0].dtype == np.int64
    kept = set(ENC.decode(row) for batch in batches for row in batch)
    # "nodot" lacks the start token; "a.b" has no end token after the start; "q." keeps all ("q." is last)
    assert kept == {"cd.", "yy.", "q."}


def test_zero_valid_queries_is_an_error(tmp_path):
    dataset = prepare(tmp_path, ["abc", "def"])
    sampler = QuerySampler(dataset, "train", ENC, 4, ".", None, batch_size=1)
    with pytest.raises(ValueError, match="no valid queries"):
        sampler.next_batch()


def test_file_with_ids_outside_the_encoding_is_rejected(tmp_path):
    write_token_file(tmp_path / "big_train", [[1, 2, 300]])
    sampler = QuerySampler(str(tmp_path / "big"), "train", ENC, 3, None, None, batch_size=1)
    with pytest.raises(ValueError, match="prepared with another encoding"):
        sampler.next_batch()


# --- sharding (§7.1 step 7, §11) ------------------------------------------------------------------------------

def _sharding_dataset(tmp_path):
    """21 kept queries and two documents without the start token."""
    return prepare(tmp_path, [f"{a}.{a}{b}." for a in "abcdefg" for b in "xyz"] + ["skipme", "alsono"])


def _rows(sampler, n_batches):
    """The next n_batches batches' rows, as lists of token ids."""
    return [row.tolist() for _ in range(n_batches) for row in sampler.next_batch()]


def _per_rank(sampler, n_batches):
    """The next n_batches batches split by rank: {rank: its rows in order} (a batch holds the ranks one after the
    other, batch_size rows each)."""
    out = {rank: [] for rank in sampler.ranks}
    for _ in range(n_batches):
        batch = sampler.next_batch()
        assert batch.shape == (len(sampler.ranks) * sampler.batch_size, sampler.query_length)
        for i, rank in enumerate(sampler.ranks):
            out[rank] += [row.tolist() for row in batch[i * sampler.batch_size:(i + 1) * sampler.batch_size]]
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_get_disjoint_complete_interleavings_of_the_single_rank_stream(tmp_path, world_size):
    dataset = _sharding_dataset(tmp_path)
    batch_size, n_batches = 4, 5
    total = n_batches * batch_size * world_size
    single = QuerySampler(dataset, "train", ENC, 3, ".", ".", batch_size=total)
    reference = [row.tolist() for row in single.next_batch()]
    for rank in range(world_size):
        sampler = QuerySampler(dataset, "train", ENC, 3, ".", ".", batch_size=batch_size, ranks=[rank],
                               world_size=world_size)
        assert _rows(sampler, n_batches) == reference[rank::world_size]  # kept query k goes to rank k % W


@pytest.mark.parametrize("ranks", [[1, 3], [0, 1, 2, 3], [2], [3, 0]])
def test_a_sampler_serving_several_ranks_gives_each_the_rows_of_its_own_sampler(tmp_path, ranks):
    """Serving virtual ranks [1, 3] of 4 (say) in one process gives each rank exactly the rows a sampler of that rank
    alone gives, batch after batch, and leaves the sampler in the same state as every single-rank sampler."""
    dataset = _sharding_dataset(tmp_path)
    kwargs = dict(batch_size=3, world_size=4)
    several = QuerySampler(dataset, "train", ENC, 3, ".", ".", ranks=ranks, **kwargs)
    singles = {rank: QuerySampler(dataset, "train", ENC, 3, ".", ".", ranks=[rank], **kwargs) for rank in range(4)}
    for _ in range(4):  # 4 batches of 12 kept queries: more than two passes over the 21
        got = _per_rank(several, 1)
        want = {rank: _rows(sampler, 1) for rank, sampler in singles.items()}
        assert got == {rank: want[rank] for rank in ranks}
        assert all(sampler.state_dict() == several.state_dict() for sampler in singles.values())


@pytest.mark.parametrize("resumed_ranks", [[2], [0, 1, 2, 3]])
def test_state_of_some_ranks_resumes_a_sampler_of_other_ranks(tmp_path, resumed_ranks):
    """A state saved by the process hosting ranks [0, 1] of 4 resumes one hosting [2] or all four (the run resumed
    on another number of processes): each rank's next rows are those its uninterrupted sampler gives."""
    dataset = _sharding_dataset(tmp_path)
    kwargs = dict(batch_size=2, world_size=4)
    saver = QuerySampler(dataset, "train", ENC, 3, ".", ".", ranks=[0, 1], **kwargs)
    uninterrupted = QuerySampler(dataset, "train", ENC, 3, ".", ".", ranks=resumed_ranks, **kwargs)
    for _ in range(5):  # 40 kept queries: past the end of the first pass
        saver.next_batch()
        uninterrupted.next_batch()
    state = json.loads(json.dumps(saver.state_dict()))
    assert "rank" not in state and "ranks" not in state
    resumed = QuerySampler(dataset, "train", ENC, 3, ".", ".", ranks=resumed_ranks, **kwargs)
    resumed.load_state_dict(state)
    assert _per_rank(resumed, 3) == _per_rank(uninterrupted, 3)


@pytest.mark.parametrize("ranks", [[2], [0, 2], [-1], [], [0, 0], [True], [0.0]])
def test_ranks_must_be_distinct_integers_below_world_size(tmp_path, ranks):
    dataset = prepare(tmp_path, ["a.b."])
    with pytest.raises(ValueError, match=r"ranks must be distinct integers in \[0, world_size=2\)"):
        QuerySampler(dataset, "train", ENC, 3, None, None, batch_size=1, ranks=ranks, world_size=2)


# --- resume ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_test_dataset", [False, True])
def test_state_dict_resume_gives_the_same_next_batch(tmp_path, use_test_dataset):
    if use_test_dataset:
        dataset = "test"
    else:
        dataset = prepare(tmp_path, [f"{c}.{c}{d}." for c in "abcdef" for d in "xy"] + ["none"])
    kwargs = dict(batch_size=3, ranks=[1], world_size=2)
    original = QuerySampler(dataset, "train", ENC, 3, ".", ".", **kwargs)
    for _ in range(7):  # more than one pass over the 13 documents
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))  # checkpoints store it as JSON
    resumed = QuerySampler(dataset, "train", ENC, 3, ".", ".", **kwargs)
    resumed.load_state_dict(state)
    for _ in range(3):
        np.testing.assert_array_equal(resumed.next_batch(), original.next_batch())


def test_resume_with_another_world_size_is_refused(tmp_path):
    dataset = prepare(tmp_path, ["a.b."])
    state = QuerySampler(dataset, "train", ENC, 3, None, None, batch_size=1, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        QuerySampler(dataset, "train", ENC, 3, None, None, batch_size=1).load_state_dict(state)


# --- the 'test' dataset (§12) ---------------------------------------------------------------------------------

def test_test_dataset_is_seeded_random_40_char_strings():
    sampler = QuerySampler("test", "train", ENC, 40, None, None, batch_size=5)
    rng = random.Random(0)
    expected = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz.") for _ in range(40)) for _ in range(10)]
    assert stream(sampler, 2) == expected


def test_test_dataset_with_start_token_as_in_the_original_smoke_tests():
    sampler = QuerySampler("test", "train", ENC, 2, ".", None, batch_size=8)
    batch = sampler.next_batch()
    assert batch.shape == (8, 2)
    assert ((batch >= 0) & (batch <= PAD)).all()


# --- names, modes and missing files ---------------------------------------------------------------------------

@pytest.mark.parametrize("dataset, mode, file_name, command", [
    ("books", "train", "books_train.bin", "python datasets/books.py --mode train"),
    ("cnndm", "valid", "cnndm_valid.bin", "python datasets/cnndm.py --mode valid"),
    ("tldr", "test", "tldr_valid.bin", "python datasets/tldr.py --mode valid"),
])
def test_missing_prepared_file_names_the_file_and_the_command(tmp_path, dataset, mode, file_name, command):
    with pytest.raises(FileNotFoundError) as info:
        QuerySampler(dataset, mode, ENC, 4, None, None, batch_size=1, data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / file_name) in message
    assert f"{command} --out {tmp_path}" in message


def test_missing_file_in_the_default_data_dir_names_the_plain_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LMHP_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"`python datasets/books\.py --mode test`"):
        QuerySampler("books", "test", ENC, 4, None, None, batch_size=1)


def test_named_dataset_reads_data_dir_and_unknown_names_and_modes_are_errors(tmp_path):
    write_token_file(tmp_path / "books_train", [ids("ab.cd.")])
    sampler = QuerySampler("books", "train", ENC, 4, ".", ".", batch_size=1, data_dir=tmp_path)
    assert ENC.decode(sampler.next_batch()[0]) == "cd."
    with pytest.raises(ValueError, match="unknown dataset 'novels'"):
        QuerySampler("novels", "train", ENC, 4, None, None, batch_size=1, data_dir=tmp_path)
    with pytest.raises(ValueError, match="has no mode 'valid'"):
        QuerySampler("books", "valid", ENC, 4, None, None, batch_size=1, data_dir=tmp_path)
