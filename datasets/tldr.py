#!/usr/bin/env python3
"""Prepare the tldr query corpus (summarize_tldr task, ORIGINAL §7.4) as prepared token files.

    python datasets/tldr.py [--mode train|valid|test] [--source URL_OR_PATH] [--out DIR] [--max_docs N]

Source: OpenAI's `<base>/tldr/{train,valid}-subset.json` (a JSON list of objects; only `content` is used),
downloaded and cached with `lm_human_preferences.utils.download.fetch`. Mode 'test' is 'valid', as in the
original ("validation set serves as training set"), so it writes `<out>/tldr_valid.bin/.idx`, which is what the
query sampler reads for tldr in mode 'test'. `--source` takes another URL or a local file in the same format.

Cleaning (pure `clean_tldr`): `ftfy.fix_text`, runs of 3+ newlines to 2, strip. Documents keep the file's
order (the query sampler shuffles with seed 0, like the original generator); none are skipped.

A downloaded file that is not JSON (an HTML error page, a truncated transfer) is not cached. A source without
any text stops with exit status 2 and a one-line error, and leaves an existing prepared file as it was; so
does an `--out` that is not a writable directory.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:  # run as `python datasets/tldr.py`: make the package importable
    sys.path.insert(0, REPO_ROOT)

import ftfy  # noqa: E402

from lm_human_preferences.language import datasets as lm_datasets  # noqa: E402
from lm_human_preferences.utils.download import DownloadError, fetch  # noqa: E402

BASE_URL = "https://openaipublic.blob.core.windows.net/lm-human-preferences"
MODES = ("train", "valid", "test")


def file_mode(mode: str) -> str:
    """The subset a mode reads: 'test' is 'valid'."""
    if mode not in MODES:
        raise ValueError(f"unknown tldr mode {mode!r}: valid modes are {list(MODES)}")
    return "valid" if mode == "test" else mode


def subset_url(base_url: str, mode: str) -> str:
    """URL of OpenAI's tldr subset for `mode`."""
    return f"{base_url.rstrip('/')}/tldr/{file_mode(mode)}-subset.json"


def clean_tldr(text: str) -> str:
    """A post's `content` as the original's tldr generator yields it: ftfy, 3+ newlines to 2, strip."""
    text = ftfy.fix_text(text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def read_contents(path: str | pathlib.Path) -> list[str]:
    """The `content` of every record of a tldr subset file; ValueError naming the file and record if malformed."""
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, or nested too deeply
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}): expected a tldr subset file, "
                         f"a JSON list of post objects (is it corrupt or truncated?)") from None
    if not isinstance(records, list):
        raise ValueError(f"{str(path)!r} holds a JSON {type(records).__name__}, expected a list of post objects")
    contents = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("content"), str):
            raise ValueError(f"{str(path)!r} record {i}: expected an object with a string 'content', got "
                             f"{json.dumps(record)[:200]}")
        contents.append(record["content"])
    return contents


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="train", choices=MODES)
    parser.add_argument("--source", default=None, help="URL or local path of a subset file "
                                                        "(default: <base_url>/tldr/<mode>-subset.json)")
    parser.add_argument("--base_url", default=BASE_URL, help="root of OpenAI's lm-human-preferences files")
    parser.add_argument("--out", default=None, help="output directory (default: LMHP_DATA_DIR or the repo's datasets/)")
    parser.add_argument("--max_docs", type=int, default=None, help="only the first N posts of the file")
    parser.add_argument("--workers", type=int, default=1, help="processes for BPE encoding")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> tuple[int, int, int]:
    """Prepare tldr_<train|valid>; returns (documents, tokens, skipped)."""
    args = parse_args(argv)
    if args.max_docs is not None and args.max_docs < 1:
        raise ValueError(f"--max_docs must be a positive integer, got {args.max_docs}")
    prefix = lm_datasets.prepared_output_prefix(args.out, f"tldr_{file_mode(args.mode)}")
    source = args.source or subset_url(args.base_url, args.mode)
    contents = read_contents(fetch(source, expect="json"))
    contents = contents[:args.max_docs] if args.max_docs is not None else contents
    try:
        n_docs, n_tokens = lm_datasets.write_prepared_texts(prefix, map(clean_tldr, contents), workers=args.workers,
                                                            total=len(contents), desc=f"tldr {file_mode(args.mode)}")
    except lm_datasets.EmptyCorpusError as e:
        raise ValueError(f"tldr source {source!r} gives no text ({e}): pass a JSON list of posts with a non-empty "
                         f"'content'") from None
    print(lm_datasets.format_summary(prefix, n_docs, n_tokens, 0))
    return n_docs, n_tokens, 0


if __name__ == "__main__":
    try:
        main()
    except (DownloadError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
