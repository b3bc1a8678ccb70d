#!/usr/bin/env python3
"""Prepare the books query corpus (sentiment and descriptiveness tasks, ORIGINAL §7.2) as token files.

    python datasets/books.py [--mode train|test] [--source hf|openai|URL|PATH] [--out DIR] [--max_docs N]
                             [--hf_files PARQUET_GLOB]

Writes `<out>/books_<mode>.bin/.idx` (format: lm_human_preferences/language/datasets.py), one document per
passage in the source's order (the query sampler shuffles with seed 0, like the original generator).

OpenAI's `book_passages/{train,test}.jsonl` (one JSON string per line, a multi-sentence passage) were lost in
the GCP-to-Azure migration (openai/lm-human-preferences#17): the URL answers HTTP 404. Sources:

* `hf` (default): Hugging Face `bookcorpus` (needs the `data` extra: `pip install -e .[data]`, datasets 5.x).
  The Hub repository `bookcorpus/bookcorpus` still ships a loading script, which `datasets` refuses since 4.0, so
  this reads the Parquet export the Hub made of it (branch `refs/convert/parquet`, config `plain_text`, one
  string column `text`; the split folder is `train`, or `partial-train` where the Hub converted only the first
  part of a large data set) with `datasets.load_dataset("parquet", data_files=...)`, in file order.
  `--hf_files` takes other Parquet files with a `text` column (a local copy of those files, for one). Its rows
  are single sentences, lower-cased and tokenizer-spaced ("`` i want open fighting ... . ''"). Deviation from
  the original, by design: consecutive rows are grouped into passages of `--sentences_per_passage` (default 8)
  sentences and lightly detokenized (`detokenize`: quotes, and no space before punctuation or contractions), so
  that '.' is GPT-2 token 13 again and the books task's start/end '.' trimming applies as in the original (a
  query drops the first, usually partial, sentence and ends at a sentence end, 64 tokens at most). Passages may
  span book boundaries. Test mode holds out the last `--test_fraction` (default 1%) of the passages
  (contiguous, so mostly other books); train mode uses the rest.
* `openai`, or any URL, or a path containing `{mode}`: a per-mode file in OpenAI's format, taken whole (it
  *is* the split). A JSON Lines file: each line a JSON string (OpenAI's format) or an object with "text".
* a local `.jsonl` (as above) or `.txt` file (one passage per paragraph; paragraphs are separated by blank
  lines and their lines joined with spaces): split like `hf`, by the held-out fraction.

A source that yields no text for the mode stops with exit status 2 and a one-line error, and leaves an existing
prepared file as it was; so does an `--out` that is not a writable directory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import pathlib
import re
import sys
from typing import Iterable, Iterator

REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:  # run as `python datasets/books.py`: make the package importable
    sys.path.insert(0, REPO_ROOT)

from lm_human_preferences.language import datasets as lm_datasets  # noqa: E402
from lm_human_preferences.utils.download import DownloadError, fetch, is_url  # noqa: E402

OPENAI_URL = "https://openaipublic.blob.core.windows.net/lm-human-preferences/datasets/book_passages/{mode}.jsonl"
HF_FILES = "hf://datasets/bookcorpus/bookcorpus@refs%2Fconvert%2Fparquet/plain_text/*train/*.parquet"
HF_COLUMN = "text"
MODES = ("train", "test")
SENTENCES_PER_PASSAGE = 8
TEST_FRACTION = 0.01
HF_READ_ROWS = 10_000
LOST_HINT = ("OpenAI's book_passages were lost in the GCP-to-Azure migration (openai/lm-human-preferences#17, "
             "ORIGINAL §7.2); use --source hf (Hugging Face bookcorpus, `pip install -e .[data]`) or a local "
             ".txt/.jsonl file of passages")
# bookcorpus's tokenizer spacing, undone in this order.
_DETOKENIZE_RULES = [
    (re.compile(r"``\s*"), '"'),  # opening quote, attached to the next word
    (re.compile(r"\s*''"), '"'),  # closing quote, attached to the previous word
    (re.compile(r" (n't|'s|'m|'re|'ve|'ll|'d)\b", re.IGNORECASE), r"\1"),  # do n't -> don't
    (re.compile(r" ([.,!?;:%)\]}])"), r"\1"),  # no space before punctuation: "end ." -> "end."
    (re.compile(r"([(\[{$]) "), r"\1"),  # no space after opening brackets
]


def detokenize(sentence: str) -> str:
    """A bookcorpus sentence with its tokenizer spacing undone ("`` do n't go . ''" -> '"don't go."')."""
    for pattern, replacement in _DETOKENIZE_RULES:
        sentence = pattern.sub(replacement, sentence)
    return sentence.strip()


def group_sentences(sentences: Iterable[str], sentences_per_passage: int = SENTENCES_PER_PASSAGE) -> Iterator[str]:
    """Passages of `sentences_per_passage` consecutive detokenized sentences joined by spaces (the last may be
    shorter): ceil(len(sentences) / sentences_per_passage) of them. Blank sentences are left out."""
    if sentences_per_passage < 1:
        raise ValueError(f"--sentences_per_passage must be >= 1, got {sentences_per_passage}")
    iterator = iter(sentences)
    while batch := list(itertools.islice(iterator, sentences_per_passage)):
        yield " ".join(s for s in map(detokenize, batch) if s)


def held_out_range(n: int, mode: str, test_fraction: float) -> range:
    """Indices of `mode`'s items among n: test is the last ceil(n * test_fraction), train the rest."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"--test_fraction must lie in (0, 1), got {test_fraction}")
    n_test = min(n - 1, math.ceil(n * test_fraction)) if n > 1 else 0
    return range(n - n_test, n) if mode == "test" else range(0, n - n_test)


def read_jsonl_passages(path: str | pathlib.Path) -> Iterator[str]:
    """Passages of a JSON Lines file: each non-blank line a JSON string or an object with a string "text"."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{str(path)!r} line {line_number} is not valid JSON ({e}): expected one JSON "
                                 f"string (or object with \"text\") per line") from None
            if isinstance(value, dict) and isinstance(value.get("text"), str):
                value = value["text"]
            if not isinstance(value, str):
                raise ValueError(f"{str(path)!r} line {line_number}: expected a JSON string or an object with a "
                                 f"string \"text\", got {line.strip()[:200]}")
            yield value


