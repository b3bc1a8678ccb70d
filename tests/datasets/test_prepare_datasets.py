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

from lm_human_preferences.language.datasets import TokenFile, make_query
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
    with pytest.raises(ImportError, match="pip install datasets"):
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


def test_tldr_corrupt_file_is_rejected_with_its_path(server, tmp_path):
    source = server.add("/corrupt/train-subset.json", json.dumps(TLDR_RECORDS)[:-20])
    with pytest.raises(ValueError, match=r"not valid JSON.*corrupt or truncated"):
        tldr.main(["--source", source, "--out", str(tmp_path)])
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
    with pytest.raises(ImportError, match="pip install datasets"):
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
