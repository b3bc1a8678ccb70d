"""demo/corpus.py: reading, cleaning, splitting and encoding the fortunes."""
from pathlib import Path

import pytest

from lm_human_preferences.demo import corpus
from lm_human_preferences.language.datasets import TokenFile
from lm_human_preferences.language.encodings import get_encoding


def write_fortunes(directory: Path) -> Path:
    """A tiny fortunes directory: two files, a .dat index and a .u8 link that must be skipped."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "wisdom").write_text("A first\n\tentry.\n%\nSecond _\x08u_\x08n entry. It has two sentences.\n%\n\n%\n")
    (directory / "love").write_text("Love is patient.\n%\nLove is kind. And more.\n")
    (directory / "wisdom.dat").write_bytes(b"\x00\x01binary")
    (directory / "wisdom.u8").symlink_to(directory / "wisdom")
    (directory / "ascii-art").write_text("  /\\_/\\\n ( o.o )\n%\n")
    return directory


def test_clean_entry_removes_overstrike_and_collapses_whitespace():
    assert corpus.clean_entry("  _\x08b_\x08o_\x08l_\x08d\n\ttext  ") == "bold text"


def test_read_fortunes_reads_text_files_only(tmp_path):
    entries = corpus.read_fortunes(write_fortunes(tmp_path / "f"))
    assert entries == ["Love is patient.", "Love is kind. And more.", "A first entry.",
                       "Second un entry. It has two sentences."]


def test_missing_corpus_says_how_to_install(tmp_path):
    with pytest.raises(corpus.CorpusMissingError, match="apt-get install fortunes"):
        corpus.read_fortunes(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(corpus.CorpusMissingError, match="apt-get install fortunes"):
        corpus.fortune_files(tmp_path / "empty")


def test_split_corpus_is_disjoint_complete_and_deterministic():
    entries = [f"entry {i}." for i in range(1000)]
    parts = corpus.split_corpus(entries)
    assert [len(parts[n]) for n in corpus.SPLIT_NAMES] == [700, 200, 100]
    assert sorted(sum(parts.values(), [])) == sorted(entries)
    assert parts == corpus.split_corpus(list(entries))
    assert parts != corpus.split_corpus(entries, seed=1)


def test_prepare_corpus_writes_token_files_the_query_sampler_reads(tmp_path):
    stats = corpus.prepare_corpus(write_fortunes(tmp_path / "f"), tmp_path / "corpus")
    assert sum(s["documents"] for s in stats.values()) == 4
    enc = get_encoding("main")
    docs = [enc.decode(d) for name in corpus.SPLIT_NAMES for d in TokenFile(tmp_path / "corpus" / name)]
    assert sorted(docs) == sorted(corpus.read_fortunes(tmp_path / "f"))
    assert all(p.is_file() for p in corpus.corpus_files(tmp_path / "corpus"))
