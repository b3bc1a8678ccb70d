"""The demo's settings: its two profiles, where each stage writes, and the hyperparameters of the real training code
(`train_reward`, `train_policy`) that a profile stands for."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from lm_human_preferences import runs
from lm_human_preferences.demo import corpus
from lm_human_preferences.demo.pretrain import PretrainConfig
from lm_human_preferences.hparams import TrainPolicyHParams, TrainRewardHParams
from lm_human_preferences.runs import RunDir

PERIOD = 13  # GPT-2 id of '.'


@dataclass(frozen=True)
class DemoProfile:
    """Every setting of one demo configuration."""
    name: str
    pretrain: PretrainConfig
    seed: int = 1
    # task: a "mock sentiment" task on fortunes, shaped like the original's books task (ORIGINAL §3.2)
    query_length: int = 24
    response_length: int = 16
    # The books task's period rule (truncate after the first '.' at index >= truncate_after, score -1 without one)
    # is off by default: for a model this small the penalty would dominate the reward.
    truncate_after: Optional[int] = None
    temperature: float = 0.7
    # labels and reward model
    num_labels: int = 1536  # comparisons collected; the last num_heldout only measure the reward model's accuracy
    num_heldout: int = 256
    # train_reward reads its labels once (ORIGINAL §9.2); the demo writes the training comparisons this many times in
    # the label file, i.e. trains for that many epochs: a 3M-parameter model needs more passes than GPT-2 does
    rm_epochs: int = 3
    rm_batch_size: int = 16
    rm_lr: float = 2e-3
    normalize_samples: int = 256
    rollout_batch_size: int = 128
    # one process on one CPU: the whole batch is one rank (the original's 8 would whiten over 4 rows)
    virtual_ranks: int = 1
    # PPO
    ppo_batch_size: int = 32
    ppo_episodes: int = 1920
    ppo_lr: float = 5e-4
    noptepochs: int = 4
    kl_coef: float = 0.15  # initial beta
    kl_target: float = 4.0  # nats per response
    kl_horizon: int = 625  # episodes; batch/horizon = 0.0512 per update, as the original's 512/10000
    # evaluation
    num_eval: int = 512
    # online variant (`launch.py demo --online`; 0 rounds = the offline demo): the same training label budget
    # (num_labels - num_heldout comparisons, each trained on rm_epochs times) and the same PPO episodes, but only
    # online_initial of the comparisons come from the initial policy; the rest come in online_rounds equal rounds
    # sampled from the current policy during PPO (online.*), each retraining the reward model from the initial model
    # on all labels so far. No held-out comparisons are collected: every round's new comparisons measure the old
    # reward model first (online/accuracy_before).
    online_rounds: int = 0
    online_initial: float = 0.5

    @property
    def online(self) -> bool:
        return self.online_rounds > 0

    @property
    def train_comparisons(self) -> int:
        """The training label budget in comparisons (the same offline and online)."""
        return self.num_labels - self.num_heldout

    @property
    def initial_comparisons(self) -> int:
        """Training comparisons labeled from the initial policy before PPO (all of them offline)."""
        return int(round(self.train_comparisons * self.online_initial)) if self.online else self.train_comparisons

    @property
    def round_comparisons(self) -> int:
        """Comparisons sampled and labeled per online round (0 offline)."""
        if not self.online:
            return 0
        rest = self.train_comparisons - self.initial_comparisons
        if rest <= 0 or rest % self.online_rounds:
            raise ValueError(f"{rest} online comparisons do not split into {self.online_rounds} equal rounds")
        return rest // self.online_rounds

    @property
    def heldout_comparisons(self) -> int:
        """Held-out comparisons in the label file (none online)."""
        return 0 if self.online else self.num_heldout

    @property
    def num_train(self) -> int:
        """Label records train_reward trains on: every initial training comparison rm_epochs times."""
        return self.initial_comparisons * self.rm_epochs


# The reward model generalizes from few comparisons only on top of a reasonably trained trunk: on the same labels a
# 4-layer, 64-wide model pretrained for 400 steps (held-out loss 6.79) reached 33-40% held-out best-of-4 accuracy,
# one pretrained for 200 steps (7.12) stayed at chance. Width is what costs (the 50,257-way output layer). The
# pretraining runs at the CPU's float32 matrix rate where bf16 is not native (0.45 s a step on a 2-core AVX2 EPYC),
# so both profiles pretrain 400 steps: 500 steps (loss 6.65) made the full run 8.4-9 min there, too close to its
# 10-minute budget with the set-up. Halving the fast run's pretraining tokens (8 x 64 windows, loss 6.96) together
# with its labels (1,024) and episodes (960) lost the learning (VADER rise -0.004, reward model 32%).
PROFILES = {
    "full": DemoProfile(name="full", pretrain=PretrainConfig(n_layer=4, n_embd=64, n_head=4, n_ctx=64, batch_size=16,
                                                              steps=400, lr=3e-3, warmup=40),
                        num_labels=3072, num_heldout=256, ppo_episodes=2048),
    "fast": DemoProfile(name="fast", pretrain=PretrainConfig(n_layer=4, n_embd=64, n_head=4, n_ctx=64, batch_size=16,
                                                              steps=400, lr=3e-3, warmup=40),
                        ppo_episodes=1280, num_eval=256),
}


@dataclass
class DemoPaths:
    """Where each stage writes: work = <cache_dir>/<profile>, out = plots and summary.json; the RLHF stages
    (labels, reward, policy, evaluate) and their markers go to `rlhf` (default: work itself; the online variant uses
    work/online, so offline and online results do not overwrite each other)."""
    work: Path
    out: Path
    rlhf: Optional[Path] = None

    @property
    def rlhf_dir(self) -> Path:
        return self.work if self.rlhf is None else Path(self.rlhf)

    @property
    def corpus(self) -> Path:
        return self.work / "corpus"

    @property
    def query_dataset(self) -> str:
        return str(self.corpus / corpus.QUERY_PREFIX)

    @property
    def pretrained(self) -> Path:
        return self.work / "pretrained"

    @property
    def labels(self) -> Path:
        return self.rlhf_dir / "labels" / "best_of_4.json"

    @property
    def run(self) -> RunDir:
        """The run directory train_reward and train_policy share."""
        return RunDir(self.rlhf_dir / "run")

    @property
    def evaluation(self) -> Path:
        return self.rlhf_dir / "eval" / "evaluation.json"

    def final_reward_model(self, profile: DemoProfile) -> Path:
        """The reward model PPO ends against: the run's, or the last online round's."""
        if profile.online:
            return self.run.path / "online" / f"round-{profile.online_rounds:03d}" / "reward_model"
        return self.run.reward_model

    def stage_outputs(self, stage: str) -> list[Path]:
        """The files and directories `stage` writes (hashed when it finishes, removed when it reruns)."""
        run = self.run
        return {"corpus": corpus.corpus_files(self.corpus),
                "pretrain": [self.pretrained / runs.MODEL_FILE, self.pretrained / runs.CONFIG_FILE,
                             self.pretrained / "pretrain.json"],
                "labels": [self.labels],
                "reward": [run.reward_model, run.reward_metrics, run.reward_hparams],
                "policy": [run.policy, run.policy_metrics, run.policy_hparams]
                + [p for p in (run.path / "online", run.path / "labels.db") if p.exists()],
                "evaluate": [self.evaluation]}[stage]


def task_binds(profile: DemoProfile, paths: DemoPaths) -> dict:
    """The demo task as dotted TaskHParams keys: fortunes queries that start and end at a sentence boundary."""
    return {
        "query_length": profile.query_length,
        "query_dataset": paths.query_dataset,
        "response_length": profile.response_length,
        "start_text": ".",  # start the query at the beginning of a sentence
        "end_text": ".",  # end it at the end of a sentence
        "truncate_token": None if profile.truncate_after is None else PERIOD,
        "truncate_after": profile.truncate_after or 0,
        "policy.temperature": profile.temperature,
        "policy.initial_model": str(paths.pretrained),
    }


def demo_precision(device: str) -> str:
    """The RLHF stages' run.precision: fp32 on a CPU, where the demo model's time goes to the float32 LM head (bf16
    autocast would only touch the small trunk and add casts), 'auto' on a GPU."""
    return "fp32" if device == "cpu" else "auto"


def reward_hparams(profile: DemoProfile, paths: DemoPaths, device: str) -> TrainRewardHParams:
    """train_reward settings: the original's best_of_4 reward experiment, scaled to the demo."""
    hp = TrainRewardHParams()
    hp.override_from_dict({
        **{f"task.{k}": v for k, v in task_binds(profile, paths).items()},
        "labels.type": "best_of_4",
        "labels.source": str(paths.labels),
        "labels.num_train": profile.num_train,
        "batch_size": profile.rm_batch_size,
        "lr": profile.rm_lr,
        "rollout_batch_size": profile.rollout_batch_size,
        "normalize_before": True,
        "normalize_after": True,
        "normalize_samples": profile.normalize_samples,
        "virtual_ranks": profile.virtual_ranks,
        "run.seed": profile.seed,
        "run.log_interval": 1,
        "run.save_dir": str(paths.run.path),
        "run.device": device,
        "run.wandb": "disabled",
        "run.precision": demo_precision(device),
    })
    hp.validate()
    return hp


