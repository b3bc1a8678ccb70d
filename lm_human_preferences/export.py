"""Exports a run's policy or reward model to a directory Hugging Face `transformers` loads with no custom code.

    python launch.py export policy <run_dir> --out DIR [--overwrite]
    python launch.py export reward <reward_model_dir | run_dir> --out DIR [--overwrite]

policy: the latest complete checkpoint of a train_policy run as `GPT2LMHeadModel` (config.json, model.safetensors,
generation_config.json sampling as the policy does: the task temperature, no top-k, no stop at EOS), the tokenizer,
and the value head beside it (value_head.safetensors: w [n_embd], b []). The transformer round-trips exactly through
`saved_models/prepare_pytorch_checkpoint.py --from-hf`.

reward: a train_reward run's reward_model/ (or a run directory holding one, or the policy run's
rewards.trained_model) as `GPT2ForSequenceClassification` with one label. score = gain * (h.w + b) + bias becomes
score = h'.(gain w) with `h' = h + c w'/|w'|^2`, c = gain b + bias, w' = gain w: HF's score layer has no bias, so the
constant is folded into the final layer norm's bias (exact up to float32 rounding). The embedding gets rows up to
our padding id (copies of token 0, as our model embeds a pad), which is `pad_token_id`, so HF reads the score at the
last token that is not a pad, as here. reward_head.safetensors keeps the unfolded head and the original ln_f bias.

Both write a README.md into DIR saying how to load them. DIR is assembled as DIR.tmp and renamed; an existing DIR
is replaced only with --overwrite, and only if it holds nothing but the files an export writes.

Exit status: 0 on success; 2 with `error: <message>` for bad input (found before anything is written); 1 with
`error: <message>` when writing fails (a full disk, no permission).
"""
import argparse
import contextlib
import json
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save

from lm_human_preferences import runs
from lm_human_preferences.language.encodings import ENCODING_NAMES, Encoding, get_encoding
from lm_human_preferences.language.model import GPT2, GPT2Config
from lm_human_preferences.language.trained_models import read_model_config, state_dict_to_hf
from lm_human_preferences.rewards import RewardModel
from lm_human_preferences.runs import RunDir, RunError
from lm_human_preferences.utils.ckpt import CheckpointError, checkpoint_step
from lm_human_preferences.utils.download import DownloadError
from lm_human_preferences.utils.files import atomic_write_bytes, replace_dir, unwritable, writing

PAD_TOKEN_TEXT = "<|pad|>"  # the reward tokenizer's name for our padding id
# every file an export may write; --overwrite replaces only a directory holding nothing else
EXPORT_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt",
                          "tokenizer.json", "tokenizer_config.json", "value_head.safetensors",
                          "reward_head.safetensors", "README.md"})
PROVENANCE_KEY = "lm_human_preferences"  # config.json task_specific_params[PROVENANCE_KEY]: what was exported


# ---- files -----------------------------------------------------------------------------------------------------

