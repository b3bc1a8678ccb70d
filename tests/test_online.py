"""Online label collection during PPO (issue #18) on the `test` experiment: rounds sample comparisons from the
current policy into the labeling store, a programmatic labeler answers them through the store (the path people
take), the reward model is retrained from the initial model on every label so far and PPO continues against it; a
run killed during a round's retraining and resumed ends as the uninterrupted one."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import launch
from lm_human_preferences import online
from lm_human_preferences.labeling.store import LabelStore

ROOT = Path(__file__).resolve().parents[1]
# 4 updates of 8 episodes; rounds before updates 1 and 2 (schedule: k * 4 // 3), 8 comparisons each
ONLINE = ["--ppo.total_episodes", "32", "--online", "on", "--online.rounds", "2", "--online.comparisons", "8",
          "--run.wandb", "disabled"]


@pytest.fixture(scope="module")
def true_reward(tmp_path_factory):
    """A trained reward model standing in for the true reward (the paper's mock labelers)."""
    save = tmp_path_factory.mktemp("true")
    assert launch.main(["train_reward", "test", "rm", "--save_dir", str(save), "--run.seed", "7",
                        "--run.wandb", "disabled"]) == 0
    return save / "rm" / "reward_model"


def args(save_dir, true_reward, *extra):
    return ["train_policy", "test", "run", "--save_dir", str(save_dir), *ONLINE,
            "--online.labeler", f"reward_model:{true_reward}", *extra]


def test_schedule_spreads_the_rounds_inside_the_run():
    assert online.schedule(4, 2) == [1, 2]
    assert online.schedule(1954, 20)[0] == 93 and online.schedule(1954, 20)[-1] == 1860
    with pytest.raises(ValueError, match="do not fit"):
        online.schedule(2, 2)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, true_reward):
    save = tmp_path_factory.mktemp("straight")
    assert launch.main(args(save, true_reward)) == 0
    return save / "run"


def test_rounds_collect_label_retrain_and_ppo_continues(straight):
    store = LabelStore(straight / "labels.db")
    try:
        rounds = [r for r in store.rounds() if "online_round" in r["source"]]
        assert [(r["source"]["online_round"], r["source"]["update"], r["comparisons"]) for r in rounds] == \
            [(1, 1, 8), (2, 2, 8)]
        assert store.progress()["answered"] == 16  # every comparison answered, by the programmatic labeler
    finally:
        store.close()
    for k, n in ((1, 50 + 8), (2, 50 + 16)):  # the initial 50 'test' records plus every answer so far
        rd = straight / "online" / f"round-{k:03d}"
        assert len(json.loads((rd / "labels.json").read_text())) == n
        assert (rd / "reward_model" / "model.safetensors").is_file()
    first = load_file(str(straight / "online" / "round-001" / "reward_model" / "model.safetensors"))
    second = load_file(str(straight / "online" / "round-002" / "reward_model" / "model.safetensors"))
    initial = load_file(str(straight / "reward_model" / "model.safetensors"))
    assert not torch.equal(first["reward_norm.gain"], second["reward_norm.gain"])
    # re-initialized from the initial model each time: the trunk after one epoch is near the initial model's, not
    # the previous round's (reward training is one short epoch at lr 5e-5)
    assert (second["wte.weight"] - initial["wte.weight"]).abs().max() < 1e-3
    records = [json.loads(line) for line in (straight / "train_policy_metrics.jsonl").read_text().splitlines()]
    online_records = [r for r in records if "online/round" in r]
    assert [(r["step"], r["online/round"]) for r in online_records] == [(1, 1), (2, 2)]
    assert all(0 <= r["online/accuracy_before"] <= 1 and 0 <= r["online/accuracy_after"] <= 1
               for r in online_records)
    assert (straight / "policy" / "checkpoints" / "step-00000004").is_dir()


HOOK = '''
import os
_where = os.environ.get("LMHP_ONLINE_KILL")
if _where == "retraining":
    from lm_human_preferences import train_reward as _tr
    _run = _tr.run
    def _killing_run(trainer, signals=None):
        if "round-002" in str(trainer.hp.run.save_dir):
            os._exit(17)  # as if killed while round 2 retrains its reward model
        return _run(trainer, signals)
    _tr.run = _killing_run
elif _where == "answering":
    from lm_human_preferences.labeling import store as _store
    _answer = _store.LabelStore.answer
    _count = [0]
    def _killing_answer(self, labeler, assignment_id, position):
        _count[0] += 1
        if _count[0] == 8 + 3:  # round 2's third answer: killed between its lease and its commit
            os._exit(17)
        return _answer(self, labeler, assignment_id, position)
    _store.LabelStore.answer = _killing_answer
'''


