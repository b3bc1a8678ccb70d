"""Every file the project writes is as readable as the user's umask allows (0644 under the usual 022), so a shared
save dir, data dir or cache works for other users: a real run (reward model, policy checkpoints, run metadata,
metrics), `sample`'s output and a converted model. Prepared datasets and the download cache are checked in
tests/datasets and tests/utils."""
import os

import pytest
import torch

import launch
from lm_human_preferences.language.model import GPT2, GPT2Config
from lm_human_preferences.language.trained_models import save_model_dir


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(root):
    """{path: (kind, mode)} of everything under root, root included."""
    found = {str(root): ("d", root.stat().st_mode & 0o777)}
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(parent, name)
            found[path] = ("d" if name in dirs else "f", os.stat(path).st_mode & 0o777)
    return found


def test_run_directory_files_are_0644_and_directories_0755(tmp_path, umask_022):
    save_dir = tmp_path / "runs"
    assert launch.main(["train_policy", "test", "run", "--save_dir", str(save_dir), "--run.wandb", "disabled"]) == 0
    assert launch.main(["sample", str(save_dir / "run"), "--nsamples", "2", "--batch_size", "2",
                        "--out", str(save_dir / "run" / "samples.json")]) == 0
    found = modes(save_dir)
    assert any(p.endswith("model.safetensors") for p in found) and any(p.endswith("samples.json") for p in found)
    wrong = {p: oct(m) for p, (kind, m) in found.items() if m != (0o755 if kind == "d" else 0o644)}
    assert not wrong, wrong


def test_converted_model_files_are_0644(tmp_path, umask_022):
    config = GPT2Config(n_vocab=11, n_ctx=8, n_embd=8, n_head=2, n_layer=1)
    torch.manual_seed(0)
    save_model_dir(tmp_path / "model", config, GPT2(config).state_dict())
    found = modes(tmp_path / "model")
    assert len(found) == 3
    assert {m for kind, m in found.values() if kind == "f"} == {0o644}
    assert found[str(tmp_path / "model")][1] == 0o755
