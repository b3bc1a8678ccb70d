"""label_types.py: the three losses against numpy, the label statistics against the original
(tests/reference/reward_model.npz), schemas, target scales and name parsing.

The original's recorded losses come from running its reward model on the labels (the rewards themselves are
not recorded): they are checked with the port's GPT-2 loaded from the recorded weights, and the loss functions
on their own against numpy transcriptions of ORIGINAL §8.2."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_human_preferences import label_types
from lm_human_preferences.hparams import LabelHParams
from lm_human_preferences.language import labels as label_files
from lm_human_preferences.language.model import GPT2, GPT2Config
from lm_human_preferences.language.trained_models import tf_to_state_dict
from lm_human_preferences.utils.core import Schema
from lm_human_preferences.utils.hyperparams import HParamsError

REF = Path(__file__).parent / "reference"


def _np_softmax_xent(logits, labels):
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(labels)), labels].mean()


def test_get_label_type_parses_names():
    lt = label_types.get_label_type("best_of_4")
    assert lt.name == "best_of_4" and lt.num_responses == 4
    assert lt.response_keys == ("sample0", "sample1", "sample2", "sample3")
    assert label_types.get_label_type("best_of_7").num_responses == 7
    assert label_types.get_label_type("scalar_rating").response_keys == ("sample",)
    assert label_types.get_label_type("scalar_compare").response_keys == ("sample0", "sample1")
    for bad in ("best_of_x", "best_of_", "pairwise", "best_of_4 "):
        with pytest.raises(ValueError, match="scalar_rating, scalar_compare"):
            label_types.get_label_type(bad)
    with pytest.raises(ValueError, match="2 <= N <= 1000"):
        label_types.get_label_type("best_of_1")


def test_schemas():
    lt = label_types.get_label_type("best_of_4")
    schemas = lt.schemas(query_length=5, response_length=6)
    assert set(schemas) == {"query", "sample0", "sample1", "sample2", "sample3", "best"}
    assert schemas["query"] == Schema(np.int32, (5,)) and schemas["sample3"] == Schema(np.int32, (6,))
    assert schemas["best"] == Schema(np.int32, ())
    assert label_types.get_label_type("scalar_rating").label_schemas() == {"score": Schema(np.float32, ())}
    assert label_types.get_label_type("scalar_compare").label_schemas() == {"difference": Schema(np.float32, ())}


def test_field_kinds():
    assert label_types.get_label_type("best_of_2").field_kinds() == {"query": "query", "sample0": "response",
                                                                      "sample1": "response", "best": "int"}
    assert label_types.get_label_type("scalar_rating").field_kinds() == {"query": "query", "sample": "response",
                                                                          "score": "float"}


@pytest.mark.parametrize("name", ["best_of_0", "best_of_1", "best_of_x", "best_of_", "pairwise"])
def test_hparams_and_label_files_reject_what_label_types_rejects(name):
    """The three places that see a label type name agree, with label_types' one message (best_of_1 included)."""
    message = re.escape(f"{name!r} is not a label type: valid types are best_of_N (2 <= N <= 1000, e.g. best_of_4)")
    with pytest.raises(ValueError, match=message):
        label_types.get_label_type(name)
    with pytest.raises(ValueError, match=message):
        label_files.label_schema(name)
    with pytest.raises(HParamsError, match=f"'labels.type' = {message}"):
        LabelHParams(type=name, num_train=8, source="test").validate(prefix="labels.")


@pytest.mark.parametrize("n", ["1001", "99999999999999999999999", "9" * 5000])
def test_best_of_n_is_bounded(n):
    """A huge N is refused with the one message (not a MemoryError or an int-conversion error), shortened."""
    name = f"best_of_{n}"
    for check in (label_types.get_label_type, label_files.label_schema,
                  lambda name: LabelHParams(type=name, num_train=8, source="test").validate(prefix="labels.")):
        with pytest.raises(ValueError, match=r"is not a label type: valid types are best_of_N \(2 <= N <= 1000") as e:
            check(name)
        assert len(str(e.value)) < 200
    assert label_types.get_label_type("best_of_1000").num_responses == 1000


