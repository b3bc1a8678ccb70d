"""The bad-input catalogue: every input a user can get wrong fails before any work with `error: <message>` (no
traceback), exit status 2, and no run directory written (or, for --resume, the run directory unchanged).

Each case runs launch.py's main() in this process (the command line exactly as typed); a few also run as a real
subprocess to show the status and the absence of a traceback end to end.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import launch  # noqa: E402
import params  # noqa: E402
from lm_human_preferences import runs  # noqa: E402
from lm_human_preferences.language.model import GPT2, GPT2Config  # noqa: E402
from lm_human_preferences.language.model import test_config as tiny_config  # noqa: E402
from lm_human_preferences.language.trained_models import save_model_dir  # noqa: E402
from lm_human_preferences.rewards import RewardModel  # noqa: E402
from lm_human_preferences.utils import ckpt  # noqa: E402

TEST_PAD = 27  # the test encoding's padding token (27 ids)
MAIN_TINY = GPT2Config(n_vocab=50257, n_ctx=8, n_embd=4, n_head=1, n_layer=1)  # a GPT-2-vocabulary toy model


def record(**changes):
    """A valid best_of_4 label record of the `test` task (query_length 4, response_length 4), with changes."""
    rec = {"query": [1, 2, 3, 4], **{f"sample{i}": [5, 6, 7, i] for i in range(4)}, "best": 2}
    rec.update(changes)
    return {k: v for k, v in rec.items() if v is not None}


def write_labels(path, records):
    path.write_text(json.dumps(records))
    return str(path)


def snapshot(directory):
    """{relative path: (sha256, mtime_ns)} of every file under `directory`."""
    return {str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs for the cases: label files, model and reward-model directories (good, broken, mismatched)."""
    d = tmp_path_factory.mktemp("inputs")
    good = [record() for _ in range(16)]
    out = {
        "labels_missing_field": write_labels(d / "missing.json", [*good[:5], record(best=None), *good[6:]]),
        "labels_wrong_length": write_labels(d / "length.json", [*good[:3], record(sample2=[5, 6, 7]), *good[4:]]),
        "labels_id_out_of_range": write_labels(d / "id.json", [*good[:7], record(query=[1, 2, 99, 4]), *good[8:]]),
        "labels_best_out_of_range": write_labels(d / "best.json", [*good[:9], record(best=4), *good[10:]]),
        "labels_too_few": write_labels(d / "few.json", good[:12]),
        "labels_not_json": str(d / "truncated.json"),
        "labels_missing": str(d / "no_such_labels.json"),
    }
    Path(out["labels_not_json"]).write_text(json.dumps(good)[:100])

    torch.manual_seed(0)
    save_model_dir(d / "truncated_model", MAIN_TINY, GPT2(MAIN_TINY).state_dict())
    weights = d / "truncated_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    other_size = GPT2Config(**{**MAIN_TINY.to_dict(), "n_embd": 8})
    save_model_dir(d / "other_size_model", MAIN_TINY, GPT2(other_size).state_dict())  # hparams say n_embd 4

    hp = params.get_hparams("train_reward", "test", {})
    rm = RewardModel(GPT2(GPT2Config(**{**tiny_config().to_dict(), "n_embd": 8}), ["reward"]), padding_token=TEST_PAD)
    runs.save_reward_model(runs.RunDir(d / "other_size_rm"), rm, hp, "test")
    (d / "other_size_rm" / "reward_model" / "hparams.json").write_text(json.dumps(tiny_config().to_dict()))
    (d / "empty_rm").mkdir()
    (d / "no_data").mkdir()
    out.update(truncated_model=str(d / "truncated_model"), other_size_model=str(d / "other_size_model"),
               other_size_rm=str(d / "other_size_rm" / "reward_model"), empty_rm=str(d / "empty_rm"),
               no_data=str(d / "no_data"))
    out.update(meaningless_inputs(d / "meaningless"))
    return out


