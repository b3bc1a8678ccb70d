"""utils/memory: the parameter counts match the real modules, and the 774M figures match issue #15's review."""
import pytest
import torch

from lm_human_preferences.language.fused import store_linears_in
from lm_human_preferences.language.model import GPT2, GPT2Config
from lm_human_preferences.utils import memory

SMALL = memory.ModelShape(n_layer=3, n_embd=16, n_head=2, n_vocab=50, n_ctx=16)


def small_model():
    return GPT2(GPT2Config(n_vocab=SMALL.n_vocab, n_ctx=SMALL.n_ctx, n_embd=SMALL.n_embd, n_head=SMALL.n_head,
                           n_layer=SMALL.n_layer), ["value"])


def test_param_counts_match_the_model():
    model = small_model()
    linear = sum(p.numel() for block in model.h for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc,
                                                            block.mlp.c_proj) for p in lin.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert memory.param_counts(SMALL) == (linear, total - linear)


@pytest.mark.parametrize("bf16", [False, True])
def test_frozen_bytes_match_the_stored_model(bf16):
    model = small_model().requires_grad_(False)
    if bf16:
        store_linears_in(model, torch.bfloat16)  # what PPOTrainer does to its frozen models under bf16
    assert memory.frozen_bytes(SMALL, bf16) == sum(p.numel() * p.element_size() for p in model.parameters())


def test_gpt2_sizes():
    assert sum(memory.param_counts(memory.GPT2_SHAPES["124M"])) == pytest.approx(124.44e6, rel=1e-3)
    assert sum(memory.param_counts(memory.GPT2_SHAPES["774M"])) == pytest.approx(774.0e6, rel=1e-3)


def test_774M_figures_of_the_review():
    """Issue #15: policy with gradients and Adam 12.4 GB, a float32 frozen copy 3.1, the cast cache 1.4, 3.1 of
    DDP buckets on 8 GPUs, 4.9 of activations at micro-batch 32 of the sentiment task (88 tokens, 24 of response)."""
    shape = memory.GPT2_SHAPES["774M"]
    gb = memory.estimate(shape, seq_len=88, response_length=24, train_rows=32, rollout_rows=1, world_size=8)
    assert gb["trained model, gradients and Adam"] == pytest.approx(12.4, abs=0.05)
    assert memory.frozen_bytes(shape, False) / memory.GB == pytest.approx(3.1, abs=0.05)
    assert gb["frozen models"] == pytest.approx(2 * 1.68, abs=0.05)  # bf16 Linear layers: 1.7 GB each
    assert gb["autocast weight cache"] == pytest.approx(1.4, abs=0.05)
    assert gb["DDP buckets"] == pytest.approx(3.1, abs=0.05)
    assert gb["activations"] == pytest.approx(4.9, rel=0.1)
    assert gb["total"] == pytest.approx(sum(v for k, v in gb.items() if k != "total"))
    one = memory.estimate(shape, seq_len=88, response_length=24, train_rows=32, rollout_rows=1, world_size=1)
    assert one["DDP buckets"] == 0 and one["total"] == pytest.approx(gb["total"] - gb["DDP buckets"])
    fp32 = memory.estimate(shape, seq_len=88, response_length=24, train_rows=32, rollout_rows=1, precision="fp32")
    assert fp32["autocast weight cache"] == 0 and fp32["frozen models"] == pytest.approx(6.2, abs=0.05)


def test_activations_grow_with_rows_and_length():
    shape = memory.GPT2_SHAPES["124M"]
    gb = lambda **kw: memory.estimate(shape, **dict(dict(seq_len=88, response_length=24, train_rows=8,  # noqa: E731
                                                         rollout_rows=8), **kw))["activations"]
    assert gb(train_rows=16) == pytest.approx(2 * gb(train_rows=8))
    assert gb(seq_len=583, response_length=75) > 5 * gb()  # 6.6x the tokens, 3.1x the logits
    reward = memory.estimate(shape, seq_len=88, response_length=24, train_rows=8, rollout_rows=1, phase="reward")
    assert reward["activations"] < gb()  # no LM logits in reward training


def test_bad_phase_or_precision():
    with pytest.raises(ValueError, match="phase"):
        memory.estimate(SMALL, seq_len=8, response_length=4, train_rows=1, rollout_rows=1, phase="ppo")
    with pytest.raises(ValueError, match="precision"):
        memory.estimate(SMALL, seq_len=8, response_length=4, train_rows=1, rollout_rows=1, precision="fp16")
