"""The dataset preparation scripts datasets/{books,cnndm,tldr}.py (ORIGINAL §7.2-7.5), offline.

Downloads run against a local HTTP server serving fixtures in OpenAI's layout and formats, with injected
failures (HTTP 500 once, a truncated transfer once) that the downloader must retry.
"""

import hashlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

import params
from lm_human_preferences.language.datasets import QuerySampler, TokenFile, make_query
from lm_human_preferences.language.encodings import get_encoding
from lm_human_preferences.utils.download import DownloadError

REPO = pathlib.Path(__file__).resolve().parents[2]
ENC = get_encoding("main")
DOT = ENC.encode_single_token(".")


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


local_http = load_module(REPO / "tests" / "fixtures" / "local_http.py", "lmhp_test_local_http")
books = load_module(REPO / "datasets" / "books.py", "lmhp_prepare_books")
cnndm = load_module(REPO / "datasets" / "cnndm.py", "lmhp_prepare_cnndm")
tldr = load_module(REPO / "datasets" / "tldr.py", "lmhp_prepare_tldr")


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with local_http.LocalServer() as s:
        yield s


def decoded_docs(prefix):
    return [ENC.decode(doc) for doc in TokenFile(prefix)]


# --- cnndm cleaning: each of the 9 steps of §7.3 -------------------------------------------------------------

def test_clean_step1_drops_two_byline_lines():
    assert cnndm.clean_up_start("By Jane Doe\nPUBLISHED: yesterday\nThe story begins.") == "The story begins."


def test_clean_step2_keeps_text_after_the_last_cnn_dash():
    # step 3 alone would leave "-- The Senate voted."
    assert cnndm.clean_up_start("WASHINGTON (CNN) -- Old. (CNN)  -- The Senate voted.") == "The Senate voted."


def test_clean_step3_cnn_dateline_only_within_the_first_100_chars():
    assert cnndm.clean_up_start("HONG KONG (CNN)Markets fell.") == "Markets fell."
    late = "x" * 100 + " (CNN)kept"
    assert cnndm.clean_up_start(late) == late


def test_clean_step4_drops_a_leading_and_word_line():
    assert cnndm.clean_up_start("and more\nThe article text.") == "The article text."


def test_clean_step5_updated_header_including_the_character_class_quirk():
    header = "PUBLISHED: 10:07 EST, 2 April 2013 | UPDATED: 11:08 EST, 2 April 2013\nThe man was arrested."
    assert cnndm.clean_up_start(header) == "The man was arrested."
    # [2011|2012|...] is a character class: the match ends at the last '1' of "2019", leaving "9".
    assert cnndm.clean_up_start("UPDATED: 11:08 EST, 3 May 2019\nThe man.") == "9\nThe man."


def test_clean_step6_straightens_single_curly_quotes_and_strips():
    assert cnndm.clean_up_start("  It\u2019s \u2018here\u2019  \n") == "It's 'here'"


def test_clean_step7_applies_ftfy():
    assert cnndm.clean_up_start("The caf\u00c3\u00a9 opened.") == "The caf\u00c3\u00a9 opened."
    assert cnndm.clean_story("The caf\u00c3\u00a9 opened.") == "The caf\u00e9 opened."


def test_clean_step8_collapses_three_or_more_newlines():
    assert cnndm.clean_story("First.\n\n\n\nSecond.\n\nThird.") == "First.\n\nSecond.\n\nThird."


def test_clean_step9_cuts_at_the_first_highlight():
    assert cnndm.clean_story("Body text.\n\n@highlight\n\nA point\n\n@highlight\n\nB") == "Body text."


def test_story_paths_follow_the_site_rule():
    sha1 = lambda u: hashlib.sha1(u.encode()).hexdigest()  # noqa: E731
    for url, site in [("http://www.dailymail.co.uk/a.html", "dailymail"), ("http://mailonsunday.ie/b", "dailymail"),
                      ("http://lib.store.yahoo.net/c", "dailymail"), ("http://www.cnn.com/d", "cnn"),
                      ("http://cnn.hk/e", "cnn")]:
        assert cnndm.get_path_of_url(url) == f"{site}/stories/{sha1(url)}.story"
    with pytest.raises(ValueError, match="neither Daily Mail"):
        cnndm.get_path_of_url("http://example.com/f")


