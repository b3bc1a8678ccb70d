"""utils/training.py: what both trainers share (micro-batched optimizer step, finite checks, rank seeding, RNG state)."""
import numpy as np
import pytest
import torch

from lm_human_preferences.utils import training


def test_chunks_cover_the_rows_in_order():
    assert training.chunks(5, None) == [slice(0, 5)]
    assert training.chunks(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert training.chunks(4, 8) == [slice(0, 4)]


def _step(micro_batch):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(7, 3), torch.randn(7, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_fn(rows):
        loss = (model(x[rows]) - y[rows]).square().mean()
        return loss, {"loss": float(loss.detach()), "rows": float(rows.stop - rows.start)}

    stats = training.optimizer_step(optimizer, model, 7, micro_batch, loss_fn)
    return model, stats, x, y


def test_optimizer_step_in_micro_batches_takes_the_whole_batch_step():
    whole, whole_stats, x, y = _step(None)
    pieces, piece_stats, _, _ = _step(3)
    for a, b in zip(whole.parameters(), pieces.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert a.grad is None and b.grad is None  # freed after the step
    assert piece_stats["loss"] == pytest.approx(whole_stats["loss"], rel=1e-6)
    assert piece_stats["rows"] == pytest.approx((3 * 3 + 3 * 3 + 1 * 1) / 7)  # weighted by each piece's share


def test_nonfinite_checks_name_the_first_bad_one():
    assert training.nonfinite_statistic({"a": 1.0, "b": 2.0}) is None
    assert training.nonfinite_statistic({"a": 1.0, "corr": float("nan"), "b": float("inf")}) == "corr"
    assert training.nonfinite_statistic({"corr": float("nan"), "b": float("inf")}, allowed=("corr",)) == "b"
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    assert training.nonfinite_parameter(model) is None
    with torch.no_grad():
        model[1].bias.fill_(float("nan"))
    assert training.nonfinite_parameter(model) == "1.bias"


def test_seed_rank_is_the_originals_per_rank_seed_and_rng_state_round_trips():
    np_rng, gen = training.seed_rank(7, 1, torch.device("cpu"))
    np_again, gen_again = training.seed_rank(7 + 100003, 0, torch.device("cpu"))
    assert np_rng.randint(1 << 30) == np_again.randint(1 << 30)
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=gen_again))
    state = training.rng_state(np_rng, gen)
    first = (np_rng.randint(1 << 30), np.random.randint(1 << 30), torch.rand(2), torch.rand(2, generator=gen))
    training.set_rng_state(state, np_rng, gen)
    again = (np_rng.randint(1 << 30), np.random.randint(1 << 30), torch.rand(2), torch.rand(2, generator=gen))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])


class FakeGpus:
    """`count` visible CUDA devices whose default generators are CPU generators (torch.cuda.random's own
    get_rng_state / set_rng_state run unchanged on them)."""

    def __init__(self, monkeypatch, count):
        self.generators = tuple(torch.Generator().manual_seed(100 + i) for i in range(count))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda.random, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "default_generators", self.generators, raising=False)
        monkeypatch.setattr(torch.cuda.random, "_lazy_init", lambda: None)
        monkeypatch.setattr(torch.cuda.random, "_lazy_call", lambda cb, **kwargs: cb())
        monkeypatch.setattr(torch.cuda.random, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda.random, "current_device", lambda: 0)


class RankGenerator:
    """The rank's sampling generator on cuda:`index` (a CPU generator that reports a CUDA device)."""

    def __init__(self, index):
        self.device, self._gen = torch.device("cuda", index), torch.Generator().manual_seed(5)

    def get_state(self):
        return self._gen.get_state()

    def set_state(self, state):
        self._gen.set_state(state)


def test_rng_state_holds_only_the_ranks_own_gpu_and_resumes_under_another_visible_layout(monkeypatch):
    gpus = FakeGpus(monkeypatch, 8)  # torchrun on one 8-GPU node: rank 3 uses cuda:3
    state = training.rng_state(np.random.RandomState(0), RankGenerator(3))
    assert torch.equal(state["torch_cuda"], gpus.generators[3].get_state())
    expected = torch.rand(4, generator=gpus.generators[3])
    resumed = FakeGpus(monkeypatch, 1)  # the scheduler now gives each process its own GPU: it sees cuda:0 only
    training.set_rng_state(state, np.random.RandomState(0), RankGenerator(0))
    assert torch.equal(torch.rand(4, generator=resumed.generators[0]), expected)


def test_old_checkpoints_with_every_gpus_state_still_load(monkeypatch):
    states = [torch.Generator().manual_seed(200 + i).get_state() for i in range(8)]
    old = dict(training.rng_state(np.random.RandomState(0), torch.Generator()), torch_cuda=states)
    training.set_rng_state(old, np.random.RandomState(0), torch.Generator())  # a CPU run ignores them
    gpus = FakeGpus(monkeypatch, 2)
    training.set_rng_state(old, np.random.RandomState(0), RankGenerator(1))
    assert torch.equal(gpus.generators[1].get_state(), states[1]) and torch.equal(gpus.generators[0].get_state(),
                                                                                  torch.Generator().manual_seed(100)
                                                                                  .get_state())
    gpus = FakeGpus(monkeypatch, 1)
    training.set_rng_state(old, np.random.RandomState(0), RankGenerator(0))
    assert torch.equal(gpus.generators[0].get_state(), states[0])


def test_a_cpu_run_saves_no_cuda_state_even_where_cuda_is_available(monkeypatch):
    FakeGpus(monkeypatch, 2)
    assert "torch_cuda" not in training.rng_state(np.random.RandomState(0), torch.Generator())
