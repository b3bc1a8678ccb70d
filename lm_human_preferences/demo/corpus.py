"""The demo's corpus: Debian's `fortunes` (quotations, jokes and aphorisms; about 15,000 entries, 2.5 MB of English).

It installs offline from Debian's archive (`apt-get install fortunes`) and the project ships no third-party text.
Each fortune file holds entries separated by lines that contain only '%'. An entry is cleaned (terminal
overstrike sequences removed, whitespace collapsed to single spaces) and the entries are split, in a fixed
shuffled order, into three disjoint parts written as prepared token files (`language/datasets.py` format):

* `lm_train`: text the small GPT-2 is pretrained on;
* `queries_train`: documents the task's queries come from for labels, reward normalization and PPO;
* `queries_test`: held-out documents for the evaluation queries.

The task reads the last two through `QuerySampler` with the path prefix `<dir>/queries` (modes train / test).
"""
from __future__ import annotations

import random
import re
from pathlib import Path

from lm_human_preferences.language.datasets import token_file_paths, write_token_file
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
    for path in fortune_files(directory):
        entries.extend(split_entries_of(path.read_text(encoding="utf-8", errors="replace")))
    if not entries:
        raise CorpusMissingError(missing_corpus_message(Path(directory)))
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
