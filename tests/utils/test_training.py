"""utils/training.py: what both trainers share (virtual ranks and their random streams, micro-batch pieces, the
micro-batched optimizer step, finite checks)."""
import io

import numpy as np
import pytest
import torch

from lm_human_preferences.utils import training

CPU = torch.device("cpu")


def test_chunks_cover_the_rows_in_order():
    assert training.chunks(5, None) == [slice(0, 5)]
    assert training.chunks(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert training.chunks(4, 8) == [slice(0, 4)]


# --- pieces ----------------------------------------------------------------------------------------------------

def _covers_in_order(parts, n):
    """The slices follow one another from 0 to n."""
    return parts[0].start == 0 and parts[-1].stop == n and all(a.stop == b.start for a, b in zip(parts, parts[1:]))


@pytest.mark.parametrize("n", [1, 5, 12])
@pytest.mark.parametrize("micro_batch", [None, 1, 2, 5, 12, 20])
def test_pieces_of_one_group_are_chunks(n, micro_batch):
    assert training.pieces(n, micro_batch, 1) == training.pieces(n, micro_batch) == training.chunks(n, micro_batch)


@pytest.mark.parametrize("groups, micro_batch", [(3, 3), (3, 1), (2, 5), (4, 2)])
def test_pieces_never_cross_a_group_larger_than_the_micro_batch(groups, micro_batch):
    n = 12
    size = n // groups
    parts = training.pieces(n, micro_batch, groups)
    assert _covers_in_order(parts, n)
    assert all(0 < p.stop - p.start <= micro_batch for p in parts)
    assert all(p.start // size == (p.stop - 1) // size for p in parts)  # inside one group


@pytest.mark.parametrize("groups, micro_batch", [(4, 3), (4, 7), (4, 12), (3, 9), (6, 5), (2, 100)])
def test_pieces_hold_whole_groups_where_the_micro_batch_holds_one(groups, micro_batch):
    n = 12
    size = n // groups
    parts = training.pieces(n, micro_batch, groups)
    assert _covers_in_order(parts, n)
    assert all(p.stop - p.start <= micro_batch for p in parts)
    assert all(p.start % size == 0 and p.stop % size == 0 for p in parts)  # whole groups only
    assert all(p.stop - p.start == micro_batch // size * size for p in parts[:-1])  # as many as fit


def test_pieces_hand_cases():
    # groups of 4 rows, micro-batches of 3: 3 + 1 rows per group
    assert training.pieces(12, 3, 3) == [slice(0, 3), slice(3, 4), slice(4, 7), slice(7, 8), slice(8, 11),
                                         slice(11, 12)]
    assert training.pieces(12, 7, 4) == [slice(0, 6), slice(6, 12)]  # groups of 3: two fit in 7 rows
    assert training.pieces(12, 9, 3) == [slice(0, 8), slice(8, 12)]  # groups of 4: two fit in 9 rows


def test_pieces_none_is_one_piece():
    assert training.pieces(12, None, 4) == [slice(0, 12)]
    assert training.pieces(12, 0, 3) == [slice(0, 12)]


# --- optimizer_step --------------------------------------------------------------------------------------------

def _step(micro_batch, n=7, groups=1):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(n, 3), torch.randn(n, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def loss_fn(rows):
        seen.append(rows)
        loss = (model(x[rows]) - y[rows]).square().mean()
        return loss, {"loss": float(loss.detach()), "rows": float(rows.stop - rows.start)}

    stats = training.optimizer_step(optimizer, model, n, micro_batch, loss_fn, groups=groups)
    return model, stats, seen


def test_optimizer_step_in_micro_batches_takes_the_whole_batch_step():
    whole, whole_stats, _ = _step(None)
    pieces, piece_stats, _ = _step(3)
    for a, b in zip(whole.parameters(), pieces.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert a.grad is None and b.grad is None  # freed after the step
    assert piece_stats["loss"] == pytest.approx(whole_stats["loss"], rel=1e-6)
    assert piece_stats["rows"] == pytest.approx((3 * 3 + 3 * 3 + 1 * 1) / 7)  # weighted by each piece's share


@pytest.mark.parametrize("micro_batch", [3, 4, 8])
def test_optimizer_step_in_group_pieces_takes_the_whole_batch_step(micro_batch):
    """8 rows of 2 groups: the pieces keep inside a group (3: 3+1 rows per group) or hold whole groups (4, 8), and
    the step is the one-piece step."""
    whole, whole_stats, _ = _step(None, n=8, groups=2)
    grouped, grouped_stats, seen = _step(micro_batch, n=8, groups=2)
    assert seen == training.pieces(8, micro_batch, 2)
    for a, b in zip(whole.parameters(), grouped.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert grouped_stats["loss"] == pytest.approx(whole_stats["loss"], rel=1e-6)
    assert grouped_stats["rows"] == pytest.approx(sum((p.stop - p.start) ** 2 for p in seen) / 8)


def test_nonfinite_checks_name_the_first_bad_one():
    assert training.nonfinite_statistic({"a": 1.0, "b": 2.0}) is None
    assert training.nonfinite_statistic({"a": 1.0, "corr": float("nan"), "b": float("inf")}) == "corr"
    assert training.nonfinite_statistic({"corr": float("nan"), "b": float("inf")}, allowed=("corr",)) == "b"
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    assert training.nonfinite_parameter(model) is None
    with torch.no_grad():
        model[1].bias.fill_(float("nan"))
    assert training.nonfinite_parameter(model) == "1.bias"


# --- VirtualRanks ----------------------------------------------------------------------------------------------

def _vseed(seed, v):
    """The original's per-rank seed of virtual rank v."""
    return seed + 100003 * v


def _draws(vr):
    """The next numbers of every hosted stream: one NumPy integer and permutation, one torch uniform draw each."""
    return ([int(rng.randint(1 << 30)) for rng in vr.np_rngs], vr.permutations(6).tolist(),
            [torch.rand(3, dtype=torch.float64, generator=g).tolist() for g in vr.generators])


def _through_a_file(states):
    """The states as a checkpoint writes and reads them: one weights_only file per virtual rank."""
    out = {}
    for v, state in states.items():
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        out[v] = torch.load(buffer, weights_only=True)
    return out


@pytest.mark.parametrize("seed", [7, 2**32 - 5])
def test_virtual_ranks_have_the_originals_per_rank_seeds(seed):
    vr = training.VirtualRanks(4, rank=0, world_size=1, seed=seed, device=CPU)
    assert vr.ids == [0, 1, 2, 3] and vr.count == 4 and len(vr) == 4
    for i, v in enumerate(vr.ids):
        np_rng = np.random.RandomState(_vseed(seed, v) % 2**32)
        generator = torch.Generator().manual_seed(_vseed(seed, v))
        assert vr.np_rngs[i].randint(1 << 30, size=5).tolist() == np_rng.randint(1 << 30, size=5).tolist()
        assert torch.equal(torch.rand(4, generator=vr.generators[i]), torch.rand(4, generator=generator))
        assert vr.generators[i].device == CPU


def test_virtual_ranks_permutations_are_each_streams_own():
    vr = training.VirtualRanks(3, rank=0, world_size=1, seed=11, device=CPU)
    perms = vr.permutations(9)
    assert perms.shape == (3, 9)
    for v in range(3):
        assert perms[v].tolist() == np.random.RandomState(_vseed(11, v)).permutation(9).tolist()


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_process_r_hosts_a_contiguous_block_of_virtual_ranks(world_size):
    """Process r of W hosts r*V/W ... (r+1)*V/W-1, with the very streams a single process hosting all V has."""
    everything = _draws(training.VirtualRanks(8, rank=0, world_size=1, seed=5, device=CPU))
    per = 8 // world_size
    for r in range(world_size):
        vr = training.VirtualRanks(8, rank=r, world_size=world_size, seed=5, device=CPU)
        assert vr.ids == list(range(r * per, (r + 1) * per)) and vr.count == 8 and len(vr) == per
        assert _draws(vr) == tuple(part[r * per:(r + 1) * per] for part in everything)


def test_the_global_rngs_get_the_seed_of_the_first_hosted_virtual_rank():
    training.VirtualRanks(4, rank=1, world_size=2, seed=7, device=CPU)  # hosts 2 and 3
    expected = torch.rand(3, generator=torch.Generator().manual_seed(_vseed(7, 2)))
    assert torch.equal(torch.rand(3), expected)
    assert np.random.randint(1 << 30) == np.random.RandomState(_vseed(7, 2)).randint(1 << 30)


def test_unseeded_virtual_ranks_have_distinct_streams():
    vr = training.VirtualRanks(2, rank=0, world_size=1, seed=None, device=CPU)
    a, b = (torch.rand(4, dtype=torch.float64, generator=g) for g in vr.generators)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("count, world_size", [(6, 4), (8, 3), (1, 2)])
def test_a_count_the_processes_do_not_divide_is_refused(count, world_size):
    with pytest.raises(ValueError, match=f"virtual_ranks={count} is not divisible by the number of processes "
                                         f"{world_size}"):
        training.VirtualRanks(count, rank=0, world_size=world_size, seed=0, device=CPU)


def test_rows_per_virtual_rank():
    vr = training.VirtualRanks(4, rank=0, world_size=2, seed=0, device=CPU)
    assert vr.rows(64) == 16
    with pytest.raises(ValueError, match="the batch=30 is not divisible by 4"):
        vr.rows(30)


def test_virtual_ranks_state_dict_round_trips():
    vr = training.VirtualRanks(2, rank=0, world_size=1, seed=3, device=CPU)
    _draws(vr)  # not at the start of the streams
    state = _through_a_file(vr.state_dict())
    assert set(state) == {0, 1} and all(set(s) == {"numpy", "generator"} for s in state.values())
    first = _draws(vr)
    vr.load_state_dict(state)
    assert _draws(vr) == first


def test_states_of_one_process_resume_the_virtual_ranks_on_two():
    """A run saved on one process hosting all 4 virtual ranks resumes on 2: process 1 (virtual ranks 2 and 3)
    continues exactly the streams of virtual ranks 2 and 3, whatever seed it was built with."""
    single = training.VirtualRanks(4, rank=0, world_size=1, seed=3, device=CPU)
    _draws(single)
    states = _through_a_file(single.state_dict())
    resumed = training.VirtualRanks(4, rank=1, world_size=2, seed=999, device=CPU)
    resumed.load_state_dict(states)
    assert _draws(resumed) == tuple(part[2:] for part in _draws(single))
