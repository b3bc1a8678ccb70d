"""The experiments of the original ``launch.py`` (ORIGINAL §3.2-3.4), as flat dicts of dotted keys.

``TRAIN_REWARD_EXPERIMENTS[name]`` and ``TRAIN_POLICY_EXPERIMENTS[name]`` map a dotted hyperparameter key to
its value; :func:`get_hparams` applies one on top of the defaults of ``lm_human_preferences.hparams``, then
the command-line overrides, and validates. Every experiment but ``test`` keeps the default ``virtual_ranks`` 8,
the original's 8 MPI ranks, so 1, 2, 4 or 8 GPUs compute what its 8 V100s did. Every policy experiment trains
the same-named reward model first (``rewards.train_new_model.*``); to reuse a trained one instead, pass
``--rewards.trained_model <run dir>/reward_model --rewards.train_new_model off``.

Deviation from the original: cnndm and tldr bind ``ppo.whiten_rewards=False`` where the original bound the
non-existent key ``rewards.whiten`` and crashed at launch (ORIGINAL §13.7).
"""

import difflib
from typing import Any, Dict, Mapping

from lm_human_preferences.hparams import TrainPolicyHParams, TrainRewardHParams
from lm_human_preferences.utils import memory
from lm_human_preferences.utils.hyperparams import HParams, HParamsError

Binds = Dict[str, Any]

LABELS_URL = 'https://openaipublic.blob.core.windows.net/lm-human-preferences/labels'


def combine(*parts: Mapping[str, Any]) -> Binds:
    """Merges dicts of binds that must not overlap (a key bound twice is a mistake in this file)."""
    out: Binds = {}
    for part in parts:
        for key, value in part.items():
            if key in out:
                raise ValueError(f"experiment key '{key}' bound twice ({out[key]!r} and {value!r})")
            out[key] = value
    return out


def nest(prefix: str, binds: Mapping[str, Any]) -> Binds:
    """Prefixes every key with ``prefix.`` (the original's ``bind_nested``)."""
    return {f'{prefix}.{key}': value for key, value in binds.items()}


# ---- tasks (ORIGINAL §3.2) ------------------------------------------------------------------------------

BOOKS_TASK = {
    'query_length': 64,
    'query_dataset': 'books',
    'response_length': 24,
    'start_text': '.',  # start the context at the beginning of a sentence
    'end_text': '.',  # end the context at the end of a sentence
    'truncate_token': 13,  # encoding of '.': end completions at the end of a sentence
    'truncate_after': 16,  # make sure completions are at least 16 tokens long
    'policy.temperature': 0.7,
    'policy.initial_model': '124M',
}

CNNDM_TASK = {
    'query_prefix': 'Article:\n\n',
    'query_suffix': '\n\nTL;DR:',
    'end_text': '\n',
    'query_dataset': 'cnndm',
    'query_length': 500,
    'response_length': 75,
    'start_text': None,
    'truncate_after': 55,
    'truncate_token': 198,  # '\n'
    'policy.temperature': 0.5,
    'policy.initial_model': '124M',
}

TLDR_TASK = {
    'query_suffix': '\n\nTL;DR:',
    'query_dataset': 'tldr',
    'query_length': 500,
    'response_length': 75,
    'start_text': None,
    'truncate_after': 55,
    'truncate_token': 198,  # '\n'
    'policy.temperature': 0.7,
    'policy.initial_model': '124M',
}

# A tiny task for smoke tests (like the original's tests, ORIGINAL §12): the random test model and data.
TEST_TASK = {
    'query_length': 4,
    'query_dataset': 'test',
    'response_length': 4,
    'start_text': None,
    'policy.initial_model': 'test',
}

# ---- reward experiments (ORIGINAL §3.3) -----------------------------------------------------------------

_SHARED_REWARD = {
    'labels.type': 'best_of_4',
    'normalize_after': True,
    'normalize_before': True,
    'normalize_samples': 256,
}

# Memory knobs (not in the original, which needed 8 x 32 GB V100s): per-rank chunk sizes for the no-grad
# sampling/scoring passes and for gradient accumulation. They leave the math unchanged (up to float summation
# order) and are chosen with utils/memory.estimate so that one 24 GB GPU holds a whole run of the paper's 774M model
# in bf16 where it can (`memory_table()` below, the README's GPU memory table); 124M needs far less.
_BOOKS_MEMORY = {'run.rollout_micro_batch': 64, 'run.train_micro_batch': 16}
_SUMMARIZE_MEMORY = {'run.rollout_micro_batch': 16, 'run.train_micro_batch': 2}