def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def _tensors(tensors: dict) -> bytes:
    """A safetensors file with the metadata `transformers` expects of a PyTorch checkpoint."""
    return save({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, metadata={"format": "pt"})


def hf_config(config: GPT2Config, enc: Encoding, *, architecture: str, vocab_size: int,
              pad_token_id: Optional[int], about: dict, **extra) -> dict:
    """config.json of a Hugging Face GPT-2 with our model's shape and numerics."""
    return {
        "architectures": [architecture], "model_type": "gpt2", "dtype": "float32",
        "vocab_size": vocab_size, "n_positions": config.n_ctx, "n_ctx": config.n_ctx, "n_embd": config.n_embd,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0,  # ours has none
        "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": enc.eot_token, "eos_token_id": enc.eot_token, "pad_token_id": pad_token_id,
        "task_specific_params": {PROVENANCE_KEY: about}, **extra,
    }


def tokenizer_files(enc: Encoding, n_ctx: int, *, with_pad: bool) -> dict:
    """The tokenizer of `enc` as `transformers` files: main's BPE as GPT-2's vocab.json + merges.txt, the 27-char test
    encoding as a tokenizer.json (one token per character, every other character '.'). `with_pad` adds the token
    PAD_TOKEN_TEXT with our padding id (the reward model's pad_token_id): tokenizer(..., padding=True) pads as we do."""
    eot = enc.decode([enc.eot_token])
    special = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    config = {"model_max_length": n_ctx, "bos_token": eot, "eos_token": eot, "unk_token": eot,
              "clean_up_tokenization_spaces": False, **({"pad_token": PAD_TOKEN_TEXT} if with_pad else {})}
    if enc.name == "main":
        merges = sorted(enc.bpe_ranks, key=enc.bpe_ranks.get)
        added = {str(enc.eot_token): {"content": eot, **special}}
        if with_pad:  # the ids between the vocabulary and our padding id (unused) hold places, or the pad moves
            for i in range(enc.n_vocab, enc.padding_token):
                added[str(i)] = {"content": f"<|unused{i - enc.n_vocab}|>", **special}
            added[str(enc.padding_token)] = {"content": PAD_TOKEN_TEXT, **special}
        return {"vocab.json": _json(enc.encoder),
                "merges.txt": ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode(),
                "tokenizer_config.json": _json({"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
                                                "add_bos_token": False, "errors": "replace",
                                                "added_tokens_decoder": added, **config})}
    if enc.name == "test":
        vocab = {enc.decode([i]): i for i in range(enc.n_vocab)}
        added = [{"id": enc.padding_token, "content": PAD_TOKEN_TEXT, **special}] if with_pad else []
        tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
                     # one piece per character ([\s\S]: newlines too), each looked up or else '.', like TestEncoding
                     "pre_tokenizer": {"type": "Split", "pattern": {"Regex": r"[\s\S]"}, "behavior": "Isolated",
                                       "invert": False},
                     "post_processor": None, "decoder": {"type": "Fuse"},
                     "model": {"type": "WordLevel", "vocab": vocab, "unk_token": eot}}
        return {"tokenizer.json": _json(tokenizer),
                "tokenizer_config.json": _json({"tokenizer_class": "PreTrainedTokenizerFast", **config})}
    raise ValueError(f"no tokenizer files for encoding {enc.name!r}; expected one of {list(ENCODING_NAMES)}")


# ---- the policy ------------------------------------------------------------------------------------------------

def policy_files(model: GPT2, enc: Encoding, *, temperature: float, response_length: Optional[int] = None,
                 about: Optional[dict] = None) -> dict:
    """{file name: bytes} of a policy (GPT-2 with a value head) as a GPT2LMHeadModel directory."""
    config = model.config
    if config.n_vocab != enc.n_vocab:
        raise RunError(f"the policy has n_vocab={config.n_vocab} but the {enc.name!r} encoding has {enc.n_vocab} "
                       f"tokens; the run's policy/encoding does not belong to its model")
    sd = model.state_dict()
    about = {"kind": "policy", "encoding": enc.name, "temperature": temperature, **(about or {})}
    # sampling as the policy does: logits / temperature, no top-k or top-p, exactly response_length tokens
    generation = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0,
                  "bos_token_id": enc.eot_token, "eos_token_id": None, "pad_token_id": None,
                  **({"max_new_tokens": response_length} if response_length is not None else {})}
    files = {"config.json": _json(hf_config(config, enc, architecture="GPT2LMHeadModel", vocab_size=config.n_vocab,
                                            pad_token_id=None, about=about)),
             "generation_config.json": _json(generation),
             "model.safetensors": _tensors(state_dict_to_hf(sd)),
             "value_head.safetensors": _tensors({"w": sd["heads.value.w"], "b": sd["heads.value.b"]}),
             **tokenizer_files(enc, config.n_ctx, with_pad=False)}
    files["README.md"] = policy_readme(config, enc, about).encode()
    return files