@pytest.mark.parametrize("name", ["best_of_2", "best_of_7", "scalar_rating", "scalar_compare"])
def test_hparams_and_label_files_accept_what_label_types_accepts(name):
    lt = label_types.get_label_type(name)
    LabelHParams(type=name, num_train=8, source="test").validate(prefix="labels.")
    assert set(label_files.label_schema(name)) == set(lt.schemas(query_length=1, response_length=1))


def test_best_of_n_loss_and_accuracy():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(16, 4)).astype(np.float32)
    best = rng.integers(0, 4, size=16)
    lt = label_types.get_label_type("best_of_4")
    loss, stats = lt.loss_from_rewards(torch.tensor(rewards), {"best": torch.tensor(best, dtype=torch.int32)})
    np.testing.assert_allclose(float(loss), _np_softmax_xent(rewards.astype(np.float64), best), rtol=1e-6)
    assert float(stats["loss"]) == float(stats["error"]) == float(loss)
    assert float(stats["accuracy"]) == pytest.approx((rewards.argmax(1) == best).mean())
    # equal rewards are chance level: ln N
    loss, _ = lt.loss_from_rewards(torch.zeros(3, 4), {"best": torch.tensor([0, 1, 3])})
    assert float(loss) == pytest.approx(np.log(4), rel=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        lt.loss_from_rewards(torch.zeros(3, 2), {"best": torch.tensor([0, 1, 1])})


def test_best_of_n_common_bias_has_zero_gradient():
    rng = np.random.default_rng(1)
    raw = torch.tensor(rng.normal(size=(8, 4)), dtype=torch.float64)
    gain = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    best = torch.tensor(rng.integers(0, 4, size=8))
    loss, _ = label_types.get_label_type("best_of_4").loss_from_rewards(gain * raw + bias, {"best": best})
    loss.backward()
    assert abs(float(bias.grad)) < 1e-15
    assert abs(float(gain.grad)) > 1e-3  # the gain, by contrast, is trained


def test_scalar_rating_loss_and_stats():
    rng = np.random.default_rng(2)
    predicted = rng.normal(size=16).astype(np.float32)
    score = (0.4 * predicted + rng.normal(size=16)).astype(np.float32)
    lt = label_types.get_label_type("scalar_rating")
    labels = {"score": torch.tensor(score)}
    loss, stats = lt.loss_from_rewards(torch.tensor(predicted), labels)
    loss2, _ = lt.loss_from_rewards(torch.tensor(predicted)[:, None], labels)
    p, s = predicted.astype(np.float64), score.astype(np.float64)
    np.testing.assert_allclose(float(loss), ((s - p) ** 2).mean(), rtol=1e-6)
    assert float(loss2) == float(loss) == float(stats["error"])
    np.testing.assert_allclose(float(stats["label_mean"]), s.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(stats["label_var"]), s.var(), rtol=1e-6)
    np.testing.assert_allclose(float(stats["corr"]), np.corrcoef(s, p)[0, 1], rtol=1e-5)
    assert torch.equal(lt.target_scales(labels), labels["score"])


def test_scalar_rating_label_stats_match_original():
    rm = np.load(REF / "reward_model.npz")
    score = torch.tensor(rm["in/rating_labels/score"])
    _, stats = label_types.get_label_type("scalar_rating").loss_from_rewards(torch.zeros(16), {"score": score})
    np.testing.assert_allclose(float(stats["label_mean"]), rm["out/init/scalar_rating/label_mean"], rtol=1e-6)
    np.testing.assert_allclose(float(stats["label_var"]), rm["out/init/scalar_rating/label_var"], rtol=1e-6)


def test_scalar_compare_loss_and_target_scales():
    rng = np.random.default_rng(3)
    rewards = rng.normal(size=(16, 2)).astype(np.float32)
    difference = rng.normal(size=16).astype(np.float32)
    lt = label_types.get_label_type("scalar_compare")
    labels = {"difference": torch.tensor(difference)}
    loss, stats = lt.loss_from_rewards(torch.tensor(rewards), labels)
    r = rewards.astype(np.float64)
    np.testing.assert_allclose(float(loss), ((difference - (r[:, 1] - r[:, 0])) ** 2).mean(), rtol=1e-6)
    assert set(stats) == {"loss", "error"}
    np.testing.assert_allclose(lt.target_scales(labels).numpy(), difference / 2)
    assert label_types.get_label_type("best_of_4").target_scales({"best": torch.zeros(2)}) is None


def test_losses_are_float32_for_bf16_rewards():
    rewards = torch.randn(8, 4).bfloat16()
    best = torch.zeros(8, dtype=torch.long)
    loss, _ = label_types.get_label_type("best_of_4").loss_from_rewards(rewards, {"best": best})
    assert loss.dtype == torch.float32


def _fake_reward_model(calls):
    """A deterministic stand-in: a different weighted sum of the query and response tokens per row."""
    def reward_model(queries, responses):
        calls.append((queries.shape, responses.shape))
        wq = torch.linspace(0.1, 0.5, queries.shape[1])
        wr = torch.linspace(-0.3, 0.7, responses.shape[1])
        return (queries.float() * wq).sum(1) / 10 + (responses.float() * wr).sum(1) / 10
    return reward_model


def _recorded_labels(name):
    """The 16 recorded labels of a label type (tests/reference/reward_model.npz)."""
    rm = np.load(REF / "reward_model.npz")
    source = {"best_of_4": "labels", "scalar_rating": "rating_labels", "scalar_compare": "compare_labels"}[name]
    prefix = f"in/{source}/"
    return {k[len(prefix):]: torch.tensor(rm[k]) for k in rm.files if k.startswith(prefix)}


@pytest.mark.parametrize("name", ["best_of_4", "scalar_rating", "scalar_compare"])
def test_loss_scores_all_responses_in_one_call(name):
    labels = _recorded_labels(name)
    lt = label_types.get_label_type(name)
    assert set(labels) == set(lt.schemas(query_length=5, response_length=6))
    calls = []
    loss, stats = lt.loss(_fake_reward_model(calls), labels)
    assert calls == [((16 * lt.num_responses, 5), (16 * lt.num_responses, 6))]
    separate = torch.stack([_fake_reward_model([])(labels["query"], labels[k]) for k in lt.response_keys], dim=1)
    want, want_stats = lt.loss_from_rewards(separate, labels)
    torch.testing.assert_close(loss, want)
    assert stats.keys() == want_stats.keys()


@pytest.mark.parametrize("name", ["best_of_4", "scalar_rating"])
def test_loss_in_groups_is_the_mean_of_each_groups_loss(name):
    """Labels of two virtual ranks, one after the other: loss and stats are the mean of each rank's (the original's
    average over ranks), from one reward model call."""
    labels = _recorded_labels(name)
    lt = label_types.get_label_type(name)
    calls = []
    loss, stats = lt.loss(_fake_reward_model(calls), labels, groups=2)
    assert calls == [((16 * lt.num_responses, 5), (16 * lt.num_responses, 6))]
    halves = [lt.loss(_fake_reward_model([]), {k: v[rows] for k, v in labels.items()})
              for rows in (slice(0, 8), slice(8, 16))]
    torch.testing.assert_close(loss, (halves[0][0] + halves[1][0]) / 2)
    assert stats.keys() == halves[0][1].keys()
    for key in stats:
        torch.testing.assert_close(stats[key], (halves[0][1][key] + halves[1][1][key]) / 2, msg=key)
    whole, whole_stats = lt.loss(_fake_reward_model([]), labels)
    torch.testing.assert_close(lt.loss(_fake_reward_model([]), labels, groups=1)[0], whole)
    if name == "scalar_rating":  # the mean of the halves' statistics is not the whole batch's
        assert not torch.allclose(stats["label_var"], whole_stats["label_var"])


def test_loss_refuses_labels_that_do_not_split_into_the_groups():
    labels = _recorded_labels("best_of_4")
    lt = label_types.get_label_type("best_of_4")
    with pytest.raises(ValueError, match="16 labels do not split into 3 equal groups"):
        lt.loss(_fake_reward_model([]), labels, groups=3)
    with pytest.raises(ValueError, match="15 labels do not split into 2 equal groups"):
        lt.loss(_fake_reward_model([]), {k: v[:15] for k, v in labels.items()}, groups=2)


def test_accuracy_attributes():
    lt = label_types.get_label_type("best_of_4")
    assert lt.has_accuracy and lt.chance_accuracy == 0.25
    assert not label_types.get_label_type("scalar_rating").has_accuracy
    assert not label_types.get_label_type("scalar_compare").has_accuracy


def test_target_mean_std():
    rm = np.load(REF / "reward_model.npz")
    assert label_types.get_label_type("best_of_4").target_mean_std({"best": rm["in/labels/best"]}) == (0.0, 1.0)
    score = rm["in/rating_labels/score"]
    mean, std = label_types.get_label_type("scalar_rating").target_mean_std({"score": score})
    np.testing.assert_allclose([mean, std], [score.astype(np.float64).mean(), score.astype(np.float64).std()])
    difference = torch.tensor(rm["in/compare_labels/difference"])
    mean, std = label_types.get_label_type("scalar_compare").target_mean_std({"difference": difference})
    d = rm["in/compare_labels/difference"].astype(np.float64) / 2
    np.testing.assert_allclose([mean, std], [d.mean(), d.std()], rtol=1e-6)


def _original_reward_model(rm):
    """The recorded initial reward model as reward(q, r) = gain * head(last position) + bias, with its gain/bias."""
    tf_vars = {k[len("init/var/"):]: rm[k] for k in rm.files if k.startswith("init/var/")}
    model = GPT2(GPT2Config.from_dict(json.loads(str(rm["meta_json"]))["hparams"]), ["reward"])
    model.load_state_dict(tf_to_state_dict(tf_vars, 2, scope="reward_model/model", heads=["reward"]))
    gain = torch.nn.Parameter(torch.tensor(tf_vars["reward_model/reward_norm/gain"]))
    bias = torch.nn.Parameter(torch.tensor(tf_vars["reward_model/reward_norm/bias"]))

    def reward_model(queries, responses):
        tokens = torch.cat([queries, responses], dim=1).long()
        return gain * model(tokens, padding_token=52)["reward"][:, -1] + bias
    return reward_model, gain, bias


@pytest.mark.parametrize("name,source", [("best_of_4", "labels"), ("scalar_rating", "rating_labels"),
                                         ("scalar_compare", "compare_labels")])
def test_losses_match_original_with_recorded_reward_model(name, source):
    rm = np.load(REF / "reward_model.npz")
    reward_model, gain, bias = _original_reward_model(rm)
    labels = {k.split("/")[-1]: torch.tensor(rm[k]) for k in rm.files if k.startswith(f"in/{source}/")}
    loss, stats = label_types.get_label_type(name).loss(reward_model, labels)
    keys = [k.split("/")[-1] for k in rm.files if k.startswith(f"out/init/{name}/")]
    assert keys and set(keys) <= set(stats)
    for key in keys:
        np.testing.assert_allclose(float(stats[key]), rm[f"out/init/{name}/{key}"], rtol=1e-4, atol=1e-5, err_msg=key)
    if name == "best_of_4":
        loss.backward()
        np.testing.assert_allclose(float(gain.grad), rm["out/init/best_of_4_grad/reward_model/reward_norm/gain"],
                                   rtol=1e-3, atol=1e-6)
        assert abs(float(bias.grad)) < 1e-6