def meaningless_inputs(d):
    """Files a run would accept and then train on meaninglessly: non-finite or integer weights, a model config that
    is not positive integers, a checkpoint of other dimensions, label JSON nested too deeply, a directory."""
    out = {}
    torch.manual_seed(0)
    for name, config_changes in (("model_n_ctx_float", {"n_ctx": 8.9}), ("model_n_head_null", {"n_head": None})):
        save_model_dir(d / name, MAIN_TINY, GPT2(MAIN_TINY).state_dict())
        (d / name / "hparams.json").write_text(json.dumps({**MAIN_TINY.to_dict(), **config_changes}))
    save_model_dir(d / "model_int64", MAIN_TINY, {k: v.long() for k, v in GPT2(MAIN_TINY).state_dict().items()})
    sd = GPT2(MAIN_TINY).state_dict()
    sd["h.0.ln_1.weight"][0] = float("nan")
    save_model_dir(d / "model_nan", MAIN_TINY, sd)

    hp = params.get_hparams("train_reward", "test", {})
    for name, change in (("rm_nan_weights", lambda rm: rm.model.wpe.weight.data.fill_(float("nan"))),
                         ("rm_nan_gain", lambda rm: rm.gain.data.fill_(float("nan"))),
                         ("rm_inf_bias", lambda rm: rm.bias.data.fill_(float("inf"))),
                         ("rm_n_head_null", None), ("rm_n_head_0", None)):
        rm = RewardModel(GPT2(tiny_config(), ["reward"]), padding_token=TEST_PAD)
        if change is not None:
            change(rm)
        runs.save_reward_model(runs.RunDir(d / name), rm, hp, "test")
        out[name] = str(d / name / "reward_model")
    for name, n_head in (("rm_n_head_null", None), ("rm_n_head_0", 0)):
        (Path(out[name]) / "hparams.json").write_text(json.dumps({**tiny_config().to_dict(), "n_head": n_head}))

    (d / "nested.json").write_text("[" * 100_000 + "]" * 100_000)
    (d / "labels_dir").mkdir()
    out.update({name: str(d / name) for name in ("model_n_ctx_float", "model_n_head_null", "model_int64",
                                                 "model_nan", "labels_dir")}, labels_nested=str(d / "nested.json"))
    return out


