"""Online label collection during PPO (`--online on`): the paper's method for summarization (ORIGINAL §14.1),
which the original code never released.

At `online.rounds` updates evenly spaced over the run (`schedule`), before that update:
1. comparisons: `online.comparisons` training queries, N responses each from the current policy (N from the reward
   label type, best_of_N), sampled into the labeling store as a round (labeling/collect.py's sampling, a generator
   of its own seeded by the run's seed and the round, so PPO's random streams are untouched);
2. answers: a programmatic labeler answers them through the store (labeling/labelers.py), or the trainer waits for
   people answering in the labeling app until `online.quota` of them are answered or `online.timeout` passes
   (unanswered ones stay in the store and count in later rounds once answered), saying what it waits for;
3. the reward model is retrained as the paper did: re-initialized from the initial model and trained with
   rewards.train_new_model's settings (normalization before and after) on the initial labels plus every answer in
   the store so far; it is written to <run>/online/round-KKK/reward_model and PPO continues against it.
Metrics per round (`online/*`): the old and the new reward model's accuracy on the round's answered comparisons,
the label count, the round's answers and the labelers' agreement.

Everything a resume needs is on disk: the store (comparisons and answers), the round directories (a finished
reward model is reused) and the policy checkpoint written when a round starts. A resume at a round's update goes
through the round again (sampling skipped when the store already holds it, waiting skipped when its reward model is
finished), so SIGTERM while waiting, a kill during retraining or any later kill ends as the uninterrupted run with
the same labels.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lm_human_preferences import label_types, runs, train_reward
from lm_human_preferences.labeling import labelers as programmatic
from lm_human_preferences.labeling.collect import check_store, make_sampler, sample_comparisons, store_meta
from lm_human_preferences.labeling.export import export_records
from lm_human_preferences.labeling.store import LabelStore
from lm_human_preferences.language import labels as label_files
from lm_human_preferences.language.fused import store_linears_in
from lm_human_preferences.runs import RunDir
from lm_human_preferences.utils import dist
from lm_human_preferences.utils.files import atomic_write_bytes, writing
from lm_human_preferences.utils.training import chunks


class OnlineStop(Exception):
    """SIGTERM/SIGINT while a round waited for answers or retrained the reward model; rank 0 has said what was
    kept. train_policy stops as after any update (its checkpoint at the round's update is already written)."""


def schedule(nupdates: int, rounds: int) -> list:
    """The updates before which rounds 1..rounds run: k * nupdates // (rounds + 1), evenly spaced inside the run."""
    updates = [k * nupdates // (rounds + 1) for k in range(1, rounds + 1)]
    if updates[0] < 1 or len(set(updates)) != len(updates):
        raise ValueError(f"online.rounds={rounds} rounds do not fit in {nupdates} updates")
    return updates


def round_seed(seed: Optional[int], k: int) -> int:
    """The sampling seed of round k: from the run's seed and the round (a fresh random one for an unseeded run is
    drawn once and kept in the store's round source)."""
    text = f"online-round:{seed}:{k}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little") & 0x7FFFFFFF


class OnlineRounds:
    """The online rounds of one train_policy run (`hp.online`), in its run directory."""

    def __init__(self, hp, run_dir: RunDir, info):
        self.hp, self.online, self.info = hp, hp.online, info
        self.rm_hp = hp.rewards.train_new_model
        self.updates = schedule(hp.ppo.nupdates, self.online.rounds)
        self.store_path = Path(self.online.store) if self.online.store else run_dir.path / "labels.db"
        self.root = run_dir.path / "online"
        self.label_type = label_types.get_label_type(self.rm_hp.labels.type)

    def round_dir(self, k: int) -> RunDir:
        return RunDir(self.root / f"round-{k:03d}")

    def due(self, step: int) -> Optional[int]:
        """The round to run before update `step`, if any."""
        return self.updates.index(step) + 1 if step in self.updates else None

    def reward_model_at(self, step: int) -> Optional[Path]:
        """The reward model PPO trains against at update `step` (from a resume): the latest round before it, or
        None for the initial one."""
        done = [k for k, u in enumerate(self.updates, start=1) if u < step]
        return self.round_dir(done[-1]).reward_model if done else None

    # ---- one round ------------------------------------------------------------------------------------------
    def run_round(self, trainer, k: int, signals, logger) -> None:
        """Round k before update trainer.global_step: comparisons, answers, retraining, the new reward model in
        `trainer`, metrics logged; OnlineStop on SIGTERM/SIGINT while it waits or retrains."""
        info, rd = self.info, self.round_dir(k)
        finished = dist.broadcast_object(rd.reward_model_complete() if info.is_main else None)
        uids = dist.broadcast_object(self._comparisons(trainer, k) if info.is_main else None)
        if not finished:
            if self.online.labeler == "people":
                self._wait(k, uids, signals)
            elif info.is_main:
                labeler = programmatic.parse_labeler(self.online.labeler, device=info.device,
                                                     seed=self.hp.run.seed or 0)
                store = LabelStore(self.store_path)
                try:
                    programmatic.answer_open(store, labeler, labeler.name, uids=set(uids))
                finally:
                    store.close()
            dist.barrier()
        round_labels = self._round_arrays(uids)
        before = self._accuracy(trainer.score_model, round_labels, trainer.precision)
        if not finished:
            self._retrain(trainer, k, signals)
        trainer.score_model = self.load_reward_model(rd.reward_model, trainer)
        after = self._accuracy(trainer.score_model, round_labels, trainer.precision)
        stats = {"online/round": k, "online/labels": self._label_count(k),
                 "online/round_answers": 0 if round_labels is None else len(round_labels["best"])}
        stats.update({k2: v for k2, v in (("online/accuracy_before", before), ("online/accuracy_after", after),
                                          ("online/agreement", self._agreement())) if v is not None})
        logger.log(stats, trainer.global_step)
        if info.is_main:
            print(f"online round {k} of {len(self.updates)} at update {trainer.global_step}: "
                  + ", ".join(f"{key[7:]} {value:.4g}" for key, value in stats.items() if key != "online/round"))

    def _comparisons(self, trainer, k: int) -> list:
        """Rank 0: the uids of round k's comparisons, sampled from the current policy into the store unless it
        already holds them (a resumed round)."""
        task, enc = self.hp.task, trainer.enc
        meta = store_meta(self.online.instructions, self.label_type, task, enc)
        exists, offset = check_store(self.store_path, meta, "train")
        if exists:
            store = LabelStore(self.store_path)
            try:
                for r in store.rounds():
                    if r["source"].get("online_round") == k:
                        return [f"{r['id']}-{i}" for i in range(r["comparisons"])]
            finally:
                store.close()
        seed = round_seed(self.hp.run.seed, k)
        device = trainer.info.device
        sampler = make_sampler(task, enc, "train", 16, offset)
        generator = torch.Generator(device=device).manual_seed(seed)
        comparisons = sample_comparisons(trainer.policy, sampler, enc, task, num=self.online.comparisons,
                                         num_responses=self.label_type.num_responses, generator=generator,
                                         precision=trainer.precision, device=device)
        doubled = np.random.default_rng(seed).choice(len(comparisons), size=int(round(self.online.overlap *
                                                                                     len(comparisons))), replace=False)
        for i in doubled:
            comparisons[int(i)]["copies"] = 2
        store = LabelStore(self.store_path) if exists else LabelStore.create(self.store_path, meta)
        try:
            round_id = store.add_round({"online_round": k, "update": trainer.global_step, "policy": "current",
                                        "seed": seed, "temperature": task.policy.temperature, "mode": "train",
                                        "query_offset": offset, "num_queries": len(comparisons),
                                        "overlap": self.online.overlap,
                                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            return store.add_comparisons(round_id, comparisons)
        finally:
            store.close()

    def _answered(self, uids) -> int:
        store = LabelStore(self.store_path)
        try:
            wanted = set(uids)
            return sum(1 for c in store.labeled() if c["uid"] in wanted)
        finally:
            store.close()

    def _wait(self, k: int, uids, signals) -> None:
        """Every rank: poll the store (rank 0 reads it) until online.quota of round k's comparisons are answered or
        online.timeout passes; a signal on any rank stops the run (OnlineStop)."""
        info, online = self.info, self.online
        need = math.ceil(online.quota * len(uids))
        start = last_said = time.time()
        if info.device.type == "cuda":
            torch.cuda.empty_cache()  # nothing of PPO's working memory is needed while people label
        while True:
            done = dist.broadcast_object(self._answered(uids) if info.is_main else None)
            waited = time.time() - start
            if done >= need or (online.timeout and waited >= online.timeout):
                if info.is_main and done < need:
                    print(f"online round {k}: {done} of {need} answers after {waited:.0f} s (online.timeout); "
                          f"continuing with the labels so far (the others count in a later round once answered)")
                return
            if dist.all_ranks_agree(signals is not None and signals.received is not None, info.device):
                if info.is_main:
                    print(f"\nstopped by {signals.received or 'a signal on another rank'} while online round {k} "
                          f"waited for answers ({done} of {need}); the answers are kept in {self.store_path}. "
                          f"Resume with the same command plus --resume", file=sys.stderr)
                raise OnlineStop()
            if info.is_main and (time.time() - last_said >= 60 or waited == 0 or last_said == start):
                last_said = time.time()
                print(f"online round {k}: waiting for answers, {done} of {need} so far ({len(uids)} comparisons in "
                      f"{self.store_path}); labelers answer in the app: launch.py label serve --store "
                      f"{self.store_path} (http://127.0.0.1:8000 by default; each labeler's link: launch.py label "
                      f"add-labeler --store {self.store_path} NAME)")
            time.sleep(online.poll_seconds)

    def _initial_records(self) -> list:
        source = self.rm_hp.labels.source
        if source == label_files.TEST_SOURCE:
            return label_files.zero_records(self.rm_hp.labels.type, query_length=self.hp.task.query_length,
                                            response_length=self.hp.task.response_length)
        return list(label_files.read_label_file(source))

    def _all_records(self) -> list:
        store = LabelStore(self.store_path)
        try:
            return self._initial_records() + export_records(store)[0] * self.online.epochs  # online.epochs passes
        finally:
            store.close()

    def _label_count(self, k: int) -> int:
        path = self.round_dir(k).path / "labels.json"
        return len(json.loads(path.read_text())) if path.is_file() else len(self._all_records())

    def _retrain(self, trainer, k: int, signals) -> None:
        """Round k's reward model: from the initial model, on the initial labels and every answer so far (written
        to <round dir>/labels.json), with rewards.train_new_model's settings; every rank trains its share."""
        info, rd = self.info, self.round_dir(k)
        rm_hp = copy.deepcopy(self.rm_hp)
        records = self._all_records() if info.is_main else None
        n = dist.broadcast_object(len(records) if info.is_main else None)
        if info.is_main:
            rd.path.mkdir(parents=True, exist_ok=True)
            with writing(rd.path / "labels.json"):
                atomic_write_bytes(rd.path / "labels.json", json.dumps(records).encode("utf-8"))
        dist.barrier()
        rm_hp.labels.source = str(rd.path / "labels.json")
        rm_hp.labels.num_train = n // rm_hp.batch_size * rm_hp.batch_size  # the remainder is held out
        rm_hp.run.save_dir = str(rd.path)
        rm_hp.run.device, rm_hp.run.precision = self.hp.run.device, self.hp.run.precision
        rm_hp.validate()
        reward_trainer = train_reward.build_trainer(rm_hp, info)
        try:
            train_reward.run(reward_trainer, signals)
        except train_reward.RewardTrainingStopped as e:
            raise OnlineStop() from e

    def load_reward_model(self, path: Path, trainer):
        """A round's reward model as PPO's frozen score model (bf16 Linears under bf16, as build_trainer does)."""
        model = runs.load_reward_model(str(path), n_vocab=trainer.enc.n_vocab, padding_token=trainer.enc.padding_token,
                                       device=self.info.device)
        if trainer.precision == "bf16":
            store_linears_in(model.model, torch.bfloat16)
        dist.broadcast_module(model)
        return model

    # ---- metrics --------------------------------------------------------------------------------------------
    def _round_arrays(self, uids) -> Optional[dict]:
        """The label arrays of round `uids`' answers (one record per answer), or None when none is answered."""
        store = LabelStore(self.store_path)
        try:
            wanted = set(uids)
            records = [r for r, c in zip(*self._records_with_uids(store)) if c in wanted]
        finally:
            store.close()
        if not records:
            return None
        task = self.hp.task
        return label_files.records_to_arrays(records, self.label_type.name, query_length=task.query_length,
                                             response_length=task.response_length, n_vocab=self._meta("n_vocab"),
                                             padding_token=self._meta("padding_token"))

    def _records_with_uids(self, store) -> tuple:
        records, comparisons = export_records(store)
        uids = [c["uid"] for c in comparisons for _ in c["choices"]]
        return records, uids

    def _meta(self, key):
        store = LabelStore(self.store_path)
        try:
            return store.meta()[key]
        finally:
            store.close()

    @torch.no_grad()
    def _accuracy(self, reward_model, arrays, precision: str) -> Optional[float]:
        """How often `reward_model` ranks the labeler's choice first on `arrays` (None without labels)."""
        if arrays is None:
            return None
        n = len(arrays["best"])
        correct = 0.0
        for rows in chunks(n, 64):
            batch = {key: value[rows] for key, value in arrays.items()}
            with dist.autocast(self.info.device, precision):
                _, stats = train_reward.label_batch_loss(reward_model, self.label_type, batch, self.info.device)
            correct += float(stats["accuracy"]) * (rows.stop - rows.start)
        return correct / n

    def _agreement(self) -> Optional[float]:
        store = LabelStore(self.store_path)
        try:
            return store.admin_stats()["agreement"]["rate"]
        finally:
            store.close()
