"""demo/pretrain.py: the small GPT-2's pretraining learns and writes a loadable model directory."""
import numpy as np
import pytest
import torch

from lm_human_preferences.demo import pretrain
from lm_human_preferences.language.datasets import TokenFile, write_token_file
from lm_human_preferences.language.trained_models import load_model


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    config = pretrain.PretrainConfig(steps=100, warmup=10, lr=1.0)
    lrs = [pretrain.learning_rate(s, config) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert pretrain.learning_rate(100, config) == pytest.approx(0.1)


def test_token_stream_and_windows(tmp_path):
    write_token_file(tmp_path / "lm", [[1, 2, 3], [4, 5]])
    stream = pretrain.token_stream(TokenFile(tmp_path / "lm"), eot_token=9)
    assert stream.tolist() == [1, 2, 3, 9, 4, 5, 9]
    windows = pretrain.sample_windows(stream, 5, 3, np.random.default_rng(0))
    assert windows.shape == (5, 3)
    assert all(any(stream[s:s + 3].tolist() == w for s in range(5)) for w in windows.tolist())
    with pytest.raises(ValueError, match="fewer than one window"):
        pretrain.sample_windows(stream, 1, 8, np.random.default_rng(0))


def test_pretrain_lowers_the_loss_and_writes_a_loadable_model(tmp_path):
    docs = [[int(t) for t in np.arange(i, i + 30) % 50] for i in range(40)]  # a learnable counting pattern
    write_token_file(tmp_path / "lm", docs)
    config = pretrain.PretrainConfig(n_layer=1, n_embd=16, n_head=2, n_ctx=16, batch_size=8, steps=40, lr=1e-2,
                                     warmup=4, precision="fp32")
    stats = pretrain.pretrain(config, TokenFile(tmp_path / "lm"), TokenFile(tmp_path / "lm"), tmp_path / "m",
                              torch.device("cpu"), log=lambda _: None)
    losses = [loss for _, loss in stats["losses"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    model = load_model(str(tmp_path / "m"), ["value"], n_vocab=50257)
    assert model.config.n_layer == 1 and float(model.heads["value"].w.detach().abs().sum()) == 0.0
