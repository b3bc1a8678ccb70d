"""demo/corpus.py: reading, cleaning, splitting and encoding the fortunes."""
from pathlib import Path

import pytest

from lm_human_preferences.demo import corpus
from lm_human_preferences.language.datasets import TokenFile
from lm_human_preferences.language.encodings import get_encoding

ROOT = Path(__file__).resolve().parents[2]


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


# ---- corpora too small for the demo -------------------------------------------------------------------------

def check(directory):
    """check_corpus with the demo's settings (pretraining windows of 65 tokens, 24-token queries between periods)."""
    return corpus.check_corpus(directory, window=65, query_length=24, start_text=".", end_text=".")


def write_entries(directory: Path, entries) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fortunes").write_text("".join(f"{e}\n%\n" for e in entries))
    return directory


def write_empty_files(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "a").write_text("")
    (directory / "b").write_text("%\n  \n%\n")
    return directory


SENTENCE = "The cat sat on the mat. It was happy there, as cats are when the sun is warm."


@pytest.mark.parametrize("entries, message", [
    (None, r"the 2 fortune file\(s\) in .* hold no entries"),
    (["one.", "two.", "three."], "has 3 entries, too few to split .*queries_train would be empty"),
    ([SENTENCE] * 4, "has 4 entries, too few to split"),
    (["Short."] * 40, "queries_test part .* holds 12 tokens, fewer than one pretraining window of 65"),
    (["no period in this entry at all but words " * 3] * 300, "makes no query"),
])
def test_a_corpus_too_small_for_the_demo_is_one_clear_error(tmp_path, entries, message):
    if entries is None:
        write_empty_files(tmp_path / "c")
    else:
        write_entries(tmp_path / "c", entries)
    with pytest.raises(corpus.CorpusError, match=message) as info:
        check(tmp_path / "c")
    assert "pass --corpus_dir with more '%'-separated entries" in str(info.value)
    assert "apt-get install fortunes" in str(info.value) and "\n" not in str(info.value)


def test_a_corpus_large_enough_passes(tmp_path):
    assert check(write_entries(tmp_path / "c", [SENTENCE] * 40)) == 40


@pytest.mark.parametrize("entries", [None, ["one.", "two.", "three."]])
def test_launch_demo_refuses_a_corpus_too_small_before_any_stage(tmp_path, monkeypatch, capsys, entries):
    monkeypatch.syspath_prepend(str(ROOT))
    import launch
    corpus_dir = write_empty_files(tmp_path / "c") if entries is None else write_entries(tmp_path / "c", entries)
    cache = tmp_path / "cache"
    assert launch.main(["demo", "--fast", "--corpus_dir", str(corpus_dir), "--cache_dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the ") and str(corpus_dir) in err and err.count("\n") == 1  # one line
    assert not cache.exists()  # nothing written
