"""Programmatic labelers: code that answers comparisons through the labeling store, by the same path a person in the
labeling app takes (a named labeler asks for its next assignment, sees the responses in that assignment's display
order, and answers with a display position, which the store maps back to a sample index).

Two labelers stand in for people in experiments and tests, as in the paper's mock experiments:

- `VaderLabeler`: the offline demo's mock sentiment labeler (`demo/labeler.py`): VADER's compound polarity of each
  response text, the most positive wins.
- `RewardModelLabeler`: a trained reward model as the "true reward": it scores the comparison's raw right-padded
  query tokens with each post-processed response's tokens (as the store keeps them, what `train_reward` trains on),
  the highest wins.

Ties are broken as the demo breaks them (`demo.labeler.pick_best`: uniformly among the tied maxima), with a random
generator keyed by the labeler's seed and the comparison's uid and drawn over sample indices, not display positions:
the same comparison always gets the same answer, whatever order its responses are shown in and whatever order the
comparisons are answered in. A labeler's label is therefore a function of (seed, comparison) alone, so answering a
store again from scratch, or resuming after an interruption, gives the same labels.

`answer_open` is the loop: it registers the labeler in the store under a name (once; a programmatic labeler needs no
token, the store looks it up by name) and answers whatever is open for it. `parse_labeler` reads the spec a command
line or hyperparameter gives: 'vader', 'reward_model:<dir>' or 'people' (no programmatic labeler).
"""
from __future__ import annotations

import hashlib
import json
import random
from typing import Collection, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from lm_human_preferences import runs
from lm_human_preferences.demo.labeler import make_labeler, pick_best
from lm_human_preferences.export import reward_model_dir as resolve_reward_model_dir
from lm_human_preferences.labeling.store import LEASE_SECONDS, LabelStore, StoreError
from lm_human_preferences.language.encodings import ENCODING_NAMES, get_encoding

PEOPLE = "people"
VADER = "vader"
REWARD_MODEL = "reward_model"
SPEC_HELP = f"'{VADER}', '{REWARD_MODEL}:<reward_model directory or train_reward run>' or '{PEOPLE}'"


@runtime_checkable
class Labeler(Protocol):
    """Picks the best of a comparison's responses, given in display order; returns its display position.

    `uid` (the comparison's uid) and `display_order` (display position -> sample index) are what a labeler may use to
    break ties the same way whatever the display order; a labeler that has no ties can ignore them."""
    name: str

    def choose(self, query_text: str, response_texts: Sequence[str], query_tokens: Sequence[int],
               response_tokens: Sequence[Sequence[int]], *, uid: Optional[str] = None,
               display_order: Optional[Sequence[int]] = None) -> int:
        ...


