"""The experiments of params.py against the original's launch.py (ORIGINAL §3.2-3.4)."""

import json
import pathlib
import re

import pytest

import params
from lm_human_preferences.hparams import TrainPolicyHParams, TrainRewardHParams, check_world_size
from lm_human_preferences.utils import memory
from lm_human_preferences.utils.hyperparams import HParamsError

ORIGINAL_EXPERIMENTS = ('sentiment', 'descriptiveness', 'cnndm', 'tldr')
LABELS = 'https://openaipublic.blob.core.windows.net/lm-human-preferences/labels'
REPO = pathlib.Path(__file__).resolve().parents[1]


def _all(command):
    return [(command, name) for name in params.experiment_names(command)]


@pytest.mark.parametrize('command, name', _all('train_reward') + _all('train_policy'))
def test_every_experiment_builds_validates_and_round_trips(command, name):
    hp = params.get_hparams(command, name, {})
    assert isinstance(hp, TrainRewardHParams if command == 'train_reward' else TrainPolicyHParams)
    check_world_size(hp, 1 if name == 'test' else 8)  # the original ran on 8 GPUs
    back = type(hp).from_nested_dict(json.loads(json.dumps(hp.to_nested_dict())))
    assert back == hp


def test_experiment_names():
    for command in params.COMMANDS:
        names = params.experiment_names(command)
        assert set(ORIGINAL_EXPERIMENTS) | {'test', 'cnndm_offline_60k', 'tldr_offline_60k'} == set(names)


@pytest.mark.parametrize('name', ORIGINAL_EXPERIMENTS + ('cnndm_offline_60k', 'tldr_offline_60k', 'test'))
def test_policy_nests_the_same_named_reward_experiment(name):
    policy = params.get_hparams('train_policy', name, {})
    assert policy.rewards.train_new_model == params.get_hparams('train_reward', name, {})
    assert policy.rewards.trained_model is None
    assert policy.task == policy.rewards.train_new_model.task


@pytest.mark.parametrize('name', ('sentiment', 'descriptiveness'))
def test_books_experiments(name):
    hp = params.get_hparams('train_policy', name, {})
    task = hp.task
    assert (task.query_dataset, task.query_length, task.response_length) == ('books', 64, 24)
    assert (task.start_text, task.end_text, task.query_prefix, task.query_suffix) == ('.', '.', '', '')
    assert (task.truncate_token, task.truncate_after, task.penalty_reward_value) == (13, 16, -1)
    assert (task.policy.temperature, task.policy.initial_model) == (0.7, '124M')
    ppo = hp.ppo
    assert (ppo.lr, ppo.batch_size, ppo.total_episodes) == (1e-5, 512, 1_000_000)
    assert (ppo.nminibatches, ppo.noptepochs) == (1, 4)
    assert (ppo.vf_coef, ppo.cliprange, ppo.cliprange_value, ppo.gamma, ppo.lam) == (0.1, 0.2, 0.2, 1.0, 0.95)
    assert ppo.whiten_rewards is True and ppo.nupdates == 1954
    assert hp.rewards.kl_coef == 0.15
    assert (hp.rewards.adaptive_kl.target, hp.rewards.adaptive_kl.horizon) == (6.0, 10000)
    assert hp.run.seed == 1

    rm = hp.rewards.train_new_model
    assert (rm.batch_size, rm.lr, rm.rollout_batch_size) == (32, 5e-5, 512)
    assert (rm.labels.type, rm.labels.num_train) == ('best_of_4', 4992)
    assert rm.labels.source == f'{LABELS}/{name}/offline_5k.json'
    assert (rm.normalize_before, rm.normalize_after, rm.normalize_samples, rm.debug_normalize) == (True, True, 256, 0)
    assert rm.run.seed == 1 and rm.num_steps == 156