# --- cnndm download path -----------------------------------------------------------------------------------

CNNDM_URLS = [
    "http://www.cnn.com/2013/05/01/politics/senate-vote/index.html",
    "http://www.dailymail.co.uk/news/article-123/Man-arrested.html",
    "http://www.cnn.com/2013/05/02/us/missing-story/index.html",
    "http://edition.cnn.hk/2014/asia/markets/index.html",
]
CNNDM_STORIES = {
    0: ("Washington (CNN) -- The Senate voted 60-40 on Tuesday.\n\nThe bill now goes to the House.\n\n"
        "@highlight\n\nSenate passes the bill\n\n@highlight\n\nHouse votes next week\n"),
    1: ("By Daily Mail Reporter\n\nPUBLISHED: 10:07 EST, 2 April 2013 | UPDATED: 11:08 EST, 2 April 2013\n\n"
        "A man was arrested after a chase.\n\n\n\nPolice said he was \u201cdangerous\u201d.\n\n@highlight\n\nMan arrested\n"),
    3: "HONG KONG (CNN)Asian markets fell on Monday.\n\n@highlight\n\nMarkets fall\n",
}
CNNDM_CLEAN = [
    "The Senate voted 60-40 on Tuesday.\n\nThe bill now goes to the House.",
    'A man was arrested after a chase.\n\nPolice said he was "dangerous".',
    "Asian markets fell on Monday.",
]


def serve_cnndm(server, split="val"):
    root = "/lm-human-preferences/datasets/cnndm"
    server.add(f"{root}/url_lists/all_{split}.txt", "\n".join(CNNDM_URLS) + "\n")
    paths = []
    for i, url in enumerate(CNNDM_URLS):
        site = "dailymail" if "dailymail" in url else "cnn"
        paths.append(f"{root}/cache_{split}/{site}/stories/{hashlib.sha1(url.encode()).hexdigest()}.story")
        if i in CNNDM_STORIES:
            server.add(paths[-1], CNNDM_STORIES[i])
    return f"{root}/url_lists/all_{split}.txt", paths


def test_cnndm_downloads_url_list_and_stories_with_retries(server, tmp_path, capsys):
    list_path, story_paths = serve_cnndm(server)
    server.fail(list_path, "truncate")
    server.fail(story_paths[0], "status500")
    out = tmp_path / "data"
    result = cnndm.main(["--mode", "valid", "--base_url", server.url("/lm-human-preferences"), "--out", str(out),
                         "--download_threads", "2"])
    assert result[0] == 3 and result[2] == 1  # the missing story (HTTP 404) is skipped
    assert decoded_docs(out / "cnndm_valid") == CNNDM_CLEAN  # URL-list order
    assert server.count(list_path) == 2 and server.count(story_paths[0]) == 2  # retried once each
    assert server.count(story_paths[2]) == 1  # a 404 is not retried
    printed = capsys.readouterr().out
    assert "documents 3" in printed and "skipped 1" in printed


def test_cnndm_max_docs_downloads_only_the_first_stories(server, tmp_path):
    _, story_paths = serve_cnndm(server, split="test")
    cnndm.main(["--mode", "test", "--base_url", server.url("/lm-human-preferences"), "--out", str(tmp_path),
                "--max_docs", "2", "--download_threads", "1"])
    assert decoded_docs(tmp_path / "cnndm_test") == CNNDM_CLEAN[:2]
    assert server.count(story_paths[3]) == 0


def test_cnndm_hf_source_without_the_library_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[data\]"):
        cnndm.main(["--source", "hf", "--out", str(tmp_path)])


# --- tldr ----------------------------------------------------------------------------------------------------

