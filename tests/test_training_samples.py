"""Samples over training (lm_human_preferences/training_samples.py, run.sample_interval) and the diagnostics in a
run's metrics: on the tiny `test` experiment against the random 'test' reward model, in process.

A run with sampling on ends bit-identical to one with it off; the samples file holds the held-out queries'
records of updates 0, every K and the last, equal to a rollout recomputed from the final policy; a resume drops
the records of updates >= its step first; the wandb table and the markdown rendering."""
import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import params
from lm_human_preferences import runs, train_policy, training_samples
from lm_human_preferences.hparams import TrainPolicyHParams
from lm_human_preferences.language.datasets import QuerySampler
from lm_human_preferences.language.encodings import get_encoding
from lm_human_preferences.runs import RunDir, RunError
from lm_human_preferences.utils import ckpt
from lm_human_preferences.utils import logging as metrics_logging
from lm_human_preferences.utils.hyperparams import HParamsError
from lm_human_preferences.utils.logging import read_metrics

TOKEN, AFTER = 25, 1  # truncate after a 'z' at index >= 1: some of the held-out responses are penalized
TRUNCATE = {"task.truncate_token": str(TOKEN), "task.truncate_after": str(AFTER)}
N = 5  # held-out queries


def policy_hp(save_dir, **overrides):
    return params.get_hparams("train_policy", "test", {
        "run.save_dir": str(save_dir), "rewards.train_new_model": "off", "rewards.trained_model": "test",
        "run.sample_queries": str(N), **TRUNCATE, **overrides})


def capture_trainer(monkeypatch):
    """Records the trainer, its initial policy and every update's (stats, rollout)."""
    seen = {"steps": []}
    step = train_policy.PPOTrainer.step

    def recording_step(self):
        if "initial" not in seen:
            seen["initial"] = copy.deepcopy(self.policy)
        seen["trainer"] = self
        out = step(self)
        seen["steps"].append(out)
        return out

    monkeypatch.setattr(train_policy.PPOTrainer, "step", recording_step)
    return seen


