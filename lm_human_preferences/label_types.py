"""Label types for reward-model training (ORIGINAL §8.2): their names, record schemas, losses and target scales.

This module is the one place that knows the label types: `get_label_type(name)` parses a name ('best_of_<N>',
'scalar_rating' or 'scalar_compare') and raises the one error for anything else; hyperparameter validation and
the label files ask it. best_of_N needs N >= 2: a choice among one response gives the loss nothing to learn
(softmax cross-entropy over one reward is 0), and N <= MAX_BEST_OF (each label file record holds N responses and
one reward-model call scores N x batch of them). The original parsed any 'best_of_<N>' by its prefix; the port
refuses N outside [2, MAX_BEST_OF] everywhere.

`loss_from_rewards(rewards, labels)` is the pure loss: the reward model's outputs for the label's responses,
stacked in `response_keys` order as rewards (B, num_responses), plus the label fields -> (loss, stats).
`loss(reward_model, labels)` scores all responses of a batch in one reward_model(queries, responses) call and
applies it. Stats are detached 0-d tensors.
"""
import reprlib
from abc import ABC, abstractmethod
from typing import Callable, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from lm_human_preferences.utils.core import Schema, pearson_r

MAX_BEST_OF = 1000  # the largest N of best_of_N
VALID_LABEL_TYPES = f"best_of_N (2 <= N <= {MAX_BEST_OF}, e.g. best_of_4), scalar_rating, scalar_compare"

Stats = Dict[str, torch.Tensor]
Labels = Mapping[str, torch.Tensor]  # a batch of label records, field -> (B, ...)
RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (queries (B, Q), responses (B, T)) -> (B,)


def _rewards_2d(rewards: torch.Tensor, num_responses: int, name: str) -> torch.Tensor:
    """Check rewards are (B, num_responses) and upcast them to float32 at least."""
    if rewards.dim() != 2 or rewards.shape[1] != num_responses:
        raise ValueError(f"{name} needs rewards of shape (B, {num_responses}), got {tuple(rewards.shape)}")
    return rewards.to(torch.promote_types(rewards.dtype, torch.float32))


class LabelType(ABC):
    """Schemas and loss of one kind of human label."""
    name: str
    response_keys: Tuple[str, ...]
    label_keys: Tuple[str, ...]
    has_accuracy = False  # whether loss stats include 'accuracy'
    chance_accuracy: Optional[float] = None  # accuracy of a uniformly random guess, where has_accuracy

    @property
    def num_responses(self) -> int:
        """How many responses each label compares."""
        return len(self.response_keys)

    def field_kinds(self) -> Dict[str, str]:
        """Field -> kind of a label-file record: 'query' and 'response' (token ids), then the annotation's
        'int' (the index of a response) or 'float'."""
        kinds = {"query": "query", **{k: "response" for k in self.response_keys}}
        kinds.update({k: "int" if np.issubdtype(s.dtype, np.integer) else "float"
                      for k, s in self.label_schemas().items()})
        return kinds

    def schemas(self, *, query_length: int, response_length: int) -> Dict[str, Schema]:
        """Schema of a full label record (question and annotation), e.g. for a SampleBuffer."""
        return {**self.question_schemas(query_length=query_length, response_length=response_length),
                **self.label_schemas()}

    def question_schemas(self, *, query_length: int, response_length: int) -> Dict[str, Schema]:
        """Schema of what is shown to the labeler: the raw query and the responses."""
        schemas = {"query": Schema(np.int32, (query_length,))}
        schemas.update({k: Schema(np.int32, (response_length,)) for k in self.response_keys})
        return schemas

    @abstractmethod
    def label_schemas(self) -> Dict[str, Schema]:
        """Schema of the human annotation."""

    @abstractmethod
    def target_scales(self, labels: Mapping) -> Optional[torch.Tensor]:
        """Label values on the reward model's output scale (for normalize_before), or None."""

    def target_mean_std(self, labels: Mapping) -> Tuple[float, float]:
        """(mean, population std) of the target scales over `labels`; (0, 1) when the type has none (§9.2)."""
        scales = self.target_scales(labels)
        if scales is None:
            return 0.0, 1.0
        scales = np.asarray(scales.cpu() if isinstance(scales, torch.Tensor) else scales, dtype=np.float64)
        return float(scales.mean()), float(scales.std())

    @abstractmethod
    def loss_from_rewards(self, rewards: torch.Tensor, labels: Labels) -> Tuple[torch.Tensor, Stats]:
        """(loss, stats) from rewards (B, num_responses) and the label fields."""

    def rewards(self, reward_model: RewardFn, labels: Labels) -> torch.Tensor:
        """reward_model on (query, each response), in one call over the stacked batch; -> (B, num_responses)."""
        queries = labels["query"]
        batch = queries.shape[0]
        stacked_queries = queries.repeat(self.num_responses, 1)  # (N*B, Q)
        stacked_responses = torch.cat([labels[k] for k in self.response_keys], dim=0)  # (N*B, T)
        return reward_model(stacked_queries, stacked_responses).reshape(self.num_responses, batch).T

    def loss(self, reward_model: RewardFn, labels: Labels, groups: int = 1) -> Tuple[torch.Tensor, Stats]:
        """(loss, stats) of a batch of labels under reward_model(queries, responses) -> (B,), the responses scored
        in one call. The B labels may be `groups` equal groups (the shares of virtual ranks, one after the other):
        then loss and stats are the mean of each group's, as the original's average over ranks."""
        rewards = self.rewards(reward_model, labels)
        if groups == 1:
            return self.loss_from_rewards(rewards, labels)
        size = rewards.shape[0] // groups
        if size * groups != rewards.shape[0]:
            raise ValueError(f"{rewards.shape[0]} labels do not split into {groups} equal groups")
        parts = [self.loss_from_rewards(rewards[g * size:(g + 1) * size],
                                        {k: v[g * size:(g + 1) * size] for k, v in labels.items()})
                 for g in range(groups)]
        loss = torch.stack([part[0] for part in parts]).mean()
        return loss, {k: torch.stack([part[1][k] for part in parts]).mean() for k in parts[0][1]}