TLDR_RECORDS = [
    {"id": "t3_1", "subreddit": "relationships", "title": "Advice?",
     "content": "My girlfriend and I argued.\n\n\n\nWhat should I do?  ", "summary": "argued, need advice"},
    {"id": "t3_2", "subreddit": "tifu", "title": "TIFU", "content": "I don\u00e2\u20ac\u2122t know how this happened.",
     "summary": "oops"},
    {"id": "t3_3", "subreddit": "AskReddit", "title": "Q", "content": "  Plain text.\n", "summary": "q"},
]
TLDR_CLEAN = ["My girlfriend and I argued.\n\nWhat should I do?", "I don't know how this happened.", "Plain text."]


def test_tldr_train_download_retries_http_500(server, tmp_path):
    path = "/lm-human-preferences/tldr/train-subset.json"
    server.add(path, json.dumps(TLDR_RECORDS))
    server.fail(path, "status500")
    n_docs, n_tokens, skipped = tldr.main(["--base_url", server.url("/lm-human-preferences"), "--out", str(tmp_path)])
    assert (n_docs, skipped) == (3, 0) and n_tokens == sum(len(ENC.encode(t)) for t in TLDR_CLEAN)
    assert decoded_docs(tmp_path / "tldr_train") == TLDR_CLEAN
    assert server.count(path) == 2


def test_tldr_test_mode_reads_valid_subset_and_retries_a_truncated_transfer(server, tmp_path):
    path = "/lm-human-preferences/tldr/valid-subset.json"
    server.add(path, json.dumps(TLDR_RECORDS[::-1]))
    server.fail(path, "truncate")
    tldr.main(["--mode", "test", "--base_url", server.url("/lm-human-preferences"), "--out", str(tmp_path)])
    assert decoded_docs(tmp_path / "tldr_valid") == TLDR_CLEAN[::-1]
    assert server.count(path) == 2


def test_tldr_corrupt_download_is_rejected_and_not_cached(server, tmp_path):
    source = server.add("/corrupt/train-subset.json", json.dumps(TLDR_RECORDS)[:-20])
    with pytest.raises(DownloadError, match=r"did not give JSON: it is not valid JSON"):
        tldr.main(["--source", source, "--out", str(tmp_path)])
    assert not (tmp_path / "tldr_train.bin").exists()
    assert not (tmp_path / "cache").exists() or not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_tldr_corrupt_local_file_is_rejected_with_its_path(tmp_path):
    source = tmp_path / "train-subset.json"
    source.write_text(json.dumps(TLDR_RECORDS)[:-20])
    with pytest.raises(ValueError, match=r"train-subset.json' is not valid JSON.*corrupt or truncated"):
        tldr.main(["--source", str(source), "--out", str(tmp_path)])
    assert not (tmp_path / "tldr_train.bin").exists()


def test_tldr_record_without_content_is_rejected(tmp_path):
    source = tmp_path / "bad.json"
    source.write_text(json.dumps([{"content": "ok"}, {"body": "no content"}]))
    with pytest.raises(ValueError, match="record 1: expected an object with a string 'content'"):
        tldr.main(["--source", str(source), "--out", str(tmp_path)])


