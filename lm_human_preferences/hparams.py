"""Every hyperparameter struct of the port: names and defaults of the original (ORIGINAL §3.1) plus the
port's run options. The experiments that fill them in live in the top-level ``params.py``.

Batch sizes are global (summed over ranks), as in the original. A run is defined on ``virtual_ranks`` ranks
(the original's MPI ranks, 8 in every experiment of its launcher): each virtual rank reads its share of the
queries, samples with its own seed, permutes and whitens its own rows, and gradients are averaged over all of
them, whatever number of processes W runs it (each hosts virtual_ranks / W). :func:`check_world_size` checks that
W divides virtual_ranks.
"""

import math
from dataclasses import dataclass, field
from typing import ClassVar, Dict, Literal, Optional

from lm_human_preferences import label_types
from lm_human_preferences.utils.hyperparams import HParams, HParamsError

MIN_WHITEN_ROWS = 8  # the original refuses to whiten rewards over fewer rows than this
VIRTUAL_RANKS = 8  # the original's launch.py ran every experiment on 8 MPI ranks


def _check_virtual_ranks(hp, prefix: str, batch_names) -> None:
    """virtual_ranks >= 1 and every global batch of `batch_names` split evenly over the virtual ranks."""
    hp._require_at_least(prefix, 'virtual_ranks', 1)
    for name in batch_names:
        _check_divisible(f'{prefix}{name}', getattr(hp, name), hp.virtual_ranks, f"'{prefix}virtual_ranks'")


def _check_hosts(prefix: str, virtual_ranks: int, world_size: int) -> None:
    """HParamsError unless `world_size` processes can host `virtual_ranks` (each the same number)."""
    _check_positive_world_size(world_size)
    if virtual_ranks % world_size:
        divisors = [str(d) for d in range(1, virtual_ranks + 1) if virtual_ranks % d == 0]
        counts = 'one process' if len(divisors) == 1 else f"{', '.join(divisors[:-1])} or {divisors[-1]} processes"
        raise HParamsError(
            f"'{prefix}virtual_ranks' ({virtual_ranks}) must be divisible by the number of processes ({world_size}): "
            f"each process hosts the same number of virtual ranks. Run on {counts}, or pass "
            f"--{prefix}virtual_ranks <a multiple of {world_size}> (a different run)")


@dataclass
class RunHParams(HParams):
    seed: Optional[int] = None  # random seed; None = a fresh random seed
    log_interval: int = 10  # log statistics (and print samples) every N steps
    save_interval: int = 50  # PPO: save a checkpoint every N updates (unused by reward training)
    save_dir: Optional[str] = None  # run directory; launch.py sets it to <save_dir>/<name>; None = save nothing
    device: Literal['auto', 'cpu', 'cuda'] = 'auto'  # 'auto' = cuda when available, else cpu
    # 'auto' = bf16 where the hardware runs it natively and faster (Ampere+ GPUs; CPUs with AVX-512 BF16 or AMX,
    # confirmed by a timed probe), else fp32; see utils/precision.py
    precision: Literal['auto', 'fp32', 'bf16'] = 'auto'
    wandb: Literal['auto', 'online', 'offline', 'disabled'] = 'auto'  # 'auto' = online if logged in, else offline
    wandb_project: str = 'lm-human-preferences'  # wandb project name
    keep_checkpoints: int = 3  # how many of the latest checkpoints to keep on disk
    rollout_micro_batch: Optional[int] = None  # per-rank chunk for no-grad sampling/scoring; None = whole batch
    train_micro_batch: Optional[int] = None  # per-rank gradient-accumulation chunk; None = whole minibatch
    compile: bool = False  # wrap the model in torch.compile
    eval_interval: int = 0  # reward model: held-out evaluation every N steps; 0 = only at the end
    # PPO: sample the first `sample_queries` test-mode queries every N updates, at update 0 and at the last, into
    # <run>/training_samples.jsonl (and a wandb table); 0 = off. Its own random numbers: the run is unchanged
    sample_interval: int = 50
    sample_queries: int = 16  # PPO: how many held-out queries those samples use (unused by reward training)

    def _validate(self, prefix: str) -> None:
        for name in ('log_interval', 'save_interval', 'keep_checkpoints', 'rollout_micro_batch',
                     'train_micro_batch', 'sample_queries'):
            self._require_at_least(prefix, name, 1)
        self._require_at_least(prefix, 'eval_interval', 0)
        self._require_at_least(prefix, 'sample_interval', 0)


