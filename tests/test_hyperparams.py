"""The typed hyperparameter system (ORIGINAL §2.2) and the validation rules of the real classes (§3.1)."""

import dataclasses
import io
import json
import re
import typing
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import pytest
import torch

import params
from lm_human_preferences.hparams import (AdaptiveKLParams, TrainPolicyHParams, TrainRewardHParams,
                                          check_world_size)
from lm_human_preferences.utils.hyperparams import HParams, HParamsError
from lm_human_preferences.utils.training import VirtualRanks


@dataclass
class Simple(HParams):
    mandatory: Optional[int] = None
    name: str = 'foo'
    optional_int: Optional[int] = None
    optional_str: Optional[str] = 'x'
    rate: float = 0.5
    fun: bool = True
    mode: Literal['a', 'b'] = 'a'

    def _validate(self, prefix):
        self._require(prefix, 'mandatory')


@dataclass
class Nested(HParams):
    first: bool = False
    simple_1: Simple = field(default_factory=Simple)
    simple_2: Optional[Simple] = None


@dataclass
class Deeply(HParams):
    nested: Optional[Nested] = None


# ---- parsing strings --------------------------------------------------------------------------------------

@pytest.mark.parametrize('key, text, expected', [
    ('mandatory', '3', 3),
    ('mandatory', '-2', -2),
    ('mandatory', '1e6', 1_000_000),
    ('mandatory', '1_000', 1000),
    ('mandatory', 'None', None),
    ('mandatory', 'none', None),
    ('mandatory', '', None),
    ('rate', '1e-5', 1e-5),
    ('rate', '3', 3.0),
    ('fun', 't', True), ('fun', 'true', True), ('fun', 'True', True),
    ('fun', 'f', False), ('fun', 'false', False), ('fun', 'False', False),
    ('name', 'hello world', 'hello world'),
    ('name', '', ''),
    ('name', 'None', 'None'),  # a plain str is never None
    ('optional_str', 'None', None),
    ('optional_str', 'abc', 'abc'),
    ('mode', 'b', 'b'),
])
def test_parse_str_to_declared_type(key, text, expected):
    hp = Simple()
    hp.override_from_str_dict({key: text})
    value = getattr(hp, key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize('key, text, expected_type', [
    ('mandatory', 'abc', 'an integer'),
    ('mandatory', '1.5', 'an integer'),
    ('rate', 'fast', 'a number'),
    ('rate', '', 'a number'),
    ('fun', '?', 'a boolean'),
    ('fun', 'on', 'a boolean'),  # on/off are for nested structs only
    ('fun', '1', 'a boolean'),
    ('mode', 'c', "one of 'a', 'b'"),
])
def test_bad_string_names_key_value_and_type(key, text, expected_type):
    hp = Simple()
    with pytest.raises(HParamsError) as e:
        hp.override_from_str_dict({key: text})
    message = str(e.value)
    assert f"'{key}'" in message and repr(text) in message and expected_type in message


def test_typed_override_checks_and_coerces():
    hp = Simple()
    hp.override_from_dict({'rate': 2, 'mandatory': 4, 'optional_str': None})
    assert hp.rate == 2.0 and type(hp.rate) is float
    assert hp.mandatory == 4 and hp.optional_str is None
    for key, value in [('mandatory', True), ('mandatory', 1.0), ('name', 3), ('fun', 1), ('mode', 'z')]:
        with pytest.raises(HParamsError, match=f"'{key}'"):
            hp.override_from_dict({key: value})


# ---- unknown keys -----------------------------------------------------------------------------------------

def test_unknown_key_suggests_closest_valid_keys():
    with pytest.raises(HParamsError) as e:
        Nested().override_from_str_dict({'simple_1.mandatroy': '3'})
    assert "'simple_1.mandatroy'" in str(e.value) and "'simple_1.mandatory'" in str(e.value)

    with pytest.raises(HParamsError) as e:
        TrainPolicyHParams().override_from_str_dict({'lr': '1e-5'})  # the last component alone
    assert "'ppo.lr'" in str(e.value)

    with pytest.raises(HParamsError) as e:
        TrainPolicyHParams().override_from_dict({'ppo.lrr': 1e-5})
    assert "did you mean 'ppo.lr'" in str(e.value)

    with pytest.raises(HParamsError, match="'nonexistent_field'"):
        Simple().override_from_str_dict({'nonexistent_field': '7.0'})


def test_unknown_key_in_nested_dict_names_full_key():
    with pytest.raises(HParamsError) as e:
        Nested().override_from_nested_dict({'simple_1': {'nmae': 'x'}})
    assert "'simple_1.nmae'" in str(e.value) and "'simple_1.name'" in str(e.value)


# ---- nested structs: on/off, parents, order ---------------------------------------------------------------

def test_on_off():
    hp = Nested()
    hp.override_from_str_dict({'simple_1.mandatory': '8', 'simple_2': 'on', 'simple_2.name': 'HELLO'})
    assert hp.simple_2 == Simple(name='HELLO')
    with pytest.raises(HParamsError, match="'simple_2.mandatory' is required"):
        hp.validate()
    hp.override_from_dict({'simple_2.mandatory': 7, 'simple_1.optional_int': 55})
    hp.validate()
    assert hp.simple_1 == Simple(mandatory=8, optional_int=55)
    assert hp.simple_2 == Simple(mandatory=7, name='HELLO')

    hp.override_from_str_dict({'simple_2': 'off'})
    hp.validate()
    assert hp.simple_2 is None

    # 'on' replaces an existing struct by a fresh default one, as in the original.
    hp.override_from_str_dict({'simple_1': 'on'})
    assert hp.simple_1 == Simple()


@pytest.mark.parametrize('key, text', [('simple_2', 'BADVAL'), ('simple_1', 'off'), ('simple_2', 'true')])
def test_bad_struct_values(key, text):
    with pytest.raises(HParamsError, match=f"invalid value '{text}' for '{key}'"):
        Nested().override_from_str_dict({key: text})


def test_sub_key_auto_creates_missing_parents():
    hp = Deeply()
    hp.override_from_str_dict({'nested.simple_2.fun': 'f'})
    assert hp.nested == Nested(simple_2=Simple(fun=False))

    hp = Deeply()
    hp.override_from_dict({'nested.simple_2': 'on'})
    assert hp.nested.simple_2 == Simple()


def test_sub_key_of_struct_turned_off_in_same_overrides_is_an_error():
    hp = Nested(simple_2=Simple(name='kept'))
    with pytest.raises(HParamsError, match="'simple_2' is set to off"):
        hp.override_from_str_dict({'first': 't', 'simple_2': 'off', 'simple_2.fun': 'f'})
    assert hp == Nested(simple_2=Simple(name='kept'))  # nothing applied


@pytest.mark.parametrize('items', [
    [('nested.simple_2.fun', 'f'), ('nested.simple_2', 'on'), ('nested', 'on'), ('nested.first', 't')],
    [('nested', 'on'), ('nested.simple_2', 'on'), ('nested.first', 't'), ('nested.simple_2.fun', 'f')],
    [('nested.first', 't'), ('nested.simple_2.fun', 'f'), ('nested', 'on'), ('nested.simple_2', 'on')],
])
def test_order_of_keys_does_not_matter(items):
    hp = Deeply()
    hp.override_from_str_dict(OrderedDict(items))
    assert hp.nested == Nested(first=True, simple_2=Simple(fun=False))


# ---- export, JSON round trip, dump ------------------------------------------------------------------------

def test_json_round_trip():
    hp = Nested()
    hp.override_from_str_dict({'first': 't', 'simple_1.mandatory': '8', 'simple_2.optional_str': 'None',
                               'simple_2.rate': '0.25', 'simple_2.mandatory': '1'})
    nested = json.loads(json.dumps(hp.to_nested_dict()))
    assert nested['simple_2'] == {'mandatory': 1, 'name': 'foo', 'optional_int': None, 'optional_str': None,
                                  'rate': 0.25, 'fun': True, 'mode': 'a'}
    back = Nested.from_nested_dict(nested)
    assert back == hp
    back.validate()

    off = Nested.from_nested_dict(json.loads(json.dumps(Nested().to_nested_dict())))
    assert off.simple_2 is None and off == Nested()


def test_override_from_nested_dict_updates_in_place():
    hp = Nested()
    hp.override_from_nested_dict({'simple_1': {'mandatory': 8}, 'simple_2': {'name': 'HELLO'}})
    hp.override_from_nested_dict({'simple_2': {'mandatory': 7}, 'first': True})
    assert hp == Nested(first=True, simple_1=Simple(mandatory=8), simple_2=Simple(mandatory=7, name='HELLO'))
    with pytest.raises(HParamsError, match="'simple_2.rate'"):
        hp.override_from_nested_dict({'simple_2': {'rate': 'fast'}})


def test_dump_prints_sorted_dotted_keys():
    hp = Nested()
    hp.override_from_str_dict({'simple_2': 'on', 'simple_1.name': 'a\nb'})
    out = io.StringIO()
    hp.dump(out)
    lines = out.getvalue().splitlines()
    keys = [line.split(':')[0] for line in lines]
    assert keys == sorted(keys) and len(keys) == 1 + 2 * 7
    assert "simple_1.name: 'a\\nb'" in lines and 'first: False' in lines


# ---- validation -------------------------------------------------------------------------------------------

def test_validate_type_checks_every_field_recursively():
    hp = Nested(simple_1=Simple(mandatory=1))
    hp.validate()
    hp.simple_1.rate = 'fast'
    with pytest.raises(HParamsError, match=r"'simple_1\.rate' = 'fast' has the wrong type: expected a number"):
        hp.validate()
    hp.simple_1.rate = 1  # an int is a valid float
    hp.validate()
    hp.simple_1.mandatory = True  # a bool is not an int
    with pytest.raises(HParamsError, match="'simple_1.mandatory'"):
        hp.validate()


def test_unsupported_annotation_is_rejected():
    @dataclass
    class Bad(HParams):
        x: list = None

    with pytest.raises(TypeError, match='unsupported'):
        Bad().override_from_str_dict({'x': '1'})


# ---- the real classes -------------------------------------------------------------------------------------

def _reward_hparams(**flat):
    hp = TrainRewardHParams()
    hp.override_from_dict({'task.query_length': 4, 'task.query_dataset': 'test', 'task.response_length': 4,
                           'task.policy.initial_model': 'test', 'labels.type': 'best_of_4',
                           'labels.source': 'test', 'labels.num_train': 16, 'batch_size': 8, 'virtual_ranks': 1,
                           **flat})
    return hp


def _policy_hparams(**flat):
    hp = TrainPolicyHParams()
    hp.override_from_dict({'task.query_length': 4, 'task.query_dataset': 'test', 'task.response_length': 4,
                           'task.policy.initial_model': 'test', 'rewards.trained_model': 'test',
                           'ppo.batch_size': 8, 'virtual_ranks': 1, **flat})
    return hp


def test_reward_validation():
    _reward_hparams().validate()
    with pytest.raises(HParamsError) as e:
        _reward_hparams(**{'labels.num_train': 20}).validate()
    assert '20' in str(e.value) and '8' in str(e.value) and 'labels.num_train' in str(e.value)
    with pytest.raises(HParamsError, match="'task.query_length' is required"):
        _reward_hparams(**{'task.query_length': None}).validate()
    with pytest.raises(HParamsError, match="'labels.source' is required"):
        _reward_hparams(**{'labels.source': None}).validate()
    with pytest.raises(HParamsError, match="'labels.type' = 'best_of'"):
        _reward_hparams(**{'labels.type': 'best_of'}).validate()
    with pytest.raises(HParamsError, match=r"'labels.type' = 'best_of_1' is not a label type: .*2 <= N <= 1000"):
        _reward_hparams(**{'labels.type': 'best_of_1'}).validate()
    with pytest.raises(HParamsError, match="'task.policy.temperature' must be > 0"):
        _reward_hparams(**{'task.policy.temperature': 0.0}).validate()
    with pytest.raises(HParamsError, match="'run.device'"):
        _reward_hparams(**{'run.device': 'gpu'})


def test_policy_validation():
    _policy_hparams().validate()
    with pytest.raises(HParamsError, match="both 'rewards.trained_model'"):
        _policy_hparams(**{'rewards.train_new_model': _reward_hparams()}).validate()
    with pytest.raises(HParamsError, match='no reward model'):
        _policy_hparams(**{'rewards.trained_model': None}).validate()
    with pytest.raises(HParamsError, match=r"'ppo.batch_size' \(8\) must be divisible by 'ppo.nminibatches' \(3\)"):
        _policy_hparams(**{'ppo.nminibatches': 3}).validate()
    with pytest.raises(HParamsError, match='at least 8 rows'):
        _policy_hparams(**{'ppo.nminibatches': 2}).validate()
    _policy_hparams(**{'ppo.nminibatches': 2, 'ppo.whiten_rewards': False}).validate()
    with pytest.raises(HParamsError, match="'rewards.adaptive_kl.target' is required"):
        _policy_hparams(**{'rewards.adaptive_kl.horizon': 100}).validate()
    with pytest.raises(HParamsError, match="'rewards.train_new_model.task.policy.initial_model' is required"):
        _policy_hparams(**{'rewards.trained_model': None, 'rewards.train_new_model': 'on'}).validate()
    assert _policy_hparams(**{'rewards.adaptive_kl.target': 3}).rewards.adaptive_kl == AdaptiveKLParams(3.0)


def test_virtual_ranks_default_to_the_originals_eight_and_split_every_batch():
    assert TrainPolicyHParams().virtual_ranks == 8 and TrainRewardHParams().virtual_ranks == 8
    hp = _policy_hparams(**{'ppo.batch_size': 64, 'virtual_ranks': 8})
    hp.validate()  # 8 rows per virtual rank: enough to whiten
    with pytest.raises(HParamsError, match=r"'ppo.batch_size' \(64\) must be divisible by 'ppo.nminibatches' x "
                                           r"'virtual_ranks' \(128\)"):
        _policy_hparams(**{'ppo.batch_size': 64, 'virtual_ranks': 8, 'ppo.nminibatches': 16}).validate()
    with pytest.raises(HParamsError, match=r"at least 8 rows per virtual rank's minibatch, but ppo.batch_size 64 / "
                                           r"\(ppo.nminibatches 2 x virtual_ranks 8\) = 4"):
        _policy_hparams(**{'ppo.batch_size': 64, 'virtual_ranks': 8, 'ppo.nminibatches': 2}).validate()
    _policy_hparams(**{'ppo.batch_size': 64, 'virtual_ranks': 8, 'ppo.nminibatches': 2,
                       'ppo.whiten_rewards': False}).validate()
    with pytest.raises(HParamsError, match="'virtual_ranks' must be >= 1"):
        _policy_hparams(**{'virtual_ranks': 0}).validate()
    with pytest.raises(HParamsError, match=r"'rollout_batch_size' \(12\) must be divisible by 'virtual_ranks' \(8\)"):
        _reward_hparams(**{'rollout_batch_size': 12, 'virtual_ranks': 8}).validate()
    with pytest.raises(HParamsError, match=r"'batch_size' \(8\) must be divisible by 'virtual_ranks' \(3\)"):
        _reward_hparams(**{'virtual_ranks': 3}).validate()


def test_check_world_size_needs_processes_dividing_the_virtual_ranks():
    hp = _policy_hparams(**{'ppo.batch_size': 64, 'virtual_ranks': 8})
    for world_size in (1, 2, 4, 8):
        check_world_size(hp, world_size)
    with pytest.raises(HParamsError, match=r"'virtual_ranks' \(8\) must be divisible by the number of processes "
                                           r"\(3\).* Run on 1, 2, 4 or 8 processes, or pass --virtual_ranks"):
        check_world_size(hp, 3)
    with pytest.raises(HParamsError, match=r"'virtual_ranks' \(8\) must be divisible by the number of processes "
                                           r"\(16\)"):
        check_world_size(hp, 16)

    reward = _reward_hparams(**{'virtual_ranks': 4})
    check_world_size(reward, 4)
    nested = _policy_hparams(**{'rewards.trained_model': None, 'rewards.train_new_model': reward,
                                'ppo.batch_size': 64, 'virtual_ranks': 8})
    nested.validate()
    check_world_size(nested, 4)
    with pytest.raises(HParamsError, match=r"'rewards.train_new_model.virtual_ranks' \(4\) must be divisible by the "
                                           r"number of processes \(8\)"):
        check_world_size(nested, 8)


def test_deprecated_rewards_whiten_alias():
    hp = _policy_hparams()
    with pytest.warns(DeprecationWarning, match="'rewards.whiten' is a deprecated alias of 'ppo.whiten_rewards'"):
        hp.override_from_str_dict({'rewards.whiten': 'false'})
    assert hp.ppo.whiten_rewards is False
    hp = _policy_hparams()
    with pytest.warns(DeprecationWarning):
        hp.override_from_dict({'rewards.whiten': False})
    assert hp.ppo.whiten_rewards is False
    with pytest.raises(HParamsError, match='keep only'):
        hp.override_from_dict({'rewards.whiten': False, 'ppo.whiten_rewards': True})


# ---- numbers that make a run meaningless: NaN/inf floats, ints beyond 64 bits --------------------------------

def _leaf_keys(cls, leaf_type, prefix=''):
    """Every dotted key of an HParams class whose declared type is `leaf_type` or Optional[leaf_type]."""
    keys = []
    for f in dataclasses.fields(cls):
        ty = typing.get_type_hints(cls)[f.name]
        args = [a for a in typing.get_args(ty) if a is not type(None)] if typing.get_origin(ty) is Union else [ty]
        if isinstance(args[0], type) and issubclass(args[0], HParams):
            keys += _leaf_keys(args[0], leaf_type, f'{prefix}{f.name}.')
        elif args[0] is leaf_type:
            keys.append(prefix + f.name)
    return keys


POLICY_FLOATS = _leaf_keys(TrainPolicyHParams, float)
POLICY_INTS = _leaf_keys(TrainPolicyHParams, int)


def test_the_leaf_key_lists_cover_the_classes():
    assert {'ppo.lr', 'rewards.kl_coef', 'rewards.adaptive_kl.target', 'task.policy.temperature',
            'rewards.train_new_model.lr', 'ppo.gamma'} <= set(POLICY_FLOATS)
    assert {'run.seed', 'rewards.train_new_model.run.seed', 'ppo.batch_size', 'task.truncate_token'} <= set(POLICY_INTS)


@pytest.mark.parametrize('key', POLICY_FLOATS)
@pytest.mark.parametrize('text', ['nan', 'inf', '-inf', '1e999'])
def test_every_float_hyperparameter_rejects_nan_and_inf(key, text):
    value = float(text)
    with pytest.raises(HParamsError, match=re.escape(f"'{key}' = {value!r} is not a finite number: pass a finite "
                                                     f"value")):
        params.get_hparams('train_policy', 'test', {key: text})


def test_nan_from_a_json_file_is_rejected_too():
    nested = json.loads('{"ppo": {"lr": NaN}, "rewards": {"kl_coef": Infinity}}')
    hp = params.get_hparams('train_policy', 'test')
    hp.override_from_nested_dict(nested)
    with pytest.raises(HParamsError, match="'rewards.kl_coef' = inf is not a finite number"):
        hp.validate()
    hp = Simple(mandatory=1, rate=float('nan'))
    with pytest.raises(HParamsError, match="'rate' = nan is not a finite number"):
        hp.validate()


@pytest.mark.parametrize('key', POLICY_INTS)
@pytest.mark.parametrize('value', [2**63, -2**63 - 1, 10**30])
def test_every_int_hyperparameter_must_fit_64_bits(key, value):
    with pytest.raises(HParamsError, match=re.escape(f"'{key}' = {value} does not fit a 64-bit integer: pass a value "
                                                     f"in [-2**63, 2**63)")):
        params.get_hparams('train_policy', 'test', {key: str(value)})


@pytest.mark.parametrize('seed', [2**63 - 1, -2**63, 0])
def test_every_64_bit_seed_seeds_every_rank(seed):
    hp = params.get_hparams('train_policy', 'test', {'run.seed': str(seed)})
    for rank in (0, 1, 1000):
        vranks = VirtualRanks(1001, rank=rank, world_size=1001, seed=hp.run.seed, device=torch.device('cpu'))
        vranks.permutations(4), torch.randn(1, generator=vranks.generators[0])


def test_seed_as_a_float_string_names_the_key():
    with pytest.raises(HParamsError, match="'run.seed' = 1000000000000000019884624838656 does not fit a 64-bit"):
        params.get_hparams('train_reward', 'test', {'run.seed': '1e30'})


def test_truncate_after_must_leave_room_for_the_truncate_token():
    _reward_hparams(**{'task.truncate_token': 3, 'task.truncate_after': 3}).validate()
    _reward_hparams(**{'task.truncate_after': 9}).validate()  # no truncate token: truncate_after is unused
    with pytest.raises(HParamsError, match=r"'task.truncate_after' \(4\) must be < 'task.response_length' \(4\): "
                                           r"the truncate token never counts"):
        _reward_hparams(**{'task.truncate_token': 3, 'task.truncate_after': 4}).validate()


def test_online_needs_the_reward_training_settings_and_room_for_its_rounds():
    hp = _policy_hparams(**{'online': 'on', 'online.rounds': 1, 'ppo.total_episodes': 16})
    with pytest.raises(HParamsError, match=r"'online' retrains the reward model with 'rewards.train_new_model''s "
                                           r"settings: pass --rewards.train_new_model on"):
        hp.validate()
    chained = _policy_hparams(**{'rewards.trained_model': None, 'rewards.train_new_model': _reward_hparams(),
                                 'online': 'on', 'online.rounds': 2, 'ppo.total_episodes': 16})
    with pytest.raises(HParamsError, match=r"'online.rounds' \(2\) needs at least 3 PPO updates, the run has 2"):
        chained.validate()
    chained.online.rounds = 1
    chained.validate()
    for key, value, message in [('quota', 0.0, r"'online.quota' must be in \(0, 1\]"),
                                ('overlap', 1.5, r"'online.overlap' must be in \[0, 1\]"),
                                ('labeler', 'robot', r"'online.labeler' = 'robot': use people, vader or "
                                                     r"reward_model:<reward model directory>")]:
        bad = _policy_hparams(**{'rewards.trained_model': None, 'rewards.train_new_model': _reward_hparams(),
                                 'online': 'on', 'online.rounds': 1, 'ppo.total_episodes': 16, f'online.{key}': value})
        with pytest.raises(HParamsError, match=message):
            bad.validate()