def test_tldr_script_runs_as_a_command(tmp_path):
    source = tmp_path / "posts.json"
    source.write_text(json.dumps(TLDR_RECORDS))
    env = {**os.environ, "LMHP_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "datasets/tldr.py", "--source", str(source), "--out", str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "documents 3, tokens" in result.stdout and "skipped 0" in result.stdout
    assert decoded_docs(tmp_path / "tldr_train") == TLDR_CLEAN


# --- books ---------------------------------------------------------------------------------------------------

PASSAGES = [f"Sentence {i} opens. The middle part of passage {i} follows. It ends here." for i in range(4)]


def test_books_jsonl_in_openai_format_split_by_held_out_fraction(tmp_path):
    source = tmp_path / "passages.jsonl"
    lines = [json.dumps(p) for p in PASSAGES[:3]] + ["", json.dumps({"text": PASSAGES[3]})]
    source.write_text("\n".join(lines) + "\n")
    common = ["--source", str(source), "--out", str(tmp_path), "--test_fraction", "0.25"]
    assert books.main(["--mode", "train"] + common)[0] == 3
    assert books.main(["--mode", "test"] + common)[0] == 1
    assert decoded_docs(tmp_path / "books_train") == PASSAGES[:3]
    assert decoded_docs(tmp_path / "books_test") == PASSAGES[3:]


def test_books_txt_paragraphs_are_passages(tmp_path):
    source = tmp_path / "book.txt"
    source.write_text("First line of one.\nSecond line of one.\n\n\n  \nPassage two.\n\nPassage three.")
    books.main(["--source", str(source), "--out", str(tmp_path), "--test_fraction", "0.3", "--max_docs", "5"])
    assert decoded_docs(tmp_path / "books_train") == ["First line of one. Second line of one.", "Passage two."]


def test_books_per_mode_url_is_taken_whole(server, tmp_path):
    server.add("/mirror/book_passages/test.jsonl", "\n".join(json.dumps(p) for p in PASSAGES))
    books.main(["--mode", "test", "--source", server.url("/mirror/book_passages/{mode}.jsonl"), "--out", str(tmp_path)])
    assert decoded_docs(tmp_path / "books_test") == PASSAGES


def test_books_lost_openai_url_explains_and_suggests_hf(server, tmp_path):
    url = server.url("/lm-human-preferences/datasets/book_passages/train.jsonl")  # not served: 404, like Azure
    with pytest.raises(DownloadError, match=r"HTTP 404.*lost.*--source hf"):
        books.main(["--source", url, "--out", str(tmp_path)])


def test_books_hf_source_without_the_library_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[data\]"):
        books.main(["--out", str(tmp_path)])


def test_bookcorpus_sentences_are_detokenized_and_grouped_into_passages():
    sentences = ["`` i do n't know . ''", "she said , smiling .", "", "it 's late .", "( maybe ) he left ...",
                 "the end ."]
    assert books.detokenize(sentences[0]) == '"i don\'t know."'
    passages = list(books.group_sentences(sentences, 4))
    assert passages == ['"i don\'t know." she said, smiling. it\'s late.', "(maybe) he left... the end."]


def test_grouped_passages_get_start_and_end_trimming():
    sentences = [f"this is sentence number {i} of the book ." for i in range(8)]
    passage = next(books.group_sentences(sentences, 8))
    query = make_query(ENC.encode(passage), 24, start_token=DOT, end_token=DOT, padding_token=ENC.padding_token)
    text = ENC.decode(query)
    assert text.startswith(" this is sentence number 1 ") and text.endswith(".")


def test_held_out_split_is_the_tail():
    assert books.held_out_range(100, "test", 0.01) == range(99, 100)
    assert books.held_out_range(100, "train", 0.01) == range(0, 99)
    assert books.held_out_range(1, "train", 0.01) == range(0, 1)


# --- an empty source never replaces a good prepared file -------------------------------------------------------

def prepared_bytes(prefix):
    return [pathlib.Path(f"{prefix}{suffix}").read_bytes() for suffix in (".bin", ".idx")]


@pytest.fixture
def good_books(tmp_path):
    """A good prepared books_train/books_test in tmp_path/data, as bytes."""
    source = tmp_path / "good.jsonl"
    source.write_text("\n".join(json.dumps(p) for p in PASSAGES) + "\n")
    for mode in ("train", "test"):
        books.main(["--mode", mode, "--source", str(source), "--out", str(tmp_path / "data"),
                    "--test_fraction", "0.25"])
    return {mode: prepared_bytes(tmp_path / "data" / f"books_{mode}") for mode in ("train", "test")}


@pytest.mark.parametrize("name, text, mode", [
    ("empty.txt", "", "train"), ("blank.txt", "\n  \n\n\t\n", "train"), ("empty.jsonl", "\n\n", "train"),
    ("empty_strings.jsonl", '""\n"  "\n', "train"),  # documents, but not one token
    ("one.txt", "A single passage.", "test"),  # the held-out share of one passage is empty
])
def test_books_empty_source_is_refused_and_keeps_the_prepared_file(tmp_path, good_books, name, text, mode):
    source = tmp_path / name
    source.write_text(text)
    with pytest.raises(ValueError, match=rf"books source '.*{name}' gives no text for mode '{mode}'"):
        books.main(["--mode", mode, "--source", str(source), "--out", str(tmp_path / "data")])
    assert prepared_bytes(tmp_path / "data" / f"books_{mode}") == good_books[mode]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "books_test.bin", "books_test.idx", "books_train.bin", "books_train.idx"]  # no temporary file left