def final_state(run_dir: Path):
    """Everything the run ends with: the last checkpoint's files (weights, optimizer, state, random streams, query
    stream) and the metrics without the timings."""
    last = ckpt.latest_checkpoint(run_dir / "policy" / "checkpoints")
    optimizer = ckpt.torch_load_safe(last / runs.OPTIMIZER_FILE)
    rng = ckpt.torch_load_safe(last / runs.rng_file(0))
    metrics = [{k: v for k, v in r.items() if not k.startswith("elapsed/")}
               for r in read_metrics(run_dir / "train_policy_metrics.jsonl")]
    return (last.name, load_file(str(last / runs.MODEL_FILE)), optimizer, rng,
            (last / runs.STATE_FILE).read_text(), (last / runs.SAMPLER_FILE).read_text(), metrics)


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def records_of(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def runs_on_and_off(tmp_path_factory):
    """Two 3-update runs, sampling every 2 updates and off; the first one's trainer and rollouts."""
    root = tmp_path_factory.mktemp("samples")
    mp = pytest.MonkeyPatch()
    try:
        seen = capture_trainer(mp)
        train_policy.train(policy_hp(root / "on", **{"ppo.total_episodes": "24", "run.sample_interval": "2"}))
    finally:
        mp.undo()
    train_policy.train(policy_hp(root / "off", **{"ppo.total_episodes": "24", "run.sample_interval": "0"}))
    return root, seen


def test_sampling_on_ends_bit_identical_to_sampling_off(runs_on_and_off):
    root, _ = runs_on_and_off
    on, off = final_state(root / "on"), final_state(root / "off")
    assert on[0] == "step-00000003"
    assert_same(on, off)
    assert (root / "on" / "training_samples.jsonl").is_file()
    assert not (root / "off" / "training_samples.jsonl").exists()


def test_samples_file_holds_updates_0_every_k_and_the_last(runs_on_and_off):
    root, seen = runs_on_and_off
    records = records_of(RunDir(root / "on").training_samples)
    assert [r["update"] for r in records] == [0] * N + [2] * N + [3] * N
    assert all(list(r) == list(training_samples.COLUMNS) for r in records)
    assert [r["index"] for r in records] == list(range(N)) * 3
    # the queries: the first N of the test-mode stream, the same at every update
    hp = seen["trainer"].hp
    enc = get_encoding("test")
    queries = QuerySampler("test", "test", enc, hp.task.query_length, None, None, N).next_batch()
    assert [r["query"] for r in records] == [enc.decode(q) for q in queries.tolist()] * 3
    for r in records:
        assert r["penalized"] == ("z" not in r["response"][AFTER:])
        assert r["score"] == (-1.0 if r["penalized"] else r["raw_score"])
    assert any(r["penalized"] for r in records) and not all(r["penalized"] for r in records)
    kl = {u: [r["kl"] for r in records if r["update"] == u] for u in (0, 2, 3)}
    assert kl[0] != kl[2] != kl[3]  # the policy of each update (the same random numbers: here the same text)


def test_first_and_last_samples_equal_rollouts_of_the_initial_and_final_policies(runs_on_and_off):
    root, seen = runs_on_and_off
    trainer = seen["trainer"]
    assert trainer.global_step == 3
    enc, task = trainer.enc, trainer.hp.task
    queries = torch.as_tensor(QuerySampler("test", "test", enc, task.query_length, None, None, N).next_batch())
    records = records_of(RunDir(root / "on").training_samples)
    for update, policy in ((0, seen["initial"]), (3, trainer.policy)):
        g = torch.Generator().manual_seed(training_samples.sample_seed(0))
        batch = runs.rollout(policy, queries, task, enc.padding_token, generator=g, precision="fp32",
                             ref_policy=trainer.ref_policy, score_model=trainer.score_model)
        rows = [r for r in records if r["update"] == update]
        assert len(rows) == N
        for i, r in enumerate(rows):
            assert r["response"] == enc.decode(batch["postprocessed"][i].tolist())
            assert r["raw_score"] == batch["raw_scores"][i].item()
            assert r["score"] == batch["scores"][i].item()
            kl = (batch["logprobs"][i] - batch["ref_logprobs"][i]).sum().item()
            assert r["kl"] == pytest.approx(kl, abs=1e-6)


def test_metrics_hold_the_diagnostics_computed_by_hand(runs_on_and_off):
    root, seen = runs_on_and_off
    rows = read_metrics(root / "on" / "train_policy_metrics.jsonl")
    assert len(rows) == len(seen["steps"]) == 3
    for row, (stats, data) in zip(rows, seen["steps"]):
        posts = data["postprocessed"].tolist()
        lengths, bigrams, penalized = [], [], 0
        for p in posts:
            n = next((i + 1 for i in range(AFTER, len(p)) if p[i] == TOKEN), len(p))  # up to and including it
            penalized += TOKEN not in p[AFTER:]
            lengths.append(n)
            bigrams += [tuple(p[i:i + 2]) for i in range(n - 1)]
        assert row["objective/penalty_rate"] == pytest.approx(penalized / len(posts))
        assert row["objective/response_length"] == pytest.approx(sum(lengths) / len(posts))
        assert row["objective/distinct_2"] == pytest.approx(len(set(bigrams)) / len(bigrams))
        assert row["objective/kl"] == stats["objective/kl"]  # the original's statistics are all still there
    assert {"objective/kl", "objective/score", "ppo/val/var_explained"} <= set(rows[0])


def test_resume_drops_the_samples_of_updates_from_its_step_on(tmp_path):
    run = RunDir(tmp_path / "run")
    train_policy.train(policy_hp(run.path, **{"run.sample_interval": "1"}))  # 2 updates: samples of 0, 1, 2
    before = records_of(run.training_samples)
    assert [r["update"] for r in before] == [0] * N + [1] * N + [2] * N
    with open(run.training_samples, "a") as f:  # as if a longer continuation had been killed after writing these
        f.write(json.dumps(dict(before[0], update=3)) + "\n" + '{"update": 4, "query": "tor')
    # resumed at its last checkpoint (update 2) and trained on to 4 updates
    train_policy.train(policy_hp(run.path, **{"run.sample_interval": "1", "ppo.total_episodes": "32"}), resume=True)
    after = records_of(run.training_samples)
    assert [r["update"] for r in after] == [u for u in range(5) for _ in range(N)]
    assert after[:3 * N] == before  # update 2 sampled again from the checkpoint: the same records


def test_truncate_keeps_whole_records_of_earlier_updates(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"update": u, "index": 0}) + "\n" for u in (0, 1, 1, 2, 3))
                    + "not json\n" + '{"update": 1, "ind')
    training_samples.truncate(path, 2)
    assert [r["update"] for r in records_of(path)] == [0, 1, 1]
    training_samples.truncate(tmp_path / "missing.jsonl", 0)  # nothing to do
    assert not (tmp_path / "missing.jsonl").exists()


def test_due_and_seed():
    assert [u for u in range(8) if training_samples.due(u, 3, 7)] == [0, 3, 6, 7]
    assert [u for u in range(8) if training_samples.due(u, 0, 7)] == []
    assert training_samples.sample_seed(None) == training_samples.sample_seed(0) == training_samples.SEED_OFFSET
    assert training_samples.sample_seed(2**63 - 1) == training_samples.SEED_OFFSET - 1