@pytest.mark.parametrize('name, prefix, end_text, temperature, kl_coef', [
    ('cnndm', 'Article:\n\n', '\n', 0.5, 0.01),
    ('tldr', '', None, 0.7, 0.03),
])
def test_summarization_experiments(name, prefix, end_text, temperature, kl_coef):
    hp = params.get_hparams('train_policy', name, {})
    task = hp.task
    assert (task.query_dataset, task.query_length, task.response_length) == (name, 500, 75)
    assert (task.query_prefix, task.query_suffix) == (prefix, '\n\nTL;DR:')
    assert (task.start_text, task.end_text) == (None, end_text)
    assert (task.truncate_token, task.truncate_after) == (198, 55)
    assert task.policy.temperature == temperature
    assert (hp.ppo.lr, hp.ppo.batch_size, hp.ppo.total_episodes, hp.ppo.nupdates) == (2e-6, 32, 1_000_000, 31_250)
    assert hp.ppo.whiten_rewards is False  # the original's broken 'rewards.whiten' (ORIGINAL §13.7)
    assert hp.rewards.kl_coef == kl_coef and hp.rewards.adaptive_kl is None

    rm = hp.rewards.train_new_model
    assert (rm.batch_size, rm.lr, rm.rollout_batch_size, rm.normalize_samples) == (16, 2.5e-5, 128, 256)
    assert (rm.labels.source, rm.labels.num_train) == (f'{LABELS}/{name}/online_45k.json', 46_000)
    assert rm.num_steps == 2875

    offline = params.get_hparams('train_reward', f'{name}_offline_60k', {})
    assert (offline.labels.source, offline.labels.num_train) == (f'{LABELS}/{name}/offline_60k.json', 60_000)


def test_summarization_whitening_would_fail_on_8_ranks():
    """Why the original's cnndm/tldr must not whiten rewards: 32 / 8 virtual ranks = 4 rows < 8."""
    with pytest.raises(HParamsError, match='= 4'):
        params.get_hparams('train_policy', 'cnndm', {'ppo.whiten_rewards': 'true'})


@pytest.mark.parametrize('command', ['train_reward', 'train_policy'])
def test_every_experiment_of_the_original_runs_on_8_virtual_ranks(command):
    for experiment in params.experiment_names(command):
        hp = params.get_hparams(command, experiment)
        nested = [hp, hp.rewards.train_new_model] if command == 'train_policy' else [hp]
        assert [h.virtual_ranks for h in nested] == [1 if experiment == 'test' else 8] * len(nested), experiment
        for world_size in ((1,) if experiment == 'test' else (1, 2, 4, 8)):
            check_world_size(hp, world_size)


def test_test_experiment():
    hp = params.get_hparams('train_policy', 'test', {})
    assert (hp.task.query_dataset, hp.task.policy.initial_model, hp.task.start_text) == ('test', 'test', None)
    assert (hp.task.query_length, hp.task.response_length) == (4, 4)
    assert (hp.ppo.batch_size, hp.ppo.total_episodes, hp.ppo.nminibatches, hp.ppo.noptepochs) == (8, 16, 1, 2)
    assert hp.ppo.nupdates == 2
    assert (hp.rewards.adaptive_kl.target, hp.rewards.adaptive_kl.horizon) == (3.0, 100)
    assert (hp.run.seed, hp.run.log_interval, hp.run.save_interval) == (0, 1, 1)
    rm = hp.rewards.train_new_model
    assert (rm.labels.source, rm.labels.type, rm.labels.num_train) == ('test', 'best_of_4', 16)
    assert (rm.batch_size, rm.rollout_batch_size, rm.normalize_samples) == (8, 8, 8)
    assert rm.normalize_before and rm.normalize_after


def test_overrides_apply_after_the_experiment():
    hp = params.get_hparams('train_policy', 'sentiment', {
        'rewards.trained_model': 'runs/rm/reward_model', 'rewards.train_new_model': 'off', 'ppo.lr': '2e-5'})
    assert hp.rewards.train_new_model is None and hp.rewards.trained_model == 'runs/rm/reward_model'
    assert hp.ppo.lr == 2e-5 and hp.ppo.batch_size == 512
    hp = params.get_hparams('train_policy', 'cnndm', {'rewards.adaptive_kl.target': '18.0'})
    assert (hp.rewards.adaptive_kl.target, hp.rewards.adaptive_kl.horizon) == (18.0, 10000)