def export_policy(run_path, out, *, overwrite: bool = False) -> Path:
    """Writes the policy of the train_policy run at `run_path` (its latest complete checkpoint) to `out`."""
    run_dir = _existing_run(run_path)
    hp = runs.read_run_hparams(run_dir)
    encoding_name = runs.read_encoding_name(run_dir)
    checkpoint = runs.latest_policy_checkpoint(run_dir)
    out = check_out(out, overwrite)
    with _as_run_errors():
        enc = get_encoding(encoding_name)
        model = GPT2(read_model_config(run_dir.policy), ["value"])
        runs.load_policy_weights(model, checkpoint)
    task = hp.task
    about = {"source": str(checkpoint.resolve()), "step": checkpoint_step(checkpoint),
             "query_prefix": task.query_prefix, "query_suffix": task.query_suffix,
             "query_length": task.query_length, "response_length": task.response_length,
             "truncate_token": task.truncate_token, "truncate_after": task.truncate_after}
    files = policy_files(model, enc, temperature=task.policy.temperature, response_length=task.response_length,
                         about=about)
    return write_export(out, files)


# ---- the reward model ------------------------------------------------------------------------------------------

def fold_reward_head(reward_model: RewardModel) -> tuple:
    """(score weight [1, n_embd], ln_f bias [n_embd]) with h'.w' = gain * (h.w + b) + bias, h' = h - ln_f.bias +
    the new bias: the scalar c = gain*b + bias added along w' (HF's score layer has no bias). Computed in float64."""
    head = reward_model.model.heads["reward"]
    gain, bias = reward_model.gain.detach().double(), reward_model.bias.detach().double()
    w = gain * head.w.detach().double()  # (C,)
    c = gain * head.b.detach().double() + bias
    norm2 = w @ w
    if not norm2 > 0:
        raise RunError("the reward model's gain * head weight is zero (every score is the constant bias), so the "
                       "score cannot be read off the hidden state; this reward model is not worth exporting")
    ln_f_bias = reward_model.model.ln_f.bias.detach().double() + c * w / norm2
    return w.float()[None], ln_f_bias.float()


def reward_files(reward_model: RewardModel, enc: Encoding, *, about: Optional[dict] = None) -> dict:
    """{file name: bytes} of a reward model as a GPT2ForSequenceClassification directory (one label)."""
    model = reward_model.model
    config = model.config
    if config.n_vocab != enc.n_vocab or reward_model.padding_token != enc.padding_token:
        raise RunError(f"the reward model has n_vocab={config.n_vocab} and padding id {reward_model.padding_token} "
                       f"but the {enc.name!r} encoding has {enc.n_vocab} tokens and padding id {enc.padding_token}")
    sd = state_dict_to_hf(model.state_dict())
    score, ln_f_bias = fold_reward_head(reward_model)
    original_ln_f_bias = sd["transformer.ln_f.bias"]
    sd["transformer.ln_f.bias"] = ln_f_bias
    wte = sd["transformer.wte.weight"]  # rows n_vocab..padding_token embed as token 0, as our pads do
    extra = wte[:1].expand(enc.padding_token + 1 - config.n_vocab, -1)
    sd["transformer.wte.weight"] = torch.cat([wte, extra])
    sd["score.weight"] = score
    head = model.heads["reward"]
    about = {"kind": "reward", "encoding": enc.name, "padding_token": enc.padding_token,
             "gain": reward_model.gain.item(), "bias": reward_model.bias.item(), **(about or {})}
    files = {"config.json": _json(hf_config(config, enc, architecture="GPT2ForSequenceClassification",
                                            vocab_size=enc.padding_token + 1, pad_token_id=enc.padding_token,
                                            about=about, id2label={"0": "reward"}, label2id={"reward": 0},
                                            problem_type="regression")),
             "model.safetensors": _tensors(sd),
             "reward_head.safetensors": _tensors({"w": head.w, "b": head.b, "gain": reward_model.gain,
                                                  "bias": reward_model.bias, "ln_f.bias": original_ln_f_bias}),
             **tokenizer_files(enc, config.n_ctx, with_pad=True)}
    files["README.md"] = reward_readme(config, enc, about).encode()
    return files


