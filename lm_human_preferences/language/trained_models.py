"""Pretrained GPT-2 checkpoints: name conversion (OpenAI TF names, Hugging Face names) and safe loading.

A prepared model directory holds `model.safetensors` (our state-dict names) and `hparams.json` (n_vocab, n_ctx,
n_embd, n_head, n_layer); `saved_models/prepare_pytorch_checkpoint.py` writes one. Loading never unpickles.
"""
import json
import os
from pathlib import Path

import numpy as np
import torch

from lm_human_preferences.language.model import GPT2, GPT2Config, test_config
from lm_human_preferences.utils.ckpt import CheckpointError, atomic_save_tensors, atomic_write_bytes, load_tensors

# Where `initial_model` names such as '124M' are looked up: $LMHP_MODELS_DIR, else the repo's saved_models/.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[2] / "saved_models"
OPENAI_MODEL_NAMES = ("124M", "355M", "774M", "1558M")


def models_dir() -> Path:
    return Path(os.environ.get("LMHP_MODELS_DIR", DEFAULT_MODELS_DIR))


def _tf_layer_names(i):
    """(TF suffix, our name, is a conv 'w' that needs squeeze+transpose) for block i."""
    return [
        (f"h{i}/ln_1/g", f"h.{i}.ln_1.weight", False), (f"h{i}/ln_1/b", f"h.{i}.ln_1.bias", False),
        (f"h{i}/attn/c_attn/w", f"h.{i}.attn.c_attn.weight", True), (f"h{i}/attn/c_attn/b", f"h.{i}.attn.c_attn.bias", False),
        (f"h{i}/attn/c_proj/w", f"h.{i}.attn.c_proj.weight", True), (f"h{i}/attn/c_proj/b", f"h.{i}.attn.c_proj.bias", False),
        (f"h{i}/ln_2/g", f"h.{i}.ln_2.weight", False), (f"h{i}/ln_2/b", f"h.{i}.ln_2.bias", False),
        (f"h{i}/mlp/c_fc/w", f"h.{i}.mlp.c_fc.weight", True), (f"h{i}/mlp/c_fc/b", f"h.{i}.mlp.c_fc.bias", False),
        (f"h{i}/mlp/c_proj/w", f"h.{i}.mlp.c_proj.weight", True), (f"h{i}/mlp/c_proj/b", f"h.{i}.mlp.c_proj.bias", False),
    ]


def tf_to_state_dict(tf_vars: dict, n_layer: int, scope: str = "model", heads=()) -> dict:
    """Maps OpenAI TF variables (`<scope>/h0/attn/c_attn/w` [1, nx, nf], ...) to our state dict (ORIGINAL §4.8).

    Every expected name must be present; a missing one raises CheckpointError naming it.
    """
    names = [("wte", "wte.weight", False), ("wpe", "wpe.weight", False),
             ("ln_f/g", "ln_f.weight", False), ("ln_f/b", "ln_f.bias", False)]
    for i in range(n_layer):
        names += _tf_layer_names(i)
    for head in heads:
        names += [(f"heads/{head}/w", f"heads.{head}.w", False), (f"heads/{head}/b", f"heads.{head}.b", False)]
    out = {}
    for tf_name, ours, is_conv in names:
        full = f"{scope}/{tf_name}"
        if full not in tf_vars:
            raise CheckpointError(f"TF checkpoint has no variable {full!r}; is it a GPT-2 checkpoint with {n_layer} layers?")
        t = torch.as_tensor(np.asarray(tf_vars[full], dtype=np.float32))
        if is_conv:
            if t.dim() != 3 or t.shape[0] != 1:
                raise CheckpointError(f"TF variable {full!r} has shape {tuple(t.shape)}, expected [1, nx, nf]")
            t = t[0].t()  # [nx, nf] -> nn.Linear's [nf, nx]
        out[ours] = t.contiguous()
    return out


