"""Prepares a GPT-2 checkpoint for this project: `model.safetensors` + `hparams.json` in --out.

    python saved_models/prepare_pytorch_checkpoint.py --from-tf 124M --out saved_models/124M
    python saved_models/prepare_pytorch_checkpoint.py --from-tf path/to/openai/124M --out saved_models/124M
    python saved_models/prepare_pytorch_checkpoint.py --from-hf path/to/hf/gpt2 --out saved_models/124M

--from-tf reads OpenAI's original TF release (downloaded from OpenAI's public mirror with its seven files when a
size name is given) and needs tensorflow (`pip install -e .[tf]`). --from-hf reads a Hugging Face GPT-2 directory
(config.json + model.safetensors or pytorch_model.bin; the .bin is read with weights_only=True). Every config value,
tensor name and shape is checked, and the result is written atomically. A prepared model already in --out is
replaced only with --overwrite.

Exit status: 0 on success; 2 with `error: <message>` for bad input (found before --out is written); 1 with
`error: <message>` when writing --out fails (a full disk, no permission).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_human_preferences.language.model import GPT2  # noqa: E402
from lm_human_preferences.language.trained_models import (OPENAI_MODEL_NAMES, check_state_dict,  # noqa: E402
                                                          hf_to_state_dict, model_config, save_model_dir,
                                                          tf_to_state_dict)
from lm_human_preferences.utils.ckpt import CheckpointError, load_tensors  # noqa: E402
from lm_human_preferences.utils.download import fetch  # noqa: E402
from lm_human_preferences.utils.files import unwritable, writing  # noqa: E402

OPENAI_BASE = "https://openaipublic.blob.core.windows.net/gpt-2/models"
OPENAI_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001", "model.ckpt.index",
                "model.ckpt.meta", "vocab.bpe")
OUT_FILES = ("model.safetensors", "hparams.json")  # what --out receives
# Hugging Face config.json key -> ours (n_ctx comes from n_positions, or n_ctx, default 1024)
HF_CONFIG_KEYS = {"vocab_size": "n_vocab", "n_embd": "n_embd", "n_head": "n_head", "n_layer": "n_layer"}


def check_out(out, overwrite: bool):
    """ValueError unless --out can take the prepared model: a directory (or absent) in a writable place, holding
    no prepared model unless `overwrite`."""
    out = Path(out)
    problem = unwritable(out, directory=True)
    if problem is not None:
        raise ValueError(f"cannot write the model into --out {out}: {problem}; pass --out with a writable directory")
    existing = [name for name in OUT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise ValueError(f"--out {out} already holds a prepared model ({', '.join(existing)}); pass --overwrite to "
                         f"replace it, or choose another --out")


def read_json_config(path: Path):
    """The JSON of a config file; CheckpointError naming it if it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, a number too long, nested too deep
        raise CheckpointError(f"{path} is not valid JSON ({e}); download or copy it again") from e


def download_openai_model(name: str, base_url: str = OPENAI_BASE) -> Path:
    """Fetches the seven files of an OpenAI GPT-2 release into the download cache; returns their directory."""
    paths = [fetch(f"{base_url}/{name}/{f}") for f in OPENAI_FILES]
    return paths[0].parent


def read_tf_checkpoint(model_dir: Path) -> dict:
    """All variables of the TF checkpoint in model_dir as numpy arrays."""
    try:
        import tensorflow as tf
    except ImportError as e:
        raise SystemExit("--from-tf needs tensorflow: install the extra with `pip install -e .[tf]` "
                         "(or `pip install tensorflow-cpu`)") from e
    prefix = tf.train.latest_checkpoint(str(model_dir)) or str(model_dir / "model.ckpt")
    if not Path(prefix + ".index").is_file():
        raise FileNotFoundError(f"no TF checkpoint in {model_dir} (expected model.ckpt.index and model.ckpt.data-*)")
    try:
        reader = tf.train.load_checkpoint(prefix)
        return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
    except Exception as e:
        raise CheckpointError(f"cannot read the TF checkpoint {prefix}: {e}. Is a file truncated? Delete it and "
                              f"download again") from e


def convert_tf(src: str, base_url: str = OPENAI_BASE):
    model_dir = download_openai_model(src, base_url) if src in OPENAI_MODEL_NAMES else Path(src)
    hparams_path = model_dir / "hparams.json"
    if not hparams_path.is_file():
        raise FileNotFoundError(f"{hparams_path} is missing; a TF GPT-2 directory holds hparams.json and model.ckpt.*")
    config = model_config(read_json_config(hparams_path), hparams_path)
    tf_vars = read_tf_checkpoint(model_dir)
    return config, tf_to_state_dict(tf_vars, config.n_layer, scope="model")


def convert_hf(src: str):
    d = Path(src)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing; --from-hf expects a Hugging Face GPT-2 directory")
    cfg = read_json_config(cfg_path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path} holds a JSON {type(cfg).__name__}, not a Hugging Face GPT-2 config object")
    missing = [k for k in HF_CONFIG_KEYS if k not in cfg]
    if missing:
        raise CheckpointError(f"{cfg_path} lacks {', '.join(missing)}; a Hugging Face GPT-2 config.json has "
                              f"{', '.join(HF_CONFIG_KEYS)} (and n_positions)")
    config = model_config({**{ours: cfg[hf] for hf, ours in HF_CONFIG_KEYS.items()},
                           "n_ctx": cfg.get("n_positions", cfg.get("n_ctx", 1024))}, cfg_path)
    if cfg.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{cfg_path}: activation_function {cfg['activation_function']!r} is not GPT-2's tanh GELU")
    if abs(cfg.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise CheckpointError(f"{cfg_path}: layer_norm_epsilon {cfg['layer_norm_epsilon']} is not GPT-2's 1e-5")
    if (d / "model.safetensors").is_file():
        hf_sd = load_tensors(d / "model.safetensors")
    elif (d / "pytorch_model.bin").is_file():
        try:
            hf_sd = torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{d / 'pytorch_model.bin'} is truncated or not a state dict: {e}") from e
    else:
        raise FileNotFoundError(f"{d} has neither model.safetensors nor pytorch_model.bin")
    return config, hf_to_state_dict(hf_sd, config.n_layer)


def prepare(*, from_tf=None, from_hf=None, out, base_url=OPENAI_BASE, overwrite=False) -> Path:
    """Converts one checkpoint into --out (checked first, before any download); returns --out."""
    if (from_tf is None) == (from_hf is None):
        raise ValueError("give exactly one of --from-tf and --from-hf")
    check_out(out, overwrite)
    config, sd = convert_tf(from_tf, base_url) if from_tf is not None else convert_hf(from_hf)
    model = GPT2(config)
    check_state_dict(model, sd, allow_missing_heads=False)
    model.load_state_dict(sd)  # strict: every name and shape
    with writing(out):
        save_model_dir(out, config, model.state_dict())
    return Path(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-tf", help=f"an OpenAI release name ({', '.join(OPENAI_MODEL_NAMES)}) or a directory")
    src.add_argument("--from-hf", help="a Hugging Face GPT-2 directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--base-url", default=OPENAI_BASE, help="mirror of OpenAI's gpt-2/models")
    p.add_argument("--overwrite", action="store_true", help="replace a prepared model already in --out")
    args = p.parse_args(argv)
    try:
        out = prepare(from_tf=args.from_tf, from_hf=args.from_hf, out=args.out, base_url=args.base_url,
                      overwrite=args.overwrite)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # writing --out failed (a WriteError naming the path and the fix)
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out / 'model.safetensors'} and {out / 'hparams.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