@pytest.mark.parametrize("where", ["answering", "retraining"])
def test_kill_during_a_round_then_resume_ends_as_the_uninterrupted_run(tmp_path, true_reward, straight, where):
    """SIGKILL-like exits (os._exit, no clean-up) in round 2, while the labeler answers or while the reward model
    retrains; --resume then ends with the same weights, reward models and statistics as the run done in one go."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HOOK)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hooks), str(ROOT)]), WANDB_MODE="disabled",
               LMHP_ONLINE_KILL=where)
    command = [sys.executable, str(ROOT / "launch.py"), *args(tmp_path, true_reward)]
    killed = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 17, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert not (tmp_path / "run" / "online" / "round-002" / "reward_model").exists()
    if where == "answering":
        store = LabelStore(tmp_path / "run" / "labels.db")
        assert store.progress()["answered"] == 8 + 2  # round 1's and the two of round 2's before the kill
        store.close()
    env.pop("LMHP_ONLINE_KILL")
    resumed = subprocess.run([*command, "--resume"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    final = "policy/checkpoints/step-00000004/model.safetensors"
    ours, theirs = load_file(str(tmp_path / "run" / final)), load_file(str(straight / final))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    for k in (1, 2):
        name = f"online/round-{k:03d}/reward_model/model.safetensors"
        a, b = load_file(str(tmp_path / "run" / name)), load_file(str(straight / name))
        assert all(torch.equal(a[key], b[key]) for key in a), k
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("elapsed/time", "elapsed/fps")}  # noqa: E731
                          for r in rows]
    read = lambda run: [json.loads(x) for x in (run / "train_policy_metrics.jsonl").read_text().splitlines()]  # noqa
    assert strip(read(tmp_path / "run")) == strip(read(straight))


def _labeling_fixtures():
    import importlib.util
    spec = importlib.util.spec_from_file_location("lmhp_test_online_server", ROOT / "tests/fixtures/labeling_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_people_answer_over_http_while_the_trainer_waits_and_a_signal_stops_the_wait(tmp_path):
    """labeler 'people': the trainer samples round 1 into the store and waits, saying so; SIGTERM stops it there
    (status 0, the answers so far kept); resumed, it waits again while a labeler answers through the web app, then
    retrains on those answers and finishes the run."""
    import signal
    import time
    fx = _labeling_fixtures()
    from lm_human_preferences.labeling.app import make_app
    command = [sys.executable, str(ROOT / "launch.py"), "train_policy", "test", "run", "--save_dir", str(tmp_path),
               *ONLINE[:2], "--online", "on", "--online.rounds", "1", "--online.comparisons", "4",
               "--online.poll_seconds", "0.1", "--run.wandb", "disabled"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    store_path = tmp_path / "run" / "labels.db"

    def start(extra=()):
        log = open(tmp_path / f"log{len(list(tmp_path.glob('log*')))}.txt", "w+")
        return subprocess.Popen([*command, *extra], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                text=True), log

    def wait_for_waiting(proc, log):
        deadline = time.time() + 240
        while "waiting for answers" not in Path(log.name).read_text():
            assert proc.poll() is None, Path(log.name).read_text()[-3000:]
            assert time.time() < deadline, "the trainer never waited for answers"
            time.sleep(0.1)

    proc, log = start()
    wait_for_waiting(proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    out = Path(log.name).read_text()
    assert "while online round 1 waited for answers (0 of 4)" in out and "--resume" in out
    assert not (tmp_path / "run" / "online" / "round-001" / "reward_model").exists()

    proc, log = start(["--resume"])
    wait_for_waiting(proc, log)
    store = LabelStore(store_path)
    token = store.add_labeler("alice")
    answered = 0
    with fx.ThreadServer(make_app(store)) as server:
        while True:
            status, _, _, body = fx.call(server.url, "GET", "/api/next", token=token)
            assert status == 200, body
            if body["assignment"] is None:
                break
            status, _, _, body = fx.call(server.url, "POST", "/api/answer", token=token,
                                         body={"assignment_id": body["assignment"]["id"], "position": 0})
            assert status == 200, body
            answered += 1
        assert proc.wait(timeout=240) == 0, Path(log.name).read_text()[-3000:]
    store.close()
    assert answered == 4
    labels = json.loads((tmp_path / "run" / "online" / "round-001" / "labels.json").read_text())
    assert len(labels) == 50 + 4
    assert (tmp_path / "run" / "policy" / "checkpoints" / "step-00000004").is_dir()
