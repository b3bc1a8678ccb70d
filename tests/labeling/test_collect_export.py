"""Collect -> answer -> export -> train_reward, through `launch.py label` (launch.main, in process) on the tiny
`test` experiment: the stored comparisons are the task's queries with N post-processed responses from the chosen
policy (the initial model, or a finished train_policy run's latest checkpoint), the export loads with the
project's label loader and trains a reward model, and bad inputs are one `error:` line with status 2 that writes
nothing."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import launch
import params
from lm_human_preferences import runs
from lm_human_preferences.labeling import collect
from lm_human_preferences.labeling.store import LabelStore
from lm_human_preferences.language.datasets import QuerySampler
from lm_human_preferences.language.encodings import get_encoding
from lm_human_preferences.language.labels import load_labels
from lm_human_preferences.utils import dist

Q = T = 4  # the test task's query_length and response_length
N = 4  # best_of_4
PAD = 27  # the test encoding's padding token (n_vocab 27)


def main(capsys, *argv):
    """launch.main(argv) -> (status, stdout, stderr)."""
    status = launch.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def stream_queries(mode, start, count):
    """Queries start..start+count-1 of the test task's query stream, as the trainers build them."""
    rows = QuerySampler("test", mode, get_encoding("test"), Q, None, None, start + count).next_batch()
    return rows[start:].tolist()


def expected_responses(policy, queries, seed, task):
    """The post-processed responses runs.rollout samples for `queries` (N each) with `seed`: (len, N, T) lists."""
    generator = torch.Generator().manual_seed(seed)
    repeated = torch.tensor(queries).repeat_interleave(N, dim=0)
    post = runs.rollout(policy, repeated, task, PAD, generator=generator, precision="fp32")["postprocessed"]
    return post.reshape(len(queries), N, T).tolist()


def answer_all(store, names):
    """Each labeler in turn answers everything the store gives it (a position derived from the assignment id)."""
    tokens = [store.add_labeler(name) for name in names]
    for token in tokens:
        labeler = store.labeler_for_token(token)
        while (a := store.next_assignment(labeler)) is not None:
            store.answer(labeler, a.id, a.id % N)


@pytest.fixture(scope="module")
def initial_store(tmp_path_factory):
    """A store with two rounds from the test experiment's initial policy: 12 comparisons (3 for two labelers, batches
    of 5 queries), then 4 more."""
    d = tmp_path_factory.mktemp("initial")
    store = d / "sub" / "labels.db"  # its directory is created
    assert launch.main(["label", "collect", "test", "--store", str(store), "--num", "12", "--seed", "7",
                        "--overlap", "0.25", "--batch_size", "5"]) == 0
    assert launch.main(["label", "collect", "test", "--store", str(store), "--num", "4", "--seed", "8"]) == 0
    return store


def test_collect_stores_the_tasks_queries_and_post_processed_responses(initial_store):
    store = LabelStore(initial_store)
    meta = store.meta()
    assert {k: meta[k] for k in ("label_type", "num_responses", "experiment", "query_length", "response_length",
                                 "encoding", "n_vocab", "padding_token")} == {
        "label_type": "best_of_4", "num_responses": N, "experiment": "test", "query_length": Q,
        "response_length": T, "encoding": "test", "n_vocab": 27, "padding_token": PAD}
    assert meta["instructions"]["key"] == "test" and meta["instructions"]["paragraphs"]
    first, second = store.rounds()
    assert first["comparisons"] == 12 and second["comparisons"] == 4
    assert {k: first["source"][k] for k in ("experiment", "policy", "checkpoint_step", "seed", "temperature", "mode",
                                            "query_offset", "num_queries", "overlap")} == {
        "experiment": "test", "policy": "initial", "checkpoint_step": None, "seed": 7, "temperature": 1.0,
        "mode": "train", "query_offset": 0, "num_queries": 12, "overlap": 0.25}
    assert (second["source"]["query_offset"], second["source"]["seed"]) == (12, 8)  # the stream continues

    rows = store._connection().execute("SELECT id, uid, query_tokens, query_text, copies FROM comparisons "
                                       "ORDER BY id").fetchall()
    assert [r["uid"] for r in rows] == [f"1-{i}" for i in range(12)] + [f"2-{i}" for i in range(4)]
    assert [json.loads(r["query_tokens"]) for r in rows] == stream_queries("train", 0, 16)
    enc = get_encoding("test")
    for r in rows:
        tokens = json.loads(r["query_tokens"])
        assert r["query_text"] == enc.decode(tokens) and len(r["query_text"]) == sum(t != PAD for t in tokens)
    assert sum(r["copies"] == 2 for r in rows[:12]) == 3 and all(r["copies"] == 1 for r in rows[12:])

    task = params.get_hparams("train_reward", "test").task
    enc, prefix, suffix = runs.task_encodings(task)
    for round_rows, seed, start in ((rows[:12], 7, 0), (rows[12:], 8, 12)):
        dist.seed_everything(seed)  # the random test model's weights come from the round's seed
        policy = runs.build_policy(task, enc, prefix, suffix, torch.device("cpu"), frozen=True)
        want = expected_responses(policy, stream_queries("train", start, len(round_rows)), seed, task)
        for r, responses in zip(round_rows, want):
            got = store._connection().execute("SELECT idx, tokens, text FROM responses WHERE comparison_id = ? "
                                              "ORDER BY idx", (r["id"],)).fetchall()
            assert [json.loads(g["tokens"]) for g in got] == responses
            assert [g["text"] for g in got] == [enc.decode(x) for x in responses]
    store.close()  # the other tests copy the file


