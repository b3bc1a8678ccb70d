"""The demo's corpus: Debian's `fortunes` (quotations, jokes and aphorisms; about 15,000 entries, 2.5 MB of English).

It installs offline from Debian's archive (`apt-get install fortunes`) and the project ships no third-party text.
Each fortune file holds entries separated by lines that contain only '%'. An entry is cleaned (terminal
overstrike sequences removed, whitespace collapsed to single spaces) and the entries are split, in a fixed
shuffled order, into three disjoint parts written as prepared token files (`language/datasets.py` format):

* `lm_train`: text the small GPT-2 is pretrained on;
* `queries_train`: documents the task's queries come from for labels, reward normalization and PPO;
* `queries_test`: held-out documents for the evaluation queries.

The task reads the last two through `QuerySampler` with the path prefix `<dir>/queries` (modes train / test).
`check_corpus` tells, before any stage runs, whether a corpus is large enough for that.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

from lm_human_preferences.language.datasets import make_query, token_file_paths, write_token_file
from lm_human_preferences.language.encodings import get_encoding

FORTUNES_DIR = Path("/usr/share/games/fortunes")  # where Debian's `fortunes` package installs its files
INSTALL_COMMAND = "sudo apt-get install fortunes"
EXCLUDED_FILES = ("ascii-art",)  # pictures drawn with characters, not prose
SPLIT_SEED = 0
# Fractions of the shuffled entries: pretraining text, training queries; the rest are held-out queries.
SPLIT_FRACTIONS = {"lm_train": 0.7, "queries_train": 0.2}
SPLIT_NAMES = ("lm_train", "queries_train", "queries_test")
QUERY_PREFIX = "queries"  # QuerySampler dataset: <dir>/queries, modes 'train' and 'test'
_OVERSTRIKE = re.compile(r".\x08")  # 'c' BACKSPACE: old terminals' bold/underline
_SEPARATOR = re.compile(r"^%[ \t]*$", flags=re.MULTILINE)


class CorpusMissingError(FileNotFoundError):
    """Debian's fortunes corpus is not installed (or the given directory holds no fortune files)."""


class CorpusError(ValueError):
    """Fortune files that cannot make the demo: no entries, or too few for its splits, windows and queries."""


def missing_corpus_message(directory: Path) -> str:
    """What to do when `directory` holds no fortune files."""
    return (f"the demo's corpus, Debian's `fortunes`, is not installed: {directory} holds no fortune files. Install "
            f"it with `{INSTALL_COMMAND}` (or `make corpus`), or pass --corpus_dir DIR with files of '%'-separated "
            f"entries")


def fortune_files(directory: Path) -> list[Path]:
    """The fortune text files of `directory` in name order (skips `.dat` indexes, `.u8` links and ascii-art)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CorpusMissingError(missing_corpus_message(directory))
    files = [p for p in sorted(directory.iterdir())
             if p.is_file() and not p.is_symlink() and "." not in p.name and p.name not in EXCLUDED_FILES]
    if not files:
        raise CorpusMissingError(missing_corpus_message(directory))
    return files


def clean_entry(text: str) -> str:
    """One fortune as a single line of text: overstrikes removed, runs of whitespace collapsed to one space."""
    return " ".join(_OVERSTRIKE.sub("", text).split())


def split_entries_of(text: str) -> list[str]:
    """The cleaned, non-empty entries of one fortune file's text."""
    return [entry for entry in map(clean_entry, _SEPARATOR.split(text)) if entry]


def read_fortunes(directory: Path = FORTUNES_DIR) -> list[str]:
    """Every cleaned entry of every fortune file in `directory`, files in name order."""
    entries = []
    files = fortune_files(directory)
    for path in files:
        entries.extend(split_entries_of(path.read_text(encoding="utf-8", errors="replace")))
    if not entries:
        raise CorpusError(f"the {len(files)} fortune file(s) in {directory} hold no entries (text between lines "
                          f"that hold only '%'); {_MORE_ENTRIES}")
    return entries


def split_corpus(entries: list[str], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Disjoint parts {lm_train, queries_train, queries_test} of the entries, after a seeded shuffle."""
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    n_lm = int(len(order) * SPLIT_FRACTIONS["lm_train"])
    n_queries = int(len(order) * SPLIT_FRACTIONS["queries_train"])
    bounds = {"lm_train": (0, n_lm), "queries_train": (n_lm, n_lm + n_queries),
              "queries_test": (n_lm + n_queries, len(order))}
    return {name: [entries[i] for i in order[lo:hi]] for name, (lo, hi) in bounds.items()}


_MORE_ENTRIES = (f"pass --corpus_dir with more '%'-separated entries (Debian's fortunes has about 15,000: "
                 f"`{INSTALL_COMMAND}`)")


def check_corpus(directory: Path, *, window: int, query_length: int, start_text: str, end_text: str) -> int:
    """Checks, before any stage runs, that the corpus in `directory` can make the demo, and returns its number of
    entries: every part of the split is non-empty, the pretraining text and the held-out part (the pretraining's
    held-out loss) each hold one window of `window` tokens, and each query part makes at least one query of
    `query_length` tokens after `start_text` and ending with `end_text` (the task's settings). CorpusError naming
    the problem and the fix otherwise; CorpusMissingError without fortune files."""
    entries = read_fortunes(directory)
    parts = split_corpus(entries)
    empty = [name for name in SPLIT_NAMES if not parts[name]]
    if empty:
        raise CorpusError(f"the corpus in {directory} has {len(entries)} entries, too few to split into pretraining "
                          f"text, training queries and held-out queries ({', '.join(empty)} would be empty); "
                          f"{_MORE_ENTRIES}")
    enc = get_encoding("main")
    start_token, end_token = enc.encode_single_token(start_text), enc.encode_single_token(end_text)
    for name in ("lm_train", "queries_test"):
        tokens = 0
        for text in parts[name]:
            tokens += len(enc.encode(text)) + 1  # + the end-of-text token between documents
            if tokens >= window:
                break
        else:
            raise CorpusError(f"the {name} part of the corpus in {directory} ({len(parts[name])} entries) holds "
                              f"{tokens} tokens, fewer than one pretraining window of {window}; {_MORE_ENTRIES}")
    for name in ("queries_train", "queries_test"):
        if not any(make_query(enc.encode(text), query_length, start_token=start_token, end_token=end_token,
                              padding_token=enc.padding_token) is not None for text in parts[name]):
            raise CorpusError(f"the {name} part of the corpus in {directory} ({len(parts[name])} entries) makes no "
                              f"query: no entry has text after {start_text!r} that ends with {end_text!r} within "
                              f"{query_length} tokens; {_MORE_ENTRIES}")
    return len(entries)


def corpus_files(out_dir: Path) -> list[Path]:
    """The .bin/.idx files `prepare_corpus` writes into `out_dir`."""
    return [p for name in SPLIT_NAMES for p in token_file_paths(Path(out_dir) / name)]


def prepare_corpus(corpus_dir: Path, out_dir: Path) -> dict:
    """Reads, splits and GPT-2-encodes the corpus into `out_dir`; returns {part: {documents, tokens}}."""
    enc = get_encoding("main")
    parts = split_corpus(read_fortunes(corpus_dir))
    stats = {}
    for name in SPLIT_NAMES:
        n_docs, n_tokens = write_token_file(Path(out_dir) / name, (enc.encode(text) for text in parts[name]))
        stats[name] = {"documents": n_docs, "tokens": n_tokens}
    return stats
