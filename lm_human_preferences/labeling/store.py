"""The labeling store: one SQLite file (standard library, no server) holding rounds of comparisons, labelers and
their answers.

A *comparison* is a query with N responses (token ids and decoded text) that a labeler ranks by picking the best
(the `best_of_N` label types). A *round* records where its comparisons came from (experiment, policy, checkpoint
step, seed, temperature). An *assignment* is one labeler's turn at one comparison: a lease that expires (an
abandoned page frees its item), a display order of the responses drawn fresh for it, and, once answered, the
display position chosen and the sample index it maps back to. A configurable fraction of comparisons asks for two
labelers (agreement, as the paper measured it).

Durability: WAL journal with synchronous=FULL, so a transaction that returned is on disk: an answer the server
acknowledged survives a kill -9. Every change is one `BEGIN IMMEDIATE` transaction (SQLite serializes writers), so
concurrent labelers never get the same comparison unless it asks for two, and then never the same labeler twice.

Connections are per thread (`LabelStore` keeps one per thread); open a store with `LabelStore(path)`.
"""
from __future__ import annotations

import hashlib
import json
import random
import secrets
import sqlite3
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterator, Optional, Sequence

SCHEMA_VERSION = 1
LEASE_SECONDS = 600.0  # an assignment not answered within this is given to the next labeler who asks

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    id INTEGER PRIMARY KEY, created REAL NOT NULL, source TEXT NOT NULL  -- JSON: experiment, policy, step, seed...
);
CREATE TABLE IF NOT EXISTS comparisons (
    id INTEGER PRIMARY KEY, uid TEXT NOT NULL UNIQUE, round_id INTEGER NOT NULL REFERENCES rounds(id),
    query_tokens TEXT NOT NULL, query_text TEXT NOT NULL, copies INTEGER NOT NULL CHECK (copies >= 1)
);
CREATE TABLE IF NOT EXISTS responses (
    comparison_id INTEGER NOT NULL REFERENCES comparisons(id), idx INTEGER NOT NULL,
    tokens TEXT NOT NULL, text TEXT NOT NULL, PRIMARY KEY (comparison_id, idx)
);
CREATE TABLE IF NOT EXISTS labelers (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_hash TEXT NOT NULL UNIQUE, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    id INTEGER PRIMARY KEY, comparison_id INTEGER NOT NULL REFERENCES comparisons(id),
    labeler_id INTEGER NOT NULL REFERENCES labelers(id), display_order TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('leased', 'answered', 'skipped', 'expired')),
    leased_at REAL NOT NULL, expires_at REAL NOT NULL, answered_at REAL,
    choice_position INTEGER, choice_sample INTEGER
);
CREATE INDEX IF NOT EXISTS assignments_by_comparison ON assignments (comparison_id, state);
CREATE INDEX IF NOT EXISTS assignments_by_labeler ON assignments (labeler_id, state, answered_at);
"""


class StoreError(ValueError):
    """A request the store refuses (unknown or foreign assignment, bad choice, wrong schema): the message says why."""


class UnknownAssignment(StoreError):
    """An assignment id that does not exist or belongs to another labeler (the web app answers 404)."""


@dataclass(frozen=True)
class Labeler:
    id: int
    name: str


@dataclass(frozen=True)
class Assignment:
    """One labeler's turn at one comparison: the responses in `display_order` (sample indices) on the page."""
    id: int
    comparison_uid: str
    query_text: str
    responses: tuple  # the response texts in display order
    display_order: tuple  # display position -> sample index
    expires_at: float