def test_collect_post_processes_responses_as_the_task_says(tmp_path):
    """With a truncate token the stored responses are the truncated ones (pads after the first truncate token at
    index >= truncate_after), as train_reward sees them."""
    hp = params.get_hparams("train_reward", "test", {"task.truncate_token": "0", "task.truncate_after": "1"})
    collect.collect(tmp_path / "s.db", hp, "test", num=16, seed=3, overlap=0.0)
    rows = LabelStore(tmp_path / "s.db")._connection().execute("SELECT tokens, text FROM responses").fetchall()
    truncated = 0
    for row in rows:
        tokens = json.loads(row["tokens"])
        cut = next((i for i in range(1, T) if tokens[i] == 0), None)  # the first truncate token that counts
        if cut is None:
            assert PAD not in tokens
        else:
            assert PAD not in tokens[:cut + 1] and tokens[cut + 1:] == [PAD] * (T - 1 - cut)
            truncated += cut < T - 1
        assert len(row["text"]) == sum(t != PAD for t in tokens)  # pads are not shown
    assert len(rows) == 16 * N and truncated > 0


def test_answers_export_load_and_train_a_reward_model(initial_store, tmp_path, capsys):
    store_path = tmp_path / "labels.db"
    shutil.copy(initial_store, store_path)
    store = LabelStore(store_path)
    answer_all(store, ["alice", "bob"])
    labeled = store.labeled()
    assert sum(len(c["choices"]) for c in labeled) == 12 + 3 + 4  # every copy answered

    status, out, err = main(capsys, "label", "status", "--store", store_path)
    assert status == 0 and err == ""
    assert "answers: 19 of 19 needed (100%)" in out and "alice" in out and "bob" in out
    assert "agreement on comparisons answered twice: " in out and "pairs agree" in out

    export = tmp_path / "out" / "labels.json"
    status, out, err = main(capsys, "label", "export", "--store", store_path, "--out", export)
    assert status == 0 and err == ""
    assert "wrote 19 best_of_4 records" in out and "--labels.num_train 16" in out
    train, heldout = load_labels(export, "best_of_4", query_length=Q, response_length=T, n_vocab=27,
                                 padding_token=PAD, num_train=16)
    records = [(c["query"], c["responses"], best) for c in labeled for best in c["choices"]]  # one per answer
    assert len(train["best"]) == 16 and len(heldout["best"]) == 3
    for field in ("query", "best", *[f"sample{k}" for k in range(N)]):
        values = np.concatenate([train[field], heldout[field]])
        if field == "query":
            assert values.tolist() == [q for q, _, _ in records]
        elif field == "best":
            assert values.tolist() == [b for _, _, b in records]
        else:
            assert values.tolist() == [r[int(field[6:])] for _, r, _ in records]
    answers = store.answers()
    assert sorted(np.concatenate([train["best"], heldout["best"]]).tolist()) == sorted(
        a["choice_sample"] for a in answers)

    twice = tmp_path / "twice.json"
    status, out, _ = main(capsys, "label", "export", "--store", store_path, "--out", twice, "--min-answers", "2")
    assert status == 0 and len(json.loads(twice.read_text())) == 2 * 3

    status, out, err = main(capsys, "train_reward", "test", "rm", "--save_dir", tmp_path / "runs",
                            "--labels.source", export, "--labels.num_train", "16")
    assert status == 0, err
    run = runs.RunDir(tmp_path / "runs" / "rm")
    assert run.reward_model_complete()
    saved = json.loads(run.reward_hparams.read_text())
    assert saved["labels"]["source"] == str(export) and saved["labels"]["num_train"] == 16


