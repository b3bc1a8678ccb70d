"""evaluate.py: a run against its initial model (table and JSON), the pure metrics on hand-checked inputs, a human
evaluation round answered by programmatic labelers through the labeling store, and one-line errors."""
import json
import math
import shutil

import pytest
import torch

import launch
from lm_human_preferences import evaluate, runs, train_policy
from lm_human_preferences.labeling import labelers
from lm_human_preferences.labeling.store import LabelStore
from lm_human_preferences.utils import dist

SIDE_KEYS = {"run", "initial_model", "temperature", "num", "score", "raw_score", "kl", "penalty_rate",
             "response_length", "distinct_1", "distinct_2"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny `test` experiment run (its own reward model, two PPO updates)."""
    root = tmp_path_factory.mktemp("runs")
    assert launch.main(["train_policy", "test", "run", "--save_dir", str(root), "--run.wandb", "disabled"]) == 0
    return root / "run"


# ---- the pure parts ----------------------------------------------------------------------------------------------

def test_distinct_n_counts_ngrams_within_responses():
    responses = [[1, 2, 1, 2], [1, 2], [7]]
    # bigrams (1,2) (2,1) (1,2) | (1,2) | none: 2 distinct of 4; unigrams 1,2,1,2,1,2,7: 3 distinct of 7
    assert evaluate.distinct_n(responses, 2) == pytest.approx(2 / 4)
    assert evaluate.distinct_n(responses, 1) == pytest.approx(3 / 7)
    assert evaluate.distinct_n([[5, 6, 7]], 2) == 1.0
    assert evaluate.distinct_n([[1], []], 2) is None  # no bigram at all


def test_strip_padding_and_penalty_rate():
    pad = 99
    post = torch.tensor([[3, pad, pad], [1, 3, pad], [1, 1, 1]])
    assert evaluate.strip_padding(post, pad) == [[3], [1, 3], [1, 1, 1]]
    # truncate token 3 counts from index 1: row 0 has it at index 0 only (penalised), row 1 at 1, row 2 never
    assert evaluate.penalty_rate(post, 3, 1) == pytest.approx(2 / 3)
    assert evaluate.penalty_rate(post, 3, 0) == pytest.approx(1 / 3)
    assert evaluate.penalty_rate(post, None, 0) is None  # a task without a truncate token


def test_wilson_interval_and_preference():
    lo, hi = evaluate.wilson_interval(8, 10)
    assert (lo, hi) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    lo, hi = evaluate.wilson_interval(10, 10)
    assert lo == pytest.approx(10 / (10 + evaluate.Z95 ** 2)) and hi == 1.0
    lo, hi = evaluate.wilson_interval(0, 5)
    assert lo == 0.0 and hi == pytest.approx(evaluate.Z95 ** 2 / (5 + evaluate.Z95 ** 2))
    assert evaluate.wilson_interval(0, 0) is None
    p = evaluate.preference([1.0, 2.0, 3.0, 5.0], [1.0, 1.0, 4.0, 0.0])  # tie, win, loss, win
    assert (p["wins"], p["ties"], p["losses"], p["n"]) == (2, 1, 1, 4)
    assert p["rate"] == pytest.approx(2.5 / 4)
    assert p["ci95"] == pytest.approx(evaluate.wilson_interval(2.5, 4))
    m = evaluate.mean_stderr([1.0, 2.0, 3.0])
    assert m["mean"] == pytest.approx(2.0) and m["stderr"] == pytest.approx(1.0 / math.sqrt(3))


# ---- a run against its initial model -----------------------------------------------------------------------------

def test_reference_policy_is_the_one_training_built(run_dir):
    """The rebuilt reference (the random `test` model, replayed from the run's seed) equals train_policy's."""
    rd = runs.RunDir(run_dir)
    hp = runs.read_run_hparams(rd)
    enc, _, _ = runs.task_encodings(hp.task)
    ours = evaluate.reference_policy(rd, hp, enc, torch.device("cpu"))
    info = dist.init_distributed("cpu")
    trainer = train_policy.build_trainer(hp, info, str(rd.reward_model))
    theirs = trainer.ref_policy.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs[key]), key


def test_evaluate_against_initial_prints_table_and_writes_json(run_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert evaluate.main([str(run_dir), "--against", "initial", "--num", "12", "--batch_size", "5", "--seed", "3",
                          "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for row in ("reward model score", "KL to reference", "penalty rate", "response length", "distinct-2",
                "A preferred over B by the reward model"):
        assert row in printed
    result = json.loads(out.read_text())
    assert result["num_queries"] == 12 and result["seed"] == 3 and result["mode"] == "test"
    assert result["reward_model"] == str(runs.RunDir(run_dir).reward_model)
    assert SIDE_KEYS | {"checkpoint_step"} <= set(result["a"]) and SIDE_KEYS <= set(result["b"])
    assert result["b"]["run"] == "initial" and result["a"]["checkpoint_step"] == 2
    a, b = result["a"], result["b"]
    assert a["num"] == b["num"] == 12
    assert a["penalty_rate"] is None  # the test task has no truncate token
    assert a["response_length"] == {"mean": 4.0, "stderr": 0.0}
    assert abs(b["kl"]["mean"]) < 1e-5  # the initial model against itself
    assert 0 < a["distinct_2"] <= 1 and 0 < a["distinct_1"] <= 1
    p = result["preference"]
    assert p["n"] == 12 and p["wins"] + p["ties"] + p["losses"] == 12
    assert p["ci95"][0] <= p["rate"] <= p["ci95"][1]
    assert len(result["samples"]) == 12 and set(result["samples"][0]) == {"query", "a", "b"}
    # the per-sample records agree with the summary
    scores = [s["a"]["score"] for s in result["samples"]]
    assert a["score"]["mean"] == pytest.approx(sum(scores) / 12)
    kls = [s["a"]["kl"] for s in result["samples"]]
    assert a["kl"]["mean"] == pytest.approx(sum(kls) / 12)
    wins = sum(s["a"]["score"] > s["b"]["score"] for s in result["samples"])
    assert p["wins"] == wins

    # fixed seed: run A's numbers are the same alone, with another batch size, in its run directory by default
    assert evaluate.main([str(run_dir), "--num", "12", "--batch_size", "12", "--seed", "3"]) == 0
    alone = json.loads((run_dir / "eval.json").read_text())
    assert alone["b"] is None and alone["preference"] is None
    for key in ("score", "kl", "response_length", "distinct_2"):
        assert alone["a"][key] == pytest.approx(a[key], abs=1e-5), key
    assert runs.RunDir(run_dir).foreign_entries() == []  # eval.json is the project's own file


def test_evaluate_a_run_against_another_run(run_dir, tmp_path, capsys):
    """Run B may be any run of the same task (here a copy of A): its reference is rebuilt for it, it samples with
    its own stream, and A's reward model scores both."""
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("eval.json", ".lmhp_lock"))
    out = tmp_path / "e.json"
    assert evaluate.main([str(run_dir), "--against", str(copy), "--num", "8", "--seed", "-5", "--out", str(out),
                          "--human-store", str(tmp_path / "h.db"), "--experiment", "sentiment"]) == 0
    assert "B: copy (step 2)" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["b"]["run"] == str(copy.resolve()) and result["b"]["checkpoint_step"] == 2
    assert result["reward_model"] == str(runs.RunDir(run_dir).reward_model)
    assert result["preference"]["n"] == 8
    # the copy evaluated alone is A's weights on A's stream: A's samples; as B it drew from another stream
    alone = evaluate.evaluate(copy, num=8, seed=-5, out=tmp_path / "b_alone.json")
    assert [r["a"] for r in alone["samples"]] == [r["a"] for r in result["samples"]]
    assert [r["a"]["response"] for r in alone["samples"]] != [r["b"]["response"] for r in result["samples"]]
    assert alone["a"]["kl"] == result["a"]["kl"]  # B's reference, rebuilt for the copy, is A's
    store = LabelStore(tmp_path / "h.db")
    assert store.meta()["instructions"]["key"] == "sentiment"
    (round_,) = store.rounds()
    assert round_["source"]["b"]["run"] == str(copy.resolve()) and "A = " in round_["source"]["policy"]
    store.close()


# ---- the human round ---------------------------------------------------------------------------------------------

class AlwaysA:
    """A programmatic labeler that always picks run A's sample (it reads the store's A/B mapping)."""
    name = "always_a"

    def __init__(self, a_sample_by_uid):
        self.a = a_sample_by_uid

    def choose(self, query_text, response_texts, query_tokens, response_tokens, *, uid=None, display_order=None):
        return list(display_order).index(self.a[uid])


def test_human_round_through_the_store(run_dir, tmp_path, capsys):
    store_path = tmp_path / "human.db"
    assert evaluate.main([str(run_dir), "--against", "initial", "--num", "10", "--out", str(tmp_path / "e.json"),
                          "--human-store", str(store_path), "--overlap", "0.4"]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["human_store"]["comparisons"] == 10 and result["human_store"]["for_two_labelers"] == 4
    store = LabelStore(store_path)
    meta = store.meta()
    assert meta["label_type"] == "best_of_2" and meta["num_responses"] == 2 and meta["purpose"] == "evaluation"
    assert meta["instructions"]["key"] == "test" and meta["experiment"] == "test"
    (round_,) = store.rounds()
    assert round_["source"]["what"] == "evaluation A vs B" and round_["source"]["b"]["run"] == "initial"
    mapping = evaluate.a_sample_by_uid(store)
    assert len(mapping) == 10 and set(mapping.values()) <= {0, 1}
    # the stored pairs are the evaluation's samples, A's at the recorded index
    for i, sample in enumerate(result["samples"]):
        comparison = store.comparison(f"{round_['id']}-{i}")
        a = mapping[comparison["uid"]]
        assert comparison["responses"][a][1] == sample["a"]["response"]
        assert comparison["responses"][1 - a][1] == sample["b"]["response"]

    # nothing answered yet
    capsys.readouterr()
    assert evaluate.main(["--report-human", str(store_path)]) == 0
    assert "n/a" in capsys.readouterr().out

    # two programmatic labelers that always pick A: every comparison once, the overlap twice
    assert labelers.answer_open(store, AlwaysA(mapping), "bot1") == 10
    assert labelers.answer_open(store, AlwaysA(mapping), "bot2") == 4
    store.close()
    report_path = tmp_path / "report.json"
    assert evaluate.main(["--report-human", str(store_path), "--out", str(report_path)]) == 0
    printed = capsys.readouterr().out
    assert "100.0%" in printed
    report = json.loads(report_path.read_text())
    assert report["answers"] == 14 and report["a_chosen"] == 14 and report["rate"] == 1.0
    assert report["ci95"] == pytest.approx([14 / (14 + evaluate.Z95 ** 2), 1.0])
    assert report["agreement"] == {"comparisons": 4, "pairs": 4, "agree": 4, "rate": 1.0}


def test_human_round_with_the_reward_model_labeler_matches_the_reward_models_preference(run_dir, tmp_path):
    store_path = tmp_path / "human.db"
    assert evaluate.main([str(run_dir), "--against", "initial", "--num", "16", "--out", str(tmp_path / "e.json"),
                          "--human-store", str(store_path), "--overlap", "0"]) == 0
    p = json.loads((tmp_path / "e.json").read_text())["preference"]
    store = LabelStore(store_path)
    assert labelers.answer_open(store, labelers.RewardModelLabeler(run_dir), "rm") == 16
    store.close()
    report = evaluate.human_report(store_path)
    assert report["answers"] == 16 and report["agreement"]["pairs"] == 0
    # the labeler scores with the same reward model (no truncate token: no penalty), breaking ties at random
    assert p["wins"] <= report["a_chosen"] <= p["wins"] + p["ties"]
    assert report["ci95"] == pytest.approx(evaluate.wilson_interval(report["a_chosen"], 16))


# ---- bad input ---------------------------------------------------------------------------------------------------

def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_inputs_are_one_line_errors(run_dir, tmp_path, capsys):
    capsys.readouterr()
    assert evaluate.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in _one_error_line(capsys)

    partial = tmp_path / "partial"  # a run's hyperparameters and policy metadata, but no checkpoint
    (partial / "policy").mkdir(parents=True)
    shutil.copy(run_dir / "train_policy_hparams.json", partial)
    for name in ("hparams.json", "encoding"):
        shutil.copy(run_dir / "policy" / name, partial / "policy")
    assert evaluate.main([str(partial), "--out", str(tmp_path / "x.json")]) == 2
    assert "no complete policy checkpoint" in _one_error_line(capsys)
    assert evaluate.main([str(run_dir), "--against", str(partial), "--out", str(tmp_path / "x.json")]) == 2
    assert "no complete policy checkpoint" in _one_error_line(capsys)
    assert not (tmp_path / "x.json").exists() and not (partial / "eval.json").exists()

    other = tmp_path / "other"  # a run of another task: its samples cannot be compared with A's
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("eval.json", ".lmhp_lock"))
    hparams = json.loads((other / "train_policy_hparams.json").read_text())
    hparams["task"]["query_length"] = 5
    (other / "train_policy_hparams.json").write_text(json.dumps(hparams))
    assert evaluate.main([str(run_dir), "--against", str(other), "--out", str(tmp_path / "x.json")]) == 2
    assert "task.query_length = 5" in _one_error_line(capsys)

    assert evaluate.main([]) == 2
    assert "RUN" in _one_error_line(capsys)
    assert evaluate.main([str(run_dir), "--num", "0"]) == 2
    assert "--num" in _one_error_line(capsys)
    assert evaluate.main([str(run_dir), "--human-store", str(tmp_path / "s.db")]) == 2
    assert "--against" in _one_error_line(capsys)
    (tmp_path / "exists.db").write_text("")
    assert evaluate.main([str(run_dir), "--against", "initial", "--human-store", str(tmp_path / "exists.db"),
                          "--out", str(tmp_path / "x.json")]) == 2
    assert "already exists" in _one_error_line(capsys)
    assert evaluate.main(["--report-human", str(tmp_path / "exists.db")]) == 2
    assert "not a labeling store" in _one_error_line(capsys)
    assert evaluate.main(["--report-human", str(tmp_path / "nope.db")]) == 2
    assert "does not exist" in _one_error_line(capsys)
    assert evaluate.main([str(run_dir), "--report-human", str(tmp_path / "exists.db")]) == 2
    assert "takes no RUN" in _one_error_line(capsys)
    assert evaluate.main([str(run_dir), "--out", str(tmp_path / "exists.db" / "x.json")]) == 2
    assert "cannot write" in _one_error_line(capsys)
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "s.db").exists()