def read_txt_passages(path: str | pathlib.Path) -> Iterator[str]:
    """Passages of a text file: paragraphs separated by blank lines, each paragraph's lines joined by spaces."""
    paragraph: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in itertools.chain(f, [""]):
            if line.strip():
                paragraph.append(line.strip())
            elif paragraph:
                yield " ".join(paragraph)
                paragraph = []


def read_passages(path: str | pathlib.Path) -> Iterator[str]:
    """Passages of a local .jsonl/.json (JSON Lines) or .txt file."""
    suffix = pathlib.Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_jsonl_passages(path)
    if suffix == ".txt":
        return read_txt_passages(path)
    raise ValueError(f"unsupported books source file {str(path)!r}: expected a .jsonl (JSON Lines) or .txt file")


def fetch_per_mode_file(source: str) -> pathlib.Path:
    """Local path of a per-mode source file (URL or path); a 404 explains that book_passages are lost."""
    try:
        return fetch(source, expect="text")
    except DownloadError as e:
        if "HTTP 404" in str(e):
            raise DownloadError(f"{source} was not found (HTTP 404): {LOST_HINT}") from e
        raise


def load_hf_parquet(files: str):
    """Hugging Face `datasets`' table of the Parquet files `files` (path, glob or hf:// URL), checked to have a
    `text` column; ImportError/ValueError saying what to do otherwise."""
    try:
        import datasets as hf_datasets  # optional: only --source hf needs it (the `data` extra)
    except ImportError:
        hf_datasets = None
    # Without the library, `import datasets` can find this folder (a namespace package) instead.
    if hf_datasets is None or not hasattr(hf_datasets, "load_dataset"):
        raise ImportError("--source hf needs the Hugging Face `datasets` library: pip install -e .[data] "
                          "(or pass --source PATH to a local .txt/.jsonl file of passages)")
    try:
        corpus = hf_datasets.load_dataset("parquet", data_files={"train": files}, split="train")
    except Exception as e:  # noqa: BLE001 - network, Hub and file errors of a third-party loader, reported as one line
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"cannot read Hugging Face bookcorpus from {files!r} ({type(e).__name__}: {detail}): check "
                         f"the network (or HF_ENDPOINT), or download the Parquet files and pass --hf_files "
                         f"'DIR/*.parquet', or pass --source PATH to a local .txt/.jsonl file") from None
    if HF_COLUMN not in corpus.column_names:
        raise ValueError(f"the Parquet files {files!r} have columns {corpus.column_names}, not bookcorpus's "
                         f"{HF_COLUMN!r}: pass --hf_files with files of one string column {HF_COLUMN!r}")
    return corpus