@pytest.fixture(scope="module")
def policy_run(tmp_path_factory):
    """A finished tiny train_policy run of the test experiment (2 updates, checkpoints at steps 1 and 2)."""
    d = tmp_path_factory.mktemp("policy")
    assert launch.main(["train_policy", "test", "pol", "--save_dir", str(d)]) == 0
    return d / "pol"


def test_collect_from_a_policy_runs_latest_checkpoint(policy_run, tmp_path, capsys):
    store_path = tmp_path / "s.db"
    status, out, err = main(capsys, "label", "collect", "test", "--store", store_path, "--policy", policy_run,
                            "--num", "6", "--seed", "11", "--overlap", "0.5")
    assert status == 0, err
    assert "step-00000002" in out
    store = LabelStore(store_path)
    source = store.rounds()[0]["source"]
    assert source["checkpoint_step"] == 2 and source["policy"] == str(policy_run.resolve())
    assert source["temperature"] == 1.0 and source["num_queries"] == 6

    run = runs.RunDir(policy_run)
    hp = runs.read_run_hparams(run)
    enc = get_encoding("test")
    policy = runs.load_policy(run, runs.latest_policy_checkpoint(run), hp, enc, temperature=1.0, device="cpu")
    want = expected_responses(policy, stream_queries("train", 0, 6), 11, hp.task)
    got = [[json.loads(r["tokens"]) for r in store._connection().execute(
        "SELECT tokens FROM responses WHERE comparison_id = ? ORDER BY idx", (cid,))] for cid in range(1, 7)]
    assert got == want
    assert sum(c == 2 for (c,) in store._connection().execute("SELECT copies FROM comparisons")) == 3


