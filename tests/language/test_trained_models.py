"""Pretrained checkpoints: a model config is checked key by key, weights must be floating point and finite, and a
TF / Hugging Face checkpoint may not hold more layers than its config says."""
import json

import numpy as np
import pytest
import torch

from lm_human_preferences.language.model import GPT2, GPT2Config
from lm_human_preferences.language.trained_models import (hf_to_state_dict, load_model, model_config,
                                                          read_model_config, save_model_dir, tf_to_state_dict)
from lm_human_preferences.utils.ckpt import CheckpointError

TINY = GPT2Config(n_vocab=11, n_ctx=8, n_embd=4, n_head=2, n_layer=2)


def saved(tmp_path, config=TINY, **hparams_changes):
    """A prepared model directory of `config`, its hparams.json then edited with `hparams_changes`."""
    torch.manual_seed(0)
    d = tmp_path / "model"
    save_model_dir(d, config, GPT2(config).state_dict())
    if hparams_changes:
        (d / "hparams.json").write_text(json.dumps({**config.to_dict(), **hparams_changes}))
    return d


@pytest.mark.parametrize("key, value", [
    ("n_ctx", 8.9), ("n_ctx", 8.0), ("n_head", None), ("n_head", 0), ("n_head", -2), ("n_layer", "2"),
    ("n_embd", True), ("n_vocab", 2**40), ("n_layer", [2]),
])
def test_config_values_must_be_positive_integers(tmp_path, key, value):
    d = saved(tmp_path, **{key: value})
    with pytest.raises(CheckpointError, match=rf"{d / 'hparams.json'}: {key} = .* must be a positive integer"):
        read_model_config(d)
    with pytest.raises(CheckpointError, match=f"{key} = "):
        load_model(str(d))


def test_config_shape_errors_name_the_file(tmp_path):
    d = saved(tmp_path, n_head=3)
    with pytest.raises(CheckpointError, match="n_embd = 4 must be divisible by n_head = 3"):
        read_model_config(d)
    (d / "hparams.json").write_text(json.dumps({"n_vocab": 11, "n_ctx": 8}))
    with pytest.raises(CheckpointError, match="lacks n_embd, n_head, n_layer"):
        read_model_config(d)
    (d / "hparams.json").write_text(json.dumps([TINY.to_dict()]))
    with pytest.raises(CheckpointError, match="holds a JSON list, expected an object"):
        read_model_config(d)
    (d / "hparams.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        read_model_config(d)
    assert model_config({**TINY.to_dict(), "embd_pdrop": 0.1}, "x") == TINY  # the original's extra keys


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_weights_are_refused(tmp_path, dtype):
    d = saved(tmp_path)
    sd = {k: v.to(dtype) for k, v in GPT2(TINY).state_dict().items()}
    save_model_dir(d, TINY, sd)
    with pytest.raises(CheckpointError, match=f"checkpoint tensor '[a-z0-9_.]+' in {d / 'model.safetensors'} has "
                                              f"dtype {str(dtype).removeprefix('torch.')}, but model weights are "
                                              f"floating point"):
        load_model(str(d))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(tmp_path, bad):
    d = saved(tmp_path)
    sd = GPT2(TINY).state_dict()
    sd["h.1.mlp.c_fc.bias"][3] = bad
    save_model_dir(d, TINY, sd)
    with pytest.raises(CheckpointError, match="checkpoint tensor 'h.1.mlp.c_fc.bias' in .* holds NaN or infinite"):
        load_model(str(d))


def test_half_precision_weights_still_load(tmp_path):
    d = saved(tmp_path)
    save_model_dir(d, TINY, {k: v.to(torch.bfloat16) for k, v in GPT2(TINY).state_dict().items()})
    assert load_model(str(d)).wte.weight.dtype == torch.float32


def _tf_vars(config, n_layer):
    """OpenAI-TF-named variables of a random GPT-2 of `config` with `n_layer` blocks."""
    sd = GPT2(GPT2Config(**{**config.to_dict(), "n_layer": n_layer})).state_dict()
    out = {"model/wte": sd["wte.weight"], "model/wpe": sd["wpe.weight"], "model/ln_f/g": sd["ln_f.weight"],
           "model/ln_f/b": sd["ln_f.bias"]}
    for i in range(n_layer):
        for part, ours in (("ln_1/g", "ln_1.weight"), ("ln_1/b", "ln_1.bias"), ("ln_2/g", "ln_2.weight"),
                           ("ln_2/b", "ln_2.bias"), ("attn/c_attn/b", "attn.c_attn.bias"),
                           ("attn/c_proj/b", "attn.c_proj.bias"), ("mlp/c_fc/b", "mlp.c_fc.bias"),
                           ("mlp/c_proj/b", "mlp.c_proj.bias")):
            out[f"model/h{i}/{part}"] = sd[f"h.{i}.{ours}"]
        for part in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            out[f"model/h{i}/{part}/w"] = sd[f"h.{i}.{part.replace('/', '.')}.weight"].t()[None]
    return {k: np.asarray(v) for k, v in out.items()}


def test_tf_checkpoint_with_more_layers_than_its_config_is_refused():
    assert set(tf_to_state_dict(_tf_vars(TINY, 2), TINY.n_layer)) == set(GPT2(TINY).state_dict())
    with pytest.raises(CheckpointError, match="TF checkpoint has 3 layers .h2 exists. but its config says n_layer=2"):
        tf_to_state_dict(_tf_vars(TINY, 3), TINY.n_layer)


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_hf_checkpoint_with_more_layers_than_its_config_is_refused(prefix):
    def hf(n_layer):
        sd = GPT2(GPT2Config(**{**TINY.to_dict(), "n_layer": n_layer})).state_dict()
        conv = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        return {prefix + k: (v.t() if k.endswith(conv) else v) for k, v in sd.items() if not k.startswith("heads")}
    assert set(hf_to_state_dict(hf(2), 2)) == set(GPT2(TINY).state_dict())
    with pytest.raises(CheckpointError, match="Hugging Face checkpoint has 4 layers .h3 exists. but its config says "
                                              "n_layer=2"):
        hf_to_state_dict(hf(4), 2)