def hf_passages(mode: str, sentences_per_passage: int, test_fraction: float,
                files: str = HF_FILES) -> tuple[Iterator[str], int]:
    """(passages, count) of `mode`'s share of Hugging Face bookcorpus, grouped in order."""
    corpus = load_hf_parquet(files)
    n_rows = len(corpus)
    passages = held_out_range(math.ceil(n_rows / sentences_per_passage), mode, test_fraction)
    rows = range(passages.start * sentences_per_passage, min(n_rows, passages.stop * sentences_per_passage))

    def sentences() -> Iterator[str]:
        for start in range(rows.start, rows.stop, HF_READ_ROWS):
            yield from corpus[start:min(start + HF_READ_ROWS, rows.stop)][HF_COLUMN]

    return group_sentences(sentences(), sentences_per_passage), len(passages)


def source_passages(args: argparse.Namespace) -> tuple[Iterator[str], int | None]:
    """(passages, count if known) of the requested mode from the requested source."""
    if args.source == "hf":
        return hf_passages(args.mode, args.sentences_per_passage, args.test_fraction, args.hf_files)
    source = OPENAI_URL if args.source == "openai" else args.source
    if "{mode}" in source or is_url(source):
        return read_passages(fetch_per_mode_file(source.replace("{mode}", args.mode))), None
    path = fetch(source, expect="text")
    if not path.is_file():
        raise ValueError(f"books source {source!r} is not a file: pass a .txt or .jsonl file of passages")
    n = sum(1 for _ in read_passages(path))
    selected = held_out_range(n, args.mode, args.test_fraction)
    return itertools.islice(read_passages(path), selected.start, selected.stop), len(selected)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="train", choices=MODES)
    parser.add_argument("--source", default="hf", help="hf (default), openai, a URL, or a local .txt/.jsonl path")
    parser.add_argument("--out", default=None, help="output directory (default: LMHP_DATA_DIR or the repo's datasets/)")
    parser.add_argument("--max_docs", type=int, default=None, help="only the first N passages of the split")
    parser.add_argument("--sentences_per_passage", type=int, default=SENTENCES_PER_PASSAGE,
                        help="bookcorpus sentences per passage (--source hf)")
    parser.add_argument("--test_fraction", type=float, default=TEST_FRACTION,
                        help="held-out fraction for test mode (hf and single local files)")
    parser.add_argument("--hf_files", default=HF_FILES,
                        help="Parquet files (path, glob or hf:// URL) with a string column 'text', read for "
                             "--source hf (default: the Hub's Parquet export of bookcorpus/bookcorpus)")
    parser.add_argument("--workers", type=int, default=1, help="processes for BPE encoding")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> tuple[int, int, int]:
    """Prepare books_<mode>; returns (documents, tokens, skipped)."""
    args = parse_args(argv)
    if args.max_docs is not None and args.max_docs < 1:
        raise ValueError(f"--max_docs must be a positive integer, got {args.max_docs}")
    prefix = lm_datasets.prepared_output_prefix(args.out, f"books_{args.mode}")
    passages, total = source_passages(args)
    if args.max_docs is not None:
        passages = itertools.islice(passages, args.max_docs)
        total = args.max_docs if total is None else min(total, args.max_docs)
    try:
        n_docs, n_tokens = lm_datasets.write_prepared_texts(prefix, passages, workers=args.workers, total=total,
                                                            desc=f"books {args.mode}")
    except lm_datasets.EmptyCorpusError as e:
        source = args.hf_files if args.source == "hf" else args.source
        raise ValueError(f"books source {source!r} gives no text for mode {args.mode!r} ({e}): pass a source with "
                         f"passages (test mode takes the last --test_fraction of a single file's passages)") from None
    print(lm_datasets.format_summary(prefix, n_docs, n_tokens, 0))
    return n_docs, n_tokens, 0


if __name__ == "__main__":
    try:
        main()
    except (DownloadError, ImportError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