_BOOKS_REWARD = combine(nest('task', BOOKS_TASK), _SHARED_REWARD, {
    'batch_size': 32,
    'lr': 5e-5,
    'rollout_batch_size': 512,
    'run.rollout_micro_batch': 64,
    'run.train_micro_batch': 4,  # label records: 4 sequences each
})

_SUMMARIZE_REWARD = combine(_SHARED_REWARD, {
    'batch_size': 2 * 8,
    'lr': 2.5e-5,
    'rollout_batch_size': 128,
    'run.rollout_micro_batch': 16,
    'run.train_micro_batch': 1,  # one label record: 4 sequences of 583 tokens
})

TRAIN_REWARD_EXPERIMENTS: Dict[str, Binds] = {
    'sentiment': combine(_BOOKS_REWARD, {
        'labels.source': f'{LABELS_URL}/sentiment/offline_5k.json',
        'labels.num_train': 4_992,
        'run.seed': 1,
    }),
    'descriptiveness': combine(_BOOKS_REWARD, {
        'labels.source': f'{LABELS_URL}/descriptiveness/offline_5k.json',
        'labels.num_train': 4_992,
        'run.seed': 1,
    }),
    'cnndm': combine(nest('task', CNNDM_TASK), _SUMMARIZE_REWARD, {
        'labels.source': f'{LABELS_URL}/cnndm/online_45k.json',
        'labels.num_train': 46_000,
        'run.seed': 1,
    }),
    'tldr': combine(nest('task', TLDR_TASK), _SUMMARIZE_REWARD, {
        'labels.source': f'{LABELS_URL}/tldr/online_45k.json',
        'labels.num_train': 46_000,
        'run.seed': 1,
    }),
    # The alternatives commented out in the original: the offline labels.
    'cnndm_offline_60k': combine(nest('task', CNNDM_TASK), _SUMMARIZE_REWARD, {
        'labels.source': f'{LABELS_URL}/cnndm/offline_60k.json',
        'labels.num_train': 60_000,
        'run.seed': 1,
    }),
    'tldr_offline_60k': combine(nest('task', TLDR_TASK), _SUMMARIZE_REWARD, {
        'labels.source': f'{LABELS_URL}/tldr/offline_60k.json',
        'labels.num_train': 60_000,
        'run.seed': 1,
    }),
    'test': combine(nest('task', TEST_TASK), {
        'labels.type': 'best_of_4',
        'labels.source': 'test',
        'labels.num_train': 16,
        'batch_size': 8,
        'rollout_batch_size': 8,
        'normalize_before': True,
        'normalize_after': True,
        'normalize_samples': 8,
        'virtual_ranks': 1,  # one rank, as the original's tests ran (ORIGINAL §12); torchrun needs a multiple
        'run.seed': 0,
        'run.log_interval': 1,
        'run.save_interval': 1,
        'run.wandb': 'disabled',
        'run.precision': 'fp32',  # the reference experiment: float32 numerics on every machine
    }),
}

# ---- policy experiments (ORIGINAL §3.4) -----------------------------------------------------------------


def _with_new_reward_model(name: str) -> Binds:
    """Binds that train the same-named reward experiment before PPO."""
    return combine({'rewards.train_new_model': 'on'},
                   nest('rewards.train_new_model', TRAIN_REWARD_EXPERIMENTS[name]))


_BOOKS_POLICY = combine(nest('task', BOOKS_TASK), {
    'ppo.lr': 1e-5,
    'ppo.total_episodes': 1_000_000,
    'ppo.batch_size': 512,
    'rewards.kl_coef': 0.15,
    'rewards.adaptive_kl': 'on',
    'rewards.adaptive_kl.target': 6.0,
    'run.seed': 1,
}, _BOOKS_MEMORY)


def _summarize_policy(task: Binds, kl_coef: float) -> Binds:
    """The cnndm/tldr PPO settings (the original's adaptive KL, target 18.0, is commented out)."""
    return combine(nest('task', task), {
        'ppo.total_episodes': 1_000_000,
        'ppo.lr': 2e-6,
        'rewards.kl_coef': kl_coef,
        'ppo.batch_size': 32,
        'ppo.whiten_rewards': False,  # the original's 'rewards.whiten' (ORIGINAL §3.4, bug)
        'run.seed': 1,
    }, _SUMMARIZE_MEMORY)