# (id, command line after `launch.py` with {run}/{file keys} placeholders, environment, expected message parts)
REWARD = ["train_reward", "test", "{run}"]
POLICY = ["train_policy", "test", "{run}"]
OWN_REWARD = ["--rewards.train_new_model", "off", "--rewards.trained_model"]
CATALOGUE = [
    ("unknown_experiment", ["train_reward", "sentimentt", "{run}"], {},
     ["unknown train_reward experiment 'sentimentt'; valid experiments (closest first): sentiment"]),
    ("unknown_key", [*POLICY, "--ppo.lrr", "1e-5"], {}, ["unknown hyperparameter 'ppo.lrr'; did you mean 'ppo.lr'"]),
    ("wrong_value_type", [*POLICY, "--ppo.batch_size", "eight"], {},
     ["invalid value 'eight' for 'ppo.batch_size': expected an integer"]),
    ("labels_missing_field", [*REWARD, "--labels.source", "{labels_missing_field}"], {},
     ["record 5: missing field 'best' (fields of this label type: ['query', 'sample0', 'sample1', 'sample2', "
      "'sample3', 'best'])"]),
    ("labels_wrong_length", [*REWARD, "--labels.source", "{labels_wrong_length}"], {},
     ["record 3, field 'sample2': expected 4 token ids (response_length), got 3"]),
    ("labels_id_out_of_range", [*REWARD, "--labels.source", "{labels_id_out_of_range}"], {},
     ["record 7, field 'query': token id 99 at position 2 is outside the vocabulary [0, 27) and is not the padding "
      "token 27"]),
    ("labels_best_out_of_range", [*REWARD, "--labels.source", "{labels_best_out_of_range}"], {},
     ["record 9, field 'best': 4 is out of range [0, 4)"]),
    ("labels_too_few", [*REWARD, "--labels.source", "{labels_too_few}"], {},
     ["has 12 records, fewer than num_train=16: lower labels.num_train to at most 12"]),
    ("labels_not_json", [*REWARD, "--labels.source", "{labels_not_json}"], {},
     ["is not valid JSON", "expected a JSON list of label records"]),
    ("labels_missing", [*REWARD, "--labels.source", "{labels_missing}"], {},
     ["local file '{labels_missing}' does not exist: pass an existing path or a URL"]),
    ("truncated_model_checkpoint", [*REWARD, "--task.policy.initial_model", "{truncated_model}"], {},
     ["checkpoint file {truncated_model}/model.safetensors is truncated or corrupt"]),
    ("initial_model_other_size", [*REWARD, "--task.policy.initial_model", "{other_size_model}"], {},
     ["checkpoint tensor 'h.0.attn.c_attn.bias' has shape (24,) but the model expects (12,); was it written for "
      "another model size?"]),
    ("reward_model_other_size", [*POLICY, *OWN_REWARD, "{other_size_rm}"], {},
     ["checkpoint tensor 'h.0.attn.c_attn.bias' has shape (24,) but the model expects (21,); was it written for "
      "another model size?"]),
    ("reward_model_dir_without_files", [*POLICY, *OWN_REWARD, "{empty_rm}"], {},
     ["reward model directory {empty_rm} lacks model.safetensors, hparams.json; point rewards.trained_model at the "
      "reward_model/ directory a train_reward run wrote"]),
    ("missing_initial_model", [*REWARD, "--task.policy.initial_model", "999M"], {},
     ["no prepared model '999M'", "Prepare it with: python saved_models/prepare_pytorch_checkpoint.py"]),
    ("context_too_long", [*REWARD, "--task.response_length", "5"], {},
     ["query_length (4) + suffix (0) + response_length (5) = 9 tokens exceeds the model's n_ctx=8; shorten "
      "task.query_length or task.response_length"]),
    ("virtual_ranks_not_divisible_by_processes", [*POLICY, "--virtual_ranks", "2", "--ppo.batch_size", "16"],
     {"WORLD_SIZE": "3", "RANK": "0"},
     ["'virtual_ranks' (2) must be divisible by the number of processes (3): each process hosts the same number of "
      "virtual ranks. Run on 1 or 2 processes, or pass --virtual_ranks <a multiple of 3> (a different run)"]),
    ("batch_not_divisible_by_virtual_ranks", [*POLICY, *OWN_REWARD, "test", "--virtual_ranks", "3"], {},
     ["'ppo.batch_size' (8) must be divisible by 'ppo.nminibatches' x 'virtual_ranks' (3), e.g. 6 or 9"]),
    ("batch_not_divisible_by_minibatches", [*POLICY, "--ppo.nminibatches", "3"], {},
     ["'ppo.batch_size' (8) must be divisible by 'ppo.nminibatches' (3)"]),
    ("whitening_minibatch_below_8", [*POLICY, "--ppo.nminibatches", "2"], {},
     ["reward whitening needs at least 8 rows per virtual rank's minibatch, but ppo.batch_size 8 / (ppo.nminibatches 2 "
      "x virtual_ranks 1) = 4: raise --ppo.batch_size, lower --virtual_ranks, or pass --ppo.whiten_rewards false"]),
    ("per_virtual_rank_whitening_minibatch_below_8", [*POLICY, "--virtual_ranks", "2"], {},
     ["reward whitening needs at least 8 rows per virtual rank's minibatch, but ppo.batch_size 8 / (ppo.nminibatches 1 "
      "x virtual_ranks 2) = 4"]),
    ("reward_task_differs", [*POLICY, "--task.response_length", "3"], {},
     ["rewards.train_new_model.task must equal task (the reward model is trained on the policy's task)"]),
    ("missing_prepared_dataset", [*POLICY, "--task.query_dataset", "books",
                                  "--rewards.train_new_model.task.query_dataset", "books"],
     {"LMHP_DATA_DIR": "{no_data}"},
     ["prepared dataset file '{no_data}/books_train.bin' not found for dataset 'books', mode 'train': prepare it "
      "with `python datasets/books.py --mode train`"]),  # the script writes to $LMHP_DATA_DIR too
    ("unknown_dataset", [*REWARD, "--task.query_dataset", "bookz"], {}, ["unknown dataset 'bookz'"]),
    ("resume_and_overwrite", [*POLICY, "--resume", "--overwrite"], {},
     ["--resume and --overwrite exclude each other"]),
]
# Inputs that would make a run meaningless: a non-finite or 64-bit-overflowing number, a token id no response can
# hold, weights that are not finite floating point numbers, model configs that are not positive integers.
CATALOGUE += [
    *[(f"non_finite_{key}_{text}", [*cmd, f"--{key}", text], {},
       [f"'{key}' = {float(text)!r} is not a finite number: pass a finite value"])
      for cmd, key, text in ((POLICY, "rewards.kl_coef", "nan"), (POLICY, "ppo.lr", "inf"),
                             (POLICY, "task.policy.temperature", "inf"), (POLICY, "rewards.adaptive_kl.target", "inf"),
                             (REWARD, "lr", "-inf"), (POLICY, "rewards.train_new_model.lr", "NaN"))],
    ("seed_overflows", [*POLICY, "--run.seed", "99999999999999999999999"], {},
     ["'run.seed' = 99999999999999999999999 does not fit a 64-bit integer: pass a value in [-2**63, 2**63)"]),
    ("count_overflows", [*REWARD, "--labels.num_train", "1e30"], {},
     ["'labels.num_train' = 1000000000000000019884624838656 does not fit a 64-bit integer"]),
    ("truncate_token_outside_vocabulary", [*REWARD, "--task.truncate_token", "99999"], {},
     ["'task.truncate_token' = 99999 is outside the vocabulary [0, 27) of the 'test' encoding, so no response can "
      "contain it: pass a token id in [0, 27)"]),
    ("truncate_token_is_padding", [*POLICY, *OWN_REWARD, "test", "--task.truncate_token", "27"], {},
     ["'task.truncate_token' = 27 is the padding token 27 of the 'test' encoding"]),
    ("truncate_after_beyond_response", [*REWARD, "--task.truncate_token", "3", "--task.truncate_after", "4"], {},
     ["'task.truncate_after' (4) must be < 'task.response_length' (4)"]),
    ("best_of_huge", [*REWARD, "--labels.type", "best_of_" + "9" * 40], {},
     ["'labels.type' = 'best_of_9999...9999999999999' is not a label type: valid types are best_of_N (2 <= N <= 1000"]),
    ("labels_nested_too_deeply", [*REWARD, "--labels.source", "{labels_nested}"], {},
     ["label source '{labels_nested}' ({labels_nested}) is nested too deeply to be label records"]),
    ("labels_source_is_a_directory", [*REWARD, "--labels.source", "{labels_dir}"], {},
     ["label source '{labels_dir}' is a directory: pass the label JSON file itself"]),
    ("initial_model_n_ctx_not_an_integer", [*REWARD, "--task.policy.initial_model", "{model_n_ctx_float}"], {},
     ["{model_n_ctx_float}/hparams.json: n_ctx = 8.9 must be a positive integer"]),
    ("initial_model_n_head_null", [*REWARD, "--task.policy.initial_model", "{model_n_head_null}"], {},
     ["{model_n_head_null}/hparams.json: n_head = null must be a positive integer"]),
    ("initial_model_int64_weights", [*REWARD, "--task.policy.initial_model", "{model_int64}"], {},
     ["in {model_int64}/model.safetensors has dtype int64, but model weights are floating point"]),
    ("initial_model_nan_weights", [*REWARD, "--task.policy.initial_model", "{model_nan}"], {},
     ["checkpoint tensor 'h.0.ln_1.weight' in {model_nan}/model.safetensors holds NaN or infinite values"]),
    ("reward_model_nan_weights", [*POLICY, *OWN_REWARD, "{rm_nan_weights}"], {},
     ["checkpoint tensor 'wpe.weight' in {rm_nan_weights}/model.safetensors holds NaN or infinite values"]),
    ("reward_model_nan_gain", [*POLICY, *OWN_REWARD, "{rm_nan_gain}"], {},
     ["checkpoint tensor 'reward_norm.gain' in {rm_nan_gain}/model.safetensors holds NaN or infinite values"]),
    ("reward_model_inf_bias", [*POLICY, *OWN_REWARD, "{rm_inf_bias}"], {},
     ["checkpoint tensor 'reward_norm.bias' in {rm_inf_bias}/model.safetensors holds NaN or infinite values"]),
    ("reward_model_n_head_null", [*POLICY, *OWN_REWARD, "{rm_n_head_null}"], {},
     ["{rm_n_head_null}/hparams.json: n_head = null must be a positive integer"]),
    ("reward_model_n_head_0", [*POLICY, *OWN_REWARD, "{rm_n_head_0}"], {},
     ["{rm_n_head_0}/hparams.json: n_head = 0 must be a positive integer"]),
    ("dist_timeout_not_a_number", REWARD, {"LMHP_DIST_TIMEOUT": "abc"},
     ["environment variable LMHP_DIST_TIMEOUT='abc' is not a number of seconds"]),
    ("tf32_not_0_or_1", REWARD, {"LMHP_TF32": "yes"},
     ["environment variable LMHP_TF32='yes' must be 1 (TF32 matmuls on CUDA) or 0"]),
]
if not torch.cuda.is_available():
    CATALOGUE.append(("cuda_without_gpu", [*REWARD, "--run.device", "cuda"], {},
                      ["run.device=cuda but no CUDA device is available; use --run.device cpu"]))


