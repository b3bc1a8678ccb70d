"""run.precision: 'auto' resolved by what the processor does well, explicit choices honoured (with a warning where
bf16 is only emulated), and the resolution shown by --dry_run and recorded in the saved hyperparameters."""
import json

import pytest
import torch

import launch
import params
from lm_human_preferences.hparams import TrainRewardHParams
from lm_human_preferences.utils import dist, precision


@pytest.fixture(autouse=True)
def fresh_caches():
    precision._auto_choice.cache_clear()
    precision.cpu_bf16_speedup.cache_clear()
    precision._warned.clear()
    yield
    precision._auto_choice.cache_clear()
    precision.cpu_bf16_speedup.cache_clear()
    precision._warned.clear()


def no_probe(n):
    raise AssertionError("no bf16 probe may run on a CPU without native bf16 for 'auto'")


def test_auto_is_fp32_on_a_cpu_without_native_bf16_and_runs_no_probe(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", no_probe)
    choice = precision.choose_precision("auto", torch.device("cpu"))
    assert choice.precision == "fp32" and "emulated" in choice.reason


@pytest.mark.parametrize("speedup, expected", [(3.0, "bf16"), (1.0, "fp32"), (0.5, "fp32")])
def test_auto_on_a_native_bf16_cpu_follows_the_timed_probe(monkeypatch, speedup, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    calls = []
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda n: calls.append(n) or speedup)
    choice = precision.choose_precision("auto", torch.device("cpu"))
    assert choice.precision == expected and f"{speedup:.1f}" in choice.reason
    precision.choose_precision("auto", torch.device("cpu"))
    assert calls == [precision.PROBE_SIZE]  # measured once per process


@pytest.mark.parametrize("capability, expected", [((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 0), "fp32"),
                                                  ((7, 5), "fp32"), ((8, 6), "bf16"), ((8, 9), "bf16"),
                                                  ((10, 0), "bf16"), ((12, 0), "bf16"), ((6, 1), "fp32"),
                                                  ((7, 2), "fp32")])
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_auto_on_cuda_needs_bf16_tensor_cores(monkeypatch, capability, expected, device):
    # V100 (7.0) and T4 (7.5): torch's is_bf16_supported() is True there through emulation; it must not decide
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mock GPU")
    choice = precision.choose_precision("auto", torch.device(device))
    assert choice.precision == expected and f"{capability[0]}.{capability[1]}" in choice.reason
    assert asked == [torch.device(device)]  # the run's own GPU, not device 0
    settings = dist.resolved_run_settings("auto", torch.device(device))
    assert settings["run.precision"] == expected and "compute capability" in settings["run.precision_reason"]
    assert precision.choose_precision("fp32", torch.device(device)).precision == "fp32"


def test_explicit_bf16_on_an_emulating_cpu_runs_but_warns_once_with_the_ratio(monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda n: 0.01)
    for _ in range(3):
        assert precision.choose_precision("bf16", torch.device("cpu")).precision == "bf16"
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "0.010x" in err and "100x slower" in err and "auto" in err


def test_explicit_choices_and_bad_names(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.choose_precision("fp32", torch.device("cpu")).precision == "fp32"
    assert precision.choose_precision("bf16", torch.device("cpu")).precision == "bf16"
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        precision.choose_precision("fp16", torch.device("cpu"))


def test_the_real_probe_is_quick_and_positive():
    speedup = precision.cpu_bf16_speedup(64)
    assert speedup > 0
    assert precision.cpu_description().startswith(torch.backends.cpu.get_cpu_capability())


def test_dry_run_shows_what_auto_resolves_to_and_why(capsys):
    assert launch.main(["train_policy", "sentiment", "x", "--dry_run"]) == 0
    out = capsys.readouterr().out
    expected = precision.choose_precision("auto", torch.device("cpu"))
    assert f"run.precision auto -> {expected.precision} ({expected.reason})" in out


def test_saved_hyperparameters_record_the_resolution_and_still_load(tmp_path):
    from lm_human_preferences import train_reward
    hp = params.get_hparams("train_reward", "test", {"run.save_dir": str(tmp_path)})
    train_reward.train(hp)
    saved = json.loads((tmp_path / "train_reward_hparams.json").read_text())
    assert saved["resolved"] == {"run.device": "cpu", "run.precision": "fp32", "run.precision_reason": "set explicitly"}
    assert TrainRewardHParams.from_nested_dict(saved).to_nested_dict() == hp.to_nested_dict()