def reward_model_dir(path) -> Path:
    """The reward_model/ directory `path` names: itself, a run directory's reward_model/, or the reward model a
    policy run trained against (rewards.trained_model)."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path} is not a directory; pass a train_reward run's reward_model/ directory or its run "
                       f"directory")
    if (path / runs.MODEL_FILE).is_file():
        return path
    run_dir = RunDir(path)
    if run_dir.reward_model_complete():
        return run_dir.reward_model
    if run_dir.policy_hparams.is_file():
        trained = runs.reward_model_path(run_dir, runs.read_run_hparams(run_dir))
        if trained not in (None, "test") and Path(trained).is_dir():
            return Path(trained)
    raise RunError(f"{path} holds no reward model (no {runs.MODEL_FILE}, no complete reward_model/); train one with "
                   f"`python launch.py train_reward <experiment> <name>` and pass its run directory")


def export_reward(path, out, *, overwrite: bool = False) -> Path:
    """Writes the reward model at `path` (see `reward_model_dir`) to `out`."""
    directory = reward_model_dir(path)
    encoding_file = directory / runs.ENCODING_FILE
    try:
        name = json.loads(encoding_file.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{encoding_file} is missing or unreadable ({e}); the reward model was not written by "
                       f"train_reward") from e
    if name not in ENCODING_NAMES:
        raise RunError(f"{encoding_file} names encoding {name!r}; expected one of {list(ENCODING_NAMES)}")
    out = check_out(out, overwrite)
    with _as_run_errors():
        enc = get_encoding(name)
        reward_model = runs.load_reward_model(str(directory), n_vocab=enc.n_vocab, padding_token=enc.padding_token)
    return write_export(out, reward_files(reward_model, enc, about={"source": str(directory.resolve())}))


# ---- writing ---------------------------------------------------------------------------------------------------

def check_out(out, overwrite: bool) -> Path:
    """The absolute --out, after checking it can take an export: absent, or with `overwrite` a directory holding
    only files an export writes (so --overwrite never deletes a run or anything else)."""
    out = Path(out).absolute()
    problem = unwritable(out, directory=True)
    if problem is not None:
        raise RunError(f"cannot write the export into --out {out}: {problem}; pass another --out")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise RunError(f"--out {out} already exists; pass --overwrite to replace it, or choose another --out")
    # out is replaced, out.tmp (an interrupted export's) and out.old (replace_dir's) are deleted: only exports
    for path in (out, out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")):
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise RunError(f"{path} is a {'symlink' if path.is_symlink() else 'file'}, and exporting to --out {out} "
                           f"replaces it; move it away or choose another --out")
        foreign = sorted(p.name for p in path.iterdir() if not _export_file(p.name)) if path.exists() else []
        if foreign:
            raise RunError(f"exporting to --out {out} replaces {path}, which holds what an export does not write "
                           f"({', '.join(foreign[:5])}); move it away or choose another --out")
    return out


def _export_file(name: str) -> bool:
    """Whether an export writes `name` (atomic_open's temporary names of those included)."""
    return name in EXPORT_FILES or any(name.startswith(f".{f}.") and name.endswith(".tmp") for f in EXPORT_FILES)


def write_export(out: Path, files: dict) -> Path:
    """Writes `files` into out.tmp/, then renames it to `out` (replacing an existing one, which `check_out` allowed);
    returns `out`."""
    tmp = out.with_name(out.name + ".tmp")
    with writing(tmp):
        try:
            if tmp.exists():
                shutil.rmtree(tmp)  # an interrupted export's leftovers
            tmp.mkdir(parents=True)
            for name, data in files.items():
                atomic_write_bytes(tmp / name, data)
            replace_dir(tmp, out)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _existing_run(path) -> RunDir:
    if not Path(path).is_dir():
        raise RunError(f"run directory {path} does not exist or is not a directory; pass the directory of a "
                       f"train_policy run (<save_dir>/<name>)")
    return RunDir(path)


@contextlib.contextmanager
def _as_run_errors():
    """Re-raises a checkpoint that cannot be read (CheckpointError, a missing file) or BPE files that cannot be
    found (FileNotFoundError, DownloadError) as RunError, with the same message."""
    try:
        yield
    except (CheckpointError, FileNotFoundError, DownloadError) as e:
        raise RunError(str(e)) from e


# ---- README.md of an export --------------------------------------------------------------------------------------

def _para(*sentences: str) -> str:
    return textwrap.fill(" ".join(sentences), 110, break_long_words=False, break_on_hyphens=False)


def _shape(config: GPT2Config, enc: Encoding) -> str:
    return (f"n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd}, n_ctx={config.n_ctx}, "
            f"the '{enc.name}' encoding of {enc.n_vocab} tokens")


def _padding_note(enc: Encoding, how: str) -> str:
    pad = enc.padding_token
    return _para(
        f"Padding. This project pads with id {pad}, outside the vocabulary, anywhere in a sequence (queries are",
        "right-padded, and the task suffix and the response follow them). A pad is embedded as token 0, no token",
        "attends to it, the position ids skip it (a token's position is the number of real tokens before it), and",
        "its output is a copy of the last real token's. `transformers` computes the same numbers at every real token",
        f"when given `attention_mask = (tokens != {pad})` and `position_ids = attention_mask.cumsum(-1) -",
        f"attention_mask`; {how} Without pads, or with pads only at the end, neither is needed.")


def policy_readme(config: GPT2Config, enc: Encoding, about: dict) -> str:
    temperature = about["temperature"]
    prefix, suffix = about.get("query_prefix", ""), about.get("query_suffix", "")
    step = f" (step {about['step']})" if "step" in about else ""
    truncation = ("" if about.get("truncate_token") is None else
                  f" Responses were cut after the first token {about['truncate_token']} at or after index "
                  f"{about.get('truncate_after', 0)} (the task's truncate_token and truncate_after).")
    return "\n".join([
        "# A policy exported from lm_human_preferences", "",
        _para(f"`GPT2LMHeadModel` ({_shape(config, enc)}) from {about.get('source', 'a policy')}{step}, with its",
              "value head beside it in value_head.safetensors."), "",
        "```python",
        "import torch",
        "from safetensors.torch import load_file",
        "from transformers import AutoTokenizer, GPT2LMHeadModel",
        "",
        "model = GPT2LMHeadModel.from_pretrained(DIR, local_files_only=True).eval()",
        "tokenizer = AutoTokenizer.from_pretrained(DIR, local_files_only=True)",
        "encode = tokenizer.encode",
        f"context = torch.tensor([encode({prefix!r}) + encode(query) + encode({suffix!r})])  # prefix, query, suffix",
        "tokens = model.generate(context)  # generation_config.json samples as the policy did",
        "",
        "head = load_file(f'{DIR}/value_head.safetensors')  # w [n_embd], b []",
        "h = model(tokens, output_hidden_states=True).hidden_states[-1]  # the final hidden state (after ln_f)",
        "values = h @ head['w'] + head['b']  # the value head, at every position",
        "```", "",
        _para(f"Temperature. The policy was trained at temperature {temperature}: its logits are divided by it when it",
              "samples and in every log-probability and KL. generation_config.json samples that way: do_sample, that",
              "temperature, top_k=0 (`transformers` otherwise keeps only the 50 likeliest tokens), top_p=1, and",
              "exactly the task's response length with no stop at the end-of-text token, as the policy sampled.",
              "Greedy decoding does not depend on the temperature." + truncation), "",
        _padding_note(enc, "`generate` derives these position ids from the attention mask itself (put any id of "
                      "the vocabulary, such as 0, where the pads were)."), "",
        _para("Exact. model.safetensors holds this project's float32 weights, only renamed and transposed to the",
              "Conv1D layout, and `python saved_models/prepare_pytorch_checkpoint.py --from-hf DIR --out ...` reads",
              "them back bit for bit (the value head stays in value_head.safetensors). Logits and values agree with",
              "this project's model to float32 rounding (about 1e-6)."), "",
        _tokenizer_note(enc), ""])


def reward_readme(config: GPT2Config, enc: Encoding, about: dict) -> str:
    pad = enc.padding_token
    beyond = (f"id {pad} embeds" if pad == enc.n_vocab else
              f"ids {enc.n_vocab} to {pad} (the tokenizer's <|unused0|>, ... and {PAD_TOKEN_TEXT}) embed")
    return "\n".join([
        "# A reward model exported from lm_human_preferences", "",
        _para(f"`GPT2ForSequenceClassification` with one label ({_shape(config, enc)}) from "
              f"{about.get('source', 'a reward model')}."), "",
        "```python",
        "from transformers import AutoTokenizer, GPT2ForSequenceClassification",
        "",
        "model = GPT2ForSequenceClassification.from_pretrained(DIR, local_files_only=True).eval()",
        "tokenizer = AutoTokenizer.from_pretrained(DIR, local_files_only=True)",
        "batch = tokenizer([query + response, ...], padding=True, return_tensors='pt')  # pads at the end",
        "rewards = model(**batch).logits[:, 0]",
        "",
        "# token ids padded as in this project, pads anywhere:",
        f"mask = (tokens != {pad}).long()",
        "rewards = model(tokens, attention_mask=mask, position_ids=mask.cumsum(-1) - mask).logits[:, 0]",
        "```", "",
        _para("The reward model reads the raw query followed by the response (no task prefix or suffix); it was",
              "trained on the query and the response token ids concatenated, which the tokenizer may merge",
              "differently across the boundary than tokenizing each, so concatenate ids to score exactly what it",
              "was trained on."), "",
        _para("The reward is gain * (h . w + b) + bias, read at the last real token, with the trained gain",
              f"{about['gain']:.6g} and bias {about['bias']:.6g}. The score layer of `transformers` has no bias, so",
              "score.weight is w' = gain * w and the constant c = gain * b + bias is folded into the final layer",
              "norm: transformer.ln_f.bias gains c * w' / |w'|^2, which adds exactly c to h . w'. The last hidden",
              "state of this model is therefore shifted by that vector; reward_head.safetensors keeps the unfolded",
              "w, b, gain, bias and the original ln_f.bias."), "",
        _para(f"Padding id. The embedding has {pad + 1} rows: {beyond} as token 0, as this project embeds a pad,",
              f"and {pad} is pad_token_id (the tokenizer's {PAD_TOKEN_TEXT}), so the score is read at the last token",
              "that is not a pad, as here."), "",
        _padding_note(enc, "the tokenizer pads at the end."), "",
        _para("Exact. Rewards agree with this project's reward model to float32 rounding (about 1e-6)."), "",
        _tokenizer_note(enc), ""])


def _tokenizer_note(enc: Encoding) -> str:
    if enc.name == "main":
        return _para("Tokenizer. GPT-2's byte-level BPE (vocab.json, merges.txt), this project's encoding token for",
                     "token, except that `transformers` reads the text '<|endoftext|>' as the single token 50256",
                     "where this project encodes its characters (`split_special_tokens=True` encodes it as here).")
    return _para("Tokenizer. The `test` encoding (tokenizer.json): one token per character of 'a' to 'z' and '.',",
                 "every other character '.'.")


# ---- the command -------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = p.add_subparsers(dest="kind", required=True, metavar="{policy,reward}")
    policy = kinds.add_parser("policy", help="a train_policy run's policy as GPT2LMHeadModel (+ value head)")
    policy.add_argument("run_dir", help="directory of a train_policy run")
    reward = kinds.add_parser("reward", help="a reward model as GPT2ForSequenceClassification")
    reward.add_argument("source", help="a train_reward run's reward_model/ directory, or a run directory")
    for sub in (policy, reward):
        sub.add_argument("--out", required=True, help="directory to write (created; see --overwrite)")
        sub.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    return p


def main(argv=None) -> int:
    """`launch.py export ...`; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.kind == "policy":
            out = export_policy(args.run_dir, args.out, overwrite=args.overwrite)
        else:
            out = export_reward(args.source, args.out, overwrite=args.overwrite)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a WriteError naming the path and the fix
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} (load it with transformers' from_pretrained; see {out / 'README.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