def _error(status, out, err, *needles):
    assert status == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def _files(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("args, message", [
    (["nope"], "unknown train_reward experiment 'nope'"),
    (["test", "--num", "0"], "--num must be a positive integer, got 0"),
    (["test", "--num", "abc"], "argument --num: invalid int value: 'abc'"),
    (["test", "--batch_size", "-1"], "--batch_size must be a positive integer"),
    (["test", "--overlap", "1.5"], "--overlap must be a fraction in [0, 1]"),
    (["test", "--overlap", "nan"], "--overlap must be a fraction in [0, 1]"),
    (["test", "--mode", "dev"], "--mode must be one of train, test"),
    (["test", "--seed", str(2**64)], "--seed must be an integer that fits 64 bits"),
    (["test", "--policy", "no_such_dir"], "is neither 'initial' nor a directory"),
    (["test", "--policy", "{empty}"], "is not a train_policy run"),
    (["test", "--store", "{empty}"], "is not a file"),
    (["test", "--store", "{text}"], "is not a labeling store"),
    (["test", "--store", "{foreign}"], "with label_type 'best_of_2', not 'best_of_4'"),
    (["test", "--store", "{sentiment}"], "needs other instructions"),
])
def test_bad_collect_inputs_are_one_line_errors_that_write_nothing(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").write_text("these are my notes\n")
    meta = collect.store_meta("test", collect.pick_best_type(params.get_hparams("train_reward", "test"), "test"),
                              params.get_hparams("train_reward", "test").task, get_encoding("test"))
    LabelStore.create(tmp_path / "foreign", {**meta, "label_type": "best_of_2", "num_responses": 2}).close()
    LabelStore.create(tmp_path / "sentiment", {**meta, "experiment": "sentiment", "instructions": {
        "key": "sentiment", "title": "Choose the most positive and happy continuation", "paragraphs": []}}).close()
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    names = _files(tmp_path)
    args = [a.format(empty=tmp_path / "empty", text=tmp_path / "text", foreign=tmp_path / "foreign",
                     sentiment=tmp_path / "sentiment") for a in args]
    if "--store" not in args:
        args += ["--store", str(tmp_path / "new.db")]
    _error(*main(capsys, "label", "collect", *args), message)
    assert _files(tmp_path) == names  # no store, no journal
    for path, data in before.items():
        if path.name in ("foreign", "sentiment"):
            assert LabelStore(path).rounds() == [] and LabelStore(path).progress()["comparisons"] == 0
        else:
            assert path.read_bytes() == data


def test_bad_policy_runs_are_refused_before_anything_is_written(policy_run, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(policy_run / "train_policy_hparams.json", unfinished)
    _error(*main(capsys, "label", "collect", "test", "--store", tmp_path / "s.db", "--policy", unfinished),
           "holds no complete policy checkpoint")

    other = tmp_path / "other"
    shutil.copytree(policy_run, other)
    hparams = json.loads((other / "train_policy_hparams.json").read_text())
    hparams["task"]["query_length"] = 5
    (other / "train_policy_hparams.json").write_text(json.dumps(hparams))
    _error(*main(capsys, "label", "collect", "test", "--store", tmp_path / "s.db", "--policy", other),
           "task.query_length = 5", "has 4")
    assert not (tmp_path / "s.db").exists()


def test_bad_export_store_and_labeler_inputs(initial_store, tmp_path, capsys):
    store_path = tmp_path / "s.db"
    shutil.copy(initial_store, store_path)
    out = tmp_path / "labels.json"
    _error(*main(capsys, "label", "export", "--store", store_path, "--out", out), "no comparison with at least 1")
    _error(*main(capsys, "label", "export", "--store", store_path, "--out", out, "--min-answers", "0"),
           "--min-answers must be a positive integer")
    _error(*main(capsys, "label", "export", "--store", store_path, "--out", tmp_path), "is a directory")
    _error(*main(capsys, "label", "export", "--store", tmp_path / "missing.db", "--out", out), "does not exist")
    _error(*main(capsys, "label", "export", "--store", store_path, "--out", store_path), "the labeling store itself")
    assert not out.exists()
    _error(*main(capsys, "label", "add-labeler", "--store", store_path, "bad name"), "labeler name 'bad name'")
    _error(*main(capsys, "label", "add-labeler", "--store", tmp_path / "missing.db", "x"), "does not exist")
    _error(*main(capsys, "label", "add-labeler", "--store", store_path, "x", "--port", "70000"),
           "must be a port number")
    _error(*main(capsys, "label", "add-labeler", "--store", store_path, "x", "--host", "a b"),
           "is not a host name or an IP address")
    _error(*main(capsys, "label", "add-labeler", "--store", store_path, "x", "--url", "ftp://h/?a=1"),
           "is not an http:// or https:// address")
    _error(*main(capsys, "label", "status", "--store", tmp_path / "missing.db"), "does not exist")
    _error(*main(capsys, "label", "serve", "--store", tmp_path / "missing.db"), "does not exist")
    _error(*main(capsys, "label", "serve", "--store", store_path, "--lease", "0"), "must be a finite number")
    assert LabelStore(store_path).labelers() == [] and not (tmp_path / "missing.db").exists()
    assert LabelStore(store_path).progress()["answered"] == 0


def test_add_labeler_and_admin_token_print_links_whose_tokens_work(tmp_path, initial_store, capsys):
    store_path = tmp_path / "s.db"
    shutil.copy(initial_store, store_path)
    status, out, _ = main(capsys, "label", "add-labeler", "--store", store_path, "alice", "--port", "8123")
    assert status == 0
    prefix = "labeler alice: http://127.0.0.1:8123/label?token="
    assert out.startswith(prefix) and out.count("\n") == 1
    assert LabelStore(store_path).labeler_for_token(out.strip()[len(prefix):]).name == "alice"
    status, out, _ = main(capsys, "label", "admin-token", "--store", store_path, "--host", "::1")
    assert status == 0
    prefix = "admin page: http://[::1]:8000/admin?token="
    assert out.startswith(prefix) and LabelStore(store_path).is_admin_token(out.strip()[len(prefix):])
    status, out, _ = main(capsys, "label", "add-labeler", "--store", store_path, "bob", "--url",
                          "https://labels.example.org/")
    prefix = "labeler bob: https://labels.example.org/label?token="
    assert status == 0 and out.startswith(prefix)
    assert LabelStore(store_path).labeler_for_token(out.strip()[len(prefix):]).name == "bob"


def test_label_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        launch.main(["label", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("collect", "add-labeler", "admin-token", "serve", "status", "export"):
        assert command in out


def test_every_experiment_gets_its_tasks_instructions():
    from lm_human_preferences.labeling.instructions import instructions_for

    keys = {name: instructions_for(name, params.get_hparams("train_reward", name).task.query_dataset, N)["key"]
            for name in params.experiment_names("train_reward")}
    assert keys == {"sentiment": "sentiment", "descriptiveness": "descriptiveness", "cnndm": "cnndm", "tldr": "tldr",
                    "cnndm_offline_60k": "cnndm", "tldr_offline_60k": "tldr", "test": "test"}
    assert instructions_for("formality", "books", 2)["key"] == "generic"  # an experiment of your own
    assert instructions_for("my_summaries", "tldr", 2)["key"] == "tldr"
    sentiment = instructions_for("sentiment", "books", N)
    assert "positive" in sentiment["title"] and "(1 to 4)" in sentiment["paragraphs"][-1]
    assert instructions_for("descriptiveness", "books", N)["title"] != sentiment["title"]
