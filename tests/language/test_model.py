"""GPT-2 against the ORIGINAL code's outputs, Hugging Face, a TF checkpoint, and its own pad/cache invariants."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_human_preferences.language.model import GPT2, GPT2Config, KVCache
from lm_human_preferences.language.trained_models import load_model, save_model_dir, tf_to_state_dict
from lm_human_preferences.utils.ckpt import CheckpointError

ROOT = Path(__file__).resolve().parents[2]
REF = ROOT / "tests" / "reference"
PAD = 52


def ref_model(npz, scope="model", heads=("value", "reward")):
    meta = json.loads(str(npz["meta_json"]))["hparams"]
    config = GPT2Config.from_dict(meta)
    model = GPT2(config, heads)
    tf_vars = {k[len("var/"):]: npz[k] for k in npz.files if k.startswith("var/")}
    model.load_state_dict(tf_to_state_dict(tf_vars, config.n_layer, scope=scope, heads=heads))
    return model.eval()


@pytest.fixture(scope="module")
def forward_ref():
    return np.load(REF / "model_forward.npz")


def close(a, b, rtol=1e-4, atol=1e-5):
    np.testing.assert_allclose(a.detach().numpy() if torch.is_tensor(a) else a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", ["plain", "pad"])
def test_full_forward_matches_original(forward_ref, kind):
    d = forward_ref
    model = ref_model(d)
    X = torch.tensor(d[f"in/X_{kind}"], dtype=torch.long)
    cache = KVCache(model.config, X.shape[0], X.shape[1], "cpu")
    with torch.no_grad():
        out = model(X, padding_token=PAD if kind == "pad" else None, cache=cache, lm_positions="all")
    for key in ("lm_logits", "h", "value", "reward"):
        close(out[key], d[f"out/{kind}/{key}"])
    close(cache.present(), d[f"out/{kind}/present"])


def test_incremental_matches_original(forward_ref):
    d = forward_ref
    model = ref_model(d)
    K = int(d["in/K"])
    # plain: the continuation X[:, K:] after a past of the first K tokens, in one call
    X = torch.tensor(d["in/X_plain"], dtype=torch.long)
    cache = KVCache(model.config, 3, X.shape[1], "cpu")
    with torch.no_grad():
        ctx = model(X[:, :K], cache=cache, lm_positions="all")
        for key in ("lm_logits", "h", "value"):
            close(ctx[key], d[f"out/ctx_plain/{key}"])
        cont = model(X[:, K:], cache=cache, lm_positions="all")
    for key in ("lm_logits", "h", "value"):
        close(cont[key], d[f"out/cont_plain/{key}"])
    close(cache.present(K), d["out/cont_plain/present"])
    # padded: only token K after a padded past, as in the sampling loop; the past is given in the original's layout
    X = torch.tensor(d["in/X_pad"], dtype=torch.long)
    past = torch.tensor(d["out/ctx_pad/present"])
    cache = KVCache.from_present(model.config, past, X[:, :K] != PAD, X.shape[1])
    with torch.no_grad():
        cont = model(X[:, K:K + 1], padding_token=PAD, cache=cache, lm_positions="all")
    for key in ("lm_logits", "h", "value"):
        close(cont[key], d[f"out/cont_pad/{key}"])
    close(cache.present(K, K + 1), d["out/cont_pad/present"])


def test_hf_second_reference_agrees(forward_ref):
    """The reference file's own HF logits agree with ours at non-pad positions."""
    d = forward_ref
    model = ref_model(d)
    X = torch.tensor(d["in/X_pad"], dtype=torch.long)
    with torch.no_grad():
        logits = model(X, padding_token=PAD, lm_positions="all")["lm_logits"]
    real = d["in/X_pad"] != PAD
    np.testing.assert_allclose(logits.numpy()[real], d["hf/logits_pad"][real], atol=1e-5, rtol=1e-4)


