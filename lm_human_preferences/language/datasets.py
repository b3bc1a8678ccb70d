"""Query streams for every task, and the prepared token files they read (ORIGINAL §7.1, §11, §12).

Prepared token files
--------------------
A prepared corpus is a pair of files sharing a path prefix `<dir>/<dataset>_<mode>`:

* `<dataset>_<mode>.bin`: the token ids of all documents, concatenated, as little-endian uint16;
* `<dataset>_<mode>.idx`: little-endian int64 offsets into the .bin (in tokens), n_docs + 1 of them:
  document i is `bin[idx[i]:idx[i + 1]]`, `idx[0] == 0` and `idx[-1]` is the number of tokens.

Documents are stored in the source's order (the sampler shuffles). `write_token_file` writes both files
atomically (temporary file, then rename); `TokenFile` reads them with np.memmap, so a corpus is never loaded
into memory. The preparation scripts `datasets/{books,cnndm,tldr}.py` write them to the repo's `datasets/`
folder by default, or to env LMHP_DATA_DIR. Names: books_{train,test}, cnndm_{train,valid,test} and
tldr_{train,valid} (the tldr task's mode 'test' reads tldr_valid, as in the original).

Query construction (`QuerySampler`)
-----------------------------------
Documents are visited in the order `random.Random(0).shuffle(range(n_docs))` (the original shuffles its
document list with `random.seed(0)`; CPython's shuffle is reproducible, §13.5). Each document becomes a
query by `make_query` (start trimming, cut, end trimming, right padding) or is skipped. The stream of kept
queries repeats forever in the same order, and its k-th query goes to rank k % world_size, which is
`tf.data.shard` applied after `repeat` (§7.1 steps 6-7). Batches are consecutive queries of a rank's shard.

The dataset 'test' is the original's test dataset (§12): an endless stream of random 40-character strings
over 'abcdefghijklmnopqrstuvwxyz.', here drawn from `random.Random(0)` so it is reproducible.
"""

from __future__ import annotations

import array
import itertools
import multiprocessing
import os
import pathlib
import random
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from lm_human_preferences.language.encodings import get_encoding
from lm_human_preferences.utils.files import atomic_open, unwritable

BIN_DTYPE = np.dtype("<u2")
IDX_DTYPE = np.dtype("<i8")
MAX_TOKEN_ID = np.iinfo(BIN_DTYPE).max
SHUFFLE_SEED = 0

# dataset name -> {sampler mode: mode in the prepared file name}
DATASET_MODES = {
    "books": {"train": "train", "test": "test"},
    "cnndm": {"train": "train", "valid": "valid", "test": "test"},
    # "validation set serves as training set": the original maps mode 'test' to tldr's valid subset.
    "tldr": {"train": "train", "valid": "valid", "test": "valid"},
}
TEST_DATASET = "test"
TEST_ALPHABET = "abcdefghijklmnopqrstuvwxyz."
TEST_STRING_LENGTH = 40
# The 'test' stream raises after this many consecutive skipped strings (a start/end token that never occurs).
MAX_CONSECUTIVE_TEST_SKIPS = 10_000
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------------------
# Prepared token files


def default_data_dir() -> pathlib.Path:
    """Where prepared token files live: env LMHP_DATA_DIR, else the repo's `datasets/` folder."""
    env = os.environ.get("LMHP_DATA_DIR")
    if env:
        return pathlib.Path(env).expanduser()
    return REPO_ROOT / "datasets"


