"""`launch.py label <command>`: collecting comparisons, labelers and their links, the labeling server, progress and
the export of labels.

    launch.py label collect EXPERIMENT --store FILE [--policy initial|RUN_DIR] [--num N] [--seed S] [--overlap F]
                                                    [--mode train|test] [--batch_size B]
    launch.py label add-labeler --store FILE NAME [--host H --port P | --url URL]   prints the labeler's link
    launch.py label admin-token --store FILE [--host H --port P | --url URL]        prints the admin page's link
    launch.py label serve --store FILE [--host 127.0.0.1] [--port 8000] [--lease SECONDS]
    launch.py label status --store FILE
    launch.py label export --store FILE --out labels.json [--min-answers K]

launch.py adds the `label` parser (`add_parser`) and calls `run` with a function that gives an experiment's
train_reward hyperparameters (the package does not import params.py). Bad input raises InputError, which launch.py
prints as one `error: ...` line with exit status 2, before anything is written. The web app (Starlette, the `label`
extra) is imported only by `serve`, so the other commands work without it.
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import math
import re
import sqlite3
import urllib.parse
from typing import Callable, Iterator

from lm_human_preferences.labeling.store import LEASE_SECONDS, LabelStore, StoreError
from lm_human_preferences.utils.ckpt import InputError
from lm_human_preferences.utils.files import WriteError
from lm_human_preferences.utils.hyperparams import HParamsError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
_HOST_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")


class _Parser(argparse.ArgumentParser):
    """The `label` subcommands' parser: a bad argument is one InputError line (status 2), not usage text."""

    def error(self, message):
        raise InputError(f"{self.prog}: {message} (see: {self.prog} --help)")


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 0..65535, got {value}")
    return value