def random_model(seed=0, heads=("value",), **kw):
    torch.manual_seed(seed)
    config = GPT2Config(**{**dict(n_vocab=61, n_ctx=40, n_embd=24, n_head=3, n_layer=3), **kw})
    model = GPT2(config, heads).eval()
    with torch.no_grad():  # random biases and LN params so every term is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name or name.startswith("heads"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def with_pads(tokens, positions, pad):
    """Inserts pad tokens before the given positions of each row."""
    rows = []
    for row, pos in zip(tokens.tolist(), positions):
        out = []
        for i, t in enumerate(row):
            out += [pad] * pos.count(i)
            out.append(t)
        rows.append(out)
    width = max(map(len, rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_decoding_equals_full_forward(padded):
    model = random_model(1)
    pad = 99
    torch.manual_seed(2)
    X = torch.randint(0, 61, (4, 14))
    if padded:  # right-padded contexts of different lengths plus interior pads
        X = with_pads(X, [[3, 3], [], [5], [1, 10]], pad)[:, :14]
        X[0, 12:] = pad
    with torch.no_grad():
        full = model(X, padding_token=pad, lm_positions="all")
        cache = KVCache(model.config, 4, X.shape[1], "cpu")
        ctx = 6
        out = model(X[:, :ctx], padding_token=pad, cache=cache, lm_positions="all")
        logits, values = [out["lm_logits"]], [out["value"]]
        for t in range(ctx, X.shape[1]):
            out = model(X[:, t:t + 1], padding_token=pad, cache=cache, lm_positions="all", check_tokens=False)
            logits.append(out["lm_logits"])
            values.append(out["value"])
    inc_logits, inc_values = torch.cat(logits, 1), torch.cat(values, 1)
    real = X != pad
    # incremental steps of a pad cannot see earlier current tokens, so compare at real positions
    torch.testing.assert_close(inc_logits[real], full["lm_logits"][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inc_values[real], full["value"][real], atol=1e-5, rtol=1e-5)


def test_moving_pads_leaves_real_outputs_unchanged():
    model = random_model(3, heads=("value", "reward"))
    pad = 70
    torch.manual_seed(4)
    X = torch.randint(0, 61, (3, 9))
    layouts = [[[], [], []], [[2, 2, 2], [8], [1, 5]], [[4], [0 + 1, 3, 3, 7], [8, 8, 8, 8]]]
    outs = []
    for layout in layouts:
        Xp = with_pads(X, layout, pad)
        with torch.no_grad():
            out = model(Xp, padding_token=pad, lm_positions="all")
        real = (Xp != pad)
        outs.append({k: out[k][real].reshape(3, 9, *out[k].shape[2:]) for k in ("lm_logits", "value", "reward", "h")})
        # every pad position equals the last real position before it
        for b in range(3):
            last = None
            for t in range(Xp.shape[1]):
                if Xp[b, t] != pad:
                    last = t
                elif last is not None:
                    torch.testing.assert_close(out["lm_logits"][b, t], out["lm_logits"][b, last])
                    torch.testing.assert_close(out["value"][b, t], out["value"][b, last])
    for other in outs[1:]:
        for k in other:
            torch.testing.assert_close(other[k], outs[0][k], atol=1e-5, rtol=1e-5)


def test_scalar_head_init():
    model = GPT2(GPT2Config(n_vocab=50, n_ctx=16, n_embd=64, n_head=4, n_layer=1), ["value", "reward"])
    assert torch.count_nonzero(model.heads["value"].w) == 0 and model.heads["value"].b.item() == 0
    assert model.heads["value"].w.shape == (64,) and model.heads["value"].b.shape == ()
    std = model.heads["reward"].w.std().item()
    assert abs(std - 1 / np.sqrt(65)) < 0.05


def test_logits_only_where_asked_and_float32_under_bf16():
    model = random_model(5)
    X = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        assert "lm_logits" not in model(X)
        full = model(X, lm_positions="all")["lm_logits"]
        part = model(X, lm_positions=slice(4, 7))["lm_logits"]
        torch.testing.assert_close(part, full[:, 4:7])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(X, lm_positions=slice(-1, None))
    assert out["lm_logits"].dtype == torch.float32 and out["value"].dtype == torch.float32
    assert (out["lm_logits"] - full[:, -1:]).abs().max() < 0.1


def test_bad_inputs_raise():
    model = random_model(6)
    with pytest.raises(ValueError, match="n_ctx"):
        model(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 2, 61]]), padding_token=99)
    model(torch.tensor([[1, 2, 99]]), padding_token=99)  # the pad id is fine