def hash_token(token: str) -> str:
    """What the store keeps of an access token (never the token itself)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class LabelStore:
    """A labeling store file; created (with `meta`: label type, task, encoding...) by `create`, opened by the
    constructor. Thread-safe: one SQLite connection per thread."""

    def __init__(self, path, *, clock=time.time):
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"labeling store {self.path} does not exist: create it with `launch.py label collect`")
        self._clock = clock
        self._local = threading.local()
        self._write_lock = threading.Lock()
        try:
            version = self.meta().get("schema_version")
        except sqlite3.DatabaseError as e:  # not SQLite, or SQLite without the store's tables
            self.close()
            raise StoreError(f"{self.path} is not a labeling store ({e}): pass the file `launch.py label collect` "
                             f"created") from None
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path} is not a labeling store of this version (schema_version {version!r}, "
                             f"expected {SCHEMA_VERSION})")

    @classmethod
    def create(cls, path, meta: dict, **kwargs) -> "LabelStore":
        """A new store at `path` (which must not exist) holding `meta` (JSON values: label_type, num_responses,
        task settings, encoding name, instructions...)."""
        path = Path(path)
        if path.exists():
            raise StoreError(f"{path} already exists: collect into it without creating it, or choose another file")
        connection = sqlite3.connect(path)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(SCHEMA)
            with connection:
                connection.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                                       [(k, json.dumps(v)) for k, v in {**meta, "schema_version": SCHEMA_VERSION,
                                                                        "created": time.time()}.items()])
        finally:
            connection.close()
        return cls(path, **kwargs)

    # ---- connections and transactions -------------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")  # a committed answer is on disk
            connection.execute("PRAGMA foreign_keys=ON")
            connection.row_factory = sqlite3.Row
            self._local.connection = connection
        return connection

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken before reading (BEGIN IMMEDIATE), committed when the block ends. This
        process's threads take turns on a lock first: SQLite would make them wait in its busy handler, which sleeps
        up to 100 ms between tries (the web app's tail latency under 20 labelers)."""
        connection = self._connection()
        with self._write_lock:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    # ---- contents ---------------------------------------------------------------------------------------------
    def meta(self) -> dict:
        rows = self._connection().execute("SELECT key, value FROM meta").fetchall()
        return {row["key"]: json.loads(row["value"]) for row in rows}

    def add_round(self, source: dict) -> int:
        """A new round; `source` says where its comparisons come from (JSON values). Returns its id."""
        with self._write() as db:
            return db.execute("INSERT INTO rounds (created, source) VALUES (?, ?)",
                              (self._clock(), json.dumps(source))).lastrowid

    def rounds(self) -> list:
        """Every round, in the order they were added: id, created, source (as given) and comparisons."""
        rows = self._connection().execute(
            "SELECT r.id, r.created, r.source, (SELECT COUNT(*) FROM comparisons c WHERE c.round_id = r.id) AS n "
            "FROM rounds r ORDER BY r.id")
        return [{"id": row["id"], "created": row["created"], "source": json.loads(row["source"]),
                 "comparisons": row["n"]} for row in rows]

    def add_comparisons(self, round_id: int, comparisons: Sequence[dict]) -> list:
        """Adds comparisons to a round in one transaction: each a dict with query_tokens (list of int), query_text,
        responses (list of (tokens, text)) and copies (1, or 2 to be labeled by two labelers). Returns their uids,
        `<round>-<index in the round>`, stable for the life of the store."""
        n_responses = self.meta().get("num_responses")
        uids = []
        with self._write() as db:
            start = db.execute("SELECT COUNT(*) FROM comparisons WHERE round_id = ?", (round_id,)).fetchone()[0]
            for i, c in enumerate(comparisons):
                if n_responses is not None and len(c["responses"]) != n_responses:
                    raise StoreError(f"a comparison needs {n_responses} responses, got {len(c['responses'])}")
                uid = f"{round_id}-{start + i}"
                cid = db.execute("INSERT INTO comparisons (uid, round_id, query_tokens, query_text, copies) "
                                 "VALUES (?, ?, ?, ?, ?)", (uid, round_id, json.dumps(list(c["query_tokens"])),
                                                            c["query_text"], int(c.get("copies", 1)))).lastrowid
                db.executemany("INSERT INTO responses (comparison_id, idx, tokens, text) VALUES (?, ?, ?, ?)",
                               [(cid, k, json.dumps(list(tokens)), text)
                                for k, (tokens, text) in enumerate(c["responses"])])
                uids.append(uid)
        return uids

    def add_labeler(self, name: str) -> str:
        """A new labeler; returns the access token (shown once: the store keeps only its hash)."""
        if not name or len(name) > 64 or not all(ch.isalnum() or ch in "-_." for ch in name):
            raise StoreError(f"labeler name {name!r}: use 1-64 letters, digits, '-', '_' or '.'")
        token = secrets.token_urlsafe(24)
        try:
            with self._write() as db:
                db.execute("INSERT INTO labelers (name, token_hash, created) VALUES (?, ?, ?)",
                           (name, hash_token(token), self._clock()))
        except sqlite3.IntegrityError:
            raise StoreError(f"labeler {name!r} already exists: pick another name") from None
        return token

    def labelers(self) -> list:
        """Every labeler, in the order they were added."""
        return [Labeler(row["id"], row["name"])
                for row in self._connection().execute("SELECT id, name FROM labelers ORDER BY id")]

    def add_admin_token(self) -> str:
        """A new token for the web app's admin page; returns it (shown once: meta keeps only its hash, under
        `admin_token_hashes`). Earlier admin tokens stay valid."""
        token = secrets.token_urlsafe(24)
        with self._write() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'admin_token_hashes'").fetchone()
            hashes = json.loads(row["value"]) if row else []
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('admin_token_hashes', ?)",
                       (json.dumps(hashes + [hash_token(token)]),))
        return token

    def is_admin_token(self, token: str) -> bool:
        if not token or len(token) > 256:
            return False
        row = self._connection().execute("SELECT value FROM meta WHERE key = 'admin_token_hashes'").fetchone()
        return row is not None and hash_token(token) in json.loads(row["value"])

    def labeler_for_token(self, token: str) -> Optional[Labeler]:
        if not token or len(token) > 256:
            return None
        row = self._connection().execute("SELECT id, name FROM labelers WHERE token_hash = ?",
                                          (hash_token(token),)).fetchone()
        return Labeler(row["id"], row["name"]) if row else None

    def labeler_by_name(self, name: str) -> Optional[Labeler]:
        """The labeler called `name`, or None (for programmatic labelers, which need no token)."""
        row = self._connection().execute("SELECT id, name FROM labelers WHERE name = ?", (name,)).fetchone()
        return Labeler(row["id"], row["name"]) if row else None

    # ---- assignment -------------------------------------------------------------------------------------------
    def next_assignment(self, labeler: Labeler, *, lease_seconds: float = LEASE_SECONDS,
                        rng: Optional[random.Random] = None,
                        uids: Optional[Collection[str]] = None) -> Optional[Assignment]:
        """The labeler's current lease if it has one, else a new lease on the first comparison that still needs a
        labeler and that this labeler has not seen; None when nothing is left for it. Expired leases are freed
        first. With `uids`, only comparisons with those uids count (for the lease too: a lease on another
        comparison is left as it is)."""
        rng = rng or random.SystemRandom()
        now = self._clock()
        only, only_args = ("", ()) if uids is None else \
            (" AND c.uid IN (SELECT value FROM json_each(?))", (json.dumps(sorted(set(uids))),))
        with self._write() as db:
            db.execute("UPDATE assignments SET state = 'expired' WHERE state = 'leased' AND expires_at <= ?", (now,))
            row = db.execute("SELECT a.id FROM assignments a JOIN comparisons c ON c.id = a.comparison_id "
                             "WHERE a.labeler_id = ? AND a.state = 'leased'" + only + " ORDER BY a.id LIMIT 1",
                             (labeler.id, *only_args)).fetchone()
            if row is not None:
                return self._assignment(db, row["id"])
            row = db.execute(
                "SELECT c.id FROM comparisons c WHERE "
                "(SELECT COUNT(*) FROM assignments a WHERE a.comparison_id = c.id "
                " AND a.state IN ('leased', 'answered')) < c.copies "
                "AND NOT EXISTS (SELECT 1 FROM assignments a WHERE a.comparison_id = c.id AND a.labeler_id = ? "
                " AND a.state IN ('answered', 'skipped'))" + only + " "
                "ORDER BY c.id LIMIT 1", (labeler.id, *only_args)).fetchone()
            if row is None:
                return None
            n = db.execute("SELECT COUNT(*) FROM responses WHERE comparison_id = ?", (row["id"],)).fetchone()[0]
            order = list(range(n))
            rng.shuffle(order)
            aid = db.execute("INSERT INTO assignments (comparison_id, labeler_id, display_order, state, leased_at, "
                             "expires_at) VALUES (?, ?, ?, 'leased', ?, ?)",
                             (row["id"], labeler.id, json.dumps(order), now, now + lease_seconds)).lastrowid
            return self._assignment(db, aid)

    def _assignment(self, db, assignment_id: int) -> Assignment:
        a = db.execute("SELECT a.id, a.display_order, a.expires_at, c.id AS cid, c.uid, c.query_text "
                       "FROM assignments a JOIN comparisons c ON c.id = a.comparison_id WHERE a.id = ?",
                       (assignment_id,)).fetchone()
        texts = {r["idx"]: r["text"] for r in db.execute("SELECT idx, text FROM responses WHERE comparison_id = ?",
                                                         (a["cid"],))}
        order = tuple(json.loads(a["display_order"]))
        return Assignment(id=a["id"], comparison_uid=a["uid"], query_text=a["query_text"],
                          responses=tuple(texts[i] for i in order), display_order=order, expires_at=a["expires_at"])

    def _own_lease(self, db, labeler: Labeler, assignment_id: int):
        row = db.execute("SELECT id, state, display_order FROM assignments WHERE id = ? AND labeler_id = ?",
                         (assignment_id, labeler.id)).fetchone()
        if row is None:
            raise UnknownAssignment(f"assignment {assignment_id} is not one of {labeler.name}'s")
        if row["state"] != "leased":
            raise StoreError(f"assignment {assignment_id} is {row['state']}, not open for an answer")
        return row

    def answer(self, labeler: Labeler, assignment_id: int, position: int) -> int:
        """Records the labeler's choice of the response shown at display `position` (0-based); returns the sample
        index it maps back to. Committed (on disk) when this returns."""
        with self._write() as db:
            row = self._own_lease(db, labeler, assignment_id)
            order = json.loads(row["display_order"])
            if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < len(order):
                raise StoreError(f"choice {position!r} is not a position in 0..{len(order) - 1}")
            db.execute("UPDATE assignments SET state = 'answered', answered_at = ?, choice_position = ?, "
                       "choice_sample = ? WHERE id = ?", (self._clock(), position, order[position], assignment_id))
            return order[position]

    def skip(self, labeler: Labeler, assignment_id: int) -> None:
        """The labeler passes on this comparison (it goes to someone else; this labeler does not see it again)."""
        with self._write() as db:
            self._own_lease(db, labeler, assignment_id)
            db.execute("UPDATE assignments SET state = 'skipped', answered_at = ? WHERE id = ?",
                       (self._clock(), assignment_id))

    def undo(self, labeler: Labeler, *, lease_seconds: float = LEASE_SECONDS) -> Optional[Assignment]:
        """Takes back the labeler's last answer or skip: its comparison is leased to the labeler again (same display
        order) and any other open lease of the labeler is released. Returns that assignment, or None if there is
        nothing to undo."""
        now = self._clock()
        with self._write() as db:
            row = db.execute("SELECT id FROM assignments WHERE labeler_id = ? AND state IN ('answered', 'skipped') "
                             "ORDER BY answered_at DESC, id DESC LIMIT 1", (labeler.id,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE assignments SET state = 'expired' WHERE labeler_id = ? AND state = 'leased'",
                       (labeler.id,))
            db.execute("UPDATE assignments SET state = 'leased', answered_at = NULL, choice_position = NULL, "
                       "choice_sample = NULL, leased_at = ?, expires_at = ? WHERE id = ?",
                       (now, now + lease_seconds, row["id"]))
            return self._assignment(db, row["id"])

    # ---- reading ----------------------------------------------------------------------------------------------
    def comparison(self, uid: str) -> dict:
        """One comparison by uid: query_tokens, query_text and responses, a list of (tokens, text) by sample index
        (what a programmatic labeler reads besides its assignment's texts). StoreError for an unknown uid."""
        db = self._connection()
        c = db.execute("SELECT id, query_tokens, query_text FROM comparisons WHERE uid = ?", (uid,)).fetchone()
        if c is None:
            raise StoreError(f"no comparison {uid!r} in {self.path}")
        responses = [(json.loads(r["tokens"]), r["text"]) for r in db.execute(
            "SELECT tokens, text FROM responses WHERE comparison_id = ? ORDER BY idx", (c["id"],))]
        return {"uid": uid, "query_tokens": json.loads(c["query_tokens"]), "query_text": c["query_text"],
                "responses": responses}

    def progress(self, labeler: Optional[Labeler] = None) -> dict:
        """Answers needed and given over the store, and (with a labeler) its own count and answers per hour."""
        db = self._connection()
        needed = db.execute("SELECT COALESCE(SUM(copies), 0) FROM comparisons").fetchone()[0]
        done = db.execute("SELECT COUNT(*) FROM assignments WHERE state = 'answered'").fetchone()[0]
        out = {"needed": needed, "answered": done, "comparisons":
               db.execute("SELECT COUNT(*) FROM comparisons").fetchone()[0]}
        if labeler is not None:
            times = [r[0] for r in db.execute("SELECT answered_at FROM assignments WHERE labeler_id = ? AND "
                                              "state = 'answered' ORDER BY answered_at", (labeler.id,))]
            span = times[-1] - times[0] if len(times) > 1 else 0.0
            out.update(mine=len(times), per_hour=(len(times) - 1) / span * 3600 if span > 0 else None)
        return out

    def answers(self) -> list:
        """Every answer: comparison uid, labeler, choice position and sample, seconds from lease to answer."""
        rows = self._connection().execute(
            "SELECT c.uid, l.name, a.choice_position, a.choice_sample, a.answered_at - a.leased_at AS seconds, "
            "a.answered_at FROM assignments a JOIN comparisons c ON c.id = a.comparison_id "
            "JOIN labelers l ON l.id = a.labeler_id WHERE a.state = 'answered' ORDER BY a.answered_at, a.id")
        return [dict(row) for row in rows]

    def admin_stats(self) -> dict:
        """Per-labeler counts and median seconds per item, how often each display position wins (position bias),
        and agreement on comparisons answered by two or more labelers."""
        answers = self.answers()
        per_labeler = {}
        for a in answers:
            per_labeler.setdefault(a["name"], []).append(a["seconds"])
        n_positions = self.meta().get("num_responses") or 1 + max((a["choice_position"] for a in answers), default=0)
        wins = [0] * n_positions
        for a in answers:
            wins[a["choice_position"]] += 1
        by_comparison = {}
        for a in answers:
            by_comparison.setdefault(a["uid"], []).append(a["choice_sample"])
        pairs = agree = 0
        for choices in by_comparison.values():
            for i in range(len(choices)):
                for j in range(i + 1, len(choices)):
                    pairs += 1
                    agree += choices[i] == choices[j]
        return {"progress": self.progress(),
                "labelers": {name: {"answers": len(s), "median_seconds": statistics.median(s)}
                             for name, s in sorted(per_labeler.items())},
                "position_wins": wins, "position_win_rate": [w / len(answers) if answers else None for w in wins],
                "agreement": {"pairs": pairs, "agree": agree, "rate": agree / pairs if pairs else None}}

    def labeled(self) -> list:
        """The answered comparisons for export, in comparison order: uid, query tokens, response tokens (by sample
        index), and every labeler's chosen sample index (in answer order)."""
        db = self._connection()
        out = []
        for c in db.execute("SELECT c.id, c.uid, c.query_tokens FROM comparisons c WHERE EXISTS (SELECT 1 FROM "
                            "assignments a WHERE a.comparison_id = c.id AND a.state = 'answered') ORDER BY c.id"):
            responses = [json.loads(r["tokens"]) for r in db.execute(
                "SELECT tokens FROM responses WHERE comparison_id = ? ORDER BY idx", (c["id"],))]
            choices = [r["choice_sample"] for r in db.execute(
                "SELECT choice_sample FROM assignments WHERE comparison_id = ? AND state = 'answered' "
                "ORDER BY answered_at, id", (c["id"],))]
            out.append({"uid": c["uid"], "query": json.loads(c["query_tokens"]), "responses": responses,
                        "choices": choices})
        return out