def test_overrides_are_validated():
    with pytest.raises(HParamsError, match="'ppo.lr'"):
        params.get_hparams('train_policy', 'sentiment', {'ppo.lr': 'fast'})
    with pytest.raises(HParamsError, match=r"'labels.num_train' \(5000\) must be divisible by 'batch_size' \(32\)"):
        params.get_hparams('train_reward', 'sentiment', {'labels.num_train': '5000'})


def test_unknown_experiment_lists_valid_names_closest_first():
    with pytest.raises(HParamsError) as e:
        params.get_hparams('train_policy', 'sentimnet', {})
    message = str(e.value)
    assert "'sentimnet'" in message
    listed = message.split('(closest first): ')[1].split(', ')
    assert listed[0] == 'sentiment' and set(listed) == set(params.experiment_names('train_policy'))
    with pytest.raises(HParamsError, match="unknown command 'train'"):
        params.get_hparams('train', 'sentiment', {})


def test_experiment_fragments_do_not_overlap():
    with pytest.raises(ValueError, match="'a' bound twice"):
        params.combine({'a': 1}, {'a': 2})
    assert params.nest('task', {'policy.temperature': 0.7}) == {'task.policy.temperature': 0.7}


def test_package_never_imports_params_or_launch():
    pattern = re.compile(r'^\s*(import (params|launch)\b|from (params|launch) import)', re.MULTILINE)
    offenders = [str(p.relative_to(REPO)) for p in (REPO / 'lm_human_preferences').rglob('*.py')
                 if pattern.search(p.read_text(encoding='utf-8'))]
    assert offenders == []


# ---- GPU memory (utils/memory.py) ---------------------------------------------------------------------------

def _memory(name, model, world_size):
    flat = params.get_hparams('train_policy', name, {
        'task.policy.initial_model': model, 'rewards.train_new_model.task.policy.initial_model': model}).to_flat_dict()
    return memory.run_estimate(flat, memory.GPT2_SHAPES[model], world_size)


@pytest.mark.parametrize('name', params.MEMORY_TABLE_EXPERIMENTS)
@pytest.mark.parametrize('world_size', [1, 8])
def test_124M_fits_a_24GB_gpu(name, world_size):
    gb = _memory(name, '124M', world_size)
    assert set(gb) == {'policy', 'reward'} and max(gb.values()) <= memory.FITS_GB


@pytest.mark.parametrize('name', params.MEMORY_TABLE_EXPERIMENTS)
def test_774M_fits_one_24GB_gpu_where_it_can(name):
    """PPO at 774M fits one 24 GB GPU for every task, reward training for the books tasks; the summarization reward
    training (one label = 4 sequences of 583 tokens, the smallest micro-batch) and 8 GPUs (3.1 GB of DDP buckets)
    need a 32 GB card, as the README's table says."""
    gb = _memory(name, '774M', 1)
    assert gb['policy'] <= memory.FITS_GB
    if name in ('sentiment', 'descriptiveness'):
        assert gb['reward'] <= memory.FITS_GB
    assert max(_memory(name, '774M', 8).values()) <= 32 * 0.9


def test_readme_memory_table_is_the_estimate():
    """The README's GPU memory table is `params.memory_table()` verbatim (regenerate it when a default changes)."""
    table = params.memory_table()
    readme = (REPO / 'README.md').read_text()
    header = table.splitlines()[0]
    assert header in readme, f"README.md lacks the GPU memory table; paste params.memory_table():\n{table}"
    start = readme.index(header)
    assert readme[start:start + len(table) + 1] == table + '\n', f"README's table differs from:\n{table}"