def test_checkpoint_files_bad_input(tmp_path):
    model = random_model(7)
    save_model_dir(tmp_path / "m", model.config, model.state_dict())
    loaded = load_model(str(tmp_path / "m"), ["value"])
    for k, v in model.state_dict().items():
        if not k.startswith("heads"):
            torch.testing.assert_close(loaded.state_dict()[k], v)
    with pytest.raises(CheckpointError, match="n_vocab"):
        load_model(str(tmp_path / "m"), n_vocab=50257)
    with pytest.raises(FileNotFoundError, match="prepare_pytorch_checkpoint"):
        load_model(str(tmp_path / "nope"))
    data = (tmp_path / "m" / "model.safetensors").read_bytes()
    (tmp_path / "m" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(str(tmp_path / "m"))
    other = random_model(8, n_embd=12)
    save_model_dir(tmp_path / "o", model.config, other.state_dict())  # weights of another size
    with pytest.raises(CheckpointError, match="shape"):
        load_model(str(tmp_path / "o"))


def hf_reference(tmp_path, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=61, n_positions=40, n_embd=24, n_head=3, n_layer=3,
                                  activation_function="gelu_new", layer_norm_epsilon=1e-5,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    return hf


def run_prepare(*args):
    return subprocess.run([sys.executable, str(ROOT / "saved_models" / "prepare_pytorch_checkpoint.py"), *args],
                          capture_output=True, text=True)


def test_from_hf_matches_transformers(tmp_path):
    hf = hf_reference(tmp_path)
    r = run_prepare("--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours"))
    assert r.returncode == 0, r.stderr
    ours = load_model(str(tmp_path / "ours")).eval()
    torch.manual_seed(9)
    X = torch.randint(0, 61, (3, 16))
    with torch.no_grad():
        a = ours(X, lm_positions="all")["lm_logits"]
        b = hf(X).logits
    diff_plain = (a - b).abs().max().item()
    assert diff_plain < 1e-5
    pad = 80
    Xp = with_pads(X, [[2, 2], [9], []], pad)
    mask = Xp != pad
    with torch.no_grad():
        a = ours(Xp, padding_token=pad, lm_positions="all")["lm_logits"]
        b = hf(torch.where(mask, Xp, 0), attention_mask=mask.long(),
               position_ids=torch.cumsum(mask, 1) - mask.long()).logits
    diff_pad = (a[mask] - b[mask]).abs().max().item()
    assert diff_pad < 1e-5
    print(f"max |dlogits| vs transformers: plain {diff_plain:.2e}, padded {diff_pad:.2e}")


def test_from_tf_checkpoint_matches(tmp_path):
    tf = pytest.importorskip("tensorflow")
    hf = hf_reference(tmp_path, seed=1)
    hf_sd = hf.state_dict()
    # write OpenAI's variable names and shapes (conv weights [1, nx, nf]) with tensorflow's checkpoint writer
    tf_dir = tmp_path / "tf"
    tf_dir.mkdir()
    variables = {"model/wte": hf_sd["transformer.wte.weight"], "model/wpe": hf_sd["transformer.wpe.weight"],
                 "model/ln_f/g": hf_sd["transformer.ln_f.weight"], "model/ln_f/b": hf_sd["transformer.ln_f.bias"]}
    for i in range(3):
        p = f"transformer.h.{i}."
        for tfn, hfn in [("ln_1/g", "ln_1.weight"), ("ln_1/b", "ln_1.bias"), ("ln_2/g", "ln_2.weight"),
                         ("ln_2/b", "ln_2.bias"), ("attn/c_attn/b", "attn.c_attn.bias"),
                         ("attn/c_proj/b", "attn.c_proj.bias"), ("mlp/c_fc/b", "mlp.c_fc.bias"),
                         ("mlp/c_proj/b", "mlp.c_proj.bias")]:
            variables[f"model/h{i}/{tfn}"] = hf_sd[p + hfn]
        for tfn, hfn in [("attn/c_attn/w", "attn.c_attn.weight"), ("attn/c_proj/w", "attn.c_proj.weight"),
                         ("mlp/c_fc/w", "mlp.c_fc.weight"), ("mlp/c_proj/w", "mlp.c_proj.weight")]:
            variables[f"model/h{i}/{tfn}"] = hf_sd[p + hfn][None]
    graph = tf.Graph()
    with graph.as_default():
        tf_vars = [tf.compat.v1.get_variable(name, initializer=v.numpy()) for name, v in variables.items()]
        saver = tf.compat.v1.train.Saver(tf_vars)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(tf_dir / "model.ckpt"))
    (tf_dir / "hparams.json").write_text(json.dumps(dict(n_vocab=61, n_ctx=40, n_embd=24, n_head=3, n_layer=3)))
    r = run_prepare("--from-tf", str(tf_dir), "--out", str(tmp_path / "ours"))
    assert r.returncode == 0, r.stderr
    ours = load_model(str(tmp_path / "ours")).eval()
    X = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        diff = (ours(X, lm_positions="all")["lm_logits"] - hf(X).logits).abs().max().item()
    assert diff < 1e-5
    print(f"max |dlogits| TF checkpoint path: {diff:.2e}")


def test_prepare_reports_bad_checkpoint(tmp_path):
    hf_reference(tmp_path)
    sd_path = tmp_path / "hf" / "model.safetensors"
    from safetensors.torch import load_file, save_file
    sd = load_file(str(sd_path))
    sd.pop("transformer.h.1.mlp.c_fc.weight")
    save_file(sd, str(sd_path))
    r = run_prepare("--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours"))
    assert r.returncode == 2 and "h.1.mlp.c_fc.weight" in r.stderr
    assert not (tmp_path / "ours" / "model.safetensors").exists()