def tie_rng(seed: int, uid: Optional[str]) -> np.random.Generator:
    """The generator that breaks ties of comparison `uid` for a labeler seeded `seed` (any integer)."""
    key = int.from_bytes(hashlib.sha256(("" if uid is None else uid).encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([int(seed) % 2**64, key]))


class ScoringLabeler:
    """A labeler that scores each response and picks the highest (ties: `demo.labeler.pick_best` with `tie_rng`)."""
    name = "scoring"

    def __init__(self, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"a labeler's seed must be an integer, got {seed!r}")
        self.seed = int(seed)

    def scores(self, query_text: str, response_texts: Sequence[str], query_tokens: Sequence[int],
               response_tokens: Sequence[Sequence[int]]) -> np.ndarray:
        """One float score per response, in the order given (higher is better)."""
        raise NotImplementedError

    def choose(self, query_text, response_texts, query_tokens, response_tokens, *, uid=None, display_order=None):
        n = len(response_texts)
        if len(response_tokens) != n:
            raise ValueError(f"{n} response texts but {len(response_tokens)} response token lists")
        order = list(range(n)) if display_order is None else [int(i) for i in display_order]
        if sorted(order) != list(range(n)):
            raise ValueError(f"display_order {order} is not a permutation of 0..{n - 1}")
        shown = np.asarray(self.scores(query_text, response_texts, query_tokens, response_tokens), dtype=np.float64)
        if shown.shape != (n,) or not np.isfinite(shown).all():
            raise ValueError(f"{self.name} labeler scored {n} responses as {shown.tolist()}: expected {n} finite "
                             f"numbers")
        by_sample = np.empty(n, dtype=np.float64)
        by_sample[order] = shown  # sample order: the tie-break draws one number per sample index
        best = int(pick_best(by_sample[None], tie_rng(self.seed, uid))[0])
        return order.index(best)


class VaderLabeler(ScoringLabeler):
    """The demo's mock sentiment labeler: VADER compound polarity of the response text (`demo.labeler.make_labeler`;
    ImportError with the install command if vaderSentiment is missing)."""
    name = VADER

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self._score = make_labeler()

    def scores(self, query_text, response_texts, query_tokens, response_tokens):
        return self._score(list(response_texts))


class RewardModelLabeler(ScoringLabeler):
    """A trained reward model as the true reward. `reward_model_dir`: a reward_model/ directory, a train_reward run
    directory, or a train_policy run (the reward model it trained against), as `launch.py export reward` takes."""
    name = REWARD_MODEL

    def __init__(self, reward_model_dir, device="cpu", seed: int = 0):
        super().__init__(seed)
        self.directory = resolve_reward_model_dir(reward_model_dir)  # RunError (a ValueError) naming what to pass
        encoding_file = self.directory / runs.ENCODING_FILE
        try:
            encoding = json.loads(encoding_file.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{encoding_file} is missing or unreadable ({e}); pass a reward model train_reward "
                             f"wrote") from None
        if encoding not in ENCODING_NAMES:
            raise ValueError(f"{encoding_file} names encoding {encoding!r}; expected one of {list(ENCODING_NAMES)}")
        enc = get_encoding(encoding)
        self.encoding, self.n_vocab, self.padding_token = encoding, enc.n_vocab, enc.padding_token
        self.device = torch.device(device)
        self.model = runs.load_reward_model(str(self.directory), n_vocab=enc.n_vocab,
                                            padding_token=enc.padding_token, device=self.device)

    def check_store(self, meta: dict) -> None:
        """ValueError if the store's comparisons are in another encoding than the reward model reads."""
        have = {"encoding": meta.get("encoding"), "n_vocab": meta.get("n_vocab"),
                "padding_token": meta.get("padding_token")}
        want = {"encoding": self.encoding, "n_vocab": self.n_vocab, "padding_token": self.padding_token}
        if have != want:
            raise ValueError(f"the labeling store's comparisons are tokenized as {have}, but reward model "
                             f"{self.directory} reads {want}: label with a reward model of the store's experiment")

    @torch.no_grad()
    def scores(self, query_text, response_texts, query_tokens, response_tokens):
        n = len(response_tokens)
        queries = torch.tensor([list(query_tokens)] * n, dtype=torch.long, device=self.device)  # (N, Q)
        responses = torch.tensor([list(r) for r in response_tokens], dtype=torch.long, device=self.device)  # (N, T)
        return self.model(queries, responses).float().cpu().numpy()


def answer_open(store: LabelStore, labeler: Labeler, name: str, *, max_answers: Optional[int] = None,
                uids: Optional[Collection[str]] = None, rng: Optional[random.Random] = None,
                lease_seconds: float = LEASE_SECONDS) -> int:
    """Answers, as the store's labeler `name` (registered on first use), every comparison open to it: each in turn
    is leased (`next_assignment`, display order drawn with `rng`), shown to `labeler` in display order, and answered
    with the display position it picks. Stops when nothing is left, after `max_answers`, and with `uids` considers
    only those comparisons (one round's, say). A lease the labeler already holds (an answer interrupted between
    lease and answer) is answered first. Returns the number of answers given.

    `name` must be the programmatic labeler's own: answering under a person's name would answer for them."""
    if max_answers is not None and (isinstance(max_answers, bool) or not isinstance(max_answers, int)
                                    or max_answers < 0):
        raise ValueError(f"max_answers must be a non-negative integer or None, got {max_answers!r}")
    if uids is not None:
        if isinstance(uids, str):
            raise ValueError(f"uids must be a collection of comparison uids, not the string {uids!r}")
        uids = sorted(set(uids))
    check = getattr(labeler, "check_store", None)
    if check is not None:
        check(store.meta())
    me = store.labeler_by_name(name)
    if me is None:
        try:
            store.add_labeler(name)  # the token is not needed: the labeler is found by name
        except StoreError:
            if store.labeler_by_name(name) is None:  # not a concurrent registration of the same name: a bad name
                raise
        me = store.labeler_by_name(name)
    answered = 0
    while max_answers is None or answered < max_answers:
        assignment = store.next_assignment(me, lease_seconds=lease_seconds, rng=rng, uids=uids)
        if assignment is None:
            break
        comparison = store.comparison(assignment.comparison_uid)
        tokens = [comparison["responses"][i][0] for i in assignment.display_order]
        position = labeler.choose(assignment.query_text, list(assignment.responses), comparison["query_tokens"],
                                  tokens, uid=assignment.comparison_uid, display_order=assignment.display_order)
        store.answer(me, assignment.id, int(position))
        answered += 1
    return answered


def check_labeler_spec(spec) -> tuple:
    """(kind, argument) of a labeler spec, without loading anything: ('people', None), ('vader', None) or
    ('reward_model', directory). ValueError naming the accepted forms otherwise."""
    if not isinstance(spec, str):
        raise ValueError(f"labeler {spec!r} is not a string: use {SPEC_HELP}")
    if spec in (PEOPLE, VADER):
        return spec, None
    kind, sep, arg = spec.partition(":")
    if kind == REWARD_MODEL and sep:
        if not arg:
            raise ValueError(f"labeler {spec!r} names no directory: use '{REWARD_MODEL}:<dir>' with a reward_model/ "
                             f"directory or a train_reward run directory")
        return REWARD_MODEL, arg
    if kind == REWARD_MODEL:
        raise ValueError(f"labeler {spec!r} names no reward model: use '{REWARD_MODEL}:<dir>'")
    raise ValueError(f"unknown labeler {spec!r}: use {SPEC_HELP}")


def parse_labeler(spec, *, seed: int = 0, device="cpu") -> Optional[Labeler]:
    """The programmatic labeler a spec names ('vader', 'reward_model:<dir>'), or None for 'people' (labels come
    from people through the labeling app). ValueError for a bad spec or a directory without a reward model;
    ImportError with the install command when 'vader' lacks vaderSentiment."""
    kind, arg = check_labeler_spec(spec)
    if kind == PEOPLE:
        return None
    if kind == VADER:
        return VaderLabeler(seed)
    return RewardModelLabeler(arg, device=device, seed=seed)
