#!/usr/bin/env python3
"""The command line of the port.

    python launch.py train_reward <experiment> <name> [--save_dir runs] [--dry_run] [--resume|--overwrite]
                                   [--dotted.key value ...]
    python launch.py train_policy <experiment> <name> [--save_dir runs] [--dry_run] [--resume|--overwrite]
                                   [--dotted.key value ...]
    python launch.py sample <run_dir> [--temperature T] [--nsamples N] [--batch_size B] [--seed S]
                            [--score|--no-score] [--out PATH]
    python launch.py demo [demo arguments ...]
    python launch.py plot <run_dir> [--out DIR] [--samples FIRST:LAST]
    python launch.py label {collect,add-labeler,admin-token,serve,status,export} ...   (see: launch.py label --help)
    python launch.py export {policy,reward} <run_dir> --out DIR [--overwrite]
    python launch.py evaluate <run_dir> [--against RUN_B|initial] [--num N] [--human-store FILE] | --report-human FILE

``label`` collects comparisons from a policy into a labeling store, serves the labeling web app to people and
exports their labels as a label file for ``train_reward`` (lm_human_preferences/labeling/cli.py). ``export`` writes
a run's policy or reward model as a Hugging Face ``transformers`` directory (lm_human_preferences/export.py).

Experiments are defined in params.py. Every other ``--dotted.key value`` (or ``--dotted.key=value``) of a
training command overrides one hyperparameter, e.g. ``--ppo.lr 1e-5 --rewards.adaptive_kl off``; the run
directory is ``<save_dir>/<name>``. For several GPUs run it under torchrun
(``torchrun --nproc_per_node 8 launch.py train_policy sentiment my_run``).

Exit status: 0 on success, and after SIGTERM/SIGINT stopped train_policy with a checkpoint (continue with
``--resume``); 2 with ``error: <message>`` for bad input (experiment, key, value, label file, model or checkpoint
directory, dataset, an existing run without ``--resume``/``--overwrite``, an output path that cannot be written),
found before anything is written; 1 with ``error: <message>`` when a command stops mid-way on a non-finite number
or a failed write (a full disk, no permission: the message names the path and the fix; what was written before is
kept, for a training run its last good checkpoint); 130 for a second Ctrl-C.
"""

import argparse
import math
import os
import sys
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import params
from lm_human_preferences import demo, evaluate, export, runs, sample, train_policy, train_reward, training_samples
from lm_human_preferences.labeling import cli as label_cli
from lm_human_preferences.utils import dist, plotting
from lm_human_preferences.utils.alloc import keep_freed_memory
from lm_human_preferences.utils.ckpt import CheckpointSaveError, InputError
from lm_human_preferences.utils.files import WriteError, fix_for
from lm_human_preferences.utils.hyperparams import INT64_MAX, INT64_MIN, HParamsError

TRAIN_COMMANDS = ('train_reward', 'train_policy')
_LAUNCHER_FLAGS = ('--dry_run', '--resume', '--overwrite', '-h', '--help')
_LAUNCHER_OPTIONS = ('--save_dir',)  # launcher flags that take a value
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # a second Ctrl-C, or one outside the training loop


class UsageError(ValueError):
    """A command line that cannot run; printed as ``error: <message>`` with exit status 2."""


class RunFailed(RuntimeError):
    """A run that stopped on a non-finite number or a failed checkpoint write; ``error: <message>``, status 1."""


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f'must be a finite number > 0, got {value}')
    return value