def hf_to_state_dict(hf_sd: dict, n_layer: int) -> dict:
    """Maps a Hugging Face GPT2LMHeadModel/GPT2Model state dict (Conv1D [nx, nf] weights) to ours."""
    prefix = "transformer." if any(k.startswith("transformer.") for k in hf_sd) else ""
    out = {}
    conv = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    expected = ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"]
    for i in range(n_layer):
        expected += [f"h.{i}.{n}" for n in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                                             "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                                             "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")]
    for name in expected:
        key = prefix + name
        if key not in hf_sd:
            raise CheckpointError(f"Hugging Face checkpoint has no tensor {key!r}; is it a GPT-2 model with {n_layer} layers?")
        t = torch.as_tensor(hf_sd[key]).float()
        out[name] = (t.t() if name.endswith(conv) else t).contiguous()
    return out


def check_state_dict(model: torch.nn.Module, state_dict: dict, *, allow_missing_heads=True):
    """Raises CheckpointError naming the first tensor whose name or shape does not match `model`."""
    expected = model.state_dict()
    for name, t in state_dict.items():
        if name not in expected:
            raise CheckpointError(f"checkpoint tensor {name!r} does not exist in the model")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"checkpoint tensor {name!r} has shape {tuple(t.shape)} but the model expects "
                                  f"{tuple(expected[name].shape)}; was it written for another model size?")
    for name in expected:
        if name not in state_dict and not (allow_missing_heads and name.startswith("heads.")):
            raise CheckpointError(f"checkpoint has no tensor {name!r}")


def save_model_dir(out_dir, config: GPT2Config, state_dict: dict):
    """Writes model.safetensors + hparams.json atomically into out_dir."""
    out_dir = Path(out_dir)
    atomic_save_tensors(out_dir / "model.safetensors", state_dict)
    atomic_write_bytes(out_dir / "hparams.json", (json.dumps(config.to_dict(), indent=2) + "\n").encode())


def resolve_model_dir(initial_model: str) -> Path:
    """Turns an `initial_model` value (a directory, or a name like '124M' under saved_models/) into a directory."""
    p = Path(initial_model)
    if p.is_dir():
        return p
    candidate = models_dir() / initial_model
    if candidate.is_dir():
        return candidate
    hint = (f"python saved_models/prepare_pytorch_checkpoint.py --from-tf {initial_model} --out {candidate}"
            if initial_model in OPENAI_MODEL_NAMES else
            f"python saved_models/prepare_pytorch_checkpoint.py --from-hf <hf_dir> --out {candidate}")
    raise FileNotFoundError(f"no prepared model {initial_model!r}: neither a directory nor {candidate}. Prepare it with: {hint}")


def read_model_config(model_dir) -> GPT2Config:
    path = Path(model_dir) / "hparams.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; a model directory needs hparams.json and model.safetensors")
    try:
        return GPT2Config.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-run prepare_pytorch_checkpoint.py") from e


def load_model(initial_model: str, scalar_heads=(), n_vocab: int | None = None, device="cpu") -> GPT2:
    """A GPT-2 with `scalar_heads` from a prepared directory or name; 'test' gives the original's random test model.

    Heads missing from the checkpoint keep their initialisers (value: zeros; reward: N(0, 1/sqrt(n_embd+1))).
    """
    if initial_model == "test":
        model = GPT2(test_config(), scalar_heads)
    else:
        model_dir = resolve_model_dir(initial_model)
        config = read_model_config(model_dir)
        if n_vocab is not None and config.n_vocab != n_vocab:
            raise CheckpointError(f"model {initial_model!r} has n_vocab={config.n_vocab} but the encoding has "
                                  f"{n_vocab} tokens; use the matching encoding or model")
        model = GPT2(config, scalar_heads)
        sd = load_tensors(model_dir / "model.safetensors")
        # heads the caller did not ask for (a policy's value head when loading a reward model) are dropped
        sd = {k: v for k, v in sd.items() if not k.startswith("heads.") or k.split(".")[1] in scalar_heads}
        check_state_dict(model, sd)
        model.load_state_dict(sd, strict=False)
    if n_vocab is not None and model.config.n_vocab != n_vocab:
        raise CheckpointError(f"model {initial_model!r} has n_vocab={model.config.n_vocab} but the encoding has "
                              f"{n_vocab} tokens; use the matching encoding or model")
    return model.to(device)
