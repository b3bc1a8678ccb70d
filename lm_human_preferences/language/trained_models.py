"""Pretrained GPT-2 checkpoints: name conversion (OpenAI TF names, Hugging Face names) and safe loading.

A prepared model directory holds `model.safetensors` (our state-dict names) and `hparams.json` (n_vocab, n_ctx,
n_embd, n_head, n_layer); `saved_models/prepare_pytorch_checkpoint.py` writes one. Loading never unpickles.
"""
import json
import os
import re
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
    _check_no_extra_layers((re.fullmatch(rf"{re.escape(scope)}/h(\d+)/.*", k) for k in tf_vars), n_layer, "TF")
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
    _check_no_extra_layers((re.fullmatch(rf"{re.escape(prefix)}h\.(\d+)\..*", k) for k in hf_sd), n_layer,
                           "Hugging Face")
    for name in expected:
        key = prefix + name
        if key not in hf_sd:
            raise CheckpointError(f"Hugging Face checkpoint has no tensor {key!r}; is it a GPT-2 model with {n_layer} layers?")
        t = torch.as_tensor(hf_sd[key]).float()
        out[name] = (t.t() if name.endswith(conv) else t).contiguous()
    return out


def state_dict_to_hf(sd: dict, prefix: str = "transformer.") -> dict:
    """Our GPT-2 state dict (scalar heads excluded) in Hugging Face names, Conv1D weights [nx, nf]; the inverse of
    `hf_to_state_dict`, so export and `--from-hf` import round-trip exactly."""
    conv = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    return {prefix + name: (t.t() if name.endswith(conv) else t).contiguous()
            for name, t in sd.items() if not name.startswith("heads.")}


def _check_no_extra_layers(layer_matches, n_layer: int, kind: str):
    """CheckpointError if a checkpoint holds a block beyond `n_layer` (its config would silently drop it)."""
    layers = {int(m.group(1)) for m in layer_matches if m is not None}
    if layers and max(layers) >= n_layer:
        raise CheckpointError(f"{kind} checkpoint has {max(layers) + 1} layers (h{max(layers)} exists) but its config "
                              f"says n_layer={n_layer}; the extra layers would be dropped: fix n_layer in the config")


def check_tensor_values(name: str, t: torch.Tensor, source=None):
    """CheckpointError unless the checkpoint tensor `name` is floating point and finite."""
    where = f" in {source}" if source is not None else ""
    if not t.is_floating_point():
        raise CheckpointError(f"checkpoint tensor {name!r}{where} has dtype {str(t.dtype).removeprefix('torch.')}, "
                              f"but model weights are floating point: it is not a checkpoint of this model")
    if not torch.isfinite(t).all():
        raise CheckpointError(f"checkpoint tensor {name!r}{where} holds NaN or infinite values: the model it was "
                              f"saved from had diverged; use another checkpoint")


def check_state_dict(model: torch.nn.Module, state_dict: dict, *, allow_missing_heads=True, source=None):
    """Raises CheckpointError naming the first tensor whose name or shape does not match `model`, or that is not
    floating point or not finite (`source`, the file, is named in those messages)."""
    expected = model.state_dict()
    for name, t in state_dict.items():
        if name not in expected:
            raise CheckpointError(f"checkpoint tensor {name!r} does not exist in the model")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"checkpoint tensor {name!r} has shape {tuple(t.shape)} but the model expects "
                                  f"{tuple(expected[name].shape)}; was it written for another model size?")
        check_tensor_values(name, t, source)
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


CONFIG_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
MAX_CONFIG_VALUE = 2**31 - 1  # token ids are int32 in label buffers; no GPT-2 dimension comes near it


def model_config(d, source) -> GPT2Config:
    """The GPT2Config of a model's hparams dict (extra keys such as the original's dropout rates are ignored);
    CheckpointError naming `source` and the key unless every size is a positive integer and n_head divides n_embd."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{source} holds a JSON {type(d).__name__}, expected an object with "
                              f"{', '.join(CONFIG_KEYS)}")
    missing = [k for k in CONFIG_KEYS if k not in d]
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing)}; a model config needs {', '.join(CONFIG_KEYS)}")
    for k in CONFIG_KEYS:
        value = d[k]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONFIG_VALUE:
            raise CheckpointError(f"{source}: {k} = {json.dumps(value)[:40]} must be a positive integer (at most "
                                  f"{MAX_CONFIG_VALUE}): fix it in the file")
    if d["n_embd"] % d["n_head"]:
        raise CheckpointError(f"{source}: n_embd = {d['n_embd']} must be divisible by n_head = {d['n_head']}: fix "
                              f"them in the file")
    return GPT2Config(**{k: d[k] for k in CONFIG_KEYS})


def read_model_config(model_dir) -> GPT2Config:
    """The checked GPT2Config of a model directory's hparams.json."""
    path = Path(model_dir) / "hparams.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; a model directory needs hparams.json and model.safetensors")
    try:
        d = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, an int too long to parse, too deeply nested
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-run prepare_pytorch_checkpoint.py") from e
    return model_config(d, path)


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
        check_state_dict(model, sd, source=model_dir / "model.safetensors")
        model.load_state_dict(sd, strict=False)
    if n_vocab is not None and model.config.n_vocab != n_vocab:
        raise CheckpointError(f"model {initial_model!r} has n_vocab={model.config.n_vocab} but the encoding has "
                              f"{n_vocab} tokens; use the matching encoding or model")
    return model.to(device)
