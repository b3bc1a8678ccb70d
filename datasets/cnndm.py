#!/usr/bin/env python3
"""Prepare the cnndm query corpus (summarize_cnndm task, ORIGINAL §7.3) as prepared token files.

    python datasets/cnndm.py [--mode train|valid|test] [--source openai|hf] [--out DIR] [--max_docs N]
                             [--hf_files PARQUET_GLOB]

Writes `<out>/cnndm_<mode>.bin/.idx` (format: lm_human_preferences/language/datasets.py), one document per
story in the URL list's order (the query sampler shuffles with seed 0, like the original generator).

Sources:
* `openai` (default): OpenAI's URL list `<base>/datasets/cnndm/url_lists/all_{train,val,test}.txt` and the
  story cache `<base>/datasets/cnndm/cache_{mode}/{site}/stories/{sha1(url)}.story` (mode 'valid' is 'val' in
  both), downloaded and cached with `lm_human_preferences.utils.download.fetch`. The original read the cache
  from a gs:// bucket with gsutil, which no longer works (§7.5); the same files are on Azure. A story that
  is missing (HTTP 404) is skipped and counted. `--max_docs N` downloads only the first N stories of the list
  (a partial corpus: the shuffled order then differs from the original's).
* `hf`: Hugging Face `cnn_dailymail` 3.0.0 articles, in the data set's order (needs the `data` extra:
  `pip install -e .[data]`, datasets 5.x). They are read from the Parquet files of the Hub repository
  `abisee/cnn_dailymail` (where the name `cnn_dailymail` now points) at the pinned revision `HF_REVISION`, the
  commit that replaced its loading script by `3.0.0/{train-0000[0-2]-of-00003,validation-00000-of-00001,
  test-00000-of-00001}.parquet` (string columns `article`, `highlights`, `id`), with
  `datasets.load_dataset("parquet", data_files=...)`. `--hf_files` takes other files in that layout (a local
  copy, for one; `{split}` is train, validation or test). Hugging Face's script built each `article` from a
  story file by appending " ." to every line without final punctuation and joining the lines with spaces: its
  newlines are gone, and the task cuts a query after its last newline (end_text '\n', §7.3), so no article
  would give a query. `hf_article_to_story` undoes the join as far as it can: the " ." marks become line ends
  again, and so does every sentence end (news paragraphs are mostly one sentence); the lines are separated by a
  blank line, as in the story files. This is a close substitute for the original text, not the same text.

Both go through `clean_story`: the original's `clean_up_start` (steps 1-6 of §7.3), then ftfy, newline
squeezing and the `@highlight` cut (steps 7-9). The original pinned ftfy 5.4.1; `ftfy.fix_text` of newer
versions can differ on rare inputs.

A source that yields no text stops with exit status 2 and a one-line error, and leaves an existing prepared
file as it was; so does an `--out` that is not a writable directory.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import itertools
import pathlib
import re
import sys
from typing import Iterator

REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:  # run as `python datasets/cnndm.py`: make the package importable
    sys.path.insert(0, REPO_ROOT)

import ftfy  # noqa: E402

from lm_human_preferences.language import datasets as lm_datasets  # noqa: E402
from lm_human_preferences.utils.download import DownloadError, fetch  # noqa: E402

BASE_URL = "https://openaipublic.blob.core.windows.net/lm-human-preferences"
MODES = ("train", "valid", "test")
HF_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
HF_REVISION = "96df5e686bee6baa90b8bee7c28b81fa3fa6223d"  # abisee/cnn_dailymail: "Convert dataset to Parquet"
HF_FILES = f"hf://datasets/abisee/cnn_dailymail@{HF_REVISION}/3.0.0/{{split}}-*.parquet"
HF_COLUMNS = ("article", "highlights", "id")
HF_READ_ROWS = 1000  # rows read from the table at a time
# Abbreviations after which a '.' does not end a sentence (hf_article_to_story).
_ABBREVIATIONS = frozenset("Mr Mrs Ms Dr St Jr Sr Prof Gen Sen Rep Gov Lt Col Sgt Capt Cmdr Rev Mt No vs Jan Feb "
                           "Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec Inc Co Corp Ltd".split())
# A sentence end: final punctuation and closing quotes, then space before what may start a sentence.
_SENTENCE_END = re.compile(r"""([.!?]+["'\u2019\u201d)]*)\s+(?=["'\u2018\u201c(]?[A-Z0-9])""")
DAILYMAIL_MARKERS = ("dailymail.co.uk", "mailonsunday.ie", "lib.store.yahoo.net")
CNN_MARKERS = ("cnn.com", "cnn.hk")
# Step 5's pattern, verbatim: the square brackets make "[2011|2012|...]" a character class (§13.6).
UPDATED_PATTERN = r".*UPDATED:\s+[0-9]{2}:[0-9]{2}.*[2011|2012|2013|2014|2015]"


def url_mode(mode: str) -> str:
    """The mode name in OpenAI's file names: 'valid' is 'val'."""
    if mode not in MODES:
        raise ValueError(f"unknown cnndm mode {mode!r}: valid modes are {list(MODES)}")
    return "val" if mode == "valid" else mode


def url_list_url(base_url: str, mode: str) -> str:
    """URL of OpenAI's list of article URLs for `mode`."""
    return f"{base_url.rstrip('/')}/datasets/cnndm/url_lists/all_{url_mode(mode)}.txt"


def get_path_of_url(url: str) -> str:
    """`{site}/stories/{sha1(url)}.story`, the story's path inside the cache (the original's site rule)."""
    if any(marker in url for marker in DAILYMAIL_MARKERS):
        site = "dailymail"
    elif any(marker in url for marker in CNN_MARKERS):
        site = "cnn"
    else:
        raise ValueError(f"article URL {url!r} is neither Daily Mail ({', '.join(DAILYMAIL_MARKERS)}) nor CNN "
                         f"({', '.join(CNN_MARKERS)}): the URL list is not OpenAI's cnndm list")
    return f"{site}/stories/{hashlib.sha1(url.encode('utf-8')).hexdigest()}.story"


def story_url(base_url: str, mode: str, url: str) -> str:
    """URL of the cached story file of article `url`."""
    return f"{base_url.rstrip('/')}/datasets/cnndm/cache_{url_mode(mode)}/{get_path_of_url(url)}"


def clean_up_start(text: str) -> str:
    """The original's `clean_up_start` (§7.3 steps 1-6): strip bylines, '(CNN)' datelines, 'UPDATED:' headers."""
    if text[:2] == "By":  # 1. a byline: drop the first two lines
        text = "\n".join(text.split("\n")[2:])
    text = re.split(r"\(CNN\) +--", text)[-1]  # 2. after the last "(CNN) --"
    text = re.split(r"\(CNN\)", text[:100])[-1] + text[100:]  # 3. after the last "(CNN)" in the first 100 chars
    text = re.sub(r"^and \w+\n", "", text)  # 4. a leading "and <word>" line
    text = re.split(UPDATED_PATTERN, text)[-1]  # 5. after the last "UPDATED: hh:mm ..." line
    text = text.replace("\u2019", "'").replace("\u2018", "'")  # 6. curly single quotes, then strip
    return text.strip()


def clean_story(text: str) -> str:
    """A story file's text as the original's cnndm generator yields it (§7.3 steps 1-9)."""
    text = clean_up_start(text)  # steps 1-6
    text = ftfy.fix_text(text)  # 7
    text = re.sub(r"\n{3,}", "\n\n", text)  # 8
    return text.split("@highlight")[0].strip()  # 9


def split_sentences(text: str) -> list[str]:
    """`text` cut after every sentence end ('.', '!' or '?', closing quotes, then a capital or digit), except after
    an abbreviation, an initial ("J.") or a dotted acronym ("U.S.")."""
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        before = text[start:match.start()].split()
        word = before[-1] if before else ""
        if match.group(1) == "." and (word in _ABBREVIATIONS or re.fullmatch(r"(?:[A-Za-z]\.)*[A-Za-z]", word)):
            continue
        sentences.append(text[start:match.end(1)])
        start = match.end()
    sentences.append(text[start:])
    return [s.strip() for s in sentences if s.strip()]


def hf_article_to_story(article: str) -> str:
    """A Hugging Face cnn_dailymail `article` in the layout of a story file: one line per sentence, lines separated
    by a blank line (see the module docstring)."""
    lines = [piece.strip() for piece in re.split(r" \.(?= |$)", article.strip())]  # the " ." marks end lines
    return "\n\n".join(sentence for line in lines if line for sentence in split_sentences(line))


def read_url_list(path: str | pathlib.Path) -> list[str]:
    """Article URLs of a URL list file, one per line (blank lines ignored)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _is_not_found(error: DownloadError) -> bool:
    """Whether a failed download was an HTTP 404 (a missing story, which is skipped)."""
    return "HTTP 404" in str(error)


def fetch_story(base_url: str, mode: str, url: str) -> str | None:
    """The cleaned text of article `url`'s story, or None if the story file does not exist (HTTP 404)."""
    try:
        path = fetch(story_url(base_url, mode, url), expect="text")
    except DownloadError as e:
        if _is_not_found(e):
            return None
        raise
    with open(path, encoding="utf-8") as f:
        return clean_story(f.read())


def openai_stories(base_url: str, mode: str, urls: list[str], threads: int, skipped: list[int]) -> Iterator[str]:
    """Cleaned stories of `urls`, in order, downloaded by `threads` threads; counts missing ones in skipped[0]."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        iterator = iter(urls)
        while window := list(itertools.islice(iterator, 16 * threads)):
            for text in pool.map(lambda url: fetch_story(base_url, mode, url), window):
                if text is None:
                    skipped[0] += 1
                else:
                    yield text


def load_hf_parquet(files: str, split: str):
    """Hugging Face `datasets`' table of cnn_dailymail's Parquet files `files` (`{split}` filled in), checked to
    have its columns; ImportError/ValueError saying what to do otherwise."""
    try:
        import datasets as hf_datasets  # optional: only --source hf needs it (the `data` extra)
    except ImportError:
        hf_datasets = None
    # Without the library, `import datasets` can find this folder (a namespace package) instead.
    if hf_datasets is None or not hasattr(hf_datasets, "load_dataset"):
        raise ImportError("--source hf needs the Hugging Face `datasets` library: pip install -e .[data] "
                          "(or use --source openai)")
    pattern = files.replace("{split}", split)
    try:
        table = hf_datasets.load_dataset("parquet", data_files={split: pattern}, split=split)
    except Exception as e:  # noqa: BLE001 - network, Hub and file errors of a third-party loader, reported as one line
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"cannot read Hugging Face cnn_dailymail 3.0.0 from {pattern!r} ({type(e).__name__}: "
                         f"{detail}): check the network (or HF_ENDPOINT), or download the Parquet files and pass "
                         f"--hf_files 'DIR/3.0.0/{{split}}-*.parquet', or use --source openai") from None
    missing = [c for c in HF_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"the Parquet files {pattern!r} have columns {table.column_names}, not cnn_dailymail "
                         f"3.0.0's {list(HF_COLUMNS)}: pass --hf_files with files in that layout")
    return table


def hf_articles(mode: str, max_docs: int | None, files: str = HF_FILES) -> tuple[Iterator[str], int]:
    """(cleaned articles, count) of Hugging Face cnn_dailymail 3.0.0 for `mode`, as story files read."""
    split = load_hf_parquet(files, HF_SPLITS[mode])
    n = len(split) if max_docs is None else min(max_docs, len(split))
    articles = (split[start:min(start + HF_READ_ROWS, n)]["article"] for start in range(0, n, HF_READ_ROWS))
    return (clean_story(hf_article_to_story(a)) for a in itertools.chain.from_iterable(articles)), n


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="train", choices=MODES)
    parser.add_argument("--source", default="openai", choices=("openai", "hf"),
                        help="OpenAI's URL list + story cache (default), or Hugging Face cnn_dailymail 3.0.0")
    parser.add_argument("--base_url", default=BASE_URL, help="root of OpenAI's lm-human-preferences files")
    parser.add_argument("--out", default=None, help="output directory (default: LMHP_DATA_DIR or the repo's datasets/)")
    parser.add_argument("--max_docs", type=int, default=None, help="only the first N articles of the list")
    parser.add_argument("--hf_files", default=HF_FILES,
                        help="Parquet files of cnn_dailymail 3.0.0 for --source hf (path, glob or hf:// URL; {split} "
                             "is train, validation or test; default: the Hub's files at a pinned revision)")
    parser.add_argument("--download_threads", type=int, default=16, help="parallel story downloads")
    parser.add_argument("--workers", type=int, default=1, help="processes for BPE encoding")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> tuple[int, int, int]:
    """Prepare cnndm_<mode>; returns (documents, tokens, skipped)."""
    args = parse_args(argv)
    if args.max_docs is not None and args.max_docs < 1:
        raise ValueError(f"--max_docs must be a positive integer, got {args.max_docs}")
    prefix = lm_datasets.prepared_output_prefix(args.out, f"cnndm_{args.mode}")
    skipped = [0]
    if args.source == "hf":
        texts, total = hf_articles(args.mode, args.max_docs, args.hf_files)
    else:
        urls = read_url_list(fetch(url_list_url(args.base_url, args.mode), expect="text"))
        urls = urls[:args.max_docs] if args.max_docs is not None else urls
        for url in urls:
            get_path_of_url(url)  # fail on a bad URL before downloading anything
        texts, total = openai_stories(args.base_url, args.mode, urls, args.download_threads, skipped), len(urls)
    try:
        n_docs, n_tokens = lm_datasets.write_prepared_texts(prefix, texts, workers=args.workers, total=total,
                                                            desc=f"cnndm {args.mode}")
    except lm_datasets.EmptyCorpusError as e:
        source = args.hf_files if args.source == "hf" else url_list_url(args.base_url, args.mode)
        raise ValueError(f"cnndm source {source!r} gives no text for mode {args.mode!r} ({e}; {skipped[0]} stories "
                         f"missing): check the source") from None
    print(lm_datasets.format_summary(prefix, n_docs, n_tokens, skipped[0]))
    return n_docs, n_tokens, skipped[0]


if __name__ == "__main__":
    try:
        main()
    except (DownloadError, ImportError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
