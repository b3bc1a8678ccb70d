"""Human label files: where they are, loading and validation against their label type's schema (ORIGINAL §8).

A label file is a JSON list of records. For `best_of_4` a record is
`{"query": [query_length ids], "sample0".."sample3": [response_length ids], "best": 0..3}`; queries are raw
(right-padded with the pad id 50259, no prefix/suffix) and samples are post-processed responses. The first
`num_train` records train the reward model; the original discards the rest, here they are returned as a
held-out set. The source 'test' is the original's 50 all-zero records.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import reprlib

import numpy as np

from lm_human_preferences import label_types
from lm_human_preferences.utils.download import fetch

LABELS_BASE_URL = "https://openaipublic.blob.core.windows.net/lm-human-preferences/labels"
# '<task>/<file>' -> URL; num_train: 4,992 for the offline_5k files, 46,000 for online_45k (launch.py).
LABEL_URLS = {
    name: f"{LABELS_BASE_URL}/{name}.json"
    for name in (
        "sentiment/offline_5k",
        "descriptiveness/offline_5k",
        "cnndm/online_45k",
        "cnndm/offline_60k",
        "tldr/online_45k",
        "tldr/offline_60k",
    )
}
TEST_SOURCE = "test"
TEST_NUM_RECORDS = 50


def label_schema(label_type: str) -> dict[str, str]:
    """Field -> kind ('query', 'response', 'int' or 'float') of a record of `label_type`; ValueError if unknown."""
    return label_types.get_label_type(label_type).field_kinds()


def _token_lengths(query_length: int, response_length: int) -> dict[str, tuple[int, str]]:
    """kind -> (expected length, hparam name) for token fields."""
    return {"query": (query_length, "query_length"), "response": (response_length, "response_length")}


def zero_records(label_type: str, *, query_length: int, response_length: int) -> list[dict]:
    """The original's 'test' labels: 50 records of zeros matching the schema."""
    lengths = _token_lengths(query_length, response_length)
    record = {}
    for field, kind in label_schema(label_type).items():
        record[field] = [0] * lengths[kind][0] if kind in lengths else (0 if kind == "int" else 0.0)
    return [dict(record) for _ in range(TEST_NUM_RECORDS)]


def read_label_file(source: str | os.PathLike) -> list:
    """The parsed JSON of a label file (URL via the download cache, or local path)."""
    path = fetch(source)
    if path.is_dir():
        raise ValueError(f"label source {str(source)!r} is a directory: pass the label JSON file itself "
                         f"(--labels.source FILE)")
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except OSError as e:
        raise ValueError(f"label source {str(source)!r} ({path}) cannot be read ({e.strerror}): pass a readable "
                         f"label JSON file") from None
    except RecursionError:
        raise ValueError(f"label source {str(source)!r} ({path}) is nested too deeply to be label records: expected "
                         f"a JSON list of label records") from None
    except ValueError as e:  # bad JSON or UTF-8, or an integer too long to parse
        raise ValueError(f"label source {str(source)!r} ({path}) is not valid JSON ({e}): expected a JSON list of "
                         f"label records; if it was downloaded, the file may be truncated: delete it and retry") from None
    if not isinstance(records, list):
        raise ValueError(f"label source {str(source)!r} holds a JSON {type(records).__name__}, expected a JSON list "
                         f"of label records")
    return records


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_record(index: int, record, schema: dict[str, str], lengths: dict[str, tuple[int, str]],
                  num_responses: int, source: str) -> None:
    """ValueError naming the record index and field unless `record` matches the schema (ids checked later)."""
    where = f"label source {source!r}, record {index}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with fields {list(schema)}, got {type(record).__name__}")
    for field, kind in schema.items():
        if field not in record:
            raise ValueError(f"{where}: missing field {field!r} (fields of this label type: {list(schema)})")
        value = record[field]
        if kind in lengths:
            length, name = lengths[kind]
            if not isinstance(value, list):
                raise ValueError(f"{where}, field {field!r}: expected a list of {length} token ids, "
                                 f"got {type(value).__name__}")
            if len(value) != length:
                raise ValueError(f"{where}, field {field!r}: expected {length} token ids ({name}), got {len(value)}")
            if not set(map(type, value)) <= {int}:
                bad = next(v for v in value if type(v) is not int)
                raise ValueError(f"{where}, field {field!r}: token ids must be integers, got {reprlib.repr(bad)}")
        elif kind == "int":
            if not _is_int(value):
                raise ValueError(f"{where}, field {field!r}: expected an integer, got {reprlib.repr(value)}")
            if not 0 <= value < num_responses:  # an 'int' field is the index of a response
                raise ValueError(f"{where}, field {field!r}: {value} is out of range [0, {num_responses})")
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{where}, field {field!r}: expected a finite number, got {reprlib.repr(value)}")