@pytest.mark.parametrize("records", [[], [{"content": ""}, {"content": " \n\n "}]])
def test_tldr_empty_source_is_refused_and_keeps_the_prepared_file(tmp_path, records):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(TLDR_RECORDS))
    tldr.main(["--source", str(good), "--out", str(tmp_path / "data")])
    before = prepared_bytes(tmp_path / "data" / "tldr_train")
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"tldr source '.*empty.json' gives no text"):
        tldr.main(["--source", str(empty), "--out", str(tmp_path / "data")])
    assert prepared_bytes(tmp_path / "data" / "tldr_train") == before


def test_cnndm_with_every_story_missing_is_refused(server, tmp_path):
    root = "/lm-human-preferences/datasets/cnndm"
    server.add(f"{root}/url_lists/all_test.txt", CNNDM_URLS[2] + "\n")  # its story is not served (404)
    with pytest.raises(ValueError, match=r"cnndm source .*all_test.txt' gives no text .*1 stories missing"):
        cnndm.main(["--mode", "test", "--base_url", server.url("/lm-human-preferences"), "--out", str(tmp_path)])
    assert not (tmp_path / "cnndm_test.bin").exists()


@pytest.mark.parametrize("script, args", [
    ("books.py", ["--source", "{tmp}/empty.txt"]),
    ("tldr.py", ["--source", "{tmp}/empty.json"]),
    ("books.py", ["--source", "{tmp}/good.txt", "--out", "{tmp}/a_file"]),
    ("tldr.py", ["--source", "{tmp}/good.json", "--out", "{tmp}/a_file/below"]),
    ("cnndm.py", ["--out", "{tmp}/a_file"]),
    ("books.py", ["--source", "{tmp}/good.txt", "--out", "{tmp}/bin_is_a_dir"]),
])
def test_scripts_exit_2_with_one_line_and_keep_the_prepared_file(tmp_path, script, args):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "good.txt").write_text("One passage.\n\nAnother passage.\n")
    (tmp_path / "good.json").write_text(json.dumps(TLDR_RECORDS))
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "bin_is_a_dir" / "books_train.bin").mkdir(parents=True)
    books.main(["--source", str(tmp_path / "good.txt"), "--out", str(tmp_path / "data")])
    tldr.main(["--source", str(tmp_path / "good.json"), "--out", str(tmp_path / "data")])
    before = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}
    env = {**os.environ, "LMHP_CACHE_DIR": str(tmp_path / "cache"), "LMHP_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run([sys.executable, f"datasets/{script}", *(a.format(tmp=tmp_path) for a in args)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    progress = ("books ", "tldr ")
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(progress)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "gives no text" in lines[0] or "cannot hold the prepared files" in lines[0] or "cannot write" in lines[0]
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == before
    assert (tmp_path / "a_file").read_text() == "not a directory"


def test_out_that_is_a_file_is_named_before_any_download(server, tmp_path):
    (tmp_path / "a_file").write_text("x")
    for script in (books, tldr, cnndm):
        with pytest.raises(ValueError, match=r"--out '.*a_file' cannot hold the prepared files \(.*a_file is a file, "
                                             r"not a directory\): pass a writable directory"):
            script.main(["--source", server.url("/never/{mode}.jsonl"), "--out", str(tmp_path / "a_file")]
                        if script is books else ["--base_url", server.url("/never"), "--out", str(tmp_path / "a_file")])
    assert sum(server.count(p) for p in ("/never/train.jsonl", "/never/tldr/train-subset.json",
                                         "/never/datasets/cnndm/url_lists/all_train.txt")) == 0


def test_prepared_files_are_readable_as_the_umask_allows(tmp_path):
    source = tmp_path / "book.txt"
    source.write_text("One passage.\n\nAnother passage.\n")
    old = os.umask(0o022)
    try:
        books.main(["--source", str(source), "--out", str(tmp_path / "shared" / "data")])
    finally:
        os.umask(old)
    for path in (tmp_path / "shared" / "data" / "books_train.bin", tmp_path / "shared" / "data" / "books_train.idx"):
        assert path.stat().st_mode & 0o777 == 0o644
    for path in (tmp_path / "shared", tmp_path / "shared" / "data"):
        assert path.stat().st_mode & 0o777 == 0o755


def test_html_page_in_place_of_tldr_json_is_not_cached(server, tmp_path):
    path = "/lm-human-preferences/tldr/train-subset.json"
    server.add(path, "<!DOCTYPE html>\n<html><body>Service unavailable</body></html>\n")
    with pytest.raises(DownloadError, match="HTML page, not JSON"):
        tldr.main(["--base_url", server.url("/lm-human-preferences"), "--out", str(tmp_path / "data")])
    server.add(path, json.dumps(TLDR_RECORDS))  # the server recovers: the next run downloads again
    assert tldr.main(["--base_url", server.url("/lm-human-preferences"), "--out", str(tmp_path / "data")])[0] == 3
    assert server.count(path) == 2


# --- Hugging Face sources, through `datasets` itself, on Parquet files in the Hub's layouts --------------------

def hf_article(story):
    """The `article` Hugging Face's cnn_dailymail script made of a story file: " ." appended to every line without
    final punctuation, the lines before the first @highlight joined with spaces."""
    end_tokens = (".", "!", "?", "'", "`", '"', "\u2019", "\u201d", ")")
    lines = [line.strip() for line in story.split("\n") if line.strip()]
    lines = lines[:next((i for i, line in enumerate(lines) if line.startswith("@highlight")), len(lines))]
    return " ".join(line if line.endswith(end_tokens) else line + " ." for line in lines)


@pytest.fixture
def hf_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # local files only: never the network
    return datasets


def write_parquet(path, columns):
    import pyarrow as pa  # comes with `datasets`
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()}), path)