class PickBest(LabelType):
    """best_of_N: the labeler picks the best of N responses; softmax cross-entropy over the N rewards."""
    has_accuracy = True

    def __init__(self, num_responses: int):
        if not 2 <= num_responses <= MAX_BEST_OF:  # one response leaves nothing to choose
            raise _not_a_label_type(f"best_of_{num_responses}")
        self.name = f"best_of_{num_responses}"
        self.response_keys = tuple(f"sample{i}" for i in range(num_responses))
        self.label_keys = ("best",)
        self.chance_accuracy = 1.0 / num_responses

    def label_schemas(self):
        return {"best": Schema(np.int32, ())}

    def target_scales(self, labels):
        return None

    def loss_from_rewards(self, rewards, labels):
        logits = _rewards_2d(rewards, self.num_responses, self.name)  # (B, N)
        best = labels["best"].long()
        error = F.cross_entropy(logits, best)
        accuracy = (logits.argmax(dim=1) == best).float().mean()
        return error, {"loss": error.detach(), "error": error.detach(), "accuracy": accuracy}


class ScalarRating(LabelType):
    """scalar_rating: a float score per response; squared error."""
    name = "scalar_rating"
    response_keys = ("sample",)
    label_keys = ("score",)

    def label_schemas(self):
        return {"score": Schema(np.float32, ())}

    def target_scales(self, labels):
        return labels["score"]

    def loss_from_rewards(self, rewards, labels):
        """rewards (B,) or (B, 1); labels['score'] (B,)."""
        if rewards.dim() == 1:
            rewards = rewards[:, None]
        predicted = _rewards_2d(rewards, 1, self.name)[:, 0]  # (B,)
        score = labels["score"].to(predicted.dtype)
        error = (score - predicted).square().mean()
        label_mean = score.mean()
        label_var = (score - label_mean).square().mean()
        corr = pearson_r(score, predicted.detach())
        return error, {"loss": error.detach(), "error": error.detach(),
                       "label_mean": label_mean, "label_var": label_var, "corr": corr}


class ScalarComparison(LabelType):
    """scalar_compare: a float difference r(sample1) - r(sample0); squared error."""
    name = "scalar_compare"
    response_keys = ("sample0", "sample1")
    label_keys = ("difference",)

    def label_schemas(self):
        return {"difference": Schema(np.float32, ())}

    def target_scales(self, labels):
        # Halved so its variance matches a single reward's
        return labels["difference"] / 2

    def loss_from_rewards(self, rewards, labels):
        rewards = _rewards_2d(rewards, 2, self.name)  # (B, 2)
        predicted_differences = rewards[:, 1] - rewards[:, 0]
        error = (labels["difference"].to(rewards.dtype) - predicted_differences).square().mean()
        return error, {"loss": error.detach(), "error": error.detach()}


def _not_a_label_type(name: str) -> ValueError:
    """The one error for a name that is not a label type."""
    return ValueError(f"{reprlib.repr(name)} is not a label type: valid types are {VALID_LABEL_TYPES}")


def get_label_type(name: str) -> LabelType:
    """The label type called `name`: 'best_of_<N>' (2 <= N <= MAX_BEST_OF), 'scalar_rating' or 'scalar_compare'.

    Raises ValueError("'<name>' is not a label type: valid types are ...") for anything else."""
    if name == "scalar_rating":
        return ScalarRating()
    if name == "scalar_compare":
        return ScalarComparison()
    n = name[len("best_of_"):]
    if name.startswith("best_of_") and n.isascii() and n.isdigit() and len(n) <= len(str(MAX_BEST_OF)):
        return PickBest(int(n))
    raise _not_a_label_type(name)