def _seed(text: str) -> int:
    """argparse type: an integer seed that fits 64 bits (what torch and NumPy accept)."""
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise argparse.ArgumentTypeError(f'{text} does not fit a 64-bit integer: pass a seed in [-2**63, 2**63)')
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (hyperparameter overrides are split off before parsing)."""
    parser = argparse.ArgumentParser(
        prog='launch.py', description='Fine-tuning GPT-2 from human preferences (a PyTorch port of '
        'openai/lm-human-preferences).')
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    for command, what in (('train_reward', 'train a reward model from human labels'),
                          ('train_policy', 'train a policy with PPO (training its reward model first, unless '
                                           '--rewards.trained_model is given)')):
        p = commands.add_parser(
            command, help=what, description=f'{what[0].upper()}{what[1:]}. Any other --dotted.key VALUE '
            'overrides that hyperparameter (see --dry_run for all keys).')
        p.add_argument('experiment', help='experiment name from params.py (e.g. sentiment, tldr, test)')
        p.add_argument('name', help='run name; the run directory is <save_dir>/<name>')
        p.add_argument('--save_dir', default='runs', help='parent directory of run directories (default: runs)')
        p.add_argument('--dry_run', action='store_true', help='print the resolved hyperparameters and exit')
        p.add_argument('--resume', action='store_true', help='continue the run from its latest checkpoint')
        p.add_argument('--overwrite', action='store_true', help='delete an existing run directory first')

    p = commands.add_parser('sample', help='sample (and score) from a trained policy run',
                            description='Sample queries from the task test set and print the policy responses.')
    p.add_argument('run_dir', help='directory of a train_policy run')
    p.add_argument('--temperature', type=_positive_float, default=None,
                   help='sampling temperature (default: the training temperature)')
    p.add_argument('--nsamples', type=_positive_int, default=8, help='number of samples (default: 8)')
    p.add_argument('--batch_size', type=_positive_int, default=4, help='queries per batch (default: 4)')
    p.add_argument('--seed', type=_seed, default=None, help='random seed (default: random)')
    p.add_argument('--score', action=argparse.BooleanOptionalAction, default=True,
                   help="score responses with the run's reward model (default: on)")
    p.add_argument('--out', default=None, help='also write the samples to this JSON file')

    commands.add_parser('export', add_help=False, help="a run's policy or reward model as a Hugging Face "
                        'transformers directory (see: launch.py export --help)')
    commands.add_parser('evaluate', add_help=False, help='evaluate a run (against another run or its initial '
                        'model), and human preference rates (see: launch.py evaluate --help)')
    commands.add_parser('demo', add_help=False, help='the end-to-end demo; arguments go to the demo '
                        '(see: launch.py demo --help)')

    p = commands.add_parser('plot', help='plot the logged metrics of a run')
    p.add_argument('run_dir', help='directory of a train_reward or train_policy run')
    p.add_argument('--out', default=None, help='output directory for the figures (default: <run_dir>/plots)')
    p.add_argument('--samples', metavar='FIRST:LAST', default=None,
                   help='instead of figures, print the samples over training (training_samples.jsonl) of updates '
                        'FIRST to LAST, both included (50:, :100, : or a single update N work too), as a markdown '
                        'table')

    label_cli.add_parser(commands)
    return parser


def reward_experiment(experiment: str):
    """The train_reward hyperparameters of an experiment (its task and label type), for the `label` commands."""
    return params.get_hparams('train_reward', experiment)


def split_overrides(args: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """Splits the arguments of a training command into launcher arguments and ``{dotted key: value}``
    hyperparameter overrides (``--key value`` or ``--key=value``; a key given twice keeps the last)."""
    launcher: List[str] = []
    overrides: Dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        flag = arg.split('=', 1)[0]
        if flag in _LAUNCHER_FLAGS or flag in _LAUNCHER_OPTIONS:
            launcher.append(arg)
            if flag in _LAUNCHER_OPTIONS and '=' not in arg and i + 1 < len(args):
                launcher.append(args[i + 1])
                i += 1
        elif arg.startswith('--') and len(arg) > 2:
            key, has_value, value = arg[2:].partition('=')
            if not has_value:
                if i + 1 >= len(args) or args[i + 1].startswith('--'):
                    raise UsageError(f"--{key} needs a value (write --{key}=VALUE for a value starting "
                                     f"with '--')")
                value = args[i + 1]
                i += 1
            if key in overrides:
                print(f'warning: --{key} given twice; using {value!r}', file=sys.stderr)
            overrides[key] = value
        else:
            launcher.append(arg)
        i += 1
    return launcher, overrides


def build_run_hparams(command: str, args: argparse.Namespace, overrides: Dict[str, str]):
    """The validated hyperparameters of a training run, with ``run.save_dir = <save_dir>/<name>``."""
    if args.resume and args.overwrite:
        raise UsageError('--resume and --overwrite exclude each other: resume continues the run, overwrite '
                         'deletes it first')
    if 'run.save_dir' in overrides:
        raise UsageError('the run directory is <save_dir>/<name>: pass --save_dir DIR and a run name instead '
                         'of --run.save_dir')
    run_dir = runs.run_dir_path(args.save_dir, args.name)  # strictly inside save_dir, however it is spelled
    with warnings.catch_warnings():
        warnings.simplefilter('always', DeprecationWarning)  # show deprecated keys to the user
        hparams = params.get_hparams(command, args.experiment, overrides)
    hparams.override_from_dict({'run.save_dir': run_dir})
    return hparams


def run_training(command: str, argv: Sequence[str]) -> int:
    """train_reward / train_policy: build the hyperparameters, then train (or print them with --dry_run)."""
    launcher_args, overrides = split_overrides(argv)
    args = build_parser().parse_args([command, *launcher_args])
    hparams = build_run_hparams(command, args, overrides)
    if args.dry_run:
        print(f'{command} {args.experiment} {args.name}: dry run, resolved hyperparameters:')
        hparams.dump()
        resolved = dist.resolved_run_settings(hparams.run.precision, dist.resolve_device(hparams.run.device))
        print(f'on this machine: run.device {hparams.run.device} -> {resolved["run.device"]}, run.precision '
              f'{hparams.run.precision} -> {resolved["run.precision"]} ({resolved["run.precision_reason"]})')
        return 0
    trainer = train_reward if command == 'train_reward' else train_policy
    try:
        trainer.train(hparams, resume=args.resume, overwrite=args.overwrite)
    except (InputError, HParamsError, FileExistsError) as e:  # the trainer's checks, before it writes anything
        raise UsageError(str(e)) from e
    except (FloatingPointError, CheckpointSaveError) as e:  # the run failed; its last checkpoint is kept
        raise RunFailed(str(e)) from e
    return 0


def _existing_dir(path: str) -> str:
    """Returns ``path`` if it is a directory; UsageError otherwise."""
    if not os.path.isdir(path):
        raise UsageError(f'run directory {path!r} does not exist')
    return path


def failure_message(error: OSError, command: str) -> str:
    """One line for an OSError that stopped `command` mid-way: what failed and where, the fix, how to go on."""
    if isinstance(error, WriteError):
        text = str(error)
    else:  # raised outside the project's writers: say what the OS said
        what = f"{error.filename}: {error.strerror}" if error.filename else f"a file operation failed ({error})"
        text = f"{what}; {fix_for(error)}"
    if command in TRAIN_COMMANDS:
        return f"{text}, then rerun the same command with --resume"
    if command == 'demo':
        return f"{text}, then run the same command again (finished stages are cached)"
    return f"{text}, then run the command again"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs one command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()
    try:
        if argv and argv[0] in TRAIN_COMMANDS:
            return run_training(argv[0], argv[1:])
        if argv and argv[0] == 'demo':
            return demo.main(argv[1:]) or 0
        if argv and argv[0] == 'export':
            return export.main(argv[1:])
        if argv and argv[0] == 'evaluate':
            return evaluate.main(argv[1:])
        args = build_parser().parse_args(argv)
        if args.command == 'label':
            return label_cli.run(args, reward_experiment)
        run_dir = _existing_dir(args.run_dir)
        if args.command == 'sample':
            sample.main(run_dir=run_dir, temperature=args.temperature, nsamples=args.nsamples,
                        batch_size=args.batch_size, seed=args.seed, score=args.score, out=args.out)
        elif args.samples is not None:
            training_samples.show(run_dir, args.samples)
        else:
            run = runs.RunDir(run_dir)
            plotting.plot_run(run_dir, {'policy': run.policy_metrics, 'reward': run.reward_metrics},
                              args.out if args.out is not None else run.plots)
        return 0
    except (UsageError, HParamsError, InputError) as e:  # InputError: the trainers' checks, run by the demo
        print(f'error: {e}', file=sys.stderr)
        return EXIT_USAGE
    except (RunFailed, FloatingPointError, CheckpointSaveError) as e:  # the last two: a trainer run by the demo
        print(f'error: {e}', file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:  # a write failed mid-way (full disk, no permission); what was written before is kept
        print(f'error: {failure_message(e, argv[0] if argv else "")}', file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as e:  # a message, when a training loop stopped on a signal and said what it kept
        print(f'error: {e}' if str(e) else 'error: interrupted (a single Ctrl-C inside policy training saves a '
              'checkpoint first)', file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        runs.release_run_lock()  # the command is over: another process may use its run directory now
        dist.cleanup()  # on every exit path: a process group left to interpreter shutdown can abort (SIGABRT)


if __name__ == '__main__':
    sys.exit(main())
