"""torchrun plumbing read from the environment: LMHP_DIST_TIMEOUT, the CUDA device each rank uses (mocked device
counts), and the process group started without device_id; checked before any collective."""
import datetime
import os
import re

import pytest
import torch

from lm_human_preferences.utils import dist


@pytest.mark.parametrize("text", ["abc", "nan", "inf", "-5", "0", "1e20", "30s"])
def test_bad_dist_timeout_is_one_error_naming_the_variable(monkeypatch, text):
    monkeypatch.setenv("LMHP_DIST_TIMEOUT", text)
    message = f"environment variable LMHP_DIST_TIMEOUT={text!r} is not a number of seconds in (0, 100000000]"
    with pytest.raises(ValueError, match=re.escape(message)):
        dist.dist_timeout()
    with pytest.raises(ValueError, match="LMHP_DIST_TIMEOUT"):
        dist.env_info("cpu")  # where the training commands check their environment, before any collective


@pytest.mark.parametrize("text, seconds", [(None, 1800), ("", 1800), ("60", 60), ("2.5", 2.5)])
def test_dist_timeout(monkeypatch, text, seconds):
    if text is None:
        monkeypatch.delenv("LMHP_DIST_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("LMHP_DIST_TIMEOUT", text)
    assert dist.dist_timeout() == datetime.timedelta(seconds=seconds)
    assert dist.env_info("cpu").world_size >= 1


@pytest.fixture
def gpus(monkeypatch):
    """Mocks `n` visible CUDA devices: gpus(n)."""
    def visible(n):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return visible


@pytest.mark.parametrize("visible, local_rank, expected", [(8, 0, 0), (8, 3, 3), (8, 7, 7), (2, 1, 1),
                                                           (1, 0, 0), (1, 3, 0), (1, 7, 0)])
def test_cuda_device_is_local_rank_where_the_process_sees_its_nodes_gpus_else_its_one_gpu(
        monkeypatch, gpus, visible, local_rank, expected):
    gpus(visible)
    assert dist.resolve_device("cuda", local_rank) == torch.device("cuda", expected)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert dist.env_info("auto").device == torch.device("cuda", expected)


def test_more_processes_than_visible_gpus_is_one_error(monkeypatch, gpus):
    gpus(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ValueError, match=r"LOCAL_RANK=3 but this process sees only 2 CUDA devices \(CUDA_VISIBLE_"
                                         r"DEVICES='0,1'\): start at most 2 processes per node"):
        dist.resolve_device("cuda", 3)
    gpus(0)
    with pytest.raises(ValueError, match="no CUDA device is available; use --run.device cpu"):
        dist.resolve_device("cuda", 0)


@pytest.mark.parametrize("visible, device, backend", [(8, "auto", "nccl"), (1, "cuda", "nccl"), (0, "auto", "gloo"),
                                                      (8, "cpu", "gloo")])
def test_process_group_starts_without_device_id(monkeypatch, gpus, visible, device, backend):
    gpus(visible)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("RANK", "13")
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setenv("LMHP_DIST_TIMEOUT", "60")
    info = dist.init_distributed(device)
    init = [kw for name, kw in calls if name == "init"]
    # device_id would turn on NCCL's non-blocking eager init, which hangs at random in torch 2.7.0 (pytorch#153960)
    assert init == [{"backend": backend, "timeout": datetime.timedelta(seconds=60)}]
    if backend == "nccl":
        assert ("set_device", info.device) in calls and info.device.index == (5 if visible > 1 else 0)


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_barrier_names_the_ranks_gpu_on_nccl(monkeypatch, backend):
    calls = []
    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    monkeypatch.setattr(torch.distributed, "barrier", lambda **kw: calls.append(kw))
    dist.barrier()
    assert calls == ([{"device_ids": [5]}] if backend == "nccl" else [{}])


def test_lmhp_deterministic_turns_on_deterministic_algorithms_and_rejects_other_values(monkeypatch, tmp_path):
    import launch
    import params
    from lm_human_preferences import train_reward
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setenv("LMHP_DETERMINISTIC", "yes")
    with pytest.raises(ValueError, match="LMHP_DETERMINISTIC='yes' must be 1"):
        dist.env_info("cpu")
    assert launch.main(["train_reward", "test", "r", "--save_dir", str(tmp_path), "--run.wandb", "disabled"]) == 2
    assert not (tmp_path / "r").exists()
    monkeypatch.setenv("LMHP_DETERMINISTIC", "1")
    try:
        train_reward.train(params.get_hparams("train_reward", "test", {"run.save_dir": str(tmp_path / "d")}))
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