@dataclass
class PolicyHParams(HParams):
    temperature: float = 1.0  # logits are divided by this everywhere: sampling, logprobs, KL, entropy
    initial_model: Optional[str] = None  # pretrained model: '124M' etc., a model directory, or 'test'

    def _validate(self, prefix: str) -> None:
        self._require(prefix, 'initial_model')
        if not self.temperature > 0:
            raise HParamsError(f"'{prefix}temperature' must be > 0, got {self.temperature!r}")


@dataclass
class TaskHParams(HParams):
    # Query
    query_length: Optional[int] = None  # tokens of raw query after trimming and padding (required)
    query_dataset: Optional[str] = None  # 'books', 'cnndm', 'tldr' or 'test' (required)
    query_prefix: str = ''  # text encoded and prepended to the query to form the policy's context
    query_suffix: str = ''  # text encoded and appended to the (padded) query
    start_text: Optional[str] = '.'  # if set, the query starts right after this (single-token) text
    end_text: Optional[str] = None  # if set, the query is cut after the last occurrence of this token
    # Response
    response_length: Optional[int] = None  # T, the number of sampled tokens (required)
    truncate_token: Optional[int] = None  # post-processing: truncate the response after this token id
    truncate_after: int = 0  # first response index at which the truncate token counts
    penalty_reward_value: int = -1  # score given to a response without the truncate token
    policy: PolicyHParams = field(default_factory=PolicyHParams)

    def _validate(self, prefix: str) -> None:
        self._require(prefix, 'query_length', 'query_dataset', 'response_length')
        self._require_at_least(prefix, 'query_length', 1)
        self._require_at_least(prefix, 'response_length', 1)
        self._require_at_least(prefix, 'truncate_after', 0)
        self._require_at_least(prefix, 'truncate_token', 0)  # and inside the vocabulary: runs.task_encodings
        if self.truncate_token is not None and self.truncate_after >= self.response_length:
            raise HParamsError(
                f"'{prefix}truncate_after' ({self.truncate_after}) must be < '{prefix}response_length' "
                f"({self.response_length}): the truncate token never counts, so every response would get the "
                f"penalty; lower --{prefix}truncate_after or pass --{prefix}truncate_token None")


@dataclass
class LabelHParams(HParams):
    type: Optional[str] = None  # a label type, e.g. 'best_of_4' (label_types.VALID_LABEL_TYPES lists them)
    num_train: Optional[int] = None  # how many labels to train on (one epoch)
    source: Optional[str] = None  # URL or path of the label JSON file, or 'test'

    def _validate(self, prefix: str) -> None:
        self._require(prefix, 'type', 'num_train', 'source')
        try:
            label_types.get_label_type(self.type)
        except ValueError as e:  # "'<type>' is not a label type: valid types are ..."
            raise HParamsError(f"'{prefix}type' = {e}") from None
        self._require_at_least(prefix, 'num_train', 1)