def policy_hparams(profile: DemoProfile, paths: DemoPaths, device: str) -> TrainPolicyHParams:
    """train_policy settings: the original's sentiment experiment (adaptive KL), scaled to the demo.

    Online (profile.online_rounds > 0): rewards.train_new_model = the reward stage's settings (the initial label
    file; its trained reward model in the shared run directory is reused) and online rounds labeled by VADER, each
    answer written online.epochs = rm_epochs times into the retraining's label file as the label stage does."""
    hp = TrainPolicyHParams()
    if profile.online:
        rm = reward_hparams(profile, paths, device).to_nested_dict()
        rewards = {"rewards.train_new_model": "on",
                   **{f"rewards.train_new_model.{k}": v for k, v in _flatten(rm).items()},
                   "online": "on", "online.labeler": "vader", "online.rounds": profile.online_rounds,
                   "online.comparisons": profile.round_comparisons, "online.epochs": profile.rm_epochs,
                   "online.instructions": "sentiment"}
    else:
        rewards = {"rewards.trained_model": str(paths.run.reward_model)}
    hp.override_from_dict({
        **{f"task.{k}": v for k, v in task_binds(profile, paths).items()},
        **rewards,
        "rewards.kl_coef": profile.kl_coef,
        "rewards.adaptive_kl": "on",
        "rewards.adaptive_kl.target": profile.kl_target,
        "rewards.adaptive_kl.horizon": profile.kl_horizon,
        "ppo.total_episodes": profile.ppo_episodes,
        "ppo.batch_size": profile.ppo_batch_size,
        "ppo.lr": profile.ppo_lr,
        "ppo.noptepochs": profile.noptepochs,
        "virtual_ranks": profile.virtual_ranks,
        "run.seed": profile.seed,
        "run.keep_checkpoints": 1,
        "run.save_dir": str(paths.run.path),
        "run.device": device,
        "run.wandb": "disabled",
        "run.precision": demo_precision(device),
    })
    interval = max(1, hp.ppo.nupdates // 4)  # log and checkpoint four times a run
    hp.override_from_dict({"run.log_interval": interval, "run.save_interval": interval})
    hp.validate()
    return hp


def _flatten(nested: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out = {}
    for k, v in nested.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def stage_config(stage: str, profile: DemoProfile, corpus_dir: Path) -> dict:
    """The settings a stage's cached result depends on (a change reruns it and every later stage)."""
    p = asdict(profile)
    task = {k: p[k] for k in ("query_length", "response_length", "truncate_after", "temperature")}
    config = {"corpus": {"corpus_dir": str(Path(corpus_dir).resolve()), "fractions": corpus.SPLIT_FRACTIONS,
                         "seed": corpus.SPLIT_SEED},
              "pretrain": p["pretrain"],
              "labels": {**task, **{k: p[k] for k in ("num_labels", "num_heldout", "rm_epochs", "seed")}},
              "reward": {k: p[k] for k in ("rm_batch_size", "rm_lr", "normalize_samples", "rollout_batch_size",
                                           "virtual_ranks", "seed")},
              "policy": {k: p[k] for k in ("ppo_batch_size", "ppo_episodes", "ppo_lr", "noptepochs", "kl_coef",
                                           "kl_target", "kl_horizon", "virtual_ranks", "seed")},
              "evaluate": {"num_eval": profile.num_eval, "seed": profile.seed, "policy_accuracy": 1}}
    if profile.online and stage in ("labels", "reward", "policy", "evaluate"):  # the offline keys stay as they were
        config[stage] = {**config[stage], "online_rounds": profile.online_rounds,
                         "online_initial": profile.online_initial}
    return config[stage]