def _lease(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return value


def _host(text: str) -> str:
    """A host name or an IP address (what a URL and a listening socket take)."""
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        if _HOST_NAME.match(text):
            return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a host name or an IP address")


def _base_url(text: str) -> str:
    """An http(s) address without query or fragment (a TLS proxy's, e.g. https://labels.example.org)."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// address without a query, such as "
                                         f"https://labels.example.org")
    return text.rstrip("/")


def _address_options(p, what: str) -> None:
    p.add_argument("--host", type=_host, default=DEFAULT_HOST, help=f"{what} (default: {DEFAULT_HOST})")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"its port (default: {DEFAULT_PORT})")


def _link_options(p) -> None:
    _address_options(p, "host the link points at, as labelers reach the server")
    p.add_argument("--url", type=_base_url, default=None,
                   help="the server's address as labelers reach it, e.g. https://labels.example.org behind a TLS "
                        "proxy (instead of --host and --port)")


def add_parser(commands) -> argparse.ArgumentParser:
    """Adds the `label` command and its subcommands to launch.py's subparsers `commands`."""
    label = commands.add_parser(
        "label", help="collect comparisons, serve the labeling app to people, export their labels",
        description="Human labels: collect a round of comparisons from a policy into a labeling store (one SQLite "
                    "file), give each labeler a link, serve the labeling web app, follow progress, and export the "
                    "labels as a label file for train_reward.")
    sub = label.add_subparsers(dest="label_command", required=True, metavar="SUBCOMMAND", parser_class=_Parser)

    p = sub.add_parser("collect", help="sample a round of comparisons into the store (created on first use)",
                       description="Sample a round of comparisons for an experiment's task: queries from its dataset "
                                   "as the trainers build them, N responses each (its best_of_N label type) at the "
                                   "training temperature, post-processed; stored with where they came from.")
    p.add_argument("experiment", help="experiment name from params.py (its train_reward task and label type)")
    p.add_argument("--store", required=True, help="labeling store file (created by the first collect)")
    p.add_argument("--policy", default="initial",
                   help="'initial' (the experiment's initial model, default) or a train_policy run directory (its "
                        "latest checkpoint, its task and temperature)")
    p.add_argument("--num", type=int, default=64, help="queries (comparisons) in the round (default: 64)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random, printed and stored)")
    p.add_argument("--overlap", type=float, default=0.1,
                   help="fraction of comparisons asked of two labelers, for agreement (default: 0.1)")
    p.add_argument("--mode", default="train", help="dataset split of the queries: train (default) or test")
    p.add_argument("--batch_size", type=int, default=16, help="queries sampled at once (default: 16)")

    p = sub.add_parser("add-labeler", help="add a labeler and print the link with its access token",
                       description="Add a labeler; prints the link of its labeling page, with its access token "
                                   "(shown once: the store keeps only a hash).")
    p.add_argument("name", help="the labeler's name: letters, digits, '-', '_' or '.'")
    p.add_argument("--store", required=True, help="labeling store file")
    _link_options(p)

    p = sub.add_parser("admin-token", help="print a link to the admin page with a new admin token",
                       description="Create an admin token; prints the link of the admin page (per-labeler counts, "
                                   "time per item, position bias, agreement). Shown once.")
    p.add_argument("--store", required=True, help="labeling store file")
    _link_options(p)

    p = sub.add_parser("serve", help="serve the labeling web app (needs the `label` extra)",
                       description="Serve the labeling app until Ctrl-C. Binds 127.0.0.1 unless --host says "
                                   "otherwise; another address needs labelers (tokens) and a TLS reverse proxy in "
                                   "front for remote labelers.")
    p.add_argument("--store", required=True, help="labeling store file")
    _address_options(p, "address to listen on")
    p.add_argument("--lease", type=_lease, default=LEASE_SECONDS,
                   help=f"seconds a labeler keeps a comparison before it goes to another (default: "
                        f"{LEASE_SECONDS:g})")

    p = sub.add_parser("status", help="print progress, per-labeler counts, position bias and agreement")
    p.add_argument("--store", required=True, help="labeling store file")

    p = sub.add_parser("export", help="write the labels as a label file for train_reward (--labels.source)",
                       description="Write the answered comparisons as the original's label JSON (best_of_N: query, "
                                   "sample0..N-1, best), one record per answer, validated by the label loader.")
    p.add_argument("--store", required=True, help="labeling store file")
    p.add_argument("--out", required=True, help="label file to write (replaced atomically)")
    p.add_argument("--min-answers", dest="min_answers", type=int, default=1,
                   help="export only comparisons with at least this many answers (default: 1; 2: the doubly "
                        "labeled ones)")
    return label


def link(args, path: str, token: str) -> str:
    """The link a labeler (or the admin) opens: under --url, else http://HOST:PORT."""
    if args.url is not None:
        return f"{args.url}{path}?token={token}"
    host = f"[{args.host}]" if ":" in args.host else args.host
    return f"http://{host}:{args.port}{path}?token={token}"


def run(args: argparse.Namespace, reward_hparams: Callable[[str], object]) -> int:
    """Runs `launch.py label <command>`; `reward_hparams(experiment)` gives an experiment's train_reward
    hyperparameters. Returns the exit status (0); InputError for bad input, WriteError for a store that cannot be
    written."""
    try:
        return _COMMANDS[args.label_command](args, reward_hparams)
    except StoreError as e:  # a store the command cannot use, a labeler name taken...
        raise InputError(str(e)) from e
    except sqlite3.DatabaseError as e:  # a write the store's file system refused (read-only, full, locked)
        raise WriteError(f"labeling store {args.store}: {e}; check that its file and directory are writable and "
                         f"have free space, and that no other program holds it", args.store, None) from e


def _collect(args, reward_hparams) -> int:
    from lm_human_preferences.labeling import collect  # torch and the models: only this command needs them

    hp = reward_hparams(args.experiment)
    collect.collect(args.store, hp, args.experiment, policy=args.policy, num=args.num, seed=args.seed,
                    overlap=args.overlap, mode=args.mode, batch_size=args.batch_size)
    return 0


@contextlib.contextmanager
def opened(path) -> Iterator[LabelStore]:
    """The store at `path`, closed when the block ends (so its journal is merged back into the file)."""
    store = LabelStore(path)
    try:
        yield store
    finally:
        store.close()


def _add_labeler(args, reward_hparams) -> int:
    with opened(args.store) as store:
        token = store.add_labeler(args.name)
    print(f"labeler {args.name}: {link(args, '/label', token)}")
    return 0


def _admin_token(args, reward_hparams) -> int:
    with opened(args.store) as store:
        token = store.add_admin_token()
    print(f"admin page: {link(args, '/admin', token)}")
    return 0


def _serve(args, reward_hparams) -> int:
    try:
        import uvicorn  # noqa: F401  (app.serve runs it)

        from lm_human_preferences.labeling import app  # the `label` extra: Starlette, uvicorn, Jinja2
    except ImportError as e:
        raise InputError(f"the labeling app needs the `label` extra ({e.name} is missing): run "
                         f"`pip install -e '.[label]'`") from e
    app.serve(args.store, host=args.host, port=args.port, lease_seconds=args.lease)
    return 0


def format_status(store: LabelStore) -> str:
    """Progress, rounds, labelers, position wins and agreement, as text."""
    meta, stats = store.meta(), store.admin_stats()
    progress, rounds = stats["progress"], store.rounds()
    needed, answered = progress["needed"], progress["answered"]
    share = f" ({answered / needed:.0%})" if needed else ""
    lines = [f"labeling store {store.path}: experiment {meta.get('experiment')}, {meta.get('label_type')}, "
             f"{len(rounds)} round(s), {progress['comparisons']} comparisons",
             f"answers: {answered} of {needed} needed{share}", "rounds:"]
    for r in rounds:
        s = r["source"]
        step = "" if s.get("checkpoint_step") is None else f" step {s['checkpoint_step']}"
        start = s.get("query_offset", 0)
        lines.append(f"  {r['id']}: {r['comparisons']} comparisons from {s.get('policy')}{step}, seed {s.get('seed')}, "
                     f"temperature {s.get('temperature')}, {s.get('mode')} queries #{start}-"
                     f"{start + s.get('num_queries', 0) - 1}")
    lines.append("labelers (answers, median seconds per item):")
    names = [labeler.name for labeler in store.labelers()]
    width = max((len(n) for n in names), default=0)
    for name in names:
        row = stats["labelers"].get(name)
        lines.append(f"  {name:<{width}}  {row['answers']:>6}  {row['median_seconds']:8.1f} s" if row else
                     f"  {name:<{width}}  {0:>6}         -")
    if not names:
        lines.append("  none yet: add one with `launch.py label add-labeler --store FILE NAME`")
    n = meta.get("num_responses") or len(stats["position_wins"])
    wins = "  ".join(f"{i + 1}: {w}" + (f" ({rate:.0%})" if rate is not None else "")
                     for i, (w, rate) in enumerate(zip(stats["position_wins"], stats["position_win_rate"])))
    lines.append(f"position wins (displayed position chosen; {1 / n:.0%} each without position bias): {wins}")
    agreement = stats["agreement"]
    lines.append(f"agreement on comparisons answered twice: " + (
        f"{agreement['agree']} of {agreement['pairs']} pairs agree ({agreement['rate']:.0%}; chance {1 / n:.0%})"
        if agreement["pairs"] else "no comparison answered twice yet"))
    return "\n".join(lines)


def _status(args, reward_hparams) -> int:
    with opened(args.store) as store:
        print(format_status(store))
    return 0


def _export(args, reward_hparams) -> int:
    from lm_human_preferences.labeling import export  # numpy and the label loader

    counts = export.export(args.store, args.out, min_answers=args.min_answers)
    print(f"wrote {counts['records']} {counts['label_type']} records to {args.out} (one per answer: "
          f"{counts['comparisons']} comparisons, {counts['answered_twice']} of them answered twice)")
    try:
        batch_size = reward_hparams(counts["experiment"]).batch_size
    except HParamsError:  # an experiment params.py no longer has: no advice
        return 0
    num_train = export.suggested_num_train(counts["records"], batch_size)
    if num_train:
        print(f"train a reward model on them: python launch.py train_reward {counts['experiment']} <name> "
              f"--labels.source {args.out} --labels.num_train {num_train} (a multiple of its batch_size "
              f"{batch_size}; the other {counts['records'] - num_train} records are held out)")
    else:
        print(f"note: train_reward {counts['experiment']} trains on a multiple of its batch_size {batch_size}: "
              f"label more, or pass a smaller --batch_size to train_reward")
    return 0


_COMMANDS = {"collect": _collect, "add-labeler": _add_labeler, "admin-token": _admin_token, "serve": _serve,
             "status": _status, "export": _export}
