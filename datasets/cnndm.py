#!/usr/bin/env python3
"""Prepare the cnndm query corpus (summarize_cnndm task, ORIGINAL §7.3) as prepared token files.

    python datasets/cnndm.py [--mode train|valid|test] [--source openai|hf] [--out DIR] [--max_docs N]

Writes `<out>/cnndm_<mode>.bin/.idx` (format: lm_human_preferences/language/datasets.py), one document per
story in the URL list's order (the query sampler shuffles with seed 0, like the original generator).

Sources:
* `openai` (default): OpenAI's URL list `<base>/datasets/cnndm/url_lists/all_{train,val,test}.txt` and the
  story cache `<base>/datasets/cnndm/cache_{mode}/{site}/stories/{sha1(url)}.story` (mode 'valid' is 'val' in
  both), downloaded and cached with `lm_human_preferences.utils.download.fetch`. The original read the cache
  from a gs:// bucket with gsutil, which no longer works (§7.5); the same files are on Azure. A story that
  is missing (HTTP 404) is skipped and counted. `--max_docs N` downloads only the first N stories of the list
  (a partial corpus: the shuffled order then differs from the original's).
* `hf`: Hugging Face `cnn_dailymail` 3.0.0 articles (needs `pip install datasets`), in the data set's order.
  These articles were already flattened by Hugging Face's script (no `@highlight` blocks, different line
  structure), so this is a close substitute, not the original text.

Both go through `clean_story`: the original's `clean_up_start` (steps 1-6 of §7.3), then ftfy, newline
squeezing and the `@highlight` cut (steps 7-9). The original pinned ftfy 5.4.1; `ftfy.fix_text` of newer
versions can differ on rare inputs.
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
        path = fetch(story_url(base_url, mode, url))
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


def hf_articles(mode: str, max_docs: int | None) -> tuple[Iterator[str], int]:
    """(cleaned articles, count) of Hugging Face cnn_dailymail 3.0.0 for `mode`."""
    try:
        import datasets as hf_datasets
    except ImportError:
        hf_datasets = None
    if hf_datasets is None or not hasattr(hf_datasets, "load_dataset"):
        raise ImportError("--source hf needs the Hugging Face `datasets` library: pip install datasets "
                          "(or use --source openai)")
    split = hf_datasets.load_dataset("cnn_dailymail", "3.0.0", split=HF_SPLITS[mode])
    n = len(split) if max_docs is None else min(max_docs, len(split))
    return (clean_story(row["article"]) for row in itertools.islice(split, n)), n


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="train", choices=MODES)
    parser.add_argument("--source", default="openai", choices=("openai", "hf"),
                        help="OpenAI's URL list + story cache (default), or Hugging Face cnn_dailymail 3.0.0")
    parser.add_argument("--base_url", default=BASE_URL, help="root of OpenAI's lm-human-preferences files")
    parser.add_argument("--out", default=None, help="output directory (default: LMHP_DATA_DIR or the repo's datasets/)")
    parser.add_argument("--max_docs", type=int, default=None, help="only the first N articles of the list")
    parser.add_argument("--download_threads", type=int, default=16, help="parallel story downloads")
    parser.add_argument("--workers", type=int, default=1, help="processes for BPE encoding")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> tuple[int, int, int]:
    """Prepare cnndm_<mode>; returns (documents, tokens, skipped)."""
    args = parse_args(argv)
    if args.max_docs is not None and args.max_docs < 1:
        raise ValueError(f"--max_docs must be a positive integer, got {args.max_docs}")
    out = pathlib.Path(args.out).expanduser() if args.out else lm_datasets.default_data_dir()
    prefix = out / f"cnndm_{args.mode}"
    skipped = [0]
    if args.source == "hf":
        texts, total = hf_articles(args.mode, args.max_docs)
    else:
        urls = read_url_list(fetch(url_list_url(args.base_url, args.mode)))
        urls = urls[:args.max_docs] if args.max_docs is not None else urls
        for url in urls:
            get_path_of_url(url)  # fail on a bad URL before downloading anything
        texts, total = openai_stories(args.base_url, args.mode, urls, args.download_threads, skipped), len(urls)
    n_docs, n_tokens = lm_datasets.write_prepared_texts(prefix, texts, workers=args.workers, total=total,
                                                        desc=f"cnndm {args.mode}")
    print(lm_datasets.format_summary(prefix, n_docs, n_tokens, skipped[0]))
    return n_docs, n_tokens, skipped[0]


if __name__ == "__main__":
    try:
        main()
    except (DownloadError, FileNotFoundError, ImportError, ValueError) as e:
        sys.exit(f"error: {e}")
