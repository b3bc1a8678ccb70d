"""saved_models/prepare_pytorch_checkpoint.py: what --out may be, --overwrite, and configs it cannot use; each an
`error:` line with status 2 before anything is written (1 when writing --out fails)."""
import errno
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lm_human_preferences.language.model import GPT2, GPT2Config
from lm_human_preferences.language.trained_models import load_model
from lm_human_preferences.utils import ckpt

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "saved_models" / "prepare_pytorch_checkpoint.py"
HF_CONFIG = {"vocab_size": 61, "n_positions": 16, "n_embd": 8, "n_head": 2, "n_layer": 2,
             "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}
CONV = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@pytest.fixture(scope="module")
def prepare():
    """The script as a module (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("prepare_pytorch_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_hf_dir(directory: Path, seed=0, **config) -> Path:
    """A Hugging Face GPT-2 directory (config.json + model.safetensors, Conv1D weights [nx, nf]) of a tiny model."""
    directory.mkdir(parents=True)
    torch.manual_seed(seed)
    model = GPT2(GPT2Config(n_vocab=61, n_ctx=16, n_embd=8, n_head=2, n_layer=2))
    save_file({k: (v.t() if k.endswith(CONV) else v).contiguous().clone() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({**HF_CONFIG, **config}))
    return directory


def run(prepare, capsys, *args):
    """(status, stderr) of the script's main."""
    status = prepare.main(list(map(str, args)))
    return status, capsys.readouterr().err


def one_error_line(err):
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_out_that_is_a_file_or_under_one_is_refused(prepare, tmp_path, capsys):
    hf = write_hf_dir(tmp_path / "hf")
    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        status, err = run(prepare, capsys, "--from-hf", hf, "--out", out)
        assert status == 2
        assert one_error_line(err) == (f"error: cannot write the model into --out {out}: {tmp_path / 'file'} is a "
                                       f"file, not a directory; pass --out with a writable directory\n")
    assert (tmp_path / "file").read_text() == "mine"


def test_an_existing_out_needs_overwrite(prepare, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(prepare, capsys, "--from-hf", write_hf_dir(tmp_path / "a", seed=0), "--out", out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = write_hf_dir(tmp_path / "b", seed=1)
    status, err = run(prepare, capsys, "--from-hf", other, "--out", out)
    assert status == 2
    assert one_error_line(err) == (f"error: --out {out} already holds a prepared model (model.safetensors, "
                                   f"hparams.json); pass --overwrite to replace it, or choose another --out\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert run(prepare, capsys, "--from-hf", other, "--out", out, "--overwrite")[0] == 0
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]
    load_model(str(out))  # a complete model directory


@pytest.mark.parametrize("edit, message", [
    (lambda c: {k: v for k, v in c.items() if k != "n_head"}, "lacks n_head; a Hugging Face GPT-2 config.json has "),
    (lambda c: {k: v for k, v in c.items() if k not in ("n_layer", "vocab_size")}, "lacks vocab_size, n_layer"),
    (lambda c: {**c, "n_head": None}, "n_head = null must be a positive integer"),
    (lambda c: {**c, "n_head": 0}, "n_head = 0 must be a positive integer"),
    (lambda c: {**c, "n_head": 3}, "n_embd = 8 must be divisible by n_head = 3"),
    (lambda c: {**c, "n_layer": "2"}, 'n_layer = "2" must be a positive integer'),
    (lambda c: [c], "holds a JSON list, not a Hugging Face GPT-2 config object"),
])
def test_hf_config_it_cannot_use_is_one_line(prepare, tmp_path, capsys, edit, message):
    hf = write_hf_dir(tmp_path / "hf")
    (hf / "config.json").write_text(json.dumps(edit(HF_CONFIG)))
    status, err = run(prepare, capsys, "--from-hf", hf, "--out", tmp_path / "out")
    assert status == 2 and message in one_error_line(err) and str(hf / "config.json") in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    (b'{"n_vocab": 61, "n_ctx": 16, "n_embd": 8, "n_layer": 2}', "lacks n_head"),
    (b'{"n_vocab": 61, "n_ctx": 16, "n_embd": 8, "n_head": null, "n_layer": 2}', "n_head = null"),
    (b'{"n_vocab": 61, "n_ctx": 16', "is not valid JSON"),
    (b"\xff", "is not valid JSON"),
])
def test_tf_hparams_it_cannot_use_is_one_line(prepare, tmp_path, capsys, content, message):
    """Checked before the TF checkpoint is read (no tensorflow needed)."""
    (tmp_path / "tf").mkdir()
    (tmp_path / "tf" / "hparams.json").write_bytes(content)
    status, err = run(prepare, capsys, "--from-tf", tmp_path / "tf", "--out", tmp_path / "out")
    assert status == 2 and message in one_error_line(err) and str(tmp_path / "tf" / "hparams.json") in err


def test_a_failed_write_of_out_is_one_line_with_status_1(prepare, tmp_path, capsys, monkeypatch):
    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "atomic_write_bytes", full)
    out = tmp_path / "out"
    status, err = run(prepare, capsys, "--from-hf", write_hf_dir(tmp_path / "hf"), "--out", out)
    assert status == 1
    assert one_error_line(err) == (f"error: could not write {out} (No space left on device); free disk space on its "
                                   f"file system\n")


def test_the_command_line(tmp_path):
    hf = write_hf_dir(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({k: v for k, v in HF_CONFIG.items() if k != "n_head"}))
    result = subprocess.run([sys.executable, str(SCRIPT), "--from-hf", str(hf), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {hf / 'config.json'} lacks n_head")