def fill(text, values):
    return text.format(**values)


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_fails_before_writing(case, files, tmp_path, monkeypatch, capsys):
    name, argv, env, messages = case
    values = dict(files, run="run")
    for key, value in env.items():
        monkeypatch.setenv(key, fill(value, values))
    status = launch.main([fill(a, values) for a in argv] + ["--save_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert status == 2, err[-3000:]
    assert err.startswith("error: ") and "Traceback" not in err
    for message in messages:
        assert fill(message, values) in err
    assert not (tmp_path / "runs").exists()  # nothing written, not even the run directory


def test_catalogue_has_at_least_15_distinct_inputs():
    assert len({c[0] for c in CATALOGUE}) >= 15


@pytest.mark.parametrize("key", ["labels_missing_field", "reward_model_dir_without_files", "labels_nested_too_deeply"])
def test_bad_input_as_a_real_command(files, tmp_path, key):
    name, argv, env, messages = next(c for c in CATALOGUE if c[0] == key)
    values = dict(files, run="run")
    result = subprocess.run([sys.executable, str(ROOT / "launch.py"), *[fill(a, values) for a in argv],
                             "--save_dir", str(tmp_path / "runs")], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, WANDB_MODE="disabled"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert fill(messages[0], values) in result.stderr
    assert os.listdir(tmp_path) == []


# ---- bad inputs inside an existing run (--resume): the run directory stays as it was -----------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A chained reward + policy run of the test experiment (2 updates)."""
    save_dir = tmp_path_factory.mktemp("finished")
    assert launch.main(["train_policy", "test", "run", "--save_dir", str(save_dir), "--run.wandb", "disabled"]) == 0
    return save_dir / "run"


@pytest.mark.parametrize("damage, message", [
    ("truncate_weights", "checkpoint file {latest}/model.safetensors is truncated or corrupt"),
    ("truncate_optimizer", "{latest}/optimizer.pt is truncated or not a checkpoint file of this project"),
    ("drop_rng", "checkpoint file {latest}/rng-vrank0.pt is missing"),
    ("corrupt_state", "checkpoint file {latest}/state.json is truncated or corrupt"),
    ("other_size_weights", "checkpoint tensor 'h.0.attn.c_attn.bias' has shape (24,) but the model expects (21,)"),
])
def test_damaged_checkpoint_is_refused_on_resume(finished_run, tmp_path, capsys, damage, message):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    latest = ckpt.latest_checkpoint(run_dir / "policy" / "checkpoints")
    if damage == "truncate_weights":
        data = (latest / "model.safetensors").read_bytes()
        (latest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "truncate_optimizer":
        data = (latest / "optimizer.pt").read_bytes()
        (latest / "optimizer.pt").write_bytes(data[: len(data) // 2])
    elif damage == "drop_rng":
        (latest / "rng-vrank0.pt").unlink()
    elif damage == "corrupt_state":
        (latest / "state.json").write_text('{"global_step": 2, "kl')
    else:
        model = GPT2(GPT2Config(**{**tiny_config().to_dict(), "n_embd": 8}), ["value"])
        ckpt.atomic_save_tensors(latest / "model.safetensors", model.state_dict())
    before = snapshot(run_dir)
    status = launch.main(["train_policy", "test", "run", "--save_dir", str(tmp_path), "--run.wandb", "disabled",
                          "--ppo.total_episodes", "24", "--resume"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and "Traceback" not in err
    assert message.format(latest=latest) in err
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("change, extra, message", [
    ("other_virtual_ranks", ["--virtual_ranks", "2", "--ppo.batch_size", "16", "--ppo.total_episodes", "48"],
     "checkpoint {latest} is of a run on virtual_ranks 1 but this run has virtual_ranks 2; resume with "
     "--virtual_ranks 1 (on any number of processes dividing it)"),
    ("per_process_states", ["--ppo.total_episodes", "24"],
     "checkpoint {latest} holds per-process random states (written before virtual ranks); this version cannot "
     "continue it exactly. Start a new run (--overwrite or another name), or resume it with the version that wrote "
     "it"),
])
def test_checkpoint_of_another_run_layout_is_refused_on_resume(finished_run, tmp_path, capsys, change, extra,
                                                               message):
    """--resume needs the run's virtual_ranks (any process count dividing it); checkpoints of the per-process layout
    (rng-rank<R>.pt, sampler-rank<R>.json, world_size in state.json) are refused, not misread."""
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    latest = ckpt.latest_checkpoint(run_dir / "policy" / "checkpoints")
    if change == "per_process_states":
        state = json.loads((latest / "state.json").read_text())
        del state["virtual_ranks"]
        (latest / "state.json").write_text(json.dumps(state))
    before = snapshot(run_dir)
    status = launch.main(["train_policy", "test", "run", "--save_dir", str(tmp_path), "--run.wandb", "disabled",
                          *extra, "--resume"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and "Traceback" not in err
    assert message.format(latest=latest) in err
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("flag, value, message", [
    ("--seed", "99999999999999999999999",
     "argument --seed: 99999999999999999999999 does not fit a 64-bit integer: pass a seed in [-2**63, 2**63)"),
    ("--seed", "-9223372036854775809", "argument --seed: -9223372036854775809 does not fit a 64-bit integer"),
    ("--temperature", "inf", "argument --temperature: must be a finite number > 0, got inf"),
    ("--temperature", "nan", "argument --temperature: must be a finite number > 0, got nan"),
])
def test_sample_refuses_arguments_that_make_sampling_meaningless(finished_run, tmp_path, capsys, flag, value,
                                                                 message):
    out = tmp_path / "samples.jsonl"
    with pytest.raises(SystemExit) as e:
        launch.main(["sample", str(finished_run), "--nsamples", "1", "--batch_size", "1", "--out", str(out), flag,
                     value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
    assert not out.exists()