def token_file_paths(path_prefix: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    """The (.bin, .idx) paths of the prepared token files at `path_prefix`."""
    prefix = os.fspath(path_prefix)
    return pathlib.Path(prefix + ".bin"), pathlib.Path(prefix + ".idx")


def _doc_array(doc_index: int, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """One document's token ids as uint16, or ValueError naming the document if an id does not fit."""
    ids = np.asarray(tokens)
    if ids.ndim != 1:
        raise ValueError(f"document {doc_index}: expected a 1-D sequence of token ids, got shape {ids.shape}")
    if ids.size == 0:
        return ids.astype(BIN_DTYPE)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"document {doc_index}: token ids must be integers, got dtype {ids.dtype}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high > MAX_TOKEN_ID:
        bad = low if low < 0 else high
        raise ValueError(f"document {doc_index}: token id {bad} does not fit in uint16 [0, {MAX_TOKEN_ID}]; "
                         f"prepared token files hold GPT-2-sized vocabularies only")
    return ids.astype(BIN_DTYPE)


class EmptyCorpusError(ValueError):
    """A corpus to prepare has no tokens at all; nothing was written."""


def write_token_file(path_prefix: str | os.PathLike, docs_token_lists: Iterable[Sequence[int]], *,
                     allow_empty: bool = True) -> tuple[int, int]:
    """Write documents (an iterable of token-id sequences, consumed once) to `<path_prefix>.bin/.idx`.

    Streams: only the offsets are kept in memory. Both files appear atomically, and only once every
    document has been written; with allow_empty=False, a corpus without a single token raises
    EmptyCorpusError instead, leaving existing files as they were. Returns (n_docs, n_tokens).
    """
    bin_path, idx_path = token_file_paths(path_prefix)
    offsets = array.array("q", [0])
    # The inner .bin is renamed first: a crash before the .idx's rename leaves an .idx whose last offset
    # disagrees with the .bin (TokenFile rejects it).
    with atomic_open(idx_path) as idx_file, atomic_open(bin_path) as bin_file:
        for doc_index, tokens in enumerate(docs_token_lists):
            ids = _doc_array(doc_index, tokens)
            bin_file.write(ids.tobytes())
            offsets.append(offsets[-1] + ids.size)
        if not allow_empty and offsets[-1] == 0:
            state = "existing files were left as they were" if bin_path.exists() else "nothing was written"
            raise EmptyCorpusError(f"{len(offsets) - 1} documents and no tokens to write to {bin_path}; {state}")
        idx_file.write(np.frombuffer(offsets, dtype=np.int64).astype(IDX_DTYPE).tobytes())
    return len(offsets) - 1, offsets[-1]


def prepared_output_prefix(out: str | os.PathLike | None, name: str) -> pathlib.Path:
    """`<out>/<name>` (out None: `default_data_dir()`), checked before any work: ValueError unless the directory
    can be written (it is created when the files are) and `<name>.bin/.idx` are files or absent."""
    directory = pathlib.Path(out).expanduser() if out is not None else default_data_dir()
    given = (f"--out {str(directory)!r}" if out is not None else
             f"LMHP_DATA_DIR {str(directory)!r}" if os.environ.get("LMHP_DATA_DIR") else
             f"the data directory {str(directory)!r}")
    problem = unwritable(directory, directory=True)
    if problem is not None:
        raise ValueError(f"{given} cannot hold the prepared files ({problem}): pass a writable directory, which is "
                         f"created if missing")
    prefix = directory / name
    for path in token_file_paths(prefix):
        problem = unwritable(path, directory=False)
        if problem is not None:
            raise ValueError(f"cannot write {path} ({problem}): remove what is there or pass another --out")
    return prefix


class TokenFile:
    """Read-only view of prepared token files: `len(f)` documents, `f[i]` a uint16 array (memory-mapped)."""

    def __init__(self, path_prefix: str | os.PathLike):
        self.bin_path, self.idx_path = token_file_paths(path_prefix)
        for path in (self.bin_path, self.idx_path):
            if not path.is_file():
                raise FileNotFoundError(f"prepared token file {str(path)!r} does not exist")
        self.offsets = _memmap(self.idx_path, IDX_DTYPE)
        self.tokens = _memmap(self.bin_path, BIN_DTYPE)
        if self.offsets.size == 0 or self.offsets[0] != 0 or self.offsets[-1] != self.tokens.size:
            raise ValueError(
                f"{str(self.idx_path)!r} does not match {str(self.bin_path)!r} (offsets must start at 0 and end at "
                f"the .bin's {self.tokens.size} tokens): the pair is corrupt or from different runs; prepare it again")
        if np.any(np.diff(self.offsets) < 0):
            raise ValueError(f"{str(self.idx_path)!r} has decreasing offsets: it is corrupt; prepare it again")
        self.n_docs = self.offsets.size - 1
        self.n_tokens = int(self.tokens.size)

    def __len__(self) -> int:
        return self.n_docs

    def __getitem__(self, doc_index: int) -> np.ndarray:
        """Token ids of document `doc_index` (a uint16 view into the memory map)."""
        if not 0 <= doc_index < self.n_docs:
            raise IndexError(f"document {doc_index} out of range: {self.bin_path} holds {self.n_docs} documents")
        return self.tokens[self.offsets[doc_index]:self.offsets[doc_index + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(self.n_docs))


def _memmap(path: pathlib.Path, dtype: np.dtype) -> np.ndarray:
    """A read-only memory map of a whole file (an empty array for an empty file, which mmap refuses)."""
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ValueError(f"{str(path)!r} has {size} bytes, not a multiple of {dtype.itemsize} ({dtype}): it is "
                         f"truncated or corrupt; prepare it again")
    if size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _encode_main(text: str) -> list[int]:
    """GPT-2 token ids of `text` (a top-level function, so process pools can pickle it)."""
    return get_encoding("main").encode(text)


def encode_texts(texts: Iterable[str], *, workers: int = 1, window: int = 2048) -> Iterator[list[int]]:
    """GPT-2 token ids of each text, in order; `workers` > 1 encodes `window` texts at a time in a process pool."""
    _check_positive_int("workers", workers)
    if workers == 1:
        yield from map(_encode_main, texts)
        return
    iterator = iter(texts)
    with multiprocessing.Pool(workers) as pool:
        # Fixed-size windows keep memory bounded (Pool.imap would read the whole input ahead).
        while chunk := list(itertools.islice(iterator, window)):
            yield from pool.map(_encode_main, chunk, chunksize=max(1, len(chunk) // (4 * workers)))


def write_prepared_texts(path_prefix: str | os.PathLike, texts: Iterable[str], *, workers: int = 1,
                         total: int | None = None, desc: str | None = None) -> tuple[int, int]:
    """Encode texts with GPT-2's BPE and write them as prepared token files, with a progress bar.

    Returns (n_docs, n_tokens); EmptyCorpusError, writing nothing, if the texts hold no token at all.
    """
    with tqdm(total=total, unit="doc", desc=desc or pathlib.Path(path_prefix).name) as bar:
        def counted(docs):
            for doc in docs:
                bar.update(1)
                yield doc
        return write_token_file(path_prefix, counted(encode_texts(texts, workers=workers)), allow_empty=False)


def format_summary(path_prefix: str | os.PathLike, n_docs: int, n_tokens: int, skipped: int) -> str:
    """The one-line summary the preparation scripts print."""
    bin_path, idx_path = token_file_paths(path_prefix)
    return (f"wrote {bin_path} and {idx_path.name}: documents {n_docs}, tokens {n_tokens}, skipped {skipped}")


# ----------------------------------------------------------------------------------------------------------
# Query construction


def make_query(tokens: Sequence[int] | np.ndarray, query_length: int, *, start_token: int | None,
               end_token: int | None, padding_token: int) -> np.ndarray | None:
    """One document's query (int64 [query_length]), or None when the document is skipped (§7.1 steps 2-5).

    Start: drop everything up to and including the first start token, unless it is the last token (then keep
    all); skip if absent. Cut to query_length. End: cut right after the last end token within the window; skip
    if absent. Right-pad with padding_token.
    """
    tokens = np.asarray(tokens)
    if start_token is not None:
        hits = np.flatnonzero(tokens == start_token)
        if hits.size == 0:
            return None
        first_index = int(hits[0]) + 1
        if first_index < tokens.size:
            tokens = tokens[first_index:]
    tokens = tokens[:query_length]
    if end_token is not None:
        hits = np.flatnonzero(tokens == end_token)
        if hits.size == 0:
            return None
        tokens = tokens[:int(hits[-1]) + 1]
    query = np.full(query_length, padding_token, dtype=np.int64)
    query[:tokens.size] = tokens
    return query


def shuffled_order(n_docs: int, seed: int = SHUFFLE_SEED) -> np.ndarray:
    """The permutation `random.Random(seed).shuffle(list(range(n_docs)))` produces, as int64 [n_docs]."""
    order = array.array("q", range(n_docs))  # 8 bytes per document, unlike a list of ints
    random.Random(seed).shuffle(order)
    return np.frombuffer(order, dtype=np.int64)


def prepare_command(dataset: str, file_mode: str, data_dir: pathlib.Path) -> str:
    """The command that writes the prepared files of `dataset` in `file_mode` to `data_dir`."""
    command = f"python datasets/{dataset}.py --mode {file_mode}"
    if data_dir.resolve() != default_data_dir().resolve():
        command += f" --out {data_dir}"
    return command


def resolve_token_file(dataset: str, mode: str, data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The path prefix of the prepared files that `dataset` in `mode` reads (existence is not checked).

    `dataset` is 'books', 'cnndm' or 'tldr' (files in data_dir), or a path prefix containing a path separator
    (files `<dataset>_<mode>.bin/.idx`).
    """
    if os.sep in dataset or (os.altsep and os.altsep in dataset):
        return pathlib.Path(f"{dataset}_{mode}")
    if dataset not in DATASET_MODES:
        raise ValueError(f"unknown dataset {dataset!r}: valid names are {sorted(DATASET_MODES) + [TEST_DATASET]}, "
                         f"or a path prefix of prepared files such as 'path/to/corpus' (reads corpus_<mode>.bin/.idx)")
    modes = DATASET_MODES[dataset]
    if mode not in modes:
        raise ValueError(f"dataset {dataset!r} has no mode {mode!r}: valid modes are {sorted(modes)}")
    directory = pathlib.Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return directory / f"{dataset}_{modes[mode]}"


def open_token_file(dataset: str, mode: str, data_dir: str | os.PathLike | None = None) -> TokenFile:
    """The prepared files of `dataset` in `mode`; FileNotFoundError naming the file and the command to prepare it."""
    prefix = resolve_token_file(dataset, mode, data_dir)
    bin_path, idx_path = token_file_paths(prefix)
    missing = [str(p) for p in (bin_path, idx_path) if not p.is_file()]
    if missing:
        if dataset in DATASET_MODES:
            how = f"prepare it with `{prepare_command(dataset, DATASET_MODES[dataset][mode], prefix.parent)}`"
        else:
            how = ("write it with lm_human_preferences.language.datasets.write_token_file(path_prefix, docs), "
                   "or pass an existing path prefix as the dataset")
        raise FileNotFoundError(f"prepared dataset file {missing[0]!r} not found for dataset {dataset!r}, "
                                f"mode {mode!r}: {how}")
    return TokenFile(prefix)


class _DocumentStream:
    """Documents of a token file in shuffled order, repeated forever; item p is document order[p % n]."""

    def __init__(self, token_file: TokenFile):
        self.token_file = token_file
        self.order = shuffled_order(len(token_file))

    def item(self, position: int) -> np.ndarray:
        return self.token_file[int(self.order[position % self.order.size])]


class _TestStringStream:
    """The original's 'test' dataset: endless random 40-char strings over 'a-z.', encoded; seeded with 0."""

    def __init__(self, encoding):
        self.encoding = encoding
        self.rng = random.Random(SHUFFLE_SEED)

    def next_item(self) -> list[int]:
        text = "".join(self.rng.choice(TEST_ALPHABET) for _ in range(TEST_STRING_LENGTH))
        return self.encoding.encode(text)

    def get_state(self) -> list:
        version, internal, gauss = self.rng.getstate()
        return [version, list(internal), gauss]

    def set_state(self, state: Sequence) -> None:
        version, internal, gauss = state
        self.rng.setstate((version, tuple(internal), gauss))


def _check_positive_int(name: str, value) -> None:
    """ValueError unless `value` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class QuerySampler:
    """Batches of queries [batch_size, query_length] (int64, right-padded) for the ranks `ranks` of `world_size`
    (ORIGINAL §7.1).

    dataset: 'books' | 'cnndm' | 'tldr' (prepared files in data_dir), 'test' (random strings, no files), or a
    path prefix of prepared files. start_text / end_text: None, or a text that encodes to one token.
    batch_size is per rank. Ranks see disjoint interleavings of one stream: kept query k goes to rank
    k % world_size (the original's `shard(world_size, rank)`). A batch holds each of `ranks` in turn (batch_size
    rows each) and consumes exactly batch_size * world_size kept queries, so every sampler of the same stream is at
    the same position whatever ranks it serves: one position resumes any of them.
    """

    def __init__(self, dataset: str, mode: str, encoding, query_length: int, start_text: str | None = None,
                 end_text: str | None = None, batch_size: int = 1, ranks: Sequence[int] = (0,), world_size: int = 1,
                 data_dir: str | os.PathLike | None = None):
        _check_positive_int("query_length", query_length)
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("world_size", world_size)
        ranks = list(ranks)
        if not ranks or len(set(ranks)) != len(ranks) or any(
                isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 0 <= r < world_size for r in ranks):
            raise ValueError(f"ranks must be distinct integers in [0, world_size={world_size}), got {ranks!r}")
        self.dataset = dataset
        self.mode = mode
        self.encoding = encoding
        self.query_length = int(query_length)
        self.batch_size = int(batch_size)
        self.ranks = [int(r) for r in ranks]
        self.world_size = int(world_size)
        self.start_token = None if start_text is None else encoding.encode_single_token(start_text)
        self.end_token = None if end_text is None else encoding.encode_single_token(end_text)
        self.padding_token = encoding.padding_token
        if dataset == TEST_DATASET:
            self._test_stream = _TestStringStream(encoding)
            self._docs = None
            self.source = TEST_DATASET
        else:
            self._test_stream = None
            self._docs = _DocumentStream(open_token_file(dataset, mode, data_dir))
            self.source = str(self._docs.token_file.bin_path)
            if len(self._docs.token_file) == 0:
                raise ValueError(f"dataset {dataset!r} mode {mode!r} ({self.source}) has no documents: "
                                 f"prepare it again from a non-empty source")
        self.position = 0  # raw documents/strings consumed from the infinite stream
        self.kept = 0  # kept queries of the infinite stream seen so far (all ranks' shares)
        self._kept_at_pass_start = 0

    def _no_queries_error(self, looked_at: str) -> ValueError:
        return ValueError(
            f"dataset {self.dataset!r} mode {self.mode!r} ({self.source}) yields no valid queries: {looked_at} "
            f"has start token {self.start_token} (start_text) and, within the first {self.query_length} tokens "
            f"after it, end token {self.end_token} (end_text); use other start_text/end_text (or None) or another "
            f"dataset")

    def _next_item(self):
        """The next raw token sequence of the infinite stream; raises if a whole pass kept nothing."""
        if self._test_stream is not None:
            item = self._test_stream.next_item()
        else:
            n_docs = len(self._docs.token_file)
            if self.position % n_docs == 0 and self.position > 0:
                if self.kept == self._kept_at_pass_start:
                    raise self._no_queries_error(f"none of its {n_docs} documents")
                self._kept_at_pass_start = self.kept
            item = self._docs.item(self.position)
        self.position += 1
        return item

    def _next_kept_query(self) -> tuple[int, np.ndarray]:
        """(k, query) for the next kept query of the infinite stream."""
        skipped = 0
        while True:
            query = make_query(self._next_item(), self.query_length, start_token=self.start_token,
                               end_token=self.end_token, padding_token=self.padding_token)
            if query is not None:
                k = self.kept
                self.kept += 1
                return k, query
            skipped += 1
            if self._test_stream is not None and skipped >= MAX_CONSECUTIVE_TEST_SKIPS:
                raise self._no_queries_error(f"none of {skipped} consecutive random strings")

    def _check_vocabulary(self, query: np.ndarray) -> None:
        """ValueError if a prepared file holds ids outside the encoding (prepared with another encoding)."""
        tokens = query[query != self.padding_token]
        if tokens.size and int(tokens.max()) >= self.encoding.n_vocab:
            raise ValueError(f"{self.source} holds token id {int(tokens.max())}, outside the {self.encoding.name!r} "
                             f"encoding's {self.encoding.n_vocab} ids: it was prepared with another encoding; "
                             f"prepare it again or use the matching encoding")

    def next_batch(self) -> np.ndarray:
        """The next [len(ranks) * batch_size, query_length] int64 batch: each rank's next batch_size queries, in
        the order of `ranks`."""
        slot = {rank: i for i, rank in enumerate(self.ranks)}
        batch = np.empty((len(self.ranks), self.batch_size, self.query_length), dtype=np.int64)
        for row in range(self.batch_size * self.world_size):
            k, query = self._next_kept_query()
            i = slot.get(k % self.world_size)
            if i is not None:
                if self._docs is not None:
                    self._check_vocabulary(query)
                batch[i, row // self.world_size] = query
        return batch.reshape(-1, self.query_length)

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """The stream position (plain Python values), enough to resume exactly with `load_state_dict`."""
        state = dict(dataset=self.dataset, mode=self.mode, world_size=self.world_size, position=self.position,
                     kept=self.kept, kept_at_pass_start=self._kept_at_pass_start)
        if self._test_stream is not None:
            state["rng_state"] = self._test_stream.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()` of a sampler with the same dataset, mode and world size (any ranks)."""
        for key in ("dataset", "mode", "world_size"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"cannot resume query sampler: saved {key}={state.get(key)!r} but this sampler has "
                                 f"{key}={getattr(self, key)!r}; resume with the same {key} (the stream position "
                                 f"is only exact for an identical configuration)")
        if self._test_stream is not None:
            if "rng_state" not in state:
                raise ValueError("cannot resume the 'test' query sampler: the saved state has no 'rng_state'")
            self._test_stream.set_state(state["rng_state"])
        self.position = int(state["position"])
        self.kept = int(state["kept"])
        self._kept_at_pass_start = int(state["kept_at_pass_start"])