@dataclass
class TrainRewardHParams(HParams):
    run: RunHParams = field(default_factory=RunHParams)
    task: TaskHParams = field(default_factory=TaskHParams)
    labels: LabelHParams = field(default_factory=LabelHParams)

    # Ranks the run is defined on (ORIGINAL §11: label shares, query shards, seeds), whatever the process count
    virtual_ranks: int = VIRTUAL_RANKS
    batch_size: int = 40  # labels per optimizer step, summed over ranks
    lr: float = 5e-5  # Adam learning rate, decayed linearly to 0 over the epoch
    rollout_batch_size: int = 64  # queries per sampling batch (normalization), summed over ranks
    normalize_samples: int = 0  # samples used to estimate the reward mean and std
    debug_normalize: int = 0  # samples used to check the normalization afterwards
    normalize_before: bool = False  # before training, set gain/bias to the label data's target scales
    normalize_after: bool = False  # after training, set gain/bias so ref-policy rewards have mean 0, std 1

    def _validate(self, prefix: str) -> None:
        for name in ('batch_size', 'rollout_batch_size'):
            self._require_at_least(prefix, name, 1)
        _check_virtual_ranks(self, prefix, ('batch_size', 'rollout_batch_size'))
        for name in ('lr', 'normalize_samples', 'debug_normalize'):
            self._require_at_least(prefix, name, 0)
        if self.labels.num_train % self.batch_size != 0:
            raise HParamsError(
                f"'{prefix}labels.num_train' ({self.labels.num_train}) must be divisible by "
                f"'{prefix}batch_size' ({self.batch_size}): set --{prefix}labels.num_train to a multiple of "
                f"{self.batch_size} or --{prefix}batch_size to a divisor of {self.labels.num_train}")

    @property
    def num_steps(self) -> int:
        """Optimizer steps of the single epoch over the labels."""
        return self.labels.num_train // self.batch_size

    def check_world_size(self, world_size: int, *, prefix: str = '') -> None:
        """Raises HParamsError unless ``world_size`` processes can host the virtual ranks."""
        _check_hosts(prefix, self.virtual_ranks, world_size)


@dataclass
class AdaptiveKLParams(HParams):
    target: Optional[float] = None  # target KL(policy || ref) per episode, in nats (required when on)
    horizon: int = 10000  # episodes over which the KL coefficient adapts

    def _validate(self, prefix: str) -> None:
        self._require(prefix, 'target')
        if not self.target > 0:
            raise HParamsError(f"'{prefix}target' must be > 0, got {self.target!r}")
        self._require_at_least(prefix, 'horizon', 1)


@dataclass
class RewardHParams(HParams):
    kl_coef: float = 0.2  # KL penalty coefficient beta (the initial value when adaptive_kl is on)
    adaptive_kl: Optional[AdaptiveKLParams] = None  # 'on' = adapt beta towards a target KL
    trained_model: Optional[str] = None  # reward model to use: a reward run's reward_model/ directory, or 'test'
    train_new_model: Optional[TrainRewardHParams] = None  # 'on' = train a reward model first, with these

    def _validate(self, prefix: str) -> None:
        self._require_at_least(prefix, 'kl_coef', 0)
        if self.trained_model is not None and self.train_new_model is not None:
            raise HParamsError(
                f"both '{prefix}trained_model' ({self.trained_model!r}) and '{prefix}train_new_model' are set: "
                f"pass --{prefix}train_new_model off to use the trained model, or drop "
                f"--{prefix}trained_model to train a new one")
        if self.trained_model is None and self.train_new_model is None:
            raise HParamsError(
                f"no reward model: set '{prefix}trained_model' to a reward run directory (or 'test'), or "
                f"pass --{prefix}train_new_model on (with its labels.* and task.* settings)")


@dataclass
class PpoHParams(HParams):
    total_episodes: int = 2_000_000  # episodes (queries) over the whole run
    batch_size: int = 64  # episodes per PPO update, summed over ranks
    nminibatches: int = 1  # minibatches per epoch of each update
    noptepochs: int = 4  # epochs over each batch of rollouts
    lr: float = 5e-6  # Adam learning rate, decayed linearly to 0 over the updates
    vf_coef: float = 0.1  # weight of the value loss
    cliprange: float = 0.2  # PPO ratio clip
    cliprange_value: float = 0.2  # value clip around the old value
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    whiten_rewards: bool = True  # whiten rewards (mean kept) per virtual rank's minibatch before GAE

    def _validate(self, prefix: str) -> None:
        for name in ('total_episodes', 'batch_size', 'nminibatches', 'noptepochs'):
            self._require_at_least(prefix, name, 1)
        for name in ('lr', 'vf_coef'):
            self._require_at_least(prefix, name, 0)
        for name in ('cliprange', 'cliprange_value'):
            if not getattr(self, name) > 0:
                raise HParamsError(f"'{prefix}{name}' must be > 0, got {getattr(self, name)!r}")
        for name in ('gamma', 'lam'):
            if not 0 <= getattr(self, name) <= 1:
                raise HParamsError(f"'{prefix}{name}' must be in [0, 1], got {getattr(self, name)!r}")
        _check_divisible(f'{prefix}batch_size', self.batch_size, self.nminibatches,
                         f"'{prefix}nminibatches'")

    @property
    def nupdates(self) -> int:
        """Number of PPO updates: ceil(total_episodes / batch_size)."""
        return math.ceil(self.total_episodes / self.batch_size)