@pytest.fixture
def cnndm_parquet(tmp_path, hf_datasets):
    """cnn_dailymail 3.0.0 as abisee/cnn_dailymail holds it: 3.0.0/<split>-0000i-of-0000n.parquet, columns article,
    highlights, id; validation holds the fixture stories, train two shards."""
    root = tmp_path / "hub" / "3.0.0"
    stories = [CNNDM_STORIES[i] for i in sorted(CNNDM_STORIES)]
    ids = [hashlib.sha1(CNNDM_URLS[i].encode()).hexdigest() for i in sorted(CNNDM_STORIES)]
    columns = dict(article=[hf_article(s) for s in stories], highlights=["highlights"] * 3, id=ids)
    write_parquet(root / "validation-00000-of-00001.parquet", columns)
    write_parquet(root / "train-00000-of-00002.parquet", {k: v[:2] for k, v in columns.items()})
    write_parquet(root / "train-00001-of-00002.parquet", {k: v[2:] for k, v in columns.items()})
    return str(root / "{split}-*.parquet")


def test_hf_article_format_has_no_newline_and_the_story_layout_is_restored():
    article = hf_article(CNNDM_STORIES[1])
    assert "\n" not in article and article.startswith("By Daily Mail Reporter . PUBLISHED: 10:07 EST")
    assert cnndm.hf_article_to_story(article).startswith("By Daily Mail Reporter\n\nPUBLISHED: 10:07 EST")
    assert cnndm.split_sentences('Mr. Smith of the U.S. Army left at 3 p.m. on Monday. J. K. Rowling wrote "Go." '
                                 "Then? Yes!") == [
        'Mr. Smith of the U.S. Army left at 3 p.m. on Monday.', 'J. K. Rowling wrote "Go."', "Then?", "Yes!"]


