"""Exporting labels: `launch.py label export --store FILE --out labels.json`, a label file `train_reward` reads
unchanged (`--labels.source labels.json`).

The file is the original's JSON for the store's label type (`best_of_N`: a list of `{"query": [query_length ids],
"sample0".."sample<N-1>": [response_length ids], "best": 0..N-1}`): the raw right-padded query and the
post-processed responses, in sample order (the order the labeler saw them in is not kept: `best` is mapped back to
the sample index when the answer is stored).

One record per answer: a comparison answered by two labelers gives two records, each with its labeler's choice
(the same when they agreed), as the paper trained on every label it collected; disagreement is then noise the
reward model averages over. Records come in comparison order (rounds in collection order), a comparison's answers
in the order they were given, so the two answers of a comparison sit next to each other. `--min-answers 2` exports
only the comparisons answered twice.

The records are validated with the project's own loader (`language/labels.records_to_arrays`, against the store's
lengths, vocabulary and padding token) before the file is written, atomically.
"""
from __future__ import annotations

import json
from pathlib import Path

from lm_human_preferences import label_types
from lm_human_preferences.labeling.store import LabelStore
from lm_human_preferences.language.labels import records_to_arrays
from lm_human_preferences.utils.ckpt import InputError
from lm_human_preferences.utils.files import atomic_write_bytes, unwritable, writing


def export_records(store: LabelStore, *, min_answers: int = 1) -> tuple:
    """(records, comparisons): the label records of every comparison with at least `min_answers` answers, one
    record per answer, and those comparisons (store.labeled() entries)."""
    meta = store.meta()
    label_type = label_types.get_label_type(meta["label_type"])
    if not isinstance(label_type, label_types.PickBest):
        raise InputError(f"labeling store {store.path} holds {label_type.name} comparisons; only best_of_N can be "
                         f"exported")
    records = []
    comparisons = [c for c in store.labeled() if len(c["choices"]) >= min_answers]
    for comparison in comparisons:
        samples = {key: tokens for key, tokens in zip(label_type.response_keys, comparison["responses"])}
        for best in comparison["choices"]:
            records.append({"query": comparison["query"], **samples, "best": best})
    return records, comparisons


def check_records(records: list, meta: dict, source: str) -> None:
    """ValueError (naming the record and field) unless `records` load as labels of the store's label type."""
    records_to_arrays(records, meta["label_type"], query_length=meta["query_length"],
                      response_length=meta["response_length"], n_vocab=meta["n_vocab"],
                      padding_token=meta["padding_token"], source=source)


def suggested_num_train(records: int, batch_size: int) -> int:
    """The largest multiple of `batch_size` up to `records` (train_reward needs labels.num_train divisible by its
    batch size); 0 when there are fewer records than one batch."""
    return records // batch_size * batch_size


def export(store_path, out, *, min_answers: int = 1) -> dict:
    """Writes the store's answered comparisons to `out` as a label file; returns counts (records, comparisons,
    answered_twice, label_type). InputError, with nothing written, for a bad store or output path, a
    `min_answers` below 1, or no comparison answered often enough yet."""
    if isinstance(min_answers, bool) or not isinstance(min_answers, int) or min_answers < 1:
        raise InputError(f"--min-answers must be a positive integer, got {min_answers!r}")
    store_path, out = Path(store_path), Path(out)
    store = LabelStore(store_path)
    try:
        return _export(store, store_path, out, min_answers)
    finally:
        store.close()


def _export(store: LabelStore, store_path: Path, out: Path, min_answers: int) -> dict:
    if out.exists() and store_path.exists() and out.resolve() == store_path.resolve():
        raise InputError(f"--out {out} is the labeling store itself; pass another file for the labels")
    problem = unwritable(out, directory=False)
    if problem is not None:
        raise InputError(f"cannot write the labels to {out}: {problem}; pass --out with a file path in a writable "
                         f"directory")
    records, comparisons = export_records(store, min_answers=min_answers)
    progress = store.progress()
    if not records:
        raise InputError(f"labeling store {store_path} has no comparison with at least {min_answers} answer(s) yet "
                         f"({progress['answered']} answers in all): label some first (`launch.py label serve`)")
    meta = store.meta()
    try:
        check_records(records, meta, str(store_path))
    except ValueError as e:
        raise InputError(f"the labels of {store_path} do not load as {meta['label_type']} labels ({e}); the store "
                         f"was changed by hand or by another version") from e
    with writing(out):
        atomic_write_bytes(out, json.dumps(records).encode("utf-8"))
    return {"records": len(records), "comparisons": len(comparisons),
            "answered_twice": sum(len(c["choices"]) >= 2 for c in comparisons), "label_type": meta["label_type"],
            "experiment": meta.get("experiment")}