@dataclass
class OnlineHParams(HParams):
    """Online label collection during PPO (the paper's method for summarization, ORIGINAL §14.1): at `rounds` updates
    evenly spaced over the run, comparisons are sampled from the current policy into a labeling store, labeled, and
    the reward model is retrained from the initial model on all labels so far (rewards.train_new_model's settings,
    its labels.source being the initial labels), then PPO continues against it."""
    rounds: int = 20  # reward-model retrainings over the run (the paper: 20 over 2M episodes)
    comparisons: int = 256  # comparisons sampled from the current policy per round
    # who answers: 'people' (the labeling app: launch.py label serve --store <store>), 'vader' (the demo's mock
    # sentiment labeler) or 'reward_model:<reward model dir>' (a trained reward model as the true reward)
    labeler: str = 'people'
    store: Optional[str] = None  # the labeling store; None = <run dir>/labels.db
    instructions: str = ''  # the labelers' instructions: sentiment, descriptiveness, cnndm, tldr; '' = by dataset
    quota: float = 1.0  # fraction of a round's comparisons answered before PPO continues
    timeout: float = 0.0  # seconds to wait for the quota (0 = no limit); then PPO continues with the answers so far
    poll_seconds: float = 5.0  # how often the store is read while waiting for people
    overlap: float = 0.0  # fraction of a round's comparisons asked of two labelers (agreement)
    # times each store answer is written into a retraining's label file (train_reward reads its labels once, so this
    # is its epochs over them; the demo's label files repeat their training comparisons the same way)
    epochs: int = 1

    def _validate(self, prefix: str) -> None:
        self._require_at_least(prefix, 'rounds', 1)
        self._require_at_least(prefix, 'comparisons', 1)
        self._require_at_least(prefix, 'epochs', 1)
        for name, low, high in (('quota', 0.0, 1.0), ('overlap', 0.0, 1.0)):
            value = getattr(self, name)
            if not low <= value <= high or (name == 'quota' and value == 0):
                bounds = '(0, 1]' if name == 'quota' else '[0, 1]'
                raise HParamsError(f"'{prefix}{name}' must be in {bounds}, got {value!r}")
        self._require_at_least(prefix, 'timeout', 0)
        if not self.poll_seconds > 0:
            raise HParamsError(f"'{prefix}poll_seconds' must be > 0, got {self.poll_seconds!r}")
        if not (self.labeler in ('people', 'vader') or self.labeler.startswith('reward_model:')):
            raise HParamsError(f"'{prefix}labeler' = {self.labeler!r}: use people, vader or reward_model:<reward "
                               f"model directory>")


