"""Label files: schemas, validation of malformed files, held-out split, 'test' and URL sources (ORIGINAL §8)."""

import copy
import importlib.util
import json
import pathlib

import numpy as np
import pytest

from lm_human_preferences.language import labels
from lm_human_preferences.language.labels import LABEL_URLS, label_schema, load_labels

REPO = pathlib.Path(__file__).resolve().parents[2]
QLEN, RLEN, N_VOCAB, PAD = 5, 3, 50257, 50259
SIZES = dict(query_length=QLEN, response_length=RLEN, n_vocab=N_VOCAB, padding_token=PAD)


def load_local_http():
    spec = importlib.util.spec_from_file_location("lmhp_test_local_http", REPO / "tests" / "fixtures" / "local_http.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def best_of_4_records(n):
    """n valid best_of_4 records: raw queries right-padded with 50259, post-processed samples."""
    return [{"query": [100 + i, 13, 50256, PAD, PAD],
             **{f"sample{j}": [j, 13, PAD] for j in range(4)},
             "best": i % 4}
            for i in range(n)]


def write(tmp_path, records, name="labels.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path)


def test_label_schemas():
    assert label_schema("best_of_4") == {"query": "query", "sample0": "response", "sample1": "response",
                                         "sample2": "response", "sample3": "response", "best": "int"}
    assert label_schema("best_of_2") == {"query": "query", "sample0": "response", "sample1": "response",
                                         "best": "int"}
    assert label_schema("scalar_rating") == {"query": "query", "sample": "response", "score": "float"}
    assert label_schema("scalar_compare") == {"query": "query", "sample0": "response", "sample1": "response",
                                              "difference": "float"}
    for bad in ("best_of_x", "best_of_0", "best_of_1", "pairwise"):
        with pytest.raises(ValueError, match="valid types are best_of_N.*scalar_rating, scalar_compare"):
            label_schema(bad)


def test_label_urls_are_the_originals():
    base = "https://openaipublic.blob.core.windows.net/lm-human-preferences/labels"
    assert LABEL_URLS["sentiment/offline_5k"] == f"{base}/sentiment/offline_5k.json"
    assert LABEL_URLS["descriptiveness/offline_5k"] == f"{base}/descriptiveness/offline_5k.json"
    assert LABEL_URLS["cnndm/online_45k"] == f"{base}/cnndm/online_45k.json"
    assert LABEL_URLS["tldr/offline_60k"] == f"{base}/tldr/offline_60k.json"
    assert len(LABEL_URLS) == 6


def test_valid_file_splits_into_train_and_heldout(tmp_path, capsys):
    records = best_of_4_records(10)
    train, heldout = load_labels(write(tmp_path, records), "best_of_4", num_train=6, **SIZES)
    assert "Num labels found in source: 10" in capsys.readouterr().out
    assert set(train) == set(label_schema("best_of_4"))
    assert train["query"].shape == (6, QLEN) and train["query"].dtype == np.int64
    assert train["sample3"].shape == (6, RLEN) and heldout["sample3"].shape == (4, RLEN)
    assert train["best"].dtype == np.int64 and train["best"].tolist() == [0, 1, 2, 3, 0, 1]
    assert heldout["query"][:, 0].tolist() == [106, 107, 108, 109]  # the records after num_train, in order
    assert train["query"][0].tolist() == [100, 13, 50256, PAD, PAD]


def test_scalar_types_load_floats(tmp_path):
    rating = [{"query": [1] * QLEN, "sample": [2] * RLEN, "score": s} for s in (1, 2.5, -3)]
    train, heldout = load_labels(write(tmp_path, rating), "scalar_rating", num_train=3, **SIZES)
    assert train["score"].dtype == np.float32 and train["score"].tolist() == [1.0, 2.5, -3.0]
    assert heldout["score"].shape == (0,) and heldout["sample"].shape == (0, RLEN)
    compare = [{"query": [1] * QLEN, "sample0": [2] * RLEN, "sample1": [3] * RLEN, "difference": 0.5}]
    train, _ = load_labels(write(tmp_path, compare), "scalar_compare", num_train=1, **SIZES)
    assert train["difference"].tolist() == [0.5]


def corrupt(records, index, field, value):
    records = copy.deepcopy(records)
    if value is KeyError:
        del records[index][field]
    else:
        records[index][field] = value
    return records


@pytest.mark.parametrize("label_type, records, message", [
    ("best_of_4", {"not": "a list"}, r"holds a JSON dict, expected a JSON list"),
    ("best_of_4", best_of_4_records(4)[:2] + [[1, 2, 3]] + best_of_4_records(1),
     r"record 2: expected a JSON object"),
    ("best_of_4", corrupt(best_of_4_records(5), 3, "best", KeyError), r"record 3: missing field 'best'"),
    ("best_of_4", corrupt(best_of_4_records(5), 1, "query", [1, 2, 3]),
     r"record 1, field 'query': expected 5 token ids \(query_length\), got 3"),
    ("best_of_4", corrupt(best_of_4_records(5), 4, "sample2", [1, 2]),
     r"record 4, field 'sample2': expected 3 token ids \(response_length\), got 2"),
    ("best_of_4", corrupt(best_of_4_records(5), 2, "sample1", [1, 50257, 2]),
     r"record 2, field 'sample1': token id 50257 at position 1 is outside the vocabulary"),
    ("best_of_4", corrupt(best_of_4_records(5), 2, "query", [1, 2, -1, 3, 4]),
     r"record 2, field 'query': token id -1 at position 2"),
    ("best_of_4", corrupt(best_of_4_records(5), 0, "sample0", [1, 2.5, 3]),
     r"record 0, field 'sample0': token ids must be integers, got 2.5"),
    ("best_of_4", corrupt(best_of_4_records(5), 3, "best", 4), r"record 3, field 'best': 4 is out of range \[0, 4\)"),
    ("best_of_4", corrupt(best_of_4_records(5), 3, "best", 1.0), r"record 3, field 'best': expected an integer"),
    ("scalar_rating", [{"query": [1] * QLEN, "sample": [2] * RLEN, "score": "high"}] * 5,
     r"record 0, field 'score': expected a finite number, got 'high'"),
])
def test_malformed_files_are_rejected_naming_record_and_field(tmp_path, label_type, records, message):
    with pytest.raises(ValueError, match=message):
        load_labels(write(tmp_path, records), label_type, num_train=2, **SIZES)


def test_fewer_records_than_num_train_names_both_counts(tmp_path):
    with pytest.raises(ValueError, match=r"has 5 records, fewer than num_train=8"):
        load_labels(write(tmp_path, best_of_4_records(5)), "best_of_4", num_train=8, **SIZES)


def test_truncated_json_is_rejected(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(best_of_4_records(3))[:-7])
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_labels(str(path), "best_of_4", num_train=1, **SIZES)


def test_test_source_is_50_zero_records():
    train, heldout = load_labels("test", "best_of_4", num_train=16, query_length=2, response_length=3, n_vocab=27,
                                 padding_token=27)
    assert train["query"].shape == (16, 2) and heldout["query"].shape == (34, 2)
    assert all(not values.any() for values in (*train.values(), *heldout.values()))
    train, _ = load_labels("test", "scalar_compare", num_train=50, query_length=2, response_length=3, n_vocab=27,
                           padding_token=27)
    assert train["difference"].dtype == np.float32 and train["sample1"].shape == (50, 3)
    with pytest.raises(ValueError, match="has 50 records, fewer than num_train=51"):
        load_labels("test", "best_of_4", num_train=51, query_length=2, response_length=3, n_vocab=27, padding_token=27)


def test_url_source_is_downloaded_through_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with load_local_http().LocalServer() as server:
        url = server.add("/lm-human-preferences/labels/sentiment/offline_5k.json", json.dumps(best_of_4_records(7)))
        train, heldout = load_labels(url, "best_of_4", num_train=4, **SIZES)
        again, _ = load_labels(url, "best_of_4", num_train=4, **SIZES)
        assert server.count("/lm-human-preferences/labels/sentiment/offline_5k.json") == 1  # cached
    assert train["query"][:, 0].tolist() == [100, 101, 102, 103] and heldout["best"].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(again["sample0"], train["sample0"])


def test_bad_sizes_are_errors(tmp_path):
    with pytest.raises(ValueError, match="num_train must be a positive integer"):
        load_labels("test", "best_of_4", num_train=0, **SIZES)
    assert labels.zero_records("best_of_2", query_length=2, response_length=1)[0] == {
        "query": [0, 0], "sample0": [0], "sample1": [0], "best": 0}


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '[{"query": ' + "[" * 100_000 + "]" * 100_000 + "}]"])
def test_deeply_nested_json_is_one_error(tmp_path, text):
    path = tmp_path / "labels.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"label source '{path}' .* is nested too deeply to be label records"):
        load_labels(str(path), "best_of_4", num_train=1, **SIZES)


def test_nested_values_in_records_are_shown_short(tmp_path):
    deep = [1]
    for _ in range(500):
        deep = [deep]
    records = best_of_4_records(2)
    records[1]["sample2"] = [deep, 13, PAD]
    with pytest.raises(ValueError, match=r"record 1, field 'sample2': token ids must be integers, got \[\[\[") as e:
        load_labels(write(tmp_path, records), "best_of_4", num_train=1, **SIZES)
    assert len(str(e.value)) < 200


def test_a_directory_is_not_a_label_source(tmp_path):
    with pytest.raises(ValueError, match=f"label source '{tmp_path}' is a directory: pass the label JSON file itself"):
        load_labels(str(tmp_path), "best_of_4", num_train=1, **SIZES)