def _token_array(records: list, field: str, length: int, *, n_vocab: int, padding_token: int,
                 source: str) -> np.ndarray:
    """int64 [n, length] of a token field; ValueError naming record and field for an id outside the vocabulary."""
    try:
        values = np.array([record[field] for record in records], dtype=np.int64).reshape(len(records), length)
    except OverflowError:  # an id too large for int64: find it row by row (it is out of range too)
        values = np.zeros((len(records), length), dtype=np.int64)
        for i, record in enumerate(records):
            try:
                values[i] = record[field]
            except OverflowError:
                values[i] = [v if -2**63 <= v < 2**63 else -1 for v in record[field]]
    bad = ~(((values >= 0) & (values < n_vocab)) | (values == padding_token))
    if bad.any():
        i, j = (int(x) for x in np.argwhere(bad)[0])
        raw = records[i][field][j]
        raise ValueError(f"label source {source!r}, record {i}, field {field!r}: token id {raw} at position {j} is "
                         f"outside the vocabulary [0, {n_vocab}) and is not the padding token {padding_token}")
    return values


def records_to_arrays(records: list, label_type: str, *, query_length: int, response_length: int, n_vocab: int,
                      padding_token: int, source: str = "<records>") -> dict[str, np.ndarray]:
    """Validate label records and stack them: token fields int64 [n, len], 'int' int64 [n], 'float' float32 [n]."""
    schema = label_schema(label_type)
    lengths = _token_lengths(query_length, response_length)
    num_responses = label_types.get_label_type(label_type).num_responses
    for index, record in enumerate(records):
        _check_record(index, record, schema, lengths, num_responses, source)
    arrays = {}
    for field, kind in schema.items():
        if kind in lengths:
            arrays[field] = _token_array(records, field, lengths[kind][0], n_vocab=n_vocab,
                                         padding_token=padding_token, source=source)
        elif kind == "int":
            arrays[field] = np.array([r[field] for r in records], dtype=np.int64).reshape(len(records))
        else:
            arrays[field] = np.array([r[field] for r in records], dtype=np.float32).reshape(len(records))
    return arrays


def load_labels(source: str | os.PathLike, label_type: str, *, query_length: int, response_length: int,
                n_vocab: int, padding_token: int, num_train: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(train, heldout) label arrays from a URL, a local JSON file or 'test' (ORIGINAL §8.1).

    Every record is validated against `label_type`'s schema. train = the first num_train records, heldout = the
    rest. Each is a dict field -> array: token fields int64 [n, len], `best` int64 [n], scores float32 [n].
    """
    label_schema(label_type)  # an unknown type fails before any download
    for name, value in (("query_length", query_length), ("response_length", response_length),
                        ("num_train", num_train)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    source = os.fspath(source)
    if source == TEST_SOURCE:
        records = zero_records(label_type, query_length=query_length, response_length=response_length)
    else:
        records = read_label_file(source)
        print("Num labels found in source:", len(records))
    if len(records) < num_train:
        raise ValueError(f"label source {source!r} has {len(records)} records, fewer than num_train={num_train}: "
                         f"lower labels.num_train to at most {len(records)} or use a larger label file")
    arrays = records_to_arrays(records, label_type, query_length=query_length, response_length=response_length,
                               n_vocab=n_vocab, padding_token=padding_token, source=source)
    train = {field: values[:num_train] for field, values in arrays.items()}
    heldout = {field: values[num_train:] for field, values in arrays.items()}
    return train, heldout