@dataclass
class TrainPolicyHParams(HParams):
    run: RunHParams = field(default_factory=RunHParams)
    task: TaskHParams = field(default_factory=TaskHParams)
    rewards: RewardHParams = field(default_factory=RewardHParams)
    ppo: PpoHParams = field(default_factory=PpoHParams)
    # Ranks the run is defined on (ORIGINAL §11: query shards, seeds, PPO permutations, whitening groups), whatever
    # the number of processes; gradients are averaged over all of them
    virtual_ranks: int = VIRTUAL_RANKS
    online: Optional[OnlineHParams] = None  # 'on' = collect labels during PPO and retrain the reward model

    # The original's cnndm/tldr experiments bind 'rewards.whiten', which does not exist (ORIGINAL §13.7).
    _aliases: ClassVar[Dict[str, str]] = {'rewards.whiten': 'ppo.whiten_rewards'}

    def _validate(self, prefix: str) -> None:
        ppo = self.ppo
        _check_virtual_ranks(self, prefix, ())
        groups = ppo.nminibatches * self.virtual_ranks
        _check_divisible(f'{prefix}ppo.batch_size', ppo.batch_size, groups,
                         f"'{prefix}ppo.nminibatches' x '{prefix}virtual_ranks'")
        if self.online is not None:
            self._validate_online(prefix)
        rows = ppo.batch_size // groups
        if ppo.whiten_rewards and rows < MIN_WHITEN_ROWS:
            raise HParamsError(
                f"reward whitening needs at least {MIN_WHITEN_ROWS} rows per virtual rank's minibatch, but "
                f"ppo.batch_size {ppo.batch_size} / (ppo.nminibatches {ppo.nminibatches} x virtual_ranks "
                f"{self.virtual_ranks}) = {rows}: raise --{prefix}ppo.batch_size, lower --{prefix}virtual_ranks, "
                f"or pass --{prefix}ppo.whiten_rewards false")

    def _validate_online(self, prefix: str) -> None:
        """Online rounds retrain the reward model with rewards.train_new_model's settings, on best_of_N labels, at
        distinct updates after the first."""
        if self.rewards.train_new_model is None:
            raise HParamsError(f"'{prefix}online' retrains the reward model with '{prefix}rewards.train_new_model''s "
                               f"settings: pass --{prefix}rewards.train_new_model on (its labels.source holds the "
                               f"initial labels)")
        label_type = label_types.get_label_type(self.rewards.train_new_model.labels.type)
        if not isinstance(label_type, label_types.PickBest):
            raise HParamsError(f"'{prefix}online' collects best_of_N labels, but the reward model trains on "
                               f"{label_type.name}: use a best_of_N label type")
        if self.online.rounds + 1 > self.ppo.nupdates:
            raise HParamsError(f"'{prefix}online.rounds' ({self.online.rounds}) needs at least "
                               f"{self.online.rounds + 1} PPO updates, the run has {self.ppo.nupdates}: lower the "
                               f"rounds or raise ppo.total_episodes")

    def check_world_size(self, world_size: int) -> None:
        """Raises HParamsError unless ``world_size`` processes can host the virtual ranks (of the chained reward
        training too)."""
        _check_hosts('', self.virtual_ranks, world_size)
        if self.rewards.train_new_model is not None:
            self.rewards.train_new_model.check_world_size(world_size, prefix='rewards.train_new_model.')


def check_world_size(hparams: HParams, world_size: int) -> None:
    """Raises HParamsError unless the run's batch sizes work on ``world_size`` ranks (call at startup)."""
    if not isinstance(hparams, (TrainRewardHParams, TrainPolicyHParams)):
        raise TypeError(f'expected TrainRewardHParams or TrainPolicyHParams, got {type(hparams).__name__}')
    hparams.check_world_size(world_size)


def _check_positive_world_size(world_size: int) -> None:
    """Raises HParamsError unless the world size is a positive integer."""
    if not world_size >= 1:
        raise HParamsError(f'world size must be >= 1, got {world_size!r}')


def _check_divisible(what: str, value: int, divisor: int, divisor_name: str = 'the world size') -> None:
    """Raises HParamsError unless ``value`` is a multiple of ``divisor``, naming both numbers."""
    if value % divisor != 0:
        what = what if what.startswith('per-rank') else f"'{what}'"
        lower = value - value % divisor
        nearest = ' or '.join(str(v) for v in (lower, lower + divisor) if v > 0)
        raise HParamsError(f"{what} ({value}) must be divisible by {divisor_name} ({divisor}), e.g. {nearest}")