def test_cnndm_hf_parquet_gives_the_story_texts_and_queries(cnndm_parquet, tmp_path):
    n_docs, _, _ = cnndm.main(["--mode", "valid", "--source", "hf", "--hf_files", cnndm_parquet,
                               "--out", str(tmp_path)])
    assert n_docs == 3
    assert decoded_docs(tmp_path / "cnndm_valid") == CNNDM_CLEAN  # what the story files give
    task = params.CNNDM_TASK
    sampler = QuerySampler("cnndm", "valid", ENC, task["query_length"], start_text=task["start_text"],
                           end_text=task["end_text"], batch_size=2, data_dir=tmp_path)
    for query in sampler.next_batch():
        text = ENC.decode([t for t in query if t != ENC.padding_token])
        assert text.endswith("\n") and text.split("\n")[0] in {c.split("\n")[0] for c in CNNDM_CLEAN}


def test_cnndm_hf_train_split_reads_its_shards_in_order(cnndm_parquet, tmp_path):
    cnndm.main(["--mode", "train", "--source", "hf", "--hf_files", cnndm_parquet, "--out", str(tmp_path),
                "--max_docs", "3"])
    assert decoded_docs(tmp_path / "cnndm_train") == CNNDM_CLEAN


def test_cnndm_hf_wrong_columns_or_no_files_name_the_fix(tmp_path, hf_datasets):
    write_parquet(tmp_path / "other" / "test-00000-of-00001.parquet", {"document": ["x"], "summary": ["y"]})
    with pytest.raises(ValueError, match=r"columns \['document', 'summary'\], not cnn_dailymail 3.0.0's "
                                         r"\['article', 'highlights', 'id'\]: pass --hf_files"):
        cnndm.main(["--mode", "test", "--source", "hf", "--hf_files", str(tmp_path / "other" / "{split}-*.parquet"),
                    "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=r"cannot read Hugging Face cnn_dailymail 3.0.0 from .*nowhere.*--hf_files"):
        cnndm.main(["--mode", "test", "--source", "hf", "--hf_files", str(tmp_path / "nowhere" / "{split}-*.parquet"),
                    "--out", str(tmp_path)])
    assert not (tmp_path / "cnndm_test.bin").exists()


def test_cnndm_hf_default_files_are_the_pinned_hub_parquet():
    assert cnndm.HF_FILES == ("hf://datasets/abisee/cnn_dailymail@96df5e686bee6baa90b8bee7c28b81fa3fa6223d/"
                              "3.0.0/{split}-*.parquet")
    assert books.HF_FILES == "hf://datasets/bookcorpus/bookcorpus@refs%2Fconvert%2Fparquet/plain_text/*train/*.parquet"


@pytest.fixture
def bookcorpus_parquet(tmp_path, hf_datasets):
    """bookcorpus's Parquet export: plain_text/train/000i.parquet, one string column `text` of sentences."""
    sentences = [f"`` this is sentence {i} of the book , '' she said ." for i in range(20)]
    write_parquet(tmp_path / "hub" / "plain_text" / "train" / "0000.parquet", {"text": sentences[:12]})
    write_parquet(tmp_path / "hub" / "plain_text" / "train" / "0001.parquet", {"text": sentences[12:]})
    return str(tmp_path / "hub" / "plain_text" / "*train" / "*.parquet"), sentences


def test_books_hf_parquet_passages_and_held_out_split(bookcorpus_parquet, tmp_path):
    files, sentences = bookcorpus_parquet
    common = ["--hf_files", files, "--out", str(tmp_path), "--sentences_per_passage", "4", "--test_fraction", "0.2"]
    assert books.main(["--mode", "train"] + common)[0] == 4
    assert books.main(["--mode", "test"] + common)[0] == 1
    expected = list(books.group_sentences(sentences, 4))
    assert decoded_docs(tmp_path / "books_train") == expected[:4]
    assert decoded_docs(tmp_path / "books_test") == expected[4:]
    assert expected[0].startswith("\"this is sentence 0 of the book,\" she said. \"this is sentence 1")


def test_books_hf_wrong_columns_name_the_fix(tmp_path, hf_datasets):
    write_parquet(tmp_path / "x" / "0000.parquet", {"sentence": ["a ."]})
    with pytest.raises(ValueError, match=r"columns \['sentence'\], not bookcorpus's 'text': pass --hf_files"):
        books.main(["--hf_files", str(tmp_path / "x" / "*.parquet"), "--out", str(tmp_path)])