TRAIN_POLICY_EXPERIMENTS: Dict[str, Binds] = {
    'sentiment': combine(_BOOKS_POLICY, _with_new_reward_model('sentiment')),
    'descriptiveness': combine(_BOOKS_POLICY, _with_new_reward_model('descriptiveness')),
    'cnndm': combine(_summarize_policy(CNNDM_TASK, 0.01), _with_new_reward_model('cnndm')),
    'tldr': combine(_summarize_policy(TLDR_TASK, 0.03), _with_new_reward_model('tldr')),  # 0.01 too low
    'cnndm_offline_60k': combine(_summarize_policy(CNNDM_TASK, 0.01), _with_new_reward_model('cnndm_offline_60k')),
    'tldr_offline_60k': combine(_summarize_policy(TLDR_TASK, 0.03), _with_new_reward_model('tldr_offline_60k')),
    'test': combine(nest('task', TEST_TASK), _with_new_reward_model('test'), {
        'ppo.batch_size': 8,
        'ppo.total_episodes': 16,
        'ppo.nminibatches': 1,
        'ppo.noptepochs': 2,
        'rewards.adaptive_kl': 'on',
        'rewards.adaptive_kl.target': 3.0,
        'rewards.adaptive_kl.horizon': 100,
        'virtual_ranks': 1,  # one rank, as the original's tests ran (ORIGINAL §12); torchrun needs a multiple
        'run.seed': 0,
        'run.log_interval': 1,
        'run.save_interval': 1,
        'run.wandb': 'disabled',
        'run.precision': 'fp32',  # the reference experiment: float32 numerics on every machine
    }),
}

COMMANDS = {
    'train_reward': (TrainRewardHParams, TRAIN_REWARD_EXPERIMENTS),
    'train_policy': (TrainPolicyHParams, TRAIN_POLICY_EXPERIMENTS),
}


def experiment_names(command: str) -> list:
    """The experiments of a command, in definition order."""
    return list(_command(command)[1])


def get_hparams(command: str, experiment: str, overrides: Mapping[str, str] = None) -> HParams:
    """Builds the validated hyperparameters of ``experiment`` for ``command`` ('train_reward' or
    'train_policy'), with string ``overrides`` (``{'ppo.lr': '1e-5'}``) applied after the experiment."""
    hparams_class, experiments = _command(command)
    if experiment not in experiments:
        names = sorted(experiments, key=lambda n: -difflib.SequenceMatcher(None, experiment, n).ratio())
        raise HParamsError(f"unknown {command} experiment '{experiment}'; valid experiments (closest "
                           f"first): {', '.join(names)}")
    overrides = dict(overrides or {})
    hparams = hparams_class()
    hparams.override_from_dict(experiments[experiment])
    hparams.override_from_str_dict(overrides)
    chained = getattr(getattr(hparams, 'rewards', None), 'train_new_model', None)
    if chained is not None and 'virtual_ranks' in overrides and \
            'rewards.train_new_model.virtual_ranks' not in overrides and 1 <= hparams.virtual_ranks < 2**63:
        chained.virtual_ranks = hparams.virtual_ranks  # the chained reward training runs in the same processes
        # (a value validate() refuses is left to it, so that its error names the key that was passed)
    hparams.validate()
    return hparams


def _command(command: str):
    """(hyperparameter class, experiments) of a command; HParamsError for an unknown command."""
    if command not in COMMANDS:
        raise HParamsError(f"unknown command '{command}': use one of {', '.join(COMMANDS)}")
    return COMMANDS[command]


# ---- GPU memory (README "GPU memory" table) -------------------------------------------------------------

MEMORY_TABLE_EXPERIMENTS = ('sentiment', 'descriptiveness', 'cnndm', 'tldr')


def memory_table() -> str:
    """The README's table of estimated GB per GPU (bf16) for the policy experiments with 124M and 774M on 1 and 8
    GPUs (utils/memory.estimate)."""
    rows = []
    for experiment in MEMORY_TABLE_EXPERIMENTS:
        for model in ('124M', '774M'):
            flat = get_hparams('train_policy', experiment, {
                'task.policy.initial_model': model,
                'rewards.train_new_model.task.policy.initial_model': model}).to_flat_dict()
            for world_size in (1, 8):
                rows.append((experiment, model, world_size, flat,
                             memory.run_estimate(flat, memory.GPT2_SHAPES[model], world_size)))
    return memory.render_table(rows)