def test_hparams_defaults_and_bounds():
    hp = TrainPolicyHParams()
    assert (hp.run.sample_interval, hp.run.sample_queries) == (50, 16)
    with pytest.raises(HParamsError, match="sample_interval"):
        params.get_hparams("train_policy", "test", {"run.sample_interval": "-1"})
    with pytest.raises(HParamsError, match="sample_queries"):
        params.get_hparams("train_policy", "test", {"run.sample_queries": "0"})
    run = RunDir("/x/run")
    assert run.training_samples.name == "training_samples.jsonl" != run.samples.name
    assert run.training_samples.name in run.own_names() and run.training_samples in run.outputs()


def test_missing_test_split_turns_sampling_off_with_a_warning(tmp_path, capsys):
    task = SimpleNamespace(query_dataset=str(tmp_path / "corpus"), query_length=4, start_text=None, end_text=None)
    assert training_samples.held_out_queries(task, get_encoding("test"), 3) is None
    assert "corpus_test" in capsys.readouterr().err


class _Table:
    def __init__(self, columns, data):
        self.columns, self.data = columns, data


class _Run:
    def __init__(self):
        self.logged = []

    def log(self, data, step):
        self.logged.append((data, step))


def test_wandb_table_holds_every_sample_so_far(tmp_path, monkeypatch):
    logger = metrics_logging.Logger(is_main=True, metrics_path=tmp_path / "m.jsonl", config={},
                                    wandb_setting="disabled")
    cols = training_samples.COLUMNS
    rec = lambda u, i: {"update": u, "index": i, "query": "q", "response": f"r{u}", "score": 0.5,  # noqa: E731
                        "raw_score": 0.5, "kl": 0.0, "penalized": False}
    logger.log_samples([rec(0, 0)], 0, cols)  # no wandb: nothing happens, nothing is imported
    monkeypatch.setitem(__import__("sys").modules, "wandb", SimpleNamespace(Table=_Table))
    logger.wandb_run = _Run()
    logger.add_sample_history([rec(0, 0), rec(0, 1)], cols)  # the records before a resume
    logger.log_samples([rec(5, 0), rec(5, 1)], 5, cols)
    logger.log_samples([rec(10, 0)], 10, cols)
    (first, step1), (second, step2) = logger.wandb_run.logged
    assert (step1, step2) == (5, 10) and list(second) == ["training_samples"]
    table = second["training_samples"]
    assert table.columns == list(cols)
    assert [row[:2] for row in table.data] == [[0, 0], [0, 1], [5, 0], [5, 1], [10, 0]]
    assert table.data[-1] == [rec(10, 0)[c] for c in cols]
    assert len(first["training_samples"].data) == 4


def test_render_a_range_of_updates_as_markdown():
    records = [{"update": u, "index": i, "query": f"q{i}", "response": "a|b\nc", "score": -1.0, "raw_score": 0.25,
                "kl": 0.5, "penalized": True} for u in (0, 50, 100) for i in (1, 0)]
    table = training_samples.render(records, 50, 100)
    assert table == (
        "| update | # | query | response | score | kl | penalized |\n"
        "|---|---|---|---|---|---|---|\n"
        "| 50 | 0 | q0 | a\\|b⏎c | -1.000 | +0.500 | yes |\n"
        "| 50 | 1 | q1 | a\\|b⏎c | -1.000 | +0.500 | yes |\n"
        "| 100 | 0 | q0 | a\\|b⏎c | -1.000 | +0.500 | yes |\n"
        "| 100 | 1 | q1 | a\\|b⏎c | -1.000 | +0.500 | yes |\n")
    assert training_samples.render(records, None, 0).count("\n") == 4


@pytest.mark.parametrize("spec, expected", [("0:100", (0, 100)), ("50:", (50, None)), (":100", (None, 100)),
                                            (":", (None, None)), ("7", (7, 7)), (" 3 : 4 ", (3, 4))])
def test_parse_range(spec, expected):
    assert training_samples.parse_range(spec) == expected


@pytest.mark.parametrize("spec", ["", "a:b", "5:1", "1:2:3"])
def test_parse_range_rejects(spec):
    with pytest.raises(RunError, match="--samples"):
        training_samples.parse_range(spec)


def test_show_prints_the_table_or_says_what_is_missing(tmp_path, capsys):
    with pytest.raises(RunError, match="no training_samples.jsonl"):
        training_samples.show(tmp_path, "0:10")
    training_samples.append_records(RunDir(tmp_path).training_samples, [
        {"update": 0, "index": 0, "query": "q", "response": "r", "score": 1.0, "raw_score": 1.0, "kl": 0.0,
         "penalized": False}])
    assert training_samples.show(tmp_path, "0") == capsys.readouterr().out
    with pytest.raises(RunError, match="holds updates 0"):
        training_samples.show(tmp_path, "5:9")
